// sparsefast CPU kernels: the interface between the torch binding (binding.cpp) and the
// torch-free kernel translation unit (kernels.cpp), which compiles the same kernel source
// (kernels_impl.h) once per ISA level and picks one at run time.
//
// Formats (built by binding.cpp from the mask; "rows" are output rows of the sparse matrix A,
// "cols" its reduction index; for Linear A = W (N x K) in forward and A = Wᵀ (K x N) in dX;
// for Conv2d A is the (O x kh*kw*C/groups) reduction view, channel fastest):
//   CSR   rowptr int32 [rows+1], col uint16 [nnz], val T [nnz]          (unstructured, any pattern)
//   BCSR  column-blocked CSR: the same entries reordered block-major -- block b holds the entries
//         with col in [b*kb, (b+1)*kb), row by row: bp int32 [nblk x bp_ld] (segment starts, bp_ld >=
//         rows+1), col uint16 [nnz], val fp32 [nnz]. A panel kernel walks block by block so the kb
//         X rows of a block stay in L1 while every row accumulates into Y; weights stream in order.
//   CSR blocks: the BCSR walk over CSR-ordered entries (SpMat::csr_blocks): bp int32 [(nblk+1) x bp_ld]
//         holds, per block and row, the CSR position of the segment start (the next block's row
//         holds its end); col uint16 and val T are the plain CSR arrays (kept-values storage)
//   NM    val T [rows x S], meta uint8 [rows x ceil(S/2)]               (N:M, n in {1,2,4,8}, m <= 16)
//         S = (cols/m)*n slots per row; slot s belongs to group s/n, the low nibble of meta byte s/2
//         holds the column offset in the group of slot 2i, the high nibble that of slot 2i+1.
//         Padding slots (a group that keeps fewer than n) hold value 0.
//
// Dense operands of the "panel" kernels are fp32 and batch-transposed: lanes = batch rows (Linear)
// or output pixels (Conv2d), so one kept weight multiplies a vector of lanes (16 fp32 lanes a
// vector). Linear lays X out as panels Xp[c][k][l] (c = lane panel, k = reduction row, l < PW);
// conv uses a plain im2col buffer (k x lanes) read in PW-lane chunks; both are (pointer, ld).
// The "small" kernels (a few batch rows) use row-major fp32 X (B x cols) and gather along cols.
#pragma once
#include <cstdint>

namespace sfcpu {

struct bf16_t { uint16_t bits; };

enum DType : int { kF32 = 0, kBF16 = 1 };
enum Isa : int { kGeneric = 0, kAVX2 = 1, kAVX512 = 2 };

// Sparse matrix A (rows x cols): N:M (meta != nullptr), BCSR (bp != nullptr) or CSR.
struct SpMat {
  int64_t rows = 0, cols = 0;
  const int32_t* rowptr = nullptr;  // CSR (BCSR: still the CSR row pointer, used to balance threads)
  const uint16_t* col = nullptr;    // CSR / BCSR
  const void* val = nullptr;        // T (CSR: nnz; NM: rows x S); BCSR: fp32
  const int32_t* bp = nullptr;      // BCSR block pointers (nullptr: plain CSR)
  int64_t bp_ld = 0, nblk = 0;      // BCSR
  // CSR-positioned blocks: bp[b][r] is the CSR position where row r's entries of block b start and
  // bp[b+1][r] where they end (bp has nblk+1 rows); col, values (T) and SDDMM outputs stay in CSR
  // order, so kernels read kept values as the layer stores them (no blocked copy)
  bool csr_blocks = false;
  // blocked CSR (bp set, csr_blocks false) only: entry j's value is val[vperm[j]] (T, not fp32) -- a
  // kept-values layer's dX reads the layer's values through the transpose's permutation in the kernel
  // instead of a permuted copy per call (nullptr: val[j], fp32)
  const int32_t* vperm = nullptr;
  const uint8_t* meta = nullptr;    // NM
  int n = 0, m = 0;                 // NM
  int64_t S = 0, meta_ld = 0;       // NM: slots per row, meta bytes per row
  // BSR over kept values (block:B masks): block row br (rows [br*bs, (br+1)*bs)) holds entries
  // e in [bptr[br], bptr[br+1]); entry e is block column bcol[e] and
  //   A[br*bs + r, bcol[e]*bs + c] = val[boff[e] + r*rs + c*cs],  (rs, cs) = btrans ? (1, bld[e]) : (bld[e], 1)
  // so the forward (A = W) and dX (A = W^T) read the layer's kept values in place (CSR order of a block
  // mask: a block row's values are one (bs x nb*bs) row-major matrix). rowptr is still given (per-row
  // entry counts) to balance threads.
  int64_t bs = 0;
  const int32_t* bptr = nullptr;
  const int32_t* bcol = nullptr;
  const int32_t* boff = nullptr;
  const int32_t* bld = nullptr;
  bool btrans = false;
};

// Y[r] = A[r] . X  for rows r in [r0, r1), one lane panel (fp32 X, Y, bias; values T).
// BCSR and blocked N:M visit the reduction rows block by block (an X block stays in L1).
struct PanelArgs {
  SpMat a;
  const void* x = nullptr;   // fp32, (a.cols x ldx) panel
  void* y = nullptr;         // fp32, (a.rows x ldy) panel
  int64_t ldx = 0, ldy = 0;
  int64_t nvec = 0;          // lanes / 16 in this panel (1..4)
  const float* bias = nullptr;  // fp32 [a.rows] or nullptr
  int64_t r0 = 0, r1 = 0;
  int64_t kb = 0;            // N:M only: reduction rows per block (0: none); multiple of lcm(32, 2m)
};

// Y[b, r] = sum_j A[r, j] X[b, j] for b < B, rows [r0, r1). X, Y fp32 row-major.
struct SmallArgs {
  SpMat a;
  const float* x = nullptr;  // (B x ldx)
  float* y = nullptr;        // (B x ldy)
  int64_t ldx = 0, ldy = 0, B = 0;
  const float* bias = nullptr;  // fp32 [a.rows] or nullptr
  int64_t r0 = 0, r1 = 0;
};

// SDDMM at the positions of A (CSR or BCSR order): out[j] (+)= sum_l DY[r][l] * X[col_j][l], rows [r0, r1).
struct SddmmArgs {
  SpMat a;                   // CSR index only (val unused)
  const void* dy = nullptr;  // panel: T (a.rows x ld); small: fp32 (B x ldd) row-major
  const void* x = nullptr;   // panel: T (a.cols x ld); small: fp32 (B x ldx) row-major
  int64_t ld = 0;            // panel lane stride
  int64_t ldd = 0, ldx = 0, B = 0;  // small path
  int64_t nvec = 0;          // panel: lanes/16 in this panel (any >= 1)
  float* out = nullptr;      // fp32 [nnz]
  bool accumulate = false;
  int64_t r0 = 0, r1 = 0;
};

// Layout helpers (all element type T, ranges for threading).
struct PackArgs {
  // rows <-> panels transpose: src (B x K) row-major  <->  dst panels (nc x K x PW)
  const void* src = nullptr;
  void* dst = nullptr;
  int64_t B = 0, K = 0, PW = 0, ld = 0;  // ld: row stride of the row-major side
  int64_t c0 = 0, c1 = 0;                // panel range
  int64_t k0 = 0, k1 = 0;                // reduction-row range (within each panel)
};

struct ConvGeom {
  int64_t C = 0, H = 0, W = 0;          // input channels of the group, spatial
  int64_t KH = 0, KW = 0, Ho = 0, Wo = 0;
  int64_t sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
  int64_t G = 0;                        // images in this block
  int64_t img_stride = 0;               // elements between images in x / dx (C_total*H*W)
  int64_t PW = 0;                       // im2col row length (lanes, >= G*Ho*Wo)
};

struct KernelTable {
  const char* isa_name;
  // SpMM over one lane panel; A in CSR / BCSR / N:M form; T (the table's dtype) is the value type
  // of CSR and N:M (BCSR values are fp32)
  void (*spmm_panel)(const PanelArgs&);
  // transposed SpMM over one lane panel without a transpose: Y[col_j] += val_j * X[r] for every entry of
  // A (CSR blocks, values T in CSR order), column blocks [r0, r1) (blocks own disjoint Y rows); Y zeroed
  void (*spmm_t_panel)(const PanelArgs&);
  // few batch rows (N:M: <= 16): gather kernels, fp32 activations
  void (*spmm_small)(const SmallArgs&);
  // masked weight gradient
  void (*sddmm_panel)(const SddmmArgs&);
  void (*sddmm_small)(const SddmmArgs&);
  // BSR (a.bs 16 or 32) masked weight gradient, block rows [r0, r1): dy (rows/bs, B, bs), x (cols/bs, B, bs) T
  void (*sddmm_bsr)(const SddmmArgs&);
  // T rows (B x K) -> fp32 panels (nc x K x PW), zero padding lanes >= B; and back (fp32 -> T)
  void (*to_panels)(const PackArgs&);
  void (*from_panels)(const PackArgs&);
  // conv: im2col into a plain fp32 buffer (rows of g.PW lanes), r = (kh*KW + kw)*C + ci, lane over (img, ho, wo);
  // rows [r0, r1) of the reduction index
  void (*im2col)(const void* x, void* xp, const ConvGeom& g, int64_t r0, int64_t r1);
  // col2im: fp32 dx (G images) += scatter of the im2col-shaped buffer, planes (img*C + ci) in [p0, p1)
  // (may zero entries of that buffer it alone reads)
  void (*col2im)(const void* xp, void* dx, const ConvGeom& g, int64_t p0, int64_t p1);
  // conv rows <-> lanes: rows o in [o0, o1) of T tensor t (G images, row stride HW per image,
  // image stride img_stride) <-> fp32 panels (nc x rows x PW), lane = img*HW + hw (conv passes
  // PW >= G*HW: one plain buffer)
  void (*rows_to_panels)(const void* t, void* p, int64_t rows, int64_t HW, int64_t G, int64_t img_stride,
                         int64_t PW, int64_t o0, int64_t o1);
  void (*panels_to_rows)(const void* p, void* t, int64_t rows, int64_t HW, int64_t G, int64_t img_stride,
                         int64_t PW, int64_t o0, int64_t o1);
  // top-k selection passes over fp32 scores (dtype-independent; mask changes). Every pass scores entry i
  // as s_i = ex && ex[i] ? -inf : (absval ? |p[i]| : p[i]) (ex: optional 0/1 bytes, "excluded").
  // bracket_scan: entries with s > hi and NaNs counted, entries with s in [lo, hi] copied to cand (the
  // first cap of them; returns how many there are)
  int64_t (*bracket_scan)(const float* p, const uint8_t* ex, bool absval, int64_t n, float hi, float lo,
                          float* cand, int64_t cap, int64_t* above, int* nan);
  // gt = #(s > v), eq = #(s == v)
  void (*count_gt_eq)(const float* p, const uint8_t* ex, bool absval, int64_t n, float v, int64_t* gt,
                      int64_t* eq);
  // out[i] = s_i >= v && !(ex && ex[i]) (0/1 bytes)
  void (*ge_bytes)(const float* p, const uint8_t* ex, bool absval, int64_t n, float v, uint8_t* out);
  // out[0..count) = base + i for every nonzero byte mk[i], i ascending; returns count. out has room for
  // n + 8 entries (vector stores may write up to 8 past the count)
  int64_t (*compact_true)(const uint8_t* mk, int64_t n, int32_t base, int32_t* out);
};

// Tables for (isa, dtype); nullptr when the ISA was not compiled in.
// nullptr when `isa` was not compiled in or this CPU cannot run it
const KernelTable* kernel_table(int isa, int dtype);
// whether kernels for `isa` are in this build (whether or not this CPU can run them)
bool isa_compiled(int isa);
// Best ISA this CPU (and OS) supports among those compiled in.
int best_isa();
// the CPU has bf16 dot-product instructions (AVX512-BF16): dense bf16 GEMMs (oneDNN) are fast
bool cpu_has_bf16_dot();
const char* isa_name(int isa);

}  // namespace sfcpu

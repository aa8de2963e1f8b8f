// sparsefast._C_cpu: torch binding of the CPU kernels (the only translation unit that includes
// torch headers). Builds the mask-derived index structures, gathers packed values, lays dense
// operands out as lane panels and runs the kernels of kernels.cpp on an nnz-balanced row
// partition with at::parallel_for (torch's OpenMP pool: respects torch.set_num_threads, and runs
// serially in a torch build without OpenMP).
//
// dtypes: float32 and bfloat16 run natively (fp32 accumulation); float16 runs the float32
// kernels on converted operands (its packed values are float32). Index arrays are int16 tensors
// read as uint16 (columns < 65536), row pointers int32.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <numeric>
#include <algorithm>
#include <cmath>
#include <functional>
#include <type_traits>
#include <limits>
#include <atomic>
#include <mutex>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "kernels.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

using at::Tensor;
using sfcpu::SpMat;

constexpr int kAbiVersion = 12;       // bump when the Python-visible signatures change
constexpr int64_t kColPad = 64;      // zero entries after each index array (safe over-reads)
constexpr int64_t kSddmmLanes = 256; // SDDMM lane chunk: a dY row of 16 vectors stays in registers

// ---------------------------------------------------------------------------------------------
// run-time configuration
// ---------------------------------------------------------------------------------------------
std::atomic<int> g_isa{-1};
std::atomic<int64_t> g_panel{32};       // lanes per panel (multiple of 16, <= 64)
std::atomic<int64_t> g_small_max{1};    // batch rows <= this use the gather kernels
std::atomic<int64_t> g_conv_lanes{256};   // target lanes (pixels) per conv image block (im2col stays in L2/L3)
std::atomic<int64_t> g_min_par_work{1 << 15};  // below this many FMAs, run single-threaded
std::atomic<int64_t> g_pool_bytes{int64_t(512) << 20};  // cache of freed big output buffers
std::atomic<int64_t> g_block_bytes{-1};  // N:M K-blocks of this many bytes of a panel (0: off, -1: auto, see pick_kb)

void pool_flush();

int isa_from_name(const std::string& s) {
  if (s == "avx512") return sfcpu::kAVX512;
  if (s == "avx2") return sfcpu::kAVX2;
  if (s == "generic" || s == "scalar" || s == "portable") return sfcpu::kGeneric;
  return -1;
}

int cur_isa() {
  int v = g_isa.load();
  if (v >= 0) return v;
  v = sfcpu::best_isa();
  if (const char* env = std::getenv("SPARSEFAST_CPU_ISA")) {
    const int want = isa_from_name(env);
    if (want >= 0 && want <= v && sfcpu::kernel_table(want, 0)) v = want;
  }
  g_isa.store(v);
  return v;
}

const sfcpu::KernelTable& table(at::ScalarType st) {
  const int d = st == at::kBFloat16 ? sfcpu::kBF16 : sfcpu::kF32;
  const sfcpu::KernelTable* t = sfcpu::kernel_table(cur_isa(), d);
  TORCH_CHECK(t != nullptr, "sparsefast cpu: no kernels compiled for ISA ", sfcpu::isa_name(cur_isa()));
  return *t;
}

std::vector<std::string> compiled_isas() {
  std::vector<std::string> out;
  for (int i = 0; i <= 2; ++i)
    if (sfcpu::kernel_table(i, 0) && i <= sfcpu::best_isa()) out.push_back(sfcpu::isa_name(i));
  return out;
}

void set_isa(const std::string& name) {
  if (name == "auto" || name.empty()) {
    g_isa.store(-1);
    return;
  }
  const int want = isa_from_name(name);
  TORCH_CHECK(want >= 0, "sparsefast cpu: unknown ISA '", name, "' (generic, avx2, avx512, auto)");
  TORCH_CHECK(sfcpu::isa_compiled(want), "sparsefast cpu: ISA ", name, " was not compiled in");
  TORCH_CHECK(want <= sfcpu::best_isa(), "sparsefast cpu: this CPU does not support ", name);
  TORCH_CHECK(sfcpu::kernel_table(want, 0) != nullptr, "sparsefast cpu: no kernels for ISA ", name);
  g_isa.store(want);
}

void set_tunable(const std::string& name, int64_t v) {
  if (name == "panel") {
    TORCH_CHECK(v >= 16 && v <= 64 && v % 16 == 0, "panel must be 16, 32, 48 or 64");
    g_panel.store(v);
  } else if (name == "small_max") {
    TORCH_CHECK(v >= 0 && v <= 16, "small_max must be in [0, 16]");
    g_small_max.store(v);
  } else if (name == "conv_lanes") {
    TORCH_CHECK(v >= 16, "conv_lanes must be >= 16");
    g_conv_lanes.store(v);
  } else if (name == "min_par_work") {
    g_min_par_work.store(std::max<int64_t>(v, 0));
  } else if (name == "pool_bytes") {
    g_pool_bytes.store(std::max<int64_t>(v, 0));
    if (v <= 0) pool_flush();
  } else if (name == "block_bytes") {
    g_block_bytes.store(std::max<int64_t>(v, -1));
  } else {
    TORCH_CHECK(false, "unknown tunable ", name);
  }
}

py::dict describe() {
  py::dict d;
  d["isa"] = std::string(sfcpu::isa_name(cur_isa()));
  d["best_isa"] = std::string(sfcpu::isa_name(sfcpu::best_isa()));
  d["isas"] = compiled_isas();
  d["threads"] = at::get_num_threads();
#if defined(_OPENMP)
  // at::parallel_for's OpenMP path is inline in ATen's headers: it only runs threads when this file
  // was compiled with -fopenmp
  d["openmp"] = static_cast<bool>(AT_PARALLEL_OPENMP);
#else
  d["openmp"] = !static_cast<bool>(AT_PARALLEL_OPENMP);  // native/TBB pools work without -fopenmp
#endif
  d["bf16_dot"] = sfcpu::cpu_has_bf16_dot();
  d["panel"] = g_panel.load();
  d["small_max"] = g_small_max.load();
  d["conv_lanes"] = g_conv_lanes.load();
  d["min_par_work"] = g_min_par_work.load();
  d["block_bytes"] = g_block_bytes.load();
  d["pool_bytes"] = g_pool_bytes.load();
  d["abi"] = kAbiVersion;
  return d;
}

// ---------------------------------------------------------------------------------------------
// Large outputs (dense-shaped dW, conv activations) in 2 MiB-aligned memory advised for transparent
// huge pages: a fresh 64 MiB tensor otherwise costs 16k page faults (more than writing it).
// ---------------------------------------------------------------------------------------------
// Freed big buffers are kept (up to pool_bytes) and handed out again for the same size: a training
// step frees last step's dW/activations (zero_grad) and allocates the same shapes again, so this
// removes the page faults and kernel page zeroing of a fresh mapping (like a caching allocator).
struct BigPool {
  std::mutex mu;
  std::vector<std::pair<void*, size_t>> free_list;
  size_t bytes = 0;
  void* take(size_t sz) {
    std::lock_guard<std::mutex> g(mu);
    for (size_t i = 0; i < free_list.size(); ++i) {
      if (free_list[i].second == sz) {
        void* p = free_list[i].first;
        free_list.erase(free_list.begin() + static_cast<std::ptrdiff_t>(i));
        bytes -= sz;
        return p;
      }
    }
    return nullptr;
  }
  void give(void* base, size_t sz) {
    {
      std::lock_guard<std::mutex> g(mu);
      if (bytes + sz <= static_cast<size_t>(g_pool_bytes.load())) {
        free_list.emplace_back(base, sz);
        bytes += sz;
        return;
      }
    }
#if defined(__linux__)
    munmap(base, sz);
#endif
  }
  void flush() {
    std::vector<std::pair<void*, size_t>> l;
    {
      std::lock_guard<std::mutex> g(mu);
      l.swap(free_list);
      bytes = 0;
    }
#if defined(__linux__)
    for (auto& e : l) munmap(e.first, e.second);
#endif
  }
};
BigPool& pool() {
  static BigPool* p = new BigPool;  // intentionally leaked: buffers may be freed during interpreter exit
  return *p;
}

void pool_flush() { pool().flush(); }

// `zeroed` tells whether the memory is known to be zero (fresh anonymous mapping).
Tensor empty_big(at::IntArrayRef sizes, at::ScalarType dt, bool* zeroed = nullptr) {
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * c10::elementSize(dt);
  constexpr size_t kHuge = size_t(2) << 20;
  if (zeroed) *zeroed = false;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (nbytes >= 2 * kHuge) {
    const size_t sz = (nbytes + kHuge - 1) / kHuge * kHuge + kHuge;  // + slack to align to 2 MiB
    void* base = pool().take(sz);
    if (base == nullptr) {
      base = mmap(nullptr, sz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (base == MAP_FAILED) return at::empty(sizes, at::TensorOptions().dtype(dt));
      madvise(base, sz, MADV_HUGEPAGE);
      if (zeroed) *zeroed = true;  // fresh anonymous mappings are zero-filled by the kernel
    }
    const uintptr_t a = (reinterpret_cast<uintptr_t>(base) + kHuge - 1) & ~static_cast<uintptr_t>(kHuge - 1);
    return torch::from_blob(reinterpret_cast<void*>(a), sizes, [base, sz](void*) { pool().give(base, sz); },
                            at::TensorOptions().dtype(dt));
  }
#endif
  return at::empty(sizes, at::TensorOptions().dtype(dt));
}

Tensor zeros_big(at::IntArrayRef sizes, at::ScalarType dt) {
  bool zeroed = false;
  Tensor t = empty_big(sizes, dt, &zeroed);
  if (zeroed || t.numel() == 0) return t;
  char* p = static_cast<char*>(t.data_ptr());
  const int64_t nb = t.numel() * t.element_size(), chunk = int64_t(1) << 20;
  at::parallel_for(0, (nb + chunk - 1) / chunk, 1, [&](int64_t b, int64_t e) {
    std::memset(p + b * chunk, 0, std::min(nb, e * chunk) - b * chunk);
  });
  return t;
}

// ---------------------------------------------------------------------------------------------
// threading: T parts of (about) equal cost, cost(row) = nnz(row) + row_cost
// ---------------------------------------------------------------------------------------------
int pick_threads(double work) {
  const int T = at::get_num_threads();
  if (T <= 1 || at::in_parallel_region() || work < static_cast<double>(g_min_par_work.load())) return 1;
  return T;
}

std::vector<int64_t> partition_rows(const SpMat& A, int parts, int64_t row_cost) {
  std::vector<int64_t> b(parts + 1, 0);
  b[parts] = A.rows;
  if (parts == 1) return b;
  if (A.rowptr == nullptr) {  // uniform rows
    for (int t = 1; t < parts; ++t) b[t] = A.rows * t / parts;
    return b;
  }
  const int64_t base = A.rowptr[0];
  const double total = static_cast<double>(A.rowptr[A.rows] - base) + static_cast<double>(row_cost) * A.rows;
  for (int t = 1; t < parts; ++t) {
    const double target = total * t / parts;
    int64_t lo = b[t - 1], hi = A.rows;  // first r with cost(r) >= target
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      const double c = static_cast<double>(A.rowptr[mid] - base) + static_cast<double>(row_cost) * mid;
      if (c < target) lo = mid + 1; else hi = mid;
    }
    b[t] = lo;
  }
  return b;
}

template <typename F>
void run_parts(int parts, F&& f) {
  if (parts <= 1) {
    f(0);
    return;
  }
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) f(static_cast<int>(t));
  });
}

// f(r0, r1) over an nnz-balanced row partition
template <typename F>
void run_rows(const SpMat& A, double work, int64_t row_cost, F&& f) {
  const int T = pick_threads(work);
  const auto b = partition_rows(A, T, row_cost);
  run_parts(T, [&](int t) {
    if (b[t] < b[t + 1]) f(b[t], b[t + 1]);
  });
}

// f(i0, i1) over an even split of [0, n)
template <typename F>
void run_range(int64_t n, double work, F&& f) {
  if (n <= 0) return;
  const int T = static_cast<int>(std::min<int64_t>(pick_threads(work), n));
  run_parts(T, [&](int t) {
    const int64_t i0 = n * t / T, i1 = n * (t + 1) / T;
    if (i0 < i1) f(i0, i1);
  });
}

// ---------------------------------------------------------------------------------------------
// argument helpers
// ---------------------------------------------------------------------------------------------
int64_t nnz_of(const SpMat& A) { return A.rowptr ? A.rowptr[A.rows] - A.rowptr[0] : A.rows * A.S; }

// A sparse matrix from its tensors: N:M (meta given), BCSR (bp given, fp32 values, col = block-major
// columns) or CSR. `ct` is the compute dtype (values of CSR/N:M have it); index_only skips values.
SpMat make_mat(int64_t rows, int64_t cols, const std::optional<Tensor>& rowptr, const std::optional<Tensor>& col,
               const std::optional<Tensor>& meta, const Tensor& vals, int64_t n, int64_t m,
               const std::optional<Tensor>& bp, at::ScalarType ct, bool index_only = false,
               bool csr_blocks = false, const std::optional<Tensor>& vperm = std::nullopt) {
  SpMat A;
  A.rows = rows;
  A.cols = cols;
  TORCH_CHECK(vals.is_contiguous(), "sparsefast cpu: packed values must be contiguous");
  A.val = vals.data_ptr();
  if (!index_only) {
    const bool fp32_blocked = bp.has_value() && !meta.has_value() && !csr_blocks && !vperm.has_value();
    const at::ScalarType want = fp32_blocked ? at::kFloat : ct;
    TORCH_CHECK(vals.scalar_type() == want, "sparsefast cpu: packed values are ", vals.scalar_type(), ", expected ", want);
  }
  if (meta.has_value()) {
    TORCH_CHECK(!vperm.has_value(), "sparsefast cpu: a value permutation needs the CSR format");
    TORCH_CHECK(n == 1 || n == 2 || n == 4 || n == 8, "sparsefast cpu: compact N:M needs n in {1,2,4,8}, got ", n);
    TORCH_CHECK(m > n && m <= 16 && cols % m == 0, "sparsefast cpu: compact N:M needs n < m <= 16 and m | cols");
    A.meta = meta->data_ptr<uint8_t>();
    A.n = static_cast<int>(n);
    A.m = static_cast<int>(m);
    A.S = (cols / m) * n;
    A.meta_ld = (A.S + 1) / 2;
    TORCH_CHECK(meta->numel() == rows * A.meta_ld && vals.numel() == rows * A.S, "sparsefast cpu: N:M format size mismatch");
  } else {
    TORCH_CHECK(rowptr.has_value() && col.has_value(), "sparsefast cpu: CSR format needs rowptr and col");
    TORCH_CHECK(rowptr->scalar_type() == at::kInt && rowptr->numel() == rows + 1, "sparsefast cpu: bad rowptr");
    TORCH_CHECK(col->scalar_type() == at::kShort, "sparsefast cpu: col must be int16 (read as uint16)");
    A.rowptr = rowptr->data_ptr<int32_t>();
    A.col = reinterpret_cast<const uint16_t*>(col->data_ptr<int16_t>());
    TORCH_CHECK(index_only || vals.numel() >= A.rowptr[rows], "sparsefast cpu: values shorter than nnz");
    if (bp.has_value()) {
      TORCH_CHECK(bp->dim() == 2 && bp->scalar_type() == at::kInt && bp->size(1) >= rows + 1,
                  "sparsefast cpu: bad block pointers");
      A.bp = bp->data_ptr<int32_t>();
      A.nblk = bp->size(0);
      A.bp_ld = bp->size(1);
      if (csr_blocks) {  // (nblk+1) rows: the last one holds the segment ends of the last block
        TORCH_CHECK(A.nblk >= 2, "sparsefast cpu: CSR block pointers need at least 2 rows");
        A.nblk -= 1;
        A.csr_blocks = true;
      }
    }
    if (vperm.has_value()) {  // entries are read as vals[vperm[j]]: a permutation of the nnz values
      TORCH_CHECK(bp.has_value() && !csr_blocks, "sparsefast cpu: a value permutation needs block-major blocks");
      TORCH_CHECK(vperm->scalar_type() == at::kInt && vperm->is_contiguous() && vperm->numel() == A.rowptr[rows] &&
                      vals.numel() == A.rowptr[rows],
                  "sparsefast cpu: the value permutation must be contiguous int32 with one entry per value");
      A.vperm = vperm->data_ptr<int32_t>();
    }
  }
  return A;
}

at::ScalarType compute_type(at::ScalarType st) {
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
              "sparsefast cpu: dtype ", st, " is not supported (float32, bfloat16, float16)");
  return st == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
}

Tensor as_compute(const Tensor& t, at::ScalarType ct) { return t.to(ct).contiguous(); }

int64_t panel_width(int64_t lanes) {
  const int64_t pw = g_panel.load();
  const int64_t need = (lanes + 15) / 16 * 16;
  return std::min(pw, need);
}

// ---------------------------------------------------------------------------------------------
// index structures (mask only)
// ---------------------------------------------------------------------------------------------
// mask (R, C) bool -> (rowptr int32 [R+1], col int16 [nnz + pad])
std::vector<Tensor> build_csr(const Tensor& mask_in) {
  TORCH_CHECK(mask_in.dim() == 2 && mask_in.scalar_type() == at::kBool, "build_csr: need a 2-D bool mask");
  const Tensor mask = mask_in.contiguous();
  const int64_t R = mask.size(0), C = mask.size(1);
  TORCH_CHECK(C <= 65536, "build_csr: ", C, " columns exceed the 16-bit column index");
  const uint8_t* mk = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  Tensor rowptr = at::empty({R + 1}, at::kInt);
  int32_t* rp = rowptr.data_ptr<int32_t>();
  std::vector<int64_t> cnt(R);
  run_range(R, static_cast<double>(R) * C / 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = mk + r * C;
      int64_t c = 0;
      for (int64_t k = 0; k < C; ++k) c += row[k];
      cnt[r] = c;
    }
  });
  int64_t total = 0;
  rp[0] = 0;
  for (int64_t r = 0; r < R; ++r) {
    total += cnt[r];
    TORCH_CHECK(total < (int64_t(1) << 31) - kColPad, "build_csr: more than 2^31 kept weights");
    rp[r + 1] = static_cast<int32_t>(total);
  }
  Tensor col = at::zeros({total + kColPad}, at::kShort);
  uint16_t* cp = reinterpret_cast<uint16_t*>(col.data_ptr<int16_t>());
  run_range(R, static_cast<double>(R) * C / 4, [&](int64_t r0, int64_t r1) {
    std::vector<uint16_t> buf(C + 1);
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = mk + r * C;
      int64_t p = 0;
      for (int64_t k = 0; k < C; ++k) {  // branch-free compaction into a row buffer
        buf[p] = static_cast<uint16_t>(k);
        p += row[k];
      }
      std::memcpy(cp + rp[r], buf.data(), p * sizeof(uint16_t));
    }
  });
  std::memset(cp + total, 0, kColPad * sizeof(uint16_t));
  return {rowptr, col};
}

// CSR (R x C, rows in `groups` equal groups) -> per-group transposes stacked:
// t_rowptr [groups*C + 1], t_col int16 (row index within its group) [nnz + pad], t_perm int32 [nnz]
std::vector<Tensor> build_transpose(const Tensor& rowptr, const Tensor& col, int64_t R, int64_t C, int64_t groups) {
  TORCH_CHECK(groups >= 1 && R % groups == 0, "build_transpose: rows not divisible by groups");
  const int64_t Rg = R / groups;
  TORCH_CHECK(Rg <= 65536, "build_transpose: ", Rg, " rows exceed the 16-bit index");
  const int32_t* rp = rowptr.data_ptr<int32_t>();
  const uint16_t* cp = reinterpret_cast<const uint16_t*>(col.data_ptr<int16_t>());
  const int64_t nnz = rp[R];
  Tensor t_rowptr = at::zeros({groups * C + 1}, at::kInt);
  Tensor t_col = at::zeros({nnz + kColPad}, at::kShort);
  Tensor t_perm = at::empty({nnz}, at::kInt);
  int32_t* trp = t_rowptr.data_ptr<int32_t>();
  uint16_t* tcp = reinterpret_cast<uint16_t*>(t_col.data_ptr<int16_t>());
  int32_t* tpp = t_perm.data_ptr<int32_t>();
  std::vector<int32_t> cursor(groups * C + 1, 0);
  for (int64_t r = 0; r < R; ++r) {
    int32_t* cg = cursor.data() + (r / Rg) * C + 1;
    for (int64_t j = rp[r]; j < rp[r + 1]; ++j) ++cg[cp[j]];
  }
  for (int64_t i = 0; i < groups * C; ++i) cursor[i + 1] += cursor[i];
  std::memcpy(trp, cursor.data(), (groups * C + 1) * sizeof(int32_t));
  for (int64_t r = 0; r < R; ++r) {
    const int64_t g = r / Rg;
    int32_t* cg = cursor.data() + g * C;
    const uint16_t local = static_cast<uint16_t>(r - g * Rg);
    for (int64_t j = rp[r]; j < rp[r + 1]; ++j) {
      const int32_t pos = cg[cp[j]]++;
      tcp[pos] = local;
      tpp[pos] = static_cast<int32_t>(j);
    }
  }
  return {t_rowptr, t_col, t_perm};
}

// CSR (R x C) -> column-blocked CSR with blocks of kb columns:
// (bp int32 (nblk, R+1), bcol int16 [nnz + pad], perm int32 [nnz]: CSR position of each BCSR entry)
std::vector<Tensor> build_blocked(const Tensor& rowptr, const Tensor& col, int64_t R, int64_t C, int64_t kb) {
  TORCH_CHECK(kb > 0, "build_blocked: kb must be positive");
  const int32_t* rp = rowptr.data_ptr<int32_t>();
  const uint16_t* cp = reinterpret_cast<const uint16_t*>(col.data_ptr<int16_t>());
  const int64_t nnz = rp[R], nblk = std::max<int64_t>(1, (C + kb - 1) / kb);
  Tensor bp = at::empty({nblk, R + 1}, at::kInt);
  Tensor bcol = at::zeros({nnz + kColPad}, at::kShort);
  Tensor perm = at::empty({nnz}, at::kInt);
  int32_t* bpp = bp.data_ptr<int32_t>();
  uint16_t* bc = reinterpret_cast<uint16_t*>(bcol.data_ptr<int16_t>());
  int32_t* pp = perm.data_ptr<int32_t>();
  // counts per (block, row) into bp[b][r], rows in parallel
  run_range(R, static_cast<double>(nnz), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t b = 0; b < nblk; ++b) bpp[b * (R + 1) + r] = 0;
      for (int64_t j = rp[r]; j < rp[r + 1]; ++j) ++bpp[(cp[j] / kb) * (R + 1) + r];
    }
  });
  int64_t run = 0;  // exclusive prefix sum in block-major order
  for (int64_t b = 0; b < nblk; ++b) {
    int32_t* row = bpp + b * (R + 1);
    for (int64_t r = 0; r < R; ++r) {
      const int32_t c = row[r];
      row[r] = static_cast<int32_t>(run);
      run += c;
    }
    row[R] = static_cast<int32_t>(run);
  }
  run_range(R, static_cast<double>(nnz), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      int64_t b = -1, pos = 0;
      for (int64_t j = rp[r]; j < rp[r + 1]; ++j) {  // columns ascend, so blocks do too
        const int64_t bj = cp[j] / kb;
        if (bj != b) {
          b = bj;
          pos = bpp[b * (R + 1) + r];
        }
        bc[pos] = cp[j];
        pp[pos] = static_cast<int32_t>(j);
        ++pos;
      }
    }
  });
  return {bp, bcol, perm};
}

// CSR (R x C) -> CSR-positioned blocks of kb columns (kept-values storage: entries stay in CSR order):
// bp int32 (nblk+1, R+1), bp[b][r] = CSR position of row r's first entry with col >= b*kb,
// bp[nblk][r] = rowptr[r+1] (the end of the last block's segment)
Tensor build_csr_blocks(const Tensor& rowptr, const Tensor& col, int64_t R, int64_t C, int64_t kb) {
  TORCH_CHECK(kb > 0, "build_csr_blocks: kb must be positive");
  const int32_t* rp = rowptr.data_ptr<int32_t>();
  const uint16_t* cp = reinterpret_cast<const uint16_t*>(col.data_ptr<int16_t>());
  const int64_t nnz = rp[R], nblk = std::max<int64_t>(1, (C + kb - 1) / kb), ld = R + 1;
  Tensor bp = at::empty({nblk + 1, ld}, at::kInt);
  int32_t* bpp = bp.data_ptr<int32_t>();
  run_range(R, static_cast<double>(nnz), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      int64_t j = rp[r];
      const int64_t e = rp[r + 1];
      for (int64_t b = 0; b < nblk; ++b) {
        while (j < e && cp[j] < b * kb) ++j;
        bpp[b * ld + r] = static_cast<int32_t>(j);
      }
      bpp[nblk * ld + r] = static_cast<int32_t>(e);
    }
  });
  for (int64_t b = 0; b <= nblk; ++b) bpp[b * ld + R] = static_cast<int32_t>(nnz);
  return bp;
}

// mask (R, C) bool, N:M -> (meta uint8 (R, ceil(S/2)), valid bool (R, S) or None when no padding)
std::tuple<Tensor, std::optional<Tensor>> build_nm(const Tensor& mask_in, int64_t n, int64_t m) {
  TORCH_CHECK(mask_in.dim() == 2 && mask_in.scalar_type() == at::kBool, "build_nm: need a 2-D bool mask");
  TORCH_CHECK(n == 1 || n == 2 || n == 4 || n == 8, "build_nm: n must be 1, 2, 4 or 8");
  TORCH_CHECK(m > n && m <= 16, "build_nm: need n < m <= 16");
  const Tensor mask = mask_in.contiguous();
  const int64_t R = mask.size(0), C = mask.size(1);
  TORCH_CHECK(C % m == 0, "build_nm: ", C, " columns not divisible by m=", m);
  const int64_t G = C / m, S = G * n, ld = (S + 1) / 2;
  const uint8_t* mk = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  Tensor meta = at::zeros({R, ld}, at::kByte);
  Tensor valid = at::empty({R, S}, at::kBool);
  uint8_t* mp = meta.data_ptr<uint8_t>();
  uint8_t* vp = reinterpret_cast<uint8_t*>(valid.data_ptr<bool>());
  std::atomic<bool> pad{false}, over{false};
  run_range(R, static_cast<double>(R) * C / 4, [&](int64_t r0, int64_t r1) {
    bool lpad = false, lover = false;
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = mk + r * C;
      uint8_t* mr = mp + r * ld;
      uint8_t* vr = vp + r * S;
      for (int64_t g = 0; g < G; ++g) {
        int64_t k = 0;
        for (int64_t o = 0; o < m; ++o) {
          if (!row[g * m + o]) continue;
          if (k == n) { lover = true; break; }
          const int64_t s = g * n + k++;
          mr[s >> 1] |= static_cast<uint8_t>(o << ((s & 1) * 4));
          vr[s] = 1;
        }
        for (; k < n; ++k) {
          vr[g * n + k] = 0;
          lpad = true;
        }
      }
    }
    if (lpad) pad.store(true);
    if (lover) over.store(true);
  });
  TORCH_CHECK(!over.load(), "build_nm: the mask keeps more than ", n, " of some group of ", m);
  if (pad.load()) return {meta, valid};
  return {meta, std::nullopt};
}

// ---------------------------------------------------------------------------------------------
// value gathers (every weight update)
// ---------------------------------------------------------------------------------------------
template <typename E>
void gather_csr_t(const E* w, int64_t C, const SpMat& A, E* out) {
  run_rows(A, static_cast<double>(nnz_of(A)) * 4, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const E* wr = w + r * C;
      for (int64_t j = A.rowptr[r]; j < A.rowptr[r + 1]; ++j) out[j] = wr[A.col[j]];
    }
  });
}

// Kept values of the dense rows [row0, row0 + w.rows) of the matrix whose CSR is (rowptr, col), written
// at their CSR positions of `out` (allocated with all nnz entries when not given) and returned: a dense
// weight gradient computed and gathered a block of rows at a time never exists whole.
Tensor gather_csr(const Tensor& w_in, const Tensor& rowptr, const Tensor& col, int64_t row0,
                  const std::optional<Tensor>& out_opt) {
  TORCH_CHECK(w_in.dim() == 2, "gather_csr: need a 2-D weight");
  const Tensor w = w_in.contiguous();
  const int64_t R = w.size(0), C = w.size(1);
  TORCH_CHECK(row0 >= 0 && row0 + R < rowptr.numel(), "gather_csr: rows [", row0, ", ", row0 + R,
              ") outside the CSR's ", rowptr.numel() - 1, " rows");
  const int32_t* rp = rowptr.data_ptr<int32_t>();
  const int64_t total = rp[rowptr.numel() - 1];
  SpMat A;
  A.rows = R;
  A.cols = C;
  A.rowptr = rp + row0;
  A.col = reinterpret_cast<const uint16_t*>(col.data_ptr<int16_t>());
  Tensor out;
  if (out_opt.has_value()) {
    out = *out_opt;
    TORCH_CHECK(out.is_contiguous() && out.numel() == total && out.scalar_type() == w.scalar_type(),
                "gather_csr: out must be a contiguous ", total, "-entry tensor of the weight's dtype");
  } else {
    out = at::empty({total}, w.options());
  }
  if (w.element_size() == 4)
    gather_csr_t<uint32_t>(reinterpret_cast<const uint32_t*>(w.data_ptr()), C, A, reinterpret_cast<uint32_t*>(out.data_ptr()));
  else if (w.element_size() == 2)
    gather_csr_t<uint16_t>(reinterpret_cast<const uint16_t*>(w.data_ptr()), C, A, reinterpret_cast<uint16_t*>(out.data_ptr()));
  else
    TORCH_CHECK(false, "gather_csr: unsupported dtype ", w.scalar_type());
  return out;
}

// f(src, dst) on the raw words of `src` and of `dst` (same element size: 1, 2, 4 or 8 bytes; the callers
// check): the dtype-free data movers below (scatter_flat, gather_keep) copy bits, never convert
template <typename F>
void by_word(const Tensor& src, const Tensor& dst, F&& f) {
  switch (src.element_size()) {
    case 1: f(reinterpret_cast<const uint8_t*>(src.data_ptr()), reinterpret_cast<uint8_t*>(dst.data_ptr())); break;
    case 2: f(reinterpret_cast<const uint16_t*>(src.data_ptr()), reinterpret_cast<uint16_t*>(dst.data_ptr())); break;
    case 4: f(reinterpret_cast<const uint32_t*>(src.data_ptr()), reinterpret_cast<uint32_t*>(dst.data_ptr())); break;
    default: f(reinterpret_cast<const uint64_t*>(src.data_ptr()), reinterpret_cast<uint64_t*>(dst.data_ptr())); break;
  }
}

Tensor gather_perm(const Tensor& vals_in, const Tensor& perm) {
  const Tensor vals = vals_in.contiguous();
  const int64_t n = perm.numel();
  Tensor out = at::empty({n}, vals.options());
  const int32_t* pp = perm.data_ptr<int32_t>();
  auto go = [&](auto* src, auto* dst) {
    run_range(n, static_cast<double>(n) * 4, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) dst[i] = src[pp[i]];
    });
  };
  if (vals.element_size() == 4)
    go(reinterpret_cast<const uint32_t*>(vals.data_ptr()), reinterpret_cast<uint32_t*>(out.data_ptr()));
  else
    go(reinterpret_cast<const uint16_t*>(vals.data_ptr()), reinterpret_cast<uint16_t*>(out.data_ptr()));
  return out;
}

// The dense (numel,) tensor holding vals at the int32 flat positions and +0 elsewhere (kept.scatter on a
// dense-routed call), reading the int32 positions as the kept index caches them (torch: an int32 -> int64
// copy of the positions first). ascending: the positions are sorted (a 2-D mask's canonical order; checked),
// so their range is checked from the ends and the output is written once (below).
Tensor scatter_flat(const Tensor& vals_in, const Tensor& flat, int64_t numel, bool ascending) {
  TORCH_CHECK(flat.scalar_type() == at::kInt && flat.is_contiguous() && flat.dim() == 1 &&
                  vals_in.numel() == flat.numel(), "scatter_flat: int32 positions, one per value");
  const Tensor vals = vals_in.contiguous();
  const int64_t n = flat.numel();
  TORCH_CHECK(vals.element_size() == 1 || vals.element_size() == 2 || vals.element_size() == 4 ||
                  vals.element_size() == 8,
              "scatter_flat: 1-, 2-, 4- or 8-byte values (bool masks too)");
  const int32_t* fp = flat.data_ptr<int32_t>();
  if (ascending) {
    TORCH_CHECK(n == 0 || (fp[0] >= 0 && fp[n - 1] < numel), "scatter_flat: position out of range");
  } else {
    for (int64_t i = 0; i < n; ++i) TORCH_CHECK(fp[i] >= 0 && fp[i] < numel, "scatter_flat: position out of range");
  }
  if (!ascending || n == 0) {
    Tensor out = at::zeros({numel}, vals.options());
    auto go = [&](auto* src, auto* dst) {
      run_range(n, static_cast<double>(n) * 4, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) dst[fp[i]] = src[i];
      });
    };
    by_word(vals, out, go);
    return out;
  }
  // ascending positions: each thread owns the dense range between its first and last value (the first
  // and last thread also the ends), and fills it a chunk of values at a time — zeros, then the values —
  // while the chunk's dense range is in cache: every output byte is written from cache once, instead
  // of a zero pass over the whole tensor and a scatter pass after it
  std::atomic<int> unsorted{0};  // the fill below relies on strictly ascending positions: checked first
  run_range(n, static_cast<double>(n), [&](int64_t i0, int64_t i1) {
    int bad = 0;
    for (int64_t i = std::max<int64_t>(i0, 1); i < i1; ++i) bad |= fp[i - 1] >= fp[i];
    if (bad) unsorted.store(1, std::memory_order_relaxed);
  });
  TORCH_CHECK(!unsorted.load(), "scatter_flat: positions are not strictly ascending");
  Tensor out = at::empty({numel}, vals.options());
  auto go = [&](auto* src, auto* dst) {
    using U = std::remove_const_t<std::remove_pointer_t<decltype(src)>>;
    run_range(n, static_cast<double>(numel), [&](int64_t i0, int64_t i1) {
      int64_t pos = i0 == 0 ? 0 : static_cast<int64_t>(fp[i0 - 1]) + 1;
      constexpr int64_t kChunk = 2048;
      for (int64_t c0 = i0; c0 < i1; c0 += kChunk) {
        const int64_t c1 = std::min(i1, c0 + kChunk);
        const int64_t end = static_cast<int64_t>(fp[c1 - 1]) + 1;
        std::memset(dst + pos, 0, static_cast<size_t>(end - pos) * sizeof(U));
        for (int64_t i = c0; i < c1; ++i) dst[fp[i]] = src[i];
        pos = end;
      }
      if (i1 == n && pos < numel) std::memset(dst + pos, 0, static_cast<size_t>(numel - pos) * sizeof(U));
    });
  };
  by_word(vals, out, go);
  return out;
}

// ---------------------------------------------------------------------------------------------
// mask-change helpers (kept-values storage, DST updates): O(n) passes instead of torch's
// searchsorted / multi-pass selections
// ---------------------------------------------------------------------------------------------

// Flat positions (int32) of the true entries of a contiguous bool tensor, ascending: torch's
// nonzero() as two parallel passes (count per part, then write at the part's offset).
Tensor flat_nonzero(const Tensor& mask_in) {
  TORCH_CHECK(mask_in.scalar_type() == at::kBool, "flat_nonzero: need a bool tensor");
  const Tensor mask = mask_in.contiguous();
  const int64_t n = mask.numel();
  TORCH_CHECK(n < (int64_t(1) << 31), "flat_nonzero: more than 2^31 entries");
  const uint8_t* mk = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  const int T = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(pick_threads(static_cast<double>(n) / 4), n)));
  std::vector<int64_t> cnt(T + 1, 0);
  run_parts(T, [&](int t) {
    const int64_t i0 = n * t / T, i1 = n * (t + 1) / T;
    int64_t c = 0;
    for (int64_t i = i0; i < i1; ++i) c += mk[i];
    cnt[t + 1] = c;
  });
  for (int t = 0; t < T; ++t) cnt[t + 1] += cnt[t];
  Tensor out = at::empty({cnt[T]}, at::kInt);
  int32_t* op = out.data_ptr<int32_t>();
  run_parts(T, [&](int t) {
    const int64_t i0 = n * t / T, i1 = n * (t + 1) / T;
    int32_t* o = op + cnt[t];
    constexpr int64_t kChunk = 4096;
    int32_t buf[kChunk + 8];
    const auto& kt = table(at::kFloat);
    for (int64_t c0 = i0; c0 < i1; c0 += kChunk) {  // vectorised compaction into a chunk buffer
      const int64_t c1 = std::min(i1, c0 + kChunk);
      const int64_t p = kt.compact_true(mk + c0, c1 - c0, static_cast<int32_t>(c0), buf);
      std::memcpy(o, buf, p * sizeof(int32_t));
      o += p;
    }
  });
  return out;
}

// Where each entry of the ascending key list `new_keys` sits in the ascending `old_keys`: a linear
// merge. Returns (src int64: position in old_keys where found, some position in [0, len(old_keys)) elsewhere;
// found bool). Keys int32 (a 2-D mask's
// cached index, read as it is) or int64. The merge is branch-free: every step writes the current j's
// answer and advances i and/or j by comparisons, so the last write for j is the step that moves past it
// (a data-dependent while loop mispredicted about once per key: 5 ms -> ~1 ms for 2 x 0.4M keys).
template <typename K>
void merge_keys_impl(const K* ap, int64_t na, const K* bp, int64_t nb, int64_t* sp, bool* fp) {
  run_range(nb, static_cast<double>(na + nb), [&](int64_t j0, int64_t j1) {
    int64_t i = std::lower_bound(ap, ap + na, bp[j0]) - ap;
    int64_t j = j0;
    while (j < j1 && i < na) {
      const K x = ap[i], y = bp[j];
      sp[j] = i;
      fp[j] = x == y;
      i += x <= y;
      j += y <= x;
    }
    for (; j < j1; ++j) {  // past the end of old_keys: absent
      sp[j] = 0;
      fp[j] = false;
    }
  });
}

std::tuple<Tensor, Tensor> merge_keys(const Tensor& old_in, const Tensor& new_in) {
  const bool i32 = old_in.scalar_type() == at::kInt && new_in.scalar_type() == at::kInt;
  const Tensor a = i32 ? old_in.contiguous() : old_in.to(at::kLong).contiguous();
  const Tensor b = i32 ? new_in.contiguous() : new_in.to(at::kLong).contiguous();
  const int64_t na = a.numel(), nb = b.numel();
  Tensor src = at::empty({nb}, at::kLong);
  Tensor found = at::empty({nb}, at::kBool);
  if (nb == 0) return {src, found};
  if (na == 0) return {src.zero_(), found.zero_()};
  if (i32)
    merge_keys_impl(a.data_ptr<int32_t>(), na, b.data_ptr<int32_t>(), nb, src.data_ptr<int64_t>(),
                    found.data_ptr<bool>());
  else
    merge_keys_impl(a.data_ptr<int64_t>(), na, b.data_ptr<int64_t>(), nb, src.data_ptr<int64_t>(),
                    found.data_ptr<bool>());
  return {src, found};
}

// Where each ascending int32 flat key sits among the kept entries of a contiguous bool mask (its rank:
// the number of kept entries before it) and whether it is kept there: merge_keys of the mask's index and
// `keys` without that index, and without the merge's serial dependency. One pass of 8-byte counts
// builds a prefix count per 8 mask bytes; each key then costs one count of a word. Returns (src int64: the rank
// where found, some position in [0, kept) elsewhere — like merge_keys; found bool).
std::tuple<Tensor, Tensor> rank_in_mask(const Tensor& mask_in, const Tensor& keys) {
  TORCH_CHECK(mask_in.scalar_type() == at::kBool, "rank_in_mask: need a bool mask");
  TORCH_CHECK(keys.scalar_type() == at::kInt && keys.is_contiguous() && keys.dim() == 1,
              "rank_in_mask: int32 keys");
  const Tensor mask = mask_in.contiguous();
  const int64_t n = mask.numel(), nk = keys.numel(), nw = (n + 7) / 8;
  const uint8_t* mk = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  const int32_t* kp = keys.data_ptr<int32_t>();
  Tensor src = at::empty({nk}, at::kLong);
  Tensor found = at::empty({nk}, at::kBool);
  if (nk == 0) return {src, found};

  // the number of 1 bytes of a word of 0/1 bytes: their sum lands in the top byte (a multiply; the
  // generic x86-64 build has no popcnt instruction)
  auto bytesum = [](uint64_t x) { return static_cast<int64_t>((x * 0x0101010101010101ull) >> 56); };
  auto word = [&](int64_t w) {
    uint64_t x = 0;
    if (w * 8 + 8 <= n)
      std::memcpy(&x, mk + w * 8, 8);
    else
      std::memcpy(&x, mk + w * 8, static_cast<size_t>(n - w * 8));
    return x;
  };
  std::vector<int32_t> pre(nw);
  const int T = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(pick_threads(static_cast<double>(n) / 4), nw)));
  std::vector<int64_t> part(T + 1, 0);
  run_parts(T, [&](int t) {
    const int64_t w0 = nw * t / T, w1 = nw * (t + 1) / T;
    int64_t c = 0;
    for (int64_t w = w0; w < w1; ++w) {
      pre[w] = static_cast<int32_t>(c);
      c += bytesum(word(w));
    }
    part[t + 1] = c;
  });
  for (int t = 0; t < T; ++t) part[t + 1] += part[t];
  if (T > 1) {  // each part's prefixes started at 0: add the counts of the parts before it
    run_parts(T, [&](int t) {
      const int64_t w0 = nw * t / T, w1 = nw * (t + 1) / T;
      const int32_t off = static_cast<int32_t>(part[t]);
      for (int64_t w = w0; w < w1; ++w) pre[w] += off;
    });
  }
  const int64_t last = std::max<int64_t>(part[T] - 1, 0);  // an absent key's rank can be one past the end
  int64_t* sp = src.data_ptr<int64_t>();
  bool* fp = found.data_ptr<bool>();
  std::atomic<int> bad{0};
  run_range(nk, static_cast<double>(nk) * 4, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      if (kp[j] < 0 || kp[j] >= n) {  // (any order of keys works; a key outside the mask does not)
        bad.store(1, std::memory_order_relaxed);
        break;
      }
      const int64_t key = kp[j], w = key >> 3, b = key & 7;
      const uint64_t x = word(w);
      const uint64_t below = x & ((uint64_t(1) << (8 * b)) - 1);  // b < 8: the shift is at most 56
      sp[j] = std::min<int64_t>(pre[w] + bytesum(below), last);
      fp[j] = (x >> (8 * b)) & 1;
    }
  });
  TORCH_CHECK(!bad.load(), "rank_in_mask: key out of range");
  return {src, found};
}

// out[j] = keep[j] ? vals[src[j]] : +0 (kept.remap_tensor: values and optimizer state following a mask
// change) in one parallel pass; torch's index_select + masked fill ran at ~2 GB/s here.
Tensor gather_keep(const Tensor& vals_in, const Tensor& src, const Tensor& keep) {
  TORCH_CHECK(src.scalar_type() == at::kLong && keep.scalar_type() == at::kBool && src.is_contiguous() &&
                  keep.is_contiguous() && src.numel() == keep.numel() && src.dim() == 1,
              "gather_keep: int64 positions and a bool keep flag per output entry");
  const Tensor vals = vals_in.contiguous();
  const int64_t n = src.numel(), nv = vals.numel();
  TORCH_CHECK(vals.element_size() == 2 || vals.element_size() == 4 || vals.element_size() == 8,
              "gather_keep: 2-, 4- or 8-byte values");
  Tensor out = at::empty({n}, vals.options());
  const int64_t* sp = src.data_ptr<int64_t>();
  const uint8_t* kp = reinterpret_cast<const uint8_t*>(keep.data_ptr<bool>());
  TORCH_CHECK(nv > 0 || n == 0, "gather_keep: no values to gather from");
  // branch-free (keep flags and range checks are data: a branch per entry mispredicted on every
  // irregular keep pattern, 2.5x slower than torch's index_select): an out-of-range position reads
  // entry 0 and is reported after the pass
  std::atomic<int> bad{0};
  auto go = [&](auto* v, auto* o) {
    using U = std::remove_const_t<std::remove_pointer_t<decltype(v)>>;
    run_range(n, static_cast<double>(n) * 4, [&](int64_t j0, int64_t j1) {
      uint8_t b = 0;
      for (int64_t j = j0; j < j1; ++j) {
        const uint64_t s = static_cast<uint64_t>(sp[j]);
        const uint8_t ok = s < static_cast<uint64_t>(nv);
        b |= ok ^ 1;
        const U x = v[ok ? s : 0];
        o[j] = x & static_cast<U>(U(0) - static_cast<U>(kp[j] & ok));
      }
      if (b) bad.store(1, std::memory_order_relaxed);
    });
  };
  by_word(vals, out, go);
  TORCH_CHECK(!bad.load(), "gather_keep: a position is out of range");
  return out;
}

// CSR (rowptr int32 [R+1], col int16 [nnz + pad]) of an R x C mask from its ascending int32 flat kept
// positions (kept.index of a 2-D mask, cached by every mask change): O(nnz + R log nnz) instead of a
// scan of all R*C mask bytes.
std::vector<Tensor> csr_from_flat(const Tensor& flat, int64_t R, int64_t C) {
  TORCH_CHECK(flat.scalar_type() == at::kInt && flat.is_contiguous() && flat.dim() == 1,
              "csr_from_flat: int32 flat positions");
  TORCH_CHECK(C <= 65536, "csr_from_flat: ", C, " columns exceed the 16-bit column index");
  const int64_t n = flat.numel();
  TORCH_CHECK(n < (int64_t(1) << 31) - kColPad, "csr_from_flat: more than 2^31 kept weights");
  const int32_t* fp = flat.data_ptr<int32_t>();
  TORCH_CHECK(n == 0 || (fp[0] >= 0 && fp[n - 1] < R * C), "csr_from_flat: position out of range");
  Tensor rowptr = at::empty({R + 1}, at::kInt);
  int32_t* rp = rowptr.data_ptr<int32_t>();
  Tensor col = at::empty({n + kColPad}, at::kShort);
  uint16_t* cp = reinterpret_cast<uint16_t*>(col.data_ptr<int16_t>());
  // per part of the rows: one binary search for its first entry, then a walk (a mispredict per row,
  // not per entry) for the row pointers and a vectorised pass for the columns
  run_range(R, static_cast<double>(n) + static_cast<double>(R) * 8, [&](int64_t r0, int64_t r1) {
    int64_t j = std::lower_bound(fp, fp + n, r0 * C, [](int32_t a, int64_t b) { return a < b; }) - fp;
    for (int64_t r = r0; r < r1; ++r) {
      rp[r] = static_cast<int32_t>(j);
      const int64_t base = r * C, end = base + C;
      int64_t e = j;
      while (e < n && fp[e] < end) ++e;
      for (int64_t q = j; q < e; ++q) cp[q] = static_cast<uint16_t>(fp[q] - base);
      j = e;
    }
    if (r1 == R) rp[R] = static_cast<int32_t>(n);
  });
  if (R == 0) rp[0] = static_cast<int32_t>(n);
  std::memset(cp + n, 0, kColPad * sizeof(uint16_t));
  return {rowptr, col};
}

// The k largest scores of a 1-D float32 tensor as a bool mask, ties going to the lower index (the
// first k of a stable descending sort). Score of entry i: its value, or |value| with absval; -inf where
// the optional bool `exclude` is set, and an excluded entry is never in the mask (the result equals
// filling -inf at `exclude`, selecting, and clearing `exclude` — the DST grow step — in two passes
// instead of five). A fixed-seed random sample brackets the k-th score, one pass counts the entries
// above the bracket and collects those inside it, nth_element on the candidates gives the score v, the
// candidates give the per-part counts of scores above and equal to v, and one pass writes the mask.
// Returns an empty tensor when a score is NaN (the caller's generic path decides what that means).
Tensor topk_flat(const Tensor& f_in, int64_t k, const std::optional<Tensor>& exclude, bool absval) {
  TORCH_CHECK(f_in.scalar_type() == at::kFloat && f_in.dim() == 1, "topk_flat: need a 1-D float32 tensor");
  const Tensor f = f_in.contiguous();
  const int64_t n = f.numel();
  TORCH_CHECK(k >= 0 && k <= n, "topk_flat: k=", k, " outside [0, ", n, "]");
  Tensor ex_t;
  const uint8_t* ex = nullptr;
  if (exclude.has_value()) {
    TORCH_CHECK(exclude->scalar_type() == at::kBool && exclude->numel() == n && exclude->device().is_cpu(),
                "topk_flat: exclude must be a CPU bool tensor with one entry per score");
    ex_t = exclude->contiguous();
    ex = reinterpret_cast<const uint8_t*>(ex_t.data_ptr<bool>());
  }
  const float* fp = f.data_ptr<float>();
  Tensor out = at::empty({n}, at::kBool);
  uint8_t* op = reinterpret_cast<uint8_t*>(out.data_ptr<bool>());
  if (k == 0 || n == 0) return out.zero_();
  const float ninf = -std::numeric_limits<float>::infinity();
  auto score = [&](int64_t i) { return (ex && ex[i]) ? ninf : (absval ? std::fabs(fp[i]) : fp[i]); };
  const auto& kt = table(at::kFloat);
  const int T = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(pick_threads(static_cast<double>(n) / 2), n)));
  auto part = [&](int t) { return std::make_pair(n * t / T, n * (t + 1) / T); };
  std::atomic<int> has_nan{0};
  float v = 0.f;
  bool have_v = false;
  std::vector<int64_t> gt(T, 0), eq(T + 1, 0);  // per part: #(score > v), #(score == v) (eq shifted by one)
  if (n > 4096) {
    const int64_t ns = 1 << 15;
    std::vector<float> smp(ns);
    uint64_t st = 0x9E3779B97F4A7C15ull ^ static_cast<uint64_t>(n);
    for (int64_t s = 0; s < ns; ++s) {
      st ^= st << 13; st ^= st >> 7; st ^= st << 17;  // xorshift64: a fixed-seed sample
      smp[s] = score(static_cast<int64_t>(st % static_cast<uint64_t>(n)));
    }
    const double q = static_cast<double>(k) / n;
    const double spread = 4.0 * std::sqrt(ns * q * (1.0 - q)) + 8;
    const int64_t ihi = std::max<int64_t>(0, static_cast<int64_t>(q * ns - spread));
    const int64_t ilo = std::min<int64_t>(ns - 1, static_cast<int64_t>(q * ns + spread));
    // two order statistics of the sample (descending): hi = #ihi <= ... <= lo = #ilo
    std::nth_element(smp.begin(), smp.begin() + ilo, smp.end(), std::greater<float>());
    const float lo = smp[ilo];
    std::nth_element(smp.begin(), smp.begin() + ihi, smp.begin() + ilo + 1, std::greater<float>());
    const float hi = smp[ihi];
    if (hi == hi && lo == lo) {
      std::vector<int64_t> above(T, 0), nc(T, 0);
      std::vector<std::vector<float>> cand(T);
      run_parts(T, [&](int t) {
        const auto [i0, i1] = part(t);
        const int64_t cap = (i1 - i0) / 16 + 1024;  // ~8 x the expected bracket share
        cand[t].resize(cap);
        int nan = 0;
        nc[t] = kt.bracket_scan(fp + i0, ex ? ex + i0 : nullptr, absval, i1 - i0, hi, lo, cand[t].data(), cap,
                                &above[t], &nan);
        if (nan) has_nan.store(1);
        if (nc[t] > cap) nc[t] = -1;  // overflow: the full selection below
      });
      if (has_nan.load()) return at::empty({0}, at::kBool);
      int64_t ab = 0, ncs = 0;
      bool ok = true;
      for (int t = 0; t < T; ++t) {
        ab += above[t];
        ok &= nc[t] >= 0;
        ncs += nc[t];
      }
      const int64_t r = k - ab;  // the r-th largest candidate
      if (ok && ab < k && r >= 1 && r <= ncs) {
        std::vector<float> all;
        all.reserve(ncs);
        for (int t = 0; t < T; ++t) all.insert(all.end(), cand[t].begin(), cand[t].begin() + nc[t]);
        std::nth_element(all.begin(), all.begin() + (r - 1), all.end(), std::greater<float>());
        v = all[r - 1];
        have_v = true;
        // v lies inside the bracket, so every score equal to it, and every one above it but not above
        // the bracket, is a candidate of its part: the counts need no further pass
        for (int t = 0; t < T; ++t) {
          int64_t g = above[t], e = 0;
          for (int64_t j = 0; j < nc[t]; ++j) {
            g += cand[t][j] > v;
            e += cand[t][j] == v;
          }
          gt[t] = g;
          eq[t + 1] = e;
        }
      }
    }
  }
  if (!have_v) {
    std::vector<float> all(n);
    for (int64_t i = 0; i < n; ++i) {
      all[i] = score(i);
      if (all[i] != all[i]) return at::empty({0}, at::kBool);
    }
    std::nth_element(all.begin(), all.begin() + (k - 1), all.end(), std::greater<float>());
    v = all[k - 1];
    run_parts(T, [&](int t) {
      const auto [i0, i1] = part(t);
      kt.count_gt_eq(fp + i0, ex ? ex + i0 : nullptr, absval, i1 - i0, v, &gt[t], &eq[t + 1]);
    });
  }
  // ties: the first (k - #above v) entries equal to v, in index order
  int64_t ngt = 0;
  for (int t = 0; t < T; ++t) ngt += gt[t];
  for (int t = 0; t < T; ++t) eq[t + 1] += eq[t];
  const int64_t need = k - ngt;  // >= 1: v itself is the k-th largest
  if (need >= eq[T]) {  // every tie is taken (the usual case: v is unique): one vectorised pass
    run_parts(T, [&](int t) {
      const auto [i0, i1] = part(t);
      kt.ge_bytes(fp + i0, ex ? ex + i0 : nullptr, absval, i1 - i0, v, op + i0);
    });
  } else {
    run_parts(T, [&](int t) {
      const auto [i0, i1] = part(t);
      int64_t seen = eq[t];
      for (int64_t i = i0; i < i1; ++i) {
        const float x = score(i);
        const bool tie = (x == v);
        op[i] = static_cast<uint8_t>(((x > v) | (tie & (seen < need))) & !(ex && ex[i]));
        seen += tie;
      }
    });
  }
  return out;
}

Tensor gather_nm(const Tensor& w_in, const Tensor& meta, int64_t n, int64_t m, const std::optional<Tensor>& valid) {
  const Tensor w = w_in.contiguous();
  const int64_t R = w.size(0), C = w.size(1), G = C / m, S = G * n, ld = (S + 1) / 2;
  Tensor out = at::empty({R, S}, w.options());
  const uint8_t* mp = meta.data_ptr<uint8_t>();
  const uint8_t* vp = valid.has_value() ? reinterpret_cast<const uint8_t*>(valid->data_ptr<bool>()) : nullptr;
  auto go = [&](auto* src, auto* dst) {
    run_range(R, static_cast<double>(R) * S * 4, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const auto* wr = src + r * C;
        const uint8_t* mr = mp + r * ld;
        auto* o = dst + r * S;
        for (int64_t s = 0; s < S; ++s) {
          const int64_t c = (s / n) * m + ((mr[s >> 1] >> ((s & 1) * 4)) & 15);
          o[s] = (vp && !vp[r * S + s]) ? 0 : wr[c];
        }
      }
    });
  };
  if (w.element_size() == 4)
    go(reinterpret_cast<const uint32_t*>(w.data_ptr()), reinterpret_cast<uint32_t*>(out.data_ptr()));
  else
    go(reinterpret_cast<const uint16_t*>(w.data_ptr()), reinterpret_cast<uint16_t*>(out.data_ptr()));
  return out;
}

// ---------------------------------------------------------------------------------------------
// panels
// ---------------------------------------------------------------------------------------------
// rows (B x K) <-> fp32 panels (nc x K x PW): `convert` (kt.to_panels or kt.from_panels) over work
// items (panel, block of 256 reduction rows)
void run_panel_blocks(const sfcpu::PackArgs& pa, int64_t nc, void (*convert)(const sfcpu::PackArgs&)) {
  const int64_t K = pa.K, kb = 256, nkb = (K + kb - 1) / kb;
  run_range(nc * nkb, static_cast<double>(pa.B) * K, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      sfcpu::PackArgs p = pa;
      p.c0 = i / nkb;
      p.c1 = p.c0 + 1;
      p.k0 = (i % nkb) * kb;
      p.k1 = std::min(K, p.k0 + kb);
      convert(p);
    }
  });
}

sfcpu::PackArgs pack_args(const void* src, void* dst, int64_t B, int64_t K, int64_t PW) {
  sfcpu::PackArgs pa;
  pa.src = src;
  pa.dst = dst;
  pa.B = B;
  pa.K = K;
  pa.PW = PW;
  pa.ld = K;
  return pa;
}

// rows (B x K) of dtype T -> fp32 panels (nc x K x PW)
Tensor to_panels(const Tensor& x, int64_t PW) {
  const int64_t B = x.size(0), K = x.size(1), nc = (B + PW - 1) / PW;
  Tensor xp = at::empty({nc, K, PW}, x.options().dtype(at::kFloat));
  run_panel_blocks(pack_args(x.data_ptr(), xp.data_ptr(), B, K, PW), nc, table(x.scalar_type()).to_panels);
  return xp;
}

// fp32 panels -> rows (B x K) of y's dtype
void from_panels(const Tensor& xp, Tensor& y /* (B x K) */) {
  run_panel_blocks(pack_args(xp.data_ptr(), y.data_ptr(), y.size(0), y.size(1), xp.size(2)), xp.size(0),
                   table(y.scalar_type()).from_panels);
}

// reduction rows per K-block so that a block of a PW-lane fp32 panel is ~block_bytes (L1-resident);
// a multiple of 32 and, for N:M, of 2m (block edges on group and meta-byte boundaries).
// auto (-1): 32 KiB blocks once the whole panel (cols x PW fp32) outgrows 256 KiB, unblocked below --
// measured on the AVX2 VM, 2:4 at 64-256 rows: 1024x4096 1.1-1.15x faster blocked, 4096x1024 (a
// 128 KiB panel) 0.9-1.0x
int64_t pick_kb(const SpMat& A, int64_t PW) {
  int64_t bytes = g_block_bytes.load();
  if (A.meta == nullptr || bytes == 0) return 0;
  if (bytes < 0) {
    if (A.cols * PW * 4 <= (int64_t(256) << 10)) return 0;
    bytes = int64_t(32) << 10;
  }
  const int64_t unit = std::lcm<int64_t>(32, 2 * A.m);
  const int64_t kb = std::max(unit, bytes / (PW * 4) / unit * unit);
  return kb >= A.cols ? 0 : kb;
}

// An fp32 operand whose lanes (batch rows / output pixels) are processed in chunks of PW: lane chunk c of
// row r starts at base + c*cstride + r*ld. Linear uses panel tensors (nc, rows, PW): ld = PW,
// cstride = rows*PW; conv uses a plain (rows, Pp) im2col buffer: ld = Pp, cstride = PW.
struct Lanes {
  float* base = nullptr;
  int64_t ld = 0, cstride = 0, PW = 0, lanes = 0;
  int64_t chunks() const { return (lanes + PW - 1) / PW; }
};

Lanes panel_lanes(const Tensor& p, int64_t lanes) {
  return {p.data_ptr<float>(), p.size(2), p.size(1) * p.size(2), p.size(2), lanes};
}

Lanes plain_lanes(float* base, int64_t ld, int64_t lanes, int64_t PW) { return {base, ld, PW, PW, lanes}; }

// Y = A * X over all lane chunks (fp32 operands, values of type ct or fp32 BCSR); bias fp32 or nullptr
void spmm_panels(const SpMat& A, const Lanes& X, const Lanes& Y, const float* bias, at::ScalarType ct) {
  const auto& kt = table(ct);
  const double work = static_cast<double>(nnz_of(A)) * X.lanes;
  const int64_t kb = pick_kb(A, X.PW);
  run_rows(A, work, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t c = 0; c < X.chunks(); ++c) {
      const int64_t lanes_c = std::min(X.PW, X.lanes - c * X.PW);
      sfcpu::PanelArgs pa;
      pa.kb = kb;
      pa.a = A;
      pa.x = X.base + c * X.cstride;
      pa.y = Y.base + c * Y.cstride;
      pa.ldx = X.ld;
      pa.ldy = Y.ld;
      pa.nvec = (lanes_c + 15) / 16;
      pa.bias = bias;
      pa.r0 = r0;
      pa.r1 = r1;
      kt.spmm_panel(pa);
    }
  });
}

// out[nnz] (+)= SDDMM of D (A.rows lanes-rows) and X (A.cols lanes-rows) at the entries of A
void sddmm_panels(const SpMat& A, const Lanes& D, const Lanes& X, float* out, bool accumulate, at::ScalarType ct) {
  const auto& kt = table(ct);
  const double work = static_cast<double>(nnz_of(A)) * X.lanes;
  run_rows(A, work, 2, [&](int64_t r0, int64_t r1) {
    for (int64_t c = 0; c < X.chunks(); ++c) {
      const int64_t lanes_c = std::min(X.PW, X.lanes - c * X.PW);
      sfcpu::SddmmArgs sa;
      sa.a = A;
      sa.dy = D.base + c * D.cstride;
      sa.x = X.base + c * X.cstride;
      sa.ld = X.ld;
      sa.nvec = (lanes_c + 15) / 16;
      sa.out = out;
      sa.accumulate = accumulate || c > 0;
      sa.r0 = r0;
      sa.r1 = r1;
      kt.sddmm_panel(sa);
    }
  });
}

// True when every element is finite (exponent bits not all ones). The kernels skip pruned weights,
// so a NaN/Inf input would not spread through 0*Inf / 0*NaN like masked-dense math; callers use
// this to send such (rare) calls to the reference path.
bool all_finite(const Tensor& t_in) {
  const Tensor t = t_in.contiguous();
  const int64_t n = t.numel();
  if (n == 0) return true;
  std::atomic<bool> ok{true};
  auto scan = [&](auto* p, auto expmask) {
    run_range(n, static_cast<double>(n) / 8, [&](int64_t i0, int64_t i1) {
      using U = decltype(expmask);
      U bad = 0;
      for (int64_t i = i0; i < i1; ++i) bad |= static_cast<U>((p[i] & expmask) == expmask);
      if (bad) ok.store(false);
    });
  };
  switch (t.scalar_type()) {
    case at::kFloat: scan(reinterpret_cast<const uint32_t*>(t.data_ptr()), uint32_t(0x7f800000u)); break;
    case at::kBFloat16: scan(reinterpret_cast<const uint16_t*>(t.data_ptr()), uint16_t(0x7f80u)); break;
    case at::kHalf: scan(reinterpret_cast<const uint16_t*>(t.data_ptr()), uint16_t(0x7c00u)); break;
    default: return t.isfinite().all().item<bool>();
  }
  return ok.load();
}

// dst = where(mask, src, +0) bit-exactly (a pruned NaN/Inf does not leak as it would through
// src * mask); dst may be src. All contiguous, same numel, mask bool. One streaming pass: the
// element's bits AND 0 - mask (0 or all ones) vectorises at any ISA (torch.where with a bool mask
// took 2.6 ms for 1M float32 on AVX2, this ~0.1 ms).
void mask_into(const Tensor& src, const Tensor& mask, Tensor& dst) {
  TORCH_CHECK(src.is_contiguous() && mask.is_contiguous() && dst.is_contiguous(), "mask_into: contiguous tensors");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "mask_into: bool mask");
  TORCH_CHECK(src.numel() == mask.numel() && dst.numel() == src.numel(), "mask_into: sizes differ");
  TORCH_CHECK(dst.scalar_type() == src.scalar_type(), "mask_into: dtypes differ");
  const int64_t n = src.numel();
  const auto* m = reinterpret_cast<const uint8_t*>(mask.data_ptr());
  auto loop = [&](auto* s, auto* d) {
    using U = std::remove_const_t<std::remove_pointer_t<decltype(s)>>;
    run_range(n, static_cast<double>(n) / 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) d[i] = s[i] & static_cast<U>(U(0) - static_cast<U>(m[i]));
    });
  };
  switch (src.element_size()) {
    case 2: loop(reinterpret_cast<const uint16_t*>(src.data_ptr()), reinterpret_cast<uint16_t*>(dst.data_ptr())); break;
    case 4: loop(reinterpret_cast<const uint32_t*>(src.data_ptr()), reinterpret_cast<uint32_t*>(dst.data_ptr())); break;
    case 8: loop(reinterpret_cast<const uint64_t*>(src.data_ptr()), reinterpret_cast<uint64_t*>(dst.data_ptr())); break;
    default: TORCH_CHECK(false, "mask_into: 2-, 4- or 8-byte elements");
  }
}

// t[i] = value where mask[i], in place (float32, contiguous, bool mask of the same numel): the bits of
// value AND 0 - mask, OR t's bits AND mask - 1 -- one vectorised pass (torch's masked_fill_ took
// 6 ms for 4M float32 and 1.25 ms for 0.4M on the AVX2 VM: the DST grow step's -inf fill).
void fill_where(Tensor& t, const Tensor& mask, double value) {
  TORCH_CHECK(t.is_contiguous() && mask.is_contiguous() && t.scalar_type() == at::kFloat &&
                  mask.scalar_type() == at::kBool && t.numel() == mask.numel(),
              "fill_where: contiguous float32 tensor and bool mask of the same size");
  const int64_t n = t.numel();
  const float fv = static_cast<float>(value);
  uint32_t vb;
  std::memcpy(&vb, &fv, 4);
  auto* d = reinterpret_cast<uint32_t*>(t.data_ptr());
  const auto* m = reinterpret_cast<const uint8_t*>(mask.data_ptr());
  run_range(n, static_cast<double>(n) / 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const uint32_t on = 0u - static_cast<uint32_t>(m[i]);
      d[i] = (vb & on) | (d[i] & ~on);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Linear
// ---------------------------------------------------------------------------------------------
// y (B x A.rows) = x A^T (+ bias) through PW-lane panels: x in the compute dtype (B >= 1 rows), the
// result in ot. The panel path of spmm and spmm_bsr.
Tensor spmm_lanes(const SpMat& A, const Tensor& x, int64_t PW, const std::optional<Tensor>& bias_in,
                  at::ScalarType ot) {
  const at::ScalarType ct = x.scalar_type();
  const int64_t B = x.size(0);
  const Tensor xp = to_panels(x, PW);
  Tensor yp = at::empty({xp.size(0), A.rows, PW}, x.options().dtype(at::kFloat));
  Tensor bf;
  if (bias_in.has_value()) bf = bias_in->to(at::kFloat).contiguous();
  spmm_panels(A, panel_lanes(xp, B), panel_lanes(yp, B), bf.defined() ? bf.data_ptr<float>() : nullptr, ct);
  Tensor y = empty_big({B, A.rows}, ct);
  from_panels(yp, y);
  return ot == ct ? y : y.to(ot);
}

// y (B x rows) = x (B x cols) A^T (+ bias)
Tensor spmm(const Tensor& x_in, int64_t rows, int64_t cols, const std::optional<Tensor>& rowptr,
            const std::optional<Tensor>& col, const std::optional<Tensor>& meta, const Tensor& vals, int64_t n,
            int64_t m, const std::optional<Tensor>& bias_in, const std::optional<Tensor>& bp, bool csr_blocks,
            const std::optional<Tensor>& vperm) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == cols, "spmm: x must be (B, ", cols, ")");
  const at::ScalarType ot = x_in.scalar_type(), ct = compute_type(ot);
  const SpMat A = make_mat(rows, cols, rowptr, col, meta, vals, n, m, bp, ct, false, csr_blocks, vperm);
  const int64_t B = x_in.size(0);
  if (B == 0 || rows == 0) return at::empty({B, rows}, x_in.options());
  const Tensor x = as_compute(x_in, ct);
  const auto& kt = table(ct);
  // gather kernels for few rows; compact N:M runs them up to 4 rows (the panel kernel beyond: 2x faster at 16)
  // (a value permutation is read by the panel kernels only: any row count runs them then)
  if ((B <= g_small_max.load() || (A.meta && B <= 4)) && !A.vperm) {
    const Tensor xf = x.to(at::kFloat).contiguous();
    Tensor yf = at::empty({B, rows}, x.options().dtype(at::kFloat));
    Tensor bf;
    if (bias_in.has_value()) bf = bias_in->to(at::kFloat).contiguous();
    sfcpu::SmallArgs sa;
    sa.a = A;
    sa.x = xf.data_ptr<float>();
    sa.y = yf.data_ptr<float>();
    sa.ldx = cols;
    sa.ldy = rows;
    sa.B = B;
    sa.bias = bf.defined() ? bf.data_ptr<float>() : nullptr;
    run_rows(A, static_cast<double>(nnz_of(A)) * B, 4, [&](int64_t r0, int64_t r1) {
      sfcpu::SmallArgs s = sa;
      s.r0 = r0;
      s.r1 = r1;
      kt.spmm_small(s);
    });
    return yf.to(ot);
  }
  return spmm_lanes(A, x, panel_width(B), bias_in, ot);
}

// The BSR fields of a block matrix (rows x cols, block bs) from its index tensors (SpMat::bs in kernels.h),
// checked: contiguous int32, sizes, bptr covering every entry, each block inside the matrix and inside
// the nv values it addresses (O(blocks)). `who` names the caller in errors.
SpMat bsr_mat(const char* who, int64_t rows, int64_t cols, const Tensor& bptr, const Tensor& bcol, const Tensor& boff,
              const Tensor& bld, int64_t bs, int64_t nv) {
  const int64_t nbr = rows / bs, nb = bcol.numel();
  for (const Tensor* t : {&bptr, &bcol, &boff, &bld})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous(), who, ": index tensors must be contiguous int32");
  TORCH_CHECK(bptr.numel() == nbr + 1 && boff.numel() == nb && bld.numel() == nb,
              who, ": index sizes do not match ", rows, " rows / ", nb, " blocks");
  SpMat A;
  A.rows = rows;
  A.cols = cols;
  A.bs = bs;
  A.bptr = bptr.data_ptr<int32_t>();
  A.bcol = bcol.data_ptr<int32_t>();
  A.boff = boff.data_ptr<int32_t>();
  A.bld = bld.data_ptr<int32_t>();
  TORCH_CHECK(A.bptr[0] == 0 && A.bptr[nbr] == nb, who, ": bptr does not cover the ", nb, " blocks");
  for (int64_t e = 0; e < nb; ++e) {
    const int64_t ld = A.bld[e], off = A.boff[e];
    TORCH_CHECK(A.bcol[e] >= 0 && (A.bcol[e] + 1) * bs <= cols && ld >= bs && off >= 0 &&
                    off + (bs - 1) * ld + bs <= nv,
                who, ": block entry ", e, " is outside the matrix or the values");
  }
  return A;
}

// y (B x rows) = x (B x cols) A^T (+ bias) for a BSR matrix A read from kept values (SpMat::bs in
// kernels.h): the forward of a block:bs layer (A = W) and its dX (A = W^T, trans). rowptr holds the
// per-row entry counts (thread balance, nnz); vals are the layer's kept values (compute dtype).
Tensor spmm_bsr(const Tensor& x_in, int64_t rows, int64_t cols, const Tensor& rowptr, const Tensor& bptr,
                const Tensor& bcol, const Tensor& boff, const Tensor& bld, int64_t bs, bool trans, const Tensor& vals,
                const std::optional<Tensor>& bias_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == cols, "spmm_bsr: x must be (B, ", cols, ")");
  TORCH_CHECK((bs == 8 || bs == 16 || bs == 32) && rows % bs == 0 && cols % bs == 0, "spmm_bsr: block ", bs,
              " (8, 16 or 32) must divide ", rows, "x", cols);
  TORCH_CHECK(rowptr.scalar_type() == at::kInt && rowptr.is_contiguous() && rowptr.numel() == rows + 1,
              "spmm_bsr: rowptr must be contiguous int32 of ", rows + 1);
  const at::ScalarType ot = x_in.scalar_type(), ct = compute_type(ot);
  TORCH_CHECK(vals.scalar_type() == ct && vals.is_contiguous(), "spmm_bsr: values must be contiguous ", ct);
  SpMat A = bsr_mat("spmm_bsr", rows, cols, bptr, bcol, boff, bld, bs, vals.numel());
  A.rowptr = rowptr.data_ptr<int32_t>();
  A.val = vals.data_ptr();
  A.btrans = trans;
  const int64_t B = x_in.size(0);
  if (B == 0 || rows == 0) return at::empty({B, rows}, x_in.options());
  const Tensor x = as_compute(x_in, ct);
  // dX (trans) walks a block column's kept blocks, nb*bs rows of X (dY) per group of output rows: 16-lane
  // panels halve those bytes so they stay in L1 and allow more rows a group (dX 1.4-1.8x faster at
  // 64-256 rows, 4096x1024 block:32 at 90 %, AVX2); the forward reads ~10x fewer X rows a block row
  return spmm_lanes(A, x, trans ? std::min<int64_t>(16, panel_width(B)) : panel_width(B), bias_in, ot);
}

// kept-values dW of a block:bs Linear (bs 16 or 32): out[nnz] in the values' (CSR) order at the blocks
// of the forward BSR index; dy (B x rows), x (B x cols)
Tensor sddmm_bsr(const Tensor& dy_in, const Tensor& x_in, int64_t rows, int64_t cols, const Tensor& bptr,
                 const Tensor& bcol, const Tensor& boff, const Tensor& bld, int64_t bs, int64_t nnz) {
  TORCH_CHECK(dy_in.dim() == 2 && x_in.dim() == 2 && dy_in.size(0) == x_in.size(0) && dy_in.size(1) == rows &&
                  x_in.size(1) == cols,
              "sddmm_bsr: shapes dy ", dy_in.sizes(), " x ", x_in.sizes(), " do not match (", rows, ", ", cols, ")");
  TORCH_CHECK((bs == 16 || bs == 32) && rows % bs == 0 && cols % bs == 0, "sddmm_bsr: block 16 or 32 dividing the shape");
  const at::ScalarType ot = x_in.scalar_type(), ct = compute_type(ot);
  TORCH_CHECK(dy_in.scalar_type() == ot, "sddmm_bsr: dy and x dtypes differ");
  TORCH_CHECK(nnz == bcol.numel() * bs * bs, "sddmm_bsr: ", nnz, " values for ", bcol.numel(), " blocks of ", bs, "x", bs);
  const SpMat A = bsr_mat("sddmm_bsr", rows, cols, bptr, bcol, boff, bld, bs, nnz);
  const int64_t nbr = rows / bs;
  const int64_t B = x_in.size(0);
  Tensor vals = at::empty({std::max<int64_t>(nnz, 1)}, at::kFloat);
  if (B == 0) {
    vals.zero_();
  } else {
    // column-block layout (see sddmm_bsr in kernels_impl.h): one copy of each operand per call
    const Tensor x = x_in.to(ct).contiguous().view({B, cols / bs, bs}).permute({1, 0, 2}).contiguous();
    const Tensor dy = dy_in.to(ct).contiguous().view({B, nbr, bs}).permute({1, 0, 2}).contiguous();
    sfcpu::SddmmArgs sa;
    sa.a = A;
    sa.dy = dy.data_ptr();
    sa.x = x.data_ptr();
    sa.B = B;
    sa.out = vals.data_ptr<float>();
    const auto& kt = table(ct);
    run_range(nbr, static_cast<double>(nnz) * B, [&](int64_t b0, int64_t b1) {
      sfcpu::SddmmArgs s = sa;
      s.r0 = b0;
      s.r1 = b1;
      kt.sddmm_bsr(s);
    });
  }
  return vals.narrow(0, 0, nnz).to(ot);
}

// dx (B x cols) = dy (B x rows) A for A (rows x cols) in CSR-block form with CSR-ordered values: the
// transposed product read straight from the forward format (no transposed copy, no permutation);
// parallel over column blocks, each owning disjoint rows of the output panel
Tensor spmm_t(const Tensor& dy_in, int64_t rows, int64_t cols, const Tensor& rowptr, const Tensor& col,
              const Tensor& vals, const Tensor& bp) {
  TORCH_CHECK(dy_in.dim() == 2 && dy_in.size(1) == rows, "spmm_t: dy must be (B, ", rows, ")");
  const at::ScalarType ot = dy_in.scalar_type(), ct = compute_type(ot);
  const SpMat A = make_mat(rows, cols, rowptr, col, std::nullopt, vals, 0, 0, bp, ct, false, true);
  const int64_t B = dy_in.size(0);
  if (B == 0 || cols == 0) return at::zeros({B, cols}, dy_in.options());
  const Tensor dy = as_compute(dy_in, ct);
  const auto& kt = table(ct);
  const int64_t PW = panel_width(B);
  const Tensor xp = to_panels(dy, PW);
  Tensor yp = at::zeros({xp.size(0), cols, PW}, dy.options().dtype(at::kFloat));
  const Lanes X = panel_lanes(xp, B), Y = panel_lanes(yp, B);
  run_range(A.nblk, static_cast<double>(nnz_of(A)) * B, [&](int64_t b0, int64_t b1) {
    for (int64_t c = 0; c < X.chunks(); ++c) {
      sfcpu::PanelArgs pa;
      pa.a = A;
      pa.x = X.base + c * X.cstride;
      pa.y = Y.base + c * Y.cstride;
      pa.ldx = X.ld;
      pa.ldy = Y.ld;
      pa.nvec = (std::min(X.PW, X.lanes - c * X.PW) + 15) / 16;
      pa.r0 = b0;
      pa.r1 = b1;
      kt.spmm_t_panel(pa);
    }
  });
  Tensor y = empty_big({B, cols}, ct);
  from_panels(yp, y);
  return ot == ct ? y : y.to(ot);
}

// dense (rows x cols) = (dy^T x) masked to the CSR positions; dy (B x rows), x (B x cols)
Tensor sddmm(const Tensor& dy_in, const Tensor& x_in, const Tensor& rowptr, const Tensor& col, int64_t rows,
             int64_t cols, const std::optional<Tensor>& bp, bool csr_blocks) {
  TORCH_CHECK(dy_in.dim() == 2 && x_in.dim() == 2 && dy_in.size(0) == x_in.size(0) && dy_in.size(1) == rows &&
                  x_in.size(1) == cols,
              "sddmm: shapes dy ", dy_in.sizes(), " x ", x_in.sizes(), " do not match (", rows, ", ", cols, ")");
  const at::ScalarType ot = x_in.scalar_type(), ct = compute_type(ot);
  TORCH_CHECK(dy_in.scalar_type() == ot, "sddmm: dy and x dtypes differ");
  const SpMat A = make_mat(rows, cols, rowptr, col, std::nullopt, at::empty({0}), 0, 0, bp, ct, true, csr_blocks);
  const int64_t B = x_in.size(0), nnz = nnz_of(A);
  Tensor vals = at::empty({std::max<int64_t>(nnz, 1)}, at::kFloat);
  float* vp = vals.data_ptr<float>();
  if (B == 0) {
    vals.zero_();
  } else if (B <= g_small_max.load()) {
    const Tensor xf = x_in.to(at::kFloat).contiguous(), df = dy_in.to(at::kFloat).contiguous();
    const auto& kt = table(ct);
    sfcpu::SddmmArgs sa;
    sa.a = A;
    sa.dy = df.data_ptr<float>();
    sa.x = xf.data_ptr<float>();
    sa.ldd = rows;
    sa.ldx = cols;
    sa.B = B;
    sa.out = vp;
    run_rows(A, static_cast<double>(nnz) * B, 2, [&](int64_t r0, int64_t r1) {
      sfcpu::SddmmArgs s = sa;
      s.r0 = r0;
      s.r1 = r1;
      kt.sddmm_small(s);
    });
  } else {
    const Tensor x = as_compute(x_in, ct), dy = as_compute(dy_in, ct);
    const int64_t PW = kSddmmLanes < (B + 15) / 16 * 16 ? kSddmmLanes : (B + 15) / 16 * 16;
    const Tensor xp = to_panels(x, PW), dyp = to_panels(dy, PW);
    sddmm_panels(A, panel_lanes(dyp, B), panel_lanes(xp, B), vp, false, ct);
  }
  return vals.narrow(0, 0, nnz).to(ot);  // kept values (CSR order with CSR blocks)
}

// ---------------------------------------------------------------------------------------------
// Conv2d (NCHW in and out; reduction order (kh, kw, c))
// ---------------------------------------------------------------------------------------------
struct ConvCfg {
  int64_t KH, KW, sh, sw, ph, pw, dh, dw, groups;
};

ConvCfg conv_cfg(const std::vector<int64_t>& ks, const std::vector<int64_t>& stride, const std::vector<int64_t>& pad,
                 const std::vector<int64_t>& dil, int64_t groups) {
  TORCH_CHECK(ks.size() == 2 && stride.size() == 2 && pad.size() == 2 && dil.size() == 2, "conv: bad parameters");
  return {ks[0], ks[1], stride[0], stride[1], pad[0], pad[1], dil[0], dil[1], groups};
}

// images per block so that a block has about conv_lanes output pixels
int64_t conv_block(int64_t B, int64_t HoWo) {
  return std::max<int64_t>(1, std::min<int64_t>(B, g_conv_lanes.load() / std::max<int64_t>(HoWo, 1)));
}

// Image blocks of G images. With T > 1 threads and enough blocks, each thread takes a contiguous
// range of blocks with its own scratch (parts = T): the im2col / SpMM / layout phases of a block then
// run serially on that thread (pick_threads is 1 inside a parallel region), with no barrier between
// phases and no activation buffer shared between cores -- splitting each phase across the cores
// instead made 2 threads slower than 1 (measured: 3x3 conv, 16x256x14x14). Otherwise (few blocks,
// e.g. batch 1) the blocks run in order and every phase is parallel. f(b0, Gb, part, first_of_part).
int conv_parts(int64_t B, int64_t G, double work) {
  const int T = pick_threads(work);
  const int64_t nb = (B + G - 1) / G;
  return (T > 1 && (nb >= 2 * T || nb % T == 0)) ? T : 1;
}
template <typename F>
void run_image_blocks(int64_t B, int64_t G, int parts, F&& f) {
  const int64_t nb = (B + G - 1) / G;
  run_parts(parts, [&](int t) {
    const int64_t j0 = nb * t / parts, j1 = nb * (t + 1) / parts;
    for (int64_t j = j0; j < j1; ++j) f(j * G, std::min(G, B - j * G), t, j == j0);
  });
}

sfcpu::ConvGeom conv_geom(const ConvCfg& k, int64_t Cg, int64_t H, int64_t W, int64_t Ho, int64_t Wo, int64_t G,
                          int64_t img_stride, int64_t PW) {
  sfcpu::ConvGeom g;
  g.C = Cg;
  g.H = H;
  g.W = W;
  g.KH = k.KH;
  g.KW = k.KW;
  g.Ho = Ho;
  g.Wo = Wo;
  g.sh = k.sh;
  g.sw = k.sw;
  g.ph = k.ph;
  g.pw = k.pw;
  g.dh = k.dh;
  g.dw = k.dw;
  g.G = G;
  g.img_stride = img_stride;
  g.PW = PW;
  return g;
}

// rows [r0, r0+nr) of a CSR matrix (entry positions stay global: values and outputs index by j)
SpMat sub_rows(const SpMat& A, int64_t r0, int64_t nr) {
  SpMat s = A;
  s.rows = nr;
  s.rowptr = A.rowptr + r0;
  if (A.bp) s.bp = A.bp + r0;
  return s;
}

SpMat nm_sub_rows(const SpMat& A, int64_t r0, int64_t nr, int64_t esz) {
  SpMat s = A;
  s.rows = nr;
  s.val = static_cast<const char*>(A.val) + r0 * A.S * esz;
  s.meta = A.meta + r0 * A.meta_ld;
  return s;
}

Tensor conv_fwd(const Tensor& x_in, int64_t O, int64_t Kred, const std::optional<Tensor>& rowptr,
                const std::optional<Tensor>& col, const std::optional<Tensor>& meta, const Tensor& vals, int64_t n,
                int64_t m, const std::optional<Tensor>& bias_in, std::vector<int64_t> ks, std::vector<int64_t> stride,
                std::vector<int64_t> pad, std::vector<int64_t> dil, int64_t groups, const std::optional<Tensor>& bp,
                bool csr_blocks) {
  TORCH_CHECK(x_in.dim() == 4, "conv_fwd: x must be (B, C, H, W)");
  const ConvCfg k = conv_cfg(ks, stride, pad, dil, groups);
  const at::ScalarType ot = x_in.scalar_type(), ct = compute_type(ot);
  const Tensor x = as_compute(x_in, ct);
  const int64_t B = x.size(0), Ct = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cg = Ct / groups, Og = O / groups;
  TORCH_CHECK(Kred == k.KH * k.KW * Cg && O % groups == 0 && Ct % groups == 0, "conv_fwd: shape mismatch");
  const int64_t Ho = (H + 2 * k.ph - k.dh * (k.KH - 1) - 1) / k.sh + 1;
  const int64_t Wo = (W + 2 * k.pw - k.dw * (k.KW - 1) - 1) / k.sw + 1;
  TORCH_CHECK(Ho > 0 && Wo > 0, "conv_fwd: empty output");
  const SpMat A = make_mat(O, Kred, rowptr, col, meta, vals, n, m, bp, ct, false, csr_blocks);
  Tensor y = empty_big({B, O, Ho, Wo}, ct);
  if (B == 0) return ot == ct ? y : y.to(ot);
  Tensor bf;
  if (bias_in.has_value()) bf = bias_in->to(at::kFloat).contiguous();
  const auto& kt = table(ct);
  const int64_t esz = x.element_size(), HoWo = Ho * Wo;
  // im2col of G images at a time into a plain (Kred x Pp) fp32 buffer (one "panel" as wide as the
  // block, so copies never split at panel edges); the kernels read it in PW-lane chunks
  const int64_t G = conv_block(B, HoWo);
  const int64_t PW = panel_width(G * HoWo), Ppmax = (G * HoWo + 15) / 16 * 16;
  const int parts = conv_parts(B, G, static_cast<double>(nnz_of(A)) * B * HoWo);
  Tensor xcol = at::empty({parts, Kred * Ppmax}, x.options().dtype(at::kFloat));
  Tensor ycol = at::empty({parts, Og * Ppmax}, x.options().dtype(at::kFloat));
  const char* xb = static_cast<const char*>(x.data_ptr());
  char* yb = static_cast<char*>(y.data_ptr());
  run_image_blocks(B, G, parts, [&](int64_t b0, int64_t Gb, int t, bool) {
    float* xc = xcol.data_ptr<float>() + t * Kred * Ppmax;
    float* yc = ycol.data_ptr<float>() + t * Og * Ppmax;
    const int64_t P = Gb * HoWo, Pp = (P + 15) / 16 * 16;
    for (int64_t gi = 0; gi < groups; ++gi) {
      const sfcpu::ConvGeom g = conv_geom(k, Cg, H, W, Ho, Wo, Gb, Ct * H * W, Pp);
      const void* xsrc = xb + (b0 * Ct * H * W + gi * Cg * H * W) * esz;
      run_range(Kred, static_cast<double>(Kred) * P, [&](int64_t r0, int64_t r1) { kt.im2col(xsrc, xc, g, r0, r1); });
      const SpMat Ag = A.meta ? nm_sub_rows(A, gi * Og, Og, esz) : sub_rows(A, gi * Og, Og);
      const float* bptr = bf.defined() ? bf.data_ptr<float>() + gi * Og : nullptr;
      spmm_panels(Ag, plain_lanes(xc, Pp, P, PW), plain_lanes(yc, Pp, P, PW), bptr, ct);
      void* ydst = yb + (b0 * O * HoWo + gi * Og * HoWo) * esz;
      run_range(Og, static_cast<double>(Og) * P, [&](int64_t o0, int64_t o1) {
        kt.panels_to_rows(yc, ydst, Og, HoWo, Gb, O * HoWo, Pp, o0, o1);
      });
    }
  });
  return ot == ct ? y : y.to(ot);
}

// dx = conv2d_input(dy, W*M); transposed CSR per group: rows Kred, cols Og (t_rowptr [groups*Kred+1])
Tensor conv_dx(const Tensor& dy_in, int64_t O, int64_t Kred, const Tensor& t_rowptr, const Tensor& t_col,
               const Tensor& t_vals, std::vector<int64_t> input_shape, std::vector<int64_t> ks,
               std::vector<int64_t> stride, std::vector<int64_t> pad, std::vector<int64_t> dil, int64_t groups,
               const std::optional<Tensor>& t_bp, bool csr_blocks) {
  TORCH_CHECK(dy_in.dim() == 4 && input_shape.size() == 4, "conv_dx: need 4-D dy and input_shape");
  const ConvCfg k = conv_cfg(ks, stride, pad, dil, groups);
  const at::ScalarType ot = dy_in.scalar_type(), ct = compute_type(ot);
  const Tensor dy = as_compute(dy_in, ct);
  const int64_t B = input_shape[0], Ct = input_shape[1], H = input_shape[2], W = input_shape[3];
  const int64_t Cg = Ct / groups, Og = O / groups, Ho = dy.size(2), Wo = dy.size(3), HoWo = Ho * Wo;
  TORCH_CHECK(dy.size(0) == B && dy.size(1) == O && Kred == k.KH * k.KW * Cg, "conv_dx: shape mismatch");
  Tensor dx = zeros_big({B, Ct, H, W}, at::kFloat);  // col2im accumulates in fp32
  if (B == 0 || HoWo == 0) return dx.to(ot);
  // all groups' transposes stacked: (groups*Kred) x Og
  const SpMat At = make_mat(groups * Kred, Og, t_rowptr, t_col, std::nullopt, t_vals, 0, 0, t_bp, ct, false, csr_blocks);
  const auto& kt = table(ct);
  const int64_t esz = dy.element_size();
  const int64_t G = conv_block(B, HoWo);
  const int64_t PW = panel_width(G * HoWo), Ppmax = (G * HoWo + 15) / 16 * 16;
  const int parts = conv_parts(B, G, static_cast<double>(nnz_of(At)) * B * HoWo);
  Tensor dycol = at::empty({parts, Og * Ppmax}, dy.options().dtype(at::kFloat));
  Tensor dxcol = at::empty({parts, Kred * Ppmax}, dy.options().dtype(at::kFloat));
  const char* db = static_cast<const char*>(dy.data_ptr());
  char* xb = static_cast<char*>(dx.data_ptr());
  run_image_blocks(B, G, parts, [&](int64_t b0, int64_t Gb, int t, bool) {  // blocks write disjoint images of dx
    float* dyc = dycol.data_ptr<float>() + t * Og * Ppmax;
    float* dxc = dxcol.data_ptr<float>() + t * Kred * Ppmax;
    const int64_t P = Gb * HoWo, Pp = (P + 15) / 16 * 16;
    for (int64_t gi = 0; gi < groups; ++gi) {
      const void* dsrc = db + (b0 * O * HoWo + gi * Og * HoWo) * esz;
      run_range(Og, static_cast<double>(Og) * P, [&](int64_t o0, int64_t o1) {
        kt.rows_to_panels(dsrc, dyc, Og, HoWo, Gb, O * HoWo, Pp, o0, o1);
      });
      const SpMat Ag = sub_rows(At, gi * Kred, Kred);
      spmm_panels(Ag, plain_lanes(dyc, Pp, P, PW), plain_lanes(dxc, Pp, P, PW), nullptr, ct);
      const sfcpu::ConvGeom g = conv_geom(k, Cg, H, W, Ho, Wo, Gb, Ct * H * W, Pp);
      void* xdst = xb + (b0 * Ct * H * W + gi * Cg * H * W) * sizeof(float);
      run_range(Gb * Cg, static_cast<double>(Kred) * P, [&](int64_t p0, int64_t p1) { kt.col2im(dxc, xdst, g, p0, p1); });
    }
  });
  return dx.to(ot);
}

// dW (O x Kred, reduction order) = masked conv2d_weight(x, dy)
Tensor conv_dw(const Tensor& dy_in, const Tensor& x_in, const Tensor& rowptr, const Tensor& col, int64_t O,
               int64_t Kred, std::vector<int64_t> ks, std::vector<int64_t> stride, std::vector<int64_t> pad,
               std::vector<int64_t> dil, int64_t groups, const std::optional<Tensor>& bp, bool csr_blocks) {
  TORCH_CHECK(dy_in.dim() == 4 && x_in.dim() == 4, "conv_dw: need 4-D dy and x");
  const ConvCfg k = conv_cfg(ks, stride, pad, dil, groups);
  const at::ScalarType ot = x_in.scalar_type(), ct = compute_type(ot);
  const Tensor x = as_compute(x_in, ct), dy = as_compute(dy_in, ct);
  const int64_t B = x.size(0), Ct = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cg = Ct / groups, Og = O / groups, Ho = dy.size(2), Wo = dy.size(3), HoWo = Ho * Wo;
  TORCH_CHECK(dy.size(0) == B && dy.size(1) == O && Kred == k.KH * k.KW * Cg, "conv_dw: shape mismatch");
  const SpMat A = make_mat(O, Kred, rowptr, col, std::nullopt, at::empty({0}), 0, 0, bp, ct, true, csr_blocks);
  const int64_t nnz = nnz_of(A);
  const int64_t nv = std::max<int64_t>(nnz, 1);
  Tensor vals = at::zeros({nv}, at::kFloat);
  if (B > 0 && HoWo > 0) {
    const auto& kt = table(ct);
    const int64_t esz = x.element_size();
    const int64_t G = conv_block(B, HoWo);
    const int64_t PW = kSddmmLanes, Ppmax = (G * HoWo + 15) / 16 * 16;  // SDDMM: wide chunks, one reduction
    const int parts = conv_parts(B, G, static_cast<double>(nnz) * B * HoWo);
    Tensor xcol = at::empty({parts, Kred * Ppmax}, x.options().dtype(at::kFloat));
    Tensor dycol = at::empty({parts, Og * Ppmax}, x.options().dtype(at::kFloat));
    // per-part partial sums of the kept-position gradient (nnz floats each), added up below
    Tensor pvals = parts > 1 ? at::empty({parts, nv}, at::kFloat) : vals.view({1, nv});
    const char* xb = static_cast<const char*>(x.data_ptr());
    const char* db = static_cast<const char*>(dy.data_ptr());
    run_image_blocks(B, G, parts, [&](int64_t b0, int64_t Gb, int t, bool first) {
      float* xc = xcol.data_ptr<float>() + t * Kred * Ppmax;
      float* dyc = dycol.data_ptr<float>() + t * Og * Ppmax;
      float* out = pvals.data_ptr<float>() + t * nv;
      const int64_t P = Gb * HoWo, Pp = (P + 15) / 16 * 16;
      for (int64_t gi = 0; gi < groups; ++gi) {
        const sfcpu::ConvGeom g = conv_geom(k, Cg, H, W, Ho, Wo, Gb, Ct * H * W, Pp);
        const void* xsrc = xb + (b0 * Ct * H * W + gi * Cg * H * W) * esz;
        run_range(Kred, static_cast<double>(Kred) * P, [&](int64_t r0, int64_t r1) { kt.im2col(xsrc, xc, g, r0, r1); });
        const void* dsrc = db + (b0 * O * HoWo + gi * Og * HoWo) * esz;
        run_range(Og, static_cast<double>(Og) * P, [&](int64_t o0, int64_t o1) {
          kt.rows_to_panels(dsrc, dyc, Og, HoWo, Gb, O * HoWo, Pp, o0, o1);
        });
        // this group's rows of A (local row r <-> dy row r; outputs at global positions j): the
        // first block of a part writes its entries, later blocks accumulate
        const SpMat Ag = sub_rows(A, gi * Og, Og);
        sddmm_panels(Ag, plain_lanes(dyc, Pp, P, PW), plain_lanes(xc, Pp, P, PW), out, !first, ct);
      }
    });
    if (parts > 1) {
      float* v = vals.data_ptr<float>();
      const float* pv = pvals.data_ptr<float>();
      run_range(nv, static_cast<double>(nv) * parts, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          float acc = pv[i];
          for (int t = 1; t < parts; ++t) acc += pv[t * nv + i];
          v[i] = acc;
        }
      });
    }
  }
  return vals.narrow(0, 0, nnz).to(ot);  // kept values (CSR order with CSR blocks)
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "sparsefast CPU kernels (see csrc/cpu/kernels.h for the formats)";
  mod.attr("ABI_VERSION") = kAbiVersion;
  mod.def("describe", &describe, "which ISA path, threads and tunables are in use");
  mod.def("set_isa", &set_isa, "force the kernel ISA: generic, avx2, avx512 or auto");
  mod.def("set_tunable", &set_tunable, "set a tuning knob (panel, small_max, conv_lanes, min_par_work)");
  mod.def("all_finite", &all_finite, "no NaN/Inf in the tensor");
  mod.def("mask_into", &mask_into, "dst = where(mask, src, 0), bit-exact; dst may be src");
  mod.def("fill_where", &fill_where, "t[mask] = value in place (float32)");
  mod.def("build_csr", &build_csr);
  mod.def("build_transpose", &build_transpose);
  mod.def("build_nm", &build_nm);
  mod.def("gather_csr", &gather_csr, py::arg("w"), py::arg("rowptr"), py::arg("col"), py::arg("row0") = 0,
          py::arg("out") = py::none());
  mod.def("gather_perm", &gather_perm);
  mod.def("scatter_flat", &scatter_flat, "dense (numel,) with vals at int32 flat positions, +0 elsewhere");
  mod.def("rank_in_mask", &rank_in_mask, "(rank among the mask's kept entries, kept there) of ascending int32 flat keys");
  mod.def("gather_keep", &gather_keep, "out[j] = keep[j] ? vals[src[j]] : 0");
  mod.def("csr_from_flat", &csr_from_flat, "(rowptr, col) of an R x C mask from its ascending int32 flat positions");
  mod.def("flat_nonzero", &flat_nonzero, "ascending int32 flat positions of a bool tensor's true entries");
  mod.def("merge_keys", &merge_keys, "(src, found): positions of ascending new keys in ascending old keys");
  mod.def("topk_flat", &topk_flat, "bool mask of the k largest float32 scores (ties: lower index; score: the value, "
          "its magnitude with absval, -inf and never selected where exclude); empty on NaN",
          py::arg("f"), py::arg("k"), py::arg("exclude") = py::none(), py::arg("absval") = false);
  mod.def("gather_nm", &gather_nm);
  mod.def("build_blocked", &build_blocked);
  mod.def("build_csr_blocks", &build_csr_blocks);
  mod.def("small_max", []() { return g_small_max.load(); });
  mod.def("spmm", &spmm);
  mod.def("sddmm", &sddmm);
  mod.def("spmm_t", &spmm_t);
  mod.def("spmm_bsr", &spmm_bsr);
  mod.def("sddmm_bsr", &sddmm_bsr);
  mod.def("conv_fwd", &conv_fwd);
  mod.def("conv_dx", &conv_dx);
  mod.def("conv_dw", &conv_dw);
}

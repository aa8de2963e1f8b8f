// Hopper (sm_90a) path of the 2:4 GEMM: wgmma.mma_async.sp (m64n128k32), A (the SF24 weight) from
// registers -- the per-warp fragment and metadata registers are exactly the mma.sp.m16n8k32 ones of
// sf24.cu (each warp of a warpgroup owns 16 rows of the 64-row A tile) -- and B (activations / im2col)
// from shared memory through a matrix descriptor, 128-byte-swizzled K-major tiles.
//
// Only the sm_90a pass compiles the kernel body; other targets get an empty stub that is never
// launched (the host dispatch requires compute capability 9.0 and the caller's opt-in, which the
// Python backend gives after a one-time self-check against the mma.sp path).
//
// Pipeline (per 64-wide K tile): cp.async brings tile kt+3 into a free smem stage while the two
// warpgroups issue the wgmma group of tile kt and keep ONE group in flight: `wgmma.wait_group 1`
// after committing group kt only waits for group kt-1, so the loads, ldmatrix of the next A
// fragments and the tensor cores overlap. Two consequences the code is built around:
//   * an in-flight wgmma still reads its A-fragment and metadata registers, so those are double
//     buffered (af/e[2]: buffer kt%2, reused by tile kt+2 only after wait_group 1 retired group kt);
//   * it also still reads its smem B stage, so the prefetch distance is H_STAGES-2 (the stage
//     being refilled at iteration kt held tile kt-2, whose group every warpgroup retired before
//     the __syncthreads that precedes the refill).
// Every wgmma is issued under warpgroup-uniform control flow: no branch around it (row blocks that
// are all padding multiply zero-filled A tiles, and their rows are never stored); ptxas otherwise
// serializes the whole wgmma pipeline (C7520; the kernel report fails on any such warning).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "sf_kernels.h"
#include "sf_layout.h"
#include "sf_ptx.cuh"

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SF_SM90A_DEVICE 1
#else
#define SF_SM90A_DEVICE 0
#endif

namespace sf {
namespace {

// 5 stages: 3 tiles of cp.async in flight + 1 read by the in-flight wgmma group + 1 being issued
// (139264 B: one 256-thread block per SM, which its ~150 registers per thread impose anyway)
constexpr int H_BM = 128, H_BN = 128, H_BK = 64, H_STAGES = 5, H_THREADS = 256;  // 2 warpgroups
constexpr int H_KS = H_BK / 32;
constexpr int H_A_LD = H_BK / 2 + 8;                      // padded rows for ldmatrix
constexpr int H_A_BYTES = H_BM * H_A_LD * 2;              // 10240
constexpr int H_B_BYTES = H_BN * H_BK * 2;                // 16384: 128 rows x 128 B, SW128
constexpr int H_E_BYTES = (H_BM / 16) * H_KS * 16 * 4;    // 1024
constexpr int H_STAGE_BYTES = H_B_BYTES + H_A_BYTES + H_E_BYTES;  // B first: keeps 1024-B alignment
constexpr int H_SMEM = H_STAGES * H_STAGE_BYTES + 1024;   // + slack to align the base to 1024
static_assert(H_STAGE_BYTES % 1024 == 0, "stage size must keep the B tiles 1024-byte aligned");
static_assert(H_SMEM == 139264, "update the kernel-report dyn_smem line below");

// Compile-time evidence (format: sparsefast/kernel_report/__init__.py): checked on sm_90a only (the sm_80 build
// is the empty stub): sparse warpgroup MMA (HGMMA...SP), 16-byte cp.async loads, no spills, packed 16-bit
// output pairs, and no wgmma serialization warning from ptxas (always checked).
// kernel-report: sf24_gemm_sm90_kernel< archs=90 tensor_core=sparse wgmma vector_loads hot packed_stores dyn_smem=139264

#if SF_SM90A_DEVICE
// 128-byte swizzle of a K-major tile whose rows are 128 B: 16-byte chunk c of row r
__device__ __forceinline__ int sw128_offset(int r, int c) { return r * 128 + ((c ^ (r & 7)) << 4); }

__device__ __forceinline__ uint64_t b_desc(uint32_t smem_addr) {
  // wgmma matrix descriptor: start address >> 4 (bits 0-13), leading byte offset >> 4 (16-29; unused
  // for swizzled K-major, 1 by convention), stride byte offset >> 4 (32-45: 8 rows x 128 B = 1024),
  // base offset 0 (49-51; tiles are 1024-aligned), layout 1 = 128-byte swizzle (62-63).
  uint64_t d = 0;
  d |= (uint64_t)((smem_addr & 0x3FFFF) >> 4);
  d |= (uint64_t)1 << 16;
  d |= (uint64_t)(1024 >> 4) << 32;
  d |= (uint64_t)1 << 62;
  return d;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void reg_fence(float& r) { asm volatile("" : "+f"(r)::"memory"); }

#define SF_D8(i) "+f"(d[i + 0]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
                 "+f"(d[i + 6]), "+f"(d[i + 7])
#define SF_WGMMA_SP(TYPE)                                                                                          \
  asm volatile(                                                                                                    \
      "wgmma.mma_async.sp.sync.aligned.m64n128k32.f32." TYPE "." TYPE " "                                          \
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,"    \
      "%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,"   \
      "%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, %69, 0, 1, 1, 1, 0;\n"                    \
      : SF_D8(0), SF_D8(8), SF_D8(16), SF_D8(24), SF_D8(32), SF_D8(40), SF_D8(48), SF_D8(56)                       \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(e))

template <typename T>
struct WgmmaSp;
template <>
struct WgmmaSp<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&d)[64], const uint32_t (&a)[4], uint64_t desc, uint32_t e) {
    SF_WGMMA_SP("bf16");
  }
};
template <>
struct WgmmaSp<__half> {
  __device__ __forceinline__ static void run(float (&d)[64], const uint32_t (&a)[4], uint64_t desc, uint32_t e) {
    SF_WGMMA_SP("f16");
  }
};
#undef SF_WGMMA_SP
#undef SF_D8
#endif  // SF_SM90A_DEVICE

template <typename T, typename OutT, bool CONV>
__global__ void __launch_bounds__(H_THREADS, 1) sf24_gemm_sm90_kernel(const Sf24GemmArgs a) {
#if SF_SM90A_DEVICE
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // align the stage area to 1024 B (SW128 atoms)
  const uint32_t raw = smem_u32(smem_raw);
  unsigned char* smem = smem_raw + (((raw + 1023u) & ~1023u) - raw);
  auto stage_b = [&](int s) { return smem + s * H_STAGE_BYTES; };
  auto stage_a = [&](int s) { return reinterpret_cast<T*>(smem + s * H_STAGE_BYTES + H_B_BYTES); };
  auto stage_e = [&](int s) {
    return reinterpret_cast<uint32_t*>(smem + s * H_STAGE_BYTES + H_B_BYTES + H_A_BYTES);
  };

  const T* __restrict__ vals = static_cast<const T*>(a.vals);
  const uint32_t* __restrict__ meta = a.meta;
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wg = warp / 4, wq = warp % 4;  // warpgroup (64 feature rows each), warp within it (16 rows)
  // grid: x = pixel/row tiles (2^31 limit), y = feature tiles
  const int64_t f0 = (int64_t)blockIdx.y * H_BM, p0 = (int64_t)blockIdx.x * H_BN;
  const int64_t Cp = a.Cp, Rp = a.Rp;

  auto load_stage = [&](int stage, int kt) {
    const int64_t k0 = (int64_t)kt * H_BK;
    T* dA = stage_a(stage);
    for (int i = tid; i < H_BM * (H_BK / 16); i += H_THREADS) {
      const int r = i / (H_BK / 16), c = i % (H_BK / 16);
      const int64_t gr = f0 + r, gk = k0 / 2 + c * 8;
      const bool ok = gr < Rp && gk < Cp / 2;
      cp_async16(dA + r * H_A_LD + c * 8, ok ? vals + gr * (Cp / 2) + gk : vals, ok ? 16 : 0);
    }
    uint32_t* dE = stage_e(stage);
    for (int i = tid; i < (H_BM / 16) * H_KS * 4; i += H_THREADS) {
      const int t = i / (H_KS * 4), c = i % (H_KS * 4);
      const int64_t gt = f0 / 16 + t, gs = k0 / 32 + c / 4;
      const bool ok = gt < Rp / 16 && gs < Cp / 32;
      cp_async16(dE + t * H_KS * 16 + c * 4, ok ? meta + (gt * (Cp / 32) + gs) * 16 + (c % 4) * 4 : meta, ok ? 16 : 0);
    }
    unsigned char* dB = stage_b(stage);
    for (int i = tid; i < H_BN * (H_BK / 8); i += H_THREADS) {
      const int r = i / (H_BK / 8), c = i % (H_BK / 8);
      const int64_t p = p0 + r, k = k0 + c * 8;
      const T* src = x;
      int bytes = 0;
      if (p < a.M && k < a.K) {
        if constexpr (!CONV) {
          src = x + p * a.ldx + k;
          bytes = 16;
        } else {
          const int64_t off = conv_input_offset(a.conv, k, p);
          if (off >= 0) {
            src = x + off;
            bytes = 16;
          }
        }
      }
      cp_async16(dB + sw128_offset(r, c), src, bytes);
    }
  };

  float d[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) d[i] = 0.f;

  // Tiles in flight: loads of kt+1 .. kt+3 (cp.async), wgmma group kt-1 (async), group kt (issued).
  constexpr int PREFETCH = H_STAGES - 2;
  const int KT = (int)((Cp + H_BK - 1) / H_BK);  // Cp % 64 == 0 (sf24_cols_padded): no partial tile
#pragma unroll
  for (int s = 0; s < PREFETCH; ++s) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();
  }
  const int trow = wg * 64 + wq * 16;
  // This warp's 16 rows hold weights (else all padding: the A tile and metadata are zero-filled;
  // a zero metadata word is not a legal 2:4 code, so pass (0,1) for every group there -- a data
  // select, not a branch: the wgmma must stay on uniform control flow).
  const bool rows_live = f0 + trow < Rp;
  uint32_t af[2][H_KS][4], e[2][H_KS];

  // One K tile into register buffer BUF (= kt % 2, a compile-time index: no local memory).
  auto step = [&](int kt, auto buf_tag) {
    constexpr int BUF = decltype(buf_tag)::value;
    cp_async_wait<PREFETCH - 1>();  // tile kt landed (this thread's copies)
    fence_proxy_async();            // cp.async (generic proxy) writes -> visible to wgmma (async proxy) reads
    __syncthreads();                // everyone's copies landed; every warpgroup retired group kt-2
    const int nk = kt + PREFETCH;
    if (nk < KT) load_stage(nk % H_STAGES, nk);  // refills the stage of tile kt-2
    cp_async_commit();

    const int stage = kt % H_STAGES;
    const T* tA = stage_a(stage);
    const uint32_t* tE = stage_e(stage);
    const uint32_t bbase = smem_u32(stage_b(stage));
    // af/e[BUF] were last read by group kt-2, retired by the wait_group 1 of iteration kt-1
#pragma unroll
    for (int ks = 0; ks < H_KS; ++ks) {
      ldmatrix_x4(af[BUF][ks], tA + (trow + (lane % 16)) * H_A_LD + ks * 16 + (lane / 16) * 8);
      const uint32_t m = tE[(trow / 16) * H_KS * 16 + ks * 16 + 2 * (lane / 4) + (lane % 2)];
      e[BUF][ks] = rows_live ? m : 0x44444444u;
    }
#pragma unroll
    for (int i = 0; i < 64; ++i) reg_fence(d[i]);
    wgmma_fence();  // A fragments written by ldmatrix (and d by the zero-init) before the wgmmas read them
#pragma unroll
    for (int ks = 0; ks < H_KS; ++ks) WgmmaSp<T>::run(d, af[BUF][ks], b_desc(bbase + ks * 64), e[BUF][ks]);
    wgmma_commit();
    wgmma_wait<1>();  // group kt-1 retired: its stage and register buffer may be reused
#pragma unroll
    for (int i = 0; i < 64; ++i) reg_fence(d[i]);
  };
  using B0 = std::integral_constant<int, 0>;
  using B1 = std::integral_constant<int, 1>;
  int kt = 0;
  for (; kt + 1 < KT; kt += 2) {
    step(kt, B0{});
    step(kt + 1, B1{});
  }
  if (kt < KT) step(kt, B0{});  // odd KT (uniform: kernel arguments only)
  wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < 64; ++i) reg_fence(d[i]);
  cp_async_wait<0>();

  OutT* out = static_cast<OutT*>(a.out);
  const OutT* bias = static_cast<const OutT*>(a.bias);
  const bool pair_ok = epilogue_pairs_aligned(out, a.ldo);
  // accumulator layout (m64nN): d[4j .. 4j+3] is an m16n8 C fragment (mma_c_coord) at rows
  // 16*wq .. +15 of this warpgroup's 64, cols 8j .. 8j+7
#pragma unroll
  for (int j = 0; j < 16; ++j)
    store_c_frag<OutT>(out, bias, a.ldo, a.R, a.M, a.accumulate, f0 + trow, p0 + 8 * j, lane, pair_ok, d[4 * j],
                       d[4 * j + 1], d[4 * j + 2], d[4 * j + 3]);
#endif  // SF_SM90A_DEVICE
}

template <typename T, typename OutT, bool CONV>
cudaError_t launch_sm90(const Sf24GemmArgs& a, cudaStream_t stream) {
  auto kern = sf24_gemm_sm90_kernel<T, OutT, CONV>;
  static bool attr_set[64] = {};
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  if (dev < 0 || dev >= 64 || !attr_set[dev]) {
    e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, H_SMEM);
    if (e != cudaSuccess) return e;
    if (dev >= 0 && dev < 64) attr_set[dev] = true;
  }
  if (ceil_div(a.R, H_BM) > 65535) return cudaErrorInvalidConfiguration;
  dim3 grid((unsigned)ceil_div(a.M, H_BN), (unsigned)ceil_div(a.R, H_BM));
  kern<<<grid, H_THREADS, H_SMEM, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, typename OutT>
cudaError_t sm90_dispatch(const Sf24GemmArgs& a, cudaStream_t stream) {
  return a.is_conv ? launch_sm90<T, OutT, true>(a, stream) : launch_sm90<T, OutT, false>(a, stream);
}

}  // namespace

cudaError_t sf24_gemm_sm90(DType in_dt, DType out_dt, const Sf24GemmArgs& a, cudaStream_t stream) {
  if (a.R == 0 || a.M == 0) return cudaSuccess;
  if (a.split != 1) return cudaErrorInvalidValue;  // no k-split here (sf24_split_k is for mma.sp)
  if (in_dt == kBF16 && out_dt == kBF16) return sm90_dispatch<__nv_bfloat16, __nv_bfloat16>(a, stream);
  if (in_dt == kF16 && out_dt == kF16) return sm90_dispatch<__half, __half>(a, stream);
  if (in_dt == kBF16 && out_dt == kF32) return sm90_dispatch<__nv_bfloat16, float>(a, stream);
  return cudaErrorInvalidValue;
}

}  // namespace sf

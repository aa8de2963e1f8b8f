// Hopper (sm_90a) path of the 2:4 GEMM: wgmma.mma_async.sp (m64n128k32), A (the SF24 weight) from
// registers -- the per-warp fragment and metadata registers are exactly the mma.sp.m16n8k32 ones of
// sf24.cu (each warp of a warpgroup owns 16 rows of the 64-row A tile) -- and B (activations / im2col)
// from shared memory through a matrix descriptor, 128-byte-swizzled K-major tiles.
//
// Only the sm_90a pass compiles the kernel body; other targets get an empty stub that is never
// launched (the host dispatch requires compute capability 9.0 and the caller's opt-in, which the
// Python backend gives after a one-time self-check against the mma.sp path).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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

constexpr int H_BM = 128, H_BN = 128, H_BK = 64, H_STAGES = 4, H_THREADS = 256;  // 2 warpgroups
constexpr int H_KS = H_BK / 32;
constexpr int H_A_LD = H_BK / 2 + 8;                      // padded rows for ldmatrix
constexpr int H_A_BYTES = H_BM * H_A_LD * 2;              // 10240
constexpr int H_B_BYTES = H_BN * H_BK * 2;                // 16384: 128 rows x 128 B, SW128
constexpr int H_E_BYTES = (H_BM / 16) * H_KS * 16 * 4;    // 1024
constexpr int H_STAGE_BYTES = H_B_BYTES + H_A_BYTES + H_E_BYTES;  // B first: keeps 1024-B alignment
constexpr int H_SMEM = H_STAGES * H_STAGE_BYTES + 1024;   // + slack to align the base to 1024
static_assert(H_STAGE_BYTES % 1024 == 0, "stage size must keep the B tiles 1024-byte aligned");
static_assert(H_SMEM == 111616, "update the kernel-report dyn_smem line below");

// Compile-time evidence (format: sparsefast/kernel_report/__init__.py): checked on sm_90a only (the sm_80 build
// is the empty stub): sparse warpgroup MMA (HGMMA...SP), 16-byte cp.async loads, no spills.
// kernel-report: sf24_gemm_sm90_kernel< archs=90 tensor_core=sparse wgmma vector_loads hot dyn_smem=111616

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
__device__ __forceinline__ void wgmma_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
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

  const int KT = (int)((Cp + H_BK - 1) / H_BK);
#pragma unroll
  for (int s = 0; s < H_STAGES - 1; ++s) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();
  }
  const bool rows_live = f0 + wg * 64 < Rp;  // warpgroup-uniform: skip all-padding row blocks
  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<H_STAGES - 2>();
    fence_proxy_async();  // cp.async (generic proxy) writes -> visible to wgmma (async proxy) reads
    __syncthreads();
    const int nk = kt + H_STAGES - 1;
    if (nk < KT) load_stage(nk % H_STAGES, nk);
    cp_async_commit();

    const int stage = kt % H_STAGES;
    const T* tA = stage_a(stage);
    const uint32_t* tE = stage_e(stage);
    const uint32_t bbase = smem_u32(stage_b(stage));
    uint32_t af[H_KS][4], e[H_KS];
    const int trow = wg * 64 + wq * 16;
#pragma unroll
    for (int ks = 0; ks < H_KS; ++ks) {
      ldmatrix_x4(af[ks], tA + (trow + (lane % 16)) * H_A_LD + ks * 16 + (lane / 16) * 8);
      e[ks] = tE[(trow / 16) * H_KS * 16 + ks * 16 + 2 * (lane / 4) + (lane % 2)];
    }
    if (rows_live) {
#pragma unroll
      for (int i = 0; i < 64; ++i) reg_fence(d[i]);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < H_KS; ++ks) {
        if ((int64_t)kt * H_BK + ks * 32 < Cp)  // partial last tile (uniform)
          WgmmaSp<T>::run(d, af[ks], b_desc(bbase + ks * 64), e[ks]);
      }
      wgmma_commit();
      wgmma_wait0();
#pragma unroll
      for (int i = 0; i < 64; ++i) reg_fence(d[i]);
    }
  }
  cp_async_wait<0>();

  OutT* out = static_cast<OutT*>(a.out);
  const OutT* bias = static_cast<const OutT*>(a.bias);
  // accumulator layout (m64nN): d[i] -> row 16*wq + lane/4 + 8*((i/2)%2), col 8*(i/4) + 2*(lane%4) + i%2
#pragma unroll
  for (int i = 0; i < 64; ++i) {
    const int64_t f = f0 + wg * 64 + wq * 16 + lane / 4 + 8 * ((i / 2) % 2);
    const int64_t p = p0 + 8 * (i / 4) + 2 * (lane % 4) + (i % 2);
    if (f < a.R && p < a.M) {
      float v = d[i];
      if (bias != nullptr) v += to_f32<OutT>(bias[f]);
      OutT* dst = out + p * a.ldo + f;
      if (a.accumulate) v += to_f32<OutT>(*dst);
      *dst = from_f32<OutT>(v);
    }
  }
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
  if (in_dt == kBF16 && out_dt == kBF16) return sm90_dispatch<__nv_bfloat16, __nv_bfloat16>(a, stream);
  if (in_dt == kF16 && out_dt == kF16) return sm90_dispatch<__half, __half>(a, stream);
  if (in_dt == kBF16 && out_dt == kF32) return sm90_dispatch<__nv_bfloat16, float>(a, stream);
  return cudaErrorInvalidValue;
}

}  // namespace sf

// Unstructured sparsity (SFCSR, see include/sf_layout.h): Sputnik-style SpMM and SDDMM on CUDA cores.
//
// Both work on "transposed" dense operands (rows of length M, the batch/pixel dim, contiguous and padded
// to ldm % 8 == 0) so every lane issues 16-byte vector loads along M.  One warp owns one sparse row
// (taken in row_order: rows sorted by decreasing nnz, so warps of a block get similar work).  The 32
// lanes are split into LG = 32/LC groups of LC lanes: the LC lanes of a group cover LC*V consecutive
// columns of M, the groups take different nonzeros and are reduced with shuffles -- for small M (the
// memory-bound regime) most lanes work on different nonzeros instead of idling.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "sf_kernels.h"
#include "sf_layout.h"
#include "sf_ptx.cuh"

namespace sf {
namespace {

constexpr int kWarps = 4;

// Compile-time evidence (format: sparsefast/kernel_report/__init__.py): both kernels stream 16-byte vectors
// (uint4 loads along M) and are on the per-step path of unstructured layers (no spills allowed). The SpMM
// stores 16-byte vectors too; the SDDMM scatters one value per kept entry to its own column (no two
// adjacent in general), so its 16-bit stores stay scalar.
// kernel-report: csr_spmm_kernel< vector_loads hot packed_stores
// kernel-report: csr_sddmm_kernel< vector_loads hot

template <typename T>
struct Vec {
  static constexpr int N = 16 / sizeof(T);
  __device__ __forceinline__ static void load(const T* p, float (&o)[N]) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const T* t = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int i = 0; i < N; ++i) o[i] = to_f32<T>(t[i]);
  }
  __device__ __forceinline__ static void store(T* p, const float (&v)[N]) {
    uint4 u;
    T* t = reinterpret_cast<T*>(&u);
#pragma unroll
    for (int i = 0; i < N; ++i) t[i] = from_f32<T>(v[i]);
    *reinterpret_cast<uint4*>(p) = u;
  }
};

template <typename T, int LC>
__global__ void __launch_bounds__(kWarps * 32)
    csr_spmm_kernel(const int32_t* __restrict__ row_ptr, const uint16_t* __restrict__ col,
                    const T* __restrict__ vals, const int32_t* __restrict__ row_order, int64_t R, int C,
                    const T* __restrict__ xT, int64_t M, int64_t ldm, const T* __restrict__ bias,
                    T* __restrict__ yT) {
  constexpr int V = Vec<T>::N, LG = 32 / LC;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t slot = (int64_t)blockIdx.x * kWarps + warp;
  if (slot >= R) return;
  const int64_t row = row_order[slot];
  const int lc = lane % LC, lg = lane / LC;
  const int64_t m = (int64_t)blockIdx.y * (LC * V) + lc * V;
  const bool active = m < M;
  float acc[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = 0.f;
  const int32_t start = row_ptr[row], end = row_ptr[row + 1];
#pragma unroll 4
  for (int32_t j = start + lg; j < end; j += LG) {
    const int c = csr_clamp_col(col[j], C);
    const float v = to_f32<T>(vals[j]);
    if (active) {
      float xv[V];
      Vec<T>::load(xT + (int64_t)c * ldm + m, xv);
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] = fmaf(v, xv[i], acc[i]);
    }
  }
#pragma unroll
  for (int off = LC; off < 32; off <<= 1)
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], off);
  if (lg == 0 && active) {
    const float b = bias != nullptr ? to_f32<T>(bias[row]) : 0.f;
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] += b;
    Vec<T>::store(yT + row * ldm + m, acc);
  }
}

template <typename T, int LC>
__global__ void __launch_bounds__(kWarps * 32)
    csr_sddmm_kernel(const int32_t* __restrict__ row_ptr, const uint16_t* __restrict__ col,
                     const int32_t* __restrict__ row_order, int64_t R, int C, const T* __restrict__ aT,
                     const T* __restrict__ bT, int64_t M, int64_t ldm, T* __restrict__ out) {
  constexpr int V = Vec<T>::N, LG = 32 / LC;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t slot = (int64_t)blockIdx.x * kWarps + warp;
  if (slot >= R) return;
  const int64_t row = row_order[slot];
  const int lc = lane % LC, lg = lane / LC;
  const int32_t start = row_ptr[row], end = row_ptr[row + 1];
  const T* arow = aT + row * ldm;
  // every group walks the same number of iterations so the shuffles below see full warps
  const int32_t iters = (end - start + LG - 1) / LG;
  for (int32_t it = 0; it < iters; ++it) {
    const int32_t j = start + it * LG + lg;
    const bool valid = j < end;
    const int c = valid ? csr_clamp_col(col[j], C) : 0;
    float s = 0.f;
    if (valid) {
      const T* brow = bT + (int64_t)c * ldm;
      for (int64_t m = (int64_t)lc * V; m < M; m += LC * V) {
        float av[V], bv[V];
        Vec<T>::load(arow + m, av);
        Vec<T>::load(brow + m, bv);
#pragma unroll
        for (int i = 0; i < V; ++i) s = fmaf(av[i], bv[i], s);
      }
    }
#pragma unroll
    for (int off = 1; off < LC; off <<= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (valid && lc == 0) out[row * (int64_t)C + c] = from_f32<T>(s);
  }
}

// lanes per group: the fewest that cover M with V-wide vectors, at most 32
template <typename T>
int pick_lc(int64_t M) {
  const int64_t need = ceil_div(M, Vec<T>::N);
  int lc = 1;
  while (lc < 32 && lc < need) lc <<= 1;
  return lc;
}

template <typename T>
cudaError_t spmm_t(const int32_t* row_ptr, const uint16_t* col, const void* vals, const int32_t* row_order,
                   int64_t R, int64_t C, const void* xT, int64_t M, int64_t ldm, const void* bias, void* yT,
                   cudaStream_t s) {
  const int lc = pick_lc<T>(M);
  dim3 grid((unsigned)ceil_div(R, kWarps), (unsigned)ceil_div(M, (int64_t)lc * Vec<T>::N));
  const T* v = static_cast<const T*>(vals);
  const T* x = static_cast<const T*>(xT);
  const T* b = static_cast<const T*>(bias);
  T* y = static_cast<T*>(yT);
#define SF_SPMM(LCV) \
  csr_spmm_kernel<T, LCV><<<grid, kWarps * 32, 0, s>>>(row_ptr, col, v, row_order, R, (int)C, x, M, ldm, b, y)
  switch (lc) {
    case 1: SF_SPMM(1); break;
    case 2: SF_SPMM(2); break;
    case 4: SF_SPMM(4); break;
    case 8: SF_SPMM(8); break;
    case 16: SF_SPMM(16); break;
    default: SF_SPMM(32); break;
  }
#undef SF_SPMM
  return cudaGetLastError();
}

template <typename T>
cudaError_t sddmm_t(const int32_t* row_ptr, const uint16_t* col, const int32_t* row_order, int64_t R, int64_t C,
                    const void* aT, const void* bT, int64_t M, int64_t ldm, void* out, cudaStream_t s) {
  const int lc = pick_lc<T>(M);
  dim3 grid((unsigned)ceil_div(R, kWarps));
  const T* a = static_cast<const T*>(aT);
  const T* b = static_cast<const T*>(bT);
  T* o = static_cast<T*>(out);
#define SF_SDDMM(LCV) \
  csr_sddmm_kernel<T, LCV><<<grid, kWarps * 32, 0, s>>>(row_ptr, col, row_order, R, (int)C, a, b, M, ldm, o)
  switch (lc) {
    case 1: SF_SDDMM(1); break;
    case 2: SF_SDDMM(2); break;
    case 4: SF_SDDMM(4); break;
    case 8: SF_SDDMM(8); break;
    case 16: SF_SDDMM(16); break;
    default: SF_SDDMM(32); break;
  }
#undef SF_SDDMM
  return cudaGetLastError();
}

}  // namespace

cudaError_t csr_spmm(DType dt, const int32_t* row_ptr, const uint16_t* col, const void* vals,
                     const int32_t* row_order, int64_t R, int64_t C, const void* xT, int64_t M, int64_t ldm,
                     const void* bias, void* yT, cudaStream_t stream) {
  if (R == 0 || M == 0) return cudaSuccess;
  switch (dt) {
    case kBF16: return spmm_t<__nv_bfloat16>(row_ptr, col, vals, row_order, R, C, xT, M, ldm, bias, yT, stream);
    case kF16: return spmm_t<__half>(row_ptr, col, vals, row_order, R, C, xT, M, ldm, bias, yT, stream);
    case kF32: return spmm_t<float>(row_ptr, col, vals, row_order, R, C, xT, M, ldm, bias, yT, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t csr_sddmm(DType dt, const int32_t* row_ptr, const uint16_t* col, const int32_t* row_order,
                      int64_t R, int64_t C, const void* aT, const void* bT, int64_t M, int64_t ldm, void* out,
                      cudaStream_t stream) {
  if (R == 0) return cudaSuccess;
  switch (dt) {
    case kBF16: return sddmm_t<__nv_bfloat16>(row_ptr, col, row_order, R, C, aT, bT, M, ldm, out, stream);
    case kF16: return sddmm_t<__half>(row_ptr, col, row_order, R, C, aT, bT, M, ldm, out, stream);
    case kF32: return sddmm_t<float>(row_ptr, col, row_order, R, C, aT, bT, M, ldm, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace sf

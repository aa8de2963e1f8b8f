// Launchers exported by the .cu files (no torch headers here: the .cu translation units compile
// against CUDA only, the bindings in sf_bindings.cpp do every tensor check).
// Every launcher returns the cudaError_t of its launch (cudaSuccess == 0).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "sf_layout.h"

namespace sf {

enum DType : int { kF16 = 0, kBF16 = 1, kF32 = 2 };

// ------------------------------------------------------------------------------------------------
// SF24 (2:4) -- see sf_layout.h for the format
// ------------------------------------------------------------------------------------------------
// w, keep: dense R x C row-major (keep: 1 byte per element, nonzero = kept). vals/meta: SF24 buffers
// (Rp x Cp/2 of `dt`, and sf24_meta_words(R, C) words); padding is written too.
cudaError_t sf24_pack(DType dt, const void* w, const uint8_t* keep, int64_t R, int64_t C, void* vals,
                      uint32_t* meta, cudaStream_t stream);
// inverse: dense R x C (zeros at pruned positions)
cudaError_t sf24_unpack(DType dt, const void* vals, const uint32_t* meta, int64_t R, int64_t C, void* w,
                        cudaStream_t stream);

struct Sf24GemmArgs {
  // sparse operand (mma "A"): SF24 of a logical R x Cp matrix (R output features, Cp reduction)
  const void* vals = nullptr;
  const uint32_t* meta = nullptr;
  int64_t R = 0, Rp = 0, Cp = 0;
  // dense operand (mma "B"): linear: x (M x K) rows with leading dim ldx; conv: NHWC input, M = pixels
  const void* x = nullptr;
  int64_t ldx = 0;
  int64_t M = 0, K = 0;
  int is_conv = 0;
  ConvShape conv{};
  // out[p * ldo + f] (= y (M x R) row-major for linear, NHWC y for conv); bias[f] (of the output type) or null
  void* out = nullptr;
  int64_t ldo = 0;
  const void* bias = nullptr;
  int accumulate = 0;  // 1: out += result; 2: atomicAdd(out, result) (k-split partials); fp32 output only
  int num_sms = 132;
  // k-splits (grid z): each block of a split sums a contiguous range of K tiles into an fp32 output it
  // adds to atomically (accumulate = 2, output zeroed first); bias goes in with split 0. mma.sp only.
  int split = 1;
};
// The k-splits sf24_gemm uses for `a` (1: none): mid-size M (> 32 rows) whose tile grid leaves SMs idle
// is split along K (>= 4 K tiles of 64 per split, at most 16 splits) -- the caller then passes an fp32
// output zeroed beforehand, accumulate = 2 and split = this.
int sf24_split_k(const Sf24GemmArgs& a);
// in_dt: bf16/f16 (both operands); out_dt: the same, or f32 (bf16 input: the fp32 hi/lo path; either
// input with split > 1)
cudaError_t sf24_gemm(DType in_dt, DType out_dt, const Sf24GemmArgs& args, cudaStream_t stream);
// Hopper path (sf24_sm90.cu): wgmma.mma_async.sp, same arguments and semantics. Only for compute
// capability 9.0 devices running the sm_90a build (the kernel body is empty in other targets).
cudaError_t sf24_gemm_sm90(DType in_dt, DType out_dt, const Sf24GemmArgs& args, cudaStream_t stream);

// ------------------------------------------------------------------------------------------------
// SFCSR (unstructured)
// ------------------------------------------------------------------------------------------------
// yT[r, m] = sum_j vals[j] * xT[col[j], m] (+ bias[r])  for r in rows, m < M;  xT: (C x ldm) rows,
// yT: (R x ldm) rows; ldm % 8 == 0 and 16-byte aligned buffers.  row_order: R row ids (swizzle).
cudaError_t csr_spmm(DType dt, const int32_t* row_ptr, const uint16_t* col, const void* vals,
                     const int32_t* row_order, int64_t R, int64_t C, const void* xT, int64_t M, int64_t ldm,
                     const void* bias, void* yT, cudaStream_t stream);
// out[r * C + col[j]] = sum_m aT[r, m] * bT[col[j], m] for every stored entry j of row r (the SDDMM
// at the kept positions); other entries of the dense R x C `out` are not touched (zero them first).
// aT: (R x ldm) rows, bT: (C x ldm) rows.
cudaError_t csr_sddmm(DType dt, const int32_t* row_ptr, const uint16_t* col, const int32_t* row_order,
                      int64_t R, int64_t C, const void* aT, const void* bT, int64_t M, int64_t ldm,
                      void* out, cudaStream_t stream);

}  // namespace sf

// Thin inline-PTX wrappers used by the sparsefast kernels (sm_80+).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

namespace sf {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; bytes beyond src_bytes (0 or 16) are zero-filled.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}

template <typename T>
struct MmaSp;

// D(16x8,f32) += A(16x32 2:4, compressed 16x16) * B(32x8); metadata e, sparsity selector 0.
template <>
struct MmaSp<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                             uint32_t e) {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  }
};
template <>
struct MmaSp<__half> {
  __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                             uint32_t e) {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  }
};

template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f32<float>(float v) { return v; }

// the raw 16 bits of a 16-bit float, zero-extended
__device__ __forceinline__ uint32_t bits16(__nv_bfloat16 v) { return (uint32_t)__bfloat16_as_ushort(v); }
__device__ __forceinline__ uint32_t bits16(__half v) { return (uint32_t)__half_as_ushort(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half(v); }
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }

// -------------------------------------------------------------------------------------------------
// GEMM epilogue of one m16n8 accumulator fragment (mma.sp / wgmma: c[i] at row g + 8*(i>>1), col
// 2q + (i&1), g = lane/4, q = lane%4) whose rows are output features f (contiguous in memory:
// out[p * ldo + f]) and whose cols are pixels / batch rows p:  out = c (+ bias[f]) (+ out if
// accumulate, fp32 output only).
// 16-bit outputs go out as packed pairs of adjacent features (one 32-bit __nv_bfloat162 / __half2
// store, st.global.b32, instead of two st.global.b16): lanes L and L^4 (rows g and g^1) swap one value
// per row half, after which the even-g lane holds (f, f+1) of col 2q and the odd-g lane (f-1, f) of col
// 2q+1.  Scalar tail where the pair would straddle R or be misaligned (pair_ok false: odd ldo or a
// base not 4-byte aligned).  Same conversion (round to nearest) and the same additions in the same
// order as the scalar code.  Warp-collective (shuffles): all 32 lanes must call it.
template <typename T>
struct Pack2;
template <>
struct Pack2<__nv_bfloat16> {
  using type = __nv_bfloat162;
  __device__ __forceinline__ static type make(float lo, float hi) { return __floats2bfloat162_rn(lo, hi); }
};
template <>
struct Pack2<__half> {
  using type = __half2;
  __device__ __forceinline__ static type make(float lo, float hi) { return __floats2half2_rn(lo, hi); }
};

template <typename OutT>
__device__ __forceinline__ bool epilogue_pairs_aligned(const OutT* out, int64_t ldo) {
  return sizeof(OutT) == 2 && (reinterpret_cast<uintptr_t>(out) & 3u) == 0 && (ldo & 1) == 0;
}

template <typename OutT>
__device__ __forceinline__ void store_c_frag(OutT* out, const OutT* bias, int64_t ldo, int64_t R, int64_t M,
                                             int accumulate, int64_t f_base, int64_t p_base, int lane, bool pair_ok,
                                             float c0, float c1, float c2, float c3) {
  const int g = lane / 4, q = lane % 4;
  if constexpr (sizeof(OutT) == 2) {
    const bool odd = (g & 1) != 0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float v0 = h ? c2 : c0, v1 = h ? c3 : c1;  // (row g + 8h, col 2q) and (.., 2q + 1)
      const float recv = __shfl_xor_sync(0xffffffffu, odd ? v0 : v1, 4);
      float lo = odd ? recv : v0, hi = odd ? v1 : recv;  // rows (g & ~1) + 8h and +1
      const int64_t f = f_base + (g & ~1) + 8 * h;
      const int64_t p = p_base + 2 * q + (odd ? 1 : 0);
      if (p < M && f < R) {
        OutT* dst = out + p * ldo + f;
        if (pair_ok && f + 1 < R) {
          if (bias != nullptr) {
            lo += to_f32<OutT>(bias[f]);
            hi += to_f32<OutT>(bias[f + 1]);
          }
          *reinterpret_cast<typename Pack2<OutT>::type*>(dst) = Pack2<OutT>::make(lo, hi);
        } else {  // scalar tail
          if (bias != nullptr) lo += to_f32<OutT>(bias[f]);
          dst[0] = from_f32<OutT>(lo);
          if (f + 1 < R) {
            if (bias != nullptr) hi += to_f32<OutT>(bias[f + 1]);
            dst[1] = from_f32<OutT>(hi);
          }
        }
      }
    }
  } else {  // fp32 output: one 4-byte store per element (features of a pixel are in different lanes)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t f = f_base + g + 8 * (i >> 1), p = p_base + 2 * q + (i & 1);
      if (f < R && p < M) {
        float v = i == 0 ? c0 : i == 1 ? c1 : i == 2 ? c2 : c3;
        if (bias != nullptr) v += to_f32<OutT>(bias[f]);
        OutT* dst = out + p * ldo + f;
        if constexpr (std::is_same<OutT, float>::value) {
          if (accumulate == 2) {  // k-split partial: other blocks add to the same element
            atomicAdd(dst, v);
            continue;
          }
        }
        if (accumulate) v += to_f32<OutT>(*dst);
        *dst = from_f32<OutT>(v);
      }
    }
  }
}

}  // namespace sf

// 2:4 sparse-tensor-core kernels: SF24 pack / unpack and the mma.sp GEMM (linear and NHWC implicit-GEMM
// conv).  Format and fragment layouts: include/sf_layout.h.  No torch headers in this file.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "sf_kernels.h"
#include "sf_layout.h"
#include "sf_ptx.cuh"

namespace sf {
namespace {

// =================================================================================================
// pack: re-run once per weight version (every training step): no spills allowed
// kernel-report: sf24_pack_kernel< hot packed_stores
// pack: one thread per metadata word = rows (r0, r0 + 8) x 16 dense columns (8 groups)
// =================================================================================================
// v_i for i in 0..3, 0 for any other i, as masks: "if (i == q) val = v[q]" loops get turned into a
// runtime-indexed v[i], which puts v in local memory.
__device__ __forceinline__ uint32_t pick4(int i, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  return (a & (0u - (uint32_t)(i == 0))) | (b & (0u - (uint32_t)(i == 1))) | (c & (0u - (uint32_t)(i == 2))) |
         (d & (0u - (uint32_t)(i == 3)));
}

template <typename T>
__global__ void sf24_pack_kernel(const T* __restrict__ w, const uint8_t* __restrict__ keep, int64_t R,
                                 int64_t C, int64_t Cp, int64_t nwords, T* __restrict__ vals,
                                 uint32_t* __restrict__ meta) {
  const int64_t word = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (word >= nwords) return;
  const int64_t ksteps = Cp / 32;
  const int j = (int)(word % 16);
  const int64_t s = (word / 16) % ksteps;
  const int64_t t = word / 16 / ksteps;
  const int64_t c0 = s * 32 + (j % 2) * 16;
  // Values move as raw 16-bit patterns in 32-bit registers (+0.0 is 0x0000 in fp16 and bf16): no
  // addressable T arrays, so nothing lands in local memory.
  static_assert(sizeof(T) == 2, "SF24 packs 16-bit values");
  const uint16_t* __restrict__ wb = reinterpret_cast<const uint16_t*>(w);
  uint32_t out = 0;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t r = t * 16 + j / 2 + 8 * half;
    uint32_t words[4];  // stored slots (2g, 2g+1) = low / high half of words[g]
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      uint32_t k4 = 0, v[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t c = c0 + 4 * g + q;
        const bool in = r < R && c < C;
        v[q] = in ? (uint32_t)wb[r * C + c] : 0u;
        k4 |= (in && keep[r * C + c]) ? (1u << q) : 0u;
      }
      int src[2];
      const uint32_t nib = sf24_encode_group(k4, src);
      out |= nib << (16 * half + 4 * g);
      words[g] = pick4(src[0], v[0], v[1], v[2], v[3]) | (pick4(src[1], v[0], v[1], v[2], v[3]) << 16);
    }
    // 8 stored values = 16 bytes, contiguous in vals (r, c0/2 .. c0/2 + 7); Cp/2 % 8 == 0 keeps it aligned
    *reinterpret_cast<uint4*>(vals + r * (Cp / 2) + c0 / 2) = make_uint4(words[0], words[1], words[2], words[3]);
  }
  meta[word] = out;
}

// unpack: one thread per (row, group of 4); 8-byte stores (st.global.v2.b32)
// kernel-report: sf24_unpack_kernel< packed_stores
template <typename T>
__global__ void sf24_unpack_kernel(const T* __restrict__ vals, const uint32_t* __restrict__ meta, int64_t R,
                                   int64_t C, int64_t Cp, T* __restrict__ w) {
  const int64_t id = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t groups = C / 4;
  if (id >= R * groups) return;
  const int64_t r = id / groups, g = id % groups, c = 4 * g;
  const uint32_t nib = (meta[sf24_meta_word(r, c, Cp)] >> sf24_meta_bit(r, c)) & 0xFu;
  T out[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) out[q] = from_f32<T>(0.f);
  // a stored zero in a filler slot must not overwrite a kept value at the same index: add, not assign.
  // (Compare against every q instead of indexing acc[q]: a runtime index would put acc in local memory.)
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  bool hit[4] = {false, false, false, false};
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    const int qs = sf24_nibble_idx(nib, s);
    const float v = to_f32<T>(vals[sf24_val_offset(r, c, s, Cp)]);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (q == qs) {
        acc[q] += v;
        hit[q] = true;
      }
    }
  }
#pragma unroll
  for (int q = 0; q < 4; ++q)
    if (hit[q]) out[q] = from_f32<T>(acc[q]);
  // the 4 columns of the group as one 8-byte store (C % 4 == 0: aligned whenever w is), else scalars
  T* dst = w + r * C + c;
  if ((reinterpret_cast<uintptr_t>(dst) & 7u) == 0) {
    *reinterpret_cast<uint2*>(dst) = make_uint2(bits16(out[0]) | (bits16(out[1]) << 16),
                                                bits16(out[2]) | (bits16(out[3]) << 16));
  } else {
#pragma unroll
    for (int q = 0; q < 4; ++q) dst[q] = out[q];
  }
}

// =================================================================================================
// GEMM: out[p, f] = sum_k A[f, k] * B[k, p] (+ bias[f]),  A = SF24 (R x Cp), B = x rows / conv im2col
// =================================================================================================
// Block tile BM (features) x BN (pixels/rows) x BK (dense reduction); warps WF x WP x WK (WK > 1 splits
// the k-steps of a tile between warps and reduces through shared memory at the end: the small-M config).
template <int BM_, int BN_, int BK_, int WF_, int WP_, int WK_, int STAGES_>
struct Cfg {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, WF = WF_, WP = WP_, WK = WK_, STAGES = STAGES_;
  static constexpr int NT = WF * WP * WK * 32;
  static constexpr int WM = BM / WF, WN = BN / WP, MI = WM / 16, NI = WN / 8, KS = BK / 32;
  static constexpr int A_LD = BK / 2 + 8, B_LD = BK + 8;  // padded rows (16 B): conflict-free ldmatrix
  static constexpr int A_ELEMS = BM * A_LD, B_ELEMS = BN * B_LD, E_WORDS = (BM / 16) * KS * 16;
  static constexpr int STAGE_BYTES = (A_ELEMS + B_ELEMS) * 2 + E_WORDS * 4;
  static constexpr int RED_BYTES = (WK - 1) * BM * BN * 4;
  static constexpr int SMEM = STAGE_BYTES * STAGES > RED_BYTES ? STAGE_BYTES * STAGES : RED_BYTES;
  static_assert(WM % 16 == 0 && WN % 8 == 0 && BK % 32 == 0 && KS % WK == 0, "bad tile config");
};

using CfgBig = Cfg<128, 128, 64, 2, 4, 1, 3>;   // M >= 128-ish: 8 warps, warp tile 64 x 32
using CfgMid = Cfg<64, 64, 64, 2, 2, 1, 4>;     // mid M: 4 warps, warp tile 32 x 32
using CfgSmall = Cfg<16, 32, 256, 1, 1, 4, 4>;  // M <= 32 (memory-bound): 16 features per block, k split

// Compile-time evidence (python -m sparsefast kernels --only cuda; format: sparsefast/kernel_report/__init__.py).
// Every config of the GEMM: sparse tensor cores (HMMA.SP on sm_80 and sm_90), 16-byte cp.async tile
// loads, no spills (per-step path), 16-bit outputs stored as packed pairs (32-bit stores). dyn_smem = Cfg::SMEM (the dynamic shared memory of the launch).
// kernel-report: sf24_gemm_kernel< tensor_core=sparse vector_loads hot packed_stores
// kernel-report: sf24_gemm_kernel<.*Cfg<128,128,64, dyn_smem=89088
// kernel-report: sf24_gemm_kernel<.*Cfg<64,64,64, dyn_smem=59392
// kernel-report: sf24_gemm_kernel<.*Cfg<16,32,256, dyn_smem=87040
static_assert(CfgBig::SMEM == 89088 && CfgMid::SMEM == 59392 && CfgSmall::SMEM == 87040,
              "update the kernel-report dyn_smem lines above");

template <typename T, typename OutT, class C, bool CONV>
__global__ void __launch_bounds__(C::NT, 1) sf24_gemm_kernel(const Sf24GemmArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* sA = reinterpret_cast<T*>(smem);
  T* sB = sA + C::STAGES * C::A_ELEMS;
  uint32_t* sE = reinterpret_cast<uint32_t*>(sB + C::STAGES * C::B_ELEMS);

  const T* __restrict__ vals = static_cast<const T*>(a.vals);
  const uint32_t* __restrict__ meta = a.meta;
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wk = warp % C::WK, wp = (warp / C::WK) % C::WP, wf = warp / (C::WK * C::WP);
  // grid: x = pixel/row tiles (2^31 limit), y = feature tiles
  const int64_t f0 = (int64_t)blockIdx.y * C::BM, p0 = (int64_t)blockIdx.x * C::BN;
  const int64_t Cp = a.Cp, Rp = a.Rp;

  auto load_stage = [&](int stage, int kt) {
    const int64_t k0 = (int64_t)kt * C::BK;
    T* dA = sA + stage * C::A_ELEMS;
    for (int i = tid; i < C::BM * (C::BK / 16); i += C::NT) {
      const int r = i / (C::BK / 16), c = i % (C::BK / 16);
      const int64_t gr = f0 + r, gk = k0 / 2 + c * 8;  // compressed column
      const bool ok = gr < Rp && gk < Cp / 2;
      cp_async16(dA + r * C::A_LD + c * 8, ok ? vals + gr * (Cp / 2) + gk : vals, ok ? 16 : 0);
    }
    uint32_t* dE = sE + stage * C::E_WORDS;
    for (int i = tid; i < (C::BM / 16) * C::KS * 4; i += C::NT) {
      const int t = i / (C::KS * 4), c = i % (C::KS * 4);
      const int64_t gt = f0 / 16 + t, gs = k0 / 32 + c / 4;
      const bool ok = gt < Rp / 16 && gs < Cp / 32;
      cp_async16(dE + t * C::KS * 16 + c * 4, ok ? meta + (gt * (Cp / 32) + gs) * 16 + (c % 4) * 4 : meta,
                 ok ? 16 : 0);
    }
    T* dB = sB + stage * C::B_ELEMS;
    for (int i = tid; i < C::BN * (C::BK / 8); i += C::NT) {
      const int r = i / (C::BK / 8), c = i % (C::BK / 8);
      const int64_t p = p0 + r, k = k0 + c * 8;
      const T* src = x;
      int bytes = 0;
      if (p < a.M && k < a.K) {
        if constexpr (!CONV) {
          src = x + p * a.ldx + k;
          bytes = 16;
        } else {
          const int64_t off = conv_input_offset(a.conv, k, p);  // 8 channels never straddle a tap (C % 8 == 0)
          if (off >= 0) {
            src = x + off;
            bytes = 16;
          }
        }
      }
      cp_async16(dB + r * C::B_LD + c * 8, src, bytes);
    }
  };

  float acc[C::MI][C::NI][4];
#pragma unroll
  for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < C::NI; ++ni)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.f;

  // K tiles [kt0, kt1) of this block's split (grid z; one split: all of them)
  const int KT = (int)((Cp + C::BK - 1) / C::BK);
  const int kt0 = (int)((int64_t)KT * blockIdx.z / gridDim.z), kt1 = (int)((int64_t)KT * (blockIdx.z + 1) / gridDim.z);
#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (kt0 + s < kt1) load_stage(s, kt0 + s);
    cp_async_commit();
  }
  for (int kt = kt0; kt < kt1; ++kt) {
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();
    const int nk = kt + C::STAGES - 1;
    if (nk < kt1) load_stage((nk - kt0) % C::STAGES, nk);
    cp_async_commit();

    const int stage = (kt - kt0) % C::STAGES;
    const T* tA = sA + stage * C::A_ELEMS;
    const T* tB = sB + stage * C::B_ELEMS;
    const uint32_t* tE = sE + stage * C::E_WORDS;
#pragma unroll
    for (int ks = wk; ks < C::KS; ks += C::WK) {
      if ((int64_t)kt * C::BK + ks * 32 >= Cp) break;  // partial last tile (warp-uniform)
      uint32_t af[C::MI][4], e[C::MI];
#pragma unroll
      for (int mi = 0; mi < C::MI; ++mi) {
        const int trow = wf * C::WM + mi * 16;
        ldmatrix_x4(af[mi], tA + (trow + (lane % 16)) * C::A_LD + ks * 16 + (lane / 16) * 8);
        e[mi] = tE[(trow / 16) * C::KS * 16 + ks * 16 + 2 * (lane / 4) + (lane % 2)];
      }
#pragma unroll
      for (int ni = 0; ni < C::NI; ++ni) {
        uint32_t bf[4];
        ldmatrix_x4(bf, tB + (wp * C::WN + ni * 8 + (lane % 8)) * C::B_LD + ks * 32 + (lane / 8) * 8);
#pragma unroll
        for (int mi = 0; mi < C::MI; ++mi)
          if (f0 + wf * C::WM + mi * 16 < Rp) MmaSp<T>::run(acc[mi][ni], af[mi], bf, e[mi]);
      }
    }
  }
  cp_async_wait<0>();

  if constexpr (C::WK > 1) {  // reduce the k-split warps through shared memory
    __syncthreads();
    float* red = reinterpret_cast<float*>(smem);
    constexpr int FRAG = C::MI * C::NI * 4 * 32;
    const int tile = wf * C::WP + wp;
    if (wk > 0) {
#pragma unroll
      for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < C::NI; ++ni)
#pragma unroll
          for (int i = 0; i < 4; ++i)
            red[((wk - 1) * C::WF * C::WP + tile) * FRAG + ((mi * C::NI + ni) * 4 + i) * 32 + lane] = acc[mi][ni][i];
    }
    __syncthreads();
    if (wk > 0) return;
#pragma unroll
    for (int w = 1; w < C::WK; ++w)
#pragma unroll
      for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < C::NI; ++ni)
#pragma unroll
          for (int i = 0; i < 4; ++i)
            acc[mi][ni][i] += red[((w - 1) * C::WF * C::WP + tile) * FRAG + ((mi * C::NI + ni) * 4 + i) * 32 + lane];
  }

  OutT* out = static_cast<OutT*>(a.out);
  const OutT* bias = blockIdx.z == 0 ? static_cast<const OutT*>(a.bias) : nullptr;  // once per element
  const bool pair_ok = epilogue_pairs_aligned(out, a.ldo);  // 16-bit out: packed pairs (sf_ptx.cuh)
#pragma unroll
  for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < C::NI; ++ni)
      store_c_frag<OutT>(out, bias, a.ldo, a.R, a.M, a.accumulate, f0 + wf * C::WM + mi * 16,
                         p0 + wp * C::WN + ni * 8, lane, pair_ok, acc[mi][ni][0], acc[mi][ni][1], acc[mi][ni][2],
                         acc[mi][ni][3]);
}

template <typename T, typename OutT, class C, bool CONV>
cudaError_t launch_cfg(const Sf24GemmArgs& a, cudaStream_t stream) {
  auto kern = sf24_gemm_kernel<T, OutT, C, CONV>;
  // the dynamic shared-memory limit is raised once per instantiation and device (not a stream op, so
  // this is fine during CUDA-graph capture too)
  static bool attr_set[64] = {};
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  if (dev < 0 || dev >= 64 || !attr_set[dev]) {
    e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
    if (e != cudaSuccess) return e;
    if (dev >= 0 && dev < 64) attr_set[dev] = true;
  }
  if (ceil_div(a.R, C::BM) > 65535 || a.split < 1 || a.split > 64) return cudaErrorInvalidConfiguration;
  // k-split partials are added atomically into an fp32 output (see Sf24GemmArgs::split)
  if (a.split > 1 && (!std::is_same<OutT, float>::value || a.accumulate != 2)) return cudaErrorInvalidValue;
  dim3 grid((unsigned)ceil_div(a.M, C::BN), (unsigned)ceil_div(a.R, C::BM), (unsigned)a.split);
  kern<<<grid, C::NT, C::SMEM, stream>>>(a);
  return cudaGetLastError();
}

// output tiles of config C for a's GEMM (the blocks of one K split)
template <class C>
int64_t tile_blocks(const Sf24GemmArgs& a) {
  return ceil_div(a.R, C::BM) * ceil_div(a.M, C::BN);
}

// The tile is picked by the number of blocks it gives: past the small tile's 32 rows, the big tile only
// where it still gives every SM a block, else the mid tile (which sf24_split_k may split along K).
bool big_tile_fills(const Sf24GemmArgs& a) { return a.M > 32 && tile_blocks<CfgBig>(a) >= a.num_sms; }

template <typename T, typename OutT, bool CONV>
cudaError_t gemm_dispatch(const Sf24GemmArgs& a, cudaStream_t stream) {
  if (a.split > 1) return cudaErrorInvalidValue;  // split launches go through split_dispatch (fp32 out)
  if (big_tile_fills(a)) return launch_cfg<T, OutT, CfgBig, CONV>(a, stream);
  if (a.M > 32) return launch_cfg<T, OutT, CfgMid, CONV>(a, stream);
  return launch_cfg<T, OutT, CfgSmall, CONV>(a, stream);
}

template <typename T, typename OutT>
cudaError_t gemm_dispatch2(const Sf24GemmArgs& a, cudaStream_t stream) {
  return a.is_conv ? gemm_dispatch<T, OutT, true>(a, stream) : gemm_dispatch<T, OutT, false>(a, stream);
}

// k-split launches: the mid tile, fp32 partials added atomically (the only tile sf24_split_k splits)
template <typename T>
cudaError_t split_dispatch(const Sf24GemmArgs& a, cudaStream_t stream) {
  return a.is_conv ? launch_cfg<T, float, CfgMid, true>(a, stream) : launch_cfg<T, float, CfgMid, false>(a, stream);
}

}  // namespace

cudaError_t sf24_pack(DType dt, const void* w, const uint8_t* keep, int64_t R, int64_t C, void* vals,
                      uint32_t* meta, cudaStream_t stream) {
  const int64_t Cp = sf24_cols_padded(C), nwords = sf24_meta_words(R, C);
  const int threads = 256;
  const unsigned blocks = (unsigned)ceil_div(nwords, threads);
  if (nwords == 0) return cudaSuccess;
  if (dt == kBF16)
    sf24_pack_kernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(w), keep, R, C, Cp, nwords, static_cast<__nv_bfloat16*>(vals), meta);
  else if (dt == kF16)
    sf24_pack_kernel<__half><<<blocks, threads, 0, stream>>>(static_cast<const __half*>(w), keep, R, C, Cp, nwords,
                                                             static_cast<__half*>(vals), meta);
  else
    return cudaErrorInvalidValue;
  return cudaGetLastError();
}

cudaError_t sf24_unpack(DType dt, const void* vals, const uint32_t* meta, int64_t R, int64_t C, void* w,
                        cudaStream_t stream) {
  const int64_t Cp = sf24_cols_padded(C), n = R * (C / 4);
  if (n == 0) return cudaSuccess;
  const int threads = 256;
  const unsigned blocks = (unsigned)ceil_div(n, threads);
  if (dt == kBF16)
    sf24_unpack_kernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(vals), meta, R, C, Cp, static_cast<__nv_bfloat16*>(w));
  else if (dt == kF16)
    sf24_unpack_kernel<__half><<<blocks, threads, 0, stream>>>(static_cast<const __half*>(vals), meta, R, C, Cp,
                                                               static_cast<__half*>(w));
  else
    return cudaErrorInvalidValue;
  return cudaGetLastError();
}

int sf24_split_k(const Sf24GemmArgs& a) {
  if (a.M <= 32 || a.num_sms <= 0) return 1;  // the small tile already splits K inside its blocks
  const int64_t mid_blocks = tile_blocks<CfgMid>(a);
  if (big_tile_fills(a) || mid_blocks >= a.num_sms) return 1;  // (the big tile is never split)
  const int64_t k_tiles = ceil_div(a.Cp, CfgMid::BK);
  const int64_t s = std::min<int64_t>({ceil_div(a.num_sms, mid_blocks), k_tiles / 4, 16});
  return s >= 2 ? (int)s : 1;
}

cudaError_t sf24_gemm(DType in_dt, DType out_dt, const Sf24GemmArgs& a, cudaStream_t stream) {
  if (a.R == 0 || a.M == 0) return cudaSuccess;
  if (a.split > 1) {
    if (out_dt != kF32) return cudaErrorInvalidValue;
    if (in_dt == kBF16) return split_dispatch<__nv_bfloat16>(a, stream);
    if (in_dt == kF16) return split_dispatch<__half>(a, stream);
    return cudaErrorInvalidValue;
  }
  if (in_dt == kBF16 && out_dt == kBF16) return gemm_dispatch2<__nv_bfloat16, __nv_bfloat16>(a, stream);
  if (in_dt == kF16 && out_dt == kF16) return gemm_dispatch2<__half, __half>(a, stream);
  if (in_dt == kBF16 && out_dt == kF32) return gemm_dispatch2<__nv_bfloat16, float>(a, stream);
  return cudaErrorInvalidValue;
}

}  // namespace sf

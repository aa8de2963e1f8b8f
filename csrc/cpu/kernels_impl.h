// sparsefast CPU kernels, written once and compiled once per ISA level by kernels.cpp:
//   #define SF_ISA 0|1|2  (generic x86-64 / AVX2+FMA / AVX-512), inside `namespace sf_<isa> { }`
//   and under the matching `#pragma GCC target`.
// No include guard on purpose. Rules that keep the ISA copies apart (one-definition rule):
// nothing from the C++ standard library is used in here (no std:: templates get instantiated
// under an AVX-512 target and then shared with the generic copy), every helper is static or
// always_inline, and all names live in the per-ISA namespace.
//
// Kernels are written on v16f, 16 fp32 lanes: one zmm with AVX-512, a struct of two ymm with AVX2,
// of four xmm with SSE2, so the same source is the AVX-512, AVX2 and portable kernel; accumulator
// counts (Acc, kSddmmVec) are per ISA so that they fit its register file (32 zmm / 16 ymm / 16 xmm). Accumulation is
// always fp32; bf16 is widened on load (<< 16) and rounded to nearest even on store.

#define SF_INLINE inline __attribute__((always_inline))
#define SF_LAMBDA_INLINE __attribute__((always_inline))
#define SF_UNROLL _Pragma("GCC unroll 16")

// A v16f is 16 fp32 lanes. With AVX-512 it is GCC's 64-byte vector type (one zmm). Below AVX-512
// it is a struct of native-width parts (two ymm / four xmm): GCC lowers a 64-byte vector type on a
// narrower ISA through the stack (seen with AVX2: every FMA accumulator stored, reloaded and
// re-assembled with vpinsrq -- slower than the SSE2 build), whereas a struct of native vectors is
// scalarised into registers once the loops are unrolled.
#if SF_ISA == 2
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));
SF_INLINE float vget(const v16f& v, int i) { return v[i]; }
SF_INLINE v16f splat(float x) { return (v16f){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
#else
#undef SF_NB
#if SF_ISA == 1
#define SF_NB 32  // bytes of a native part (ymm)
#else
#define SF_NB 16  // xmm (SSE2 on x86-64; NEON-sized elsewhere)
#endif
static constexpr int kVP = 64 / SF_NB;  // parts per v16f
static constexpr int kVL = SF_NB / 4;   // fp32 lanes per part
typedef float vpf __attribute__((vector_size(SF_NB)));
typedef int32_t vpi __attribute__((vector_size(SF_NB)));
typedef uint32_t vpu __attribute__((vector_size(SF_NB)));
typedef uint16_t vph __attribute__((vector_size(SF_NB / 2)));
struct v16f {
  vpf p[kVP];
};
SF_INLINE v16f operator+(v16f a, const v16f& b) {
  SF_UNROLL for (int i = 0; i < kVP; ++i) a.p[i] += b.p[i];
  return a;
}
SF_INLINE v16f operator-(v16f a, const v16f& b) {
  SF_UNROLL for (int i = 0; i < kVP; ++i) a.p[i] -= b.p[i];
  return a;
}
SF_INLINE v16f operator*(v16f a, const v16f& b) {
  SF_UNROLL for (int i = 0; i < kVP; ++i) a.p[i] *= b.p[i];
  return a;
}
SF_INLINE v16f& operator+=(v16f& a, const v16f& b) {
  SF_UNROLL for (int i = 0; i < kVP; ++i) a.p[i] += b.p[i];
  return a;
}
SF_INLINE float vget(const v16f& v, int i) { return v.p[i / kVL][i % kVL]; }
SF_INLINE v16f splat(float x) {
  v16f r;
  SF_UNROLL for (int i = 0; i < kVP; ++i) r.p[i] = x - (vpf){};  // x - (+0) == x, folds to a broadcast
  return r;
}
#endif

// ---------------------------------------------------------------------------------------------
// element access
// ---------------------------------------------------------------------------------------------
SF_INLINE float ld1(const float* p) { return *p; }
SF_INLINE float ld1(const bf16_t* p) {
  uint32_t u = (uint32_t)p->bits << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
SF_INLINE void st1(float* p, float v) { *p = v; }
SF_INLINE void st1(bf16_t* p, float v) {
  uint32_t u;
  __builtin_memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    p->bits = (uint16_t)((u >> 16) | 0x40u);  // quiet NaN
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  p->bits = (uint16_t)(u >> 16);
}

#if SF_ISA == 2
SF_INLINE v16f vload(const float* p) {
  v16f v;
  __builtin_memcpy(&v, p, 64);
  return v;
}
SF_INLINE v16f vload(const bf16_t* p) {
  __m256i h;
  __builtin_memcpy(&h, p, 32);
  return (v16f)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
}
SF_INLINE void vstore(float* p, v16f v) { __builtin_memcpy(p, &v, 64); }
SF_INLINE void vstore(bf16_t* p, v16f v) {
  v16u u = (v16u)v;
  v16u r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  r = (v != v) ? ((u >> 16) | 0x40u) : r;
  v16h h = __builtin_convertvector(r, v16h);
  __builtin_memcpy(p, &h, 32);
}
SF_INLINE float hsum(v16f v) {
  float s = 0.f;
  SF_UNROLL for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}
#else
SF_INLINE v16f vload(const float* p) {
  v16f v;
  SF_UNROLL for (int i = 0; i < kVP; ++i) __builtin_memcpy(&v.p[i], p + i * kVL, SF_NB);
  return v;
}
SF_INLINE v16f vload(const bf16_t* p) {
  v16f r;
#if SF_ISA == 1
  __m128i h0, h1;
  __builtin_memcpy(&h0, p, 16);
  __builtin_memcpy(&h1, p + 8, 16);
  r.p[0] = (vpf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(h0), 16);
  r.p[1] = (vpf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(h1), 16);
#else
  SF_UNROLL for (int i = 0; i < kVP; ++i) {
    vph h;
    __builtin_memcpy(&h, p + i * kVL, SF_NB / 2);
    r.p[i] = (vpf)(__builtin_convertvector(h, vpu) << 16);
  }
#endif
  return r;
}
SF_INLINE void vstore(float* p, v16f v) {
  SF_UNROLL for (int i = 0; i < kVP; ++i) __builtin_memcpy(p + i * kVL, &v.p[i], SF_NB);
}
SF_INLINE void vstore(bf16_t* p, v16f v) {
  SF_UNROLL for (int i = 0; i < kVP; ++i) {
    const vpu u = (vpu)v.p[i];
    vpu r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    r = (v.p[i] != v.p[i]) ? ((u >> 16) | 0x40u) : r;
    const vph h = __builtin_convertvector(r, vph);
    __builtin_memcpy(p + i * kVL, &h, SF_NB / 2);
  }
}
SF_INLINE float hsum(v16f v) {
  vpf a = v.p[0];
  SF_UNROLL for (int i = 1; i < kVP; ++i) a += v.p[i];
  float s = 0.f;
  SF_UNROLL for (int i = 0; i < kVL; ++i) s += a[i];
  return s;
}
#endif

// x[idx[0..15]] as a vector (vgatherdps with AVX2/AVX-512; GCC's generic tuning will not emit
// gathers by itself).
SF_INLINE v16f gather16(const float* x, const int32_t* idx) {
#if SF_ISA == 2
  __m512i i;
  __builtin_memcpy(&i, idx, 64);
  return (v16f)_mm512_i32gather_ps(i, x, 4);
#elif SF_ISA == 1
  __m256i i0, i1;
  __builtin_memcpy(&i0, idx, 32);
  __builtin_memcpy(&i1, idx + 8, 32);
  v16f r;
  r.p[0] = (vpf)_mm256_i32gather_ps(x, i0, 4);
  r.p[1] = (vpf)_mm256_i32gather_ps(x, i1, 4);
  return r;
#else
  float t[16];
  SF_UNROLL for (int i = 0; i < 16; ++i) t[i] = x[idx[i]];
  return vload(t);
#endif
}
SF_INLINE v16f gather16(const float* x, const uint16_t* idx) {
#if SF_ISA == 2
  __m256i h;
  __builtin_memcpy(&h, idx, 32);
  return (v16f)_mm512_i32gather_ps(_mm512_cvtepu16_epi32(h), x, 4);
#elif SF_ISA == 1
  __m128i h0, h1;
  __builtin_memcpy(&h0, idx, 16);
  __builtin_memcpy(&h1, idx + 8, 16);
  v16f r;
  r.p[0] = (vpf)_mm256_i32gather_ps(x, _mm256_cvtepu16_epi32(h0), 4);
  r.p[1] = (vpf)_mm256_i32gather_ps(x, _mm256_cvtepu16_epi32(h1), 4);
  return r;
#else
  float t[16];
  SF_UNROLL for (int i = 0; i < 16; ++i) t[i] = x[idx[i]];
  return vload(t);
#endif
}

// Horizontal sums of 8 vectors at once (a transpose-and-add tree: 3 levels of two shuffles and
// one add, ~3 instructions per result instead of ~8 for separate horizontal sums).
#if SF_ISA == 2
SF_INLINE void reduce8(const v16f* p, float* out) {
  const v16i lo1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const v16i hi1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  // t_i = [8 partial sums of p_{2i} | 8 of p_{2i+1}]
  v16f t0 = __builtin_shuffle(p[0], p[1], lo1) + __builtin_shuffle(p[0], p[1], hi1);
  v16f t1 = __builtin_shuffle(p[2], p[3], lo1) + __builtin_shuffle(p[2], p[3], hi1);
  v16f t2 = __builtin_shuffle(p[4], p[5], lo1) + __builtin_shuffle(p[4], p[5], hi1);
  v16f t3 = __builtin_shuffle(p[6], p[7], lo1) + __builtin_shuffle(p[6], p[7], hi1);
  const v16i lo2 = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};
  const v16i hi2 = {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31};
  // u0 = [4 of p0 | 4 of p2 | 4 of p1 | 4 of p3], u1 likewise for p4..p7
  v16f u0 = __builtin_shuffle(t0, t1, lo2) + __builtin_shuffle(t0, t1, hi2);
  v16f u1 = __builtin_shuffle(t2, t3, lo2) + __builtin_shuffle(t2, t3, hi2);
  const v16i lo3 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
  const v16i hi3 = {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31};
  // v = pairs of partial sums in the order p0 p4 p2 p6 p1 p5 p3 p7
  v16f v = __builtin_shuffle(u0, u1, lo3) + __builtin_shuffle(u0, u1, hi3);
  out[0] = v[0] + v[1];
  out[4] = v[2] + v[3];
  out[2] = v[4] + v[5];
  out[6] = v[6] + v[7];
  out[1] = v[8] + v[9];
  out[5] = v[10] + v[11];
  out[3] = v[12] + v[13];
  out[7] = v[14] + v[15];
}
#elif SF_NB == 32
SF_INLINE void reduce8_parts(const vpf* q, float* out) {  // the same tree on 8-lane parts
  const vpi lo1 = {0, 1, 2, 3, 8, 9, 10, 11}, hi1 = {4, 5, 6, 7, 12, 13, 14, 15};
  const vpf t0 = __builtin_shuffle(q[0], q[1], lo1) + __builtin_shuffle(q[0], q[1], hi1);
  const vpf t1 = __builtin_shuffle(q[2], q[3], lo1) + __builtin_shuffle(q[2], q[3], hi1);
  const vpf t2 = __builtin_shuffle(q[4], q[5], lo1) + __builtin_shuffle(q[4], q[5], hi1);
  const vpf t3 = __builtin_shuffle(q[6], q[7], lo1) + __builtin_shuffle(q[6], q[7], hi1);
  const vpi lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
  // u0 = [2 of q0 | 2 of q2 | 2 of q1 | 2 of q3], u1 likewise for q4..q7
  const vpf u0 = __builtin_shuffle(t0, t1, lo2) + __builtin_shuffle(t0, t1, hi2);
  const vpf u1 = __builtin_shuffle(t2, t3, lo2) + __builtin_shuffle(t2, t3, hi2);
  const vpi lo3 = {0, 8, 2, 10, 4, 12, 6, 14}, hi3 = {1, 9, 3, 11, 5, 13, 7, 15};
  // v = q0 q4 q2 q6 q1 q5 q3 q7
  const vpf v = __builtin_shuffle(u0, u1, lo3) + __builtin_shuffle(u0, u1, hi3);
  out[0] = v[0];
  out[4] = v[1];
  out[2] = v[2];
  out[6] = v[3];
  out[1] = v[4];
  out[5] = v[5];
  out[3] = v[6];
  out[7] = v[7];
}
#else
SF_INLINE void reduce8_parts(const vpf* q, float* out) {  // 4-lane parts: two levels
  const vpi lo1 = {0, 1, 4, 5}, hi1 = {2, 3, 6, 7};
  const vpi lo2 = {0, 2, 4, 6}, hi2 = {1, 3, 5, 7};
  SF_UNROLL for (int h = 0; h < 2; ++h) {
    const vpf t0 = __builtin_shuffle(q[4 * h], q[4 * h + 1], lo1) + __builtin_shuffle(q[4 * h], q[4 * h + 1], hi1);
    const vpf t1 = __builtin_shuffle(q[4 * h + 2], q[4 * h + 3], lo1) + __builtin_shuffle(q[4 * h + 2], q[4 * h + 3], hi1);
    const vpf u = __builtin_shuffle(t0, t1, lo2) + __builtin_shuffle(t0, t1, hi2);
    SF_UNROLL for (int i = 0; i < 4; ++i) out[4 * h + i] = u[i];
  }
}
#endif

SF_INLINE int nm_off(const uint8_t* meta_row, int64_t s) { return (meta_row[s >> 1] >> ((s & 1) << 2)) & 15; }

// ---------------------------------------------------------------------------------------------
// SpMM over one lane panel: Y[r, lanes] = bias[r] + sum_j val_j * X[col_j, lanes]
// X, Y and bias are fp32 (panels are converted once when they are laid out); values are T.
// U vectors (16 lanes each) per row; A independent accumulator sets so that at least ~4 FMA
// chains are in flight (FMA latency 4) when the panel is narrow.
// ---------------------------------------------------------------------------------------------
// accumulator sets for U vectors a row: AVX-512 (32 zmm, one per v16f) up to 4 sets; AVX2 (16 ymm,
// two per v16f) and SSE2 (16 xmm, four per v16f) as many as fit in ~8-10 registers
template <int U>
struct Acc {
#if SF_ISA == 2
  static constexpr int A = U >= 3 ? (U == 3 ? 2 : 1) : (U == 2 ? 2 : 4);
#elif SF_ISA == 1
  static constexpr int A = U >= 3 ? 1 : (U == 2 ? 2 : 4);
#else
  static constexpr int A = U >= 2 ? 1 : 2;
#endif
};

// rows walked together by the N:M and blocked-CSR panel kernels
template <int U>
struct PanelR {  // accumulator registers R*U*(v16f parts) <= ~12 of the 16 (AVX2/SSE2) or ~24 of 32 (AVX-512)
#if SF_ISA == 2
  static constexpr int R = U == 1 ? 8 : (U == 2 ? 6 : (U == 3 ? 4 : 3));
#elif SF_ISA == 1
  static constexpr int R = U == 1 ? 6 : (U == 2 ? 3 : (U == 3 ? 2 : 1));
#else
  static constexpr int R = U == 1 ? 3 : 1;
#endif
};

// rows [r, hi) in groups of R (the register-blocked walk of a panel kernel), then of 2 when R > 2, then
// single rows: f.template operator()<Q>(row) for each group of Q rows
template <int R, typename F>
SF_INLINE void walk_rows(int64_t r, int64_t hi, F&& f) {
  for (; r + R <= hi; r += R) f.template operator()<R>(r);
  if constexpr (R > 2) for (; r + 2 <= hi; r += 2) f.template operator()<2>(r);
  for (; r < hi; ++r) f.template operator()<1>(r);
}

// acc += sum over entries [j, e) of val_j * X[col_j]; entry t of an unrolled group of A goes to
// accumulator set t (independent FMA chains)
template <typename T, int U, int A>
SF_INLINE void csr_segment(v16f (&acc)[A][U], const T* __restrict val, const uint16_t* __restrict ci, int64_t j,
                           int64_t e, const float* __restrict X, int64_t ldx) {
  for (; j + A <= e; j += A) {
    SF_UNROLL for (int s = 0; s < A; ++s) {
      const v16f w = splat(ld1(val + j + s));
      const float* xp = X + (int64_t)ci[j + s] * ldx;
      SF_UNROLL for (int u = 0; u < U; ++u) acc[s][u] += w * vload(xp + 16 * u);
    }
  }
  for (; j < e; ++j) {
    const v16f w = splat(ld1(val + j));
    const float* xp = X + (int64_t)ci[j] * ldx;
    SF_UNROLL for (int u = 0; u < U; ++u) acc[0][u] += w * vload(xp + 16 * u);
  }
}

// R output rows' accumulators at the start of a (column block of a) panel walk: the bias in the first
// block, the partial sums stored by the previous block after it; and their store
template <int R, int U>
SF_INLINE void rows_start(v16f (&acc)[R][U], const PanelArgs& a, int64_t r, bool first) {
  SF_UNROLL for (int q = 0; q < R; ++q) {
    if (first) {
      const float b = a.bias ? a.bias[r + q] : 0.f;
      SF_UNROLL for (int u = 0; u < U; ++u) acc[q][u] = splat(b);
    } else {
      SF_UNROLL for (int u = 0; u < U; ++u) acc[q][u] = vload((const float*)a.y + (r + q) * a.ldy + 16 * u);
    }
  }
}
template <int R, int U>
SF_INLINE void rows_store(const v16f (&acc)[R][U], const PanelArgs& a, int64_t r) {
  SF_UNROLL for (int q = 0; q < R; ++q) SF_UNROLL for (int u = 0; u < U; ++u)
    vstore((float*)a.y + (r + q) * a.ldy + 16 * u, acc[q][u]);
}

template <typename V, int U, bool CB, bool P = false>
static void spmm_blocked_panel_u(const PanelArgs& a);

template <typename T, int U>
static void spmm_csr_panel_u(const PanelArgs& a) {
  constexpr int A = Acc<U>::A;
  const uint16_t* __restrict ci = a.a.col;
  const float* __restrict X = (const float*)a.x;
  float* __restrict Y = (float*)a.y;
  const float* bias = a.bias;
  const int64_t ldx = a.ldx;
  if (a.a.bp == nullptr) {  // plain CSR, values T
    const int32_t* __restrict rp = a.a.rowptr;
    const T* __restrict val = (const T*)a.a.val;
    for (int64_t r = a.r0; r < a.r1; ++r) {
      v16f acc[A][U];
      const float b = bias ? bias[r] : 0.f;
      SF_UNROLL for (int s = 0; s < A; ++s) SF_UNROLL for (int u = 0; u < U; ++u) acc[s][u] = splat(s == 0 ? b : 0.f);
      csr_segment<T, U, A>(acc, val, ci, rp[r], rp[r + 1], X, ldx);
      SF_UNROLL for (int s = 1; s < A; ++s) SF_UNROLL for (int u = 0; u < U; ++u) acc[0][u] += acc[s][u];
      float* yp = Y + r * a.ldy;
      SF_UNROLL for (int u = 0; u < U; ++u) vstore(yp + 16 * u, acc[0][u]);
    }
    return;
  }
  // BCSR (fp32 values) or CSR blocks (T values): block-major walk, Y rows accumulate across blocks
  if (a.a.csr_blocks) {
    spmm_blocked_panel_u<T, U, true>(a);
  } else if (a.a.vperm) {
    spmm_blocked_panel_u<T, U, false, true>(a);
  } else {
    spmm_blocked_panel_u<float, U, false>(a);
  }
}

// R rows of one column block together (R from PanelR): their entries are walked in lockstep up to the
// shortest row's count (R*U independent FMA chains; the per-entry index load and address arithmetic
// of one row overlap the others'), the rest of each row after it. Rows of a block hold similar counts
// (unstructured masks, the transpose of an N:M mask), so most entries run in lockstep.
template <typename V, int U, int R, bool CB, bool P>
SF_INLINE void blocked_rows(const PanelArgs& a, const int32_t* __restrict p, int64_t r, bool first) {
  const int32_t* __restrict vp = a.a.vperm;
  const uint16_t* __restrict ci = a.a.col;
  const float* __restrict X = (const float*)a.x;
  const V* __restrict val = (const V*)a.a.val;
  const int64_t ldx = a.ldx;
  int64_t j[R], e[R];
  int64_t n = 1LL << 62;
  SF_UNROLL for (int q = 0; q < R; ++q) {
    j[q] = p[r + q];
    e[q] = CB ? p[r + q + a.a.bp_ld] : p[r + q + 1];
    n = e[q] - j[q] < n ? e[q] - j[q] : n;
  }
  v16f acc[R][U];
  rows_start<R, U>(acc, a, r, first);
  for (int64_t t = 0; t < n; ++t) {
    SF_UNROLL for (int q = 0; q < R; ++q) {
      const v16f w = splat(ld1(val + (P ? (int64_t)vp[j[q] + t] : j[q] + t)));
      const float* xp = X + (int64_t)ci[j[q] + t] * ldx;
      SF_UNROLL for (int u = 0; u < U; ++u) acc[q][u] += w * vload(xp + 16 * u);
    }
  }
  SF_UNROLL for (int q = 0; q < R; ++q) {
    for (int64_t jj = j[q] + n; jj < e[q]; ++jj) {
      const v16f w = splat(ld1(val + (P ? (int64_t)vp[jj] : jj)));
      const float* xp = X + (int64_t)ci[jj] * ldx;
      SF_UNROLL for (int u = 0; u < U; ++u) acc[q][u] += w * vload(xp + 16 * u);
    }
  }
  rows_store<R, U>(acc, a, r);
}

template <typename V, int U, bool CB, bool P>
static void spmm_blocked_panel_u(const PanelArgs& a) {
  constexpr int R = PanelR<U>::R;
  for (int64_t blk = 0; blk < a.a.nblk; ++blk) {
    const int32_t* __restrict p = a.a.bp + blk * a.a.bp_ld;
    const bool first = blk == 0;
    walk_rows<R>(a.r0, a.r1, [&]<int Q>(int64_t r) SF_LAMBDA_INLINE { blocked_rows<V, U, Q, CB, P>(a, p, r, first); });
  }
}

// Transposed SpMM without a transpose: Y[col_j, lanes] += val_j * X[r, lanes] over the entries of the
// CSR-block matrix A, column blocks [a.r0, a.r1). A block's Y rows (kb x PW fp32) stay in L1 while the
// rows of A stream by; values are read in CSR order, so a kept-values layer's dX needs no permutation.
template <typename T, int U>
static void spmm_t_panel_u(const PanelArgs& a) {
  const uint16_t* __restrict ci = a.a.col;
  const float* __restrict X = (const float*)a.x;
  float* __restrict Y = (float*)a.y;
  const T* __restrict val = (const T*)a.a.val;
  for (int64_t blk = a.r0; blk < a.r1; ++blk) {
    const int32_t* __restrict p = a.a.bp + blk * a.a.bp_ld;
    for (int64_t r = 0; r < a.a.rows; ++r) {
      int64_t j = p[r];
      const int64_t e = p[r + a.a.bp_ld];
      if (j == e) continue;
      v16f x[U];
      SF_UNROLL for (int u = 0; u < U; ++u) x[u] = vload(X + r * a.ldx + 16 * u);
      for (; j + 2 <= e; j += 2) {  // two independent read-modify-writes in flight
        const v16f w0 = splat(ld1(val + j)), w1 = splat(ld1(val + j + 1));
        float* y0 = Y + (int64_t)ci[j] * a.ldy;
        float* y1 = Y + (int64_t)ci[j + 1] * a.ldy;
        SF_UNROLL for (int u = 0; u < U; ++u) vstore(y0 + 16 * u, vload(y0 + 16 * u) + w0 * x[u]);
        SF_UNROLL for (int u = 0; u < U; ++u) vstore(y1 + 16 * u, vload(y1 + 16 * u) + w1 * x[u]);
      }
      if (j < e) {
        const v16f w = splat(ld1(val + j));
        float* yp = Y + (int64_t)ci[j] * a.ldy;
        SF_UNROLL for (int u = 0; u < U; ++u) vstore(yp + 16 * u, vload(yp + 16 * u) + w * x[u]);
      }
    }
  }
}

template <typename T>
static void spmm_t_panel(const PanelArgs& a) {
  switch (a.nvec) {
    case 1: spmm_t_panel_u<T, 1>(a); break;
    case 2: spmm_t_panel_u<T, 2>(a); break;
    case 3: spmm_t_panel_u<T, 3>(a); break;
    default: spmm_t_panel_u<T, 4>(a); break;
  }
}

// N:M: slot s of a row is in group s >> NS (n = 1 << NS slots a group), column = group*m + nibble.
// Two slots share a meta byte. R rows are walked together (PanelR): their R*U accumulators are R*U
// independent FMA chains, and the loop's fixed costs (meta decode, address arithmetic, loop control)
// overlap across rows -- one row at a time kept ~8 chains busy on a serial decode-load-FMA path
// (AVX2, 2:4, 64 lanes: 3 rows together ran ~1.5x faster in an interleaved micro-benchmark).
// With blocking (kb a multiple of lcm(32, 2m)) block [k0, k0+kb) holds slots [k0/m*n, (k0+kb)/m*n).

template <typename T, int U, int NS, int R>
SF_INLINE void nm_rows(const PanelArgs& a, int64_t r, int64_t s_lo, int64_t s_hi, bool first) {
  const float* __restrict X = (const float*)a.x;
  const int64_t ldx = a.ldx, S = a.a.S, m = a.a.m;
  const T* __restrict vr[R];
  const uint8_t* __restrict mr[R];
  SF_UNROLL for (int q = 0; q < R; ++q) {
    vr[q] = (const T*)a.a.val + (r + q) * S;
    mr[q] = a.a.meta + (r + q) * a.a.meta_ld;
  }
  v16f acc[R][U];
  rows_start<R, U>(acc, a, r, first);
  int64_t j = s_lo;  // even
  for (; j + 2 <= s_hi; j += 2) {  // two slots (one meta byte) of each row
    const float* xg0 = X + ((j >> NS) * m) * ldx;
    const float* xg1 = X + (((j + 1) >> NS) * m) * ldx;
    SF_UNROLL for (int q = 0; q < R; ++q) {
      const uint32_t b = mr[q][j >> 1];
      const v16f w0 = splat(ld1(vr[q] + j)), w1 = splat(ld1(vr[q] + j + 1));
      const float* x0 = xg0 + (int64_t)(b & 15) * ldx;
      const float* x1 = xg1 + (int64_t)(b >> 4) * ldx;
      SF_UNROLL for (int u = 0; u < U; ++u) acc[q][u] += w0 * vload(x0 + 16 * u);
      SF_UNROLL for (int u = 0; u < U; ++u) acc[q][u] += w1 * vload(x1 + 16 * u);
    }
  }
  if (j < s_hi) {  // odd slot count (n = 1 and an odd number of groups)
    SF_UNROLL for (int q = 0; q < R; ++q) {
      const v16f w = splat(ld1(vr[q] + j));
      const float* xp = X + ((j >> NS) * m + nm_off(mr[q], j)) * ldx;
      SF_UNROLL for (int u = 0; u < U; ++u) acc[q][u] += w * vload(xp + 16 * u);
    }
  }
  rows_store<R, U>(acc, a, r);
}

template <typename T, int U, int NS>
static void spmm_nm_panel_u(const PanelArgs& a) {
  constexpr int R = PanelR<U>::R;
  const int64_t S = a.a.S, m = a.a.m, cols = a.a.cols;
  const bool blocked = a.kb > 0 && a.kb < cols && a.kb % (2 * m) == 0;
  const int64_t kb = blocked ? a.kb : cols;
  for (int64_t k0 = 0; k0 < cols || k0 == 0; k0 += kb) {
    const int64_t s_lo = blocked ? (k0 / m) << NS : 0;
    const int64_t s_hi = blocked ? ((k0 + kb < cols ? k0 + kb : cols) / m) << NS : S;
    const bool first = k0 == 0;
    walk_rows<R>(a.r0, a.r1, [&]<int Q>(int64_t r) SF_LAMBDA_INLINE { nm_rows<T, U, NS, Q>(a, r, s_lo, s_hi, first); });
    if (!blocked) break;
  }
}

template <typename T, int NS>
static void spmm_nm_panel_ns(const PanelArgs& a) {
  switch (a.nvec) {
    case 1: spmm_nm_panel_u<T, 1, NS>(a); break;
    case 2: spmm_nm_panel_u<T, 2, NS>(a); break;
    case 3: spmm_nm_panel_u<T, 3, NS>(a); break;
    default: spmm_nm_panel_u<T, 4, NS>(a); break;
  }
}

// BSR (SpMat::bs): a GEMM micro-kernel per group of R rows of one block row -- each X row of a kept
// block is loaded once per R output rows (the CSR kernel loads it once per kept weight), so the
// FMAs are not load-bound. R accumulator rows of U vectors, sized so that accumulators, the U X
// vectors and a broadcast fit the register file (32 zmm / 16 ymm, a v16f being two / 16 xmm, four).
template <int U>
struct BsrR {
#if SF_ISA == 2
  static constexpr int R = U == 1 ? 8 : (U == 2 ? 6 : (U == 3 ? 4 : 3));
#elif SF_ISA == 1
  static constexpr int R = U == 1 ? 6 : (U == 2 ? 2 : 1);  // + U*2 ymm of X + 1 broadcast <= 16
#else
  static constexpr int R = U == 1 ? 2 : 1;
#endif
};

template <typename T, int U, int R, int BS, bool TR>
SF_INLINE void bsr_rows(const PanelArgs& a, int64_t br, int64_t r_lo) {
  const SpMat& A = a.a;
  const float* __restrict X = (const float*)a.x;
  const T* __restrict val = (const T*)A.val;
  const int64_t ldx = a.ldx;
  v16f acc[R][U];
  SF_UNROLL for (int rr = 0; rr < R; ++rr) {
    const float b = a.bias ? a.bias[br * BS + r_lo + rr] : 0.f;
    SF_UNROLL for (int u = 0; u < U; ++u) acc[rr][u] = splat(b);
  }
  for (int64_t e = A.bptr[br]; e < A.bptr[br + 1]; ++e) {
    const int64_t ld = A.bld[e];
    const T* __restrict v = val + A.boff[e] + r_lo * (TR ? 1 : ld);
    const float* __restrict xp = X + (int64_t)A.bcol[e] * BS * ldx;
#pragma GCC unroll 4
    for (int c = 0; c < BS; ++c) {
      v16f x[U];
      SF_UNROLL for (int u = 0; u < U; ++u) x[u] = vload(xp + c * ldx + 16 * u);
      SF_UNROLL for (int rr = 0; rr < R; ++rr) {
        const v16f w = splat(ld1(TR ? v + c * ld + rr : v + rr * ld + c));
        SF_UNROLL for (int u = 0; u < U; ++u) acc[rr][u] += w * x[u];
      }
    }
  }
  float* Y = (float*)a.y + (br * BS + r_lo) * a.ldy;
  SF_UNROLL for (int rr = 0; rr < R; ++rr) SF_UNROLL for (int u = 0; u < U; ++u) vstore(Y + rr * a.ldy + 16 * u, acc[rr][u]);
}

template <typename T, int U, int BS, bool TR>
static void spmm_bsr_panel_bs(const PanelArgs& a) {
  constexpr int R = BsrR<U>::R;
  for (int64_t br = a.r0 / BS; br * BS < a.r1; ++br) {  // rows [r0, r1) may cut block rows
    const int64_t lo = a.r0 > br * BS ? a.r0 - br * BS : 0;
    const int64_t hi = a.r1 < (br + 1) * BS ? a.r1 - br * BS : BS;
    walk_rows<R>(lo, hi, [&]<int Q>(int64_t r) SF_LAMBDA_INLINE { bsr_rows<T, U, Q, BS, TR>(a, br, r); });
  }
}

template <typename T, int U>
static void spmm_bsr_panel_u(const PanelArgs& a) {
  const bool tr = a.a.btrans;
  switch (a.a.bs) {
    case 8: tr ? spmm_bsr_panel_bs<T, U, 8, true>(a) : spmm_bsr_panel_bs<T, U, 8, false>(a); break;
    case 16: tr ? spmm_bsr_panel_bs<T, U, 16, true>(a) : spmm_bsr_panel_bs<T, U, 16, false>(a); break;
    default: tr ? spmm_bsr_panel_bs<T, U, 32, true>(a) : spmm_bsr_panel_bs<T, U, 32, false>(a); break;
  }
}

template <typename T>
static void spmm_panel(const PanelArgs& a) {
  if (a.a.bs) {
    switch (a.nvec) {
      case 1: spmm_bsr_panel_u<T, 1>(a); break;
      case 2: spmm_bsr_panel_u<T, 2>(a); break;
      case 3: spmm_bsr_panel_u<T, 3>(a); break;
      default: spmm_bsr_panel_u<T, 4>(a); break;
    }
    return;
  }
  if (a.a.meta) {
    switch (a.a.n) {
      case 1: spmm_nm_panel_ns<T, 0>(a); break;
      case 2: spmm_nm_panel_ns<T, 1>(a); break;
      case 4: spmm_nm_panel_ns<T, 2>(a); break;
      default: spmm_nm_panel_ns<T, 3>(a); break;
    }
    return;
  }
  switch (a.nvec) {
    case 1: spmm_csr_panel_u<T, 1>(a); break;
    case 2: spmm_csr_panel_u<T, 2>(a); break;
    case 3: spmm_csr_panel_u<T, 3>(a); break;
    default: spmm_csr_panel_u<T, 4>(a); break;
  }
}

// ---------------------------------------------------------------------------------------------
// few batch rows: gather-dot per (row, batch row); activations fp32 row-major (L1-resident for
// K <= 8192), values T. Compiles to vgatherdps with AVX2/AVX-512.
// ---------------------------------------------------------------------------------------------
static constexpr int kSmallMax = 16;
static constexpr int kDecode = 256;

// dot(val[0..len), x[idx[0..len)]) with two vector accumulators
template <typename T, typename I>
SF_INLINE float gather_dot(const T* __restrict val, const I* __restrict idx, const float* __restrict x, int64_t len) {
  v16f a0 = splat(0.f), a1 = splat(0.f);
  int64_t j = 0;
  for (; j + 32 <= len; j += 32) {
    a0 += vload(val + j) * gather16(x, idx + j);
    a1 += vload(val + j + 16) * gather16(x, idx + j + 16);
  }
  if (j + 16 <= len) {
    a0 += vload(val + j) * gather16(x, idx + j);
    j += 16;
  }
  float s = hsum(a0 + a1);
  for (; j < len; ++j) s += ld1(val + j) * x[idx[j]];
  return s;
}

template <typename T>
static void spmm_small_csr(const SmallArgs& a) {
  const uint16_t* __restrict ci = a.a.col;
  if (a.a.bp == nullptr) {
    const int32_t* __restrict rp = a.a.rowptr;
    const T* __restrict val = (const T*)a.a.val;
    for (int64_t r = a.r0; r < a.r1; ++r) {
      const int64_t j0 = rp[r], e = rp[r + 1];
      const float b = a.bias ? a.bias[r] : 0.f;
      for (int64_t bi = 0; bi < a.B; ++bi)
        a.y[bi * a.ldy + r] = gather_dot(val + j0, ci + j0, a.x + bi * a.ldx, e - j0) + b;
    }
    return;
  }
  if (a.a.csr_blocks) {  // CSR blocks: T values in CSR order, accumulate over blocks
    const T* __restrict val = (const T*)a.a.val;
    for (int64_t blk = 0; blk < a.a.nblk; ++blk) {
      const int32_t* __restrict p = a.a.bp + blk * a.a.bp_ld;
      for (int64_t r = a.r0; r < a.r1; ++r) {
        const int64_t j0 = p[r], e = p[r + a.a.bp_ld];
        for (int64_t bi = 0; bi < a.B; ++bi) {
          const float d = gather_dot(val + j0, ci + j0, a.x + bi * a.ldx, e - j0);
          float* yp = a.y + bi * a.ldy + r;
          *yp = blk == 0 ? d + (a.bias ? a.bias[r] : 0.f) : *yp + d;
        }
      }
    }
    return;
  }
  const float* __restrict val = (const float*)a.a.val;  // BCSR: fp32 values, accumulate over blocks
  for (int64_t blk = 0; blk < a.a.nblk; ++blk) {
    const int32_t* __restrict p = a.a.bp + blk * a.a.bp_ld;
    for (int64_t r = a.r0; r < a.r1; ++r) {
      const int64_t j0 = p[r], e = p[r + 1];
      for (int64_t bi = 0; bi < a.B; ++bi) {
        const float d = gather_dot(val + j0, ci + j0, a.x + bi * a.ldx, e - j0);
        float* yp = a.y + bi * a.ldy + r;
        *yp = blk == 0 ? d + (a.bias ? a.bias[r] : 0.f) : *yp + d;
      }
    }
  }
}

#if SF_ISA == 2
// AVX-512 N:M dot for m/n = R in {2, 4}: the x values of 16 consecutive slots lie in a window of
// 16*R floats (16/n whole groups), so decode 16 nibbles into lane offsets and pick them with
// vpermt2ps from contiguous loads -- no gathers.
template <typename T, int NS, int R>
SF_INLINE float nm_dot_perm(const T* __restrict vr, const uint8_t* __restrict mr, const float* __restrict x,
                            int64_t S, int64_t m) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i gbase = _mm512_mullo_epi32(_mm512_srli_epi32(lane, NS), _mm512_set1_epi32((int)m));
  const __m512i sh = _mm512_slli_epi32(_mm512_and_si512(lane, _mm512_set1_epi32(1)), 2);
  const __m512i f15 = _mm512_set1_epi32(15), b32 = _mm512_set1_epi32(32);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t s0 = 0;
  for (; s0 + 16 <= S; s0 += 16) {
    const __m128i b8 = _mm_loadl_epi64((const __m128i*)(mr + (s0 >> 1)));
    const __m512i offs = _mm512_and_si512(_mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b8, b8)), sh), f15);
    const __m512i idx = _mm512_add_epi32(gbase, offs);
    const float* xw = x + (s0 >> NS) * m;
    __m512 xv = _mm512_permutex2var_ps(_mm512_loadu_ps(xw), idx, _mm512_loadu_ps(xw + 16));
    if (R == 4) {
      const __m512 hi = _mm512_permutex2var_ps(_mm512_loadu_ps(xw + 32), idx, _mm512_loadu_ps(xw + 48));
      xv = _mm512_mask_blend_ps(_mm512_test_epi32_mask(idx, b32), xv, hi);
    }
    const __m512 w = (__m512)vload(vr + s0);
    if ((s0 >> 4) & 1) acc1 = _mm512_fmadd_ps(w, xv, acc1);
    else acc0 = _mm512_fmadd_ps(w, xv, acc0);
  }
  float r = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  for (; s0 < S; ++s0) r += ld1(vr + s0) * x[(s0 >> NS) * m + nm_off(mr, s0)];
  return r;
}
#endif

#if SF_ISA == 1
SF_INLINE __m256 vload8(const float* p) { return _mm256_loadu_ps(p); }
SF_INLINE __m256 vload8(const bf16_t* p) {
  __m128i h;
  __builtin_memcpy(&h, p, 16);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
// AVX2 N:M dots for m/n = R in {2, 4} and NB <= 4 batch rows at once: 8 consecutive slots lie in a
// window of 8*R floats; their 8 nibbles (one 32-bit meta word) become lane offsets that pick x with
// vpermps from contiguous loads and blends (bit 3, and bit 4 for R = 4, of the offset choose the
// 8-float chunk) -- no gathers. The offsets and weights are decoded once for all NB rows.
template <int NS, int R>
SF_INLINE __m256 nm_pick8(const float* __restrict xw, __m256i idx, __m256 sel3, __m256 sel4) {
  __m256 xv = _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xw), idx),
                               _mm256_permutevar8x32_ps(_mm256_loadu_ps(xw + 8), idx), sel3);
  if (R == 4) {
    const __m256 hi = _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xw + 16), idx),
                                       _mm256_permutevar8x32_ps(_mm256_loadu_ps(xw + 24), idx), sel3);
    xv = _mm256_blendv_ps(xv, hi, sel4);
  }
  return xv;
}
// acc[b] += w[s0..s0+8) * x_b[picked]
template <typename T, int NS, int R, int NB>
SF_INLINE void nm_step8(const T* __restrict vr, const uint8_t* __restrict mr, const float* __restrict x,
                        int64_t ldx, int64_t m, int64_t s0, __m256 (&acc)[NB]) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i gbase = _mm256_mullo_epi32(_mm256_srli_epi32(lane, NS), _mm256_set1_epi32((int)m));
  const __m256i sh = _mm256_slli_epi32(lane, 2);
  uint32_t word;
  __builtin_memcpy(&word, mr + (s0 >> 1), 4);
  const __m256i offs = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)word), sh), _mm256_set1_epi32(15));
  const __m256i idx = _mm256_add_epi32(gbase, offs);  // 0 .. 8R-1 within the window
  const __m256 sel3 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  // bit 3 -> sign bit
  const __m256 sel4 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 27));  // bit 4 (R = 4)
  const __m256 w = vload8(vr + s0);
  const int64_t xo = (s0 >> NS) * m;
  SF_UNROLL for (int b = 0; b < NB; ++b)
    acc[b] = _mm256_fmadd_ps(w, nm_pick8<NS, R>(x + b * ldx + xo, idx, sel3, sel4), acc[b]);
}
template <typename T, int NS, int R, int NB>
SF_INLINE void nm_dot_perm(const T* __restrict vr, const uint8_t* __restrict mr, const float* __restrict x,
                           int64_t ldx, int64_t S, int64_t m, float* __restrict out) {
  __m256 acc[NB], acc2[NB];  // one row: two chains (acc2), else one per row
  SF_UNROLL for (int b = 0; b < NB; ++b) acc[b] = acc2[b] = _mm256_setzero_ps();
  int64_t s0 = 0;
  if (NB == 1) {
    for (; s0 + 16 <= S; s0 += 16) {
      // one row streams values and metadata once: prefetch ~1-2 KiB ahead (the hardware prefetcher
      // alone left a single core at ~10 GB/s here)
      __builtin_prefetch(vr + s0 + 512 / sizeof(T) * 4);
      __builtin_prefetch(mr + (s0 >> 1) + 256);
      nm_step8<T, NS, R, NB>(vr, mr, x, ldx, m, s0, acc);
      nm_step8<T, NS, R, NB>(vr, mr, x, ldx, m, s0 + 8, acc2);
    }
  }
  for (; s0 + 8 <= S; s0 += 8) nm_step8<T, NS, R, NB>(vr, mr, x, ldx, m, s0, acc);
  SF_UNROLL for (int b = 0; b < NB; ++b) {
    const __m256 a = _mm256_add_ps(acc[b], acc2[b]);
    const __m128 q = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    float t[4];
    _mm_storeu_ps(t, q);
    float r = (t[0] + t[1]) + (t[2] + t[3]);
    for (int64_t s = s0; s < S; ++s) r += ld1(vr + s) * x[b * ldx + (s >> NS) * m + nm_off(mr, s)];
    out[b] = r;
  }
}
#endif

template <typename T, int NS>
static void spmm_small_nm_ns(const SmallArgs& a) {
  const int64_t S = a.a.S, m = a.a.m;
#if SF_ISA == 2
  if ((m >> NS) << NS == m && ((m >> NS) == 2 || (m >> NS) == 4)) {
    for (int64_t r = a.r0; r < a.r1; ++r) {
      const T* vr = (const T*)a.a.val + r * S;
      const uint8_t* mr = a.a.meta + r * a.a.meta_ld;
      const float b = a.bias ? a.bias[r] : 0.f;
      for (int64_t bi = 0; bi < a.B; ++bi) {
        const float* xb = a.x + bi * a.ldx;
        a.y[bi * a.ldy + r] = b + ((m >> NS) == 2 ? nm_dot_perm<T, NS, 2>(vr, mr, xb, S, m)
                                                   : nm_dot_perm<T, NS, 4>(vr, mr, xb, S, m));
      }
    }
    return;
  }
#elif SF_ISA == 1
  if ((m >> NS) << NS == m && ((m >> NS) == 2 || (m >> NS) == 4)) {
    const bool r2 = (m >> NS) == 2;
    float o[4];
    for (int64_t r = a.r0; r < a.r1; ++r) {
      const T* vr = (const T*)a.a.val + r * S;
      const uint8_t* mr = a.a.meta + r * a.a.meta_ld;
      const float b = a.bias ? a.bias[r] : 0.f;
      for (int64_t b0 = 0; b0 < a.B; b0 += 4) {
        const float* xb = a.x + b0 * a.ldx;
        const int64_t nb = a.B - b0 < 4 ? a.B - b0 : 4;
        switch (nb * 2 + (r2 ? 0 : 1)) {
          case 2: nm_dot_perm<T, NS, 2, 1>(vr, mr, xb, a.ldx, S, m, o); break;
          case 3: nm_dot_perm<T, NS, 4, 1>(vr, mr, xb, a.ldx, S, m, o); break;
          case 4: nm_dot_perm<T, NS, 2, 2>(vr, mr, xb, a.ldx, S, m, o); break;
          case 5: nm_dot_perm<T, NS, 4, 2>(vr, mr, xb, a.ldx, S, m, o); break;
          case 6: nm_dot_perm<T, NS, 2, 3>(vr, mr, xb, a.ldx, S, m, o); break;
          case 7: nm_dot_perm<T, NS, 4, 3>(vr, mr, xb, a.ldx, S, m, o); break;
          case 8: nm_dot_perm<T, NS, 2, 4>(vr, mr, xb, a.ldx, S, m, o); break;
          default: nm_dot_perm<T, NS, 4, 4>(vr, mr, xb, a.ldx, S, m, o); break;
        }
        for (int64_t t = 0; t < nb; ++t) a.y[(b0 + t) * a.ldy + r] = b + o[t];
      }
    }
    return;
  }
#endif
  int32_t cols[kDecode];
  float acc[kSmallMax];
  for (int64_t r = a.r0; r < a.r1; ++r) {
    const T* __restrict vr = (const T*)a.a.val + r * S;
    const uint8_t* __restrict mr = a.a.meta + r * a.a.meta_ld;
    for (int64_t bi = 0; bi < a.B; ++bi) acc[bi] = 0.f;
    for (int64_t s0 = 0; s0 < S; s0 += kDecode) {
      const int64_t len = S - s0 < kDecode ? S - s0 : kDecode;
      for (int64_t t = 0; t < len; ++t) cols[t] = (int32_t)(((s0 + t) >> NS) * m + nm_off(mr, s0 + t));
      for (int64_t bi = 0; bi < a.B; ++bi) acc[bi] += gather_dot(vr + s0, cols, a.x + bi * a.ldx, len);
    }
    const float b = a.bias ? a.bias[r] : 0.f;
    for (int64_t bi = 0; bi < a.B; ++bi) a.y[bi * a.ldy + r] = acc[bi] + b;
  }
}

template <typename T>
static void spmm_small(const SmallArgs& a) {
  if (a.a.meta) {
    switch (a.a.n) {
      case 1: spmm_small_nm_ns<T, 0>(a); break;
      case 2: spmm_small_nm_ns<T, 1>(a); break;
      case 4: spmm_small_nm_ns<T, 2>(a); break;
      default: spmm_small_nm_ns<T, 3>(a); break;
    }
    return;
  }
  spmm_small_csr<T>(a);
}

// ---------------------------------------------------------------------------------------------
// SDDMM (masked weight gradient) over one lane panel:
//   out[j] (+)= sum_lanes DY[r, lanes] * X[col_j, lanes]   for the CSR entries j of rows [r0, r1)
// DY's row stays in registers; 8 entries are reduced at once with reduce8.
// ---------------------------------------------------------------------------------------------
// out[j] (+)= dot(d, X[col_j]) for entries [j, e); 8 at a time with reduce8
#if SF_ISA == 2
template <int U>
SF_INLINE void sddmm_segment(const v16f (&d)[U], const uint16_t* __restrict ci, int64_t j, int64_t e,
                             const float* __restrict X, int64_t ld, float* __restrict out, bool accum) {
  for (; j + 8 <= e; j += 8) {
    v16f p[8];
    SF_UNROLL for (int t = 0; t < 8; ++t) {
      const float* xp = X + (int64_t)ci[j + t] * ld;
      p[t] = d[0] * vload(xp);
      SF_UNROLL for (int u = 1; u < U; ++u) p[t] += d[u] * vload(xp + 16 * u);
    }
    float res[8];
    reduce8(p, res);
    if (accum) {
      SF_UNROLL for (int t = 0; t < 8; ++t) out[j + t] += res[t];
    } else {
      SF_UNROLL for (int t = 0; t < 8; ++t) out[j + t] = res[t];
    }
  }
  for (; j < e; ++j) {
    const float* xp = X + (int64_t)ci[j] * ld;
    v16f p = d[0] * vload(xp);
    SF_UNROLL for (int u = 1; u < U; ++u) p += d[u] * vload(xp + 16 * u);
    const float s = hsum(p);
    out[j] = accum ? out[j] + s : s;
  }
}
#else
// below AVX-512 the 8 partial dot products are folded to one native part each while they are
// computed (8 registers instead of 8 * kVP)
template <int U>
SF_INLINE vpf dot_part(const v16f (&d)[U], const float* __restrict xp) {
  vpf q = d[0].p[0] * vload(xp).p[0];
  SF_UNROLL for (int u = 0; u < U; ++u) {
    const v16f xv = vload(xp + 16 * u);
    SF_UNROLL for (int i = (u == 0 ? 1 : 0); i < kVP; ++i) q += d[u].p[i] * xv.p[i];
  }
  return q;
}
#if SF_NB == 32
// horizontal sums of 4 8-lane parts (the first two levels of reduce8_parts' tree)
SF_INLINE void reduce4_parts(const vpf* q, float* out) {
  const vpi lo1 = {0, 1, 2, 3, 8, 9, 10, 11}, hi1 = {4, 5, 6, 7, 12, 13, 14, 15};
  const vpf t0 = __builtin_shuffle(q[0], q[1], lo1) + __builtin_shuffle(q[0], q[1], hi1);
  const vpf t1 = __builtin_shuffle(q[2], q[3], lo1) + __builtin_shuffle(q[2], q[3], hi1);
  const vpi lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
  const vpf u = __builtin_shuffle(t0, t1, lo2) + __builtin_shuffle(t0, t1, hi2);  // q0 q0 q2 q2 q1 q1 q3 q3
  out[0] = u[0] + u[1];
  out[2] = u[2] + u[3];
  out[1] = u[4] + u[5];
  out[3] = u[6] + u[7];
}
#endif
// out[j .. j+NG) (+)= the NG dot products of entries j.. (NG = 8, or 4 with AVX2)
template <int U, int NG>
SF_INLINE void sddmm_group(const v16f (&d)[U], const uint16_t* __restrict ci, int64_t j, const float* __restrict X,
                           int64_t ld, float* __restrict out, bool accum) {
  vpf q[NG];
  SF_UNROLL for (int t = 0; t < NG; ++t) q[t] = dot_part<U>(d, X + (int64_t)ci[j + t] * ld);
  float res[NG];
#if SF_NB == 32
  if (NG == 4) reduce4_parts(q, res);
  else
#endif
    reduce8_parts(q, res);
  if (accum) {
    SF_UNROLL for (int t = 0; t < NG; ++t) out[j + t] += res[t];
  } else {
    SF_UNROLL for (int t = 0; t < NG; ++t) out[j + t] = res[t];
  }
}
template <int U>
SF_INLINE void sddmm_segment(const v16f (&d)[U], const uint16_t* __restrict ci, int64_t j, int64_t e,
                             const float* __restrict X, int64_t ld, float* __restrict out, bool accum) {
#if SF_NB == 32
  // dY row in 6-8 ymm: 4 entries at a time keep everything in the 16 registers
  constexpr int NG = U >= 3 ? 4 : 8;
#else
  constexpr int NG = 8;
#endif
  for (; j + NG <= e; j += NG) sddmm_group<U, NG>(d, ci, j, X, ld, out, accum);
  for (; j < e; ++j) {
    const vpf q = dot_part<U>(d, X + (int64_t)ci[j] * ld);
    float s = 0.f;
    SF_UNROLL for (int i = 0; i < kVL; ++i) s += q[i];
    out[j] = accum ? out[j] + s : s;
  }
}
#endif

template <int U>
static void sddmm_panel_u(const SddmmArgs& a) {
  const uint16_t* __restrict ci = a.a.col;
  const float* __restrict X = (const float*)a.x;
  const float* __restrict D = (const float*)a.dy;
  const int64_t ld = a.ld;
  const int64_t nblk = a.a.bp ? a.a.nblk : 1;
  for (int64_t blk = 0; blk < nblk; ++blk) {  // BCSR: outputs in block-major order
    const int32_t* __restrict p = a.a.bp ? a.a.bp + blk * a.a.bp_ld : a.a.rowptr;
    const int64_t nx = a.a.csr_blocks ? a.a.bp_ld : 1;  // segment end: next block's start, or next row's
    for (int64_t r = a.r0; r < a.r1; ++r) {
      const int64_t j = p[r], e = p[r + nx];
      if (j == e) continue;
      v16f d[U];
      SF_UNROLL for (int u = 0; u < U; ++u) d[u] = vload(D + r * ld + 16 * u);
      sddmm_segment<U>(d, ci, j, e, X, ld, a.out, a.accumulate);
    }
  }
}

// Lanes beyond kSddmmVec vectors are split into chunks that accumulate. With AVX-512 (32 vector
// registers) a whole 256-lane dY row stays in registers, so each kept weight is reduced once.
#if SF_ISA == 2
static constexpr int kSddmmVec = 16;
#elif SF_ISA == 1
static constexpr int kSddmmVec = 3;  // dY row: up to 6 ymm, partials of 4 entries: 4 ymm (4 vectors spill)
#else
static constexpr int kSddmmVec = 1;  // 4 xmm + 8 xmm
#endif

template <int U>
SF_INLINE void sddmm_dispatch_hi(const SddmmArgs& b, int64_t nv) {
  if constexpr (U > 1) {
    if (nv < U) {
      sddmm_dispatch_hi<U - 1>(b, nv);
      return;
    }
  }
  sddmm_panel_u<U>(b);
}

template <typename T>
static void sddmm_panel(const SddmmArgs& a) {
  SddmmArgs b = a;
  for (int64_t v0 = 0; v0 < a.nvec; v0 += kSddmmVec) {
    const int64_t nv = a.nvec - v0 < kSddmmVec ? a.nvec - v0 : kSddmmVec;
    b.x = (const float*)a.x + 16 * v0;
    b.dy = (const float*)a.dy + 16 * v0;
    b.accumulate = a.accumulate || v0 > 0;
    sddmm_dispatch_hi<kSddmmVec>(b, nv);
  }
}

// few batch rows: out[j] (+)= sum_b DY[b, r] * X[b, col_j] (fp32 row-major operands)
template <typename T>
static void sddmm_small(const SddmmArgs& a) {
  const uint16_t* __restrict ci = a.a.col;
  const float* __restrict D = (const float*)a.dy;
  const float* __restrict X = (const float*)a.x;
  float* __restrict out = a.out;
  const int64_t B = a.B;
  const int64_t nblk = a.a.bp ? a.a.nblk : 1;
  for (int64_t blk = 0; blk < nblk; ++blk)  // BCSR: outputs in block-major order
  for (int64_t r = a.r0; r < a.r1; ++r) {
    const int32_t* __restrict rp = a.a.bp ? a.a.bp + blk * a.a.bp_ld : a.a.rowptr;
    const int64_t j0 = rp[r], e = rp[r + (a.a.csr_blocks ? a.a.bp_ld : 1)];
    int64_t j = j0;
    for (; j + 16 <= e; j += 16) {
      v16f acc = a.accumulate ? vload(out + j) : splat(0.f);
      for (int64_t bi = 0; bi < B; ++bi) acc += splat(D[bi * a.ldd + r]) * gather16(X + bi * a.ldx, ci + j);
      vstore(out + j, acc);
    }
    for (; j < e; ++j) {
      float acc = a.accumulate ? out[j] : 0.f;
      for (int64_t bi = 0; bi < B; ++bi) acc += D[bi * a.ldd + r] * X[bi * a.ldx + ci[j]];
      out[j] = acc;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// layout: rows (B x K, row stride ld) <-> panels (nc x K x PW), lane l of panel c = row c*PW + l.
// Work item = (panels [c0, c1), rows [k0, k1)); tiles of 32 reduction rows keep the transpose in L1.
// ---------------------------------------------------------------------------------------------
template <typename T>
static void to_panels(const PackArgs& a) {  // T rows -> fp32 panels
  const T* __restrict src = (const T*)a.src;
  float* __restrict dst = (float*)a.dst;
  const int64_t K = a.K, PW = a.PW;
  for (int64_t c = a.c0; c < a.c1; ++c) {
    float* pc = dst + c * K * PW;
    const int64_t nb = a.B - c * PW < PW ? a.B - c * PW : PW;
    for (int64_t k0 = a.k0; k0 < a.k1; k0 += 32) {
      const int64_t k1 = k0 + 32 < a.k1 ? k0 + 32 : a.k1;
      for (int64_t l = 0; l < nb; ++l) {
        const T* s = src + (c * PW + l) * a.ld;
        for (int64_t k = k0; k < k1; ++k) pc[k * PW + l] = ld1(s + k);
      }
      for (int64_t k = k0; k < k1; ++k)
        for (int64_t l = nb; l < PW; ++l) pc[k * PW + l] = 0.f;
    }
  }
}

template <typename T>
static void from_panels(const PackArgs& a) {  // fp32 panels -> T rows
  const float* __restrict src = (const float*)a.src;
  T* __restrict dst = (T*)a.dst;
  const int64_t K = a.K, PW = a.PW;
  for (int64_t c = a.c0; c < a.c1; ++c) {
    const float* pc = src + c * K * PW;
    const int64_t nb = a.B - c * PW < PW ? a.B - c * PW : PW;
    for (int64_t k0 = a.k0; k0 < a.k1; k0 += 32) {
      const int64_t k1 = k0 + 32 < a.k1 ? k0 + 32 : a.k1;
      for (int64_t l = 0; l < nb; ++l) {
        T* d = dst + (c * PW + l) * a.ld;
        for (int64_t k = k0; k < k1; ++k) st1(d + k, pc[k * PW + l]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// conv: im2col straight into panels. Reduction row r = (kh*KW + kw)*C + ci; lane q = img*Ho*Wo +
// ho*Wo + wo lives at panel q / PW, lane q % PW; panel c holds all Kred rows: Xp[c][r][l].
// ---------------------------------------------------------------------------------------------
// valid output columns [wlo, whi) for kernel column kw: 0 <= wo*sw - pw + kw*dw < W
SF_INLINE void valid_cols(const ConvGeom& g, int64_t kw, int64_t& wlo, int64_t& whi) {
  const int64_t off = kw * g.dw - g.pw;
  wlo = off < 0 ? (-off + g.sw - 1) / g.sw : 0;
  whi = g.W - off <= 0 ? 0 : (g.W - off + g.sw - 1) / g.sw;
  if (whi > g.Wo) whi = g.Wo;
  if (wlo > whi) wlo = whi;
}

// conv im2col into a plain fp32 buffer: row r = (kh*KW + kw)*C + ci of length g.PW (>= G*Ho*Wo lanes,
// lane q = img*Ho*Wo + ho*Wo + wo; lanes beyond are zeroed); rows [r0, r1).
template <typename T>
static void im2col(const void* xv, void* xpv, const ConvGeom& g, int64_t r0, int64_t r1) {
  const T* __restrict x = (const T*)xv;
  float* __restrict xp = (float*)xpv;
  const int64_t C = g.C, HWi = g.H * g.W, P = g.G * g.Ho * g.Wo;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t ci = r % C, kk = r / C, kh = kk / g.KW, kw = kk % g.KW;
    float* d = xp + r * g.PW;
    int64_t wlo, whi;
    valid_cols(g, kw, wlo, whi);
    const int64_t off_w = kw * g.dw - g.pw;
    if (g.sh == 1 && g.sw == 1 && g.Wo == g.W) {
      // stride 1, Wo == W ("same"-style): the lane plane is the input plane shifted by hs rows and
      // off_w columns: one contiguous copy, then zero the rows outside and the wrapped columns.
      const int64_t hs = kh * g.dh - g.ph, HoWo = g.Ho * g.Wo;
      const int64_t hlo = hs < 0 ? -hs : 0, hhi = g.H - hs < g.Ho ? g.H - hs : g.Ho;
      for (int64_t img = 0; img < g.G; ++img, d += HoWo) {
        const T* xc = x + img * g.img_stride + ci * HWi;
        if (hhi <= hlo) {
          for (int64_t q = 0; q < HoWo; ++q) d[q] = 0.f;
          continue;
        }
        for (int64_t q = 0; q < hlo * g.Wo; ++q) d[q] = 0.f;
        const int64_t start = (hlo + hs) * g.W + off_w, len = (hhi - hlo) * g.Wo;
        const int64_t t0 = start < 0 ? -start : 0, t1 = HWi - start < len ? HWi - start : len;
        float* dv = d + hlo * g.Wo;
        for (int64_t t = 0; t < t0; ++t) dv[t] = 0.f;
        for (int64_t t = t0; t < t1; ++t) dv[t] = ld1(xc + start + t);
        for (int64_t t = t1 > t0 ? t1 : t0; t < len; ++t) dv[t] = 0.f;
        if (wlo > 0 || whi < g.Wo)
          for (int64_t ho = hlo; ho < hhi; ++ho) {
            for (int64_t wo = 0; wo < wlo; ++wo) d[ho * g.Wo + wo] = 0.f;
            for (int64_t wo = whi; wo < g.Wo; ++wo) d[ho * g.Wo + wo] = 0.f;
          }
        for (int64_t q = hhi * g.Wo; q < HoWo; ++q) d[q] = 0.f;
      }
      for (int64_t q = P; q < g.PW; ++q) xp[r * g.PW + q] = 0.f;
      continue;
    }
    for (int64_t img = 0; img < g.G; ++img) {
      const T* xc = x + img * g.img_stride + ci * HWi;
      for (int64_t ho = 0; ho < g.Ho; ++ho, d += g.Wo) {
        const int64_t h = ho * g.sh - g.ph + kh * g.dh;
        if (h < 0 || h >= g.H) {
          for (int64_t wo = 0; wo < g.Wo; ++wo) d[wo] = 0.f;
          continue;
        }
        const T* s = xc + h * g.W + off_w;
        for (int64_t wo = 0; wo < wlo; ++wo) d[wo] = 0.f;
        if (g.sw == 1) {
          for (int64_t wo = wlo; wo < whi; ++wo) d[wo] = ld1(s + wo);
        } else {
          for (int64_t wo = wlo; wo < whi; ++wo) d[wo] = ld1(s + wo * g.sw);
        }
        for (int64_t wo = whi; wo < g.Wo; ++wo) d[wo] = 0.f;
      }
    }
    for (int64_t q = P; q < g.PW; ++q) xp[r * g.PW + q] = 0.f;
  }
}

// dx (fp32, G images; zero-initialised by the caller) += col2im(plain fp32 buffer as im2col writes it);
// work item = plane img*C + ci, planes [p0, p1).
static void col2im(const void* xpv, void* dxv, const ConvGeom& g, int64_t p0, int64_t p1) {
  float* __restrict xpm = (float*)xpv;  // the stride-1 path zeroes wrapped columns of its own rows
  const float* __restrict xp = xpm;
  float* __restrict dx = (float*)dxv;
  const int64_t C = g.C, HoWo = g.Ho * g.Wo;
  for (int64_t plane = p0; plane < p1; ++plane) {
    const int64_t img = plane / C, ci = plane % C;
    float* dxc = dx + img * g.img_stride + ci * g.H * g.W;
    for (int64_t kh = 0; kh < g.KH; ++kh) {
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        const int64_t r = (kh * g.KW + kw) * C + ci;
        const float* s = xp + r * g.PW + img * HoWo;
        int64_t wlo, whi;
        valid_cols(g, kw, wlo, whi);
        const int64_t off_w = kw * g.dw - g.pw;
        if (g.sh == 1 && g.sw == 1 && g.Wo == g.W) {
          // mirror of the im2col fast path: zero the wrapped columns of this (row, image) lane
          // block (each is read by this plane only), then one contiguous shifted add
          const int64_t hs = kh * g.dh - g.ph;
          const int64_t hlo = hs < 0 ? -hs : 0, hhi = g.H - hs < g.Ho ? g.H - hs : g.Ho;
          if (hhi <= hlo) continue;
          float* sm = xpm + r * g.PW + img * HoWo;
          if (wlo > 0 || whi < g.Wo)
            for (int64_t ho = hlo; ho < hhi; ++ho) {
              for (int64_t wo = 0; wo < wlo; ++wo) sm[ho * g.Wo + wo] = 0.f;
              for (int64_t wo = whi; wo < g.Wo; ++wo) sm[ho * g.Wo + wo] = 0.f;
            }
          const int64_t start = (hlo + hs) * g.W + off_w, len = (hhi - hlo) * g.Wo, HWi = g.H * g.W;
          const int64_t t0 = start < 0 ? -start : 0, t1 = HWi - start < len ? HWi - start : len;
          const float* sv = sm + hlo * g.Wo;
          for (int64_t t = t0; t < t1; ++t) dxc[start + t] += sv[t];
          continue;
        }
        for (int64_t ho = 0; ho < g.Ho; ++ho, s += g.Wo) {
          const int64_t h = ho * g.sh - g.ph + kh * g.dh;
          if (h < 0 || h >= g.H) continue;
          float* dr = dxc + h * g.W + off_w;
          if (g.sw == 1) {
            for (int64_t wo = wlo; wo < whi; ++wo) dr[wo] += s[wo];
          } else {
            for (int64_t wo = wlo; wo < whi; ++wo) dr[wo * g.sw] += s[wo];
          }
        }
      }
    }
  }
}

// rows o of (G images x rows x HW) tensor t <-> panels (nc x rows x PW), lane q = img*HW + hw.
template <typename T>
static void rows_to_panels(const void* tv, void* pv, int64_t rows, int64_t HW, int64_t G, int64_t img_stride,
                           int64_t PW, int64_t o0, int64_t o1) {
  const T* __restrict t = (const T*)tv;
  float* __restrict p = (float*)pv;
  const int64_t P = G * HW, nc = (P + PW - 1) / PW, pstride = rows * PW;
  const float zero = 0.f;
  for (int64_t o = o0; o < o1; ++o) {
    int64_t c = 0, l = 0;
    for (int64_t img = 0; img < G; ++img) {
      const T* s = t + img * img_stride + o * HW;
      int64_t hw = 0;
      while (hw < HW) {
        const int64_t n = (PW - l) < (HW - hw) ? (PW - l) : (HW - hw);
        float* d = p + c * pstride + o * PW + l;
        for (int64_t i = 0; i < n; ++i) d[i] = ld1(s + hw + i);
        hw += n;
        l += n;
        if (l == PW) { l = 0; ++c; }
      }
    }
    for (; c < nc; ++c) {
      for (; l < PW; ++l) p[c * pstride + o * PW + l] = zero;
      l = 0;
    }
  }
}

template <typename T>
static void panels_to_rows(const void* pv, void* tv, int64_t rows, int64_t HW, int64_t G, int64_t img_stride,
                           int64_t PW, int64_t o0, int64_t o1) {
  const float* __restrict p = (const float*)pv;
  T* __restrict t = (T*)tv;
  const int64_t pstride = rows * PW;
  for (int64_t o = o0; o < o1; ++o) {
    int64_t c = 0, l = 0;
    for (int64_t img = 0; img < G; ++img) {
      T* d = t + img * img_stride + o * HW;
      int64_t hw = 0;
      while (hw < HW) {
        const int64_t n = (PW - l) < (HW - hw) ? (PW - l) : (HW - hw);
        const float* sp = p + c * pstride + o * PW + l;
        for (int64_t i = 0; i < n; ++i) st1(d + hw + i, sp[i]);
        hw += n;
        l += n;
        if (l == PW) { l = 0; ++c; }
      }
    }
  }
}

// ---- top-k selection passes (plain loops: the ISA pragma vectorises them) -----------------------
// The score of entry i (see kernels.h): excluded -> -inf, else the value or its magnitude. Templated on
// the two options so each loop stays a plain vectorisable loop.
template <bool EX, bool ABS>
SF_INLINE float topk_score(const float* p, const uint8_t* ex, int64_t i) {
  float x = p[i];
  if (ABS) x = std::fabs(x);
  if (EX) x = ex[i] ? -std::numeric_limits<float>::infinity() : x;
  return x;
}

#if SF_ISA >= 1
// lane permutations that move the set lanes of an 8-bit mask to the front, in order
struct CompactLut {
  alignas(32) int32_t v[256][8];
  constexpr CompactLut() : v{} {
    for (int m = 0; m < 256; ++m) {
      int o = 0;
      for (int l = 0; l < 8; ++l)
        if (m & (1 << l)) v[m][o++] = l;
      for (; o < 8; ++o) v[m][o] = 0;
    }
  }
};
static constexpr CompactLut kCompactLut{};
#endif

// Blocks of 64: vectorised counts first; a block holding candidates (with a bracket of ~1 % of the
// entries most blocks do) copies them branch-free (AVX2/AVX-512: 8 lanes per step by a permute table;
// generic: a store per entry, the count advanced by the test), which the old branchy copy spent ~60 % of a
// 4M-entry selection on.
template <bool EX, bool ABS>
static int64_t bracket_scan_t(const float* p, const uint8_t* ex, int64_t n, float hi, float lo, float* cand,
                              int64_t cap, int64_t* above, int* nan) {
  constexpr int64_t B = 64;
  int64_t a = 0, nc = 0;
  int bad = 0;
  for (int64_t i0 = 0; i0 < n; i0 += B) {
    const int64_t len = n - i0 < B ? n - i0 : B;
    const float* q = p + i0;
    const uint8_t* e = EX ? ex + i0 : nullptr;
    int32_t ab = 0, in = 0, nb = 0;
    for (int64_t j = 0; j < len; ++j) {  // vectorised counts
      const float x = topk_score<EX, ABS>(q, e, j);
      nb |= (x != x);
      ab += (x > hi);
      in += (x <= hi) & (x >= lo);
    }
    a += ab;
    bad |= nb;
    if (in == 0) continue;
    if (nc + len + 8 <= cap) {
      int64_t j = 0;
#if SF_ISA >= 1
      // 8 at a time: the in-bracket lanes moved to the front (permute by a 256-entry table) and
      // stored unaligned; the count advances by their number
      const __m256 vhi = _mm256_set1_ps(hi), vlo = _mm256_set1_ps(lo);
      const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
      const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
      for (; j + 8 <= len; j += 8) {
        __m256 x = _mm256_loadu_ps(q + j);
        if (ABS) x = _mm256_and_ps(x, absm);
        if (EX) {
          const __m256i eb = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(e + j)));
          x = _mm256_blendv_ps(x, ninf, _mm256_castsi256_ps(_mm256_cmpgt_epi32(eb, _mm256_setzero_si256())));
        }
        const int bits = _mm256_movemask_ps(
            _mm256_and_ps(_mm256_cmp_ps(x, vhi, _CMP_LE_OQ), _mm256_cmp_ps(x, vlo, _CMP_GE_OQ)));
        const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompactLut.v[bits]));
        _mm256_storeu_ps(cand + nc, _mm256_permutevar8x32_ps(x, perm));
        nc += __builtin_popcount(static_cast<unsigned>(bits));
      }
#endif
      for (; j < len; ++j) {
        const float x = topk_score<EX, ABS>(q, e, j);
        cand[nc] = x;
        nc += (x <= hi) & (x >= lo);
      }
    } else {
      for (int64_t j = 0; j < len; ++j) {
        const float x = topk_score<EX, ABS>(q, e, j);
        if (x <= hi && x >= lo) {
          if (nc < cap) cand[nc] = x;
          ++nc;
        }
      }
    }
  }
  *above = a;
  *nan = bad;
  return nc;
}

template <bool EX, bool ABS>
static void count_gt_eq_t(const float* p, const uint8_t* ex, int64_t n, float v, int64_t* gt, int64_t* eq) {
  constexpr int64_t B = 1 << 16;
  int64_t g = 0, e = 0;
  for (int64_t i0 = 0; i0 < n; i0 += B) {
    const int64_t len = n - i0 < B ? n - i0 : B;
    int32_t gb = 0, eb = 0;
    for (int64_t j = 0; j < len; ++j) {
      const float x = topk_score<EX, ABS>(p, ex, i0 + j);
      gb += (x > v);
      eb += (x == v);
    }
    g += gb;
    e += eb;
  }
  *gt = g;
  *eq = e;
}

template <bool EX, bool ABS>
static void ge_bytes_t(const float* p, const uint8_t* ex, int64_t n, float v, uint8_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = topk_score<false, ABS>(p, ex, i);
    out[i] = static_cast<uint8_t>((x >= v) & (EX ? ex[i] == 0 : true));
  }
}

#define SF_TOPK_DISPATCH(fn, ex, absval, ...) \
  ((ex) ? ((absval) ? fn<true, true>(__VA_ARGS__) : fn<true, false>(__VA_ARGS__)) \
        : ((absval) ? fn<false, true>(__VA_ARGS__) : fn<false, false>(__VA_ARGS__)))

static int64_t bracket_scan(const float* p, const uint8_t* ex, bool absval, int64_t n, float hi, float lo,
                            float* cand, int64_t cap, int64_t* above, int* nan) {
  return SF_TOPK_DISPATCH(bracket_scan_t, ex, absval, p, ex, n, hi, lo, cand, cap, above, nan);
}

static void count_gt_eq(const float* p, const uint8_t* ex, bool absval, int64_t n, float v, int64_t* gt,
                        int64_t* eq) {
  SF_TOPK_DISPATCH(count_gt_eq_t, ex, absval, p, ex, n, v, gt, eq);
}

static void ge_bytes(const float* p, const uint8_t* ex, bool absval, int64_t n, float v, uint8_t* out) {
  SF_TOPK_DISPATCH(ge_bytes_t, ex, absval, p, ex, n, v, out);
}
#undef SF_TOPK_DISPATCH

static int64_t compact_true(const uint8_t* mk, int64_t n, int32_t base, int32_t* out) {
  int64_t p = 0, i = 0;
#if SF_ISA >= 1
  __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(base), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i eight = _mm256_set1_epi32(8);
  for (; i + 8 <= n; i += 8) {
    uint64_t w;  // (branch-free: skipping empty runs mispredicts about every other run at 90 % sparsity)
    std::memcpy(&w, mk + i, 8);
    const __m256i b = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(w)));
    const int bits = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(b, _mm256_setzero_si256())));
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompactLut.v[bits]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + p), _mm256_permutevar8x32_epi32(idx, perm));
    p += __builtin_popcount(static_cast<unsigned>(bits));
    idx = _mm256_add_epi32(idx, eight);
  }
#endif
  for (; i < n; ++i) {  // branch-free: a store per entry, the count advanced by the byte
    out[p] = base + static_cast<int32_t>(i);
    p += mk[i] != 0;
  }
  return p;
}

// Masked dW of a BSR matrix (SpMat::bs, not transposed), block rows [r0, r1):
//   out[boff[e] + o*bld[e] + k] = sum_l DY[l][br*bs + o] * X[l][bcol[e]*bs + k]
// DY and X in column-block layout, T: DY (rows/bs, B, bs), X (cols/bs, B, bs), so a block's operands
// stream contiguously (row-major X would read one line per batch row at a stride of cols*4 bytes,
// which maps a whole block onto one L1 set). Per block an outer-product GEMM micro-kernel over the
// batch rows (R broadcasts of DY and bs/16 vectors of X per row). bs in {16, 32}.
template <int UK>
struct BsrDwR {
#if SF_ISA == 2
  static constexpr int R = UK == 1 ? 8 : 6;
#elif SF_ISA == 1
  static constexpr int R = UK == 1 ? 6 : 2;  // accumulators + UK*2 ymm of X + 1 broadcast <= 16
#else
  static constexpr int R = UK == 1 ? 2 : 1;
#endif
};

template <typename T, int UK, int R>
SF_INLINE void bsr_dw_rows(const SddmmArgs& a, int64_t br, int64_t e, int64_t o0) {
  const SpMat& A = a.a;
  const int64_t bs = A.bs;
  const T* __restrict dy = (const T*)a.dy + br * a.B * bs + o0;
  const T* __restrict x = (const T*)a.x + (int64_t)A.bcol[e] * a.B * bs;
  v16f acc[R][UK];
  SF_UNROLL for (int r = 0; r < R; ++r) SF_UNROLL for (int u = 0; u < UK; ++u) acc[r][u] = splat(0.f);
  for (int64_t l = 0; l < a.B; ++l) {
    v16f xv[UK];
    SF_UNROLL for (int u = 0; u < UK; ++u) xv[u] = vload(x + l * bs + 16 * u);
    const T* __restrict d = dy + l * bs;
    SF_UNROLL for (int r = 0; r < R; ++r) {
      const v16f w = splat(ld1(d + r));
      SF_UNROLL for (int u = 0; u < UK; ++u) acc[r][u] += w * xv[u];
    }
  }
  float* out = a.out + A.boff[e] + o0 * (int64_t)A.bld[e];
  SF_UNROLL for (int r = 0; r < R; ++r) SF_UNROLL for (int u = 0; u < UK; ++u) vstore(out + r * (int64_t)A.bld[e] + 16 * u, acc[r][u]);
}

template <typename T, int UK>
static void sddmm_bsr_u(const SddmmArgs& a) {
  constexpr int R = BsrDwR<UK>::R;
  const int64_t bs = a.a.bs;
  for (int64_t br = a.r0; br < a.r1; ++br) {
    for (int64_t e = a.a.bptr[br]; e < a.a.bptr[br + 1]; ++e) {
      walk_rows<R>(0, bs, [&]<int Q>(int64_t o) SF_LAMBDA_INLINE { bsr_dw_rows<T, UK, Q>(a, br, e, o); });
    }
  }
}

template <typename T>
static void sddmm_bsr(const SddmmArgs& a) {
  if (a.a.bs == 32) sddmm_bsr_u<T, 2>(a); else sddmm_bsr_u<T, 1>(a);
}

template <typename T>
static KernelTable make_table(const char* name) {
  KernelTable t;
  t.isa_name = name;
  t.spmm_panel = &spmm_panel<T>;
  t.spmm_t_panel = &spmm_t_panel<T>;
  t.spmm_small = &spmm_small<T>;
  t.sddmm_panel = &sddmm_panel<T>;
  t.sddmm_small = &sddmm_small<T>;
  t.sddmm_bsr = &sddmm_bsr<T>;
  t.to_panels = &to_panels<T>;
  t.from_panels = &from_panels<T>;
  t.im2col = &im2col<T>;
  t.col2im = &col2im;
  t.rows_to_panels = &rows_to_panels<T>;
  t.panels_to_rows = &panels_to_rows<T>;
  t.bracket_scan = &bracket_scan;
  t.count_gt_eq = &count_gt_eq;
  t.ge_bytes = &ge_bytes;
  t.compact_true = &compact_true;
  return t;
}

#undef SF_INLINE
#undef SF_UNROLL

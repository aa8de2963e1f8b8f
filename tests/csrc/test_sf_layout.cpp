// CPU build of the __host__ __device__ layout functions in csrc/include/sf_layout.h.
//
//   g++ -O1 -std=c++17 -I csrc/include tests/csrc/test_sf_layout.cpp -o test_sf_layout && ./test_sf_layout
//       exhaustive / randomized self-checks, prints "N passed, 0 failed"
//   g++ -O1 -std=c++17 -shared -fPIC -DSF_NO_MAIN -I csrc/include tests/csrc/test_sf_layout.cpp -o libsf_layout.so
//       the C API below, which tests/backends/test_cuda.py calls through ctypes to compare the C++
//       layout with the Python mirror (sparsefast/formats/sm_meta.py) bit for bit.
//
// The pack here walks the buffers exactly like the CUDA pack kernel (one metadata word at a time, rows
// r0 and r0+8 x 16 columns); the checks compare it with the per-element addressing functions, decode it
// back, and run an emulated mma.sp.m16n8k32 (PTX ISA fragment layout) over it against a dense product.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "sf_layout.h"

using namespace sf;

extern "C" {

int64_t sf_rows_padded(int64_t R) { return sf24_rows_padded(R); }
int64_t sf_cols_padded(int64_t C) { return sf24_cols_padded(C); }
int64_t sf_meta_words(int64_t R, int64_t C) { return sf24_meta_words(R, C); }

// word-major pack (the CUDA kernel's loop): w, keep R x C row-major; vals Rp x Cp/2; meta words
void sf_pack(const float* w, const uint8_t* keep, int64_t R, int64_t C, float* vals, uint32_t* meta) {
  const int64_t Cp = sf24_cols_padded(C), nwords = sf24_meta_words(R, C), ksteps = Cp / 32;
  for (int64_t word = 0; word < nwords; ++word) {
    const int j = (int)(word % 16);
    const int64_t s = (word / 16) % ksteps, t = word / 16 / ksteps;
    const int64_t c0 = s * 32 + (j % 2) * 16;
    uint32_t out = 0;
    for (int half = 0; half < 2; ++half) {
      const int64_t r = t * 16 + j / 2 + 8 * half;
      for (int g = 0; g < 4; ++g) {
        uint32_t k4 = 0;
        float v[4];
        for (int q = 0; q < 4; ++q) {
          const int64_t c = c0 + 4 * g + q;
          const bool in = r < R && c < C;
          v[q] = in ? w[r * C + c] : 0.f;
          k4 |= (in && keep[r * C + c]) ? (1u << q) : 0u;
        }
        int src[2];
        const uint32_t nib = sf24_encode_group(k4, src);
        out |= nib << (16 * half + 4 * g);
        for (int sl = 0; sl < 2; ++sl) vals[r * (Cp / 2) + c0 / 2 + 2 * g + sl] = src[sl] >= 0 ? v[src[sl]] : 0.f;
      }
    }
    meta[word] = out;
  }
}

// element-wise decode through sf24_meta_word / sf24_meta_bit / sf24_val_offset
void sf_unpack(const float* vals, const uint32_t* meta, int64_t R, int64_t C, float* w) {
  const int64_t Cp = sf24_cols_padded(C);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; c += 4) {
      const uint32_t nib = (meta[sf24_meta_word(r, c, Cp)] >> sf24_meta_bit(r, c)) & 0xFu;
      for (int q = 0; q < 4; ++q) w[r * C + c + q] = 0.f;
      for (int s = 0; s < 2; ++s) w[r * C + c + sf24_nibble_idx(nib, s)] += vals[sf24_val_offset(r, c, s, Cp)];
    }
}

// emulated mma.sp GEMM: D (R x n) = A (SF24, R x Cp) @ B (Cp x n, row-major, n % 8 == 0), tile by tile,
// fragments addressed with the mma_sp_* helpers and the metadata register each lane passes.
void sf_emulate_gemm(const float* vals, const uint32_t* meta, int64_t R, int64_t C, const float* B, int64_t n,
                     double* D) {
  const int64_t Rp = sf24_rows_padded(R), Cp = sf24_cols_padded(C);
  for (int64_t i = 0; i < R * n; ++i) D[i] = 0.0;
  for (int64_t t = 0; t < Rp / 16; ++t)
    for (int64_t ks = 0; ks < Cp / 32; ++ks)
      for (int64_t n0 = 0; n0 < n; n0 += 8) {
        uint32_t a[32][4][2];  // lane, reg, half -> index into vals (as float bits: we keep indices)
        float av[32][4][2], bv[32][4][2];
        uint32_t e[32];
        for (int lane = 0; lane < 32; ++lane) {
          e[lane] = meta[sf24_lane_meta_word(lane, t, ks, Cp)];
          for (int i = 0; i < 4; ++i)
            for (int h = 0; h < 2; ++h) {
              int row, ccol, k, col;
              mma_sp_a_coord(lane, i, h, &row, &ccol);
              av[lane][i][h] = vals[(t * 16 + row) * (Cp / 2) + ks * 16 + ccol];
              a[lane][i][h] = 0;
              mma_sp_b_coord(lane, i, h, &k, &col);
              bv[lane][i][h] = B[(ks * 32 + k) * n + n0 + col];
            }
        }
        // the instruction: D[row][col] += sum_ccol A[row][ccol] * B[dense(ccol)][col], A and B read back
        // from the lanes that hold them
        for (int row = 0; row < 16; ++row) {
          const int g = row % 8;
          for (int col = 0; col < 8; ++col) {
            double acc = 0.0;
            for (int ccol = 0; ccol < 16; ++ccol) {
              // which lane/reg/half holds A[row][ccol]
              const int lane_a = 4 * g + (ccol % 8) / 2, reg_a = (row / 8) + 2 * (ccol / 8), h_a = ccol % 2;
              const int dense = mma_sp_dense_col(e[4 * g + 0], e[4 * g + 1], row, ccol);
              const int lane_b = 4 * col + (dense % 8) / 2, reg_b = dense / 8, h_b = dense % 2;
              acc += (double)av[lane_a][reg_a][h_a] * (double)bv[lane_b][reg_b][h_b];
            }
            const int64_t r = t * 16 + row;
            if (r < R) D[r * n + n0 + col] += acc;
          }
        }
        (void)a;
      }
}

// conv implicit-GEMM offsets for all (k, p): out[k * P + p]
void sf_conv_offsets(const int* shape14, int64_t* out) {
  ConvShape s;
  s.N = shape14[0]; s.H = shape14[1]; s.W = shape14[2]; s.C = shape14[3];
  s.O = shape14[4]; s.KH = shape14[5]; s.KW = shape14[6];
  s.SH = shape14[7]; s.SW = shape14[8]; s.PH = shape14[9]; s.PW = shape14[10]; s.DH = shape14[11]; s.DW = shape14[12];
  s.HO = (s.H + 2 * s.PH - s.DH * (s.KH - 1) - 1) / s.SH + 1;
  s.WO = (s.W + 2 * s.PW - s.DW * (s.KW - 1) - 1) / s.SW + 1;
  (void)shape14[13];
  const int64_t K = (int64_t)s.KH * s.KW * s.C, P = (int64_t)s.N * s.HO * s.WO;
  for (int64_t k = 0; k < K; ++k)
    for (int64_t p = 0; p < P; ++p) out[k * P + p] = conv_input_offset(s, k, p);
}
}

#ifndef SF_NO_MAIN
static int passed = 0, failed = 0;
#define CHECK(cond, ...)                     \
  do {                                       \
    if (cond) {                              \
      ++passed;                              \
    } else {                                 \
      ++failed;                              \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);              \
      std::printf("\n");                     \
    }                                        \
  } while (0)

int main() {
  // 1. every keep pattern of a group: legal nibble, slots point at kept columns, round trip
  for (uint32_t k4 = 0; k4 < 16; ++k4) {
    int src[2];
    const uint32_t nib = sf24_encode_group(k4, src);
    CHECK(sf24_nibble_legal(nib), "nibble %x for keep %x is not a legal mma.sp code", nib, k4);
    int nk = __builtin_popcount(k4);
    int kept_stored = 0;
    for (int s = 0; s < 2; ++s) {
      if (src[s] >= 0) {
        CHECK(src[s] == sf24_nibble_idx(nib, s), "slot %d source %d != index %d", s, src[s], sf24_nibble_idx(nib, s));
        CHECK((k4 >> src[s]) & 1u, "slot %d stores unkept column %d", s, src[s]);
        ++kept_stored;
      } else {
        CHECK(!((k4 >> sf24_nibble_idx(nib, s)) & 1u) || nk > 2, "filler slot %d points at a kept column", s);
      }
    }
    CHECK(kept_stored == (nk < 2 ? nk : 2), "keep %x stored %d kept entries", k4, kept_stored);
  }

  std::mt19937 rng(1234);
  const int shapes[][2] = {{16, 32}, {20, 36}, {64, 64}, {70, 100}, {129, 260}, {8, 4}};
  for (auto& sh : shapes) {
    const int64_t R = sh[0], C = sh[1];
    const int64_t Rp = sf24_rows_padded(R), Cp = sf24_cols_padded(C);
    std::vector<float> w(R * C), dense(R * C), back(R * C);
    std::vector<uint8_t> keep(R * C);
    std::uniform_real_distribution<float> U(-1.f, 1.f);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t g = 0; g < C / 4; ++g) {
        const int mode = rng() % 8;  // mostly 2 kept, sometimes 0/1/3 (invalid: first two stored)
        const int nk = mode < 5 ? 2 : mode - 5;
        uint32_t k4 = 0;
        while (__builtin_popcount(k4) < nk) k4 |= 1u << (rng() % 4);
        for (int q = 0; q < 4; ++q) {
          const int64_t i = r * C + 4 * g + q;
          w[i] = U(rng);
          keep[i] = (k4 >> q) & 1u;
        }
        // expected dense: the first two kept entries
        int seen = 0;
        for (int q = 0; q < 4; ++q) {
          const int64_t i = r * C + 4 * g + q;
          dense[i] = (keep[i] && seen < 2) ? w[i] : 0.f;
          if (keep[i]) ++seen;
        }
      }
    std::vector<float> vals(Rp * Cp / 2, -7.f);
    std::vector<uint32_t> meta(sf24_meta_words(R, C), 0xdeadbeefu);
    sf_pack(w.data(), keep.data(), R, C, vals.data(), meta.data());
    // 2. the word-major pack agrees with the per-element addressing
    int bad = 0;
    for (int64_t r = 0; r < Rp; ++r)
      for (int64_t c = 0; c < Cp; c += 4) {
        const uint32_t nib = (meta[sf24_meta_word(r, c, Cp)] >> sf24_meta_bit(r, c)) & 0xFu;
        if (!sf24_nibble_legal(nib)) ++bad;
      }
    CHECK(bad == 0, "R=%lld C=%lld: %d illegal nibbles", (long long)R, (long long)C, bad);
    bad = 0;
    for (auto v : vals) bad += (v == -7.f);
    CHECK(bad == 0, "R=%lld C=%lld: %d vals never written", (long long)R, (long long)C, bad);
    // 3. decode round trip
    sf_unpack(vals.data(), meta.data(), R, C, back.data());
    bad = 0;
    for (int64_t i = 0; i < R * C; ++i) bad += back[i] != dense[i];
    CHECK(bad == 0, "R=%lld C=%lld: %d entries differ after unpack", (long long)R, (long long)C, bad);
    // 4. emulated mma.sp GEMM == dense product
    const int64_t n = 16;
    std::vector<float> B(Cp * n);
    for (int64_t k = 0; k < Cp; ++k)
      for (int64_t j = 0; j < n; ++j) B[k * n + j] = k < C ? U(rng) : 0.f;
    std::vector<double> D(R * n);
    sf_emulate_gemm(vals.data(), meta.data(), R, C, B.data(), n, D.data());
    double err = 0.0;
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < n; ++j) {
        double ref = 0.0;
        for (int64_t k = 0; k < C; ++k) ref += (double)dense[r * C + k] * B[k * n + j];
        err = std::fmax(err, std::fabs(ref - D[r * n + j]));
      }
    CHECK(err < 1e-9, "R=%lld C=%lld: emulated mma.sp differs from dense by %g", (long long)R, (long long)C, err);
    // 5. every lane's metadata word is the one holding rows g / g+8 of its k-step half
    for (int lane = 0; lane < 32; ++lane) {
      const int64_t wd = sf24_lane_meta_word(lane, 0, 1, Cp);
      CHECK(wd == sf24_meta_word(lane / 4, 32 + 16 * (lane % 2), Cp) &&
                wd == sf24_meta_word(lane / 4 + 8, 32 + 16 * (lane % 2) + 12, Cp),
            "lane %d metadata word mismatch", lane);
    }
  }

  // 6. conv offsets: reduction index order (kh, kw, c), padding taps -> -1
  {
    const int sh[14] = {2, 7, 6, 8, 4, 3, 2, 2, 1, 1, 0, 2, 1, 0};
    ConvShape s;
    s.N = 2; s.H = 7; s.W = 6; s.C = 8; s.O = 4; s.KH = 3; s.KW = 2; s.SH = 2; s.SW = 1; s.PH = 1; s.PW = 0;
    s.DH = 2; s.DW = 1;
    s.HO = (s.H + 2 * s.PH - s.DH * (s.KH - 1) - 1) / s.SH + 1;
    s.WO = (s.W + 2 * s.PW - s.DW * (s.KW - 1) - 1) / s.SW + 1;
    const int64_t K = s.KH * s.KW * s.C, P = (int64_t)s.N * s.HO * s.WO;
    std::vector<int64_t> off(K * P);
    sf_conv_offsets(sh, off.data());
    int bad = 0;
    for (int n = 0; n < s.N; ++n)
      for (int oh = 0; oh < s.HO; ++oh)
        for (int ow = 0; ow < s.WO; ++ow)
          for (int kh = 0; kh < s.KH; ++kh)
            for (int kw = 0; kw < s.KW; ++kw)
              for (int c = 0; c < s.C; ++c) {
                const int64_t p = ((int64_t)n * s.HO + oh) * s.WO + ow, k = ((int64_t)kh * s.KW + kw) * s.C + c;
                const int ih = oh * s.SH - s.PH + kh * s.DH, iw = ow * s.SW - s.PW + kw * s.DW;
                const int64_t want =
                    (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) ? -1 : (((int64_t)n * s.H + ih) * s.W + iw) * s.C + c;
                bad += off[k * P + p] != want;
              }
    CHECK(bad == 0, "conv offsets: %d mismatches", bad);
  }
  CHECK(csr_clamp_col(70000u, 100) == 99 && csr_clamp_col(5u, 100) == 5, "csr_clamp_col");

  std::printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
#endif

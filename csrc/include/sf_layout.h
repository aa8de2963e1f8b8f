// sparsefast: packed formats and index arithmetic shared by the CUDA kernels and a CPU test build.
//
// Everything here is __host__ __device__ (plain inline C++ when not compiled by nvcc) and has no
// dependency on torch or the CUDA runtime, so tests/csrc/ compiles it with g++ and checks it exactly.
//
// =====================================================================================================
// SF24: the 2:4 packed weight format (sparse-tensor-core ready)
// =====================================================================================================
// A logical dense matrix W (R x C), row-major, 2:4 along C (each group of 4 consecutive columns
// keeps at most 2 entries), is stored as
//
//   Rp = round_up(R, 64)          padded rows    (padding rows are all zero)
//   Cp = round_up(C, 64)          padded columns (padding columns are all zero)
//   vals[Rp][Cp/2]                element type T (bf16/f16): vals[r][2g+s] is the s-th kept entry
//                                 (ascending column) of group g = columns 4g..4g+3; 0 when the group
//                                 keeps fewer than 2.
//   meta[Rp/16][Cp/32][16]        uint32 words, laid out exactly as mma.sp.m16n8k32 (f16/bf16, sparsity
//                                 selector 0) wants them in registers:
//
//     nibble(r, g) = idx0 | idx1 << 2,  idx0 < idx1 in 0..3 the columns (within the group) of the two
//                    stored values (vals[r][2g], vals[r][2g+1]).  Always one of the six legal codes
//                    0x4 0x8 0xC 0x9 0xD 0xE; a group keeping fewer than 2 uses a filler index whose
//                    stored value is 0 (1 kept at a<3: (a,3); at a=3: (2,3); none: (0,1)).
//     For row tile t = r/16, k-step s = c/32 (32 dense columns), lane pair p = (c%32)/16:
//       word  = (t * (Cp/32) + s) * 16 + 2*(r%8) + p
//       bits  = 16 * ((r%16)/8) + 4 * ((c%16)/4)      (the nibble of the group holding column c)
//     i.e. in a warp, lane L (group g = L/4, p = L%4 in {0,1}) passes word 2g+p of its tile: the low
//     half holds row g, the high half row g+8, columns 16p..16p+15 of the k-step (4 nibbles each,
//     first group in the lowest bits).  Lanes with L%4 in {2,3} are ignored by the instruction.
//
// A group that (wrongly) keeps more than 2 entries stores its first two kept entries; the 2-bit
// indices can never address outside their group of 4, so no metadata can read out of bounds.
//
// =====================================================================================================
// mma.sp.sync.aligned.m16n8k32.row.col.f32.{bf16,f16}.{bf16,f16}.f32 register fragments (lane L,
// g = L/4, q = L%4) -- PTX ISA "Matrix fragments for mma.sp.m16n8k32 with 16-bit types":
//   A (compressed 16 x 16): a[i] = two halves at row g + 8*(i&1), compressed cols 2q + 8*(i>>1) + {0,1}
//   B (dense 32 x 8):       b[i] = two halves at k = 2q + 8*i + {0,1}, col n = g
//   C/D (16 x 8, f32):      c[i] at row g + 8*(i>>1), col 2q + (i&1)
// =====================================================================================================
//
// SFCSR: the unstructured format (see csr_* below): CSR of the masked weight with uint16 column
// indices (C <= 65536), int32 row pointers and a row order sorted by decreasing nnz (row swizzle for
// load balance, as in Sputnik).  Column indices are clamped to C-1 by the kernels, so a corrupt index
// can never read out of bounds.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define SF_HD __host__ __device__ __forceinline__
#else
#define SF_HD inline
#endif

namespace sf {

// ---------------------------------------------------------------------------------------------
// generic helpers
// ---------------------------------------------------------------------------------------------
SF_HD int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
SF_HD int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

constexpr int kRowPad = 64;  // SF24 row padding
constexpr int kColPad = 64;  // SF24 column padding (dense columns)

SF_HD int64_t sf24_rows_padded(int64_t R) { return round_up(R, kRowPad); }
SF_HD int64_t sf24_cols_padded(int64_t C) { return round_up(C, kColPad); }
SF_HD int64_t sf24_meta_words(int64_t R, int64_t C) {
  return sf24_rows_padded(R) / 16 * (sf24_cols_padded(C) / 32) * 16;
}

// ---------------------------------------------------------------------------------------------
// one group of 4: encode / decode
// ---------------------------------------------------------------------------------------------
// keep4: bit j set when column j of the group is kept. Returns the nibble; slot_src[s] is the column
// (0..3) whose value goes to stored slot s, or -1 when slot s must hold 0.
// (No dynamically indexed array: in device code that would live in local memory.)
SF_HD uint32_t sf24_encode_group(uint32_t keep4, int* slot_src) {
  int i0 = -1, i1 = -1;  // the first two kept columns
  for (int j = 0; j < 4; ++j) {
    if ((keep4 >> j) & 1u) {
      if (i0 < 0)
        i0 = j;
      else if (i1 < 0)
        i1 = j;
    }
  }
  if (i1 >= 0) {
    slot_src[0] = i0;
    slot_src[1] = i1;
    return (uint32_t)i0 | ((uint32_t)i1 << 2);
  }
  if (i0 >= 0) {
    int a = i0;
    if (a < 3) {
      slot_src[0] = a;
      slot_src[1] = -1;
      return (uint32_t)a | (3u << 2);
    }
    slot_src[0] = -1;
    slot_src[1] = 3;
    return 2u | (3u << 2);
  }
  slot_src[0] = -1;
  slot_src[1] = -1;
  return 0u | (1u << 2);
}

SF_HD int sf24_nibble_idx(uint32_t nibble, int s) { return (int)((nibble >> (2 * s)) & 3u); }

SF_HD bool sf24_nibble_legal(uint32_t nibble) {
  const uint32_t a = nibble & 3u, b = (nibble >> 2) & 3u;
  return a < b;
}

// ---------------------------------------------------------------------------------------------
// SF24 addressing
// ---------------------------------------------------------------------------------------------
// word index and bit offset of the nibble of the group containing dense column c of row r
SF_HD int64_t sf24_meta_word(int64_t r, int64_t c, int64_t Cp) {
  return ((r / 16) * (Cp / 32) + c / 32) * 16 + 2 * (r % 8) + (c % 32) / 16;
}
SF_HD int sf24_meta_bit(int64_t r, int64_t c) { return (int)(16 * ((r % 16) / 8) + 4 * ((c % 16) / 4)); }

// offset into vals of stored slot s of the group containing dense column c of row r
SF_HD int64_t sf24_val_offset(int64_t r, int64_t c, int s, int64_t Cp) { return r * (Cp / 2) + (c / 4) * 2 + s; }

// word of the metadata register lane L passes for row tile t and k-step ks (selector 0)
SF_HD int64_t sf24_lane_meta_word(int lane, int64_t t, int64_t ks, int64_t Cp) {
  return (t * (Cp / 32) + ks) * 16 + 2 * (lane / 4) + (lane % 2);
}

// ---------------------------------------------------------------------------------------------
// mma.sp m16n8k32 fragment coordinates (see the table at the top)
// ---------------------------------------------------------------------------------------------
// A: register i (0..3), half h (0..1) -> (row, compressed col) inside the 16 x 16 compressed tile
SF_HD void mma_sp_a_coord(int lane, int i, int h, int* row, int* ccol) {
  *row = lane / 4 + 8 * (i & 1);
  *ccol = 2 * (lane % 4) + 8 * (i >> 1) + h;
}
// B: register i (0..3), half h -> (k, n) inside the 32 x 8 tile
SF_HD void mma_sp_b_coord(int lane, int i, int h, int* k, int* n) {
  *k = 2 * (lane % 4) + 8 * i + h;
  *n = lane / 4;
}
// C/D: element i (0..3) -> (row, col) inside the 16 x 8 tile
SF_HD void mma_c_coord(int lane, int i, int* row, int* col) {
  *row = lane / 4 + 8 * (i >> 1);
  *col = 2 * (lane % 4) + (i & 1);
}

// The dense column (0..31 inside the k-step) that compressed column ccol (0..15) of row `row` refers
// to, given the metadata register e passed by the lane pair covering that row (hi half for rows 8..15).
SF_HD int mma_sp_dense_col(uint32_t e_lo_pair0, uint32_t e_lo_pair1, int row, int ccol) {
  // ccol 0..7 -> pair 0 (dense cols 0..15), 8..15 -> pair 1 (dense cols 16..31)
  const uint32_t e = (ccol < 8) ? e_lo_pair0 : e_lo_pair1;
  const int half = row / 8;
  const int g = (ccol % 8) / 2;  // group within the 16 dense columns
  const int s = ccol % 2;
  const uint32_t nib = (e >> (16 * half + 4 * g)) & 0xFu;
  return (ccol / 8) * 16 + 4 * g + sf24_nibble_idx(nib, s);
}

// ---------------------------------------------------------------------------------------------
// implicit GEMM (NHWC conv) index arithmetic
// ---------------------------------------------------------------------------------------------
struct ConvShape {
  int N, H, W, C;        // input NHWC
  int O, KH, KW;         // output channels, kernel
  int SH, SW, PH, PW, DH, DW;
  int HO, WO;            // output spatial
};

// GEMM pixel index p -> (n, oh, ow)
SF_HD void conv_pixel(const ConvShape& s, int64_t p, int* n, int* oh, int* ow) {
  *ow = (int)(p % s.WO);
  const int64_t t = p / s.WO;
  *oh = (int)(t % s.HO);
  *n = (int)(t / s.HO);
}
// reduction index k -> (kh, kw, c), c fastest (masks.reduction_view order)
SF_HD void conv_red(const ConvShape& s, int64_t k, int* kh, int* kw, int* c) {
  *c = (int)(k % s.C);
  const int64_t kp = k / s.C;
  *kw = (int)(kp % s.KW);
  *kh = (int)(kp / s.KW);
}
// element offset into the NHWC input for GEMM (k, p); -1 when the tap falls into the zero padding
SF_HD int64_t conv_input_offset(const ConvShape& s, int64_t k, int64_t p) {
  int n, oh, ow, kh, kw, c;
  conv_pixel(s, p, &n, &oh, &ow);
  conv_red(s, k, &kh, &kw, &c);
  const int ih = oh * s.SH - s.PH + kh * s.DH;
  const int iw = ow * s.SW - s.PW + kw * s.DW;
  if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) return -1;
  return (((int64_t)n * s.H + ih) * s.W + iw) * s.C + c;
}

// ---------------------------------------------------------------------------------------------
// SFCSR helpers
// ---------------------------------------------------------------------------------------------
SF_HD int csr_clamp_col(uint32_t col, int C) { return (int)(col < (uint32_t)C ? col : (uint32_t)(C - 1)); }

}  // namespace sf

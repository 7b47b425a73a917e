// AArch64 NEON path. Compiled twice: as is (neon_kernels: widening multiplies, any ARMv8-A) and by
// kernels_neon_dot.cpp with -march=armv8.2-a+dotprod (neon_dot_kernels: SDOT, 4 int8 products
// summed into each int32 lane per instruction). Same data layout and algebra as the AVX2 path
// (see kernels_avx2.cpp and Acts): 16 weight bytes hold 32 codes; their low nibbles meet the
// first half of the de-interleaved activations and their high nibbles the second.
#include <arm_neon.h>
#include <string.h>

#include "matmul_internal.h"

#ifndef QL_NEON_DOT
#define QL_NEON_DOT 0
#endif

namespace ql {
namespace {

// acc += sum of products of 16 int8 pairs (a . b), in 4 int32 lanes.
inline int32x4_t dot16(int32x4_t acc, int8x16_t a, int8x16_t b) {
#if QL_NEON_DOT
  return vdotq_s32(acc, a, b);
#else
  int16x8_t p = vmull_s8(vget_low_s8(a), vget_low_s8(b));  // |a*b| <= 128 * 127 fits int16
  acc = vpadalq_s16(acc, p);
  return vpadalq_s16(acc, vmull_high_s8(a, b));
#endif
}

float zero_term(const float* s, const uint8_t* zrow, int bits, int offset, const float* xsum,
                int64_t kb) {
  float r = 0.f;
  for (int64_t b = 0; b < kb; ++b)
    r += s[b] * static_cast<float>(zero_point(zrow, b, bits) - offset) * xsum[b];
  return r;
}

template <int MR, int NR>
void int8_tile_t(const Weights& w, const Acts& a, const Tile& t, float* out) {
  const uint8x16_t m4 = vdupq_n_u8(0x0f);
  const uint8x16_t flip = vdupq_n_u8(0x80);
  const int pieces = w.blob / 16;  // 16-byte pieces per block
  const uint8_t* brow[NR];
  for (int j = 0; j < NR; ++j) brow[j] = w.b + (t.n0 + j) * w.row_bytes;
  float32x4_t acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = vdupq_n_f32(0.f);
  for (int64_t b = 0; b < w.k_blocks; ++b) {
    int32x4_t isum[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) isum[i][j] = vdupq_n_s32(0);
    for (int p = 0; p < pieces; ++p) {
      const int64_t boff = b * w.blob + p * 16;
      if (w.bits == 4) {
        const int64_t e0 = b * w.block_size + p * 32;  // first element of the piece
        const int64_t xoff = (e0 & ~int64_t{63}) + ((e0 & 32) ? 16 : 0);
        int8x16_t lo[NR], hi[NR];
        for (int j = 0; j < NR; ++j) {
          const uint8x16_t v = vld1q_u8(brow[j] + boff);
          lo[j] = vreinterpretq_s8_u8(vandq_u8(v, m4));
          hi[j] = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
        }
        for (int i = 0; i < MR; ++i) {
          const int8_t* x = a.q + (t.m0 + i) * a.kq + xoff;
          const int8x16_t xl = vld1q_s8(x), xh = vld1q_s8(x + 32);
          for (int j = 0; j < NR; ++j) isum[i][j] = dot16(dot16(isum[i][j], lo[j], xl), hi[j], xh);
        }
      } else {
        int8x16_t ws[NR];
        for (int j = 0; j < NR; ++j)
          ws[j] = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(brow[j] + boff), flip));
        for (int i = 0; i < MR; ++i) {
          const int8x16_t x = vld1q_s8(a.q + (t.m0 + i) * a.kq + boff);
          for (int j = 0; j < NR; ++j) isum[i][j] = dot16(isum[i][j], ws[j], x);
        }
      }
    }
    for (int i = 0; i < MR; ++i) {
      const float d = a.d[(t.m0 + i) * w.k_blocks + b];
      for (int j = 0; j < NR; ++j)
        acc[i][j] = vfmaq_n_f32(acc[i][j], vcvtq_f32_s32(isum[i][j]), t.scales[j][b] * d);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) out[i * t.nr + j] = vaddvq_f32(acc[i][j]);
}

// 16 codes starting at element e (a multiple of 16), natural order, as 4 x float32x4.
inline void codes16_f32(const uint8_t* row, int64_t e, int bits, float32x4_t f[4]) {
  uint8x16_t c;
  if (bits == 4) {
    const uint8x8_t v = vld1_u8(row + e / 2);
    const uint8x8_t lo = vand_u8(v, vdup_n_u8(0x0f)), hi = vshr_n_u8(v, 4);
    c = vcombine_u8(vzip1_u8(lo, hi), vzip2_u8(lo, hi));
  } else {
    c = vld1q_u8(row + e);
  }
  const uint16x8_t l = vmovl_u8(vget_low_u8(c)), h = vmovl_high_u8(c);
  f[0] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(l)));
  f[1] = vcvtq_f32_u32(vmovl_high_u16(l));
  f[2] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(h)));
  f[3] = vcvtq_f32_u32(vmovl_high_u16(h));
}

template <int MR, int NR>
void fp32_tile_t(const Weights& w, const Acts& a, const Tile& t, float* out) {
  const uint8_t* brow[NR];
  for (int j = 0; j < NR; ++j) brow[j] = w.b + (t.n0 + j) * w.row_bytes;
  float32x4_t acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = vdupq_n_f32(0.f);
  for (int64_t b = 0; b < w.k_blocks; ++b) {
    float32x4_t bacc[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) bacc[i][j] = vdupq_n_f32(0.f);
    for (int g = 0; g < w.block_size; g += 16) {
      const int64_t e = b * w.block_size + g;
      float32x4_t wf[NR][4];
      for (int j = 0; j < NR; ++j) codes16_f32(brow[j], e, w.bits, wf[j]);
      for (int i = 0; i < MR; ++i) {
        const float* x = a.xf + (t.m0 + i) * a.kq + e;
        for (int q = 0; q < 4; ++q) {
          const float32x4_t xv = vld1q_f32(x + 4 * q);
          for (int j = 0; j < NR; ++j) bacc[i][j] = vfmaq_f32(bacc[i][j], wf[j][q], xv);
        }
      }
    }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] = vfmaq_n_f32(acc[i][j], bacc[i][j], t.scales[j][b]);
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) out[i * t.nr + j] = vaddvq_f32(acc[i][j]);
}

template <void (*F1)(const Weights&, const Acts&, const Tile&, float*),
          void (*F2)(const Weights&, const Acts&, const Tile&, float*),
          void (*F3)(const Weights&, const Acts&, const Tile&, float*),
          void (*F4)(const Weights&, const Acts&, const Tile&, float*)>
void pick(const Weights& w, const Acts& a, const Tile& t, float* out, int k) {
  (k == 1 ? F1 : k == 2 ? F2 : k == 3 ? F3 : F4)(w, a, t, out);
}

// Tile shapes as on x86: 1 x NR (NR <= 4) for decode, MR x 1 (MR <= 4) for prefill.
void dispatch(bool int8, const Weights& w, const Acts& a, const Tile& t, float* out) {
  if (int8) {
    if (t.mr == 1)
      pick<int8_tile_t<1, 1>, int8_tile_t<1, 2>, int8_tile_t<1, 3>, int8_tile_t<1, 4>>(w, a, t, out,
                                                                                       t.nr);
    else
      pick<int8_tile_t<1, 1>, int8_tile_t<2, 1>, int8_tile_t<3, 1>, int8_tile_t<4, 1>>(w, a, t, out,
                                                                                       t.mr);
  } else {
    if (t.mr == 1)
      pick<fp32_tile_t<1, 1>, fp32_tile_t<1, 2>, fp32_tile_t<1, 3>, fp32_tile_t<1, 4>>(w, a, t, out,
                                                                                       t.nr);
    else
      pick<fp32_tile_t<1, 1>, fp32_tile_t<2, 1>, fp32_tile_t<3, 1>, fp32_tile_t<4, 1>>(w, a, t, out,
                                                                                       t.mr);
  }
  for (int i = 0; i < t.mr; ++i) {
    const float* xs = a.xsum + (t.m0 + i) * w.k_blocks;
    for (int j = 0; j < t.nr; ++j)
      out[i * t.nr + j] -= zero_term(t.scales[j], t.zeros[j], w.bits, w.offset, xs, w.k_blocks);
  }
}

void half_to_float(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    vst1q_f32(dst + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(src + i))));
  for (; i < n; ++i) {
    float16x4_t h = vreinterpret_f16_u16(vdup_n_u16(src[i]));
    dst[i] = vgetq_lane_f32(vcvt_f32_f16(h), 0);
  }
}

void int8_tile(const Weights& w, const Acts& a, const Tile& t, float* out) {
  if (w.blob < 16) {  // blocks of 16 4-bit codes: 8 bytes, below one vector; use the reference
    scalar_kernels()->int8_tile(w, a, t, out);
    return;
  }
  dispatch(true, w, a, t, out);
}

void fp32_tile(const Weights& w, const Acts& a, const Tile& t, float* out) {
  dispatch(false, w, a, t, out);
}

const PathKernels kKernels = {int8_tile,        fp32_tile,    half_to_float,
                              /*perm=*/64,      /*mr_max=*/4, /*nr_decode=*/4,
                              /*nr_prefill=*/1, nullptr,      nullptr,
                              nullptr};

}  // namespace

#if QL_NEON_DOT
const PathKernels* neon_dot_kernels() {
  return &kKernels;
}
#else
const PathKernels* neon_kernels() {
  return &kKernels;
}
#endif

}  // namespace ql

// x86-64 AVX2 + FMA path. This file is compiled twice: with -mavx2 -mfma (avx2_kernels) and, when
// QL_VNNI is 1, additionally with -mavxvnni (avx_vnni_kernels), where vpdpbusd replaces the
// maddubs/madd pair of the integer dot products.
//
// int8 accuracy, 4-bit weights: per 32 weight bytes (64 codes) of one row,
//   lo = bytes & 0x0f  -> codes of elements 0, 2, ..., 62
//   hi = bytes >> 4    -> codes of elements 1, 3, ..., 63
// meet the de-interleaved activations [x0 x2 ... x62 | x1 x3 ... x63] (see Acts), so one AND and
// one shift unpack 64 codes and no shuffle is needed. Codes are used unsigned (0..15) against
// signed int8 activations (vpmaddubsw's operand order); the zero point is subtracted once per
// block through the activation block sum (Tile). Per block the 16-bit pair sums are accumulated
// across chunks before widening: |sum| <= 4 chunks * 2 * 2 * 15 * 127 = 30480 < 32767 for
// blocks up to 256, so one vpmaddwd per block suffices.
#include <immintrin.h>
#include <string.h>

#include "matmul_internal.h"

#ifndef QL_VNNI
#define QL_VNNI 0
#endif

namespace ql {
namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// sum_b s[b] * (zp[b] - offset) * xsum[b]: the zero-point term of one output (see Tile).
float zero_term(const float* s, const uint8_t* zrow, int bits, int offset, const float* xsum,
                int64_t kb) {
  __m256 acc = _mm256_setzero_ps();
  int64_t b = 0;
  if (zrow == nullptr) {
    for (; b + 8 <= kb; b += 8)
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(s + b), _mm256_loadu_ps(xsum + b), acc);
    float r = hsum(acc);
    for (; b < kb; ++b) r += s[b] * xsum[b];
    return r * static_cast<float>((1 << (bits - 1)) - offset);
  }
  const __m256 off = _mm256_set1_ps(static_cast<float>(offset));
  const __m128i m4 = _mm_set1_epi8(0x0f);
  for (; b + 8 <= kb; b += 8) {
    __m128i z8;
    if (bits == 4) {
      uint32_t v;
      memcpy(&v, zrow + b / 2, 4);
      __m128i x = _mm_cvtsi32_si128(static_cast<int>(v));
      z8 = _mm_unpacklo_epi8(_mm_and_si128(x, m4), _mm_and_si128(_mm_srli_epi16(x, 4), m4));
    } else {
      z8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(zrow + b));
    }
    __m256 zf = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(z8)), off);
    acc =
        _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(s + b), zf), _mm256_loadu_ps(xsum + b), acc);
  }
  float r = hsum(acc);
  for (; b < kb; ++b) r += s[b] * static_cast<float>(zero_point(zrow, b, bits) - offset) * xsum[b];
  return r;
}

inline __m256i loadu256(const void* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// 4-bit x int8, blocks of 64..256 elements: each 32-byte chunk lies inside one block.
template <int MR, int NR>
void int4_tile_wide(const Weights& w, const Acts& a, const Tile& t, float* out) {
  const __m256i m4 = _mm256_set1_epi8(0x0f);
#if !QL_VNNI
  const __m256i ones = _mm256_set1_epi16(1);
#endif
  const int chunks = w.block_size / 64;
  const uint8_t* brow[NR];
  for (int j = 0; j < NR; ++j) brow[j] = w.b + (t.n0 + j) * w.row_bytes;
  // Software prefetch two tiles ahead: the rows of a tile are only K/2 bytes long, too short for
  // the hardware prefetcher to ramp up on each of the NR streams by itself. Into L2 (T1): an L1
  // prefetch holds an L1 fill buffer until DRAM answers, and those few buffers then cap the
  // streaming rate (see kernels_avx512.cpp).
  const int64_t pf = 2 * NR * w.row_bytes;
  const int8_t* xrow[MR];
  const float* drow[MR];
  for (int i = 0; i < MR; ++i) {
    xrow[i] = a.q + (t.m0 + i) * a.kq;
    drow[i] = a.d + (t.m0 + i) * w.k_blocks;
  }
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();

  for (int64_t b = 0; b < w.k_blocks; ++b) {
    __m256i isum[MR][NR];
#if QL_VNNI
    __m256i isum2[MR][NR];
#endif
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) {
        isum[i][j] = _mm256_setzero_si256();
#if QL_VNNI
        isum2[i][j] = _mm256_setzero_si256();
#endif
      }
    for (int c = 0; c < chunks; ++c) {
      const int64_t boff = b * w.blob + c * 32;
      const int64_t xoff = b * w.block_size + c * 64;
      __m256i lo[NR], hi[NR];
      for (int j = 0; j < NR; ++j) {
        if ((c & 1) == 0)
          _mm_prefetch(reinterpret_cast<const char*>(brow[j] + boff + pf), _MM_HINT_T1);
        __m256i v = loadu256(brow[j] + boff);
        lo[j] = _mm256_and_si256(v, m4);
        hi[j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
      }
      for (int i = 0; i < MR; ++i) {
        const __m256i xl = loadu256(xrow[i] + xoff);
        const __m256i xh = loadu256(xrow[i] + xoff + 32);
        for (int j = 0; j < NR; ++j) {
#if QL_VNNI
          // Two accumulators: vpdpbusd has 4-5 cycles of latency, a single chain would stall.
          isum[i][j] = _mm256_dpbusd_avx_epi32(isum[i][j], lo[j], xl);
          isum2[i][j] = _mm256_dpbusd_avx_epi32(isum2[i][j], hi[j], xh);
#else
          // 16-bit lanes here, widened once per block below.
          __m256i p =
              _mm256_add_epi16(_mm256_maddubs_epi16(lo[j], xl), _mm256_maddubs_epi16(hi[j], xh));
          isum[i][j] = _mm256_add_epi16(isum[i][j], p);
#endif
        }
      }
    }
    for (int i = 0; i < MR; ++i) {
      for (int j = 0; j < NR; ++j) {
#if QL_VNNI
        const __m256i s32 = _mm256_add_epi32(isum[i][j], isum2[i][j]);
#else
        const __m256i s32 = _mm256_madd_epi16(isum[i][j], ones);
#endif
        acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32),
                                    _mm256_set1_ps(t.scales[j][b] * drow[i][b]), acc[i][j]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) out[i * t.nr + j] = hsum(acc[i][j]);
}

// 4-bit x int8, blocks of 32: a 32-byte chunk holds blocks b and b+1, one per 128-bit lane.
template <int MR, int NR>
void int4_tile_b32(const Weights& w, const Acts& a, const Tile& t, float* out) {
  const __m256i m4 = _mm256_set1_epi8(0x0f);
#if !QL_VNNI
  const __m256i ones = _mm256_set1_epi16(1);
#endif
  const uint8_t* brow[NR];
  for (int j = 0; j < NR; ++j) brow[j] = w.b + (t.n0 + j) * w.row_bytes;
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t kb = w.k_blocks;
  const int64_t pf = 2 * NR * w.row_bytes;  // as in int4_tile_wide
  for (int64_t b = 0; b < kb; b += 2) {
    const bool pair = b + 1 < kb;
    __m256i lo[NR], hi[NR];
    __m256 sv[NR];
    for (int j = 0; j < NR; ++j) {
      if ((b & 3) == 0)  // once per 64-byte line
        _mm_prefetch(reinterpret_cast<const char*>(brow[j] + b * 16 + pf), _MM_HINT_T1);
      __m256i v = pair ? loadu256(brow[j] + b * 16)
                       : _mm256_zextsi128_si256(
                             _mm_loadu_si128(reinterpret_cast<const __m128i*>(brow[j] + b * 16)));
      lo[j] = _mm256_and_si256(v, m4);
      hi[j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
      const float s1 = pair ? t.scales[j][b + 1] : 0.f;
      sv[j] = _mm256_set_m128(_mm_set1_ps(s1), _mm_set1_ps(t.scales[j][b]));
    }
    for (int i = 0; i < MR; ++i) {
      const int8_t* x = a.q + (t.m0 + i) * a.kq + b * 32;
      const float* d = a.d + (t.m0 + i) * kb + b;
      const __m256 dv = _mm256_set_m128(_mm_set1_ps(pair ? d[1] : 0.f), _mm_set1_ps(d[0]));
      const __m256i xl = loadu256(x);
      const __m256i xh = loadu256(x + 32);
      for (int j = 0; j < NR; ++j) {
#if QL_VNNI
        __m256i s32 = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), lo[j], xl);
        s32 = _mm256_dpbusd_avx_epi32(s32, hi[j], xh);
#else
        __m256i s32 = _mm256_madd_epi16(
            _mm256_add_epi16(_mm256_maddubs_epi16(lo[j], xl), _mm256_maddubs_epi16(hi[j], xh)),
            ones);
#endif
        acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), _mm256_mul_ps(sv[j], dv), acc[i][j]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) out[i * t.nr + j] = hsum(acc[i][j]);
}

// 8-bit x int8: codes used as (q - 128) in int8; the sign trick keeps vpmaddubsw's unsigned
// operand non-negative: |w| * (x * sign(w)), pair sums <= 2 * 128 * 127 = 32512.
template <int MR, int NR>
void int8w_tile(const Weights& w, const Acts& a, const Tile& t, float* out) {
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
#if !QL_VNNI
  const __m256i ones = _mm256_set1_epi16(1);
#endif
  const int chunks = w.block_size / 32;
  const uint8_t* brow[NR];
  for (int j = 0; j < NR; ++j) brow[j] = w.b + (t.n0 + j) * w.row_bytes;
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t b = 0; b < w.k_blocks; ++b) {
    __m256i isum[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) isum[i][j] = _mm256_setzero_si256();
    for (int c = 0; c < chunks; ++c) {
      const int64_t off = b * w.block_size + c * 32;
      __m256i ws[NR], wa[NR];
      for (int j = 0; j < NR; ++j) {
        ws[j] = _mm256_xor_si256(loadu256(brow[j] + off), flip);
        wa[j] = _mm256_sign_epi8(ws[j], ws[j]);
      }
      for (int i = 0; i < MR; ++i) {
        const __m256i x = loadu256(a.q + (t.m0 + i) * a.kq + off);
        for (int j = 0; j < NR; ++j) {
          const __m256i xs = _mm256_sign_epi8(x, ws[j]);
#if QL_VNNI
          isum[i][j] = _mm256_dpbusd_avx_epi32(isum[i][j], wa[j], xs);
#else
          isum[i][j] = _mm256_add_epi32(isum[i][j],
                                        _mm256_madd_epi16(_mm256_maddubs_epi16(wa[j], xs), ones));
#endif
        }
      }
    }
    for (int i = 0; i < MR; ++i) {
      const float d = a.d[(t.m0 + i) * w.k_blocks + b];
      for (int j = 0; j < NR; ++j)
        acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[i][j]),
                                    _mm256_set1_ps(t.scales[j][b] * d), acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) out[i * t.nr + j] = hsum(acc[i][j]);
}

// fp32 accuracy: 8 codes at a time widened to fp32 (natural element order), fp32 FMAs.
inline __m256 codes8_f32(const uint8_t* row, int64_t e, int bits) {
  __m128i c8;
  if (bits == 4) {
    uint32_t v;
    memcpy(&v, row + e / 2, 4);
    const __m128i x = _mm_cvtsi32_si128(static_cast<int>(v));
    const __m128i m4 = _mm_set1_epi8(0x0f);
    c8 = _mm_unpacklo_epi8(_mm_and_si128(x, m4), _mm_and_si128(_mm_srli_epi16(x, 4), m4));
  } else {
    c8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + e));
  }
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c8));
}

template <int MR, int NR>
void fp32_tile_t(const Weights& w, const Acts& a, const Tile& t, float* out) {
  const uint8_t* brow[NR];
  for (int j = 0; j < NR; ++j) brow[j] = w.b + (t.n0 + j) * w.row_bytes;
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  const int bs = w.block_size;
  for (int64_t b = 0; b < w.k_blocks; ++b) {
    __m256 bacc[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) bacc[i][j] = _mm256_setzero_ps();
    for (int g = 0; g < bs; g += 8) {
      const int64_t e = b * bs + g;
      __m256 wv[NR];
      for (int j = 0; j < NR; ++j) wv[j] = codes8_f32(brow[j], e, w.bits);
      for (int i = 0; i < MR; ++i) {
        const __m256 x = _mm256_loadu_ps(a.xf + (t.m0 + i) * a.kq + e);
        for (int j = 0; j < NR; ++j) bacc[i][j] = _mm256_fmadd_ps(wv[j], x, bacc[i][j]);
      }
    }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j)
        acc[i][j] = _mm256_fmadd_ps(bacc[i][j], _mm256_set1_ps(t.scales[j][b]), acc[i][j]);
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) out[i * t.nr + j] = hsum(acc[i][j]);
}

// Tile shapes, one table: m == 1 runs 1 x 4 (four weight streams share each activation load);
// m > 1 runs 4 x 1 (one unpacked weight chunk feeds four activation rows; 4 x 2 would need more
// than the 16 ymm registers). Smaller shapes cover the edges.
template <template <int, int> class K>
struct Dispatch {
  static void run(const Weights& w, const Acts& a, const Tile& t, float* out) {
    switch (t.mr * 8 + t.nr) {
#define QL_CASE(MR, NR) \
  case MR * 8 + NR:     \
    return K<MR, NR>::run(w, a, t, out);
      QL_CASE(1, 1)
      QL_CASE(1, 2)
      QL_CASE(1, 3)
      QL_CASE(1, 4)
      QL_CASE(2, 1)
      QL_CASE(3, 1)
      QL_CASE(4, 1)
#undef QL_CASE
      default:
        return;
    }
  }
};

#define QL_KERNEL(NAME, FN)                                                       \
  template <int MR, int NR>                                                       \
  struct NAME {                                                                   \
    static void run(const Weights& w, const Acts& a, const Tile& t, float* out) { \
      FN<MR, NR>(w, a, t, out);                                                   \
    }                                                                             \
  };
QL_KERNEL(Int4Wide, int4_tile_wide)
QL_KERNEL(Int4B32, int4_tile_b32)
QL_KERNEL(Int8W, int8w_tile)
QL_KERNEL(Fp32, fp32_tile_t)
#undef QL_KERNEL

void half_to_float(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

void apply_zero_terms(const Weights& w, const Acts& a, const Tile& t, float* out) {
  for (int i = 0; i < t.mr; ++i) {
    const float* xs = a.xsum + (t.m0 + i) * w.k_blocks;
    for (int j = 0; j < t.nr; ++j)
      out[i * t.nr + j] -= zero_term(t.scales[j], t.zeros[j], w.bits, w.offset, xs, w.k_blocks);
  }
}

void int8_tile(const Weights& w, const Acts& a, const Tile& t, float* out) {
  if (w.bits == 4 && w.block_size >= 64) {
    Dispatch<Int4Wide>::run(w, a, t, out);
  } else if (w.bits == 4 && w.block_size == 32) {
    Dispatch<Int4B32>::run(w, a, t, out);
  } else if (w.bits == 8 && w.block_size >= 32) {
    Dispatch<Int8W>::run(w, a, t, out);
  } else {
    // Blocks of 16 are not worth a SIMD kernel; the scalar one does the whole tile.
    scalar_kernels()->int8_tile(w, a, t, out);
    return;
  }
  apply_zero_terms(w, a, t, out);
}

void fp32_tile(const Weights& w, const Acts& a, const Tile& t, float* out) {
  Dispatch<Fp32>::run(w, a, t, out);
  apply_zero_terms(w, a, t, out);
}

// 8-float registers for attention_simd.h.
struct Vec8 {
  using F = __m256;
  static constexpr int kWidth = 8;
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F load(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static void store(float* p, F x) { _mm256_storeu_ps(p, x); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static float sum(F x) { return hsum(x); }
  static float max_of(F x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  }
  static F fnma(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  static F ldexp(F y, F n) {
    const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(e, 23)));
  }
  static F zero_below(F x, float t, F e) { return _mm256_and_ps(e, _mm256_cmp_ps(x, set1(t), _CMP_NLT_UQ)); }
  static constexpr int kKeysPerPass = 1;  // 16 registers: four keys' sums for four heads would spill
  static F abs(F x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), x); }
  // sum x[i]^2 over n in double (each square exact), 8 at a time into two accumulators.
  static double sum_squares(const float* x, int64_t n) {
    __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256d lo = _mm256_cvtps_pd(_mm_loadu_ps(x + i)), hi = _mm256_cvtps_pd(_mm_loadu_ps(x + i + 4));
      a0 = _mm256_fmadd_pd(lo, lo, a0);
      a1 = _mm256_fmadd_pd(hi, hi, a1);
    }
    const __m256d a = _mm256_add_pd(a0, a1);
    const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
    double ss = _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
    for (; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
    return ss;
  }
  static F round(F x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static void store_i8(int8_t* p, F x) {
    const __m256i i = _mm256_cvtps_epi32(x);
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(w, w));
  }
};

// Activation quantization for 4-bit blocks of 32..256 (perm 64), bit-identical to
// prepare_row_int8 (the same max, the same 127 / max, one rounding of x * inv, vcvtps2dq's
// round-half-even in place of the 1.5 * 2^23 trick): each 32 elements of a block go as 16 evens
// and 16 odds to their places in its 64-element chunk. The scalar rows cost SmolLM2's g32 decode
// ~0.25 ms a token at batch 1 (and ~4 ms a step at batch 16 on the AVX-512 machine that found it).

// x[i .. i + 8) of a row of k floats, zero from k on.
inline __m256 load_row8(const float* x, int64_t i, int64_t k) {
  const int64_t left = k - i;
  if (left >= 8) return _mm256_loadu_ps(x + i);
  if (left <= 0) return _mm256_setzero_ps();
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(left)), lanes);
  return _mm256_maskload_ps(x + i, mask);
}

// The codes of 16 floats (two registers, in order) as 16 bytes at dst; adds them to *sum.
inline void store_codes16(__m256 a, __m256 b, __m256 inv, int8_t* dst, __m256i* sum) {
  const __m256i lim = _mm256_set1_epi32(127), nlim = _mm256_set1_epi32(-127);
  auto code = [&](__m256 v) {
    return _mm256_max_epi32(nlim, _mm256_min_epi32(lim, _mm256_cvtps_epi32(_mm256_mul_ps(v, inv))));
  };
  const __m256i qa = code(a), qb = code(b);
  *sum = _mm256_add_epi32(*sum, _mm256_add_epi32(qa, qb));
  // int32 -> int16 packs per 128-bit lane: [a0..3 b0..3 | a4..7 b4..7]; reorder the qwords.
  const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(qa, qb), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                   _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
}

bool quantize_row(const float* x, int64_t k, int bits, int bs, int64_t kb, int perm, int8_t* q,
                  float* d, float* xsum) {
  if (bits != 4 || perm != 64 || bs < 32) return false;
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t b = 0; b < kb; ++b) {
    const int64_t e0 = b * bs;
    __m256 amax = _mm256_setzero_ps();
    for (int64_t i = 0; i < bs; i += 8)
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, load_row8(x, e0 + i, k)));
    const float mx = Vec8::max_of(amax);
    const __m256 inv = _mm256_set1_ps(mx > 0.f ? 127.f / mx : 0.f);
    __m256i sum = _mm256_setzero_si256();
    for (int64_t o = e0; o < e0 + bs; o += 32) {
      const __m256 a0 = load_row8(x, o, k), a1 = load_row8(x, o + 8, k);
      const __m256 a2 = load_row8(x, o + 16, k), a3 = load_row8(x, o + 24, k);
      // shuffle_ps picks per 128-bit lane; permute4x64 puts the lanes' halves in order.
      auto pick = [](__m256 lo, __m256 hi, int odd) {
        const __m256 v = odd ? _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1))
                             : _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));
        return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v), 0xD8));
      };
      int8_t* dst = q + (o & ~int64_t{63}) + (o & 63) / 2;  // the group's evens in its chunk
      store_codes16(pick(a0, a1, 0), pick(a2, a3, 0), inv, dst, &sum);
      store_codes16(pick(a0, a1, 1), pick(a2, a3, 1), inv, dst + 32, &sum);
    }
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(2, 3, 0, 1)));
    d[b] = mx / 127.f;
    xsum[b] = d[b] * static_cast<float>(_mm_cvtsi128_si32(s4));
  }
  return true;
}

#include "attention_simd.h"

constexpr AttentionKernels kAttention = attention_kernels<Vec8>();

const PathKernels kKernels = {int8_tile,        fp32_tile,    half_to_float,
                              /*perm=*/64,      /*mr_max=*/4, /*nr_decode=*/4,
                              /*nr_prefill=*/1, nullptr,      quantize_row,
                              &kAttention};

}  // namespace

#if QL_VNNI
const PathKernels* avx_vnni_kernels() {
  return &kKernels;
}
#else
const PathKernels* avx2_kernels() {
  return &kKernels;
}
#endif

}  // namespace ql

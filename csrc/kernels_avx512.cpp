// x86-64 AVX-512 VNNI path (-mavx512f -mavx512bw -mavx512vl -mavx512vnni): int4 (blocks of 32..256)
// and int8 (blocks of 16..256) weights with int8 activations; 4-bit blocks of 16 go to the scalar
// kernel and fp32 activations to the AVX2 kernels (whose features are a subset of this path's).
//
// One 64-byte load holds 128 codes of a row. Activations are de-interleaved per 128 elements
// (Acts, perm = 128), so the low nibbles meet q[0..63] and the high nibbles q[64..127]. Both
// nibbles are brought to the high half of their byte (w & 0xf0 and (w << 4) & 0xf0, i.e.
// 16 * code) so that both vpdpbusd accumulate into one register: 16 * sum(code * x) is exact in
// int32 (|.| <= 2 * 64 * 240 * 127), and the 1/16 is folded into the per-block scale s * d / 16
// (exact: a power of two). Per output and chunk that leaves 2 vpdpbusd + 1 convert + 1 FMA; the
// unpacking is shared by the MR activation rows. A chunk covers 128 / block_size whole blocks for
// blocks of 32..128 (lanes 8l..8l+7 of the codes belong to block 8l / block_size) or half a block
// of 256; per chunk, each block's int32 sum is scaled by s * d, precomputed per tile.
#include <immintrin.h>
#include <string.h>

#include "matmul_internal.h"
#include "quantlab_kernels.h"

namespace ql {
namespace {

// wz[b .. b + 16) = s[b] * (zp[b] - offset) for the 16 blocks from b (a multiple of 16), zero
// past kb: the zero-point weights of one row, laid out so the correction is lane-wise FMAs.
inline __m512 zero_weights16(const float* s, const uint8_t* zrow, int bits, int offset, int64_t kb,
                             int64_t b) {
  const int64_t left = kb - b;
  const __mmask16 mask = left <= 0    ? __mmask16(0)
                         : left >= 16 ? __mmask16(0xffff)
                                      : __mmask16((1u << left) - 1);
  __m512 zf = _mm512_set1_ps(static_cast<float>((1 << (bits - 1)) - offset));
  if (zrow != nullptr && left > 0) {
    __m128i z8;
    if (bits == 4) {
      const __m128i m4 = _mm_set1_epi8(0x0f);
      const int64_t nbytes = (left + 1) / 2 > 8 ? 8 : (left + 1) / 2;
      const __m128i x = _mm_maskz_loadu_epi8(__mmask16((1u << nbytes) - 1), zrow + b / 2);
      z8 = _mm_unpacklo_epi8(_mm_and_si128(x, m4), _mm_and_si128(_mm_srli_epi16(x, 4), m4));
    } else {
      z8 = _mm_maskz_loadu_epi8(mask, zrow + b);
    }
    zf = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(z8)),
                       _mm512_set1_ps(static_cast<float>(offset)));
  }
  return _mm512_maskz_mul_ps(mask, _mm512_maskz_loadu_ps(mask, s + b), zf);
}

// wz[b] = s[b] * (zp[b] - offset) for b < kb, zero up to kb_pad (a multiple of 16).
void zero_weights(const float* s, const uint8_t* zrow, int bits, int offset, int64_t kb,
                  int64_t kb_pad, float* wz) {
  for (int64_t b = 0; b < kb_pad; b += 16)
    _mm512_storeu_ps(wz + b, zero_weights16(s, zrow, bits, offset, kb, b));
}

// Where a 4-bit chunk's 128 codes fall in blocks of bs: chunk c starts block (c * per_chunk) >>
// shift (blocks of 256 take two chunks), and lane l of its int32 sums, codes 8l..8l+7, belongs to
// block lane_block[l] of the chunk.
struct ChunkBlocks {
  int shift, per_chunk;
  __m512i lane_block;
};
inline ChunkBlocks chunk_blocks(int bs) {
  return {bs <= 128 ? 0 : 1, bs <= 128 ? 128 / bs : 1,
          _mm512_srli_epi32(_mm512_slli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6,
                                                               5, 4, 3, 2, 1, 0),
                                              3),
                            __builtin_ctz(bs < 128 ? bs : 128))};
}

// The per-tile tables of the prefill kernels, in this thread's scratch buffer (baseline code owns
// it: no std::vector instantiated under AVX-512 flags here): sd[(i * NR + j) * kb_pad + b] =
// factor * s[j][b] * d[i][b] and, after MR * NR rows of those, wz[j * kb_pad + b] = s[j][b] *
// (zp[j][b] - offset); zero for kb <= b < kb_pad. Returns sd.
template <int MR, int NR>
float* tile_tables(const Weights& w, const Acts& a, const Tile& t, int offset, float factor,
                   int64_t kb_pad) {
  const int64_t kb = w.k_blocks;
  float* sd = thread_scratch(static_cast<size_t>((MR + 1) * NR * kb_pad));
  float* wz = sd + MR * NR * kb_pad;
  for (int j = 0; j < NR; ++j)
    zero_weights(t.scales[j], t.zeros[j], w.bits, offset, kb, kb_pad, wz + j * kb_pad);
  const __m512 f = _mm512_set1_ps(factor);
  for (int i = 0; i < MR; ++i) {
    const float* d = a.d + (t.m0 + i) * kb;
    for (int j = 0; j < NR; ++j) {
      float* dst = sd + (i * NR + j) * kb_pad;
      for (int64_t b = 0; b < kb_pad; b += 16) {
        const __mmask16 mask = b >= kb        ? __mmask16(0)
                               : kb - b >= 16 ? __mmask16(0xffff)
                                              : __mmask16((1u << (kb - b)) - 1);
        const __m512 sv = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, t.scales[j] + b), f);
        _mm512_storeu_ps(dst + b, _mm512_mul_ps(sv, _mm512_maskz_loadu_ps(mask, d + b)));
      }
    }
  }
  return sd;
}

// The zero-point term, lane-wise into the same accumulators so that one reduction remains (wz =
// s * (zp - offset) from tile_tables, xsum = d * sum(q) per block), then the outputs.
template <int MR, int NR>
void finish_tile(const Weights& w, const Acts& a, const Tile& t, const float* wz, int64_t kb_pad,
                 __m512 (&acc)[MR][NR], float* out) {
  const int64_t kb = w.k_blocks;
  for (int i = 0; i < MR; ++i) {
    const float* xs = a.xsum + (t.m0 + i) * kb;
    for (int64_t b = 0; b < kb; b += 16) {
      const __mmask16 mask = kb - b >= 16 ? __mmask16(0xffff) : __mmask16((1u << (kb - b)) - 1);
      const __m512 xv = _mm512_maskz_loadu_ps(mask, xs + b);
      for (int j = 0; j < NR; ++j)
        acc[i][j] = _mm512_fnmadd_ps(_mm512_loadu_ps(wz + j * kb_pad + b), xv, acc[i][j]);
    }
    for (int j = 0; j < NR; ++j) out[i * t.nr + j] = _mm512_reduce_add_ps(acc[i][j]);
  }
}

// Decode (MR = 1) computes each chunk's scales s * d / 16 from the scale and activation rows as
// it goes and adds the zero-point term at the end, without int4_tile's per-tile tables: at
// SmolLM2's K = 576 a tile is only 4.5 chunks per row, and building the tables took a third of
// the kernel's time (perf, decode at 2 threads).
template <int NR, bool SPLIT>
void int4_tile_decode(const Weights& w, const Acts& a, const Tile& t, float* out) {
  const int64_t kb = w.k_blocks;
  const float* d = a.d + t.m0 * kb;
  const int8_t* x = a.q + t.m0 * a.kq;
  const ChunkBlocks cb = chunk_blocks(w.block_size);
  const int shift = cb.shift, blocks_per_chunk = cb.per_chunk;
  const __m512i lane_block = cb.lane_block;
  const __m512i m_hi = _mm512_set1_epi8(static_cast<char>(0xf0));
  const __m128 sixteenth = _mm_set1_ps(1.f / 16);
  const uint8_t* brow[NR];
  for (int j = 0; j < NR; ++j) brow[j] = w.b + (t.n0 + j) * w.row_bytes;
  const int64_t pf = 2 * NR * w.row_bytes;  // as in int4_tile
  __m512 acc[NR];
  for (int j = 0; j < NR; ++j) acc[j] = _mm512_setzero_ps();
  const int64_t chunks = (w.row_bytes + 63) / 64;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t rest = w.row_bytes - c * 64;
    const __mmask64 mask = rest >= 64 ? ~__mmask64(0) : (__mmask64(1) << rest) - 1;
    const int64_t b0 = (c * blocks_per_chunk) >> shift;
    // The chunk's (up to 4) block scales of d / 16, zero past kb (never read past a row).
    const __mmask8 bmask = kb - b0 >= 4 ? __mmask8(15) : __mmask8((1u << (kb - b0)) - 1);
    const __m128 dv = _mm_mul_ps(_mm_maskz_loadu_ps(bmask, d + b0), sixteenth);
    const __m512i xv_lo = _mm512_loadu_si512(x + c * 128), xv_hi = _mm512_loadu_si512(x + c * 128 + 64);
    for (int j = 0; j < NR; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(brow[j] + c * 64 + pf), _MM_HINT_T1);
      const __m512i v = _mm512_maskz_loadu_epi8(mask, brow[j] + c * 64);
      const __m512i lo = _mm512_and_si512(_mm512_slli_epi16(v, 4), m_hi), hi = _mm512_and_si512(v, m_hi);
      const __m512 sum = _mm512_cvtepi32_ps(
          _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xv_lo), hi, xv_hi));
      __m512 scale;
      if constexpr (SPLIT) {
        const __m128 sv = _mm_mul_ps(_mm_maskz_loadu_ps(bmask, t.scales[j] + b0), dv);
        scale = _mm512_permutexvar_ps(lane_block, _mm512_castps128_ps512(sv));
      } else {
        scale = _mm512_set1_ps(t.scales[j][b0] * _mm_cvtss_f32(dv));
      }
      acc[j] = _mm512_fmadd_ps(sum, scale, acc[j]);
    }
  }
  // Zero-point term, lane-wise: s * (zp - offset) * xsum per block (zero_weights without a table).
  const float* xs = a.xsum + t.m0 * kb;
  for (int64_t b = 0; b < kb; b += 16) {
    const __mmask16 bm = kb - b >= 16 ? __mmask16(0xffff) : __mmask16((1u << (kb - b)) - 1);
    const __m512 xv = _mm512_maskz_loadu_ps(bm, xs + b);
    for (int j = 0; j < NR; ++j)
      acc[j] = _mm512_fnmadd_ps(zero_weights16(t.scales[j], t.zeros[j], w.bits, w.offset, kb, b),
                                xv, acc[j]);
  }
  for (int j = 0; j < NR; ++j) out[j] = _mm512_reduce_add_ps(acc[j]);
}

template <int MR, int NR, bool SPLIT>
void int4_tile(const Weights& w, const Acts& a, const Tile& t, float* out) {
  if constexpr (MR == 1) {
    if (w.bits == 4) return int4_tile_decode<NR, SPLIT>(w, a, t, out);
  }
  // +4: the 4-float load of the last chunk's block scales may read past kb (zeros).
  const int64_t kb_pad = (w.k_blocks + 4 + 15) / 16 * 16;
  const float* sd = tile_tables<MR, NR>(w, a, t, w.offset, 1.f / 16, kb_pad);
  const float* wz = sd + MR * NR * kb_pad;
  const ChunkBlocks cb = chunk_blocks(w.block_size);
  const int shift = cb.shift, blocks_per_chunk = cb.per_chunk;
  const __m512i lane_block = cb.lane_block;
  const __m512i m_hi = _mm512_set1_epi8(static_cast<char>(0xf0));
  const uint8_t* brow[NR];
  for (int j = 0; j < NR; ++j) brow[j] = w.b + (t.n0 + j) * w.row_bytes;
  // Software prefetch two tiles ahead into L2 (see kernels_avx2.cpp). Into L2, not L1: a
  // prefetch into L1 holds one of the core's ~16 L1 fill buffers until its line arrives from
  // DRAM, which caps a thread's streaming rate (Little's law: 16 x 64 B / ~100 ns ~ 10 GB/s);
  // L2 tracks several times more misses. Measured on Sapphire Rapids, M = 1, weights from DRAM,
  // one thread: T0 one tile ahead 12.3 GB/s, T1 one to eight tiles ahead 13.1-13.9 GB/s (NTA
  // 5.8 GB/s); with T1, 1 x 1 or 1 x 2 tiles and 16-32 KB distances all gave 14.1-14.6 GB/s.
  const int64_t pf = 2 * NR * w.row_bytes;
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t chunks = (w.row_bytes + 63) / 64;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t rest = w.row_bytes - c * 64;
    const __mmask64 mask = rest >= 64 ? ~__mmask64(0) : (__mmask64(1) << rest) - 1;
    __m512i lo[NR], hi[NR];  // 16 * code, low and high nibbles
    for (int j = 0; j < NR; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(brow[j] + c * 64 + pf), _MM_HINT_T1);
      const __m512i v = _mm512_maskz_loadu_epi8(mask, brow[j] + c * 64);
      lo[j] = _mm512_and_si512(_mm512_slli_epi16(v, 4), m_hi);
      hi[j] = _mm512_and_si512(v, m_hi);
    }
    const int64_t b0 = (c * blocks_per_chunk) >> shift;
    for (int i = 0; i < MR; ++i) {
      const int8_t* x = a.q + (t.m0 + i) * a.kq + c * 128;
      const __m512i xl = _mm512_loadu_si512(x), xh = _mm512_loadu_si512(x + 64);
      for (int j = 0; j < NR; ++j) {
        const __m512i s16 =
            _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[j], xl), hi[j], xh);
        const __m512 sum = _mm512_cvtepi32_ps(s16);  // 16 x the block sums; sd holds s * d / 16
        const float* sdp = sd + (i * NR + j) * kb_pad + b0;
        const __m512 scale =
            SPLIT ? _mm512_permutexvar_ps(lane_block, _mm512_castps128_ps512(_mm_loadu_ps(sdp)))
                  : _mm512_set1_ps(*sdp);
        acc[i][j] = _mm512_fmadd_ps(sum, scale, acc[i][j]);
      }
    }
  }
  finish_tile<MR, NR>(w, a, t, wz, kb_pad, acc, out);
}

// 8-bit codes: one 64-byte load holds 64 codes, the activations keep the natural order, and one
// vpdpbusd takes the codes as unsigned bytes (raw, 0..255) against the int8 activations: per
// output and chunk 1 vpdpbusd + 1 convert + 1 FMA, no unpacking (the 256-bit kernels need the
// sign trick of vpmaddubsw instead). Raw codes mean no offset inside the dot product, so the
// zero-point weight is s * zp (zero_weights with offset 0): sum_b s d dot(c - offset, x) -
// s (zp - offset) xsum = sum_b s d dot(c, x) - s zp xsum. |dot| <= 64 * 255 * 127 per chunk.
// This kernel takes blocks of 16 / 32, which split a chunk: lane l holds codes 4l..4l+3, i.e.
// block 4l / bs of the chunk (blocks of 64..256: int8w_tile_wide below).
template <int MR, int NR>
void int8w_tile_split(const Weights& w, const Acts& a, const Tile& t, float* out) {
  const int64_t kb_pad = (w.k_blocks + 4 + 15) / 16 * 16;  // +4: as in int4_tile
  const float* sd = tile_tables<MR, NR>(w, a, t, /*offset=*/0, 1.f, kb_pad);
  const float* wz = sd + MR * NR * kb_pad;
  const int bs = w.block_size;
  const int log_bs = __builtin_ctz(static_cast<unsigned>(bs));
  const __m512i lane_block = _mm512_srli_epi32(
      _mm512_slli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 2),
      log_bs);
  const uint8_t* brow[NR];
  for (int j = 0; j < NR; ++j) brow[j] = w.b + (t.n0 + j) * w.row_bytes;
  const int64_t pf = 2 * NR * w.row_bytes;  // as in int4_tile
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t chunks = (w.row_bytes + 63) / 64;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t rest = w.row_bytes - c * 64;
    const __mmask64 mask = rest >= 64 ? ~__mmask64(0) : (__mmask64(1) << rest) - 1;
    __m512i v[NR];
    for (int j = 0; j < NR; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(brow[j] + c * 64 + pf), _MM_HINT_T1);
      v[j] = _mm512_maskz_loadu_epi8(mask, brow[j] + c * 64);
    }
    const int64_t b0 = (c * 64) >> log_bs;
    for (int i = 0; i < MR; ++i) {
      const __m512i x = _mm512_loadu_si512(a.q + (t.m0 + i) * a.kq + c * 64);
      for (int j = 0; j < NR; ++j) {
        const __m512 sum = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), v[j], x));
        const float* sdp = sd + (i * NR + j) * kb_pad + b0;
        const __m512 scale =
            _mm512_permutexvar_ps(lane_block, _mm512_castps128_ps512(_mm_loadu_ps(sdp)));
        acc[i][j] = _mm512_fmadd_ps(sum, scale, acc[i][j]);
      }
    }
  }
  finish_tile<MR, NR>(w, a, t, wz, kb_pad, acc, out);
}

// 8-bit codes in blocks of 64..256 (whole chunks): the int32 sums of a block's chunks add up
// exactly (|.| <= 256 * 255 * 127), so each output takes one convert and one FMA per block, with
// the scale s * d and the zero-point term s * zp * xsum computed in scalars as the blocks go: no
// per-tile tables (a decode step's 8-bit head, K = 576, N = 49152, runs ~12k tiles of 5 blocks).
template <int MR, int NR>
void int8w_tile_wide(const Weights& w, const Acts& a, const Tile& t, float* out) {
  const int64_t kb = w.k_blocks;
  const int chunks = w.block_size / 64;
  const uint8_t* brow[NR];
  for (int j = 0; j < NR; ++j) brow[j] = w.b + (t.n0 + j) * w.row_bytes;
  const int64_t pf = 2 * NR * w.row_bytes;  // as in int4_tile
  __m512 acc[MR][NR];
  float zterm[MR][NR] = {};
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t b = 0; b < kb; ++b) {
    __m512i isum[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) isum[i][j] = _mm512_setzero_si512();
    for (int c = 0; c < chunks; ++c) {
      const int64_t off = b * w.block_size + c * 64;
      __m512i v[NR];
      for (int j = 0; j < NR; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(brow[j] + off + pf), _MM_HINT_T1);
        v[j] = _mm512_loadu_si512(brow[j] + off);
      }
      for (int i = 0; i < MR; ++i) {
        const __m512i x = _mm512_loadu_si512(a.q + (t.m0 + i) * a.kq + off);
        for (int j = 0; j < NR; ++j) isum[i][j] = _mm512_dpbusd_epi32(isum[i][j], v[j], x);
      }
    }
    for (int i = 0; i < MR; ++i) {
      const float d = a.d[(t.m0 + i) * kb + b], xs = a.xsum[(t.m0 + i) * kb + b];
      for (int j = 0; j < NR; ++j) {
        const float s = t.scales[j][b];
        acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i][j]), _mm512_set1_ps(s * d), acc[i][j]);
        zterm[i][j] += s * static_cast<float>(zero_point(t.zeros[j], b, 8)) * xs;
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) out[i * t.nr + j] = _mm512_reduce_add_ps(acc[i][j]) - zterm[i][j];
}

// A tile kernel of one weight format, as a template over the tile shape.
template <bool EIGHT, int MR, int NR, bool SPLIT>
void tile(const Weights& w, const Acts& a, const Tile& t, float* out) {
  if constexpr (EIGHT && SPLIT)
    int8w_tile_split<MR, NR>(w, a, t, out);
  else if constexpr (EIGHT)
    int8w_tile_wide<MR, NR>(w, a, t, out);
  else
    int4_tile<MR, NR, SPLIT>(w, a, t, out);
}

template <bool EIGHT, int MR, bool SPLIT>
void by_nr(const Weights& w, const Acts& a, const Tile& t, float* out) {
  switch (t.nr) {
    case 1:
      return tile<EIGHT, MR, 1, SPLIT>(w, a, t, out);
    case 2:
      return tile<EIGHT, MR, 2, SPLIT>(w, a, t, out);
    case 3:
      if constexpr (MR == 1) return tile<EIGHT, 1, 3, SPLIT>(w, a, t, out);
      break;
    case 4:
      if constexpr (MR == 1) return tile<EIGHT, 1, 4, SPLIT>(w, a, t, out);
      break;
  }
}

// Tile shapes, one table: decode (m = 1) runs 1 x 4, four weight streams share each activation
// load; prefill runs 8 x 2, each unpacked weight chunk feeds eight activation rows, and the 16
// fp32 accumulators + 4 unpacked chunks + 2 activation vectors stay within the 32 zmm registers
// (4 x 4 spilled accumulators). Smaller shapes cover the edges.
template <bool EIGHT, bool SPLIT>
void by_mr(const Weights& w, const Acts& a, const Tile& t, float* out) {
  switch (t.mr) {
    case 1:
      return by_nr<EIGHT, 1, SPLIT>(w, a, t, out);
    case 2:
      return by_nr<EIGHT, 2, SPLIT>(w, a, t, out);
    case 3:
      return by_nr<EIGHT, 3, SPLIT>(w, a, t, out);
    case 4:
      return by_nr<EIGHT, 4, SPLIT>(w, a, t, out);
    case 5:
      return by_nr<EIGHT, 5, SPLIT>(w, a, t, out);
    case 6:
      return by_nr<EIGHT, 6, SPLIT>(w, a, t, out);
    case 7:
      return by_nr<EIGHT, 7, SPLIT>(w, a, t, out);
    default:
      return by_nr<EIGHT, 8, SPLIT>(w, a, t, out);
  }
}

// Runs a 256-bit kernel, which takes 1 x nr or (mr <= 4) x 1 tiles, on sub-tiles of those shapes.
void delegate(TileFn fn, const Weights& w, const Acts& a, const Tile& t, float* out) {
  if (t.mr == 1) return fn(w, a, t, out);
  float col[4];
  for (int j = 0; j < t.nr; ++j) {
    for (int i0 = 0; i0 < t.mr; i0 += 4) {
      Tile sub = t;
      sub.m0 = t.m0 + i0;
      sub.mr = t.mr - i0 < 4 ? t.mr - i0 : 4;
      sub.n0 = t.n0 + j;
      sub.nr = 1;
      sub.scales = t.scales + j;
      sub.zeros = t.zeros + j;
      fn(w, a, sub, col);
      for (int i = 0; i < sub.mr; ++i) out[(i0 + i) * t.nr + j] = col[i];
    }
  }
}

void int8_tile(const Weights& w, const Acts& a, const Tile& t, float* out) {
  if (w.bits == 8 && w.block_size >= 16) {
    if (w.block_size < 64)
      by_mr<true, true>(w, a, t, out);
    else
      by_mr<true, false>(w, a, t, out);
    return;
  }
  if (w.block_size < 32)  // 4-bit blocks of 16: not worth a SIMD kernel (as on the AVX2 path)
    return delegate(scalar_kernels()->int8_tile, w, a, t, out);
  if (w.block_size < 128)
    by_mr<false, true>(w, a, t, out);
  else
    by_mr<false, false>(w, a, t, out);
}

void f16_to_f32(const uint16_t* src, float* dst, int64_t n) {
  avx2_kernels()->f16_to_f32(src, dst, n);
}

void fp32_tile(const Weights& w, const Acts& a, const Tile& t, float* out) {
  delegate(avx2_kernels()->fp32_tile, w, a, t, out);
}

// Activation quantization for 4-bit blocks of 32..256 (perm 128), bit-identical to
// prepare_row_int8: the same max, the same 127 / max, one rounding of x * inv, and vcvtps2dq's
// round-half-even (the MXCSR default) in place of the 1.5 * 2^23 trick. Each 32 elements of a
// block go as 16 evens and 16 odds (split with vpermt2ps) to their places in its 128-element chunk
// (permuted_index: the chunk's evens first, then its odds). With blocks of 32 / 64 (the default
// recipe's g32) the scalar rows took SmolLM2's decode at batch 16 ~4 ms a step.

// x[i .. i + 16) of a row of k floats, zero from k on.
inline __m512 load_row16(const float* x, int64_t i, int64_t k) {
  const int64_t left = k - i;
  const __mmask16 m = left >= 16 ? __mmask16(0xffff) : left <= 0 ? 0 : __mmask16((1u << left) - 1);
  return _mm512_maskz_loadu_ps(m, x + i);
}

// The 32 codes of x[o .. o + 32) (zero from k on) as 16 evens at dst[0..16) and 16 odds at
// dst[64..80) (dst: their place in the 128-element chunk); returns their sum in 16 lanes.
inline __m512i quantize32(const float* x, int64_t o, int64_t k, __m512 inv, int8_t* dst) {
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const __m512i lim = _mm512_set1_epi32(127), nlim = _mm512_set1_epi32(-127);
  const __m512 lo = load_row16(x, o, k), hi = load_row16(x, o + 16, k);
  const __m512 ev = _mm512_permutex2var_ps(lo, even, hi), od = _mm512_permutex2var_ps(lo, odd, hi);
  auto code = [&](__m512 v) {
    return _mm512_max_epi32(nlim, _mm512_min_epi32(lim, _mm512_cvtps_epi32(_mm512_mul_ps(v, inv))));
  };
  const __m512i qe = code(ev), qo = code(od);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi32_epi8(qe));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 64), _mm512_cvtepi32_epi8(qo));
  return _mm512_add_epi32(qe, qo);
}

bool quantize_row(const float* x, int64_t k, int bits, int bs, int64_t kb, int perm, int8_t* q,
                  float* d, float* xsum) {
  if (bits != 4 || perm != 128 || bs < 32) return false;
  for (int64_t b = 0; b < kb; ++b) {
    const int64_t e0 = b * bs;
    __m512 amax = _mm512_setzero_ps();
    for (int64_t i = 0; i < bs; i += 16)
      amax = _mm512_max_ps(amax, _mm512_abs_ps(load_row16(x, e0 + i, k)));
    const float mx = _mm512_reduce_max_ps(amax);
    const __m512 inv = _mm512_set1_ps(mx > 0.f ? 127.f / mx : 0.f);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t o = e0; o < e0 + bs; o += 32) {
      int8_t* dst = q + (o & ~int64_t{127}) + (o & 127) / 2;  // the group's evens in its chunk
      sum = _mm512_add_epi32(sum, quantize32(x, o, k, inv, dst));
    }
    d[b] = mx / 127.f;
    xsum[b] = d[b] * static_cast<float>(_mm512_reduce_add_epi32(sum));
  }
  return true;
}

// 16-float registers for attention_simd.h.
struct Vec16 {
  using F = __m512;
  static constexpr int kWidth = 16;
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F load(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static void store(float* p, F x) { _mm512_storeu_ps(p, x); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static float sum(F x) { return _mm512_reduce_add_ps(x); }
  static float max_of(F x) { return _mm512_reduce_max_ps(x); }
  static F fnma(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static F min(F a, F b) { return _mm512_min_ps(a, b); }
  static F ldexp(F y, F n) {
    const __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_mul_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32(e, 23)));
  }
  static F zero_below(F x, float t, F e) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, set1(t), _CMP_NLT_UQ), e);
  }
  static constexpr int kKeysPerPass = 4;
  // out[i] = the sum of a[i]'s lanes, i < 4: pairs of vectors interleaved and added, twice, leave
  // each 128-bit lane holding [a0 a1 a2 a3] partial sums; then the four lanes are added.
  static void sum4(const F* a, float* out) {
    const F t0 = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
    const F t1 = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
    const __m512d d0 = _mm512_castps_pd(t0), d1 = _mm512_castps_pd(t1);
    const F u = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(d0, d1)),
                              _mm512_castpd_ps(_mm512_unpackhi_pd(d0, d1)));
    const __m256 v = _mm256_add_ps(_mm512_castps512_ps256(u),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(u), 1)));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)));
  }
  static F abs(F x) { return _mm512_abs_ps(x); }
  // sum x[i]^2 over n in double (each square exact), 16 at a time into two accumulators.
  static double sum_squares(const float* x, int64_t n) {
    __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m512d lo = _mm512_cvtps_pd(_mm256_loadu_ps(x + i)), hi = _mm512_cvtps_pd(_mm256_loadu_ps(x + i + 8));
      a0 = _mm512_fmadd_pd(lo, lo, a0);
      a1 = _mm512_fmadd_pd(hi, hi, a1);
    }
    double ss = _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
    for (; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
    return ss;
  }
  static F round(F x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static void store_i8(int8_t* p, F x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(x)));
  }
};

#include "attention_simd.h"

const PathKernels kKernels = {int8_tile,        fp32_tile,    f16_to_f32,
                              /*perm=*/128,     /*mr_max=*/8, /*nr_decode=*/4,
                              /*nr_prefill=*/2, nullptr,      quantize_row,
                              &kAvx512Attention};

}  // namespace

// Outside the anonymous namespace: the AMX path's table points at it too (constant-initialized,
// so no load-time code of this file runs on CPUs without AVX-512).
constexpr AttentionKernels kAvx512Attention = attention_kernels<Vec16>();

const PathKernels* avx512_vnni_kernels() {
  return &kKernels;
}

}  // namespace ql

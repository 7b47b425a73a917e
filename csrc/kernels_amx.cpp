// x86-64 AMX-INT8 path (Sapphire Rapids and later), for int4 weights in blocks of 16..256 with
// int8 activations and M >= 8; everything else runs the AVX-512 VNNI kernels.
//
// The product is computed transposed, C (n, m) = W (n, k) . X^T (k, m), so that the weights are
// the A tile and need no transposition: a 64-byte load of one weight row holds the 128 codes of
// a block chunk; its low nibbles are the codes of the 64 activations q[0..63] of the chunk and its
// high nibbles those of q[64..127] (Acts, perm = 128). The activations are laid out once per call
// as B tiles in the VNNI format TDPBUSD wants (row r holds, for each of 16 activation rows, the 4
// bytes k = 4r..4r+3), see prepare(). Then per block:
// - blocks of 128 / 256: the low and high nibbles of a chunk are two A tiles (16 rows x 64 bytes,
//   codes 0..15 as u8), 2 (or 4) TDPBUSD into one int32 C tile, exact;
// - blocks of 16 / 32 / 64 (bs / 2 weight bytes): a chunk holds 128 / bs blocks, whose low and
//   high nibbles are regrouped per block ([low bs/2 | high bs/2], one qword permutation per 64
//   bytes) so that each block is one A tile of 16 rows x bs bytes; its B tile has bs / 4 rows
//   holding the block's even then odd activations. One TDPBUSD per block.
// Then one fp32 FMA per weight row scales the 16 int32 sums by s[n, b] * d[m, b]. The zero point
// enters through the activation block sums as on the other paths.
//
// With bf16 accuracy (QL_ACC_BF16), fp32 activations and blocks of 32..256 (float_rows), the tiles
// are bf16 instead (AMX-BF16):
// each 32-element slice of 16 weight rows is dequantized, s * (q - z), into one bf16 A tile, the
// activations are rounded to bf16 once per call, and TDPBF16PS accumulates in fp32 across the whole
// row. Per block the int8 tiles above need a tile store, 16 vector loads and FMAs for the scales and
// a zero-point pass; with blocks of 32 that bookkeeping, not the products, was the kernel's time
// (perf: ~370 cycles per 16 x 32 block at M = 16, ~120 GMAC/s on two cores). The bf16 products need
// none of it. bf16 keeps 8 significant bits of every weight and activation, where an int8 code
// keeps 7 bits of its block's largest activation (fewer of the smaller ones): measured against the
// fp32 product of the dequantized weights, the bf16 results are 2-3x closer than the int8 ones.
#include <immintrin.h>
#include <string.h>

#include "matmul_internal.h"

namespace ql {
namespace {

constexpr int kT = 16;  // tile rows and int32 columns
// Below 8 activation rows the padded 16-row tiles cost more than the AVX-512 kernel (measured:
// M = 4 is ~20% slower on AMX, M = 8 ~2x faster).
constexpr int kMinRows = 8;

// Activations laid out for AMX, in Acts::extra.
struct AmxActs {
  int64_t subchunks;  // kq / 64: 64-byte K slices
  int64_t kb;
  // Blocks of 128 / 256: (m_tiles, subchunks, 16 rows, 64 bytes) B tiles.
  // Smaller blocks: (m_tiles, kb, bs / 4 rows, 64 bytes), one B tile per block.
  const uint8_t* tiles;
  const float* d;        // (m_tiles, kb, 16): d[m, b] transposed, zero past M
  const float* xsum;     // (m_tiles, kb, 16): xsum[m, b] transposed, zero past M
};

void prepare_int8(const Weights& w, Acts& a, std::vector<uint8_t>& storage) {
  a.extra = nullptr;
  const int bs = w.block_size;
  if (w.bits != 4 || bs < 16 || a.q == nullptr || a.m < kMinRows) return;
  const int64_t m_tiles = (a.m + kT - 1) / kT, sub = a.kq / 64, kb = w.k_blocks;
  const bool small = bs < 128;
  const size_t header = 64;
  const size_t tile_bytes = static_cast<size_t>(m_tiles) * (small ? kb * 16 * bs : sub * 1024);
  const size_t vec_bytes = static_cast<size_t>(m_tiles * kb * kT) * sizeof(float);
  uint8_t* raw = zeroed_storage(storage, header + tile_bytes + 2 * vec_bytes + 64);
  uint8_t* base = raw + (64 - reinterpret_cast<uintptr_t>(raw) % 64) % 64;
  auto* x = reinterpret_cast<AmxActs*>(base);
  uint8_t* tiles = base + header;
  float* d = reinterpret_cast<float*>(tiles + tile_bytes);
  float* xs = d + m_tiles * kb * kT;
  for (int64_t m = 0; m < a.m; ++m) {
    const int64_t mt = m / kT, mi = m % kT;
    const int8_t* q = a.q + m * a.kq;
    if (small) {
      // Block b = chunk c, local block lb: its evens are q[128c + lb * bs/2 ..), its odds
      // q[128c + 64 + lb * bs/2 ..); dword r of [evens | odds] goes to row r, column mi.
      const int half = bs / 2, per_chunk = 128 / bs;
      for (int64_t b = 0; b < kb; ++b) {
        const int8_t* ev = q + (b / per_chunk) * 128 + (b % per_chunk) * half;
        uint8_t* tile = tiles + (mt * kb + b) * 16 * bs + mi * 4;
        for (int r = 0; r < bs / 4; ++r)
          memcpy(tile + r * 64, (r < bs / 8 ? ev : ev + 64 - half) + 4 * r, 4);
      }
    } else {
      // Dword r of the row's 64-byte slice s goes to row r, column mi of tile (mt, s): a scatter
      // with a stride of one tile row.
      const __m512i rows = _mm512_mullo_epi32(
          _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
          _mm512_set1_epi32(16));
      for (int64_t s = 0; s < sub; ++s) {
        int32_t* tile = reinterpret_cast<int32_t*>(tiles + (mt * sub + s) * 1024) + mi;
        _mm512_i32scatter_epi32(tile, rows, _mm512_loadu_si512(q + s * 64), 4);
      }
    }
    for (int64_t b = 0; b < kb; ++b) {
      d[(mt * kb + b) * kT + mi] = a.d[m * kb + b];
      xs[(mt * kb + b) * kT + mi] = a.xsum[m * kb + b];
    }
  }
  x->subchunks = sub;
  x->kb = kb;
  x->tiles = tiles;
  x->d = d;
  x->xsum = xs;
  a.extra = x;
}

// The bf16 layout: float_rows() calls, (m_tiles, slices, 16 rows x 64 bytes) B tiles, a 32-element
// slice of K per tile, row r holding for each of 16 activation rows the bf16 pair of elements
// slice_order(bits, 2r), (2r + 1); zero past K and past M.
struct Bf16Acts {
  int64_t slices;  // kb * bs / 32
  const uint8_t* tiles;
};

// The order of a slice's 32 elements in an A tile row as the weights' dequantization leaves them
// (amx_bf16_tile): 8-bit codes in order; 4-bit codes as [even elements | odd elements], the low and
// high nibbles of the slice's 16 bytes.
inline int slice_order(int bits, int p) {
  if (bits == 8) return p;
  return p < 16 ? 2 * p : 2 * (p - 16) + 1;
}

// The calls the bf16 tiles take with bf16 accuracy (fp32 products otherwise).
bool float_rows(const Weights& w, int64_t m) {
  return m >= kMinRows && (w.bits == 4 || w.bits == 8) && w.block_size % 32 == 0;
}

void prepare_bf16(const Weights& w, Acts& a, std::vector<uint8_t>& storage) {
  const int64_t m_tiles = (a.m + kT - 1) / kT, slices = w.k_blocks * w.block_size / 32;
  const size_t header = 64, tile_bytes = static_cast<size_t>(m_tiles * slices) * 1024;
  uint8_t* raw = zeroed_storage(storage, header + tile_bytes + 64);
  uint8_t* base = raw + (64 - reinterpret_cast<uintptr_t>(raw) % 64) % 64;
  auto* x = reinterpret_cast<Bf16Acts*>(base);
  uint8_t* tiles = base + header;
  // Lane p of the two source vectors (elements 0..15 | 16..31) that word p of the A-order row takes.
  alignas(64) int32_t order[32];
  for (int p = 0; p < 32; ++p) order[p] = slice_order(w.bits, p);
  const __m512i lo_idx = _mm512_load_si512(order), hi_idx = _mm512_load_si512(order + 16);
  const __m512i rows = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(16));
  for (int64_t m = 0; m < a.m; ++m) {
    const float* row = a.x + m * w.k;
    for (int64_t sl = 0; sl < slices; ++sl) {
      const int64_t k0 = sl * 32, left = w.k - k0;
      if (left <= 0) break;  // zero past K (the storage is zeroed)
      const __mmask16 m0 = left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1);
      const __mmask16 m1 = left >= 32 ? 0xffff : left <= 16 ? 0 : static_cast<__mmask16>((1u << (left - 16)) - 1);
      const __m512 v0 = _mm512_maskz_loadu_ps(m0, row + k0), v1 = _mm512_maskz_loadu_ps(m1, row + k0 + 16);
      // words 0..15 from lo_idx, 16..31 from hi_idx (cvtne2ps puts its second operand first)
      const __m512bh bf = _mm512_cvtne2ps_pbh(_mm512_permutex2var_ps(v0, hi_idx, v1),
                                              _mm512_permutex2var_ps(v0, lo_idx, v1));
      int32_t* tile = reinterpret_cast<int32_t*>(tiles + ((m / kT) * slices + sl) * 1024) + m % kT;
      _mm512_i32scatter_epi32(tile, rows, reinterpret_cast<__m512i>(bf), 4);
    }
  }
  x->slices = slices;
  x->tiles = tiles;
  a.extra = x;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Blocks of 128 / 256: all 8 tiles are 16 rows x 64 bytes: 1, 2 = A (weight codes, low / high
// nibbles), 3, 4 = B (activations for those halves), 0, 5, 6, 7 = int32 C accumulators (see
// c_tile()). Smaller blocks: 1 = A, 16 rows x bs bytes; 3 = B, bs / 4 rows x 64 bytes; 2 and 4
// unused; the same C tiles.
TileConfig make_config(int bs) {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = 16;
  }
  if (bs < 128) {
    c.colsb[1] = static_cast<uint16_t>(bs);
    c.rows[3] = static_cast<uint8_t>(bs / 4);
    c.colsb[2] = c.colsb[4] = 0;
    c.rows[2] = c.rows[4] = 0;
  }
  return c;
}

const TileConfig& config(int bs) {
  static const TileConfig cfg[4] = {make_config(16), make_config(32), make_config(64),
                                    make_config(128)};
  return cfg[bs >= 128 ? 3 : __builtin_ctz(static_cast<unsigned>(bs)) - 4];
}

// Tile numbers are immediates in the AMX instructions: these switches pick them at run time.
#define QL_C_TILES(X) X(0) X(5) X(6) X(7)
inline void c_zero(int c) {
  switch (c) {
#define QL_Z(C)    \
  case C:          \
    _tile_zero(C); \
    break;
    QL_C_TILES(QL_Z)
#undef QL_Z
  }
}
inline void c_store(int c, void* dst) {
  switch (c) {
#define QL_S(C)               \
  case C:                     \
    _tile_stored(C, dst, 64); \
    break;
    QL_C_TILES(QL_S)
#undef QL_S
  }
}
inline void c_dot(int c) {  // C += A_lo . B_lo + A_hi . B_hi
  switch (c) {
#define QL_D(C)            \
  case C:                  \
    _tile_dpbusd(C, 1, 3); \
    _tile_dpbusd(C, 2, 4); \
    break;
    QL_C_TILES(QL_D)
#undef QL_D
  }
}
inline void c_dot1(int c) {  // C += A . B (small blocks)
  switch (c) {
#define QL_D1(C)           \
  case C:                  \
    _tile_dpbusd(C, 1, 3); \
    break;
    QL_C_TILES(QL_D1)
#undef QL_D1
  }
}
#undef QL_C_TILES

// C tile of activation tile mt (of mts) for block `block`: with one activation tile the four C
// tiles rotate over consecutive blocks, with two each tile's pair alternates, so that a block's
// TDPBUSDs do not wait for an earlier block's C to be stored and scaled (block_lag blocks back).
inline int c_tile(int mt, int mts, int64_t block) {
  static constexpr int kC[4] = {0, 5, 6, 7};
  return mts == 1 ? kC[block & 3] : mts == 2 ? kC[mt * 2 + (block & 1)] : kC[mt];
}
// How many blocks after its products a block is scaled: C tiles in flight per activation tile - 1.
inline int block_lag(int mts) { return mts == 1 ? 3 : mts == 2 ? 1 : 0; }

template <int Bits>
void scaled_zero_points(const float* scale, const uint8_t* zeros, int64_t kb, float* out);

// Weight rows [n0, n0 + nr) against all activation rows [m0, m0 + mr), mr <= 64: each unpacked
// weight chunk feeds up to four 16-row activation tiles.
void amx_tile(const Weights& w, const Acts& a, const Tile& t, float* out) {
  const AmxActs& x = *static_cast<const AmxActs*>(a.extra);
  const int bs = w.block_size;
  const int64_t mt0 = t.m0 / kT, kb = w.k_blocks, sub = x.subchunks;
  const int mts = (t.mr + kT - 1) / kT;
  // Unpacked weight codes of one 64-byte chunk per row, double-buffered: a chunk is unpacked one
  // iteration before its tile loads read it, so the vector stores have long reached L1 (no
  // store-to-tile-load stall). Blocks of 128 / 256: [low nibbles: 16 rows x 64 | high: 16 x 64];
  // smaller blocks: 16 rows x 128, per block [low bs/2 | high bs/2]. Rows past nr stay zero.
  // The common full tile (16 weight rows, one activation tile) keeps its accumulators in
  // registers: with blocks of 32 the scaling runs once per 32 codes and its loads and stores of
  // acc were most of the kernel's time.
  const bool full = mts == 1 && t.nr == kT;
  alignas(64) uint8_t wbuf[2][2 * kT * 64];
  alignas(64) int32_t cbuf[kT][kT];
  alignas(64) float acc[4][kT][kT];  // [m tile][weight row][activation row]
  // Zeroed only where read before written (8 KB a call was ~4% of the kernel at K = 576).
  if (t.nr < kT) memset(wbuf, 0, sizeof(wbuf));
  if (!full) memset(acc, 0, sizeof(acc));
  // The tiles are configured per thread and call (tiles_begin): other code on the caller's thread
  // (oneDNN in torch, for one) may use AMX between calls.
  const __m512i m4 = _mm512_set1_epi8(0x0f);
  const uint8_t* brow[kT];
  for (int j = 0; j < t.nr; ++j) brow[j] = w.b + (t.n0 + j) * w.row_bytes;
  const int64_t pf = kT * w.row_bytes;  // the next tile of rows, into L2 (see kernels_avx512.cpp)
  const int64_t chunks = (w.row_bytes + 63) / 64;
  // Small blocks: qword q of the regrouped 128 bytes is low (< 8) or high (>= 8) qword perm[q].
  alignas(64) int64_t perm[16] = {};
  if (bs < 128) {
    const int qw = bs / 16;  // qwords per half block
    for (int q = 0; q < 16; ++q) {
      const int lb = q / (2 * qw), within = q % (2 * qw);
      perm[q] = within < qw ? lb * qw + within : 8 + lb * qw + within - qw;
    }
  }
  const __m512i perm0 = _mm512_load_si512(perm), perm1 = _mm512_load_si512(perm + 8);

  auto unpack = [&](int64_t c, uint8_t* dst) {
    const int64_t rest = w.row_bytes - c * 64;
    const __mmask64 mask = rest >= 64 ? ~__mmask64(0) : (__mmask64(1) << rest) - 1;
    for (int j = 0; j < t.nr; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(brow[j] + c * 64 + pf), _MM_HINT_T1);
      const __m512i v = _mm512_maskz_loadu_epi8(mask, brow[j] + c * 64);
      const __m512i lo = _mm512_and_si512(v, m4);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
      if (bs >= 128) {
        _mm512_store_si512(dst + j * 64, lo);
        _mm512_store_si512(dst + (kT + j) * 64, hi);
      } else {
        _mm512_store_si512(dst + j * 128, _mm512_permutex2var_epi64(lo, perm0, hi));
        _mm512_store_si512(dst + j * 128 + 64, _mm512_permutex2var_epi64(lo, perm1, hi));
      }
    }
  };
  // acc[mt][j] += C[j] * s[j, b] * d[:, b]
  auto scale_block = [&](int64_t b) {
    for (int mt = 0; mt < mts; ++mt) {
      c_store(c_tile(mt, mts, b), cbuf);
      const __m512 dv = _mm512_load_ps(x.d + ((mt0 + mt) * kb + b) * kT);
      for (int j = 0; j < t.nr; ++j) {
        const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(t.scales[j][b]), dv);
        _mm512_store_ps(acc[mt][j], _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(cbuf[j])),
                                                    scale, _mm512_load_ps(acc[mt][j])));
      }
    }
  };
  __m512 racc[kT];
  for (int j = 0; j < kT; ++j) racc[j] = _mm512_setzero_ps();
  auto scale_full = [&](int64_t b) {
    c_store(c_tile(0, 1, b), cbuf);
    const __m512 dv = _mm512_load_ps(x.d + (mt0 * kb + b) * kT);
#pragma GCC unroll 16
    for (int j = 0; j < kT; ++j) {
      const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(t.scales[j][b]), dv);
      racc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(cbuf[j])), scale, racc[j]);
    }
  };
  auto scale = [&](int64_t b) { full ? scale_full(b) : scale_block(b); };
  // After block b's products are issued: scale it, or with alternating C tiles the block before
  // it, whose products have had time to finish.
  const int lag = block_lag(mts);
  auto block_done = [&](int64_t b) {
    if (b >= lag) scale(b - lag);
  };
  unpack(0, wbuf[0]);
  if (bs < 128) {
    const int per_chunk = 128 / bs;
    for (int64_t c = 0; c < chunks; ++c) {
      const uint8_t* cur = wbuf[c & 1];
      for (int lb = 0; lb < per_chunk; ++lb) {
        const int64_t b = c * per_chunk + lb;
        if (b >= kb) break;
        _tile_loadd(1, cur + lb * bs, 128);
        for (int mt = 0; mt < mts; ++mt) {
          const int ct = c_tile(mt, mts, b);
          c_zero(ct);
          _tile_loadd(3, x.tiles + ((mt0 + mt) * kb + b) * 16 * bs, 64);
          c_dot1(ct);
        }
        if (lb == 0 && c + 1 < chunks) unpack(c + 1, wbuf[(c + 1) & 1]);
        block_done(b);
      }
    }
  } else {
    const int per_block = bs / 128;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t b = c / per_block;
      if (c % per_block == 0)
        for (int mt = 0; mt < mts; ++mt) c_zero(c_tile(mt, mts, b));
      _tile_loadd(1, wbuf[c & 1], 64);
      _tile_loadd(2, wbuf[c & 1] + kT * 64, 64);
      for (int mt = 0; mt < mts; ++mt) {
        const uint8_t* bt = x.tiles + ((mt0 + mt) * sub + 2 * c) * 1024;
        _tile_loadd(3, bt, 64);
        _tile_loadd(4, bt + 1024, 64);
        c_dot(c_tile(mt, mts, b));
      }
      if (c + 1 < chunks) unpack(c + 1, wbuf[(c + 1) & 1]);  // while the tile products run
      if (c % per_block == per_block - 1) block_done(b);
    }
  }
  for (int64_t b = kb - lag < 0 ? 0 : kb - lag; b < kb; ++b) scale(b);
  // Zero-point term: acc[.][j][m] -= sum_b s[j, b] * zp[j, b] * xsum[m, b] (4-bit codes: offset
  // 0), blocks outer and rows inner: 16 independent sums instead of one chain of kb FMAs per row
  // (perf: the chains were a quarter of the kernel at K = 576, blocks of 32).
  float* wz = thread_scratch(static_cast<size_t>(kT * kb));  // (nr, kb) s * zp
  for (int j = 0; j < t.nr; ++j) scaled_zero_points<4>(t.scales[j], t.zeros[j], kb, wz + j * kb);
  if (full) {
    for (int64_t b = 0; b < kb; ++b) {
      const __m512 xs = _mm512_load_ps(x.xsum + (mt0 * kb + b) * kT);
#pragma GCC unroll 16
      for (int j = 0; j < kT; ++j) racc[j] = _mm512_fnmadd_ps(_mm512_set1_ps(wz[j * kb + b]), xs, racc[j]);
    }
    for (int j = 0; j < kT; ++j) _mm512_store_ps(acc[0][j], racc[j]);
  } else {
    for (int mt = 0; mt < mts; ++mt)
      for (int64_t b = 0; b < kb; ++b) {
        const __m512 xs = _mm512_load_ps(x.xsum + ((mt0 + mt) * kb + b) * kT);
        for (int j = 0; j < t.nr; ++j)
          _mm512_store_ps(acc[mt][j], _mm512_fnmadd_ps(_mm512_set1_ps(wz[j * kb + b]), xs,
                                                       _mm512_load_ps(acc[mt][j])));
      }
  }
  for (int i = 0; i < t.mr; ++i)
    for (int j = 0; j < t.nr; ++j) out[i * t.nr + j] = acc[i / kT][j][i % kT];
}

// bf16 tiles: all 16 rows x 64 bytes; 1, 2 = A (dequantized weights, alternating slices), 3, 4 =
// B (activations, alternating), 0, 5, 6, 7 = fp32 C accumulators (bf16_c_tile()).
TileConfig make_bf16_config() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = 16;
  }
  return c;
}

// The C tile of activation tile mt (of mts) for slice sl: with fewer than four activation tiles
// consecutive slices rotate over 4 / mts accumulators, so that a TDPBF16PS does not wait for the
// previous one into the same tile; they are summed at the end.
inline int bf16_c_tile(int mt, int mts, int64_t sl) {
  static constexpr int kC[4] = {0, 5, 6, 7};
  const int per = mts == 1 ? 4 : mts == 2 ? 2 : 1;
  return kC[mt * per + static_cast<int>(sl % per)];
}

#define QL_BF16_C_TILES(X) X(0) X(5) X(6) X(7)
inline void bf16_dot(int c, int a, int b) {  // C += A . B with A in tile 1 or 2, B in 3 or 4
#define QL_BD(C)                          \
  case C:                                 \
    if (a == 1 && b == 3)                 \
      _tile_dpbf16ps(C, 1, 3);            \
    else if (a == 1)                      \
      _tile_dpbf16ps(C, 1, 4);            \
    else if (b == 3)                      \
      _tile_dpbf16ps(C, 2, 3);            \
    else                                  \
      _tile_dpbf16ps(C, 2, 4);            \
    break;
  switch (c) { QL_BF16_C_TILES(QL_BD) }
#undef QL_BD
}
#undef QL_BF16_C_TILES

// 32 bf16 weights s * (q - z) of one weight row's 32-element slice, in slice_order, into dst;
// s and s * z come from memory (the call's tables, see amx_bf16_tile).
inline void dequant_slice(const uint8_t* codes, int bits, const float* s, const float* sz, uint8_t* dst) {
  const __m512 vs = _mm512_set1_ps(*s), vsz = _mm512_set1_ps(*sz);
  __m512 lo, hi;  // words 0..15, 16..31
  if (bits == 4) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
    lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
    hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
  } else {
    lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes))));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 16))));
  }
  const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_fmsub_ps(hi, vs, vsz), _mm512_fmsub_ps(lo, vs, vsz));
  _mm512_store_si512(dst, reinterpret_cast<__m512i>(v));
}

// out[b] = scale[b] * z_b for the kb blocks of one weight row: its zero points (packed as
// zero_point() reads them; nullptr: 2^(Bits-1)) times its scales, 16 blocks at a time.
template <int Bits>
void scaled_zero_points(const float* scale, const uint8_t* zeros, int64_t kb, float* out) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i nibble_shift = _mm512_slli_epi32(_mm512_and_si512(lane, _mm512_set1_epi32(1)), 2);
  for (int64_t b = 0; b < kb; b += 16) {
    const int64_t n = kb - b < 16 ? kb - b : 16;
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
    __m512i z;
    if (zeros == nullptr) {
      z = _mm512_set1_epi32(1 << (Bits - 1));
    } else if (Bits == 8) {
      z = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, zeros + b));
    } else {  // block b + i: byte (b + i) / 2, low nibble for even i (b is even)
      const __m128i bytes = _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << ((n + 1) / 2)) - 1), zeros + b / 2);
      z = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(bytes, bytes));  // lane i: byte i / 2
      z = _mm512_and_si512(_mm512_srlv_epi32(z, nibble_shift), _mm512_set1_epi32(15));
    }
    _mm512_mask_storeu_ps(out + b, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, scale + b), _mm512_cvtepi32_ps(z)));
  }
}

// Weight rows [n0, n0 + nr) against activation rows [m0, m0 + mr), mr <= 64, on bf16 tiles (see
// the top of the file): per 32-element slice the 16 weight rows are dequantized into one A tile
// (double-buffered: the next slice's rows are written while this slice's products run), which
// meets the slice's B tile of each of the up to four activation tiles.
template <int Bits>
void amx_bf16_tile_t(const Weights& w, const Acts& a, const Tile& t, float* out) {
  const Bf16Acts& x = *static_cast<const Bf16Acts*>(a.extra);  // tiles configured: tiles_begin
  const int mts = (t.mr + kT - 1) / kT;
  const int64_t mt0 = t.m0 / kT, slices = x.slices, per_block = w.block_size / 32, kb = w.k_blocks;
  constexpr int64_t kSliceBytes = 32 * Bits / 8;
  // s * z per weight row and block, (nr, kb), built once per call so that the dequantization loop
  // is vector work only; s itself is read from the scale rows.
  float* szv = thread_scratch(static_cast<size_t>(kT * kb));
  for (int j = 0; j < t.nr; ++j) scaled_zero_points<Bits>(t.scales[j], t.zeros[j], kb, szv + j * kb);
  // The dequantized slices, a ring of kRing 16 x 64-byte A tiles filled kAhead slices ahead of the
  // tile load that reads them: a tile load of rows just written by vector stores waits for those
  // stores to reach L1 (perf: with a one-slice lead, a third of the kernel's time at the load).
  constexpr int kRing = 4, kAhead = 2;
  alignas(64) uint8_t abuf[kRing][kT * 64];
  if (t.nr < kT)  // rows past nr: zero weights
    for (int i = 0; i < kRing; ++i) memset(abuf[i] + t.nr * 64, 0, (kT - t.nr) * 64);
  const uint8_t* b0 = w.b + t.n0 * w.row_bytes;
  const int64_t rb = w.row_bytes, pf = kT * rb;  // the next tile of rows, into L2 (kernels_avx512.cpp)
  auto dequant = [&](int64_t sl) {
    uint8_t* dst = abuf[sl % kRing];
    const int64_t b = sl / per_block, off = sl * kSliceBytes;
    const bool line = off % 64 == 0;
    for (int j = 0; j < t.nr; ++j) {
      const uint8_t* codes = b0 + j * rb + off;
      if (line) _mm_prefetch(reinterpret_cast<const char*>(codes + pf), _MM_HINT_T1);
      dequant_slice(codes, Bits, t.scales[j] + b, szv + j * kb + b, dst + j * 64);
    }
  };
  const int per = mts == 1 ? 4 : mts == 2 ? 2 : 1;  // accumulators per activation tile
  for (int c = 0; c < mts * per; ++c) c_zero(c == 0 ? 0 : c + 4);
  for (int64_t sl = 0; sl < kAhead && sl < slices; ++sl) dequant(sl);
  for (int64_t sl = 0; sl < slices; ++sl) {
    const int at = 1 + static_cast<int>(sl & 1);
    if (at == 1)
      _tile_loadd(1, abuf[sl % kRing], 64);
    else
      _tile_loadd(2, abuf[sl % kRing], 64);
    for (int mt = 0; mt < mts; ++mt) {
      const uint8_t* bt = x.tiles + ((mt0 + mt) * slices + sl) * 1024;
      const int btile = 3 + static_cast<int>((sl * mts + mt) & 1);
      if (btile == 3)
        _tile_loadd(3, bt, 64);
      else
        _tile_loadd(4, bt, 64);
      bf16_dot(bf16_c_tile(mt, mts, sl), at, btile);
    }
    if (sl + kAhead < slices) dequant(sl + kAhead);  // while the products run
  }
  alignas(64) float cbuf[kT][kT];
  for (int mt = 0; mt < mts; ++mt) {
    __m512 sum[kT];
    for (int p = 0; p < per; ++p) {
      c_store(bf16_c_tile(mt, mts, p), cbuf);
      for (int j = 0; j < kT; ++j)
        sum[j] = p == 0 ? _mm512_load_ps(cbuf[j]) : _mm512_add_ps(sum[j], _mm512_load_ps(cbuf[j]));
    }
    alignas(64) float acc[kT][kT];  // [weight row][activation row]
    for (int j = 0; j < kT; ++j) _mm512_store_ps(acc[j], sum[j]);
    const int rows = t.mr - mt * kT < kT ? t.mr - mt * kT : kT;
    for (int i = 0; i < rows; ++i)
      for (int j = 0; j < t.nr; ++j) out[(mt * kT + i) * t.nr + j] = acc[j][i];
  }
}

void amx_bf16_tile(const Weights& w, const Acts& a, const Tile& t, float* out) {
  if (w.bits == 4)
    amx_bf16_tile_t<4>(w, a, t, out);
  else
    amx_bf16_tile_t<8>(w, a, t, out);
}

// The AVX-512 kernels take 1 x (<= 4) and (<= 8) x (<= 2) tiles: run those shapes.
void split(TileFn fn, const Weights& w, const Acts& a, const Tile& t, float* out) {
  const int mstep = t.mr == 1 ? 1 : 8, nstep = t.mr == 1 ? 4 : 2;
  float part[8 * 4];
  for (int i0 = 0; i0 < t.mr; i0 += mstep) {
    for (int j0 = 0; j0 < t.nr; j0 += nstep) {
      Tile sub = t;
      sub.m0 = t.m0 + i0;
      sub.mr = t.mr - i0 < mstep ? t.mr - i0 : mstep;
      sub.n0 = t.n0 + j0;
      sub.nr = t.nr - j0 < nstep ? t.nr - j0 : nstep;
      sub.scales = t.scales + j0;
      sub.zeros = t.zeros + j0;
      fn(w, a, sub, part);
      for (int i = 0; i < sub.mr; ++i)
        for (int j = 0; j < sub.nr; ++j) out[(i0 + i) * t.nr + j0 + j] = part[i * sub.nr + j];
    }
  }
}

void int8_tile(const Weights& w, const Acts& a, const Tile& t, float* out) {
  if (a.x != nullptr) return amx_bf16_tile(w, a, t, out);  // float_rows took the call
  if (a.extra != nullptr && t.mr >= kMinRows) return amx_tile(w, a, t, out);
  // Decode tiles (1 x <= 4) are the AVX-512 kernel's own shape: no sub-tiles, no copy.
  if (t.mr == 1 && t.nr <= 4) return avx512_vnni_kernels()->int8_tile(w, a, t, out);
  split(avx512_vnni_kernels()->int8_tile, w, a, t, out);
}

void fp32_tile(const Weights& w, const Acts& a, const Tile& t, float* out) {
  split(avx512_vnni_kernels()->fp32_tile, w, a, t, out);
}

void prepare(const Weights& w, Acts& a, std::vector<uint8_t>& storage) {
  if (a.x != nullptr)
    prepare_bf16(w, a, storage);
  else
    prepare_int8(w, a, storage);
}

// The tile configuration of a call that runs on tiles (prepare built its layout), per thread.
void tiles_begin(const Weights& w, const Acts& a) {
  if (a.extra == nullptr) return;
  static const TileConfig bf16 = make_bf16_config();
  _tile_loadconfig(a.x != nullptr ? &bf16 : &config(w.block_size));
}
void tiles_end(const Acts& a) {
  if (a.extra != nullptr) _tile_release();
}

bool quantize_row(const float* x, int64_t k, int bits, int bs, int64_t kb, int perm, int8_t* q,
                  float* d, float* xsum) {
  return avx512_vnni_kernels()->quantize_row(x, k, bits, bs, kb, perm, q, d, xsum);
}

void f16_to_f32(const uint16_t* src, float* dst, int64_t n) {
  avx2_kernels()->f16_to_f32(src, dst, n);
}

// Tile shapes: decode (m = 1) as the AVX-512 path, 1 x 4; prefill 16 x 16, one AMX tile.
const PathKernels kKernels = {int8_tile,       fp32_tile,         f16_to_f32,
                              /*perm=*/128,    /*mr_max=*/64,
                              /*nr_decode=*/4, /*nr_prefill=*/16, prepare,    quantize_row,
                              &kAvx512Attention, float_rows, tiles_begin, tiles_end};

}  // namespace

const PathKernels* amx_kernels() {
  return &kKernels;
}

}  // namespace ql

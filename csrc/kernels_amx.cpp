// x86-64 AMX-INT8 path (Sapphire Rapids and later), for int4 weights in blocks of 16..256 and int8
// weights in blocks of 64..256 with int8 activations and M >= 8; everything else runs the AVX-512
// VNNI kernels.
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
// - 8-bit codes: a 64-byte chunk of 16 weight rows is an A tile as it lies in memory (raw codes
//   0..255 as u8, no offset), against the 64-element activation slice; bs / 64 TDPBUSD per block.
// Then one fp32 FMA per weight row scales the 16 int32 sums by s[n, b] * d[m, b]. The zero point
// enters through the activation block sums as on the other paths.
//
// bf16 accuracy runs on bf16 tiles where it can: kernels_amx_bf16.cpp.
#include <string.h>

#include "amx_internal.h"

namespace ql {
namespace {

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
  if (!(w.bits == 4 || (w.bits == 8 && bs >= 64)) || bs < 16 || a.q == nullptr || a.m < kMinRows) return;
  const int64_t m_tiles = (a.m + kT - 1) / kT, sub = a.kq / 64, kb = w.k_blocks;
  const bool small = w.bits == 4 && bs < 128;  // 8-bit rows are in order: the 64-element slices
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

inline void c_dot(int c) {  // C += A_lo . B_lo + A_hi . B_hi
  switch (c) {
#define QL_D(C)            \
  case C:                  \
    _tile_dpbusd(C, 1, 3); \
    _tile_dpbusd(C, 2, 4); \
    break;
    QL_AMX_C_TILES(QL_D)
#undef QL_D
  }
}
inline void c_dot1(int c) {  // C += A . B (small blocks)
  switch (c) {
#define QL_D1(C)           \
  case C:                  \
    _tile_dpbusd(C, 1, 3); \
    break;
    QL_AMX_C_TILES(QL_D1)
#undef QL_D1
  }
}

// C tile of activation tile mt (of mts) for block parity p: with one or two activation tiles the
// C tiles of consecutive blocks alternate, so that the next block's TDPBUSDs do not wait for the
// previous block's C to be stored and scaled.
inline int c_tile(int mt, int mts, int64_t block) {
  static constexpr int kC[4] = {0, 5, 6, 7};
  return mts <= 2 ? kC[mt * 2 + (block & 1)] : kC[mt];
}

// Weight rows [n0, n0 + nr) against all activation rows [m0, m0 + mr), mr <= 64: each unpacked
// weight chunk feeds up to four 16-row activation tiles.
template <bool Full>
void amx_tile_impl(const Weights& w, const Acts& a, const Tile& t, float* out) {
  const AmxActs& x = *static_cast<const AmxActs*>(a.extra);
  const int bs = w.block_size;
  const int64_t mt0 = t.m0 / kT, kb = w.k_blocks, sub = x.subchunks;
  const int mts = Full ? 1 : (t.mr + kT - 1) / kT;
  // Unpacked weight codes of one 64-byte chunk per row, double-buffered: a chunk is unpacked one
  // iteration before its tile loads read it, so the vector stores have long reached L1 (no
  // store-to-tile-load stall). Blocks of 128 / 256: [low nibbles: 16 rows x 64 | high: 16 x 64];
  // smaller blocks: 16 rows x 128, per block [low bs/2 | high bs/2]. Rows past nr stay zero.
  // The common full tile (16 weight rows, one activation tile) keeps its accumulators in
  // registers: with blocks of 32 the scaling runs once per 32 codes and its loads and stores of
  // acc were most of the kernel's time.
  alignas(64) uint8_t wbuf[2][2 * kT * 64];
  alignas(64) int32_t cbuf[kT][kT];
  alignas(64) float acc[4][kT][kT];  // [m tile][weight row][activation row]
  // Zeroed only where read before written (8 KB a call was ~4% of the kernel at K = 576).
  if (t.nr < kT) memset(wbuf, 0, sizeof(wbuf));
  if (!Full) memset(acc, 0, sizeof(acc));  // Full: mts == 1 && t.nr == kT (amx_tile)
  // The tiles are configured per thread and call (tiles_begin): other code on the caller's thread
  // (oneDNN in torch, for one) may use AMX between calls.
  const __m512i m4 = _mm512_set1_epi8(0x0f);
  const uint8_t* brow[kT];
  for (int j = 0; j < t.nr; ++j) brow[j] = w.b + (t.n0 + j) * w.row_bytes;
  const int64_t pf = kT * w.row_bytes;  // the next tile of rows, into L2 (see kernels_avx512.cpp)
  const int64_t chunks = (w.row_bytes + 63) / 64;
  // Small blocks: qword q of the regrouped 128 bytes is low (< 8) or high (>= 8) qword perm[q].
  __m512i perm0, perm1;
  alignas(64) int64_t perm[16];  // not zeroed: a 128-byte rep stos per tile was ~1% of a batch-16 step
  if (bs >= 128) {
    perm0 = perm1 = _mm512_setzero_si512();
  } else {
    const int qw = bs / 16;  // qwords per half block
    for (int q = 0; q < 16; ++q) {
      const int lb = q / (2 * qw), within = q % (2 * qw);
      perm[q] = within < qw ? lb * qw + within : 8 + lb * qw + within - qw;
    }
    perm0 = _mm512_load_si512(perm);
    perm1 = _mm512_load_si512(perm + 8);
  }

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
  // The full tile's 16 accumulators are 16 named variables (r0..r15): as an array GCC kept them in
  // memory (too large to scalarize), a load and a store around every scaling FMA, and the scaling
  // of blocks of 32 was most of a batch-16 step's 4-bit g32 linears. Each macro below repeats its
  // statement for the 16 weight rows.
#define QL_ROWS16(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)
#define QL_DECLARE(J) __m512 r##J = _mm512_setzero_ps();
  QL_ROWS16(QL_DECLARE)
#undef QL_DECLARE
#define QL_SCALE_ROW(J)                                                                             \
  r##J = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(cbuf[J])),                            \
                         _mm512_mul_ps(_mm512_set1_ps(t.scales[J][b_]), dv_), r##J);
#define QL_SCALE_FULL(B)                                                   \
  do {                                                                     \
    const int64_t b_ = (B);                                                \
    c_store(c_tile(0, 1, b_), cbuf);                                       \
    const __m512 dv_ = _mm512_load_ps(x.d + (mt0 * kb + b_) * kT);         \
    QL_ROWS16(QL_SCALE_ROW)                                                \
  } while (0)
#define QL_SCALE(B)            \
  do {                         \
    if constexpr (Full)        \
      QL_SCALE_FULL(B);        \
    else                       \
      scale_block(B);          \
  } while (0)
  // After block b's products are issued: scale it, or with alternating C tiles the block before
  // it, whose products have had time to finish.
#define QL_BLOCK_DONE(B)       \
  do {                         \
    const int64_t bd_ = (B);   \
    if (mts > 2)               \
      QL_SCALE(bd_);           \
    else if (bd_ > 0)          \
      QL_SCALE(bd_ - 1);       \
  } while (0)
  if (w.bits == 8) {
    // 8-bit codes, blocks of 64..256: a 64-byte chunk of the 16 weight rows is the A tile as the
    // rows lie in memory (a partial tile through wbuf), raw codes 0..255 as u8 against activation
    // slice c: one TDPBUSD per chunk, bs / 64 per block.
    const int per_block = bs / 64;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t b = c / per_block;
      if (c % per_block == 0)
        for (int mt = 0; mt < mts; ++mt) c_zero(c_tile(mt, mts, b));
      for (int j = 0; j < t.nr; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(brow[j] + c * 64 + pf), _MM_HINT_T1);
        // and into L1 a few chunks ahead: a tile load that misses L1 stalls the products after
        // it (the head's 576 x 49152 at M = 16: 1.00 -> 0.88 ms).
        _mm_prefetch(reinterpret_cast<const char*>(brow[j] + (c + 4) * 64), _MM_HINT_T0);
      }
      if (t.nr == kT) {
        _tile_loadd(1, brow[0] + c * 64, w.row_bytes);
      } else {
        for (int j = 0; j < t.nr; ++j) memcpy(wbuf[0] + j * 64, brow[j] + c * 64, 64);
        _tile_loadd(1, wbuf[0], 64);
      }
      for (int mt = 0; mt < mts; ++mt) {
        _tile_loadd(3, x.tiles + ((mt0 + mt) * sub + c) * 1024, 64);
        c_dot1(c_tile(mt, mts, b));
      }
      if (c % per_block == per_block - 1) QL_BLOCK_DONE(b);
    }
  } else if (bs < 128) {
    unpack(0, wbuf[0]);
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
        QL_BLOCK_DONE(b);
      }
    }
  } else {
    unpack(0, wbuf[0]);
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
      if (c % per_block == per_block - 1) QL_BLOCK_DONE(b);
    }
  }
  if (mts <= 2) QL_SCALE(kb - 1);
#undef QL_BLOCK_DONE
#undef QL_SCALE
#undef QL_SCALE_FULL
#undef QL_SCALE_ROW
  // Zero-point term: acc[.][j][m] -= sum_b s[j, b] * zp[j, b] * xsum[m, b] (raw codes: no
  // offset), blocks outer and rows inner: 16 independent sums instead of one chain of kb FMAs per row
  // (perf: the chains were a quarter of the kernel at K = 576, blocks of 32).
  float* wz = thread_scratch(static_cast<size_t>(kT * kb));  // (nr, kb) s * zp
  for (int j = 0; j < t.nr; ++j)
    if (w.bits == 8)
      scaled_zero_points<8>(t.scales[j], t.zeros[j], kb, wz + j * kb);
    else
      scaled_zero_points<4>(t.scales[j], t.zeros[j], kb, wz + j * kb);
  if constexpr (Full) {
    for (int64_t b = 0; b < kb; ++b) {
      const __m512 xs = _mm512_load_ps(x.xsum + (mt0 * kb + b) * kT);
#define QL_ZERO_POINT_ROW(J) r##J = _mm512_fnmadd_ps(_mm512_set1_ps(wz[J * kb + b]), xs, r##J);
      QL_ROWS16(QL_ZERO_POINT_ROW)
#undef QL_ZERO_POINT_ROW
    }
    const __m512 r[kT] = {r0, r1, r2, r3, r4, r5, r6, r7, r8, r9, r10, r11, r12, r13, r14, r15};
    store_transposed16(r, t.mr, kT, out, kT);
    return;
  } else {
    for (int mt = 0; mt < mts; ++mt)
      for (int64_t b = 0; b < kb; ++b) {
        const __m512 xs = _mm512_load_ps(x.xsum + ((mt0 + mt) * kb + b) * kT);
        for (int j = 0; j < t.nr; ++j)
          _mm512_store_ps(acc[mt][j], _mm512_fnmadd_ps(_mm512_set1_ps(wz[j * kb + b]), xs,
                                                       _mm512_load_ps(acc[mt][j])));
      }
  }
  for (int mt = 0; mt < mts; ++mt) {
    __m512 r[kT];
    for (int j = 0; j < kT; ++j) r[j] = _mm512_load_ps(acc[mt][j]);  // rows past nr: zero
    store_transposed16(r, t.mr - mt * kT, t.nr, out + mt * kT * t.nr, t.nr);
  }
}

#undef QL_ROWS16

// The full tile (16 weight rows, one activation tile: a batch-16 decode step's shape) compiled on
// its own: with one body for both, its 16 accumulators lived in memory (a load and a store around
// every scaling FMA).
void amx_tile(const Weights& w, const Acts& a, const Tile& t, float* out) {
  if (t.mr <= kT && t.nr == kT)
    amx_tile_impl<true>(w, a, t, out);
  else
    amx_tile_impl<false>(w, a, t, out);
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
  if (a.x != nullptr) return amx_bf16_tile(w, a, t, out);  // amx_bf16_rows took the call
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
    amx_bf16_prepare(w, a, storage);
  else
    prepare_int8(w, a, storage);
}

// The tile configuration of a call that runs on tiles (prepare built its layout), per thread: the
// bf16 tiles use config(128)'s eight tiles of 16 rows x 64 bytes.
void tiles_begin(const Weights& w, const Acts& a) {
  if (a.extra != nullptr) _tile_loadconfig(&config(a.x != nullptr || w.bits == 8 ? 128 : w.block_size));
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

// Tile shapes: decode (m = 1) as the AVX-512 path, 1 x 4; prefill 64 x 16, up to four activation
// tiles per unpacked (or dequantized) weight tile: at 576 x 49152, M = 128, 34.6 -> 18.8 ms.
const PathKernels kKernels = {int8_tile,       fp32_tile,         f16_to_f32,
                              /*perm=*/128,    /*mr_max=*/64,
                              /*nr_decode=*/4, /*nr_prefill=*/16, prepare,    quantize_row,
                              &kAvx512Attention, amx_bf16_rows, tiles_begin, tiles_end};

}  // namespace

const PathKernels* amx_kernels() {
  return &kKernels;
}

}  // namespace ql

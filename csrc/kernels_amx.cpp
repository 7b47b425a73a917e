// x86-64 AMX-INT8 path (Sapphire Rapids and later), for int4 weights in blocks of 128 or 256 with
// int8 activations and M >= 8; everything else runs the AVX-512 VNNI kernels.
//
// The product is computed transposed, C (n, m) = W (n, k) . X^T (k, m), so that the weights are
// the A tile and need no transposition: a 64-byte load of one weight row holds the 128 codes of
// a block chunk; its low nibbles are the codes of the 64 activations q[0..63] of the chunk and its
// high nibbles those of q[64..127] (Acts, perm = 128), giving two A tiles (16 rows x 64 bytes,
// codes 0..15 as u8). The activations are laid out once per call as B tiles in the VNNI format
// TDPBUSD wants (row r holds, for each of 16 activation rows, the 4 bytes k = 4r..4r+3), see
// prepare(). Per block: 2 (or 4) TDPBUSD into one int32 C tile, exact; then one fp32 FMA per
// weight row scales the 16 int32 sums by s[n, b] * d[m, b]. The zero point enters through the
// activation block sums as on the other paths.
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
  const uint8_t* tiles;  // (m_tiles, subchunks, 16 rows, 64 bytes) B tiles
  const float* d;        // (m_tiles, kb, 16): d[m, b] transposed, zero past M
  const float* xsum;     // (m_tiles, kb, 16): xsum[m, b] transposed, zero past M
};

void prepare(const Weights& w, Acts& a, std::vector<uint8_t>& storage) {
  a.extra = nullptr;
  if (w.bits != 4 || w.block_size < 128 || a.q == nullptr || a.m < kMinRows) return;
  const int64_t m_tiles = (a.m + kT - 1) / kT, sub = a.kq / 64, kb = w.k_blocks;
  const size_t header = 64, tile_bytes = static_cast<size_t>(m_tiles * sub) * 1024;
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
    // Dword r of the row's 64-byte slice s goes to row r, column mi of tile (mt, s): a scatter
    // with a stride of one tile row.
    const __m512i rows =
        _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                           _mm512_set1_epi32(16));
    for (int64_t s = 0; s < sub; ++s) {
      int32_t* tile = reinterpret_cast<int32_t*>(tiles + (mt * sub + s) * 1024) + mi;
      _mm512_i32scatter_epi32(tile, rows, _mm512_loadu_si512(q + s * 64), 4);
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

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// All 8 tiles are 16 rows x 64 bytes: 1, 2 = A (weight codes, low / high nibbles), 3, 4 = B
// (activations for those halves), 0, 5, 6, 7 = int32 C accumulators (see c_tile()).
const TileConfig& config() {
  static const TileConfig cfg = [] {
    TileConfig c;
    for (int t = 0; t < 8; ++t) {
      c.colsb[t] = 64;
      c.rows[t] = 16;
    }
    return c;
  }();
  return cfg;
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
#undef QL_C_TILES

// C tile of activation tile mt (of mts) for block parity p: with one or two activation tiles the
// C tiles of consecutive blocks alternate, so that the next block's TDPBUSDs do not wait for the
// previous block's C to be stored and scaled.
inline int c_tile(int mt, int mts, int64_t block) {
  static constexpr int kC[4] = {0, 5, 6, 7};
  return mts <= 2 ? kC[mt * 2 + (block & 1)] : kC[mt];
}

// Weight rows [n0, n0 + nr) against all activation rows [m0, m0 + mr), mr <= 64: each unpacked
// weight chunk feeds up to four 16-row activation tiles.
void amx_tile(const Weights& w, const Acts& a, const Tile& t, float* out) {
  const AmxActs& x = *static_cast<const AmxActs*>(a.extra);
  const int64_t mt0 = t.m0 / kT, kb = w.k_blocks, sub = x.subchunks;
  const int mts = (t.mr + kT - 1) / kT;
  const int chunks = w.block_size / 128;
  // Unpacked weight codes, double-buffered: a chunk is unpacked one iteration before its tile
  // load reads it, so the vector stores have long reached L1 (no store-to-tile-load stall).
  alignas(64) uint8_t abuf[2][2][kT][64] = {};  // [buffer][low / high nibbles][row][byte]
  alignas(64) int32_t cbuf[kT][kT];
  alignas(64) float acc[4][kT][kT] = {};  // [m tile][weight row][activation row]
  // Other code on this thread (oneDNN in torch, for one) may use AMX too: configure every call.
  _tile_loadconfig(&config());
  const __m512i m4 = _mm512_set1_epi8(0x0f);
  const uint8_t* brow[kT];
  for (int j = 0; j < t.nr; ++j) brow[j] = w.b + (t.n0 + j) * w.row_bytes;
  const int64_t pf = kT * w.row_bytes;  // the next tile of rows

  auto unpack = [&](int64_t c, uint8_t(*dst)[kT][64]) {
    for (int j = 0; j < t.nr; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(brow[j] + c * 64 + pf), _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(brow[j] + c * 64);
      _mm512_store_si512(dst[0][j], _mm512_and_si512(v, m4));
      _mm512_store_si512(dst[1][j], _mm512_and_si512(_mm512_srli_epi16(v, 4), m4));
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
  const int64_t total = kb * chunks;
  unpack(0, abuf[0]);
  for (int64_t c = 0; c < total; ++c) {
    const int64_t b = c / chunks;
    if (c % chunks == 0)
      for (int mt = 0; mt < mts; ++mt) c_zero(c_tile(mt, mts, b));
    _tile_loadd(1, abuf[c & 1][0], 64);
    _tile_loadd(2, abuf[c & 1][1], 64);
    for (int mt = 0; mt < mts; ++mt) {
      const uint8_t* bt = x.tiles + ((mt0 + mt) * sub + 2 * c) * 1024;
      _tile_loadd(3, bt, 64);
      _tile_loadd(4, bt + 1024, 64);
      c_dot(c_tile(mt, mts, b));
    }
    if (c + 1 < total) unpack(c + 1, abuf[(c + 1) & 1]);  // while the tile products run
    if (c % chunks == chunks - 1) {
      if (mts > 2)
        scale_block(b);
      else if (b > 0)
        scale_block(b - 1);  // C tiles alternate: this block's products are still running
    }
  }
  if (mts <= 2) scale_block(kb - 1);
  _tile_release();
  // Zero-point term: acc[.][j][m] -= sum_b s[j, b] * (zp[j, b] - offset) * xsum[m, b].
  for (int j = 0; j < t.nr; ++j) {
    for (int mt = 0; mt < mts; ++mt) {
      __m512 v = _mm512_load_ps(acc[mt][j]);
      for (int64_t b = 0; b < kb; ++b) {
        const float wz =
            t.scales[j][b] * static_cast<float>(zero_point(t.zeros[j], b, w.bits) - w.offset);
        v = _mm512_fnmadd_ps(_mm512_set1_ps(wz),
                             _mm512_load_ps(x.xsum + ((mt0 + mt) * kb + b) * kT), v);
      }
      _mm512_store_ps(acc[mt][j], v);
    }
  }
  for (int i = 0; i < t.mr; ++i)
    for (int j = 0; j < t.nr; ++j) out[i * t.nr + j] = acc[i / kT][j][i % kT];
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
  if (a.extra != nullptr && t.mr >= kMinRows) return amx_tile(w, a, t, out);
  split(avx512_vnni_kernels()->int8_tile, w, a, t, out);
}

void fp32_tile(const Weights& w, const Acts& a, const Tile& t, float* out) {
  split(avx512_vnni_kernels()->fp32_tile, w, a, t, out);
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
                              /*perm=*/128,    /*mr_max=*/16,
                              /*nr_decode=*/4, /*nr_prefill=*/16, prepare,    quantize_row};

}  // namespace

const PathKernels* amx_kernels() {
  return &kKernels;
}

}  // namespace ql

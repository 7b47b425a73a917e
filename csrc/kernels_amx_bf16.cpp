// bf16 tiles (AMX-BF16) for bf16 accuracy (QL_ACC_BF16), part of the AMX path (kernels_amx.cpp:
// its table, the tile configuration and the int8 tiles the default int8 accuracy runs on).
//
// With fp32 activations, M >= 8 and blocks of 32..256 (amx_bf16_rows), each 32-element slice of 16
// weight rows is dequantized, s * (q - z), into one bf16 A tile, the activations are rounded to
// bf16 once per call, and TDPBF16PS accumulates in fp32 across the whole row. Per block the int8
// tiles need a tile store, 16 vector loads and FMAs for the scales and a zero-point pass; with
// blocks of 32 that bookkeeping, not the products, was their time (perf: ~370 cycles per 16 x 32
// block at M = 16, ~120 GMAC/s on two cores). The bf16 products need none of it. bf16 keeps 8
// significant bits of every weight and activation, where an int8 code keeps 7 bits of its block's
// largest activation (fewer of the smaller ones): measured against the fp32 product of the
// dequantized weights, the bf16 results are 2-3x closer than the int8 ones
// (benchmarks/bench_accuracy_levels.py).
#include <string.h>

#include "amx_internal.h"

namespace ql {
namespace {

// The bf16 layout of amx_bf16_rows() calls: (m_tiles, slices, 16 rows x 64 bytes) B tiles, a 32-element
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

// Weight rows [n0, n0 + nr) against activation rows [m0, m0 + mr), mr <= 64, on bf16 tiles (see
// the top of the file): per 32-element slice the 16 weight rows are dequantized into A (tile 1),
// which meets the slice's B (tile 3) of each of the up to four activation tiles, summed into C
// tile 0, 5, 6 or 7 per activation tile. (Alternating A and B tiles and four C tiles in rotation
// for one activation tile measured the same: 0.29-0.31 ms for 576 x 3072 at M = 16.)
template <int Bits>
void amx_bf16_tile_t(const Weights& w, const Acts& a, const Tile& t, float* out) {
  const Bf16Acts& x = *static_cast<const Bf16Acts*>(a.extra);
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
  static constexpr int kC[4] = {0, 5, 6, 7};  // C tile of activation tile mt
  for (int mt = 0; mt < mts; ++mt) c_zero(kC[mt]);
  for (int64_t sl = 0; sl < kAhead && sl < slices; ++sl) dequant(sl);
  for (int64_t sl = 0; sl < slices; ++sl) {
    _tile_loadd(1, abuf[sl % kRing], 64);
    for (int mt = 0; mt < mts; ++mt) {
      _tile_loadd(3, x.tiles + ((mt0 + mt) * slices + sl) * 1024, 64);
      switch (kC[mt]) {  // tile numbers are immediates
        case 0: _tile_dpbf16ps(0, 1, 3); break;
        case 5: _tile_dpbf16ps(5, 1, 3); break;
        case 6: _tile_dpbf16ps(6, 1, 3); break;
        default: _tile_dpbf16ps(7, 1, 3); break;
      }
    }
    if (sl + kAhead < slices) dequant(sl + kAhead);  // while the products run
  }
  alignas(64) float acc[kT][kT];  // [weight row][activation row]
  for (int mt = 0; mt < mts; ++mt) {
    c_store(kC[mt], acc);
    __m512 r[kT];
    for (int j = 0; j < kT; ++j) r[j] = _mm512_load_ps(acc[j]);
    store_transposed16(r, t.mr - mt * kT, t.nr, out + mt * kT * t.nr, t.nr);
  }
}

}  // namespace

// The calls the bf16 tiles take with bf16 accuracy (fp32 products otherwise).
bool amx_bf16_rows(const Weights& w, int64_t m) {
  return m >= kMinRows && (w.bits == 4 || w.bits == 8) && w.block_size % 32 == 0;
}

void amx_bf16_prepare(const Weights& w, Acts& a, std::vector<uint8_t>& storage) {
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

void amx_bf16_tile(const Weights& w, const Acts& a, const Tile& t, float* out) {  // tiles configured
  if (w.bits == 4)
    amx_bf16_tile_t<4>(w, a, t, out);
  else
    amx_bf16_tile_t<8>(w, a, t, out);
}

}  // namespace ql

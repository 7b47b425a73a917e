// What the two AMX objects share: kernels_amx.cpp (int8 tiles, the path's table) and
// kernels_amx_bf16.cpp (bf16 tiles for bf16 accuracy). Include it from those files only (it needs
// their -mamx-* flags). Everything defined here has internal linkage: ISA objects must not define
// weak symbols (matmul_internal.h).
#ifndef QUANTLAB_AMX_INTERNAL_H_
#define QUANTLAB_AMX_INTERNAL_H_

#include <immintrin.h>

#include "matmul_internal.h"

namespace ql {
namespace {

constexpr int kT = 16;  // tile rows and int32 columns
// Below 8 activation rows the padded 16-row tiles cost more than the AVX-512 kernel (measured:
// M = 4 is ~20% slower on AMX, M = 8 ~2x faster).
constexpr int kMinRows = 8;

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tile numbers are immediates in the AMX instructions: these switches pick them at run time.
#define QL_AMX_C_TILES(X) X(0) X(5) X(6) X(7)
inline void c_zero(int c) {
  switch (c) {
#define QL_Z(C)    \
  case C:          \
    _tile_zero(C); \
    break;
    QL_AMX_C_TILES(QL_Z)
#undef QL_Z
  }
}
inline void c_store(int c, void* dst) {
  switch (c) {
#define QL_S(C)               \
  case C:                     \
    _tile_stored(C, dst, 64); \
    break;
    QL_AMX_C_TILES(QL_S)
#undef QL_S
  }
}

// out[i * ld + j] = lane i of r[j], for i < rows and j < cols (r: 16 vectors, lanes past what is
// stored are ignored), through a register transpose and one vector store per row: the driver
// reads these rows back with vector loads, which scalar stores here left waiting on failed store
// forwarding (~3% of a batch-16 decode step).
inline void store_transposed16(const __m512* r, int rows, int cols, float* out, int64_t ld) {
  __m512 t[16], u[16];
  for (int k = 0; k < 8; ++k) {  // per 128-bit lane L: rows 2k, 2k+1 at columns 4L..4L+3
    t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  auto lo = [](__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  };
  auto hi = [](__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  };
  for (int k = 0; k < 4; ++k) {  // u[4k + c], lane L: column 4L + c of rows 4k..4k+3
    u[4 * k] = lo(t[4 * k], t[4 * k + 2]);
    u[4 * k + 1] = hi(t[4 * k], t[4 * k + 2]);
    u[4 * k + 2] = lo(t[4 * k + 1], t[4 * k + 3]);
    u[4 * k + 3] = hi(t[4 * k + 1], t[4 * k + 3]);
  }
  const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1);
  auto put = [&](int i, __m512 v) {
    if (i < rows) _mm512_mask_storeu_ps(out + i * ld, mask, v);
  };
  for (int c = 0; c < 4; ++c) {  // the 128-bit lanes of rows 0-3, 4-7, 8-11, 12-15 gathered
    const __m512 v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);
    const __m512 v2 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
    const __m512 w1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    const __m512 w2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
    put(c, _mm512_shuffle_f32x4(v1, w1, 0x88));
    put(4 + c, _mm512_shuffle_f32x4(v2, w2, 0x88));
    put(8 + c, _mm512_shuffle_f32x4(v1, w1, 0xDD));
    put(12 + c, _mm512_shuffle_f32x4(v2, w2, 0xDD));
  }
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

}  // namespace

// The bf16 tiles (kernels_amx_bf16.cpp). Their configuration is config(128)'s in kernels_amx.cpp:
// eight tiles of 16 rows x 64 bytes.
bool amx_bf16_rows(const Weights& w, int64_t m);  // PathKernels::float_rows
void amx_bf16_prepare(const Weights& w, Acts& a, std::vector<uint8_t>& storage);
void amx_bf16_tile(const Weights& w, const Acts& a, const Tile& t, float* out);

}  // namespace ql

#endif  // QUANTLAB_AMX_INTERNAL_H_

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

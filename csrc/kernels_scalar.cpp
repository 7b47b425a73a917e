// The scalar reference path: plain loops in the order of the definition, one output at a time.
// Every SIMD path is tested against it; it is also what runs on a CPU with no SIMD path.
#include "matmul_internal.h"

namespace ql {
namespace {

inline int code_at(const uint8_t* row, int64_t e, int bits) {
  if (bits == 8) return row[e];
  uint8_t byte = row[e >> 1];
  return (e & 1) ? byte >> 4 : byte & 15;
}

// y = sum_b s[b] * d[b] * sum_e (q_w[e] - zp[b]) * q_x[e], the block sum exact in int32.
void int8_tile(const Weights& w, const Acts& a, const Tile& t, float* out) {
  const int bs = w.block_size;
  for (int i = 0; i < t.mr; ++i) {
    const int64_t m = t.m0 + i;
    const int8_t* q = a.q + m * a.kq;
    const float* d = a.d + m * w.k_blocks;
    for (int j = 0; j < t.nr; ++j) {
      const uint8_t* row = w.b + (t.n0 + j) * w.row_bytes;
      float acc = 0.f;
      for (int64_t b = 0; b < w.k_blocks; ++b) {
        const int zp = zero_point(t.zeros[j], b, w.bits);
        int32_t isum = 0;
        for (int64_t e = b * bs; e < (b + 1) * bs && e < w.k; ++e)
          isum += (code_at(row, e, w.bits) - zp) * q[permuted_index(e, w.bits, a.perm)];
        acc += t.scales[j][b] * d[b] * static_cast<float>(isum);
      }
      out[i * t.nr + j] = acc;
    }
  }
}

// y = sum_b s[b] * sum_e (q_w[e] - zp[b]) * x[e] in fp32.
void fp32_tile(const Weights& w, const Acts& a, const Tile& t, float* out) {
  const int bs = w.block_size;
  for (int i = 0; i < t.mr; ++i) {
    const float* x = a.xf + (t.m0 + i) * a.kq;
    for (int j = 0; j < t.nr; ++j) {
      const uint8_t* row = w.b + (t.n0 + j) * w.row_bytes;
      float acc = 0.f;
      for (int64_t b = 0; b < w.k_blocks; ++b) {
        const int zp = zero_point(t.zeros[j], b, w.bits);
        float block = 0.f;
        for (int64_t e = b * bs; e < (b + 1) * bs && e < w.k; ++e)
          block += static_cast<float>(code_at(row, e, w.bits) - zp) * x[e];
        acc += t.scales[j][b] * block;
      }
      out[i * t.nr + j] = acc;
    }
  }
}

const PathKernels kScalar = {int8_tile,        fp32_tile,    nullptr,
                             /*perm=*/64,      /*mr_max=*/1, /*nr_decode=*/1,
                             /*nr_prefill=*/1, nullptr,      nullptr,
                             nullptr};

}  // namespace

const PathKernels* scalar_kernels() {
  return &kScalar;
}

}  // namespace ql

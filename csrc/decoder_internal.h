// What decoder_layer.cpp and decoder_attention.cpp share: the baseline-compiled helpers (dot
// products, e^x, scratch buffers) and the attention entry point. Baseline code only: the ISA files
// reach the attention through AttentionKernels (matmul_internal.h), not through this header.
#ifndef QUANTLAB_DECODER_INTERNAL_H_
#define QUANTLAB_DECODER_INTERNAL_H_

#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "quantlab_kernels.h"

namespace ql {
struct AttentionKernels;
}  // namespace ql

namespace ql {
namespace decoder {

// Below this many multiply-adds attention runs on the calling thread: waking the pool costs more.
constexpr int64_t kParallelAttentionWork = int64_t{1} << 16;
// Independent partial sums of a dot product or a sum: the compiler maps them to vector lanes
// (without -ffast-math it may not reorder one running sum).
constexpr int kLanes = 16;

// The calling thread's buffers, grown and kept across calls (no allocation per layer).
struct LayerScratch {
  std::vector<float> h, q, k, v, ctx, proj, ff, act;
};

// The returned n floats start on a 64-byte boundary: the pool's threads write a linear's output
// rows in tiles of 16 columns, and with rows 16 bytes off a cache line (the allocator's usual
// alignment) two threads' neighbouring tiles shared lines (false sharing: ~3 us of a batch-16
// 576 x 576 linear's ~18).
inline float* grow(std::vector<float>& v, int64_t n) {
  constexpr int64_t kPad = 64 / sizeof(float);
  if (static_cast<int64_t>(v.size()) < n + kPad) v.resize(static_cast<size_t>(n + kPad));
  const uintptr_t misalign = reinterpret_cast<uintptr_t>(v.data()) % 64;
  return v.data() + (misalign == 0 ? 0 : (64 - misalign) / sizeof(float));
}

// e^x within ~2 ulp (Cephes' expf: 2^n * e^r with |r| <= ln2 / 2, r by a two-part ln2, e^r by a
// degree-6 polynomial); 0 below -87.3 (and for -inf). Branch-free and libm-free so that loops of it
// vectorize (with -fno-trapping-math, see CMakeLists.txt): a SmolLM2 decode step takes ~100k of
// them (SiLU over 1536 values and softmax over the cache for each of 30 layers), one libm call
// each.
inline float fast_exp(float x) {
  constexpr float kMagic = 12582912.f;  // 1.5 * 2^23: (v + m) - m rounds v to an integer
  const float xc = std::min(std::max(x, -87.33654f), 88.f);
  const float n = (xc * 1.44269504088896341f + kMagic) - kMagic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.33654f ? 0.f : y * scale;
}

// The sum of kLanes partial sums as a tree (halves added as vectors) rather than a serial chain
// of kLanes - 1 scalar additions after every attention score's dot product.
inline float reduce(float* acc) {
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
  return acc[0];
}

// dot(a, b) with b float or int8 (converted to float, exactly): the same loop for both caches.
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[i + l] * static_cast<float>(b[i + l]);
  float s = reduce(acc);
  for (; i < n; ++i) s += a[i] * static_cast<float>(b[i]);
  return s;
}

inline float total_of(const float* x, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += x[i + l];
  float s = reduce(acc);
  for (; i < n; ++i) s += x[i];
  return s;
}

// Rows of q/k/v with their row strides (a fused projection interleaves them in one buffer).
struct Qkv {
  float *q, *k, *v;
  int64_t ldq, ldkv;
};

// Work on one (batch row, kv head) pair of a decode step: its query heads' and its key's rotary
// embedding and its cache row's store (decoder_layer.cpp).
using PairFn = std::function<void(int64_t b, int64_t kvh)>;

// ctx (rows, heads * head_dim) = grouped-query attention of the step's query rows over the cache,
// for the cache's dtype (decoder_attention.cpp). With `before`, a decode step whose tasks are one
// (batch row, kv head) pair each runs before(b, kvh) at the start of that pair's task (the pair's
// rows are read by that task only); otherwise before runs for every pair first, on this thread.
void attention(const ql_decoder_layer_args* a, const Qkv& p, float* ctx, int threads,
               const PairFn* before = nullptr);
// Whether attention() would run `before` task by task for this call.
bool attention_takes_pairs(const ql_decoder_layer_args* a, int threads);

// The vector kernels (AttentionKernels) of a matmul path (QL_PATH_AUTO: the CPU's best), nullptr
// where it has none: the attention's loops and the layer's elementwise work (decoder_attention.cpp).
const AttentionKernels* vector_kernels(int path);
// The layer's path's (a->path).
const AttentionKernels* vector_kernels(const ql_decoder_layer_args* a);

}  // namespace decoder
}  // namespace ql

#endif  // QUANTLAB_DECODER_INTERNAL_H_

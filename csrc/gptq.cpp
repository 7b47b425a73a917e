// GPTQ's column loop inside one lazy-batch block (arXiv 2210.17323, Algorithm 1), the part of GPTQ
// that is neither a GEMM nor a factorization: per column, round every row to its group's grid,
// scale the error by the inverse Hessian's diagonal and spread it over the block's later columns.
//
// Rows of W are independent given the shared inverse Hessian factor, so the work is split into
// tiles of rows: a tile's slice of the block (block x TILE floats, 128 KB) stays in L2 while all of
// the block's columns walk over it, where the same loop written as whole-row vector ops streams the
// block through memory once per column. Each element's arithmetic is the same sequence of IEEE
// float operations whatever the tiling, thread count or ISA (the file is built without FMA
// contraction), so the codes are the same on every machine.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "quantlab_kernels.h"
#include "thread_pool.h"

namespace {

constexpr int64_t kTile = 64;  // rows of W per tile: a 128-column block of them is 32 KB

inline float clamp(float x, float lo, float hi) {
  x = x < lo ? lo : x;
  return x > hi ? hi : x;
}

// One binary, each CPU's widest vectors: the arithmetic is the same per element in every clone.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define QL_GPTQ_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define QL_GPTQ_CLONES
#endif

// The tile's rows of the block are copied into `tile` (block x width, contiguous) for the walk:
// in place, W^T's rows are n floats apart (64 KB for a 16384-row stacked weight), so a tile's
// 128 slices would all fall into the same few cache sets and evict each other.
QL_GPTQ_CLONES void run_tile(const ql_gptq_columns_args& a, int64_t n0, int64_t n1, float* tile) {
  const int64_t n = a.n;
  const int64_t width = n1 - n0;
  const float max_code = static_cast<float>(a.max_code);
  for (int64_t j = a.begin; j < a.block; ++j) std::memcpy(tile + j * width, a.w + j * n + n0, width * sizeof(float));
  for (int64_t i = a.begin; i < a.end; ++i) {
    const int64_t g = a.group_of_column[i - a.begin];
    const float* scale = a.scales + g * n + n0;
    const float* recip = a.reciprocals + g * n + n0;
    const float* zero = a.zero_points + g * n + n0;
    const float d = a.hinv[i * a.ld_hinv + i];
    const float* w = tile + i * width;
    float* err = a.err + i * n + n0;
    float* q = a.q + i * n + n0;
    uint8_t* code = a.codes + i * n + n0;
    float k[kTile];
    alignas(64) float e[kTile];  // the column's scaled errors, for the updates below
    // roundf (half away from zero), clamped to [0, max_code], as simple loops that each vectorize
    // (one fused loop did not: 5x slower). Clamping to [-1, max_code + 1] first changes no result and
    // keeps the int conversion (trunc) in range; frac = k - whole is exact.
    for (int64_t c = 0; c < width; ++c) k[c] = clamp(w[c] * recip[c] + zero[c], -1.0f, max_code + 1.0f);
    float whole[kTile];
    for (int64_t c = 0; c < width; ++c) whole[c] = static_cast<float>(static_cast<int32_t>(k[c]));
    for (int64_t c = 0; c < width; ++c) {
      const float frac = k[c] - whole[c];
      const float up = frac >= 0.5f ? 1.0f : 0.0f;
      const float down = frac <= -0.5f ? 1.0f : 0.0f;
      k[c] = clamp(whole[c] + up - down, 0.0f, max_code);
    }
    for (int64_t c = 0; c < width; ++c) {
      const float v = (k[c] - zero[c]) * scale[c];
      q[c] = v;
      e[c] = (w[c] - v) / d;
      err[c] = e[c];
    }
    for (int64_t c = 0; c < width; ++c) code[c] = static_cast<uint8_t>(static_cast<int32_t>(k[c]));
    const float* h = a.hinv + i * a.ld_hinv;
    if (width == kTile) {  // a compile-time trip count: the update unrolls into a few vector ops per row
      for (int64_t j = i + 1; j < a.block; ++j) {
        const float hj = h[j];
        float* __restrict wj = tile + j * kTile;
        for (int64_t c = 0; c < kTile; ++c) wj[c] -= hj * e[c];
      }
    } else {
      for (int64_t j = i + 1; j < a.block; ++j) {
        const float hj = h[j];
        float* __restrict wj = tile + j * width;
        for (int64_t c = 0; c < width; ++c) wj[c] -= hj * e[c];
      }
    }
  }
  // The columns not walked yet keep their updates (the caller may refit a group on them).
  for (int64_t j = a.end; j < a.block; ++j) std::memcpy(a.w + j * n + n0, tile + j * width, width * sizeof(float));
}

}  // namespace

extern "C" QL_API int ql_gptq_columns(const ql_gptq_columns_args* args) {
  if (args == nullptr) return QL_ERR_ARGUMENT;
  const ql_gptq_columns_args& a = *args;
  if (a.w == nullptr || a.hinv == nullptr || a.err == nullptr || a.q == nullptr || a.codes == nullptr ||
      a.scales == nullptr || a.reciprocals == nullptr || a.zero_points == nullptr || a.group_of_column == nullptr)
    return QL_ERR_ARGUMENT;
  if (a.n <= 0 || a.block <= 0 || a.begin < 0 || a.end > a.block || a.begin > a.end || a.ld_hinv < a.block ||
      a.max_code < 1 || a.max_code > 255)
    return QL_ERR_ARGUMENT;
  const int64_t tiles = (a.n + kTile - 1) / kTile;
  std::atomic<int64_t> next{0};
  auto work = [&] {
    std::vector<float> tile(static_cast<size_t>(a.block * kTile));
    for (int64_t t; (t = next.fetch_add(1)) < tiles;) {
      const int64_t n0 = t * kTile;
      run_tile(a, n0, n0 + kTile < a.n ? n0 + kTile : a.n, tile.data());
    }
  };
  const int threads = a.threads > 0 ? a.threads : static_cast<int>(std::thread::hardware_concurrency());
  if (threads <= 1 || tiles == 1) {
    work();
  } else {
    ql::ThreadPool::global().run(threads, work);
  }
  return QL_OK;
}

// One Llama-family decoder layer per call (ql_decoder_layer, see quantlab_kernels.h for the maths).
//
// Why one call: a 135M-parameter model's decode step is ~30 layers of ~20 small operations each;
// dispatched one by one from Python (torch ops, ctypes) the dispatch costs more than the maths.
// Here the linears go to the same driver and thread pool as ql_matmul_nbits, attention runs over
// (batch, head) pairs on the pool, and the elementwise parts (hidden ~576..2048) stay on the
// calling thread. Baseline-compiled: plain loops written so the compiler vectorizes them to the
// baseline ISA (SSE2 / NEON), e.g. dot products with independent partial sums.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

#include "quantlab_kernels.h"
#include "thread_pool.h"

namespace ql {
namespace {

// Below this many multiply-adds attention runs on the calling thread: waking the pool costs more.
constexpr int64_t kParallelAttentionWork = int64_t{1} << 16;
// Independent partial sums of a dot product or a sum: the compiler maps them to vector lanes
// (without -ffast-math it may not reorder one running sum).
constexpr int kLanes = 16;

// The calling thread's buffers, grown and kept across calls (no allocation per layer).
struct LayerScratch {
  std::vector<float> h, q, k, v, ctx, proj, ff, act;
};

float* grow(std::vector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
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

float dot(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  float s = reduce(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

float total_of(const float* x, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += x[i + l];
  float s = reduce(acc);
  for (; i < n; ++i) s += x[i];
  return s;
}

// y = x / sqrt(mean(x^2) + eps) * w over n elements (y may be x).
void rms_norm(const float* x, const float* w, int64_t n, float eps, float* y) {
  double ss = 0.0;  // double: the sum of squares of 2048 values without a rounding drift
  for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float inv = 1.f / std::sqrt(static_cast<float>(ss / static_cast<double>(n)) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * inv * w[i];
}

// Rotates one head in place by the angles of cos/sin (head_dim / 2 each).
void rope(float* x, const float* cos, const float* sin, int64_t head_dim, bool interleaved) {
  const int64_t half = head_dim / 2;
  if (interleaved) {
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = x[2 * i], x2 = x[2 * i + 1];
      x[2 * i] = x1 * cos[i] - x2 * sin[i];
      x[2 * i + 1] = x2 * cos[i] + x1 * sin[i];
    }
  } else {
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = x[i], x2 = x[i + half];
      x[i] = x1 * cos[i] - x2 * sin[i];
      x[i + half] = x2 * cos[i] + x1 * sin[i];
    }
  }
}

bool linear_ok(const ql_linear& l, int64_t k, int64_t n) {
  return l.b != nullptr && l.scales != nullptr && l.k == k && l.n == n &&
         (l.bits == 4 || l.bits == 8);
}

int run_linear(const ql_linear& l, const float* x, int64_t m, float* y, int path, int threads) {
  ql_matmul_nbits_args a;
  std::memset(&a, 0, sizeof(a));
  a.a = x;
  a.b = l.b;
  a.scales = l.scales;
  a.zero_points = l.zero_points;
  a.bias = l.bias;
  a.y = y;
  a.m = m;
  a.k = l.k;
  a.n = l.n;
  a.bits = l.bits;
  a.block_size = l.block_size;
  a.dtype = QL_F32;
  a.accuracy = l.accuracy;
  a.path = path;
  a.threads = threads;
  return ql_matmul_nbits(&a);
}

int validate(const ql_decoder_layer_args* a) {
  if (a == nullptr || a->x == nullptr || a->k_cache == nullptr || a->v_cache == nullptr ||
      a->cos == nullptr || a->sin == nullptr || a->input_norm == nullptr || a->post_norm == nullptr)
    return QL_ERR_ARGUMENT;
  if ((a->q_norm == nullptr) != (a->k_norm == nullptr)) return QL_ERR_ARGUMENT;
  if (a->batch <= 0 || a->seq <= 0 || a->past < 0 || a->capacity < a->past + a->seq)
    return QL_ERR_ARGUMENT;
  if (a->hidden <= 0 || a->heads <= 0 || a->kv_heads <= 0 || a->heads % a->kv_heads != 0 ||
      a->head_dim <= 0 || a->head_dim % 2 != 0 || a->intermediate <= 0)
    return QL_ERR_ARGUMENT;
  const int64_t nq = a->heads * a->head_dim, nkv = a->kv_heads * a->head_dim;
  const bool qkv_ok = a->qkv.b != nullptr
                          ? linear_ok(a->qkv, a->hidden, nq + 2 * nkv)
                          : linear_ok(a->q, a->hidden, nq) && linear_ok(a->k, a->hidden, nkv) &&
                                linear_ok(a->v, a->hidden, nkv);
  const bool mlp_ok = a->gate_up.b != nullptr
                          ? linear_ok(a->gate_up, a->hidden, 2 * a->intermediate)
                          : linear_ok(a->gate, a->hidden, a->intermediate) &&
                                linear_ok(a->up, a->hidden, a->intermediate);
  if (!qkv_ok || !mlp_ok || !linear_ok(a->o, nq, a->hidden) ||
      !linear_ok(a->down, a->intermediate, a->hidden))
    return QL_ERR_ARGUMENT;
  return QL_OK;
}

// Rows of q/k/v with their row strides (a fused projection interleaves them in one buffer).
struct Qkv {
  float *q, *k, *v;
  int64_t ldq, ldkv;
};

// out (hd) = scale * sum_j p[j] * v[j] over n rows v (n, hd), in column chunks of kLanes whose
// sums can stay in registers for the whole walk over the rows (instead of a load and a store of
// all of out per row).
void weighted_sum(const float* p, const float* v, int64_t n, int64_t hd, float scale, float* out) {
  int64_t d0 = 0;
  for (; d0 + kLanes <= hd; d0 += kLanes) {
    float acc[kLanes] = {};
    for (int64_t j = 0; j < n; ++j)
      for (int l = 0; l < kLanes; ++l) acc[l] += p[j] * v[j * hd + d0 + l];
    for (int l = 0; l < kLanes; ++l) out[d0 + l] = acc[l] * scale;
  }
  for (; d0 < hd; ++d0) {
    float acc = 0.f;
    for (int64_t j = 0; j < n; ++j) acc += p[j] * v[j * hd + d0];
    out[d0] = acc * scale;
  }
}

// Attention of query head `head` of batch row `b` over its kv head's cache; ctx row stride nq.
// Three passes over the visible keys (scores, exponentials, weighted values), each a loop that
// vectorizes.
void attend(const ql_decoder_layer_args* a, const Qkv& p, int64_t b, int64_t head, float* ctx,
            float* s) {
  const int64_t hd = a->head_dim, seq = a->seq, past = a->past, total = past + seq;
  const int64_t kvh = head / (a->heads / a->kv_heads);
  const float* kc = a->k_cache + (b * a->kv_heads + kvh) * a->capacity * hd;  // (capacity, hd)
  const float* vc = a->v_cache + (b * a->kv_heads + kvh) * a->capacity * hd;
  const int64_t* mask = a->key_mask != nullptr ? a->key_mask + b * total : nullptr;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  for (int64_t t = 0; t < seq; ++t) {
    const int64_t r = b * seq + t;
    const float* q = p.q + r * p.ldq + head * hd;
    float* out = ctx + r * a->heads * hd + head * hd;
    const int64_t visible = past + t + 1;  // causal: cache positions 0 .. past + t
    float max = -INFINITY;
    for (int64_t j = 0; j < visible; ++j) {
      s[j] = mask != nullptr && mask[j] == 0 ? -INFINITY : dot(q, kc + j * hd, hd) * scale;
      max = std::max(max, s[j]);
    }
    std::fill(out, out + hd, 0.f);
    if (max == -INFINITY) {
      // Nothing visible (a padding row): the additive-mask softmax puts equal weight on every key.
      for (int64_t j = 0; j < total; ++j)
        for (int64_t d = 0; d < hd; ++d) out[d] += vc[j * hd + d];
      for (int64_t d = 0; d < hd; ++d) out[d] /= static_cast<float>(total);
      continue;
    }
    for (int64_t j = 0; j < visible; ++j) s[j] = fast_exp(s[j] - max);  // masked: exp(-inf) = 0
    const float sum = total_of(s, visible);
    weighted_sum(s, vc, visible, hd, 1.f / sum, out);
  }
}

// act = silu(gate) * up = gate / (1 + e^-gate) * up over n elements.
void swiglu(const float* gate, const float* up, int64_t n, float* act) {
  for (int64_t e = 0; e < n; ++e) act[e] = gate[e] / (1.f + fast_exp(-gate[e])) * up[e];
}

void attention(const ql_decoder_layer_args* a, const Qkv& p, float* ctx, int threads) {
  const int64_t tasks = a->batch * a->heads;
  const int64_t work = tasks * a->seq * (a->past + a->seq) * a->head_dim;
  if (threads <= 1 || work < kParallelAttentionWork) {
    thread_local std::vector<float> scores;
    float* s = grow(scores, a->past + a->seq);
    for (int64_t i = 0; i < tasks; ++i) attend(a, p, i / a->heads, i % a->heads, ctx, s);
    return;
  }
  std::atomic<int64_t> next{0};
  ThreadPool::global().run(static_cast<int>(std::min<int64_t>(threads, tasks)), [&] {
    thread_local std::vector<float> scores;
    float* s = grow(scores, a->past + a->seq);
    for (int64_t i; (i = next.fetch_add(1)) < tasks;)
      attend(a, p, i / a->heads, i % a->heads, ctx, s);
  });
}

int decoder_layer(const ql_decoder_layer_args* a) {
  int status = validate(a);
  if (status != QL_OK) return status;
  // Asked once: hardware_concurrency() is a system call (or a /sys read) each time.
  static const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int threads = a->threads > 0 ? a->threads : cores;
  const int64_t rows = a->batch * a->seq, hidden = a->hidden, hd = a->head_dim,
                ff = a->intermediate;
  const int64_t nq = a->heads * hd, nkv = a->kv_heads * hd, half = hd / 2;
  thread_local LayerScratch sc;
  float* h = grow(sc.h, rows * hidden);
  float* ctx = grow(sc.ctx, rows * nq);
  float* proj = grow(sc.proj, rows * hidden);

  for (int64_t r = 0; r < rows; ++r)
    rms_norm(a->x + r * hidden, a->input_norm, hidden, a->eps, h + r * hidden);
  Qkv p;
  if (a->qkv.b != nullptr) {
    float* y = grow(sc.q, rows * (nq + 2 * nkv));  // (rows, [q | k | v])
    if ((status = run_linear(a->qkv, h, rows, y, a->path, threads)) != QL_OK) return status;
    p = {y, y + nq, y + nq + nkv, nq + 2 * nkv, nq + 2 * nkv};
  } else {
    p = {grow(sc.q, rows * nq), grow(sc.k, rows * nkv), grow(sc.v, rows * nkv), nq, nkv};
    if ((status = run_linear(a->q, h, rows, p.q, a->path, threads)) != QL_OK) return status;
    if ((status = run_linear(a->k, h, rows, p.k, a->path, threads)) != QL_OK) return status;
    if ((status = run_linear(a->v, h, rows, p.v, a->path, threads)) != QL_OK) return status;
  }

  // Per-head norms and RoPE, then the new keys and values into the cache at past .. past + seq - 1.
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = r / a->seq, pos = a->past + r % a->seq;
    const float *cos = a->cos + r * half, *sin = a->sin + r * half;
    for (int64_t i = 0; i < a->heads; ++i) {
      float* q = p.q + r * p.ldq + i * hd;
      if (a->q_norm != nullptr) rms_norm(q, a->q_norm, hd, a->eps, q);
      rope(q, cos, sin, hd, a->rope_interleaved != 0);
    }
    for (int64_t i = 0; i < a->kv_heads; ++i) {
      float* k = p.k + r * p.ldkv + i * hd;
      if (a->k_norm != nullptr) rms_norm(k, a->k_norm, hd, a->eps, k);
      rope(k, cos, sin, hd, a->rope_interleaved != 0);
      const int64_t at =
          ((b * a->kv_heads + i) * a->capacity + pos) * hd;  // (batch, kv_heads, capacity, hd)
      std::memcpy(a->k_cache + at, k, static_cast<size_t>(hd) * sizeof(float));
      std::memcpy(a->v_cache + at, p.v + r * p.ldkv + i * hd,
                  static_cast<size_t>(hd) * sizeof(float));
    }
  }
  attention(a, p, ctx, threads);
  if ((status = run_linear(a->o, ctx, rows, proj, a->path, threads)) != QL_OK) return status;
  for (int64_t e = 0; e < rows * hidden; ++e) a->x[e] += proj[e];

  for (int64_t r = 0; r < rows; ++r)
    rms_norm(a->x + r * hidden, a->post_norm, hidden, a->eps, h + r * hidden);
  float* act = grow(sc.act, rows * ff);
  if (a->gate_up.b != nullptr) {
    float* y = grow(sc.ff, rows * 2 * ff);  // (rows, [gate | up])
    if ((status = run_linear(a->gate_up, h, rows, y, a->path, threads)) != QL_OK) return status;
    for (int64_t r = 0; r < rows; ++r) {
      const float *g = y + r * 2 * ff, *u = g + ff;
      swiglu(g, u, ff, act + r * ff);
    }
  } else {
    float* g = grow(sc.ff, rows * 2 * ff);  // gate rows, then up rows
    float* u = g + rows * ff;
    if ((status = run_linear(a->gate, h, rows, g, a->path, threads)) != QL_OK) return status;
    if ((status = run_linear(a->up, h, rows, u, a->path, threads)) != QL_OK) return status;
    swiglu(g, u, rows * ff, act);
  }
  if ((status = run_linear(a->down, act, rows, proj, a->path, threads)) != QL_OK) return status;
  for (int64_t e = 0; e < rows * hidden; ++e) a->x[e] += proj[e];
  return QL_OK;
}

}  // namespace
}  // namespace ql

extern "C" QL_API int ql_decoder_layer(const ql_decoder_layer_args* args) {
  try {
    return ql::decoder_layer(args);
  } catch (...) {
    return QL_ERR_INTERNAL;
  }
}

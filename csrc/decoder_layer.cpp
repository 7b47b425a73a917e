// One Llama-family decoder layer per call (ql_decoder_layer, see quantlab_kernels.h for the maths).
//
// Attention is in decoder_attention.cpp. Why one call: a 135M-parameter model's decode step is ~30 layers of ~20 small operations each;
// dispatched one by one from Python (torch ops, ctypes) the dispatch costs more than the maths.
// Here the linears go to the same driver and thread pool as ql_matmul_nbits, attention runs over
// (batch, kv head, query rows) tasks on the pool (a kv head's query heads together, so that each
// cache row is read once per step, not once per query head), and the elementwise parts (hidden
// ~576..2048) stay on the calling thread. Baseline-compiled: plain loops written so the compiler
// vectorizes them to the baseline ISA (SSE2 / NEON), e.g. dot products with independent partial
// sums, and one loop in the compilers' generic vector types (f4 below), no intrinsics.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

#include "decoder_internal.h"
#include "matmul_internal.h"
#include "quantlab_kernels.h"
#include "thread_pool.h"

namespace ql {
namespace {

using decoder::fast_exp;
using decoder::grow;
using decoder::LayerScratch;
using decoder::Qkv;

// Below this many nanoseconds of per-row work (rows x a row's estimated cost) it runs on the calling
// thread: handing rows to the pool costs ~2-4 us (the hand-over, and the rows' cache lines moving
// to the other core and back). Measured at batch 16, SmolLM2, 2 threads, serial vs pool: the two
// norms (~0.1 us a row of 576) 1.6 vs 5.2 us, rotary + cache rows (~0.5 us a row) 7.7 vs 8.2 us,
// SwiGLU (~0.8 us a row of 1536) 13.0 vs 8.8 us.
constexpr int64_t kParallelRowNs = 8000;

// y = x / sqrt(mean(x^2) + eps) * w over n elements (y may be x). The sum of squares is in double
// (2048 values without a rounding drift; each square is exact in double), in 8 independent partial
// sums (one chain of n dependent adds was ~0.5 us a row of 576); the path's vector code
// (AttentionKernels::rms_norm) where it has one. The float result is the same for any order of the
// double sum except within ~1e-16 of a float rounding boundary.
void rms_norm(const float* x, const float* w, int64_t n, float eps, float* y,
              const AttentionKernels* ak) {
  if (ak != nullptr) return ak->rms_norm(x, w, n, eps, y);
  double part[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) part[j] += static_cast<double>(x[i + j]) * x[i + j];
  double ss = 0.0;
  for (; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  for (int j = 0; j < 8; ++j) ss += part[j];
  const float inv = 1.f / std::sqrt(static_cast<float>(ss / static_cast<double>(n)) + eps);
  for (i = 0; i < n; ++i) y[i] = x[i] * inv * w[i];
}

// Rotates one head in place by the angles of cos/sin (head_dim / 2 each); the non-interleaved
// layout on the path's vectors where it has them (the same products and sums per element).
void rope(float* x, const float* cos, const float* sin, int64_t head_dim, bool interleaved,
          const AttentionKernels* ak) {
  const int64_t half = head_dim / 2;
  if (!interleaved && ak != nullptr && ak->rope_half(x, cos, sin, head_dim)) return;
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

ql_matmul_nbits_args linear_args(const ql_linear& l, const float* x, int64_t m, float* y, int path,
                                 int threads) {
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
  return a;
}

int run_linear(const ql_linear& l, const float* x, int64_t m, float* y, int path, int threads) {
  const ql_matmul_nbits_args a = linear_args(l, x, m, y, path, threads);
  return ql_matmul_nbits(&a);
}

int validate(const ql_decoder_layer_args* a) {
  if (a == nullptr || a->x == nullptr || a->k_cache == nullptr || a->v_cache == nullptr ||
      a->cos == nullptr || a->sin == nullptr || a->input_norm == nullptr || a->post_norm == nullptr)
    return QL_ERR_ARGUMENT;
  if (a->cache_dtype != QL_CACHE_F32 &&
      (a->cache_dtype != QL_CACHE_INT8 || a->k_scale == nullptr || a->v_scale == nullptr))
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

// act = silu(gate) * up = gate / (1 + e^-gate) * up over n elements: the path's vector code
// (AttentionKernels::swiglu) where it has one, else this loop.
void swiglu(const float* gate, const float* up, int64_t n, float* act, const AttentionKernels* ak) {
  if (ak != nullptr) return ak->swiglu(gate, up, n, act);
  for (int64_t e = 0; e < n; ++e) act[e] = gate[e] / (1.f + fast_exp(-gate[e])) * up[e];
}

// SwigluEpilogue::fn over swiglu (ctx: the AttentionKernels or nullptr).
void swiglu_epilogue(const float* gate, const float* up, int64_t n, float* act, const void* ctx) {
  swiglu(gate, up, n, act, static_cast<const AttentionKernels*>(ctx));
}

// Symmetric int8 codes of one row x (n) into q, its scale returned: scale = max|x| / 127,
// q = round_half_even(x / scale) in [-127, 127] (all zero when x is: scale 0). The path's vector
// code (AttentionKernels::quantize_i8, the same bits) where it has one.
float quantize_row(const float* x, int64_t n, int8_t* q, const AttentionKernels* ak) {
  if (ak != nullptr) return ak->quantize_i8(x, n, q);
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float scale = amax / 127.f;
  for (int64_t i = 0; i < n; ++i) {
    const float c = scale > 0.f ? std::nearbyint(x[i] / scale) : 0.f;
    q[i] = static_cast<int8_t>(std::min(std::max(c, -127.f), 127.f));
  }
  return scale;
}

// Row `pos` of kv head `i` of batch row `b` in the cache: k and v (hd) stored as they are, or as
// int8 codes with their scales.
void store_kv(const ql_decoder_layer_args* a, int64_t b, int64_t i, int64_t pos, const float* k,
              const float* v, const AttentionKernels* ak) {
  const int64_t row = (b * a->kv_heads + i) * a->capacity + pos;  // (batch, kv_heads, capacity)
  const int64_t hd = a->head_dim;
  if (a->cache_dtype == QL_CACHE_INT8) {
    a->k_scale[row] = quantize_row(k, hd, static_cast<int8_t*>(a->k_cache) + row * hd, ak);
    a->v_scale[row] = quantize_row(v, hd, static_cast<int8_t*>(a->v_cache) + row * hd, ak);
    return;
  }
  const size_t bytes = static_cast<size_t>(hd) * sizeof(float);
  std::memcpy(static_cast<float*>(a->k_cache) + row * hd, k, bytes);
  std::memcpy(static_cast<float*>(a->v_cache) + row * hd, v, bytes);
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

  const AttentionKernels* ak = decoder::vector_kernels(a);
  // The per-row work between the linears (norms, rotary embedding and cache stores, SwiGLU,
  // residuals) runs on the pool where there is enough of it (kParallelRowNs; ns_per_row: an estimate
  // from the row's length). Each row's results are the same whichever thread computes it.
  auto per_row = [&](int64_t ns_per_row, auto&& fn) {
    if (threads <= 1 || rows < 2 || rows * ns_per_row < kParallelRowNs) {
      for (int64_t r = 0; r < rows; ++r) fn(r);
      return;
    }
    std::atomic<int64_t> next{0};
    ThreadPool::global().run(static_cast<int>(std::min<int64_t>(threads, rows)), [&] {
      for (int64_t r; (r = next.fetch_add(1, std::memory_order_relaxed)) < rows;) fn(r);
    });
  };

  per_row(hidden / 6, [&](int64_t r) {
    rms_norm(a->x + r * hidden, a->input_norm, hidden, a->eps, h + r * hidden, ak);
  });
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

  // Row r's query heads of kv head i (its group), then that key: norms, rotary embedding, the cache
  // row's store.
  const int64_t group = a->heads / a->kv_heads;
  auto rope_pair = [&](int64_t r, int64_t i) {
    const int64_t b = r / a->seq, pos = a->past + r % a->seq;
    const float *cos = a->cos + r * half, *sin = a->sin + r * half;
    for (int64_t h = i * group; h < (i + 1) * group; ++h) {
      float* q = p.q + r * p.ldq + h * hd;
      if (a->q_norm != nullptr) rms_norm(q, a->q_norm, hd, a->eps, q, ak);
      rope(q, cos, sin, hd, a->rope_interleaved != 0, ak);
    }
    float* k = p.k + r * p.ldkv + i * hd;
    if (a->k_norm != nullptr) rms_norm(k, a->k_norm, hd, a->eps, k, ak);
    rope(k, cos, sin, hd, a->rope_interleaved != 0, ak);
    store_kv(a, b, i, pos, k, p.v + r * p.ldkv + i * hd, ak);
  };
  if (decoder::attention_takes_pairs(a, threads)) {
    // A decode step's attention tasks are (batch row, kv head) pairs: each does its pair's rows
    // first, on the pool, instead of a pass over all rows on this thread before (batch 16: ~7 us).
    const decoder::PairFn before = [&](int64_t b, int64_t i) { rope_pair(b, i); };
    decoder::attention(a, p, ctx, threads, &before);
  } else {
    per_row((nq + 2 * nkv) / 2, [&](int64_t r) {
      for (int64_t i = 0; i < a->kv_heads; ++i) rope_pair(r, i);
    });
    decoder::attention(a, p, ctx, threads);
  }
  if ((status = run_linear(a->o, ctx, rows, proj, a->path, threads)) != QL_OK) return status;
  per_row(hidden / 5, [&](int64_t r) {
    float* x = a->x + r * hidden;
    const float* o = proj + r * hidden;
    for (int64_t e = 0; e < hidden; ++e) x[e] += o[e];
    rms_norm(x, a->post_norm, hidden, a->eps, h + r * hidden, ak);
  });
  float* act = grow(sc.act, rows * ff);
  if (a->gate_up.b != nullptr) {
    // SwiGLU in the linear's tiles (matmul_nbits_swiglu): no (rows, 2 ff) products written and read
    // back, no pass of its own (at batch 16: ~9 us of a ~220 us layer, and the products' 196 KB).
    const ql_matmul_nbits_args la = linear_args(a->gate_up, h, rows, act, a->path, threads);
    const SwigluEpilogue ep = {ff, swiglu_epilogue, ak};
    if ((status = matmul_nbits_swiglu(&la, ep)) != QL_OK) return status;
  } else {
    float* g = grow(sc.ff, rows * 2 * ff);  // gate rows, then up rows
    float* u = g + rows * ff;
    if ((status = run_linear(a->gate, h, rows, g, a->path, threads)) != QL_OK) return status;
    if ((status = run_linear(a->up, h, rows, u, a->path, threads)) != QL_OK) return status;
    per_row(ff / 2, [&](int64_t r) { swiglu(g + r * ff, u + r * ff, ff, act + r * ff, ak); });
  }
  if ((status = run_linear(a->down, act, rows, proj, a->path, threads)) != QL_OK) return status;
  for (int64_t e = 0; e < rows * hidden; ++e) a->x[e] += proj[e];
  return QL_OK;
}

int decoder_head(const ql_decoder_head_args* a) {
  if (a == nullptr || a->x == nullptr || a->norm == nullptr || a->logits == nullptr ||
      a->rows <= 0 || a->hidden <= 0 || a->head.n <= 0 ||
      !linear_ok(a->head, a->hidden, a->head.n))
    return QL_ERR_ARGUMENT;
  thread_local std::vector<float> h;
  float* y = grow(h, a->rows * a->hidden);
  const AttentionKernels* ak = decoder::vector_kernels(a->path);  // the layers' norm
  for (int64_t r = 0; r < a->rows; ++r)
    rms_norm(a->x + r * a->hidden, a->norm, a->hidden, a->eps, y + r * a->hidden, ak);
  return run_linear(a->head, y, a->rows, a->logits, a->path, a->threads);
}

}  // namespace
}  // namespace ql

extern "C" QL_API int ql_decoder_head(const ql_decoder_head_args* args) {
  try {
    return ql::decoder_head(args);
  } catch (...) {
    return QL_ERR_INTERNAL;
  }
}

extern "C" QL_API int ql_decoder_layer(const ql_decoder_layer_args* args) {
  try {
    return ql::decoder_layer(args);
  } catch (...) {
    return QL_ERR_INTERNAL;
  }
}

extern "C" QL_API int ql_decoder_layers(const ql_decoder_layer_args* const* layers, int32_t n) {
  if (layers == nullptr || n < 0) return QL_ERR_ARGUMENT;
  try {
    for (int32_t i = 0; i < n; ++i) {
      const int status = ql::decoder_layer(layers[i]);
      if (status != QL_OK) return status;
    }
    return QL_OK;
  } catch (...) {
    return QL_ERR_INTERNAL;
  }
}

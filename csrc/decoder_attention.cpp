// The decoder layer's grouped-query attention (see decoder_layer.cpp for the layer): tasks over
// (batch row, kv head, query rows) on the pool, a kv head's query heads together so that each cache
// row is read once per step, long decode steps split along the cache. Baseline-compiled loops, or
// the path's AttentionKernels (attention_simd.h, on its vector registers) where it has them.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "decoder_internal.h"
#include "matmul_internal.h"
#include "thread_pool.h"

namespace ql {
namespace decoder {
namespace {

// Four floats as one baseline vector register (SSE2 / NEON), through GCC's and Clang's vector
// extensions rather than intrinsics: written as plain loops, the grouped weighted sum below was
// vectorized across rows j (strided loads) and ran ~1.5x slower than one head at a time.
#if defined(__GNUC__)  // GCC and Clang
typedef float f4 __attribute__((vector_size(16)));
#else
struct f4 {
  float v[4];
  f4& operator+=(const f4& o) {
    for (int l = 0; l < 4; ++l) v[l] += o.v[l];
    return *this;
  }
};
inline f4 operator*(const f4& x, float w) {
  f4 r;
  for (int l = 0; l < 4; ++l) r.v[l] = x.v[l] * w;
  return r;
}
inline f4 operator*(float w, const f4& x) { return x * w; }
#endif

// V vectors of 4 values from v (4 * V floats or int8 codes, converted exactly).
template <int V>
inline void load_row(const float* v, f4* row) {
  std::memcpy(row, v, sizeof(f4) * V);
}
template <int V>
inline void load_row(const int8_t* v, f4* row) {
  float f[4 * V];
  for (int l = 0; l < 4 * V; ++l) f[l] = static_cast<float>(v[l]);  // exact
  std::memcpy(row, f, sizeof(f));
}

// out_h (hd) = inv[h] * sum_j p_h[j] * v[j] over n rows v (n, hd) for G heads at once (p_h = p +
// h * ldp, out_h = out + h * hd), in column chunks whose G sums stay in registers for the whole
// walk over the rows; each chunk of a value row is loaded once for the G heads. Per head and
// column the sum runs over j in order, as for one head alone.
template <int G, typename T>
void weighted_sum(const float* p, int64_t ldp, const T* v, int64_t n, int64_t hd, const float* inv,
                  float* out) {
  constexpr int V = G <= 2 ? 4 : 2;  // vectors per chunk: G * V sums and V values in 16 registers
  int64_t d0 = 0;
  for (; d0 + 4 * V <= hd; d0 += 4 * V) {
    f4 acc[G][V] = {};
    for (int64_t j = 0; j < n; ++j) {
      f4 row[V];
      load_row<V>(v + j * hd + d0, row);
      for (int h = 0; h < G; ++h) {
        const float w = p[h * ldp + j];
        for (int c = 0; c < V; ++c) acc[h][c] += w * row[c];
      }
    }
    for (int h = 0; h < G; ++h)
      for (int c = 0; c < V; ++c) {
        const f4 o = acc[h][c] * inv[h];
        std::memcpy(out + h * hd + d0 + 4 * c, &o, sizeof(o));
      }
  }
  for (; d0 < hd; ++d0)
    for (int h = 0; h < G; ++h) {
      float acc = 0.f;
      for (int64_t j = 0; j < n; ++j) acc += p[h * ldp + j] * static_cast<float>(v[j * hd + d0]);
      out[h * hd + d0] = acc * inv[h];
    }
}

// A key row as floats: a float row as it is, an int8 row converted (exactly) into buf.
inline const float* key_row(const float* k, int64_t, float*) { return k; }
inline const float* key_row(const int8_t* k, int64_t hd, float* buf) {
  for (int64_t d = 0; d < hd; ++d) buf[d] = static_cast<float>(k[d]);
  return buf;
}

// Heads per weighted_sum pass: its G * V running sums must fit the vector registers.
constexpr int kMaxGroupPass = 4;
// Query heads per kv head that the split decode attention (decode_split) takes; more: not split.
constexpr int64_t kMaxHeadsPerGroup = 64;
// Query rows per attention task in a prompt (a decode step has one row, one task per kv head).
constexpr int64_t kRowsPerTask = 8;

// The query rows t0 .. t1 - 1 of batch row `b`, for the query heads h0 .. h1 - 1 of kv head `kvh`
// (all of them unless too few tasks) together: the group of heads / kv_heads heads reads the same
// cache rows, so each key and value row is read from memory once per query row instead of once per
// head. ctx row stride heads * hd; s holds heads / kv_heads * (past + seq + 1) + hd floats. Three
// passes over the visible keys: the group's scores (key row j outer, heads inner: the row stays in
// L1), each head's exponentials, the weighted values.
// T is the cache's element type: float, or int8_t with a scale per (token, kv head) row folded into
// the score (scale_j * dot(q, k8_j)) and into the weight (p_j * scale_j) of v8_j.
// With `ak` (the path's AttentionKernels, see attention_kernels) the three passes run on its
// vector registers instead of the baseline loops below.
template <typename T>
void attend(const ql_decoder_layer_args* a, const Qkv& p, int64_t b, int64_t kvh, int64_t h0,
            int64_t h1, int64_t t0, int64_t t1, float* ctx, float* s, const AttentionKernels* ak) {
  constexpr bool kInt8 = std::is_same<T, int8_t>::value;
  const int64_t hd = a->head_dim, seq = a->seq, past = a->past, total = past + seq;
  const int64_t group = h1 - h0, row0 = (b * a->kv_heads + kvh) * a->capacity;
  const int64_t head0 = kvh * (a->heads / a->kv_heads) + h0;  // the first query head
  const T* kc = static_cast<const T*>(a->k_cache) + row0 * hd;  // (capacity, hd)
  const T* vc = static_cast<const T*>(a->v_cache) + row0 * hd;
  const float* ks = kInt8 ? a->k_scale + row0 : nullptr;  // (capacity,)
  const float* vs = kInt8 ? a->v_scale + row0 : nullptr;
  const int64_t* mask = a->key_mask != nullptr ? a->key_mask + b * total : nullptr;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  float* inv = s + group * total;  // (group,) 1 / each head's sum of exponentials
  float* krow = inv + group;       // (hd,) an int8 key row as floats, converted once for the group
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t r = b * seq + t;
    const float* q = p.q + r * p.ldq + head0 * hd;     // (group, hd)
    float* out = ctx + r * a->heads * hd + head0 * hd;  // (group, hd)
    const int64_t visible = past + t + 1;  // causal: cache positions 0 .. past + t
    bool seen = false;
    if (ak != nullptr) {
      if constexpr (kInt8)
        ak->scores_i8(q, static_cast<int>(group), hd, kc, ks, visible, scale, s, total, vc);
      else
        ak->scores_f32(q, static_cast<int>(group), hd, kc, nullptr, visible, scale, s, total, vc);
      for (int64_t j = 0; j < visible; ++j) {
        if (mask != nullptr && mask[j] == 0) {
          for (int64_t h = 0; h < group; ++h) s[h * total + j] = -INFINITY;
          continue;
        }
        seen = true;
      }
    } else {
      for (int64_t j = 0; j < visible; ++j) {
        if (mask != nullptr && mask[j] == 0) {
          for (int64_t h = 0; h < group; ++h) s[h * total + j] = -INFINITY;
          continue;
        }
        seen = true;
        const float f = kInt8 ? ks[j] * scale : scale;
        const float* k = key_row(kc + j * hd, hd, krow);
        for (int64_t h = 0; h < group; ++h) s[h * total + j] = dot(q + h * hd, k, hd) * f;
      }
    }
    if (!seen) {
      // Nothing visible (a padding row): the additive-mask softmax puts equal weight on every key.
      std::fill(out, out + group * hd, 0.f);
      for (int64_t j = 0; j < total; ++j)
        for (int64_t d = 0; d < hd; ++d)
          out[d] += kInt8 ? vs[j] * static_cast<float>(vc[j * hd + d]) : vc[j * hd + d];
      for (int64_t d = 0; d < hd; ++d) out[d] /= static_cast<float>(total);
      for (int64_t h = 1; h < group; ++h) std::copy(out, out + hd, out + h * hd);
      continue;
    }
    for (int64_t h = 0; h < group; ++h) {
      float* sh = s + h * total;
      if (ak != nullptr) {
        float row_max;
        inv[h] = 1.f / ak->softmax_numerators(sh, visible, &row_max);
      } else {
        float max = -INFINITY;
        for (int64_t j = 0; j < visible; ++j) max = std::max(max, sh[j]);
        for (int64_t j = 0; j < visible; ++j) sh[j] = fast_exp(sh[j] - max);  // masked: exp(-inf) = 0
        inv[h] = 1.f / total_of(sh, visible);
      }
      if (kInt8)
        for (int64_t j = 0; j < visible; ++j) sh[j] *= vs[j];
    }
    if (ak != nullptr) {
      if constexpr (kInt8)
        ak->weighted_i8(s, total, static_cast<int>(group), vc, visible, hd, inv, out);
      else
        ak->weighted_f32(s, total, static_cast<int>(group), vc, visible, hd, inv, out);
      continue;
    }
    for (int64_t h = 0; h < group; h += kMaxGroupPass) {
      const float* ph = s + h * total;
      switch (std::min<int64_t>(kMaxGroupPass, group - h)) {
        case 1: weighted_sum<1>(ph, total, vc, visible, hd, inv + h, out + h * hd); break;
        case 2: weighted_sum<2>(ph, total, vc, visible, hd, inv + h, out + h * hd); break;
        case 3: weighted_sum<3>(ph, total, vc, visible, hd, inv + h, out + h * hd); break;
        default: weighted_sum<4>(ph, total, vc, visible, hd, inv + h, out + h * hd); break;
      }
    }
  }
}

// A decode row over a long cache, split along the cache (as flash-decoding does on GPUs): a
// (batch row, kv head) has few tasks for the pool (SmolLM2: 3 kv heads on 2 threads), so instead
// of splitting the group's query heads, which reads the cache once per part, each task takes a
// stretch of cache positions [j0, j1) for the whole group and leaves per head its unnormalized
// weighted values o, its score max m and its sum of exponentials l (relative to m), which
// merge_chunks combines exactly: out = sum_c e^(m_c - M) o_c / sum_c e^(m_c - M) l_c.
// part: (group, hd) o, then (group) m, then (group) l. Only with AttentionKernels.
template <typename T>
void attend_chunk(const ql_decoder_layer_args* a, const Qkv& p, int64_t b, int64_t kvh, int64_t j0,
                  int64_t j1, float* s, const AttentionKernels* ak, float* part) {
  constexpr bool kInt8 = std::is_same<T, int8_t>::value;
  const int64_t hd = a->head_dim, total = a->past + 1, group = a->heads / a->kv_heads;
  const int64_t row0 = (b * a->kv_heads + kvh) * a->capacity, n = j1 - j0;
  const T* kc = static_cast<const T*>(a->k_cache) + (row0 + j0) * hd;
  const T* vc = static_cast<const T*>(a->v_cache) + (row0 + j0) * hd;
  const float* ks = kInt8 ? a->k_scale + row0 + j0 : nullptr;
  const float* vs = kInt8 ? a->v_scale + row0 + j0 : nullptr;
  const int64_t* mask = a->key_mask != nullptr ? a->key_mask + b * total + j0 : nullptr;
  const float* q = p.q + b * p.ldq + kvh * group * hd;  // decode: row r = b
  float *o = part, *m = part + group * hd, *l = m + group;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  if constexpr (kInt8)
    ak->scores_i8(q, static_cast<int>(group), hd, kc, ks, n, scale, s, n, vc);
  else
    ak->scores_f32(q, static_cast<int>(group), hd, kc, nullptr, n, scale, s, n, vc);
  bool seen = mask == nullptr;
  if (mask != nullptr)
    for (int64_t j = 0; j < n; ++j) {
      if (mask[j] != 0) {
        seen = true;
        continue;
      }
      for (int64_t h = 0; h < group; ++h) s[h * n + j] = -INFINITY;
    }
  if (!seen) {  // nothing visible here: no weight in the merge
    for (int64_t h = 0; h < group; ++h) m[h] = -INFINITY, l[h] = 0.f;
    return;
  }
  float ones[kMaxHeadsPerGroup];
  for (int64_t h = 0; h < group; ++h) {
    float* sh = s + h * n;
    l[h] = ak->softmax_numerators(sh, n, &m[h]);
    ones[h] = 1.f;
    if (kInt8)
      for (int64_t j = 0; j < n; ++j) sh[j] *= vs[j];
  }
  if constexpr (kInt8)
    ak->weighted_i8(s, n, static_cast<int>(group), vc, n, hd, ones, o);
  else
    ak->weighted_f32(s, n, static_cast<int>(group), vc, n, hd, ones, o);
}

// ctx rows of a decode step from attend_chunk's parts: parts (batch, kv_heads, chunks) of
// part_size floats. Returns false when a (batch row, kv head) saw no key at all (a padding row),
// which the caller then runs through attend's own rule.
bool merge_chunks(const ql_decoder_layer_args* a, const float* parts, int64_t chunks,
                  int64_t part_size, float* ctx, int64_t b, int64_t kvh) {
  const int64_t hd = a->head_dim, group = a->heads / a->kv_heads;
  const float* first = parts + (b * a->kv_heads + kvh) * chunks * part_size;
  float* out = ctx + b * a->heads * hd + kvh * group * hd;
  for (int64_t h = 0; h < group; ++h) {
    float mx = -INFINITY;
    for (int64_t c = 0; c < chunks; ++c) mx = std::max(mx, first[c * part_size + group * hd + h]);
    if (mx == -INFINITY) return false;
    float denom = 0.f;
    float* oh = out + h * hd;
    std::fill(oh, oh + hd, 0.f);
    for (int64_t c = 0; c < chunks; ++c) {
      const float* part = first + c * part_size;
      const float m = part[group * hd + h], l = part[group * hd + group + h];
      if (l == 0.f) continue;
      const float w = std::exp(m - mx);
      denom += w * l;
      for (int64_t d = 0; d < hd; ++d) oh[d] += w * part[h * hd + d];
    }
    const float inv = 1.f / denom;
    for (int64_t d = 0; d < hd; ++d) oh[d] *= inv;
  }
  return true;
}

// Tasks (batch row, kv head, block of kRowsPerTask query rows), the blocks of a prompt's last rows
// (the most keys) handed out first so that the pool's threads finish together. When that makes
// fewer than two tasks per thread (a decode step of a model with few kv heads: SmolLM2's 3 on 2
// threads would run 2 + 1), each kv head's query heads are split into `parts` tasks instead: the
// cache is then read once per part, but no thread waits for another's whole group.
// Cache positions per attend_chunk task at least: below this the merge costs more than it saves.
constexpr int64_t kMinChunk = 256;

// The attention kernels of the layer's matmul path where it has them for this head size, else
// nullptr (the baseline loops).
const AttentionKernels* attention_kernels(const ql_decoder_layer_args* a) {
  const AttentionKernels* ak = vector_kernels(a);
  return ak != nullptr && a->head_dim % ak->hd_multiple == 0 ? ak : nullptr;
}

// How a call is split. A decode step goes along the cache (decode_split: chunks >= 2) when the
// (batch row, kv head) pairs are too few to keep `threads` busy and the cache is long enough;
// otherwise into tasks (block of query rows, group, part) (attention_t).
struct Plan {
  int64_t chunks = 0;  // >= 2: decode_split
  int64_t blocks = 1, groups = 1, parts = 1;
  bool serial = true;
};
Plan plan(const ql_decoder_layer_args* a, int threads) {
  Plan pl;
  const int64_t group = a->heads / a->kv_heads, pairs = a->batch * a->kv_heads;
  if (attention_kernels(a) != nullptr && a->seq == 1 && threads > 1 && group <= kMaxHeadsPerGroup) {
    const int64_t chunks = std::min((2 * threads + pairs - 1) / pairs, (a->past + 1) / kMinChunk);
    if (chunks >= 2) {
      pl.chunks = chunks;
      return pl;
    }
  }
  pl.blocks = (a->seq + kRowsPerTask - 1) / kRowsPerTask;
  pl.groups = pairs;
  const int64_t work = a->batch * a->heads * a->seq * (a->past + a->seq) * a->head_dim;
  pl.serial = threads <= 1 || work < kParallelAttentionWork;
  pl.parts = pl.serial ? 1 : std::min(group, (2 * threads + pl.groups * pl.blocks - 1) / (pl.groups * pl.blocks));
  return pl;
}

// A decode step run as one task per (batch row, kv head) pair: attention() can hand each pair's
// own rows to its task (attention_takes_pairs).
bool one_task_per_pair(const ql_decoder_layer_args* a, const Plan& pl) {
  return a->seq == 1 && pl.chunks < 2 && pl.parts == 1;
}

// A decode step's attention as attend_chunk tasks over `chunks` stretches of the cache per pair.
template <typename T>
void decode_split(const ql_decoder_layer_args* a, const Qkv& p, float* ctx, int threads,
                  const AttentionKernels* ak, int64_t chunks, T) {
  const int64_t total = a->past + 1, pairs = a->batch * a->kv_heads, hd = a->head_dim;
  const int64_t group = a->heads / a->kv_heads;
  const int64_t span = (total + chunks - 1) / chunks, part_size = group * (hd + 2);
  thread_local std::vector<float> parts_buf;
  float* parts = grow(parts_buf, pairs * chunks * part_size);
  std::atomic<int64_t> next{0};
  const int64_t tasks = pairs * chunks;
  ThreadPool::global().run(static_cast<int>(std::min<int64_t>(threads, tasks)), [&] {
    thread_local std::vector<float> scores;
    float* s = grow(scores, group * span);
    for (int64_t i; (i = next.fetch_add(1)) < tasks;) {
      const int64_t pair = i / chunks, c = i % chunks;
      const int64_t j0 = c * span, j1 = std::min(total, j0 + span);
      attend_chunk<T>(a, p, pair / a->kv_heads, pair % a->kv_heads, j0, j1, s, ak,
                      parts + i * part_size);
    }
  });
  for (int64_t pair = 0; pair < pairs; ++pair) {
    const int64_t b = pair / a->kv_heads, kvh = pair % a->kv_heads;
    if (!merge_chunks(a, parts, chunks, part_size, ctx, b, kvh)) {
      thread_local std::vector<float> scores;
      float* s = grow(scores, group * (total + 1) + hd);
      attend<T>(a, p, b, kvh, 0, group, 0, 1, ctx, s, ak);
    }
  }
}

template <typename T>
void attention_t(const ql_decoder_layer_args* a, const Qkv& p, float* ctx, int threads,
                 const PairFn* before) {
  const AttentionKernels* ak = attention_kernels(a);
  const Plan pl = plan(a, threads);
  const bool per_task = before != nullptr && one_task_per_pair(a, pl);
  if (before != nullptr && !per_task)  // not taken task by task: all pairs first
    for (int64_t pair = 0; pair < a->batch * a->kv_heads; ++pair) (*before)(pair / a->kv_heads, pair % a->kv_heads);
  if (pl.chunks >= 2) return decode_split(a, p, ctx, threads, ak, pl.chunks, T{});
  const int64_t blocks = pl.blocks, groups = pl.groups, parts = pl.parts, group = a->heads / a->kv_heads;
  const bool serial = pl.serial;
  const int64_t tasks = groups * blocks * parts;
  const int64_t scratch = group * (a->past + a->seq + 1) + a->head_dim;
  auto task = [&](int64_t i, float* s) {
    const int64_t block = blocks - 1 - i / (groups * parts), g = i % (groups * parts) / parts;
    const int64_t part = i % parts, h0 = part * group / parts, h1 = (part + 1) * group / parts;
    const int64_t t0 = block * kRowsPerTask, t1 = std::min(a->seq, t0 + kRowsPerTask);
    if (per_task) (*before)(g / a->kv_heads, g % a->kv_heads);  // this pair's rows, read only here
    attend<T>(a, p, g / a->kv_heads, g % a->kv_heads, h0, h1, t0, t1, ctx, s, ak);
  };
  if (serial || tasks == 1) {
    thread_local std::vector<float> scores;
    float* s = grow(scores, scratch);
    for (int64_t i = 0; i < tasks; ++i) task(i, s);
    return;
  }
  std::atomic<int64_t> next{0};
  ThreadPool::global().run(static_cast<int>(std::min<int64_t>(threads, tasks)), [&] {
    thread_local std::vector<float> scores;
    float* s = grow(scores, scratch);
    for (int64_t i; (i = next.fetch_add(1)) < tasks;) task(i, s);
  });
}

}  // namespace

const AttentionKernels* vector_kernels(int path) {
  const PathKernels* k = supported_kernels(path == QL_PATH_AUTO ? ql_best_path() : path);
  return k != nullptr ? k->attention : nullptr;
}

const AttentionKernels* vector_kernels(const ql_decoder_layer_args* a) {
  return vector_kernels(a->path);
}

bool attention_takes_pairs(const ql_decoder_layer_args* a, int threads) {
  return one_task_per_pair(a, plan(a, threads));
}

void attention(const ql_decoder_layer_args* a, const Qkv& p, float* ctx, int threads,
               const PairFn* before) {
  if (a->cache_dtype == QL_CACHE_INT8)
    attention_t<int8_t>(a, p, ctx, threads, before);
  else
    attention_t<float>(a, p, ctx, threads, before);
}

}  // namespace decoder
}  // namespace ql

// The decoder layer's attention inner loops (AttentionKernels, matmul_internal.h) written once over a
// vector type, for the ISA files to instantiate with their own registers: kernels_avx2.cpp (8
// floats) and kernels_avx512.cpp (16 floats). Include it inside an anonymous namespace only, after
// defining the vector traits V:
//   using F = <register>; static constexpr int kWidth;
//   F zero(); F set1(float); F load(const float*); F load(const int8_t*) (kWidth codes, exact);
//   void store(float*, F); F fma(F a, F b, F c) = a * b + c; F mul(F, F); F sub(F, F); F add(F, F);
//   F fnma(F a, F b, F c) = c - a * b; F min(F, F); F max(F, F); float sum(F); float max_of(F);
//   F ldexp(F y, F n) = y * 2^n for integral n; F zero_below(F x, float t, F e) = x < t ? 0 : e;
//   F abs(F); F round(F) to the nearest integer, ties to even (nearbyint's default mode);
//   void store_i8(int8_t*, F) (kWidth integral values within +-127);
//   int kKeysPerPass: 1, or 4 with void sum4(const F* a, float* out) (out[i] = a[i]'s lanes summed);
//   double sum_squares(const float* x, int64_t n) (the sum of x[i]^2 in double).
// No library templates here (matmul_internal.h: ISA objects must not define weak symbols).
#ifndef QUANTLAB_ATTENTION_SIMD_H_
#define QUANTLAB_ATTENTION_SIMD_H_

// fast_exp of decoder_layer.cpp, lane-wise: the same clamp, two-part reduction and polynomial.
template <class V>
typename V::F vexp(typename V::F x) {
  using F = typename V::F;
  const F magic = V::set1(12582912.f);
  const F xc = V::min(V::max(x, V::set1(-87.33654f)), V::set1(88.f));
  const F n = V::sub(V::fma(xc, V::set1(1.44269504088896341f), magic), magic);
  F r = V::fnma(n, V::set1(0.693359375f), xc);
  r = V::fnma(n, V::set1(-2.12194440e-4f), r);
  F y = V::set1(1.9875691500e-4f);
  y = V::fma(y, r, V::set1(1.3981999507e-3f));
  y = V::fma(y, r, V::set1(8.3334519073e-3f));
  y = V::fma(y, r, V::set1(4.1665795894e-2f));
  y = V::fma(y, r, V::set1(1.6666665459e-1f));
  y = V::fma(y, r, V::set1(5.0000001201e-1f));
  y = V::add(V::fma(V::mul(y, r), r, r), V::set1(1.f));
  return V::zero_below(x, -87.33654f, V::ldexp(y, n));
}

// Heads that share one read of a key or value row; their running sums stay in registers.
constexpr int kHeadsPerPass = 4;

// s[h * lds + j] = f_j * dot(q_h, k_j) for h < G, j < n: each key row is loaded once for the G
// heads (the query rows stay in L1), one horizontal sum per head and row. With pf (the value rows,
// same layout), each key row's value row is prefetched into L2 alongside: the weighted pass then
// reads its rows from L2 while this pass waits on the keys' memory, instead of the two passes each
// waiting on memory in turn (SmolLM2 batch-16 decode: the layers 22.2 -> 20.2 ms a step).
// Where the traits have it (V::kKeysPerPass = 4, V::sum4), four key rows at a time: 4 G running sums,
// reduced together (one transposition-like pass instead of 4 G horizontal sums; the sums were most of
// the scores' instructions at head_dim 64). A query's score for key j is then computed the same way
// for a given n, in prefill and in decode alike.
// The key rows are prefetched into L1 kKeyPrefetchBytes ahead: a decode step's cache comes from
// memory (SmolLM2 at batch 16: ~28 MB a step), a (batch row, kv head) is only ~10 KB of keys, too
// short for the hardware prefetcher to ramp up, and ~40% of the scores' time waited on key loads
// (perf; batch-16 step 9.0 -> 8.5 ms with 2 KB).
constexpr int64_t kKeyPrefetchBytes = 2048;
template <class V, int G, typename T>
void scores_g(const float* q, int64_t hd, const T* k, const float* ks, int64_t n, float scale,
              float* s, int64_t lds, const T* pf) {
  const int64_t row_bytes = hd * static_cast<int64_t>(sizeof(T));
  const int64_t ahead = kKeyPrefetchBytes / row_bytes > 4 ? kKeyPrefetchBytes / row_bytes : 4;  // rows
  int64_t j = 0;
  if constexpr (V::kKeysPerPass == 4) {
    for (; j + 4 <= n; j += 4) {
      if (pf != nullptr)
        for (int64_t c = 0; c < 4 * row_bytes; c += 64)
          __builtin_prefetch(reinterpret_cast<const char*>(pf + j * hd) + c, 0, 2);
      if (j + ahead < n)
        for (int64_t c = 0; c < 4 * row_bytes; c += 64)
          __builtin_prefetch(reinterpret_cast<const char*>(k + (j + ahead) * hd) + c, 0, 3);
      typename V::F acc[G][4];
      for (int h = 0; h < G; ++h)
        for (int r = 0; r < 4; ++r) acc[h][r] = V::zero();
      const T* kr = k + j * hd;
      for (int64_t d = 0; d < hd; d += V::kWidth) {
        typename V::F kv[4];
        for (int r = 0; r < 4; ++r) kv[r] = V::load(kr + r * hd + d);
        for (int h = 0; h < G; ++h) {
          const typename V::F qv = V::load(q + h * hd + d);
          for (int r = 0; r < 4; ++r) acc[h][r] = V::fma(qv, kv[r], acc[h][r]);
        }
      }
      for (int h = 0; h < G; ++h) {
        float sum[4];
        V::sum4(acc[h], sum);
        for (int r = 0; r < 4; ++r) s[h * lds + j + r] = sum[r] * (ks != nullptr ? ks[j + r] * scale : scale);
      }
    }
  }
  for (; j < n; ++j) {
    if (pf != nullptr)
      for (int64_t c = 0; c < row_bytes; c += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(pf + j * hd) + c, 0, 2);
    if (j + ahead < n)
      for (int64_t c = 0; c < row_bytes; c += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(k + (j + ahead) * hd) + c, 0, 3);
    const T* kr = k + j * hd;
    typename V::F acc[G];
    for (int h = 0; h < G; ++h) acc[h] = V::zero();
    for (int64_t d = 0; d < hd; d += V::kWidth) {
      const typename V::F kv = V::load(kr + d);
      for (int h = 0; h < G; ++h) acc[h] = V::fma(V::load(q + h * hd + d), kv, acc[h]);
    }
    const float f = ks != nullptr ? ks[j] * scale : scale;
    for (int h = 0; h < G; ++h) s[h * lds + j] = V::sum(acc[h]) * f;
  }
}

template <class V, typename T>
void scores(const float* q, int g, int64_t hd, const T* k, const float* ks, int64_t n,
            float scale, float* s, int64_t lds, const T* v) {
  for (int h = 0; h < g; h += kHeadsPerPass) {
    const float* qh = q + h * hd;
    float* sh = s + h * lds;
    const T* pf = h == 0 ? v : nullptr;  // the value rows, once
    switch (g - h < kHeadsPerPass ? g - h : kHeadsPerPass) {
      case 1: scores_g<V, 1>(qh, hd, k, ks, n, scale, sh, lds, pf); break;
      case 2: scores_g<V, 2>(qh, hd, k, ks, n, scale, sh, lds, pf); break;
      case 3: scores_g<V, 3>(qh, hd, k, ks, n, scale, sh, lds, pf); break;
      default: scores_g<V, 4>(qh, hd, k, ks, n, scale, sh, lds, pf); break;
    }
  }
}

// out_h[d0 .. d0 + C * kWidth) = inv[h] * sum_j p_h[j] * v_j[...] for h < G: the G * C sums stay in
// registers for the whole walk over the rows, each value chunk loaded once for the G heads.
template <class V, int G, int C, typename T>
void weighted_chunk(const float* p, int64_t ldp, const T* v, int64_t n, int64_t hd, int64_t d0,
                    const float* inv, float* out) {
  typename V::F acc[G][C];
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < C; ++c) acc[h][c] = V::zero();
  for (int64_t j = 0; j < n; ++j) {
    typename V::F row[C];
    for (int c = 0; c < C; ++c) row[c] = V::load(v + j * hd + d0 + c * V::kWidth);
    for (int h = 0; h < G; ++h) {
      const typename V::F w = V::set1(p[h * ldp + j]);
      for (int c = 0; c < C; ++c) acc[h][c] = V::fma(w, row[c], acc[h][c]);
    }
  }
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < C; ++c)
      V::store(out + h * hd + d0 + c * V::kWidth, V::mul(acc[h][c], V::set1(inv[h])));
}

template <class V, int G, typename T>
void weighted_g(const float* p, int64_t ldp, const T* v, int64_t n, int64_t hd, const float* inv,
                float* out) {
  int64_t d0 = 0;
  for (; d0 + 4 * V::kWidth <= hd; d0 += 4 * V::kWidth)
    weighted_chunk<V, G, 4>(p, ldp, v, n, hd, d0, inv, out);
  switch ((hd - d0) / V::kWidth) {
    case 1: weighted_chunk<V, G, 1>(p, ldp, v, n, hd, d0, inv, out); break;
    case 2: weighted_chunk<V, G, 2>(p, ldp, v, n, hd, d0, inv, out); break;
    case 3: weighted_chunk<V, G, 3>(p, ldp, v, n, hd, d0, inv, out); break;
    default: break;
  }
}

template <class V, typename T>
void weighted(const float* p, int64_t ldp, int g, const T* v, int64_t n, int64_t hd,
              const float* inv, float* out) {
  for (int h = 0; h < g; h += kHeadsPerPass) {
    const float *ph = p + h * ldp, *ih = inv + h;
    float* oh = out + h * hd;
    switch (g - h < kHeadsPerPass ? g - h : kHeadsPerPass) {
      case 1: weighted_g<V, 1>(ph, ldp, v, n, hd, ih, oh); break;
      case 2: weighted_g<V, 2>(ph, ldp, v, n, hd, ih, oh); break;
      case 3: weighted_g<V, 3>(ph, ldp, v, n, hd, ih, oh); break;
      default: weighted_g<V, 4>(ph, ldp, v, n, hd, ih, oh); break;
    }
  }
}

// s[j] = e^(s[j] - max) for j < n (0 for -inf), max over the row (stored in *row_max); returns
// their sum.
template <class V>
float softmax_numerators(float* s, int64_t n, float* row_max) {
  int64_t j = 0;
  float mx = -__builtin_inff();
  if (n >= V::kWidth) {
    typename V::F m = V::load(s);
    for (j = V::kWidth; j + V::kWidth <= n; j += V::kWidth) m = V::max(m, V::load(s + j));
    mx = V::max_of(m);
  }
  for (; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
  *row_max = mx;
  const typename V::F vmax = V::set1(mx);
  typename V::F total = V::zero();
  for (j = 0; j + V::kWidth <= n; j += V::kWidth) {
    const typename V::F e = vexp<V>(V::sub(V::load(s + j), vmax));
    V::store(s + j, e);
    total = V::add(total, e);
  }
  float tail[V::kWidth];
  const int64_t left = n - j;
  if (left > 0) {
    for (int l = 0; l < V::kWidth; ++l) tail[l] = l < left ? s[j + l] : -__builtin_inff();
    const typename V::F e = vexp<V>(V::sub(V::load(tail), vmax));
    V::store(tail, e);
    total = V::add(total, e);
    for (int64_t l = 0; l < left; ++l) s[j + l] = tail[l];
  }
  return V::sum(total);
}

// act = gate / (1 + e^-gate) * up over n elements (silu(gate) * up), lane-wise: the tail goes
// through the same vector code (zero-padded), so no element's value depends on where it lies.
template <class V>
inline typename V::F swiglu_lanes(typename V::F g, typename V::F u) {
  const typename V::F d = V::add(V::set1(1.f), vexp<V>(V::sub(V::zero(), g)));
  return V::mul(V::div(g, d), u);
}
template <class V>
void swiglu(const float* gate, const float* up, int64_t n, float* act) {
  int64_t e = 0;
  for (; e + V::kWidth <= n; e += V::kWidth)
    V::store(act + e, swiglu_lanes<V>(V::load(gate + e), V::load(up + e)));
  if (e == n) return;
  float g[V::kWidth] = {}, u[V::kWidth] = {};
  for (int64_t l = 0; l < n - e; ++l) g[l] = gate[e + l], u[l] = up[e + l];
  V::store(g, swiglu_lanes<V>(V::load(g), V::load(u)));
  for (int64_t l = 0; l < n - e; ++l) act[e + l] = g[l];
}

// The decoder layer's quantize_row (decoder_layer.cpp) over vectors: max |x| is exact in any order
// (a NaN is skipped as std::max skips it: the running max is max_ps's second operand), then the
// same IEEE division, rounding and clamp per element.
template <class V>
float quantize_i8(const float* x, int64_t n, int8_t* q) {
  typename V::F m = V::zero();
  int64_t i = 0;
  for (; i + V::kWidth <= n; i += V::kWidth) m = V::max(V::abs(V::load(x + i)), m);
  float amax = V::max_of(m);
  for (int64_t j = i; j < n; ++j) amax = amax < __builtin_fabsf(x[j]) ? __builtin_fabsf(x[j]) : amax;
  const float scale = amax / 127.f;
  if (!(scale > 0.f)) {
    for (int64_t j = 0; j < n; ++j) q[j] = 0;
    return scale;
  }
  const typename V::F s = V::set1(scale), lo = V::set1(-127.f), hi = V::set1(127.f);
  for (i = 0; i + V::kWidth <= n; i += V::kWidth)
    V::store_i8(q + i, V::min(V::max(V::round(V::div(V::load(x + i), s)), lo), hi));
  for (; i < n; ++i) {
    const float c = __builtin_nearbyintf(x[i] / scale);
    q[i] = static_cast<int8_t>(c < -127.f ? -127.f : (c > 127.f ? 127.f : c));
  }
  return scale;
}

// y = x / sqrt(mean(x^2) + eps) * w (y may be x): the decoder layer's rms_norm (decoder_layer.cpp)
// on vectors. The sum of squares in double (V::sum_squares) gives the same float as the baseline's
// order except within ~1e-16 of a float rounding boundary; the products are the same two roundings.
template <class V>
void rms_norm(const float* x, const float* w, int64_t n, float eps, float* y) {
  const double ss = V::sum_squares(x, n);
  const float inv = 1.f / __builtin_sqrtf(static_cast<float>(ss / static_cast<double>(n)) + eps);
  const typename V::F vi = V::set1(inv);
  int64_t i = 0;
  for (; i + V::kWidth <= n; i += V::kWidth) V::store(y + i, V::mul(V::mul(V::load(x + i), vi), V::load(w + i)));
  for (; i < n; ++i) y[i] = x[i] * inv * w[i];
}

// Rotates one head in place (halves x[0, hd/2) and x[hd/2, hd), the non-interleaved layout) by the
// angles of cos / sin (hd / 2 each): x1 c - x2 s and x2 c + x1 s, as decoder_layer.cpp's rope.
// Returns false where hd / 2 is not a multiple of the vector width (the caller's loop runs).
template <class V>
bool rope_half(float* x, const float* cos, const float* sin, int64_t hd) {
  const int64_t half = hd / 2;
  if (half % V::kWidth != 0) return false;
  for (int64_t i = 0; i < half; i += V::kWidth) {
    const typename V::F x1 = V::load(x + i), x2 = V::load(x + half + i);
    const typename V::F c = V::load(cos + i), s = V::load(sin + i);
    V::store(x + i, V::sub(V::mul(x1, c), V::mul(x2, s)));
    V::store(x + half + i, V::add(V::mul(x2, c), V::mul(x1, s)));
  }
  return true;
}

template <class V>
void scores_f32(const float* q, int g, int64_t hd, const float* k, const float* ks, int64_t n,
                float scale, float* s, int64_t lds, const float* v) {
  scores<V>(q, g, hd, k, ks, n, scale, s, lds, v);
}
template <class V>
void scores_i8(const float* q, int g, int64_t hd, const int8_t* k, const float* ks, int64_t n,
               float scale, float* s, int64_t lds, const int8_t* v) {
  scores<V>(q, g, hd, k, ks, n, scale, s, lds, v);
}
template <class V>
void weighted_f32(const float* p, int64_t ldp, int g, const float* v, int64_t n, int64_t hd,
                  const float* inv, float* out) {
  weighted<V>(p, ldp, g, v, n, hd, inv, out);
}
template <class V>
void weighted_i8(const float* p, int64_t ldp, int g, const int8_t* v, int64_t n, int64_t hd,
                 const float* inv, float* out) {
  weighted<V>(p, ldp, g, v, n, hd, inv, out);
}

// The AttentionKernels of vector traits V.
template <class V>
constexpr AttentionKernels attention_kernels() {
  return {V::kWidth,       scores_f32<V>,          scores_i8<V>, weighted_f32<V>,
          weighted_i8<V>, softmax_numerators<V>, swiglu<V>,    quantize_i8<V>,
          rms_norm<V>,    rope_half<V>};
}

#endif  // QUANTLAB_ATTENTION_SIMD_H_

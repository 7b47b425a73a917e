// Every compiled path against the scalar reference (and the scalar reference against a float64
// dequantize-then-multiply oracle) on awkward shapes. Prints "N passed, M failed"; exit 1 on any
// failure. Usage: quantlab_kernels_test [--quick | --path-features]
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "dtype.h"
#include "matmul_internal.h"
#include "quantlab_kernels.h"

namespace {

// fp32 paths vs each other: summation order only. Bound relative to sum_k |x_k w_k|.
constexpr double kOrderTol = 2e-5;
// int8 accuracy vs the float64 oracle: A rounded to int8 per block adds at most
// sum_k |w_k| * d_k / 2 with d = max|x| / 127 per block; we check against that bound.

struct Case {
  int64_t m, k, n;
  int bits, bs;
  bool zp, bias;
  int dtype, threads;
};

struct Data {
  std::vector<uint8_t> b, zp;
  std::vector<float> x, s, bias;  // fp32 values (already rounded to dtype)
  std::vector<uint16_t> x16, s16, bias16;
};

int g_passed = 0, g_failed = 0;

uint16_t to16(float v, int dtype) {
  return dtype == QL_F16 ? ql::f32_to_f16(v) : ql::f32_to_bf16(v);
}
float from16(uint16_t v, int dtype) {
  return dtype == QL_F16 ? ql::f16_to_f32(v) : ql::bf16_to_f32(v);
}

Data make_data(const Case& c, std::mt19937& rng) {
  Data d;
  const int64_t kb = (c.k + c.bs - 1) / c.bs, blob = c.bs * c.bits / 8;
  std::uniform_int_distribution<int> byte(0, 255);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<float> uni(0.002f, 0.03f);
  d.b.resize(c.n * kb * blob);
  for (auto& v : d.b) v = static_cast<uint8_t>(byte(rng));
  const int64_t zrow = c.bits == 4 ? (kb + 1) / 2 : kb;
  if (c.zp) {
    d.zp.resize(c.n * zrow);
    for (auto& v : d.zp) v = static_cast<uint8_t>(byte(rng));
  }
  auto round_dtype = [&](float v) {
    return c.dtype == QL_F32 ? v : from16(to16(v, c.dtype), c.dtype);
  };
  d.x.resize(c.m * c.k);
  for (auto& v : d.x) v = round_dtype(normal(rng) * (byte(rng) == 0 ? 20.f : 1.f));  // outliers
  d.s.resize(c.n * kb);
  for (auto& v : d.s) v = round_dtype(uni(rng));
  if (c.bias) {
    d.bias.resize(c.n);
    for (auto& v : d.bias) v = round_dtype(normal(rng));
  }
  if (c.dtype != QL_F32) {
    for (float v : d.x) d.x16.push_back(to16(v, c.dtype));
    for (float v : d.s) d.s16.push_back(to16(v, c.dtype));
    for (float v : d.bias) d.bias16.push_back(to16(v, c.dtype));
  }
  return d;
}

int code(const Data& d, const Case& c, int64_t n, int64_t e) {
  const int64_t kb = (c.k + c.bs - 1) / c.bs, row = kb * c.bs * c.bits / 8;
  if (c.bits == 8) return d.b[n * row + e];
  uint8_t byte = d.b[n * row + e / 2];
  return (e & 1) ? byte >> 4 : byte & 15;
}

int zpoint(const Data& d, const Case& c, int64_t n, int64_t blk) {
  if (!c.zp) return 1 << (c.bits - 1);
  const int64_t kb = (c.k + c.bs - 1) / c.bs;
  if (c.bits == 8) return d.zp[n * kb + blk];
  uint8_t byte = d.zp[n * ((kb + 1) / 2) + blk / 2];
  return (blk & 1) ? byte >> 4 : byte & 15;
}

// Returns y (float64 oracle), |x||w| sums and the int8-rounding bound per output.
void oracle(const Data& d, const Case& c, std::vector<double>& y, std::vector<double>& mag,
            std::vector<double>& qbound) {
  const int64_t kb = (c.k + c.bs - 1) / c.bs;
  y.assign(c.m * c.n, 0.0);
  mag.assign(c.m * c.n, 0.0);
  qbound.assign(c.m * c.n, 0.0);
  for (int64_t m = 0; m < c.m; ++m) {
    std::vector<double> dx(kb, 0.0);
    for (int64_t e = 0; e < c.k; ++e)
      dx[e / c.bs] = std::max(dx[e / c.bs], std::fabs(double(d.x[m * c.k + e])) / 127.0);
    for (int64_t n = 0; n < c.n; ++n) {
      double acc = c.bias ? d.bias[n] : 0.0, a = 0.0, qb = 0.0;
      for (int64_t e = 0; e < c.k; ++e) {
        const int64_t blk = e / c.bs;
        double wv = double(code(d, c, n, e) - zpoint(d, c, n, blk)) * d.s[n * kb + blk];
        acc += wv * d.x[m * c.k + e];
        a += std::fabs(wv * d.x[m * c.k + e]);
        qb += std::fabs(wv) * dx[blk] * 0.5;
      }
      y[m * c.n + n] = acc;
      mag[m * c.n + n] = a + (c.bias ? std::fabs(d.bias[n]) : 0.0);
      qbound[m * c.n + n] = qb;
    }
  }
}

// The call's arguments for case c's data, output to y (of c.dtype).
ql_matmul_nbits_args make_args(const Data& d, const Case& c, int path, int accuracy, void* y) {
  ql_matmul_nbits_args a{};
  const bool f32 = c.dtype == QL_F32;
  a.a = f32 ? static_cast<const void*>(d.x.data()) : d.x16.data();
  a.b = d.b.data();
  a.scales = f32 ? static_cast<const void*>(d.s.data()) : d.s16.data();
  a.zero_points = c.zp ? d.zp.data() : nullptr;
  a.bias = !c.bias ? nullptr : f32 ? static_cast<const void*>(d.bias.data()) : d.bias16.data();
  a.y = y;
  a.m = c.m;
  a.k = c.k;
  a.n = c.n;
  a.bits = c.bits;
  a.block_size = c.bs;
  a.dtype = c.dtype;
  a.accuracy = accuracy;
  a.path = path;
  a.threads = c.threads;
  return a;
}

std::vector<float> run(const Data& d, const Case& c, int path, int accuracy, int* status) {
  std::vector<float> y(c.m * c.n, 0.f);
  std::vector<uint16_t> y16(c.m * c.n, 0);
  const bool f32 = c.dtype == QL_F32;
  const ql_matmul_nbits_args a =
      make_args(d, c, path, accuracy, f32 ? static_cast<void*>(y.data()) : y16.data());
  *status = ql_matmul_nbits(&a);
  if (!f32)
    for (size_t i = 0; i < y.size(); ++i) y[i] = from16(y16[i], c.dtype);
  return y;
}

void check(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAIL %s\n", what.c_str());
  }
}

// ql_decoder_layer: a prompt of 3 tokens in one call and token by token give the same residual
// stream and cache (causal mask, cache offsets, RoPE per position), fp32 accuracy so that only the
// summation order of the M = 3 and M = 1 tiles differs; and bad arguments are refused.
void test_decoder_layer(std::mt19937& rng) {
  const int64_t hidden = 64, heads = 4, kv_heads = 2, hd = 16, ff = 96, seq = 3, cap = 8;
  const int bs = 32;
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> uni(-1.f, 1.f);
  struct Lin {
    std::vector<uint8_t> b;
    std::vector<float> s;
  };
  auto make = [&](int64_t k, int64_t n) {
    Lin l;
    l.b.resize(static_cast<size_t>(n * (k / bs) * bs / 2));
    for (auto& v : l.b) v = static_cast<uint8_t>(byte(rng));
    l.s.assign(static_cast<size_t>(n * (k / bs)), 0.02f);
    return l;
  };
  auto bind = [&](const Lin& l, int64_t k, int64_t n) {
    ql_linear q{};
    q.b = l.b.data();
    q.scales = l.s.data();
    q.k = k;
    q.n = n;
    q.bits = 4;
    q.block_size = bs;
    q.accuracy = QL_ACC_FP32;
    return q;
  };
  const Lin qkv = make(hidden, (heads + 2 * kv_heads) * hd), o = make(heads * hd, hidden);
  const Lin gate_up = make(hidden, 2 * ff), down = make(ff, hidden);
  std::vector<float> ones(hidden, 1.f), x0(seq * hidden), cos(seq * hd / 2), sin(seq * hd / 2);
  for (auto& v : x0) v = uni(rng);
  for (int64_t t = 0; t < seq; ++t)
    for (int64_t i = 0; i < hd / 2; ++i) {
      const double angle = static_cast<double>(t) * std::pow(10000.0, -2.0 * i / hd);
      cos[t * hd / 2 + i] = static_cast<float>(std::cos(angle));
      sin[t * hd / 2 + i] = static_cast<float>(std::sin(angle));
    }
  auto args = [&](float* x, float* kc, float* vc, int64_t past, int64_t n) {
    ql_decoder_layer_args a{};
    a.x = x;
    a.k_cache = kc;
    a.v_cache = vc;
    a.cos = cos.data() + past * hd / 2;
    a.sin = sin.data() + past * hd / 2;
    a.input_norm = a.post_norm = ones.data();
    a.qkv = bind(qkv, hidden, (heads + 2 * kv_heads) * hd);
    a.o = bind(o, heads * hd, hidden);
    a.gate_up = bind(gate_up, hidden, 2 * ff);
    a.down = bind(down, ff, hidden);
    a.batch = 1;
    a.seq = n;
    a.past = past;
    a.capacity = cap;
    a.hidden = hidden;
    a.heads = heads;
    a.kv_heads = kv_heads;
    a.head_dim = hd;
    a.intermediate = ff;
    a.eps = 1e-5f;
    a.threads = 2;
    return a;
  };
  const size_t cache_size = static_cast<size_t>(kv_heads * cap * hd);
  std::vector<float> x1 = x0, k1(cache_size), v1(cache_size), x2 = x0, k2(cache_size),
                     v2(cache_size);
  ql_decoder_layer_args a = args(x1.data(), k1.data(), v1.data(), 0, seq);
  check(ql_decoder_layer(&a) == QL_OK, "decoder layer: prompt");
  for (int64_t t = 0; t < seq; ++t) {
    a = args(x2.data() + t * hidden, k2.data(), v2.data(), t, 1);
    check(ql_decoder_layer(&a) == QL_OK, "decoder layer: step");
  }
  double worst = 0.0;
  for (size_t i = 0; i < x1.size(); ++i) worst = std::max(worst, std::fabs(double(x1[i]) - x2[i]));
  for (size_t i = 0; i < k1.size(); ++i)
    worst = std::max({worst, std::fabs(double(k1[i]) - k2[i]), std::fabs(double(v1[i]) - v2[i])});
  check(worst < 1e-4, "decoder layer: prompt == steps (" + std::to_string(worst) + ")");

  // The int8 cache: prompt == steps again (the codes of a row may differ by one where the M = 3
  // and M = 1 sums of a key straddle a rounding boundary), the codes and scales are those of the
  // fp32 cache's rows (quantlab_kernels.h), and the output stays near the fp32 cache's.
  const size_t rows = static_cast<size_t>(kv_heads * cap);
  std::vector<int8_t> k8a(cache_size), v8a(cache_size), k8b(cache_size), v8b(cache_size);
  std::vector<float> ksa(rows), vsa(rows), ksb(rows), vsb(rows), x3 = x0, x4 = x0;
  auto int8_args = [&](float* x, int8_t* kc, int8_t* vc, float* ks, float* vs, int64_t past,
                       int64_t n) {
    ql_decoder_layer_args q = args(x, nullptr, nullptr, past, n);
    q.k_cache = kc;
    q.v_cache = vc;
    q.k_scale = ks;
    q.v_scale = vs;
    q.cache_dtype = QL_CACHE_INT8;
    return q;
  };
  a = int8_args(x3.data(), k8a.data(), v8a.data(), ksa.data(), vsa.data(), 0, seq);
  check(ql_decoder_layer(&a) == QL_OK, "decoder layer int8: prompt");
  for (int64_t t = 0; t < seq; ++t) {
    a = int8_args(x4.data() + t * hidden, k8b.data(), v8b.data(), ksb.data(), vsb.data(), t, 1);
    check(ql_decoder_layer(&a) == QL_OK, "decoder layer int8: step");
  }
  double worst8 = 0.0, near_f32 = 0.0;
  int code_diff = 0;
  for (size_t i = 0; i < x3.size(); ++i) {
    worst8 = std::max(worst8, std::fabs(double(x3[i]) - x4[i]));
    near_f32 = std::max(near_f32, std::fabs(double(x3[i]) - x1[i]));
  }
  check(worst8 < 1e-3, "decoder layer int8: prompt == steps (" + std::to_string(worst8) + ")");
  for (int64_t h = 0; h < kv_heads; ++h)
    for (int64_t t = 0; t < seq; ++t) {
      const size_t row = static_cast<size_t>(h * cap + t);
      for (const auto& [f, q8, sc] :
           {std::make_tuple(&k1, &k8a, &ksa), std::make_tuple(&v1, &v8a, &vsa)}) {
        float amax = 0.f;
        for (int64_t d = 0; d < hd; ++d) amax = std::max(amax, std::fabs((*f)[row * hd + d]));
        check(std::fabs((*sc)[row] - amax / 127.f) <= 1e-5f * amax, "decoder layer int8: scale");
        for (int64_t d = 0; d < hd; ++d) {
          const float want = std::nearbyint((*f)[row * hd + d] / (amax / 127.f));
          code_diff = std::max(code_diff, static_cast<int>(std::fabs(want - (*q8)[row * hd + d])));
        }
      }
      for (int64_t d = 0; d < hd; ++d) {
        const size_t e = row * hd + d;
        code_diff = std::max({code_diff, std::abs(k8a[e] - k8b[e]), std::abs(v8a[e] - v8b[e])});
      }
    }
  check(code_diff <= 1, "decoder layer int8: codes (" + std::to_string(code_diff) + ")");
  // int8 rounding moves each cached value by <= scale / 2 = max|row| / 254: the residual stream
  // moves by a few 1e-3 here; 0.05 fails if the scales were dropped (codes up to 127x the values).
  check(near_f32 > 0.0 && near_f32 < 0.05,
        "decoder layer int8: near the fp32 cache (" + std::to_string(near_f32) + ")");
  a = int8_args(x3.data(), k8a.data(), v8a.data(), nullptr, vsa.data(), 0, seq);
  check(ql_decoder_layer(&a) == QL_ERR_ARGUMENT, "decoder layer int8: no key scales");
  a.k_scale = ksa.data();
  a.cache_dtype = 7;
  check(ql_decoder_layer(&a) == QL_ERR_ARGUMENT, "decoder layer: unknown cache dtype");

  a = args(x1.data(), k1.data(), v1.data(), 6, seq);  // 6 + 3 > capacity 8
  check(ql_decoder_layer(&a) == QL_ERR_ARGUMENT, "decoder layer: no room in the cache");
  a = args(x1.data(), k1.data(), v1.data(), 0, seq);
  a.o.n = hidden + 1;
  check(ql_decoder_layer(&a) == QL_ERR_ARGUMENT, "decoder layer: o_proj shape");
  check(ql_decoder_layer(nullptr) == QL_ERR_ARGUMENT, "decoder layer: null pointer");
}

// The int8 cache's row quantizer of each path with vector attention kernels against the decoder
// layer's scalar one (decoder_layer.cpp), bit for bit: scale max|x| / 127, codes nearbyint(x / scale)
// clamped to +-127; rows of any length (vector tails), zero rows, exact ties and a NaN.
void test_quantize_i8(std::mt19937& rng) {
  auto reference = [](const float* x, int64_t n, int8_t* q) {
    float amax = 0.f;
    for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float scale = amax / 127.f;
    for (int64_t i = 0; i < n; ++i) {
      const float c = scale > 0.f ? std::nearbyint(x[i] / scale) : 0.f;
      q[i] = static_cast<int8_t>(std::min(std::max(c, -127.f), 127.f));
    }
    return scale;
  };
  std::normal_distribution<float> normal(0.f, 3.f);
  std::vector<std::vector<float>> rows;
  for (int64_t n : {1, 7, 8, 15, 16, 17, 64, 100, 128}) {
    std::vector<float> x(n);
    for (auto& v : x) v = normal(rng);
    rows.push_back(x);
  }
  rows.push_back(std::vector<float>(64, 0.f));
  std::vector<float> ties(64);  // max 127: scale 1, so k + 0.5 are exact ties (even: round down)
  for (int64_t i = 0; i < 64; ++i) ties[i] = i == 0 ? 127.f : static_cast<float>(i % 9) - 4.5f;
  rows.push_back(ties);
  std::vector<float> nan_row = rows[6];
  nan_row[5] = std::nanf("");
  rows.push_back(nan_row);
  for (int path : {QL_PATH_AVX2, QL_PATH_AVX_VNNI, QL_PATH_AVX512_VNNI, QL_PATH_AMX}) {
    const ql::PathKernels* k = ql::supported_kernels(path);
    if (k == nullptr || k->attention == nullptr) continue;
    for (size_t r = 0; r < rows.size(); ++r) {
      const std::vector<float>& x = rows[r];
      const int64_t n = static_cast<int64_t>(x.size());
      std::vector<int8_t> want(n), got(n);
      const float s_want = reference(x.data(), n, want.data());
      const float s_got = k->attention->quantize_i8(x.data(), n, got.data());
      const bool nan_row_case = r + 1 == rows.size();
      bool same = std::memcmp(&s_want, &s_got, sizeof(float)) == 0;
      for (int64_t i = 0; i < n; ++i)
        same = same && (want[i] == got[i] || (nan_row_case && std::isnan(x[i])));
      check(same, "quantize_i8 path " + std::to_string(path) + " row " + std::to_string(r));
    }
  }
}

// The bf16-accuracy calls the AMX path runs on bf16 tiles (amx_bf16_rows in kernels_amx_bf16.cpp), the rest
// in fp32:
// weights and activations rounded to bf16 (8 significant bits), products summed in fp32.
bool amx_bf16(const Case& c, int path, int acc) {
  return path == QL_PATH_AMX && acc == QL_ACC_BF16 && c.dtype == QL_F32 && c.m >= 8 && c.bs % 32 == 0;
}
// Rounded to 8 significant bits, each of a bf16 product's factors is off by at most 2^-8 of itself.
constexpr double kBf16Tol = 1.0 / 128 + 1.0 / (1 << 16);

std::string describe(const Case& c, int path, int acc) {
  char buf[200];
  std::snprintf(buf, sizeof buf,
                "path=%d acc=%d m=%lld k=%lld n=%lld bits=%d bs=%d zp=%d bias=%d dtype=%d thr=%d",
                path, acc, (long long)c.m, (long long)c.k, (long long)c.n, c.bits, c.bs, c.zp,
                c.bias, c.dtype, c.threads);
  return buf;
}

void run_case(const Case& c, std::mt19937& rng) {
  Data d = make_data(c, rng);
  std::vector<double> y, mag, qb;
  oracle(d, c, y, mag, qb);
  // Output rounding to fp16/bf16 adds half an ulp of the output.
  const double out_rel = c.dtype == QL_F16 ? 1.0 / 1024 : c.dtype == QL_BF16 ? 1.0 / 128 : 0.0;
  for (int acc : {QL_ACC_FP32, QL_ACC_BF16, QL_ACC_INT8}) {
    int st = 0;
    std::vector<float> ref = run(d, c, QL_PATH_SCALAR, acc, &st);
    check(st == QL_OK, "scalar status " + describe(c, QL_PATH_SCALAR, acc));
    // Scalar vs the float64 oracle.
    bool ok = true;
    for (size_t i = 0; i < ref.size(); ++i) {
      double tol = kOrderTol * mag[i] + (acc == QL_ACC_INT8 ? qb[i] * 1.0001 : 0.0) +
                   out_rel * std::fabs(y[i]) + 1e-6;
      if (!(std::fabs(ref[i] - y[i]) <= tol)) {
        if (ok) std::printf("  [%zu] scalar %.7g oracle %.7g tol %.3g\n", i, ref[i], y[i], tol);
        ok = false;
      }
    }
    check(ok, "scalar vs oracle " + describe(c, QL_PATH_SCALAR, acc));
    for (int path : {QL_PATH_AVX2, QL_PATH_AVX_VNNI, QL_PATH_AVX512_VNNI, QL_PATH_AMX, QL_PATH_NEON,
                     QL_PATH_NEON_DOT}) {
      if (!ql_path_available(path)) continue;
      std::vector<float> out = run(d, c, path, acc, &st);
      check(st == QL_OK, "status " + describe(c, path, acc));
      ok = true;
      if (amx_bf16(c, path, acc)) {  // its own rounding: against the float64 oracle
        for (size_t i = 0; i < out.size(); ++i) {
          double tol = (kBf16Tol + kOrderTol) * mag[i] + out_rel * std::fabs(y[i]) + 1e-6;
          if (!(std::fabs(out[i] - y[i]) <= tol)) {
            if (ok) std::printf("  [%zu] got %.7g oracle %.7g tol %.3g\n", i, out[i], y[i], tol);
            ok = false;
          }
        }
        check(ok, describe(c, path, acc) + " (bf16 tiles)");
        continue;
      }
      for (size_t i = 0; i < out.size(); ++i) {
        double tol = kOrderTol * mag[i] + 2 * out_rel * std::fabs(y[i]) + 1e-6;
        if (!(std::fabs(out[i] - ref[i]) <= tol)) {
          if (ok) std::printf("  [%zu] got %.7g scalar %.7g tol %.3g\n", i, out[i], ref[i], tol);
          ok = false;
        }
      }
      check(ok, describe(c, path, acc));
    }
  }
}

// ql_decoder_head on every path the CPU has: rmsnorm (the sum of squares in double, the products in
// float, as the layers' norms) then the MatMulNBits head, bit for bit the norm written out here
// followed by ql_matmul_nbits on the same path; x is left as it was; bad arguments are refused.
void test_decoder_head(std::mt19937& rng) {
  const float eps = 1e-5f;
  for (const Case& c : {Case{3, 64, 33, 8, 64, true, false, QL_F32, 2},
                        Case{16, 96, 40, 4, 32, true, false, QL_F32, 2},
                        Case{1, 64, 7, 4, 32, false, false, QL_F32, 1}}) {
    Data d = make_data(c, rng);
    std::normal_distribution<float> normal(1.f, 0.2f);
    std::vector<float> w(c.k);
    for (auto& v : w) v = normal(rng);
    Data normed = d;
    for (int64_t r = 0; r < c.m; ++r) {
      const float* x = d.x.data() + r * c.k;
      double ss = 0.0;
      for (int64_t i = 0; i < c.k; ++i) ss += static_cast<double>(x[i]) * x[i];
      const float inv = 1.f / std::sqrt(static_cast<float>(ss / static_cast<double>(c.k)) + eps);
      for (int64_t i = 0; i < c.k; ++i) normed.x[r * c.k + i] = x[i] * inv * w[i];
    }
    for (int path : {QL_PATH_SCALAR, QL_PATH_AVX2, QL_PATH_AVX_VNNI, QL_PATH_AVX512_VNNI,
                     QL_PATH_AMX, QL_PATH_NEON, QL_PATH_NEON_DOT}) {
      if (!ql_path_available(path)) continue;
      int st = 0;
      const std::vector<float> want = run(normed, c, path, QL_ACC_INT8, &st);
      std::vector<float> got(c.m * c.n, -1.f), x_before = d.x;
      ql_decoder_head_args a{};
      a.x = d.x.data();
      a.norm = w.data();
      a.head = ql_linear{d.b.data(), d.s.data(), c.zp ? d.zp.data() : nullptr, nullptr,
                         c.k, c.n, c.bits, c.bs, QL_ACC_INT8, 0};
      a.logits = got.data();
      a.rows = c.m;
      a.hidden = c.k;
      a.eps = eps;
      a.path = path;
      a.threads = c.threads;
      check(st == QL_OK && ql_decoder_head(&a) == QL_OK, "decoder head status " + describe(c, path, 4));
      check(got == want && d.x == x_before, "decoder head = norm + matmul " + describe(c, path, 4));
      a.hidden = c.k + 1;  // the head's K is another width
      check(ql_decoder_head(&a) == QL_ERR_ARGUMENT, "decoder head: hidden != K");
    }
  }
  check(ql_decoder_head(nullptr) == QL_ERR_ARGUMENT, "decoder head: null pointer");
}

// matmul_nbits_swiglu (the decoder layer's fused gate / up linear) on every path the CPU has: bit
// for bit ql_matmul_nbits over the [gate | up] rows on the same path followed by the epilogue's
// function over whole rows (the path's SwiGLU, lane-wise, where it has one; else a plain loop),
// for decode (M = 1), AMX (8..16 and 20 rows), bias and zero points, ff a multiple of the tile
// widths (matmul_internal.h); wrong shapes and non-f32 activations refused.
void plain_swiglu(const float* g, const float* u, int64_t n, float* act, const void*) {
  for (int64_t e = 0; e < n; ++e) act[e] = g[e] / (1.f + std::exp(-g[e])) * u[e];
}
void path_swiglu(const float* g, const float* u, int64_t n, float* act, const void* ctx) {
  static_cast<const ql::AttentionKernels*>(ctx)->swiglu(g, u, n, act);
}

void test_matmul_swiglu(std::mt19937& rng) {
  for (const Case& c : {Case{1, 576, 2 * 40, 4, 32, true, false, QL_F32, 2},
                        Case{16, 576, 2 * 48, 4, 128, true, false, QL_F32, 2},
                        Case{16, 576, 2 * 32, 4, 32, false, true, QL_F32, 2},
                        Case{20, 320, 2 * 22, 8, 64, true, true, QL_F32, 3},
                        Case{3, 1000, 2 * 16, 4, 64, true, false, QL_F32, 1}}) {
    const Data d = make_data(c, rng);
    const int64_t ff = c.n / 2;
    for (int path : {QL_PATH_SCALAR, QL_PATH_AVX2, QL_PATH_AVX_VNNI, QL_PATH_AVX512_VNNI,
                     QL_PATH_AMX, QL_PATH_NEON, QL_PATH_NEON_DOT}) {
      if (!ql_path_available(path)) continue;
      const ql::PathKernels* k = ql::supported_kernels(path);
      const ql::AttentionKernels* ak = k != nullptr ? k->attention : nullptr;
      const ql::SwigluEpilogue ep = {ff, ak != nullptr ? path_swiglu : plain_swiglu, ak};
      int st = 0;
      const std::vector<float> y = run(d, c, path, QL_ACC_INT8, &st);
      std::vector<float> want(c.m * ff), got(c.m * ff, -1.f);
      for (int64_t r = 0; r < c.m; ++r) ep.fn(&y[r * c.n], &y[r * c.n + ff], ff, &want[r * ff], ak);
      ql_matmul_nbits_args a = make_args(d, c, path, QL_ACC_INT8, got.data());
      const int fused = ql::matmul_nbits_swiglu(&a, ep);
      check(st == QL_OK && fused == QL_OK && got == want, "swiglu epilogue = products + swiglu " + describe(c, path, 4));
      ql::SwigluEpilogue bad = ep;
      bad.ff = ff + 1;
      check(ql::matmul_nbits_swiglu(&a, bad) == QL_ERR_ARGUMENT, "swiglu epilogue: n != 2 ff");
      a.dtype = QL_F16;
      check(ql::matmul_nbits_swiglu(&a, ep) == QL_ERR_ARGUMENT, "swiglu epilogue: f16 refused");
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--path-features") == 0) {
    // One line per path, "<path id>: <features>", for tests/kernels/test_isa_audit.py.
    for (int p = QL_PATH_SCALAR; p <= QL_PATH_AMX; ++p) std::printf("%d: %s\n", p, ql_path_features(p));
    return 0;
  }
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  std::printf("%s\n", ql_build_info());
  std::mt19937 rng(1234);
  const int64_t ms[] = {1, 3, 17};
  const int64_t ks[] = {40, 320, 1000};  // none a multiple of 256; 40 < one block of 64
  const int64_t ns[] = {1, 7, 33};
  int idx = 0;
  for (int bits : {4, 8}) {
    for (int bs : {16, 32, 64, 128, 256}) {
      for (int64_t m : ms) {
        for (int64_t k : ks) {
          for (int64_t n : ns) {
            ++idx;
            if (quick && idx % 3 != 0) continue;
            Case c{m, k, n, bits, bs, idx % 2 == 0, idx % 5 == 0, QL_F32, 1 + idx % 3};
            run_case(c, rng);
          }
        }
      }
    }
  }
  // Reduced-precision inputs and a larger shape.
  for (int dtype : {QL_F16, QL_BF16}) {
    run_case(Case{3, 320, 9, 4, 32, true, true, dtype, 2}, rng);
    run_case(Case{1, 576, 17, 4, 128, false, false, dtype, 1}, rng);
  }
  run_case(Case{9, 4096, 37, 4, 128, true, true, QL_F32, 2}, rng);
  run_case(Case{40, 1000, 35, 4, 256, true, false, QL_F32, 3}, rng);  // AMX: 16 + 16 + 8 rows
  run_case(Case{33, 520, 19, 4, 128, false, true, QL_F16, 2}, rng);
  // AMX with small blocks: four activation tiles (no alternating C tiles), a partial last chunk.
  run_case(Case{64, 1000, 35, 4, 32, true, true, QL_F32, 2}, rng);
  run_case(Case{9, 4096, 37, 4, 16, false, true, QL_F32, 1}, rng);
  run_case(Case{40, 520, 19, 4, 64, true, false, QL_F32, 3}, rng);
  // AMX bf16 tiles: SmolLM2's g32 shape at batch 16, 8-bit weights (its head's format), blocks of
  // 128 from 64 rows on (four activation tiles, a partial last one), K not a multiple of 32.
  run_case(Case{16, 576, 960, 4, 32, true, false, QL_F32, 2}, rng);
  run_case(Case{16, 576, 49, 8, 128, true, true, QL_F32, 2}, rng);
  run_case(Case{9, 1000, 21, 8, 32, false, false, QL_F32, 1}, rng);
  run_case(Case{70, 1000, 35, 4, 128, true, true, QL_F32, 2}, rng);
  // AMX int8 tiles of 8-bit codes read in place: five activation tiles over two calls, a partial
  // weight tile, blocks of 64 and 256.
  run_case(Case{70, 1000, 35, 8, 64, true, true, QL_F32, 2}, rng);
  run_case(Case{24, 768, 40, 8, 256, false, false, QL_F32, 3}, rng);
  // The full AMX tile (8..16 activation rows, 16 weight rows: amx_tile_impl<true>, a batch-16
  // decode step's shape), 4- and 8-bit, with and without bias, fp32 and fp16 output.
  run_case(Case{8, 576, 48, 4, 128, true, false, QL_F32, 2}, rng);
  run_case(Case{13, 640, 64, 8, 128, false, false, QL_F32, 2}, rng);
  run_case(Case{16, 576, 40, 4, 64, true, false, QL_F32, 1}, rng);
  run_case(Case{16, 576, 48, 4, 128, true, true, QL_F32, 2}, rng);
  run_case(Case{12, 576, 48, 4, 32, true, false, QL_F16, 2}, rng);
  // Argument errors come back as status codes.
  {
    ql_matmul_nbits_args a{};
    check(ql_matmul_nbits(&a) == QL_ERR_ARGUMENT, "null args");
    check(ql_matmul_nbits(nullptr) == QL_ERR_ARGUMENT, "null pointer");
  }
  test_decoder_layer(rng);
  test_quantize_i8(rng);
  test_decoder_head(rng);
  test_matmul_swiglu(rng);
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}

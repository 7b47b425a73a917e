// Driver: validates arguments, prepares activations once, splits N across the thread pool and runs
// the selected path's tile kernel; adds the zero-point term, bias and output conversion.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "cpu_features.h"
#include "dtype.h"
#include "matmul_internal.h"
#include "quantlab_kernels.h"
#include "thread_pool.h"

namespace ql {
namespace {

// A path runs only where the CPU has every feature it was compiled with (cpu_features.h).
bool cpu_has(int path) {
  const uint32_t need = path_features(path);
  return need != 0 && (cpu_features() & need) == need;
}

// Which paths this build contains (from the build's QL_HAVE_* definitions, without calling into them).
bool compiled(int path) {
  switch (path) {
    case QL_PATH_SCALAR:
      return true;
#if defined(QL_HAVE_AVX2)
    case QL_PATH_AVX2:
      return true;
#endif
#if defined(QL_HAVE_AVX_VNNI)
    case QL_PATH_AVX_VNNI:
      return true;
#endif
#if defined(QL_HAVE_AVX512_VNNI)
    case QL_PATH_AVX512_VNNI:
      return true;
#endif
#if defined(QL_HAVE_AMX)
    case QL_PATH_AMX:
      return true;
#endif
#if defined(QL_HAVE_NEON)
    case QL_PATH_NEON:
    case QL_PATH_NEON_DOT:
      return true;
#endif
    default:
      return false;
  }
}

// The CPU check comes first: no code of a path (not even its table accessor, compiled with the
// path's flags) runs on a CPU without the path's features.
const PathKernels* kernels_for(int path) {
  if (path == QL_PATH_SCALAR) return scalar_kernels();
  if (!compiled(path) || !cpu_has(path)) return nullptr;
  switch (path) {
    case QL_PATH_AVX2:
      return avx2_kernels();
    case QL_PATH_AVX_VNNI:
      return avx_vnni_kernels();
    case QL_PATH_AVX512_VNNI:
      return avx512_vnni_kernels();
    case QL_PATH_AMX:
      return amx_kernels();
    case QL_PATH_NEON:
      return neon_kernels();
    case QL_PATH_NEON_DOT:
      return neon_dot_kernels();
    default:
      return nullptr;
  }
}

int best_path() {
  for (int p : {QL_PATH_AMX, QL_PATH_AVX512_VNNI, QL_PATH_AVX_VNNI, QL_PATH_AVX2, QL_PATH_NEON_DOT,
                QL_PATH_NEON}) {
    if (kernels_for(p) != nullptr) return p;
  }
  return QL_PATH_SCALAR;
}

float load_elem(const void* p, int64_t i, int dtype) {
  switch (dtype) {
    case QL_F16:
      return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case QL_BF16:
      return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

void store_elem(void* p, int64_t i, int dtype, float v) {
  switch (dtype) {
    case QL_F16:
      static_cast<uint16_t*>(p)[i] = f32_to_f16(v);
      break;
    case QL_BF16:
      static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
      break;
    default:
      static_cast<float*>(p)[i] = v;
  }
}

// Quantizes one row of A per block: d = max|x| / 127, q = round-half-even(x * (127 / max|x|)).
// Every path consumes these same codes, so paths differ only in fp32 summation order. Written to
// auto-vectorize: |x| is maximized on the float bits as integers (monotonic for non-NaN), and
// rounding adds and subtracts 1.5 * 2^23, which rounds half to even exactly like nearbyint for
// |v| <= 127 but without a libm call per element.
void prepare_row_int8(const float* x, int64_t k, int bits, int bs, int64_t kb, int perm, int8_t* q,
                      float* d, float* xsum) {
  constexpr float kMagic = 12582912.f;  // 1.5 * 2^23
  std::vector<int8_t> tmp(static_cast<size_t>(bs));
  for (int64_t b = 0; b < kb; ++b) {
    const int64_t e0 = b * bs, len = std::min<int64_t>(bs, k - e0);
    uint32_t amax_bits = 0;
    for (int64_t e = 0; e < len; ++e) {
      uint32_t u;
      std::memcpy(&u, x + e0 + e, 4);
      amax_bits = std::max(amax_bits, u & 0x7fffffffu);
    }
    float amax;
    std::memcpy(&amax, &amax_bits, 4);
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    d[b] = amax / 127.f;
    int32_t sum = 0;
    for (int64_t e = 0; e < len; ++e) {
      // IEEE semantics (no -ffast-math anywhere here) keep (v + m) - m from folding into v.
      const float r = (x[e0 + e] * inv + kMagic) - kMagic;
      const int32_t v = std::max(-127, std::min(127, static_cast<int32_t>(r)));
      tmp[e] = static_cast<int8_t>(v);
      sum += v;
    }
    if (bits == 4 && bs % perm == 0) {
      // Whole chunks (the usual case): evens to the first half, odds to the second.
      for (int64_t c = 0; c < bs; c += perm) {
        int8_t* dst = q + e0 + c;
        for (int i = 0; i < perm / 2; ++i) {
          dst[i] = c + 2 * i < len ? tmp[c + 2 * i] : 0;
          dst[perm / 2 + i] = c + 2 * i + 1 < len ? tmp[c + 2 * i + 1] : 0;
        }
      }
    } else {
      for (int64_t e = 0; e < len; ++e) q[permuted_index(e0 + e, bits, perm)] = tmp[e];
    }
    xsum[b] = d[b] * static_cast<float>(sum);
  }
}

void prepare_row_fp32(const float* x, int64_t k, int /*bits*/, int bs, int64_t kb, float* xf,
                      float* xsum) {
  for (int64_t b = 0; b < kb; ++b) {
    int64_t e0 = b * bs, e1 = std::min<int64_t>(e0 + bs, k);
    float sum = 0.f;
    for (int64_t e = e0; e < e1; ++e) {
      xf[e] = x[e];
      sum += x[e];
    }
    xsum[b] = sum;
  }
}

// Per-calling-thread buffers, reused across calls (see matmul_nbits).
struct Scratch {
  std::vector<int8_t> q;
  std::vector<float> xf, d, xsum;
  std::vector<uint8_t> path;
};

template <class T>
T* grow(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}

int validate(const ql_matmul_nbits_args* a) {
  if (a == nullptr || a->a == nullptr || a->b == nullptr || a->scales == nullptr || a->y == nullptr)
    return QL_ERR_ARGUMENT;
  if (a->m < 0 || a->k <= 0 || a->n <= 0) return QL_ERR_ARGUMENT;
  if (a->bits != 4 && a->bits != 8) return QL_ERR_UNSUPPORTED;
  int bs = a->block_size;
  if (bs < 16 || bs > 256 || (bs & (bs - 1)) != 0) return QL_ERR_ARGUMENT;
  if (a->dtype != QL_F32 && a->dtype != QL_F16 && a->dtype != QL_BF16) return QL_ERR_ARGUMENT;
  if (a->accuracy != QL_ACC_FP32 && a->accuracy != QL_ACC_BF16 && a->accuracy != QL_ACC_INT8)
    return QL_ERR_ARGUMENT;
  return QL_OK;
}

}  // namespace

const PathKernels* supported_kernels(int path) {
  return kernels_for(path);
}

float* thread_scratch(size_t n) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

uint8_t* zeroed_storage(std::vector<uint8_t>& storage, size_t n) {
  storage.assign(n, 0);
  return storage.data();
}

#if !defined(QL_HAVE_AVX2)
const PathKernels* avx2_kernels() {
  return nullptr;
}
#endif
#if !defined(QL_HAVE_AVX_VNNI)
const PathKernels* avx_vnni_kernels() {
  return nullptr;
}
#endif
#if !defined(QL_HAVE_AVX512_VNNI)
const PathKernels* avx512_vnni_kernels() {
  return nullptr;
}
#endif
#if !defined(QL_HAVE_AMX)
const PathKernels* amx_kernels() {
  return nullptr;
}
#endif
#if !defined(QL_HAVE_NEON)
const PathKernels* neon_kernels() {
  return nullptr;
}
const PathKernels* neon_dot_kernels() {
  return nullptr;
}
#endif

namespace {

int matmul_nbits_impl(const ql_matmul_nbits_args* args, const SwigluEpilogue* ep) {
  int status = validate(args);
  if (status != QL_OK) return status;
  if (ep != nullptr && (args->dtype != QL_F32 || ep->fn == nullptr || ep->ff <= 0 || args->n != 2 * ep->ff))
    return QL_ERR_ARGUMENT;
  const int path = args->path == QL_PATH_AUTO ? best_path() : args->path;
  const PathKernels* kern = kernels_for(path);
  if (kern == nullptr) return QL_ERR_UNSUPPORTED;

  const int64_t M = args->m, K = args->k, N = args->n;
  const int bits = args->bits, bs = args->block_size, dtype = args->dtype;
  const bool int8 = args->accuracy == QL_ACC_INT8;
  if (M == 0) return QL_OK;

  Weights w;
  w.k = K;
  w.n = N;
  w.bits = bits;
  w.block_size = bs;
  w.k_blocks = (K + bs - 1) / bs;
  w.blob = bs * bits / 8;
  w.row_bytes = w.k_blocks * w.blob;
  w.b = args->b;
  w.offset = code_offset(bits, int8);
  const int64_t kb = w.k_blocks;
  const int64_t kq = (kb * bs + 127) / 128 * 128;

  int threads = args->threads > 0
                    ? args->threads
                    : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));

  // Activations: (M, kq) codes or values, (M, kb) scales and block sums.
  // The buffers live on as long as the calling thread: above ~128 KB a fresh allocation is a
  // fresh mmap, and its page faults (and the munmap's TLB shootdowns) cost more than an M = 64
  // quantization. Rows are re-zeroed from the last 128-element chunk holding K on (below).
  const bool a_is_f32 = dtype == QL_F32;
  // bf16 accuracy: the path's bf16 products where it has them for this call (it lays out the fp32
  // rows itself: no codes or block sums here), else fp32 like accuracy 0.
  const bool float_rows = args->accuracy == QL_ACC_BF16 && a_is_f32 && kern->float_rows != nullptr &&
                          kern->float_rows(w, M);
  thread_local Scratch scratch;
  int8_t* q_buf = grow(scratch.q, int8 ? M * kq : 0);
  float* xf_buf = grow(scratch.xf, int8 || float_rows ? 0 : M * kq);
  float* d_buf = grow(scratch.d, float_rows ? 0 : M * kb);
  float* xsum_buf = grow(scratch.xsum, float_rows ? 0 : M * kb);
  std::vector<float> x_row_buf;
  const int64_t tail = K / 128 * 128;  // zeros from here to kq: padding past K
  // src[offset .. offset + count) of dtype -> fp32; fp16 through the path's SIMD conversion.
  auto to_f32 = [&](const void* src, int64_t offset, int64_t count, float* dst) {
    if (dtype == QL_F16 && kern->f16_to_f32 != nullptr) {
      kern->f16_to_f32(static_cast<const uint16_t*>(src) + offset, dst, count);
    } else if (dtype == QL_BF16) {
      const uint16_t* h = static_cast<const uint16_t*>(src) + offset;
      for (int64_t e = 0; e < count; ++e) dst[e] = bf16_to_f32(h[e]);
    } else {
      for (int64_t e = 0; e < count; ++e) dst[e] = load_elem(src, offset + e, dtype);
    }
  };
  auto prepare = [&](int64_t r0, int64_t r1, std::vector<float>& row) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = static_cast<const float*>(args->a) + r * K;
      if (!a_is_f32) {
        row.resize(K);
        to_f32(args->a, r * K, K, row.data());
        x = row.data();
      }
      float* xs = xsum_buf + r * kb;
      if (int8) {
        int8_t* q = q_buf + r * kq;
        float* d = d_buf + r * kb;
        std::memset(q + tail, 0, static_cast<size_t>(kq - tail));
        if (kern->quantize_row == nullptr ||
            !kern->quantize_row(x, K, bits, bs, kb, kern->perm, q, d, xs))
          prepare_row_int8(x, K, bits, bs, kb, kern->perm, q, d, xs);
      } else {
        std::fill(xf_buf + r * kq + tail, xf_buf + (r + 1) * kq, 0.f);
        prepare_row_fp32(x, K, bits, bs, kb, xf_buf + r * kq, xs);
      }
    }
  };
  if (!float_rows && M * K >= (int64_t{1} << 16) && threads > 1) {
    std::atomic<int64_t> next_row{0};
    ThreadPool::global().run(threads, [&] {
      std::vector<float> row;
      for (int64_t r; (r = next_row.fetch_add(1)) < M;) prepare(r, r + 1, row);
    });
  } else if (!float_rows) {
    prepare(0, M, x_row_buf);
  }
  Acts acts;
  acts.m = M;
  acts.kq = kq;
  acts.perm = kern->perm;
  acts.q = q_buf;
  acts.xf = xf_buf;
  acts.d = d_buf;
  acts.xsum = xsum_buf;
  if (float_rows) acts.x = static_cast<const float*>(args->a);
  if ((int8 || float_rows) && kern->prepare != nullptr) kern->prepare(w, acts, scratch.path);

  if (kern->mr_max > kMaxMr || kern->nr_decode > kMaxNr || kern->nr_prefill > kMaxNr)
    return QL_ERR_INTERNAL;
  const int mr_max = M == 1 ? 1 : kern->mr_max;
  const int nr_max = M == 1 ? kern->nr_decode : kern->nr_prefill;
  const TileFn tile_fn = int8 || float_rows ? kern->int8_tile : kern->fp32_tile;
  const int64_t n_cols = ep != nullptr ? ep->ff : N;  // output columns: act's with the epilogue
  const int64_t n_tiles = (n_cols + nr_max - 1) / nr_max;
  threads = static_cast<int>(std::min<int64_t>(threads, n_tiles));
  const int64_t zp_row_bytes = bits == 4 ? (kb + 1) / 2 : kb;

  // Threads take runs of consecutive tiles from a shared counter (guided scheduling: a quarter of
  // the remaining work per thread at a time, down to one tile). Each run streams a contiguous
  // stretch of B, and a thread that the OS deschedules on a busy machine holds back the others
  // by one small run at the end at most, instead of a whole share as with a static split.
  // The counter has a cache line to itself: beside the other locals the lambdas read, every claim
  // by one thread would evict the line they sit in from the other's cache (perf, SmolLM2 decode at
  // 2 threads: a third of the driver's time). Runs are at least ~16 KB of weights, so that small
  // matrices (K = 576: 1 KB per tile) are not claimed tile by tile.
  struct alignas(64) Counter {
    std::atomic<int64_t> v{0};
  } next_tile;
  const int64_t tile_bytes = (ep != nullptr ? 2 : 1) * nr_max * w.row_bytes;
  const int64_t min_run = std::max<int64_t>(1, (16 << 10) / std::max<int64_t>(1, tile_bytes));
  auto claim = [&](int64_t& t0, int64_t& t1) {
    int64_t cur = next_tile.v.load(std::memory_order_relaxed);
    for (;;) {
      if (cur >= n_tiles) return false;
      const int64_t run = std::max<int64_t>(min_run, (n_tiles - cur) / (int64_t{threads} * 4));
      if (next_tile.v.compare_exchange_weak(cur, cur + run, std::memory_order_relaxed)) {
        t0 = cur;
        t1 = std::min(cur + run, n_tiles);
        return true;
      }
    }
  };
  auto work = [&] {
    // Scale and zero-point rows of the tile's weight rows; with the epilogue a second set for its
    // up rows (ff + the tile's columns), both set once per column tile.
    std::vector<float> s_buf(a_is_f32 ? 0 : (ep != nullptr ? 2 : 1) * nr_max * kb);
    const float* srows[2][kMaxNr];
    const uint8_t* zrows[2][kMaxNr];
    float out[kMaxMr * kMaxNr], out_up[kMaxMr * kMaxNr];  // out_up: the epilogue's up rows
    Tile tile;
    bool begun = false;
    for (;;) {
      int64_t t0, t1;
      if (!claim(t0, t1)) break;
      if (!begun && kern->tiles_begin != nullptr) kern->tiles_begin(w, acts);
      begun = true;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t col0 = t * nr_max;  // first output column
        tile.nr = static_cast<int>(std::min<int64_t>(nr_max, n_cols - col0));
        // Set r of the row pointers: weight rows from n0 (the epilogue's up rows: ff + col0).
        auto set_rows = [&](int r, int64_t n0) {
          for (int j = 0; j < tile.nr; ++j) {
            const int64_t n = n0 + j;
            if (a_is_f32) {
              srows[r][j] = static_cast<const float*>(args->scales) + n * kb;
            } else {
              float* s = s_buf.data() + (r * nr_max + j) * kb;
              to_f32(args->scales, n * kb, kb, s);
              srows[r][j] = s;
            }
            zrows[r][j] = args->zero_points ? args->zero_points + n * zp_row_bytes : nullptr;
          }
        };
        // The tile over weight rows from n0 with row pointer set r.
        auto use_rows = [&](int r, int64_t n0) {
          tile.n0 = n0;
          tile.scales = srows[r];
          tile.zeros = zrows[r];
        };
        set_rows(0, col0);
        if (ep != nullptr) {
          set_rows(1, ep->ff + col0);
          const float* bias = static_cast<const float*>(args->bias);
          for (tile.m0 = 0; tile.m0 < M; tile.m0 += mr_max) {
            tile.mr = static_cast<int>(std::min<int64_t>(mr_max, M - tile.m0));
            use_rows(0, col0);
            tile_fn(w, acts, tile, out);
            use_rows(1, ep->ff + col0);
            tile_fn(w, acts, tile, out_up);
            for (int i = 0; i < tile.mr; ++i) {
              float* g = out + i * tile.nr;
              float* u = out_up + i * tile.nr;
              if (bias != nullptr)
                for (int j = 0; j < tile.nr; ++j) g[j] += bias[col0 + j], u[j] += bias[ep->ff + col0 + j];
              ep->fn(g, u, tile.nr, static_cast<float*>(args->y) + (tile.m0 + i) * ep->ff + col0, ep->ctx);
            }
          }
          continue;
        }
        use_rows(0, col0);
        for (tile.m0 = 0; tile.m0 < M; tile.m0 += mr_max) {
          tile.mr = static_cast<int>(std::min<int64_t>(mr_max, M - tile.m0));
          tile_fn(w, acts, tile, out);
          if (dtype == QL_F32) {  // the common case without the per-element dtype switch
            const float* bias = static_cast<const float*>(args->bias);
            for (int i = 0; i < tile.mr; ++i) {
              float* y = static_cast<float*>(args->y) + (tile.m0 + i) * N + tile.n0;
              const float* o = out + i * tile.nr;
              if (bias == nullptr && tile.nr == kMaxNr)  // a fixed size: inlined, no libc call per row
                std::memcpy(y, o, sizeof(float) * kMaxNr);
              else if (bias == nullptr)
                std::memcpy(y, o, sizeof(float) * tile.nr);
              else
                for (int j = 0; j < tile.nr; ++j) y[j] = o[j] + bias[tile.n0 + j];
            }
            continue;
          }
          for (int i = 0; i < tile.mr; ++i) {
            for (int j = 0; j < tile.nr; ++j) {
              float y = out[i * tile.nr + j];
              if (args->bias != nullptr) y += load_elem(args->bias, tile.n0 + j, dtype);
              store_elem(args->y, (tile.m0 + i) * N + tile.n0 + j, dtype, y);
            }
          }
        }
      }
    }
    if (begun && kern->tiles_end != nullptr) kern->tiles_end(acts);
  };
  ThreadPool::global().run(threads, work);
  return QL_OK;
}

}  // namespace

int matmul_nbits(const ql_matmul_nbits_args* args) {
  return matmul_nbits_impl(args, nullptr);
}

int matmul_nbits_swiglu(const ql_matmul_nbits_args* args, const SwigluEpilogue& ep) {
  try {
    return matmul_nbits_impl(args, &ep);
  } catch (...) {
    return QL_ERR_INTERNAL;
  }
}

std::string build_info() {
  std::string s;
#if defined(__x86_64__)
  s += "x86_64";
#elif defined(__aarch64__)
  s += "aarch64";
#else
  s += "generic";
#endif
  const char* names[] = {"auto",     "scalar",   "avx2",        "neon",
                         "neon_dot", "avx_vnni", "avx512_vnni", "amx"};
  s += " compiled:";
  for (int p = QL_PATH_SCALAR; p <= QL_PATH_AMX; ++p) {
    if (compiled(p)) s += std::string(" ") + names[p];
  }
  s += " available:";
  for (int p = QL_PATH_SCALAR; p <= QL_PATH_AMX; ++p)
    if (kernels_for(p) != nullptr) s += std::string(" ") + names[p];
  s += " best:" + std::string(names[best_path()]);
  s += " cpu:" + feature_names(cpu_features());
  return s;
}

}  // namespace ql

extern "C" {

QL_API int ql_matmul_nbits(const ql_matmul_nbits_args* args) {
  try {
    return ql::matmul_nbits(args);
  } catch (...) {
    return QL_ERR_INTERNAL;
  }
}

QL_API int ql_path_available(int32_t path) {
  if (path == QL_PATH_AUTO) return 1;
  return ql::kernels_for(path) != nullptr ? 1 : 0;
}

QL_API int ql_best_path(void) {
  return ql::best_path();
}

QL_API const char* ql_build_info(void) {
  static const std::string info = ql::build_info();
  return info.c_str();
}

QL_API const char* ql_path_features(int32_t path) {
  static const std::string names[] = {
      ql::feature_names(ql::path_features(0)), ql::feature_names(ql::path_features(1)),
      ql::feature_names(ql::path_features(2)), ql::feature_names(ql::path_features(3)),
      ql::feature_names(ql::path_features(4)), ql::feature_names(ql::path_features(5)),
      ql::feature_names(ql::path_features(6)), ql::feature_names(ql::path_features(7))};
  return path >= 0 && path <= QL_PATH_AMX ? names[path].c_str() : nullptr;
}

QL_API const char* ql_cpu_features(void) {
  static const std::string names = ql::feature_names(ql::cpu_features());
  return names.c_str();
}

QL_API int ql_abi_version(void) {
  return QL_ABI_VERSION;
}

}  // extern "C"

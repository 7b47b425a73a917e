// quantlab kernel core: weight-only int4/int8 matmul, C ABI (loaded with ctypes, no Python here).
//
//   Y (M, N)  =  A (M, K)  @  dequant(B)^T        dequant(B)[n, k] = (q[n, k] - zp[n, k/bs]) * s[n,
//   k/bs]
//
// B uses onnxruntime's com.microsoft.MatMulNBits layout, so an exported artifact is fed as is:
//   B            uint8 (N, k_blocks, blob)   k_blocks = ceil(K / bs), blob = bs * bits / 8;
//                4-bit codes two per byte, element 2i in the low nibble, 2i+1 in the high nibble
//   scales       (N * k_blocks), same dtype as A (f32, f16 or bf16)
//   zero_points  optional uint8: 4-bit packed two per byte (low nibble = even block), each row
//   padded
//                to ceil(k_blocks / 2) bytes; 8-bit one per byte. Absent means 2^(bits-1).
//   bias         optional (N), same dtype as A.
#ifndef QUANTLAB_KERNELS_H_
#define QUANTLAB_KERNELS_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define QL_API __declspec(dllexport)
#else
#define QL_API __attribute__((visibility("default")))
#endif

// Status codes returned by every entry point.
enum ql_status {
  QL_OK = 0,
  QL_ERR_ARGUMENT = 1,     // a shape, pointer or attribute is invalid
  QL_ERR_UNSUPPORTED = 2,  // valid, but no code for it (e.g. a path not compiled for this CPU)
  QL_ERR_INTERNAL = 3,
};

// Element type of A, scales, bias and Y.
enum ql_dtype { QL_F32 = 0, QL_F16 = 1, QL_BF16 = 2 };

// Which implementation runs. QL_PATH_AUTO picks the fastest one the CPU supports.
enum ql_path {
  QL_PATH_AUTO = 0,
  QL_PATH_SCALAR = 1,       // the reference
  QL_PATH_AVX2 = 2,         // x86-64 AVX2 + FMA
  QL_PATH_NEON = 3,         // AArch64 NEON without dot-product instructions
  QL_PATH_NEON_DOT = 4,     // AArch64 NEON with SDOT (ARMv8.2 dotprod)
  QL_PATH_AVX_VNNI = 5,     // x86-64 AVX2 + AVX-VNNI (vpdpbusd on 256-bit vectors)
  QL_PATH_AVX512_VNNI = 6,  // x86-64 AVX-512 F/BW/VL + VNNI (vpdpbusd on 512-bit vectors)
  QL_PATH_AMX = 7,          // x86-64 AMX-INT8 tiles for M >= 8, else as QL_PATH_AVX512_VNNI
};

// Arithmetic, as in onnxruntime's accuracy_level attribute.
//   0: fp32 — weights dequantized to fp32, fp32 products and sums (error: fp32 rounding only).
//   3: bf16 at least — where a path has bf16 products (AMX, M >= 8, blocks of a multiple of 32):
//      weights dequantized and A rounded to bf16 (8 significant bits), products summed in fp32;
//      elsewhere as 0.
//   4: int8 — A quantized per (row, block) to symmetric int8, exact int32 dot products per block,
//      then fp32 scaling; the only extra error is the int8 rounding of A.
enum ql_accuracy { QL_ACC_FP32 = 0, QL_ACC_BF16 = 3, QL_ACC_INT8 = 4 };

typedef struct ql_matmul_nbits_args {
  const void* a;               // (M, K) dtype, rows contiguous
  const uint8_t* b;            // (N, k_blocks, blob)
  const void* scales;          // (N, k_blocks) dtype
  const uint8_t* zero_points;  // optional, see above
  const void* bias;            // optional (N,) dtype
  void* y;                     // (M, N) dtype
  int64_t m, k, n;
  int32_t bits;        // 4 or 8
  int32_t block_size;  // power of two, 16..256
  int32_t dtype;       // ql_dtype
  int32_t accuracy;    // ql_accuracy
  int32_t path;        // ql_path
  int32_t threads;     // <= 0: hardware concurrency
} ql_matmul_nbits_args;

QL_API int ql_matmul_nbits(const ql_matmul_nbits_args* args);

// 1 when `path` is compiled in and supported by this CPU.
QL_API int ql_path_available(int32_t path);
// The path QL_PATH_AUTO resolves to.
QL_API int ql_best_path(void);
// Human-readable build and CPU description: compiled paths, paths this CPU runs, the best one.
QL_API const char* ql_build_info(void);
// The CPU features a path is compiled with and its runtime check requires, space-separated CPUID
// feature names ("SSE3 ... AVX2 FMA F16C"; "" for the scalar path); nullptr for an unknown path.
QL_API const char* ql_path_features(int32_t path);
// The features this CPU has and its OS enables, in the same spelling.
QL_API const char* ql_cpu_features(void);
// ABI version; bumped whenever an argument struct or the set of entry points changes.
QL_API int ql_abi_version(void);

// GPTQ's column loop over one lazy-batch block (csrc/gptq.cpp). The block holds `block` columns of
// W stored as rows of W^T (row b = column b of the block, `n` contiguous floats, one per row of W).
// For columns begin .. end-1 in turn: code = clamp(roundf(w * reciprocal + zero), 0, max_code),
// q = (code - zero) * scale, err = (w - q) / hinv[b][b], then every later column j of the block
// (up to `block`, not `end`) gets w_j -= hinv[b][j] * err. scales, reciprocals and zero_points are
// (groups, n) float32; column b uses row group_of_column[b - begin] of them.
typedef struct ql_gptq_columns_args {
  float* w;                        // (block, n) in/out
  const float* hinv;               // upper Cholesky factor of H^-1 at the block's first column, row stride ld_hinv
  float* err;                      // (block, n) out, rows begin .. end-1: the scaled errors
  float* q;                        // (block, n) out: the dequantized codes
  uint8_t* codes;                  // (block, n) out
  const float* scales;             // (groups, n)
  const float* reciprocals;        // (groups, n): 1 / scale, 0 where the scale is 0
  const float* zero_points;        // (groups, n), as floats
  const int32_t* group_of_column;  // (end - begin)
  int64_t n, block, begin, end, ld_hinv;
  int32_t max_code;  // 2^bits - 1
  int32_t threads;   // <= 0: hardware concurrency
} ql_gptq_columns_args;

QL_API int ql_gptq_columns(const ql_gptq_columns_args* args);

// One Llama-family decoder layer in one call (csrc/decoder_layer.cpp), fp32, in place on the
// residual stream x (rows = batch * seq, hidden): row r is new token r % seq of sequence r / seq.
//
//   h = rmsnorm(x) * input_norm                    q, k, v = h Wq (+bq), h Wk (+bk), h Wv (+bv)
//   q, k = rmsnorm per head * q_norm, k_norm (optional)        q, k = rope(q, k, cos, sin)
//   cache[b, kv_head, past + t] = k, v             o = softmax(q k^T / sqrt(head_dim) + mask) v
//   x += o Wo                                      h = rmsnorm(x) * post_norm
//   x += (silu(h Wgate) * h Wup) Wdown
//
// Each W is a MatMulNBits weight run by ql_matmul_nbits (its layout above); q/k/v may be one fused
// linear with output [q | k | v] and gate/up one with output [gate | up] (b != NULL selects it).
// Attention: query head h reads kv head h / (heads / kv_heads); query t sees cache positions
// 0 .. past + t whose key_mask is non-zero; a query that sees none gets the mean of v over
// 0 .. past + seq - 1 (what an additive float32-min mask gives in fp32 softmax).
// Cache (cache_dtype): QL_CACHE_F32 stores k and v as they are; QL_CACHE_INT8 stores each row
// (token, kv head) as symmetric int8 codes with one float scale: scale = max|x| / 127,
// code = round_half_even(x / scale) in [-127, 127] (0 when scale is 0), k after RoPE; attention
// reads the codes directly: score_j = scale_j * (q . k8_j) / sqrt(head_dim),
// o = sum_j p_j * scale_j * v8_j.
enum ql_cache_dtype { QL_CACHE_F32 = 0, QL_CACHE_INT8 = 1 };

typedef struct ql_linear {
  const uint8_t* b;            // (n, k_blocks, blob); NULL: this linear is absent
  const float* scales;         // (n, k_blocks)
  const uint8_t* zero_points;  // optional, packed as for ql_matmul_nbits
  const float* bias;           // optional (n,)
  int64_t k, n;
  int32_t bits;        // 4 or 8
  int32_t block_size;  // power of two, 16..256
  int32_t accuracy;    // ql_accuracy
  int32_t reserved;    // 0
} ql_linear;

typedef struct ql_decoder_layer_args {
  float* x;          // (rows, hidden) in/out
  void* k_cache;     // (batch, kv_heads, capacity, head_dim) float or int8 (cache_dtype); rows
                     // past .. past + seq written
  void* v_cache;     // (batch, kv_heads, capacity, head_dim) float or int8
  float* k_scale;    // QL_CACHE_INT8: (batch, kv_heads, capacity), else unused
  float* v_scale;    // QL_CACHE_INT8: (batch, kv_heads, capacity)
  const float* cos;  // (rows, head_dim / 2)
  const float* sin;  // (rows, head_dim / 2)
  const int64_t* key_mask;  // optional (batch, past + seq), 0 = masked
  const float* input_norm;  // (hidden,)
  const float* post_norm;   // (hidden,)
  const float* q_norm;      // optional (head_dim,), with k_norm
  const float* k_norm;      // optional (head_dim,)
  ql_linear qkv, q, k, v, o, gate_up, gate, up, down;
  int64_t batch, seq, past, capacity;
  int64_t hidden, heads, kv_heads, head_dim, intermediate;
  float eps;                 // rmsnorm epsilon
  int32_t rope_interleaved;  // 0: rotate x[i] with x[i + head_dim/2]; 1: x[2i] with x[2i + 1]
  int32_t path;              // ql_path of the linears
  int32_t threads;           // <= 0: hardware concurrency
  int32_t cache_dtype;       // ql_cache_dtype
} ql_decoder_layer_args;

QL_API int ql_decoder_layer(const ql_decoder_layer_args* args);

// Runs layers[0 .. n) in order, as n ql_decoder_layer calls would, and stops at the first that
// fails (its status returned; the earlier layers have run). One call for a model's layers: from
// Python, 30 calls interleaved with the interpreter cost ~1 ms a decode step (the layers' weights
// evict the interpreter's data from the core's caches between calls), one call ~0.1 ms.
QL_API int ql_decoder_layers(const ql_decoder_layer_args* const* layers, int32_t n);

// The step's end after the layers: logits = rmsnorm(x) * norm, then its MatMulNBits head (rows,
// head.k = hidden) -> (rows, head.n), x unchanged. One call rather than a norm and a head call from
// Python: after the layers have streamed the weights through the caches, a single torch norm over
// one row cost ~0.1 ms of a SmolLM2 decode step.
typedef struct ql_decoder_head_args {
  const float* x;     // (rows, hidden)
  const float* norm;  // (hidden,)
  ql_linear head;     // k = hidden
  float* logits;      // (rows, head.n) out
  int64_t rows, hidden;
  float eps;
  int32_t path;      // ql_path
  int32_t threads;   // <= 0: hardware concurrency
  int32_t reserved;  // 0
} ql_decoder_head_args;

QL_API int ql_decoder_head(const ql_decoder_head_args* args);

#define QL_ABI_VERSION 8

#ifdef __cplusplus
}
#endif

#endif  // QUANTLAB_KERNELS_H_

// Internal interface between the driver (matmul_nbits.cpp) and the per-ISA kernels.
#ifndef QUANTLAB_MATMUL_INTERNAL_H_
#define QUANTLAB_MATMUL_INTERNAL_H_

#include <stddef.h>
#include <stdint.h>

#include <vector>

struct ql_matmul_nbits_args;  // quantlab_kernels.h

namespace ql {

// The weights of one call, in onnxruntime's MatMulNBits layout (see quantlab_kernels.h).
struct Weights {
  int64_t k, n;
  int bits;        // 4 or 8
  int block_size;  // elements per block
  int64_t k_blocks;
  int blob;           // bytes per block = block_size * bits / 8
  int64_t row_bytes;  // k_blocks * blob
  const uint8_t* b;   // (n, k_blocks, blob)
  int offset;         // code_offset(bits, accuracy)
};

// Activations prepared once per call and shared by all threads.
//
// Rows of `q` (int8 accuracy) and `xf` (fp32 accuracy) have length kq = k_blocks * block_size
// rounded up to 128 and are zero past K. `xf` keeps the natural order. In `q`, for 4-bit weights,
// each chunk of `perm` elements (the path's vector width in weight bytes, times 2) is stored
// de-interleaved, e.g. for 64: [x0 x2 x4 ... x62 | x1 x3 ... x63], so that the low nibbles of 32
// weight bytes (elements 0, 2, ..., 62) meet the first half and the high nibbles the second:
// unpacking the codes then costs two ANDs and no shuffle. For 8-bit weights the order is unchanged.
struct Acts {
  int64_t m;
  int64_t kq;                   // row stride of q / xf
  int perm;                     // de-interleaving chunk of q: 64 or 128 elements
  const int8_t* q;              // (m, kq) int8 codes, int8 accuracy only
  const float* xf;              // (m, kq) fp32 values, fp32 accuracy only
  const float* d;               // (m, k_blocks) int8 scale per block (int8 accuracy)
  const float* xsum;            // (m, k_blocks) sum of the block's (dequantized) activations
  const void* extra = nullptr;  // path-specific layout built by PathKernels::prepare
  // The caller's fp32 rows (m, k), set instead of q / d / xsum where PathKernels::float_rows
  // takes the call (bf16 accuracy, fp32 activations).
  const float* x = nullptr;
};

constexpr int kMaxMr = 64;
constexpr int kMaxNr = 16;

// One tile: rows [m0, m0+mr) of A against weight rows [n0, n0+nr).
struct Tile {
  int64_t m0;
  int mr;
  int64_t n0;
  int nr;
  const float* const* scales;   // scales[j]: fp32 scale row of weight row n0+j (k_blocks)
  const uint8_t* const* zeros;  // zeros[j]: packed zero-point row, or nullptr when absent
};

// Writes out[i * nr + j] = y[m0+i, n0+j] without bias:
//   sum_b s[b] * (dot_b - (zp[b] - offset) * xsum[b])
// where dot_b is the block's dot product of the codes used as (q - offset) with the activations
// (int8 codes or fp32 values) and xsum the block's activation sum (Acts). offset = code_offset().
using TileFn = void (*)(const Weights& w, const Acts& a, const Tile& t, float* out);

// dst[i] = fp16 src[i] widened to fp32.
using HalfToFloatFn = void (*)(const uint16_t* src, float* dst, int64_t n);
// Quantizes one activation row (see prepare_row_int8 in matmul_nbits.cpp, which it must match bit
// for bit); returns false for cases it does not cover, which then take the portable code.
using QuantizeRowFn = bool (*)(const float* x, int64_t k, int bits, int bs, int64_t kb, int perm,
                               int8_t* q, float* d, float* xsum);

// The decoder layer's attention inner loops (decoder_layer.cpp) on a path's vector registers,
// instantiated from attention_simd.h; a path without them (nullptr) runs the baseline loops.
struct AttentionKernels {
  int hd_multiple;  // head_dim must be a multiple of this (the vector width in floats)
  // s[h * lds + j] = f_j * dot(q + h * hd, k + j * hd, hd) for h < g, j < n, with
  // f_j = scale * ks[j] (int8 rows' scales) or scale (ks == nullptr). v: the n value rows that
  // the weighted pass reads next, prefetched on the way (nullptr: none).
  void (*scores_f32)(const float* q, int g, int64_t hd, const float* k, const float* ks, int64_t n,
                     float scale, float* s, int64_t lds, const float* v);
  void (*scores_i8)(const float* q, int g, int64_t hd, const int8_t* k, const float* ks, int64_t n,
                    float scale, float* s, int64_t lds, const int8_t* v);
  // out[h * hd + d] = inv[h] * sum_j p[h * ldp + j] * v[j * hd + d] for h < g, d < hd.
  void (*weighted_f32)(const float* p, int64_t ldp, int g, const float* v, int64_t n, int64_t hd,
                       const float* inv, float* out);
  void (*weighted_i8)(const float* p, int64_t ldp, int g, const int8_t* v, int64_t n, int64_t hd,
                      const float* inv, float* out);
  // s[j] = e^(s[j] - max_j s) for j < n (0 where s[j] = -inf); returns their sum, *row_max = the max.
  float (*softmax_numerators)(float* s, int64_t n, float* row_max);
  // act[e] = gate[e] / (1 + e^-gate[e]) * up[e] for e < n (the decoder layer's SwiGLU).
  void (*swiglu)(const float* gate, const float* up, int64_t n, float* act);
  // An int8 cache row: q[i] = round(x[i] / s) clamped to +-127 with s = max_i |x[i]| / 127 (0 where
  // s is 0), returns s; bit for bit the decoder layer's scalar quantize_row (decoder_layer.cpp).
  float (*quantize_i8)(const float* x, int64_t n, int8_t* q);
  // The decoder layer's rms_norm (y = x / sqrt(mean(x^2) + eps) * w, the sum of squares in double)
  // and its non-interleaved rotary embedding of one head in place (false: hd / 2 is not a multiple
  // of the vector width, the caller's loop runs instead).
  void (*rms_norm)(const float* x, const float* w, int64_t n, float eps, float* y);
  bool (*rope_half)(float* x, const float* cos, const float* sin, int64_t hd);
};

struct PathKernels {
  TileFn int8_tile;
  TileFn fp32_tile;
  HalfToFloatFn f16_to_f32;  // nullptr: the portable scalar conversion
  int perm;                  // Acts::perm this path reads
  int mr_max;                // tile rows of A for m > 1
  int nr_decode;             // weight rows per tile when m == 1
  int nr_prefill;
  // Optional: builds a path-specific activation layout once per call into `storage`, pointed to
  // by Acts::extra (nullptr: nothing to do).
  void (*prepare)(const Weights& w, Acts& a, std::vector<uint8_t>& storage);
  QuantizeRowFn quantize_row;  // optional SIMD activation quantization
  const AttentionKernels* attention;  // optional, see AttentionKernels
  // Optional: true when the path multiplies these weights by m fp32 rows in bf16 (AMX tiles); the
  // driver then asks it for bf16 accuracy (QL_ACC_BF16), quantizes no rows, sets Acts::x and
  // leaves the layout to prepare (and the products to int8_tile). Otherwise bf16 accuracy is fp32.
  bool (*float_rows)(const Weights& w, int64_t m) = nullptr;
  // Optional: called by each thread before its first tile of a call and after its last (AMX:
  // the tile configuration, which costs ~300 cycles a load and release, once per thread and call
  // instead of once per tile). Nothing else runs on the thread in between.
  void (*tiles_begin)(const Weights& w, const Acts& a) = nullptr;
  void (*tiles_end)(const Acts& a) = nullptr;
};

// Offset subtracted from raw codes inside the integer kernels: 8-bit codes are used as (q - 128)
// so they fit int8 for the signed multiplies; 4-bit codes are used as is.
inline int code_offset(int bits, int accuracy_int8) {
  return (bits == 8 && accuracy_int8) ? 128 : 0;
}

// ql_matmul_nbits over a [gate | up] weight (n = 2 * ff rows, the decoder layer's fused gate and up
// projections) that writes act (m, ff) = silu(gate) * up to y instead of the (m, 2 ff) products:
// each tile computes gate rows [n0, n0 + nr) and up rows [ff + n0, ff + n0 + nr) for the same rows
// of A and applies fn to each row's nr pairs (bias added first). fn must give each element the
// same value wherever it lies in a call (the layer's SwiGLU does), so the result is bit for bit
// the products followed by fn over whole rows where ff is a multiple of the path's tile width (then
// every weight row sits at the same place of its tile as in the plain call; the 8-bit AVX-512
// kernel's zero-point sum, for one, may round differently at another place). f32 activations only.
struct SwigluEpilogue {
  int64_t ff;
  void (*fn)(const float* gate, const float* up, int64_t n, float* act, const void* ctx);
  const void* ctx;
};
int matmul_nbits_swiglu(const ql_matmul_nbits_args* args, const SwigluEpilogue& ep);

// A path's kernels only where the CPU has every feature the path is compiled with (cpu_features.h),
// else nullptr. A path that hands work to another path must look it up here: calling another path's
// *_kernels() directly would run its instructions unchecked (AVX-VNNI code on an AVX-512 VNNI CPU
// without AVX-VNNI is a SIGILL).
const PathKernels* supported_kernels(int path);

// Baseline-compiled helpers for the ISA files. Those files must not instantiate library templates
// (std::vector and friends): such instantiations are weak symbols that the linker may pick for the
// baseline code too, and then AVX-512 code runs on every CPU. tests/kernels/test_isa_audit.py
// checks that ISA objects define no weak symbols.
float* thread_scratch(size_t n);  // this thread's buffer of at least n floats, reused across calls
uint8_t* zeroed_storage(std::vector<uint8_t>& storage, size_t n);  // storage.assign(n, 0)

// The AVX-512 path's attention kernels, which the AMX path shares.
extern const AttentionKernels kAvx512Attention;

const PathKernels* scalar_kernels();
const PathKernels* avx2_kernels();         // nullptr when not compiled
const PathKernels* avx_vnni_kernels();     // nullptr when not compiled
const PathKernels* avx512_vnni_kernels();  // nullptr when not compiled
const PathKernels* amx_kernels();          // nullptr when not compiled
const PathKernels* neon_kernels();      // nullptr when not compiled
const PathKernels* neon_dot_kernels();  // nullptr when not compiled

// Zero point of block b in a packed zero-point row (nullptr: the default 2^(bits-1)).
inline int zero_point(const uint8_t* row, int64_t b, int bits) {
  if (row == nullptr) return 1 << (bits - 1);
  if (bits == 8) return row[b];
  uint8_t byte = row[b >> 1];
  return (b & 1) ? byte >> 4 : byte & 15;
}

// The de-interleaved position of element e in a 4-bit row (see Acts); chunk is 64 or 128.
inline int64_t permuted_index(int64_t e, int bits, int chunk) {
  if (bits != 4) return e;
  const int64_t base = e & ~int64_t(chunk - 1);
  const int64_t i = e & (chunk - 1);
  return base + ((i & 1) ? chunk / 2 + (i >> 1) : (i >> 1));
}

}  // namespace ql

#endif  // QUANTLAB_MATMUL_INTERNAL_H_

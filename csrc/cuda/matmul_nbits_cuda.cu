// int4 x fp16 GEMM for small M (decode and short prefill), in the spirit of Marlin
// (arXiv 2408.11743): weights stream from global memory once, are dequantized in registers with
// the 0x6400 exponent trick, and feed tensor-core mma.sync m16n8k16 with fp32 accumulation.
//
//   Y (m, n) f16  =  A (m, k) f16  @  dequant(B)^T       B in MatMulNBits layout, 4-bit
//
// Unlike Marlin, B is read in onnxruntime's layout as is: instead of repacking the weights so that
// each thread's mma fragment is contiguous, we permute the reduction index k inside each
// 128-element chunk — legal for a sum — so that each thread loads 16 contiguous weight bytes (32
// codes of one row) with one 128-bit load, and shuffles its much smaller activation fragment to
// match.
//
// Work split: one thread block = 4 warps = 8 output columns x (16 * MT) rows; the 4 warps take
// interleaved 128-element chunks of K (split-K) and reduce through shared memory.
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

constexpr int kWarps = 4;
constexpr int kChunk = 128;  // elements of K per warp iteration (64 weight bytes per row)

// Four fp16 pairs from one 32-bit word of 8 codes (nibble j = element j): pair p holds
// (code p - zp, code p+4 - zp) * scale. (code | 0x6400) is the fp16 number 1024 + code exactly.
__device__ __forceinline__ void dequant8(uint32_t v, __half2 bias, __half2 scale, uint32_t out[4]) {
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    uint32_t h = ((v >> (4 * p)) & 0x000f000fu) | 0x64006400u;
    __half2 x = __hmul2(__hsub2(*reinterpret_cast<__half2*>(&h), bias), scale);
    out[p] = *reinterpret_cast<uint32_t*>(&x);
  }
}

__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0,
                                         uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// 8 consecutive fp16 activations x[row, e .. e+7] (zero outside the matrix) as 4 words.
__device__ __forceinline__ uint4 load_a8(const __half* a, int64_t m, int64_t k, int64_t row,
                                         int64_t e, bool vec_ok) {
  uint4 r = make_uint4(0, 0, 0, 0);
  if (row >= m) return r;
  const __half* p = a + row * k + e;
  if (vec_ok && e + 8 <= k) return *reinterpret_cast<const uint4*>(p);
  __half h[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) h[i] = (e + i < k) ? p[i] : __float2half(0.f);
  return *reinterpret_cast<uint4*>(h);
}

// Y[m0 : m0 + 16*MT, n0 : n0 + 8], n0 = 8 * blockIdx.x, m0 = 16 * MT * blockIdx.y.
template <int MT>
__global__ void __launch_bounds__(kWarps * 32)
    matmul_nbits_f16_kernel(const __half* __restrict__ a, const uint8_t* __restrict__ b,
                            const __half* __restrict__ scales, const uint8_t* __restrict__ zp,
                            __half* __restrict__ y, int64_t m, int64_t k, int64_t n, int bs) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;  // mma fragment coordinates
  const int64_t n0 = int64_t(blockIdx.x) * 8, m0 = int64_t(blockIdx.y) * 16 * MT;
  const int64_t kb = (k + bs - 1) / bs, row_bytes = kb * bs / 2, zrow = (kb + 1) / 2;
  const int64_t row = n0 + g;  // the weight row (output column) this thread dequantizes
  const bool row_ok = row < n;
  const bool vec_ok = (k % 8) == 0;
  const int64_t chunks = (row_bytes + 63) / 64;

  float c[MT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.f;

  // Each thread's 16 bytes of a chunk are one 32-code sub-block, which lies inside one
  // quantization block (bs >= 32), so one scale and zero point per thread per chunk.
  auto load_b = [&](int64_t ch, uint4& w, __half2& sc, __half2& bias) {
    const int64_t byte = ch * 64 + 16 * t;
    w = make_uint4(0, 0, 0, 0);
    sc = __float2half2_rn(0.f);
    bias = __float2half2_rn(1024.f);
    if (row_ok && byte < row_bytes) {
      w = __ldg(reinterpret_cast<const uint4*>(b + row * row_bytes + byte));
      const int64_t blk = (byte * 2) / bs;
      sc = __half2half2(scales[row * kb + blk]);
      int z = 8;
      if (zp != nullptr) {
        const uint8_t zb = zp[row * zrow + blk / 2];
        z = (blk & 1) ? zb >> 4 : zb & 15;
      }
      bias = __float2half2_rn(1024.f + z);
    }
  };

  int64_t ch = warp;
  uint4 w;
  __half2 sc, bias;
  if (ch < chunks) load_b(ch, w, sc, bias);
  for (; ch < chunks; ch += kWarps) {
    // Prefetch the next chunk's weights while this one computes.
    uint4 w_next;
    __half2 sc_next, bias_next;
    if (ch + kWarps < chunks) load_b(ch + kWarps, w_next, sc_next, bias_next);
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // word i: elements 32t + 8i .. 32t + 8i + 7 of the chunk
      uint32_t bq[4];
      dequant8(words[i], bias, sc, bq);
      const int64_t e = ch * kChunk + 32 * t + 8 * i;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const uint4 lo = load_a8(a, m, k, m0 + 16 * mt + g, e, vec_ok);
        const uint4 hi = load_a8(a, m, k, m0 + 16 * mt + g + 8, e, vec_ok);
        // Logical k of mma step 0: (2t, 2t+1) <- elements (0, 4), (2t+8, 2t+9) <- (1, 5);
        // step 1 likewise with (2, 6) and (3, 7): the same pairs dequant8 produced.
        uint32_t a0[4] = {__byte_perm(lo.x, lo.z, 0x5410), __byte_perm(hi.x, hi.z, 0x5410),
                          __byte_perm(lo.x, lo.z, 0x7632), __byte_perm(hi.x, hi.z, 0x7632)};
        uint32_t a1[4] = {__byte_perm(lo.y, lo.w, 0x5410), __byte_perm(hi.y, hi.w, 0x5410),
                          __byte_perm(lo.y, lo.w, 0x7632), __byte_perm(hi.y, hi.w, 0x7632)};
        mma16816(c[mt], a0, bq[0], bq[1]);
        mma16816(c[mt], a1, bq[2], bq[3]);
      }
    }
    w = w_next;
    sc = sc_next;
    bias = bias_next;
  }

  // Split-K reduction across the 4 warps.
  __shared__ float red[kWarps][MT][32][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 4; ++r) red[warp][mt][lane][r] = c[mt][r];
  __syncthreads();
  for (int idx = threadIdx.x; idx < MT * 32 * 4; idx += blockDim.x) {
    const int mt = idx / 128, ln = (idx / 4) % 32, r = idx % 4;
    float s = 0.f;
#pragma unroll
    for (int wi = 0; wi < kWarps; ++wi) s += red[wi][mt][ln][r];
    // C fragment: r = 0, 1 -> (row g, cols 2t, 2t+1); r = 2, 3 -> (row g + 8, same cols).
    const int64_t mm = m0 + 16 * mt + ln / 4 + (r >= 2 ? 8 : 0);
    const int64_t nn = n0 + 2 * (ln % 4) + (r & 1);
    if (mm < m && nn < n) y[mm * n + nn] = __float2half(s);
  }
}

template <int MT>
void launch(const __half* a, const uint8_t* b, const __half* s, const uint8_t* zp, __half* y,
            int64_t m, int64_t k, int64_t n, int bs, cudaStream_t stream) {
  dim3 grid(static_cast<unsigned>((n + 7) / 8),
            static_cast<unsigned>((m + 16 * MT - 1) / (16 * MT)));
  matmul_nbits_f16_kernel<MT><<<grid, kWarps * 32, 0, stream>>>(a, b, s, zp, y, m, k, n, bs);
}

}  // namespace

// Returns 0 on success, 1 for invalid arguments, 3 when the launch failed. All pointers are
// device pointers; `stream` is a cudaStream_t (nullptr: the default stream).
extern "C" __attribute__((visibility("default"))) int qlc_matmul_nbits_f16(
    const void* a, const void* b, const void* scales, const void* zero_points, void* y, int64_t m,
    int64_t k, int64_t n, int32_t block_size, void* stream) {
  if (a == nullptr || b == nullptr || scales == nullptr || y == nullptr || m < 0 || k <= 0 ||
      n <= 0)
    return 1;
  if (block_size < 32 || block_size > 256 || (block_size & (block_size - 1)) != 0) return 1;
  if (m == 0) return 0;
  const auto* ah = static_cast<const __half*>(a);
  const auto* bu = static_cast<const uint8_t*>(b);
  const auto* sh = static_cast<const __half*>(scales);
  const auto* zu = static_cast<const uint8_t*>(zero_points);
  auto* yh = static_cast<__half*>(y);
  auto st = static_cast<cudaStream_t>(stream);
  // Template instantiations: 1..4 tiles of 16 rows per block cover m <= 64 in one pass over B
  // (decode m = 1..16 uses MT = 1); larger m adds blocks along grid.y.
  const int64_t tiles = (m + 15) / 16;
  if (tiles <= 1)
    launch<1>(ah, bu, sh, zu, yh, m, k, n, block_size, st);
  else if (tiles == 2)
    launch<2>(ah, bu, sh, zu, yh, m, k, n, block_size, st);
  else if (tiles == 3)
    launch<3>(ah, bu, sh, zu, yh, m, k, n, block_size, st);
  else
    launch<4>(ah, bu, sh, zu, yh, m, k, n, block_size, st);
  return cudaGetLastError() == cudaSuccess ? 0 : 3;
}

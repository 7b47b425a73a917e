// int4 x fp16 GEMM for small M (decode and short prefill), in the spirit of Marlin
// (arXiv 2408.11743): weights stream from global memory once, are dequantized in registers with
// the 0x6400 exponent trick, and feed tensor-core mma.sync m16n8k16 with fp32 accumulation.
//
//   Y (m, n) f16  =  A (m, k) f16  @  dequant(B)^T       B in MatMulNBits layout, 4-bit
//
// Design. At small M the kernel is a stream over B (N * K / 2 bytes), so what matters is bytes
// in flight (Little's law: ~4 MB across the H200's 132 SMs, ~32 KB per SM) and how often blocks
// re-read A from L2. One block = 8 warps = 8 * NT output columns x 16 * MT rows; the 8 warps split
// K (interleaved 128-element chunks) and reduce through shared memory in a fixed order. Each warp
// works in batches: it first issues all of a batch's weight loads (U chunks x NT column groups,
// U * NT = 8 loads of 16 bytes per thread), then dequantizes and multiplies them, so a thread has
// 128 bytes of B in flight, a block 32 KB, an SM 32-64 KB (1-2 blocks). The NT column groups of a
// warp share each A fragment; every block reads all of A (M * K * 2 bytes) for its 4 * NT * K
// weight bytes, so A's L2 traffic is M / (2 NT) times B's and wide blocks matter once M is more
// than a few rows. The host picks the widest NT (4, 2, 1) that still fills the SMs.
//
// Unlike Marlin, B is read in onnxruntime's layout as is: instead of repacking the weights so that
// each thread's mma fragment is contiguous, we permute the reduction index k inside each
// 128-element chunk — legal for a sum — so that each thread loads 16 contiguous weight bytes (32
// codes of one row) with one 128-bit load, and shuffles its much smaller activation fragment to
// match.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kChunk = 128;             // elements of K per chunk
constexpr int kChunkBytes = kChunk / 2;  // 64 weight bytes per row: 4 lanes x 16 bytes

// 16-byte weight loads a thread issues per batch (U chunks x NT column groups): 128 bytes in
// flight per thread, 32 KB per block. At MT = 1 this fits 128 registers, so two blocks share an
// SM (64 KB in flight, and one block's loads overlap the other's reduction); MT >= 2 needs the
// registers for C and runs one block per SM. Sixteen loads spill at 128 registers.
constexpr int kLoads = 8;

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

// Word i of a 16-byte load (i is a compile-time constant after unrolling).
__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// 16 weight bytes read once: bypass L1 (non-coherent, no allocate) so that the stream of B does
// not evict the activations, which every warp of the SM re-reads.
__device__ __forceinline__ uint4 load_stream(const uint8_t* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

// 8 consecutive fp16 activations x[row, e .. e+7] (zero outside the matrix) as 4 words; `p` is
// the start of the row, nullptr for a row past m.
__device__ __forceinline__ uint4 load_a8(const __half* p, int64_t k, int e, bool vec_ok) {
  uint4 r = make_uint4(0, 0, 0, 0);
  if (p == nullptr) return r;
  if (vec_ok && e + 8 <= k) return *reinterpret_cast<const uint4*>(p + e);
  __half h[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) h[i] = (e + i < k) ? p[e + i] : __float2half(0.f);
  return *reinterpret_cast<uint4*>(h);
}

// Y[m0 : m0 + 16*MT, n0 : n0 + 8*NT], n0 = 8 * NT * blockIdx.x, m0 = 16 * MT * blockIdx.y.
// Column group j of the block is the mma's n = 8 tile n0 + 8j .. n0 + 8j + 7; lane (g, t) of a
// warp dequantizes weight row n0 + 8j + g, bytes 16t .. 16t + 15 of each of its chunks.
template <int MT, int NT>
__global__ void __launch_bounds__(kThreads, MT == 1 ? 2 : 1)
    matmul_nbits_f16_kernel(const __half* __restrict__ a, const uint8_t* __restrict__ b,
                            const __half* __restrict__ scales, const uint8_t* __restrict__ zp,
                            __half* __restrict__ y, int64_t m, int64_t k, int64_t n, int bs) {
  constexpr int U = kLoads / NT;  // chunks per warp per batch
  static_assert(U * NT == kLoads, "NT must divide the batch");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;  // mma fragment coordinates
  const int64_t n0 = int64_t(blockIdx.x) * 8 * NT, m0 = int64_t(blockIdx.y) * 16 * MT;
  const int bs_log2 = __ffs(bs) - 1;  // bs is a power of two (checked on the host)
  const int64_t kb = (k + bs - 1) >> bs_log2, row_bytes = kb * bs / 2, zrow = (kb + 1) / 2;
  const int chunks = static_cast<int>((row_bytes + kChunkBytes - 1) / kChunkBytes);
  const bool vec_ok = (k % 8) == 0;

  // Activation rows this thread's A fragments read: g and g + 8 of each 16-row tile.
  const __half* arow[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t r = m0 + 16 * mt + g + 8 * h;
      arow[mt][h] = r < m ? a + r * k : nullptr;
    }

  float c[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < NT; ++j) c[mt][j][0] = c[mt][j][1] = c[mt][j][2] = c[mt][j][3] = 0.f;

  // Warp w's batch at `base` covers chunks base + u * kWarps, u < U: the 8 warps of a block read
  // kWarps * U consecutive chunks of each row together.
  for (int base = warp; base < chunks; base += kWarps * U) {
    // Load phase: every load of the batch is issued before any is used. A thread's 16 bytes of a
    // chunk are one 32-code sub-block, which lies inside one quantization block (bs >= 32), so
    // one scale and zero point per load. Out-of-range loads read as codes 0 with scale 0.
    uint4 w[U][NT];
    __half s[U][NT];
    uint32_t zb[U][NT];  // the zero-point byte; 0x88 (8 in both nibbles) without zero points
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int byte = (base + u * kWarps) * kChunkBytes + 16 * t;
      const int blk = (2 * byte) >> bs_log2;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int64_t row = n0 + 8 * j + g;
        w[u][j] = make_uint4(0, 0, 0, 0);
        s[u][j] = __float2half(0.f);
        zb[u][j] = 0x88u;
        if (row < n && byte < row_bytes) {
          w[u][j] = load_stream(b + row * row_bytes + byte);
          s[u][j] = __ldg(scales + row * kb + blk);
          if (zp != nullptr) zb[u][j] = __ldg(zp + row * zrow + blk / 2);
        }
      }
    }
    // Compute phase.
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int ch = base + u * kWarps;
      if (ch >= chunks) continue;  // warp-uniform: the mma below needs the whole warp
      const int e0 = ch * kChunk + 32 * t;
      const int zshift = ((e0 >> bs_log2) & 1) * 4;  // even blocks in the low nibble
      __half2 sc[NT], bias[NT];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        sc[j] = __half2half2(s[u][j]);
        const uint32_t hb = 0x6400u | ((zb[u][j] >> zshift) & 15u);  // fp16 1024 + zp, exactly
        const uint32_t hb2 = hb | (hb << 16);
        bias[j] = *reinterpret_cast<const __half2*>(&hb2);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // word i: elements 32t + 8i .. 32t + 8i + 7 of the chunk
        uint32_t bq[NT][4];
#pragma unroll
        for (int j = 0; j < NT; ++j) dequant8(word(w[u][j], i), bias[j], sc[j], bq[j]);
        const int e = e0 + 8 * i;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const uint4 lo = load_a8(arow[mt][0], k, e, vec_ok);
          const uint4 hi = load_a8(arow[mt][1], k, e, vec_ok);
          // Logical k of mma step 0: (2t, 2t+1) <- elements (0, 4), (2t+8, 2t+9) <- (1, 5);
          // step 1 likewise with (2, 6) and (3, 7): the same pairs dequant8 produced.
          const uint32_t a0[4] = {
              __byte_perm(lo.x, lo.z, 0x5410), __byte_perm(hi.x, hi.z, 0x5410),
              __byte_perm(lo.x, lo.z, 0x7632), __byte_perm(hi.x, hi.z, 0x7632)};
          const uint32_t a1[4] = {
              __byte_perm(lo.y, lo.w, 0x5410), __byte_perm(hi.y, hi.w, 0x5410),
              __byte_perm(lo.y, lo.w, 0x7632), __byte_perm(hi.y, hi.w, 0x7632)};
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            mma16816(c[mt][j], a0, bq[j][0], bq[j][1]);
            mma16816(c[mt][j], a1, bq[j][2], bq[j][3]);
          }
        }
      }
    }
  }

  // Split-K reduction across the 8 warps, one 16-row tile at a time (16 KB of shared memory at
  // NT = 4), always in warp order 0..7: deterministic.
  __shared__ float4 red[kWarps][NT][32];
  const float* redf = reinterpret_cast<const float*>(red);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    if (mt > 0) __syncthreads();  // the previous tile's reads are done
#pragma unroll
    for (int j = 0; j < NT; ++j)
      red[warp][j][lane] = make_float4(c[mt][j][0], c[mt][j][1], c[mt][j][2], c[mt][j][3]);
    __syncthreads();
    for (int idx = threadIdx.x; idx < NT * 32 * 4; idx += kThreads) {
      const int j = idx / 128, ln = (idx / 4) % 32, r = idx % 4;
      float sum = 0.f;
#pragma unroll
      for (int wi = 0; wi < kWarps; ++wi) sum += redf[wi * NT * 128 + idx];
      // C fragment: r = 0, 1 -> (row g, cols 2t, 2t+1); r = 2, 3 -> (row g + 8, same cols).
      const int64_t mm = m0 + 16 * mt + ln / 4 + (r >= 2 ? 8 : 0);
      const int64_t nn = n0 + 8 * j + 2 * (ln % 4) + (r & 1);
      if (mm < m && nn < n) y[mm * n + nn] = __float2half(sum);
    }
  }
}

template <int MT, int NT>
void launch(const __half* a, const uint8_t* b, const __half* s, const uint8_t* zp, __half* y,
            int64_t m, int64_t k, int64_t n, int bs, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((n + 8 * NT - 1) / (8 * NT)),
                  static_cast<unsigned>((m + 16 * MT - 1) / (16 * MT)));
  matmul_nbits_f16_kernel<MT, NT><<<grid, kThreads, 0, stream>>>(a, b, s, zp, y, m, k, n, bs);
}

template <int MT>
void launch_nt(int nt, const __half* a, const uint8_t* b, const __half* s, const uint8_t* zp,
               __half* y, int64_t m, int64_t k, int64_t n, int bs, cudaStream_t stream) {
  if (nt == 4)
    launch<MT, 4>(a, b, s, zp, y, m, k, n, bs, stream);
  else if (nt == 2)
    launch<MT, 2>(a, b, s, zp, y, m, k, n, bs, stream);
  else
    launch<MT, 1>(a, b, s, zp, y, m, k, n, bs, stream);
}

// Streaming multiprocessors of the current device (108 if the runtime cannot say): a plain
// attribute query, cheap and legal during CUDA graph capture.
int sm_count() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0)
    return 108;
  return sms;
}

}  // namespace

// Returns 0 on success, 1 for invalid arguments, 3 when the launch failed. All pointers are
// device pointers, a and b 16-byte aligned; `stream` is a cudaStream_t (nullptr: the default
// stream).
extern "C" __attribute__((visibility("default"))) int qlc_matmul_nbits_f16(
    const void* a, const void* b, const void* scales, const void* zero_points, void* y, int64_t m,
    int64_t k, int64_t n, int32_t block_size, void* stream) {
  if (a == nullptr || b == nullptr || scales == nullptr || y == nullptr || m < 0 || k <= 0 ||
      n <= 0)
    return 1;
  if (block_size < 32 || block_size > 256 || (block_size & (block_size - 1)) != 0) return 1;
  // Chunk, byte and element indices inside a row are 32-bit in the kernel.
  if (k > (int64_t(1) << 30)) return 1;
  if (m == 0) return 0;
  const auto* ah = static_cast<const __half*>(a);
  const auto* bu = static_cast<const uint8_t*>(b);
  const auto* sh = static_cast<const __half*>(scales);
  const auto* zu = static_cast<const uint8_t*>(zero_points);
  auto* yh = static_cast<__half*>(y);
  auto st = static_cast<cudaStream_t>(stream);
  // Template instantiations, MT x NT (12 kernels): MT = 1..4 tiles of 16 rows cover m <= 64 in
  // one pass over B (decode m = 1..16 uses MT = 1); larger m adds blocks along grid.y.
  // NT = 4, 2, 1 column groups of 8: the widest whose grid still gives 90% of the SMs a block
  // (MT >= 2: one block per SM fits) or two (m <= 4, where A's re-reads cost little and a
  // second block per SM doubles the bytes in flight).
  const int64_t tiles = (m + 15) / 16;
  const int mt = tiles < 4 ? static_cast<int>(tiles) : 4;
  const int64_t row_blocks = (m + 16 * mt - 1) / (16 * mt);
  if (row_blocks > 65535) return 1;
  const int64_t enough = (int64_t(sm_count()) * (m <= 4 ? 2 : 1) * 9 + 9) / 10;
  int nt = 1;
  for (int cand : {4, 2}) {
    if ((n + 8 * cand - 1) / (8 * cand) * row_blocks >= enough) {
      nt = cand;
      break;
    }
  }
  if (mt == 1)
    launch_nt<1>(nt, ah, bu, sh, zu, yh, m, k, n, block_size, st);
  else if (mt == 2)
    launch_nt<2>(nt, ah, bu, sh, zu, yh, m, k, n, block_size, st);
  else if (mt == 3)
    launch_nt<3>(nt, ah, bu, sh, zu, yh, m, k, n, block_size, st);
  else
    launch_nt<4>(nt, ah, bu, sh, zu, yh, m, k, n, block_size, st);
  return cudaGetLastError() == cudaSuccess ? 0 : 3;
}

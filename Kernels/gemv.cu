// Matrix-vector products for decode and verify steps: out[t, n] = sum_k W[n, k] * x[t, k]
// for T = 1..16 tokens, W stored [N, K] as
//   MXFP4 (gpt-oss / MiMo experts): 16 bytes of E2M1 codes per 32 elements (even element
//     in the low nibble) and one E8M0 scale byte per 32 elements in a separate tensor;
//   FP8 E4M3 with one f32 multiplier per tile x tile block (weight_scale_inv).
// x and out are f32 [T, K] and [T, N]. Weights are dequantized in registers.
//
// Budget per call (N x K weight):
//   bytes: MXFP4 N*K*(1/2 + 1/32), FP8 N*K + 4*ceil(N/tile)*ceil(K/tile), plus 4*T*(K+N).
//     gpt-oss-20b expert gate_up 5760 x 2880: 8.8 MB (MXFP4), 16.6 MB (FP8).
//   flops: 2*T*N*K (33 MFLOP per token for 5760 x 2880).
// Roofline on an H100 (about 3.0 TB/s copy, 67 TFLOP/s FP32 FFMA): at T = 1 the bytes set
// the floor (8.8 MB -> 2.9 us); every weight element costs T FFMA plus about 4 dequantizing
// instructions, so the FFMA path turns arithmetic-bound near T = 4 (MXFP4) and T = 8 (FP8).
// Verify blocks of 8-16 tokens need the tensor cores (mma with f16 operands) to stay on the
// memory roofline; this file is the FFMA baseline that path is checked against.
//
// Layout of the work: a warp owns ROWS consecutive output rows; each lane takes whole
// chunks of one 16-byte load (MXFP4: 32 elements and one scale; FP8: 16 elements), strided
// by 32 chunks so the warp's loads are coalesced; the warp reduces with shuffles at the end.

#include "common.cuh"

namespace gemv {

constexpr int kWarps = 8;

// E8M0 code e is 2^(e-127); code 0 is the f32 subnormal 2^-127, 0xFF is NaN.
__device__ __forceinline__ float e8m0(uint32_t e) {
    return __uint_as_float(e == 0 ? 0x00400000u : e == 0xFFu ? 0x7FC00000u : e << 23);
}

// E2M1 nibble -> f32. Placing the 3 magnitude bits at bits 22-24 of an f32 gives the value
// times 2^-126 for all eight codes (code 1, 0.5, lands on the subnormal 2^-127); the
// multiply by 2^126 is exact and keeps products with small activations out of the
// subnormal range.
__device__ __forceinline__ float e2m1(uint32_t word, int nibble) {
    uint32_t q = word >> (4 * nibble);
    uint32_t bits = ((q & 7u) << 22) | ((q & 8u) << 28);
    return __uint_as_float(bits) * 0x1p126f;
}

// Two E4M3 codes -> two f32 through the f16x2 conversion (sm_89+), which keeps NaN codes NaN.
__device__ __forceinline__ float2 e4m3x2(uint32_t pair) {
    uint32_t h2;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"((unsigned short)pair));
    float lo, hi;
    asm("cvt.f32.f16 %0, %1;" : "=f"(lo) : "h"((unsigned short)(h2 & 0xFFFF)));
    asm("cvt.f32.f16 %0, %1;" : "=f"(hi) : "h"((unsigned short)(h2 >> 16)));
    return make_float2(lo, hi);
}

template <int T, int ROWS>
__device__ __forceinline__ void store(float (&acc)[ROWS][T], float* out, int row0, int n) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int t = 0; t < T; ++t) {
            float v = warp_sum(acc[r][t]);
            if (lane == 0 && row0 + r < n) out[(size_t)t * n + row0 + r] = v;
        }
}

template <int T, int ROWS>
__device__ void mxfp4(const uint8_t* __restrict__ w, const uint8_t* __restrict__ scales,
                      const float* __restrict__ x, float* __restrict__ out, int n, int k) {
    const int warp = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x & 31;
    const int row0 = warp * ROWS;
    if (row0 >= n) return;
    const int chunks = k / 32;
    float acc[ROWS][T] = {};
#pragma unroll 2
    for (int c = lane; c < chunks; c += 32) {
        uint4 codes[ROWS];
        float scale[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int row = min(row0 + r, n - 1);
            codes[r] = load_streaming(w + ((size_t)row * chunks + c) * 16);
            scale[r] = e8m0(scales[(size_t)row * chunks + c]);
        }
        float part[ROWS][T] = {};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            float wv[ROWS][8];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                const uint32_t word = j == 0 ? codes[r].x : j == 1 ? codes[r].y : j == 2 ? codes[r].z : codes[r].w;
#pragma unroll
                for (int e = 0; e < 8; ++e) wv[r][e] = e2m1(word, e);
            }
#pragma unroll
            for (int t = 0; t < T; ++t) {
                const float4* xp = reinterpret_cast<const float4*>(x + (size_t)t * k + c * 32 + j * 8);
                const float4 a = __ldg(xp), b = __ldg(xp + 1);
                const float xv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
                for (int r = 0; r < ROWS; ++r)
#pragma unroll
                    for (int e = 0; e < 8; ++e) part[r][t] = fmaf(wv[r][e], xv[e], part[r][t]);
            }
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
#pragma unroll
            for (int t = 0; t < T; ++t) acc[r][t] = fmaf(part[r][t], scale[r], acc[r][t]);
    }
    store<T, ROWS>(acc, out, row0, n);
}

template <int T, int ROWS>
__device__ void fp8(const uint8_t* __restrict__ w, const float* __restrict__ tiles,
                    const float* __restrict__ x, float* __restrict__ out, int n, int k, int tile) {
    const int warp = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x & 31;
    const int row0 = warp * ROWS;
    if (row0 >= n) return;
    const int chunks = k / 16, tilesPerRow = (k + tile - 1) / tile;
    float acc[ROWS][T] = {};
#pragma unroll 2
    for (int c = lane; c < chunks; c += 32) {
        uint4 codes[ROWS];
        float scale[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int row = min(row0 + r, n - 1);
            codes[r] = load_streaming(w + (size_t)row * k + c * 16);
            scale[r] = tiles[(size_t)(row / tile) * tilesPerRow + c * 16 / tile];
        }
        float part[ROWS][T] = {};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            float wv[ROWS][4];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                const uint32_t word = j == 0 ? codes[r].x : j == 1 ? codes[r].y : j == 2 ? codes[r].z : codes[r].w;
                const float2 lo = e4m3x2(word & 0xFFFF), hi = e4m3x2(word >> 16);
                wv[r][0] = lo.x; wv[r][1] = lo.y; wv[r][2] = hi.x; wv[r][3] = hi.y;
            }
#pragma unroll
            for (int t = 0; t < T; ++t) {
                const float4 a = __ldg(reinterpret_cast<const float4*>(x + (size_t)t * k + c * 16 + j * 4));
                const float xv[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
                for (int r = 0; r < ROWS; ++r)
#pragma unroll
                    for (int e = 0; e < 4; ++e) part[r][t] = fmaf(wv[r][e], xv[e], part[r][t]);
            }
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
#pragma unroll
            for (int t = 0; t < T; ++t) acc[r][t] = fmaf(part[r][t], scale[r], acc[r][t]);
    }
    store<T, ROWS>(acc, out, row0, n);
}

}  // namespace gemv

// One entry point per token count, named gemv_<format>_t<T>. A warp takes one row at T = 1,
// where the bytes in flight per SM decide the speed, and two rows above it, so each
// activation load feeds two rows' FFMAs. Launch with 256 threads and
// ceil(N / (8 * rows)) blocks; K must be a multiple of 32 (MXFP4) or 16 (FP8, and of the tile).
#define GEMV_ROWS(T) ((T) == 1 ? 1 : 2)
#define GEMV_ENTRY(T)                                                                              \
    extern "C" __global__ void __launch_bounds__(256) gemv_mxfp4_t##T(                             \
        const uint8_t* w, const uint8_t* scales, const float* x, float* out, int n, int k) {       \
        gemv::mxfp4<T, GEMV_ROWS(T)>(w, scales, x, out, n, k);                                     \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(256) gemv_fp8_t##T(                               \
        const uint8_t* w, const float* tiles, const float* x, float* out, int n, int k, int tile) { \
        gemv::fp8<T, GEMV_ROWS(T)>(w, tiles, x, out, n, k, tile);                                  \
    }
GEMV_ENTRY(1) GEMV_ENTRY(2) GEMV_ENTRY(3) GEMV_ENTRY(4) GEMV_ENTRY(5) GEMV_ENTRY(6) GEMV_ENTRY(7) GEMV_ENTRY(8)
GEMV_ENTRY(9) GEMV_ENTRY(10) GEMV_ENTRY(11) GEMV_ENTRY(12) GEMV_ENTRY(13) GEMV_ENTRY(14) GEMV_ENTRY(15) GEMV_ENTRY(16)

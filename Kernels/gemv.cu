// Matrix-vector products for decode and verify steps: out[t, n] = sum_k W[n, k] * x[t, k]
// for T = 1..16 tokens, W stored [N, K] as
//   MXFP4 (gpt-oss / MiMo experts): 16 bytes of E2M1 codes per 32 elements (even element
//     in the low nibble) and one E8M0 scale byte per 32 elements in a separate tensor;
//   FP8 E4M3 with one f32 multiplier per tile x tile block (weight_scale_inv).
// x and out are f32 [T, K] and [T, N]. Weights are dequantized in registers; products and
// sums are f32, so the result differs from the CPU's only in summation order.
//
// Budget per call (N x K weight):
//   bytes: MXFP4 N*K*(1/2 + 1/32), FP8 N*K + 4*ceil(N/tile)*ceil(K/tile), plus 4*T*(K+N).
//     2880 x 2880: 4.41 MB (MXFP4), 8.35 MB (FP8); 5760 x 2880: 8.82 MB, 16.7 MB.
//   flops: 2*T*N*K (33 MFLOP per token for 5760 x 2880).
// Roofline at the H200's measured 4227 GB/s copy bandwidth (version 1's run): T = 1
//   2880x2880 1.04 us (MXFP4), 1.98 us (FP8); 5760x2880 2.09 us, 3.95 us.
// Issue-rate ceiling (the other wall): an SM issues 128 thread-instructions a clock. At the
//   roofline an H200 SM must take 16 weight bytes a clock (4.2 TB/s / 132 SMs / 1.98 GHz):
//   32 MXFP4 elements, each costing T FFMA + about 2.5 instructions to dequantize and read x,
//   so the FFMA path tops out near T = 2-3 at the roofline and falls as 1/T beyond
//   (FP8: 16 elements a clock, near T = 5). Verify blocks of 8-16 tokens need the tensor
//   cores (mma with f16 operands) to stay on the roofline; this file is the FFMA path.
//
// Version 2 layout. A block of 4 warps owns 4*R consecutive rows (a warp R of them) and
// walks K in tiles of 32*U chunks (chunk: one 16-byte weight load, 32 MXFP4 or 16 FP8
// elements; lane l takes chunks l, l+32, ... of the tile). Per tile, every lane first issues
// its R*U weight loads, then the block copies the tile's activations into shared memory with
// coalesced 16-byte loads, and only then waits for the weights: the loads overlap the copy.
// Launched as a programmatic dependent of the previous kernel (CUDALinear's default), the
// first tile's weight loads are issued before waiting for that kernel, whose output x is.
// Shared rows are padded by 16 bytes per chunk (36 floats per MXFP4 chunk, 20 per FP8
// chunk) so the lane-strided 16-byte reads of x land in 8 different bank groups per
// quarter-warp: conflict-free, 4 wavefronts per warp read instead of version 1's 32 L1 lines.
// Each x value read from shared memory feeds R rows (R >= T up to 4 keeps the shared reads
// under the 128 bytes a clock an SM can serve).
//
// Predicted before measuring (H200): T = 1 within 1.5x of the byte floor (MXFP4 5760x2880
// ~3 us, 70%; FP8 ~5 us, 80%); T = 16 issue-bound near 15 us (version 1: 147 us).
// Measured (H200, Kernels/NOTES.md): T = 1 MXFP4 5760x2880 9.3 us plain, 7.6 us overlapping
// the previous kernel (22-28% of copy bandwidth); T = 16 37.8 us. The miss at T = 1 is
// latency, not bandwidth: a call is one short wave (each warp streams one row's 1.4 KB),
// 27% occupancy, and a launch alone costs 3.0 us (1.5 us overlapped).

#include "common.cuh"

namespace gemv {

constexpr int kWarps = 4;

// Rows per warp and chunks per lane per tile for T tokens: at T = 1 one row per warp (twice
// the warps of R = 2) with all of a lane's chunks of a 2880-wide row loaded at once (3 of
// U = 4); shared memory (T * 32*U chunks) small enough for several blocks per SM at large T.
// CUDALinear.plan mirrors this.
// `chains` independent partial sums per row and token break the chain of dependent FFMAs
// when R*T is small (ncu on the first version 2: 17% occupancy, 68% of cycles with no
// eligible warp at T = 1).
template <int T> struct Plan {
    static constexpr int rows = T == 1 ? 1 : T == 2 ? 2 : 4;
    static constexpr int unroll = T == 1 ? 4 : T < 8 ? 2 : 1;
    static constexpr int chains = rows * T >= 4 ? 1 : 4 / (rows * T);
};

// Two E4M3 codes -> two f32 through the f16x2 conversion (sm_89+), which keeps NaN codes NaN.
__device__ __forceinline__ float2 e4m3x2(uint32_t pair) {
    uint32_t h2;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"((unsigned short)pair));
    return make_float2(f16lo(h2), f16hi(h2));
}

// Copies x[t, e0 .. e0 + elems) for every token into the padded shared tile. Each thread
// issues at least 8 loads before its first store: one load at a time left every block
// waiting out the L2 latency once per vector at small T.
template <int T, int CE, int threads = kWarps * 32>
__device__ __forceinline__ void stage(float* tile, const float* __restrict__ x, int k, int e0, int elems, int tokenStride) {
    constexpr int B = T >= 8 ? 1 : 8 / T;
    for (int v0 = threadIdx.x; v0 < elems / 4; v0 += B * threads) {
        float4 v[B][T];
#pragma unroll
        for (int b = 0; b < B; ++b)
#pragma unroll
            for (int t = 0; t < T; ++t)
                if (v0 + b * threads < elems / 4)
                    v[b][t] = __ldg(reinterpret_cast<const float4*>(x + (size_t)t * k + e0 + 4 * (v0 + b * threads)));
#pragma unroll
        for (int b = 0; b < B; ++b) {
            const int e = 4 * (v0 + b * threads), at = e / CE * (CE + 4) + e % CE;
#pragma unroll
            for (int t = 0; t < T; ++t)
                if (e < elems) *reinterpret_cast<float4*>(tile + t * tokenStride + at) = v[b][t];
        }
    }
}

template <int C, int R, int T>
__device__ __forceinline__ float sum(const float (&part)[C][R][T], int r, int t) {
    float v = part[0][r][t];
#pragma unroll
    for (int i = 1; i < C; ++i) v += part[i][r][t];
    return v;
}

// out[t * outStride + row] = the row's sum (+ bias[row] when there is a bias).
template <int T, int R>
__device__ __forceinline__ void store(float (&acc)[R][T], const float* bias, float* out, int outStride, int row0, int n) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int t = 0; t < T; ++t) {
            const float v = warp_sum(acc[r][t]);
            if (lane == 0 && row0 + r < n) out[(size_t)t * outStride + row0 + r] = bias ? v + bias[row0 + r] : v;
        }
}

template <int T>
__device__ void mxfp4(const uint8_t* __restrict__ w, const uint8_t* __restrict__ scales, const float* __restrict__ bias,
                      const float* __restrict__ x, float* __restrict__ out, int n, int k, int outStride) {
    constexpr int R = Plan<T>::rows, U = Plan<T>::unroll, C = Plan<T>::chains, CE = 32, tileChunks = 32 * U;
    constexpr int tokenStride = tileChunks * (CE + 4);
    extern __shared__ float4 shared[];
    float* tile = reinterpret_cast<float*>(shared);
    const int lane = threadIdx.x & 31;
    const int row0 = (blockIdx.x * kWarps + threadIdx.x / 32) * R;
    const bool active = row0 < n;  // idle warps still help stage x and meet the barriers
    const int chunks = k / CE;
    float acc[R][T] = {};
    for (int c0 = 0; c0 < chunks; c0 += tileChunks) {
        uint4 codes[U][R];
        uint32_t scale[U][R];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + u * 32 + lane;
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const size_t at = (size_t)min(row0 + r, n - 1) * chunks + c;
                if (active && c < chunks) {
                    codes[u][r] = load_streaming(w + at * 16);
                    scale[u][r] = scales[at];
                }
            }
        }
        if (c0 == 0) {
            // x is the previous kernel's output. Letting the next kernel start only now keeps
            // one kernel ahead, not a cascade of waiting grids holding the SMs.
            wait_for_previous_kernel();
            allow_next_kernel();
        }
        __syncthreads();  // the previous tile's reads of shared x are done
        stage<T, CE>(tile, x, k, c0 * CE, min(tileChunks, chunks - c0) * CE, tokenStride);
        __syncthreads();
        if (!active) continue;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + u * 32 + lane;
            if (c >= chunks) break;
            const float* xs = tile + (u * 32 + lane) * (CE + 4);
            float part[C][R][T] = {};
            mxfp4_chunk(codes[u], xs, tokenStride, part);
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const float s = e8m0(scale[u][r]);
#pragma unroll
                for (int t = 0; t < T; ++t) acc[r][t] = fmaf(sum(part, r, t) * 0x1p14f, s, acc[r][t]);
            }
        }
    }
    if (active) store<T, R>(acc, bias, out, outStride, row0, n);
}

template <int T>
__device__ void fp8(const uint8_t* __restrict__ w, const float* __restrict__ tiles, const float* __restrict__ bias,
                    const float* __restrict__ x, float* __restrict__ out, int n, int k, int outStride, int tileSize) {
    constexpr int R = Plan<T>::rows, U = Plan<T>::unroll, C = Plan<T>::chains, CE = 16, tileChunks = 32 * U;
    constexpr int tokenStride = tileChunks * (CE + 4);
    extern __shared__ float4 shared[];
    float* tile = reinterpret_cast<float*>(shared);
    const int lane = threadIdx.x & 31;
    const int row0 = (blockIdx.x * kWarps + threadIdx.x / 32) * R;
    const bool active = row0 < n;
    const int chunks = k / CE, tilesPerRow = (k + tileSize - 1) / tileSize;
    float acc[R][T] = {};
    for (int c0 = 0; c0 < chunks; c0 += tileChunks) {
        uint4 codes[U][R];
        float scale[U][R];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + u * 32 + lane;
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const int row = min(row0 + r, n - 1);
                if (active && c < chunks) {
                    codes[u][r] = load_streaming(w + (size_t)row * k + c * CE);
                    scale[u][r] = tiles[(size_t)(row / tileSize) * tilesPerRow + c * CE / tileSize];
                }
            }
        }
        if (c0 == 0) {
            wait_for_previous_kernel();
            allow_next_kernel();
        }
        __syncthreads();
        stage<T, CE>(tile, x, k, c0 * CE, min(tileChunks, chunks - c0) * CE, tokenStride);
        __syncthreads();
        if (!active) continue;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + u * 32 + lane;
            if (c >= chunks) break;
            const float* xs = tile + (u * 32 + lane) * (CE + 4);
            float part[C][R][T] = {};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                float wv[R][4];
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    const uint32_t q = word(codes[u][r], j);
                    const float2 lo = e4m3x2(q & 0xFFFF), hi = e4m3x2(q >> 16);
                    wv[r][0] = lo.x; wv[r][1] = lo.y; wv[r][2] = hi.x; wv[r][3] = hi.y;
                }
#pragma unroll
                for (int t = 0; t < T; ++t) {
                    const float4 a = *reinterpret_cast<const float4*>(xs + t * tokenStride + 4 * j);
                    const float xv[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
                    for (int r = 0; r < R; ++r)
#pragma unroll
                        for (int e = 0; e < 4; ++e) part[(j * 4 + e) % C][r][t] = fmaf(wv[r][e], xv[e], part[(j * 4 + e) % C][r][t]);
                }
            }
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int t = 0; t < T; ++t) acc[r][t] = fmaf(sum(part, r, t), scale[u][r], acc[r][t]);
        }
    }
    if (active) store<T, R>(acc, bias, out, outStride, row0, n);
}


// Plain f32 or bf16 weights (small models, routers, the BF16 LM head, anything converted on
// upload), x read through L1: out[t, r] = sum_i W[r, i] x[t, g * k + i] (+ bias[r]) with
// g = r / groupRows, so one launch can also multiply E stacked matrices by E different inputs
// (the dense MoE fallback's down projections; groupRows = n for one matrix). A warp owns
// PlainRows<TB> consecutive rows, 16-byte weight loads, TB token accumulators per row and
// lane (T <= TB of them used); each x value read from L1 feeds all of the warp's rows. Rows
// are `rowStride` elements apart; 16-byte paths need rowStride, k, xStride and g * k
// aligned, else the scalar path.
//
// Why several rows a warp at T >= 2: with one row, every 16-byte weight load needed 2 T
// 16-byte x loads from L1; at T = 8 that is 16 KB of L1 reads per KB of weights, past what
// L1 serves, and the BF16 LM head (201088 x 2880, 1158 MB) took 1.2 ms in an 8-token step
// against 0.28 ms at T = 1 (H200, 2026-11-27). Four rows cut the L1 reads to 4 bytes per weight
// byte (64 B a clock an SM at the roofline, half of L1) and keep the FFMAs (T per weight
// element) under the SM's rate up to T = 8.
// But a small product then has few warps: the default model's MLP (3072 x 576 f32) gets 768
// warps, 6 an SM, each with 4-5 loads per row in flight, and its launches took 12.5 us at
// T = 8 against 2.7 at T = 1 (latency, not bytes or L1). The `_r1` entries keep one row a warp
// at every T, for products of few rows (CUDALinear.plainFewRows).
template <int TB> struct PlainRows { static constexpr int value = TB >= 4 ? 4 : TB; };

template <int TB, bool BF16, int R>
__device__ __forceinline__ void plain_rows(const void* __restrict__ w, const float* __restrict__ bias, const float* __restrict__ x,
                                           float* __restrict__ out, int k, int rowStride, int T, int xStride, int groupRows,
                                           int outStride, int row0, int rows) {
    const int lane = threadIdx.x & 31;
    constexpr int E = BF16 ? 8 : 4;  // elements per 16-byte load
    const float* xg = x + (size_t)(row0 / groupRows) * k;
    const bool vector = rowStride % E == 0 && k % E == 0 && xStride % 4 == 0 && (row0 / groupRows) * k % 4 == 0;
    float acc[R][TB] = {};
    const int chunks = vector ? k / E : 0;
    for (int c = lane; c < chunks; c += 32) {
        float wv[R][8];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int row = r < rows ? row0 + r : row0;  // a short last warp repeats its first row
            if (BF16) {
                const uint4 v = load_streaming(reinterpret_cast<const uint16_t*>(w) + (size_t)row * rowStride + c * 8);
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const uint32_t q = word(v, j);
                    wv[r][2 * j] = __uint_as_float(q << 16);
                    wv[r][2 * j + 1] = __uint_as_float(q & 0xFFFF0000u);
                }
            } else {
                const uint4 v = load_streaming(reinterpret_cast<const float*>(w) + (size_t)row * rowStride + c * 4);
                wv[r][0] = __uint_as_float(v.x); wv[r][1] = __uint_as_float(v.y); wv[r][2] = __uint_as_float(v.z); wv[r][3] = __uint_as_float(v.w);
            }
        }
#pragma unroll
        for (int t = 0; t < TB; ++t) {
            if (t >= T) break;
#pragma unroll
            for (int h = 0; h < E / 4; ++h) {
                const float4 a = __ldg(reinterpret_cast<const float4*>(xg + (size_t)t * xStride + c * E + 4 * h));
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    acc[r][t] = fmaf(wv[r][4 * h], a.x, acc[r][t]);
                    acc[r][t] = fmaf(wv[r][4 * h + 1], a.y, acc[r][t]);
                    acc[r][t] = fmaf(wv[r][4 * h + 2], a.z, acc[r][t]);
                    acc[r][t] = fmaf(wv[r][4 * h + 3], a.w, acc[r][t]);
                }
            }
        }
    }
    for (int i = chunks * E + lane; i < k; i += 32) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int row = r < rows ? row0 + r : row0;
            const float wi = BF16 ? __uint_as_float((uint32_t)reinterpret_cast<const uint16_t*>(w)[(size_t)row * rowStride + i] << 16)
                                  : reinterpret_cast<const float*>(w)[(size_t)row * rowStride + i];
#pragma unroll
            for (int t = 0; t < TB; ++t)
                if (t < T) acc[r][t] = fmaf(wi, xg[(size_t)t * xStride + i], acc[r][t]);
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int t = 0; t < TB; ++t) {
            const float v = warp_sum(acc[r][t]);
            if (lane == 0 && t < T && r < rows) out[(size_t)t * outStride + row0 + r] = bias ? v + bias[row0 + r] : v;
        }
}

template <int TB, bool BF16, int R = PlainRows<TB>::value>
__device__ void plain(const void* __restrict__ w, const float* __restrict__ bias, const float* __restrict__ x,
                      float* __restrict__ out, int n, int k, int rowStride, int T, int xStride, int groupRows, int outStride) {
    const int row0 = (blockIdx.x * kWarps + threadIdx.x / 32) * R;
    wait_for_previous_kernel();
    allow_next_kernel();
    if (row0 >= n) return;
    const int rows = min(R, n - row0);
    // The warp's rows share one x group (always, for a single matrix); stacked matrices
    // whose boundary falls inside the warp take their rows one at a time.
    if (row0 / groupRows == (row0 + rows - 1) / groupRows) {
        plain_rows<TB, BF16, R>(w, bias, x, out, k, rowStride, T, xStride, groupRows, outStride, row0, rows);
    } else {
        for (int r = 0; r < rows; ++r) plain_rows<TB, BF16, 1>(w, bias, x, out, k, rowStride, T, xStride, groupRows, outStride, row0 + r, 1);
    }
}


// Wide products (the LM head: N = 100k-200k rows, hundreds of MB): version 2's layout gives
// every block 4 rows, so each block stages x (as many bytes as its rows' weights) and pays
// two barriers for 11 KB of weights; the LM head ran at 45% of copy bandwidth. Here a grid of
// resident blocks stages x for the whole K once, and each warp then streams its rows (row
// warp, warp + warps, ...) in pieces of up to 32 * kPiece chunks, the next piece's weight loads
// issued before the current piece is summed (two register sets, so loads stay in flight
// across rows). Every lane sums its chunks of a piece independently (kPiece chains), the warp
// reduces a row once. Same per-chunk arithmetic as version 2, so the same error bound.
// Shared memory: T * (K / CE) * (CE + 4) * 4 bytes (14.4 KB a token for K = 2880).
constexpr int kWideWarps = 8, kPiece = 4;

template <int T, bool MX>
struct WidePiece {
    uint4 codes[kPiece];
    float scale[kPiece];
};

template <int T, bool MX>
__device__ __forceinline__ void wide_load(WidePiece<T, MX>& p, const uint8_t* __restrict__ w, const void* __restrict__ scales,
                                          int row, int piece, int chunks, int k, int tilesPerRow, int tileSize) {
    constexpr int CE = MX ? 32 : 16;
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int u = 0; u < kPiece; ++u) {
        const int c = piece * 32 * kPiece + u * 32 + lane;
        if (c < chunks) {
            if (MX) {
                const size_t at = (size_t)row * chunks + c;
                p.codes[u] = load_streaming(w + at * 16);
                p.scale[u] = e8m0(reinterpret_cast<const uint8_t*>(scales)[at]) * 0x1p14f;
            } else {
                p.codes[u] = load_streaming(w + (size_t)row * k + c * CE);
                p.scale[u] = reinterpret_cast<const float*>(scales)[(size_t)(row / tileSize) * tilesPerRow + c * CE / tileSize];
            }
        }
    }
}

template <int T, bool MX>
__device__ __forceinline__ void wide_sum(const WidePiece<T, MX>& p, const float* xs, int tokenStride, int piece, int chunks, float (&acc)[T]) {
    constexpr int CE = MX ? 32 : 16;
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int u = 0; u < kPiece; ++u) {
        const int c = piece * 32 * kPiece + u * 32 + lane;
        if (c >= chunks) break;
        const float* xc = xs + c * (CE + 4);
        float part[1][1][T] = {};
        if (MX) {
            const uint4 codes[1] = {p.codes[u]};
            mxfp4_chunk(codes, xc, tokenStride, part);
        } else {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const uint32_t q = word(p.codes[u], j);
                const float2 lo = e4m3x2(q & 0xFFFF), hi = e4m3x2(q >> 16);
                const float wv[4] = {lo.x, lo.y, hi.x, hi.y};
#pragma unroll
                for (int t = 0; t < T; ++t) {
                    const float4 a = *reinterpret_cast<const float4*>(xc + t * tokenStride + 4 * j);
                    part[0][0][t] = fmaf(wv[0], a.x, part[0][0][t]);
                    part[0][0][t] = fmaf(wv[1], a.y, part[0][0][t]);
                    part[0][0][t] = fmaf(wv[2], a.z, part[0][0][t]);
                    part[0][0][t] = fmaf(wv[3], a.w, part[0][0][t]);
                }
            }
        }
#pragma unroll
        for (int t = 0; t < T; ++t) acc[t] = fmaf(part[0][0][t], p.scale[u], acc[t]);
    }
}

template <int T, bool MX>
__device__ void wide(const uint8_t* __restrict__ w, const void* __restrict__ scales, const float* __restrict__ bias,
                     const float* __restrict__ x, float* __restrict__ out, int n, int k, int outStride, int tileSize) {
    constexpr int CE = MX ? 32 : 16;
    extern __shared__ float4 shared[];
    float* xs = reinterpret_cast<float*>(shared);
    const int lane = threadIdx.x & 31;
    const int chunks = k / CE, tokenStride = chunks * (CE + 4), tilesPerRow = MX ? 0 : (k + tileSize - 1) / tileSize;
    const int warp = blockIdx.x * kWideWarps + threadIdx.x / 32, warps = gridDim.x * kWideWarps;
    const int pieces = (chunks + 32 * kPiece - 1) / (32 * kPiece);
    const int rows = warp < n ? (n - 1 - warp) / warps + 1 : 0, items = rows * pieces;
    WidePiece<T, MX> a, b;
    if (items > 0) wide_load(a, w, scales, warp, 0, chunks, k, tilesPerRow, tileSize);
    wait_for_previous_kernel();  // x is the previous kernel's output
    allow_next_kernel();
    stage<T, CE, kWideWarps * 32>(xs, x, k, 0, k, tokenStride);
    __syncthreads();
    float acc[T] = {};
    auto finish = [&](int item) {
        if (item % pieces != pieces - 1) return;
        const int row = warp + (item / pieces) * warps;
#pragma unroll
        for (int t = 0; t < T; ++t) {
            const float v = warp_sum(acc[t]);
            if (lane == 0) out[(size_t)t * outStride + row] = bias ? v + bias[row] : v;
            acc[t] = 0.f;
        }
    };
    for (int i = 0; i < items; i += 2) {
        if (i + 1 < items) wide_load(b, w, scales, warp + ((i + 1) / pieces) * warps, (i + 1) % pieces, chunks, k, tilesPerRow, tileSize);
        wide_sum(a, xs, tokenStride, i % pieces, chunks, acc);
        finish(i);
        if (i + 1 >= items) break;
        if (i + 2 < items) wide_load(a, w, scales, warp + ((i + 2) / pieces) * warps, (i + 2) % pieces, chunks, k, tilesPerRow, tileSize);
        wide_sum(b, xs, tokenStride, (i + 1) % pieces, chunks, acc);
        finish(i + 1);
    }
}

}  // namespace gemv

// One entry point per token count, named gemv_<format>_t<T>. Launch with 128 threads,
// ceil(N / (4 * rows)) blocks and T * 32*unroll * (elements + 4) * 4 bytes of dynamic shared
// memory (elements: 32 MXFP4, 16 FP8; rows and unroll from gemv::Plan<T>); K must be a
// multiple of 32 (MXFP4) or 16 (FP8, and of the tile). bias may be null; token t's outputs
// start at out + t * outStride.
#define GEMV_ENTRY(T)                                                                              \
    extern "C" __global__ void __launch_bounds__(128) gemv_mxfp4_t##T(                             \
        const uint8_t* w, const uint8_t* scales, const float* bias, const float* x, float* out,    \
        int n, int k, int outStride) {                                                             \
        gemv::mxfp4<T>(w, scales, bias, x, out, n, k, outStride);                                  \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) gemv_fp8_t##T(                               \
        const uint8_t* w, const float* tiles, const float* bias, const float* x, float* out,       \
        int n, int k, int outStride, int tile) {                                                   \
        gemv::fp8<T>(w, tiles, bias, x, out, n, k, outStride, tile);                               \
    }
GEMV_ENTRY(1) GEMV_ENTRY(2) GEMV_ENTRY(3) GEMV_ENTRY(4) GEMV_ENTRY(5) GEMV_ENTRY(6) GEMV_ENTRY(7) GEMV_ENTRY(8)
GEMV_ENTRY(9) GEMV_ENTRY(10) GEMV_ENTRY(11) GEMV_ENTRY(12) GEMV_ENTRY(13) GEMV_ENTRY(14) GEMV_ENTRY(15) GEMV_ENTRY(16)

// gemv_<f32|bf16>_t<TB> for the token bins TB = 1, 2, 4, 8, 16 (T <= TB used). Launch with
// 128 threads and ceil(N / (4 * PlainRows<TB>)) blocks (CUDALinear.plan), no shared memory;
// gemv_<f32|bf16>_t<TB>_r1, one row a warp: ceil(N / 4) blocks.
#define PLAIN_ENTRY(TB)                                                                            \
    extern "C" __global__ void __launch_bounds__(128) gemv_f32_t##TB(                              \
        const void* w, const float* bias, const float* x, float* out, int n, int k, int rowStride, \
        int T, int xStride, int groupRows, int outStride) {                                        \
        gemv::plain<TB, false>(w, bias, x, out, n, k, rowStride, T, xStride, groupRows, outStride); \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) gemv_bf16_t##TB(                             \
        const void* w, const float* bias, const float* x, float* out, int n, int k, int rowStride, \
        int T, int xStride, int groupRows, int outStride) {                                        \
        gemv::plain<TB, true>(w, bias, x, out, n, k, rowStride, T, xStride, groupRows, outStride); \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) gemv_f32_t##TB##_r1(                         \
        const void* w, const float* bias, const float* x, float* out, int n, int k, int rowStride, \
        int T, int xStride, int groupRows, int outStride) {                                        \
        gemv::plain<TB, false, 1>(w, bias, x, out, n, k, rowStride, T, xStride, groupRows, outStride); \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) gemv_bf16_t##TB##_r1(                        \
        const void* w, const float* bias, const float* x, float* out, int n, int k, int rowStride, \
        int T, int xStride, int groupRows, int outStride) {                                        \
        gemv::plain<TB, true, 1>(w, bias, x, out, n, k, rowStride, T, xStride, groupRows, outStride); \
    }
PLAIN_ENTRY(1) PLAIN_ENTRY(2) PLAIN_ENTRY(4) PLAIN_ENTRY(8) PLAIN_ENTRY(16)

// gemv_wide_<mxfp4|fp8>_t<T>: the wide-product layout above. Launch with kWideWarps * 32 = 256
// threads, a grid of resident blocks (at most ceil(N / 8)), and
// T * (K / elements) * (elements + 4) * 4 bytes of dynamic shared memory; arguments as
// gemv_<format>_t<T> (scales: E8M0 bytes or FP8 tile multipliers; tile unused for MXFP4).
#define WIDE_ENTRY(T)                                                                              \
    extern "C" __global__ void __launch_bounds__(256) gemv_wide_mxfp4_t##T(                        \
        const uint8_t* w, const uint8_t* scales, const float* bias, const float* x, float* out,    \
        int n, int k, int outStride) {                                                             \
        gemv::wide<T, true>(w, scales, bias, x, out, n, k, outStride, 0);                          \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(256) gemv_wide_fp8_t##T(                          \
        const uint8_t* w, const float* tiles, const float* bias, const float* x, float* out,       \
        int n, int k, int outStride, int tile) {                                                   \
        gemv::wide<T, false>(w, tiles, bias, x, out, n, k, outStride, tile);                       \
    }
WIDE_ENTRY(1) WIDE_ENTRY(2) WIDE_ENTRY(3) WIDE_ENTRY(4) WIDE_ENTRY(5) WIDE_ENTRY(6) WIDE_ENTRY(7) WIDE_ENTRY(8)
WIDE_ENTRY(9) WIDE_ENTRY(10) WIDE_ENTRY(11) WIDE_ENTRY(12) WIDE_ENTRY(13) WIDE_ENTRY(14) WIDE_ENTRY(15) WIDE_ENTRY(16)

// Warms L2 with weights a later kernel of the step will read: `ranges` holds `count` pairs
// (device address, bytes); the grid's threads walk the 128-byte lines of every range and
// issue one L2 prefetch each (nothing waits, so the kernel ends at once). evictLast marks the
// lines evict-last so the step's streamed expert weights (marked evict-first) do not push them
// out. Launched on a side branch of the step's graph, beside kernels that leave DRAM idle.
// Prefetches through the load units of many SMs: a first version issued 64 KB bulk prefetches
// from a few blocks, and the MoE kernel's own bulk copies on those SMs queued behind them (the
// step got 25% slower). Any grid, any block.
extern "C" __global__ void prefetch_l2(const unsigned long long* ranges, int count, int evictLast) {
    const size_t stride = (size_t)gridDim.x * blockDim.x, first = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    for (int r = 0; r < count; ++r) {
        const char* base = reinterpret_cast<const char*>(ranges[2 * r]);
        const size_t lines = (ranges[2 * r + 1] + 127) / 128;
        for (size_t i = first; i < lines; i += stride) {
            if (evictLast) asm volatile("prefetch.global.L2::evict_last [%0];" :: "l"(base + 128 * i));
            else asm volatile("prefetch.global.L2 [%0];" :: "l"(base + 128 * i));
        }
    }
}

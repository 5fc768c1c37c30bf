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
#include <cooperative_groups.h>

namespace gemv {
namespace cg = cooperative_groups;

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

// Two E4M3 codes (the low 16 bits of pair) -> f16x2, exact (sm_89+), NaN codes stay NaN.
__device__ __forceinline__ uint32_t e4m3x2_f16(uint32_t pair) {
    uint32_t h2;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"((unsigned short)pair));
    return h2;
}
// Two E4M3 codes -> two f32 through the f16x2 conversion.
__device__ __forceinline__ float2 e4m3x2(uint32_t pair) {
    const uint32_t h2 = e4m3x2_f16(pair);
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

// The residual add and RMSNorm in front of a 1-token product (gemv_wide_norm_*), instead of an
// add_rmsnorm launch before it: x = resid + add (add may be null), then h = w * (x * inv) with
// inv = 1 / sqrt(mean(x^2) + eps), staged into the padded tile as stage() does; block 0 also
// writes h to hOut. Every block computes the same values from the same loads. With `add`, x is
// kept in `saved` and the block takes a ticket of `arrivals` once its loads of resid are used;
// the block holding the last ticket writes x back into resid at its end (norm_finish), when
// no block reads resid any more, and zeroes the counter. k <= 4 * THREADS * 4 (4096 at 256
// threads), every thread's loads in flight together. The sum of squares is ordered
// differently from add_rmsnorm's, so h can differ from it in the last bits (the CPU check's
// tolerance covers both).
template <int CE, int THREADS>
__device__ __forceinline__ int norm_stage(float* tile, float* saved, const float* __restrict__ resid, const float* __restrict__ add,
                                          const float* __restrict__ w, float eps, int k, float* __restrict__ hOut, int* arrivals) {
    constexpr int U = 4;
    __shared__ float scratch[32];
    const int v4 = k / 4;
    const float4* r4 = reinterpret_cast<const float4*>(resid);
    const float4* a4 = reinterpret_cast<const float4*>(add);
    const float4* w4 = reinterpret_cast<const float4*>(w);
    float ss = 0.f;
    float4 v[U], g[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int i = threadIdx.x + u * THREADS;
        if (i < v4) {
            v[u] = __ldcg(r4 + i);
            g[u] = __ldg(w4 + i);
            if (add) {
                const float4 b = __ldcg(a4 + i);
                v[u].x += b.x; v[u].y += b.y; v[u].z += b.z; v[u].w += b.w;
            }
            ss += v[u].x * v[u].x + v[u].y * v[u].y + v[u].z * v[u].z + v[u].w * v[u].w;
        }
    }
    const float inv = rsqrtf(block_sum_all(ss, scratch) / k + eps);
    // Every thread's loads of resid are in its sum by now: take the ticket (its value is
    // needed only at the block's end).
    const int ticket = add && threadIdx.x == 0 ? atomicAdd(arrivals, 1) : 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int i = threadIdx.x + u * THREADS;
        if (i < v4) {
            const float4 h = make_float4(g[u].x * (v[u].x * inv), g[u].y * (v[u].y * inv), g[u].z * (v[u].z * inv), g[u].w * (v[u].w * inv));
            const int e = 4 * i;
            *reinterpret_cast<float4*>(tile + e / CE * (CE + 4) + e % CE) = h;
            if (add) reinterpret_cast<float4*>(saved)[i] = v[u];
            if (blockIdx.x == 0) reinterpret_cast<float4*>(hOut)[i] = h;
        }
    }
    return ticket;
}

// The end of a block that ran norm_stage: the last block to arrive writes x (saved) into resid.
__device__ __forceinline__ void norm_finish(int ticket, const float* saved, float* resid, int k, int* arrivals, bool add) {
    if (!add) return;
    __shared__ bool last;
    if (threadIdx.x == 0) last = ticket == (int)gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    for (int i = threadIdx.x; i < k / 4; i += blockDim.x) reinterpret_cast<float4*>(resid)[i] = reinterpret_cast<const float4*>(saved)[i];
    if (threadIdx.x == 0) *arrivals = 0;  // ready for the next launch
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
// at every T, for products of few rows (CUDALinear.plainFewRows); since the twentieth session
// those take the `_sk` entries (gemv::plain_split, below) from T = 2, and `_r1` only with
// FULGUR_PLAIN_SPLIT=0.
template <int TB> struct PlainRows { static constexpr int value = TB >= 4 ? 4 : TB; };

// The warp's share of the rows' sums: `part` of `parts` interleaved slices of the 16-byte chunks
// (and of the scalar tail), added into acc. plain_rows takes all of them (part 0 of 1);
// plain_split gives each warp of a block its slice of one row.
template <int TB, bool BF16, int R>
__device__ __forceinline__ void plain_accumulate(const void* __restrict__ w, const float* __restrict__ x, int k, int rowStride,
                                                 int T, int xStride, int groupRows, int row0, int rows, int part, int parts,
                                                 float (&acc)[R][TB]) {
    const int lane = threadIdx.x & 31;
    constexpr int E = BF16 ? 8 : 4;  // elements per 16-byte load
    const float* xg = x + (size_t)(row0 / groupRows) * k;
    const bool vector = rowStride % E == 0 && k % E == 0 && xStride % 4 == 0 && (row0 / groupRows) * k % 4 == 0;
    const int chunks = vector ? k / E : 0;
    for (int c = part * 32 + lane; c < chunks; c += 32 * parts) {
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
    for (int i = chunks * E + part * 32 + lane; i < k; i += 32 * parts) {
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
}

template <int TB, bool BF16, int R>
__device__ __forceinline__ void plain_rows(const void* __restrict__ w, const float* __restrict__ bias, const float* __restrict__ x,
                                           float* __restrict__ out, int k, int rowStride, int T, int xStride, int groupRows,
                                           int outStride, int row0, int rows) {
    const int lane = threadIdx.x & 31;
    float acc[R][TB] = {};
    plain_accumulate<TB, BF16, R>(w, x, k, rowStride, T, xStride, groupRows, row0, rows, 0, 1, acc);
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int t = 0; t < TB; ++t) {
            const float v = warp_sum(acc[r][t]);
            if (lane == 0 && t < T && r < rows) out[(size_t)t * outStride + row0 + r] = bias ? v + bias[row0 + r] : v;
        }
}

// `early` (CUDALinear.plainEarly; Kernels/NOTES.md, "Nineteenth session"): before waiting for the
// previous kernel, the warp asks L2 for its rows' weights, at most kPlainEarlyLines 128-byte
// lines (32 KB) a warp. The plain kernels load a lane's weights in a chain of dependent rounds
// (one 16-byte load, its FFMAs, the next load): for the default model's f32 products (K = 576:
// 4-5 rounds a lane; K = 1536: 12) each round paid a DRAM trip after the wait. With the lines
// already in L2 each round pays an L2 trip, and the DRAM reads overlap the previous kernel's
// tail, as the wide layout's first tile of weights does. Prefetches are hints: arithmetic and
// results are unchanged. H200: the default model's 1-token step 0.864 -> 0.806 ms, 2-token
// 1.052 -> 0.893; slower for LM heads of many block waves, which therefore leave it off.
constexpr int kPlainEarlyLines = 256;

template <bool BF16>
__device__ __forceinline__ void plain_prefetch(const void* __restrict__ w, int row0, int rows, int k, int rowStride) {
    const int lane = threadIdx.x & 31;
    const size_t elementBytes = BF16 ? 2 : 4, rowBytes = (size_t)k * elementBytes;
    const char* base = reinterpret_cast<const char*>(w);
    int issued = 0;
    for (int r = 0; r < rows && issued < kPlainEarlyLines; ++r) {
        const uintptr_t start = reinterpret_cast<uintptr_t>(base + (size_t)(row0 + r) * rowStride * elementBytes);
        const uintptr_t first = start & ~uintptr_t(127), end = start + rowBytes;
        const int lines = (int)((end - first + 127) / 128);
        for (int l = lane; l < lines && issued + l < kPlainEarlyLines; l += 32)
            asm volatile("prefetch.global.L2 [%0];" ::"l"(first + 128 * (uintptr_t)l));
        issued += lines;
    }
}

template <int TB, bool BF16, int R = PlainRows<TB>::value>
__device__ void plain(const void* __restrict__ w, const float* __restrict__ bias, const float* __restrict__ x,
                      float* __restrict__ out, int n, int k, int rowStride, int T, int xStride, int groupRows, int outStride,
                      int early) {
    const int row0 = (blockIdx.x * kWarps + threadIdx.x / 32) * R;
    if (early && row0 < n) plain_prefetch<BF16>(w, row0, min(R, n - row0), k, rowStride);
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

// Split K (`_sk`, CUDALinear.plainSplit; Kernels/NOTES.md, "Twentieth session"): a block of
// kWarps warps per row, each warp a quarter of the row's chunks, the warps' sums added in shared
// memory (in warp order, so a row's result does not depend on timing). For products of few rows
// (the default model's: 576-3072 rows), where one row a warp leaves about 4-20 warps an SM, each
// walking its whole row, and the 8-token step took 2.7x the 1-token step (o_proj 576 x 576:
// 1.7 us a launch at 1 token, 8.3 us at 8). Same bytes; 4x the warps, a quarter of the chain.
template <int TB, bool BF16>
__device__ void plain_split(const void* __restrict__ w, const float* __restrict__ bias, const float* __restrict__ x,
                            float* __restrict__ out, int n, int k, int rowStride, int T, int xStride, int groupRows, int outStride,
                            int early) {
    const int row = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    if (early && warp == 0 && row < n) plain_prefetch<BF16>(w, row, 1, k, rowStride);
    wait_for_previous_kernel();
    allow_next_kernel();
    if (row >= n) return;  // the whole block: row is the block's
    float acc[1][TB] = {};
    plain_accumulate<TB, BF16, 1>(w, x, k, rowStride, T, xStride, groupRows, row, 1, warp, kWarps, acc);
    __shared__ float partial[kWarps][TB];
#pragma unroll
    for (int t = 0; t < TB; ++t) {
        const float v = warp_sum(acc[0][t]);
        if (lane == 0) partial[warp][t] = v;
    }
    __syncthreads();
    if (threadIdx.x < T) {
        float v = 0.f;
#pragma unroll
        for (int p = 0; p < kWarps; ++p) v += partial[p][threadIdx.x];
        out[(size_t)threadIdx.x * outStride + row] = bias ? v + bias[row] : v;
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

// Norm (gemv_wide_norm_*, T = 1): x is not read; norm_stage makes it from resid and add.
template <int T, bool MX, bool Norm = false>
__device__ void wide(const uint8_t* __restrict__ w, const void* __restrict__ scales, const float* __restrict__ bias,
                     const float* __restrict__ x, float* __restrict__ out, int n, int k, int outStride, int tileSize,
                     float* resid = nullptr, const float* add = nullptr, const float* normWeight = nullptr, float eps = 0.f,
                     float* hOut = nullptr, int* arrivals = nullptr) {
    static_assert(!Norm || T == 1, "the norm in front of a product is for one token");
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
    int ticket = 0;
    float* saved = xs + tokenStride;  // x of the norm, after the tile (the host sizes for both)
    if constexpr (Norm) ticket = norm_stage<CE, kWideWarps * 32>(xs, saved, resid, add, normWeight, eps, k, hOut, arrivals);
    else stage<T, CE, kWideWarps * 32>(xs, x, k, 0, k, tokenStride);
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
    if constexpr (Norm) norm_finish(ticket, saved, resid, k, arrivals, add != nullptr);
}


// Tensor-core products for 4-16 tokens (verify blocks, the DFlash drafter's block, the LM head
// at 8-16 tokens): FP8 E4M3 (128x128 tile multipliers) and BF16 weights on mma.sync m16n8k16
// with f32 accumulators. The FFMA paths above spend T FFMAs per weight element, so at T = 8
// an SM needs 8 elements x 16 FP8 bytes a clock x 8 = more FFMAs than it can issue; they ran at
// 13-18% of copy bandwidth for FP8 and 22% for the BF16 LM head at 16 tokens (H200). Here a warp
// spends about 33 instructions on 1024 FP8 weights at 8 tokens (2 loads, 16 E4M3 -> f16x2
// conversions, 4 shared loads of x, 8 mma) and the mma count grows only by one n-tile per 8
// tokens, so 16 B a clock an SM is within the issue rate at every T <= 16.
//
// Exactness: weights go in exact (E4M3 -> f16 is exact; BF16 as is). x is split into terms
// the mma takes: for FP8 weights f16 hi + lo of x scaled per (token, 64-column chunk) by a power
// of two that puts max |x| in [2^14, 2^15) (no overflow, about 2^-22 relative, as the MoE
// kernels); for BF16 weights bf16 hi + mid + lo (about 2^-24, the f32 range, no scaling). So
// the result is an f32 sum in another order, as the FFMA paths.
//
// Layout: a block of 4 warps owns one eighth of K and walks 64-row blocks (a warp 16 rows)
// rb = blockIdx.x, + gridDim.x, ... (at most kMmaRowBlocks; the host sizes the grid so the
// clusters are all resident and share the row blocks evenly); the 8 blocks of a thread-block
// cluster (grid.y = 8) cover K, and at the end the 8 ranks each sum a share of the partial
// tiles from distributed shared memory, each sum in rank order (deterministic, no scratch in
// global memory, no float atomics). K is walked in 64-column chunks (each chunk in one FP8
// tile, so a warp applies one multiplier per chunk), in pieces of P chunks: every lane issues
// the piece's weight loads (FP8: 2 x 16 B a chunk, BF16: 4) together, the block stages the
// piece's x split into terms in shared memory (once per block when its share of K is one
// piece), then each warp multiplies. Issuing the next piece's chunk c as soon as chunk c was
// used (a register ring, one piece ahead) was slower at every shape, up to 35% on 201088 x
// 2880: the loads of a row's piece then reach memory spread out rather than together
// (fifteenth session, Kernels/NOTES.md).
// Version 1 (one row block a block, so 5760 rows took two waves of short blocks, each paying
// the x staging and two cluster barriers) ran 5760 x 2880 FP8 at 8 tokens in 14.5 us on an
// H100, 38% of copy bandwidth (Kernels/NOTES.md). Lane 4g + t loads columns 16t .. 16t + 15 of rows g and
// g + 8; mma step m (of 4 a chunk) takes their columns 4m .. 4m + 3 as its k-order
// (2t, 2t + 1, 2t + 8, 2t + 9), and B is staged in the same order, so no shuffles.
// Shared x: per token P chunks of 64 columns x terms x 2 bytes, token stride padded by 16 bytes
// (the 16-byte B reads of a quarter-warp then hit 32 distinct banks).
//
// Budget: the weights' bytes (FP8 N*K + tile multipliers, BF16 2*N*K) plus T*K*4 of x per
// block row from L2 and 7/8 of 64 * T * 4 bytes a block through distributed shared memory.
// Requires K % 64 == 0 and, for FP8, a tile multiple of 64 (CUDALinear checks).
constexpr int kMmaSplits = 8, kMmaWarps = 4, kMmaRowBlocks = 4;

template <bool BF16, int NT> struct MmaFormat {
    static constexpr int terms = BF16 ? 3 : 2;
    static constexpr int piece = BF16 ? 2 : NT == 1 ? 8 : 4;  // chunks per piece (measured best on an H100, NOTES)
    static constexpr int loads = BF16 ? 4 : 2;                // 16-byte weight loads per lane and chunk
    static constexpr int chunkBytes = terms * 128;            // shared bytes per token and chunk
    static constexpr int tokenStride = piece * chunkBytes + 16;
};

// mma_f16 (common.cuh) with bf16 operands.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    uint32_t d;
    asm("cvt.rn.bf16x2.f32 %0, %2, %1;" : "=r"(d) : "f"(lo), "f"(hi));
    return d;
}
__device__ __forceinline__ float bf16lo(uint32_t p) { return __uint_as_float(p << 16); }
__device__ __forceinline__ float bf16hi(uint32_t p) { return __uint_as_float(p & 0xFFFF0000u); }

// Stages chunks [c0, c0 + count) of x (tokens >= T and chunks >= count as zeros) into `xs` in
// the B order, split into terms; FP8: mult[token][chunk] = the power of two to multiply the
// chunk's products by. Lane 16-groups (half-warps) hold one (token, chunk) each pass.
template <bool BF16, int NT>
__device__ __forceinline__ void mma_stage(uint8_t* xs, float* mult, const float* __restrict__ x, int k, int T, int c0, int count) {
    using F = MmaFormat<BF16, NT>;
    constexpr int P = F::piece, N = NT * 8, passes = N * P * 16 / (kMmaWarps * 32), G = passes < 4 ? passes : 4;
    static_assert(passes % G == 0, "passes in groups of G");
#pragma unroll
    for (int u0 = 0; u0 < passes; u0 += G) {
    float4 v[G];
#pragma unroll
    for (int j = 0; j < G; ++j) {
        const int i = threadIdx.x + (u0 + j) * kMmaWarps * 32, t = i / (P * 16), c = i / 16 % P, e = i % 16;
        v[j] = t < T && c < count ? __ldg(reinterpret_cast<const float4*>(x + (size_t)t * k + (c0 + c) * 64 + 4 * e))
                                  : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int j = 0; j < G; ++j) {
        const int u = j, i = threadIdx.x + (u0 + j) * kMmaWarps * 32, t = i / (P * 16), c = i / 16 % P, e = i % 16;
        uint8_t* d = xs + t * F::tokenStride + c * F::chunkBytes + 8 * e;
        if (BF16) {
            const float q[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
            uint32_t hi[2], mid[2], lo[2];
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                hi[j] = pack_bf16x2(q[2 * j], q[2 * j + 1]);
                const float r0 = q[2 * j] - bf16lo(hi[j]), r1 = q[2 * j + 1] - bf16hi(hi[j]);
                mid[j] = pack_bf16x2(r0, r1);
                lo[j] = pack_bf16x2(r0 - bf16lo(mid[j]), r1 - bf16hi(mid[j]));
            }
            *reinterpret_cast<uint2*>(d) = make_uint2(hi[0], hi[1]);
            *reinterpret_cast<uint2*>(d + 128) = make_uint2(mid[0], mid[1]);
            *reinterpret_cast<uint2*>(d + 256) = make_uint2(lo[0], lo[1]);
        } else {
            float m = fmaxf(fmaxf(fabsf(v[u].x), fabsf(v[u].y)), fmaxf(fabsf(v[u].z), fabsf(v[u].w)));
#pragma unroll
            for (int o = 8; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
            // max |x| * 2^-e in [2^14, 2^15): e = exponent(max) - 14, kept where 2^-e is a normal float.
            const int be = (__float_as_uint(m) >> 23) & 0xFF, ex = be == 0 ? 0 : max(be - 141, -120);
            const float down = __uint_as_float((uint32_t)(127 - ex) << 23);
            const float q[4] = {v[u].x * down, v[u].y * down, v[u].z * down, v[u].w * down};
            const uint32_t h0 = f16x2(q[0], q[1]), h1 = f16x2(q[2], q[3]);
            const uint32_t l0 = f16x2(q[0] - f16lo(h0), q[1] - f16hi(h0)), l1 = f16x2(q[2] - f16lo(h1), q[3] - f16hi(h1));
            *reinterpret_cast<uint2*>(d) = make_uint2(h0, h1);
            *reinterpret_cast<uint2*>(d + 128) = make_uint2(l0, l1);
            if (e == 0) mult[t * P + c] = __uint_as_float((uint32_t)(127 + ex) << 23);
        }
    }
    }
}

template <bool BF16, int NT>
__device__ void mma_product(const uint8_t* __restrict__ w, const float* __restrict__ tiles, const float* __restrict__ bias,
                            const float* __restrict__ x, float* __restrict__ out, int n, int k, int outStride, int tileSize, int T) {
    using F = MmaFormat<BF16, NT>;
    constexpr int P = F::piece, L = F::loads, tileFloats = kMmaWarps * 32 * NT * 4;
    __shared__ __align__(16) uint8_t xs[NT * 8 * F::tokenStride];
    __shared__ float mult[NT * 8 * P];
    __shared__ float red[kMmaRowBlocks * tileFloats];
    const int lane = threadIdx.x & 31, warp = threadIdx.x / 32, g = lane >> 2, t4 = lane & 3;
    const int chunks = k / 64, per = (chunks + kMmaSplits - 1) / kMmaSplits;
    const int first = blockIdx.y * per, last = min(chunks, first + per);
    const bool stageOnce = last - first <= P;  // the block's x fits one piece: staged for its first row block only
    const int tilesPerRow = BF16 ? 0 : (k + tileSize - 1) / tileSize, rowBlocks = (n + 63) / 64;
    bool waited = false;
    int iter = 0;
    for (int rb = blockIdx.x; rb < rowBlocks; rb += gridDim.x, ++iter) {
        const int row0 = rb * 64 + warp * 16;
        const int rowA = min(row0 + g, n - 1), rowB = min(row0 + g + 8, n - 1);
        float acc[NT][4] = {};
        for (int p0 = first; p0 < last; p0 += P) {
            const int count = min(P, last - p0);
            // The piece's weights: lane 4g + t's columns 16t .. 16t + 15 of rows g and g + 8, per chunk.
            uint4 wa[P][L / 2], wb[P][L / 2];
            float scale[P];
#pragma unroll
            for (int c = 0; c < P; ++c) {
                if (c < count) {
                    const size_t col = (size_t)(p0 + c) * 64 + 16 * t4;  // element column
#pragma unroll
                    for (int l = 0; l < L / 2; ++l) {
                        if (BF16) {
                            wa[c][l] = load_streaming(reinterpret_cast<const uint16_t*>(w) + (size_t)rowA * k + col + 8 * l);
                            wb[c][l] = load_streaming(reinterpret_cast<const uint16_t*>(w) + (size_t)rowB * k + col + 8 * l);
                        } else {
                            wa[c][l] = load_streaming(w + (size_t)rowA * k + col);
                            wb[c][l] = load_streaming(w + (size_t)rowB * k + col);
                        }
                    }
                    scale[c] = BF16 ? 1.f : __ldg(tiles + (size_t)(min(row0, n - 1) / tileSize) * tilesPerRow + (p0 + c) * 64 / tileSize);
                }
            }
            if (!waited) {
                wait_for_previous_kernel();  // x is the previous kernel's output
                allow_next_kernel();
                waited = true;
            }
            if (!stageOnce || iter == 0) {
                __syncthreads();  // the previous piece's reads of xs are done
                mma_stage<BF16, NT>(xs, mult, x, k, T, p0, count);
                __syncthreads();
            }
#pragma unroll
            for (int c = 0; c < P; ++c) {
                if (c >= count) break;
                float part[NT][4] = {};
#pragma unroll
                for (int m = 0; m < 4; ++m) {
                    uint32_t a[4];
                    if (BF16) {
                        // Row g's columns 4m .. 4m + 3 are words 2m, 2m + 1 of its 32 bytes.
                        a[0] = word(wa[c][m / 2], (2 * m) % 4); a[2] = word(wa[c][m / 2], (2 * m + 1) % 4);
                        a[1] = word(wb[c][m / 2], (2 * m) % 4); a[3] = word(wb[c][m / 2], (2 * m + 1) % 4);
                    } else {
                        const uint32_t qa = word(wa[c][0], m), qb = word(wb[c][0], m);
                        a[0] = e4m3x2_f16(qa & 0xFFFF); a[2] = e4m3x2_f16(qa >> 16);
                        a[1] = e4m3x2_f16(qb & 0xFFFF); a[3] = e4m3x2_f16(qb >> 16);
                    }
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
                        const uint8_t* b = xs + (nt * 8 + g) * F::tokenStride + c * F::chunkBytes + 32 * t4 + 8 * m;
#pragma unroll
                        for (int term = 0; term < F::terms; ++term) {
                            const uint2 bv = *reinterpret_cast<const uint2*>(b + 128 * term);
                            if (BF16) mma_bf16(part[nt], a, bv.x, bv.y);
                            else mma_f16(part[nt], a, bv.x, bv.y);
                        }
                    }
                }
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    if (BF16) {
#pragma unroll
                        for (int i = 0; i < 4; ++i) acc[nt][i] += part[nt][i];
                    } else {
                        const float m0 = mult[(nt * 8 + 2 * t4) * P + c] * scale[c], m1 = mult[(nt * 8 + 2 * t4 + 1) * P + c] * scale[c];
                        acc[nt][0] = fmaf(part[nt][0], m0, acc[nt][0]);
                        acc[nt][1] = fmaf(part[nt][1], m1, acc[nt][1]);
                        acc[nt][2] = fmaf(part[nt][2], m0, acc[nt][2]);
                        acc[nt][3] = fmaf(part[nt][3], m1, acc[nt][3]);
                    }
                }
            }
        }
        // This rank's share of the row block's tile (zeros for a rank with no columns).
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) red[iter * tileFloats + (nt * 4 + i) * kMmaWarps * 32 + threadIdx.x] = acc[nt][i];
    }
    if (!waited) {  // a rank with no columns still writes nothing before the previous kernel is done
        wait_for_previous_kernel();
        allow_next_kernel();
    }
    // The cluster's ranks share the reduction: rank r sums slices r, r + 8, ... (a slice: one
    // accumulator register of every thread for one row block) over the 8 ranks' tiles in rank
    // order, so the sums are the same as one rank's, and stores them. Version 2 left all of it
    // to rank 0, while the other 7 waited: 0.3-2.2 us more a call (H200, Kernels/NOTES.md).
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();
    for (int s = cluster.block_rank(); s < iter * NT * 4; s += kMmaSplits) {
        const int it = s / (NT * 4), q = s % (NT * 4), at = it * tileFloats + q * kMmaWarps * 32 + threadIdx.x;
        float sum = 0.f;
#pragma unroll
        for (int r = 0; r < kMmaSplits; ++r) sum += cluster.map_shared_rank(red, r)[at];
        const int row = (blockIdx.x + it * gridDim.x) * 64 + warp * 16 + g + (q % 4 >= 2 ? 8 : 0), t = (q / 4) * 8 + 2 * t4 + (q & 1);
        if (row < n && t < T) out[(size_t)t * outStride + row] = bias ? sum + bias[row] : sum;
    }
    cluster.sync();  // the other blocks' shared tiles stay until every rank has read them
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
        int n, int k, int outStride) { FULGUR_TRACE_KERNEL;                                        \
        gemv::mxfp4<T>(w, scales, bias, x, out, n, k, outStride);                                  \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) gemv_fp8_t##T(                               \
        const uint8_t* w, const float* tiles, const float* bias, const float* x, float* out,       \
        int n, int k, int outStride, int tile) { FULGUR_TRACE_KERNEL;                              \
        gemv::fp8<T>(w, tiles, bias, x, out, n, k, outStride, tile);                               \
    }
GEMV_ENTRY(1) GEMV_ENTRY(2) GEMV_ENTRY(3) GEMV_ENTRY(4) GEMV_ENTRY(5) GEMV_ENTRY(6) GEMV_ENTRY(7) GEMV_ENTRY(8)
GEMV_ENTRY(9) GEMV_ENTRY(10) GEMV_ENTRY(11) GEMV_ENTRY(12) GEMV_ENTRY(13) GEMV_ENTRY(14) GEMV_ENTRY(15) GEMV_ENTRY(16)

// gemv_<f32|bf16>_t<TB> for the token bins TB = 1, 2, 4, 8, 16 (T <= TB used). Launch with
// 128 threads and ceil(N / (4 * PlainRows<TB>)) blocks (CUDALinear.plan), no dynamic shared memory;
// gemv_<f32|bf16>_t<TB>_r1, one row a warp: ceil(N / 4) blocks; gemv_<f32|bf16>_t<TB>_sk, one
// row a block (gemv::plain_split): N blocks. `early` 1: the L2 prefetch before the wait
// (gemv::plain).
#define PLAIN_ONE(NAME, FN, ...)                                                                   \
    extern "C" __global__ void __launch_bounds__(128) NAME(                                        \
        const void* w, const float* bias, const float* x, float* out, int n, int k, int rowStride, \
        int T, int xStride, int groupRows, int outStride, int early) { FULGUR_TRACE_KERNEL;        \
        gemv::FN<__VA_ARGS__>(w, bias, x, out, n, k, rowStride, T, xStride, groupRows, outStride, early); \
    }
#define PLAIN_ENTRY(TB)                                                                            \
    PLAIN_ONE(gemv_f32_t##TB, plain, TB, false)                                                    \
    PLAIN_ONE(gemv_bf16_t##TB, plain, TB, true)                                                    \
    PLAIN_ONE(gemv_f32_t##TB##_r1, plain, TB, false, 1)                                            \
    PLAIN_ONE(gemv_bf16_t##TB##_r1, plain, TB, true, 1)                                            \
    PLAIN_ONE(gemv_f32_t##TB##_sk, plain_split, TB, false)                                         \
    PLAIN_ONE(gemv_bf16_t##TB##_sk, plain_split, TB, true)
PLAIN_ENTRY(1) PLAIN_ENTRY(2) PLAIN_ENTRY(4) PLAIN_ENTRY(8) PLAIN_ENTRY(16)

// gemv_wide_<mxfp4|fp8>_t<T>: the wide-product layout above. Launch with kWideWarps * 32 = 256
// threads, a grid of resident blocks (at most ceil(N / 8)), and
// T * (K / elements) * (elements + 4) * 4 bytes of dynamic shared memory; arguments as
// gemv_<format>_t<T> (scales: E8M0 bytes or FP8 tile multipliers; tile unused for MXFP4).
#define WIDE_ENTRY(T)                                                                              \
    extern "C" __global__ void __launch_bounds__(256) gemv_wide_mxfp4_t##T(                        \
        const uint8_t* w, const uint8_t* scales, const float* bias, const float* x, float* out,    \
        int n, int k, int outStride) { FULGUR_TRACE_KERNEL;                                        \
        gemv::wide<T, true>(w, scales, bias, x, out, n, k, outStride, 0);                          \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(256) gemv_wide_fp8_t##T(                          \
        const uint8_t* w, const float* tiles, const float* bias, const float* x, float* out,       \
        int n, int k, int outStride, int tile) { FULGUR_TRACE_KERNEL;                              \
        gemv::wide<T, false>(w, tiles, bias, x, out, n, k, outStride, tile);                       \
    }
WIDE_ENTRY(1) WIDE_ENTRY(2) WIDE_ENTRY(3) WIDE_ENTRY(4) WIDE_ENTRY(5) WIDE_ENTRY(6) WIDE_ENTRY(7) WIDE_ENTRY(8)
WIDE_ENTRY(9) WIDE_ENTRY(10) WIDE_ENTRY(11) WIDE_ENTRY(12) WIDE_ENTRY(13) WIDE_ENTRY(14) WIDE_ENTRY(15) WIDE_ENTRY(16)

// gemv_wide_norm_<mxfp4|fp8>_t1: the residual add and RMSNorm before the product, in the
// product (gemv::norm_stage): out = W . (normWeight * rmsnorm(resid + add)) for one token;
// resid becomes resid + add (written by the last block to arrive; arrivals: an int, zero
// between launches) and h the normalized row. K <= 4096. Launch as gemv_wide_*_t1 with 4 * K
// more bytes of dynamic shared memory. An add_rmsnorm launch before the product added 2.6-3.1
// us to the gpt-oss-20b 1-token step (H200 timeline) for 23 KB of data.
extern "C" __global__ void __launch_bounds__(256) gemv_wide_norm_mxfp4_t1(
    const uint8_t* w, const uint8_t* scales, const float* bias, float* h, float* out, int n, int k, int outStride,
    float* resid, const float* add, const float* normWeight, float eps, int* arrivals) {
    FULGUR_TRACE_KERNEL;
    gemv::wide<1, true, true>(w, scales, bias, h, out, n, k, outStride, 0, resid, add, normWeight, eps, h, arrivals);
}
extern "C" __global__ void __launch_bounds__(256) gemv_wide_norm_fp8_t1(
    const uint8_t* w, const float* tiles, const float* bias, float* h, float* out, int n, int k, int outStride, int tile,
    float* resid, const float* add, const float* normWeight, float eps, int* arrivals) {
    FULGUR_TRACE_KERNEL;
    gemv::wide<1, false, true>(w, tiles, bias, h, out, n, k, outStride, tile, resid, add, normWeight, eps, h, arrivals);
}

// gemv_mma_<fp8|bf16>_n<NT>: the tensor-core layout above for T <= 8 * NT tokens. Launch with
// 128 threads, grid (G, 8) with G * kMmaRowBlocks >= ceil(N / 64) (a cluster of 8 along y is
// compiled in), no dynamic shared memory; K % 64 == 0, FP8 tile % 64 == 0. Arguments as gemv_fp8_t<T> plus T (tiles and tile
// unused for BF16).
#define MMA_ENTRY(NT)                                                                              \
    extern "C" __global__ void __cluster_dims__(1, gemv::kMmaSplits, 1) __launch_bounds__(128, 4) gemv_mma_fp8_n##NT( \
        const uint8_t* w, const float* tiles, const float* bias, const float* x, float* out,       \
        int n, int k, int outStride, int tile, int T) { FULGUR_TRACE_KERNEL;                       \
        gemv::mma_product<false, NT>(w, tiles, bias, x, out, n, k, outStride, tile, T);            \
    }                                                                                              \
    extern "C" __global__ void __cluster_dims__(1, gemv::kMmaSplits, 1) __launch_bounds__(128, 4) gemv_mma_bf16_n##NT( \
        const uint8_t* w, const float* tiles, const float* bias, const float* x, float* out,       \
        int n, int k, int outStride, int tile, int T) { FULGUR_TRACE_KERNEL;                       \
        gemv::mma_product<true, NT>(w, tiles, bias, x, out, n, k, outStride, tile, T);             \
    }
MMA_ENTRY(1) MMA_ENTRY(2)

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

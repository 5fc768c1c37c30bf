// Mixture-of-experts feed-forward for 1-16 tokens, MXFP4 experts (split E8M0 scales), in three
// launches, none of which needs the host between them:
//   moe_route:      router logits (BF16 or F32 weight [E, H], optional bias); the last block
//                   to finish routes every token (softmax-top-k, top-k-softmax or sigmoid with
//                   correction bias and groups; ties to the lower expert id, as MoE.route) and
//                   groups the (token, expert) pairs by expert: a list of touched experts in
//                   ascending id, each with its tokens in ascending order.
//   moe_gate_up_t*: one launch over all touched experts: a warp computes the gate and up rows
//                   of its intermediate index for every token of an expert (fused [2I, H]
//                   weight, gate/up interleaved or halves, optional bias), applies the GLU
//                   (SiLU, or gpt-oss's clamped SwiGLU) and writes act[pair, I].
//   moe_down_t*:    one launch: a warp owns output rows, walks the touched experts in
//                   ascending id and adds weight * (down row . act + bias) per token in shared
//                   memory, then writes out[T, H]. Same summation order as the CPU (experts
//                   ascending), no atomics, and out is written, not accumulated.
// Every touched expert's weights are read once per call, however many tokens chose it: the
// block stages the activations of all the expert's tokens (up to 16) and each weight load
// feeds all of them. The grids are fixed by the shape (rows), and each block loops over the
// touched experts, so the host never learns how many there are.
//
// Budget per call at the gpt-oss-20b shape (H = 2880, E = 32, I = 2880, top-4):
//   bytes: per touched expert gate_up 5760 x 2880 MXFP4 8.81 MB + down 2880 x 2880 4.41 MB +
//     biases 35 KB = 13.25 MB; router 184 KB (BF16). T = 1: 4 experts, 53.2 MB; T = 16: up to
//     32 experts (28 expected for random routing), up to 424 MB. Activations are < 1 MB.
//   flops: 2 * (5760 + 2880) * 2880 = 49.8 MFLOP per (token, expert) pair, 199 MFLOP per
//     token (T = 16: 3.2 GFLOP).
// Roofline at the H200's measured 4227 GB/s copy bandwidth: T = 1 12.6 us; T = 16 with 28
//   experts 88 us, with all 32 100 us. The check prints each run's own roofline (bytes of the
//   experts actually touched over that run's copy bandwidth).
// Predicted before measuring: T = 1 near 30-40% of the roofline. Each block walks the
//   touched experts one after another with the gemv version 2 inner loop (one tile of weight
//   loads in flight, then x staged, then FFMA), which measured 22-28% alone; four experts per
//   warp give it longer streams but no more loads in flight.
// Measured (H200, Kernels/NOTES.md): T = 1 78 us, 16% of the roofline; T = 16 1.1 ms, 8%.
//   Worse than the same products as separate gemv launches (about 50 us at T = 1). Each
//   (expert, block) step pays its load latency, staging and barriers with nothing overlapping
//   it, and the grids are 1.4-3 waves deep (ptxas registers), so the steps run in series.

#include <climits>

#include "common.cuh"

namespace moe {

constexpr int kWarps = 4, kMaxTokens = 16, kMaxTopK = 8, kMaxExperts = 256;

// Chunks (32 elements) per lane per tile for NT tokens, as in gemv: the padded shared tile
// is NT * 32 * unroll * 36 floats (18 KiB at NT = 1, 72 KiB at NT = 8 and 16).
// CUDAMoE.sharedBytes mirrors this.
template <int NT> struct Tile {
    static constexpr int unroll = NT <= 2 ? 4 : NT <= 8 ? 2 : 1;
    static constexpr int floats = NT * 32 * unroll * 36;
};

// Layout of the int32 routing buffer, for E experts and top-k (CUDAMoE mirrors it):
//   [0] arrival counter of moe_route's blocks (back to 0 when the last one is done)
//   [1] touched experts S
//   expert[E]: touched expert ids, ascending; start[E + 1]: their first pair
//   token[16k], weight[16k] (f32 bits): pairs grouped by expert, tokens ascending
//   chosen[16k], chosenWeight[16k]: token t's experts in top-k order at t*k (for checks)
struct Routes {
    int* base; int E, k;
    __device__ int* counter() const { return base; }
    __device__ int* touched() const { return base + 1; }
    __device__ int* expert() const { return base + 2; }
    __device__ int* start() const { return expert() + E; }
    __device__ int* token() const { return start() + E + 1; }
    __device__ float* weight() const { return reinterpret_cast<float*>(token() + kMaxTokens * k); }
    __device__ int* chosen() const { return reinterpret_cast<int*>(weight() + kMaxTokens * k); }
    __device__ float* chosenWeight() const { return reinterpret_cast<float*>(chosen() + kMaxTokens * k); }
};

struct RouterArgs {
    const float* correction;
    int mode, normalize; float scaling; int groups, topKGroups;
};
enum { kSoftmaxTopK = 0, kTopKSoftmax = 1, kSigmoidWithBias = 2 };

__device__ __forceinline__ float bf16lo(uint32_t v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16hi(uint32_t v) { return __uint_as_float(v & 0xFFFF0000u); }

// Lane holding the best (value, lower index) among the lanes' candidates; ties to the lower
// expert id like MoE.route's stable sort.
__device__ __forceinline__ void warp_argmax(float& v, int& i) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
    }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// One warp routes token t: lane l holds experts l, l + 32, ... (E <= 256).
__device__ void route_token(const RouterArgs& a, const float* logits, int E, int k, int t, Routes r) {
    constexpr int J = kMaxExperts / 32;
    const int lane = threadIdx.x & 31;
    float logit[J], score[J], choice[J];
#pragma unroll
    for (int j = 0; j < J; ++j) {
        const int e = lane + 32 * j;
        logit[j] = e < E ? __ldcg(logits + t * E + e) : -INFINITY;
    }
    if (a.mode == kSoftmaxTopK) {
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < J; ++j) mx = fmaxf(mx, logit[j]);
        mx = warp_max(mx);
        float sum = 0;
#pragma unroll
        for (int j = 0; j < J; ++j) { score[j] = lane + 32 * j < E ? expf(logit[j] - mx) : 0.f; sum += score[j]; }
        sum = warp_sum(sum);
#pragma unroll
        for (int j = 0; j < J; ++j) { score[j] /= sum; choice[j] = lane + 32 * j < E ? score[j] : -INFINITY; }
    } else if (a.mode == kTopKSoftmax) {
#pragma unroll
        for (int j = 0; j < J; ++j) { score[j] = logit[j]; choice[j] = logit[j]; }
    } else {
#pragma unroll
        for (int j = 0; j < J; ++j) {
            const int e = lane + 32 * j;
            score[j] = 1.f / (1.f + expf(-logit[j]));
            choice[j] = e < E ? score[j] + a.correction[e] : -INFINITY;
        }
        if (a.groups > 1) {
            // Keep the topKGroups groups with the largest sum of their two best choices.
            const int per = E / a.groups;
            uint32_t keep = 0;  // groups <= 32
            float gs = -INFINITY;  // lane g holds group g's score
            for (int g = 0; g < a.groups; ++g) {
                float v1 = -INFINITY, v2 = -INFINITY;
                int i1 = INT_MAX, i2 = INT_MAX;
#pragma unroll
                for (int j = 0; j < J; ++j) {
                    const int e = lane + 32 * j;
                    if (e / per == g && e < E && (choice[j] > v1 || (choice[j] == v1 && e < i1))) { v1 = choice[j]; i1 = e; }
                }
                warp_argmax(v1, i1);
#pragma unroll
                for (int j = 0; j < J; ++j) {
                    const int e = lane + 32 * j;
                    if (e / per == g && e < E && e != i1 && (choice[j] > v2 || (choice[j] == v2 && e < i2))) { v2 = choice[j]; i2 = e; }
                }
                warp_argmax(v2, i2);
                if (lane == g) gs = 0.f + v1 + v2;
            }
            for (int n = 0; n < a.topKGroups; ++n) {
                float v = (keep >> lane) & 1 ? -INFINITY : gs;
                int i = lane < a.groups && !((keep >> lane) & 1) ? lane : INT_MAX;
                warp_argmax(v, i);
                keep |= 1u << i;
            }
#pragma unroll
            for (int j = 0; j < J; ++j)
                if (lane + 32 * j < E && !((keep >> ((lane + 32 * j) / per)) & 1)) choice[j] = -INFINITY;
        }
    }
    uint32_t taken = 0;  // bit j: expert lane + 32j already chosen
    int idx[kMaxTopK];
    float w[kMaxTopK];
    for (int n = 0; n < k; ++n) {
        float v = -INFINITY;
        int i = INT_MAX;
#pragma unroll
        for (int j = 0; j < J; ++j) {
            const int e = lane + 32 * j;
            if (e < E && !((taken >> j) & 1) && (i == INT_MAX || choice[j] > v)) { v = choice[j]; i = e; }
        }
        warp_argmax(v, i);
        if ((i & 31) == lane) taken |= 1u << (i / 32);
        float s = 0;
#pragma unroll
        for (int j = 0; j < J; ++j)
            if (lane + 32 * j == i) s = score[j];
        idx[n] = i;
        w[n] = warp_sum(s);  // only the owner lane contributes
    }
    if (lane != 0) return;
    if (a.mode == kTopKSoftmax) {
        float mx = w[0];
        for (int n = 1; n < k; ++n) mx = fmaxf(mx, w[n]);
        float sum = 0;
        for (int n = 0; n < k; ++n) { w[n] = expf(w[n] - mx); sum += w[n]; }
        for (int n = 0; n < k; ++n) w[n] /= sum;
    } else if (a.normalize) {
        float sum = 0;
        for (int n = 0; n < k; ++n) sum += w[n];
        if (a.mode == kSigmoidWithBias) sum += 1e-20f;
        for (int n = 0; n < k; ++n) w[n] /= sum;
    }
    for (int n = 0; n < k; ++n) {
        r.chosen()[t * k + n] = idx[n];
        r.chosenWeight()[t * k + n] = a.mode == kSigmoidWithBias ? w[n] * a.scaling : w[n];
    }
}

// After route_token for every token: the touched experts in ascending id with prefix sums of
// their pair counts (warp 0), then each pair's place (token order within an expert).
__device__ void group_pairs(int T, int E, int k, Routes r) {
    __shared__ int count[kMaxExperts], slot[kMaxExperts];
    const int pairs = T * k, lane = threadIdx.x & 31;
    for (int e = threadIdx.x; e < E; e += blockDim.x) count[e] = 0;
    __syncthreads();
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) atomicAdd(&count[r.chosen()[p]], 1);
    __syncthreads();
    if (threadIdx.x < 32) {
        int touched = 0, first = 0;
        for (int e0 = 0; e0 < E; e0 += 32) {
            const int e = e0 + lane, c = e < E ? count[e] : 0;
            const uint32_t used = __ballot_sync(0xffffffffu, c > 0);
            int incl = c;  // inclusive prefix sum of counts over the lanes
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int v = __shfl_up_sync(0xffffffffu, incl, o);
                if (lane >= o) incl += v;
            }
            if (c > 0) {
                const int s = touched + __popc(used & ((1u << lane) - 1));
                slot[e] = s;
                r.expert()[s] = e;
                r.start()[s] = first + incl - c;
            }
            touched += __popc(used);
            first += __shfl_sync(0xffffffffu, incl, 31);
        }
        if (lane == 0) { *r.touched() = touched; r.start()[touched] = pairs; }
    }
    __syncthreads();
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        const int e = r.chosen()[p];
        int before = 0;  // earlier tokens that chose e (a token chooses an expert once)
        for (int q = p - p % k - 1; q >= 0; --q) before += r.chosen()[q] == e;
        const int at = r.start()[slot[e]] + before;
        r.token()[at] = p / k;
        r.weight()[at] = r.chosenWeight()[p];
    }
}

// Copies rows[j] of src (row stride `stride` floats), elements e0 .. e0 + elems, j < n, into
// the padded tile (36 floats per 32, as gemv's stage, so lane-strided 16-byte reads are
// conflict-free), 8 loads in flight per thread.
__device__ __forceinline__ void stage(float* tile, const float* __restrict__ src, int stride, const int* rows, int n,
                                      int e0, int elems, int tokenStride) {
    constexpr int B = 8, threads = kWarps * 32;
    const int v4 = elems / 4, total = n * v4;
    for (int i0 = threadIdx.x; i0 < total; i0 += B * threads) {
        float4 v[B];
#pragma unroll
        for (int b = 0; b < B; ++b) {
            const int i = i0 + b * threads;
            if (i < total) v[b] = __ldcg(reinterpret_cast<const float4*>(src + (size_t)rows[i / v4] * stride + e0 + 4 * (i % v4)));
        }
#pragma unroll
        for (int b = 0; b < B; ++b) {
            const int i = i0 + b * threads;
            if (i < total) {
                const int j = i / v4, e = 4 * (i % v4);
                *reinterpret_cast<float4*>(tile + j * tokenStride + e / 32 * 36 + e % 32) = v[b];
            }
        }
    }
}

// acc[r][t] = row r . src[rows[t]] for the warp's R MXFP4 rows (codes w[r], scales s[r], K =
// 32 * chunks) and the block's n <= NT tokens, summed over the warp (every lane holds it).
// The whole block calls it (staging and barriers); `active` warps compute.
template <int NT, int R>
__device__ __forceinline__ void rows_dot(const uint8_t* const (&w)[R], const uint8_t* const (&s)[R], bool active, int chunks,
                                         const float* __restrict__ src, int stride, const int* rows, int n, float* tile,
                                         float (&acc)[R][NT]) {
    constexpr int U = Tile<NT>::unroll, C = R * NT >= 4 ? 1 : 4 / (R * NT), tileChunks = 32 * U, tokenStride = tileChunks * 36;
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[r][t] = 0.f;
    for (int c0 = 0; c0 < chunks; c0 += tileChunks) {
        uint4 codes[U][R];
        uint32_t scale[U][R];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + u * 32 + lane;
#pragma unroll
            for (int r = 0; r < R; ++r)
                if (active && c < chunks) {
                    codes[u][r] = load_streaming(w[r] + (size_t)c * 16);
                    scale[u][r] = s[r][c];
                }
        }
        __syncthreads();  // the previous tile's (or expert's) reads of the tile are done
        stage(tile, src, stride, rows, n, c0 * 32, min(tileChunks, chunks - c0) * 32, tokenStride);
        __syncthreads();
        if (!active) continue;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + u * 32 + lane;
            if (c >= chunks) break;
            const float* xs = tile + (u * 32 + lane) * 36;
            float part[C][R][NT] = {};
            mxfp4_chunk(codes[u], xs, tokenStride, part);
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const float sc = e8m0(scale[u][r]);
#pragma unroll
                for (int t = 0; t < NT; ++t) {
                    float v = part[0][r][t];
#pragma unroll
                    for (int i = 1; i < C; ++i) v += part[i][r][t];
                    acc[r][t] = fmaf(v * 0x1p14f, sc, acc[r][t]);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[r][t] = warp_sum(acc[r][t]);
}

template <int NT> struct Tokens { static constexpr int value = NT; };

// Calls f with the smallest token bin (1, 2, 4, 8, 16) holding n, among bins up to TB: an
// expert chosen by 2 of 16 tokens does the FFMAs of 2, not 16.
template <int TB, class F>
__device__ __forceinline__ void by_tokens(int n, F&& f) {
    if (n <= 1) { f(Tokens<1>{}); return; }
    if constexpr (TB >= 2) if (n <= 2) { f(Tokens<2>{}); return; }
    if constexpr (TB >= 4) if (n <= 4) { f(Tokens<4>{}); return; }
    if constexpr (TB >= 8) if (n <= 8) { f(Tokens<8>{}); return; }
    if constexpr (TB >= 16) f(Tokens<16>{});
}

struct ExpertArgs {
    const uint8_t* codes; const uint8_t* scales; const float* bias;
};

__device__ __forceinline__ float glu(float g, float u, int clamped, float alpha, float limit) {
    if (!clamped) return g / (1.f + expf(-g)) * u;
    g = fminf(g, limit);
    u = fminf(fmaxf(u, -limit), limit);
    return (u + 1.f) * (g / (1.f + expf(-g * alpha)));
}

// TB: the call's token bin; a warp owns PW intermediate indices (their gate and up rows).
// Two indices at 2-4 tokens halve the activation staging per weight byte; at 8-16 tokens
// their 4 * NT accumulators spilled (ptxas: 1 KB at TB = 16).
template <int TB>
__device__ void gate_up(Routes r, const float* __restrict__ x, int H, int I, ExpertArgs w, int interleaved,
                        int clamped, float alpha, float limit, float* __restrict__ act) {
    constexpr int PW = TB == 2 || TB == 4 ? 2 : 1, R = 2 * PW;
    extern __shared__ float4 shared[];
    float* tile = reinterpret_cast<float*>(shared);
    __shared__ int rows[kMaxTokens];
    wait_for_previous_kernel();  // x and the routes come from earlier kernels
    allow_next_kernel();
    const int lane = threadIdx.x & 31, i0 = (blockIdx.x * kWarps + threadIdx.x / 32) * PW;
    const bool active = i0 < I;
    const int touched = *r.touched(), chunks = H / 32;
    for (int sl = 0; sl < touched; ++sl) {
        const int e = r.expert()[sl], p0 = r.start()[sl], n = r.start()[sl + 1] - p0;
        __syncthreads();  // the previous expert's reads of rows are done
        if (threadIdx.x < n) rows[threadIdx.x] = r.token()[p0 + threadIdx.x];
        __syncthreads();
        const uint8_t* wr[R];
        const uint8_t* sr[R];
        int row[R];
#pragma unroll
        for (int q = 0; q < PW; ++q) {
            const int i = min(i0 + q, I - 1);
            row[2 * q] = interleaved ? 2 * i : i;
            row[2 * q + 1] = interleaved ? 2 * i + 1 : I + i;
        }
#pragma unroll
        for (int j = 0; j < R; ++j) {
            const size_t at = (size_t)e * 2 * I + row[j];
            wr[j] = w.codes + at * (H / 2);
            sr[j] = w.scales + at * chunks;
        }
        by_tokens<TB>(n, [&](auto nt) {
            constexpr int NT = decltype(nt)::value;
            float acc[R][NT];
            rows_dot<NT, R>(wr, sr, active, chunks, x, H, rows, n, tile, acc);
            if (!active) return;
#pragma unroll
            for (int q = 0; q < PW; ++q) {
                if (i0 + q >= I) break;
                const float bg = w.bias ? w.bias[(size_t)e * 2 * I + row[2 * q]] : 0.f;
                const float bu = w.bias ? w.bias[(size_t)e * 2 * I + row[2 * q + 1]] : 0.f;
#pragma unroll
                for (int t = 0; t < NT; ++t)
                    if (lane == t && t < n) act[(size_t)(p0 + t) * I + i0 + q] = glu(acc[2 * q][t] + bg, acc[2 * q + 1][t] + bu, clamped, alpha, limit);
            }
        });
    }
}

// TB: the call's token bin; a warp owns R output rows.
template <int TB>
__device__ void down(Routes r, const float* __restrict__ act, int T, int H, int I, ExpertArgs w, float* __restrict__ out) {
    constexpr int R = TB == 1 ? 1 : 2, rowsPerBlock = kWarps * R;
    extern __shared__ float4 shared[];
    float* tile = reinterpret_cast<float*>(shared);
    __shared__ int rows[kMaxTokens], token[kMaxTokens];
    __shared__ float weight[kMaxTokens], sum[kMaxTokens][rowsPerBlock];
    wait_for_previous_kernel();
    allow_next_kernel();
    const int lane = threadIdx.x & 31, warp = threadIdx.x / 32, row0 = (blockIdx.x * kWarps + warp) * R;
    const bool active = row0 < H;
    for (int i = threadIdx.x; i < kMaxTokens * rowsPerBlock; i += blockDim.x) sum[i / rowsPerBlock][i % rowsPerBlock] = 0.f;
    const int touched = *r.touched(), chunks = I / 32;
    for (int sl = 0; sl < touched; ++sl) {
        const int e = r.expert()[sl], p0 = r.start()[sl], n = r.start()[sl + 1] - p0;
        __syncthreads();
        if (threadIdx.x < n) {
            rows[threadIdx.x] = p0 + threadIdx.x;
            token[threadIdx.x] = r.token()[p0 + threadIdx.x];
            weight[threadIdx.x] = r.weight()[p0 + threadIdx.x];
        }
        __syncthreads();
        const uint8_t* wr[R];
        const uint8_t* sr[R];
#pragma unroll
        for (int j = 0; j < R; ++j) {
            const size_t at = (size_t)e * H + min(row0 + j, H - 1);
            wr[j] = w.codes + at * (I / 2);
            sr[j] = w.scales + at * chunks;
        }
        by_tokens<TB>(n, [&](auto nt) {
            constexpr int NT = decltype(nt)::value;
            float acc[R][NT];
            rows_dot<NT, R>(wr, sr, active, chunks, act, I, rows, n, tile, acc);
            if (!active) return;
#pragma unroll
            for (int j = 0; j < R; ++j) {
                if (row0 + j >= H) break;
                const float b = w.bias ? w.bias[(size_t)e * H + row0 + j] : 0.f;
#pragma unroll
                for (int t = 0; t < NT; ++t)
                    if (lane == t && t < n) sum[token[t]][warp * R + j] += weight[t] * (acc[j][t] + b);
            }
        });
    }
    __syncthreads();
    for (int i = threadIdx.x; i < T * rowsPerBlock; i += blockDim.x) {
        const int t = i / rowsPerBlock, row = blockIdx.x * rowsPerBlock + i % rowsPerBlock;
        if (row < H) out[(size_t)t * H + row] = sum[t][i % rowsPerBlock];
    }
}

}  // namespace moe

// Router logits and routing. Launch with 128 threads and ceil(E / 4) blocks (a warp per
// expert row, all tokens); the routing buffer's counter must be 0 (the kernel leaves it so).
// E <= 256, top-k <= 8, groups <= 32 and dividing E, H a multiple of 8, T <= 16.
extern "C" __global__ void __launch_bounds__(128) moe_route(
    const void* w, int bf16, const float* bias, const float* correction, int mode, int normalize, float scaling,
    int groups, int topKGroups, const float* x, int T, int H, int E, int k, float* logits, int* routes) {
    using namespace moe;
    const RouterArgs a{correction, mode, normalize, scaling, groups, topKGroups};
    const Routes r{routes, E, k};
    wait_for_previous_kernel();
    allow_next_kernel();
    const int lane = threadIdx.x & 31, e = blockIdx.x * kWarps + threadIdx.x / 32;
    if (e < E) {
        float acc[kMaxTokens] = {};
        for (int h = 8 * lane; h < H; h += 8 * 32) {
            float wv[8];
            if (bf16) {
                const uint4 q = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(w) + (size_t)e * H + h));
                wv[0] = bf16lo(q.x); wv[1] = bf16hi(q.x); wv[2] = bf16lo(q.y); wv[3] = bf16hi(q.y);
                wv[4] = bf16lo(q.z); wv[5] = bf16hi(q.z); wv[6] = bf16lo(q.w); wv[7] = bf16hi(q.w);
            } else {
                const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(w) + (size_t)e * H + h);
                const float4 u = __ldg(p), v = __ldg(p + 1);
                wv[0] = u.x; wv[1] = u.y; wv[2] = u.z; wv[3] = u.w; wv[4] = v.x; wv[5] = v.y; wv[6] = v.z; wv[7] = v.w;
            }
#pragma unroll
            for (int t = 0; t < kMaxTokens; ++t) {
                if (t >= T) break;
                const float4* p = reinterpret_cast<const float4*>(x + (size_t)t * H + h);
                const float4 u = __ldg(p), v = __ldg(p + 1);
                const float xv[8] = {u.x, u.y, u.z, u.w, v.x, v.y, v.z, v.w};
#pragma unroll
                for (int i = 0; i < 8; ++i) acc[t] = fmaf(wv[i], xv[i], acc[t]);
            }
        }
#pragma unroll
        for (int t = 0; t < kMaxTokens; ++t) {
            if (t >= T) break;
            const float v = warp_sum(acc[t]);
            if (lane == 0) logits[t * E + e] = v + (bias ? bias[e] : 0.f);
        }
    }
    // The last block to arrive routes every token: one launch fewer than a separate kernel.
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(r.counter(), 1) == (int)gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int t = threadIdx.x / 32; t < T; t += kWarps) route_token(a, logits, E, k, t, r);
    __syncthreads();
    group_pairs(T, E, k, r);
    if (threadIdx.x == 0) *r.counter() = 0;
}

// gate_up and down for a token bin TB (the smallest of 1, 2, 4, 8, 16 holding T). Launch with
// 128 threads, moe::Tile<TB>::floats * 4 bytes of dynamic shared memory and ceil(I / (4 * PW))
// blocks for gate_up (PW = 2 at TB = 2 and 4, else 1), ceil(H / (4 * R)) for down (R = 1 at
// TB = 1, else 2); H and I multiples of 32.
#define MOE_ENTRY(TB)                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) moe_gate_up_t##TB(                                           \
        const int* routes, int E, int k, const float* x, int H, int I, const uint8_t* codes, const uint8_t* scales, \
        const float* bias, int interleaved, int clamped, float alpha, float limit, float* act) {                 \
        moe::gate_up<TB>(moe::Routes{const_cast<int*>(routes), E, k}, x, H, I, moe::ExpertArgs{codes, scales, bias},  \
                         interleaved, clamped, alpha, limit, act);                                              \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) moe_down_t##TB(                                              \
        const int* routes, int E, int k, const float* act, int T, int H, int I, const uint8_t* codes,             \
        const uint8_t* scales, const float* bias, float* out) {                                                    \
        moe::down<TB>(moe::Routes{const_cast<int*>(routes), E, k}, act, T, H, I, moe::ExpertArgs{codes, scales, bias}, out); \
    }
MOE_ENTRY(1) MOE_ENTRY(2) MOE_ENTRY(4) MOE_ENTRY(8) MOE_ENTRY(16)

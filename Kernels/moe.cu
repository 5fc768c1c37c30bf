// Mixture-of-experts feed-forward for 1-16 tokens, MXFP4 experts (split E8M0 scales). Two
// versions, kept side by side so one GPU run can time both (CUDAMoE's `version`): version 2,
// the default, is after namespace moe (the router, then one persistent launch on the tensor
// cores; its comment has its budget); version 1 is described here.
//
// Version 1: three launches, none of which needs the host between them:
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
#include <type_traits>

#include "common.cuh"

namespace moe {

constexpr int kWarps = 4, kMaxTokens = 16, kMaxTopK = 8, kMaxExperts = 384;  // 384: MiMo-V2.5-Pro

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

// One warp routes token t: lane l holds experts l, l + 32, ... (E <= 32 * J). J is the number
// of 32-expert groups rounded up (route_token picks it): every loop over j runs all J
// iterations whatever E is, and the routing runs in one block after everything else of the
// router, so with J = 12 for every model gpt-oss-20b's 32 experts paid 12x the instructions.
template <int J>
__device__ void route_token_j(const RouterArgs& a, const float* logits, int E, int k, int t, Routes r) {
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
#pragma unroll
            for (int j = 0; j < J; ++j)
                if (isnan(choice[j])) choice[j] = -INFINITY;
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
    // A NaN choice (NaN activations reaching the router) ranks below every number: without
    // this the lanes' argmax disagreed and a token could be routed to expert INT_MAX (an
    // out-of-bounds read that took the whole GPU context down); now NaN flows to the output.
    // Each candidate becomes an unsigned key that orders as the float does (-0 as +0, so they
    // tie as in a float compare); 0 marks no candidate (past E, or already chosen), below
    // every float's key. A round takes the lane's best (highest key, lowest j: lower expert id),
    // then the warp's highest key and, among the lanes holding it, the lowest expert id: two
    // redux.sync and one shuffle for the weight, where a shuffle argmax and a warp sum took
    // fifteen dependent shuffles (MiMo's 256 experts, top-8: 8596 -> 5188 cycles a token,
    // H200; Kernels/NOTES.md, twelfth session).
    uint32_t key[J];
#pragma unroll
    for (int j = 0; j < J; ++j) {
        const float c = isnan(choice[j]) ? -INFINITY : choice[j] == 0.f ? 0.f : choice[j];
        const uint32_t u = __float_as_uint(c);
        key[j] = lane + 32 * j < E ? ((u & 0x80000000u) ? ~u : (u | 0x80000000u)) : 0u;
    }
    // Loops over the top-k unrolled with guards, so idx and w stay in registers (a run-time
    // index put them in local memory, on the routing's critical path).
    int idx[kMaxTopK];
    float w[kMaxTopK];
#pragma unroll
    for (int n = 0; n < kMaxTopK; ++n) {
        if (n >= k) break;
        uint32_t best = key[0];
        int bj = 0;
        float bs = score[0];
#pragma unroll
        for (int j = 1; j < J; ++j)
            if (key[j] > best) { best = key[j]; bj = j; bs = score[j]; }
        const uint32_t top = __reduce_max_sync(0xffffffffu, best);
        const int i = __reduce_min_sync(0xffffffffu, best == top ? lane + 32 * bj : INT_MAX);
        const int owner = i & 31;
        idx[n] = i;
        w[n] = __shfl_sync(0xffffffffu, bs, owner);
#pragma unroll
        for (int j = 0; j < J; ++j)
            if (lane == owner && j == bj) key[j] = 0u;
    }
    if (lane != 0) return;
    if (a.mode == kTopKSoftmax) {
        float mx = w[0];
#pragma unroll
        for (int n = 1; n < kMaxTopK; ++n)
            if (n < k) mx = fmaxf(mx, w[n]);
        float sum = 0;
#pragma unroll
        for (int n = 0; n < kMaxTopK; ++n)
            if (n < k) { w[n] = expf(w[n] - mx); sum += w[n]; }
#pragma unroll
        for (int n = 0; n < kMaxTopK; ++n)
            if (n < k) w[n] /= sum;
    } else if (a.normalize) {
        float sum = 0;
#pragma unroll
        for (int n = 0; n < kMaxTopK; ++n)
            if (n < k) sum += w[n];
        if (a.mode == kSigmoidWithBias) sum += 1e-20f;
#pragma unroll
        for (int n = 0; n < kMaxTopK; ++n)
            if (n < k) w[n] /= sum;
    }
#pragma unroll
    for (int n = 0; n < kMaxTopK; ++n) {
        if (n >= k) break;
        r.chosen()[t * k + n] = idx[n];
        r.chosenWeight()[t * k + n] = a.mode == kSigmoidWithBias ? w[n] * a.scaling : w[n];
    }
}

__device__ void route_token(const RouterArgs& a, const float* logits, int E, int k, int t, Routes r) {
    static_assert(kMaxExperts <= 12 * 32, "route_token's largest J");
    if (E <= 32) route_token_j<1>(a, logits, E, k, t, r);
    else if (E <= 128) route_token_j<4>(a, logits, E, k, t, r);
    else if (E <= 256) route_token_j<8>(a, logits, E, k, t, r);
    else route_token_j<12>(a, logits, E, k, t, r);
}

// After route_token for every token: the touched experts in ascending id with prefix sums of
// their pair counts, then each pair's place (token order within an expert) and, given
// `tokenPairs`, token t's places in ascending expert order (tokenPairs[t][0..k)). Each warp
// takes 32 experts; a bit mask per expert of the tokens that chose it gives the counts and
// each pair's rank among its expert's tokens. One warp walking the experts 32 at a time, and a
// loop over the earlier pairs for each pair, made this a chain of E / 32 scans and T * k loads
// (MiMo's 256 experts: 3467 cycles at T = 1, H200; Kernels/NOTES.md, twelfth session).
__device__ void group_pairs(int T, int E, int k, Routes r, int (*tokenPairs)[kMaxTopK] = nullptr) {
    static_assert(kMaxTokens <= 32, "a 32-bit token mask per expert");
    __shared__ uint32_t chose[kMaxExperts];  // bit t: token t chose the expert
    __shared__ int slot[kMaxExperts], groupTouched[kMaxExperts / 32], groupPairs[kMaxExperts / 32];
    const int pairs = T * k, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int groups = (E + 31) / 32;
    for (int e = threadIdx.x; e < E; e += blockDim.x) chose[e] = 0u;
    __syncthreads();
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) atomicOr(&chose[r.chosen()[p]], 1u << (p / k));
    __syncthreads();
    // A group's touched experts and pairs, then (once every group's are known) its slots.
    auto scan = [&](int g, uint32_t& used, int& c, int& incl) {
        const int e = 32 * g + lane;
        c = e < E ? __popc(chose[e]) : 0;
        used = __ballot_sync(0xffffffffu, c > 0);
        incl = c;  // inclusive prefix sum of counts over the lanes
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int v = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += v;
        }
    };
    if (groups > 1) {
        for (int g = warp; g < groups; g += warps) {
            uint32_t used; int c, incl;
            scan(g, used, c, incl);
            if (lane == 31) { groupTouched[g] = __popc(used); groupPairs[g] = incl; }
        }
        __syncthreads();
    }
    for (int g = warp; g < groups; g += warps) {
        uint32_t used; int c, incl;
        scan(g, used, c, incl);
        int touched = 0, first = 0;
        for (int h = 0; h < g; ++h) { touched += groupTouched[h]; first += groupPairs[h]; }
        const int e = 32 * g + lane;
        if (c > 0) {
            const int s = touched + __popc(used & ((1u << lane) - 1));
            slot[e] = s;
            r.expert()[s] = e;
            r.start()[s] = first + incl - c;
        }
        if (g == groups - 1 && lane == 0) {
            *r.touched() = touched + __popc(used);
            r.start()[touched + __popc(used)] = pairs;
        }
    }
    __syncthreads();
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        const int e = r.chosen()[p], t = p / k;
        const int at = r.start()[slot[e]] + __popc(chose[e] & ((1u << t) - 1));  // earlier tokens that chose e
        r.token()[at] = t;
        r.weight()[at] = r.chosenWeight()[p];
        if (tokenPairs) {
            int c = 0;  // t's experts below e
            for (int n = 0; n < k; ++n) c += r.chosen()[t * k + n] < e;
            tokenPairs[t][c] = at;
        }
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
// E <= kMaxExperts (384), top-k <= 8, groups <= 32 and dividing E, H a multiple of 8, T <= 16.
extern "C" __global__ void __launch_bounds__(128) moe_route(
    const void* w, int bf16, const float* bias, const float* correction, int mode, int normalize, float scaling,
    int groups, int topKGroups, const float* x, int T, int H, int E, int k, float* logits, int* routes) {
    FULGUR_TRACE_KERNEL;
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
        const float* bias, int interleaved, int clamped, float alpha, float limit, float* act) { FULGUR_TRACE_KERNEL; \
        moe::gate_up<TB>(moe::Routes{const_cast<int*>(routes), E, k}, x, H, I, moe::ExpertArgs{codes, scales, bias},  \
                         interleaved, clamped, alpha, limit, act);                                              \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) moe_down_t##TB(                                              \
        const int* routes, int E, int k, const float* act, int T, int H, int I, const uint8_t* codes,             \
        const uint8_t* scales, const float* bias, float* out) { FULGUR_TRACE_KERNEL;                               \
        moe::down<TB>(moe::Routes{const_cast<int*>(routes), E, k}, act, T, H, I, moe::ExpertArgs{codes, scales, bias}, out); \
    }
MOE_ENTRY(1) MOE_ENTRY(2) MOE_ENTRY(4) MOE_ENTRY(8) MOE_ENTRY(16)

// =============================================================================================
// Version 2: the router in one small launch, then every expert product in one persistent
// launch that streams the touched experts' weights at the memory rate.
//
//   moe2_route:   logits[t, e] (a block per expert row: its 5.8 KB of BF16 loaded before the
//                 previous kernel ends, x read once it has) and, from block 0, the exponent of
//                 max |x[t]| per token; zeroes the counters moe2_experts uses.
//   moe2_experts: grid = SMs x resident blocks (the host asks the driver), one block per SM at
//                 the shapes here, all resident at once. Every block routes every token itself
//                 (MoE.route's rules, v1's route_token and group_pairs, tens of floats from L2:
//                 cheaper than a grid-wide exchange) and cuts the work the same way: slots of up
//                 to 8 tokens of one expert (an expert with more tokens streams its weights once
//                 per slot), units of 16 weight rows by the whole K, slot-major. Block b takes
//                 units [b U / G, (b+1) U / G) of the gate_up list, then the same share of the
//                 down list, so every block streams the same bytes within one unit (24.5 KB at
//                 gpt-oss) per phase. Warp roles:
//     producer (1 thread): 1-D bulk copies (cp.async.bulk, no tensor map) of 17 KB chunks into
//                 a ring of 2-8 slots in shared memory, completing on mbarriers; it runs ahead
//                 through the block's whole list, down units too, limited only by free slots.
//     8 consumer warps: each takes 4 of a chunk's 32 steps (16 rows x 64 columns), dequantizes
//                 E2M1 to f16 in registers and multiplies on the tensor cores (mma.sync
//                 m16n8k16, f32 accumulate), x in f16 hi + lo columns; warp partials meet in
//                 shared memory at the end of each unit, where one of them (in turn) finishes
//                 it: GLU into act[pair] (gate_up) or weight * (y + bias) into partial[pair].
//     signaler:   turns finished units into global counters off the consumers' path (one fence
//                 per batch): gate_up units per slot, which down units of that slot wait for
//                 before staging act (every block is resident, so the wait ends), and down units
//                 per 16-row tile; the block that finishes a tile's last unit sums its pairs'
//                 partial rows in ascending expert order into out. No float atomics: the
//                 summation order is fixed and a token's result does not depend on the others
//                 in the step.
// Why one persistent launch and counters rather than two launches with programmatic
// dependent launch: the down weights stream into the ring while the gate_up units finish, with
// no launch or grid drain between the phases, and the ring and x fit in one block's 227 KB
// (two co-resident kernels would halve both). The cost is the residency requirement: the
// grid is sized from the occupancy query, dependents are allowed to launch only once every
// block runs, and two such kernels must not share the GPU from different streams.
//
// Weights are repacked at upload (CUDAMoE.tiled) so each step is one contiguous 544-byte
// record: 512 bytes of codes in mma fragment order (lane 4g+t loads word t of rows g and g+8
// of the step's two 32-column blocks with one 16-byte load) and 32 bytes of scales. gate_up
// tiles hold 8 gate rows and the matching 8 up rows, so a lane holds both halves of its GLU.
// E2M1 bits placed in an f16 are the value times 2^-14 (e2m1_pairs), exact; x is split per token
// into f16 hi + lo columns after scaling by a power of two that puts max |x| in [2^14, 2^15)
// (no overflow, about 2^-22 relative error, f32-like), so a 16-row tile of n <= 4 tokens is
// one m16n8k16 per 16 columns; the per-32-column E8M0 scale is applied to each block's fresh
// f32 product (4 FFMA a lane). A warp spends about 70 instructions on 1024 weights (44 of them
// the E2M1 decode; SASS of a full chunk: 258 for 4 steps), at any token count up to 4, where
// version 1's FFMA path spends about 120 at one token and 240 at four: at the roofline an SM
// takes 1024 weights every 32 clocks and issues at most 128 warp instructions in them, so
// version 2 needs about 55% of the issue slots and version 1 more than all of them.
//
// Budget (gpt-oss-20b, H = I = 2880, top-4): bytes as version 1 (53.2 MB at T = 1, 371 MB for
// 28 experts at T = 16) plus x, act and partial rows through L2 (under 2 MB). Roofline at 4.2
// TB/s: 12.7 us (T = 1), 88.5 us (T = 16). Predicted (H200, overlapped launches): T = 1
// 17-20 us (65-75%: route kernel ~1.5 us, routing in every block ~1.5-2 us, first bytes ~1 us
// and the final combine ~1 us around 13.3 us of streaming), T = 4 near 50 us (85-90%), T = 8
// and 16 within 15% of the roofline. Kernels/NOTES.md has the measurement.
namespace moe2 {

using moe::kMaxExperts;
using moe::kMaxTokens;
using moe::kMaxTopK;

constexpr int kConsumers = 8, kProducer = kConsumers, kSignaler = kConsumers + 1, kThreads = (kConsumers + 2) * 32;
// A step: 16 rows x 64 columns, 512 bytes of codes then 32 of scales. A chunk (one bulk copy,
// one ring slot): up to 32 steps of one unit, 4 per consumer warp, which amortizes the slot's
// wait and release (about 40 instructions) over 4 steps of about 75.
constexpr int kStepBytes = 544, kChunkSteps = 32, kSlotBytes = kChunkSteps * kStepBytes;
constexpr int kMaxRing = 16, kSlotTokens = 8, kMaxSlots = kMaxTokens * kMaxTopK;
// Warp partials of one unit: [warp][n8 block][value][lane] floats; two buffers.
constexpr int kRedFloats = kConsumers * 2 * 4 * 32;
constexpr int kRouteInts = 2 + 2 * kMaxExperts + 1 + 4 * kMaxTokens * kMaxTopK;
// The int counters moe2_route zeroes (CUDAMoE mirrors the offsets): gate_up units finished
// per slot, max |act| bits per pair, down units finished per 16-row tile.
constexpr int kSyncSlots = 0, kSyncActMax = kMaxSlots, kSyncTiles = 2 * kMaxSlots;

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
// Every wait here ends within microseconds when the kernel is right; one that lasts about two
// seconds means a bug (a phase or count off by one, a block not resident), and trapping turns
// it into a launch failure the check reports, instead of a hang that eats the device call.
constexpr long long kHangClocks = 4000000000LL;
__device__ __forceinline__ void check_hang(long long since) {
    if (clock64() - since > kHangClocks) __trap();
}

__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
    uint32_t done;
    asm volatile("{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"
                 : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    return done;
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    if (mbar_try_wait(bar, parity)) return;
    const long long since = clock64();
    while (!mbar_try_wait(bar, parity)) check_hang(since);
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("{\n\t.reg .b64 s;\n\tmbarrier.arrive.shared::cta.b64 s, [%0];\n\t}" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_expect(uint32_t bar, uint32_t bytes) {
    asm volatile("{\n\t.reg .b64 s;\n\tmbarrier.arrive.expect_tx.shared::cta.b64 s, [%0], %1;\n\t}" ::"r"(bar), "r"(bytes) : "memory");
}
// Weights are read once per call: evict them first, keeping x, act and partials in L2.
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar, uint64_t policy) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;"
                 ::"r"(dst), "l"(src), "r"(bytes), "r"(bar), "l"(policy) : "memory");
}
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"n"(kConsumers * 32) : "memory"); }
// Named barriers of the split unit end (version 3): 2 + b, "partials of red buffer b are
// stored" (7 warps arrive, the unit's epilogue warp waits); 4 + b, "red buffer b is free
// again" (the epilogue warp arrives once it has read it, the other 7 wait before storing).
// Immediate ids (a register id makes ptxas reserve all 16 barriers).
template <int ID>
__device__ __forceinline__ void consumers_bar_sync() { asm volatile("bar.sync %0, %1;" ::"n"(ID), "n"(kConsumers * 32) : "memory"); }
template <int ID>
__device__ __forceinline__ void consumers_bar_arrive() { asm volatile("bar.arrive %0, %1;" ::"n"(ID), "n"(kConsumers * 32) : "memory"); }
__device__ __forceinline__ int load_acquire(const int* p) {
    int v;
    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ int load_acquire_block(const int* p) {
    int v;
    asm volatile("ld.acquire.cta.shared::cta.s32 %0, [%1];" : "=r"(v) : "r"(smem_addr(p)) : "memory");
    return v;
}
__device__ __forceinline__ void store_release_block(int* p, int v) {
    asm volatile("st.release.cta.shared::cta.s32 [%0], %1;" ::"r"(smem_addr(p)), "r"(v) : "memory");
}

// Scale byte B of w as f32: code 0 is 2^-127 as in e8m0(); code 255 (NaN) comes out as
// infinity, so such a row's outputs are infinite or NaN. Three instructions against e8m0's five.
template <int B>
__device__ __forceinline__ float scale_byte(uint32_t w) {
    constexpr int shift = 23 - 8 * B;
    const uint32_t bits = (shift >= 0 ? w << shift : w >> -shift) & 0x7F800000u;
    return __uint_as_float(max(bits, 0x00400000u));
}

// The four f16x2 pairs of a repacked code word: pair I is (column 8t+I, column 8t+I+4) times
// 2^-14, as e2m1x2<I> makes from a checkpoint's word, but with the nibbles' bits placed by
// CUDAMoE.tiled so that pair 0 needs one instruction and pair 1 two: 11 for the word against
// e2m1x2's 15. Per 16-bit half: pair 0 magnitude bits 9-11 and sign 15, pair 1 bits 6-8 and
// 12, pair 2 bits 3-5 and 13, pair 3 bits 0-2 and 14 (high half: the column + 4).
__device__ __forceinline__ void e2m1_pairs(uint32_t w, uint32_t (&h)[4]) {
    h[0] = w & 0x8E008E00u;
    h[1] = (w << 3) & 0x8E008E00u;
    h[2] = ((w << 6) & 0x0E000E00u) | ((w << 2) & 0x80008000u);
    h[3] = ((w << 9) & 0x0E000E00u) | ((w << 1) & 0x80008000u);
}

// One 32-column block of a step: rows g and g+8 (code words wg, wg8; scale bytes SB, SB+1 of
// sw) against NB groups of 4 tokens (xb: the lane's 16 bytes of B, columns 8t + (0,4 | 1,5 |
// 2,6 | 3,7) of token column g/2, hi or lo part by g's low bit). The pairs e2m1_pairs makes,
// (8t+I, 8t+I+4), are the k-order both fragments use, so no shuffles are needed.
template <int SB, int NB>
__device__ __forceinline__ void block32(uint32_t wg, uint32_t wg8, uint32_t sw, const uint4 (&xb)[NB], float (&acc)[NB][4]) {
    uint32_t hg[4], hg8[4];
    e2m1_pairs(wg, hg);
    e2m1_pairs(wg8, hg8);
    const uint32_t a0[4] = {hg[0], hg8[0], hg[1], hg8[1]};
    const uint32_t a1[4] = {hg[2], hg8[2], hg[3], hg8[3]};
    const float sg = scale_byte<SB>(sw), sg8 = scale_byte<SB + 1>(sw);
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
        float d[4] = {0.f, 0.f, 0.f, 0.f};
        mma_f16(d, a0, xb[nb].x, xb[nb].y);
        mma_f16(d, a1, xb[nb].z, xb[nb].w);
        acc[nb][0] = fmaf(d[0], sg, acc[nb][0]);
        acc[nb][1] = fmaf(d[1], sg, acc[nb][1]);
        acc[nb][2] = fmaf(d[2], sg8, acc[nb][2]);
        acc[nb][3] = fmaf(d[3], sg8, acc[nb][3]);
    }
}

// One step (16 rows x 64 columns) from the ring slot; b[nb]: the lane's B bytes at this step.
template <int NB>
__device__ __forceinline__ void step(const uint8_t* w, const uint8_t* const (&b)[2], int lane, float (&acc)[NB][4]) {
    const uint4 q = *reinterpret_cast<const uint4*>(w + lane * 16);
    const uint32_t sw = *reinterpret_cast<const uint32_t*>(w + 512 + (lane >> 2) * 4);
    uint4 x0[NB], x1[NB];
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
        x0[nb] = *reinterpret_cast<const uint4*>(b[nb]);
        x1[nb] = *reinterpret_cast<const uint4*>(b[nb] + 128);
    }
    block32<0, NB>(q.x, q.y, sw, x0, acc);
    block32<2, NB>(q.z, q.w, sw, x1, acc);
}

// One unit's chunks from the ring: warp w takes steps w, w + 8, ... of each chunk of up to
// chunkSteps (<= kChunkSteps) steps. acc: the warp's partial sums (the caller stores them).
template <int NB>
__device__ __forceinline__ void consume(const uint8_t* ring, int ringSlots, int chunkSteps, uint32_t fullBar, uint32_t emptyBar,
                                        int& pos, uint32_t& round, int steps, const uint8_t* const (&bLane)[2],
                                        float (&acc)[NB][4]) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, slotBytes = chunkSteps * kStepBytes;
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[nb][v] = 0.f;
    for (int c0 = 0; c0 < steps; c0 += chunkSteps) {
        const int n = min(chunkSteps, steps - c0);
        mbar_wait(fullBar + pos * 8, round & 1);
        const uint8_t* chunk = ring + pos * slotBytes;
        // B holds 2 blocks of 128 bytes per step (hi 64 + lo 64 each). A full chunk has no
        // guards, so the compiler may issue the later steps' shared loads early.
        if (n == kChunkSteps) {
#pragma unroll
            for (int h = 0; h < kChunkSteps / kConsumers; ++h) {
                const int s = warp + h * kConsumers;
                const uint8_t* const b[2] = {bLane[0] + (c0 + s) * 256, bLane[1] + (c0 + s) * 256};
                step<NB>(chunk + s * kStepBytes, b, lane, acc);
            }
        } else {
#pragma unroll
            for (int h = 0; h < kChunkSteps / kConsumers; ++h) {
                const int s = warp + h * kConsumers;
                if (s < n) {
                    const uint8_t* const b[2] = {bLane[0] + (c0 + s) * 256, bLane[1] + (c0 + s) * 256};
                    step<NB>(chunk + s * kStepBytes, b, lane, acc);
                }
            }
        }
        __syncwarp();  // every lane's reads of the slot are done (their values were used)
        if (lane == 0) mbar_arrive(emptyBar + pos * 8);
        if (++pos == ringSlots) { pos = 0; ++round; }
    }
}

// The warp's partials of a unit into red (layout of kRedFloats).
template <int NB>
__device__ __forceinline__ void store_partials(float* red, const float (&acc)[NB][4]) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int v = 0; v < 4; ++v) red[((warp * 2 + nb) * 4 + v) * 32 + lane] = acc[nb][v];
}

// The 8 warps' partials of a unit, summed in warp order. Lane (g, t) gets, per group of 4
// tokens, token t's hi and lo column sums for row g (v[.][0], v[.][1]) and row g + 8.
template <int NB>
__device__ __forceinline__ void reduce(const float* red, float (&v)[NB][4]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            float s = 0.f;
#pragma unroll
            for (int w = 0; w < kConsumers; ++w) s += red[((w * 2 + nb) * 4 + q) * 32 + lane];
            v[nb][q] = s;
        }
}

// gate_up unit epilogue (one warp), from the unit's sums v (lane (g, t): per group of 4 tokens,
// token t's hi and lo column sums for gate row g, v[.][0] and v[.][1], and up row g, v[.][2] and
// v[.][3]): intermediate index i = 8 * tile + g; act and the pair's max |act| (for down's x
// scaling).
template <int NB>
__device__ __forceinline__ void gate_up_out(const float (&v)[NB][4], int n, int p0, int I, int i, float bg, float bu,
                                            const float* unscale, int clamped, float alpha, float limit,
                                            float* __restrict__ act, int* actMax) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
        const int j = 4 * nb + (lane & 3);
        float m = 0.f;
        if (j < n) {
            const float u = unscale[j];
            const float y = moe::glu((v[nb][0] + v[nb][1]) * u + bg, (v[nb][2] + v[nb][3]) * u + bu, clamped, alpha, limit);
            act[(size_t)(p0 + j) * I + i] = y;
            m = fabsf(y);
        }
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 4));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 8));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 16));
        if (j < n && lane < 4) atomicMax(actMax + p0 + j, __float_as_int(m));  // non-negative floats order as ints
    }
}

template <int NB>
__device__ __forceinline__ void finish_gate_up(const float* red, int n, int p0, int I, int i, float bg, float bu,
                                               const float* unscale, int clamped, float alpha, float limit,
                                               float* __restrict__ act, int* actMax) {
    float v[NB][4];
    reduce<NB>(red, v);
    gate_up_out<NB>(v, n, p0, I, i, bg, bu, unscale, clamped, alpha, limit, act, actMax);
}

// down unit epilogue (one warp), from the unit's sums v (as gate_up_out; rows g and g + 8):
// rows 16 * tile + g and + 8, weighted by the pair's routing weight, into the pair's partial
// row.
template <int NB>
__device__ __forceinline__ void down_out(const float (&v)[NB][4], int n, int p0, int H, int row, float b0, float b1,
                                         const float* unscale, const float* weight, float* __restrict__ partial) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
        const int j = 4 * nb + (lane & 3);
        if (j < n) {
            const float u = unscale[j], w = weight[p0 + j];
            float* p = partial + (size_t)(p0 + j) * H + row;
            p[0] = w * ((v[nb][0] + v[nb][1]) * u + b0);
            p[8] = w * ((v[nb][2] + v[nb][3]) * u + b1);
        }
    }
}

template <int NB>
__device__ __forceinline__ void finish_down(const float* red, int n, int p0, int H, int row, float b0, float b1,
                                            const float* unscale, const float* weight, float* __restrict__ partial) {
    float v[NB][4];
    reduce<NB>(red, v);
    down_out<NB>(v, n, p0, H, row, b0, b1, unscale, weight, partial);
}

// Chunk c (columns 8c .. 8c + 7, already scaled) of one row of B at `row`: f16 hi + lo, columns
// (0, 4, 1, 5, 2, 6, 3, 7) in 16-byte chunk c % 4 of its 32-column block, hi then lo 64 bytes on.
__device__ __forceinline__ void store_b(uint8_t* row, int c, const float (&q)[8]) {
    uint32_t hi[4], lo[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        hi[e] = f16x2(q[e], q[e + 4]);
        lo[e] = f16x2(q[e] - f16lo(hi[e]), q[e + 4] - f16hi(hi[e]));
    }
    uint8_t* d = row + (c >> 2) * 128 + (c & 3) * 16;
    *reinterpret_cast<uint4*>(d) = make_uint4(hi[0], hi[1], hi[2], hi[3]);
    *reinterpret_cast<uint4*>(d + 64) = make_uint4(lo[0], lo[1], lo[2], lo[3]);
}

// Rows (tokens or pairs) rows[j] < n of src [*, K] into the B layout, scaled by 2^(141 - exps[j])
// and split into f16 hi + lo: per token stride steps * 256 bytes, per 32-column block 64 bytes
// of hi then 64 of lo, each four 16-byte chunks t holding columns 8t + (0, 4, 1, 5, 2, 6, 3, 7).
// Columns past K (an odd number of blocks) are zeros. The consumer warps call it.
__device__ __forceinline__ void stage(uint8_t* b, const float* __restrict__ src, const int* rows, const int* exps, int K,
                                      int steps, int n) {
    constexpr int threads = kConsumers * 32, U = 4;
    const int per = steps * 8, total = n * per, stride = steps * 256;
    for (int i0 = threadIdx.x; i0 < total; i0 += U * threads) {
        float4 v[U][2];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int i = i0 + u * threads, j = i / per, c = i - j * per;
            v[u][0] = v[u][1] = make_float4(0.f, 0.f, 0.f, 0.f);
            if (i < total && 8 * c < K) {
                const float4* p = reinterpret_cast<const float4*>(src + (size_t)rows[j] * K + 8 * c);
                v[u][0] = __ldcg(p);
                v[u][1] = __ldcg(p + 1);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int i = i0 + u * threads, j = i / per, c = i - j * per;
            if (i < total) {
                const float sc = __uint_as_float(static_cast<uint32_t>(268 - exps[j]) << 23);
                const float q[8] = {v[u][0].x * sc, v[u][0].y * sc, v[u][0].z * sc, v[u][0].w * sc,
                                    v[u][1].x * sc, v[u][1].y * sc, v[u][1].z * sc, v[u][1].w * sc};
                store_b(b + j * stride, c, q);
            }
        }
    }
}

// The sum over a token's experts (ascending id, as MoE.run adds them) of 16 rows of partial,
// for every token: out is written, never accumulated. With `splits` > 1 (version 4) each pair's
// row is split over the reduction dimension into partial [split][P][H], added split by split
// (splits is 1 or 2: CUDAMoE.v4MaxSplits). One warp. A lane's loads of a group of outputs are all issued before the first add (same
// order of additions): with the loop over splits at run time they went out one to four at a
// time, up to 32 dependent L2 round trips for 8 tokens, about 20 us a combine on an H200, and the
// last tiles' combines were the down kernel's tail.
template <int SP, int MG>
__device__ __forceinline__ void combine_sp(int tile, int T, int H, int k, const int (*tokenPairs)[kMaxTopK],
                                           const float* partial, float* __restrict__ out, int P) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int m0 = 0; m0 < kMaxTokens * 16 / 32; m0 += MG) {
        if (32 * m0 >= 16 * T) break;  // uniform: no token in this group
        float v[MG][kMaxTopK][SP];
#pragma unroll
        for (int m = 0; m < MG; ++m) {
            const int idx = lane + 32 * (m0 + m), t = idx >> 4, row = tile * 16 + (idx & 15);
#pragma unroll
            for (int q = 0; q < kMaxTopK; ++q)
#pragma unroll
                for (int sp = 0; sp < SP; ++sp)
                    v[m][q][sp] = t < T && q < k ? __ldcg(partial + ((size_t)sp * P + tokenPairs[t][q]) * H + row) : 0.f;
        }
#pragma unroll
        for (int m = 0; m < MG; ++m) {
            const int idx = lane + 32 * (m0 + m), t = idx >> 4, row = tile * 16 + (idx & 15);
            float s = 0.f;
#pragma unroll
            for (int q = 0; q < kMaxTopK; ++q)
                if (q < k)
#pragma unroll
                    for (int sp = 0; sp < SP; ++sp) s += v[m][q][sp];
            if (t < T) out[(size_t)t * H + row] = s;
        }
    }
}

__device__ __forceinline__ void combine(int tile, int T, int H, int k, const int (*tokenPairs)[kMaxTopK],
                                        const float* partial, float* __restrict__ out, int P = 0, int splits = 1) {
    if (splits == 1) combine_sp<1, 4>(tile, T, H, k, tokenPairs, partial, out, P);
    else combine_sp<2, 2>(tile, T, H, k, tokenPairs, partial, out, P);
}

// A block's units: gate_up units [g0, g0 + gCount) of the slot-major list, then down units
// from d0, `count` in all.
struct Units {
    int g0, gCount, d0, count, tilesG, tilesD;
    __device__ void at(int i, int& phase, int& slot, int& tile) const {
        phase = i < gCount ? 0 : 1;
        const int u = phase == 0 ? g0 + i : d0 + (i - gCount), tiles = phase == 0 ? tilesG : tilesD;
        slot = u / tiles;
        tile = u - slot * tiles;
    }
};

}  // namespace moe2

// Router logits for version 2. Launch with 256 threads and E blocks; H a multiple of 8 and at
// most 8192. Block 0 also writes xexp[t] (the biased exponent of max |x[t]|) and zeroes the
// syncCount ints of sync that moe2_experts counts in.
// The register caps of both kernels (96 x 256 + 128 x 320 = the 64K register file) let the
// next call's router wait beside a running moe2_experts block and start the moment it ends.
namespace moe2 {
// With `norm.resid` (moe6_route at one token, in place of an add_rmsnorm launch before it): x is
// made here, x = weight * rmsnorm(resid + add) as gemv::norm_stage does (the norm weight
// copied into normWeight, shared memory, before the wait; resid and add loaded after it, each
// thread its own chunks in registers). Block 0 writes x to the `x` buffer, which the product
// launches after the router read; normWeight ends holding resid + add, which the router's last
// block writes back into resid (moe6_route).
// With `keep` (one token), the thread's x values (its chunks tid + 256 i, 8 columns each) and,
// in *keepPeak, the block's max |x| are left for the caller (moe6_route: block 0 stages them).
struct RouterNorm {
    const float* resid; const float* add; const float* weight; float eps;
};

// moe6_route's block 0 at one token, after its arrival (off the routing block's path): x's B rows
// for gate_up, as moe2::stage makes them from x (store_b on the same values: the same bytes;
// columns past H to a whole step are zeros) into `staged` (steps * 256 bytes), and into
// info 1, then the exponent gate_up takes; gate_up copies them instead of staging (moe4::products).
template <int C>
__device__ __forceinline__ void stage_x(const float (&h)[C][8], float peak, int H, uint8_t* staged, int* info) {
    constexpr int threads = 256;
    const int tid = threadIdx.x, chunks = H / 8, padded = (H + 63) / 64 * 8;
    const int ex = min(max(static_cast<int>(__float_as_uint(peak) >> 23), 15), 255);  // as gate_up clamps xexp
    const float sc = __uint_as_float(static_cast<uint32_t>(268 - ex) << 23);
#pragma unroll
    for (int i = 0; i < C; ++i) {
        const int c = tid + i * threads;
        if (c >= padded) break;
        float q[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) q[u] = c < chunks ? h[i][u] * sc : 0.f;
        store_b(staged, c, q);
    }
    if (tid == 0) {
        info[0] = 1;
        info[1] = ex;
    }
}

// C: chunks of 8 columns per thread (H <= 2048 C); EPB: experts per block, block b taking
// experts [b EPB, b EPB + EPB) (moe6_route: 1 or 2, see there).
template <int C, int EPB>
__device__ __forceinline__ void router_logits(const void* w, int bf16, const float* bias, const float* x, int T, int H, int E,
                                              float* logits, int* xexp, int* sync, int syncCount, RouterNorm norm = RouterNorm{},
                                              float* normWeight = nullptr, float (*keep)[8] = nullptr, float* keepPeak = nullptr) {
    constexpr int threads = 256, warps = threads / 32;
    __shared__ float part[warps][4 * EPB], peak[warps][4];
    const int e0 = blockIdx.x * EPB, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, chunks = H / 8;
    // The rows' weights do not depend on the previous kernel: load them before waiting for it.
    float wv[EPB][C][8];
#pragma unroll
    for (int j = 0; j < EPB; ++j)
#pragma unroll
        for (int i = 0; i < C; ++i) {
            const int c = tid + i * threads, e = e0 + j;
            if (c >= chunks || e >= E) {
#pragma unroll
                for (int q = 0; q < 8; ++q) wv[j][i][q] = 0.f;
            } else if (bf16) {
                const uint4 u = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(w) + (size_t)e * H + 8 * c));
                wv[j][i][0] = moe::bf16lo(u.x); wv[j][i][1] = moe::bf16hi(u.x); wv[j][i][2] = moe::bf16lo(u.y); wv[j][i][3] = moe::bf16hi(u.y);
                wv[j][i][4] = moe::bf16lo(u.z); wv[j][i][5] = moe::bf16hi(u.z); wv[j][i][6] = moe::bf16lo(u.w); wv[j][i][7] = moe::bf16hi(u.w);
            } else {
                const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(w) + (size_t)e * H + 8 * c);
                const float4 a = __ldg(p), b = __ldg(p + 1);
                wv[j][i][0] = a.x; wv[j][i][1] = a.y; wv[j][i][2] = a.z; wv[j][i][3] = a.w;
                wv[j][i][4] = b.x; wv[j][i][5] = b.y; wv[j][i][6] = b.z; wv[j][i][7] = b.w;
            }
        }
    if (norm.resid)  // the norm weight does not depend on the previous kernel either (16-byte cp.async, no registers)
        for (int i = tid; i < H / 4; i += threads) copy16(normWeight + 4 * i, norm.weight + 4 * i);
    wait_for_previous_kernel();
    allow_next_kernel();
    if (blockIdx.x == 0)
        for (int i = tid; i < syncCount; i += threads) sync[i] = 0;
    // The block's sums for token t0 + u (u < 4) and expert e0 + j: part[.][u * EPB + j], then
    // logits (and block 0's xexp).
    const auto finish = [&](auto tokens, int t0, float (&acc)[4][EPB], const float (&mx)[4]) {
        constexpr int U = decltype(tokens)::value;  // tokens t0 .. t0 + U - 1 (at most 4)
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const float m = moe::warp_max(mx[u]);
            if (lane == 0) peak[warp][u] = m;
#pragma unroll
            for (int j = 0; j < EPB; ++j) {
                const float s = warp_sum(acc[u][j]);
                if (lane == 0) part[warp][u * EPB + j] = s;
            }
        }
        __syncthreads();
        if (tid < U * EPB) {
            const int u = tid / EPB, j = tid - u * EPB, t = t0 + u, e = e0 + j;
            if (t < T && e < E) {
                float sum = 0.f;
#pragma unroll
                for (int q = 0; q < warps; ++q) sum += part[q][tid];
                logits[t * E + e] = sum + (bias ? bias[e] : 0.f);
            }
            if (blockIdx.x == 0 && j == 0 && t < T) {
                float m = 0.f;
#pragma unroll
                for (int q = 0; q < warps; ++q) m = fmaxf(m, peak[q][u]);
                xexp[t] = static_cast<int>(__float_as_uint(m) >> 23);
                if (keep && T == 1) *keepPeak = m;
            }
        }
        __syncthreads();
    };
    if (norm.resid) {  // T = 1
        float v[C][8];
        float ss = 0.f;
#pragma unroll
        for (int i = 0; i < C; ++i) {
            const int c = tid + i * threads;
            if (c >= chunks) break;
            const float4* r = reinterpret_cast<const float4*>(norm.resid + 8 * c);
            float4 a = __ldcg(r), b = __ldcg(r + 1);
            if (norm.add) {
                const float4* d = reinterpret_cast<const float4*>(norm.add + 8 * c);
                const float4 da = __ldcg(d), db = __ldcg(d + 1);
                a.x += da.x; a.y += da.y; a.z += da.z; a.w += da.w; b.x += db.x; b.y += db.y; b.z += db.z; b.w += db.w;
            }
            v[i][0] = a.x; v[i][1] = a.y; v[i][2] = a.z; v[i][3] = a.w; v[i][4] = b.x; v[i][5] = b.y; v[i][6] = b.z; v[i][7] = b.w;
#pragma unroll
            for (int q = 0; q < 8; ++q) ss += v[i][q] * v[i][q];
        }
        copies_done();
        __shared__ float scratch[32];
        const float inv = rsqrtf(block_sum_all(ss, scratch) / H + norm.eps);  // its barriers also publish normWeight
        float acc[4][EPB] = {}, mx[4] = {};
        float h[C][8];  // x (also left in keep)
#pragma unroll
        for (int i = 0; i < C; ++i) {
            const int c = tid + i * threads;
            if (c >= chunks) break;
            float* hv = h[i];
#pragma unroll
            for (int q = 0; q < 8; ++q) {
                hv[q] = normWeight[8 * c + q] * (v[i][q] * inv);
                normWeight[8 * c + q] = v[i][q];  // this thread's own elements: x from here on
#pragma unroll
                for (int j = 0; j < EPB; ++j) acc[0][j] = fmaf(wv[j][i][q], hv[q], acc[0][j]);
                mx[0] = fmaxf(mx[0], fabsf(hv[q]));
            }
            if (blockIdx.x == 0) {
                float4* xo = reinterpret_cast<float4*>(const_cast<float*>(x) + 8 * c);
                xo[0] = make_float4(hv[0], hv[1], hv[2], hv[3]);
                xo[1] = make_float4(hv[4], hv[5], hv[6], hv[7]);
            }
        }
        finish(std::integral_constant<int, 1>{}, 0, acc, mx);
        if (keep)
#pragma unroll
            for (int i = 0; i < C; ++i)
#pragma unroll
                for (int q = 0; q < 8; ++q) keep[i][q] = h[i][q];
        return;
    }
    // Four tokens at a time: their x loads in flight together.
    for (int t0 = 0; t0 < T; t0 += 4) {
        float acc[4][EPB] = {}, mx[4] = {};
#pragma unroll
        for (int i = 0; i < C; ++i) {
            const int c = tid + i * threads;
            if (c >= chunks) break;
            float4 xa[4], xb[4];
#pragma unroll
            for (int u = 0; u < 4; ++u)
                if (t0 + u < T) {
                    const float4* p = reinterpret_cast<const float4*>(x + (size_t)(t0 + u) * H + 8 * c);
                    xa[u] = __ldcg(p);
                    xb[u] = __ldcg(p + 1);
                }
#pragma unroll
            for (int u = 0; u < 4; ++u)
                if (t0 + u < T) {
                    const float xv[8] = {xa[u].x, xa[u].y, xa[u].z, xa[u].w, xb[u].x, xb[u].y, xb[u].z, xb[u].w};
#pragma unroll
                    for (int q = 0; q < 8; ++q) {
#pragma unroll
                        for (int j = 0; j < EPB; ++j) acc[u][j] = fmaf(wv[j][i][q], xv[q], acc[u][j]);
                        mx[u] = fmaxf(mx[u], fabsf(xv[q]));
                    }
                }
        }
        finish(std::integral_constant<int, 4>{}, t0, acc, mx);
    }
}
}  // namespace moe2

extern "C" __global__ void __maxnreg__(96) moe2_route(const void* w, int bf16, const float* bias, const float* x,
                                                             int T, int H, int E, float* logits, int* xexp, int* sync,
                                                             int syncCount) {
    FULGUR_TRACE_KERNEL;
    moe2::router_logits<4, 1>(w, bf16, bias, x, T, H, E, logits, xexp, sync, syncCount);
}

// Every expert product for version 2 (see the comment above namespace moe2). Launch with
// moe2::kThreads threads, as many blocks as can be resident at once, and ringSlots *
// kSlotBytes + bBytes + 2 * kRedFloats * 4 bytes of dynamic shared memory, bBytes >=
// tokensPerSlot (<= 8) * 256 * ceil(max(H, I) / 64). gateUp and down: the repacked tiles of
// CUDAMoE.tiled; gateUpBias [E, 2, I] (gate, then up), downBias [E, H], either may be null.
// act [16k, I], partial [16k, H]; sync zeroed by moe2_route; routes gets v1's layout (checks).
// Same limits as version 1; 1 <= ringSlots <= 16; chunkSteps (steps per bulk copy and ring
// slot, whose size is chunkSteps * kStepBytes) 8 to 32. Split (version 3): a unit's end is
// named barriers that only its epilogue warp waits at (see consumers_bar_sync), instead of a
// barrier of all 8 consumer warps. trace (null: off): per block 8 int64, [0] %globaltimer
// at entry, [1..7] clock64 since entry at: routing done, first unit consumed (warp 0), last
// gate_up unit consumed (warp 0), first down unit's wait for its slot over (thread 0), all
// units consumed (warp 0), signaler done, producer done.
namespace moe2 {
__device__ __forceinline__ long long globaltimer() {
    long long t;
    asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
    return t;
}

// A block's view of the step's routing (shared memory): v1's routing buffer, the slots (each
// touched expert's tokens in groups of up to tokensPerSlot, ascending expert id) and each
// token's pairs in ascending expert order.
struct BlockRoutes {
    int routeInts[kRouteInts];
    int slotExpert[kMaxSlots], slotFirst[kMaxSlots], slotCount[kMaxSlots];
    int tokenPairs[kMaxTokens][kMaxTopK];
    int slotTotal;
};

// Every block routes every token itself (MoE.route's rules; tens of floats from L2, cheaper
// than a grid-wide exchange) and cuts the slots. A block given `routes` (one per launch) also
// copies the choices there (v1's layout, for checks). The whole block calls it; it ends with a
// barrier.
__device__ void route_block(BlockRoutes& b, const moe::RouterArgs& ra, const float* logits, int T, int E, int k,
                            int tokensPerSlot, int* routes) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const moe::Routes r{b.routeInts, E, k};
    for (int t = warp; t < T; t += warps) moe::route_token(ra, logits, E, k, t, r);
    __syncthreads();
    moe::group_pairs(T, E, k, r, b.tokenPairs);
    __syncthreads();
    if (warp == 0) {
        const int touched = *r.touched();
        int base = 0;
        for (int s0 = 0; s0 < touched; s0 += 32) {
            const int s = s0 + lane, first = s < touched ? r.start()[s] : 0, n = s < touched ? r.start()[s + 1] - first : 0;
            const int c = (n + tokensPerSlot - 1) / tokensPerSlot;
            int incl = c;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int v = __shfl_up_sync(0xffffffffu, incl, o);
                if (lane >= o) incl += v;
            }
            for (int i = 0, at = base + incl - c; i < c; ++i) {
                b.slotExpert[at + i] = r.expert()[s];
                b.slotFirst[at + i] = first + i * tokensPerSlot;
                b.slotCount[at + i] = min(tokensPerSlot, n - i * tokensPerSlot);
            }
            base += __shfl_sync(0xffffffffu, incl, 31);
        }
        if (lane == 0) b.slotTotal = base;
    } else if (warp == 1 && routes) {
        const moe::Routes g{routes, E, k};
        for (int i = lane; i < T * k; i += 32) {
            g.chosen()[i] = r.chosen()[i];
            g.chosenWeight()[i] = r.chosenWeight()[i];
        }
        if (lane == 0) *g.touched() = *r.touched();
    }
    __syncthreads();
}

// route_block's outputs for one token, by warp 0 alone, straight into `out` (BlockRoutes in
// global memory, as moe6_route leaves it for its product launches) and `routes` (v1's layout,
// for checks; may be null): the token's top-k (route_token, into `b`, the block's shared
// scratch), then its k experts in ascending id, each the slot of its one pair, which is what
// route_block makes of one token. Only the fields the product launches and the checks read are
// written. In moe6_route's routing block at one token, route_block's grouping (group_pairs,
// the slot scan, four barriers) took 1.6 us and the rest, with the 7 KB copy of BlockRoutes,
// 1.4 us (gpt-oss-20b, H200 timeline; Kernels/NOTES.md, twenty-second session).
__device__ void route_one_token(BlockRoutes& b, const moe::RouterArgs& ra, const float* logits, int E, int k, BlockRoutes* out,
                                int* routes) {
    const int lane = threadIdx.x & 31;
    const moe::Routes r{b.routeInts, E, k};
    moe::route_token(ra, logits, E, k, 0, r);  // lane 0 writes the choices
    __syncwarp();
    const moe::Routes g{out->routeInts, E, k};
    if (lane < k) {
        const int e = r.chosen()[lane];
        const float w = r.chosenWeight()[lane];
        int s = 0;  // the token's experts below e (top-k experts are distinct): e's slot and pair
        for (int n = 0; n < k; ++n) s += r.chosen()[n] < e;
        g.expert()[s] = e;
        g.start()[s] = s;
        g.token()[s] = 0;
        g.weight()[s] = w;
        g.chosen()[lane] = e;
        g.chosenWeight()[lane] = w;
        out->slotExpert[s] = e;
        out->slotFirst[s] = s;
        out->slotCount[s] = 1;
        out->tokenPairs[0][s] = s;
        if (routes) {
            const moe::Routes v{routes, E, k};
            v.chosen()[lane] = e;
            v.chosenWeight()[lane] = w;
        }
    }
    if (lane == 0) {
        *g.touched() = k;
        g.start()[k] = k;
        out->slotTotal = k;
        if (routes) *moe::Routes{routes, E, k}.touched() = k;
    }
}

template <bool Split>
__device__ __forceinline__ void experts(
    const float* logits, const float* correction, int mode, int normalize, float scaling, int groups, int topKGroups,
    const float* x, const int* xexp, int T, int H, int I, int E, int k, const uint8_t* gateUp, const float* gateUpBias,
    const uint8_t* down, const float* downBias, int clamped, float alpha, float limit, float* act, float* partial,
    int* sync, int* routes, float* out, int ringSlots, int tokensPerSlot, int bBytes, int chunkSteps, long long* trace) {
    extern __shared__ __align__(128) uint8_t smem[];
    __shared__ __align__(8) uint64_t full[kMaxRing], empty[kMaxRing];
    __shared__ BlockRoutes br;
    __shared__ int stagedRow[kSlotTokens], stagedExp[kSlotTokens];
    __shared__ float unscale[kSlotTokens];
    // Epilogues finished by each consumer warp (unit i's is warp i % 8's), for the signaler.
    __shared__ int finished[kConsumers];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const long long clock0 = clock64();
    long long* tr = trace ? trace + 8 * blockIdx.x : nullptr;
    if (tr && tid == 0) tr[0] = globaltimer();
    if (tid == 0) {
        for (int i = 0; i < ringSlots; ++i) {
            mbar_init(smem_addr(&full[i]), 1);
            mbar_init(smem_addr(&empty[i]), kConsumers);
        }
        for (int w = 0; w < kConsumers; ++w) finished[w] = 0;
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    wait_for_previous_kernel();  // logits, xexp and sync come from moe2_route, x from before it
    // Dependents may start now: every block of this grid runs, so none of them can hold the
    // room a block of ours still needs.
    allow_next_kernel();

    // Routing, the same in every block.
    const moe::Routes r{br.routeInts, E, k};
    route_block(br, moe::RouterArgs{correction, mode, normalize, scaling, groups, topKGroups}, logits, T, E, k, tokensPerSlot,
                blockIdx.x == 0 ? routes : nullptr);
    const int* slotExpert = br.slotExpert;
    const int* slotFirst = br.slotFirst;
    const int* slotCount = br.slotCount;
    const int(*tokenPairs)[kMaxTopK] = br.tokenPairs;

    if (tr && tid == 0) tr[1] = clock64() - clock0;
    const int S = br.slotTotal, stepsG = (H + 63) / 64, stepsD = (I + 63) / 64, tilesG = I / 8, tilesD = H / 16;
    Units units;
    {
        const long long ug = (long long)S * tilesG, ud = (long long)S * tilesD, G = gridDim.x, b = blockIdx.x;
        units.g0 = (int)(b * ug / G);
        units.gCount = (int)((b + 1) * ug / G) - units.g0;
        units.d0 = (int)(b * ud / G);
        units.count = units.gCount + (int)((b + 1) * ud / G) - units.d0;
        units.tilesG = tilesG;
        units.tilesD = tilesD;
    }
    uint8_t* ring = smem;
    const int slotBytes = chunkSteps * kStepBytes;
    uint8_t* bsm = smem + ringSlots * slotBytes;
    float* red = reinterpret_cast<float*>(bsm + bBytes);
    const uint32_t fullBar = smem_addr(full), emptyBar = smem_addr(empty);

    if (warp == kProducer) {
        if (lane != 0) return;
        uint64_t policy;
        asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
        int pos = 0;
        uint32_t round = 0;
        for (int i = 0; i < units.count; ++i) {
            int phase, s, tile;
            units.at(i, phase, s, tile);
            const int steps = phase == 0 ? stepsG : stepsD, tiles = phase == 0 ? tilesG : tilesD;
            const uint8_t* src = (phase == 0 ? gateUp : down) + ((size_t)slotExpert[s] * tiles + tile) * steps * kStepBytes;
            for (int c0 = 0; c0 < steps; c0 += chunkSteps) {
                const uint32_t bytes = min(chunkSteps, steps - c0) * kStepBytes;
                if (round > 0) mbar_wait(emptyBar + pos * 8, (round - 1) & 1);
                mbar_expect(fullBar + pos * 8, bytes);
                bulk_load(smem_addr(ring + pos * slotBytes), src + (size_t)c0 * kStepBytes, bytes, fullBar + pos * 8, policy);
                if (++pos == ringSlots) { pos = 0; ++round; }
            }
        }
        if (tr) tr[7] = clock64() - clock0;
        return;
    }

    if (warp == kSignaler) {
        int done = 0;
        long long since = clock64();
        while (done < units.count) {
            int fin = done;
            if (lane == 0)
                while (fin < units.count && load_acquire_block(&finished[fin % kConsumers]) > fin / kConsumers) ++fin;
            fin = __shfl_sync(0xffffffffu, fin, 0);
            if (fin == done) {
                check_hang(since);
                __nanosleep(128);
                continue;
            }
            since = clock64();
            __threadfence();  // publishes those units' act / partial rows (ordered before `finished`)
            for (int base = done; base < fin; base += 32) {
                const int i = base + lane;
                int phase = 0, s = 0, tile = 0;
                bool last = false;
                if (i < fin) {
                    units.at(i, phase, s, tile);
                    if (phase == 0) atomicAdd(sync + kSyncSlots + s, 1);
                    else last = atomicAdd(sync + kSyncTiles + tile, 1) == S - 1;
                }
                uint32_t lastMask = __ballot_sync(0xffffffffu, last);
                if (lastMask) {
                    __threadfence();  // the other blocks' partial rows of these tiles are visible
                    while (lastMask) {
                        const int src = __ffs(lastMask) - 1;
                        lastMask &= lastMask - 1;
                        combine(__shfl_sync(0xffffffffu, tile, src), T, H, k, tokenPairs, partial, out);
                    }
                }
            }
            done = fin;
        }
        if (tr && lane == 0) tr[6] = clock64() - clock0;
        return;
    }

    // Consumers.
    int pos = 0, buf = 0, stagedPhase = -1, stagedSlot = -1;
    uint32_t round = 0;
    const uint8_t* bLane[2] = {bsm, bsm};
    for (int i = 0; i < units.count; ++i) {
        int phase, s, tile;
        units.at(i, phase, s, tile);
        const int e = slotExpert[s], p0 = slotFirst[s], n = slotCount[s], steps = phase == 0 ? stepsG : stepsD;
        if (phase != stagedPhase || s != stagedSlot) {
            consumers_sync();  // every warp is done with the staged rows and its epilogues
            if (tid == 0) {
                if (phase == 1) {
                    const long long since = clock64();
                    while (load_acquire(sync + kSyncSlots + s) < tilesG) {
                        check_hang(since);
                        __nanosleep(64);
                    }
                    __threadfence();
                    if (tr && i == units.gCount) tr[4] = clock64() - clock0;
                }
                for (int j = 0; j < n; ++j) {
                    const int ex = phase == 0 ? __ldcg(xexp + r.token()[p0 + j]) : (int)((uint32_t)__ldcg(sync + kSyncActMax + p0 + j) >> 23);
                    stagedRow[j] = phase == 0 ? r.token()[p0 + j] : p0 + j;
                    stagedExp[j] = min(max(ex, 15), 255);
                    unscale[j] = __uint_as_float(static_cast<uint32_t>(stagedExp[j]) << 23);
                }
            }
            consumers_sync();
            stage(bsm, phase == 0 ? x : act, stagedRow, stagedExp, phase == 0 ? H : I, steps, n);
            consumers_sync();
            stagedPhase = phase;
            stagedSlot = s;
            const int g = lane >> 2, t = lane & 3, stride = steps * 256, at = (g & 1) * 64 + t * 16;
            bLane[0] = bsm + min(g >> 1, tokensPerSlot - 1) * stride + at;
            bLane[1] = bsm + min(4 + (g >> 1), tokensPerSlot - 1) * stride + at;
        }
        // The unit's epilogue is one warp's, in turn, so no warp does more than its share. Its
        // inputs are loaded now, to arrive while the unit streams.
        const bool mine = warp == i % kConsumers;
        float bias0 = 0.f, bias1 = 0.f;
        if (mine) {
            const int g = lane >> 2;
            if (phase == 0 && gateUpBias) {
                bias0 = __ldg(gateUpBias + (size_t)e * 2 * I + tile * 8 + g);
                bias1 = __ldg(gateUpBias + (size_t)e * 2 * I + I + tile * 8 + g);
            } else if (phase == 1 && downBias) {
                bias0 = __ldg(downBias + (size_t)e * H + tile * 16 + g);
                bias1 = __ldg(downBias + (size_t)e * H + tile * 16 + g + 8);
            }
        }
        float* rb = red + buf * kRedFloats;
        const auto unit = [&](auto nbTag) {
            constexpr int NB = decltype(nbTag)::value;
            float acc[NB][4];
            consume<NB>(ring, ringSlots, chunkSteps, fullBar, emptyBar, pos, round, steps, bLane, acc);
            if constexpr (Split) {
                // Buffer buf was last read by unit i - 2's epilogue warp, which arrived once done.
                if (i >= 2 && warp != (i - 2) % kConsumers) {
                    if (buf) consumers_bar_sync<5>();
                    else consumers_bar_sync<4>();
                }
                store_partials<NB>(rb, acc);
                if (mine) {
                    if (buf) consumers_bar_sync<3>();
                    else consumers_bar_sync<2>();
                } else {
                    if (buf) consumers_bar_arrive<3>();
                    else consumers_bar_arrive<2>();
                }
            } else {
                store_partials<NB>(rb, acc);
                consumers_sync();
            }
        };
        if (n > 4) unit(moe::Tokens<2>{});
        else unit(moe::Tokens<1>{});
        if (tr && tid == 0 && (i == 0 || i == units.gCount - 1)) tr[i == 0 ? 2 : 3] = clock64() - clock0;
        if (mine) {
            const int g = lane >> 2;
            if (phase == 0) {
                if (n > 4) finish_gate_up<2>(rb, n, p0, I, tile * 8 + g, bias0, bias1, unscale, clamped, alpha, limit, act, sync + kSyncActMax);
                else finish_gate_up<1>(rb, n, p0, I, tile * 8 + g, bias0, bias1, unscale, clamped, alpha, limit, act, sync + kSyncActMax);
            } else {
                if (n > 4) finish_down<2>(rb, n, p0, H, tile * 16 + g, bias0, bias1, unscale, r.weight(), partial);
                else finish_down<1>(rb, n, p0, H, tile * 16 + g, bias0, bias1, unscale, r.weight(), partial);
            }
            __syncwarp();
            if constexpr (Split) {
                if (i + 2 < units.count) {  // red[buf] read: free for unit i + 2
                    if (buf) consumers_bar_arrive<5>();
                    else consumers_bar_arrive<4>();
                }
            }
            if (lane == 0) store_release_block(&finished[warp], i / kConsumers + 1);
        }
        buf ^= 1;
    }
    if (tr && tid == 0) tr[5] = clock64() - clock0;
}

}  // namespace moe2

#define MOE2_EXPERTS_ENTRY(NAME, SPLIT)                                                                                  \
    extern "C" __global__ void __maxnreg__(128) NAME(                                                                   \
        const float* logits, const float* correction, int mode, int normalize, float scaling, int groups, int topKGroups, \
        const float* x, const int* xexp, int T, int H, int I, int E, int k, const uint8_t* gateUp, const float* gateUpBias, \
        const uint8_t* down, const float* downBias, int clamped, float alpha, float limit, float* act, float* partial,  \
        int* sync, int* routes, float* out, int ringSlots, int tokensPerSlot, int bBytes, int chunkSteps, long long* trace) { FULGUR_TRACE_KERNEL; \
        moe2::experts<SPLIT>(logits, correction, mode, normalize, scaling, groups, topKGroups, x, xexp, T, H, I, E, k,     \
                             gateUp, gateUpBias, down, downBias, clamped, alpha, limit, act, partial, sync, routes, out,   \
                             ringSlots, tokensPerSlot, bBytes, chunkSteps, trace);                                        \
    }
// Version 2: every consumer warp waits at each unit's end. Version 3: only the epilogue warp.
MOE2_EXPERTS_ENTRY(moe2_experts, false)
MOE2_EXPERTS_ENTRY(moe3_experts, true)

// Version 4: the router launch of version 2, then the expert products in two plain launches,
// gate_up then down, with no ring, no producer warp and no counters between the phases:
//
//   moe4_gate_up: every block routes every token (route_block) and takes an even share of the
//     units (16 weight rows by the whole K of one slot: 8 gate rows and their 8 up rows) in
//     slot-major order; each of its 8 warps streams whole units straight from global memory
//     into registers (kDepth = 8 steps of 544 bytes in flight per warp, the next unit's first
//     steps loaded while the current one finishes) and multiplies on the tensor cores as
//     version 2 does (block32), against B (x in f16 hi + lo) staged in shared memory for the
//     pairs of a window of consecutive slots. A warp owns a whole unit, so its sums are final:
//     it applies the GLU itself (no partials in shared memory, no barrier per unit).
//   moe4_down: the same for down's units (16 rows of one slot, split in `splits` pieces of K
//     so more warps stream at once), launched as a programmatic dependent of gate_up: it
//     routes and loads its first unit's weights while gate_up runs, then waits for act. Each
//     warp writes weight * (y + bias) of its 16 rows into partial [split][pair][H]; the warp
//     that finishes a 16-row tile's last unit (an arrival counter per tile) adds its pairs in
//     ascending expert order into out (`combine`): no float atomics, so the sum's order is
//     fixed and a token's result does not depend on the other tokens of the step.
// The grids are what fits at once (the host asks the driver) and no block ever waits for
// another, so a grid larger than the GPU would also be right.
//
// Why (Kernels/NOTES.md, version 2's timestamps): version 2 streamed at half the copy
// bandwidth and spent ~18 us a call in fixed costs: its consumer warps handed every unit to
// each other through a ring, a barrier and a one-warp epilogue in series, and its down units
// waited for gate_up counters published through fences. Here a warp's only wait is its own
// loads, and the phase switch is a kernel boundary whose down weights are already in flight.
//
// Budget (gpt-oss-20b, H = I = 2880, top-4): bytes as version 2 (53.2 MB at T = 1: gate_up
// 35.2, down 17.6; 371 MB for 28 experts at T = 16), plus B staged from L2 per window (at
// T = 1 about 46 KB a block, 12 MB over the grid) and partial rows (T = 1: 184 KB). Work at
// T = 1: 1440 gate_up units of 24.5 KB and 1440 down half-units of 12.2 KB over 264 blocks of
// 8 warps (2 per SM at 128 registers); bytes in flight when every busy warp has 8 steps out:
// about 6 MB, what 4.2 TB/s needs at ~1.4 us of loaded latency.
// Roofline at 4.2 TB/s: T = 1 12.7 us. Predicted (H200, overlapped launches): T = 1 20-26 us
// (route ~3 us in the chain, gate_up ~10-12, down ~6-8 of which ~2 hidden behind gate_up's
// tail), T = 8 90-120 us (version 2: 151), T = 16 within 1.5x of its roofline.
// Measured (H200, Kernels/NOTES.md "Fourth session"): T = 1 43.6-45.5 us (version 2: 45-47),
// T = 8 122-130 us (v2 205-240), T = 16 180-188 us (v2 337-362): the 1-token call missed the
// prediction by 2x. ncu: each busy warp streams its 45-step unit alone and issues every ~10
// cycles (instruction fetch, the prologue's barriers, fixed-latency waits), so the per-warp
// chain, not DRAM, sets the time.
namespace moe4 {

using moe2::kStepBytes;
using moe::kMaxTokens;
using moe::kMaxTopK;

constexpr int kWarps = 8, kThreads = kWarps * 32, kMaxPairs = kMaxTokens * kMaxTopK;
static_assert(kThreads == moe2::kConsumers * 32, "moe2::stage runs on kConsumers warps");
// BlockRoutes as ints (moe6_route's output); CUDAMoE allocates kRoutedInts (one more: the
// route kernel's arrival counter).
constexpr int kBlockRoutesInts = sizeof(moe2::BlockRoutes) / 4, kRoutedInts = kBlockRoutesInts + 1;
// After the counter, at one token: whether moe6_route staged x's B rows (moe2::stage_x) and
// their exponent; the rows themselves from int kStagedInt on (steps * 256 bytes, up to 32 KB).
// CUDAMoE allocates kStagedInt + 8192 ints.
constexpr int kStagedInfoInt = kRoutedInts, kStagedInt = 2048;
static_assert(sizeof(moe2::BlockRoutes) % 4 == 0 && kStagedInfoInt + 2 <= kStagedInt, "CUDAMoE allocates 2048 ints for BlockRoutes");

__device__ __forceinline__ uint32_t load_word_streaming(const void* p) {
    uint32_t v;
    asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}

// The weights of kDepth steps in flight, in registers: lane l's 16 bytes of codes and its
// rows' 4 bytes of scales per step. kDepth 8 (4 measured no faster: Kernels/NOTES.md).
template <int kDepth>
struct Pipe {
    uint4 q[kDepth];
    uint32_t s[kDepth];
};

template <int kDepth>
__device__ __forceinline__ void pipe_load(Pipe<kDepth>& p, int d, const uint8_t* step, int lane) {
    p.q[d] = load_streaming(step + lane * 16);
    p.s[d] = load_word_streaming(step + 512 + (lane >> 2) * 4);
}

// The first kDepth steps of a unit of `steps` steps at w.
template <int kDepth>
__device__ __forceinline__ void pipe_fill(Pipe<kDepth>& p, const uint8_t* w, int steps, int lane) {
#pragma unroll
    for (int d = 0; d < kDepth; ++d)
        if (d < steps) pipe_load(p, d, w + d * kStepBytes, lane);
}

// One unit (steps at w, the first kDepth already in p) against B (b[nb] + step * 256, as
// moe2::step reads it), into acc. The loop runs a multiple of kDepth steps, so step j of a unit
// is always in slot j % kDepth (registers, indices known at compile time); its last loads
// are the first kDepth steps of the next unit (next, nextSteps; null: none), so the pipe never
// drains between a warp's units.
template <int NB, int kDepth>
__device__ __forceinline__ void pipe_run(Pipe<kDepth>& p, const uint8_t* w, int steps, const uint8_t* next, int nextSteps,
                                         const uint8_t* const (&b)[2], int lane, float (&acc)[NB][4]) {
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[nb][v] = 0.f;
    const int L = (steps + kDepth - 1) / kDepth * kDepth;
    for (int s0 = 0; s0 < L; s0 += kDepth) {
#pragma unroll
        for (int d = 0; d < kDepth; ++d) {
            const int s = s0 + d, ahead = s + kDepth;
            const uint4 q = p.q[d];
            const uint32_t sw = p.s[d];
            if (ahead < steps) pipe_load(p, d, w + (size_t)ahead * kStepBytes, lane);
            else if (ahead >= L && next && ahead - L < nextSteps) pipe_load(p, d, next + (size_t)(ahead - L) * kStepBytes, lane);
            if (s < steps) {
                uint4 x0[NB], x1[NB];
#pragma unroll
                for (int nb = 0; nb < NB; ++nb) {
                    x0[nb] = *reinterpret_cast<const uint4*>(b[nb] + s * 256);
                    x1[nb] = *reinterpret_cast<const uint4*>(b[nb] + s * 256 + 128);
                }
                moe2::block32<0, NB>(q.x, q.y, sw, x0, acc);
                moe2::block32<2, NB>(q.z, q.w, sw, x1, acc);
            }
        }
    }
}

// Both phases (Down false: gate_up, true: down). src: x [T, H] or act [pairs, I]; weights and
// bias: the phase's tiled weights and biases; windowPairs: pairs whose B fits the dynamic
// shared memory (>= tokensPerSlot); splits: pieces of K per down unit (gate_up: 1).
// Routed (version 7): the router launch routed already (moe6_route) and left its BlockRoutes
// in `routed`; the block copies it instead of routing itself.
template <bool Down, int kDepth, bool Routed, bool One = false>
__device__ __forceinline__ void products(
    const float* logits, const float* correction, int mode, int normalize, float scaling, int groups, int topKGroups,
    const float* src, const int* xexp, int T, int H, int I, int E, int k, const uint8_t* weights, const float* bias,
    int clamped, float alpha, float limit, float* act, float* partial, int* sync, int* routes, float* out,
    int windowPairs, int tokensPerSlot, int splits, const int* routed, int apart = 0) {
    extern __shared__ __align__(128) uint8_t bsm[];
    __shared__ moe2::BlockRoutes br;
    __shared__ int winRow[kMaxPairs], winExp[kMaxPairs];
    __shared__ float winUnscale[kMaxPairs];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2;
    const int K = Down ? I : H, steps = (K + 63) / 64, tiles = Down ? H / 16 : I / 8, pieces = Down ? splits : 1;
    const int per = (steps + pieces - 1) / pieces, P = T * k;
    // gate_up reads the logits of the launch before it. down's come from two launches back:
    // gate_up let this grid start only after its own wait, so they are complete; down waits
    // only for act.
    if (!Down) {
        wait_for_previous_kernel();
        allow_next_kernel();
    }
    // One (gate_up at one token, its own entry so that other token counts keep their code): x's
    // B rows as moe6_route's block 0 staged them (moe2::stage_x), copied with the routes, when
    // the flag says they are there (else staged below as always).
    __shared__ int stagedInfo[2];
    const bool one = One && Routed && !Down && T == 1;
    if constexpr (Routed) {
        if (one) {
            const float* src = reinterpret_cast<const float*>(routed + kStagedInt);
            for (int i = threadIdx.x; i < steps * 16; i += kThreads) copy16(reinterpret_cast<float*>(bsm) + 4 * i, src + 4 * i);
            if (threadIdx.x < 2) stagedInfo[threadIdx.x] = __ldcg(routed + kStagedInfoInt + threadIdx.x);
        }
        int* dst = reinterpret_cast<int*>(&br);
        for (int i = threadIdx.x; i < kBlockRoutesInts; i += kThreads) dst[i] = __ldcg(routed + i);
        if (one) copies_done();
        __syncthreads();
    } else {
        moe2::route_block(br, moe::RouterArgs{correction, mode, normalize, scaling, groups, topKGroups}, logits, T, E, k,
                          tokensPerSlot, Down || blockIdx.x != 0 ? nullptr : routes);
    }
    const moe::Routes r{br.routeInts, E, k};
    const int S = br.slotTotal, perSlot = pieces * tiles;
    const long long U = (long long)S * perSlot, G = gridDim.x, blk = blockIdx.x;
    const int u1 = (int)((blk + 1) * U / G);
    // Unit v: slot v / perSlot, then piece, then 16-row tile.
    const auto unit = [&](int v, int& s, int& piece, int& tile, const uint8_t*& w, int& n) {
        s = v / perSlot;
        const int rem = v - s * perSlot;
        piece = rem / tiles;
        tile = rem - piece * tiles;
        n = min(per, steps - piece * per);
        w = weights + (((size_t)br.slotExpert[s] * tiles + tile) * steps + (size_t)piece * per) * kStepBytes;
    };
    Pipe<kDepth> pipe;
    bool waited = !Down;
    for (int u = (int)(blk * U / G); u < u1;) {
        // A window: consecutive slots from u's whose pairs' B fits.
        const int sA = u / perSlot, pw0 = br.slotFirst[sA];
        int sB = sA;
        while (sB + 1 < S && (long long)(sB + 1) * perSlot < u1 && br.slotFirst[sB + 1] + br.slotCount[sB + 1] - pw0 <= windowPairs) ++sB;
        const int pw1 = br.slotFirst[sB] + br.slotCount[sB], wu1 = min(u1, (sB + 1) * perSlot);
        int s, piece, tile, n;
        const uint8_t* w;
        if (u + warp < wu1) {
            unit(u + warp, s, piece, tile, w, n);
            pipe_fill(pipe, w, n, lane);  // in flight while B is staged (down: while gate_up runs)
        }
        if (!waited) {
            wait_for_previous_kernel();  // act and its maxima
            allow_next_kernel();
            waited = true;
        }
        __syncthreads();  // every warp is done with the last window's B
        const int m = pw1 - pw0;
        const bool staged = one && stagedInfo[0] == 1;  // B is row 0 for every pair
        if (threadIdx.x < m) {
            const int p = pw0 + threadIdx.x;
            const int ex = staged ? stagedInfo[1]
                           : Down ? (int)((uint32_t)__ldcg(sync + moe2::kSyncActMax + p) >> 23) : __ldcg(xexp + r.token()[p]);
            const int e = min(max(ex, 15), 255);
            winRow[threadIdx.x] = Down ? p : r.token()[p];
            winExp[threadIdx.x] = e;
            winUnscale[threadIdx.x] = __uint_as_float(static_cast<uint32_t>(e) << 23);
        }
        __syncthreads();
        if (!staged) {
            moe2::stage(bsm, src, winRow, winExp, K, steps, m);
            __syncthreads();
        }
        if (u == (int)(blk * U / G)) FULGUR_TRACE_MARK(0);  // the first window's B is staged: units start
        for (int v = u + warp; v < wu1; v += kWarps) {
            unit(v, s, piece, tile, w, n);
            const int e = br.slotExpert[s], p0 = br.slotFirst[s], c = br.slotCount[s];
            int ns = 0, np, nt, nn = 0;
            const uint8_t* nw = nullptr;
            if (v + kWarps < wu1) unit(v + kWarps, ns, np, nt, nw, nn);
            float b0 = 0.f, b1 = 0.f;
            if (bias && piece == 0) {
                if (Down) {
                    b0 = __ldg(bias + (size_t)e * H + tile * 16 + g);
                    b1 = __ldg(bias + (size_t)e * H + tile * 16 + g + 8);
                } else {
                    b0 = __ldg(bias + (size_t)e * 2 * I + tile * 8 + g);
                    b1 = __ldg(bias + (size_t)e * 2 * I + I + tile * 8 + g);
                }
            }
            const int stride = steps * 256, at = (g & 1) * 64 + (lane & 3) * 16 + piece * per * 256;
            const int row = staged ? 0 : p0 - pw0;  // staged: one token, so c is 1
            const uint8_t* const bl[2] = {bsm + (row + min(g >> 1, c - 1)) * stride + at,
                                          bsm + (row + min(4 + (g >> 1), c - 1)) * stride + at};
            const float* unscale = winUnscale + (p0 - pw0);
            const auto finish = [&](auto nbTag) {
                constexpr int NB = decltype(nbTag)::value;
                float acc[NB][4];
                pipe_run<NB, kDepth>(pipe, w, n, nw, nn, bl, lane, acc);
                if (Down) moe2::down_out<NB>(acc, c, p0, H, tile * 16 + g, b0, b1, unscale, r.weight(), partial + (size_t)piece * P * H);
                else moe2::gate_up_out<NB>(acc, c, p0, I, tile * 8 + g, b0, b1, unscale, clamped, alpha, limit, act, sync + moe2::kSyncActMax);
            };
            if (c > 4) finish(moe::Tokens<2>{});
            else finish(moe::Tokens<1>{});
            if (Down && !apart) {
                // The tile's last unit over all slots and pieces adds them up. (With `apart`,
                // moe7_combine does it in the next launch: see there.)
                __syncwarp();
                int last = 0;
                if (lane == 0) {
                    __threadfence();  // this warp's partial rows before its arrival
                    last = atomicAdd(sync + moe2::kSyncTiles + tile, 1) == S * pieces - 1;
                }
                if (__shfl_sync(0xffffffffu, last, 0)) {
                    __threadfence();  // the other arrivals' partial rows are visible
                    moe2::combine(tile, T, H, k, br.tokenPairs, partial, out, P, pieces);
                }
            }
        }
        u = wu1;
    }
    FULGUR_TRACE_MARK(1);  // warp 0's units (and its combines) are done
}

}  // namespace moe4

// Versions 4 and 7's launches (see the comment above namespace moe4; version 7 routes once, in
// moe6_route, and its product kernels copy the result): kThreads threads; the grid is what fits at once;
// dynamic shared memory windowPairs * 256 * ceil(K / 64) bytes (K = H for gate_up, I for
// down). act [16k, I], partial [splits, T k, H], sync zeroed by moe2_route.
#define MOE4_ENTRIES(GATE_UP, DOWN, DEPTH, ROUTED, BLOCKS)                                                                                \
    extern "C" __global__ void __launch_bounds__(moe4::kThreads, BLOCKS) GATE_UP(                                       \
        const float* logits, const float* correction, int mode, int normalize, float scaling, int groups, int topKGroups, \
        const float* x, const int* xexp, int T, int H, int I, int E, int k, const uint8_t* gateUp, const float* gateUpBias, \
        int clamped, float alpha, float limit, float* act, int* sync, int* routes, int windowPairs, int tokensPerSlot,   \
        const int* routed) { FULGUR_TRACE_KERNEL;                                                                       \
        moe4::products<false, DEPTH, ROUTED>(logits, correction, mode, normalize, scaling, groups, topKGroups, x, xexp, T, H, I, E, \
                                     k, gateUp, gateUpBias, clamped, alpha, limit, act, nullptr, sync, routes, nullptr,    \
                                     windowPairs, tokensPerSlot, 1, routed);                                                \
    }                                                                                                                   \
    extern "C" __global__ void __launch_bounds__(moe4::kThreads, BLOCKS) DOWN(                                          \
        const float* logits, const float* correction, int mode, int normalize, float scaling, int groups, int topKGroups, \
        const float* act, int T, int H, int I, int E, int k, const uint8_t* down, const float* downBias, float* partial,  \
        int* sync, float* out, int windowPairs, int tokensPerSlot, int splits, const int* routed,                        \
        int apart) { FULGUR_TRACE_KERNEL;                                                                               \
        moe4::products<true, DEPTH, ROUTED>(logits, correction, mode, normalize, scaling, groups, topKGroups, act, nullptr, T, H, I, \
                                    E, k, down, downBias, 0, 0.f, 0.f, nullptr, partial, sync, nullptr, out, windowPairs, \
                                    tokensPerSlot, splits, routed, apart);                                                  \
    }
// Versions 5 (depth 4) and 6 (depth 4, routed once, three blocks a multiprocessor at 80
// registers) were measured and removed: within 2% of versions 4 and 7 at gpt-oss, slower on
// the MiMo-like shape (Kernels/NOTES.md).
MOE4_ENTRIES(moe4_gate_up, moe4_down, 8, false, 2)
MOE4_ENTRIES(moe7_gate_up, moe7_down, 8, true, 2)
// Version 7's gate_up for one token: B copied as moe6_route staged it (moe4::products' One).
extern "C" __global__ void __launch_bounds__(moe4::kThreads, 2) moe7_gate_up_t1(
    const float* logits, const float* correction, int mode, int normalize, float scaling, int groups, int topKGroups,
    const float* x, const int* xexp, int T, int H, int I, int E, int k, const uint8_t* gateUp, const float* gateUpBias,
    int clamped, float alpha, float limit, float* act, int* sync, int* routes, int windowPairs, int tokensPerSlot,
    const int* routed) {
    FULGUR_TRACE_KERNEL;
    moe4::products<false, 8, true, true>(logits, correction, mode, normalize, scaling, groups, topKGroups, x, xexp, T, H, I, E, k,
                                         gateUp, gateUpBias, clamped, alpha, limit, act, nullptr, sync, routes, nullptr, windowPairs,
                                         tokensPerSlot, 1, routed);
}

// Version 7's down sums as their own launch, after moe7_down ran with `apart` (CUDAMoE's
// Plan4.combineApart): out[t] = the sum of token t's pairs' partial rows, ascending expert id
// and piece by piece as the in-kernel combine adds them (moe2::combine, the same code), so out is
// bit for bit what the in-kernel path writes. Why: in that path every down unit ends with a
// fence and an arrival counter read back, and the fence waits for every load the warp has in
// flight, the next unit's weights included, so each unit drained the warp's pipe. At MiMo's
// shard over 4 GPUs (K = 512: 8 steps a unit) an 8-token call has about 6 units a warp, and
// its down launch took 43 us for about 57 MB, 3.2x its roofline (H200 timeline). Apart, the
// shard's 8-token step ran 6.7% faster, but down still streams slower than gate_up, so the
// fences were not all of it (Kernels/NOTES.md, twenty-eighth session). The cost here is one
// more launch in the chain. routed: moe6_route's BlockRoutes
// (token t's pairs in ascending expert order); partial [splits, T k, H]. Launch with 128
// threads (a warp per 16-row tile) and ceil(H / 64) blocks, as a programmatic dependent of
// moe7_down. Bytes: T k H 4 (splits times) read from L2, T H 4 written: 1.1 MB at 8 tokens.
extern "C" __global__ void __launch_bounds__(128) moe7_combine(const int* routed, const float* partial, float* out, int T, int H,
                                                               int k, int splits) {
    FULGUR_TRACE_KERNEL;
    __shared__ int tokenPairs[moe::kMaxTokens][moe::kMaxTopK];
    const auto* br = reinterpret_cast<const moe2::BlockRoutes*>(routed);
    // routed was written three launches back (moe6_route), before the waits of the two between.
    for (int i = threadIdx.x; i < T * moe::kMaxTopK; i += blockDim.x) tokenPairs[i / moe::kMaxTopK][i % moe::kMaxTopK] = __ldcg(&br->tokenPairs[0][0] + i);
    wait_for_previous_kernel();  // partial
    allow_next_kernel();
    __syncthreads();
    const int tile = blockIdx.x * 4 + (threadIdx.x >> 5);
    if (tile < H / 16) moe2::combine(tile, T, H, k, tokenPairs, partial, out, T * k, splits);
}

// Version 7's router: moe2_route's logits, then the last block to arrive routes every
// token once (moe2::route_block) and leaves the result in `routed` (BlockRoutes as ints; the
// int after it is the arrival counter, 0 between calls) and v1's layout in `routes` (checks),
// so the product launches copy it (7 KB) instead of each routing every token. One token is routed
// by that block's warp 0 alone (moe2::route_one_token), which writes only the BlockRoutes
// fields the product launches read. 256 threads, ceil(E / n) blocks for n experts a block:
// 1 up to moe6::kExpertsPerBlock (H <= 4096) or kExpertsPerBlockWide (above), the host's
// choice (CUDAMoE.route6Blocks, from moe6_experts_per_block); the kernel reads n off its grid.
// With `resid` (one token): the residual add and RMSNorm before the router are done here
// (moe2::router_logits' RouterNorm), x is written, not read, and the last block to arrive
// (the one that routes, when every block's loads of resid are done) writes resid + add back
// into resid; dynamic shared memory 4 * H bytes then (the norm weight, then resid + add), else 0.
namespace moe6 {
// The most experts a block takes: 2 up to H = 4096 (32 weight registers a thread), 1 above.
// Every block reads every token's x from L2, so the experts a block takes divide that traffic
// (MiMo, 8 tokens: 256 blocks of one expert read 32 MB of x for 4 MB of weights), but fewer
// blocks leave fewer multiprocessors to read it. Measured (one H200, same binary; Kernels/
// NOTES.md, twenty-ninth session): 2 a block took a MiMo-V2-Flash shard's (256 experts) 1 / 8 /
// 16-token steps 1.3 / 0.9 / 1.8% down and gpt-oss-20b's (32) 8-token step 0.4% up; 4 a block
// (164 registers: the product launch's blocks no longer fit beside a router block) took
// gpt-oss-20b's 8-token step 2.2% up.
constexpr int kExpertsPerBlock = 2, kExpertsPerBlockWide = 1;
}  // namespace moe6
// The host sizes moe6_route's grid from this table (CUDAMoE.route6Blocks), so a fatbin built
// with other values runs right under any binary.
extern "C" __device__ const int moe6_experts_per_block[2] = {moe6::kExpertsPerBlock, moe6::kExpertsPerBlockWide};
namespace moe6 {

// The block's logits (and with the norm, x), then its arrival; true in the last block to
// arrive. C as router_logits' (its own templates' shared memory is small; moe6_route keeps the
// large shared variables outside so that its two instantiations share them).
template <int C, int EPB>
__device__ __forceinline__ bool logits_then_arrive(const void* w, int bf16, const float* bias, const float* x, int T, int H, int E,
                                                   float* logits, int* xexp, int* sync, int syncCount, int* routed, int* counter,
                                                   const moe2::RouterNorm& norm, float* normShared, float& xPeak, bool& last) {
    float h[C][8];
    moe2::router_logits<C, EPB>(w, bf16, bias, x, T, H, E, logits, xexp, sync, syncCount, norm, normShared, h, &xPeak);
    FULGUR_TRACE_MARK(0);
    __threadfence();  // this block's logits before its arrival
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(counter, 1) == (int)gridDim.x - 1;
    // One token with the norm: block 0 stages x's B rows for gate_up. Without it, gate_up
    // stages them itself (the flag says which).
    if (T == 1 && norm.resid && blockIdx.x == 0)
        moe2::stage_x(h, xPeak, H, reinterpret_cast<uint8_t*>(routed + moe4::kStagedInt), routed + moe4::kStagedInfoInt);
    __syncthreads();
    return last;
}
}  // namespace moe6

extern "C" __global__ void __launch_bounds__(256) moe6_route(
    const void* w, int bf16, const float* bias, const float* x, int T, int H, int E, float* logits, int* xexp, int* sync,
    int syncCount, const float* correction, int mode, int normalize, float scaling, int groups, int topKGroups, int k,
    int tokensPerSlot, int* routed, int* routes, float* resid, const float* add, const float* normWeight, float eps) {
    FULGUR_TRACE_KERNEL;
    __shared__ moe2::BlockRoutes br;
    __shared__ bool last;
    // The correction bias (sigmoid routers), copied at the start by every block: only the last
    // block to arrive routes, and the bias is a weight the streamed experts push out of L2, so
    // reading it there put a DRAM round trip on the step's critical path (a MiMo-V2-Flash shard,
    // H200: the routing block 10.6 -> 8 us at one token, the step -1.7%; Kernels/NOTES.md).
    __shared__ float corr[moe::kMaxExperts];
    extern __shared__ float4 normShared[];  // H floats with resid, else none (a static 32 KB here kept the
                                            // product launches' first blocks off the SMs: 8-token step +0.4%)
    if (correction)
        for (int e = threadIdx.x; e < E; e += blockDim.x) copy4(corr + e, correction + e);
    if (T == 1 && !resid && blockIdx.x == 0 && threadIdx.x == 0) routed[moe4::kStagedInfoInt] = 0;
    __shared__ float xPeak;
    const moe2::RouterNorm norm{resid, add, normWeight, eps};
    int* counter = routed + moe4::kBlockRoutesInts;
    float* ns = reinterpret_cast<float*>(normShared);
    const int perBlock = (E + gridDim.x - 1) / gridDim.x;
    if (perBlock > (H <= 2 * 8 * 256 ? moe6::kExpertsPerBlock : moe6::kExpertsPerBlockWide)) __trap();  // a grid too small
    const bool isLast = H > 2 * 8 * 256
        ? moe6::logits_then_arrive<4, 1>(w, bf16, bias, x, T, H, E, logits, xexp, sync, syncCount, routed, counter, norm, ns, xPeak, last)
        : perBlock == 2
        ? moe6::logits_then_arrive<2, 2>(w, bf16, bias, x, T, H, E, logits, xexp, sync, syncCount, routed, counter, norm, ns, xPeak, last)
        : moe6::logits_then_arrive<2, 1>(w, bf16, bias, x, T, H, E, logits, xexp, sync, syncCount, routed, counter, norm, ns, xPeak, last);
    if (!isLast) return;
    __threadfence();  // every block's logits are visible
    FULGUR_TRACE_MARK(1);
    // Every block has read resid (its arrival came after its logits): resid + add goes back
    // now, its stores draining while this block routes.
    if (resid && add)
        for (int i = threadIdx.x; i < H / 4; i += blockDim.x) reinterpret_cast<float4*>(resid)[i] = normShared[i];
    copies_done();
    __syncthreads();
    const moe::RouterArgs ra{correction ? corr : nullptr, mode, normalize, scaling, groups, topKGroups};
    if (T == 1) {
        if (threadIdx.x < 32) moe2::route_one_token(br, ra, logits, E, k, reinterpret_cast<moe2::BlockRoutes*>(routed), routes);
    } else {
        moe2::route_block(br, ra, logits, T, E, k, tokensPerSlot, routes);
        const int* src = reinterpret_cast<const int*>(&br);
        for (int i = threadIdx.x; i < moe4::kBlockRoutesInts; i += blockDim.x) routed[i] = src[i];
    }
    if (threadIdx.x == 0) *counter = 0;
}

// Attention for decode and verify steps (T <= 16 queries) over an f32 KV cache
// [capacity, kvHeads, dim] per layer: GQA, sliding windows over a ring of slots (position %
// capacity), sink logits that join the softmax but not the output, key dim != value dim
// (MiMo 192 / 128), and non-causal blocks (the DFlash drafter: a query also sees the step's
// later keys, up to its window).
//
// Budget per layer and step: every query head reads its KV head's keys and values in its
// window: T * heads * L * (dk + dv) * 4 bytes through L2, of which kvHeads * L * (dk + dv) * 4
// come from memory (the heads of a group share them). gpt-oss-20b at L = 1024 full / 128
// window: 8 * 1024 * 128 * 4 = 4 MB from memory on a full layer (1 us at 4 TB/s), small next
// to the layer's 55 MB of weights; flops 4 * T * heads * L * d, negligible.
// Version 2 splits each (head, token)'s keys over several blocks (flash-decoding) and merges
// the shares in the last block to finish.

#include "common.cuh"

namespace attention {

constexpr int kThreads = 128;

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float m = scratch[0];
    for (int i = 1; i < kThreads / 32; ++i) m = fmaxf(m, scratch[i]);
    return m;
}

__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float s = 0.f;
    for (int i = 0; i < kThreads / 32; ++i) s += scratch[i];
    return s;
}

}  // namespace attention

// out[t, h * valueDim ..] = softmax over keys j in the query's range of (q . k_j * scale),
// with the head's sink logit in the denominator, times v_j. Query t's position is
// positions[t]; its keys run from max(0, pos - window + 1) (window 0: from 0) to pos
// (causal) or, non-causal, to min(positions[T - 1], pos + window - 1).
//
// The keys are split over gridDim.z blocks per (head, token) so that a decode step has
// hundreds of blocks in flight, not one per head (version 1: 59 us a layer at 512 positions
// on an H200, half of a gpt-oss step). Each block walks its share in chunks of 64 keys with an
// online softmax and writes (max, sum, unnormalized output) to `partial`; the last block of
// the (head, token) to finish (an arrival counter, reset by that block) merges the shares
// and the sink. Grid (heads, T, splits), 128 threads, dynamic shared memory headDim floats.
// partial: [T, heads, splits, valueDim + 2] floats; counters: [T, heads] ints, zero between calls.
// valueDim <= 256. Continuous batching: with `slots` set, the cache holds one sequence per slot,
// slot-major ([slots, capacity, kvHeads, dim]), and row t reads slot slots[t]'s (causal rows
// only: a non-causal row's range ends at row T - 1's position, which is one sequence's).
namespace attention {
constexpr int kChunk = 64, kMaxSplits = 16, kValueBatch = 8;
}

extern "C" __global__ void __launch_bounds__(128, 8) attention_decode(
    const float* q, int qStride, const float* cacheK, const float* cacheV, int capacity, int heads, int kvHeads,
    int headDim, int valueDim, const int* positions, int T, int window, int causal, const float* sinks, float scale,
    float* out, int outStride, float* partial, int* counters, const int* slots) {
    using namespace attention;
    extern __shared__ float qs[];  // headDim
    __shared__ float p[kChunk];
    __shared__ float scratch[kThreads / 32];
    __shared__ float merge[kThreads];
    __shared__ int last;
    wait_for_previous_kernel();
    allow_next_kernel();
    const int h = blockIdx.x, t = blockIdx.y, split = blockIdx.z, splits = gridDim.z, kvh = h / (heads / kvHeads);
    if (slots) {
        cacheK += (size_t)slots[t] * capacity * kvHeads * headDim;
        cacheV += (size_t)slots[t] * capacity * kvHeads * valueDim;
    }
    const int pos = positions[t], lastPos = positions[T - 1];
    const int first = window > 0 ? max(0, pos - window + 1) : 0;
    const int end = causal ? pos : window > 0 ? min(lastPos, pos + window - 1) : lastPos;
    const int per = (end - first + splits) / splits;  // ceil((end - first + 1) / splits)
    const int lo = first + split * per, hi = min(end, lo + per - 1);
    for (int i = threadIdx.x; i < headDim; i += kThreads) qs[i] = q[(size_t)t * qStride + h * headDim + i];
    __syncthreads();
    // Scores: two threads per key, each half of the dimensions. Values: a thread per value
    // dimension (two when valueDim > 128), and for valueDim <= 64 two groups of threads
    // taking alternate keys.
    const int key = threadIdx.x / 2, half = threadIdx.x & 1, halfDim = headDim / 2;
    const bool vectorK = headDim % 8 == 0;
    const int groups = valueDim <= 64 ? 2 : 1, group = valueDim <= 64 ? threadIdx.x / 64 : 0;
    const int d0 = valueDim <= 64 ? threadIdx.x % 64 : threadIdx.x;
    float m = -INFINITY, l = 0.f, acc[2] = {0.f, 0.f};
    for (int c0 = lo; c0 <= hi; c0 += kChunk) {
        const int j = c0 + key;
        float s = 0.f;
        if (j <= hi) {
            const float* kr = cacheK + ((size_t)(j % capacity) * kvHeads + kvh) * headDim;
            if (vectorK) {
                // 4 float4 loads in flight before the first use (more cost registers: at 122 a
                // thread, 4 blocks fit an SM and verify steps of 8-16 tokens got 10-20% slower).
                const int i0 = half * halfDim, i1 = i0 + halfDim;
                for (int b = i0; b < i1; b += 16) {
                    float4 kv[4];
#pragma unroll
                    for (int u = 0; u < 4; ++u)
                        if (b + 4 * u < i1) kv[u] = *reinterpret_cast<const float4*>(kr + b + 4 * u);
#pragma unroll
                    for (int u = 0; u < 4; ++u) {
                        const int i = b + 4 * u;
                        if (i < i1) { s = fmaf(qs[i], kv[u].x, s); s = fmaf(qs[i + 1], kv[u].y, s); s = fmaf(qs[i + 2], kv[u].z, s); s = fmaf(qs[i + 3], kv[u].w, s); }
                    }
                }
            } else if (half == 0) {
                for (int i = 0; i < headDim; ++i) s = fmaf(qs[i], kr[i], s);
            }
        }
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        s = j <= hi ? s * scale : -INFINITY;
        const float mNew = fmaxf(m, block_max(s, scratch));
        const float e = j <= hi ? expf(s - mNew) : 0.f;
        if (half == 0) p[key] = e;
        const float correction = expf(m - mNew);  // 0 on the first chunk (m = -inf)
        l = l * correction + block_sum(half == 0 ? e : 0.f, scratch);  // its barriers also publish p
        m = mNew;
        const int count = min(kChunk, hi - c0 + 1);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int d = d0 + r * kThreads;
            if (d >= valueDim || (r == 1 && valueDim <= 64)) break;
            float a = acc[r] * correction;
            const float* vcol = cacheV + (size_t)kvh * valueDim + d;
            // kValueBatch value loads in flight before the first use.
            for (int jb = group; jb < count; jb += kValueBatch * groups) {
                float vv[kValueBatch];
#pragma unroll
                for (int u = 0; u < kValueBatch; ++u) {
                    const int jj = jb + u * groups;
                    vv[u] = jj < count ? vcol[(size_t)((c0 + jj) % capacity) * kvHeads * valueDim] : 0.f;
                }
#pragma unroll
                for (int u = 0; u < kValueBatch; ++u) {
                    const int jj = jb + u * groups;
                    if (jj < count) a = fmaf(p[jj], vv[u], a);
                }
            }
            acc[r] = a;
        }
        __syncthreads();  // p is rewritten by the next chunk
    }
    // This block's share: (m, l, acc) with the two key groups of small value heads merged.
    float* mine = partial + (((size_t)t * heads + h) * splits + split) * (valueDim + 2);
    if (groups == 2) {
        merge[threadIdx.x] = acc[0];
        __syncthreads();
        if (group == 0) acc[0] += merge[threadIdx.x + 64];
    }
    if (group == 0) {
        for (int r = 0; r < 2; ++r) {
            const int d = d0 + r * kThreads;
            if (d < valueDim && !(r == 1 && valueDim <= 64)) mine[2 + d] = acc[r];
        }
    }
    if (threadIdx.x == 0) { mine[0] = m; mine[1] = l; }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        const int arrived = atomicAdd(counters + t * heads + h, 1);
        last = arrived == splits - 1;
        if (last) counters[t * heads + h] = 0;  // ready for the next call
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    const float* shares = partial + ((size_t)t * heads + h) * splits * (valueDim + 2);
    // Every share's (max, sum) loaded at once, then each output dimension's shares at once
    // (the loops over splits were chains of dependent L2 loads). splits <= kMaxSplits
    // (CUDAExecutor.attentionSplits). Same sums in the same order as before.
    float w[kMaxSplits];  // each share's max, then its weight exp(max - M) (0 for an empty share)
#pragma unroll
    for (int s = 0; s < kMaxSplits; ++s) w[s] = s < splits ? __ldcg(shares + s * (valueDim + 2)) : -INFINITY;
    float M = sinks ? sinks[h] : -INFINITY;
#pragma unroll
    for (int s = 0; s < kMaxSplits; ++s) M = fmaxf(M, w[s]);
    float L = sinks ? expf(sinks[h] - M) : 0.f;
#pragma unroll
    for (int s = 0; s < kMaxSplits; ++s) {
        const bool some = w[s] != -INFINITY;
        w[s] = some ? expf(w[s] - M) : 0.f;
        if (some) L += __ldcg(shares + s * (valueDim + 2) + 1) * w[s];
    }
    for (int d = threadIdx.x; d < valueDim; d += kThreads) {
        float o = 0.f;
#pragma unroll
        for (int s0 = 0; s0 < kMaxSplits; s0 += 8) {
            float sh[8];
#pragma unroll
            for (int u = 0; u < 8; ++u) sh[u] = s0 + u < splits && w[s0 + u] != 0.f ? __ldcg(shares + (s0 + u) * (valueDim + 2) + 2 + d) : 0.f;
#pragma unroll
            for (int u = 0; u < 8; ++u)
                if (w[s0 + u] != 0.f) o += sh[u] * w[s0 + u];
        }
        out[(size_t)t * outStride + h * valueDim + d] = o / L;
    }
}

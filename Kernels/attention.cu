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
// This version is one block per (head, token) walking its keys in chunks of 128 with an
// online softmax: right for the short contexts of the decode benchmarks; long contexts want
// the keys split across blocks (flash-decoding), which this does not do yet.

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
// (causal) or, non-causal, to min(positions[T - 1], pos + window - 1). Grid (heads, T),
// 128 threads, dynamic shared memory (headDim + 128) floats. valueDim <= 256.
extern "C" __global__ void __launch_bounds__(128) attention_decode(
    const float* q, int qStride, const float* cacheK, const float* cacheV, int capacity, int heads, int kvHeads,
    int headDim, int valueDim, const int* positions, int T, int window, int causal, const float* sinks, float scale,
    float* out, int outStride) {
    using namespace attention;
    extern __shared__ float shared[];
    float* qs = shared;             // headDim
    float* p = shared + headDim;    // kThreads probabilities of the current chunk
    __shared__ float scratch[kThreads / 32];
    wait_for_previous_kernel();
    allow_next_kernel();
    const int h = blockIdx.x, t = blockIdx.y, kvh = h / (heads / kvHeads);
    const int pos = positions[t], last = positions[T - 1];
    const int first = window > 0 ? max(0, pos - window + 1) : 0;
    const int end = causal ? pos : window > 0 ? min(last, pos + window - 1) : last;
    for (int i = threadIdx.x; i < headDim; i += kThreads) qs[i] = q[(size_t)t * qStride + h * headDim + i];
    __syncthreads();
    // Running max and denominator; the sink starts them as a logit that has no value.
    float m = sinks ? sinks[h] : -INFINITY, l = sinks ? 1.f : 0.f;
    float acc[2] = {0.f, 0.f};  // value dims threadIdx.x and threadIdx.x + 128
    const bool vectorK = headDim % 4 == 0;
    for (int c0 = first; c0 <= end; c0 += kThreads) {
        const int j = c0 + threadIdx.x;
        float s = -INFINITY;
        if (j <= end) {
            const float* kr = cacheK + ((size_t)(j % capacity) * kvHeads + kvh) * headDim;
            float d = 0.f;
            if (vectorK) {
                for (int i = 0; i < headDim; i += 4) {
                    const float4 kv = *reinterpret_cast<const float4*>(kr + i);
                    d = fmaf(qs[i], kv.x, d); d = fmaf(qs[i + 1], kv.y, d); d = fmaf(qs[i + 2], kv.z, d); d = fmaf(qs[i + 3], kv.w, d);
                }
            } else {
                for (int i = 0; i < headDim; ++i) d = fmaf(qs[i], kr[i], d);
            }
            s = d * scale;
        }
        const float mNew = fmaxf(m, block_max(s, scratch));
        const float e = j <= end ? expf(s - mNew) : 0.f;
        p[threadIdx.x] = e;
        const float correction = expf(m - mNew);  // 0 while m is -inf (no sink, first chunk)
        l = l * correction + block_sum(e, scratch);  // block_sum's barriers also publish p
        m = mNew;
        const int count = min(kThreads, end - c0 + 1);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int d = threadIdx.x + r * kThreads;
            if (d >= valueDim) break;
            float a = acc[r] * correction;
            for (int jj = 0; jj < count; ++jj)
                a = fmaf(p[jj], cacheV[((size_t)((c0 + jj) % capacity) * kvHeads + kvh) * valueDim + d], a);
            acc[r] = a;
        }
        __syncthreads();  // p is rewritten by the next chunk
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int d = threadIdx.x + r * kThreads;
        if (d < valueDim) out[(size_t)t * outStride + h * valueDim + d] = acc[r] / l;
    }
}

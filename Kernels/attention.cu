// Attention for decode and verify steps (T <= 16 queries) over an f32 KV cache
// [capacity, kvHeads, dim] per layer: GQA, sliding windows over a ring of slots (position %
// capacity), sink logits that join the softmax but not the output, key dim != value dim
// (MiMo 192 / 128), and non-causal blocks (the DFlash drafter: a query also sees the step's
// later keys, up to its window).
//
// Budget per layer and step: each token reads its KV heads' keys and values in its window once
// for the whole query-head group: T * kvHeads * L * (dk + dv) * 4 bytes through L2, of which
// kvHeads * L * (dk + dv) * 4 come from memory; the split shares add
// 2 * T * heads * splits * (dv + 2) * 4 (written, then read by the merge). gpt-oss-20b, T = 8,
// L = 512 on a full layer: 16.8 MB through L2 (version 2, a block per query head: 134 MB),
// 2.1 MB of memory, 2 x 2.2 MB of shares; flops 4 * T * heads * L * d = 67 MFLOP, negligible.
// The bound is latency: each block's chain of one copy round, four barriers a 64-key chunk, an
// arrival counter and, in the last block, the merge.
// Version 2 split each (head, token)'s keys over several blocks (flash-decoding) and merged the
// shares in the last block to finish; version 3 (this one) gives a block the whole query-head
// group of a KV head, so each key and value is copied into shared memory once for G heads.

#include "common.cuh"

namespace attention {

constexpr int kThreads = 128, kChunk = 64, kMaxSplits = 16, kMaxGroup = 16;
// A block per KV head's group (version 3) takes up to kMaxGroupedSplits shares of a long range
// (CUDAExecutor's long-context steps); its merge reads them kSplitBatch at a time. A block per
// query head (version 4) keeps kMaxSplits.
constexpr int kMaxGroupedSplits = 64, kSplitBatch = 16;
static_assert(kThreads == 2 * kChunk, "scores: two threads per key of a chunk");

// The keys of share `split` of `splits` for query row t (the kernels' top comments give the range).
__device__ __forceinline__ void key_range(const int* positions, int T, int t, int window, int causal, int split, int splits, int& lo, int& hi) {
    const int pos = positions[t], lastPos = positions[T - 1];
    const int first = window > 0 ? max(0, pos - window + 1) : 0;
    const int end = causal ? pos : window > 0 ? min(lastPos, pos + window - 1) : lastPos;
    const int per = (end - first + splits) / splits;  // ceil((end - first + 1) / splits)
    lo = first + split * per;
    hi = min(end, lo + per - 1);
}

// Called before waiting for the kernel before this one: asks L2 for the key and value rows of
// keys [lo, hi] that earlier steps wrote, so the loads after the wait find them in L2 instead of
// DRAM (at 1 token the kernel is a chain of dependent loads, not bytes). Keys before
// positions[t] - t are old in any step (a step's rows of one sequence are consecutive
// positions); the step's own keys are being written by attention_prep and are left alone.
// positions and the older rows are safe to read now: attention_prep lets this launch start
// only after its own wait, so every kernel before it is done. A prefetch never changes what a
// later load returns (L2 is where global memory is coherent), only how soon.
__device__ __forceinline__ void prefetch_old_keys(const float* cacheK, const float* cacheV, int capacity, int kvHeads, int kvh, int headDim,
                                                  int valueDim, const int* positions, int t, int lo, int hi) {
    const int last = min(hi, positions[t] - t - 1);
    const int kLines = (headDim * 4 + 127) / 128, vLines = (valueDim * 4 + 127) / 128, lines = kLines + vLines;
    for (int i = threadIdx.x; i < (last - lo + 1) * lines; i += kThreads) {
        const int j = lo + i / lines, l = i - (i / lines) * lines;
        const float* p = l < kLines ? cacheK + ((size_t)(j % capacity) * kvHeads + kvh) * headDim + 32 * l
                                    : cacheV + ((size_t)(j % capacity) * kvHeads + kvh) * valueDim + 32 * (l - kLines);
        asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
    }
}

// Rows r < rows of `width` floats into shared rows `stride` floats apart; row r is source row
// (first + r) mod ring, rows srcStride floats apart (first < ring). 16-byte copies when
// `vector` (width % 4 == 0, 16-byte aligned rows), else 4-byte ones. A unit (16 or 4 bytes)
// per thread, kThreads / units rows at a time; no division per row (the ring wraps by
// subtraction, at most once a row when the chunk is shorter than the ring).
__device__ __forceinline__ void copy_rows(float* dst, int stride, int rows, int width, bool vector, const float* src, size_t srcStride,
                                          int first, int ring) {
    const int size = vector ? 4 : 1, units = width / size;
    if (units <= kThreads) {
        const int perPass = kThreads / units, r0 = threadIdx.x / units, c = (threadIdx.x - r0 * units) * size;
        if (r0 >= perPass) return;
        int slot = first + r0;
        while (slot >= ring) slot -= ring;
        for (int r = r0; r < rows; r += perPass) {
            if (vector) copy16(dst + r * stride + c, src + slot * srcStride + c);
            else copy4(dst + r * stride + c, src + slot * srcStride + c);
            slot += perPass;
            while (slot >= ring) slot -= ring;
        }
    } else {
        int slot = first;
        for (int r = 0; r < rows; ++r) {
            for (int c = threadIdx.x * size; c < width; c += kThreads * size) {
                if (vector) copy16(dst + r * stride + c, src + slot * srcStride + c);
                else copy4(dst + r * stride + c, src + slot * srcStride + c);
            }
            if (++slot == ring) slot = 0;
        }
    }
}

// P.V for this thread's NU heads (hl * NU + u) and dimension d over the chunk's `count` keys,
// on top of its running output rescaled by the heads' corrections. p: [kChunk][pStride]
// probabilities, heads contiguous (NU of them read at once).
template <int NU>
__device__ __forceinline__ void pv(float* os, const float* vs, const float* p, const float* corr, int pStride, int valueDim,
                                   int count, int hl, int d) {
    const int g0 = hl * NU;
    float a[NU];
#pragma unroll
    for (int u = 0; u < NU; ++u) a[u] = os[(g0 + u) * valueDim + d] * corr[g0 + u];
#pragma unroll 2
    for (int j = 0; j < count; ++j) {
        const float v = vs[j * valueDim + d];
        const float* pj = p + j * pStride + g0;
        float pu[NU];
        if constexpr (NU % 4 == 0) {
#pragma unroll
            for (int u = 0; u < NU; u += 4) {
                const float4 f = *reinterpret_cast<const float4*>(pj + u);
                pu[u] = f.x; pu[u + 1] = f.y; pu[u + 2] = f.z; pu[u + 3] = f.w;
            }
        } else if constexpr (NU == 2) {
            const float2 f = *reinterpret_cast<const float2*>(pj);
            pu[0] = f.x; pu[1] = f.y;
        } else {
            pu[0] = pj[0];
        }
#pragma unroll
        for (int u = 0; u < NU; ++u) a[u] = fmaf(pu[u], v, a[u]);
    }
#pragma unroll
    for (int u = 0; u < NU; ++u) os[(g0 + u) * valueDim + d] = a[u];
}

// Dynamic shared memory, floats in this order (CUDAExecutor.attentionDecodeSharedBytes mirrors
// it): V chunk kChunk * valueDim, K chunk kChunk * kStride, q GMAX * kStride (rounded up to 4),
// probabilities kChunk * GMAX, outputs GMAX * valueDim. GMAX: G rounded up to a power of two
// (the rows of heads G..GMAX-1 hold zero q and are never written out). kStride pads a key row
// by 4 floats so a 16-byte read of 8 consecutive keys hits 8 bank groups (headDim % 8 == 0;
// else 1 float, and 4-byte reads).
__device__ __forceinline__ int key_stride(int headDim) { return headDim + (headDim % 8 == 0 ? 4 : 1); }

// attention_prep's work for one sequence's step of T <= kMaxPrepRows tokens, done in
// attention_decode_h1p instead of a launch before it: q, k and v as the q/k/v product wrote
// them (before the head norms, RoPE and value scale), and attention_prep's other arguments.
constexpr int kMaxPrepRows = 3;
struct FusedPrep {
    const float* k; int kStride; const float* v; int vStride;
    const float* qNorm; const float* kNorm; float eps;
    int rotaryDim; int neox; const double* invFreq; double attnFactor; float vScale;
};

// Per head of the group: running max, sum and last rescale; in the merge, the shares' weights
// and the denominator. In the kernel, not in decode<>, so its five instances share one copy.
template <int MaxSplits>
struct HeadState {
    static_assert(MaxSplits % kSplitBatch == 0, "the merge reads whole batches of weights");
    float mrun[kMaxGroup], lrun[kMaxGroup], corr[kMaxGroup];
    float weight[kMaxGroup][MaxSplits], total[kMaxGroup];
    int last;
};

// PerHead (GMAX = 1): the block takes one query head (blockIdx.x) of its KV head's group, as
// version 2's grid does, with this chunk pipeline (attention_decode_h1, 1-3 tokens).
// With `prep` (PerHead, one sequence, T <= kMaxPrepRows): q, and the step's own key and value
// rows, are made here from the raw q/k/v rows as attention_prep makes them (same arithmetic,
// same order: the same values), the step's rows taken from shared memory instead of the
// cache, and one block of each KV head (query head 0 of its group, row 0, split 0) writes them
// to the cache for later steps. No block of this launch reads those cache rows.
template <int GMAX, bool PerHead = false, int MaxSplits = PerHead ? kMaxSplits : kMaxGroupedSplits>
__device__ __forceinline__ void decode(const float* q, int qStride, const float* cacheK, const float* cacheV, int capacity, int heads,
                                       int kvHeads, int headDim, int valueDim, const int* positions, int T, int window, int causal,
                                       const float* sinks, float scale, float* out, int outStride, float* partial, int* counters,
                                       float* shared, HeadState<MaxSplits>& st, const FusedPrep* prep = nullptr) {
    static_assert(!PerHead || GMAX == 1, "a block per query head has a group of one");
    float* mrun = st.mrun;
    float* lrun = st.lrun;
    float* corr = st.corr;
    int& last = st.last;
    const int G = PerHead ? 1 : heads / kvHeads, t = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    const int kvh = PerHead ? blockIdx.x / (heads / kvHeads) : blockIdx.x, h0 = PerHead ? blockIdx.x : kvh * G;
    const bool vectorK = headDim % 8 == 0, vectorV = valueDim % 4 == 0;
    const int kStride = key_stride(headDim);
    float* vs = shared;
    float* ks = vs + kChunk * valueDim;
    float* qs = ks + kChunk * kStride;
    float* ps = qs + ((GMAX * kStride + 3) & ~3);
    float* os = ps + kChunk * GMAX;

    int lo, hi;
    key_range(positions, T, t, window, causal, split, splits, lo, hi);

    // P.V layout: a thread per value dimension (DT of them; two passes when valueDim > 128)
    // and NU consecutive heads; two head halves when the value heads are small.
    const int HT = valueDim <= 64 && GMAX >= 2 ? 2 : 1, DT = kThreads / HT;
    const int hl = threadIdx.x / DT, dl = threadIdx.x % DT;
    constexpr int NU1 = GMAX, NU2 = GMAX >= 2 ? GMAX / 2 : 1;
    const int NU = HT == 2 ? NU2 : NU1;
    for (int d = dl; d < valueDim; d += DT)
        for (int u = 0; u < NU; ++u) os[(hl * NU + u) * valueDim + d] = 0.f;
    if (threadIdx.x < kMaxGroup) { mrun[threadIdx.x] = -INFINITY; lrun[threadIdx.x] = 0.f; corr[threadIdx.x] = 0.f; }
    // The step's own rows (with prep): raw q and key rows staged, then normalized, then rotated
    // into qs and newK; values scaled into newV.
    float* raw = os + GMAX * valueDim;                       // (1 + T) x headDim
    float* newK = raw + (1 + kMaxPrepRows) * headDim;        // T x headDim
    float* newV = newK + kMaxPrepRows * headDim;             // T x valueDim
    float* rot = newV + kMaxPrepRows * valueDim;             // (1 + T) x rotaryDim: cos, sin by pair
    const int first = positions[0];
    if (prep) {
        // Before the wait (decode_entry leaves it to here): what does not depend on the q/k/v
        // product. The first chunk's rows older than the step were written by earlier steps,
        // and the positions by a launch the previous kernel waited for, so their copies and
        // the rotary factors (fp64 sincos) go first and overlap the wait and the prep loads.
        if (lo <= hi) {
            const int count = min(kChunk, hi - lo + 1), old = max(0, min(count, first - lo));
            copy_rows(ks, kStride, old, headDim, vectorK, cacheK + (size_t)kvh * headDim, (size_t)kvHeads * headDim, lo % capacity, capacity);
            copy_rows(vs, valueDim, old, valueDim, vectorV, cacheV + (size_t)kvh * valueDim, (size_t)kvHeads * valueDim, lo % capacity, capacity);
        }
        const int pairs = prep->rotaryDim / 2;
        for (int i = threadIdx.x; i < (1 + T) * pairs; i += kThreads) {
            const int r = i / pairs, pair = i - r * pairs;
            const float2 f = rope_factors(positions[r == 0 ? t : r - 1], prep->invFreq, pair, prep->attnFactor);
            rot[r * prep->rotaryDim + 2 * pair] = f.x;
            rot[r * prep->rotaryDim + 2 * pair + 1] = f.y;
        }
        wait_for_previous_kernel();
        allow_next_kernel();
        __shared__ float scratch[32];
        float sum[1 + kMaxPrepRows] = {};
        for (int i = threadIdx.x; i < headDim; i += kThreads) {
            raw[i] = q[(size_t)t * qStride + (size_t)h0 * headDim + i];
            sum[0] += raw[i] * raw[i];
            for (int r = 0; r < T; ++r) {
                float& kr = raw[(1 + r) * headDim + i];
                kr = prep->k[(size_t)r * prep->kStride + (size_t)kvh * headDim + i];
                sum[1 + r] += kr * kr;
            }
        }
        for (int i = threadIdx.x; i < valueDim; i += kThreads)
            for (int r = 0; r < T; ++r) newV[r * valueDim + i] = prep->v[(size_t)r * prep->vStride + (size_t)kvh * valueDim + i] * prep->vScale;
        for (int r = 0; r <= T; ++r) {
            const float* weight = r == 0 ? prep->qNorm : prep->kNorm;
            if (!weight) continue;
            const float inv = rsqrtf(block_sum_all(sum[r], scratch) / headDim + prep->eps);
            for (int i = threadIdx.x; i < headDim; i += kThreads) raw[r * headDim + i] = weight[i] * (raw[r * headDim + i] * inv);
        }
        __syncthreads();
        for (int r = 0; r <= T; ++r) {
            const float* head = raw + r * headDim;
            float* dst = r == 0 ? qs : newK + (r - 1) * headDim;
            for (int i = threadIdx.x; i < headDim; i += kThreads) {
                float o = head[i];
                if (i < prep->rotaryDim) {
                    const float* f = rot + r * prep->rotaryDim + 2 * rope_pair(i, prep->rotaryDim, prep->neox);
                    o = rope_rotate(head, i, prep->rotaryDim, prep->neox, make_float2(f[0], f[1]));
                }
                dst[i] = o;
            }
        }
        __syncthreads();
        if (h0 % (heads / kvHeads) == 0 && t == 0 && split == 0)
            for (int r = 0; r < T; ++r) {
                const int at = positions[r] % capacity;
                for (int i = threadIdx.x; i < headDim; i += kThreads)
                    const_cast<float*>(cacheK)[((size_t)at * kvHeads + kvh) * headDim + i] = newK[r * headDim + i];
                for (int i = threadIdx.x; i < valueDim; i += kThreads)
                    const_cast<float*>(cacheV)[((size_t)at * kvHeads + kvh) * valueDim + i] = newV[r * valueDim + i];
            }
    } else if (lo <= hi) {
        // q of the group's heads (zero rows up to GMAX); joins the first chunk's copies.
        const float* qt = q + (size_t)t * qStride + (size_t)h0 * headDim;
        copy_rows(qs, kStride, G, headDim, false, qt, headDim, 0, G);
        for (int i = G * headDim + threadIdx.x; i < GMAX * headDim; i += kThreads) qs[(i / headDim) * kStride + i % headDim] = 0.f;
    }

    // Scores: two threads per key; with two heads or more each takes every other head over all
    // dimensions, with one head each takes every other 4-float group (summed by a shuffle).
    const int key = threadIdx.x >> 1, part = threadIdx.x & 1;
    constexpr int SU = GMAX >= 2 ? GMAX / 2 : 1;
    const int gFirst = GMAX >= 2 ? part : 0;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int c0 = lo; c0 <= hi; c0 += kChunk) {
        const int count = min(kChunk, hi - c0 + 1);
        const int slot = c0 % capacity;
        // With prep, the step's own rows (positions first ..) come from shared memory, and the
        // first chunk's older rows were copied before the wait.
        const int old = prep ? max(0, min(count, first - c0)) : count;
        if (!prep || c0 != lo) {
            copy_rows(ks, kStride, old, headDim, vectorK, cacheK + (size_t)kvh * headDim, (size_t)kvHeads * headDim, slot, capacity);
            copy_rows(vs, valueDim, old, valueDim, vectorV, cacheV + (size_t)kvh * valueDim, (size_t)kvHeads * valueDim, slot, capacity);
        }
        for (int j = old; j < count; ++j) {
            const int r = c0 + j - first;
            for (int i = threadIdx.x; i < headDim; i += kThreads) ks[j * kStride + i] = newK[r * headDim + i];
            for (int i = threadIdx.x; i < valueDim; i += kThreads) vs[j * valueDim + i] = newV[r * valueDim + i];
        }
        copies_done();
        __syncthreads();  // K, V (and q, the zeroed rows, the running state) visible to all

        float s[SU];
#pragma unroll
        for (int u = 0; u < SU; ++u) s[u] = 0.f;
        if (key < count) {
            const float* kr = ks + key * kStride;
            const int step = GMAX >= 2 ? 1 : 2;
            if (vectorK) {
#pragma unroll 2
                for (int c = GMAX >= 2 ? 0 : 4 * part; c < headDim; c += 4 * step) {
                    const float4 k4 = *reinterpret_cast<const float4*>(kr + c);
#pragma unroll
                    for (int u = 0; u < SU; ++u) {
                        const float4 q4 = *reinterpret_cast<const float4*>(qs + (gFirst + 2 * u) * kStride + c);
                        s[u] = fmaf(q4.x, k4.x, s[u]); s[u] = fmaf(q4.y, k4.y, s[u]); s[u] = fmaf(q4.z, k4.z, s[u]); s[u] = fmaf(q4.w, k4.w, s[u]);
                    }
                }
            } else {
                for (int c = GMAX >= 2 ? 0 : part; c < headDim; c += step) {
                    const float kc = kr[c];
#pragma unroll
                    for (int u = 0; u < SU; ++u) s[u] = fmaf(qs[(gFirst + 2 * u) * kStride + c], kc, s[u]);
                }
            }
        }
        if (GMAX == 1) s[0] += __shfl_xor_sync(0xffffffffu, s[0], 1);
        if (GMAX >= 2 || part == 0) {
#pragma unroll
            for (int u = 0; u < SU; ++u) ps[key * GMAX + gFirst + 2 * u] = key < count ? s[u] * scale : -INFINITY;
        }
        __syncthreads();  // the chunk's scores

        // Online softmax, a warp per head: the chunk's max, its probabilities in place, the
        // head's new running max and sum, and the factor its running output is rescaled by.
        for (int g = warp; g < G; g += kThreads / 32) {
            const float a = ps[lane * GMAX + g], b = ps[(lane + 32) * GMAX + g];
            float cm = fmaxf(a, b);
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, o));
            const float mOld = mrun[g], mNew = fmaxf(mOld, cm);  // finite: the chunk has a key
            const float ea = lane < count ? expf(a - mNew) : 0.f, eb = lane + 32 < count ? expf(b - mNew) : 0.f;
            ps[lane * GMAX + g] = ea;
            ps[(lane + 32) * GMAX + g] = eb;
            // Every lane's read of mrun[g] feeds the sum, so lane 0 writes after all have read.
            const float sum = warp_sum(ea + eb);
            if (lane == 0) {
                const float c = expf(mOld - mNew);  // 0 on the first chunk (mOld = -inf)
                corr[g] = c;
                lrun[g] = lrun[g] * c + sum;
                mrun[g] = mNew;
            }
        }
        __syncthreads();  // probabilities and corrections

        for (int d = dl; d < valueDim; d += DT) {
            if (HT == 2) pv<NU2>(os, vs, ps, corr, GMAX, valueDim, count, hl, d);
            else pv<NU1>(os, vs, ps, corr, GMAX, valueDim, count, hl, d);
        }
        __syncthreads();  // K, V and p are rewritten by the next chunk
    }
    FULGUR_TRACE_MARK(0);

    if (PerHead && splits == 1) {
        // One share (a short range: the drafter's sliding layers, a few-token step's wave): the
        // merge below on this block's own state, with the same arithmetic in the same order (the
        // same outputs), and no round trip through `partial`, no arrival. Version 4 only: in
        // version 3's entries the extra code cost attention_decode_g16 spills (2 -> 4 stores).
        __syncthreads();  // the running state, also when the range was empty (no chunk ran)
        for (int i = threadIdx.x; i < G * valueDim; i += kThreads) {
            const int g = i / valueDim, d = i - g * valueDim;
            const float m = mrun[g], sink = sinks ? sinks[h0 + g] : -INFINITY, M = fmaxf(sink, m);
            const bool some = m != -INFINITY;
            const float w = some ? expf(m - M) : 0.f;
            float L = sinks ? expf(sink - M) : 0.f;
            if (some) L += lrun[g] * w;
            float o = 0.f;
            if (w != 0.f) o += os[g * valueDim + d] * w;
            out[(size_t)t * outStride + (h0 + g) * valueDim + d] = o / L;
        }
        FULGUR_TRACE_MARK(1);
        return;
    }

    // This block's shares, each thread its own outputs (and head g's thread g its max and sum).
    const size_t shareFloats = valueDim + 2;
    float* mine = partial + (((size_t)t * heads + h0) * splits + split) * shareFloats;  // head g at + g * splits * shareFloats
    for (int d = dl; d < valueDim; d += DT)
        for (int u = 0; u < NU; ++u) {
            const int g = hl * NU + u;
            if (g < G) mine[g * splits * shareFloats + 2 + d] = os[g * valueDim + d];
        }
    if (threadIdx.x < G) {
        mine[threadIdx.x * splits * shareFloats] = mrun[threadIdx.x];
        mine[threadIdx.x * splits * shareFloats + 1] = lrun[threadIdx.x];
    }
    __threadfence();
    __syncthreads();
    // One arrival counter per (token, KV head): the slot of the group's first head.
    int* counter = counters + t * heads + h0;
    if (threadIdx.x == 0) {
        const int arrived = atomicAdd(counter, 1);
        last = arrived == splits - 1;
        if (last) *counter = 0;  // ready for the next call
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    FULGUR_TRACE_MARK(1);

    // The merge, by the last block: per head the overall max M (with the sink), each share's
    // weight exp(m_s - M) (0 for an empty share) and the denominator; then every output as the
    // weighted sum of its shares in split order (deterministic). The group's shares are one
    // contiguous run of G * splits * shareFloats floats (head g at + g * splits * shareFloats),
    // copied into shared memory (the chunk buffers, free now) with every 16-byte copy in flight
    // at once: one L2 round trip for as many heads as fit. Loads into registers (maxima, then
    // sums, then outputs) measured the same: 7-9 us a merge at 8 tokens (gpt-oss-20b, timeline
    // marks; 2-3 us of it o_proj's early weight traffic); the branchy (output, share) loop
    // before both, 16-22 us (Kernels/NOTES.md, ninth session). The copy is widened to 16-byte
    // boundaries: CUDAExecutor sizes `partial` in multiples of 16 floats from an aligned base, so
    // the few floats either side are inside it (another group's, never used). cp.async.cg reads
    // L2, where other blocks' shares are (L1 could hold stale lines of an earlier step's).
    const float* shares = partial + ((size_t)t * heads + h0) * splits * shareFloats;
    const int headFloats = splits * (int)shareFloats;
    const int room = kChunk * valueDim + kChunk * kStride + ((GMAX * kStride + 3) & ~3) + kChunk * GMAX + GMAX * valueDim;
    const int perBatch = min(G, (room - 8) / headFloats);  // >= 1: room >= kChunk * valueDim + ..., headFloats <= kChunk * (valueDim + 2)
    for (int g0 = 0; g0 < G; g0 += perBatch) {
        const int nb = min(perBatch, G - g0);
        const float* src = shares + (size_t)g0 * headFloats;
        const float* base = reinterpret_cast<const float*>(reinterpret_cast<uintptr_t>(src) & ~(uintptr_t)15);
        const int off = (int)(src - base), units = (off + nb * headFloats + 3) / 4;
        if (g0 > 0) __syncthreads();  // the previous batch's outputs have read `shared`
        for (int u = threadIdx.x; u < units; u += kThreads) copy16(shared + 4 * u, base + 4 * u);
        copies_done();
        __syncthreads();
        const float* buf = shared + off;  // head g0 + gl's share s at buf + (gl * splits + s) * shareFloats
        if (threadIdx.x < nb) {
            const int gl = threadIdx.x, g = g0 + gl;
            const float* own = buf + gl * headFloats;
            // Each share's max (splits <= MaxSplits: CUDAExecutor.attentionShape), kSplitBatch
            // loaded at once; then each weight exp(max - M) (0 for an empty share) and the sum.
            float M = sinks ? sinks[h0 + g] : -INFINITY;
            for (int s0 = 0; s0 < splits; s0 += kSplitBatch) {
                float w[kSplitBatch];
#pragma unroll
                for (int s = 0; s < kSplitBatch; ++s) w[s] = s0 + s < splits ? own[(s0 + s) * shareFloats] : -INFINITY;
#pragma unroll
                for (int s = 0; s < kSplitBatch; ++s) M = fmaxf(M, w[s]);
            }
            float L = sinks ? expf(sinks[h0 + g] - M) : 0.f;
            for (int s0 = 0; s0 < splits; s0 += kSplitBatch) {
                float w[kSplitBatch];
#pragma unroll
                for (int s = 0; s < kSplitBatch; ++s) w[s] = s0 + s < splits ? own[(s0 + s) * shareFloats] : -INFINITY;
#pragma unroll
                for (int s = 0; s < kSplitBatch; ++s) {
                    const bool some = w[s] != -INFINITY;
                    w[s] = some ? expf(w[s] - M) : 0.f;
                    if (some) L += own[(s0 + s) * shareFloats + 1] * w[s];
                    st.weight[gl][s0 + s] = w[s];
                }
            }
            st.total[gl] = L;
        }
        __syncthreads();
        // An output's shares and weights loaded kSplitBatch at once (predicated), then summed
        // in split order, skipping zero weights as before (the same sums). The loop it
        // replaces loaded each share behind its weight's test: a shared-memory round trip per
        // share, in series, on 4 warps (MiMo's group of 16 at 16 splits: 24 us a merge).
        for (int i = threadIdx.x; i < nb * valueDim; i += kThreads) {
            const int gl = i / valueDim, d = i - gl * valueDim;
            const float* own = buf + gl * headFloats + 2 + d;
            float o = 0.f;
            for (int s0 = 0; s0 < splits; s0 += kSplitBatch) {
                float v[kSplitBatch], w[kSplitBatch];
#pragma unroll
                for (int s = 0; s < kSplitBatch; ++s) {
                    w[s] = s0 + s < splits ? st.weight[gl][s0 + s] : 0.f;
                    v[s] = s0 + s < splits ? own[(s0 + s) * shareFloats] : 0.f;
                }
#pragma unroll
                for (int s = 0; s < kSplitBatch; ++s)
                    if (w[s] != 0.f) o += v[s] * w[s];
            }
            out[(size_t)t * outStride + (h0 + g0 + gl) * valueDim + d] = o / st.total[gl];
        }
    }
}

}  // namespace attention

// out[t, h * valueDim ..] = softmax over keys j in the query's range of (q . k_j * scale),
// with the head's sink logit in the denominator, times v_j. Query t's position is
// positions[t]; its keys run from max(0, pos - window + 1) (window 0: from 0) to pos
// (causal) or, non-causal, to min(positions[T - 1], pos + window - 1).
//
// A block takes one KV head's whole group of G = heads / kvHeads query heads (G <= 16) for one
// token and one share of its keys: grid (kvHeads, T, splits), 128 threads. Version 2 had a
// block per query head: 8192 blocks for an 8-token gpt-oss step, each reading its KV head's
// keys from L2 again (52 us a layer at 512 positions on an H200). The keys are split over
// gridDim.z blocks so that a decode step has hundreds of blocks in flight. Each block walks its
// share in chunks of 64 keys: the chunk's K and V rows are copied into shared memory once
// (all copies in flight together), then the G x 64 scores (two threads a key), a warp per
// head's online softmax, and P.V (a thread per value dimension and up to 16 heads). It writes
// each head's (max, sum, unnormalized output) to `partial`; the last block of the (token, KV
// head) to finish (an arrival counter, reset by that block) merges the shares and the sinks of
// all G heads. Dynamic shared memory: CUDAExecutor.attentionDecodeSharedBytes (gpt-oss 40 KB,
// MiMo qk192/v128 with G = 16 108 KB: the host raises the launch limit).
// partial: [T, heads, splits, valueDim + 2] floats; counters: [T, heads] ints, zero between
// calls (only each group's first head's is used). valueDim <= 256, splits <= 64 (kMaxGroupedSplits).
// Continuous batching: with `slots` set, the cache holds one sequence per slot, slot-major
// ([slots, capacity, kvHeads, dim]), and row t reads slot slots[t]'s (causal rows only: a
// non-causal row's range ends at row T - 1's position, which is one sequence's).
// One entry per padded group size GMAX (attention_decode_g1, _g2, _g4, _g8, _g16; the host picks
// GMAX = G rounded up to a power of two): a single kernel with all five instances measured 8.7
// of its 14.9 cycles between a warp's instructions waiting for instruction fetch (ncu, H100,
// gpt-oss-20b at 8 tokens: 48-55 us a launch).
template <int GMAX, bool PerHead = false>
__device__ __forceinline__ void decode_entry(const float* q, int qStride, const float* cacheK, const float* cacheV, int capacity, int heads,
                                             int kvHeads, int headDim, int valueDim, const int* positions, int T, int window, int causal,
                                             const float* sinks, float scale, float* out, int outStride, float* partial, int* counters,
                                             const int* slots, const attention::FusedPrep* prep = nullptr) {
    using namespace attention;
    extern __shared__ float4 shared4[];
    __shared__ HeadState<PerHead ? kMaxSplits : kMaxGroupedSplits> st;
    float* shared = reinterpret_cast<float*>(shared4);
    if (slots) {
        cacheK += (size_t)slots[blockIdx.y] * capacity * kvHeads * headDim;
        cacheV += (size_t)slots[blockIdx.y] * capacity * kvHeads * valueDim;
    }
    // No prefetch_old_keys for a group: measured (H100, gpt-oss-20b) it made the 8-token
    // step's attention 2% slower and the 16-token step 3% (every token row's blocks asked for
    // the same keys, and the chunks' cp.async copies are already all in flight at once). A
    // block per query head (1-3 tokens) asks as version 2 does: one head of each group, row 0.
    // With prep, decode copies the first chunk's old rows into shared memory before it waits.
    if (PerHead && !prep && blockIdx.x % (heads / kvHeads) == 0 && blockIdx.y == 0) {
        int lo, hi;
        key_range(positions, T, 0, window, causal, blockIdx.z, gridDim.z, lo, hi);
        prefetch_old_keys(cacheK, cacheV, capacity, kvHeads, blockIdx.x / (heads / kvHeads), headDim, valueDim, positions, 0, lo, hi);
    }
    if (!prep) {
        wait_for_previous_kernel();
        allow_next_kernel();
    }
    decode<GMAX, PerHead>(q, qStride, cacheK, cacheV, capacity, heads, kvHeads, headDim, valueDim, positions, T, window, causal, sinks,
                          scale, out, outStride, partial, counters, shared, st, prep);
}

#define ATTENTION_DECODE_ENTRY(GMAX)                                                                                          \
    extern "C" __global__ void __launch_bounds__(128, 6) attention_decode_g##GMAX(                                           \
        const float* q, int qStride, const float* cacheK, const float* cacheV, int capacity, int heads, int kvHeads,         \
        int headDim, int valueDim, const int* positions, int T, int window, int causal, const float* sinks, float scale,     \
        float* out, int outStride, float* partial, int* counters, const int* slots) { FULGUR_TRACE_KERNEL;                   \
        decode_entry<GMAX>(q, qStride, cacheK, cacheV, capacity, heads, kvHeads, headDim, valueDim, positions, T, window,    \
                           causal, sinks, scale, out, outStride, partial, counters, slots);                                  \
    }
ATTENTION_DECODE_ENTRY(1) ATTENTION_DECODE_ENTRY(2) ATTENTION_DECODE_ENTRY(4) ATTENTION_DECODE_ENTRY(8) ATTENTION_DECODE_ENTRY(16)
#undef ATTENTION_DECODE_ENTRY

// Version 4, for 1-3 tokens: version 2's grid (heads, T, splits), a block per query head, with
// version 3's chunk pipeline (decode<1, true>): q and the chunk's K and V rows copied into shared
// memory together, one round trip, then scores, softmax and P.V from shared memory. Version 2
// loads q, then K (two rounds of four 16-byte loads), then V (a round per 8 keys of a thread),
// each a dependent L2 round trip: 11-16 us a block for 64 keys (gpt-oss-20b, H200 timeline).
// Same arguments; dynamic shared memory CUDAExecutor.attentionDecodeSharedBytes for a group of one.
extern "C" __global__ void __launch_bounds__(128, 6) attention_decode_h1(
    const float* q, int qStride, const float* cacheK, const float* cacheV, int capacity, int heads, int kvHeads, int headDim,
    int valueDim, const int* positions, int T, int window, int causal, const float* sinks, float scale, float* out, int outStride,
    float* partial, int* counters, const int* slots) {
    FULGUR_TRACE_KERNEL;
    decode_entry<1, true>(q, qStride, cacheK, cacheV, capacity, heads, kvHeads, headDim, valueDim, positions, T, window, causal, sinks,
                          scale, out, outStride, partial, counters, slots);
}

// Version 4 with attention_prep's work in it (decode's `prep`): q, k, v are the q/k/v
// product's raw rows; one sequence (no slots), T <= 3. Dynamic shared memory: version 4's plus
// 4 * ((2 + 3 * kMaxPrepRows) * headDim + kMaxPrepRows * valueDim) bytes. attention_prep before
// attention added 2.6-2.9 us a layer to the gpt-oss-20b 1-token step (H200 timeline). Measured
// (H200, Kernels/NOTES.md, thirteenth session): the first version, which did the prep work
// before it asked for the old rows, made the 1-token step 1.2% slower; this one, the old rows'
// copies and the rotary factors before the wait, 2.040 -> 2.018 ms, while 2 and 3 tokens were
// 0.3-0.5% slower: the executor gives it one token (CUDAExecutor.prepTokens).
extern "C" __global__ void __launch_bounds__(128, 6) attention_decode_h1p(
    const float* q, int qStride, float* cacheK, float* cacheV, int capacity, int heads, int kvHeads, int headDim,
    int valueDim, const int* positions, int T, int window, int causal, const float* sinks, float scale, float* out, int outStride,
    float* partial, int* counters, const float* k, int kStride, const float* v, int vStride, const float* qNorm, const float* kNorm,
    float eps, int rotaryDim, int neox, const double* invFreq, double attnFactor, float vScale) {
    FULGUR_TRACE_KERNEL;
    const attention::FusedPrep prep{k, kStride, v, vStride, qNorm, kNorm, eps, rotaryDim, neox, invFreq, attnFactor, vScale};
    decode_entry<1, true>(q, qStride, cacheK, cacheV, capacity, heads, kvHeads, headDim, valueDim, positions, T, window, causal, sinks,
                          scale, out, outStride, partial, counters, nullptr, &prep);
}


// Version 2 (a block per query head): the executor launches it for steps under 4 tokens
// (CUDAExecutor.attentionShape), where version 3 measured slower on an H100 (1-token
// gpt-oss-20b step 2.49 against 2.80 ms; Kernels/NOTES.md, sixth session);
// FULGUR_ATTENTION_VERSION=2 or 3 takes one version at every T. Same arguments; grid
// (heads, T, splits), 128 threads, dynamic shared memory headDim floats.
namespace attention2 {

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

}  // namespace attention2

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
// and the sink. Grid (heads, T, splits), 128 threads, dynamic shared memory max(headDim,
// splits * (valueDim + 2) + 8) floats (q, then the merge's shares).
// partial: [T, heads, splits, valueDim + 2] floats; counters: [T, heads] ints, zero between calls.
// valueDim <= 256. Continuous batching: with `slots` set, the cache holds one sequence per slot,
// slot-major ([slots, capacity, kvHeads, dim]), and row t reads slot slots[t]'s (causal rows
// only: a non-causal row's range ends at row T - 1's position, which is one sequence's).
namespace attention2 {
constexpr int kChunk = 64, kMaxSplits = 16, kValueBatch = 8;
}

extern "C" __global__ void __launch_bounds__(128, 8) attention_decode_v2(
    const float* q, int qStride, const float* cacheK, const float* cacheV, int capacity, int heads, int kvHeads,
    int headDim, int valueDim, const int* positions, int T, int window, int causal, const float* sinks, float scale,
    float* out, int outStride, float* partial, int* counters, const int* slots) {
    FULGUR_TRACE_KERNEL;
    using namespace attention2;
    extern __shared__ float qs[];  // headDim
    __shared__ float p[kChunk];
    __shared__ float scratch[kThreads / 32];
    __shared__ float merge[kThreads];
    __shared__ int last;
    const int h = blockIdx.x, t = blockIdx.y, split = blockIdx.z, splits = gridDim.z, kvh = h / (heads / kvHeads);
    if (slots) {
        cacheK += (size_t)slots[t] * capacity * kvHeads * headDim;
        cacheV += (size_t)slots[t] * capacity * kvHeads * valueDim;
    }
    int lo, hi;
    attention::key_range(positions, T, t, window, causal, split, splits, lo, hi);
    // One head of each key/value head's group, for the step's first row, asks L2 for the rows
    // (the other heads read the same rows, the other rows nearly the same).
    if (h % (heads / kvHeads) == 0 && t == 0)
        attention::prefetch_old_keys(cacheK, cacheV, capacity, kvHeads, kvh, headDim, valueDim, positions, t, lo, hi);
    wait_for_previous_kernel();
    allow_next_kernel();
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
    // The (token, head)'s shares are one run of splits * (valueDim + 2) floats: copied into
    // shared memory (qs, which the host sizes for them: CUDAExecutor.attentionShape) with every
    // 16-byte copy in flight at once, widened to 16-byte bounds (`partial` is sized in
    // multiples of 16 floats from an aligned base, so the floats either side are inside it and
    // never used); cp.async.cg reads L2, where the other blocks' shares are. Then every thread
    // takes the weights from shared memory. The loads into registers before this took several
    // dependent L2 round trips (maxima, then sums, then outputs), as in version 3's merge
    // (Kernels/NOTES.md, ninth session). Same sums in the same order as before.
    {
        const int shareFloats = valueDim + 2, n = splits * shareFloats;
        const float* src = partial + ((size_t)t * heads + h) * n;
        const float* base = reinterpret_cast<const float*>(reinterpret_cast<uintptr_t>(src) & ~(uintptr_t)15);
        const int off = (int)(src - base), units = (off + n + 3) / 4;
        for (int u = threadIdx.x; u < units; u += kThreads) copy16(qs + 4 * u, base + 4 * u);
        copies_done();
        __syncthreads();
        const float* shares = qs + off;
        float w[kMaxSplits];  // each share's max, then its weight exp(max - M) (0 for an empty share)
#pragma unroll
        for (int s = 0; s < kMaxSplits; ++s) w[s] = s < splits ? shares[s * shareFloats] : -INFINITY;
        float M = sinks ? sinks[h] : -INFINITY;
#pragma unroll
        for (int s = 0; s < kMaxSplits; ++s) M = fmaxf(M, w[s]);
        float L = sinks ? expf(sinks[h] - M) : 0.f;
#pragma unroll
        for (int s = 0; s < kMaxSplits; ++s) {
            const bool some = w[s] != -INFINITY;
            w[s] = some ? expf(w[s] - M) : 0.f;
            if (some) L += shares[s * shareFloats + 1] * w[s];
        }
        for (int d = threadIdx.x; d < valueDim; d += kThreads) {
            float o = 0.f;
#pragma unroll
            for (int s = 0; s < kMaxSplits; ++s)
                if (s < splits && w[s] != 0.f) o += shares[s * shareFloats + 2 + d] * w[s];
            out[(size_t)t * outStride + h * valueDim + d] = o / L;
        }
    }
}

// Choosing tokens on the GPU, so a decode step returns token ids (4 bytes each), not logits
// (vocab * 4 bytes: 800 KB for gpt-oss's 201088 entries).
//
// Budget: argmax reads T * vocab * 4 bytes (0.8 MB per token for gpt-oss, 0.2 us at 4 TB/s,
// from L2 right after the LM head wrote it); the floor is the launch and two cluster barriers.
//
// Tensor parallelism (the LM head split by vocabulary, Plan.vocabularySlice): the greedy token
// without gathering logits, as SlicedArgmax.swift describes and CPUTensorParallel runs on the
// CPU. Per step of T tokens over R GPUs, on every GPU: argmax_slice reads its T * vocab / R
// logits and writes a [T, R] table of float4 entries (value, token id, 0, 0), its own entry
// filled and the others zeroed (16 * T * R bytes); the peer all-reduce of comm.cu sums the
// tables (x + 0 = x, an exact gather); argmax_pick reads the summed table and writes T ids.
// Two launches more than one GPU's step (the all-reduce and the pick); bytes are nothing (256 B
// at T = 1, R = 8), so the cost is the all-reduce's latency floor, measured 4.8 us per call on
// 2 H200 (Kernels/NOTES.md), plus a small kernel's boundary in the graph. A dedicated
// all-gather would pay the same NVLink flag round trip and need its own epochs and slots; the
// all-reduce already has both and is proven bit-exact.

#include <cooperative_groups.h>

#include "common.cuh"

namespace sampling {

namespace cg = cooperative_groups;

// A row is cut over a cluster of kSplits blocks, each with kInFlight loads a thread in flight,
// and rank 0 picks among the blocks' candidates through distributed shared memory. One block
// walking a 201088-wide row with one load at a time took 47 us alone and 57 us inside the
// 1-token step (H100, BENCHMARKS.md): each thread's 196 loads waited one after another.
constexpr int kSplits = 8, kInFlight = 8;

// Better (value, index): the larger value, then the smaller index; NaN never wins.
__device__ __forceinline__ bool better(float v, int i, float best, int at) { return v > best || (v == best && i < at); }

// The largest of row[lo, hi) and its index (the first one on ties; NaN never wins), valid in
// thread 0; at == none when no value is above -inf.
__device__ __forceinline__ void chunk_argmax(const float* row, int lo, int hi, int none, float& best, int& at) {
    __shared__ float values[32];
    __shared__ int indices[32];
    best = -INFINITY;
    at = none;
    for (int i0 = lo + threadIdx.x; i0 < hi; i0 += kInFlight * blockDim.x) {
        float v[kInFlight];
#pragma unroll
        for (int u = 0; u < kInFlight; ++u) {
            const int i = i0 + u * blockDim.x;
            v[u] = i < hi ? row[i] : -INFINITY;
        }
#pragma unroll
        for (int u = 0; u < kInFlight; ++u)  // ascending per thread: the first maximum
            if (v[u] > best) {
                best = v[u];
                at = i0 + u * blockDim.x;
            }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float v = __shfl_xor_sync(0xffffffffu, best, o);
        const int i = __shfl_xor_sync(0xffffffffu, at, o);
        if (better(v, i, best, at)) { best = v; at = i; }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
    if (lane == 0) { values[warp] = best; indices[warp] = at; }
    __syncthreads();
    if (threadIdx.x == 0)
        for (int w = 1; w < (int)blockDim.x / 32; ++w)
            if (better(values[w], indices[w], best, at)) { best = values[w]; at = indices[w]; }
}

// The largest logits[t, :] and its index for row t = blockIdx.y over the cluster (blockIdx.x
// is the rank), valid in thread 0 of rank 0; at == vocab when no value is above -inf.
__device__ __forceinline__ bool row_argmax(const float* logits, int vocab, float& best, int& at) {
    __shared__ float clusterBest;
    __shared__ int clusterAt;
    const int rank = blockIdx.x, per = (vocab + kSplits - 1) / kSplits, lo = min(vocab, rank * per), hi = min(vocab, lo + per);
    chunk_argmax(logits + (size_t)blockIdx.y * vocab, lo, hi, vocab, best, at);
    if (threadIdx.x == 0) { clusterBest = best; clusterAt = at; }
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();
    if (rank == 0 && threadIdx.x == 0)
        for (int r = 1; r < kSplits; ++r) {  // ranks ascending: on equal values the lower index already wins
            const float v = *cluster.map_shared_rank(&clusterBest, r);
            const int i = *cluster.map_shared_rank(&clusterAt, r);
            if (better(v, i, best, at)) { best = v; at = i; }
        }
    cluster.sync();  // the other blocks' candidates stay until rank 0 has read them
    return rank == 0 && threadIdx.x == 0;
}

}  // namespace sampling

// ids[t] = the index of the largest logits[t, :] (the first one on ties; NaN never wins), as
// the CPU's Sampler.argmax. 1024 threads, grid (sampling::kSplits, T): a cluster a row.
extern "C" __global__ void __cluster_dims__(sampling::kSplits, 1, 1) __launch_bounds__(1024) argmax(const float* logits, int vocab, int* ids) {
    FULGUR_TRACE_KERNEL;
    wait_for_previous_kernel();
    allow_next_kernel();
    float best;
    int at;
    if (sampling::row_argmax(logits, vocab, best, at)) ids[blockIdx.y] = at == vocab ? 0 : at;  // every logit NaN or -inf: the CPU's argmax also says 0
}

// This GPU's candidates for the exchange: table[t, k] = (best, start + at, 0, 0) for k == rank
// (best = -inf, at = 0 when no logit of the slice is above -inf, as SlicedArgmax.candidate),
// zeros for every other k. `logits` holds this GPU's slice, [T, vocab] with vocab the slice's
// width; `start` is its first token id. 1024 threads, grid (sampling::kSplits, T).
extern "C" __global__ void __cluster_dims__(sampling::kSplits, 1, 1) __launch_bounds__(1024) argmax_slice(
    const float* logits, int vocab, int start, int rank, int ranks, float4* table) {
    FULGUR_TRACE_KERNEL;
    wait_for_previous_kernel();
    allow_next_kernel();
    float best;
    int at;
    if (sampling::row_argmax(logits, vocab, best, at)) {
        const float4 mine = make_float4(best, (float)(start + (at == vocab ? 0 : at)), 0.f, 0.f);
        for (int k = 0; k < ranks; ++k) table[blockIdx.y * ranks + k] = k == rank ? mine : make_float4(0.f, 0.f, 0.f, 0.f);
    }
}

// ids[t] = the token of the largest value among table[t, 0 .. ranks) (summed over the GPUs,
// so every entry is filled); the lower rank, so the lower token id, on ties. One block, T
// threads.
extern "C" __global__ void argmax_pick(const float4* table, int T, int ranks, int* ids) {
    FULGUR_TRACE_KERNEL;
    wait_for_previous_kernel();
    allow_next_kernel();
    const int t = threadIdx.x;
    if (t >= T) return;
    float4 best = table[t * ranks];
    for (int k = 1; k < ranks; ++k) {
        const float4 e = table[t * ranks + k];
        if (e.x > best.x) best = e;
    }
    ids[t] = (int)best.y;
}

// positions[t] += T for the next step of a replayed graph (a decode loop that never returns
// to the host). One block.
extern "C" __global__ void advance_positions(int* positions, int T) {
    FULGUR_TRACE_KERNEL;
    wait_for_previous_kernel();
    allow_next_kernel();
    if ((int)threadIdx.x < T) positions[threadIdx.x] += T;
}

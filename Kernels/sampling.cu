// Choosing tokens on the GPU, so a decode step returns token ids (4 bytes each), not logits
// (vocab * 4 bytes: 800 KB for gpt-oss's 201088 entries).
//
// Budget: argmax reads T * vocab * 4 bytes (0.8 MB per token for gpt-oss, 0.2 us at 4 TB/s);
// the floor is the launch.
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

#include "common.cuh"

// The largest logits[t, :] and its index (the first one on ties; NaN never wins) for row
// blockIdx.x, valid in thread 0; at == vocab when no value is above -inf.
__device__ __forceinline__ void row_argmax(const float* logits, int vocab, float& best, int& at) {
    __shared__ float values[32];
    __shared__ int indices[32];
    const float* row = logits + (size_t)blockIdx.x * vocab;
    best = -INFINITY;
    at = vocab;  // no candidate yet
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = row[i];
        if (v > best) { best = v; at = i; }  // strided ascending: the first maximum per thread
    }
    // Reduce (value, index): larger value wins, then the smaller index.
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float v = __shfl_xor_sync(0xffffffffu, best, o);
        const int i = __shfl_xor_sync(0xffffffffu, at, o);
        if (v > best || (v == best && i < at)) { best = v; at = i; }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
    if (lane == 0) { values[warp] = best; indices[warp] = at; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)blockDim.x / 32; ++w)
            if (values[w] > best || (values[w] == best && indices[w] < at)) { best = values[w]; at = indices[w]; }
    }
}

// ids[t] = the index of the largest logits[t, :] (the first one on ties; NaN never wins), as
// the CPU's Sampler.argmax. Grid T, 1024 threads.
extern "C" __global__ void __launch_bounds__(1024) argmax(const float* logits, int vocab, int* ids) {
    wait_for_previous_kernel();
    allow_next_kernel();
    float best;
    int at;
    row_argmax(logits, vocab, best, at);
    if (threadIdx.x == 0) ids[blockIdx.x] = at == vocab ? 0 : at;  // every logit NaN or -inf: the CPU's argmax also says 0
}

// This GPU's candidates for the exchange: table[t, k] = (best, start + at, 0, 0) for k == rank
// (best = -inf, at = 0 when no logit of the slice is above -inf, as SlicedArgmax.candidate),
// zeros for every other k. `logits` holds this GPU's slice, [T, vocab] with vocab the slice's
// width; `start` is its first token id. Grid T, 1024 threads.
extern "C" __global__ void __launch_bounds__(1024) argmax_slice(const float* logits, int vocab, int start, int rank, int ranks, float4* table) {
    wait_for_previous_kernel();
    allow_next_kernel();
    float best;
    int at;
    row_argmax(logits, vocab, best, at);
    if (threadIdx.x == 0) {
        const float4 mine = make_float4(best, (float)(start + (at == vocab ? 0 : at)), 0.f, 0.f);
        for (int k = 0; k < ranks; ++k) table[blockIdx.x * ranks + k] = k == rank ? mine : make_float4(0.f, 0.f, 0.f, 0.f);
    }
}

// ids[t] = the token of the largest value among table[t, 0 .. ranks) (summed over the GPUs,
// so every entry is filled); the lower rank, so the lower token id, on ties. One block, T
// threads.
extern "C" __global__ void argmax_pick(const float4* table, int T, int ranks, int* ids) {
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
    wait_for_previous_kernel();
    allow_next_kernel();
    if ((int)threadIdx.x < T) positions[threadIdx.x] += T;
}

// Choosing tokens on the GPU, so a decode step returns token ids (4 bytes each), not logits
// (vocab * 4 bytes: 800 KB for gpt-oss's 201088 entries).
//
// Budget: argmax reads T * vocab * 4 bytes (0.8 MB per token for gpt-oss, 0.2 us at 4 TB/s);
// the floor is the launch.

#include "common.cuh"

// ids[t] = the index of the largest logits[t, :] (the first one on ties; NaN never wins), as
// the CPU's Sampler.argmax. Grid T, 1024 threads.
extern "C" __global__ void __launch_bounds__(1024) argmax(const float* logits, int vocab, int* ids) {
    __shared__ float values[32];
    __shared__ int indices[32];
    wait_for_previous_kernel();
    allow_next_kernel();
    const float* row = logits + (size_t)blockIdx.x * vocab;
    float best = -INFINITY;
    int at = vocab;  // no candidate yet
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
        ids[blockIdx.x] = at == vocab ? 0 : at;  // every logit NaN or -inf: the CPU's argmax also says 0
    }
}

// positions[t] += T for the next step of a replayed graph (a decode loop that never returns
// to the host). One block.
extern "C" __global__ void advance_positions(int* positions, int T) {
    wait_for_previous_kernel();
    allow_next_kernel();
    if ((int)threadIdx.x < T) positions[threadIdx.x] += T;
}

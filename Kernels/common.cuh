// Shared by every kernel family. The build compiles all Kernels/*.cu as one translation
// unit (scripts/build-kernels), so this header is seen once.
#pragma once
#include <stdint.h>

// FNV-1a 64 of the kernel sources, passed in by scripts/build-kernels. The runtime reads it
// from the loaded module and refuses a fatbin built from sources other than its own.
#ifndef FULGUR_SOURCE_HASH
#error "compile through scripts/build-kernels, which defines FULGUR_SOURCE_HASH"
#endif
extern "C" __device__ const uint64_t fulgur_source_hash = FULGUR_SOURCE_HASH;

// Timeline builds (scripts/build-kernels --trace defines FULGUR_TRACE): every kernel entry
// point used by a decode step starts with FULGUR_TRACE_KERNEL, and each block appends one
// record when its thread 0 leaves, to the buffer the host names in fulgur_trace (null: none).
// %gridid tells launches apart and %globaltimer (ns) is shared by all SMs. Thread 0 takes its
// start stamp at entry, before any griddepcontrol.wait, so a programmatic dependent's blocks
// show when they became resident, not when they began to work. Without FULGUR_TRACE the
// macro is empty and the kernels are as always (the source hash is the same).
#ifdef FULGUR_TRACE
struct TraceRecord {
    uint64_t grid, start, end, marks[2];  // marks: FULGUR_TRACE_MARK(0 or 1) in thread 0, else 0
    uint32_t sm, block;
};
struct TraceBuffer {
    uint32_t count, capacity, pad[2];
    TraceRecord records[1];
};
extern "C" __device__ TraceBuffer* fulgur_trace = nullptr;
__device__ __forceinline__ uint64_t global_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
// The block's marks (FULGUR_TRACE_MARK), written and read by thread 0 only.
__device__ __forceinline__ uint64_t* trace_marks() {
    __shared__ uint64_t marks[2];
    return marks;
}
__device__ __forceinline__ void trace_mark(int i) {
    if (threadIdx.x == 0 && threadIdx.y == 0) trace_marks()[i] = global_ns();
}
struct TraceScope {
    uint64_t start;
    __device__ __forceinline__ TraceScope() : start(0) {
        if (threadIdx.x == 0 && threadIdx.y == 0) {
            start = global_ns();
            trace_marks()[0] = trace_marks()[1] = 0;
        }
    }
    __device__ __forceinline__ ~TraceScope() {
        if (threadIdx.x != 0 || threadIdx.y != 0) return;
        TraceBuffer* b = *reinterpret_cast<TraceBuffer* volatile*>(&fulgur_trace);
        if (!b) return;
        const uint32_t i = atomicAdd(&b->count, 1u);
        if (i >= b->capacity) return;
        uint64_t grid;
        uint32_t sm;
        asm volatile("mov.u64 %0, %%gridid;" : "=l"(grid));
        asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
        TraceRecord& r = b->records[i];
        r.grid = grid;
        r.start = start;
        r.end = global_ns();
        r.marks[0] = trace_marks()[0];
        r.marks[1] = trace_marks()[1];
        r.sm = sm;
        r.block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    }
};
#define FULGUR_TRACE_KERNEL TraceScope fulgur_trace_scope_
// A point inside a kernel (0 or 1, any device function it calls) whose time thread 0 records
// with its block's record.
#define FULGUR_TRACE_MARK(i) trace_mark(i)
#else
#define FULGUR_TRACE_MARK(i) \
    do {                     \
    } while (0)
#define FULGUR_TRACE_KERNEL \
    do {                    \
    } while (0)
#endif

// RoPE (attention_prep, attention_decode_h1p): element i < rotaryDim of a head, rotated with
// its pair's factors cf = cos * attnFactor, sf = sin * attnFactor; neox pairs (i, i + rotaryDim
// / 2), else (2i, 2i + 1). rope_pair is the pair of element i; rope_factors the pair's factors
// at a position (angle pos * invFreq[pair] in f64).
__device__ __forceinline__ int rope_pair(int i, int rotaryDim, int neox) { return neox ? i % (rotaryDim / 2) : i / 2; }
__device__ __forceinline__ float2 rope_factors(int pos, const double* invFreq, int pair, double attnFactor) {
    double s, c;
    sincos((double)pos * invFreq[pair], &s, &c);
    return make_float2((float)(c * attnFactor), (float)(s * attnFactor));
}
__device__ __forceinline__ float rope_rotate(const float* head, int i, int rotaryDim, int neox, float2 f) {
    const int half = rotaryDim / 2, pair = rope_pair(i, rotaryDim, neox);
    const bool lead = neox ? i < half : i % 2 == 0;
    const int a = neox ? pair : 2 * pair, b = neox ? pair + half : 2 * pair + 1;
    return lead ? head[a] * f.x - head[b] * f.y : head[b] * f.x + head[a] * f.y;
}

// cp.async: global -> shared without registers, so many copies are in flight at once
// (attention's K and V chunks, the router's norm weight and correction bias). 16 bytes through
// L2 only; 4 bytes (unaligned rows) through L1 as a plain load. copies_done waits for all of
// the thread's copies.
__device__ __forceinline__ void copy16(float* dst, const float* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(dst))), "l"(src) : "memory");
}
__device__ __forceinline__ void copy4(float* dst, const float* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(dst))), "l"(src) : "memory");
}
__device__ __forceinline__ void copies_done() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// Weights are streamed once per call: keep them out of L1 so the reused activations stay.
__device__ __forceinline__ uint4 load_streaming(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
// scratch: 32 floats of shared memory.
__device__ __forceinline__ float block_sum_all(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float s = 0.f;
    for (int i = 0; i < warps; ++i) s += scratch[i];
    return s;
}

// Programmatic dependent launch (sm_90; no-ops when the launch did not ask for it). A kernel
// calls wait_for_previous_kernel before it reads what the previous kernel wrote or writes
// anything, and allow_next_kernel after that, so the next kernel in the stream can be
// scheduled and start its independent work (streaming constant weights) during this one.
__device__ __forceinline__ void allow_next_kernel() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
__device__ __forceinline__ void wait_for_previous_kernel() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

// MXFP4 decode, shared by gemv.cu and moe.cu.
// E8M0 code e is 2^(e-127); code 0 is the f32 subnormal 2^-127, 0xFF is NaN.
__device__ __forceinline__ float e8m0(uint32_t e) {
    return __uint_as_float(e == 0 ? 0x00400000u : e == 0xFFu ? 0x7FC00000u : e << 23);
}

__device__ __forceinline__ float f16lo(uint32_t h2) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((unsigned short)(h2 & 0xFFFF)));
    return f;
}
__device__ __forceinline__ float f16hi(uint32_t h2) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((unsigned short)(h2 >> 16)));
    return f;
}

// Two floats -> f16x2 (low half: lo), round to nearest. Shared by moe.cu and gemv.cu.
__device__ __forceinline__ uint32_t f16x2(float lo, float hi) {
    uint32_t d;
    asm("cvt.rn.f16x2.f32 %0, %2, %1;" : "=r"(d) : "f"(lo), "f"(hi));
    return d;
}

// d += A (16x16, row) * B (16x8, col), f16 operands, f32 accumulators (mma.sync m16n8k16).
__device__ __forceinline__ void mma_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Nibbles i and i + 4 of a word -> f16x2 (low half: nibble i). The three magnitude bits land
// on f16 bits 9-11 and the sign on bit 15, which is the E2M1 value times 2^-14 for all eight
// codes (code 1, 0.5, is the f16 subnormal 2^-15): two shifts and one LOP3 for two elements,
// against gemv version 1's six instructions for one. The caller multiplies by 2^14 per chunk.
template <int I>
__device__ __forceinline__ uint32_t e2m1x2(uint32_t word) {
    constexpr int m = 9 - 4 * I, s = 12 - 4 * I;
    const uint32_t mag = m >= 0 ? word << m : word >> -m;
    return (mag & 0x0E000E00u) | ((word << s) & 0x80008000u);
}

__device__ __forceinline__ uint32_t word(const uint4& v, int j) {
    return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

// One 32-element MXFP4 chunk of R rows (16 code bytes each) against T tokens of staged x
// (32 floats per token at xs + t * tokenStride), accumulated unscaled into C independent
// chains per row and token (the caller applies the chunk's E8M0 scale, and the 2^14 that
// e2m1x2's f16 encoding leaves out, when it folds the chains).
template <int C, int R, int T>
__device__ __forceinline__ void mxfp4_chunk(const uint4 (&codes)[R], const float* xs, int tokenStride,
                                            float (&part)[C][R][T]) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        float wv[R][8];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const uint32_t q = word(codes[r], j);
            const uint32_t h0 = e2m1x2<0>(q), h1 = e2m1x2<1>(q), h2 = e2m1x2<2>(q), h3 = e2m1x2<3>(q);
            wv[r][0] = f16lo(h0); wv[r][4] = f16hi(h0);
            wv[r][1] = f16lo(h1); wv[r][5] = f16hi(h1);
            wv[r][2] = f16lo(h2); wv[r][6] = f16hi(h2);
            wv[r][3] = f16lo(h3); wv[r][7] = f16hi(h3);
        }
#pragma unroll
        for (int t = 0; t < T; ++t) {
            const float4 a = *reinterpret_cast<const float4*>(xs + t * tokenStride + 8 * j);
            const float4 b = *reinterpret_cast<const float4*>(xs + t * tokenStride + 8 * j + 4);
            const float xv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int e = 0; e < 8; ++e) part[(j * 8 + e) % C][r][t] = fmaf(wv[r][e], xv[e], part[(j * 8 + e) % C][r][t]);
        }
    }
}

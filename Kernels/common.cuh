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

// Programmatic dependent launch (sm_90; no-ops when the launch did not ask for it). A kernel
// calls wait_for_previous_kernel before it reads what the previous kernel wrote or writes
// anything, and allow_next_kernel after that, so the next kernel in the stream can be
// scheduled and start its independent work (streaming constant weights) during this one.
__device__ __forceinline__ void allow_next_kernel() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
__device__ __forceinline__ void wait_for_previous_kernel() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

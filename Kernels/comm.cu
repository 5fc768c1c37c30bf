// One-shot all-reduce (sum, f32) over peer-to-peer memory, for the small messages of batch-1
// decode with the model split over the GPUs of one host (a hidden state of 2880-6144 floats
// after each row-split projection): NCCL's protocols pay more fixed latency than such a
// message costs to move. Large messages belong to NCCL (Sources/FulgurCUDA/NCCL.swift).
//
// Every GPU owns one registered buffer (PeerAllReduce.swift allocates it, enables peer
// access, and writes the same table of all GPUs' buffer addresses into each):
//   [0, 64)      uint64 base address of rank k's buffer, k < 8 (valid on every GPU: unified
//                addressing and peer access)
//   [64, 68)     uint32 epoch: calls completed on this GPU; [68, 72) uint32 blocks done in
//                the current call
//   [128, 4224)  uint32 flags[kMaxBlocks][8]: flags[b][k] = the last epoch at which rank k's
//                block b had its chunk in place (written by rank k, polled here)
//   [4224, ...)  two slots of `capacity` floats; call e uses slot e & 1
// A call (peer_all_reduce, grid blocks(count), same on every GPU) on rank r, block b, chunk
// b of the message (the same chunking on every GPU):
//   1. e = epoch + 1, read from device memory: the epoch advances on the device, so a graph
//      replays correctly without host arguments that change per call.
//   2. copy the input chunk into the own slot e & 1;
//   3. arrive: flags[b][r] = e on every peer (st.release.sys), after a block barrier;
//   4. wait until the own flags[b][k] >= e for every peer k (ld.acquire.sys, polled by one
//      thread per peer; traps after about 2 s, so a missing peer is a launch failure, not a
//      hang);
//   5. out = slot_0 + slot_1 + ... + slot_{n-1}, in rank order, on every GPU: the results are
//      bit-identical across GPUs (and equal to the CPU's float sum in that order);
//   6. the last block to finish stores epoch = e.
// No second barrier: a GPU that finished call e writes slot (e + 1) & 1 next, and it can only
// reach call e + 2 (the slot peers read at e) after every peer arrived at e + 1, that is after
// every peer's call e, reads included, completed. With `allowNext` the kernel lets the next
// kernel on its stream be scheduled as soon as it starts (programmatic dependent launch): that
// kernel's blocks become resident and do their independent work (weights, constants) while
// this one waits on its peers, and the argument above still holds, because every kernel of a
// step executes griddepcontrol.wait before it touches what an earlier kernel wrote, so each
// waits, transitively, for this call to end. flags are compared
// as >= e, wrap-around safe, because a fast peer may already have stored e + 1.
// Calls must be issued in the same order on every GPU, one at a time per PeerAllReduce (not
// on two streams of one GPU at once). Input and output may be the same buffer: a block reads
// and writes only its own chunk.
//
// Budget per call, n GPUs, S = 4 * count bytes, per GPU: local copy S read + S written,
// (n - 1) S read over NVLink plus S read locally, S written; flags: n - 1 remote 4-byte
// stores per block. H100 SXM NVLink 4 moves about 450 GB/s each way (18 links x 25 GB/s).
//   2880 floats (11.5 KB, gpt-oss-20b's hidden state): bytes are irrelevant (25 ns over
//     NVLink); the floor is latency: a kernel boundary in a graph (~1.5 us), the release store
//     crossing NVLink and being seen by the peer's poll (~1 us), one round trip of remote
//     loads (~1 us). Predicted 3-5 us per call in a graph, against 10-20 us for NCCL's
//     graph-captured all-reduce of that size.
//   1M floats (4 MiB): remote reads 4 MiB at ~450 GB/s = 9.3 us for n = 2, plus the local
//     copy (8 MiB of HBM traffic, ~3 us): predicted 12-20 us; NCCL's ring moves the same
//     bytes and should be about as fast or faster from here on.
// Measured on 2 and 4 H200 (BENCHMARKS.md, issue 7; Kernels/NOTES.md): 4.9-5.0 us per graph-
// replayed call up to 64 KiB on 2 GPUs, bit-identical to the CPU's rank-order sum.

#include "common.cuh"
#include <type_traits>

namespace comm {

constexpr int kMaxRanks = 8, kMaxBlocks = 128, kThreads = 512;
// Byte offsets in the registered buffer; PeerAllReduce.swift mirrors them.
constexpr int kEpoch = 64, kDone = 68, kFlags = 128, kSlots = kFlags + 4 * kMaxBlocks * kMaxRanks;
// About 2 s of %globaltimer (ns): every wait here ends within microseconds when all GPUs run
// the same calls; one that lasts this long is a peer that never came.
constexpr unsigned long long kHangNanoseconds = 2000000000ull;

__device__ __forceinline__ unsigned long long globaltimer() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ void store_release_system(uint32_t* p, uint32_t v) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ uint32_t load_acquire_system(const uint32_t* p) {
    uint32_t v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
// flag >= e, with wrap-around after 2^32 calls.
__device__ __forceinline__ bool reached(uint32_t flag, uint32_t e) { return (int32_t)(flag - e) >= 0; }

__device__ __forceinline__ void wait_for(const uint32_t* flag, uint32_t e) {
    if (reached(load_acquire_system(flag), e)) return;
    const unsigned long long since = globaltimer();
    while (!reached(load_acquire_system(flag), e))
        if (globaltimer() - since > kHangNanoseconds) __trap();
}

// Peers' slots are read through L2 only (ld.global.cg): the data changes between calls.
__device__ __forceinline__ float4 load_l2(const float4* p) { return __ldcg(p); }
__device__ __forceinline__ float4 add(float4 a, float4 b) { return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w); }

// The steps of a call that peer_all_reduce and peer_all_reduce_norm share (the protocol at the
// top of this file). Step 1: this call's epoch, read by thread 0 and shared with the block.
__device__ __forceinline__ uint32_t call_epoch(const uint8_t* self) {
    __shared__ uint32_t epochShared;
    if (threadIdx.x == 0) epochShared = __ldcg(reinterpret_cast<const unsigned int*>(self + kEpoch)) + 1;
    __syncthreads();
    return epochShared;
}

// Steps 3 and 4 for block b, once the block's chunk is in its own slot: tell every peer, then
// wait for every peer's chunk. Ends with the block's threads agreeing that all chunks are in.
template <int R>
__device__ __forceinline__ void exchange_flags(uint8_t* self, int rank, uint32_t e) {
    const int tid = threadIdx.x, b = blockIdx.x;
    __syncthreads();  // the whole chunk is in place before any thread says so
    if (tid < R && tid != rank) {
        uint8_t* peer = reinterpret_cast<uint8_t*>(reinterpret_cast<const uint64_t*>(self)[tid]);
        store_release_system(reinterpret_cast<uint32_t*>(peer + kFlags) + b * kMaxRanks + rank, e);
        wait_for(reinterpret_cast<const uint32_t*>(self + kFlags) + b * kMaxRanks + tid, e);
    }
    __syncthreads();  // every peer's chunk is in place
}

// Step 6, thread 0 of each block: the last block to finish stores epoch = e. Every block read
// the epoch before it counted itself done, so the last one may bump it.
__device__ __forceinline__ void end_call(uint8_t* self, uint32_t e) {
    if (threadIdx.x != 0) return;
    unsigned int* done = reinterpret_cast<unsigned int*>(self + kDone);
    if (atomicAdd(done, 1u) == gridDim.x - 1) {
        atomicExch(done, 0u);
        atomicExch(reinterpret_cast<unsigned int*>(self + kEpoch), e);
    }
}

// f(std::integral_constant<int, R>) for R = ranks, 1 to 8 (traps on any other count).
template <class F>
__device__ __forceinline__ void with_ranks(int ranks, F f) {
    switch (ranks) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: __trap();
    }
}

template <int R>
__device__ __forceinline__ void all_reduce(const float4* in, float4* out, int n4, uint8_t* self, int capacity, int rank) {
    const int tid = threadIdx.x;
    const uint64_t* bases = reinterpret_cast<const uint64_t*>(self);
    const uint32_t e = call_epoch(self);
    const int per = (n4 + gridDim.x - 1) / gridDim.x;
    const int begin = blockIdx.x * per, end = min(n4, begin + per);
    const size_t slot = kSlots + (size_t)(e & 1) * capacity * sizeof(float);

    float4* mine = reinterpret_cast<float4*>(self + slot);
    for (int i = begin + tid; i < end; i += kThreads) mine[i] = in[i];
    exchange_flags<R>(self, rank, e);

    const float4* src[R];
#pragma unroll
    for (int k = 0; k < R; ++k) src[k] = reinterpret_cast<const float4*>(reinterpret_cast<const uint8_t*>(bases[k]) + slot);
    // Two elements per thread per round, all 2R loads issued before the sums: one remote
    // round trip per round.
    for (int i = begin + tid; i < end; i += 2 * kThreads) {
        const int j = i + kThreads;
        const bool second = j < end;
        float4 a[R], b[R];
#pragma unroll
        for (int k = 0; k < R; ++k) {
            a[k] = load_l2(src[k] + i);
            b[k] = second ? load_l2(src[k] + j) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
        float4 sa = a[0], sb = b[0];
#pragma unroll
        for (int k = 1; k < R; ++k) {
            sa = add(sa, a[k]);
            sb = add(sb, b[k]);
        }
        out[i] = sa;
        if (second) out[j] = sb;
    }

    __syncthreads();
    end_call(self, e);
}

}  // namespace comm

// out[0, count) = the sum over ranks of every rank's in[0, count), on every rank. count is a
// multiple of 4; in and out 16-byte aligned; self is this GPU's registered buffer, whose slots
// hold `capacity` floats each; 1 <= ranks <= 8. Grid: min(128, ceil(count / 4 / 512)) blocks,
// the same on every rank; 512 threads. allowNext != 0: the next kernel may start early (above).
extern "C" __global__ void __launch_bounds__(comm::kThreads)
    peer_all_reduce(const float* in, float* out, int count, uint8_t* self, int capacity, int rank, int ranks, int allowNext) {
    FULGUR_TRACE_KERNEL;
    // Launched with programmatic dependent launch, this waits for the previous kernel to end
    // (an earlier all-reduce's epoch store included); launched plainly it is a no-op.
    wait_for_previous_kernel();
    if (allowNext) allow_next_kernel();
    const float4* in4 = reinterpret_cast<const float4*>(in);
    float4* out4 = reinterpret_cast<float4*>(out);
    const int n4 = count / 4;
    comm::with_ranks(ranks, [&](auto R) { comm::all_reduce<decltype(R)::value>(in4, out4, n4, self, capacity, rank); });
}

// The all-reduce of a tensor-parallel layer's output followed by the residual add and RMSNorm
// that come next at 2-16 tokens (one launch where the step had two: the all-reduce, then
// add_rmsnorm). Per token t (block t, the same flags and slots as peer_all_reduce, so the two
// kernels may follow each other in any order, the same on every rank):
//   a = in[t] summed over ranks in rank order (written back to in[t], as peer_all_reduce does),
//   x[t] += a,  h[t] = w * x[t] / sqrt(mean(x[t]^2) + eps).
// x and h are this GPU's own; every rank computes the same bits (same a, same x). n (the
// hidden size) a multiple of 4 up to 4 * kNormVectors * kNormThreads = 8192; T <= kMaxBlocks.
// Every rank's loads of a thread's vectors are issued before the first sum (one NVLink round
// trip, as peer_all_reduce: a first version loaded rank after rank, three round trips on 4 GPUs).
// Budget as peer_all_reduce's (T n floats each way) plus x read and written and h written:
// latency-bound like it (Kernels/NOTES.md, fourteenth session, has the measurement).
namespace comm {
constexpr int kNormThreads = 512, kNormVectors = 4;

template <int R>
__device__ __forceinline__ void all_reduce_norm(float* in, int n, uint8_t* self, int capacity, int rank, int allowNext, float* x,
                                                float* h, const float* w, float eps) {
    __shared__ float scratch[32];
    const int tid = threadIdx.x, t = blockIdx.x, n4 = n / 4;
    // The norm weight does not depend on the previous kernel: loaded before waiting for it.
    float4 g[kNormVectors];
#pragma unroll
    for (int j = 0; j < kNormVectors; ++j) {
        const int i = tid + j * kNormThreads;
        g[j] = i < n4 ? __ldg(reinterpret_cast<const float4*>(w) + i) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    wait_for_previous_kernel();
    if (allowNext) allow_next_kernel();
    const uint64_t* bases = reinterpret_cast<const uint64_t*>(self);
    const uint32_t e = call_epoch(self);
    const size_t slot = kSlots + (size_t)(e & 1) * capacity * sizeof(float), row = (size_t)t * n4;
    float4* in4 = reinterpret_cast<float4*>(in) + row;
    float4* mine = reinterpret_cast<float4*>(self + slot) + row;
    float4 xv[kNormVectors];
#pragma unroll
    for (int j = 0; j < kNormVectors; ++j) {
        const int i = tid + j * kNormThreads;
        if (i < n4) {
            mine[i] = in4[i];
            xv[j] = __ldcg(reinterpret_cast<const float4*>(x) + row + i);
        }
    }
    exchange_flags<R>(self, rank, e);  // block t's chunk is row t
    const float4* src[R];
#pragma unroll
    for (int k = 0; k < R; ++k) src[k] = reinterpret_cast<const float4*>(reinterpret_cast<const uint8_t*>(bases[k]) + slot) + row;
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < kNormVectors; ++j) {
        const int i = tid + j * kNormThreads;
        if (i >= n4) continue;
        float4 p[R];
#pragma unroll
        for (int k = 0; k < R; ++k) p[k] = load_l2(src[k] + i);
        float4 a = p[0];
#pragma unroll
        for (int k = 1; k < R; ++k) a = add(a, p[k]);
        in4[i] = a;
        const float4 v = add(xv[j], a);
        xv[j] = v;
        reinterpret_cast<float4*>(x)[row + i] = v;
        ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    const float inv = rsqrtf(block_sum_all(ss, scratch) / n + eps);
#pragma unroll
    for (int j = 0; j < kNormVectors; ++j) {
        const int i = tid + j * kNormThreads;
        if (i < n4) {
            const float4 v = xv[j], gw = g[j];
            reinterpret_cast<float4*>(h)[row + i] = make_float4(gw.x * (v.x * inv), gw.y * (v.y * inv), gw.z * (v.z * inv), gw.w * (v.w * inv));
        }
    }
    end_call(self, e);
}
}  // namespace comm

extern "C" __global__ void __launch_bounds__(comm::kNormThreads)
    peer_all_reduce_norm(float* in, int n, uint8_t* self, int capacity, int rank, int ranks, int allowNext, float* x, float* h,
                         const float* w, float eps) {
    FULGUR_TRACE_KERNEL;
    comm::with_ranks(ranks, [&](auto R) { comm::all_reduce_norm<decltype(R)::value>(in, n, self, capacity, rank, allowNext, x, h, w, eps); });
}

// Keeps a stream busy for `nanoseconds`, so that a host can queue many launches behind it and
// events time the GPU instead of the host's launch rate (fulgur-gpu-check comm). One thread.
extern "C" __global__ void hold_stream(long long nanoseconds) {
    const unsigned long long until = comm::globaltimer() + (unsigned long long)nanoseconds;
    while (comm::globaltimer() < until) __nanosleep(1000);
}

// One-shot all-reduce (sum, f32) over peer-to-peer memory, for the small messages of batch-1
// decode with the model split over the GPUs of one host (a hidden state of 2880-6144 floats
// after each row-split projection): NCCL's protocols pay more fixed latency than such a
// message costs to move. Large messages belong to NCCL (Sources/FulgurCUDA/NCCL.swift).
//
// Every GPU owns one registered buffer (PeerAllReduce.swift allocates it, enables peer
// access, writes the same table of all GPUs' buffer addresses into each and fills the slots
// with the empty mark):
//   [0, 64)      uint64 base address of rank k's buffer, k < 8 (valid on every GPU: unified
//                addressing and peer access)
//   [64, 68)     uint32 epoch: calls completed on this GPU; [68, 72) uint32 blocks done in
//                the current call
//   [256, ...)   2 x R receive slots of `capacity` floats (R = ranks): slot (s, k) holds rank
//                k's message for a call that uses set s; every float not yet delivered holds
//                the empty mark 0xFFFFFFFF (a NaN; GPU arithmetic makes 0x7FFFFFFF, and only
//                a sign flip of that makes the mark: an input with these bits is sent as
//                0x7FFFFFFF, still a NaN)
// A call (peer_all_reduce, grid blocks(count), same on every GPU) on rank r, each thread its
// elements of the message (the same on every GPU):
//   1. e = epoch + 1, read from device memory: the epoch advances on the device, so a graph
//      replays correctly without host arguments that change per call; the call uses set e & 1;
//   2. push: store the input into slot (e & 1, r) of every peer (st.relaxed.sys over NVLink);
//   3. receive: load slot (e & 1, k) of the own buffer for every peer k until no float of it
//      is the empty mark (traps after about 2 s, so a missing peer is a launch failure, not a
//      hang); the data marks its own arrival (the Lamport-style one-shot all-reduce of
//      TensorRT-LLM and others), so no flag, fence or remote load is on the path: one
//      one-way NVLink crossing;
//   4. out = in_0 + in_1 + ... + in_{n-1}, in rank order, on every GPU: the results are
//      bit-identical across GPUs (and equal to the CPU's float sum in that order);
//   5. mark the received floats empty again (own buffer, plain stores);
//   6. the last block to finish stores epoch = e.
// Why two sets suffice: a peer pushes into set e & 1 again at call e + 2, which it starts
// only after its call e + 1 ended, which needed this GPU's call e + 1 push, which this GPU
// makes after its call e (step 5 included) ended; the kernels of a step are ordered (each
// executes griddepcontrol.wait before it touches what an earlier kernel wrote, and the
// all-reduce does before its push), so the empty marks are in place first. With `allowNext`
// the kernel lets the next kernel on its stream be scheduled as soon as it starts
// (programmatic dependent launch): that kernel's blocks become resident and do their
// independent work (weights, constants) while this one waits on its peers.
// Calls must be issued in the same order on every GPU, one at a time per PeerAllReduce (not
// on two streams of one GPU at once). Input and output may be the same buffer: a thread
// reads and writes only its own elements.
// The previous protocol (the twenty-eighth session and before) copied the input into an own
// slot, stored a release flag into every peer, polled its own flags, then loaded every
// peer's slot: a system-scope release, a flag crossing and a remote load round trip.
//
// Budget per call, n GPUs, S = 4 * count bytes, per GPU: S read, (n - 1) S written over
// NVLink, (n - 1) S read locally (polled), S written out and (n - 1) S of empty marks
// written locally. H100 SXM NVLink 4 moves about 450 GB/s each way (18 links x 25 GB/s).
//   2880 floats (11.5 KB, gpt-oss-20b's hidden state): bytes are irrelevant (25 ns over
//     NVLink); the floor is latency: a kernel boundary in a graph (~1.5 us) and one store
//     crossing NVLink and being seen by the poll (~1 us).
//   1M floats (4 MiB): 4 MiB pushed to each peer at ~450 GB/s = 9.3 us for n = 2; NCCL's ring
//     moves the same bytes and should be about as fast or faster from here on.
// Measured on 2 H200 (gpu-check comm, graph-replayed calls; Kernels/NOTES.md, twenty-ninth
// session): 3.3-3.5 us a call up to 64 KiB (the pull protocol before it: 4.9-5.0), 15.4 us at
// 4 MiB (18.3); bit-identical to the CPU's rank-order sum.

#include "common.cuh"
#include <type_traits>

namespace comm {

constexpr int kMaxRanks = 8, kMaxBlocks = 128, kThreads = 512;
// Byte offsets in the registered buffer; PeerAllReduce.swift mirrors them.
constexpr int kEpoch = 64, kDone = 68, kSlots = 256;
constexpr uint32_t kEmpty = 0xFFFFFFFFu;
// About 2 s of %globaltimer (ns): every wait here ends within microseconds when all GPUs run
// the same calls; one that lasts this long is a peer that never came.
constexpr unsigned long long kHangNanoseconds = 2000000000ull;

__device__ __forceinline__ unsigned long long globaltimer() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
// Strong (relaxed, system-scope) accesses to the slots: a peer's push and this GPU's polling
// load race by design, and the polling load must not be served from L1.
__device__ __forceinline__ void store_system(float4* p, float4 v) {
    asm volatile("st.relaxed.sys.global.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w) : "memory");
}
__device__ __forceinline__ float4 load_system(const float4* p) {
    float4 v;
    asm volatile("ld.relaxed.sys.global.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ bool is_empty(float v) { return __float_as_uint(v) == kEmpty; }
__device__ __forceinline__ bool arrived(float4 v) { return !(is_empty(v.x) || is_empty(v.y) || is_empty(v.z) || is_empty(v.w)); }
// The value as sent: the empty mark's bits become the canonical NaN (both NaN).
__device__ __forceinline__ float sendable(float v) { return is_empty(v) ? __uint_as_float(0x7FFFFFFFu) : v; }
__device__ __forceinline__ float4 sendable(float4 v) { return make_float4(sendable(v.x), sendable(v.y), sendable(v.z), sendable(v.w)); }
__device__ __forceinline__ float4 add(float4 a, float4 b) { return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w); }

// Step 1: this call's epoch, read by thread 0 and shared with the block.
__device__ __forceinline__ uint32_t call_epoch(const uint8_t* self) {
    __shared__ uint32_t epochShared;
    if (threadIdx.x == 0) epochShared = __ldcg(reinterpret_cast<const unsigned int*>(self + kEpoch)) + 1;
    __syncthreads();
    return epochShared;
}

// A call's slots: where this rank pushes (slot (set, rank) of every peer) and where it
// receives (its own slot (set, k) for each k). Element i of the message is float4 i of a slot.
template <int R>
struct Slots {
    float4* to[R];          // to[k]: rank k's slot for this rank's message (k != rank)
    float4* from[R];        // from[k]: this rank's slot for rank k's message (k != rank)
    __device__ __forceinline__ Slots(const uint8_t* self, int capacity, int rank, uint32_t e) {
        const uint64_t* bases = reinterpret_cast<const uint64_t*>(self);
        const size_t floats = capacity, set = e & 1;
#pragma unroll
        for (int k = 0; k < R; ++k) {
            to[k] = reinterpret_cast<float4*>(reinterpret_cast<uint8_t*>(bases[k]) + kSlots + 4 * floats * (set * R + rank));
            from[k] = reinterpret_cast<float4*>(const_cast<uint8_t*>(self) + kSlots + 4 * floats * (set * R + k));
        }
    }
    // Step 2 for float4 i: v (already sendable) to every peer.
    __device__ __forceinline__ void push(int i, float4 v, int rank) const {
#pragma unroll
        for (int k = 0; k < R; ++k)
            if (k != rank) store_system(to[k] + i, v);
    }
    // Steps 3-5 for float4 i: the rank-order sum of every rank's element i, `own` (this rank's,
    // sendable) in place of rank `rank`'s; the received floats marked empty again. Every
    // peer's load is issued before the first wait.
    __device__ __forceinline__ float4 sum(int i, float4 own, int rank) const {
        float4 p[R];
#pragma unroll
        for (int k = 0; k < R; ++k) p[k] = k == rank ? own : load_system(from[k] + i);
#pragma unroll
        for (int k = 0; k < R; ++k) {
            if (k == rank || arrived(p[k])) continue;
            const unsigned long long since = globaltimer();
            do {
                p[k] = load_system(from[k] + i);
                if (globaltimer() - since > kHangNanoseconds) __trap();
            } while (!arrived(p[k]));
        }
        const float empty = __uint_as_float(kEmpty);
#pragma unroll
        for (int k = 0; k < R; ++k)
            if (k != rank) from[k][i] = make_float4(empty, empty, empty, empty);
        float4 s = p[0];
#pragma unroll
        for (int k = 1; k < R; ++k) s = add(s, p[k]);
        return s;
    }
};

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
    const uint32_t e = call_epoch(self);
    const Slots<R> slots(self, capacity, rank, e);
    const int per = (n4 + gridDim.x - 1) / gridDim.x;
    const int begin = blockIdx.x * per, end = min(n4, begin + per);
    // Every push of the thread first, then the sums: the peers' pushes cross while this one's do.
    for (int i = begin + threadIdx.x; i < end; i += kThreads) slots.push(i, sendable(in[i]), rank);
    for (int i = begin + threadIdx.x; i < end; i += kThreads) out[i] = slots.sum(i, sendable(in[i]), rank);
    __syncthreads();
    end_call(self, e);
}

}  // namespace comm

// out[0, count) = the sum over ranks of every rank's in[0, count), on every rank. count is a
// multiple of 4; in and out 16-byte aligned; self is this GPU's registered buffer, whose slots
// hold `capacity` floats each; 1 <= ranks <= 8. Grid: min(128, ceil(count / 4 / 512)) blocks,
// the same on every rank; 512 threads. allowNext != 0: the next kernel may start early (above).
extern "C" __global__ void __launch_bounds__(comm::kThreads, 1)
    peer_all_reduce(const float* in, float* out, int count, uint8_t* self, int capacity, int rank, int ranks, int allowNext) {
    FULGUR_TRACE_KERNEL;
    // Launched with programmatic dependent launch, this waits for the previous kernel to end
    // (an earlier all-reduce's epoch store and empty marks included); launched plainly it is
    // a no-op.
    wait_for_previous_kernel();
    if (allowNext) allow_next_kernel();
    const float4* in4 = reinterpret_cast<const float4*>(in);
    float4* out4 = reinterpret_cast<float4*>(out);
    const int n4 = count / 4;
    comm::with_ranks(ranks, [&](auto R) { comm::all_reduce<decltype(R)::value>(in4, out4, n4, self, capacity, rank); });
}

// The all-reduce of a tensor-parallel layer's output followed by the residual add and RMSNorm
// that come next at 2-16 tokens (one launch where the step had two: the all-reduce, then
// add_rmsnorm). Per token t (block t, the same epoch and slots as peer_all_reduce, so the two
// kernels may follow each other in any order, the same on every rank):
//   a = in[t] summed over ranks in rank order (written back to in[t], as peer_all_reduce does),
//   x[t] += a,  h[t] = w * x[t] / sqrt(mean(x[t]^2) + eps).
// x and h are this GPU's own; every rank computes the same bits (same a, same x). n (the
// hidden size) a multiple of 4 up to 4 * kNormVectors * kNormThreads = 8192; T <= kMaxBlocks.
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
    const uint32_t e = call_epoch(self);
    const Slots<R> slots(self, capacity, rank, e);
    const size_t row = (size_t)t * n4;
    float4* in4 = reinterpret_cast<float4*>(in) + row;
    float4 own[kNormVectors], xv[kNormVectors];
#pragma unroll
    for (int j = 0; j < kNormVectors; ++j) {
        const int i = tid + j * kNormThreads;
        if (i < n4) {
            own[j] = sendable(in4[i]);
            slots.push(row + i, own[j], rank);
            xv[j] = __ldcg(reinterpret_cast<const float4*>(x) + row + i);
        }
    }
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < kNormVectors; ++j) {
        const int i = tid + j * kNormThreads;
        if (i >= n4) continue;
        const float4 a = slots.sum(row + i, own[j], rank);
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

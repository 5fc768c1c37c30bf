// Thirteenth-session probe (Kernels/NOTES.md, "Thirteenth session"; kept as the record of that
// measurement, not built by any script): how fast can the 1-token gate_up's bytes be streamed at
// all, and what does version 7's per-warp load + dequant + mma loop (moe4::pipe_run, as at
// dea5885) add? Shapes: gpt-oss-20b gate_up at T = 1 (4 experts of 360 tiles x 45 steps of 544
// bytes, 1440 units, 35.2 MB) in a 32-expert region (282 MB). Compile from this directory:
//   nvcc -cubin -arch=sm_90a -O3 -std=c++17 -DFULGUR_SOURCE_HASH=1ULL -o probe.cubin stream-probe.cu
// and run `python3 stream-probe-run.py probe.cubin` on the GPU machine. The runner was edited
// between the five runs (stream-probe-{1..5}.log); its last form is kept. sp_bulk* (TMA bulk
// copies) failed with CUDA error 719 in run 1 and were not debugged.
#include "../../../Kernels/moe.cu"

namespace sp {
constexpr int kStep = 544;

__device__ __forceinline__ void stamp(unsigned long long* st) {
    // st[0] = min entry, st[1] = max exit (globaltimer ns), over blocks.
}
__device__ __forceinline__ uint64_t now() { uint64_t t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t; }

__device__ __forceinline__ const uint8_t* unit_base(const uint8_t* w, const int* experts, int tiles, int steps, int v) {
    const int s = v / tiles, tile = v - s * tiles;
    return w + ((size_t)experts[s] * tiles + tile) * steps * (size_t)kStep;
}
}  // namespace sp

// Version 7's unit split (block b: units [b U / G, (b + 1) U / G), warp w: every 8th from w),
// each unit's steps streamed with D steps in flight in registers; only an xor of the bytes.
template <int D>
__device__ void ldg_units(const uint8_t* w, const int* experts, int tiles, int steps, int S, uint32_t* out,
                          unsigned long long* st) {
    const uint64_t t0 = sp::now();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long U = (long long)S * tiles, G = gridDim.x, b = blockIdx.x;
    const int u0 = (int)(b * U / G), u1 = (int)((b + 1) * U / G);
    uint32_t acc = 0;
    for (int v = u0 + warp; v < u1; v += 8) {
        const uint8_t* base = sp::unit_base(w, experts, tiles, steps, v);
        uint4 q[D];
        uint32_t s[D];
#pragma unroll
        for (int d = 0; d < D; ++d)
            if (d < steps) { q[d] = load_streaming(base + d * sp::kStep + lane * 16); s[d] = moe4::load_word_streaming(base + d * sp::kStep + 512 + (lane >> 2) * 4); }
        const int L = (steps + D - 1) / D * D;
        for (int s0 = 0; s0 < L; s0 += D) {
#pragma unroll
            for (int d = 0; d < D; ++d) {
                const int j = s0 + d, ahead = j + D;
                if (j < steps) acc ^= q[d].x ^ q[d].y ^ q[d].z ^ q[d].w ^ s[d];
                if (ahead < steps) { q[d] = load_streaming(base + ahead * sp::kStep + lane * 16); s[d] = moe4::load_word_streaming(base + ahead * sp::kStep + 512 + (lane >> 2) * 4); }
            }
        }
    }
    out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.x == 0) { atomicMin(st, (unsigned long long)t0); atomicMax(st + 1, (unsigned long long)sp::now()); }
}

// Every warp busy: the S * tiles * steps steps cut evenly over all warps of the grid.
template <int D>
__device__ void ldg_even(const uint8_t* w, const int* experts, int tiles, int steps, int S, uint32_t* out,
                         unsigned long long* st) {
    const uint64_t t0 = sp::now();
    const int lane = threadIdx.x & 31;
    const long long W = (long long)gridDim.x * (blockDim.x / 32), gw = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    const long long N = (long long)S * tiles * steps;
    const int j0 = (int)(gw * N / W), j1 = (int)((gw + 1) * N / W);
    const auto addr = [&](int j) { const int v = j / steps; return sp::unit_base(w, experts, tiles, steps, v) + (size_t)(j - v * steps) * sp::kStep; };
    uint32_t acc = 0;
    uint4 q[D];
    uint32_t s[D];
#pragma unroll
    for (int d = 0; d < D; ++d)
        if (j0 + d < j1) { const uint8_t* a = addr(j0 + d); q[d] = load_streaming(a + lane * 16); s[d] = moe4::load_word_streaming(a + 512 + (lane >> 2) * 4); }
    for (int j = j0; j < j1; j += D) {
#pragma unroll
        for (int d = 0; d < D; ++d) {
            if (j + d < j1) acc ^= q[d].x ^ q[d].y ^ q[d].z ^ q[d].w ^ s[d];
            if (j + d + D < j1) { const uint8_t* a = addr(j + d + D); q[d] = load_streaming(a + lane * 16); s[d] = moe4::load_word_streaming(a + 512 + (lane >> 2) * 4); }
        }
    }
    out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.x == 0) { atomicMin(st, (unsigned long long)t0); atomicMax(st + 1, (unsigned long long)sp::now()); }
}


// pipe_run without branches in the 8-step body: the next load's address is a select and the load
// predicated; every slot's products run, B's address clamped to the unit's last step, and only
// the accumulation is predicated on s < steps.
namespace sp {
template <int NB, int kDepth>
__device__ __forceinline__ void pipe_run2(moe4::Pipe<kDepth>& p, const uint8_t* w, int steps, const uint8_t* next, int nextSteps,
                                          const uint8_t* const (&b)[2], int lane, float (&acc)[NB][4]) {
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[nb][v] = 0.f;
    const int L = (steps + kDepth - 1) / kDepth * kDepth, nextEnd = next ? L + nextSteps : 0;
    const uint8_t* nextBase = next ? next - (ptrdiff_t)L * moe2::kStepBytes : w;
    for (int s0 = 0; s0 < L; s0 += kDepth) {
#pragma unroll
        for (int d = 0; d < kDepth; ++d) {
            const int s = s0 + d, ahead = s + kDepth;
            // Past the unit's end the slot holds an earlier step's codes: zero codes add exactly 0.
            const bool live = s < steps;
            const uint4 q = live ? p.q[d] : make_uint4(0u, 0u, 0u, 0u);
            const uint32_t sw = p.s[d];
            const bool inUnit = ahead < steps, load = inUnit || (ahead >= L && ahead < nextEnd);
            const uint8_t* src = (inUnit ? w : nextBase) + (ptrdiff_t)ahead * moe2::kStepBytes;
            if (load) moe4::pipe_load(p, d, src, lane);
            const int sb = min(s, steps - 1);
            uint4 x0[NB], x1[NB];
#pragma unroll
            for (int nb = 0; nb < NB; ++nb) {
                x0[nb] = *reinterpret_cast<const uint4*>(b[nb] + sb * 256);
                x1[nb] = *reinterpret_cast<const uint4*>(b[nb] + sb * 256 + 128);
            }
            moe2::block32<0, NB>(q.x, q.y, sw, x0, acc);
            moe2::block32<2, NB>(q.z, q.w, sw, x1, acc);
        }
    }
}
}  // namespace sp


// pipe_run with its steady state split off: while the loads kDepth ahead stay inside the unit
// (s0 + 2 kDepth <= steps), a group of kDepth steps loads from one base pointer at constant
// offsets and tests nothing; the rest of the unit runs version 7's general body.
namespace sp {
template <int NB, int kDepth>
__device__ __forceinline__ void pipe_run3(moe4::Pipe<kDepth>& p, const uint8_t* w, int steps, const uint8_t* next, int nextSteps,
                                          const uint8_t* const (&b)[2], int lane, float (&acc)[NB][4]) {
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[nb][v] = 0.f;
    const int L = (steps + kDepth - 1) / kDepth * kDepth;
    int s0 = 0;
    const uint8_t* ahead = w + kDepth * moe2::kStepBytes + lane * 16;
    const uint8_t* bx[NB];
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) bx[nb] = b[nb];
    for (; s0 + 2 * kDepth <= steps; s0 += kDepth) {
#pragma unroll
        for (int d = 0; d < kDepth; ++d) {
            const uint4 q = p.q[d];
            const uint32_t sw = p.s[d];
            p.q[d] = load_streaming(ahead + d * moe2::kStepBytes);
            p.s[d] = moe4::load_word_streaming(ahead - lane * 16 + d * moe2::kStepBytes + 512 + (lane >> 2) * 4);
            uint4 x0[NB], x1[NB];
#pragma unroll
            for (int nb = 0; nb < NB; ++nb) {
                x0[nb] = *reinterpret_cast<const uint4*>(bx[nb] + d * 256);
                x1[nb] = *reinterpret_cast<const uint4*>(bx[nb] + d * 256 + 128);
            }
            moe2::block32<0, NB>(q.x, q.y, sw, x0, acc);
            moe2::block32<2, NB>(q.z, q.w, sw, x1, acc);
        }
        ahead += kDepth * moe2::kStepBytes;
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) bx[nb] += kDepth * 256;
    }
    for (; s0 < L; s0 += kDepth) {
#pragma unroll
        for (int d = 0; d < kDepth; ++d) {
            const int s = s0 + d, ah = s + kDepth;
            const uint4 q = p.q[d];
            const uint32_t sw = p.s[d];
            if (ah < steps) moe4::pipe_load(p, d, w + (size_t)ah * moe2::kStepBytes, lane);
            else if (ah >= L && next && ah - L < nextSteps) moe4::pipe_load(p, d, next + (size_t)(ah - L) * moe2::kStepBytes, lane);
            if (s < steps) {
                uint4 x0[NB], x1[NB];
#pragma unroll
                for (int nb = 0; nb < NB; ++nb) {
                    x0[nb] = *reinterpret_cast<const uint4*>(b[nb] + s * 256);
                    x1[nb] = *reinterpret_cast<const uint4*>(b[nb] + s * 256 + 128);
                }
                moe2::block32<0, NB>(q.x, q.y, sw, x0, acc);
                moe2::block32<2, NB>(q.z, q.w, sw, x1, acc);
            }
        }
    }
}
}  // namespace sp

// Version 7's loop itself (moe4::pipe_fill + pipe_run, one token column) against B staged in
// shared memory (one pair, 45 steps x 256 bytes of f16 hi + lo); no GLU, acc summed to out.
template <int V>
__device__ void pipe_units(const uint8_t* w, const int* experts, int tiles, int steps, int S, uint32_t* out,
                           unsigned long long* st) {
    const uint64_t t0 = sp::now();
    extern __shared__ __align__(128) uint8_t bsm[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2;
    for (int i = threadIdx.x; i < steps * 256 / 4; i += blockDim.x)
        reinterpret_cast<uint32_t*>(bsm)[i] = 0x3C003C00u ^ ((i * 2654435761u) & 0x03FF03FFu);
    __syncthreads();
    const long long U = (long long)S * tiles, G = gridDim.x, b = blockIdx.x;
    const int u0 = (int)(b * U / G), u1 = (int)((b + 1) * U / G);
    moe4::Pipe<8> pipe;
    float total = 0.f;
    const int at = (g & 1) * 64 + (lane & 3) * 16;
    const uint8_t* const bl[2] = {bsm + at, bsm + at};
    if (u0 + warp < u1) moe4::pipe_fill(pipe, sp::unit_base(w, experts, tiles, steps, u0 + warp), steps, lane);
    for (int v = u0 + warp; v < u1; v += 8) {
        const uint8_t* wv = sp::unit_base(w, experts, tiles, steps, v);
        const uint8_t* nw = v + 8 < u1 ? sp::unit_base(w, experts, tiles, steps, v + 8) : nullptr;
        float acc[1][4];
        if (V == 2) sp::pipe_run2<1, 8>(pipe, wv, steps, nw, nw ? steps : 0, bl, lane, acc);
        else if (V == 3) sp::pipe_run3<1, 8>(pipe, wv, steps, nw, nw ? steps : 0, bl, lane, acc);
        else moe4::pipe_run<1, 8>(pipe, wv, steps, nw, nw ? steps : 0, bl, lane, acc);
        total += acc[0][0] + acc[0][1] + acc[0][2] + acc[0][3];
    }
    reinterpret_cast<float*>(out)[blockIdx.x * blockDim.x + threadIdx.x] = total;
    __syncthreads();
    if (threadIdx.x == 0) { atomicMin(st, (unsigned long long)t0); atomicMax(st + 1, (unsigned long long)sp::now()); }
}

// Bulk copies (TMA engine, cp.async.bulk) into a ring of R chunks of up to 16 steps per block,
// one producer thread (warp 8), 8 consumer warps (chunk c to warp c % 8) that xor the chunk.
namespace sp {
__device__ __forceinline__ uint32_t sa(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mb_init(uint64_t* m, int n) { asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(sa(m)), "r"(n)); }
__device__ __forceinline__ void mb_expect(uint64_t* m, int bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(sa(m)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mb_arrive(uint64_t* m) { asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(sa(m)) : "memory"); }
__device__ __forceinline__ void mb_wait(uint64_t* m, int parity) {
    asm volatile("{\n .reg .pred p;\n W: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra W;\n}" ::"r"(sa(m)), "r"(parity) : "memory");
}
__device__ __forceinline__ void bulk(void* dst, const void* src, int bytes, uint64_t* m) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(sa(dst)), "l"(src), "r"(bytes), "r"(sa(m)) : "memory");
}
}  // namespace sp

template <int R>
__device__ void bulk_units(const uint8_t* w, const int* experts, int tiles, int steps, int S, uint32_t* out,
                           unsigned long long* st) {
    const uint64_t t0 = sp::now();
    constexpr int kChunkSteps = 16, kChunk = kChunkSteps * sp::kStep;
    extern __shared__ __align__(128) uint8_t ring[];
    __shared__ uint64_t full[R], empty[R];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (threadIdx.x == 0) {
        for (int r = 0; r < R; ++r) { sp::mb_init(&full[r], 1); sp::mb_init(&empty[r], 1); }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    const long long U = (long long)S * tiles, G = gridDim.x, b = blockIdx.x;
    const int u0 = (int)(b * U / G), u1 = (int)((b + 1) * U / G);
    const int perUnit = (steps + kChunkSteps - 1) / kChunkSteps, C = (u1 - u0) * perUnit;
    if (warp == 8) {
        if (lane == 0)
            for (int c = 0; c < C; ++c) {
                const int r = c % R;
                if (c >= R) sp::mb_wait(&empty[r], (c / R - 1) & 1);
                const int v = u0 + c / perUnit, k = c % perUnit, n = min(kChunkSteps, steps - k * kChunkSteps);
                sp::mb_expect(&full[r], n * sp::kStep);
                sp::bulk(ring + r * kChunk, sp::unit_base(w, experts, tiles, steps, v) + (size_t)k * kChunkSteps * sp::kStep, n * sp::kStep, &full[r]);
            }
    } else {
        uint32_t acc = 0;
        for (int c = warp; c < C; c += 8) {
            const int r = c % R, k = c % perUnit, n = min(kChunkSteps, steps - k * kChunkSteps);
            sp::mb_wait(&full[r], (c / R) & 1);
            const uint8_t* p = ring + r * kChunk;
            for (int j = 0; j < n; ++j) {
                const uint4 q = *reinterpret_cast<const uint4*>(p + j * sp::kStep + lane * 16);
                acc ^= q.x ^ q.y ^ q.z ^ q.w ^ *reinterpret_cast<const uint32_t*>(p + j * sp::kStep + 512 + (lane >> 2) * 4);
            }
            __syncwarp();
            if (lane == 0) sp::mb_arrive(&empty[r]);
        }
        out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
    }
    __syncthreads();
    if (threadIdx.x == 0) { atomicMin(st, (unsigned long long)t0); atomicMax(st + 1, (unsigned long long)sp::now()); }
}


// Version 7's products with the weights streamed by cp.async into a ring of R steps per warp in
// shared memory (no registers held by loads in flight), B as in pipe_units. One warp walks its
// units' steps as one sequence: step j's copy is issued after step j - R is consumed.
namespace sp {
__device__ __forceinline__ void cp16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;" ::"r"(sa(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wait_groups() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }
}  // namespace sp

template <int R>
__device__ void ring_units(const uint8_t* w, const int* experts, int tiles, int steps, int S, uint32_t* out,
                           unsigned long long* st) {
    const uint64_t t0 = sp::now();
    extern __shared__ __align__(128) uint8_t bsm[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2;
    uint8_t* ring = bsm + steps * 256 + warp * R * sp::kStep;
    for (int i = threadIdx.x; i < steps * 256 / 4; i += blockDim.x)
        reinterpret_cast<uint32_t*>(bsm)[i] = 0x3C003C00u ^ ((i * 2654435761u) & 0x03FF03FFu);
    __syncthreads();
    const long long U = (long long)S * tiles, G = gridDim.x, b = blockIdx.x;
    const int u0 = (int)(b * U / G), u1 = (int)((b + 1) * U / G);
    const int mine = u1 - (u0 + warp) > 0 ? (u1 - (u0 + warp) + 7) / 8 : 0, J = mine * steps;
    // Issue cursor: unit index (0..mine), step in unit.
    int iu = 0, is = 0;
    const uint8_t* ibase = mine ? sp::unit_base(w, experts, tiles, steps, u0 + warp) : w;
    const auto issue = [&](int slot) {
        if (iu < mine) {
            const uint8_t* src = ibase + (size_t)is * sp::kStep;
            uint8_t* dst = ring + slot * sp::kStep;
            sp::cp16(dst + lane * 16, src + lane * 16);
            if (lane < 2) sp::cp16(dst + 512 + lane * 16, src + 512 + lane * 16);
            if (++is == steps) { is = 0; ++iu; if (iu < mine) ibase = sp::unit_base(w, experts, tiles, steps, u0 + warp + 8 * iu); }
        }
        sp::commit();
    };
#pragma unroll
    for (int r = 0; r < R; ++r) issue(r);
    const int at = (g & 1) * 64 + (lane & 3) * 16;
    float total = 0.f, acc[1][4] = {{0.f, 0.f, 0.f, 0.f}};
    int cs = 0;
    for (int j0 = 0; j0 < J; j0 += R) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            if (j0 + r < J) {
                sp::wait_groups<R - 1>();
                __syncwarp();
                const uint8_t* slot = ring + r * sp::kStep;
                const uint4 q = *reinterpret_cast<const uint4*>(slot + lane * 16);
                const uint32_t sw = *reinterpret_cast<const uint32_t*>(slot + 512 + (lane >> 2) * 4);
                const uint4 x0[1] = {*reinterpret_cast<const uint4*>(bsm + cs * 256 + at)};
                const uint4 x1[1] = {*reinterpret_cast<const uint4*>(bsm + cs * 256 + at + 128)};
                __syncwarp();
                issue(r);
                moe2::block32<0, 1>(q.x, q.y, sw, x0, acc);
                moe2::block32<2, 1>(q.z, q.w, sw, x1, acc);
                if (++cs == steps) {
                    cs = 0;
                    total += acc[0][0] + acc[0][1] + acc[0][2] + acc[0][3];
                    acc[0][0] = acc[0][1] = acc[0][2] = acc[0][3] = 0.f;
                }
            }
        }
    }
    sp::wait_groups<0>();
    reinterpret_cast<float*>(out)[blockIdx.x * blockDim.x + threadIdx.x] = total;
    __syncthreads();
    if (threadIdx.x == 0) { atomicMin(st, (unsigned long long)t0); atomicMax(st + 1, (unsigned long long)sp::now()); }
}


// Diagnostics: (a) version 7's loop with the dequantization left out (the code words used as
// f16 pairs as they are: wrong values, same loads, mma and scales); (b) version 7's loop with
// every warp of the grid busy (each warp an even share of all steps, as segments of units).
namespace sp {
template <int NB>
__device__ __forceinline__ void block32_raw(uint32_t wg, uint32_t wg8, uint32_t sw, const uint4 (&xb)[NB], float (&acc)[NB][4], int sb) {
    const uint32_t a0[4] = {wg, wg8, wg ^ 0x11u, wg8 ^ 0x11u};
    const uint32_t a1[4] = {wg ^ 0x22u, wg8 ^ 0x22u, wg ^ 0x33u, wg8 ^ 0x33u};
    const float sg = sb ? moe2::scale_byte<2>(sw) : moe2::scale_byte<0>(sw), sg8 = sb ? moe2::scale_byte<3>(sw) : moe2::scale_byte<1>(sw);
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
        float d[4] = {0.f, 0.f, 0.f, 0.f};
        mma_f16(d, a0, xb[nb].x, xb[nb].y);
        mma_f16(d, a1, xb[nb].z, xb[nb].w);
        acc[nb][0] = fmaf(d[0], sg, acc[nb][0]);
        acc[nb][1] = fmaf(d[1], sg, acc[nb][1]);
        acc[nb][2] = fmaf(d[2], sg8, acc[nb][2]);
        acc[nb][3] = fmaf(d[3], sg8, acc[nb][3]);
    }
}
template <int NB, int kDepth>
__device__ __forceinline__ void pipe_run_raw(moe4::Pipe<kDepth>& p, const uint8_t* w, int steps, const uint8_t* next, int nextSteps,
                                             const uint8_t* const (&b)[2], int lane, float (&acc)[NB][4]) {
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[nb][v] = 0.f;
    const int L = (steps + kDepth - 1) / kDepth * kDepth;
    for (int s0 = 0; s0 < L; s0 += kDepth) {
#pragma unroll
        for (int d = 0; d < kDepth; ++d) {
            const int s = s0 + d, ahead = s + kDepth;
            const uint4 q = p.q[d];
            const uint32_t sw = p.s[d];
            if (ahead < steps) moe4::pipe_load(p, d, w + (size_t)ahead * moe2::kStepBytes, lane);
            else if (ahead >= L && next && ahead - L < nextSteps) moe4::pipe_load(p, d, next + (size_t)(ahead - L) * moe2::kStepBytes, lane);
            if (s < steps) {
                uint4 x0[NB], x1[NB];
#pragma unroll
                for (int nb = 0; nb < NB; ++nb) {
                    x0[nb] = *reinterpret_cast<const uint4*>(b[nb] + s * 256);
                    x1[nb] = *reinterpret_cast<const uint4*>(b[nb] + s * 256 + 128);
                }
                block32_raw<NB>(q.x, q.y, sw, x0, acc, 0);
                block32_raw<NB>(q.z, q.w, sw, x1, acc, 1);
            }
        }
    }
}
}  // namespace sp

template <int V>
__device__ void pipe_diag(const uint8_t* w, const int* experts, int tiles, int steps, int S, uint32_t* out,
                          unsigned long long* st) {
    const uint64_t t0 = sp::now();
    extern __shared__ __align__(128) uint8_t bsm[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2;
    for (int i = threadIdx.x; i < steps * 256 / 4; i += blockDim.x)
        reinterpret_cast<uint32_t*>(bsm)[i] = 0x3C003C00u ^ ((i * 2654435761u) & 0x03FF03FFu);
    __syncthreads();
    moe4::Pipe<8> pipe;
    float total = 0.f;
    const int at = (g & 1) * 64 + (lane & 3) * 16;
    const uint8_t* const bl[2] = {bsm + at, bsm + at};
    if (V == 0) {  // no dequantization, version 7's split
        const long long U = (long long)S * tiles, G = gridDim.x, b = blockIdx.x;
        const int u0 = (int)(b * U / G), u1 = (int)((b + 1) * U / G);
        if (u0 + warp < u1) moe4::pipe_fill(pipe, sp::unit_base(w, experts, tiles, steps, u0 + warp), steps, lane);
        for (int v = u0 + warp; v < u1; v += 8) {
            const uint8_t* wv = sp::unit_base(w, experts, tiles, steps, v);
            const uint8_t* nw = v + 8 < u1 ? sp::unit_base(w, experts, tiles, steps, v + 8) : nullptr;
            float acc[1][4];
            sp::pipe_run_raw<1, 8>(pipe, wv, steps, nw, nw ? steps : 0, bl, lane, acc);
            total += acc[0][0] + acc[0][1] + acc[0][2] + acc[0][3];
        }
    } else {  // every warp busy: an even share of all steps, unit by unit
        const long long Wn = (long long)gridDim.x * 8, gw = blockIdx.x * 8LL + warp, N = (long long)S * tiles * steps;
        int j = (int)(gw * N / Wn);
        const int j1 = (int)((gw + 1) * N / Wn);
        while (j < j1) {
            const int v = j / steps, a = j - v * steps, n = min(steps - a, j1 - j);
            const uint8_t* wv = sp::unit_base(w, experts, tiles, steps, v) + (size_t)a * moe2::kStepBytes;
            moe4::pipe_fill(pipe, wv, n, lane);
            float acc[1][4];
            moe4::pipe_run<1, 8>(pipe, wv, n, nullptr, 0, bl, lane, acc);
            total += acc[0][0] + acc[0][1] + acc[0][2] + acc[0][3];
            j += n;
        }
    }
    reinterpret_cast<float*>(out)[blockIdx.x * blockDim.x + threadIdx.x] = total;
    __syncthreads();
    if (threadIdx.x == 0) { atomicMin(st, (unsigned long long)t0); atomicMax(st + 1, (unsigned long long)sp::now()); }
}

#define SP_ARGS const uint8_t* w, const int* experts, int tiles, int steps, int S, uint32_t* out, unsigned long long* st
#define SP_PASS w, experts, tiles, steps, S, out, st
extern "C" __global__ void __launch_bounds__(256, 2) sp_ldg4(SP_ARGS) { ldg_units<4>(SP_PASS); }
extern "C" __global__ void __launch_bounds__(256, 2) sp_ldg8(SP_ARGS) { ldg_units<8>(SP_PASS); }
extern "C" __global__ void __launch_bounds__(256, 2) sp_ldg16(SP_ARGS) { ldg_units<16>(SP_PASS); }
extern "C" __global__ void __launch_bounds__(256, 2) sp_even8(SP_ARGS) { ldg_even<8>(SP_PASS); }
extern "C" __global__ void __launch_bounds__(256, 2) sp_even16(SP_ARGS) { ldg_even<16>(SP_PASS); }
extern "C" __global__ void __launch_bounds__(256, 2) sp_pipe(SP_ARGS) { pipe_units<1>(SP_PASS); }
extern "C" __global__ void __launch_bounds__(256, 2) sp_pipe2(SP_ARGS) { pipe_units<2>(SP_PASS); }
extern "C" __global__ void __launch_bounds__(288, 1) sp_bulk12(SP_ARGS) { bulk_units<12>(SP_PASS); }
extern "C" __global__ void __launch_bounds__(288, 1) sp_bulk24(SP_ARGS) { bulk_units<24>(SP_PASS); }
extern "C" __global__ void __launch_bounds__(256, 2) sp_ring8(SP_ARGS) { ring_units<8>(SP_PASS); }
extern "C" __global__ void __launch_bounds__(256, 2) sp_ring16(SP_ARGS) { ring_units<16>(SP_PASS); }
extern "C" __global__ void __launch_bounds__(256, 2) sp_ring20(SP_ARGS) { ring_units<20>(SP_PASS); }
extern "C" __global__ void __launch_bounds__(256, 2) sp_nodq(SP_ARGS) { pipe_diag<0>(SP_PASS); }
extern "C" __global__ void __launch_bounds__(256, 2) sp_pipeeven(SP_ARGS) { pipe_diag<1>(SP_PASS); }
extern "C" __global__ void __launch_bounds__(256, 3) sp_pipe3b(SP_ARGS) { pipe_units<1>(SP_PASS); }
extern "C" __global__ void __launch_bounds__(256, 2) sp_pipe3(SP_ARGS) { pipe_units<3>(SP_PASS); }

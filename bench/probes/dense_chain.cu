// A probe for the persistent decode kernel (ARCHITECTURE.md's runtime end state; issue 4), not
// part of the build: does one resident grid that streams the next product's weights into shared
// memory while it waits for the current product's input run a chain of dependent 1-token FP8
// products near the copy bandwidth, where a chain of kernels (one launch a product, programmatic
// launches in a graph, as the executor runs them) reaches 35-45%?
//
// The chain: P products y_p = W_p . x_p, x_{p+1} = y_p, FP8 E4M3 weights [n, k] row-major with
// f32 multipliers per 128 x 128 tile (the layout of gemv_wide_fp8_t1, so the harness can run the
// real kernel on the same bytes). Every product needs the whole of the previous one's output, so
// every product ends in a grid-wide barrier, as a decode step's products do.
//
// dense_chain<AHEAD>: one block a multiprocessor (the grid must be resident), kThreads threads.
// Block b owns rows [b n / G, (b + 1) n / G) of every product, contiguous bytes, copied into
// shared memory with 16-byte cp.async. AHEAD = 1: product p + 1's rows are asked for when
// product p starts, before its barrier, so while a block waits for its input and computes, the
// next weights stream (two buffers). AHEAD = 0: product p's rows are asked for only when p
// starts (still before its barrier): what a chain of programmatic launches can do at best.
// Barrier: a counter that only grows (zero it before the launch); a block arrives after its
// outputs are written (bar.sync, then thread 0 fences and adds), and waits with ld.acquire.
// x is staged in shared memory padded like gemv.cu (20 floats per 16-element chunk: the
// lane-strided 16-byte reads hit distinct banks); loads of x bypass L1 (__ldcg).
// Budget (gpt-oss-20b's o_proj and a 4096 x 2880 product alternating, 48 products): 566 MB,
// 135 us at 4.2 TB/s. Compute per block and product: about 90 K FP8 weights from shared memory.
#include <stdint.h>
#include <cuda_fp16.h>

constexpr int kThreads = 512, kWarps = kThreads / 32, kTile = 128;

struct Product {
    const uint8_t* w;      // [n, k] E4M3
    const float* scales;   // [ceil(n / 128), ceil(k / 128)]
    const float* x;        // [k]
    float* y;              // [n]
    int n, k;
};

__device__ __forceinline__ void copy16(void* dst, const void* src) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(src) : "memory");
}
__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wait_groups() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }
__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ uint64_t now() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ float2 e4m3x2(uint32_t pair) {
    uint32_t h2;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"((unsigned short)pair));
    const __half2 h = *reinterpret_cast<const __half2*>(&h2);
    return __half22float2(h);
}

__device__ __forceinline__ unsigned smem_addr(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }
// The bulk (TMA) path: one mbarrier a buffer; thread 0 posts the bytes it expects, then issues
// the buffer's copies (a row each) on the tensor memory accelerator, which signals the barrier
// as they land; every thread waits on the barrier's phase.
__device__ __forceinline__ void bar_init(uint64_t* bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void bar_expect(uint64_t* bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned bytes, uint64_t* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void bar_wait(uint64_t* bar, unsigned parity) {
    asm volatile("{\n\t.reg .pred done;\n"
                 "WAIT%=:\n\t"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n\t"
                 "@!done bra WAIT%=;\n}" ::"r"(smem_addr(bar)), "r"(parity) : "memory");
}

// A weight row's stride in shared memory: rows of a multiple of 128 bytes get 64 bytes of
// padding, so the tensor-core rows' loads of rows g and g + 1 (64 bytes each) use all 32 banks.
__host__ __device__ constexpr int row_stride(int k) { return k % 128 == 0 ? k + 64 : k; }

__device__ __forceinline__ uint4 lds128(unsigned a) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a) : "memory");
    return v;
}
__device__ __forceinline__ float lds32f(unsigned a) {
    float v;
    asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(a) : "memory");
    return v;
}

__device__ __forceinline__ void rows_of(const Product& p, int& r0, int& r1) {
    // 32-bit: grid x n stays under 2^31 here (a 64-bit division costs about 70 instructions).
    r0 = (int)(blockIdx.x * (unsigned)p.n / gridDim.x);
    r1 = (int)((blockIdx.x + 1) * (unsigned)p.n / gridDim.x);
}

__device__ __forceinline__ void copy4(void* dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}
// SS: the tile multipliers of the block's rows (at most 2 row tiles x 32) go to shared memory
// with the weights (4-byte cp.async), so the rows do not wait on a DRAM round trip for them.
constexpr int kScales = 64;
template <int BULK, int SS = 0>
__device__ __forceinline__ void issue(const Product& p, uint8_t* buf, uint64_t* bar, float* sc = nullptr) {
    int r0, r1;
    rows_of(p, r0, r1);
    if (SS) {
        const int tpr = (p.k + kTile - 1) / kTile, t0 = r0 / kTile, n = ((r1 - 1) / kTile - t0 + 1) * tpr;
        for (int j = threadIdx.x; j < n; j += kThreads) copy4(sc + j, p.scales + (size_t)t0 * tpr + j);
    }
    const uint8_t* src = p.w + (size_t)r0 * p.k;
    const int rows = r1 - r0, stride = row_stride(p.k), perRow = p.k / 16;
    if (BULK) {  // a copy a row (at most 4096 bytes here)
        if (threadIdx.x == 0) {
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the buffer's last reads before the copies' writes
            bar_expect(bar, rows * p.k);
            for (int r = 0; r < rows; ++r) bulk_copy(buf + r * stride, src + (size_t)r * p.k, p.k, bar);
        }
    } else {
        // A warp a row at a time (no division by the row length per chunk: run 12's copies, one
        // division a chunk, put about 0.5 us of integer work before the rows of the after modes).
        const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
        for (int r = warp; r < rows; r += kWarps)
            for (int c = lane; c < perRow; c += 32) copy16(buf + r * stride + 16 * c, src + (size_t)r * p.k + 16 * c);
    }
}

// stamps (block 0, thread 0), 4 a product: the barrier let the block in; x staged and the
// weights landed; the rows done; the arrival posted. Then the kernel's first and last stamps.
// AHEAD: 0 a product's copies are issued when it starts (before its barrier); 1 the next
// product's when this one starts; 2 the next product's once this one's x is staged (so the x
// loads do not queue behind 92 KB of copies into the same multiprocessor).
// REL: 0 arrive with __threadfence + atomicAdd; 1 with one red.release.gpu.
// streamOnly: 1 no barrier, no x, no rows: only the weights' copies and their waits (how fast the
// copies alone stream); 2 no barrier and no arrival, the rest as always (the rows without the
// grid's waits around them: wrong results, for profiling the rows).
// ROWS: 0 a warp a row, each lane its chunks of the row with x from shared memory (x read from
// shared memory once per row: 5 bytes of shared reads per weight byte); 1 a thread a chunk
// column, its 16 x values in registers, walking rows; the per-(row, chunk) sums go to shared
// memory and a warp a row adds them in a fixed order.
// CONV (tensor-core rows): how E4M3 bytes become the mma's f16: 0 cvt.rn.f16x2.e4m3x2 (exact);
// 1 none (the raw bytes: wrong results, a diagnostic of what the conversion costs); 2 integer
// operations, 7 a word (each byte's 7 exponent and mantissa bits moved under f16's, giving the
// value x 2^-8 exactly for every finite code; the multipliers take the 2^8; pairs (b0, b2) and
// (b1, b3) of a word, so x is staged as (x0, x2, x1, x3) to match).
// SA (tensor-core rows): shared memory read through 32-bit shared addresses made once before the
// loop (ld.shared), where the generic pointers made ptxas rebuild the shared window (S2R of
// SR_CgaCtaId, then LEA) before each scale load: 176 SASS instructions an iteration with 7 S2R.
template <int AHEAD, int BULK, int REL, int ROWS = 0, int SS = 0, int CONV = 0, int SA = 0>
__device__ void chain(const Product* __restrict__ products, int count, unsigned* counter, uint64_t* stamps, int bufferBytes, int streamOnly) {
    extern __shared__ __align__(1024) float4 shared4[];  // the buffers' base on a 1024-byte boundary, whatever the static variables
    __shared__ uint64_t bars[2];
    __shared__ float sscale[2][kScales];
    __shared__ unsigned long long lastLoop;  // stamps: when the last warp finished its rows' loop
    uint64_t* inner = stamps ? stamps + 4 * count + 5 : nullptr;  // 2 a product: warp 0's loop done, the last warp's
    uint8_t* bufs = reinterpret_cast<uint8_t*>(shared4);
    float* xs = reinterpret_cast<float*>(bufs + 2 * bufferBytes);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const bool stamping = stamps && blockIdx.x == 0 && threadIdx.x == 0;
    if (stamping) lastLoop = 0;
    if (stamping) {
        stamps[4 * count] = now();
        stamps[4 * count + 2] = clock64();
    }
    if (BULK) {
        if (threadIdx.x == 0) {
            bar_init(&bars[0]);
            bar_init(&bars[1]);
            asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        }
        __syncthreads();
    }
    if (AHEAD) {
        issue<BULK, SS>(products[0], bufs, &bars[0], sscale[0]);
        commit();
    }
    for (int i = 0; i < count; ++i) {
        const Product p = products[i];
        const int b = AHEAD ? (i & 1) : 0;
        uint8_t* w = bufs + b * bufferBytes;
        // A buffer's barrier completes a phase per use: AHEAD uses each every other product.
        const unsigned parity = AHEAD ? (i >> 1) & 1 : i & 1;
        const float* sc = sscale[b];
        if (AHEAD == 1 || (AHEAD == 2 && streamOnly == 1)) {
            if (i + 1 < count) issue<BULK, SS>(products[i + 1], bufs + ((i + 1) & 1) * bufferBytes, &bars[(i + 1) & 1], sscale[(i + 1) & 1]);
            commit();
        } else if (AHEAD == 0) {
            issue<BULK, SS>(p, w, &bars[0], sscale[0]);
            commit();
        }
        if (streamOnly == 1) {
            if (BULK) bar_wait(&bars[b], parity);
            if (!BULK || SS) { if (AHEAD) wait_groups<1>(); else wait_groups<0>(); }
            __syncthreads();
            continue;
        }
        if (i > 0 && streamOnly != 2) {
            if (threadIdx.x == 0)
                while (load_acquire(counter) < (unsigned)(i * gridDim.x)) {
                }
            __syncthreads();
        }
        if (stamping) stamps[4 * i] = now();
        // AHEAD == 2: the next product's copies, once this one's x is in shared memory.
        auto issue_next = [&] {
            if (i + 1 < count) issue<BULK, SS>(products[i + 1], bufs + ((i + 1) & 1) * bufferBytes, &bars[(i + 1) & 1], sscale[(i + 1) & 1]);
            commit();
        };
        // This product's weights (and multipliers) in shared memory, for every thread.
        auto weights_landed = [&] {
            if (BULK) bar_wait(&bars[b], parity);
            if (!BULK || SS) { if (AHEAD) wait_groups<1>(); else wait_groups<0>(); }
            __syncthreads();
            if (stamping) stamps[4 * i + 1] = now();
        };
        const int chunks = p.k / 16, tilesPerRow = (p.k + kTile - 1) / kTile;
        if (ROWS == 3) {
            if (AHEAD == 2) issue_next();
            weights_landed();
            int r0, r1;
            rows_of(p, r0, r1);
            if (threadIdx.x < r1 - r0) p.y[r0 + threadIdx.x] = 0.f;
        } else if (ROWS == 2) {
            // x as two f16 terms (hi + lo), scaled by one power of two so max |x| is in
            // [2^14, 2^15), in shared memory: xh[k], xl[k], then the warps' row sums.
            __half* xh = reinterpret_cast<__half*>(xs);
            __half* xl = xh + p.k + 32;  // 64 bytes on: the hi and lo loads of a chunk in different banks
            float* red = reinterpret_cast<float*>(xl + p.k);  // [kWarps][32]
            __shared__ float peak[kWarps];
            float4 v[2];
            float m = 0.f;
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                const int j = threadIdx.x + u * kThreads;
                if (j < p.k / 4) {
                    v[u] = __ldcg(reinterpret_cast<const float4*>(p.x) + j);
                    m = fmaxf(m, fmaxf(fmaxf(fabsf(v[u].x), fabsf(v[u].y)), fmaxf(fabsf(v[u].z), fabsf(v[u].w))));
                }
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
            if (lane == 0) peak[warp] = m;
            __syncthreads();
            m = 0.f;
#pragma unroll
            for (int q = 0; q < kWarps; ++q) m = fmaxf(m, peak[q]);
            const int E = (int)((__float_as_uint(m) >> 23) & 0xFF);
            // Valid for max |x| >= 2^-113 (E >= 14; the probe's x are near 1): below that the
            // exponent field overflows. A real kernel clamps it.
            const float scale = (E == 0 || E > 250) ? 1.f : __uint_as_float((uint32_t)(141 - E + 127) << 23);
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                const int j = threadIdx.x + u * kThreads;
                if (j < p.k / 4) {
                    const float f[4] = {v[u].x * scale, v[u].y * scale, v[u].z * scale, v[u].w * scale};
                    __half hi[4], lo[4];
#pragma unroll
                    for (int q = 0; q < 4; ++q) {
                        hi[q] = __float2half_rn(f[q]);
                        lo[q] = __float2half_rn(f[q] - __half2float(hi[q]));
                    }
                    if (CONV == 2) {
                        __half sw = hi[1]; hi[1] = hi[2]; hi[2] = sw;
                        sw = lo[1]; lo[1] = lo[2]; lo[2] = sw;
                    }
                    *reinterpret_cast<uint2*>(xh + 4 * j) = *reinterpret_cast<const uint2*>(hi);  // 8-byte stores, not 2-byte ones
                    *reinterpret_cast<uint2*>(xl + 4 * j) = *reinterpret_cast<const uint2*>(lo);
                }
            }
            if (AHEAD == 2) {  // once x is in shared memory: its loads do not queue behind the copies
                issue_next();
            }
            weights_landed();
            int r0, r1;
            rows_of(p, r0, r1);
            const int rows = r1 - r0, g = lane >> 2, t = lane & 3, kchunks = p.k / 64;
            // mma m16n8k16: lane (g, t) takes 16 bytes of rows g and g + 8 at columns 16t .. 16t + 15
            // of a 64-column chunk; step m uses their bytes 4m .. 4m + 3 as k-order (2t, 2t + 1,
            // 2t + 8, 2t + 9), and B supplies x in that order: column 0 of B is x's hi term,
            // column 1 its lo term (lanes g = 0 and 1), the others zero.
            const __half* xb = g == 0 ? xh : xl;
            // Both row tiles (rows <= 32) in one pass over the warp's chunks: two independent mma
            // chains, and each chunk's x loaded once for both.
            float total[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
            const int tilesPerRowM = (p.k + kTile - 1) / kTile;
            const uint8_t* rowp[2][2];  // this lane's four rows, fixed over the loop
#pragma unroll
            for (int rt = 0; rt < 2; ++rt)
#pragma unroll
                for (int h = 0; h < 2; ++h) rowp[rt][h] = w + (16 * rt + 8 * h + g) * row_stride(p.k) + 16 * t;
            // SA: the same places as 32-bit shared addresses, and each row's multiplier row offset.
            unsigned rowS[2][2], scRow[2][2];
            const unsigned xbS = smem_addr(xb) + 2 * 16 * t;
#pragma unroll
            for (int rt = 0; rt < 2; ++rt)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int r = 16 * rt + 8 * h + g;
                    // Rows past the block's last read the last row again (their sums are dropped), so
                    // the loads need no predicate and no zeroed registers.
                    rowS[rt][h] = smem_addr(w) + (r < rows ? r : rows - 1) * row_stride(p.k) + 16 * t;
                    scRow[rt][h] = smem_addr(sc) + 4 * (r < rows ? ((r0 + r) / kTile - r0 / kTile) * tilesPerRowM : 0);
                }
            for (int kc = warp; kc < kchunks; kc += kWarps) {
                const int col = 64 * kc + 16 * t, ct = 64 * kc / kTile;
                uint4 q[2][2];
#pragma unroll
                for (int rt = 0; rt < 2; ++rt)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int r = 16 * rt + 8 * h + g;
                        if (SA) q[rt][h] = lds128(rowS[rt][h] + 64 * kc);
                        else q[rt][h] = r < rows ? *reinterpret_cast<const uint4*>(rowp[rt][h] + 64 * kc) : make_uint4(0, 0, 0, 0);
                    }
                uint4 x0 = make_uint4(0, 0, 0, 0), x1 = make_uint4(0, 0, 0, 0);
                if (g < 2) {
                    if (SA) {
                        x0 = lds128(xbS + 2 * 64 * kc);
                        x1 = lds128(xbS + 2 * 64 * kc + 16);
                    } else {
                        x0 = *reinterpret_cast<const uint4*>(xb + col);
                        x1 = *reinterpret_cast<const uint4*>(xb + col + 8);
                    }
                }
                const uint32_t xv[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
                float d[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
                for (int st = 0; st < 4; ++st)
#pragma unroll
                    for (int rt = 0; rt < 2; ++rt) {
                        const uint32_t wa = st == 0 ? q[rt][0].x : st == 1 ? q[rt][0].y : st == 2 ? q[rt][0].z : q[rt][0].w;
                        const uint32_t wb = st == 0 ? q[rt][1].x : st == 1 ? q[rt][1].y : st == 2 ? q[rt][1].z : q[rt][1].w;
                        uint32_t a0, a1, a2, a3;
                        if (CONV == 0 && SA) {  // the word split into its halves in PTX: no shift in SASS
                            asm("{\n\t.reg .b16 lo, hi;\n\tmov.b32 {lo, hi}, %2;\n\t"
                                "cvt.rn.f16x2.e4m3x2 %0, lo;\n\tcvt.rn.f16x2.e4m3x2 %1, hi;\n\t}" : "=r"(a0), "=r"(a2) : "r"(wa));
                            asm("{\n\t.reg .b16 lo, hi;\n\tmov.b32 {lo, hi}, %2;\n\t"
                                "cvt.rn.f16x2.e4m3x2 %0, lo;\n\tcvt.rn.f16x2.e4m3x2 %1, hi;\n\t}" : "=r"(a1), "=r"(a3) : "r"(wb));
                        } else if (CONV == 0) {
                            asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(a0) : "h"((unsigned short)(wa & 0xFFFF)));
                            asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(a2) : "h"((unsigned short)(wa >> 16)));
                            asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(a1) : "h"((unsigned short)(wb & 0xFFFF)));
                            asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(a3) : "h"((unsigned short)(wb >> 16)));
                        } else if (CONV == 1) {
                            a0 = wa; a2 = wa >> 8; a1 = wb; a3 = wb >> 8;
                        } else {
                            auto even = [](uint32_t v) {  // bytes 0, 2 -> f16x2 x 2^-8
                                const uint32_t u = __byte_perm(v, 0u, 0x2404);
                                return ((u & 0x7F007F00u) >> 1) | (u & 0x80008000u);
                            };
                            auto odd = [](uint32_t v) {  // bytes 1, 3 -> f16x2 x 2^-8
                                return ((v & 0x7F007F00u) >> 1) | (v & 0x80008000u);
                            };
                            a0 = even(wa); a2 = odd(wa); a1 = even(wb); a3 = odd(wb);
                        }
                        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                            : "+f"(d[rt][0]), "+f"(d[rt][1]), "+f"(d[rt][2]), "+f"(d[rt][3])
                            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(xv[2 * st]), "r"(xv[2 * st + 1]));
                    }
                // Lanes t = 0 hold columns 0 (hi) and 1 (lo) of rows g and g + 8 of each tile.
#pragma unroll
                for (int rt = 0; rt < 2; ++rt)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int r = 16 * rt + 8 * h + g;
                        if (r < rows) {
                            const float sv = SA && SS ? lds32f(scRow[rt][h] + 4 * ct)
                                           : SS ? sc[((r0 + r) / kTile - r0 / kTile) * tilesPerRowM + ct]
                                                : __ldg(p.scales + (size_t)((r0 + r) / kTile) * tilesPerRowM + ct);
                            total[rt][h] = fmaf(d[rt][2 * h] + d[rt][2 * h + 1], CONV == 2 ? 256.f * sv : sv, total[rt][h]);
                        }
                    }
            }
            if (stamps && blockIdx.x == 0 && lane == 0) {
                const uint64_t tnow = now();
                atomicMax(&lastLoop, (unsigned long long)tnow);
                if (warp == 0) inner[2 * i] = tnow;
            }
            if (t == 0)
#pragma unroll
                for (int rt = 0; rt < 2; ++rt)
#pragma unroll
                    for (int h = 0; h < 2; ++h) red[warp * 32 + 16 * rt + 8 * h + g] = total[rt][h];
            __syncthreads();
            if (threadIdx.x < rows) {
                float acc = 0.f;
                for (int q = 0; q < kWarps; ++q) acc += red[q * 32 + threadIdx.x];
                p.y[r0 + threadIdx.x] = acc / scale;
            }
        } else if (ROWS == 1) {
            const int G = kThreads / chunks, c = threadIdx.x % chunks, g = threadIdx.x / chunks;
            float4 xv[4];
            if (g < G)
#pragma unroll
                for (int j = 0; j < 4; ++j) xv[j] = __ldcg(reinterpret_cast<const float4*>(p.x + 16 * c) + j);
            if (AHEAD == 2) issue_next();
            weights_landed();
            int r0, r1;
            rows_of(p, r0, r1);
            const int rows = r1 - r0;
            float* part = xs;
            if (g < G) {
                const float* colScales = p.scales + 16 * c / kTile;
                for (int r = g; r < rows; r += G) {
                    const uint4 q = *reinterpret_cast<const uint4*>(w + (size_t)r * row_stride(p.k) + 16 * c);
                    const uint32_t words[4] = {q.x, q.y, q.z, q.w};
                    float sum[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const float2 lo = e4m3x2(words[j] & 0xFFFF), hi = e4m3x2(words[j] >> 16);
                        sum[j] = fmaf(lo.x, xv[j].x, sum[j]);
                        sum[j] = fmaf(lo.y, xv[j].y, sum[j]);
                        sum[j] = fmaf(hi.x, xv[j].z, sum[j]);
                        sum[j] = fmaf(hi.y, xv[j].w, sum[j]);
                    }
                    part[r * chunks + c] = ((sum[0] + sum[1]) + (sum[2] + sum[3])) * __ldg(colScales + (size_t)((r0 + r) / kTile) * tilesPerRow);
                }
            }
            __syncthreads();
            for (int r = warp; r < rows; r += kWarps) {
                float acc = 0.f;
                for (int j = lane; j < chunks; j += 32) acc += part[r * chunks + j];
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
                if (lane == 0) p.y[r0 + r] = acc;
            }
        } else {
        // Stage x (padded), every thread's loads in flight together.
        const int v4 = p.k / 4;
        float4 v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int j = threadIdx.x + u * kThreads;
            if (j < v4) v[u] = __ldcg(reinterpret_cast<const float4*>(p.x) + j);
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int j = threadIdx.x + u * kThreads;
            if (j < v4) {
                const int e = 4 * j;
                *reinterpret_cast<float4*>(xs + e / 16 * 20 + e % 16) = v[u];
            }
        }
        if (AHEAD == 2) issue_next();
        weights_landed();
        int r0, r1;
        rows_of(p, r0, r1);
        for (int r = r0 + warp; r < r1; r += kWarps) {
            const uint8_t* row = w + (size_t)(r - r0) * row_stride(p.k);
            const float* rowScales = p.scales + (size_t)(r / kTile) * tilesPerRow;
            float acc = 0.f;
            for (int c = lane; c < chunks; c += 32) {
                const uint4 q = *reinterpret_cast<const uint4*>(row + 16 * c);
                const float* xc = xs + c * 20;
                const uint32_t words[4] = {q.x, q.y, q.z, q.w};
                float part[4] = {0.f, 0.f, 0.f, 0.f};  // four short chains, not one of 16
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const float2 lo = e4m3x2(words[j] & 0xFFFF), hi = e4m3x2(words[j] >> 16);
                    const float4 a = *reinterpret_cast<const float4*>(xc + 4 * j);
                    part[j] = fmaf(lo.x, a.x, part[j]);
                    part[j] = fmaf(lo.y, a.y, part[j]);
                    part[j] = fmaf(hi.x, a.z, part[j]);
                    part[j] = fmaf(hi.y, a.w, part[j]);
                }
                const float sv = SS ? sc[(r / kTile - r0 / kTile) * tilesPerRow + 16 * c / kTile] : __ldg(rowScales + 16 * c / kTile);
                acc = fmaf((part[0] + part[1]) + (part[2] + part[3]), sv, acc);
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
            if (lane == 0) p.y[r] = acc;
        }
        if (stamps && blockIdx.x == 0 && lane == 0) {
            const uint64_t tnow = now();
            atomicMax(&lastLoop, (unsigned long long)tnow);
            if (warp == 0) inner[2 * i] = tnow;
        }
        }
        __syncthreads();  // outputs written; w and xs free for reuse
        if (stamping) {
            inner[2 * i + 1] = lastLoop;
            lastLoop = 0;
        }
        if (stamping) stamps[4 * i + 2] = now();
        if (threadIdx.x == 0 && streamOnly != 2) {
            if (REL) {
                asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counter) : "memory");
            } else {
                __threadfence();
                atomicAdd(counter, 1u);
            }
        }
        if (stamping) stamps[4 * i + 3] = now();
    }
    if (stamping) {  // block 0's clock against the global timer: the multiprocessor's frequency
        stamps[4 * count + 3] = clock64();
        stamps[4 * count + 4] = now();
    }
    if (stamps && threadIdx.x == 0) atomicMax(reinterpret_cast<unsigned long long*>(stamps + 4 * count + 1), (unsigned long long)now());
}

#define CHAIN_ENTRY(NAME, AHEAD, BULK, REL, ...)                                                                        \
    extern "C" __global__ void __launch_bounds__(kThreads, 1)                                                         \
        NAME(const Product* products, int count, unsigned* counter, uint64_t* stamps, int bufferBytes, int streamOnly) { \
        chain<AHEAD, BULK, REL, ##__VA_ARGS__>(products, count, counter, stamps, bufferBytes, streamOnly);            \
    }
CHAIN_ENTRY(dense_chain_inline, 0, 0, 0)
CHAIN_ENTRY(dense_chain_ahead, 1, 0, 0)
CHAIN_ENTRY(dense_chain_ahead_bulk, 1, 1, 0)
CHAIN_ENTRY(dense_chain_inline_rel_ss, 0, 0, 1, 0, 1)
CHAIN_ENTRY(dense_chain_ahead_rel_ss, 1, 0, 1, 0, 1)
CHAIN_ENTRY(dense_chain_after_rel_ss, 2, 0, 1, 0, 1)
CHAIN_ENTRY(dense_chain_cm_ahead_rel, 1, 0, 1, 1)
CHAIN_ENTRY(dense_chain_tc_after_rel, 2, 0, 1, 2)
CHAIN_ENTRY(dense_chain_tc_inline_rel_ss, 0, 0, 1, 2, 1)
CHAIN_ENTRY(dense_chain_tc_ahead_rel_ss, 1, 0, 1, 2, 1)
CHAIN_ENTRY(dense_chain_tc_after_rel_ss, 2, 0, 1, 2, 1)
CHAIN_ENTRY(dense_chain_tc_ahead_bulk_rel_ss, 1, 1, 1, 2, 1)
CHAIN_ENTRY(dense_chain_tc_inline_rel_ss_noconv, 0, 0, 1, 2, 1, 1)
CHAIN_ENTRY(dense_chain_tc_after_rel_ss_noconv, 2, 0, 1, 2, 1, 1)
CHAIN_ENTRY(dense_chain_tc_inline_rel_ss_alu, 0, 0, 1, 2, 1, 2)
CHAIN_ENTRY(dense_chain_tc_after_rel_ss_alu, 2, 0, 1, 2, 1, 2)
CHAIN_ENTRY(dense_chain_tc_after_rel_ss_sa, 2, 0, 1, 2, 1, 0, 1)
CHAIN_ENTRY(dense_chain_tc_inline_rel_ss_sa, 0, 0, 1, 2, 1, 0, 1)
CHAIN_ENTRY(dense_chain_nomath_inline, 0, 0, 1, 3, 1)
CHAIN_ENTRY(dense_chain_nomath_after, 2, 0, 1, 3, 1)

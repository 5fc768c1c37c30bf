// Twelfth-session probe (Kernels/NOTES.md): route_token as it was at 8f9f9a1 (V0: compile against that commit's Kernels/moe.cu) against the top-k on redux.sync (V1, now in moe.cu). Kept as the record of that measurement; not built by any script. Compile from a directory beside Kernels/ with nvcc -cubin -arch=sm_90a -DFULGUR_SOURCE_HASH=1ULL; run with route-probe-run.py.
#include "../Kernels/moe.cu"
namespace probe {
using namespace moe;
__device__ __forceinline__ uint32_t order_key(float v) {
    const uint32_t u = __float_as_uint(v == 0.f ? 0.f : v);  // -0 ties +0 as in float compares
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
template <int J>
__device__ void route_token_r(const RouterArgs& a, const float* logits, int E, int k, int t, Routes r) {
    const int lane = threadIdx.x & 31;
    float logit[J], score[J], choice[J];
#pragma unroll
    for (int j = 0; j < J; ++j) {
        const int e = lane + 32 * j;
        logit[j] = e < E ? __ldcg(logits + t * E + e) : -INFINITY;
    }
    if (a.mode == kSoftmaxTopK) {
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < J; ++j) mx = fmaxf(mx, logit[j]);
        mx = warp_max(mx);
        float sum = 0;
#pragma unroll
        for (int j = 0; j < J; ++j) { score[j] = lane + 32 * j < E ? expf(logit[j] - mx) : 0.f; sum += score[j]; }
        sum = warp_sum(sum);
#pragma unroll
        for (int j = 0; j < J; ++j) { score[j] /= sum; choice[j] = lane + 32 * j < E ? score[j] : -INFINITY; }
    } else if (a.mode == kTopKSoftmax) {
#pragma unroll
        for (int j = 0; j < J; ++j) { score[j] = logit[j]; choice[j] = logit[j]; }
    } else {
#pragma unroll
        for (int j = 0; j < J; ++j) {
            const int e = lane + 32 * j;
            score[j] = 1.f / (1.f + expf(-logit[j]));
            choice[j] = e < E ? score[j] + a.correction[e] : -INFINITY;
        }
    }
    uint32_t key[J];  // 0: no candidate (beyond E, or taken); every float's key is above 0
#pragma unroll
    for (int j = 0; j < J; ++j) key[j] = lane + 32 * j < E ? order_key(isnan(choice[j]) ? -INFINITY : choice[j]) : 0u;
    int idx[kMaxTopK];
    float w[kMaxTopK];
#pragma unroll
    for (int n = 0; n < kMaxTopK; ++n) {
        if (n >= k) break;
        uint32_t bk = key[0];
        int bj = 0;
        float bs = score[0];
#pragma unroll
        for (int j = 1; j < J; ++j)
            if (key[j] > bk) { bk = key[j]; bj = j; bs = score[j]; }
        const uint32_t m = __reduce_max_sync(0xffffffffu, bk);
        const int i = __reduce_min_sync(0xffffffffu, bk == m ? lane + 32 * bj : INT_MAX);
        const int owner = i & 31;
        w[n] = __shfl_sync(0xffffffffu, bs, owner);
        idx[n] = i;
#pragma unroll
        for (int j = 0; j < J; ++j)
            if (lane == owner && j == bj) key[j] = 0u;
    }
    if (lane != 0) return;
    if (a.mode == kTopKSoftmax) {
        float mx = w[0];
#pragma unroll
        for (int n = 1; n < kMaxTopK; ++n)
            if (n < k) mx = fmaxf(mx, w[n]);
        float sum = 0;
#pragma unroll
        for (int n = 0; n < kMaxTopK; ++n)
            if (n < k) { w[n] = expf(w[n] - mx); sum += w[n]; }
#pragma unroll
        for (int n = 0; n < kMaxTopK; ++n)
            if (n < k) w[n] /= sum;
    } else if (a.normalize) {
        float sum = 0;
#pragma unroll
        for (int n = 0; n < kMaxTopK; ++n)
            if (n < k) sum += w[n];
        if (a.mode == kSigmoidWithBias) sum += 1e-20f;
#pragma unroll
        for (int n = 0; n < kMaxTopK; ++n)
            if (n < k) w[n] /= sum;
    }
#pragma unroll
    for (int n = 0; n < kMaxTopK; ++n) {
        if (n >= k) break;
        r.chosen()[t * k + n] = idx[n];
        r.chosenWeight()[t * k + n] = a.mode == kSigmoidWithBias ? w[n] * a.scaling : w[n];
    }
}
}  // namespace probe

template <int V, int J>
__device__ void probe_body(const float* logits, const float* correction, int mode, int normalize, float scaling, int E,
                           int k, int T, int reps, long long* stamps, int* out) {
    __shared__ int ints[moe2::kRouteInts];
    const moe::Routes r{ints, E, k};
    const moe::RouterArgs a{correction, mode, normalize, scaling, 1, 1};
    const int warp = threadIdx.x >> 5;
    for (int rep = 0; rep < reps; ++rep) {
        __syncthreads();
        long long t0 = clock64(), g0 = moe2::globaltimer();
        for (int t = warp; t < T; t += 8) {
            if (V == 0) moe::route_token_j<J>(a, logits, E, k, t, r);
            else probe::route_token_r<J>(a, logits, E, k, t, r);
        }
        __syncthreads();
        long long t1 = clock64();
        moe::group_pairs(T, E, k, r);
        __syncthreads();
        long long t2 = clock64(), g2 = moe2::globaltimer();
        if (threadIdx.x == 0) { stamps[4 * rep] = t1 - t0; stamps[4 * rep + 1] = t2 - t1; stamps[4 * rep + 2] = g2 - g0; }
    }
    for (int i = threadIdx.x; i < T * k; i += blockDim.x) {
        out[i] = r.chosen()[i];
        out[T * k + i] = __float_as_int(r.chosenWeight()[i]);
    }
}
#define PROBE(V, J) \
extern "C" __global__ void __launch_bounds__(256) probe_v##V##_j##J(const float* l, const float* c, int m, int n, float s, int E, int k, int T, int reps, long long* st, int* o) { \
    probe_body<V, J>(l, c, m, n, s, E, k, T, reps, st, o); }
PROBE(0, 1) PROBE(1, 1) PROBE(0, 8) PROBE(1, 8)

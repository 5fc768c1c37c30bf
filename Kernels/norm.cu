// Per-token glue of a decoder layer: embedding rows, RMSNorm (fused with the residual add
// before it), q/k head norms + RoPE + value scale + KV-cache write before attention, the GLU
// of dense MLPs, and the dense fallback of the MoE layer for experts that are not MXFP4.
//
// Budget: all of these touch activations only (a few KB to a few hundred KB per step at
// T <= 16; the embedding reads T rows of its table), so their floor is the launch, not bytes
// or flops: about 1.5-3 us each on an H200 (Kernels/NOTES.md). What matters is how many there
// are per layer, which is why the residual add rides in the norm and the four steps before
// attention are one kernel.
//
// Numerics follow the CPU executor (Sources/Fulgur/Runtime/CPUExecutor.swift): f32, RoPE
// angles in f64, only the order of sums differs.

#include "common.cuh"

namespace layer {

__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }

// gpt-oss: gate clamped above at limit, up clamped to +-limit, (up + 1) * gate * sigmoid(alpha * gate).
__device__ __forceinline__ float glu(float gate, float up, int clamped, float alpha, float limit) {
    if (!clamped) return silu(gate) * up;
    const float g = fminf(gate, limit), u = fminf(fmaxf(up, -limit), limit);
    return (u + 1.f) * (g / (1.f + expf(-g * alpha)));
}

}  // namespace layer

// x[t, :] = row tokens[t] of the table (dtype 0: f32, 1: bf16, 2: f16). Grid T, any block.
extern "C" __global__ void embed(const void* table, int dtype, const int* tokens, int hidden, float* x) {
    FULGUR_TRACE_KERNEL;
    wait_for_previous_kernel();
    allow_next_kernel();
    const int t = blockIdx.x;
    const size_t row = (size_t)tokens[t] * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v;
        if (dtype == 0) v = reinterpret_cast<const float*>(table)[row + i];
        else if (dtype == 1) v = __uint_as_float((uint32_t)reinterpret_cast<const uint16_t*>(table)[row + i] << 16);
        else v = f16lo(reinterpret_cast<const uint16_t*>(table)[row + i]);
        x[(size_t)t * hidden + i] = v;
    }
}

// With `add`: x += add first (the residual of the sublayer before). Then
// dst[r] = w * x[r] / sqrt(mean(x[r]^2) + eps) for rows of n floats. Grid rows, block 1024
// (any multiple of 32). dst may be x.
//
// Rows of up to kNormValues * blockDim.x floats are held in registers: every load of a row
// (weights before waiting for the previous kernel, then x and add) is issued before the first
// store. The loop version issued each element's loads after the previous element's store
// (x, add and dst may alias), a chain of n / blockDim.x L2 round trips twice over: 8 us a
// norm inside the replayed gpt-oss step (Kernels/NOTES.md), for 23 KB of data.
constexpr int kNormValues = 8;

extern "C" __global__ void __launch_bounds__(1024) add_rmsnorm(float* x, const float* add, float* dst, const float* w, int n, float eps) {
    FULGUR_TRACE_KERNEL;
    __shared__ float scratch[32];
    const size_t row = (size_t)blockIdx.x * n;
    if (n <= kNormValues * (int)blockDim.x) {
        float v[kNormValues], g[kNormValues];
#pragma unroll
        for (int j = 0; j < kNormValues; ++j) {
            const int i = threadIdx.x + j * blockDim.x;
            g[j] = i < n ? w[i] : 0.f;
        }
        wait_for_previous_kernel();
        allow_next_kernel();
        float a[kNormValues];
#pragma unroll
        for (int j = 0; j < kNormValues; ++j) {
            const int i = threadIdx.x + j * blockDim.x;
            v[j] = i < n ? x[row + i] : 0.f;
            a[j] = add && i < n ? add[row + i] : 0.f;
        }
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < kNormValues; ++j) {
            v[j] += a[j];
            sum += v[j] * v[j];
        }
        if (add) {
#pragma unroll
            for (int j = 0; j < kNormValues; ++j) {
                const int i = threadIdx.x + j * blockDim.x;
                if (i < n) x[row + i] = v[j];
            }
        }
        const float inv = rsqrtf(block_sum_all(sum, scratch) / n + eps);
#pragma unroll
        for (int j = 0; j < kNormValues; ++j) {
            const int i = threadIdx.x + j * blockDim.x;
            if (i < n) dst[row + i] = g[j] * (v[j] * inv);
        }
        return;
    }
    wait_for_previous_kernel();
    allow_next_kernel();
    float* xr = x + row;
    float sum = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = xr[i];
        if (add) {
            v += add[row + i];
            xr[i] = v;
        }
        sum += v * v;
    }
    const float inv = rsqrtf(block_sum_all(sum, scratch) / n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) dst[row + i] = w[i] * (xr[i] * inv);
}

// x += src over n floats.
extern "C" __global__ void add_inplace(float* x, const float* src, int n) {
    FULGUR_TRACE_KERNEL;
    wait_for_previous_kernel();
    allow_next_kernel();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) x[i] += src[i];
}

// act[t * inter + i] = glu(gate, up) with gate = gu[t * stride + i], up = gu[t * stride +
// inter + i] (dense MLPs; gate and up side by side from one stacked product).
extern "C" __global__ void glu(const float* gu, int inter, int stride, float* act, int T, int clamped, float alpha, float limit) {
    FULGUR_TRACE_KERNEL;
    wait_for_previous_kernel();
    allow_next_kernel();
    for (int n = blockIdx.x * blockDim.x + threadIdx.x; n < T * inter; n += gridDim.x * blockDim.x) {
        const int t = n / inter, i = n % inter;
        act[n] = layer::glu(gu[(size_t)t * stride + i], gu[(size_t)t * stride + inter + i], clamped, alpha, limit);
    }
}

// A fused qkv projection's chunk outputs part[t, c, 0 .. rows) = [q | k | v] (rows = qRows +
// kRows + vRows) scattered to q[t, c * qRows ..], k[t, c * kRows ..], v[t, c * vRows ..],
// whose token rows are qStride / kStride / vStride floats apart. Grid (chunks, T).
extern "C" __global__ void qkv_scatter(const float* part, int qRows, int kRows, int vRows, float* q, int qStride,
                                       float* k, int kStride, float* v, int vStride) {
    FULGUR_TRACE_KERNEL;
    wait_for_previous_kernel();
    allow_next_kernel();
    const int c = blockIdx.x, t = blockIdx.y, chunks = gridDim.x, rows = qRows + kRows + vRows;
    const float* src = part + ((size_t)t * chunks + c) * rows;
    for (int i = threadIdx.x; i < rows; i += blockDim.x) {
        const float val = src[i];
        if (i < qRows) q[(size_t)t * qStride + c * qRows + i] = val;
        else if (i < qRows + kRows) k[(size_t)t * kStride + c * kRows + i - qRows] = val;
        else v[(size_t)t * vStride + c * vRows + i - qRows - kRows] = val;
    }
}

// Before attention, for token t = blockIdx.y: block x < heads takes query head x, the others
// key/value head x - heads. Optional RMSNorm of the head (qNorm / kNorm, headDim weights),
// RoPE of its first rotaryDim dims at positions[t] (neox: pairs (i, i + rotaryDim/2), else
// (2i, 2i + 1); angles pos * invFreq[i] in f64, cos and sin times attnFactor), then the key
// and the value (times vScale) are written to the cache rows at positions[t] % capacity.
// q/k/v rows of a token are qStride / kStride / vStride floats apart; the cache is
// [capacity, kvHeads, dim]. Block: 128 threads; dynamic shared memory headDim floats.
extern "C" __global__ void __launch_bounds__(128) attention_prep(
    float* q, int qStride, float* k, int kStride, float* v, int vStride, int heads, int kvHeads, int headDim, int valueDim,
    const float* qNorm, const float* kNorm, float eps, int rotaryDim, int neox, const double* invFreq, double attnFactor,
    float vScale, const int* positions, float* cacheK, float* cacheV, int capacity, const int* slots) {
    FULGUR_TRACE_KERNEL;
    extern __shared__ float head[];
    __shared__ float scratch[32];
    wait_for_previous_kernel();
    allow_next_kernel();
    const int t = blockIdx.y, isKey = blockIdx.x >= heads, h = isKey ? blockIdx.x - heads : blockIdx.x;
    if (slots) {  // one sequence per slot, slot-major (attention_decode's top comment)
        cacheK += (size_t)slots[t] * capacity * kvHeads * headDim;
        cacheV += (size_t)slots[t] * capacity * kvHeads * valueDim;
    }
    float* src = isKey ? k + (size_t)t * kStride + h * headDim : q + (size_t)t * qStride + h * headDim;
    const float* weight = isKey ? kNorm : qNorm;
    float sum = 0.f;
    for (int i = threadIdx.x; i < headDim; i += blockDim.x) {
        head[i] = src[i];
        sum += head[i] * head[i];
    }
    if (weight) {
        const float inv = rsqrtf(block_sum_all(sum, scratch) / headDim + eps);
        for (int i = threadIdx.x; i < headDim; i += blockDim.x) head[i] = weight[i] * (head[i] * inv);
    }
    __syncthreads();
    const int pos = positions[t];
    for (int i = threadIdx.x; i < headDim; i += blockDim.x) {
        float out = head[i];
        if (i < rotaryDim)
            out = rope_rotate(head, i, rotaryDim, neox, rope_factors(pos, invFreq, rope_pair(i, rotaryDim, neox), attnFactor));
        src[i] = out;
        if (isKey) cacheK[((size_t)(pos % capacity) * kvHeads + h) * headDim + i] = out;
    }
    if (isKey) {
        float* vr = v + (size_t)t * vStride + h * valueDim;
        float* dst = cacheV + ((size_t)(pos % capacity) * kvHeads + h) * valueDim;
        for (int i = threadIdx.x; i < valueDim; i += blockDim.x) {
            const float val = vr[i] * vScale;
            vr[i] = val;
            dst[i] = val;
        }
    }
}

// Writes the step's keys and values to the cache without any transform (the DFlash
// drafter's context rows). Grid (kvHeads, T).
extern "C" __global__ void kv_store(const float* k, int kStride, const float* v, int vStride, int kvHeads, int headDim, int valueDim,
                                    const int* positions, float* cacheK, float* cacheV, int capacity) {
    FULGUR_TRACE_KERNEL;
    wait_for_previous_kernel();
    allow_next_kernel();
    const int h = blockIdx.x, t = blockIdx.y, slot = positions[t] % capacity;
    for (int i = threadIdx.x; i < headDim; i += blockDim.x)
        cacheK[((size_t)slot * kvHeads + h) * headDim + i] = k[(size_t)t * kStride + h * headDim + i];
    for (int i = threadIdx.x; i < valueDim; i += blockDim.x)
        cacheV[((size_t)slot * kvHeads + h) * valueDim + i] = v[(size_t)t * vStride + h * valueDim + i];
}

// Dense MoE fallback (experts not MXFP4: small or unquantized models). After one gemv over
// all experts' stacked gate/up rows, gu[t, e * 2I ..] holds expert e's gate and up (gate at
// even indices when interleaved, else the first I); act[t, e * I + i] = glu(gate, up).
extern "C" __global__ void moe_dense_glu(const float* gu, float* act, int T, int E, int I, int interleaved, int clamped, float alpha, float limit) {
    FULGUR_TRACE_KERNEL;
    wait_for_previous_kernel();
    allow_next_kernel();
    const int count = T * E * I;
    for (int n = blockIdx.x * blockDim.x + threadIdx.x; n < count; n += gridDim.x * blockDim.x) {
        const int i = n % I, te = n / I;  // te = t * E + e
        const float* row = gu + (size_t)te * 2 * I;
        const float gate = interleaved ? row[2 * i] : row[i], up = interleaved ? row[2 * i + 1] : row[I + i];
        act[n] = layer::glu(gate, up, clamped, alpha, limit);
    }
}

// out[t, h] = sum over token t's chosen experts of weight * y[t, e, h] (y from one grouped
// gemv over all experts, biases included). chosen/weights: [T, k] from moe_route.
extern "C" __global__ void moe_dense_combine(const float* y, const int* chosen, const float* weights, float* out, int T, int E, int k, int H) {
    FULGUR_TRACE_KERNEL;
    wait_for_previous_kernel();
    allow_next_kernel();
    for (int n = blockIdx.x * blockDim.x + threadIdx.x; n < T * H; n += gridDim.x * blockDim.x) {
        const int t = n / H, h = n % H;
        float s = 0.f;
        for (int j = 0; j < k; ++j) s += weights[t * k + j] * y[((size_t)t * E + chosen[t * k + j]) * H + h];
        out[n] = s;
    }
}

// features[t * stride + i] = x[t, i] (+ add[t, i]) for i < hidden: a layer's output hidden
// state for the DFlash drafter, with the residual the next norm will fold in added here
// without touching x. Grid T.
extern "C" __global__ void capture_rows(const float* x, const float* add, int hidden, float* features, int stride) {
    FULGUR_TRACE_KERNEL;
    wait_for_previous_kernel();
    allow_next_kernel();
    const int t = blockIdx.x;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float v = x[(size_t)t * hidden + i];
        features[(size_t)t * stride + i] = add ? v + add[(size_t)t * hidden + i] : v;
    }
}

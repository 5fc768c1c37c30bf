// Random weights made on the GPU: the matrices of a deferred random model (RandomModel.
// buildDeferred, Sources/Fulgur/Models/DeferredRandom.swift) written straight into the
// layouts the products read (gemv's row-major codes and scales, BF16 values, moe.cu's tiled
// 544-byte steps), so a 309B MiMo-V2-Flash never exists in host memory. Every byte is a
// function of its position: splitmix64's output at a counter built from the whole matrix's
// (batch, row, byte), looked up in the host's 65536-entry tables (RandomFill.e4m3Codes,
// e2m1Pairs). A shard therefore holds exactly the whole model's values at its positions, and
// DeferredRandomMatrix makes the same bytes on the CPU (fulgur-gpu-check random compares them).
//
// Budget: writes only, once per process. A MiMo-V2-Flash shard over 2 GPUs is about 80 GB of
// codes and scales per GPU: about 30 ms of writes at 3 TB/s. Every byte costs one hash (three
// 64-bit multiplies), an integer division for its row and a table load from L1/L2 (130 KB of
// tables): about 40 instructions, 3e12 per GPU, a few tenths of a second at H100 integer rates
// (estimated, not measured). The host's launches (one per expert matrix part: about 36k per
// GPU, a few microseconds each) cost about as much; the target is "seconds", not a roofline.
//
// Tables (RandomFiller uploads them once per GPU): bytes [0, 65536) FP8 E4M3 codes,
// [65536, 131072) E2M1 pairs (element 2j in the low nibble), then 256 f32 E4M3 values and 16
// f32 E2M1 values. None holds a NaN code; E8M0 scales are 127 + exponent + jitter, with the
// exponent checked on the host, so no 0xFF either.

#include "common.cuh"

namespace rnd {

constexpr int kPairs = 65536, kE4M3Values = 131072, kE2M1Values = kE4M3Values + 256 * 4;
constexpr int kStepBytes = 544;  // moe2:: tiled step: 512 bytes of codes, 32 of scales

// Output `index` of splitmix64 started at `key` (RandomFill.positional).
__device__ __forceinline__ uint64_t positional(uint64_t key, uint64_t index) {
    uint64_t z = key + (index + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// RandomFill.jitter: -1, 0, 0, +1 from the hash's two low bits.
__device__ __forceinline__ int jitter(uint64_t h) {
    const int b = (int)(h & 3);
    return b == 0 ? -1 : b == 3 ? 1 : 0;
}

// 2^e for a normal exponent (the host checks the range).
__device__ __forceinline__ float pow2(int e) { return __uint_as_float((uint32_t)(127 + e) << 23); }

// Round to nearest even, as floatToBF16 (values here are never NaN).
__device__ __forceinline__ uint16_t bf16(float v) {
    const uint32_t b = __float_as_uint(v);
    return (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1)) >> 16);
}

// CUDAMoE.placed: a code word's nibble bits moved to where moe2::e2m1_pairs reads them.
__device__ __forceinline__ uint32_t placed(uint32_t word) {
    uint32_t out = 0;
#pragma unroll
    for (int q = 0; q < 8; ++q) {
        const uint32_t nibble = (word >> (4 * q)) & 0xF;
        const int pair = q & 3, half = 16 * (q >> 2);
        const int magnitude = 9 - 3 * pair, sign = pair == 0 ? 15 : 11 + pair;
        out |= (nibble & 7) << (magnitude + half) | (nibble >> 3) << (sign + half);
    }
    return out;
}

__device__ __forceinline__ int grid_stride() { return gridDim.x * blockDim.x; }
__device__ __forceinline__ int first_index() { return blockIdx.x * blockDim.x + threadIdx.x; }

}  // namespace rnd

// Codes of a slice, row-major [rows, rowBytes]: FP8 codes (kind 0) or E2M1 pairs (kind 1).
// Slice row i is whole row rowStart + rowStride * i of batch `rowBase / wholeRows`
// (rowBase = batch * wholeRows); byte j is whole byte byteStart + j. rows * rowBytes < 2^31.
extern "C" __global__ void random_codes(uint8_t* dst, const uint8_t* tables, int kind, uint64_t key, uint64_t rowBase,
                                        uint64_t wholeRowBytes, int rowStart, int rowStride, int rows, int byteStart, int rowBytes) {
    const uint8_t* table = tables + (kind ? rnd::kPairs : 0);
    const int n = rows * rowBytes;
    for (int i = rnd::first_index(); i < n; i += rnd::grid_stride()) {
        const int r = i / rowBytes, j = i - r * rowBytes;
        const uint64_t row = rowBase + (uint64_t)(rowStart + rowStride * r);
        dst[i] = table[rnd::positional(key, row * wholeRowBytes + (uint64_t)(byteStart + j)) & 0xFFFF];
    }
}

// E8M0 scales of an MXFP4 slice, [rows, blocks]: 127 + exponent + jitter.
extern "C" __global__ void random_block_scales(uint8_t* dst, uint64_t key, uint64_t rowBase, uint64_t wholeBlocks, int rowStart, int rowStride,
                                               int rows, int blockStart, int blocks, int exponent) {
    const int n = rows * blocks;
    for (int i = rnd::first_index(); i < n; i += rnd::grid_stride()) {
        const int r = i / blocks, b = i - r * blocks;
        const uint64_t row = rowBase + (uint64_t)(rowStart + rowStride * r);
        dst[i] = (uint8_t)(127 + exponent + rnd::jitter(rnd::positional(key, row * wholeBlocks + (uint64_t)(blockStart + b))));
    }
}

// f32 tile multipliers of an FP8 slice, [tileRows, tileColumns]: the slice's tile (ti, tj)
// lies in whole tile ((rowStart + rowStride * 128 ti) / 128, (columnStart + 128 tj) / 128) of
// batch tileBase / wholeTileRows.
extern "C" __global__ void random_tile_scales(float* dst, uint64_t key, uint64_t tileBase, uint64_t wholeTileColumns, int rowStart, int rowStride,
                                              int tileRows, int columnStart, int tileColumns, int exponent) {
    const int n = tileRows * tileColumns;
    for (int i = rnd::first_index(); i < n; i += rnd::grid_stride()) {
        const int ti = i / tileColumns, tj = i - ti * tileColumns;
        const uint64_t tileRow = tileBase + (uint64_t)((rowStart + rowStride * 128 * ti) / 128);
        const uint64_t tileColumn = (uint64_t)((columnStart + 128 * tj) / 128);
        dst[i] = rnd::pow2(exponent + rnd::jitter(rnd::positional(key, tileRow * wholeTileColumns + tileColumn)));
    }
}

// The BF16 values of a slice, [rows, columns]: FP8 (kind 0) code times its tile's multiplier,
// or MXFP4 (kind 1) element times its block's scale. scaleKey is the tile or block stream.
extern "C" __global__ void random_bf16(uint16_t* dst, const uint8_t* tables, int kind, uint64_t codeKey, uint64_t scaleKey, uint64_t rowBase,
                                       uint64_t tileBase, uint64_t wholeColumns, int rowStart, int rowStride, int rows, int columnStart,
                                       int columns, int exponent) {
    const float* e4m3 = reinterpret_cast<const float*>(tables + rnd::kE4M3Values);
    const float* e2m1 = reinterpret_cast<const float*>(tables + rnd::kE2M1Values);
    const uint64_t wholeTileColumns = (wholeColumns + 127) / 128;
    const int n = rows * columns;
    for (int i = rnd::first_index(); i < n; i += rnd::grid_stride()) {
        const int r = i / columns, j = i - r * columns;
        const int wholeRow = rowStart + rowStride * r;
        const uint64_t row = rowBase + (uint64_t)wholeRow, c = (uint64_t)(columnStart + j);
        float v;
        if (kind == 0) {
            const uint8_t code = tables[rnd::positional(codeKey, row * wholeColumns + c) & 0xFFFF];
            const uint64_t tile = (tileBase + (uint64_t)(wholeRow / 128)) * wholeTileColumns + c / 128;
            v = e4m3[code] * rnd::pow2(exponent + rnd::jitter(rnd::positional(scaleKey, tile)));
        } else {
            const uint8_t pair = tables[rnd::kPairs + (rnd::positional(codeKey, row * (wholeColumns / 2) + c / 2) & 0xFFFF)];
            const uint64_t block = row * (wholeColumns / 32) + c / 32;
            v = e2m1[(c & 1) ? pair >> 4 : pair & 0xF] * rnd::pow2(exponent + rnd::jitter(rnd::positional(scaleKey, block)));
        }
        dst[i] = rnd::bf16(v);
    }
}

// Tile rows [tileRow0, tileRow0 + tileRowCount) of an expert's MXFP4 matrix in moe2's tiled
// layout (CUDAMoE.tiled; dst = the expert's first tile): `tiles` tiles of 16 rows, K =
// `columns` (whole columns from columnStart, a multiple of 32) in steps of 64 columns, 544
// bytes each. Tile t's row tileRow0 + rr is part row tileRowCount * t + rr, whole row
// wholeRowStart + wholeRowStep * (that). One thread per 4-byte code word (lane 4g + t4's word
// (2h + q), rows g and g + 8 = tile rows g + 8q); the t4 = 0 thread also writes the row's
// scale for the step's block h. Blocks past the row's end (an odd count): zero codes, scale
// 127 (1.0), as the host writes them.
extern "C" __global__ void random_moe_tiled(uint8_t* dst, const uint8_t* tables, uint64_t codeKey, uint64_t blockKey, uint64_t rowBase,
                                            uint64_t wholeColumns, int wholeRowStart, int wholeRowStep, int tiles, int columns,
                                            int columnStart, int tileRow0, int tileRowCount, int exponent) {
    const uint8_t* pairs = tables + rnd::kPairs;
    const int blocks = columns / 32, steps = (blocks + 1) / 2, tileBytes = steps * rnd::kStepBytes;
    const uint64_t wholeRowBytes = wholeColumns / 2, wholeBlocks = wholeColumns / 32;
    const int n = tiles * steps * tileRowCount * 8;
    for (int w = rnd::first_index(); w < n; w += rnd::grid_stride()) {
        const int t4 = w & 3, h = (w >> 2) & 1;
        int rest = w >> 3;
        const int rr = rest % tileRowCount;
        rest /= tileRowCount;
        const int s = rest % steps, tile = rest / steps;
        const int r = tileRow0 + rr, g = r & 7, q = r >> 3, b = 2 * s + h;
        const uint64_t row = rowBase + (uint64_t)(wholeRowStart + wholeRowStep * (tileRowCount * tile + rr));
        uint8_t* step = dst + (size_t)tile * tileBytes + (size_t)s * rnd::kStepBytes;
        uint32_t word = 0;
        if (b < blocks) {
            const uint64_t first = row * wholeRowBytes + (uint64_t)(columnStart / 2 + 16 * b + 4 * t4);
#pragma unroll
            for (int i = 0; i < 4; ++i) word |= (uint32_t)pairs[rnd::positional(codeKey, first + i) & 0xFFFF] << (8 * i);
            word = rnd::placed(word);
        }
        *reinterpret_cast<uint32_t*>(step + 16 * (4 * g + t4) + 4 * (2 * h + q)) = word;
        if (t4 == 0) {
            const uint8_t scale = b < blocks
                ? (uint8_t)(127 + exponent + rnd::jitter(rnd::positional(blockKey, row * wholeBlocks + (uint64_t)(columnStart / 32 + b))))
                : (uint8_t)127;
            step[512 + 4 * g + 2 * h + q] = scale;
        }
    }
}

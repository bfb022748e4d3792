// fp8.cu: fp8 weights → bf16, multiplied by their per-tensor f32 scale.
//
// Computes out[i] = bf16(decode(in[i]) · scale) for n bytes:
//   fp8_e4m3_to_bf16  e4m3fn: s eeee mmm, bias 7, no infinities, NaN only at S.1111.111,
//                     subnormals m·2^−9 (spec 6.1)
//   fp8_e5m2_to_bf16  e5m2: the top byte of an IEEE half (infinities and NaNs as in IEEE)
// The decode is exact (every fp8 value is an f32) and bit-for-bit the loader's
// (loader/src/dtype.rs E4M3_TO_F32, e5m2_to_f32); the multiplication by `scale` is one f32
// multiply, as in the loader's `decode_into` and ComfyUI's `_scaled_mm` path (spec 6.2), then one
// rounding to bf16. Replaces `Weight::to_f32` for weights that stay fp8 on the GPU: a linear layer
// whose weight is fp8 is dequantised into a bf16 scratch buffer just before its GEMM, so the GPU
// holds 1 byte per weight (11.9 GB for the transformer) and one layer's bf16 copy at a time.
//
// Layout: flat, grid-stride, one byte per thread per step; any n, any alignment.
// Why a kernel and not a cuBLASLt fp8 GEMM: fp8 tensor-core GEMMs need fp8 activations too, which
// changes the numerics against the bf16 reference (spec 6.3); that is a later, measured choice.
#include "common.cuh"

#define FP8_THREADS 256

__device__ __forceinline__ float e4m3fn_to_f32(unsigned int code) {
    const unsigned int sign = (code & 0x80u) << 24;
    const unsigned int e = (code >> 3) & 0xFu;
    const unsigned int m = code & 0x7u;
    if (e == 0xFu && m == 0x7u) return __uint_as_float(sign | 0x7FC00000u);
    if (e == 0u) {
        const float v = (float)m * 0.001953125f;  // m · 2^−9, exact; ±0 keeps its sign below
        return __uint_as_float(__float_as_uint(v) | sign);
    }
    return __uint_as_float(sign | ((e + 120u) << 23) | (m << 20));  // rebias 7 → 127
}

__device__ __forceinline__ float e5m2_to_f32(unsigned int code) {
    const unsigned int sign = (code & 0x80u) << 24;
    const unsigned int e = (code >> 2) & 0x1Fu;
    const unsigned int m = code & 0x3u;
    if (e == 0x1Fu) return __uint_as_float(sign | 0x7F800000u | (m << 21));  // inf, or NaN (m ≠ 0)
    if (e == 0u) {
        const float v = (float)m * 1.52587890625e-05f;  // m · 2^−16, exact
        return __uint_as_float(__float_as_uint(v) | sign);
    }
    return __uint_as_float(sign | ((e + 112u) << 23) | (m << 21));  // rebias 15 → 127
}

extern "C" __global__ void __launch_bounds__(FP8_THREADS)
    fp8_e4m3_to_bf16(const unsigned char* __restrict__ in, i64 n, float scale,
                     bf16* __restrict__ out) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        st_bf16(out + i, e4m3fn_to_f32(in[i]) * scale);
}

extern "C" __global__ void __launch_bounds__(FP8_THREADS)
    fp8_e5m2_to_bf16(const unsigned char* __restrict__ in, i64 n, float scale,
                     bf16* __restrict__ out) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        st_bf16(out + i, e5m2_to_f32(in[i]) * scale);
}

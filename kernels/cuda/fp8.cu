// fp8.cu: fp8 weights → bf16, multiplied by their per-tensor f32 scale; bf16 activations → e4m3
// with a per-tensor scale, for cuBLASLt's fp8 × fp8 GEMM.
//
// Computes out[i] = bf16(decode(in[i]) · scale) for n bytes:
//   fp8_e4m3_to_bf16  e4m3fn: s eeee mmm, bias 7, no infinities, NaN only at S.1111.111,
//                     subnormals m·2^−9 (spec 6.1)
//   fp8_e5m2_to_bf16  e5m2: the top byte of an IEEE half (infinities and NaNs as in IEEE)
//   fp8_*_to_bf16_rows  the same with one more factor per weight row, out[r][c] = bf16(decode ·
//                     scale · g[r]) (g bf16 [rows]): the adaLN gate folded into the dequantised
//                     weight, so the GEMM that follows adds gate ⊙ (x·Wᵀ) onto the residual
//                     itself (beta = 1) and the gate_residual pass over the activations goes away.
// and the activation side (quantise the input of a GEMM that no norm kernel feeds: attention →
// proj, GELU → mlp.2, linear2's [attention | GELU]):
//   amax_bf16         amax[0] = max |x| over x [rows, cols] bf16 (amax[0] zeroed by the launcher)
//   quantise_e4m3     y = e4m3(x / s), s = amax[0] / 448 written to scale[0] for cuBLASLt's
//                     B_SCALE_POINTER (see common.cuh: RNE, saturating).
// The decode is exact (every fp8 value is an f32) and bit-for-bit the loader's
// (loader/src/dtype.rs E4M3_TO_F32, e5m2_to_f32); the multiplication by `scale` is one f32
// multiply, as in the loader's `decode_into` and ComfyUI's `_scaled_mm` path (spec 6.2), then one
// rounding to bf16. Replaces `Weight::to_f32` for weights that stay fp8 on the GPU: a linear layer
// whose weight is fp8 is dequantised into a bf16 scratch buffer just before its GEMM, so the GPU
// holds 1 byte per weight (11.9 GB for the transformer) and one layer's bf16 copy at a time.
//
// Layout: flat, grid-stride, one byte per thread per step; any n, any alignment. The activation
// kernels walk rows with grid.y and columns with grid.x and the threads (any strides).
// Why both directions here: an fp8 weight has two routes. Dequantise here and run a bf16 GEMM
// (the bf16 reference's numerics, spec 6.3), or quantise the activations too and run cuBLASLt's
// fp8 GEMM (twice the tensor-core rate; the activations' e4m3 rounding adds ~2.7e-2 relative
// error per GEMM at Flux widths, kernels/tests/emulator/gemm.rs). Which is faster end to end is
// a GPU measurement; both stay until one is made (benches/RESULTS.md).
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

extern "C" __global__ void __launch_bounds__(FP8_THREADS)
    fp8_e4m3_to_bf16_rows(const unsigned char* __restrict__ in, i64 n, int cols, float scale,
                          const bf16* __restrict__ g, bf16* __restrict__ out) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        st_bf16(out + i, e4m3fn_to_f32(in[i]) * scale * ld_bf16(g + i / cols));
}

extern "C" __global__ void __launch_bounds__(FP8_THREADS)
    fp8_e5m2_to_bf16_rows(const unsigned char* __restrict__ in, i64 n, int cols, float scale,
                          const bf16* __restrict__ g, bf16* __restrict__ out) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        st_bf16(out + i, e5m2_to_f32(in[i]) * scale * ld_bf16(g + i / cols));
}

// One atomic per warp: each thread's running max, then the warp's (__reduce_max_sync, sm_80+).
extern "C" __global__ void __launch_bounds__(FP8_THREADS)
    amax_bf16(const bf16* __restrict__ x, i64 ldx, int rows, int cols, float* __restrict__ amax) {
    unsigned int m = 0u;  // bits of max |x|: see atomic_amax
    for (int r = blockIdx.y; r < rows; r += gridDim.y)
        for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x)
            m = max(m, __float_as_uint(fabsf(ld_bf16(x + (i64)r * ldx + c))));
    m = __reduce_max_sync(FULL_MASK, m);
    if ((threadIdx.x & 31) == 0 && m != 0u) atomic_amax(amax, __uint_as_float(m));
}

extern "C" __global__ void __launch_bounds__(FP8_THREADS)
    quantise_e4m3(const bf16* __restrict__ x, i64 ldx, int rows, int cols,
                  const float* __restrict__ amax, unsigned char* __restrict__ y, i64 ldy,
                  float* __restrict__ scale) {
    const float s = e4m3_scale(*amax);
    const float inv = 1.0f / s;
    if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) *scale = s;
    for (int r = blockIdx.y; r < rows; r += gridDim.y)
        for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x)
            st_e4m3(y + (i64)r * ldy + c, ld_bf16(x + (i64)r * ldx + c) * inv);
}

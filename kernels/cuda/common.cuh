// common.cuh: the only code shared between kernel families.
//
// Numerics: activations are bf16 in memory and f32 in registers; every kernel loads bf16, computes
// in f32 (reductions accumulate in f32) and rounds once, to nearest even, when it stores. Sizes
// that can pass 2^31 elements (an im2col buffer, a 12288-wide MLP activation at 8,704 tokens) are
// indexed with 64-bit offsets; single dimensions and leading dimensions are `int` (the launchers
// check that they fit).
//
// Compiled by NVRTC for sm_80 and newer (kernels/src/nvrtc.rs); only cuda_bf16.h and cuda_fp8.h
// are included, so the CUDA headers of the NVRTC in use (toolkit or the nvidia-cuda-runtime wheel)
// are the only headers needed.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp8.h>

typedef __nv_bfloat16 bf16;
typedef long long i64;

#define FULL_MASK 0xffffffffu
// −∞ (NVRTC has no <math.h>, so no INFINITY macro).
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float ld_bf16(const bf16* p) { return __bfloat162float(*p); }

__device__ __forceinline__ void st_bf16(bf16* p, float v) { *p = __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum of `v` over the block, returned to every thread. `scratch` is 32 floats of shared memory;
// blockDim.x is a multiple of 32, at most 1024. The leading barrier lets back-to-back calls reuse
// `scratch` (a slow warp may still be reading the previous result).
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// Block-wide maximum, same contract as block_sum.
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : NEG_INF;
    return warp_max(v);
}

// x·σ(x) (SiLU, swish).
__device__ __forceinline__ float silu_f(float x) { return x / (1.0f + expf(-x)); }

// GELU, tanh approximation: 0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³))) (spec 1.5; T5's gelu_new).
__device__ __forceinline__ float gelu_tanh_f(float x) {
    const float c = 0.7978845608028654f;  // sqrt(2/π)
    return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
}

// CLIP's quick_gelu: x·σ(1.702·x) (spec 5.2).
__device__ __forceinline__ float quick_gelu_f(float x) { return x / (1.0f + expf(-1.702f * x)); }

// ---- per-tensor e4m3 quantisation of activations (fp8.cu's quantise_e4m3, norm_modulate.cu's
// norm_modulate_e4m3): two passes, because the scale needs the whole tensor's amax. Pass 1 folds
// |v| into a device f32 that the launcher zeroed; pass 2 stores e4m3(v / scale) with
// scale = amax / 448, the value cuBLASLt multiplies back (its A/B_SCALE_POINTER).

// Largest finite e4m3fn value.
#define E4M3_MAX 448.0f

// amax[0] = max(amax[0], v) for v ≥ 0 (or NaN): non-negative floats order like their bit
// patterns, and a NaN's bits (0x7FC…) exceed every finite value's, so a NaN input poisons the
// scale instead of vanishing. Reductions before it compare bits too (fmaxf would drop a NaN).
__device__ __forceinline__ void atomic_amax(float* amax, float v) {
    atomicMax(reinterpret_cast<unsigned int*>(amax), __float_as_uint(v));
}

// The per-tensor scale for an amax: amax / 448, so the largest |v| lands on 448. An all-zero
// tensor gets 1 (any scale quantises zeros to zeros); the floor at FLT_MIN keeps 1/scale finite
// for a tensor of denormals; NaN and ∞ pass through and turn the GEMM's output into NaN.
__device__ __forceinline__ float e4m3_scale(float amax) {
    if (amax == 0.0f) return 1.0f;
    return amax > 0.0f ? fmaxf(amax / E4M3_MAX, 1.17549435e-38f) : amax;
}

// e4m3fn of v, round to nearest even, saturating to ±448 (cvt.rn.satfinite: a value rounded just
// past 448 by the f32 division stays finite; NaN stays NaN).
__device__ __forceinline__ void st_e4m3(unsigned char* p, float v) {
    *p = __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
}

// QKNorm then RoPE of one head row x [DH] (global, bf16), a warp together: lane owns the pairs
// j = lane + 32·e. The same operations, in the same order per element, as qk_norm_rope.cu; both
// fused attentions' q prologues (attention_mma.cu, attention_wgmma.cu) share it, so the two
// kernels produce the same q̂ bits.
template <int DH>
__device__ __forceinline__ void norm_rope_row(const bf16* x, const float* scale, const float* pe,
                                              float eps, int lane, __nv_bfloat162 (&y)[DH / 64]) {
    constexpr int E = DH / 64;
    float2 v[E];
    float ss = 0.0f;
#pragma unroll
    for (int e = 0; e < E; ++e) {
        v[e] = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(x + 2 * (lane + 32 * e)));
        ss += v[e].x * v[e].x + v[e].y * v[e].y;
    }
    const float rrms = rsqrtf(warp_sum(ss) * (1.0f / (float)DH) + eps);
#pragma unroll
    for (int e = 0; e < E; ++e) {
        const int j = lane + 32 * e;
        const float a = __fmul_rn(__fmul_rn(v[e].x, rrms), scale[2 * j]);
        const float b = __fmul_rn(__fmul_rn(v[e].y, rrms), scale[2 * j + 1]);
        const float c = pe[2 * j];
        const float s = pe[2 * j + 1];
        y[e] = __floats2bfloat162_rn(__fsub_rn(__fmul_rn(c, a), __fmul_rn(s, b)),
                                     __fadd_rn(__fmul_rn(s, a), __fmul_rn(c, b)));
    }
}

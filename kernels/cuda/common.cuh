// common.cuh: the only code shared between kernel families.
//
// Numerics: activations are bf16 in memory and f32 in registers; every kernel loads bf16, computes
// in f32 (reductions accumulate in f32) and rounds once, to nearest even, when it stores. Sizes
// that can pass 2^31 elements (an im2col buffer, a 12288-wide MLP activation at 8,704 tokens) are
// indexed with 64-bit offsets; single dimensions and leading dimensions are `int` (the launchers
// check that they fit).
//
// Compiled by NVRTC for sm_80 and newer (kernels/src/nvrtc.rs); only cuda_bf16.h is included, so
// the CUDA headers of the NVRTC in use (toolkit or the nvidia-cuda-runtime wheel) are the only
// headers needed.
#pragma once
#include <cuda_bf16.h>

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

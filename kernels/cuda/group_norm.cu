// group_norm.cu: GroupNorm with affine parameters, optionally followed by swish.
//
// Computes, on a channels-last feature map x [P, C] (bf16, P = H·W pixels, row stride C; see
// conv.cu), for every group g of G (channels [g·C/G, (g+1)·C/G)):
//   y[p, c] = w[c] · (x[p, c] − mean_g) · rsqrt(var_g + eps) + b[c],   then y ← y·σ(y) if swish
// with mean_g and the biased var_g over the group's (C/G)·P values. w, b: f32 [C]. The VAE uses
// G = 32, eps 1e-6 (spec 4.2; torch.nn.GroupNorm) and swish after every norm except the
// attention block's.
// Replaces the CPU reference's group_norm (+ swish) of the VAE (spec 4.2 ResnetBlock, AttnBlock,
// norm_out).
//
// Layout: one block of GN_THREADS per group (grid = G); three passes over the group (sum,
// centred sum of squares, normalise) accumulate in f32 per thread, then across the block. Any P
// and C divisible by G. In place (y == x) is allowed: each element is read and written by one
// thread, after the block's reductions. A plain kernel: at 1024² with 128 channels a group is
// 4 M values on one SM; a split reduction across blocks is the obvious next step if it shows in
// the profile.
// Why fused: swish always follows the norm in the ResnetBlock; fusing saves a full pass.
#include "common.cuh"

#define GN_THREADS 512

extern "C" __global__ void __launch_bounds__(GN_THREADS)
    group_norm(const bf16* x, int P, int C, int G, const float* __restrict__ w,
               const float* __restrict__ b, float eps, int swish, bf16* y) {
    __shared__ float scratch[32];
    const int g = blockIdx.x;
    if (g >= G) return;
    const int cg = C / G;
    const i64 n = (i64)P * cg;
    const float inv_n = 1.0f / (float)n;
    const int c0 = g * cg;

    float s = 0.0f;
    for (i64 e = threadIdx.x; e < n; e += blockDim.x) {
        const i64 p = e / cg;
        const int c = c0 + (int)(e - p * cg);
        s += ld_bf16(x + p * C + c);
    }
    const float mean = block_sum(s, scratch) * inv_n;

    float ss = 0.0f;
    for (i64 e = threadIdx.x; e < n; e += blockDim.x) {
        const i64 p = e / cg;
        const int c = c0 + (int)(e - p * cg);
        const float d = ld_bf16(x + p * C + c) - mean;
        ss += d * d;
    }
    const float rstd = rsqrtf(block_sum(ss, scratch) * inv_n + eps);

    for (i64 e = threadIdx.x; e < n; e += blockDim.x) {
        const i64 p = e / cg;
        const int c = c0 + (int)(e - p * cg);
        float v = w[c] * ((ld_bf16(x + p * C + c) - mean) * rstd) + b[c];
        if (swish) v = silu_f(v);
        st_bf16(y + p * C + c, v);
    }
}

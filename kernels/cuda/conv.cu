// conv.cu: the VAE's convolutions as im2col + one cuBLASLt GEMM, and its nearest ×2 upsample.
//
// Layout: channels-last. A feature map [C, H, W] of the reference (batch 1) is the row-major
// matrix x [H·W, C] (pixel p = y·W + x, row stride C). Then a 1×1 convolution is a plain linear
// layer, the attention block's q/k/v are tokens × features like the transformer's, and a 3×3
// convolution is col [Ho·Wo, kh·kw·C] · Wᵀ with the weight stored [Cout, ky, kx, Cin] (permuted
// once at upload, kernels/src/weights.rs), bias in the GEMM epilogue. (The layout of the engine's
// EncoderBackend: feature maps are [H·W, C].)
//
//   im2col   col[p − p0, (ky·kw + kx)·C + ci] = x[(iy·W + ix)·C + ci], iy = oy·stride − pad_top + ky,
//            ix = ox·stride − pad_left + kx, zero outside the image, for output pixels
//            p = oy·Wo + ox in [p0, p0 + np). Ho and Wo are given, so the bottom/right padding is
//            whatever they imply: conv 3×3 stride 1 pad 1 (pad_top = pad_left = 1, Ho = H) and the
//            Downsample's asymmetric "pad right and bottom by one, then 3×3 stride 2 with no
//            padding" (pad_top = pad_left = 0, Ho = H/2; spec 4.2, BFL Downsample.forward).
//            The pixel window [p0, p0 + np) lets the caller bound the buffer: a 3×3 conv with
//            256 channels at 1024² would need a 4.8 GB col buffer in one piece.
//   upsample_nearest2x  y[(oy·2W + ox), c] = x[((oy/2)·W + ox/2), c]   (BFL Upsample: interpolate
//            scale_factor 2.0, mode "nearest", spec 4.2; the 3×3 conv that follows is im2col + GEMM)
// Replaces the CPU reference's conv2d / Downsample / Upsample (engine VAE, spec 4.2).
//
// Grid: y walks output rows (pixels), x and threads walk the row's columns, both grid-stride:
// any size; consecutive threads copy consecutive channels (coalesced in and out).
// Why im2col: correct and simple, and the GEMM is the tuned part. An implicit-GEMM kernel that
// never stores col is the faster road, later.
#include "common.cuh"

#define CONV_THREADS 256

extern "C" __global__ void __launch_bounds__(CONV_THREADS)
    im2col(const bf16* __restrict__ x, int H, int W, int C, int kh, int kw, int stride,
           int pad_top, int pad_left, int Wo, int p0, int np, bf16* __restrict__ col, i64 ldcol) {
    const int K = kh * kw * C;
    for (int r = blockIdx.y; r < np; r += gridDim.y) {
        const int p = p0 + r;
        const int oy = p / Wo;
        const int ox = p - oy * Wo;
        bf16* out = col + (i64)r * ldcol;
        for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < K; j += gridDim.x * blockDim.x) {
            const int kk = j / C;  // ky·kw + kx
            const int ci = j - kk * C;
            const int ky = kk / kw;
            const int kx = kk - ky * kw;
            const int iy = oy * stride - pad_top + ky;
            const int ix = ox * stride - pad_left + kx;
            const bool in = iy >= 0 && iy < H && ix >= 0 && ix < W;
            out[j] = in ? x[((i64)iy * W + ix) * C + ci] : __float2bfloat16_rn(0.0f);
        }
    }
}

extern "C" __global__ void __launch_bounds__(CONV_THREADS)
    upsample_nearest2x(const bf16* __restrict__ x, int H, int W, int C, bf16* __restrict__ y) {
    const int Wo = 2 * W;
    const int P = 4 * H * W;
    for (int p = blockIdx.y; p < P; p += gridDim.y) {
        const int oy = p / Wo;
        const int ox = p - oy * Wo;
        const bf16* src = x + ((i64)(oy >> 1) * W + (ox >> 1)) * C;
        bf16* dst = y + (i64)p * C;
        for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < C; c += gridDim.x * blockDim.x)
            dst[c] = src[c];
    }
}

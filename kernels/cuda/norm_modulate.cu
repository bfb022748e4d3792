// norm_modulate.cu: a row norm and the per-column affine that always follows it, in one pass.
//
// Computes, for every row r of x [rows, cols] (bf16, row stride ldx) into y (bf16, row stride ldy):
//   norm_modulate  y = (1 + scale) ⊙ LN(x) + shift       Flux adaLN: the *_norm1/2, pre_norm and
//                  norm_final LayerNorms (no affine, biased variance) with the Modulation's shift
//                  and scale (spec 1.4, 1.5). Replaces CpuBackend::norm_modulate (engine/src/cpu.rs)
//                  and BFL's `(1 + mod.scale) * self.img_norm1(img) + mod.shift`.
//   layer_norm     y = w ⊙ LN(x) + b                     CLIP's layer_norm1/2, final_layer_norm
//                  (affine, eps 1e-5; spec 5.2).
//   rms_norm       y = w ⊙ x·rsqrt(mean(x²) + eps)       T5LayerNorm (no centring, no bias; spec 5.1).
//   norm_modulate_amax, norm_modulate_e4m3               the norm_modulate output as the e4m3
//                  input of an fp8 GEMM (qkv, linear1, mlp.0): pass 1 folds max |y| into amax[0]
//                  (zeroed by the launcher) and stores nothing; pass 2 recomputes y bit for bit and
//                  stores e4m3(y / s), s = amax[0] / 448, writing s to scale[0] for cuBLASLt. y is
//                  quantised from f32, never rounded to bf16 first.
// shift and scale are bf16 activations [cols] (a column range of the modulation GEMM's output);
// w and b are f32 parameters [cols]. eps is an argument (1e-6 for Flux and T5, 1e-5 for CLIP).
//
// Layout: one block of NORM_THREADS threads per row (grid-stride over rows), any cols ≥ 1. The
// row is read three times (sum, centred sum of squares, output); it is 6 KB at D = 3072 and stays
// in L1/L2, so the extra reads cost little and the kernel has no size limit. The variance is the
// mean of (x − mean)², not E[x²] − mean², so large offsets do not cancel.
// Why fused: the normalised row is only ever consumed through the modulation; writing LN(x) and
// reading it back would double the kernel's memory traffic. One rounding to bf16, at the store
// (the reference rounds after LN, after ·(1 + scale) and after + shift: within 1 bf16 ulp).
// y must not overlap x (checked by the launcher: kernels/src/norm_modulate.rs).
// Why two passes and not a stored bf16 y plus fp8.cu's quantiser: the scale needs the whole
// tensor's amax, and recomputing LN from x (3 reads of a row that stays in L2) is cheaper than
// writing y and reading it back twice.
#include "common.cuh"

#define NORM_THREADS 256

// MODE 0: (1 + scale)·LN(x) + shift with bf16 shift/scale; MODE 1: w·LN(x) + b with f32 w, b;
// MODE 2: w·x·rsqrt(mean(x²) + eps) with f32 w.
// OUT 0: store bf16 into y; OUT 1: store nothing, fold max |value| into amax[0]; OUT 2: store
// e4m3(value / s) into y (bytes), s = e4m3_scale(amax[0]), written to scale[0].
template <int MODE, int OUT>
__device__ __forceinline__ void row_norm(const bf16* __restrict__ x, i64 ldx, void* __restrict__ y,
                                         i64 ldy, int rows, int cols, const void* __restrict__ pa,
                                         const void* __restrict__ pb, float eps,
                                         float* __restrict__ amax, float* __restrict__ scale_out) {
    __shared__ float scratch[32];
    const float inv_cols = 1.0f / (float)cols;
    float inv_s = 1.0f;
    if (OUT == 2) {
        const float s = e4m3_scale(*amax);
        inv_s = 1.0f / s;
        if (blockIdx.x == 0 && threadIdx.x == 0) *scale_out = s;
    }
    unsigned int m = 0u;  // OUT 1: bits of max |value| (see atomic_amax)
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const bf16* xr = x + (i64)r * ldx;
        float mean = 0.0f;
        if (MODE != 2) {
            float s = 0.0f;
            for (int c = threadIdx.x; c < cols; c += blockDim.x) s += ld_bf16(xr + c);
            mean = block_sum(s, scratch) * inv_cols;
        }
        float ss = 0.0f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const float d = ld_bf16(xr + c) - mean;
            ss += d * d;
        }
        const float rstd = rsqrtf(block_sum(ss, scratch) * inv_cols + eps);
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const float n = (ld_bf16(xr + c) - mean) * rstd;
            float v;
            if (MODE == 0) {
                const bf16* shift = (const bf16*)pa;
                const bf16* scale = (const bf16*)pb;
                v = (1.0f + ld_bf16(scale + c)) * n + ld_bf16(shift + c);
            } else if (MODE == 1) {
                v = ((const float*)pa)[c] * n + ((const float*)pb)[c];
            } else {
                v = ((const float*)pa)[c] * n;
            }
            if (OUT == 0) st_bf16((bf16*)y + (i64)r * ldy + c, v);
            if (OUT == 1) m = max(m, __float_as_uint(fabsf(v)));
            if (OUT == 2) st_e4m3((unsigned char*)y + (i64)r * ldy + c, v * inv_s);
        }
    }
    if (OUT == 1) {
        m = __reduce_max_sync(FULL_MASK, m);
        if ((threadIdx.x & 31) == 0 && m != 0u) atomic_amax(amax, __uint_as_float(m));
    }
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    norm_modulate(const bf16* __restrict__ x, i64 ldx, bf16* __restrict__ y, i64 ldy, int rows,
                  int cols, const bf16* __restrict__ shift, const bf16* __restrict__ scale,
                  float eps) {
    row_norm<0, 0>(x, ldx, y, ldy, rows, cols, shift, scale, eps, nullptr, nullptr);
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    layer_norm(const bf16* __restrict__ x, i64 ldx, bf16* __restrict__ y, i64 ldy, int rows,
               int cols, const float* __restrict__ w, const float* __restrict__ b, float eps) {
    row_norm<1, 0>(x, ldx, y, ldy, rows, cols, w, b, eps, nullptr, nullptr);
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    rms_norm(const bf16* __restrict__ x, i64 ldx, bf16* __restrict__ y, i64 ldy, int rows,
             int cols, const float* __restrict__ w, float eps) {
    row_norm<2, 0>(x, ldx, y, ldy, rows, cols, w, nullptr, eps, nullptr, nullptr);
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    norm_modulate_amax(const bf16* __restrict__ x, i64 ldx, int rows, int cols,
                       const bf16* __restrict__ shift, const bf16* __restrict__ scale, float eps,
                       float* __restrict__ amax) {
    row_norm<0, 1>(x, ldx, nullptr, 0, rows, cols, shift, scale, eps, amax, nullptr);
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    norm_modulate_e4m3(const bf16* __restrict__ x, i64 ldx, unsigned char* __restrict__ y, i64 ldy,
                       int rows, int cols, const bf16* __restrict__ shift,
                       const bf16* __restrict__ scale, float eps, const float* __restrict__ amax,
                       float* __restrict__ y_scale) {
    row_norm<0, 2>(x, ldx, y, ldy, rows, cols, shift, scale, eps, const_cast<float*>(amax),
                   y_scale);
}

// qk_norm_rope.cu: the attention prologue, QKNorm then RoPE, in place on the fused qkv buffer.
//
// Computes, for every row r of qkv [rows, ld] (bf16) and every head h of q (columns
// [h·Dh, (h+1)·Dh)) and of k (columns [H·Dh + h·Dh, …)):
//   x ← x · rsqrt(mean(x²) + eps) · scale           (RMSNorm over the head, eps 1e-6, f32 `scale` [Dh]:
//                                                     q_scale for q, k_scale for k)
//   (x[2j], x[2j+1]) ← (cos·x[2j] − sin·x[2j+1], sin·x[2j] + cos·x[2j+1])
// with (cos θ_j, sin θ_j) = pe[r][2j], pe[r][2j+1] (f32 [rows, Dh], row stride ld_pe; the caller
// points pe at row pe_row0 of the sequence's table, so a stream's rows get the Kontext ids of
// their place in the joint sequence). v (columns ≥ 2·H·Dh) is not touched.
// Replaces CpuBackend::qk_norm_rope (engine/src/cpu.rs) = BFL QKNorm (spec 1.5) followed by
// apply_rope with EmbedND's pe (spec 1.6; interleaved pairs, not rotate_half).
//
// Layout: one block per row (grid-stride), one warp per (q or k, head); any even Dh. The head is
// read twice (sum of squares, then normalise + rotate + store), so no per-thread arrays and no
// head-dim limit. In place is safe: each pair is read and written by the same lane, after the
// warp's reduction has consumed every read of the first pass.
// Numerics: f32 throughout, one bf16 rounding at the store. The rotation uses explicit
// round-to-nearest multiplies and adds (no FMA contraction), like the reference's separate f32
// ops (spec 1.15) and the CPU reference.
// Why fused: both steps are per-head and in place; fusing them reads and writes q and k once
// instead of twice.
#include "common.cuh"

#define QKR_THREADS 256

extern "C" __global__ void __launch_bounds__(QKR_THREADS)
    qk_norm_rope(bf16* qkv, i64 ld, int rows, int heads, int head_dim,
                 const float* __restrict__ q_scale, const float* __restrict__ k_scale,
                 const float* __restrict__ pe, i64 ld_pe, float eps) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    const float inv_dh = 1.0f / (float)head_dim;
    const int pairs = head_dim / 2;
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        bf16* row = qkv + (i64)r * ld;
        const float* per = pe + (i64)r * ld_pe;
        for (int item = warp; item < 2 * heads; item += nwarps) {
            const int part = item / heads;  // 0 = q, 1 = k
            const int h = item - part * heads;
            bf16* x = row + (i64)part * heads * head_dim + (i64)h * head_dim;
            const float* scale = part == 0 ? q_scale : k_scale;
            float ss = 0.0f;
            for (int i = lane; i < head_dim; i += 32) {
                const float v = ld_bf16(x + i);
                ss += v * v;
            }
            const float rrms = rsqrtf(warp_sum(ss) * inv_dh + eps);
            for (int j = lane; j < pairs; j += 32) {
                const float a = __fmul_rn(__fmul_rn(ld_bf16(x + 2 * j), rrms), scale[2 * j]);
                const float b = __fmul_rn(__fmul_rn(ld_bf16(x + 2 * j + 1), rrms), scale[2 * j + 1]);
                const float c = per[2 * j];
                const float s = per[2 * j + 1];
                st_bf16(x + 2 * j, __fsub_rn(__fmul_rn(c, a), __fmul_rn(s, b)));
                st_bf16(x + 2 * j + 1, __fadd_rn(__fmul_rn(s, a), __fmul_rn(c, b)));
            }
        }
    }
}

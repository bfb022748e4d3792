// attention.cu: multi-head attention reading q, k and v from the fused qkv buffer; and the row
// softmax of the wide-head path.
//
// attention: for every head h and query i of qkv [L, ld] (bf16; q at columns [0, D), k at [D, 2D),
//   v at [2D, 3D), D = H·Dh, head h at h·Dh inside each):
//     out[i, h·Dh + d] = Σ_j softmax_j(scale · q_i·k_j + bias_h(j − i)) · v_j[d]
//   over keys j < L, or j ≤ i when `causal`. `bias` (f32, may be null) is an additive bias
//   [H·L, L] with row stride ld_bias: bias_h(i, j) = bias[(h·L + i)·ld_bias + j] (T5's relative
//   position bias, built once per request; the contract of EncoderBackend::attention_masked).
//   Flux: scale 1/sqrt(128), no bias, not causal (spec 1.7). T5: scale 1, bias (spec 5.1). CLIP:
//   scale 1/8, causal (spec 5.2). Output [L, D] bf16 (row stride ld_out), head-major features
//   h·Dh + d.
// softmax_rows: p[r, c] = exp(scale·s[r, c] − max) / Σ (f32 s in, bf16 p out), the middle of the
//   VAE's single-head attention (Dh = 512, spec 4.2), whose two products run through cuBLASLt.
// Replaces CpuBackend::attention (engine/src/cpu.rs) = BFL's `attention` (SDPA + head merge), and
// the encoders' attention.
//
// Layout and limits: one block of 4 warps per (16 queries, head); each warp owns 4 queries. Keys
// come in tiles of 32 (one per lane) staged in shared memory with q (pre-scaled by scale·log2 e,
// in f32), k (rows padded by 2 elements, so that lane j reading row j hits bank j) and v.
// Each lane scores its key against a query, the warp takes the tile's max and sum by shuffles
// (online softmax in f32, exp2), and the lanes then accumulate p·v over the tile for the head
// dims d = lane + 32·e they own (Dh ≤ 128, even). A plain correct kernel on CUDA cores: the
// tensor-core (mma / wgmma) kernel is a later issue and is checked against this one.
// Why fused: q·kᵀ, softmax and ·v never leave the chip, so memory holds O(L·D), not O(H·L²); the
//   head split and merge are strides, not copies.
#include "common.cuh"

#define ATT_WARPS 4
#define ATT_QPW 4                       // queries per warp
#define ATT_BQ (ATT_WARPS * ATT_QPW)    // queries per block
#define ATT_BK 32                       // keys per tile: one per lane
#define ATT_MAX_DH 128
#define ATT_DPL (ATT_MAX_DH / 32)       // head dims per lane
#define ATT_KPAD 2                      // k row padding (elements): row stride 65 words
#define LOG2E 1.4426950408889634f

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
    attention(const bf16* __restrict__ qkv, i64 ld, int L, int heads, int head_dim, float scale,
              int causal, const float* __restrict__ bias, i64 ld_bias, bf16* __restrict__ out,
              i64 ld_out) {
    __shared__ float qs[ATT_BQ][ATT_MAX_DH];
    __shared__ __align__(16) bf16 ks[ATT_BK][ATT_MAX_DH + ATT_KPAD];
    __shared__ __align__(16) bf16 vs[ATT_BK][ATT_MAX_DH];

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int h = blockIdx.y;
    const int q0 = blockIdx.x * ATT_BQ;
    const i64 D = (i64)heads * head_dim;
    const bf16* qbase = qkv + (i64)h * head_dim;
    const bf16* kbase = qkv + D + (i64)h * head_dim;
    const bf16* vbase = qkv + 2 * D + (i64)h * head_dim;
    const float* hbias = bias ? bias + (i64)h * L * ld_bias : nullptr;
    const float qscale = scale * LOG2E;

    for (int idx = threadIdx.x; idx < ATT_BQ * head_dim; idx += blockDim.x) {
        const int qi = idx / head_dim;
        const int d = idx - qi * head_dim;
        const int i = q0 + qi;
        qs[qi][d] = i < L ? ld_bf16(qbase + (i64)i * ld + d) * qscale : 0.0f;
    }

    float m[ATT_QPW], l[ATT_QPW], acc[ATT_QPW][ATT_DPL];
#pragma unroll
    for (int qq = 0; qq < ATT_QPW; ++qq) {
        m[qq] = NEG_INF;
        l[qq] = 0.0f;
#pragma unroll
        for (int e = 0; e < ATT_DPL; ++e) acc[qq][e] = 0.0f;
    }

    const int kend = causal ? min(L, q0 + ATT_BQ) : L;
    for (int k0 = 0; k0 < kend; k0 += ATT_BK) {
        __syncthreads();  // the previous tile is no longer read (and qs is complete, first time)
        for (int idx = threadIdx.x; idx < ATT_BK * head_dim; idx += blockDim.x) {
            const int kj = idx / head_dim;
            const int d = idx - kj * head_dim;
            const int j = k0 + kj;
            const bool in = j < L;
            ks[kj][d] = in ? kbase[(i64)j * ld + d] : __float2bfloat16_rn(0.0f);
            vs[kj][d] = in ? vbase[(i64)j * ld + d] : __float2bfloat16_rn(0.0f);
        }
        __syncthreads();

        const int j = k0 + lane;  // this lane's key
#pragma unroll
        for (int qq = 0; qq < ATT_QPW; ++qq) {
            const int qi = warp * ATT_QPW + qq;
            const int i = q0 + qi;
            if (i >= L) continue;  // uniform across the warp
            float s = NEG_INF;
            if (j < L && (!causal || j <= i)) {
                float dot = 0.0f;
                for (int d = 0; d < head_dim; d += 2) {
                    const float2 kv = __bfloat1622float2(
                        *reinterpret_cast<const __nv_bfloat162*>(&ks[lane][d]));
                    dot += qs[qi][d] * kv.x + qs[qi][d + 1] * kv.y;
                }
                s = hbias ? dot + hbias[(i64)i * ld_bias + j] * LOG2E : dot;
            }
            const float m_new = fmaxf(m[qq], warp_max(s));
            if (m_new == NEG_INF) continue;  // every key so far masked (uniform)
            const float p = exp2f(s - m_new);  // 0 for masked keys
            const float corr = exp2f(m[qq] - m_new);  // 0 on the first visible tile
            l[qq] = l[qq] * corr + warp_sum(p);
            m[qq] = m_new;
#pragma unroll
            for (int e = 0; e < ATT_DPL; ++e) acc[qq][e] *= corr;
            for (int t = 0; t < ATT_BK; ++t) {
                const float pt = __shfl_sync(FULL_MASK, p, t);
#pragma unroll
                for (int e = 0; e < ATT_DPL; ++e) {
                    const int d = lane + 32 * e;
                    if (d < head_dim) acc[qq][e] += pt * __bfloat162float(vs[t][d]);
                }
            }
        }
    }

#pragma unroll
    for (int qq = 0; qq < ATT_QPW; ++qq) {
        const int i = q0 + warp * ATT_QPW + qq;
        if (i >= L) continue;
        const float inv = 1.0f / l[qq];
        bf16* o = out + (i64)i * ld_out + (i64)h * head_dim;
#pragma unroll
        for (int e = 0; e < ATT_DPL; ++e) {
            const int d = lane + 32 * e;
            if (d < head_dim) st_bf16(o + d, acc[qq][e] * inv);
        }
    }
}

#define SOFTMAX_THREADS 256

// One block per row (grid-stride): max, sum of exponentials, normalised store. scale > 0.
extern "C" __global__ void __launch_bounds__(SOFTMAX_THREADS)
    softmax_rows(const float* __restrict__ s, i64 lds, int rows, int cols, float scale,
                 bf16* __restrict__ p, i64 ldp) {
    __shared__ float scratch[32];
    const float k = scale * LOG2E;
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* sr = s + (i64)r * lds;
        bf16* pr = p + (i64)r * ldp;
        float mx = NEG_INF;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) mx = fmaxf(mx, sr[c]);
        mx = block_max(mx, scratch);
        float sum = 0.0f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) sum += exp2f((sr[c] - mx) * k);
        const float inv = 1.0f / block_sum(sum, scratch);
        for (int c = threadIdx.x; c < cols; c += blockDim.x)
            st_bf16(pr + c, exp2f((sr[c] - mx) * k) * inv);
    }
}

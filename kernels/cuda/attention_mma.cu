// attention_mma.cu: the attention of the Flux blocks on tensor cores (mma.sync, sm_80+), with the
// QKNorm + RoPE prologue fused in.
//
// For every head h and query i of qkv [L, ld] (bf16; q at columns [0, D), k at [D, 2D), v at
// [2D, 3D), D = H·Dh, head h at h·Dh inside each; row stride ld ≥ 3D):
//   q̂_i = rope_i(rmsnorm(q_i) · q_scale),  k̂_j = rope_j(rmsnorm(k_j) · k_scale)   (each → bf16)
//   out[i, h·Dh + d] = Σ_j softmax_j(q̂_i·k̂_j / sqrt(Dh)) · v_j[d]
// with rmsnorm(x) = x · rsqrt(mean(x²) + eps) over the head and rope_r the rotation of the
// adjacent pairs (2j, 2j+1) by (cos, sin) = pe[r][2j], pe[r][2j+1] (f32, row stride ld_pe; the
// caller points pe at row pe_row0 of the sequence's table). Rows [0, split) take q_scale0 /
// k_scale0, rows [split, L) q_scale1 / k_scale1: a double block's concatenated [txt ‖ img] qkv
// carries both streams' QKNorms (spec 1.8 step 4), a single block passes split = L.
// Output [L, D] bf16 with its own row stride ld_out (the next GEMM's operand, e.g. the first D
// columns of a single block's [attention ‖ GELU(mlp)] buffer).
// Replaces CpuBackend::qk_norm_rope followed by CpuBackend::attention (engine/src/cpu.rs) = BFL's
// QKNorm (spec 1.5), apply_rope (spec 1.6) and attention (spec 1.7); the plain kernels
// (qk_norm_rope.cu, attention.cu) stay the reference and the fallback for other head dims.
//
// Numerics: exactly qk_norm_rope.cu's prologue (f32 norm, explicit round-to-nearest products and
// sums in the rotation, one bf16 rounding), so q̂ and k̂ are the bf16 values the unfused path
// feeds attention. Scores and softmax in f32 (scores pre-scaled by log2 e / sqrt(Dh), exp2), the
// probabilities rounded to bf16 for the P·V product (as FlashAttention and PyTorch's SDPA do),
// f32 accumulation throughout, one bf16 rounding at the store.
//
// Layout: two kernels per call.
// - attention_mma_k_norm_rope: QKNorm + RoPE of k, in place in qkv (one warp per (row, head),
//   any even Dh). Why k gets a pass of its own: every query block reads every key, so normalising
//   k as its tiles are loaded repeats the work L/64 times. At L = 8,704, Dh = 128 that is ~10
//   CUDA-core ops and 4 bytes of pe per key element per query block: ≈ 3.6e10 ops and 14.5 GB of
//   L2 reads per layer, about as long as the tensor-core work itself (~1.1 ms + ~1.5 ms against
//   ~2.3 ms on an H100), where this pass reads and writes k once (≈ 110 MB, ~35 µs). q is
//   normalised in the attention kernel's prologue: each query row is read by one block only.
// - attention_mma_d64 / _d128: FlashAttention-2-style forward. One block of 4 warps per
//   (64 queries, head); each warp owns 16 query rows (the m16 of mma.m16n8k16). The block's q̂
//   tile stays in shared memory; k̂ and v come in tiles of 64 keys, double-buffered: cp.async
//   brings tile t + 1 while tile t is multiplied. Per tile and warp: S = q̂·k̂ᵀ (16 × 64, f32
//   fragments; A by ldmatrix.x4 from the q̂ tile, B by ldmatrix.x4 from k̂ rows), online softmax
//   on the fragments (row max and sum across the 4 lanes of a quad), then O += P·V with P taken
//   straight from the S fragments (the C layout of one mma is the A layout of the next, two n8
//   tiles per k16 step) and V by ldmatrix.x4.trans. Tiles are rows of Dh + 8 bf16 (16 bytes of
//   padding: the 8 row addresses of each ldmatrix phase hit distinct banks). Dynamic shared
//   memory: (64 + 4·64)·(Dh + 8)·2 bytes = 45 KiB (Dh 64), 85 KiB (Dh 128).
//   Tails: query rows ≥ L are zeros and not stored; key rows ≥ L are zero-filled by cp.async
//   (src-size 0) and masked to −∞ before the softmax. Any L ≥ 1, any number of heads.
// Limits: Dh ∈ {64, 128}; qkv and out 16-byte aligned with row strides a multiple of 8 elements
//   (cp.async and the bf16x2 stores); the launcher checks them.
// Why fused: q̂·k̂ᵀ, the softmax and P·V never leave the chip, the heads are strides of the qkv
//   buffer (no split, no merge), and the separate prologue pass over q is gone.
#include "common.cuh"
#include "ptx.cuh"

#define AMMA_WARPS 4
#define AMMA_BQ 64                     // queries per block: 16 per warp
#define AMMA_BK 64                     // keys per tile
#define AMMA_PAD 8                     // row padding of the shared tiles (bf16 elements)
#define AMMA_KNR_THREADS 256
#define LOG2E 1.4426950408889634f

// k ← rope(rmsnorm(k) · k_scale), in place on the k columns of qkv; rows [0, split) use
// k_scale0, the others k_scale1. Any even head dim (two passes over the head, like
// qk_norm_rope.cu). Grid-stride over rows, one warp per head.
extern "C" __global__ void __launch_bounds__(AMMA_KNR_THREADS)
    attention_mma_k_norm_rope(bf16* qkv, i64 ld, int rows, int heads, int head_dim,
                              const float* __restrict__ k_scale0, const float* __restrict__ k_scale1,
                              int split, const float* __restrict__ pe, i64 ld_pe, float eps) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    const float inv_dh = 1.0f / (float)head_dim;
    const int pairs = head_dim / 2;
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* per = pe + (i64)r * ld_pe;
        const float* scale = r < split ? k_scale0 : k_scale1;
        for (int h = warp; h < heads; h += nwarps) {
            bf16* x = qkv + (i64)r * ld + (i64)heads * head_dim + (i64)h * head_dim;
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

__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

// Issues the cp.async copies of key tile [k0, k0 + 64) of k and v into one stage (rows of S
// elements); rows past L are zero-filled (nothing read; the address stays a valid aligned one).
template <int DH>
__device__ __forceinline__ void load_kv_tile(const bf16* kb, const bf16* vb, i64 ld, int L, int k0,
                                             bf16* sk, bf16* sv) {
    constexpr int S = DH + AMMA_PAD;
    constexpr int CH = DH / 8;  // 16-byte chunks per row
    for (int c = threadIdx.x; c < AMMA_BK * CH; c += AMMA_WARPS * 32) {
        const int r = c / CH;
        const int col = (c - r * CH) * 8;
        const int j = k0 + r;
        const bool in = j < L;
        const i64 row = in ? j : 0;
        cp_async_16_zfill(sk + r * S + col, kb + row * ld + col, in ? 16u : 0u);
        cp_async_16_zfill(sv + r * S + col, vb + row * ld + col, in ? 16u : 0u);
    }
}

template <int DH>
__device__ __forceinline__ void attention_mma_body(
    const bf16* __restrict__ qkv, i64 ld, int L, int heads, const float* __restrict__ q_scale0,
    const float* __restrict__ q_scale1, int split, const float* __restrict__ pe, i64 ld_pe,
    float eps, float scale, bf16* __restrict__ out, i64 ld_out, unsigned char* smem) {
    constexpr int S = DH + AMMA_PAD;
    constexpr int NT = AMMA_BK / 8;  // n8 tiles of keys per tile
    constexpr int DT = DH / 8;       // n8 tiles of head dims
    bf16* sq = reinterpret_cast<bf16*>(smem);  // [BQ][S]
    bf16* sk = sq + AMMA_BQ * S;                // [2][BK][S]
    bf16* sv = sk + 2 * AMMA_BK * S;            // [2][BK][S]

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int h = blockIdx.y;
    const int q0 = blockIdx.x * AMMA_BQ;
    const i64 D = (i64)heads * DH;
    const bf16* qb = qkv + (i64)h * DH;
    const bf16* kb = qkv + D + (i64)h * DH;
    const bf16* vb = qkv + 2 * D + (i64)h * DH;
    const int ntiles = (L + AMMA_BK - 1) / AMMA_BK;

    load_kv_tile<DH>(kb, vb, ld, L, 0, sk, sv);
    cp_async_commit();

    // Prologue: the warp's 16 query rows, normalised and rotated, into the q̂ tile.
    for (int r = 0; r < 16; ++r) {
        const int qi = warp * 16 + r;
        const int i = q0 + qi;
        __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(sq + qi * S);
        __nv_bfloat162 y[DH / 64];
        if (i < L) {
            norm_rope_row<DH>(qb + (i64)i * ld, i < split ? q_scale0 : q_scale1,
                              pe + (i64)i * ld_pe, eps, lane, y);
        } else {
#pragma unroll
            for (int e = 0; e < DH / 64; ++e) y[e] = __floats2bfloat162_rn(0.0f, 0.0f);
        }
#pragma unroll
        for (int e = 0; e < DH / 64; ++e) dst[lane + 32 * e] = y[e];
    }

    // Fragment owners: lane holds rows g and g + 8 of the warp's 16, columns 2t, 2t + 1 of each n8.
    const int t4 = lane & 3;
    const float sl2 = scale * LOG2E;
    float o[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
        for (int i = 0; i < 4; ++i) o[dt][i] = 0.0f;
    float m[2] = {NEG_INF, NEG_INF};
    float l[2] = {0.0f, 0.0f};  // this lane's partial row sums (the quad's are added at the end)

    // ldmatrix row addresses (element offsets inside a tile), fixed per lane:
    // A (q̂, x4): matrices (rows 0–7 | 8–15) × (dims 0–7 | 8–15) in a0..a3 order.
    const int a_off = (warp * 16 + (lane & 15)) * S + 8 * (lane >> 4);
    // B (k̂, x4): keys 0–7 dims 0–7, keys 0–7 dims 8–15, keys 8–15 dims 0–7, keys 8–15 dims 8–15.
    const int b_off = ((lane & 7) + 8 * (lane >> 4)) * S + 8 * ((lane >> 3) & 1);
    // B (v, x4.trans): keys 0–7 dims 0–7, keys 8–15 dims 0–7, keys 0–7 dims 8–15, keys 8–15 dims 8–15.
    const int v_off = ((lane & 7) + 8 * ((lane >> 3) & 1)) * S + 8 * (lane >> 4);

    for (int t = 0; t < ntiles; ++t) {
        const int stage = t & 1;
        if (t + 1 < ntiles) {
            load_kv_tile<DH>(kb, vb, ld, L, (t + 1) * AMMA_BK, sk + (stage ^ 1) * AMMA_BK * S,
                             sv + (stage ^ 1) * AMMA_BK * S);
            cp_async_commit();
            cp_async_wait<1>();  // this thread's copies of tile t have landed
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // every thread's copies of tile t (and, the first time, the q̂ tile)
        const bf16* kt = sk + stage * AMMA_BK * S;
        const bf16* vt = sv + stage * AMMA_BK * S;

        // S = q̂·k̂ᵀ: 16 × 64 per warp.
        float s[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) s[nt][i] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < DH / 16; ++kk) {
            unsigned a[4];
            ldmatrix_x4(a, sq + a_off + kk * 16);
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                unsigned b[4];
                ldmatrix_x4(b, kt + b_off + np * 16 * S + kk * 16);
                const unsigned b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
                mma_m16n8k16_bf16(s[2 * np], a, b0, s[2 * np]);
                mma_m16n8k16_bf16(s[2 * np + 1], a, b1, s[2 * np + 1]);
            }
        }

        // Online softmax on the fragments: s[nt][i] is row g + 8·(i ≥ 2), key 8·nt + 2t + (i & 1).
        const int k0 = t * AMMA_BK;
        const bool tail = k0 + AMMA_BK > L;
        float mx[2] = {m[0], m[1]};
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                float x = s[nt][i] * sl2;
                if (tail && k0 + 8 * nt + 2 * t4 + (i & 1) >= L) x = NEG_INF;
                s[nt][i] = x;
                mx[i >> 1] = fmaxf(mx[i >> 1], x);
            }
        float corr[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL_MASK, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL_MASK, mx[r], 2));
            // Key k0 < L is in every tile, so mx is finite; m is −∞ only before the first tile,
            // where the correction is exp2(−∞) = 0.
            corr[r] = exp2f(m[r] - mx[r]);
            m[r] = mx[r];
            l[r] *= corr[r];
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float p = exp2f(s[nt][i] - m[i >> 1]);  // 0 for masked keys
                s[nt][i] = p;
                l[i >> 1] += p;
            }
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
            for (int i = 0; i < 4; ++i) o[dt][i] *= corr[i >> 1];

        // O += P·V: k16 step j takes the S fragments of key tiles 2j and 2j + 1 as A.
#pragma unroll
        for (int j = 0; j < NT / 2; ++j) {
            const unsigned a[4] = {pack_bf16x2(s[2 * j][0], s[2 * j][1]),
                                   pack_bf16x2(s[2 * j][2], s[2 * j][3]),
                                   pack_bf16x2(s[2 * j + 1][0], s[2 * j + 1][1]),
                                   pack_bf16x2(s[2 * j + 1][2], s[2 * j + 1][3])};
#pragma unroll
            for (int dp = 0; dp < DT / 2; ++dp) {
                unsigned b[4];
                ldmatrix_x4_trans(b, vt + v_off + j * 16 * S + dp * 16);
                const unsigned b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
                mma_m16n8k16_bf16(o[2 * dp], a, b0, o[2 * dp]);
                mma_m16n8k16_bf16(o[2 * dp + 1], a, b1, o[2 * dp + 1]);
            }
        }
        __syncthreads();  // stage `stage` is read by everyone before tile t + 2 is copied into it
    }

    // Epilogue: the quad's row sums, normalise, store bf16 pairs.
    const int g = lane >> 2;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(FULL_MASK, l[r], 1);
        l[r] += __shfl_xor_sync(FULL_MASK, l[r], 2);
        const int i = q0 + warp * 16 + g + 8 * r;
        if (i >= L) continue;
        const float inv = 1.0f / l[r];
        bf16* dst = out + (i64)i * ld_out + (i64)h * DH + 2 * t4;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
            *reinterpret_cast<__nv_bfloat162*>(dst + 8 * dt) =
                __floats2bfloat162_rn(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
    }
}

extern "C" __global__ void __launch_bounds__(AMMA_WARPS * 32)
    attention_mma_d64(const bf16* __restrict__ qkv, i64 ld, int L, int heads,
                      const float* __restrict__ q_scale0, const float* __restrict__ q_scale1,
                      int split, const float* __restrict__ pe, i64 ld_pe, float eps, float scale,
                      bf16* __restrict__ out, i64 ld_out) {
    extern __shared__ __align__(16) unsigned char amma_smem64[];
    attention_mma_body<64>(qkv, ld, L, heads, q_scale0, q_scale1, split, pe, ld_pe, eps, scale, out,
                           ld_out, amma_smem64);
}

extern "C" __global__ void __launch_bounds__(AMMA_WARPS * 32)
    attention_mma_d128(const bf16* __restrict__ qkv, i64 ld, int L, int heads,
                       const float* __restrict__ q_scale0, const float* __restrict__ q_scale1,
                       int split, const float* __restrict__ pe, i64 ld_pe, float eps, float scale,
                       bf16* __restrict__ out, i64 ld_out) {
    extern __shared__ __align__(16) unsigned char amma_smem128[];
    attention_mma_body<128>(qkv, ld, L, heads, q_scale0, q_scale1, split, pe, ld_pe, eps, scale,
                            out, ld_out, amma_smem128);
}

// ptx_twins.cu: test kernels for the PTX functions of kernels/cuda/ptx.cuh.
//
// Each kernel builds its operands from the PTX ISA's documented layouts, written out here again
// (never through ptx.cuh's twins), runs one instruction and writes what it got to global memory;
// kernels/tests/emulator/ptx.rs compares that with a CPU product or the documented mapping, and
// kernels/tests/ptx_compile.rs compiles this file with the real NVRTC for sm_80, sm_89 and sm_90a
// (so every asm half assembles). Instructions newer than a target are compiled out with
// __CUDA_ARCH__ (the emulator always has them: it is CC 9.0).
//
// Layout: one warp per 16×8 product tile; matrices row-major in global memory, B as K×N.
#include "common.cuh"
#include "ptx.cuh"

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 890
#define PTX_TEST_SM89 1
#endif
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define PTX_TEST_SM90 1
#endif

__device__ __forceinline__ unsigned pack_bf16x2(const bf16* lo, const bf16* hi) {
    return (unsigned)__bfloat16_as_ushort(*lo) | ((unsigned)__bfloat16_as_ushort(*hi) << 16);
}

// The row slot matrix i's row j occupies in the shared staging area (a permutation of 0..31):
// rows of one matrix are not adjacent, so only per-lane row addresses can find them.
__device__ __forceinline__ int ldm_slot(int i, int j) { return ((i * 8 + j) * 5) % 32; }

// One warp. src: 4 matrices × 8 × 8 u16, [matrix][row][col]. out[lane·14 + k]: the registers of
// x1, x2, x4, x1.trans, x2.trans, x4.trans in that order (1 + 2 + 4 + 1 + 2 + 4 = 14).
extern "C" __global__ void ldmatrix_layout(const unsigned short* src, unsigned* out) {
    __shared__ __align__(16) unsigned short stage[32 * 8];
    const int lane = threadIdx.x & 31;
    for (int e = lane; e < 256; e += 32) {
        const int i = e / 64, j = (e / 8) % 8, c = e % 8;
        stage[ldm_slot(i, j) * 8 + c] = src[e];
    }
    __syncwarp();
    const unsigned short* row = stage + ldm_slot(lane / 8, lane % 8) * 8;
    unsigned* o = out + lane * 14;
    unsigned r1[1], r2[2], r4[4];
    ldmatrix_x1(r1, row);
    o[0] = r1[0];
    ldmatrix_x2(r2, row);
    o[1] = r2[0];
    o[2] = r2[1];
    ldmatrix_x4(r4, row);
    for (int k = 0; k < 4; ++k) o[3 + k] = r4[k];
    ldmatrix_x1_trans(r1, row);
    o[7] = r1[0];
    ldmatrix_x2_trans(r2, row);
    o[8] = r2[0];
    o[9] = r2[1];
    ldmatrix_x4_trans(r4, row);
    for (int k = 0; k < 4; ++k) o[10 + k] = r4[k];
}

// Warp w computes D_w = A_w·B_w + C_w with `ksteps` chained m16n8k16 products:
// A [warps][16][16·ksteps], B [warps][16·ksteps][8], C and D [warps][16][8].
// mutant 1: the lane is split as g = lane % 8, t = lane / 8 when A is filled (a wrong layout);
// mutant 2: the two bf16 of each B register are swapped. Both must be caught by the test.
extern "C" __global__ void mma_bf16_layout(const bf16* A, const bf16* B, const float* C, float* D,
                                           int ksteps, int mutant) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int K = 16 * ksteps;
    A += (i64)warp * 16 * K;
    B += (i64)warp * K * 8;
    C += warp * 128;
    D += warp * 128;
    const int g = lane >> 2, t = lane & 3;
    const int ga = mutant == 1 ? lane % 8 : g, ta = mutant == 1 ? lane / 8 : t;
    float acc[4];
    for (int i = 0; i < 4; ++i) acc[i] = C[(g + 8 * (i / 2)) * 8 + 2 * t + (i % 2)];
    for (int s = 0; s < ksteps; ++s) {
        const int k0 = 16 * s;
        unsigned a[4], b[2];
        for (int r = 0; r < 4; ++r) {
            // a_{2r}, a_{2r+1}: row groupID (+8 for registers 1 and 3), columns
            // 2·threadID_in_group (+1) (+8 for registers 2 and 3).
            const int row = ga + 8 * (r % 2), col = k0 + 2 * ta + 8 * (r / 2);
            a[r] = pack_bf16x2(&A[row * K + col], &A[row * K + col + 1]);
        }
        for (int r = 0; r < 2; ++r) {
            // b_{2r}, b_{2r+1}: rows 2·threadID_in_group (+1) (+8 for register 1), column groupID.
            const int k = k0 + 2 * t + 8 * r;
            const bf16* lo = &B[k * 8 + g];
            const bf16* hi = &B[(k + 1) * 8 + g];
            b[r] = mutant == 2 ? pack_bf16x2(hi, lo) : pack_bf16x2(lo, hi);
        }
        mma_m16n8k16_bf16(acc, a, b, acc);
    }
    for (int i = 0; i < 4; ++i) D[(g + 8 * (i / 2)) * 8 + 2 * t + (i % 2)] = acc[i];
}

// The production pairing: A (16×16 row-major) and B (16×8, K×N row-major) staged in shared
// memory with cp.async, A read with ldmatrix.x4, B with ldmatrix.x2.trans, one mma. D [16][8].
extern "C" __global__ void ldmatrix_mma(const bf16* A, const bf16* B, float* D) {
    __shared__ __align__(16) bf16 sa[16 * 16];
    __shared__ __align__(16) bf16 sb[16 * 8];
    const int lane = threadIdx.x & 31;
    cp_async_16(sa + lane * 8, A + lane * 8);
    if (lane < 16) cp_async_16(sb + lane * 8, B + lane * 8);
    cp_async_commit();
    cp_async_wait<0>();
    __syncwarp();
    unsigned a[4], b[2];
    // Matrix m = lane / 8 of A is rows 8·(m % 2).., columns 8·(m / 2)..: a0–a3 order.
    ldmatrix_x4(a, sa + (lane % 16) * 16 + 8 * (lane / 16));
    // Matrices 0 and 1 of B are K rows 0–7 and 8–15; lanes 16–31 are ignored by .x2.
    ldmatrix_x2_trans(b, sb + (lane % 16) * 8);
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    mma_m16n8k16_bf16(acc, a, b, acc);
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) D[(g + 8 * (i / 2)) * 8 + 2 * t + (i % 2)] = acc[i];
}

// One warp: D = A·B + C with m16n8k32 e4m3. A [16][32] bytes, B [32][8] bytes (K×N), C, D [16][8].
extern "C" __global__ void mma_e4m3_layout(const unsigned char* A, const unsigned char* B,
                                           const float* C, float* D) {
#ifdef PTX_TEST_SM89
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    unsigned a[4], b[2];
    for (int r = 0; r < 4; ++r) {
        // a_{4r}..a_{4r+3}: row groupID (+8 for registers 1 and 3), columns
        // 4·threadID_in_group.. (+16 for registers 2 and 3).
        const int row = g + 8 * (r % 2), col = 4 * t + 16 * (r / 2);
        a[r] = 0;
        for (int j = 0; j < 4; ++j) a[r] |= (unsigned)A[row * 32 + col + j] << (8 * j);
    }
    for (int r = 0; r < 2; ++r) {
        // b_{4r}..b_{4r+3}: rows 4·threadID_in_group.. (+16 for register 1), column groupID.
        b[r] = 0;
        for (int j = 0; j < 4; ++j) b[r] |= (unsigned)B[(4 * t + 16 * r + j) * 8 + g] << (8 * j);
    }
    float acc[4];
    for (int i = 0; i < 4; ++i) acc[i] = C[(g + 8 * (i / 2)) * 8 + 2 * t + (i % 2)];
    mma_m16n8k32_e4m3(acc, a, b, acc);
    for (int i = 0; i < 4; ++i) D[(g + 8 * (i / 2)) * 8 + 2 * t + (i % 2)] = acc[i];
#else
    (void)A, (void)B, (void)C, (void)D;
#endif
}

// 64 threads; src holds 256 16-byte chunks, out 5 snapshots of 128 chunks (poisoned by the host).
// The twin copies only at the wait that retires a group, so the snapshots are exact on the
// emulated GPU (on a GPU the "before" reads may already see the data).
//   0: own chunk tid read before any wait                           (old: the sentinel)
//   1: after wait_group 1: chunk tid (group 0), chunk 64 + tid (group 1)  (data, sentinel)
//   2: after wait_group 0: both                                      (data, data)
//   3: chunk tid after a zero-fill copy of tid % 17 bytes and wait_all
//   4: chunk 64 + tid after an uncommitted copy and wait_group 0 (old), then after wait_all (new)
extern "C" __global__ void cp_async_groups(const uint4* src, uint4* out) {
    __shared__ uint4 buf[128];
    const int tid = threadIdx.x;
    const uint4 sentinel = make_uint4(0xA5A5A5A5u, 0xA5A5A5A5u, 0xA5A5A5A5u, 0xA5A5A5A5u);
    buf[tid] = sentinel;
    buf[64 + tid] = sentinel;
    cp_async_16(&buf[tid], &src[tid]);
    cp_async_commit();
    cp_async_16(&buf[64 + tid], &src[64 + tid]);
    out[tid] = buf[tid];
    cp_async_commit();
    cp_async_wait<1>();
    out[128 + tid] = buf[tid];
    out[128 + 64 + tid] = buf[64 + tid];
    cp_async_wait<0>();
    out[256 + tid] = buf[tid];
    out[256 + 64 + tid] = buf[64 + tid];
    cp_async_16_zfill(&buf[tid], &src[128 + tid], (unsigned)(tid % 17));
    cp_async_wait_all();
    out[384 + tid] = buf[tid];
    cp_async_16(&buf[64 + tid], &src[192 + tid]);
    cp_async_wait<0>();
    out[512 + tid] = buf[64 + tid];
    cp_async_wait_all();
    out[512 + 64 + tid] = buf[64 + tid];
}

// 64 threads, one mbarrier counting all of them, four phases. Per thread and phase p, out gets
// five words: [0] phase p done, before this thread arrives (0); [1] phase p − 1 done, before it
// arrives (1: for p = 0 a fresh barrier counts as past its phase "−1", which lets a pipeline's
// first wait on an empty slot pass); [2] phase p done after the wait (1); [3] the other parity
// after the wait (0: that is now phase p + 1, still open); [4] neighbours' phase-p values not
// visible after the wait (0).
extern "C" __global__ void mbarrier_phases(unsigned* out) {
    __shared__ __align__(8) unsigned long long bar;
    __shared__ int data[64];
    const int tid = threadIdx.x;
    if (tid == 0) mbarrier_init(&bar, 64);
    __syncthreads();
    for (int p = 0; p < 4; ++p) {
        unsigned* o = out + (p * 64 + tid) * 5;
        const unsigned parity = (unsigned)(p & 1);
        data[tid] = p * 100 + tid;
        o[0] = mbarrier_try_wait_parity(&bar, parity);
        o[1] = mbarrier_try_wait_parity(&bar, parity ^ 1u);
        mbarrier_arrive(&bar);
        mbarrier_wait_parity(&bar, parity);
        o[2] = mbarrier_try_wait_parity(&bar, parity);
        o[3] = mbarrier_try_wait_parity(&bar, parity ^ 1u);
        const int n = (tid + 1) % 64;
        o[4] = data[n] != p * 100 + n;
        __syncthreads();  // nobody overwrites data[] for phase p + 1 while a neighbour reads it
    }
}

// One warp: bulk copies counted off an mbarrier's tx-count (sm_90). src: 64 uint4 chunks.
// Phase 0: arrive.expect_tx(512) first, then two 256-byte copies. Phase 1: a 512-byte copy
// lands before the producer's arrive.expect_tx(512) (the tx-count goes negative meanwhile).
// flags: [after expect_tx, after the first copy, after the second] (phase 0 done?),
//        [after the early copy, after the arrive] (phase 1 done?). out: the 64 chunks as read.
extern "C" __global__ void mbarrier_tx(const uint4* src, uint4* out, unsigned* flags) {
#ifdef PTX_TEST_SM90
    __shared__ __align__(8) unsigned long long bar;
    __shared__ __align__(16) uint4 buf[64];
    const int lane = threadIdx.x & 31;
    if (lane == 0) {
        mbarrier_init(&bar, 1);
        fence_mbarrier_init();
    }
    __syncwarp();
    if (lane == 0) {
        mbarrier_arrive_expect_tx(&bar, 512);
        flags[0] = mbarrier_try_wait_parity(&bar, 0);
        cp_async_bulk_g2s(buf, src, 256, &bar);
        flags[1] = mbarrier_try_wait_parity(&bar, 0);
        cp_async_bulk_g2s(buf + 16, src + 16, 256, &bar);
    }
    mbarrier_wait_parity(&bar, 0);
    if (lane == 0) flags[2] = mbarrier_try_wait_parity(&bar, 0);
    out[lane] = buf[lane];
    __syncwarp();
    if (lane == 0) {
        cp_async_bulk_g2s(buf + 32, src + 32, 512, &bar);
        flags[3] = mbarrier_try_wait_parity(&bar, 1);
        mbarrier_arrive_expect_tx(&bar, 512);
        flags[4] = mbarrier_try_wait_parity(&bar, 1);
    }
    mbarrier_wait_parity(&bar, 1);
    out[32 + lane] = buf[32 + lane];
#else
    (void)src, (void)out, (void)flags;
#endif
}

// ---- misuse the twins must stop (each launch is expected to fail) ------------------------------

// kind 0: source 8 bytes off alignment; 1: destination in global memory; 2: src-size 17.
extern "C" __global__ void cp_async_misuse(const unsigned char* src, unsigned char* gdst, int kind) {
    __shared__ __align__(16) unsigned char buf[32];
    if (kind == 0) cp_async_16(buf, src + 8);
    if (kind == 1) cp_async_16(gdst, src);
    if (kind == 2) cp_async_16_zfill(buf, src, 17);
    cp_async_wait_all();
}

// kind 0: lane 5's row address 8 bytes off alignment; 1: row addresses in global memory.
extern "C" __global__ void ldmatrix_misuse(const unsigned short* g, int kind) {
    __shared__ __align__(16) unsigned short stage[32 * 8];
    const int lane = threadIdx.x & 31;
    for (int e = lane; e < 256; e += 32) stage[e] = (unsigned short)e;
    __syncwarp();
    const unsigned short* row = stage + lane * 8 + (kind == 0 && lane == 5 ? 4 : 0);
    if (kind == 1) row = g + lane * 8;
    unsigned r[4];
    ldmatrix_x4(r, row);
}

// kind 0: wait on a barrier never initialised; 1: a second arrival in a phase that expects one
// (the phase is still waiting for bytes, so it has not restarted; sm_90).
extern "C" __global__ void mbarrier_misuse(int kind) {
    __shared__ __align__(8) unsigned long long bar;
    if (kind == 0) mbarrier_wait_parity(&bar, 0);
#ifdef PTX_TEST_SM90
    if (kind == 1) {
        mbarrier_init(&bar, 1);
        mbarrier_arrive_expect_tx(&bar, 16);
        mbarrier_arrive(&bar);
    }
#endif
}

// ---- Hopper: wgmma and TMA tensor copies (sm_90a / sm_90) ---------------------------------------

#ifdef PTX_HAS_WGMMA
// The test's own statement of the K-major canonical layouts (PTX ISA, "Asynchronous Warpgroup
// Level Matrix Shared Memory Layout"): byte offset of element (row r, column k) of a bf16 operand
// of `rows` rows and 64 columns, written by rows and chunks rather than by address bits.
//   span 0: core matrices of 8 rows × 8 columns (16 bytes a row, 128 in all); the core matrices
//     of one K-block of 8 columns follow each other down the rows (128 bytes apart: SBO), the
//     K-blocks are rows·16 bytes apart (LBO).
//   span S = 32/64/128: atoms of 8 rows × S bytes (S/2 columns); the atoms of one K-block of S/2
//     columns follow each other down the rows (8·S bytes apart: SBO), the K-blocks rows·S bytes
//     apart. Inside an atom the 16-byte chunk c of row j is stored at chunk c ^ (j / (128 / S)).
// `swizzled` false lays out the same atoms without the chunk permutation (a mutant).
__device__ __forceinline__ unsigned kmajor_offset(int r, int k, int rows, int span, bool swizzled) {
    if (span == 0) return (k / 8) * (rows * 16) + (r / 8) * 128 + (r % 8) * 16 + (k % 8) * 2;
    const int cols = span / 2, j = r % 8;
    int chunk = (k % cols) / 8;
    if (swizzled) chunk ^= j / (128 / span);
    return (k / cols) * (rows * span) + (r / 8) * (8 * span) + j * span + chunk * 16 + (k % 8) * 2;
}

// Where K-slice s (columns 16s … 16s + 15) of such an operand starts, and its LBO and SBO.
__device__ __forceinline__ unsigned kmajor_slice(int s, int rows, int span) {
    if (span == 0) return 2 * s * (rows * 16);
    const int cols = span / 2;
    return (16 * s / cols) * (rows * span) + (16 * s % cols) * 2;
}
__device__ __forceinline__ unsigned kmajor_lbo(int rows, int span) { return span ? 16 : rows * 16; }
__device__ __forceinline__ unsigned kmajor_sbo(int span) { return span ? 8 * span : 128; }

// One warpgroup: D [64][N] = A [64][64] (M×K, row-major) · B [64][N] (K×N, row-major) with four
// chained m64nNk16 wgmmas. Dynamic shared memory: A's tile (8 KiB), then B's (N × 128 bytes), in
// the layout of `span`. Mutants: 1 LBO and SBO swapped in the descriptors; 2 the tiles written
// without the swizzle permutation; 3 SBO halved; 4 the accumulators stored before the wait
// (emulated GPU only).
template <int N>
__device__ __forceinline__ void wgmma_product(unsigned char* hopper_smem, const bf16* A,
                                              const bf16* B, float* D, int span, int mutant) {
    unsigned char* sa = hopper_smem;
    unsigned char* sb = hopper_smem + 64 * 64 * 2;
    const int tid = threadIdx.x;
    const bool swizzled = mutant != 2;
    for (int e = tid; e < 64 * 64; e += 128) {
        const int r = e / 64, k = e % 64;
        *reinterpret_cast<bf16*>(sa + kmajor_offset(r, k, 64, span, swizzled)) = A[r * 64 + k];
    }
    for (int e = tid; e < N * 64; e += 128) {
        const int n = e / 64, k = e % 64;
        *reinterpret_cast<bf16*>(sb + kmajor_offset(n, k, N, span, swizzled)) = B[k * N + n];
    }
    fence_proxy_async();
    __syncthreads();
    // The descriptors first: branches between the wgmmas would make ptxas fence each one.
    unsigned long long da[4], db[4];
    for (int s = 0; s < 4; ++s) {
        unsigned lbo_a = kmajor_lbo(64, span), lbo_b = kmajor_lbo(N, span);
        unsigned sbo = kmajor_sbo(span), sbo_a = sbo, sbo_b = sbo;
        if (mutant == 1) {
            sbo_a = lbo_a, lbo_a = sbo;
            sbo_b = lbo_b, lbo_b = sbo;
        }
        if (mutant == 3) sbo_a = sbo_b = sbo / 2;
        da[s] = wgmma_desc(sa + kmajor_slice(s, 64, span), lbo_a, sbo_a, span);
        db[s] = wgmma_desc(sb + kmajor_slice(s, N, span), lbo_b, sbo_b, span);
    }
    float acc[N / 2];
    for (int i = 0; i < N / 2; ++i) acc[i] = 0.0f;
    wgmma_fence_operand(acc);
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < 4; ++s) wgmma_m64nNk16_bf16_f32<N>(acc, da[s], db[s], s > 0);
    wgmma_commit_group();
    const int w = tid / 32, g = (tid % 32) / 4, t = tid % 4;
    // D fragment: d[4i + j] is row 16w + g + 8·(j / 2), column 8i + 2t + j % 2.
#ifdef KONTEXT_EMU
    // (ptxas would mend this bug by waiting first, and say so.)
    if (mutant == 4)
        for (int i = 0; i < N / 2; ++i)
            D[(16 * w + g + 8 * ((i % 4) / 2)) * N + 8 * (i / 4) + 2 * t + i % 2] = acc[i];
#endif
    wgmma_wait_group<0>();
    wgmma_fence_operand(acc);
    if (mutant != 4)
        for (int i = 0; i < N / 2; ++i)
            D[(16 * w + g + 8 * ((i % 4) / 2)) * N + 8 * (i / 4) + 2 * t + i % 2] = acc[i];
}
#endif

extern "C" __global__ void wgmma_m64n64(const bf16* A, const bf16* B, float* D, int span, int mutant) {
#ifdef PTX_HAS_WGMMA
    extern __shared__ __align__(1024) unsigned char hopper_smem[];
    wgmma_product<64>(hopper_smem, A, B, D, span, mutant);
#else
    (void)A, (void)B, (void)D, (void)span, (void)mutant;
#endif
}

extern "C" __global__ void wgmma_m64n128(const bf16* A, const bf16* B, float* D, int span, int mutant) {
#ifdef PTX_HAS_WGMMA
    extern __shared__ __align__(1024) unsigned char hopper_smem[];
    wgmma_product<128>(hopper_smem, A, B, D, span, mutant);
#else
    (void)A, (void)B, (void)D, (void)span, (void)mutant;
#endif
}

extern "C" __global__ void wgmma_m64n256(const bf16* A, const bf16* B, float* D, int span, int mutant) {
#ifdef PTX_HAS_WGMMA
    extern __shared__ __align__(1024) unsigned char hopper_smem[];
    wgmma_product<256>(hopper_smem, A, B, D, span, mutant);
#else
    (void)A, (void)B, (void)D, (void)span, (void)mutant;
#endif
}

// One warpgroup: D [64][128] = A [64][64] · B [64][128] (row-major, bf16) with four chained
// m64n128k16 wgmmas taking A from registers, filled by the documented fragment (mma.m16n8k16's
// A per warp: register r of thread (w, g, t) for K-slice s holds row 16w + g + 8·(r & 1),
// columns 16s + 8·(r ≥ 2) + 2t and + 1, low half first); B in shared memory, 128B-swizzled
// K-major (16 KiB). Mutant 1: registers 1 and 2 swapped (rows g + 8 take row g's upper keys).
extern "C" __global__ void wgmma_rs_m64n128(const bf16* A, const bf16* B, float* D, int mutant) {
#ifdef PTX_HAS_WGMMA
    extern __shared__ __align__(1024) unsigned char hopper_smem[];
    const int tid = threadIdx.x;
    // The swizzled layout below is relative to a 1024-byte aligned start (as the kernels check).
    if (shared_window_address(hopper_smem) % 1024u != 0) __trap();
    for (int e = tid; e < 128 * 64; e += 128) {
        const int n = e / 64, k = e % 64;
        *reinterpret_cast<bf16*>(hopper_smem + kmajor_offset(n, k, 128, 128, true)) = B[k * 128 + n];
    }
    fence_proxy_async();
    __syncthreads();
    const int w = tid / 32, g = (tid % 32) / 4, t = tid % 4;
    unsigned a[4][4];
    for (int s = 0; s < 4; ++s)
        for (int r = 0; r < 4; ++r) {
            const int rr = (mutant == 1 && (r == 1 || r == 2)) ? 3 - r : r;
            const int row = 16 * w + g + 8 * (rr & 1), col = 16 * s + 8 * (rr >> 1) + 2 * t;
            const unsigned short lo = *reinterpret_cast<const unsigned short*>(A + row * 64 + col);
            const unsigned short hi = *reinterpret_cast<const unsigned short*>(A + row * 64 + col + 1);
            a[s][r] = (unsigned)lo | ((unsigned)hi << 16);
        }
    unsigned long long db[4];
    for (int s = 0; s < 4; ++s) db[s] = wgmma_desc(hopper_smem + kmajor_slice(s, 128, 128), 16, 1024, 128);
    float acc[64];
    for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
    wgmma_fence_operand(acc);
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < 4; ++s) wgmma_m64n128k16_bf16_f32_rs(acc, a[s], db[s], s > 0);
    wgmma_commit_group();
    wgmma_wait_group<0>();
    wgmma_fence_operand(acc);
    for (int i = 0; i < 64; ++i)
        D[(16 * w + g + 8 * ((i % 4) / 2)) * 128 + 8 * (i / 4) + 2 * t + i % 2] = acc[i];
#else
    (void)A, (void)B, (void)D, (void)mutant;
#endif
}

// 128 threads, 4 KiB of dynamic shared memory. kind 0: a descriptor of a static __shared__
// array; 1: thread 37 issues another B descriptor; 2: no wgmma_fence; 3: A's SBO points the rows
// past the end of dynamic shared memory.
extern "C" __global__ void wgmma_misuse(int kind) {
#ifdef PTX_HAS_WGMMA
    extern __shared__ __align__(1024) unsigned char hopper_smem[];
    __shared__ __align__(1024) unsigned char static_tile[2048];
    const int tid = threadIdx.x;
    for (int i = tid; i < 4096; i += 128) hopper_smem[i] = 0;
    for (int i = tid; i < 2048; i += 128) static_tile[i] = 0;
    __syncthreads();
    unsigned long long da = 0, db = wgmma_desc(hopper_smem + 2048, 256, 128, WGMMA_SWIZZLE_NONE);
    if (kind == 0) da = wgmma_desc(static_tile, 1024, 128, WGMMA_SWIZZLE_NONE);
    else if (kind == 3) da = wgmma_desc(hopper_smem, 128, 1024, WGMMA_SWIZZLE_NONE);
    else da = wgmma_desc(hopper_smem, 1024, 128, WGMMA_SWIZZLE_NONE);
    if (kind == 1 && tid == 37) db = wgmma_desc(hopper_smem + 1024, 256, 128, WGMMA_SWIZZLE_NONE);
    float acc[32];
    for (int i = 0; i < 32; ++i) acc[i] = 0.0f;
    wgmma_fence_operand(acc);
#ifdef KONTEXT_EMU
    if (kind != 2) wgmma_fence();
#else
    wgmma_fence();  // (ptxas would add the missing one, and say so)
#endif
    wgmma_m64nNk16_bf16_f32<64>(acc, da, db, 0);
    wgmma_commit_group();
    wgmma_wait_group<0>();
#else
    (void)kind;
#endif
}

// One block: thread 0 copies the box at (x, y) of the map into dynamic shared memory with the
// TMA; every thread waits on the mbarrier, then the box's `bytes` shared bytes go to out as they
// lie. kind 1: the destination is a static __shared__ array; kind 2: a 3d copy of the 2d map.
extern "C" __global__ void tma_2d(const __grid_constant__ CUtensorMap map, unsigned char* out,
                                  int x, int y, unsigned bytes, int kind) {
#ifdef PTX_TEST_SM90
    extern __shared__ __align__(1024) unsigned char hopper_smem[];
    __shared__ __align__(8) unsigned long long bar;
    __shared__ __align__(1024) unsigned char static_tile[1024];
    if (threadIdx.x == 0) {
        mbarrier_init(&bar, 1);
        fence_mbarrier_init();
        prefetch_tensormap(&map);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        mbarrier_arrive_expect_tx(&bar, bytes);
        if (kind == 0) cp_async_bulk_tensor_2d_g2s(hopper_smem, &map, x, y, &bar);
        if (kind == 1) cp_async_bulk_tensor_2d_g2s(static_tile, &map, x, y, &bar);
        if (kind == 2) cp_async_bulk_tensor_3d_g2s(hopper_smem, &map, x, y, 0, &bar);
    }
    mbarrier_wait_parity(&bar, 0);
    for (unsigned i = threadIdx.x; i < bytes; i += blockDim.x) out[i] = hopper_smem[i];
#else
    (void)map, (void)out, (void)x, (void)y, (void)bytes, (void)kind;
#endif
}

// The tensor map read from global memory (after fence_proxy_tensormap) rather than a parameter,
// with the 1d copy: `count` elements from element x of a 1d map into out.
extern "C" __global__ void tma_1d(const CUtensorMap* map, unsigned char* out, int x, unsigned bytes) {
#ifdef PTX_TEST_SM90
    extern __shared__ __align__(1024) unsigned char hopper_smem[];
    __shared__ __align__(8) unsigned long long bar;
    if (threadIdx.x == 0) {
        mbarrier_init(&bar, 1);
        fence_mbarrier_init();
        fence_proxy_tensormap(map);
        mbarrier_arrive_expect_tx(&bar, bytes);
        cp_async_bulk_tensor_1d_g2s(hopper_smem, map, x, &bar);
    }
    __syncthreads();
    mbarrier_wait_parity(&bar, 0);
    for (unsigned i = threadIdx.x; i < bytes; i += blockDim.x) out[i] = hopper_smem[i];
#else
    (void)map, (void)out, (void)x, (void)bytes;
#endif
}

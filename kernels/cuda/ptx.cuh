// ptx.cuh: every inline-PTX instruction the kernels use, one small device function per
// instruction, each with its emulated twin beside it.
//
// Why one header: inline PTX is the one place where the emulated GPU cannot run the production
// code as written (g++ has no PTX), so it is kept to small functions whose twins are checked
// against the PTX ISA's documented behaviour (kernels/emu/tests/ptx_twins.cu, run by
// kernels/tests/emulator/ptx.rs; kernels/tests/ptx_compile.rs proves the asm halves assemble for
// sm_80, sm_89 and sm_90a). A kernel never writes asm(...) itself.
//
// Conventions:
// - Shared-memory operands are generic pointers; the asm halves convert them to the shared
//   window (cvta), the twins read them directly (emulated shared memory is host memory).
// - Registers are `unsigned` (b32) and `unsigned long long` (b64): NVRTC has no <stdint.h>.
// - An instruction that needs a newer architecture is declared only where it exists
//   (`__CUDA_ARCH__`), so using it on an older target fails to compile in both halves, as ptxas
//   would refuse it.
// - Twins are strict: what the ISA leaves undefined or a GPU would fault on (misalignment, a
//   global address where shared memory is required, an mbarrier used before init, more arrivals
//   than a phase expects) stops the launch through __emu_rt->fail, naming the instruction.
//
// - Hopper operands (wgmma descriptors, TMA tensor-copy destinations) must be in dynamic shared
//   memory (`extern __shared__`), as real Hopper kernels keep their >48 KiB tiles: the emulated
//   GPU knows a 32-bit shared address only there (the block's 256 KiB-aligned window, emu/abi.h),
//   and the twins refuse a pointer to a static `__shared__` array instead of guessing.
//
// Layout sources: PTX ISA 9.x, sections "Matrix Fragments for mma.m16n8k16 with floating point
// type", "Matrix Fragments for mma.m16n8k32" (8-bit types), "Warp-level matrix load instruction:
// ldmatrix", "Data Movement and Conversion Instructions: cp.async", "Parallel Synchronization and
// Communication Instructions: mbarrier" (phase, pending arrival count, tx-count),
// "Asynchronous Warpgroup Level Matrix Shared Memory Layout" (matrix descriptor, K-major canonical
// layouts, swizzle atoms), "Register Fragments: wgmma .m64nNk16" (D), "cp.async.bulk.tensor"
// and "Tensor Access Modes: Tiled mode" (bounding box, out-of-bound fill); the driver API's
// cuTensorMapEncodeTiled (cuda.h) for the map's requirements and swizzle modes.
#pragma once

// The tensor map handed to the TMA instructions (128 bytes; cuda.h's type where it is included).
// Kernels take it as a `const __grid_constant__ CUtensorMap` parameter.
#ifndef __cuda_cuda_h__
struct alignas(64) CUtensorMap_st {
    unsigned long long opaque[16];
};
typedef struct CUtensorMap_st CUtensorMap;
#endif

// wgmma exists only on sm_90a (arch-specific: neither sm_90 nor later GPUs have it); NVRTC, and
// the emulator's stand-in, define the feature macro for that target alone.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PTX_HAS_WGMMA 1
#endif

#ifdef KONTEXT_EMU
#include <stdlib.h>

#include "emu/numerics.h"
#include "emu/tensormap.h"

// ---- twin support ------------------------------------------------------------------------------

[[noreturn]] static inline void ptx_emu_fail(const char* what) {
    __emu_rt->fail(what);
    __builtin_unreachable();
}

[[noreturn]] static inline void ptx_emu_failf(const char* op, const char* what, const void* p) {
    char buf[512];
    snprintf(buf, sizeof buf, "%s: %s (address %p)", op, what, p);
    ptx_emu_fail(buf);
}

static inline void ptx_emu_aligned(const void* p, size_t align, const char* op) {
    if (reinterpret_cast<uintptr_t>(p) % align != 0) {
        char what[64];
        snprintf(what, sizeof what, "operand is not %zu-byte aligned", align);
        ptx_emu_failf(op, what, p);
    }
}

// Emulated shared memory is host memory outside every device allocation; a global address where
// the instruction takes .shared is what a GPU would fault on (or silently misread).
static inline void ptx_emu_shared(const void* p, size_t bytes, const char* op) {
    if (__emu_rt->is_device(p, bytes))
        ptx_emu_failf(op, "a global-memory address where shared memory is required", p);
}

static inline void ptx_emu_global(const void* p, size_t bytes, const char* op) {
    if (!__emu_rt->is_device(p, bytes))
        ptx_emu_failf(op, "source is not inside one live device allocation", p);
}

// ---- cp.async state: the copies each thread has issued and not yet waited for ----------------
// The twin copies at the wait that retires a copy's group, never at issue, so a kernel that reads
// its destination before waiting sees the old bytes (on a GPU it may see either).
//
// Storage: one table per OS thread (worker), indexed by the thread's linear index. The module's
// thread-local block is poisoned (0xFF) by the driver before every block, so the table itself
// lives on the heap, found through a process-wide registry keyed by the address of this
// thread's `ptx_emu_tls` (stable for the thread's life). `ptx_emu_tls` caches the pointer; finding
// its mark overwritten is how a new block is noticed, and the table is then emptied (copies a
// finished block never waited for wrote only that block's shared memory, which is gone).
struct PtxEmuCopy {
    unsigned char* dst;
    const unsigned char* src;
    unsigned bytes;      // cp-size
    unsigned src_bytes;  // bytes read from src; the rest of dst is zero-filled
    unsigned group;
};
struct PtxEmuCopyQueue {
    PtxEmuCopy* items;
    unsigned count, cap;
    unsigned open_group;  // the group a new copy joins: groups [0, open_group) are committed
};
// wgmma results not yet retired by wgmma.wait_group (kept here, the accumulators poisoned).
struct PtxEmuWgmmaOp {
    float* d;  // the accumulator array the result belongs to
    unsigned n;  // its length (N/2 for m64nNk16)
    unsigned group;
    float v[128];
};
struct PtxEmuWgmmaQueue {
    PtxEmuWgmmaOp* items;
    unsigned count, cap;
    unsigned open_group;  // as for cp.async: groups [0, open_group) are committed
    bool fenced;          // wgmma.fence seen in this block
};
struct PtxEmuBlock {
    EmuDim3 block;
    PtxEmuCopyQueue q[1024];
    PtxEmuWgmmaQueue wg[1024];
};
struct PtxEmuTls {
    unsigned long long mark;
    PtxEmuBlock* table;
};
#define PTX_EMU_MARK 0x6b6f6e7465787431ull
#define PTX_EMU_WORKERS 1024

static thread_local PtxEmuTls ptx_emu_tls;
static struct {
    const void* key;
    PtxEmuBlock* table;
} ptx_emu_registry[PTX_EMU_WORKERS];

static inline PtxEmuBlock* ptx_emu_worker_table() {
    const void* key = &ptx_emu_tls;
    for (int i = 0; i < PTX_EMU_WORKERS; ++i) {
        const void* k = __atomic_load_n(&ptx_emu_registry[i].key, __ATOMIC_ACQUIRE);
        if (k == key) return ptx_emu_registry[i].table;
        if (k == nullptr) {
            // Claim the slot first, then fill it: a worker that loses the race must not write
            // the slot's table (it would replace the winner's with one it then frees).
            const void* expected = nullptr;
            if (__atomic_compare_exchange_n(&ptx_emu_registry[i].key, &expected, key, false,
                                            __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                PtxEmuBlock* t = static_cast<PtxEmuBlock*>(calloc(1, sizeof(PtxEmuBlock)));
                if (!t) ptx_emu_fail("cp.async: out of host memory");
                ptx_emu_registry[i].table = t;  // read only by this thread, the slot's owner
                return t;
            }
            // Another worker took the slot: look further.
        }
    }
    ptx_emu_fail("cp.async: more worker threads than the twin's registry holds");
}

static inline PtxEmuBlock* ptx_emu_block() {
    EmuThread* self = __emu_rt->current();
    const EmuDim3 bi = self->block_idx;
    PtxEmuBlock* b = ptx_emu_tls.table;
    if (ptx_emu_tls.mark != PTX_EMU_MARK || b->block.x != bi.x || b->block.y != bi.y ||
        b->block.z != bi.z) {
        b = ptx_emu_worker_table();
        for (PtxEmuCopyQueue& q : b->q) {
            q.count = 0;
            q.open_group = 0;
        }
        for (PtxEmuWgmmaQueue& q : b->wg) {
            q.count = 0;
            q.open_group = 0;
            q.fenced = false;
        }
        b->block = bi;
        ptx_emu_tls.table = b;
        ptx_emu_tls.mark = PTX_EMU_MARK;
    }
    return b;
}

static inline PtxEmuCopyQueue* ptx_emu_copy_queue() {
    return &ptx_emu_block()->q[__emu_rt->current()->linear];
}

static inline void ptx_emu_cp_async(void* dst, const void* src, unsigned bytes, unsigned src_bytes,
                                    const char* op) {
    ptx_emu_aligned(dst, bytes, op);
    ptx_emu_aligned(src, bytes, op);
    if (src_bytes > bytes) ptx_emu_failf(op, "src-size is larger than cp-size", src);
    ptx_emu_shared(dst, bytes, op);
    if (src_bytes > 0) ptx_emu_global(src, src_bytes, op);
    PtxEmuCopyQueue* q = ptx_emu_copy_queue();
    if (q->count == q->cap) {
        const unsigned cap = q->cap ? 2 * q->cap : 16;
        void* grown = realloc(q->items, cap * sizeof(PtxEmuCopy));
        if (!grown) ptx_emu_fail("cp.async: out of host memory");
        q->items = static_cast<PtxEmuCopy*>(grown);
        q->cap = cap;
    }
    q->items[q->count++] = PtxEmuCopy{static_cast<unsigned char*>(dst),
                                      static_cast<const unsigned char*>(src), bytes, src_bytes,
                                      q->open_group};
}

// Performs, in issue order, every copy of a committed group older than the `pending` most recent
// committed groups (all copies when `all`), and forgets them.
static inline void ptx_emu_cp_async_retire(unsigned pending, bool all) {
    PtxEmuCopyQueue* q = ptx_emu_copy_queue();
    unsigned kept = 0;
    for (unsigned i = 0; i < q->count; ++i) {
        const PtxEmuCopy c = q->items[i];
        if (all || (unsigned long long)c.group + pending < q->open_group) {
            memcpy(c.dst, c.src, c.src_bytes);
            memset(c.dst + c.src_bytes, 0, c.bytes - c.src_bytes);
        } else {
            q->items[kept++] = c;
        }
    }
    q->count = kept;
}

// ---- mbarrier state: the 64-bit barrier object itself ----------------------------------------
// The ISA leaves the object's contents opaque; the twin packs the documented state into it:
//   bits  0–19 pending arrival count     bits 20–39 expected arrival count
//   bits 40–60 tx-count (21-bit signed)  bit  61    current phase parity
//   bits 62–63 0b01: initialised (shared memory is poisoned to 0xFF, so an mbarrier used before
//              mbarrier.init is caught)
struct PtxEmuBar {
    unsigned pending, expected;
    int tx;
    unsigned phase;
};
#define PTX_EMU_BAR_MAX ((1u << 20) - 1)

static inline PtxEmuBar ptx_emu_bar_load(const unsigned long long* bar, const char* op) {
    ptx_emu_aligned(bar, 8, op);
    ptx_emu_shared(bar, 8, op);
    unsigned long long w;
    memcpy(&w, bar, 8);
    if ((w >> 62) != 1u) ptx_emu_failf(op, "the mbarrier was not initialised (mbarrier.init)", bar);
    PtxEmuBar s;
    s.pending = (unsigned)(w & PTX_EMU_BAR_MAX);
    s.expected = (unsigned)((w >> 20) & PTX_EMU_BAR_MAX);
    const unsigned tx = (unsigned)((w >> 40) & 0x1FFFFFu);
    s.tx = (tx & 0x100000u) ? (int)tx - (1 << 21) : (int)tx;
    s.phase = (unsigned)((w >> 61) & 1u);
    return s;
}

static inline void ptx_emu_bar_store(unsigned long long* bar, PtxEmuBar s) {
    // The current phase completes when every expected arrival has happened and every expected
    // byte has landed; the next phase starts with the full arrival count and no bytes expected.
    if (s.pending == 0 && s.tx == 0) {
        s.phase ^= 1u;
        s.pending = s.expected;
    }
    const unsigned long long w = (1ull << 62) | ((unsigned long long)s.phase << 61) |
                                 ((unsigned long long)((unsigned)s.tx & 0x1FFFFFu) << 40) |
                                 ((unsigned long long)s.expected << 20) | s.pending;
    memcpy(bar, &w, 8);
}

static inline void ptx_emu_bar_tx(PtxEmuBar* s, long long delta, const unsigned long long* bar,
                                  const char* op) {
    const long long tx = (long long)s->tx + delta;
    if (tx > (long long)PTX_EMU_BAR_MAX || tx < -(long long)PTX_EMU_BAR_MAX)
        ptx_emu_failf(op, "the mbarrier's tx-count leaves the range ±(2^20−1)", bar);
    s->tx = (int)tx;
}

static inline unsigned long long ptx_emu_bar_arrive(unsigned long long* bar, unsigned count,
                                                    long long expect_tx, const char* op) {
    PtxEmuBar s = ptx_emu_bar_load(bar, op);
    unsigned long long token;
    memcpy(&token, bar, 8);
    ptx_emu_bar_tx(&s, expect_tx, bar, op);
    if (count > s.pending)
        ptx_emu_failf(op, "more arrivals than the current phase of the mbarrier expects", bar);
    s.pending -= count;
    ptx_emu_bar_store(bar, s);
    return token;
}

// ---- numbers -----------------------------------------------------------------------------------
// e4m3 (OCP "fn" variant): bias 7, no infinities, S.1111.111 is NaN; exact in f32.
static inline float ptx_emu_e4m3(unsigned char v) {
    const unsigned e = (v >> 3) & 0xFu, m = v & 7u;
    float mag;
    if (e == 15u && m == 7u)
        mag = emu_bits_f32(0x7FC00000u);
    else if (e == 0u)
        mag = ldexpf((float)m, -9);  // subnormal: m/8 · 2^(1−7)
    else
        mag = ldexpf((float)(8u + m), (int)e - 10);  // (1 + m/8) · 2^(e−7)
    return (v & 0x80u) ? -mag : mag;
}

static inline float ptx_emu_bf16_lo(unsigned r) { return emu_bf16_to_f32((uint16_t)(r & 0xFFFFu)); }
static inline float ptx_emu_bf16_hi(unsigned r) { return emu_bf16_to_f32((uint16_t)(r >> 16)); }

// Tensor-core accumulation: products of bf16 or e4m3 values are exact in f32; the twin sums them
// in f64 and rounds once into the f32 accumulator, within the hardware's error (which truncates
// while aligning addends) but not bit-identical to it.
static inline float ptx_emu_dot_acc(float c, const float* a, const float* b, int k) {
    double s = c;
    for (int i = 0; i < k; ++i) s += (double)a[i] * (double)b[i];
    return (float)s;
}

#else  // real PTX

__device__ __forceinline__ unsigned ptx_smem_u32(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

#endif

// ================================================================================================
// cp.async (sm_80+): 16-byte global → shared copies, bypassing L1 (.cg), grouped by commit.
// ================================================================================================

// Copies 16 bytes; both addresses 16-byte aligned.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
#ifdef KONTEXT_EMU
    ptx_emu_cp_async(smem_dst, gmem_src, 16, 16, "cp.async.cg.shared.global");
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(ptx_smem_u32(smem_dst)),
                 "l"(gmem_src)
                 : "memory");
#endif
}

// Copies the first `src_bytes` (0–16) bytes and zero-fills the rest of the 16: the
// out-of-bounds tail of a tile (src_bytes = 0 reads nothing; `gmem_src` must still be aligned).
__device__ __forceinline__ void cp_async_16_zfill(void* smem_dst, const void* gmem_src,
                                                  unsigned src_bytes) {
#ifdef KONTEXT_EMU
    ptx_emu_cp_async(smem_dst, gmem_src, 16, src_bytes, "cp.async.cg.shared.global (src-size)");
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(ptx_smem_u32(smem_dst)),
                 "l"(gmem_src), "r"(src_bytes)
                 : "memory");
#endif
}

// Closes the current group of this thread's copies.
__device__ __forceinline__ void cp_async_commit() {
#ifdef KONTEXT_EMU
    ptx_emu_copy_queue()->open_group++;
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's most recent committed groups are still in flight
// (copies not yet committed are not waited for). Other threads' copies need a barrier after.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    static_assert(N >= 0 && N <= 7, "cp.async.wait_group takes 0–7");
#ifdef KONTEXT_EMU
    ptx_emu_cp_async_retire((unsigned)N, false);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Commits the open group and waits for every copy of this thread.
__device__ __forceinline__ void cp_async_wait_all() {
#ifdef KONTEXT_EMU
    ptx_emu_copy_queue()->open_group++;
    ptx_emu_cp_async_retire(0, true);
#else
    asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// ================================================================================================
// ldmatrix (sm_75+): 8×8 b16 matrices from shared memory into mma fragments.
// Lanes 8i..8i+7 give the row addresses (16 bytes each, 16-byte aligned) of matrix i; register i
// of lane l receives row l/4, columns 2·(l%4) and 2·(l%4)+1 of matrix i (low half = lower column).
// With .trans it receives column l/4, rows 2·(l%4) and 2·(l%4)+1 instead.
// ================================================================================================

#ifdef KONTEXT_EMU
static inline void ptx_emu_ldmatrix(unsigned* r, int num, bool trans, const void* row,
                                    const char* op) {
    const void* rows[32];
    __emu_rt->exchange(0xFFFFFFFFu, &row, rows, sizeof(const void*));
    // Only lanes 0 to 8·num − 1 give addresses; the others' are ignored, as on the GPU.
    for (int i = 0; i < 8 * num; ++i) {
        char lane_op[64];
        snprintf(lane_op, sizeof lane_op, "%s, row address of lane %d", op, i);
        ptx_emu_aligned(rows[i], 16, lane_op);
        ptx_emu_shared(rows[i], 16, lane_op);
    }
    const unsigned lane = __emu_rt->current()->lane;
    const unsigned g = lane >> 2, t = lane & 3u;
    for (int i = 0; i < num; ++i) {
        const unsigned char* const* m = reinterpret_cast<const unsigned char* const*>(rows + 8 * i);
        uint16_t lo, hi;
        if (!trans) {
            memcpy(&lo, m[g] + 4 * t, 2);
            memcpy(&hi, m[g] + 4 * t + 2, 2);
        } else {
            memcpy(&lo, m[2 * t] + 2 * g, 2);
            memcpy(&hi, m[2 * t + 1] + 2 * g, 2);
        }
        r[i] = (unsigned)lo | ((unsigned)hi << 16);
    }
}
#define PTX_LDMATRIX(NUM, TRANS, OP) ptx_emu_ldmatrix(r, NUM, TRANS, smem_row, OP)
#endif

__device__ __forceinline__ void ldmatrix_x1(unsigned (&r)[1], const void* smem_row) {
#ifdef KONTEXT_EMU
    PTX_LDMATRIX(1, false, "ldmatrix.x1");
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0])
                 : "r"(ptx_smem_u32(smem_row)));
#endif
}

__device__ __forceinline__ void ldmatrix_x2(unsigned (&r)[2], const void* smem_row) {
#ifdef KONTEXT_EMU
    PTX_LDMATRIX(2, false, "ldmatrix.x2");
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(ptx_smem_u32(smem_row)));
#endif
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* smem_row) {
#ifdef KONTEXT_EMU
    PTX_LDMATRIX(4, false, "ldmatrix.x4");
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(ptx_smem_u32(smem_row)));
#endif
}

__device__ __forceinline__ void ldmatrix_x1_trans(unsigned (&r)[1], const void* smem_row) {
#ifdef KONTEXT_EMU
    PTX_LDMATRIX(1, true, "ldmatrix.x1.trans");
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0])
                 : "r"(ptx_smem_u32(smem_row)));
#endif
}

__device__ __forceinline__ void ldmatrix_x2_trans(unsigned (&r)[2], const void* smem_row) {
#ifdef KONTEXT_EMU
    PTX_LDMATRIX(2, true, "ldmatrix.x2.trans");
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(ptx_smem_u32(smem_row)));
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* smem_row) {
#ifdef KONTEXT_EMU
    PTX_LDMATRIX(4, true, "ldmatrix.x4.trans");
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(ptx_smem_u32(smem_row)));
#endif
}

// ================================================================================================
// mma.sync: warp-wide tensor-core products, D = A·B + C, A row-major, B column-major, f32 D/C.
// groupID g = lane >> 2, threadID_in_group t = lane % 4.
// C/D (16×8 f32): d[i] is row g + 8·(i ≥ 2), column 2t + (i & 1).
// ================================================================================================

// m16n8k16, bf16 inputs (sm_80+).
// A (16×16): a[r] holds elements 2r, 2r+1 (low half first): a_i is row g + 8·(i ∈ {2,3,6,7}),
//   column 2t + (i & 1) + 8·(i ≥ 4).
// B (16×8, K×N): b[r] holds b_{2r}, b_{2r+1}: b_i is row 2t + (i & 1) + 8·(i ≥ 2), column g.
// `d` may be `c` (accumulate in place).
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const unsigned (&a)[4],
                                                  const unsigned (&b)[2], const float (&c)[4]) {
#ifdef KONTEXT_EMU
    struct Frag {
        unsigned a[4], b[2];
    } mine = {{a[0], a[1], a[2], a[3]}, {b[0], b[1]}}, all[32];
    __emu_rt->exchange(0xFFFFFFFFu, &mine, all, sizeof(Frag));
    float A[16][16], B[8][16];  // B stored as [n][k], the dot product's operand order
    for (unsigned l = 0; l < 32; ++l) {
        const unsigned g = l >> 2, t = l & 3u;
        for (unsigned i = 0; i < 8; ++i) {
            const unsigned r = all[l].a[i / 2];
            const unsigned row = g + ((i & 2u) ? 8u : 0u), col = 2 * t + (i & 1u) + (i >= 4 ? 8u : 0u);
            A[row][col] = (i & 1u) ? ptx_emu_bf16_hi(r) : ptx_emu_bf16_lo(r);
        }
        for (unsigned i = 0; i < 4; ++i) {
            const unsigned r = all[l].b[i / 2];
            B[g][2 * t + (i & 1u) + (i >= 2 ? 8u : 0u)] =
                (i & 1u) ? ptx_emu_bf16_hi(r) : ptx_emu_bf16_lo(r);
        }
    }
    const unsigned lane = __emu_rt->current()->lane, g = lane >> 2, t = lane & 3u;
    float out[4];
    for (unsigned i = 0; i < 4; ++i)
        out[i] = ptx_emu_dot_acc(c[i], A[g + (i >= 2 ? 8u : 0u)], B[2 * t + (i & 1u)], 16);
    for (unsigned i = 0; i < 4; ++i) d[i] = out[i];
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
          "f"(c[2]), "f"(c[3]));
#endif
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 890
// m16n8k32, e4m3 inputs (sm_89+), f32 accumulation.
// A (16×32): a[r] holds bytes a_{4r}..a_{4r+3} (lowest byte first): a_i is row
//   g + 8·(i ∈ 4–7 or 12–15), column 4t + (i & 3) + 16·(i ≥ 8).
// B (32×8, K×N): b[r] holds b_{4r}..b_{4r+3}: b_i is row 4t + (i & 3) + 16·(i ≥ 4), column g.
__device__ __forceinline__ void mma_m16n8k32_e4m3(float (&d)[4], const unsigned (&a)[4],
                                                  const unsigned (&b)[2], const float (&c)[4]) {
#ifdef KONTEXT_EMU
    struct Frag {
        unsigned a[4], b[2];
    } mine = {{a[0], a[1], a[2], a[3]}, {b[0], b[1]}}, all[32];
    __emu_rt->exchange(0xFFFFFFFFu, &mine, all, sizeof(Frag));
    float A[16][32], B[8][32];
    for (unsigned l = 0; l < 32; ++l) {
        const unsigned g = l >> 2, t = l & 3u;
        for (unsigned i = 0; i < 16; ++i) {
            const unsigned char v = (unsigned char)(all[l].a[i / 4] >> (8 * (i & 3u)));
            A[g + ((i & 4u) ? 8u : 0u)][4 * t + (i & 3u) + (i >= 8 ? 16u : 0u)] = ptx_emu_e4m3(v);
        }
        for (unsigned i = 0; i < 8; ++i) {
            const unsigned char v = (unsigned char)(all[l].b[i / 4] >> (8 * (i & 3u)));
            B[g][4 * t + (i & 3u) + (i >= 4 ? 16u : 0u)] = ptx_emu_e4m3(v);
        }
    }
    const unsigned lane = __emu_rt->current()->lane, g = lane >> 2, t = lane & 3u;
    float out[4];
    for (unsigned i = 0; i < 4; ++i)
        out[i] = ptx_emu_dot_acc(c[i], A[g + (i >= 2 ? 8u : 0u)], B[2 * t + (i & 1u)], 32);
    for (unsigned i = 0; i < 4; ++i) d[i] = out[i];
#else
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
          "f"(c[2]), "f"(c[3]));
#endif
}
#endif

// ================================================================================================
// mbarrier (sm_80+; expect-tx, complete-tx, try_wait and the async proxy sm_90+): a shared-memory
// barrier object with a phase, a pending arrival count and a tx-count (bytes still expected).
// A phase completes when its pending count and its tx-count both reach zero; the next phase then
// expects the init count again. Every function takes the 8-byte-aligned object in shared memory.
// ================================================================================================

// Initialises the barrier for `count` (1 to 2^20 − 1) arrivals per phase, phase 0.
__device__ __forceinline__ void mbarrier_init(unsigned long long* bar, unsigned count) {
#ifdef KONTEXT_EMU
    ptx_emu_aligned(bar, 8, "mbarrier.init");
    ptx_emu_shared(bar, 8, "mbarrier.init");
    if (count < 1 || count > PTX_EMU_BAR_MAX)
        ptx_emu_failf("mbarrier.init", "the count must be 1 to 2^20−1", bar);
    const unsigned long long w = (1ull << 62) | ((unsigned long long)count << 20) | count;
    memcpy(bar, &w, 8);
#else
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(ptx_smem_u32(bar)), "r"(count)
                 : "memory");
#endif
}

// One arrival; returns the barrier's state token (opaque) from before it.
__device__ __forceinline__ unsigned long long mbarrier_arrive(unsigned long long* bar) {
#ifdef KONTEXT_EMU
    return ptx_emu_bar_arrive(bar, 1, 0, "mbarrier.arrive");
#else
    unsigned long long state;
    asm volatile("mbarrier.arrive.shared::cta.b64 %0, [%1];\n"
                 : "=l"(state)
                 : "r"(ptx_smem_u32(bar))
                 : "memory");
    return state;
#endif
}

// Whether the phase of parity `parity` has completed (the barrier has moved past it): the phase
// a consumer waits on starts at parity 0 and alternates. Does not block for long.
__device__ __forceinline__ bool mbarrier_try_wait_parity(unsigned long long* bar, unsigned parity) {
#ifdef KONTEXT_EMU
    const bool done = ptx_emu_bar_load(bar, "mbarrier.try_wait.parity").phase != (parity & 1u);
    // Without giving way a polling fiber would never let the arriving threads run.
    if (!done) __emu_rt->yield();
    return done;
#else
    unsigned done;
#if __CUDA_ARCH__ >= 900
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(ptx_smem_u32(bar)), "r"(parity)
        : "memory");
#else
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(ptx_smem_u32(bar)), "r"(parity)
        : "memory");
#endif
    return done != 0;
#endif
}

// Blocks until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbarrier_wait_parity(unsigned long long* bar, unsigned parity) {
    while (!mbarrier_try_wait_parity(bar, parity)) {
    }
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
// Raises the tx-count by `tx_bytes` (0 to 2^20 − 1), then arrives once: the producer announcing
// the bytes an asynchronous copy will deliver to this phase.
__device__ __forceinline__ unsigned long long mbarrier_arrive_expect_tx(unsigned long long* bar,
                                                                        unsigned tx_bytes) {
#ifdef KONTEXT_EMU
    if (tx_bytes > PTX_EMU_BAR_MAX)
        ptx_emu_failf("mbarrier.arrive.expect_tx", "tx-count must be 0 to 2^20−1", bar);
    return ptx_emu_bar_arrive(bar, 1, tx_bytes, "mbarrier.arrive.expect_tx");
#else
    unsigned long long state;
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 %0, [%1], %2;\n"
                 : "=l"(state)
                 : "r"(ptx_smem_u32(bar)), "r"(tx_bytes)
                 : "memory");
    return state;
#endif
}

// Raises the tx-count by `tx_bytes` without arriving.
__device__ __forceinline__ void mbarrier_expect_tx(unsigned long long* bar, unsigned tx_bytes) {
#ifdef KONTEXT_EMU
    if (tx_bytes > PTX_EMU_BAR_MAX)
        ptx_emu_failf("mbarrier.expect_tx", "tx-count must be 0 to 2^20−1", bar);
    ptx_emu_bar_arrive(bar, 0, tx_bytes, "mbarrier.expect_tx");
#else
    asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(
                     ptx_smem_u32(bar)),
                 "r"(tx_bytes)
                 : "memory");
#endif
}

// Lowers the tx-count by `tx_bytes` as if that many bytes of an asynchronous copy had landed
// (what a bulk copy's complete_tx does); may complete the phase.
__device__ __forceinline__ void mbarrier_complete_tx(unsigned long long* bar, unsigned tx_bytes) {
#ifdef KONTEXT_EMU
    if (tx_bytes > PTX_EMU_BAR_MAX)
        ptx_emu_failf("mbarrier.complete_tx", "tx-count must be 0 to 2^20−1", bar);
    ptx_emu_bar_arrive(bar, 0, -(long long)tx_bytes, "mbarrier.complete_tx");
#else
    asm volatile("mbarrier.complete_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(
                     ptx_smem_u32(bar)),
                 "r"(tx_bytes)
                 : "memory");
#endif
}

// Orders this thread's generic-proxy shared-memory accesses before later async-proxy ones
// (TMA, wgmma operands). The emulated GPU has one coherent memory: nothing to order.
__device__ __forceinline__ void fence_proxy_async() {
#ifndef KONTEXT_EMU
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Makes mbarrier_init visible to the async proxy and the other threads of the cluster.
__device__ __forceinline__ void fence_mbarrier_init() {
#ifndef KONTEXT_EMU
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

// Bulk copy (TMA engine, no tensor map) of `bytes` (a multiple of 16) from global to shared
// memory, both 16-byte aligned; on arrival the bytes are counted off the barrier's tx-count.
// The twin copies at issue: the consumer's wait on the barrier is what orders it.
__device__ __forceinline__ void cp_async_bulk_g2s(void* smem_dst, const void* gmem_src,
                                                  unsigned bytes, unsigned long long* bar) {
#ifdef KONTEXT_EMU
    const char* op = "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes";
    if (bytes == 0 || bytes % 16 != 0) ptx_emu_failf(op, "size must be a nonzero multiple of 16", gmem_src);
    ptx_emu_aligned(smem_dst, 16, op);
    ptx_emu_aligned(gmem_src, 16, op);
    ptx_emu_shared(smem_dst, bytes, op);
    ptx_emu_global(gmem_src, bytes, op);
    ptx_emu_bar_load(bar, op);
    memcpy(smem_dst, gmem_src, bytes);
    ptx_emu_bar_arrive(bar, 0, -(long long)bytes, op);
#else
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::
            "r"(ptx_smem_u32(smem_dst)),
        "l"(gmem_src), "r"(bytes), "r"(ptx_smem_u32(bar))
        : "memory");
#endif
}
#endif  // sm_90+

// ================================================================================================
// wgmma (sm_90a): warpgroup-wide asynchronous tensor-core products, D (64×N f32, registers)
// = A (64×16, shared memory) · B (16×N, shared memory) (+ D). The 128 threads of a warpgroup (four
// consecutive warps, the first a multiple of 4) issue each instruction together, with equal
// operands. Order: wgmma_fence() → wgmma_m64nNk16_bf16_f32 (any number, chained on the same
// accumulators) → wgmma_commit_group() → wgmma_wait_group<N>() → wgmma_fence_operand(acc) → read,
// with wgmma_fence_operand(acc) also before the wgmma_fence. Keep a batch straight-line code
// (descriptors computed before the fence, no branch between the wgmmas): otherwise ptxas inserts
// fences of its own and says so (C7519/C7517 in the log, which the compile test refuses).
//
// Operands: A and B both K-major (A as M×K with K contiguous, B as N×K: "transpose" bits 0), each
// described by a 64-bit matrix descriptor (wgmma_desc) of its 16 K-columns:
//   bits 0–13 start address >> 4 · 16–29 leading-dimension byte offset (LBO) >> 4 ·
//   32–45 stride-dimension byte offset (SBO) >> 4 · 49–51 base offset (0) · 62–63 swizzle
//   (0 none, 1 128B, 2 64B, 3 32B).
// Canonical K-major layouts, element (row r of M or N, column k of the 16), bf16:
//   no swizzle: core matrices of 8 rows × 16 bytes, stored contiguously (128 bytes);
//     byte = start + (r/8)·SBO + (k/8)·LBO + (r%8)·16 + (k%8)·2
//     (SBO: between 8-row groups; LBO: between the two core matrices along K).
//   swizzle S = 32/64/128 bytes: atoms of 8 rows × S bytes (rows S bytes apart); LBO unused;
//     byte = swz(start + (r/8)·SBO + (r%8)·S + k·2), where swz XORs the 16-byte chunk bits of the
//     shared address (4 and up, 1/2/3 bits for S = 32/64/128) with bits 7 and up: the pattern
//     repeats every 8·S bytes of the address, so atoms sit at multiples of 8·S (1024 for 128B) and
//     a later K-slice inside an atom row is the same descriptor with start + 32·slice bytes.
// D fragment (thread l of warp w of the warpgroup, g = l/4, t = l%4): d[4i + j] is row
//   16w + g + 8·(j/2), column 8i + 2t + (j%2), for i = 0 … N/8 − 1.
// scale_d = 0: D = A·B (the accumulators' old values ignored); 1: D = A·B + D.
//
// Twin: the products are computed when the instruction is issued, from shared memory as it is
// then (a correct kernel does not write the operands until the wait), the f32 sums as for
// mma.sync; the accumulators read NaN until the wgmma_wait_group that retires the result, so a
// read before the wait shows. It stops the launch for a descriptor outside dynamic shared memory,
// a nonzero base offset (not emulated), operands that differ across the warpgroup, or a first
// wgmma of a thread without a wgmma_fence before it.
// ================================================================================================

#ifdef PTX_HAS_WGMMA

enum WgmmaSwizzle {
    WGMMA_SWIZZLE_NONE = 0,
    WGMMA_SWIZZLE_32B = 32,
    WGMMA_SWIZZLE_64B = 64,
    WGMMA_SWIZZLE_128B = 128,
};

#ifdef KONTEXT_EMU
// The 32-bit shared address of p: its offset in the block's dynamic shared memory window.
static inline unsigned ptx_emu_window(const void* p, size_t bytes, const char* op) {
    const EmuThread* self = __emu_rt->current();
    const uintptr_t base = reinterpret_cast<uintptr_t>(self->dyn_smem);
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (!self->dyn_smem || a < base || a + bytes > base + self->dyn_smem_bytes)
        ptx_emu_failf(op,
                      "the operand is not in the block's dynamic shared memory (extern "
                      "__shared__): the emulated GPU has no shared address for static __shared__ "
                      "arrays, and Hopper kernels keep wgmma and TMA operands in dynamic shared "
                      "memory",
                      p);
    return (unsigned)(a - base);
}

// The swizzle of a shared address for a span of `span` bytes (0: none).
static inline unsigned ptx_emu_swizzle(unsigned addr, unsigned span) {
    if (span == 0) return addr;
    const unsigned bits = span / 16 - 1;  // 1, 3, 7
    return addr ^ (((addr >> 7) & bits) << 4);
}

struct PtxEmuDesc {
    unsigned start, lbo, sbo, span;
};

static inline PtxEmuDesc ptx_emu_desc(unsigned long long d, const char* op) {
    if ((d >> 49) & 7u)
        ptx_emu_failf(op, "a descriptor with a nonzero base offset (bits 49–51) is not emulated",
                      (const void*)(uintptr_t)d);
    static const unsigned spans[4] = {0, 128, 64, 32};
    PtxEmuDesc s;
    s.start = (unsigned)(d & 0x3FFFu) << 4;
    s.lbo = (unsigned)((d >> 16) & 0x3FFFu) << 4;
    s.sbo = (unsigned)((d >> 32) & 0x3FFFu) << 4;
    s.span = spans[d >> 62];
    return s;
}

// Element (row r, column k) of a K-major bf16 operand.
static inline float ptx_emu_wgmma_elem(const PtxEmuDesc& s, unsigned r, unsigned k,
                                       const char* op, const char* which) {
    unsigned addr;
    if (s.span == 0)
        addr = s.start + (r / 8) * s.sbo + (k / 8) * s.lbo + (r % 8) * 16 + (k % 8) * 2;
    else
        addr = ptx_emu_swizzle(s.start + (r / 8) * s.sbo + (r % 8) * s.span + k * 2, s.span);
    const EmuThread* self = __emu_rt->current();
    if ((size_t)addr + 2 > self->dyn_smem_bytes) {
        char what[200];
        snprintf(what, sizeof what,
                 "%s: element (%u, %u) at shared address %u lies past the block's %zu bytes of "
                 "dynamic shared memory",
                 which, r, k, addr, self->dyn_smem_bytes);
        ptx_emu_failf(op, what, (const char*)self->dyn_smem + addr);
    }
    uint16_t v;
    memcpy(&v, static_cast<const unsigned char*>(self->dyn_smem) + addr, 2);
    return emu_bf16_to_f32(v);
}

// `a_regs`: null for A from shared memory (desc_a), else this thread's four registers of the A
// fragment (wgmma with A in registers; desc_a unused).
static inline void ptx_emu_wgmma_bf16(float* d, unsigned n, unsigned long long desc_a,
                                      unsigned long long desc_b, int scale_d, const char* op,
                                      const unsigned* a_regs = nullptr) {
    EmuThread* self = __emu_rt->current();
    // A from registers: every thread's fragment, gathered before anything else (a collective of
    // the warpgroup, as the instruction itself is).
    struct AFrag {
        unsigned r[4];
    } a_mine = {{0, 0, 0, 0}}, a_all[128];
    if (a_regs) {
        for (int i = 0; i < 4; ++i) a_mine.r[i] = a_regs[i];
        __emu_rt->group_exchange(4, &a_mine, a_all, sizeof(AFrag));
    }
    PtxEmuWgmmaQueue* q = &ptx_emu_block()->wg[self->linear];
    if (!q->fenced)
        ptx_emu_failf(op, "no wgmma_fence (wgmma.fence) before this thread's first wgmma", d);
    const PtxEmuDesc a = a_regs ? PtxEmuDesc{0, 0, 0, 0} : ptx_emu_desc(desc_a, op);
    const PtxEmuDesc b = ptx_emu_desc(desc_b, op);
    const unsigned regs = n / 2;
    // C: a result still in flight for these accumulators (chained wgmmas), else their values.
    float c[128];
    unsigned prev = q->count;
    for (unsigned i = 0; i < q->count; ++i)
        if (q->items[i].d == d) prev = i;
    if (prev < q->count) {
        if (q->items[prev].n != regs)
            ptx_emu_failf(op, "accumulators chained across wgmmas of different shapes", d);
        memcpy(c, q->items[prev].v, regs * sizeof(float));
        q->items[prev] = q->items[--q->count];
    } else {
        memcpy(c, d, regs * sizeof(float));
    }
    const unsigned w = self->warp % 4, g = self->lane >> 2, t = self->lane & 3u;
    float arow[2][16], bcol[16];
    if (a_regs) {
        // The A fragment of mma.m16n8k16 per warp (rows 16w + …): register i/2 of lane 4g' + t'
        // holds row g' + 8·(i ∈ {2,3,6,7}), column 2t' + (i & 1) + 8·(i ≥ 4), low half first.
        for (unsigned tt = 0; tt < 4; ++tt) {
            const AFrag& f = a_all[32 * w + 4 * g + tt];
            for (unsigned i = 0; i < 8; ++i) {
                const unsigned r = f.r[i / 2];
                const unsigned h = (i & 2u) ? 1u : 0u, col = 2 * tt + (i & 1u) + (i >= 4 ? 8u : 0u);
                arow[h][col] = (i & 1u) ? ptx_emu_bf16_hi(r) : ptx_emu_bf16_lo(r);
            }
        }
    } else {
        for (unsigned h = 0; h < 2; ++h)
            for (unsigned k = 0; k < 16; ++k)
                arow[h][k] = ptx_emu_wgmma_elem(a, 16 * w + g + 8 * h, k, op, "A");
    }
    if (q->count == q->cap) {
        const unsigned cap = q->cap ? 2 * q->cap : 4;
        void* grown = realloc(q->items, cap * sizeof(PtxEmuWgmmaOp));
        if (!grown) ptx_emu_fail("wgmma: out of host memory");
        q->items = static_cast<PtxEmuWgmmaOp*>(grown);
        q->cap = cap;
    }
    PtxEmuWgmmaOp* o = &q->items[q->count++];
    o->d = d;
    o->n = regs;
    o->group = q->open_group;
    for (unsigned i = 0; i < n / 8; ++i)
        for (unsigned j = 0; j < 2; ++j) {
            for (unsigned k = 0; k < 16; ++k) bcol[k] = ptx_emu_wgmma_elem(b, 8 * i + 2 * t + j, k, op, "B");
            for (unsigned h = 0; h < 2; ++h) {
                const unsigned r = 4 * i + 2 * h + j;
                o->v[r] = ptx_emu_dot_acc(scale_d ? c[r] : 0.0f, arow[h], bcol, 16);
            }
        }
    for (unsigned i = 0; i < regs; ++i) d[i] = emu_bits_f32(0x7FC00000u);
    // Every thread has computed from the operands as they were at issue before any leaves.
    struct Uniform {
        unsigned long long a, b;
        int scale_d;
        unsigned n;
    } mine = {a_regs ? 0ull : desc_a, desc_b, scale_d != 0, n}, all[128];
    __emu_rt->group_exchange(4, &mine, all, sizeof(Uniform));
    for (unsigned i = 0; i < 128; ++i)
        if (all[i].a != mine.a || all[i].b != mine.b || all[i].scale_d != mine.scale_d ||
            all[i].n != mine.n) {
            char what[160];
            snprintf(what, sizeof what,
                     "thread %u of the warpgroup issues different descriptors, scale-d or shape "
                     "(every thread must issue the same)",
                     i);
            ptx_emu_failf(op, what, d);
        }
}

static inline void ptx_emu_wgmma_retire(unsigned pending) {
    PtxEmuWgmmaQueue* q = &ptx_emu_block()->wg[__emu_rt->current()->linear];
    unsigned kept = 0;
    for (unsigned i = 0; i < q->count; ++i) {
        const PtxEmuWgmmaOp& o = q->items[i];
        if ((unsigned long long)o.group + pending < q->open_group)
            memcpy(o.d, o.v, o.n * sizeof(float));
        else
            q->items[kept++] = o;
    }
    q->count = kept;
}
#endif

// The descriptor of a K-major operand at `smem` (16-byte aligned, in dynamic shared memory):
// lbo_bytes / sbo_bytes as above (multiples of 16 below 2^18), swizzle a WgmmaSwizzle.
__device__ __forceinline__ unsigned long long wgmma_desc(const void* smem, unsigned lbo_bytes,
                                                         unsigned sbo_bytes, int swizzle) {
#ifdef KONTEXT_EMU
    const char* op = "wgmma descriptor";
    ptx_emu_aligned(smem, 16, op);
    const unsigned addr = ptx_emu_window(smem, 16, op);
    if (lbo_bytes % 16 != 0 || lbo_bytes >= (1u << 18) || sbo_bytes % 16 != 0 ||
        sbo_bytes >= (1u << 18))
        ptx_emu_failf(op, "LBO and SBO must be multiples of 16 below 2^18 bytes", smem);
    if (swizzle != 0 && swizzle != 32 && swizzle != 64 && swizzle != 128)
        ptx_emu_failf(op, "swizzle must be WGMMA_SWIZZLE_NONE, _32B, _64B or _128B", smem);
#else
    const unsigned addr = ptx_smem_u32(smem);
#endif
    const unsigned long long mode = swizzle == 128 ? 1ull : swizzle == 64 ? 2ull : swizzle == 32 ? 3ull : 0ull;
    return (unsigned long long)((addr & 0x3FFFFu) >> 4) |
           ((unsigned long long)((lbo_bytes >> 4) & 0x3FFFu) << 16) |
           ((unsigned long long)((sbo_bytes >> 4) & 0x3FFFu) << 32) | (mode << 62);
}

// The shared-window address of `smem` (in dynamic shared memory): what a kernel checks when its
// swizzled tiles assume an alignment of the window (128B swizzle: 1024 bytes) that the compiler's
// placement of `extern __shared__` decides, not the source.
__device__ __forceinline__ unsigned shared_window_address(const void* smem) {
#ifdef KONTEXT_EMU
    return ptx_emu_window(smem, 1, "shared window address");
#else
    return ptx_smem_u32(smem);
#endif
}

// Orders this thread's earlier register and shared-memory accesses before the wgmmas that follow:
// before the first wgmma, and whenever the accumulators were touched since the last one.
__device__ __forceinline__ void wgmma_fence() {
#ifdef KONTEXT_EMU
    ptx_emu_block()->wg[__emu_rt->current()->linear].fenced = true;
#else
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

// Closes the group of this thread's wgmmas issued since the last commit.
__device__ __forceinline__ void wgmma_commit_group() {
#ifdef KONTEXT_EMU
    ptx_emu_block()->wg[__emu_rt->current()->linear].open_group++;
#else
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

// Waits until at most N of the most recent committed groups are in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait_group() {
    static_assert(N >= 0 && N <= 7, "wgmma.wait_group takes 0–7");
#ifdef KONTEXT_EMU
    ptx_emu_wgmma_retire((unsigned)N);
#else
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// Keeps the compiler from moving accesses of the accumulators across it (they are registers, so
// the wait's memory clobber does not order them): call after wgmma_wait_group, before reading.
template <int R>
__device__ __forceinline__ void wgmma_fence_operand(float (&d)[R]) {
#ifdef KONTEXT_EMU
    (void)d;
#else
#pragma unroll
    for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
#endif
}

// D (+)= A·B for m64nNk16, bf16 inputs, f32 accumulators; N = 64, 128 or 256 (N/2 registers).
template <int N>
__device__ __forceinline__ void wgmma_m64nNk16_bf16_f32(float (&d)[N / 2],
                                                        unsigned long long desc_a,
                                                        unsigned long long desc_b, int scale_d);

template <>
__device__ __forceinline__ void wgmma_m64nNk16_bf16_f32<64>(float (&d)[32],
                                                          unsigned long long desc_a,
                                                          unsigned long long desc_b, int scale_d) {
#ifdef KONTEXT_EMU
    ptx_emu_wgmma_bf16(d, 64, desc_a, desc_b, scale_d,
                       "wgmma.mma_async.m64n64k16.f32.bf16.bf16");
#else
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
#endif
}

template <>
__device__ __forceinline__ void wgmma_m64nNk16_bf16_f32<128>(float (&d)[64],
                                                          unsigned long long desc_a,
                                                          unsigned long long desc_b, int scale_d) {
#ifdef KONTEXT_EMU
    ptx_emu_wgmma_bf16(d, 128, desc_a, desc_b, scale_d,
                       "wgmma.mma_async.m64n128k16.f32.bf16.bf16");
#else
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
#endif
}

template <>
__device__ __forceinline__ void wgmma_m64nNk16_bf16_f32<256>(float (&d)[128],
                                                          unsigned long long desc_a,
                                                          unsigned long long desc_b, int scale_d) {
#ifdef KONTEXT_EMU
    ptx_emu_wgmma_bf16(d, 256, desc_a, desc_b, scale_d,
                       "wgmma.mma_async.m64n256k16.f32.bf16.bf16");
#else
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
        "}, %128, %129, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
          "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
          "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
          "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
#endif
}

// D (+)= A·B for m64n128k16 with A (64×16 bf16) from registers: each warp w of the warpgroup
// gives rows 16w … 16w + 15 in exactly the A fragment of mma_m16n8k16_bf16 (a[r] holds elements
// 2r, 2r+1: row g + 8·(element ∈ {2,3,6,7}), column 2t + (element & 1) + 8·(element ≥ 4)); PTX
// ISA "Register Fragments: wgmma .m64nNk16", matrix A. So the f32 D fragment of one wgmma,
// rounded in pairs, is the A fragment of the next: d[8j + 0,1] → a[0], d[8j + 2,3] → a[1],
// d[8j + 4,5] → a[2], d[8j + 6,7] → a[3] for the K-columns 16j … 16j + 15 of the first product's
// N. B from shared memory as above (K-major). The registers are read when the instruction is
// issued on the twin; on a GPU they must not change until the wait (keep them live).
__device__ __forceinline__ void wgmma_m64n128k16_bf16_f32_rs(float (&d)[64], const unsigned (&a)[4],
                                                             unsigned long long desc_b, int scale_d) {
#ifdef KONTEXT_EMU
    ptx_emu_wgmma_bf16(d, 128, 0, desc_b, scale_d, "wgmma.mma_async.m64n128k16.f32.bf16.bf16 (A in registers)", a);
#else
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));
#endif
}

#endif  // PTX_HAS_WGMMA

// ================================================================================================
// TMA tensor copies (sm_90+): a box of a tensor described by a CUtensorMap (cuTensorMapEncodeTiled,
// host side) from global to shared memory, tiled mode; the box's bytes are counted off the
// mbarrier's tx-count on arrival. Coordinates are elements, innermost dimension first (x is the
// column of a row-major matrix), signed: the box may hang off any edge.
// Shared layout: the box densely, innermost dimension contiguous (boxDim[0] × element bytes per
// row), then the map's swizzle applied to the shared address exactly as wgmma's (above): a
// 128B-swizzled box of 64 bf16 columns is a K-major wgmma operand with SBO = 1024.
// Out-of-bound elements are zero-filled (the map's OOB fill NONE) or NaN (NAN_REQUEST_ZERO_FMA).
//
// Twin: copies at issue, then completes the tx bytes (the consumer's mbarrier wait orders it).
// Refused: a map the emulated driver did not write, a rank other than the instruction's, a
// destination outside dynamic shared memory or not 128-byte aligned (the swizzle's repeat, 8 × its
// span, for swizzled maps), a source row outside device memory. Not emulated (refused too):
// interleaved maps, and swizzled boxes narrower than the swizzle span.
// ================================================================================================

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900

#ifdef KONTEXT_EMU
static inline void ptx_emu_tma_load(void* dst, const CUtensorMap* map, const int* coord, int rank,
                                    unsigned long long* bar, const char* op) {
    ptx_emu_aligned(map, 64, op);
    EmuTensorMap m;
    memcpy(&m, map, sizeof m);
    if (m.magic != EMU_TENSORMAP_MAGIC)
        ptx_emu_failf(op,
                      "the tensor map was not written by the emulated driver's "
                      "cuTensorMapEncodeTiled (uninitialised, or a real driver's)",
                      map);
    if (m.rank != rank) {
        char what[96];
        snprintf(what, sizeof what, "a %dd copy with a tensor map of rank %d", rank, m.rank);
        ptx_emu_failf(op, what, map);
    }
    if (m.interleave != EMU_TMAP_INTERLEAVE_NONE)
        ptx_emu_failf(op, "interleaved tensor maps are not emulated", map);
    static const unsigned spans[4] = {0, 32, 64, 128};
    const unsigned span = spans[m.swizzle & 3u];
    const unsigned eb = m.elem_bytes, inner = m.box[0] * eb;
    if (span && inner != span)
        ptx_emu_failf(op, "a swizzled box narrower than the swizzle span is not emulated", map);
    // Dimensions above 0 step by the element strides: ceil(box / stride) elements each.
    unsigned count[EMU_TENSORMAP_MAX_RANK] = {1, 1, 1, 1, 1};
    size_t rows = 1;
    for (int i = 1; i < rank; ++i) {
        count[i] = (m.box[i] + m.elem_stride[i] - 1) / m.elem_stride[i];
        rows *= count[i];
    }
    const size_t bytes = rows * inner;
    ptx_emu_aligned(dst, span ? 8 * span : 128, op);
    const unsigned base = ptx_emu_window(dst, bytes, op);
    ptx_emu_bar_load(bar, op);
    unsigned char* smem = static_cast<unsigned char*>(__emu_rt->current()->dyn_smem);
    unsigned long long fill = 0;
    if (m.oob_fill == EMU_TMAP_OOB_FILL_NAN_REQUEST_ZERO_FMA)
        fill = eb == 2 ? 0x7FFFull : eb == 4 ? 0x7FFFFFFFull : 0x7FFFFFFFFFFFFFFFull;
    unsigned idx[EMU_TENSORMAP_MAX_RANK] = {0, 0, 0, 0, 0};
    for (size_t row = 0; row < rows; ++row) {
        bool in = true;
        long long off = 0;
        for (int i = 1; i < rank; ++i) {
            const long long c = (long long)coord[i] + (long long)idx[i] * m.elem_stride[i];
            in = in && c >= 0 && c < (long long)m.dim[i];
            off += c * (long long)m.stride[i];
        }
        // The row's elements inside the tensor along dimension 0: [lo, hi).
        const long long x0 = coord[0];
        long long lo = x0 < 0 ? -x0 : 0, hi = (long long)m.dim[0] - x0;
        if (hi > (long long)m.box[0]) hi = m.box[0];
        if (!in || hi < lo) lo = hi = 0;
        const unsigned char* src = reinterpret_cast<const unsigned char*>(m.global) + off +
                                   (x0 + lo) * (long long)eb;
        if (hi > lo && !__emu_rt->is_device(src, (size_t)(hi - lo) * eb))
            ptx_emu_failf(op, "a row of the box lies outside device memory (the map's tensor is "
                              "larger than its allocation)", src);
        for (unsigned e = 0; e < m.box[0]; ++e) {
            const unsigned a = ptx_emu_swizzle(base + (unsigned)(row * inner) + e * eb, span);
            if ((long long)e >= lo && (long long)e < hi)
                memcpy(smem + a, src + (e - lo) * eb, eb);
            else
                memcpy(smem + a, &fill, eb);
        }
        for (int i = 1; i < rank; ++i) {
            if (++idx[i] < count[i]) break;
            idx[i] = 0;
        }
    }
    ptx_emu_bar_arrive(bar, 0, -(long long)bytes, op);
}
#endif

// The tensor map's generic address, as the instructions take it (param, const or global space).
#ifndef KONTEXT_EMU
__device__ __forceinline__ unsigned long long ptx_tmap_u64(const CUtensorMap* map) {
    return reinterpret_cast<unsigned long long>(map);
}
#endif

__device__ __forceinline__ void cp_async_bulk_tensor_1d_g2s(void* smem_dst, const CUtensorMap* map,
                                                            int x, unsigned long long* bar) {
#ifdef KONTEXT_EMU
    const int c[1] = {x};
    ptx_emu_tma_load(smem_dst, map, c, 1, bar, "cp.async.bulk.tensor.1d.shared::cluster.global");
#else
    asm volatile(
        "cp.async.bulk.tensor.1d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], "
        "[%1, {%2}], [%3];\n" ::"r"(ptx_smem_u32(smem_dst)),
        "l"(ptx_tmap_u64(map)), "r"(x), "r"(ptx_smem_u32(bar))
        : "memory");
#endif
}

__device__ __forceinline__ void cp_async_bulk_tensor_2d_g2s(void* smem_dst, const CUtensorMap* map,
                                                            int x, int y, unsigned long long* bar) {
#ifdef KONTEXT_EMU
    const int c[2] = {x, y};
    ptx_emu_tma_load(smem_dst, map, c, 2, bar, "cp.async.bulk.tensor.2d.shared::cluster.global");
#else
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], "
        "[%1, {%2, %3}], [%4];\n" ::"r"(ptx_smem_u32(smem_dst)),
        "l"(ptx_tmap_u64(map)), "r"(x), "r"(y), "r"(ptx_smem_u32(bar))
        : "memory");
#endif
}

__device__ __forceinline__ void cp_async_bulk_tensor_3d_g2s(void* smem_dst, const CUtensorMap* map,
                                                            int x, int y, int z,
                                                            unsigned long long* bar) {
#ifdef KONTEXT_EMU
    const int c[3] = {x, y, z};
    ptx_emu_tma_load(smem_dst, map, c, 3, bar, "cp.async.bulk.tensor.3d.shared::cluster.global");
#else
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], "
        "[%1, {%2, %3, %4}], [%5];\n" ::"r"(ptx_smem_u32(smem_dst)),
        "l"(ptx_tmap_u64(map)), "r"(x), "r"(y), "r"(z), "r"(ptx_smem_u32(bar))
        : "memory");
#endif
}

// Brings the tensor map into the cache ahead of its first copy.
__device__ __forceinline__ void prefetch_tensormap(const CUtensorMap* map) {
#ifdef KONTEXT_EMU
    ptx_emu_aligned(map, 64, "prefetch.tensormap");
#else
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(ptx_tmap_u64(map)) : "memory");
#endif
}

// Makes a tensor map that was written in global memory by generic stores (after the launch
// began) visible to the copies that follow. A map passed as a __grid_constant__ parameter or
// copied in before the launch needs none. The emulated GPU has one coherent memory.
__device__ __forceinline__ void fence_proxy_tensormap(const CUtensorMap* map) {
#ifdef KONTEXT_EMU
    (void)map;
#else
    asm volatile("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;\n" ::"l"(
                     ptx_tmap_u64(map))
                 : "memory");
#endif
}

#endif  // sm_90+

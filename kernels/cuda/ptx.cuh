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
// Layout sources: PTX ISA 9.x, sections "Matrix Fragments for mma.m16n8k16 with floating point
// type", "Matrix Fragments for mma.m16n8k32" (8-bit types), "Warp-level matrix load instruction:
// ldmatrix", "Data Movement and Conversion Instructions: cp.async", "Parallel Synchronization and
// Communication Instructions: mbarrier" (phase, pending arrival count, tx-count).
#pragma once

#ifdef KONTEXT_EMU
#include <stdlib.h>

#include "emu/numerics.h"

// ---- twin support ------------------------------------------------------------------------------

[[noreturn]] static inline void ptx_emu_fail(const char* what) {
    __emu_rt->fail(what);
    __builtin_unreachable();
}

[[noreturn]] static inline void ptx_emu_failf(const char* op, const char* what, const void* p) {
    char buf[256];
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
struct PtxEmuBlock {
    EmuDim3 block;
    PtxEmuCopyQueue q[1024];
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
            PtxEmuBlock* t = static_cast<PtxEmuBlock*>(calloc(1, sizeof(PtxEmuBlock)));
            if (!t) ptx_emu_fail("cp.async: out of host memory");
            ptx_emu_registry[i].table = t;  // the slot is read only by the thread that owns key
            const void* expected = nullptr;
            if (__atomic_compare_exchange_n(&ptx_emu_registry[i].key, &expected, key, false,
                                            __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                return t;
            free(t);  // another worker took the slot first: look further
        }
    }
    ptx_emu_fail("cp.async: more worker threads than the twin's registry holds");
}

static inline PtxEmuCopyQueue* ptx_emu_copy_queue() {
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
        b->block = bi;
        ptx_emu_tls.table = b;
        ptx_emu_tls.mark = PTX_EMU_MARK;
    }
    return &b->q[self->linear];
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

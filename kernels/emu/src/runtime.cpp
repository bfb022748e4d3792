// runtime.cpp: how the emulated GPU runs a grid — blocks on worker threads, the threads of a
// block as fibers, barriers and warp collectives as rendezvous between fibers, and every way a
// kernel can go wrong turned into an error that names the kernel instead of a hang or a crash.
//
// Scheduling: a fiber runs until it reaches a barrier, a warp collective or its end, then the
// next runnable fiber runs. A collective completes when the last lane its mask names arrives; a
// barrier opens when no fiber can run and every live one waits at it. When no fiber can run and
// the barrier cannot open, the block is stuck: on a GPU it would hang (or, for a barrier some
// threads skipped, go wrong quietly); here the launch fails and says who waits where.
//
// Orders: blocks and, between synchronisation points, fibers run in index order, reversed, or a
// seeded shuffle (KONTEXT_EMU_ORDER). A kernel whose results depend on the order has a race; the
// race check (KONTEXT_EMU_RACECHECK=1, driver.cpp) runs every launch under two orders and
// compares.
#include <dlfcn.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "emu.h"

namespace emu {

namespace {

constexpr size_t STACK_BYTES = 256 << 10;  // per fiber; MAP_NORESERVE, only touched pages count
constexpr int MAX_THREADS = 1024;
constexpr int EXCHANGE = 1000;  // collective kind of the fragment exchange (not in abi.h)
constexpr int GROUP_EXCHANGE = 1001;
constexpr size_t SHARED_WINDOW = 256 << 10;  // more than any device's shared memory per block

enum State { RUNNABLE, AT_BARRIER, AT_COLLECTIVE, EXITED };

struct Fiber {
    void* sp = nullptr;
    char* stack_top = nullptr;
    EmuThread t{};
    State state = EXITED;
    // barrier
    int bar_kind = 0, bar_pred = 0, bar_result = 0;
    // collective
    int c_kind = 0;
    unsigned c_mask = 0;
    uint64_t c_value = 0, c_result = 0;
    int c_arg = 0, c_width = 32;
    const void* x_mine = nullptr;
    void* x_all = nullptr;
    size_t x_bytes = 0;
};

struct Worker;

struct Warp {
    unsigned arrived = 0;  // lanes waiting at a collective
    unsigned exited = 0;
};

struct Fault {
    int code = CUDA_SUCCESS;
    std::string what;
};

struct Worker {
    void* sched_sp = nullptr;
    Fiber* fibers = nullptr;  // MAX_THREADS
    Warp warps[MAX_THREADS / 32];
    char* stacks = nullptr;
    Fiber* cur = nullptr;
    int nthreads = 0;
    const Launch* launch = nullptr;
    EmuDim3 block_idx{};
    sigjmp_buf jmp;
    bool in_block = false;
    Fault fault;
    char* window = nullptr;  // the mapping the shared window lies in (twice its size)
    char* dyn = nullptr;  // dynamic shared memory: the base of a 256 KiB-aligned window
    size_t dyn_cap = 0;   // bytes of it accessible now
    std::vector<int> order;
    uint64_t rng = 1;
    bool yielded = false;
    char* altstack = nullptr;

    Worker() {
        fibers = new Fiber[MAX_THREADS];
        const size_t pg = (size_t)sysconf(_SC_PAGESIZE);
        // Stacks with a guard page below each (a fiber that overflows faults, named as such).
        const size_t slot = STACK_BYTES + pg;
        stacks = static_cast<char*>(mmap(nullptr, slot * MAX_THREADS, PROT_READ | PROT_WRITE,
                                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
        if (stacks == MAP_FAILED) {
            fprintf(stderr, "kontext-emu: cannot map fiber stacks\n");
            abort();
        }
        for (int i = 0; i < MAX_THREADS; ++i) {
            char* s = stacks + slot * i;
            mprotect(s, pg, PROT_NONE);
            // Staggered tops: stacks at the same offset of equal-sized slots alias in the cache,
            // and a block of 1,024 fibers switching through them gets several times slower.
            fibers[i].stack_top = s + slot - 64 * (i % 61);
        }
        altstack = static_cast<char*>(malloc(64 << 10));
        stack_t ss{};
        ss.ss_sp = altstack;
        ss.ss_size = 64 << 10;
        sigaltstack(&ss, nullptr);
    }
};

// Initial-exec: a pointer fits the static TLS that glibc reserves for dlopen'd libraries, and it
// is read at every device call (the modules' large shared arrays must stay general-dynamic).
__attribute__((tls_model("initial-exec"))) thread_local Worker* tl_worker = nullptr;

// Frees a thread's worker when the thread ends (each Rust test runs on a thread of its own):
// the fiber stacks, the shared window and the signal stack would otherwise outlive it.
struct WorkerOwner {
    ~WorkerOwner() {
        Worker* w = tl_worker;
        if (!w) return;
        tl_worker = nullptr;
        stack_t off{};
        off.ss_flags = SS_DISABLE;
        sigaltstack(&off, nullptr);
        const size_t pg = (size_t)sysconf(_SC_PAGESIZE);
        munmap(w->stacks, (STACK_BYTES + pg) * MAX_THREADS);
        if (w->window) munmap(w->window, 2 * SHARED_WINDOW);
        free(w->altstack);
        delete[] w->fibers;
        delete w;
    }
};
thread_local WorkerOwner tl_owner;

Worker* worker() {
    if (!tl_worker) {
        tl_worker = new Worker();
        (void)&tl_owner;  // odr-use: registers the owner's destructor for this thread
    }
    return tl_worker;
}

std::string where(const Worker* w, const Fiber* f) {
    char buf[256];
    const Launch& l = *w->launch;
    snprintf(buf, sizeof buf, "kernel %s <<<(%u,%u,%u), (%u,%u,%u), %zu>>> block (%u,%u,%u)",
             l.f->kernel->name, l.grid.x, l.grid.y, l.grid.z, l.block.x, l.block.y, l.block.z,
             l.dyn_smem, w->block_idx.x, w->block_idx.y, w->block_idx.z);
    std::string s = buf;
    if (f) {
        snprintf(buf, sizeof buf, " thread (%u,%u,%u)", f->t.thread_idx.x, f->t.thread_idx.y,
                 f->t.thread_idx.z);
        s += buf;
    }
    return s;
}

[[noreturn]] void fail_block(Worker* w, int code, const std::string& what) {
    w->fault.code = code;
    w->fault.what = what;
    siglongjmp(w->jmp, 1);
}

// ---- fibers ------------------------------------------------------------------------------------

void on_exit(Worker* w, Fiber* f);

void fiber_main(void* arg) {
    Fiber* f = static_cast<Fiber*>(arg);
    Worker* w = tl_worker;
    w->launch->f->kernel->entry(w->launch->params);
    f->state = EXITED;
    on_exit(w, f);
    emu_switch(&f->sp, w->sched_sp);
    __builtin_unreachable();
}

// The calling fiber waits; returns when it is resumed. Control goes straight to the next
// runnable lane of the same warp in the launch's order (a warp collective's lanes arrive one
// after another without a trip through the scheduler: half the switches), else back to the
// scheduler. Shuffled orders always go through the scheduler, which picks at random.
void park(Worker* w) {
    Fiber* f = w->cur;
    const int order = w->launch->order;
    if (order != ORDER_SHUFFLE) {
        const int base = (int)f->t.warp * 32;
        const int n = std::min(32, w->nthreads - base);
        const int lane = (int)f->t.lane;
        for (int k = 1; k < n; ++k) {
            const int l = order == ORDER_FORWARD ? (lane + k) % n : (lane - k + n) % n;
            Fiber* g = &w->fibers[base + l];
            if (g->state == RUNNABLE) {
                w->cur = g;
                emu_switch(&f->sp, g->sp);
                return;
            }
        }
    }
    emu_switch(&f->sp, w->sched_sp);
}

uint64_t next_rand(uint64_t* s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

void shuffle(std::vector<int>* v, uint64_t* s) {
    for (size_t i = v->size(); i > 1; --i) std::swap((*v)[i - 1], (*v)[next_rand(s) % i]);
}

// ---- collectives -------------------------------------------------------------------------------

const char* collective_name(int kind) {
    switch (kind) {
        case EMU_SHFL_IDX: return "__shfl_sync";
        case EMU_SHFL_UP: return "__shfl_up_sync";
        case EMU_SHFL_DOWN: return "__shfl_down_sync";
        case EMU_SHFL_XOR: return "__shfl_xor_sync";
        case EMU_VOTE_BALLOT: return "__ballot_sync";
        case EMU_VOTE_ALL: return "__all_sync";
        case EMU_VOTE_ANY: return "__any_sync";
        case EMU_SYNCWARP: return "__syncwarp";
        case EMU_MATCH_ANY: return "__match_any_sync";
        case EMU_REDUCE_ADD: return "__reduce_add_sync";
        case EMU_REDUCE_MIN: return "__reduce_min_sync";
        case EMU_REDUCE_MAX: return "__reduce_max_sync";
        case EXCHANGE: return "a warp fragment exchange (PTX twin)";
        case GROUP_EXCHANGE: return "a warpgroup fragment exchange (PTX twin)";
        default: return "an unknown collective";
    }
}

// Computes the results of a complete collective among `lanes` (fibers of one warp, indexed by
// lane, null where the mask does not name it).
void complete(Fiber* const* lanes, int kind, unsigned mask) {
    switch (kind) {
        case EMU_SHFL_IDX:
        case EMU_SHFL_UP:
        case EMU_SHFL_DOWN:
        case EMU_SHFL_XOR:
            for (int l = 0; l < 32; ++l) {
                Fiber* f = lanes[l];
                if (!f) continue;
                const int width = f->c_width;
                const int seg = l & ~(width - 1);
                int src = l;
                if (kind == EMU_SHFL_IDX) src = seg + (f->c_arg & (width - 1));
                if (kind == EMU_SHFL_UP) src = (l - seg) >= f->c_arg ? l - f->c_arg : l;
                if (kind == EMU_SHFL_DOWN) src = (l - seg) + f->c_arg < width ? l + f->c_arg : l;
                if (kind == EMU_SHFL_XOR) {
                    src = l ^ f->c_arg;
                    if (src < seg || src >= seg + width) src = l;
                }
                // Reading a lane outside the mask is undefined on a GPU: refuse it.
                if (!((mask >> src) & 1u)) {
                    Worker* w = tl_worker;
                    char buf[200];
                    snprintf(buf, sizeof buf,
                             ": %s reads lane %d, which its mask 0x%08x does not name",
                             collective_name(kind), src, mask);
                    fail_block(w, CUDA_ERROR_LAUNCH_FAILED, where(w, f) + buf);
                }
                f->c_result = lanes[src]->c_value;
            }
            break;
        case EMU_VOTE_BALLOT:
        case EMU_VOTE_ALL:
        case EMU_VOTE_ANY: {
            unsigned ballot = 0;
            for (int l = 0; l < 32; ++l)
                if (lanes[l] && lanes[l]->c_value) ballot |= 1u << l;
            const uint64_t r = kind == EMU_VOTE_BALLOT ? ballot
                               : kind == EMU_VOTE_ALL  ? (ballot == mask)
                                                       : (ballot != 0);
            for (int l = 0; l < 32; ++l)
                if (lanes[l]) lanes[l]->c_result = r;
            break;
        }
        case EMU_SYNCWARP:
            break;
        case EMU_MATCH_ANY:
            for (int l = 0; l < 32; ++l) {
                if (!lanes[l]) continue;
                unsigned m = 0;
                for (int o = 0; o < 32; ++o)
                    if (lanes[o] && lanes[o]->c_value == lanes[l]->c_value) m |= 1u << o;
                lanes[l]->c_result = m;
            }
            break;
        case EMU_REDUCE_ADD:
        case EMU_REDUCE_MIN:
        case EMU_REDUCE_MAX: {
            uint32_t r = kind == EMU_REDUCE_MIN ? 0xFFFFFFFFu : 0;
            for (int l = 0; l < 32; ++l) {
                if (!lanes[l]) continue;
                const uint32_t v = (uint32_t)lanes[l]->c_value;
                r = kind == EMU_REDUCE_ADD ? r + v : kind == EMU_REDUCE_MIN ? std::min(r, v)
                                                                            : std::max(r, v);
            }
            for (int l = 0; l < 32; ++l)
                if (lanes[l]) lanes[l]->c_result = r;
            break;
        }
        case EXCHANGE:
            for (int l = 0; l < 32; ++l) {
                if (!lanes[l]) continue;
                char* all = static_cast<char*>(lanes[l]->x_all);
                for (int o = 0; o < 32; ++o)
                    if (lanes[o])
                        memcpy(all + o * lanes[l]->x_bytes, lanes[o]->x_mine, lanes[l]->x_bytes);
            }
            break;
    }
}

// The calling fiber arrives at a warp collective; returns once it completes. Arrivals are kept
// as a bit mask per warp, so an arrival costs O(1) and the completing one O(32).
void arrive(Worker* w, int kind, unsigned mask) {
    Fiber* f = w->cur;
    const unsigned lane = f->t.lane;
    const unsigned bit = 1u << lane;
    char buf[320];
    if (!(mask & bit)) {
        snprintf(buf, sizeof buf, ": %s with mask 0x%08x, which does not name the calling lane %u",
                 collective_name(kind), mask, lane);
        fail_block(w, CUDA_ERROR_LAUNCH_FAILED, where(w, f) + buf);
    }
    const int base = (int)(f->t.warp * 32);
    const int in_warp = std::min(32, w->nthreads - base);
    const unsigned exists = in_warp == 32 ? 0xFFFFFFFFu : (1u << in_warp) - 1;
    if (mask & ~exists) {
        snprintf(buf, sizeof buf,
                 ": %s with mask 0x%08x names lane %d, which does not exist (the block has %d "
                 "threads)",
                 collective_name(kind), mask, __builtin_ctz(mask & ~exists), w->nthreads);
        fail_block(w, CUDA_ERROR_LAUNCH_FAILED, where(w, f) + buf);
    }
    Warp& ws = w->warps[f->t.warp];
    if (mask & ws.exited) {
        snprintf(buf, sizeof buf, ": %s with mask 0x%08x names lane %d, which has already exited",
                 collective_name(kind), mask, __builtin_ctz(mask & ws.exited));
        fail_block(w, CUDA_ERROR_LAUNCH_FAILED, where(w, f) + buf);
    }
    if (const unsigned pending = ws.arrived & mask) {
        const int l = __builtin_ctz(pending);
        const Fiber* g = &w->fibers[base + l];
        if (g->c_kind != kind || g->c_mask != mask) {
            snprintf(buf, sizeof buf,
                     ": lane %u reached %s (mask 0x%08x) while lane %d waits at %s (mask "
                     "0x%08x): the lanes of a warp disagree on the collective",
                     lane, collective_name(kind), mask, l, collective_name(g->c_kind), g->c_mask);
            fail_block(w, CUDA_ERROR_LAUNCH_FAILED, where(w, f) + buf);
        }
    }
    f->state = AT_COLLECTIVE;
    f->c_kind = kind;
    f->c_mask = mask;
    ws.arrived |= bit;
    if ((ws.arrived & mask) != mask) {
        park(w);
        return;
    }
    Fiber* lanes[32] = {};
    for (unsigned m = mask; m; m &= m - 1) lanes[__builtin_ctz(m)] = &w->fibers[base + __builtin_ctz(m)];
    complete(lanes, kind, mask);
    ws.arrived &= ~mask;
    for (unsigned m = mask; m; m &= m - 1) lanes[__builtin_ctz(m)]->state = RUNNABLE;
}

// A fiber's kernel returned: lanes waiting for it at a warp collective can never complete.
void on_exit(Worker* w, Fiber* f) {
    Warp& ws = w->warps[f->t.warp];
    const unsigned bit = 1u << f->t.lane;
    ws.exited |= bit;
    for (unsigned m = ws.arrived; m; m &= m - 1) {
        const Fiber* g = &w->fibers[f->t.warp * 32 + __builtin_ctz(m)];
        if (g->c_mask & bit) {
            char buf[200];
            snprintf(buf, sizeof buf,
                     ": lane %u exited while lane %u waits for it at %s (mask 0x%08x)",
                     f->t.lane, g->t.lane, collective_name(g->c_kind), g->c_mask);
            fail_block(w, CUDA_ERROR_LAUNCH_FAILED, where(w, g) + buf);
        }
    }
}

// ---- the runtime table -------------------------------------------------------------------------

EmuThread* rt_current() { return &tl_worker->cur->t; }

int rt_barrier(int kind, int pred) {
    Worker* w = tl_worker;
    Fiber* f = w->cur;
    f->state = AT_BARRIER;
    f->bar_kind = kind;
    f->bar_pred = pred != 0;
    park(w);
    return f->bar_result;
}

uint64_t rt_collective(int kind, unsigned mask, uint64_t value, int arg, int width) {
    Worker* w = tl_worker;
    Fiber* f = w->cur;
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
        char buf[120];
        snprintf(buf, sizeof buf, ": %s with width %d (a power of two ≤ 32 is required)",
                 collective_name(kind), width);
        fail_block(w, CUDA_ERROR_LAUNCH_FAILED, where(w, f) + buf);
    }
    f->c_value = value;
    f->c_arg = arg;
    f->c_width = width;
    arrive(w, kind, mask);
    return f->c_result;
}

void rt_exchange(unsigned mask, const void* mine, void* all, size_t bytes) {
    Worker* w = tl_worker;
    Fiber* f = w->cur;
    f->x_mine = mine;
    f->x_all = all;
    f->x_bytes = bytes;
    arrive(w, EXCHANGE, mask);
}

void rt_group_exchange(int group, const void* mine, void* all, size_t bytes) {
    Worker* w = tl_worker;
    Fiber* f = w->cur;
    if (group <= 0 || group > 32 || w->nthreads % (32 * group) != 0) {
        char buf[160];
        snprintf(buf, sizeof buf,
                 ": a %d-warp group collective in a block of %d threads (not a multiple of the "
                 "group)",
                 group, w->nthreads);
        fail_block(w, CUDA_ERROR_LAUNCH_FAILED, where(w, f) + buf);
    }
    f->x_mine = mine;
    f->x_all = all;
    f->x_bytes = bytes;
    f->c_kind = GROUP_EXCHANGE;
    f->c_mask = (unsigned)group;
    f->state = AT_COLLECTIVE;
    const int n = 32 * group;
    const int first = (int)(f->t.linear / n) * n;
    for (int i = first; i < first + n; ++i) {
        Fiber* g = &w->fibers[i];
        if (g->state == EXITED) {
            char buf[160];
            snprintf(buf, sizeof buf, ": %s waits for thread %d, which has already exited",
                     collective_name(GROUP_EXCHANGE), i);
            fail_block(w, CUDA_ERROR_LAUNCH_FAILED, where(w, f) + buf);
        }
        // Not there yet, or still at a warp collective of its own (another warp of the group
        // may reach the group's instruction while this one waits for its lanes at a shuffle,
        // as warps of a warpgroup do on a GPU): wait for it. A wait that never ends is stuck().
        if (g->state != AT_COLLECTIVE || g->c_kind != GROUP_EXCHANGE) {
            park(w);
            return;
        }
        if (g->c_mask != (unsigned)group) {
            char buf[200];
            snprintf(buf, sizeof buf, ": thread %d waits at %s while its group exchanges", i,
                     collective_name(g->c_kind));
            fail_block(w, CUDA_ERROR_LAUNCH_FAILED, where(w, f) + buf);
        }
    }
    for (int i = first; i < first + n; ++i) {
        Fiber* g = &w->fibers[i];
        char* out = static_cast<char*>(g->x_all);
        for (int o = first; o < first + n; ++o)
            memcpy(out + (o - first) * g->x_bytes, w->fibers[o].x_mine, g->x_bytes);
        g->state = RUNNABLE;
    }
}

[[noreturn]] void rt_fail(const char* what) {
    Worker* w = tl_worker;
    const bool assertion = strncmp(what, "device assertion", 16) == 0 || strstr(what, "__trap");
    fail_block(w, assertion ? CUDA_ERROR_ASSERT : CUDA_ERROR_LAUNCH_FAILED,
               where(w, w->cur) + ": " + what);
}

int rt_is_device(const void* p, size_t bytes) {
    return mem_find(reinterpret_cast<uintptr_t>(p), bytes, nullptr) ? 1 : 0;
}

// A spin-wait gives way to the whole block (the scheduler), not only to its warp: the fiber it
// waits for may be in another warp.
void rt_yield() {
    Worker* w = tl_worker;
    w->yielded = true;
    emu_switch(&w->cur->sp, w->sched_sp);
}

const EmuRuntime TABLE = {
    EMU_ABI_VERSION, rt_current, rt_barrier, rt_collective, rt_exchange, rt_group_exchange,
    rt_fail, rt_is_device, rt_yield,
};

// ---- faults ------------------------------------------------------------------------------------

struct sigaction old_actions[32];

void on_fault(int sig, siginfo_t* info, void* uctx) {
    Worker* w = tl_worker;
    if (!w || !w->in_block) {
        // Not ours: let the previous handler (or the default action) have it.
        sigaction(sig, &old_actions[sig], nullptr);
        (void)uctx;
        return;
    }
    const uintptr_t addr = reinterpret_cast<uintptr_t>(info->si_addr);
    char buf[400];
    int code = CUDA_ERROR_ILLEGAL_ADDRESS;
    Allocation a;
    const Fiber* f = w->cur;
    const uintptr_t stack_lo = reinterpret_cast<uintptr_t>(w->stacks);
    const uintptr_t stack_hi =
        stack_lo + (STACK_BYTES + (size_t)sysconf(_SC_PAGESIZE)) * MAX_THREADS;
    if (sig == SIGILL) {
        code = CUDA_ERROR_MISALIGNED_ADDRESS;
        snprintf(buf, sizeof buf,
                 ": misaligned address (a vector or typed access through a pointer not aligned "
                 "to its type: the alignment check trapped)");
    } else if (sig == SIGFPE) {
        code = CUDA_ERROR_ILLEGAL_INSTRUCTION;
        snprintf(buf, sizeof buf, ": arithmetic fault (integer division by zero?)");
    } else if (addr >= stack_lo && addr < stack_hi) {
        code = CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES;
        snprintf(buf, sizeof buf, ": thread stack overflow (%zu KiB of local memory per thread)",
                 STACK_BYTES >> 10);
    } else if (mem_guard_hit(addr, &a)) {
        if (addr >= a.base)
            snprintf(buf, sizeof buf,
                     ": out-of-bounds access at 0x%lx, %lu bytes past the end of the %zu-byte "
                     "allocation at 0x%lx",
                     (unsigned long)addr, (unsigned long)(addr - a.base - a.bytes), a.bytes,
                     (unsigned long)a.base);
        else
            snprintf(buf, sizeof buf,
                     ": out-of-bounds access at 0x%lx, %lu bytes before the %zu-byte allocation "
                     "at 0x%lx",
                     (unsigned long)addr, (unsigned long)(a.base - addr), a.bytes,
                     (unsigned long)a.base);
    } else if (w->dyn && addr >= (uintptr_t)w->dyn && addr < (uintptr_t)w->dyn + SHARED_WINDOW) {
        snprintf(buf, sizeof buf,
                 ": out-of-bounds access at 0x%lx past the end of the block's %zu bytes of dynamic "
                 "shared memory",
                 (unsigned long)addr, w->launch->dyn_smem);
    } else {
        snprintf(buf, sizeof buf, ": illegal address 0x%lx (not device memory)",
                 (unsigned long)addr);
    }
    w->fault.code = code;
    w->fault.what = where(w, f) + buf;
    siglongjmp(w->jmp, 1);
}

void install_handlers() {
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa {};
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        for (int s : {SIGSEGV, SIGBUS, SIGILL, SIGFPE}) sigaction(s, &sa, &old_actions[s]);
    });
}

// ---- blocks ------------------------------------------------------------------------------------

// Static shared memory: the module's thread-local block on this worker, poisoned before each
// block so that a read of shared memory nobody wrote is seen in the results.
void poison_static_smem(const Module* m) {
    if (m->tls_bytes == 0) return;
    m->tls_touch();
    void* tls = nullptr;
    if (dlinfo(m->handle, RTLD_DI_TLS_DATA, &tls) != 0 || !tls) return;
    memset(tls, 0xFF, m->tls_bytes);
}

bool release_barrier(Worker* w) {
    int count = 0, waiting = 0, live = 0;
    for (int i = 0; i < w->nthreads; ++i) {
        Fiber& f = w->fibers[i];
        if (f.state == EXITED) continue;
        ++live;
        if (f.state == AT_BARRIER) {
            ++waiting;
            count += f.bar_pred;
        }
    }
    if (live == 0 || waiting != live) return false;
    // Threads that exited before the barrier: a GPU would wait for them (or count them as
    // arrived on some parts): the code is wrong either way.
    if (live != w->nthreads) return false;
    for (int i = 0; i < w->nthreads; ++i) {
        Fiber& f = w->fibers[i];
        const int k = f.bar_kind;
        f.bar_result = k == EMU_BAR_COUNT ? count
                       : k == EMU_BAR_AND ? (count == live)
                       : k == EMU_BAR_OR  ? (count > 0)
                                          : 0;
        f.state = RUNNABLE;
    }
    return true;
}

[[noreturn]] void stuck(Worker* w) {
    std::string s = where(w, nullptr) + ": the block cannot go on (a GPU would hang):";
    int shown = 0, exited = 0, at_bar = 0;
    for (int i = 0; i < w->nthreads; ++i) {
        const Fiber& f = w->fibers[i];
        if (f.state == EXITED) {
            ++exited;
            continue;
        }
        if (f.state == AT_BARRIER) ++at_bar;
        if (shown < 6 && f.state == AT_COLLECTIVE) {
            char buf[160];
            snprintf(buf, sizeof buf, " thread %d waits at %s (mask 0x%08x);", i,
                     collective_name(f.c_kind), f.c_mask);
            s += buf;
            ++shown;
        }
    }
    char buf[200];
    snprintf(buf, sizeof buf, " %d of %d threads wait at __syncthreads, %d have exited", at_bar,
             w->nthreads, exited);
    s += buf;
    if (at_bar > 0 && exited > 0) s += " (a __syncthreads not reached by every thread of the block)";
    fail_block(w, CUDA_ERROR_LAUNCH_FAILED, s);
}

void run_block(Worker* w, const EmuDim3& b) {
    const Launch& l = *w->launch;
    w->block_idx = b;
    const int n = w->nthreads;
    for (int i = 0; i < n; ++i) {
        Fiber& f = w->fibers[i];
        f.t.block_idx = b;
        f.t.block_dim = l.block;
        f.t.grid_dim = l.grid;
        f.t.thread_idx.x = (unsigned)i % l.block.x;
        f.t.thread_idx.y = ((unsigned)i / l.block.x) % l.block.y;
        f.t.thread_idx.z = (unsigned)i / (l.block.x * l.block.y);
        f.t.linear = (unsigned)i;
        f.t.lane = (unsigned)i % 32;
        f.t.warp = (unsigned)i / 32;
        f.t.dyn_smem = w->dyn;
        f.t.dyn_smem_bytes = l.dyn_smem;
        f.state = RUNNABLE;
        f.sp = fiber_prepare(f.stack_top, fiber_main, &f);
    }
    for (int i = 0; i < (n + 31) / 32; ++i) w->warps[i] = Warp{};
    poison_static_smem(l.f->module);
    if (l.dyn_smem) memset(w->dyn, 0xFF, l.dyn_smem);
    long idle_passes = 0;
    for (;;) {
        if (l.order == ORDER_SHUFFLE) shuffle(&w->order, &w->rng);
        bool ran = false, all_exited = true;
        w->yielded = false;
        bool progress = false;
        for (int i : w->order) {
            Fiber& f = w->fibers[i];
            if (f.state != RUNNABLE) {
                if (f.state != EXITED) all_exited = false;
                continue;
            }
            all_exited = false;
            ran = true;
            w->cur = &f;
            w->yielded = false;
            emu_switch(&w->sched_sp, f.sp);
            if (!w->yielded) progress = true;
        }
        if (all_exited) {
            bool done = true;
            for (int i = 0; i < n; ++i) done = done && w->fibers[i].state == EXITED;
            if (done) return;
        }
        if (ran && !progress) {
            if (++idle_passes > l.spin_limit)
                fail_block(w, CUDA_ERROR_LAUNCH_TIMEOUT,
                           where(w, nullptr) + ": every thread spins (yields) and none makes "
                                               "progress: a wait that can never end");
            continue;
        }
        idle_passes = 0;
        if (ran) continue;
        if (!release_barrier(w)) stuck(w);
    }
}

// ---- the grid ----------------------------------------------------------------------------------

struct Grid {
    const Launch* launch;
    std::vector<EmuDim3> blocks;
    std::atomic<size_t> next{0};
    std::atomic<bool> failed{false};
    std::mutex mu;
    Fault fault;
    size_t fault_block = SIZE_MAX;  // the lowest failing block in the order, for a stable report
};

void setup_worker(Worker* w, const Launch& l) {
    w->launch = &l;
    w->nthreads = (int)(l.block.x * l.block.y * l.block.z);
    w->order.resize(w->nthreads);
    for (int i = 0; i < w->nthreads; ++i) w->order[i] = i;
    if (l.order == ORDER_REVERSE) std::reverse(w->order.begin(), w->order.end());
    const size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    if (!w->dyn) {
        // The shared window: 256 KiB, aligned to its size, so that a 32-bit shared address (a
        // wgmma descriptor's 18-bit start, __cvta_generic_to_shared) is an offset from its base.
        char* m = static_cast<char*>(mmap(nullptr, 2 * SHARED_WINDOW, PROT_NONE,
                                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
        w->window = m;
        w->dyn = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(m) + SHARED_WINDOW - 1) &
                                         ~(uintptr_t)(SHARED_WINDOW - 1));
        w->dyn_cap = 0;
    }
    // Only the launch's bytes (in whole pages) are accessible: past them is a guard.
    const size_t need = (l.dyn_smem + pg - 1) / pg * pg;
    if (need != w->dyn_cap) {
        mprotect(w->dyn, SHARED_WINDOW, PROT_NONE);
        if (need) mprotect(w->dyn, need, PROT_READ | PROT_WRITE);
        w->dyn_cap = need;
    }
}

void work(Grid* g) {
    Worker* w = worker();
    setup_worker(w, *g->launch);
    w->rng = g->launch->seed * 0x9E3779B97F4A7C15ull + 0x1234567ull + 1;
    for (;;) {
        if (g->failed.load()) return;
        const size_t i = g->next.fetch_add(1);
        if (i >= g->blocks.size()) return;
        // The dynamic shared memory pointer is per worker; a block may land on any of them.
        if (sigsetjmp(w->jmp, 1) == 0) {
            w->in_block = true;
            run_block(w, g->blocks[i]);
            w->in_block = false;
        } else {
            w->in_block = false;
            std::lock_guard<std::mutex> lk(g->mu);
            if (i < g->fault_block) {
                g->fault_block = i;
                g->fault = w->fault;
            }
            g->failed.store(true);
            return;
        }
    }
}

// A small pool of worker threads, started on first use.
struct Pool {
    std::mutex mu;
    std::condition_variable cv, done_cv;
    Grid* grid = nullptr;
    uint64_t generation = 0;
    int busy = 0;
    int size = 0;

    void start(int n) {
        size = n;
        for (int i = 0; i < n; ++i)
            std::thread([this] {
                uint64_t seen = 0;
                for (;;) {
                    Grid* g;
                    {
                        std::unique_lock<std::mutex> lk(mu);
                        cv.wait(lk, [&] { return generation != seen; });
                        seen = generation;
                        g = grid;
                    }
                    work(g);
                    std::lock_guard<std::mutex> lk(mu);
                    if (--busy == 0) done_cv.notify_all();
                }
            }).detach();
    }

    void run(Grid* g) {
        {
            std::lock_guard<std::mutex> lk(mu);
            grid = g;
            busy = size;
            ++generation;
        }
        cv.notify_all();
        work(g);  // the calling thread works too
        std::unique_lock<std::mutex> lk(mu);
        done_cv.wait(lk, [&] { return busy == 0; });
    }
};

Pool& pool() {
    static Pool* p = [] {
        Pool* p = new Pool();
        int n = settings().threads;
        if (n <= 0) n = (int)std::max(1u, std::thread::hardware_concurrency());
        p->start(n - 1);
        return p;
    }();
    return *p;
}

std::mutex launch_mu;  // one grid at a time: the pool is shared

}  // namespace

const EmuRuntime* runtime_table() { return &TABLE; }

int run_grid(const Launch& l, std::string* error) {
    install_handlers();
    worker();  // the calling thread's alternate signal stack before anything can fault
    Grid g;
    g.launch = &l;
    g.blocks.reserve((size_t)l.grid.x * l.grid.y * l.grid.z);
    for (unsigned z = 0; z < l.grid.z; ++z)
        for (unsigned y = 0; y < l.grid.y; ++y)
            for (unsigned x = 0; x < l.grid.x; ++x) g.blocks.push_back(EmuDim3{x, y, z});
    if (l.order == ORDER_REVERSE) std::reverse(g.blocks.begin(), g.blocks.end());
    if (l.order == ORDER_SHUFFLE) {
        uint64_t s = l.seed * 0x2545F4914F6CDD1Dull + 7;
        for (size_t i = g.blocks.size(); i > 1; --i)
            std::swap(g.blocks[i - 1], g.blocks[next_rand(&s) % i]);
    }
    std::lock_guard<std::mutex> lk(launch_mu);
    pool().run(&g);
    if (g.failed.load()) {
        *error = g.fault.what;
        return g.fault.code;
    }
    return CUDA_SUCCESS;
}

void log(const char* fmt, ...) {
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    fprintf(stderr, "kontext-emu: %s\n", buf);
}

}  // namespace emu

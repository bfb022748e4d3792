// driver.cpp: libcuda.so.1 of the emulated GPU — the CUDA driver API entry points the project
// (through cudarc) calls, on one emulated device.
//
// Everything runs when it is issued: a launch or a copy is finished when its call returns, so
// streams are trivially ordered and events record wall-clock time (meaningless as GPU time). The
// emulator therefore cannot find a missing stream synchronisation; it finds what a kernel does
// wrong (runtime.cpp) and what the host asks wrongly: copies outside an allocation, launches past
// the device's limits, modules for another architecture. Faults are sticky, as on a GPU: after an
// illegal address every later call fails with the same error.
//
// The device: "kontext-emu (emulated GPU)", compute capability KONTEXT_EMU_CC (default 9.0),
// KONTEXT_EMU_MEMORY bytes (default 24G; allocations past it fail with CUDA_ERROR_OUT_OF_MEMORY),
// KONTEXT_EMU_THREADS worker threads. KONTEXT_EMU_ORDER=forward|reverse|shuffle:SEED orders
// blocks and threads; KONTEXT_EMU_RACECHECK=1 runs every launch in two orders and fails when the
// results differ.
//
// Stream capture: a stream between cuStreamBeginCapture_v2 and cuStreamEndCapture records its
// work instead of running it — kernel launches (the parameter values copied at the call, as the
// real driver copies them into the node), async copies and memsets, host functions, and the
// stand-in cuBLASLt's matmuls (kontext_emu_enqueue) — into a graph that cuGraphLaunch replays in
// order. What the real driver refuses during a capture is refused here with its error code, and
// the capture is invalidated so that cuStreamEndCapture fails too (see "stream capture" below):
// the emulator is a detector for a captured step that synchronises, allocates or reads back.
#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "emu.h"

using namespace emu;

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void* CUcontext;
typedef void* CUstream;
typedef void* CUevent;
typedef void* CUmodule;
typedef void* CUfunction;

namespace emu {

namespace {

uint64_t parse_bytes(const char* s) {
    char* end = nullptr;
    double v = strtod(s, &end);
    if (end == s || v <= 0) return 0;
    switch (*end) {
        case 'k': case 'K': v *= 1024.0; break;
        case 'm': case 'M': v *= 1024.0 * 1024; break;
        case 'g': case 'G': v *= 1024.0 * 1024 * 1024; break;
        case 't': case 'T': v *= 1024.0 * 1024 * 1024 * 1024; break;
        default: break;
    }
    return (uint64_t)v;
}

Settings read_settings() {
    Settings s;
    if (const char* v = getenv("KONTEXT_EMU_CC")) {
        int a = 0, b = 0;
        if (sscanf(v, "%d.%d", &a, &b) >= 1 && a >= 7 && a <= 12) {
            s.cc_major = a;
            s.cc_minor = b;
        } else {
            log("KONTEXT_EMU_CC=%s is not a compute capability like 9.0; using 9.0", v);
        }
    }
    if (const char* v = getenv("KONTEXT_EMU_MEMORY")) {
        const uint64_t b = parse_bytes(v);
        if (b) s.memory_bytes = b;
        else log("KONTEXT_EMU_MEMORY=%s is not a size like 24G; using 24G", v);
    }
    if (const char* v = getenv("KONTEXT_EMU_THREADS")) s.threads = atoi(v);
    if (const char* v = getenv("KONTEXT_EMU_ORDER")) {
        if (!strcmp(v, "forward")) s.order = ORDER_FORWARD;
        else if (!strcmp(v, "reverse")) s.order = ORDER_REVERSE;
        else if (!strncmp(v, "shuffle", 7)) {
            s.order = ORDER_SHUFFLE;
            if (v[7] == ':') s.seed = strtoull(v + 8, nullptr, 10);
        } else log("KONTEXT_EMU_ORDER=%s: expected forward, reverse or shuffle:SEED", v);
    }
    if (const char* v = getenv("KONTEXT_EMU_RACECHECK")) s.racecheck = atoi(v);
    return s;
}

}  // namespace

Settings& settings_mut() {
    static Settings s = read_settings();
    return s;
}
const Settings& settings() { return settings_mut(); }

}  // namespace emu

namespace {

struct Context {
    int refs = 0;
};
Context the_context;
thread_local CUcontext current_ctx = nullptr;
bool initialised = false;

std::atomic<int> sticky{CUDA_SUCCESS};
std::mutex err_mu;
std::string last_error;  // the last failure's message, for kontext_emu_last_error

struct Graph;

struct Stream {
    int id;
    // Stream capture: the graph being recorded (null when the stream is not capturing), how it
    // began, and whether a refused call invalidated it (then `why` says which).
    Graph* capture = nullptr;
    int capture_mode = 0;  // CU_STREAM_CAPTURE_MODE_GLOBAL 0, THREAD_LOCAL 1, RELAXED 2
    std::thread::id capture_thread;
    unsigned long long capture_id = 0;
    bool invalidated = false;
    std::string why;
};
struct Event {
    std::chrono::steady_clock::time_point t;
    bool recorded = false;
    // The capture sequence the event was last recorded in (0: recorded outside any capture).
    unsigned long long captured_in = 0;
};

// One recorded operation of a graph, replayed by cuGraphLaunch.
struct Node {
    enum Kind { KERNEL, COPY, SET, HOST, ENQUEUED } kind;
    std::string what;  // the call that recorded it, for errors at replay
    // KERNEL: the function, its configuration and a copy of every parameter's value.
    Function* fn = nullptr;
    EmuDim3 grid{}, block{};
    size_t smem = 0;
    std::vector<unsigned char> param_data;
    std::vector<size_t> param_offsets;
    // COPY: bytes from src to dst (device, or page-locked host memory read at replay).
    void* dst = nullptr;
    const void* src = nullptr;
    size_t bytes = 0;
    // SET: `height` rows of `width` elements of `elem` bytes at `pitch`, to `value`.
    unsigned int value = 0;
    int elem = 1;
    size_t pitch = 0, width = 0, height = 0;
    // HOST (cuLaunchHostFunc) and ENQUEUED (kontext_emu_enqueue: a cuBLASLt matmul).
    void (*host_fn)(void*) = nullptr;
    int (*run)(void*) = nullptr;
    void* ctx = nullptr;
    void (*drop)(void*) = nullptr;
    ~Node() {
        if (drop) drop(ctx);
    }
};

struct Graph {
    std::vector<std::shared_ptr<Node>> nodes;
};
struct Exec {
    std::vector<std::shared_ptr<Node>> nodes;
};

// The captures in progress, and the live graphs and executable graphs (handles are checked).
std::mutex capture_mu;
std::vector<Stream*> capturing;
std::set<Graph*> live_graphs;
std::set<Exec*> live_execs;
std::atomic<unsigned long long> next_capture_id{1};

// Page-locked host ranges (cuMemHostAlloc, cuMemHostRegister): what a captured copy may read or
// write on the host.
std::mutex pinned_mu;
std::map<uintptr_t, size_t> pinned;

std::mutex stats_mu;
std::map<std::string, uint64_t> launches;  // per kernel name
uint64_t peak_bytes = 0;

CUresult fail(CUresult code, const std::string& msg) {
    {
        std::lock_guard<std::mutex> g(err_mu);
        last_error = msg;
    }
    log("%s", msg.c_str());
    return code;
}

// Faults that leave the context unusable on a GPU.
bool is_sticky(int code) {
    return code == CUDA_ERROR_ILLEGAL_ADDRESS || code == CUDA_ERROR_ASSERT ||
           code == CUDA_ERROR_MISALIGNED_ADDRESS || code == CUDA_ERROR_LAUNCH_FAILED ||
           code == CUDA_ERROR_ILLEGAL_INSTRUCTION || code == CUDA_ERROR_LAUNCH_TIMEOUT;
}

// The common preamble of calls that need a live, current context.
#define NEED_CONTEXT()                                              \
    do {                                                            \
        if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;        \
        if (int s = sticky.load()) return s;                        \
        if (!current_ctx) return CUDA_ERROR_INVALID_CONTEXT;        \
    } while (0)

// ---- stream capture: the refusals -----------------------------------------------------------
//
// The CUDA driver's rules for a capture in progress ("Stream Capture" in the programming guide,
// cuStreamBeginCapture and cuThreadExchangeStreamCaptureMode in the driver API), as emulated:
// - the capturing stream's own synchronisation (cuStreamSynchronize, cuStreamQuery) and a query
//   or wait of an event recorded in the capture: CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED /
//   CUDA_ERROR_CAPTURED_EVENT;
// - "potentially unsafe" calls (cuCtxSynchronize, cuMemAlloc, cuMemFree, cuMemHostAlloc, the
//   synchronous copies and memsets) while a GLOBAL-mode capture runs anywhere, or a
//   THREAD_LOCAL one on the calling thread: CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
// - a copy between device and pageable host memory on the capturing stream (a graph's memcpy
//   node reads or writes host memory at replay, by DMA: only page-locked memory can be used):
//   CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
// - the capturing stream waiting on an event recorded outside the capture (a dependency across
//   the capture's boundary): CUDA_ERROR_STREAM_CAPTURE_ISOLATION; another stream waiting on an
//   event of the capture would join it (cross-stream capture), which is not emulated: refused
//   with CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED.
// Each refusal invalidates the capture: later work on the stream fails with
// CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, and so does cuStreamEndCapture, which returns no graph.
// The last error message names the refused call and the capture.

// The capture `s` records into, or null. Captures are begun and ended on their own thread (or
// RELAXED), and the emulator runs everything on the caller's thread, so reading `capture`
// unlocked races only with a misuse the real driver would not define either.
Stream* recording(CUstream s) {
    if (!s) return nullptr;
    Stream* st = static_cast<Stream*>(s);
    return st->capture ? st : nullptr;
}

std::string capture_name(const Stream* st) {
    return "the capture of stream " + std::to_string(st->id) + " (sequence " +
           std::to_string(st->capture_id) + ")";
}

void invalidate(Stream* st, const std::string& why) {
    if (st->invalidated) return;
    st->invalidated = true;
    st->why = why;
}

// Refuses `op` on the capturing stream `st` with `code` and invalidates the capture.
CUresult refuse(Stream* st, CUresult code, const std::string& op, const std::string& rule) {
    const std::string msg = op + " during " + capture_name(st) + ": " + rule +
                            "; the capture is invalidated";
    invalidate(st, msg);
    return fail(code, msg);
}

// An operation on a capturing stream whose capture was already invalidated.
CUresult invalidated(Stream* st, const std::string& op) {
    return fail(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
                op + ": " + capture_name(st) + " was invalidated earlier (" + st->why + ")");
}

// A potentially unsafe call (allocation, synchronous copy, context synchronisation): refused
// while a capture forbids it to this thread.
CUresult unsafe_call(const char* op) {
    std::lock_guard<std::mutex> g(capture_mu);
    const std::thread::id me = std::this_thread::get_id();
    Stream* hit = nullptr;
    for (Stream* st : capturing) {
        const bool forbids = st->capture_mode == 0 || (st->capture_mode == 1 && st->capture_thread == me);
        if (forbids && !hit) hit = st;
    }
    if (!hit) return CUDA_SUCCESS;
    return refuse(hit, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, op,
                  "a potentially unsafe call (it allocates, frees or synchronises) is not "
                  "permitted while a stream is capturing in global mode");
}

// The capture `e` was recorded in, if it is still in progress.
Stream* capture_of_event(const Event* e) {
    if (!e->captured_in) return nullptr;
    std::lock_guard<std::mutex> g(capture_mu);
    for (Stream* st : capturing)
        if (st->capture_id == e->captured_in) return st;
    return nullptr;
}

bool is_pinned(const void* p, size_t bytes) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    std::lock_guard<std::mutex> g(pinned_mu);
    auto it = pinned.upper_bound(a);
    if (it == pinned.begin()) return false;
    --it;
    return a >= it->first && a + bytes <= it->first + it->second;
}

// Appends `n` to the capture of `st` (refusing when it was invalidated before).
CUresult record(Stream* st, std::shared_ptr<Node> n) {
    if (st->invalidated) return invalidated(st, n->what);
    st->capture->nodes.push_back(std::move(n));
    return CUDA_SUCCESS;
}

int opt_in_smem() {
    const Settings& s = settings();
    if (s.cc_major == 8 && s.cc_minor == 0) return 166912;  // A100: 163 KiB
    if (s.cc_major == 8) return 101376;                      // sm_86 / sm_89: 99 KiB
    if (s.cc_major == 9) return 232448;                      // H100: 227 KiB
    if (s.cc_major >= 10) return 232448;
    return 65536;
}

int attribute(int a, int* ok) {
    const Settings& s = settings();
    *ok = 1;
    switch (a) {
        case 1: return 1024;       // max threads per block
        case 2: return 1024;       // block dim x
        case 3: return 1024;       // y
        case 4: return 64;         // z
        case 5: return 2147483647; // grid x
        case 6: return 65535;
        case 7: return 65535;
        case 8: return 49152;      // shared memory per block (without opt-in)
        case 9: return 65536;      // constant memory
        case 10: return 32;        // warp size
        case 11: return 2147483647;
        case 12: return 65536;     // registers per block
        case 13: return 1980000;   // clock kHz
        case 15: return 1;
        case 16: return s.sms;
        case 18: return 0;         // integrated
        case 19: return 1;
        case 31: return 1;
        case 33: case 34: case 50: return 0;
        case 35: return 0;
        case 36: return 2619000;
        case 37: return 5120;
        case 38: return 50 << 20;
        case 39: return 2048;
        case 40: return 2;
        case 41: return 1;
        case 75: return s.cc_major;
        case 76: return s.cc_minor;
        case 81: return opt_in_smem() + 1024;
        case 82: return 65536;
        case 89: return 0;
        case 95: return 0;
        case 96: return 0;
        case 97: return opt_in_smem();
        case 102: return 0;
        case 106: return 32;
        case 108: return 0;
        case 111: return 1024;
        case 115: return 0;        // memory pools: no (cudarc then uses cuMemAlloc)
        default: *ok = 0; return 0;
    }
}

// The size of an ELF image from its header: cuModuleLoadData is given no length.
bool elf_size(const void* image, size_t* out) {
    const Elf64_Ehdr* h = static_cast<const Elf64_Ehdr*>(image);
    if (memcmp(h->e_ident, ELFMAG, SELFMAG) != 0 || h->e_ident[EI_CLASS] != ELFCLASS64) return false;
    size_t end = h->e_shoff + (size_t)h->e_shnum * h->e_shentsize;
    const Elf64_Phdr* ph = reinterpret_cast<const Elf64_Phdr*>(
        static_cast<const char*>(image) + h->e_phoff);
    for (int i = 0; i < h->e_phnum; ++i) end = std::max<size_t>(end, ph[i].p_offset + ph[i].p_filesz);
    end = std::max<size_t>(end, h->e_phoff + (size_t)h->e_phnum * h->e_phentsize);
    *out = end;
    return h->e_machine == EM_X86_64;
}

struct TlsQuery {
    uintptr_t base;
    size_t tls;
};

int find_tls(struct dl_phdr_info* info, size_t, void* data) {
    TlsQuery* q = static_cast<TlsQuery*>(data);
    if (info->dlpi_addr != q->base) return 0;
    for (int i = 0; i < info->dlpi_phnum; ++i)
        if (info->dlpi_phdr[i].p_type == PT_TLS) q->tls = info->dlpi_phdr[i].p_memsz;
    return 1;
}

// Does a module built for sm_<arch>[a] run on this device? (cubins run on the same major
// version with an equal or higher minor; arch-specific "a" targets only on their exact CC.)
bool arch_runs(int arch, int specific) {
    const Settings& s = settings();
    const int dev = s.cc_major * 10 + s.cc_minor;
    if (specific) return arch == dev;
    return arch / 10 == s.cc_major && arch <= dev;
}

std::string dims(const EmuDim3& d) {
    return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

}  // namespace

#define API extern "C" __attribute__((visibility("default")))

// ---- init, device, context -----------------------------------------------------------------------

API CUresult cuInit(unsigned int flags) {
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    settings();
    initialised = true;
    return CUDA_SUCCESS;
}

API CUresult cuDriverGetVersion(int* v) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    *v = 13000;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetCount(int* n) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (!n) return CUDA_ERROR_INVALID_VALUE;
    *n = 1;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (!d) return CUDA_ERROR_INVALID_VALUE;
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *d = 0;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    const Settings& s = settings();
    const double gib = (double)s.memory_bytes / (1 << 30);
    if (gib >= 1.0)
        snprintf(name, (size_t)len, "kontext-emu (emulated GPU, sm_%d%d, %.0f GiB)", s.cc_major,
                 s.cc_minor, gib);
    else
        snprintf(name, (size_t)len, "kontext-emu (emulated GPU, sm_%d%d, %.0f MiB)", s.cc_major,
                 s.cc_minor, gib * 1024);
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice d) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    int ok;
    *v = attribute(attr, &ok);
    return ok ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

API CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice d) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (!bytes) return CUDA_ERROR_INVALID_VALUE;
    *bytes = settings().memory_bytes;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetUuid(unsigned char* uuid, CUdevice d) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (d != 0 || !uuid) return CUDA_ERROR_INVALID_VALUE;
    memcpy(uuid, "kontext-emu-gpu0", 16);
    return CUDA_SUCCESS;
}
API CUresult cuDeviceGetUuid_v2(unsigned char* uuid, CUdevice d) { return cuDeviceGetUuid(uuid, d); }

API CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice d) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (!c) return CUDA_ERROR_INVALID_VALUE;
    the_context.refs++;
    *c = &the_context;
    return CUDA_SUCCESS;
}

API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (the_context.refs > 0) the_context.refs--;
    return CUDA_SUCCESS;
}

API CUresult cuCtxGetCurrent(CUcontext* c) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (!c) return CUDA_ERROR_INVALID_VALUE;
    *c = current_ctx;
    return CUDA_SUCCESS;
}

API CUresult cuCtxSetCurrent(CUcontext c) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (c && c != &the_context) return CUDA_ERROR_INVALID_CONTEXT;
    current_ctx = c;
    return CUDA_SUCCESS;
}

API CUresult cuCtxGetDevice(CUdevice* d) {
    NEED_CONTEXT();
    *d = 0;
    return CUDA_SUCCESS;
}

API CUresult cuCtxSynchronize() {
    NEED_CONTEXT();
    {
        // Waiting for a capture's work would wait forever on a GPU: refused in every mode.
        std::lock_guard<std::mutex> g(capture_mu);
        if (!capturing.empty())
            return refuse(capturing.front(), CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
                          "cuCtxSynchronize", "the context cannot be synchronised while a stream "
                          "of it is capturing");
    }
    return CUDA_SUCCESS;
}

API CUresult cuCtxPushCurrent_v2(CUcontext c) { return cuCtxSetCurrent(c); }
API CUresult cuCtxPopCurrent_v2(CUcontext* c) {
    if (c) *c = current_ctx;
    current_ctx = nullptr;
    return CUDA_SUCCESS;
}

API CUresult cuCtxGetStreamPriorityRange(int* lo, int* hi) {
    NEED_CONTEXT();
    if (lo) *lo = 0;
    if (hi) *hi = -5;
    return CUDA_SUCCESS;
}

// ---- streams and events --------------------------------------------------------------------------

API CUresult cuStreamCreate(CUstream* s, unsigned int) {
    NEED_CONTEXT();
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    static std::atomic<int> next{1};
    Stream* st = new Stream();
    st->id = next++;
    *s = st;
    return CUDA_SUCCESS;
}
API CUresult cuStreamCreateWithPriority(CUstream* s, unsigned int f, int) {
    return cuStreamCreate(s, f);
}
API CUresult cuStreamDestroy_v2(CUstream s) {
    if (!s) return CUDA_ERROR_INVALID_HANDLE;
    Stream* st = static_cast<Stream*>(s);
    if (st->capture) {
        // The capture ends with its stream; its graph is never returned.
        std::lock_guard<std::mutex> g(capture_mu);
        capturing.erase(std::find(capturing.begin(), capturing.end(), st));
        delete st->capture;
    }
    delete st;
    return CUDA_SUCCESS;
}
API CUresult cuStreamSynchronize(CUstream s) {
    NEED_CONTEXT();
    if (Stream* st = recording(s))
        return refuse(st, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "cuStreamSynchronize",
                      "the capturing stream cannot be synchronised (its work is recorded, not "
                      "run)");
    return CUDA_SUCCESS;
}
API CUresult cuStreamQuery(CUstream s) {
    NEED_CONTEXT();
    if (Stream* st = recording(s))
        return refuse(st, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "cuStreamQuery",
                      "the capturing stream cannot be queried");
    return CUDA_SUCCESS;
}
API CUresult cuStreamWaitEvent(CUstream s, CUevent e, unsigned int flags) {
    NEED_CONTEXT();
    if (!e) return CUDA_ERROR_INVALID_HANDLE;
    Event* ev = static_cast<Event*>(e);
    if (Stream* st = recording(s)) {
        if (st->invalidated) return invalidated(st, "cuStreamWaitEvent");
        if (flags & 1)  // CU_EVENT_WAIT_EXTERNAL: an external wait node
            return refuse(st, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "cuStreamWaitEvent",
                          "external event wait nodes (CU_EVENT_WAIT_EXTERNAL) are not emulated");
        // In-stream order: work recorded before the event is already before what follows.
        if (ev->captured_in == st->capture_id) return CUDA_SUCCESS;
        return refuse(st, CUDA_ERROR_STREAM_CAPTURE_ISOLATION, "cuStreamWaitEvent",
                      "the event was not recorded in this capture, and only in-stream order may "
                      "cross the capture's boundary");
    }
    if (Stream* owner = capture_of_event(ev))
        return refuse(owner, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "cuStreamWaitEvent",
                      "another stream waiting on an event of the capture would join it "
                      "(cross-stream capture), which the emulated driver does not record");
    return CUDA_SUCCESS;
}
API CUresult cuLaunchHostFunc(CUstream s, void (*fn)(void*), void* data) {
    NEED_CONTEXT();
    if (!fn) return CUDA_ERROR_INVALID_VALUE;
    if (Stream* st = recording(s)) {
        auto n = std::make_shared<Node>();
        n->kind = Node::HOST;
        n->what = "cuLaunchHostFunc";
        n->host_fn = fn;
        n->ctx = data;
        return record(st, n);
    }
    fn(data);
    return CUDA_SUCCESS;
}

API CUresult cuEventCreate(CUevent* e, unsigned int) {
    NEED_CONTEXT();
    if (!e) return CUDA_ERROR_INVALID_VALUE;
    *e = new Event();
    return CUDA_SUCCESS;
}
API CUresult cuEventDestroy_v2(CUevent e) {
    if (!e) return CUDA_ERROR_INVALID_HANDLE;
    delete static_cast<Event*>(e);
    return CUDA_SUCCESS;
}
API CUresult cuEventRecord(CUevent e, CUstream s) {
    NEED_CONTEXT();
    if (!e) return CUDA_ERROR_INVALID_HANDLE;
    Event* ev = static_cast<Event*>(e);
    if (Stream* st = recording(s)) {
        // In a capture an event marks a point of the graph (for waits of the same capture); it
        // holds no time and nothing is recorded.
        if (st->invalidated) return invalidated(st, "cuEventRecord");
        ev->captured_in = st->capture_id;
        ev->recorded = false;
        return CUDA_SUCCESS;
    }
    ev->t = std::chrono::steady_clock::now();
    ev->recorded = true;
    ev->captured_in = 0;
    return CUDA_SUCCESS;
}
API CUresult cuEventSynchronize(CUevent e) {
    NEED_CONTEXT();
    if (!e) return CUDA_ERROR_INVALID_HANDLE;
    if (Stream* st = capture_of_event(static_cast<Event*>(e)))
        return refuse(st, CUDA_ERROR_CAPTURED_EVENT, "cuEventSynchronize",
                      "the event was recorded in the capture (its work has not run)");
    return CUDA_SUCCESS;
}
API CUresult cuEventQuery(CUevent e) {
    NEED_CONTEXT();
    if (!e) return CUDA_ERROR_INVALID_HANDLE;
    if (Stream* st = capture_of_event(static_cast<Event*>(e)))
        return refuse(st, CUDA_ERROR_CAPTURED_EVENT, "cuEventQuery",
                      "the event was recorded in the capture (its work has not run)");
    return CUDA_SUCCESS;
}
API CUresult cuEventElapsedTime(float* ms, CUevent a, CUevent b) {
    NEED_CONTEXT();
    if (!ms || !a || !b) return CUDA_ERROR_INVALID_VALUE;
    Event* x = static_cast<Event*>(a);
    Event* y = static_cast<Event*>(b);
    if (!x->recorded || !y->recorded) return CUDA_ERROR_INVALID_HANDLE;
    *ms = std::chrono::duration<float, std::milli>(y->t - x->t).count();
    return CUDA_SUCCESS;
}
API CUresult cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) {
    return cuEventElapsedTime(ms, a, b);
}

// ---- memory ----------------------------------------------------------------------------------------

API CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    NEED_CONTEXT();
    if (!p) return CUDA_ERROR_INVALID_VALUE;
    if (CUresult r = unsafe_call("cuMemAlloc")) return r;
    uintptr_t a = 0;
    const int r = mem_alloc(bytes, &a);
    if (r != CUDA_SUCCESS) return r;
    *p = a;
    std::lock_guard<std::mutex> g(stats_mu);
    peak_bytes = std::max(peak_bytes, mem_used());
    return CUDA_SUCCESS;
}

API CUresult cuMemFree_v2(CUdeviceptr p) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (p == 0) return CUDA_SUCCESS;
    if (CUresult r = unsafe_call("cuMemFree")) return r;
    if (mem_free((uintptr_t)p) != CUDA_SUCCESS)
        return fail(CUDA_ERROR_INVALID_VALUE,
                    "cuMemFree of 0x" + std::to_string(p) + ", which is not a live allocation");
    return CUDA_SUCCESS;
}

API CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    NEED_CONTEXT();
    uint64_t f, t;
    mem_info(&f, &t);
    if (free_bytes) *free_bytes = f;
    if (total) *total = t;
    return CUDA_SUCCESS;
}

API CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned int) {
    NEED_CONTEXT();
    if (!p || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    if (CUresult r = unsafe_call("cuMemHostAlloc")) return r;
    *p = malloc(bytes);
    if (!*p) return CUDA_ERROR_OUT_OF_MEMORY;
    std::lock_guard<std::mutex> g(pinned_mu);
    pinned[reinterpret_cast<uintptr_t>(*p)] = bytes;
    return CUDA_SUCCESS;
}
API CUresult cuMemAllocHost_v2(void** p, size_t bytes) { return cuMemHostAlloc(p, bytes, 0); }
API CUresult cuMemFreeHost(void* p) {
    if (CUresult r = unsafe_call("cuMemFreeHost")) return r;
    {
        std::lock_guard<std::mutex> g(pinned_mu);
        pinned.erase(reinterpret_cast<uintptr_t>(p));
    }
    free(p);
    return CUDA_SUCCESS;
}
API CUresult cuMemHostRegister_v2(void* p, size_t bytes, unsigned int) {
    NEED_CONTEXT();
    if (!p || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> g(pinned_mu);
    pinned[reinterpret_cast<uintptr_t>(p)] = bytes;
    return CUDA_SUCCESS;
}
API CUresult cuMemHostUnregister(void* p) {
    std::lock_guard<std::mutex> g(pinned_mu);
    pinned.erase(reinterpret_cast<uintptr_t>(p));
    return CUDA_SUCCESS;
}

namespace {

CUresult check_range(const char* op, CUdeviceptr p, size_t bytes) {
    if (bytes == 0) return CUDA_SUCCESS;
    if (mem_find((uintptr_t)p, bytes, nullptr)) return CUDA_SUCCESS;
    char buf[200];
    snprintf(buf, sizeof buf, "%s: device range [0x%llx, +%zu) is not inside one live allocation",
             op, p, bytes);
    return fail(CUDA_ERROR_INVALID_VALUE, buf);
}

}  // namespace

namespace {

// Records a copy on the capturing stream `st` (`host` is the host side of an HtoD or DtoH copy,
// null for DtoD), or refuses it.
CUresult record_copy(Stream* st, const char* op, void* dst, const void* src, size_t bytes,
                     const void* host) {
    if (st->invalidated) return invalidated(st, op);
    if (host && bytes && !is_pinned(host, bytes))
        return refuse(st, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, op,
                      "the host memory is pageable; a captured copy reads or writes it at "
                      "replay, which only page-locked memory (cuMemHostAlloc, cuMemHostRegister) "
                      "allows");
    auto n = std::make_shared<Node>();
    n->kind = Node::COPY;
    n->what = op;
    n->dst = dst;
    n->src = src;
    n->bytes = bytes;
    return record(st, n);
}

std::shared_ptr<Node> set_node(const char* op, CUdeviceptr dst, unsigned int v, int elem,
                               size_t pitch, size_t width, size_t height) {
    auto n = std::make_shared<Node>();
    n->kind = Node::SET;
    n->what = op;
    n->dst = reinterpret_cast<void*>(dst);
    n->value = v;
    n->elem = elem;
    n->pitch = pitch;
    n->width = width;
    n->height = height;
    return n;
}

}  // namespace

API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t bytes) {
    NEED_CONTEXT();
    if (CUresult r = unsafe_call("cuMemcpyHtoD (synchronous)")) return r;
    if (CUresult r = check_range("cuMemcpyHtoD", dst, bytes)) return r;
    if (bytes && !src) return CUDA_ERROR_INVALID_VALUE;
    memcpy(reinterpret_cast<void*>(dst), src, bytes);
    return CUDA_SUCCESS;
}
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t bytes, CUstream s) {
    NEED_CONTEXT();
    if (Stream* st = recording(s)) {
        if (CUresult r = check_range("cuMemcpyHtoDAsync", dst, bytes)) return r;
        if (bytes && !src) return CUDA_ERROR_INVALID_VALUE;
        return record_copy(st, "cuMemcpyHtoDAsync", reinterpret_cast<void*>(dst), src, bytes, src);
    }
    if (CUresult r = check_range("cuMemcpyHtoDAsync", dst, bytes)) return r;
    if (bytes && !src) return CUDA_ERROR_INVALID_VALUE;
    memcpy(reinterpret_cast<void*>(dst), src, bytes);
    return CUDA_SUCCESS;
}
API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t bytes) {
    NEED_CONTEXT();
    if (CUresult r = unsafe_call("cuMemcpyDtoH (synchronous)")) return r;
    if (CUresult r = check_range("cuMemcpyDtoH", src, bytes)) return r;
    if (bytes && !dst) return CUDA_ERROR_INVALID_VALUE;
    memcpy(dst, reinterpret_cast<const void*>(src), bytes);
    return CUDA_SUCCESS;
}
API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t bytes, CUstream s) {
    NEED_CONTEXT();
    if (CUresult r = check_range("cuMemcpyDtoHAsync", src, bytes)) return r;
    if (bytes && !dst) return CUDA_ERROR_INVALID_VALUE;
    if (Stream* st = recording(s))
        return record_copy(st, "cuMemcpyDtoHAsync", dst, reinterpret_cast<const void*>(src), bytes,
                           dst);
    memcpy(dst, reinterpret_cast<const void*>(src), bytes);
    return CUDA_SUCCESS;
}
API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes) {
    NEED_CONTEXT();
    if (CUresult r = unsafe_call("cuMemcpyDtoD (synchronous)")) return r;
    if (CUresult r = check_range("cuMemcpyDtoD (destination)", dst, bytes)) return r;
    if (CUresult r = check_range("cuMemcpyDtoD (source)", src, bytes)) return r;
    memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes);
    return CUDA_SUCCESS;
}
API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream s) {
    NEED_CONTEXT();
    if (CUresult r = check_range("cuMemcpyDtoDAsync (destination)", dst, bytes)) return r;
    if (CUresult r = check_range("cuMemcpyDtoDAsync (source)", src, bytes)) return r;
    if (Stream* st = recording(s))
        return record_copy(st, "cuMemcpyDtoDAsync", reinterpret_cast<void*>(dst),
                           reinterpret_cast<const void*>(src), bytes, nullptr);
    memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes);
    return CUDA_SUCCESS;
}

namespace {

CUresult memset_now(const char* op, CUdeviceptr dst, unsigned int v, int elem, size_t pitch,
                    size_t width, size_t height) {
    if (height == 0 || width == 0) return CUDA_SUCCESS;
    if (dst % (size_t)elem) return CUDA_ERROR_INVALID_VALUE;
    const size_t row = width * (size_t)elem;
    if (pitch < row && height > 1) return CUDA_ERROR_INVALID_VALUE;
    if (CUresult r = check_range(op, dst, pitch * (height - 1) + row)) return r;
    for (size_t r = 0; r < height; ++r) {
        unsigned char* p = reinterpret_cast<unsigned char*>(dst + r * pitch);
        if (elem == 1) {
            memset(p, (int)(v & 0xFF), width);
        } else {
            unsigned int* q = reinterpret_cast<unsigned int*>(p);
            for (size_t i = 0; i < width; ++i) q[i] = v;
        }
    }
    return CUDA_SUCCESS;
}

// A memset on stream `s`: recorded when it captures (checked now, as the real driver checks a
// node's range when it adds it), else run.
CUresult memset_on(CUstream s, const char* op, CUdeviceptr dst, unsigned int v, int elem,
                   size_t pitch, size_t width, size_t height) {
    if (Stream* st = recording(s)) {
        if (height && width) {
            if (dst % (size_t)elem) return CUDA_ERROR_INVALID_VALUE;
            const size_t row = width * (size_t)elem;
            if (pitch < row && height > 1) return CUDA_ERROR_INVALID_VALUE;
            if (CUresult r = check_range(op, dst, pitch * (height - 1) + row)) return r;
        }
        return record(st, set_node(op, dst, v, elem, pitch, width, height));
    }
    return memset_now(op, dst, v, elem, pitch, width, height);
}

}  // namespace

API CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    NEED_CONTEXT();
    if (CUresult r = unsafe_call("cuMemsetD8 (synchronous)")) return r;
    return memset_now("cuMemsetD8", dst, v, 1, n, n, 1);
}
API CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream s) {
    NEED_CONTEXT();
    return memset_on(s, "cuMemsetD8Async", dst, v, 1, n, n, 1);
}
API CUresult cuMemsetD32_v2(CUdeviceptr dst, unsigned int v, size_t n) {
    NEED_CONTEXT();
    if (CUresult r = unsafe_call("cuMemsetD32 (synchronous)")) return r;
    return memset_now("cuMemsetD32", dst, v, 4, n * 4, n, 1);
}
API CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned int v, size_t n, CUstream s) {
    NEED_CONTEXT();
    return memset_on(s, "cuMemsetD32Async", dst, v, 4, n * 4, n, 1);
}
API CUresult cuMemsetD2D8_v2(CUdeviceptr dst, size_t pitch, unsigned char v, size_t w, size_t h) {
    NEED_CONTEXT();
    if (CUresult r = unsafe_call("cuMemsetD2D8 (synchronous)")) return r;
    return memset_now("cuMemsetD2D8", dst, v, 1, pitch, w, h);
}
API CUresult cuMemsetD2D8Async(CUdeviceptr dst, size_t pitch, unsigned char v, size_t w, size_t h,
                               CUstream s) {
    NEED_CONTEXT();
    return memset_on(s, "cuMemsetD2D8Async", dst, v, 1, pitch, w, h);
}

// ---- modules and functions ---------------------------------------------------------------------

API CUresult cuModuleLoadData(CUmodule* out, const void* image) {
    NEED_CONTEXT();
    if (!out || !image) return CUDA_ERROR_INVALID_VALUE;
    size_t size = 0;
    if (!elf_size(image, &size))
        return fail(CUDA_ERROR_INVALID_IMAGE,
                    "cuModuleLoadData: not a module of the emulated GPU (a real cubin or PTX? "
                    "the emulator runs only what its NVRTC built)");
    // dlopen needs a file: an anonymous one, gone with the process.
    const int fd = memfd_create("kontext-emu-module", MFD_CLOEXEC);
    if (fd < 0) return CUDA_ERROR_UNKNOWN;
    if (write(fd, image, size) != (ssize_t)size) {
        close(fd);
        return CUDA_ERROR_UNKNOWN;
    }
    const std::string path = "/proc/self/fd/" + std::to_string(fd);
    // The descriptor stays open for the life of the process: dlopen knows a library by its path,
    // and a closed descriptor's number (so its /proc path) would be reused by the next module.
    void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) close(fd);
    if (!h) return fail(CUDA_ERROR_INVALID_IMAGE, std::string("cuModuleLoadData: ") + dlerror());
    auto* info = static_cast<const EmuModuleInfo*>(dlsym(h, "__emu_module_info"));
    auto bind = reinterpret_cast<void (*)(const EmuRuntime*)>(dlsym(h, "__emu_bind"));
    auto touch = reinterpret_cast<void* (*)()>(dlsym(h, "__emu_tls_touch"));
    if (!info || !bind || !touch || info->abi_version != EMU_ABI_VERSION) {
        dlclose(h);
        return fail(CUDA_ERROR_INVALID_IMAGE,
                    "cuModuleLoadData: the image is not an emulator module of ABI version " +
                        std::to_string(EMU_ABI_VERSION));
    }
    if (!arch_runs(info->arch, info->arch_specific)) {
        const Settings& s = settings();
        const std::string msg = "cuModuleLoadData: module built for sm_" +
                                std::to_string(info->arch) + (info->arch_specific ? "a" : "") +
                                ", the device is sm_" + std::to_string(s.cc_major) +
                                std::to_string(s.cc_minor);
        dlclose(h);
        return fail(CUDA_ERROR_NO_BINARY_FOR_GPU, msg);
    }
    bind(runtime_table());
    Module* m = new Module();
    m->handle = h;
    m->info = info;
    m->tls_touch = touch;
    struct link_map* lm = nullptr;
    dlinfo(h, RTLD_DI_LINKMAP, &lm);
    TlsQuery q{lm ? lm->l_addr : 0, 0};
    dl_iterate_phdr(find_tls, &q);
    m->tls_bytes = q.tls;
    m->path = path;
    *out = m;
    return CUDA_SUCCESS;
}

API CUresult cuModuleLoadDataEx(CUmodule* out, const void* image, unsigned int, void*, void**) {
    return cuModuleLoadData(out, image);
}

API CUresult cuModuleUnload(CUmodule m) {
    if (!m) return CUDA_ERROR_INVALID_HANDLE;
    // The shared object stays mapped: functions handed out may still be referenced by a
    // captured launch, and unloading buys nothing in a test process.
    return CUDA_SUCCESS;
}

API CUresult cuModuleGetFunction(CUfunction* f, CUmodule mod, const char* name) {
    NEED_CONTEXT();
    if (!f || !mod || !name) return CUDA_ERROR_INVALID_VALUE;
    Module* m = static_cast<Module*>(mod);
    for (int i = 0; i < m->info->kernel_count; ++i)
        if (!strcmp(m->info->kernels[i].name, name)) {
            Function* fn = new Function();
            fn->module = m;
            fn->kernel = &m->info->kernels[i];
            fn->max_dynamic_smem = 49152 - (int)m->tls_bytes;
            *f = fn;
            return CUDA_SUCCESS;
        }
    return fail(CUDA_ERROR_NOT_FOUND,
                std::string("cuModuleGetFunction: the module has no kernel ") + name);
}

API CUresult cuModuleGetGlobal_v2(CUdeviceptr*, size_t*, CUmodule, const char* name) {
    NEED_CONTEXT();
    return fail(CUDA_ERROR_NOT_FOUND,
                std::string("cuModuleGetGlobal: the emulator has no module globals (") + name + ")");
}

API CUresult cuFuncGetAttribute(int* v, int attr, CUfunction f) {
    NEED_CONTEXT();
    if (!v || !f) return CUDA_ERROR_INVALID_VALUE;
    Function* fn = static_cast<Function*>(f);
    switch (attr) {
        case 0: *v = fn->kernel->max_threads ? fn->kernel->max_threads : 1024; return CUDA_SUCCESS;
        case 1: *v = (int)fn->module->tls_bytes; return CUDA_SUCCESS;
        case 2: case 3: *v = 0; return CUDA_SUCCESS;
        case 4: *v = 32; return CUDA_SUCCESS;
        case 5: case 6: *v = fn->module->info->arch; return CUDA_SUCCESS;
        case 8: *v = fn->max_dynamic_smem; return CUDA_SUCCESS;
        default: return CUDA_ERROR_INVALID_VALUE;
    }
}

API CUresult cuFuncSetAttribute(CUfunction f, int attr, int v) {
    NEED_CONTEXT();
    if (!f) return CUDA_ERROR_INVALID_HANDLE;
    Function* fn = static_cast<Function*>(f);
    if (attr == 8) {
        if (v < 0 || v + (int)fn->module->tls_bytes > opt_in_smem())
            return fail(CUDA_ERROR_INVALID_VALUE,
                        std::string("cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES) of ") +
                            fn->kernel->name + ": " + std::to_string(v) + " + " +
                            std::to_string(fn->module->tls_bytes) +
                            " static bytes exceed the device's " + std::to_string(opt_in_smem()));
        fn->max_dynamic_smem = v;
        return CUDA_SUCCESS;
    }
    if (attr == 9) return CUDA_SUCCESS;  // carveout: a hint
    return CUDA_ERROR_INVALID_VALUE;
}

API CUresult cuFuncSetCacheConfig(CUfunction f, int) { return f ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE; }

API CUresult cuOccupancyMaxActiveBlocksPerMultiprocessor(int* n, CUfunction f, int block, size_t) {
    NEED_CONTEXT();
    if (!n || !f || block <= 0) return CUDA_ERROR_INVALID_VALUE;
    *n = std::max(1, 2048 / block);
    return CUDA_SUCCESS;
}

// ---- launches ------------------------------------------------------------------------------------

namespace {

// Checks a launch's configuration against the device's and the kernel's limits.
CUresult check_launch(Function* fn, EmuDim3 grid, EmuDim3 block, size_t smem) {
    const std::string cfg = std::string(fn->kernel->name) + " <<<" + dims(grid) + ", " +
                            dims(block) + ", " + std::to_string(smem) + ">>>";
    const uint64_t threads = (uint64_t)block.x * block.y * block.z;
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0)
        return fail(CUDA_ERROR_INVALID_VALUE, "launch " + cfg + ": an empty grid or block");
    if (block.x > 1024 || block.y > 1024 || block.z > 64 || threads > 1024)
        return fail(CUDA_ERROR_INVALID_VALUE,
                    "launch " + cfg + ": the block exceeds the device's limits (1024 threads; "
                                      "x, y ≤ 1024, z ≤ 64)");
    if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
        return fail(CUDA_ERROR_INVALID_VALUE,
                    "launch " + cfg + ": the grid exceeds the device's limits (x < 2^31, y, z ≤ 65535)");
    if (fn->kernel->max_threads && threads > (uint64_t)fn->kernel->max_threads)
        return fail(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
                    "launch " + cfg + ": " + std::to_string(threads) +
                        " threads, more than the kernel's __launch_bounds__(" +
                        std::to_string(fn->kernel->max_threads) + ")");
    const size_t static_smem = fn->module->tls_bytes;
    if (smem > (size_t)fn->max_dynamic_smem || static_smem + smem > (size_t)opt_in_smem())
        return fail(CUDA_ERROR_INVALID_VALUE,
                    "launch " + cfg + ": " + std::to_string(smem) + " bytes of dynamic shared "
                    "memory (+" + std::to_string(static_smem) + " static; the kernel allows " +
                    std::to_string(fn->max_dynamic_smem) +
                    " dynamic without cuFuncSetAttribute, the device " +
                    std::to_string(opt_in_smem()) + " in all)");
    return CUDA_SUCCESS;
}

// Runs a checked launch now (counted as an execution of the kernel).
CUresult run_launch(Function* fn, EmuDim3 grid, EmuDim3 block, size_t smem, void** params) {
    const std::string cfg = std::string(fn->kernel->name) + " <<<" + dims(grid) + ", " +
                            dims(block) + ", " + std::to_string(smem) + ">>>";
    {
        std::lock_guard<std::mutex> g(stats_mu);
        launches[fn->kernel->name]++;
    }
    // One reading of the settings for the whole launch: a test may change them from another
    // thread (kontext_emu_set_*), and a race check must not start in one mode and end in another.
    const Settings cfg_now = settings();
    Launch l{fn, grid, block, smem, params, cfg_now.order, cfg_now.seed, cfg_now.spin_limit};
    Snapshot before;
    if (cfg_now.racecheck) mem_snapshot(&before);
    std::string error;
    int r = run_grid(l, &error);
    if (r == CUDA_SUCCESS) {
        Allocation a;
        size_t off;
        if (mem_check_canaries(&a, &off)) {
            r = CUDA_ERROR_ILLEGAL_ADDRESS;
            char buf[300];
            if (off <= a.bytes)
                snprintf(buf, sizeof buf,
                         ": wrote %zu bytes before the %zu-byte allocation at 0x%lx", off, a.bytes,
                         (unsigned long)a.base);
            else
                snprintf(buf, sizeof buf,
                         ": wrote at byte %zu of the %zu-byte allocation at 0x%lx (past its end)",
                         off, a.bytes, (unsigned long)a.base);
            error = "kernel " + cfg + buf;
        }
    }
    if (r == CUDA_SUCCESS && cfg_now.racecheck) {
        // The same launch again from the same memory in another order: equal results or a race.
        Snapshot first;
        mem_snapshot(&first);
        mem_restore(before);
        Launch again = l;
        again.order = l.order == ORDER_FORWARD ? ORDER_REVERSE : ORDER_FORWARD;
        if (cfg_now.racecheck > 1) {
            again.order = ORDER_SHUFFLE;
            again.seed = l.seed + (uint64_t)cfg_now.racecheck;
        }
        r = run_grid(again, &error);
        Allocation a;
        size_t off;
        if (r == CUDA_SUCCESS && mem_compare(first, &a, &off)) {
            r = CUDA_ERROR_LAUNCH_FAILED;
            char buf[300];
            snprintf(buf, sizeof buf,
                     ": race: the results depend on the order threads and blocks run in (byte "
                     "%zu of the %zu-byte allocation at 0x%lx differs between two orders)",
                     off, a.bytes, (unsigned long)a.base);
            error = "kernel " + cfg + buf;
        }
    }
    if (r != CUDA_SUCCESS) {
        if (is_sticky(r)) sticky.store(r);
        return fail(r, error);
    }
    return CUDA_SUCCESS;
}

}  // namespace

API CUresult cuLaunchKernel(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz,
                            unsigned int bx, unsigned int by, unsigned int bz, unsigned int smem,
                            CUstream s, void** params, void** extra) {
    NEED_CONTEXT();
    if (!f) return CUDA_ERROR_INVALID_HANDLE;
    if (extra) return fail(CUDA_ERROR_NOT_SUPPORTED, "cuLaunchKernel: `extra` is not supported");
    Function* fn = static_cast<Function*>(f);
    const EmuDim3 grid{gx, gy, gz}, block{bx, by, bz};
    if (CUresult r = check_launch(fn, grid, block, smem)) return r;
    Stream* st = recording(s);
    if (!st) return run_launch(fn, grid, block, smem, params);
    // A kernel node keeps the parameters' values as they are now: the caller may reuse or free
    // its argument storage as soon as cuLaunchKernel returns, captured or not.
    auto n = std::make_shared<Node>();
    n->kind = Node::KERNEL;
    n->what = std::string("cuLaunchKernel of ") + fn->kernel->name;
    n->fn = fn;
    n->grid = grid;
    n->block = block;
    n->smem = smem;
    const int count = fn->kernel->param_count;
    if (count && !params)
        return fail(CUDA_ERROR_INVALID_VALUE, n->what + ": no parameter array for " +
                                                  std::to_string(count) + " parameters");
    for (int i = 0; i < count; ++i) {
        const size_t size = fn->kernel->param_sizes[i];
        // Each value at an offset aligned for any parameter type: a CUtensorMap passed by value
        // (__grid_constant__) is 64-byte aligned, the TMA instructions check it; replay places
        // the buffer at a 64-byte aligned address.
        const size_t at = (n->param_data.size() + 63) / 64 * 64;
        n->param_data.resize(at + size);
        memcpy(n->param_data.data() + at, params[i], size);
        n->param_offsets.push_back(at);
    }
    return record(st, n);
}

// ---- stream capture and graphs ------------------------------------------------------------------

typedef void* CUgraph;
typedef void* CUgraphExec;
typedef void* CUgraphNode;

API CUresult cuStreamBeginCapture_v2(CUstream s, int mode) {
    NEED_CONTEXT();
    if (!s)
        return fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
                    "cuStreamBeginCapture: the legacy NULL stream cannot be captured");
    if (mode < 0 || mode > 2) return CUDA_ERROR_INVALID_VALUE;
    Stream* st = static_cast<Stream*>(s);
    if (st->capture)
        return fail(CUDA_ERROR_ILLEGAL_STATE, "cuStreamBeginCapture: stream " +
                                                  std::to_string(st->id) + " is already capturing");
    std::lock_guard<std::mutex> g(capture_mu);
    st->capture = new Graph();
    st->capture_mode = mode;
    st->capture_thread = std::this_thread::get_id();
    st->capture_id = next_capture_id++;
    st->invalidated = false;
    st->why.clear();
    capturing.push_back(st);
    return CUDA_SUCCESS;
}
API CUresult cuStreamBeginCapture(CUstream s, int mode) { return cuStreamBeginCapture_v2(s, mode); }

API CUresult cuStreamEndCapture(CUstream s, CUgraph* out) {
    NEED_CONTEXT();
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    *out = nullptr;
    Stream* st = recording(s);
    if (!st)
        return fail(CUDA_ERROR_STREAM_CAPTURE_UNMATCHED,
                    "cuStreamEndCapture: the stream is not capturing");
    if (st->capture_mode != 2 && st->capture_thread != std::this_thread::get_id())
        return fail(CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD,
                    "cuStreamEndCapture: " + capture_name(st) +
                        " was begun on another thread and not in relaxed mode");
    Graph* graph = st->capture;
    {
        std::lock_guard<std::mutex> g(capture_mu);
        capturing.erase(std::find(capturing.begin(), capturing.end(), st));
        st->capture = nullptr;
        if (!st->invalidated) live_graphs.insert(graph);
    }
    if (st->invalidated) {
        delete graph;
        return fail(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
                    "cuStreamEndCapture: " + capture_name(st) + " was invalidated (" + st->why +
                        "); no graph");
    }
    *out = graph;
    return CUDA_SUCCESS;
}

namespace {

CUresult capture_info(CUstream s, int* status, unsigned long long* id) {
    NEED_CONTEXT();
    Stream* st = recording(s);
    if (status) *status = !st ? 0 : st->invalidated ? 2 : 1;  // NONE, ACTIVE, INVALIDATED
    if (id && st) *id = st->capture_id;
    return CUDA_SUCCESS;
}

}  // namespace

API CUresult cuStreamIsCapturing(CUstream s, int* status) {
    if (!status) return CUDA_ERROR_INVALID_VALUE;
    return capture_info(s, status, nullptr);
}
API CUresult cuStreamGetCaptureInfo(CUstream s, int* status, unsigned long long* id) {
    return capture_info(s, status, id);
}
API CUresult cuStreamGetCaptureInfo_v2(CUstream s, int* status, unsigned long long* id,
                                       CUgraph* graph, const CUgraphNode** deps, size_t* ndeps) {
    if (CUresult r = capture_info(s, status, id)) return r;
    Stream* st = recording(s);
    if (graph) *graph = st ? st->capture : nullptr;
    // One stream, nodes in order: the next node depends on the last one recorded.
    static thread_local CUgraphNode last;
    last = st && !st->capture->nodes.empty() ? st->capture->nodes.back().get() : nullptr;
    if (deps) *deps = last ? &last : nullptr;
    if (ndeps) *ndeps = last ? 1 : 0;
    return CUDA_SUCCESS;
}

API CUresult cuGraphDestroy(CUgraph g) {
    Graph* graph = static_cast<Graph*>(g);
    {
        std::lock_guard<std::mutex> lk(capture_mu);
        if (!live_graphs.erase(graph)) return CUDA_ERROR_INVALID_VALUE;
    }
    delete graph;  // nodes an executable graph still holds live on in it
    return CUDA_SUCCESS;
}

API CUresult cuGraphGetNodes(CUgraph g, CUgraphNode* nodes, size_t* count) {
    if (!count) return CUDA_ERROR_INVALID_VALUE;
    Graph* graph = static_cast<Graph*>(g);
    std::lock_guard<std::mutex> lk(capture_mu);
    if (!live_graphs.count(graph)) return CUDA_ERROR_INVALID_VALUE;
    const size_t n = graph->nodes.size();
    if (nodes) {
        for (size_t i = 0; i < *count; ++i) nodes[i] = i < n ? graph->nodes[i].get() : nullptr;
    }
    *count = n;
    return CUDA_SUCCESS;
}

// CU_GRAPH_NODE_TYPE_KERNEL 0, MEMCPY 1, MEMSET 2, HOST 3: a cuBLASLt matmul is kernels on a
// GPU, so it reports KERNEL.
API CUresult cuGraphNodeGetType(CUgraphNode node, int* type) {
    if (!node || !type) return CUDA_ERROR_INVALID_VALUE;
    switch (static_cast<Node*>(node)->kind) {
        case Node::KERNEL: case Node::ENQUEUED: *type = 0; break;
        case Node::COPY: *type = 1; break;
        case Node::SET: *type = 2; break;
        case Node::HOST: *type = 3; break;
    }
    return CUDA_SUCCESS;
}

API CUresult cuGraphInstantiateWithFlags(CUgraphExec* out, CUgraph g, unsigned long long) {
    NEED_CONTEXT();
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    Graph* graph = static_cast<Graph*>(g);
    std::lock_guard<std::mutex> lk(capture_mu);
    if (!live_graphs.count(graph)) return CUDA_ERROR_INVALID_VALUE;
    Exec* e = new Exec{graph->nodes};
    live_execs.insert(e);
    *out = e;
    return CUDA_SUCCESS;
}
API CUresult cuGraphInstantiate_v2(CUgraphExec* out, CUgraph g, CUgraphNode*, char*, size_t) {
    return cuGraphInstantiateWithFlags(out, g, 0);
}

API CUresult cuGraphExecDestroy(CUgraphExec x) {
    Exec* e = static_cast<Exec*>(x);
    {
        std::lock_guard<std::mutex> lk(capture_mu);
        if (!live_execs.erase(e)) return CUDA_ERROR_INVALID_VALUE;
    }
    delete e;
    return CUDA_SUCCESS;
}

API CUresult cuGraphUpload(CUgraphExec x, CUstream) {
    NEED_CONTEXT();
    std::lock_guard<std::mutex> lk(capture_mu);
    return live_execs.count(static_cast<Exec*>(x)) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

namespace {

// Runs one recorded node. Memory freed since the capture is an illegal address, as on a GPU.
CUresult replay(const Node& n) {
    switch (n.kind) {
        case Node::KERNEL: {
            // The values at a 64-byte aligned base (a vector's storage is only 16-byte aligned).
            std::vector<unsigned char> buf(n.param_data.size() + 64);
            unsigned char* base = reinterpret_cast<unsigned char*>(
                (reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
            if (!n.param_data.empty()) memcpy(base, n.param_data.data(), n.param_data.size());
            std::vector<void*> params;
            for (size_t at : n.param_offsets) params.push_back(base + at);
            return run_launch(n.fn, n.grid, n.block, n.smem, params.data());
        }
        case Node::COPY: {
            const bool dst_dev = mem_find((uintptr_t)n.dst, n.bytes, nullptr);
            const bool src_dev = mem_find((uintptr_t)n.src, n.bytes, nullptr);
            if (n.bytes && ((!dst_dev && !is_pinned(n.dst, n.bytes)) ||
                            (!src_dev && !is_pinned(n.src, n.bytes)))) {
                sticky.store(CUDA_ERROR_ILLEGAL_ADDRESS);
                return fail(CUDA_ERROR_ILLEGAL_ADDRESS,
                            "graph replay of " + n.what + ": a buffer of the copy was freed "
                            "after the capture");
            }
            memmove(n.dst, n.src, n.bytes);
            return CUDA_SUCCESS;
        }
        case Node::SET: {
            const CUresult r = memset_now(n.what.c_str(), (CUdeviceptr)n.dst, n.value, n.elem,
                                          n.pitch, n.width, n.height);
            if (r != CUDA_SUCCESS) {
                sticky.store(CUDA_ERROR_ILLEGAL_ADDRESS);
                return fail(CUDA_ERROR_ILLEGAL_ADDRESS,
                            "graph replay of " + n.what + ": the memory was freed after the "
                            "capture");
            }
            return CUDA_SUCCESS;
        }
        case Node::HOST:
            n.host_fn(n.ctx);
            return CUDA_SUCCESS;
        case Node::ENQUEUED:
            if (n.run(n.ctx) != 0) {
                sticky.store(CUDA_ERROR_LAUNCH_FAILED);
                return fail(CUDA_ERROR_LAUNCH_FAILED, "graph replay of " + n.what + " failed");
            }
            return CUDA_SUCCESS;
    }
    return CUDA_ERROR_UNKNOWN;
}

}  // namespace

API CUresult cuGraphLaunch(CUgraphExec x, CUstream s) {
    NEED_CONTEXT();
    Exec* e = static_cast<Exec*>(x);
    {
        std::lock_guard<std::mutex> lk(capture_mu);
        if (!live_execs.count(e)) return CUDA_ERROR_INVALID_VALUE;
    }
    if (Stream* st = recording(s)) {
        // A graph launched into a capture becomes part of it (a child graph on a GPU).
        if (st->invalidated) return invalidated(st, "cuGraphLaunch");
        for (const auto& n : e->nodes) st->capture->nodes.push_back(n);
        return CUDA_SUCCESS;
    }
    for (const auto& n : e->nodes)
        if (CUresult r = replay(*n)) return r;
    return CUDA_SUCCESS;
}

// ---- errors ----------------------------------------------------------------------------------------

namespace {

const char* error_name(int e) {
    switch (e) {
        case 0: return "CUDA_SUCCESS";
        case 1: return "CUDA_ERROR_INVALID_VALUE";
        case 2: return "CUDA_ERROR_OUT_OF_MEMORY";
        case 3: return "CUDA_ERROR_NOT_INITIALIZED";
        case 4: return "CUDA_ERROR_DEINITIALIZED";
        case 100: return "CUDA_ERROR_NO_DEVICE";
        case 101: return "CUDA_ERROR_INVALID_DEVICE";
        case 200: return "CUDA_ERROR_INVALID_IMAGE";
        case 201: return "CUDA_ERROR_INVALID_CONTEXT";
        case 209: return "CUDA_ERROR_NO_BINARY_FOR_GPU";
        case 400: return "CUDA_ERROR_INVALID_HANDLE";
        case 401: return "CUDA_ERROR_ILLEGAL_STATE";
        case 500: return "CUDA_ERROR_NOT_FOUND";
        case 600: return "CUDA_ERROR_NOT_READY";
        case 700: return "CUDA_ERROR_ILLEGAL_ADDRESS";
        case 701: return "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES";
        case 702: return "CUDA_ERROR_LAUNCH_TIMEOUT";
        case 710: return "CUDA_ERROR_ASSERT";
        case 715: return "CUDA_ERROR_ILLEGAL_INSTRUCTION";
        case 716: return "CUDA_ERROR_MISALIGNED_ADDRESS";
        case 719: return "CUDA_ERROR_LAUNCH_FAILED";
        case 801: return "CUDA_ERROR_NOT_SUPPORTED";
        case 900: return "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED";
        case 901: return "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED";
        case 903: return "CUDA_ERROR_STREAM_CAPTURE_UNMATCHED";
        case 905: return "CUDA_ERROR_STREAM_CAPTURE_ISOLATION";
        case 907: return "CUDA_ERROR_CAPTURED_EVENT";
        case 908: return "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD";
        default: return nullptr;
    }
}

const char* error_text(int e) {
    switch (e) {
        case 0: return "no error";
        case 1: return "invalid argument";
        case 2: return "out of memory";
        case 3: return "initialization error";
        case 200: return "device kernel image is invalid";
        case 201: return "invalid device context";
        case 209: return "no kernel image is available for execution on the device";
        case 400: return "invalid resource handle";
        case 500: return "named symbol not found";
        case 700: return "an illegal memory access was encountered";
        case 701: return "too many resources requested for launch";
        case 702: return "the launch timed out and was terminated";
        case 710: return "device-side assert triggered";
        case 715: return "an illegal instruction was encountered";
        case 716: return "misaligned address";
        case 719: return "unspecified launch failure";
        case 801: return "operation not supported";
        case 401: return "the operation cannot be performed in the present state";
        case 900: return "operation not permitted when stream is capturing";
        case 901: return "operation failed due to a previous error during capture";
        case 903: return "capture was not initiated in this stream";
        case 905: return "dependency created on uncaptured work in another stream";
        case 907: return "operation not permitted on an event last recorded in a capturing stream";
        case 908: return "attempt to terminate a thread-local capture sequence from another thread";
        default: return nullptr;
    }
}

}  // namespace

API CUresult cuGetErrorName(int e, const char** s) {
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    *s = error_name(e);
    return *s ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

API CUresult cuGetErrorString(int e, const char** s) {
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    *s = error_text(e);
    if (!*s) *s = error_name(e);
    return *s ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

// ---- the emulator's own entry points (tests and tools; never called by production code) ------

// 1 when [p, p+bytes) lies inside one live device allocation (the stand-in cuBLASLt's check).
API int kontext_emu_device_range(const void* p, size_t bytes) {
    return mem_find(reinterpret_cast<uintptr_t>(p), bytes, nullptr) ? 1 : 0;
}

// Launches of the kernel `name` so far (cuBLASLt's matmuls count as "cublasLtMatmul").
API unsigned long long kontext_emu_launches(const char* name) {
    std::lock_guard<std::mutex> g(stats_mu);
    auto it = launches.find(name);
    return it == launches.end() ? 0 : it->second;
}

// Work of the stand-in cuBLASLt on stream `s`: run now (`run(ctx)`, its status returned), or,
// when `s` is capturing, recorded as a node that runs it at every replay. `drop(ctx)` frees the
// context once it will not run again (after the run, or with the last graph holding the node).
API int kontext_emu_enqueue(CUstream s, const char* what, int (*run)(void*), void* ctx,
                            void (*drop)(void*)) {
    if (Stream* st = recording(s)) {
        auto n = std::make_shared<Node>();
        n->kind = Node::ENQUEUED;
        n->what = what;
        n->run = run;
        n->ctx = ctx;
        n->drop = drop;
        return record(st, n);  // on a refusal the node's destructor drops the context
    }
    const int r = run(ctx);
    drop(ctx);
    return r;
}

API void kontext_emu_count_launch(const char* name) {
    std::lock_guard<std::mutex> g(stats_mu);
    launches[name]++;
}

// Device memory in use now and at its peak, in bytes.
API unsigned long long kontext_emu_used_bytes() { return mem_used(); }
API unsigned long long kontext_emu_peak_bytes() {
    std::lock_guard<std::mutex> g(stats_mu);
    return peak_bytes;
}

// The message of the last failure (a launch, a copy, a module), empty if none.
API size_t kontext_emu_last_error(char* buf, size_t len) {
    std::lock_guard<std::mutex> g(err_mu);
    if (buf && len) snprintf(buf, len, "%s", last_error.c_str());
    return last_error.size();
}

// Tests only: forget a sticky fault (a real context would have to be recreated).
API void kontext_emu_clear_fault() {
    sticky.store(CUDA_SUCCESS);
    std::lock_guard<std::mutex> g(err_mu);
    last_error.clear();
}

// Tests only: change the order, the race check, the memory cap at run time.
API void kontext_emu_set_order(int order, unsigned long long seed) {
    settings_mut().order = order;
    settings_mut().seed = seed;
}
API void kontext_emu_set_racecheck(int on) { settings_mut().racecheck = on; }
API void kontext_emu_set_spin_limit(long passes) {
    settings_mut().spin_limit = passes > 0 ? passes : Settings{}.spin_limit;
}
API void kontext_emu_set_memory(unsigned long long bytes) { settings_mut().memory_bytes = bytes; }

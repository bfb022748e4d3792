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
#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <string>

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

struct Stream {
    int id;
};
struct Event {
    std::chrono::steady_clock::time_point t;
    bool recorded = false;
};

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
    *s = new Stream{next++};
    return CUDA_SUCCESS;
}
API CUresult cuStreamCreateWithPriority(CUstream* s, unsigned int f, int) {
    return cuStreamCreate(s, f);
}
API CUresult cuStreamDestroy_v2(CUstream s) {
    if (!s) return CUDA_ERROR_INVALID_HANDLE;
    delete static_cast<Stream*>(s);
    return CUDA_SUCCESS;
}
API CUresult cuStreamSynchronize(CUstream) {
    NEED_CONTEXT();
    return CUDA_SUCCESS;
}
API CUresult cuStreamQuery(CUstream) {
    NEED_CONTEXT();
    return CUDA_SUCCESS;
}
API CUresult cuStreamWaitEvent(CUstream, CUevent e, unsigned int) {
    NEED_CONTEXT();
    if (!e) return CUDA_ERROR_INVALID_HANDLE;
    return CUDA_SUCCESS;
}
API CUresult cuStreamIsCapturing(CUstream, int* status) {
    NEED_CONTEXT();
    if (status) *status = 0;
    return CUDA_SUCCESS;
}
API CUresult cuLaunchHostFunc(CUstream, void (*fn)(void*), void* data) {
    NEED_CONTEXT();
    if (!fn) return CUDA_ERROR_INVALID_VALUE;
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
API CUresult cuEventRecord(CUevent e, CUstream) {
    NEED_CONTEXT();
    if (!e) return CUDA_ERROR_INVALID_HANDLE;
    Event* ev = static_cast<Event*>(e);
    ev->t = std::chrono::steady_clock::now();
    ev->recorded = true;
    return CUDA_SUCCESS;
}
API CUresult cuEventSynchronize(CUevent e) {
    NEED_CONTEXT();
    if (!e) return CUDA_ERROR_INVALID_HANDLE;
    return CUDA_SUCCESS;
}
API CUresult cuEventQuery(CUevent e) {
    NEED_CONTEXT();
    if (!e) return CUDA_ERROR_INVALID_HANDLE;
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
    *p = malloc(bytes);
    return *p ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}
API CUresult cuMemAllocHost_v2(void** p, size_t bytes) { return cuMemHostAlloc(p, bytes, 0); }
API CUresult cuMemFreeHost(void* p) {
    free(p);
    return CUDA_SUCCESS;
}
API CUresult cuMemHostRegister_v2(void*, size_t, unsigned int) {
    NEED_CONTEXT();
    return CUDA_SUCCESS;
}
API CUresult cuMemHostUnregister(void*) { return CUDA_SUCCESS; }

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

API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t bytes) {
    NEED_CONTEXT();
    if (CUresult r = check_range("cuMemcpyHtoD", dst, bytes)) return r;
    if (bytes && !src) return CUDA_ERROR_INVALID_VALUE;
    memcpy(reinterpret_cast<void*>(dst), src, bytes);
    return CUDA_SUCCESS;
}
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t bytes, CUstream) {
    return cuMemcpyHtoD_v2(dst, src, bytes);
}
API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t bytes) {
    NEED_CONTEXT();
    if (CUresult r = check_range("cuMemcpyDtoH", src, bytes)) return r;
    if (bytes && !dst) return CUDA_ERROR_INVALID_VALUE;
    memcpy(dst, reinterpret_cast<const void*>(src), bytes);
    return CUDA_SUCCESS;
}
API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t bytes, CUstream) {
    return cuMemcpyDtoH_v2(dst, src, bytes);
}
API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes) {
    NEED_CONTEXT();
    if (CUresult r = check_range("cuMemcpyDtoD (destination)", dst, bytes)) return r;
    if (CUresult r = check_range("cuMemcpyDtoD (source)", src, bytes)) return r;
    memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes);
    return CUDA_SUCCESS;
}
API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream) {
    return cuMemcpyDtoD_v2(dst, src, bytes);
}
API CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    NEED_CONTEXT();
    if (CUresult r = check_range("cuMemsetD8", dst, n)) return r;
    memset(reinterpret_cast<void*>(dst), v, n);
    return CUDA_SUCCESS;
}
API CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream) {
    return cuMemsetD8_v2(dst, v, n);
}
API CUresult cuMemsetD32_v2(CUdeviceptr dst, unsigned int v, size_t n) {
    NEED_CONTEXT();
    if (dst % 4) return CUDA_ERROR_INVALID_VALUE;
    if (CUresult r = check_range("cuMemsetD32", dst, n * 4)) return r;
    unsigned int* p = reinterpret_cast<unsigned int*>(dst);
    for (size_t i = 0; i < n; ++i) p[i] = v;
    return CUDA_SUCCESS;
}
API CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned int v, size_t n, CUstream) {
    return cuMemsetD32_v2(dst, v, n);
}
API CUresult cuMemsetD2D8_v2(CUdeviceptr dst, size_t pitch, unsigned char v, size_t w, size_t h) {
    NEED_CONTEXT();
    if (h == 0 || w == 0) return CUDA_SUCCESS;
    if (pitch < w && h > 1) return CUDA_ERROR_INVALID_VALUE;
    if (CUresult r = check_range("cuMemsetD2D8", dst, pitch * (h - 1) + w)) return r;
    for (size_t r = 0; r < h; ++r) memset(reinterpret_cast<void*>(dst + r * pitch), v, w);
    return CUDA_SUCCESS;
}
API CUresult cuMemsetD2D8Async(CUdeviceptr dst, size_t pitch, unsigned char v, size_t w, size_t h,
                               CUstream) {
    return cuMemsetD2D8_v2(dst, pitch, v, w, h);
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

CUresult launch(Function* fn, EmuDim3 grid, EmuDim3 block, size_t smem, void** params) {
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
                            CUstream, void** params, void** extra) {
    NEED_CONTEXT();
    if (!f) return CUDA_ERROR_INVALID_HANDLE;
    if (extra) return fail(CUDA_ERROR_NOT_SUPPORTED, "cuLaunchKernel: `extra` is not supported");
    Function* fn = static_cast<Function*>(f);
    return launch(fn, EmuDim3{gx, gy, gz}, EmuDim3{bx, by, bz}, smem, params);
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

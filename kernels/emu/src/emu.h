// emu.h: the emulated driver's internals, shared by driver.cpp (the CUDA driver API), runtime.cpp
// (blocks of fibers, barriers, warp collectives), memory.cpp (guarded device memory) and fiber.cpp
// (the context switch).
#pragma once
#include <setjmp.h>
#include <stddef.h>
#include <stdint.h>

#include <atomic>
#include <string>
#include <vector>

#include "emu/abi.h"

namespace emu {

// ---- settings (KONTEXT_EMU_* environment variables, read once) -------------------------------
struct Settings {
    int cc_major = 9, cc_minor = 0;        // KONTEXT_EMU_CC=9.0
    uint64_t memory_bytes = 24ull << 30;   // KONTEXT_EMU_MEMORY=24G
    int threads = 0;                       // KONTEXT_EMU_THREADS (0: one per core)
    int order = 0;                         // KONTEXT_EMU_ORDER: 0 forward, 1 reverse, 2 shuffle
    uint64_t seed = 1;                     // KONTEXT_EMU_ORDER=shuffle:SEED
    int racecheck = 0;                     // KONTEXT_EMU_RACECHECK=1: every launch twice, compared
    int sms = 132;                         // multiprocessor count reported
    // Passes of a block in which only yields happened before a spin-wait counts as hung
    // (kontext_emu_set_spin_limit: a test expecting a hang need not wait minutes for it).
    long spin_limit = 50'000'000;
};
const Settings& settings();
Settings& settings_mut();  // the control entry points (kontext_emu_set_*) change it

// Block and thread orders.
enum Order { ORDER_FORWARD = 0, ORDER_REVERSE = 1, ORDER_SHUFFLE = 2 };

// ---- fibers (fiber.cpp) ----------------------------------------------------------------------
// Saves the callee-saved registers and the FPU control words on the current stack, stores the
// stack pointer in *save, and resumes the context whose stack pointer is `to`.
extern "C" void emu_switch(void** save, void* to);
// A fresh stack whose first switch calls entry(arg); returns its initial stack pointer.
void* fiber_prepare(char* stack_top, void (*entry)(void*), void* arg);

// ---- device memory (memory.cpp) --------------------------------------------------------------
struct Allocation {
    uintptr_t base;      // what cuMemAlloc returned
    size_t bytes;        // what was asked for
    uintptr_t map;       // the mapping: guard page, head slack, data, tail slack, guard page
    size_t map_bytes;
    uintptr_t user_end;  // base + bytes rounded up to 256 (tail slack up to the guard page)
};
int mem_alloc(size_t bytes, uintptr_t* out);  // CUresult
int mem_free(uintptr_t base);
// The live allocation that holds [p, p + bytes), or false.
bool mem_find(uintptr_t p, size_t bytes, Allocation* out);
// The allocation whose guard page holds `addr` (a fault's address): how far past (or before) it.
bool mem_guard_hit(uintptr_t addr, Allocation* out);
void mem_info(uint64_t* free_bytes, uint64_t* total);
uint64_t mem_used();
// Canary check of every allocation's slack: the first allocation a kernel wrote past, or false.
bool mem_check_canaries(Allocation* bad, size_t* offset);
// Snapshots of every live allocation's data, for the race check.
struct Snapshot {
    std::vector<std::pair<Allocation, std::vector<unsigned char>>> data;
};
void mem_snapshot(Snapshot* s);
void mem_restore(const Snapshot& s);
// First difference between live memory and a snapshot: allocation and offset.
bool mem_compare(const Snapshot& s, Allocation* where, size_t* offset);

// ---- modules and launches (runtime.cpp) ------------------------------------------------------
struct Module {
    void* handle;  // dlopen
    const EmuModuleInfo* info;
    void* (*tls_touch)();
    size_t tls_bytes;  // static shared memory (the module's thread-local block)
    std::string path;
};

struct Function {
    Module* module;
    const EmuKernelInfo* kernel;
    int max_dynamic_smem;  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES (default 48 KiB − static)
};

struct Launch {
    Function* f;
    EmuDim3 grid, block;
    size_t dyn_smem;
    void** params;
    int order;
    uint64_t seed;
    long spin_limit;
};

// Runs every block of the launch on the worker threads. Returns a CUresult; on failure `error`
// holds the message (kernel, launch configuration, block, thread, what happened).
int run_grid(const Launch& l, std::string* error);
// The runtime table handed to modules.
const EmuRuntime* runtime_table();

// CUDA error codes used here (values of CUresult).
enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_DEINITIALIZED = 4,
    CUDA_ERROR_NO_DEVICE = 100,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_NO_BINARY_FOR_GPU = 209,
    CUDA_ERROR_INVALID_SOURCE = 300,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_ILLEGAL_STATE = 401,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_LAUNCH_TIMEOUT = 702,
    CUDA_ERROR_ASSERT = 710,
    CUDA_ERROR_ILLEGAL_INSTRUCTION = 715,
    CUDA_ERROR_MISALIGNED_ADDRESS = 716,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900,
    CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 901,
    CUDA_ERROR_STREAM_CAPTURE_UNMATCHED = 903,
    CUDA_ERROR_STREAM_CAPTURE_ISOLATION = 905,
    CUDA_ERROR_CAPTURED_EVENT = 907,
    CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD = 908,
    CUDA_ERROR_UNKNOWN = 999,
};

void log(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

}  // namespace emu

// abi.h: the contract between an emulated module (a kernel family compiled by the stand-in NVRTC
// into a shared object) and the emulated driver (libcuda.so.1) that loads and runs it.
//
// A module exports three C symbols:
//   __emu_module_info  an EmuModuleInfo: ABI version, the architecture it was built for, and the
//                      table of its `extern "C" __global__` kernels (name, entry, launch bounds);
//   __emu_bind         called once by the driver after dlopen, hands the module the runtime table;
//   __emu_tls_touch    touches the module's thread-local storage, where its static `__shared__`
//                      arrays live, so the driver can find (dlinfo RTLD_DI_TLS_DATA) and poison it
//                      before each block.
// Modules call into the runtime only through EmuRuntime: a table, not symbols, because cudarc
// opens libcuda RTLD_LOCAL and a dlopen'd module could not resolve the driver's symbols.
#pragma once
#include <stddef.h>
#include <stdint.h>

#define EMU_ABI_VERSION 2

#ifdef __cplusplus
extern "C" {
#endif

struct EmuDim3 {
    unsigned int x, y, z;
};

// The state of one emulated CUDA thread, as the device code sees it.
struct EmuThread {
    struct EmuDim3 thread_idx, block_idx, block_dim, grid_dim;
    unsigned int linear;  // threadIdx.x + blockDim.x·(threadIdx.y + blockDim.y·threadIdx.z)
    unsigned int lane;    // linear % 32
    unsigned int warp;    // linear / 32
    // This block's dynamic shared memory (extern __shared__): the base of a 256 KiB-aligned
    // window, so a 32-bit shared-space address (__cvta_generic_to_shared, a wgmma descriptor's
    // start field) is the offset from it. Static __shared__ arrays live elsewhere (TLS).
    void* dyn_smem;
    size_t dyn_smem_bytes;
};

// Warp collectives: every lane named in `mask` must reach the same collective with the same
// mask, or the launch fails naming the kernel (a GPU would hang or compute garbage).
enum EmuCollective {
    EMU_SHFL_IDX = 1,   // arg = source lane (within width)
    EMU_SHFL_UP,        // arg = delta
    EMU_SHFL_DOWN,      // arg = delta
    EMU_SHFL_XOR,       // arg = lane mask
    EMU_VOTE_BALLOT,    // value = predicate; result = mask of lanes with a nonzero predicate
    EMU_VOTE_ALL,
    EMU_VOTE_ANY,
    EMU_SYNCWARP,
    EMU_MATCH_ANY,      // result = mask of lanes whose value equals this lane's
    EMU_REDUCE_ADD,     // unsigned 32-bit sum
    EMU_REDUCE_MIN,     // unsigned
    EMU_REDUCE_MAX,     // unsigned
};

// Block barrier variants (bar.sync / bar.red).
enum EmuBarrier {
    EMU_BAR_SYNC = 0,
    EMU_BAR_COUNT,  // __syncthreads_count
    EMU_BAR_AND,    // __syncthreads_and
    EMU_BAR_OR,     // __syncthreads_or
};

struct EmuRuntime {
    int abi_version;
    // The calling emulated thread.
    struct EmuThread* (*current)(void);
    // __syncthreads and friends: returns the reduction (0 for EMU_BAR_SYNC).
    int (*barrier)(int kind, int predicate);
    // One warp collective over 64-bit values (shuffles of narrower types zero-extend);
    // `width` is the shuffle segment width (a power of two ≤ 32).
    uint64_t (*collective)(int kind, unsigned int mask, uint64_t value, int arg, int width);
    // Every lane of `mask` contributes `bytes` bytes at `mine`; every lane receives all 32 lanes'
    // contributions at `all` (32·bytes; lanes outside the mask left as they are). The building
    // block of the PTX twins (ldmatrix, mma.sync): a fragment exchange among the lanes.
    void (*exchange)(unsigned int mask, const void* mine, void* all, size_t bytes);
    // The same among the threads of a group of `group` consecutive warps (4 for a warpgroup):
    // all threads of the group arrive; `all` receives 32·group contributions.
    void (*group_exchange)(int group, const void* mine, void* all, size_t bytes);
    // Stops the launch with an error naming the kernel: __trap(), a failed device assert, a
    // misuse a PTX twin detects. Does not return.
    void (*fail)(const char* what);
    // The device memory check: does [p, p+bytes) lie inside one live allocation? Used by the
    // twins of instructions that take raw addresses (cp.async, bulk copies).
    int (*is_device)(const void* p, size_t bytes);
    // Lets the other threads of the block run (a spin-wait in device code, mbarrier try_wait):
    // without it a fiber that polls would never give way.
    void (*yield)(void);
};

struct EmuKernelInfo {
    const char* name;
    void (*entry)(void** params);  // unpacks cuLaunchKernel's parameter array and calls the kernel
    int max_threads;               // __launch_bounds__ (0: none given)
    // The parameters' sizes, in order: what a stream capture copies out of cuLaunchKernel's
    // array, as the real driver copies parameter values into a kernel node when it records it.
    int param_count;
    const size_t* param_sizes;
};

struct EmuModuleInfo {
    int abi_version;
    int arch;             // 80, 89, 90, ... (the --gpu-architecture it was compiled for)
    int arch_specific;    // 1 for sm_90a-style targets: runs only on exactly that CC
    int kernel_count;
    const struct EmuKernelInfo* kernels;
};

#ifdef __cplusplus
}
#endif

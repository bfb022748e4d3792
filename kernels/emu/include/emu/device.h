// device.h: the CUDA device vocabulary for kernels compiled by g++ for the emulated GPU.
//
// The stand-in NVRTC (src/nvrtc.cpp) force-includes this header before a kernel family, so the
// unchanged `kernels/cuda/*.cu` compile as C++17 for the host. Each CUDA thread becomes a fiber
// (src/runtime.cpp); everything a thread cannot do alone (barriers, warp collectives, the
// fragment exchanges of the PTX twins) is a call into the runtime through `__emu_rt`, the table
// the driver hands the module when it loads it (emu/abi.h).
//
// Mapping, and why:
// - `__shared__` is `static thread_local`: the threads of a block are fibers on one OS thread,
//   and each worker thread runs one block at a time, so thread-local storage is exactly "one
//   copy per block". The driver poisons it (0xFF bytes: NaN in f32 and bf16) before every
//   block, so a read of shared memory nobody wrote shows up in the results.
// - Vector types carry their CUDA alignment; modules are built with g++'s alignment sanitizer
//   in trap mode, so a misaligned float4 / bf162 / int2 access stops the launch as the
//   GPU's "misaligned address" fault does, instead of working as it would on x86.
// - Math: glibc's (≤ 1 ulp; CUDA's fast paths are ≤ 2), rsqrtf exact, no FMA contraction:
//   close to a GPU, not bit-identical (kernels/README.md).
#pragma once
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "emu/abi.h"

#define KONTEXT_EMU 1

#define __global__
#define __device__
#define __host__
#define __shared__ static thread_local
#define __constant__ static
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __grid_constant__

// Set once by the driver through __emu_bind (defined in the code the stand-in NVRTC appends).
static const struct EmuRuntime* __emu_rt;

static inline struct EmuThread* __emu_self() { return __emu_rt->current(); }

#define threadIdx (__emu_self()->thread_idx)
#define blockIdx (__emu_self()->block_idx)
#define blockDim (__emu_self()->block_dim)
#define gridDim (__emu_self()->grid_dim)
#define warpSize 32

// ---- vector types ----------------------------------------------------------------------------
#define EMU_VEC2(T, name, al)           \
    struct __align__(al) name {         \
        T x, y;                         \
    };                                  \
    static inline name make_##name(T x, T y) { \
        name v;                         \
        v.x = x;                        \
        v.y = y;                        \
        return v;                       \
    }
#define EMU_VEC4(T, name, al)                         \
    struct __align__(al) name {                       \
        T x, y, z, w;                                 \
    };                                                \
    static inline name make_##name(T x, T y, T z, T w) { \
        name v;                                       \
        v.x = x;                                      \
        v.y = y;                                      \
        v.z = z;                                      \
        v.w = w;                                      \
        return v;                                     \
    }
EMU_VEC2(float, float2, 8)
EMU_VEC4(float, float4, 16)
EMU_VEC2(int, int2, 8)
EMU_VEC4(int, int4, 16)
EMU_VEC2(unsigned int, uint2, 8)
EMU_VEC4(unsigned int, uint4, 16)
EMU_VEC2(unsigned short, ushort2, 4)
EMU_VEC4(unsigned short, ushort4, 8)
EMU_VEC2(unsigned char, uchar2, 2)
EMU_VEC4(unsigned char, uchar4, 4)
EMU_VEC2(short, short2, 4)
EMU_VEC2(double, double2, 16)
EMU_VEC2(long long, longlong2, 16)
#undef EMU_VEC2
#undef EMU_VEC4
struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
};

// ---- bit casts and integer intrinsics --------------------------------------------------------
static inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}
static inline int __float_as_int(float f) {
    int i;
    memcpy(&i, &f, 4);
    return i;
}
static inline float __uint_as_float(unsigned int i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}
static inline unsigned int __float_as_uint(float f) {
    unsigned int i;
    memcpy(&i, &f, 4);
    return i;
}
static inline double __longlong_as_double(long long i) {
    double d;
    memcpy(&d, &i, 8);
    return d;
}
static inline long long __double_as_longlong(double d) {
    long long i;
    memcpy(&i, &d, 8);
    return i;
}
static inline int __popc(unsigned int x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned int)x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline unsigned int __brev(unsigned int x) {
    unsigned int r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}

static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
static inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }

// ---- float intrinsics ------------------------------------------------------------------------
// The _rn forms are what NVRTC will not contract into an FMA; g++ contracts nothing anyway.
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline float __frcp_rn(float a) { return 1.0f / a; }
static inline float __fsqrt_rn(float a) { return sqrtf(a); }
static inline float __fdividef(float a, float b) { return a / b; }
static inline float rsqrtf(float a) { return 1.0f / sqrtf(a); }
// __expf, __logf, __sinf, __cosf, __powf, exp10f: glibc declares them (same meaning).
static inline float __saturatef(float a) { return a != a ? 0.0f : fminf(fmaxf(a, 0.0f), 1.0f); }

template <class T>
static inline T __ldg(const T* p) {
    return *p;
}

// ---- barriers and warp collectives -----------------------------------------------------------
static inline void __syncthreads() { __emu_rt->barrier(EMU_BAR_SYNC, 0); }
static inline int __syncthreads_count(int p) { return __emu_rt->barrier(EMU_BAR_COUNT, p); }
static inline int __syncthreads_and(int p) { return __emu_rt->barrier(EMU_BAR_AND, p); }
static inline int __syncthreads_or(int p) { return __emu_rt->barrier(EMU_BAR_OR, p); }
static inline void __syncwarp(unsigned int mask = 0xffffffffu) {
    __emu_rt->collective(EMU_SYNCWARP, mask, 0, 0, 32);
}
static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __nanosleep(unsigned int) { __emu_rt->yield(); }
static inline void __trap() { __emu_rt->fail("__trap() called"); __builtin_unreachable(); }

template <class T>
static inline uint64_t __emu_bits(T v) {
    static_assert(sizeof(T) <= 8, "warp collectives move at most 64 bits");
    uint64_t u = 0;
    memcpy(&u, &v, sizeof(T));
    return u;
}
template <class T>
static inline T __emu_from_bits(uint64_t u) {
    T v;
    memcpy(&v, &u, sizeof(T));
    return v;
}

template <class T>
static inline T __shfl_sync(unsigned int mask, T v, int src, int width = 32) {
    return __emu_from_bits<T>(__emu_rt->collective(EMU_SHFL_IDX, mask, __emu_bits(v), src, width));
}
template <class T>
static inline T __shfl_up_sync(unsigned int mask, T v, unsigned int delta, int width = 32) {
    return __emu_from_bits<T>(
        __emu_rt->collective(EMU_SHFL_UP, mask, __emu_bits(v), (int)delta, width));
}
template <class T>
static inline T __shfl_down_sync(unsigned int mask, T v, unsigned int delta, int width = 32) {
    return __emu_from_bits<T>(
        __emu_rt->collective(EMU_SHFL_DOWN, mask, __emu_bits(v), (int)delta, width));
}
template <class T>
static inline T __shfl_xor_sync(unsigned int mask, T v, int lane_mask, int width = 32) {
    return __emu_from_bits<T>(
        __emu_rt->collective(EMU_SHFL_XOR, mask, __emu_bits(v), lane_mask, width));
}
static inline unsigned int __ballot_sync(unsigned int mask, int p) {
    return (unsigned int)__emu_rt->collective(EMU_VOTE_BALLOT, mask, p != 0, 0, 32);
}
static inline int __all_sync(unsigned int mask, int p) {
    return (int)__emu_rt->collective(EMU_VOTE_ALL, mask, p != 0, 0, 32);
}
static inline int __any_sync(unsigned int mask, int p) {
    return (int)__emu_rt->collective(EMU_VOTE_ANY, mask, p != 0, 0, 32);
}
template <class T>
static inline unsigned int __match_any_sync(unsigned int mask, T v) {
    return (unsigned int)__emu_rt->collective(EMU_MATCH_ANY, mask, __emu_bits(v), 0, 32);
}
static inline unsigned int __reduce_add_sync(unsigned int mask, unsigned int v) {
    return (unsigned int)__emu_rt->collective(EMU_REDUCE_ADD, mask, v, 0, 32);
}
static inline unsigned int __reduce_min_sync(unsigned int mask, unsigned int v) {
    return (unsigned int)__emu_rt->collective(EMU_REDUCE_MIN, mask, v, 0, 32);
}
static inline unsigned int __reduce_max_sync(unsigned int mask, unsigned int v) {
    return (unsigned int)__emu_rt->collective(EMU_REDUCE_MAX, mask, v, 0, 32);
}

// ---- atomics ---------------------------------------------------------------------------------
// Blocks run concurrently on several worker threads, so these are real atomics.
#define EMU_ATOMIC_INT(T)                                                                      \
    static inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); } \
    static inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); } \
    static inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); } \
    static inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }   \
    static inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST); } \
    static inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); } \
    static inline T atomicCAS(T* p, T cmp, T v) {                                              \
        __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);    \
        return cmp;                                                                            \
    }                                                                                          \
    static inline T atomicMax(T* p, T v) {                                                     \
        T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);                                          \
        while (old < v &&                                                                      \
               !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) { \
        }                                                                                      \
        return old;                                                                            \
    }                                                                                          \
    static inline T atomicMin(T* p, T v) {                                                     \
        T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);                                          \
        while (old > v &&                                                                      \
               !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) { \
        }                                                                                      \
        return old;                                                                            \
    }
EMU_ATOMIC_INT(int)
EMU_ATOMIC_INT(unsigned int)
EMU_ATOMIC_INT(unsigned long long)
EMU_ATOMIC_INT(long long)
#undef EMU_ATOMIC_INT

template <class F, class U>
static inline F __emu_atomic_float_add(F* p, F v) {
    U* q = reinterpret_cast<U*>(p);
    U old = __atomic_load_n(q, __ATOMIC_SEQ_CST);
    for (;;) {
        F f;
        memcpy(&f, &old, sizeof(F));
        F n = f + v;
        U nu;
        memcpy(&nu, &n, sizeof(F));
        if (__atomic_compare_exchange_n(q, &old, nu, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            return f;
    }
}
static inline float atomicAdd(float* p, float v) {
    return __emu_atomic_float_add<float, unsigned int>(p, v);
}
static inline double atomicAdd(double* p, double v) {
    return __emu_atomic_float_add<double, unsigned long long>(p, v);
}
static inline float atomicExch(float* p, float v) {
    return __uint_as_float(atomicExch(reinterpret_cast<unsigned int*>(p), __float_as_uint(v)));
}

// ---- clocks ----------------------------------------------------------------------------------
static inline long long clock64() { return (long long)__builtin_ia32_rdtsc(); }
static inline int clock() { return (int)clock64(); }

#undef assert
#define assert(e) ((e) ? (void)0 : __emu_rt->fail("device assertion failed: " #e))

// cuda_fp8.h for the emulated GPU: the fp8 storage types and the C-style conversions of NVIDIA's
// header, with its rounding, saturation and NaN rules (emu/numerics.h says which, and
// tests/numerics_test.cpp checks them against NVIDIA's header). NVRTC compiles the same kernels
// against NVIDIA's header.
//
// The types are trivial (no user-declared constructor), as the emulation needs: a non-trivial
// type would make every thread-local `__shared__` array of it carry an initialisation guard. So
// NVIDIA's converting constructors (`__nv_fp8_e4m3 x(1.0f)`) do not compile here; the kernels
// convert with __nv_cvt_float_to_fp8 and friends, and read back with an explicit cast
// (`(float)x`), which NVIDIA's header offers too.
//
// The double-precision entry points (__nv_cvt_double_to_fp8, …) are left out: NVIDIA rounds
// those straight from double, which the f32-based numerics here would not reproduce.
#pragma once
#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "emu/device.h"
#include "emu/numerics.h"

typedef unsigned char __nv_fp8_storage_t;
typedef unsigned short int __nv_fp8x2_storage_t;
typedef unsigned int __nv_fp8x4_storage_t;

typedef enum __nv_saturation_t {
    __NV_NOSAT,
    __NV_SATFINITE,
} __nv_saturation_t;

typedef enum __nv_fp8_interpretation_t {
    __NV_E4M3,
    __NV_E5M2,
} __nv_fp8_interpretation_t;

// An out-of-range enum value reads as NVIDIA's header reads it: encoding treats anything but
// __NV_E4M3 as e5m2, decoding anything but __NV_E5M2 as e4m3, saturation anything but
// __NV_SATFINITE as no saturation.
static inline __nv_fp8_storage_t __nv_cvt_float_to_fp8(float x, __nv_saturation_t saturate,
                                                       __nv_fp8_interpretation_t kind) {
    const int sat = saturate == __NV_SATFINITE;
    return kind == __NV_E4M3 ? emu_f32_to_e4m3(x, sat) : emu_f32_to_e5m2(x, sat);
}

// Packed pairs: element .x in the low byte, .y in the high byte.
static inline __nv_fp8x2_storage_t __nv_cvt_float2_to_fp8x2(float2 x, __nv_saturation_t saturate,
                                                            __nv_fp8_interpretation_t kind) {
    const unsigned lo = __nv_cvt_float_to_fp8(x.x, saturate, kind);
    const unsigned hi = __nv_cvt_float_to_fp8(x.y, saturate, kind);
    return (__nv_fp8x2_storage_t)(lo | (hi << 8));
}

// Half and bf16 inputs widen exactly to f32 first, as NVIDIA's host code does; the device's
// direct f16x2 conversion rounds the same value once, so the result is the same.
static inline __nv_fp8_storage_t __nv_cvt_halfraw_to_fp8(__half_raw x, __nv_saturation_t saturate,
                                                         __nv_fp8_interpretation_t kind) {
    return __nv_cvt_float_to_fp8(emu_f16_to_f32(x.x), saturate, kind);
}

static inline __nv_fp8x2_storage_t __nv_cvt_halfraw2_to_fp8x2(__half2_raw x,
                                                              __nv_saturation_t saturate,
                                                              __nv_fp8_interpretation_t kind) {
    const unsigned lo = __nv_cvt_float_to_fp8(emu_f16_to_f32(x.x), saturate, kind);
    const unsigned hi = __nv_cvt_float_to_fp8(emu_f16_to_f32(x.y), saturate, kind);
    return (__nv_fp8x2_storage_t)(lo | (hi << 8));
}

static inline __nv_fp8_storage_t __nv_cvt_bfloat16raw_to_fp8(__nv_bfloat16_raw x,
                                                             __nv_saturation_t saturate,
                                                             __nv_fp8_interpretation_t kind) {
    return __nv_cvt_float_to_fp8(emu_bf16_to_f32(x.x), saturate, kind);
}

static inline __nv_fp8x2_storage_t __nv_cvt_bfloat16raw2_to_fp8x2(__nv_bfloat162_raw x,
                                                                  __nv_saturation_t saturate,
                                                                  __nv_fp8_interpretation_t kind) {
    const unsigned lo = __nv_cvt_float_to_fp8(emu_bf16_to_f32(x.x), saturate, kind);
    const unsigned hi = __nv_cvt_float_to_fp8(emu_bf16_to_f32(x.y), saturate, kind);
    return (__nv_fp8x2_storage_t)(lo | (hi << 8));
}

static inline unsigned short __emu_fp8_to_f16(unsigned c, __nv_fp8_interpretation_t kind) {
    return kind == __NV_E5M2 ? emu_e5m2_to_f16((uint8_t)c) : emu_e4m3_to_f16((uint8_t)c);
}

static inline __half_raw __nv_cvt_fp8_to_halfraw(__nv_fp8_storage_t x,
                                                 __nv_fp8_interpretation_t kind) {
    __half_raw r;
    r.x = __emu_fp8_to_f16(x, kind);
    return r;
}

static inline __half2_raw __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t x,
                                                     __nv_fp8_interpretation_t kind) {
    __half2_raw r;
    r.x = __emu_fp8_to_f16(x & 0xFFu, kind);
    r.y = __emu_fp8_to_f16(x >> 8, kind);
    return r;
}

// The value types: storage plus NVIDIA's explicit read-back operators (operators, unlike
// constructors, keep the type trivial). Reading back goes through half, as NVIDIA's does.
#define EMU_FP8_TYPES(kind, KIND)                                                          \
    struct __align__(1) __nv_fp8_##kind {                                                 \
        __nv_fp8_storage_t __x;                                                           \
        explicit operator __half() const {                                                \
            return __ushort_as_half(__emu_fp8_to_f16(__x, KIND));                         \
        }                                                                                 \
        explicit operator float() const { return emu_f16_to_f32(__emu_fp8_to_f16(__x, KIND)); } \
    };                                                                                    \
    struct __align__(2) __nv_fp8x2_##kind {                                               \
        __nv_fp8x2_storage_t __x;                                                         \
        explicit operator __half2() const {                                               \
            return __halves2half2(__ushort_as_half(__emu_fp8_to_f16(__x & 0xFFu, KIND)),  \
                                  __ushort_as_half(__emu_fp8_to_f16(__x >> 8, KIND)));    \
        }                                                                                 \
        explicit operator float2() const {                                                \
            return make_float2(emu_f16_to_f32(__emu_fp8_to_f16(__x & 0xFFu, KIND)),       \
                               emu_f16_to_f32(__emu_fp8_to_f16(__x >> 8, KIND)));         \
        }                                                                                 \
    };                                                                                    \
    struct __align__(4) __nv_fp8x4_##kind {                                               \
        __nv_fp8x4_storage_t __x;                                                         \
        explicit operator float4() const {                                                \
            return make_float4(emu_f16_to_f32(__emu_fp8_to_f16(__x & 0xFFu, KIND)),       \
                               emu_f16_to_f32(__emu_fp8_to_f16((__x >> 8) & 0xFFu, KIND)), \
                               emu_f16_to_f32(__emu_fp8_to_f16((__x >> 16) & 0xFFu, KIND)), \
                               emu_f16_to_f32(__emu_fp8_to_f16(__x >> 24, KIND)));        \
        }                                                                                 \
    };
EMU_FP8_TYPES(e4m3, __NV_E4M3)
EMU_FP8_TYPES(e5m2, __NV_E5M2)
#undef EMU_FP8_TYPES

// cuda_bf16.h for the emulated GPU: the bf16 types and the conversions the kernels use, with the
// hardware's rounding (emu/numerics.h). NVRTC compiles the same kernels against NVIDIA's header.
//
// The types are trivial (no user-declared constructor), as the emulation needs: a non-trivial
// type would make every thread-local `__shared__` array of it carry an initialisation guard. So
// `bf16 x = 1.0f;` does not compile here; the kernels convert explicitly (__float2bfloat16_rn).
#pragma once
#include "emu/device.h"
#include "emu/numerics.h"

struct __align__(2) __nv_bfloat16_raw {
    unsigned short x;
};

struct __align__(4) __nv_bfloat162_raw {
    unsigned short x, y;
};

struct __align__(2) __nv_bfloat16 {
    unsigned short __x;
    // A conversion operator, unlike a constructor, leaves the type trivial.
    operator __nv_bfloat16_raw() const {
        __nv_bfloat16_raw r;
        r.x = __x;
        return r;
    }
};

struct __align__(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
    operator __nv_bfloat162_raw() const {
        __nv_bfloat162_raw r;
        r.x = x.__x;
        r.y = y.__x;
        return r;
    }
};

typedef struct __nv_bfloat16 nv_bfloat16;
typedef struct __nv_bfloat162 nv_bfloat162;

static inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) {
    __nv_bfloat16 h;
    h.__x = u;
    return h;
}
static inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
static inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    return __ushort_as_bfloat16(emu_f32_to_bf16_rn(f));
}
static inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
static inline float __bfloat162float(__nv_bfloat16 h) { return emu_bf16_to_f32(h.__x); }
static inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) {
    __nv_bfloat162 r;
    r.x = a;
    r.y = b;
    return r;
}
static inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return __halves2bfloat162(__float2bfloat16_rn(a), __float2bfloat16_rn(b));
}
static inline __nv_bfloat162 __float22bfloat162_rn(float2 f) {
    return __floats2bfloat162_rn(f.x, f.y);
}
static inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) {
    return __halves2bfloat162(a, a);
}
static inline float2 __bfloat1622float2(__nv_bfloat162 h) {
    return make_float2(__bfloat162float(h.x), __bfloat162float(h.y));
}
static inline float __low2float(__nv_bfloat162 h) { return __bfloat162float(h.x); }
static inline float __high2float(__nv_bfloat162 h) { return __bfloat162float(h.y); }
static inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 h) { return h.x; }
static inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 h) { return h.y; }

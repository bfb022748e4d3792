// cuda_fp16.h for the emulated GPU: the half types and the conversions the kernels use, with the
// hardware's rounding (emu/numerics.h). NVRTC compiles the same kernels against NVIDIA's header.
//
// The types are trivial (no user-declared constructor), as the emulation needs: a non-trivial
// type would make every thread-local `__shared__` array of it carry an initialisation guard. So
// `__half x = 1.0f;` does not compile here, and neither does half arithmetic (`a + b`): NVIDIA's
// __half would compute it in half, and an implicit float conversion here would silently compute
// it in float instead. The kernels convert explicitly (__float2half_rn, __half2float).
#pragma once
#include "emu/device.h"
#include "emu/numerics.h"

struct __align__(2) __half_raw {
    unsigned short x;
};

struct __align__(4) __half2_raw {
    unsigned short x, y;
};

struct __align__(2) __half {
    unsigned short __x;
    // A conversion operator, unlike a constructor, leaves the type trivial.
    operator __half_raw() const {
        __half_raw r;
        r.x = __x;
        return r;
    }
};

struct __align__(4) __half2 {
    __half x, y;
    operator __half2_raw() const {
        __half2_raw r;
        r.x = x.__x;
        r.y = y.__x;
        return r;
    }
};

typedef struct __half half;
typedef struct __half2 half2;

static inline __half __ushort_as_half(unsigned short u) {
    __half h;
    h.__x = u;
    return h;
}
static inline unsigned short __half_as_ushort(__half h) { return h.__x; }
static inline __half __short_as_half(short i) { return __ushort_as_half((unsigned short)i); }
static inline short __half_as_short(__half h) { return (short)h.__x; }

static inline __half __float2half_rn(float f) { return __ushort_as_half(emu_f32_to_f16_rn(f)); }
static inline __half __float2half(float f) { return __float2half_rn(f); }
static inline float __half2float(__half h) { return emu_f16_to_f32(h.__x); }

static inline __half2 __halves2half2(__half a, __half b) {
    __half2 r;
    r.x = a;
    r.y = b;
    return r;
}
static inline __half2 __floats2half2_rn(float a, float b) {
    return __halves2half2(__float2half_rn(a), __float2half_rn(b));
}
static inline __half2 __float2half2_rn(float a) {
    const __half h = __float2half_rn(a);
    return __halves2half2(h, h);
}
static inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }
static inline float2 __half22float2(__half2 h) {
    return make_float2(__half2float(h.x), __half2float(h.y));
}
static inline __half2 __half2half2(__half a) { return __halves2half2(a, a); }
static inline float __low2float(__half2 h) { return __half2float(h.x); }
static inline float __high2float(__half2 h) { return __half2float(h.y); }
static inline __half __low2half(__half2 h) { return h.x; }
static inline __half __high2half(__half2 h) { return h.y; }
static inline __half2 __low2half2(__half2 h) { return __halves2half2(h.x, h.x); }
static inline __half2 __high2half2(__half2 h) { return __halves2half2(h.y, h.y); }
static inline __half2 __lowhigh2highlow(__half2 h) { return __halves2half2(h.y, h.x); }

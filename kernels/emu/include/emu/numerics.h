// numerics.h: the number formats of the emulated GPU, bit for bit as NVIDIA converts them.
// Shared by the device vocabulary (device.h, cuda_bf16.h, cuda_fp16.h, cuda_fp8.h) and the
// stand-in cuBLASLt, so that a kernel's bf16 store and a GEMM's bf16 output round the same way.
// Plain C (static inline, no C++), so any of the emulator's sources can use it.
//
// The oracle is NVIDIA's own cuda_bf16.hpp / cuda_fp16.hpp / cuda_fp8.hpp host code (the CUDA
// 12.9 wheel scripts/nvrtc-env installs); tests/numerics_test.cpp checks every function here
// against it, exhaustively where the input has at most 16 bits. What that code does:
// - f32 → bf16 / f16: round to nearest even, subnormals kept, overflow to ±inf; any NaN becomes
//   the canonical 0x7FFF (sign dropped), as cvt.rn.{bf16,f16}.f32 does.
// - bf16 → f32 is a shift (a NaN keeps its payload); f16 → f32 is exact, except that every NaN
//   becomes the canonical 0x7FFFFFFF (sign and payload dropped), as NVIDIA's __half2float does.
// - fp8: e4m3 is the "fn" kind (bias 7, max 448, no infinities, NaN only at 0x7F / 0xFF);
//   e5m2 is the top byte of an IEEE half (bias 15, max 57344, infinities and NaNs).
//   f32 → fp8 rounds to nearest even; any NaN becomes 0x7F in both kinds. Past max:
//     satfinite: ±max (±inf too);  nosat: e4m3 → NaN with the input's sign (0x7F / 0xFF),
//                                         e5m2 → ±inf (0x7C / 0xFC).
//   "Past max" is decided after rounding, so e4m3 448 < |x| ≤ 464 (the tie) still gives 448,
//   and e5m2 |x| ≥ 61440 (the tie, rounding to the odd max's even neighbour) overflows.
//   fp8 → f16 is exact; a NaN becomes the canonical half 0x7FFF. fp8 → f32 goes through f16,
//   as NVIDIA's __nv_fp8_e4m3::operator float does, so its NaN is 0x7FFFFFFF.
#pragma once
#include <stdint.h>
#include <string.h>

static inline uint32_t emu_f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float emu_bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// ---- bf16 --------------------------------------------------------------------------------------

static inline uint16_t emu_f32_to_bf16_rn(float f) {
    uint32_t u = emu_f32_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFFu;
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float emu_bf16_to_f32(uint16_t h) { return emu_bits_f32((uint32_t)h << 16); }

// ---- narrowing core ----------------------------------------------------------------------------

// |x| (f32 bits without the sign, not a NaN) rounded to nearest even into a binary format with
// `mbits` stored mantissa bits and exponent bias `bias`, returned as that format's magnitude code
// (exponent field << mbits | mantissa). Codes are monotone in value, so a result above the
// format's largest finite code means "overflowed after rounding"; the caller decides what that
// becomes. Working in integer codes keeps the rounding exact for every input, with no detour
// through a wider float type.
static inline uint32_t emu__narrow_rne(uint32_t a, unsigned mbits, int bias) {
    const int emin = 1 - bias;  // exponent of the smallest normal
    int e = (int)(a >> 23) - 127;
    uint32_t sig, q, rem, half;
    unsigned shift;
    if (a < 0x00800000u) return 0;  // f32 zero or subnormal: far below half the least subnormal
    if (e >= emin) {
        // Normal in the target: keep the top `mbits` of the mantissa under the rebiased exponent.
        shift = 23u - mbits;
        q = ((uint32_t)(e + bias) << mbits) | ((a & 0x7FFFFFu) >> shift);
        rem = a & ((1u << shift) - 1u);
    } else {
        // Subnormal in the target: the significand in units of the least subnormal,
        // 2^(emin − mbits). A shift past 25 leaves q = 0 and rem < half, as 25 already does.
        sig = (a & 0x7FFFFFu) | 0x800000u;
        shift = 23u - mbits + (unsigned)(emin - e);
        if (shift > 25u) shift = 25u;
        q = sig >> shift;
        rem = sig & ((1u << shift) - 1u);
    }
    half = 1u << (shift - 1u);
    // A carry out of the mantissa moves q to the next binade's code, which is the right value.
    if (rem > half || (rem == half && (q & 1u))) q += 1u;
    return q;
}

// ---- f16 ---------------------------------------------------------------------------------------

static inline uint16_t emu_f32_to_f16_rn(float f) {
    const uint32_t u = emu_f32_bits(f);
    const uint32_t a = u & 0x7FFFFFFFu;
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t q;
    if (a > 0x7F800000u) return 0x7FFFu;
    q = emu__narrow_rne(a, 10u, 15);
    if (q > 0x7BFFu) q = 0x7C00u;  // overflow (and inf) → inf
    return (uint16_t)(sign | q);
}

static inline float emu_f16_to_f32(uint16_t h) {
    const uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
    const uint32_t e = ((uint32_t)h >> 10) & 0x1Fu;
    uint32_t m = (uint32_t)h & 0x3FFu;
    int n;
    if (e == 0x1Fu) return emu_bits_f32(m ? 0x7FFFFFFFu : (sign | 0x7F800000u));
    if (e != 0) return emu_bits_f32(sign | ((e + 112u) << 23) | (m << 13));  // rebias 15 → 127
    if (m == 0) return emu_bits_f32(sign);
    // Subnormal m·2^−24 is a normal f32: shift the leading one up to bit 10 (the implicit bit).
    n = __builtin_clz(m) - 21;  // m has its top bit at 10 − n
    return emu_bits_f32(sign | ((uint32_t)(113 - n) << 23) | (((m << n) & 0x3FFu) << 13));
}

// ---- fp8 ---------------------------------------------------------------------------------------

// satfinite: nonzero for __NV_SATFINITE, zero for __NV_NOSAT.
static inline uint8_t emu_f32_to_e4m3(float f, int satfinite) {
    const uint32_t u = emu_f32_bits(f);
    const uint32_t a = u & 0x7FFFFFFFu;
    const uint8_t sign = (uint8_t)((u >> 24) & 0x80u);
    uint32_t q;
    if (a > 0x7F800000u) return 0x7Fu;
    q = emu__narrow_rne(a, 3u, 7);
    if (q > 0x7Eu) q = satfinite ? 0x7Eu : 0x7Fu;  // e4m3 has no inf: nosat overflow is NaN
    return (uint8_t)(sign | q);
}

static inline uint8_t emu_f32_to_e5m2(float f, int satfinite) {
    const uint32_t u = emu_f32_bits(f);
    const uint32_t a = u & 0x7FFFFFFFu;
    const uint8_t sign = (uint8_t)((u >> 24) & 0x80u);
    uint32_t q;
    if (a > 0x7F800000u) return 0x7Fu;
    q = emu__narrow_rne(a, 2u, 15);
    if (q > 0x7Bu) q = satfinite ? 0x7Bu : 0x7Cu;
    return (uint8_t)(sign | q);
}

static inline uint16_t emu_e4m3_to_f16(uint8_t c) {
    const uint16_t sign = (uint16_t)((c & 0x80u) << 8);
    const unsigned e = (c >> 3) & 0xFu;
    const unsigned m = c & 0x7u;
    int p;
    if ((c & 0x7Fu) == 0x7Fu) return 0x7FFFu;
    if (e != 0) return (uint16_t)(sign | ((e + 8u) << 10) | (m << 7));  // rebias 7 → 15
    if (m == 0) return sign;
    // Subnormal m·2^−9 is a normal half: its leading one at bit p gives 2^(p−9).
    p = 31 - __builtin_clz(m);
    return (uint16_t)(sign | ((unsigned)(p + 6) << 10) | ((m << (10 - p)) & 0x3FFu));
}

static inline uint16_t emu_e5m2_to_f16(uint8_t c) {
    const uint16_t h = (uint16_t)((unsigned)c << 8);
    return (h & 0x7FFFu) > 0x7C00u ? (uint16_t)0x7FFFu : h;
}

static inline float emu_e4m3_to_f32(uint8_t c) { return emu_f16_to_f32(emu_e4m3_to_f16(c)); }
static inline float emu_e5m2_to_f32(uint8_t c) { return emu_f16_to_f32(emu_e5m2_to_f16(c)); }

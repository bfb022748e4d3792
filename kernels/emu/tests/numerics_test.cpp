// numerics_test: the emulated GPU's number formats (emu/numerics.h) and the stand-in
// cuda_bf16.h / cuda_fp16.h / cuda_fp8.h, bit for bit against NVIDIA's own headers.
//
// The oracle is the host code of NVIDIA's cuda_bf16.hpp, cuda_fp16.hpp and cuda_fp8.hpp from the
// pinned CUDA runtime wheel (scripts/nvrtc-env; $KONTEXT_CUDA_INCLUDE), compiled here by g++ as
// plain host C++. Two things make that work:
// - NVIDIA's headers are reached through `-iquote <CUDA include dir>` and quoted includes, so
//   they win over the stand-ins of the same names that `-Iinclude` puts first; NVIDIA's headers
//   include each other with quotes too, so they find their own siblings.
// - tests/nvidia_host/ supplies the two headers they include that the runtime wheel lacks:
//   <nv/target> (CCCL) and "crt/host_defines.h" (nvcc), in their host-compiler meaning.
// Build and run (from kernels/emu, as the Makefile does):
//   g++ -O2 -std=c++17 -pthread -Iinclude -iquote "$KONTEXT_CUDA_INCLUDE" -Itests/nvidia_host
//       -Wall -Wextra -Werror -o numerics_test tests/numerics_test.cpp -ldl
//   EMU_LIB_DIR=../../target/emu/lib ./numerics_test
// The stand-in headers cannot share a translation unit with NVIDIA's, so the test compiles a
// small module against them at run time, with the stand-in NVRTC's g++ flags (src/nvrtc.cpp:
// `-include emu/device.h`, …), from the include directory next to $EMU_LIB_DIR (the installed
// copy, target/emu/include) or else ./include, and calls it through dlopen.
//
// What is compared (every comparison is of bit patterns, NaNs included):
//   exhaustive   bf16 → f32, f16 → f32 (2^16 codes each); e4m3 and e5m2 → f16 and → f32
//                (256 codes each); f16 → fp8 and bf16 → fp8 (2^16 codes × 2 kinds × 2
//                saturation modes); fp8x2 → half2 (2^16 pairs × 2 kinds).
//   f32 inputs   → bf16, → f16, → e4m3 / e5m2 with __NV_NOSAT and __NV_SATFINITE. By default
//                a dense sweep: every sign, every exponent and every value of the top 12 mantissa
//                bits, with 26 patterns of the low 11 bits (0, all ones, each single bit and each
//                single hole, two alternations), so every rounding point (exact ties, one ulp
//                either side, the sticky bits) of every target format, normal or subnormal, and
//                the neighbourhood of every format's max, min and half-min are covered; plus a
//                list of special values. The full 2^32 sweep (0 mismatches when last run) costs
//                about 320 s of one core, over the budget for a unit test; set
//                EMU_NUMERICS_EXHAUSTIVE=1 to run it on all cores.
//   stand-ins    the same sweep over the top 8 mantissa bits, all 2^16 bf16 / f16 codes and
//                all fp8 codes, through the stand-in headers' own API (packed forms included),
//                plus triviality, size and alignment of their types against NVIDIA's.
// Prints one line per family: count compared, mismatches, the first few in hex. Exits 1 on any.
#if !__has_include("cuda_fp8.hpp")
#error "needs NVIDIA's headers: -iquote $KONTEXT_CUDA_INCLUDE (printed by scripts/nvrtc-env)"
#endif
#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_fp8.h"

#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "emu/numerics.h"

namespace {

// ---- tallies ---------------------------------------------------------------------------------

struct Family {
    const char* name;
    uint64_t count = 0, mismatches = 0;
    std::vector<std::string> first;

    explicit Family(const char* n = "") : name(n) {}

    void check(uint64_t in, uint64_t ours, uint64_t nvidia) {
        ++count;
        if (ours == nvidia) return;
        if (mismatches++ < 6) {
            char b[160];
            snprintf(b, sizeof b, "in 0x%llx: ours 0x%llx, nvidia 0x%llx",
                     (unsigned long long)in, (unsigned long long)ours,
                     (unsigned long long)nvidia);
            first.push_back(b);
        }
    }
    void merge(const Family& o) {
        count += o.count;
        mismatches += o.mismatches;
        for (const auto& s : o.first)
            if (first.size() < 6) first.push_back(s);
    }
};

bool g_failed = false;

void report(Family& f, double seconds = -1) {
    if (seconds >= 0)
        printf("%-50s %12llu compared  %llu mismatches  (%.1f s)\n", f.name,
               (unsigned long long)f.count, (unsigned long long)f.mismatches, seconds);
    else
        printf("%-50s %12llu compared  %llu mismatches\n", f.name, (unsigned long long)f.count,
               (unsigned long long)f.mismatches);
    for (const auto& s : f.first) printf("    %s\n", s.c_str());
    if (f.mismatches || f.count == 0) g_failed = true;
}

void fail(const char* what) {
    printf("FAIL: %s\n", what);
    g_failed = true;
}

double since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// ---- NVIDIA's host path ----------------------------------------------------------------------

uint32_t bits(float f) { return emu_f32_bits(f); }

uint16_t nv_f32_to_bf16(float f) {
    return static_cast<__nv_bfloat16_raw>(__float2bfloat16_rn(f)).x;
}
float nv_bf16_to_f32(uint16_t c) {
    __nv_bfloat16_raw r;
    r.x = c;
    return __bfloat162float(__nv_bfloat16(r));
}
uint16_t nv_f32_to_f16(float f) { return static_cast<__half_raw>(__float2half_rn(f)).x; }
float nv_f16_to_f32(uint16_t c) {
    __half_raw r;
    r.x = c;
    return __half2float(__half(r));
}
const __nv_saturation_t kSat[2] = {__NV_NOSAT, __NV_SATFINITE};
const __nv_fp8_interpretation_t kKind[2] = {__NV_E4M3, __NV_E5M2};
const char* const kSatName[2] = {"nosat", "satfinite"};
const char* const kKindName[2] = {"e4m3", "e5m2"};

uint8_t ours_f32_to_fp8(float f, int kind, int sat) {
    return kind ? emu_f32_to_e5m2(f, sat) : emu_f32_to_e4m3(f, sat);
}
uint16_t ours_fp8_to_f16(uint8_t c, int kind) {
    return kind ? emu_e5m2_to_f16(c) : emu_e4m3_to_f16(c);
}
float ours_fp8_to_f32(uint8_t c, int kind) {
    return kind ? emu_e5m2_to_f32(c) : emu_e4m3_to_f32(c);
}
float nv_fp8_to_f32(uint8_t c, int kind) {
    if (kind) {
        __nv_fp8_e5m2 v;
        v.__x = c;
        return static_cast<float>(v);
    }
    __nv_fp8_e4m3 v;
    v.__x = c;
    return static_cast<float>(v);
}

// ---- f32 inputs ------------------------------------------------------------------------------

// The six f32 → narrow conversions, ours against NVIDIA's, for one input.
struct F32Tally {
    Family bf16, f16, fp8[2][2];  // fp8[kind][sat]
    F32Tally() {
        bf16.name = "f32 -> bf16 rn";
        f16.name = "f32 -> f16 rn";
        fp8[0][0].name = "f32 -> e4m3 nosat";
        fp8[0][1].name = "f32 -> e4m3 satfinite";
        fp8[1][0].name = "f32 -> e5m2 nosat";
        fp8[1][1].name = "f32 -> e5m2 satfinite";
    }
    void check(uint32_t u) {
        const float f = emu_bits_f32(u);
        bf16.check(u, emu_f32_to_bf16_rn(f), nv_f32_to_bf16(f));
        f16.check(u, emu_f32_to_f16_rn(f), nv_f32_to_f16(f));
        for (int k = 0; k < 2; ++k)
            for (int s = 0; s < 2; ++s)
                fp8[k][s].check(u, ours_f32_to_fp8(f, k, s),
                                __nv_cvt_float_to_fp8(f, kSat[s], kKind[k]));
    }
    void merge(const F32Tally& o) {
        bf16.merge(o.bf16);
        f16.merge(o.f16);
        for (int k = 0; k < 2; ++k)
            for (int s = 0; s < 2; ++s) fp8[k][s].merge(o.fp8[k][s]);
    }
    void print(double seconds) {
        report(bf16, seconds);
        report(f16);
        for (int k = 0; k < 2; ++k)
            for (int s = 0; s < 2; ++s) report(fp8[k][s]);
    }
};

// The low `n` bits of the dense sweep: 0, all ones, each single bit, each single hole, and two
// alternations, so that every rounding point has its exact tie and both neighbours.
std::vector<uint32_t> low_patterns(int n) {
    const uint32_t ones = (1u << n) - 1u;
    std::vector<uint32_t> p = {0u, ones, 0x55555555u & ones, 0xAAAAAAAAu & ones};
    for (int j = 0; j < n; ++j) {
        p.push_back(1u << j);
        p.push_back(ones & ~(1u << j));
    }
    return p;
}

// Calls f(u) for every sign, exponent and value of the top `top` mantissa bits, with each low
// pattern below them.
template <class F>
void for_dense(int top, F&& f) {
    const int low_bits = 23 - top;
    const std::vector<uint32_t> low = low_patterns(low_bits);
    for (uint32_t hi = 0; hi < (1u << (9 + top)); ++hi)
        for (uint32_t l : low) f((hi << low_bits) | l);
}

std::vector<uint32_t> special_f32() {
    std::vector<uint32_t> v = {
        0x00000000u, 0x00000001u, 0x007FFFFFu, 0x00800000u, 0x7F7FFFFFu, 0x7F800000u,
        0x7F800001u, 0x7FC00000u, 0x7FFFFFFFu, 0x7FA00000u, 0x7F812345u,  // NaNs, q and s
    };
    // Each format's max, the rounding tie just past it and its neighbours, the next value up,
    // the least subnormal and its half, as f32.
    const float pts[] = {448.0f,    464.0f,       480.0f,       57344.0f,     61440.0f,
                         65504.0f,  65520.0f,     0x1p-9f,      0x1p-10f,     0x1p-6f,
                         0x1p-16f,  0x1p-17f,     0x1p-14f,     0x1p-24f,     0x1p-25f,
                         0x1.8p-25f, 0x1.8p-10f,  0x1.8p-17f,   0x1p-133f,    0x1p-134f,
                         3.3895314e38f, 1.0f,     1.5f};
    for (float p : pts) {
        const uint32_t u = bits(p);
        for (int d = -2; d <= 2; ++d) v.push_back(u + (uint32_t)d);
    }
    const size_t n = v.size();
    for (size_t i = 0; i < n; ++i) v.push_back(v[i] | 0x80000000u);
    return v;
}

void f32_sweep() {
    F32Tally t;
    const auto t0 = std::chrono::steady_clock::now();
    if (getenv("EMU_NUMERICS_EXHAUSTIVE") && atoi(getenv("EMU_NUMERICS_EXHAUSTIVE")) != 0) {
        const unsigned nt = std::max(1u, std::thread::hardware_concurrency());
        std::vector<F32Tally> part(nt);
        std::vector<std::thread> th;
        const uint64_t chunk = ((1ull << 32) + nt - 1) / nt;
        for (unsigned i = 0; i < nt; ++i)
            th.emplace_back([&, i] {
                const uint64_t lo = i * chunk, hi = std::min<uint64_t>(lo + chunk, 1ull << 32);
                for (uint64_t u = lo; u < hi; ++u) part[i].check((uint32_t)u);
            });
        for (auto& x : th) x.join();
        for (auto& p : part) t.merge(p);
        printf("-- f32 inputs: all 2^32 bit patterns, %u threads\n", nt);
    } else {
        for_dense(12, [&](uint32_t u) { t.check(u); });
        for (uint32_t u : special_f32()) t.check(u);
        printf("-- f32 inputs: dense sweep (EMU_NUMERICS_EXHAUSTIVE=1 for all 2^32)\n");
    }
    t.print(since(t0));
}

// ---- 8- and 16-bit inputs --------------------------------------------------------------------

void small_inputs() {
    printf("-- 8- and 16-bit inputs: exhaustive\n");
    Family bf16{"bf16 -> f32 (all codes)"}, f16{"f16 -> f32 (all codes)"};
    for (uint32_t c = 0; c < 65536; ++c) {
        bf16.check(c, bits(emu_bf16_to_f32((uint16_t)c)), bits(nv_bf16_to_f32((uint16_t)c)));
        f16.check(c, bits(emu_f16_to_f32((uint16_t)c)), bits(nv_f16_to_f32((uint16_t)c)));
    }
    report(bf16);
    report(f16);

    for (int k = 0; k < 2; ++k) {
        std::string n1 = std::string(kKindName[k]) + " -> halfraw (all codes)";
        std::string n2 = std::string(kKindName[k]) + " -> f32 (all codes)";
        std::string n3 = std::string(kKindName[k]) + "x2 -> halfraw2 (all pairs)";
        Family h{n1.c_str()}, f{n2.c_str()}, h2{n3.c_str()};
        for (uint32_t c = 0; c < 256; ++c) {
            h.check(c, ours_fp8_to_f16((uint8_t)c, k),
                    __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)c, kKind[k]).x);
            f.check(c, bits(ours_fp8_to_f32((uint8_t)c, k)), bits(nv_fp8_to_f32((uint8_t)c, k)));
        }
        for (uint32_t c = 0; c < 65536; ++c) {
            const __half2_raw r = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)c, kKind[k]);
            const uint32_t ours = ours_fp8_to_f16((uint8_t)(c & 0xFF), k) |
                                  ((uint32_t)ours_fp8_to_f16((uint8_t)(c >> 8), k) << 16);
            h2.check(c, ours, r.x | ((uint32_t)r.y << 16));
        }
        report(h);
        report(f);
        report(h2);
    }

    // Wider → fp8 through NVIDIA's half and bf16 entry points: ours is "widen exactly, then
    // round from f32", which is what the stand-in cuda_fp8.h does.
    for (int k = 0; k < 2; ++k)
        for (int s = 0; s < 2; ++s) {
            std::string n1 = std::string("halfraw -> ") + kKindName[k] + " " + kSatName[s];
            std::string n2 = std::string("bf16raw -> ") + kKindName[k] + " " + kSatName[s];
            Family h{n1.c_str()}, b{n2.c_str()};
            for (uint32_t c = 0; c < 65536; ++c) {
                __half_raw hr;
                hr.x = (unsigned short)c;
                h.check(c, ours_f32_to_fp8(emu_f16_to_f32((uint16_t)c), k, s),
                        __nv_cvt_halfraw_to_fp8(hr, kSat[s], kKind[k]));
                __nv_bfloat16_raw br;
                br.x = (unsigned short)c;
                b.check(c, ours_f32_to_fp8(emu_bf16_to_f32((uint16_t)c), k, s),
                        __nv_cvt_bfloat16raw_to_fp8(br, kSat[s], kKind[k]));
            }
            report(h);
            report(b);
        }
}

// ---- the stand-in headers --------------------------------------------------------------------

// Compiled at run time against the stand-ins, with the stand-in NVRTC's flags. Its functions
// work on arrays so that one dlsym'd call covers a whole sweep.
const char* const kStandinSource = R"SRC(
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <type_traits>

// The emulator keeps `__shared__` arrays in static thread_local storage; a non-trivial element
// type would give every one of them an initialisation guard.
#define TRIVIAL(T)                                                                  \
    static_assert(std::is_trivial<T>::value && std::is_standard_layout<T>::value, \
                  #T " must be trivial");
TRIVIAL(__nv_bfloat16) TRIVIAL(__nv_bfloat162)
TRIVIAL(__nv_bfloat16_raw) TRIVIAL(__nv_bfloat162_raw)
TRIVIAL(__half) TRIVIAL(__half2) TRIVIAL(__half_raw) TRIVIAL(__half2_raw)
TRIVIAL(__nv_fp8_e4m3) TRIVIAL(__nv_fp8_e5m2) TRIVIAL(__nv_fp8x2_e4m3) TRIVIAL(__nv_fp8x2_e5m2)
TRIVIAL(__nv_fp8x4_e4m3) TRIVIAL(__nv_fp8x4_e5m2)

#define API extern "C" __attribute__((visibility("default")))
typedef unsigned long long u64;

// sizeof and alignof of each type, in the order numerics_test lists them.
API void layout(u64* out) {
#define L(T) sizeof(T), alignof(T)
    u64 v[] = {L(__nv_bfloat16), L(__nv_bfloat162), L(__half),          L(__half2),
               L(__half_raw),    L(__half2_raw),    L(__nv_fp8_e4m3),   L(__nv_fp8x2_e4m3),
               L(__nv_fp8x4_e4m3), L(__nv_fp8_e5m2)};
    for (unsigned i = 0; i < sizeof v / sizeof v[0]; ++i) out[i] = v[i];
}

// f32 inputs, one pair per (in[2i], in[2i+1]). out: bf162 bits, half2 bits, and per
// (kind, sat) the fp8x2 bits of the pair.
API void f32_pairs(const float* in, u64 n, unsigned* bf, unsigned* hf, unsigned short* fp8) {
    for (u64 i = 0; i < n; ++i) {
        const float a = in[2 * i], b = in[2 * i + 1];
        const __nv_bfloat162 p = __floats2bfloat162_rn(a, b);
        bf[i] = __bfloat16_as_ushort(p.x) | ((unsigned)__bfloat16_as_ushort(p.y) << 16);
        // The scalar and float2 forms must agree with the pair form.
        const __nv_bfloat162 q = __float22bfloat162_rn(make_float2(a, b));
        if (__bfloat16_as_ushort(__float2bfloat16_rn(a)) != __bfloat16_as_ushort(p.x) ||
            __bfloat16_as_ushort(q.y) != __bfloat16_as_ushort(p.y))
            bf[i] ^= 0xDEADu;
        const __half2 h = __floats2half2_rn(a, b);
        hf[i] = __half_as_ushort(h.x) | ((unsigned)__half_as_ushort(h.y) << 16);
        const __half2 g = __float22half2_rn(make_float2(a, b));
        if (__half_as_ushort(__float2half_rn(a)) != __half_as_ushort(h.x) ||
            __half_as_ushort(g.y) != __half_as_ushort(h.y))
            hf[i] ^= 0xDEADu;
        for (int k = 0; k < 2; ++k)
            for (int s = 0; s < 2; ++s) {
                const __nv_fp8_interpretation_t kind = k ? __NV_E5M2 : __NV_E4M3;
                const __nv_saturation_t sat = s ? __NV_SATFINITE : __NV_NOSAT;
                unsigned short x2 = __nv_cvt_float2_to_fp8x2(make_float2(a, b), sat, kind);
                if (__nv_cvt_float_to_fp8(a, sat, kind) != (x2 & 0xFF)) x2 ^= 0xDE;
                fp8[4 * i + 2 * k + s] = x2;
            }
    }
}

// Every 16-bit code c, paired with c·40503 mod 2^16 (a permutation, so each code is also seen
// in the high half). out16: bf16 → f32 and f16 → f32 bits (through the pair forms); out8: per
// (kind, sat) the fp8x2 bits from the half2 and the bf162 pair.
API void codes16(unsigned* f_bf, unsigned* f_hf, unsigned short* fp8) {
    for (unsigned c = 0; c < 65536; ++c) {
        const unsigned short lo = (unsigned short)c, hi = (unsigned short)(c * 40503u);
        const __nv_bfloat162 bp =
            __halves2bfloat162(__ushort_as_bfloat16(lo), __ushort_as_bfloat16(hi));
        const __half2 hp = __halves2half2(__ushort_as_half(lo), __ushort_as_half(hi));
        const float2 b2 = __bfloat1622float2(bp), h2 = __half22float2(hp);
        f_bf[2 * c] = __float_as_uint(b2.x);
        f_bf[2 * c + 1] = __float_as_uint(b2.y);
        f_hf[2 * c] = __float_as_uint(h2.x);
        f_hf[2 * c + 1] = __float_as_uint(h2.y);
        if (__float_as_uint(__bfloat162float(bp.x)) != f_bf[2 * c]) f_bf[2 * c] ^= 1;
        if (__float_as_uint(__half2float(hp.x)) != f_hf[2 * c]) f_hf[2 * c] ^= 1;
        __half2_raw hr;
        hr.x = lo;
        hr.y = hi;
        __nv_bfloat162_raw br;
        br.x = lo;
        br.y = hi;
        for (int k = 0; k < 2; ++k)
            for (int s = 0; s < 2; ++s) {
                const __nv_fp8_interpretation_t kind = k ? __NV_E5M2 : __NV_E4M3;
                const __nv_saturation_t sat = s ? __NV_SATFINITE : __NV_NOSAT;
                unsigned short a = __nv_cvt_halfraw2_to_fp8x2(hr, sat, kind);
                unsigned short b = __nv_cvt_bfloat16raw2_to_fp8x2(br, sat, kind);
                __half_raw h1;
                h1.x = lo;
                __nv_bfloat16_raw b1;
                b1.x = lo;
                if (__nv_cvt_halfraw_to_fp8(h1, sat, kind) != (a & 0xFF)) a ^= 0xDE;
                if (__nv_cvt_bfloat16raw_to_fp8(b1, sat, kind) != (b & 0xFF)) b ^= 0xDE;
                fp8[8 * c + 4 * k + 2 * s] = a;
                fp8[8 * c + 4 * k + 2 * s + 1] = b;
            }
    }
}

// Every fp8x2 pair and kind: the half2 bits, and the f32 bits of both elements through the
// value types' explicit operators.
API void fp8_pairs(unsigned* h2, unsigned* f) {
    for (unsigned c = 0; c < 65536; ++c)
        for (int k = 0; k < 2; ++k) {
            const __nv_fp8_interpretation_t kind = k ? __NV_E5M2 : __NV_E4M3;
            const __half2_raw r = __nv_cvt_fp8x2_to_halfraw2((unsigned short)c, kind);
            unsigned v = r.x | ((unsigned)r.y << 16);
            if (__nv_cvt_fp8_to_halfraw((unsigned char)c, kind).x != r.x) v ^= 0xDEAD;
            float2 p;
            float s;
            if (k) {
                __nv_fp8x2_e5m2 x2; x2.__x = (unsigned short)c; p = (float2)x2;
                __nv_fp8_e5m2 x1; x1.__x = (unsigned char)c; s = (float)x1;
                if (__half_as_ushort((__half)x1) != r.x) v ^= 0xBEEF;
            } else {
                __nv_fp8x2_e4m3 x2; x2.__x = (unsigned short)c; p = (float2)x2;
                __nv_fp8_e4m3 x1; x1.__x = (unsigned char)c; s = (float)x1;
                if (__half_as_ushort((__half)x1) != r.x) v ^= 0xBEEF;
            }
            h2[2 * c + k] = v;
            f[4 * c + 2 * k] = __float_as_uint(p.x) ^ (__float_as_uint(s) != __float_as_uint(p.x));
            f[4 * c + 2 * k + 1] = __float_as_uint(p.y);
        }
}
)SRC";

std::string standin_include_dir() {
    const char* lib = getenv("EMU_LIB_DIR");
    if (lib && *lib) return std::string(lib) + "/../include";
    return "include";
}

// Builds the stand-in module; returns its dlopen handle, or null after printing why.
void* build_standin(const std::string& dir) {
    const std::string src = dir + "/standin.cpp", so = dir + "/standin.so";
    FILE* f = fopen(src.c_str(), "w");
    if (!f || fputs(kStandinSource, f) < 0 || fclose(f) != 0) {
        fail("cannot write the stand-in module's source");
        return nullptr;
    }
    const char* cxx = getenv("KONTEXT_EMU_CXX");
    // The stand-in NVRTC's flags (src/nvrtc.cpp), plus -Wall -Wextra -Werror: the stand-in
    // headers must compile cleanly where the kernels include them.
    const std::string cmd = std::string(cxx && *cxx ? cxx : "g++") +
                            " -std=c++17 -O2 -fPIC -shared -fvisibility=hidden -fno-exceptions"
                            " -fno-rtti -ffp-contract=off -fsanitize=alignment"
                            " -fsanitize-undefined-trap-on-error -Wno-unknown-pragmas"
                            " -Wno-attributes -Wall -Wextra -Werror -include emu/device.h -I'" +
                            standin_include_dir() + "' -D__CUDA_ARCH__=900 -o '" + so + "' '" +
                            src + "' 2>&1";
    printf("-- stand-in headers: %s\n", cmd.c_str());
    fflush(stdout);
    if (system(cmd.c_str()) != 0) {
        fail("the stand-in headers do not compile under -include emu/device.h (g++ output above)");
        return nullptr;
    }
    void* h = dlopen(so.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) fail(dlerror());
    return h;
}

typedef unsigned long long u64;

template <class F>
F entry(void* h, const char* name) {
    F f = reinterpret_cast<F>(dlsym(h, name));
    if (!f) fail(name);
    return f;
}

void standin_layout(void* h) {
    auto layout = entry<void (*)(u64*)>(h, "layout");
    if (!layout) return;
#define L(T) sizeof(T), alignof(T)
    const u64 want[20] = {L(__nv_bfloat16),   L(__nv_bfloat162), L(__half),
                          L(__half2),         L(__half_raw),     L(__half2_raw),
                          L(__nv_fp8_e4m3),   L(__nv_fp8x2_e4m3), L(__nv_fp8x4_e4m3),
                          L(__nv_fp8_e5m2)};
#undef L
    u64 got[20];
    layout(got);
    Family lay("stand-in type sizes and alignments");
    for (int i = 0; i < 20; ++i) lay.check((uint64_t)i, got[i], want[i]);
    report(lay);
}

// f32 pairs: a lighter sweep than numerics.h's (the stand-ins wrap it; this checks the wrapping,
// the packing and the enum handling), each value paired with a distant one.
void standin_f32(void* h) {
    auto f32_pairs =
        entry<void (*)(const float*, u64, unsigned*, unsigned*, unsigned short*)>(h, "f32_pairs");
    if (!f32_pairs) return;
    Family bf("stand-in f32 -> bf16 (pair/scalar)"), hf("stand-in f32 -> f16 (pair/scalar)");
    Family f8[2][2];
    std::string names[2][2];
    for (int k = 0; k < 2; ++k)
        for (int s = 0; s < 2; ++s) {
            names[k][s] = std::string("stand-in f32x2 -> ") + kKindName[k] + " " + kSatName[s];
            f8[k][s].name = names[k][s].c_str();
        }
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<float> in;
    std::vector<unsigned> ob, oh;
    std::vector<unsigned short> o8;
    auto flush = [&] {
        const size_t n = in.size() / 2;
        ob.resize(n);
        oh.resize(n);
        o8.resize(4 * n);
        f32_pairs(in.data(), n, ob.data(), oh.data(), o8.data());
        for (size_t i = 0; i < n; ++i) {
            const float a = in[2 * i], b = in[2 * i + 1];
            const uint64_t key = bits(a) | ((uint64_t)bits(b) << 32);
            bf.check(key, ob[i], nv_f32_to_bf16(a) | ((unsigned)nv_f32_to_bf16(b) << 16));
            hf.check(key, oh[i], nv_f32_to_f16(a) | ((unsigned)nv_f32_to_f16(b) << 16));
            float2 p;
            p.x = a;
            p.y = b;
            for (int k = 0; k < 2; ++k)
                for (int s = 0; s < 2; ++s)
                    f8[k][s].check(key, o8[4 * i + 2 * k + s],
                                   __nv_cvt_float2_to_fp8x2(p, kSat[s], kKind[k]));
        }
        in.clear();
    };
    auto add = [&](uint32_t u) {
        in.push_back(emu_bits_f32(u));
        in.push_back(emu_bits_f32(u * 2654435761u));
        if (in.size() >= (1u << 21)) flush();
    };
    for_dense(8, add);
    for (uint32_t u : special_f32()) add(u);
    flush();
    report(bf, since(t0));
    report(hf);
    for (int k = 0; k < 2; ++k)
        for (int s = 0; s < 2; ++s) report(f8[k][s]);
}

// Every 16-bit code, low half c and high half c·40503 (as the module pairs them).
void standin_codes16(void* h) {
    auto codes16 = entry<void (*)(unsigned*, unsigned*, unsigned short*)>(h, "codes16");
    if (!codes16) return;
    std::vector<unsigned> fb(2 * 65536), fh(2 * 65536);
    std::vector<unsigned short> c8(8 * 65536);
    codes16(fb.data(), fh.data(), c8.data());
    Family b16("stand-in bf16x2 -> f32x2 (all codes)"), h16("stand-in f16x2 -> f32x2 (all codes)");
    Family c16[2][2][2];  // [kind][sat][half2, bf162]
    std::string names[2][2][2];
    for (int k = 0; k < 2; ++k)
        for (int s = 0; s < 2; ++s)
            for (int w = 0; w < 2; ++w) {
                names[k][s][w] = std::string("stand-in ") + (w ? "bf16raw2" : "halfraw2") +
                                 " -> " + kKindName[k] + "x2 " + kSatName[s] + " (all codes)";
                c16[k][s][w].name = names[k][s][w].c_str();
            }
    for (uint32_t c = 0; c < 65536; ++c) {
        const uint16_t lo = (uint16_t)c, hi = (uint16_t)(c * 40503u);
        b16.check(c, fb[2 * c] | ((uint64_t)fb[2 * c + 1] << 32),
                  bits(nv_bf16_to_f32(lo)) | ((uint64_t)bits(nv_bf16_to_f32(hi)) << 32));
        h16.check(c, fh[2 * c] | ((uint64_t)fh[2 * c + 1] << 32),
                  bits(nv_f16_to_f32(lo)) | ((uint64_t)bits(nv_f16_to_f32(hi)) << 32));
        __half2_raw hr;
        hr.x = lo;
        hr.y = hi;
        __nv_bfloat162_raw br;
        br.x = lo;
        br.y = hi;
        for (int k = 0; k < 2; ++k)
            for (int s = 0; s < 2; ++s) {
                c16[k][s][0].check(c, c8[8 * c + 4 * k + 2 * s],
                                   __nv_cvt_halfraw2_to_fp8x2(hr, kSat[s], kKind[k]));
                c16[k][s][1].check(c, c8[8 * c + 4 * k + 2 * s + 1],
                                   __nv_cvt_bfloat16raw2_to_fp8x2(br, kSat[s], kKind[k]));
            }
    }
    report(b16);
    report(h16);
    for (int k = 0; k < 2; ++k)
        for (int s = 0; s < 2; ++s)
            for (int w = 0; w < 2; ++w) report(c16[k][s][w]);
}

// Every fp8x2 pair of both kinds.
void standin_fp8_pairs(void* h) {
    auto fp8_pairs = entry<void (*)(unsigned*, unsigned*)>(h, "fp8_pairs");
    if (!fp8_pairs) return;
    std::vector<unsigned> p2(2 * 65536), pf(4 * 65536);
    fp8_pairs(p2.data(), pf.data());
    for (int k = 0; k < 2; ++k) {
        const std::string kind = std::string("stand-in ") + kKindName[k];
        const std::string n1 = kind + "x2 -> halfraw2 (all pairs)";
        const std::string n2 = kind + "x2 -> float2 (all pairs)";
        Family fh2(n1.c_str()), ff2(n2.c_str());
        for (uint32_t c = 0; c < 65536; ++c) {
            const __half2_raw r = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)c, kKind[k]);
            fh2.check(c, p2[2 * c + k], r.x | ((unsigned)r.y << 16));
            const uint64_t lo = bits(nv_fp8_to_f32((uint8_t)c, k));
            const uint64_t hi = bits(nv_fp8_to_f32((uint8_t)(c >> 8), k));
            ff2.check(c, pf[4 * c + 2 * k] | ((uint64_t)pf[4 * c + 2 * k + 1] << 32),
                      lo | (hi << 32));
        }
        report(fh2);
        report(ff2);
    }
}

void standin_checks() {
    char tmpl[] = "/tmp/numerics_test.XXXXXX";
    const char* dir = mkdtemp(tmpl);
    if (!dir) {
        fail("mkdtemp");
        return;
    }
    if (void* h = build_standin(dir)) {
        standin_layout(h);
        standin_f32(h);
        standin_codes16(h);
        standin_fp8_pairs(h);
        dlclose(h);
    }
    const std::string rm = std::string("rm -rf '") + dir + "'";
    if (system(rm.c_str()) != 0) { /* a leftover temporary directory is harmless */ }
}

}  // namespace

int main() {
    const auto t0 = std::chrono::steady_clock::now();
    small_inputs();
    f32_sweep();
    standin_checks();
    printf("numerics_test: %s (%.1f s)\n", g_failed ? "FAILED" : "ok", since(t0));
    return g_failed ? 1 : 0;
}

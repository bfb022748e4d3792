// tensormap.cpp: cuTensorMapEncodeTiled of the emulated driver. It checks the arguments against
// the requirements the driver API documents (cuda.h, "Tensor Map Object Management") and writes
// the emulator's own map (emu/tensormap.h), which the TMA twins of kernels/cuda/ptx.cuh read.
//
// Refused, as the real driver refuses them: CUDA_ERROR_INVALID_VALUE with the reason logged.
// What a real Hopper driver accepts but the emulated GPU does not model (the packed 4- and 6-bit
// types, the Blackwell swizzle atoms) is CUDA_ERROR_NOT_SUPPORTED, also logged.
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "emu.h"
#include "emu/tensormap.h"

namespace {

int bad(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
int bad(const char* fmt, ...) {
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    emu::log("cuTensorMapEncodeTiled: %s", msg);
    return emu::CUDA_ERROR_INVALID_VALUE;
}

unsigned element_bytes(int dtype) {
    switch (dtype) {
        case EMU_TMAP_UINT8: return 1;
        case EMU_TMAP_UINT16: case EMU_TMAP_FLOAT16: case EMU_TMAP_BFLOAT16: return 2;
        case EMU_TMAP_UINT32: case EMU_TMAP_INT32: case EMU_TMAP_FLOAT32:
        case EMU_TMAP_FLOAT32_FTZ: case EMU_TMAP_TFLOAT32: case EMU_TMAP_TFLOAT32_FTZ: return 4;
        case EMU_TMAP_UINT64: case EMU_TMAP_INT64: case EMU_TMAP_FLOAT64: return 8;
        default: return 0;
    }
}

bool is_float(int dtype) {
    return dtype == EMU_TMAP_FLOAT16 || dtype == EMU_TMAP_FLOAT32 || dtype == EMU_TMAP_FLOAT64 ||
           dtype == EMU_TMAP_BFLOAT16 || dtype == EMU_TMAP_FLOAT32_FTZ ||
           dtype == EMU_TMAP_TFLOAT32 || dtype == EMU_TMAP_TFLOAT32_FTZ;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) int cuTensorMapEncodeTiled(
    void* tensorMap, int tensorDataType, uint32_t tensorRank, void* globalAddress,
    const uint64_t* globalDim, const uint64_t* globalStrides, const uint32_t* boxDim,
    const uint32_t* elementStrides, int interleave, int swizzle, int l2Promotion, int oobFill) {
    if (emu::settings().cc_major < 9) {
        emu::log("cuTensorMapEncodeTiled: tensor maps need compute capability 9.0, the emulated "
                 "device is %d.%d", emu::settings().cc_major, emu::settings().cc_minor);
        return emu::CUDA_ERROR_NOT_SUPPORTED;
    }
    if (!tensorMap || reinterpret_cast<uintptr_t>(tensorMap) % 64 != 0)
        return bad("tensorMap %p is not 64-byte aligned", tensorMap);
    if (tensorDataType >= EMU_TMAP_16U4_ALIGN8B && tensorDataType <= EMU_TMAP_16U6_ALIGN16B) {
        emu::log("cuTensorMapEncodeTiled: the packed data type %d is not emulated", tensorDataType);
        return emu::CUDA_ERROR_NOT_SUPPORTED;
    }
    const unsigned elem = element_bytes(tensorDataType);
    if (elem == 0) return bad("tensorDataType %d is not a CUtensorMapDataType", tensorDataType);
    if (tensorRank < 1 || tensorRank > EMU_TENSORMAP_MAX_RANK)
        return bad("tensorRank %u is not 1 to 5", tensorRank);
    if (interleave < EMU_TMAP_INTERLEAVE_NONE || interleave > EMU_TMAP_INTERLEAVE_32B)
        return bad("interleave %d is not a CUtensorMapInterleave", interleave);
    if (interleave != EMU_TMAP_INTERLEAVE_NONE && tensorRank < 3)
        return bad("an interleaved layout needs tensorRank ≥ 3, not %u", tensorRank);
    if (swizzle < EMU_TMAP_SWIZZLE_NONE || swizzle > EMU_TMAP_SWIZZLE_128B_ATOM_64B)
        return bad("swizzle %d is not a CUtensorMapSwizzle", swizzle);
    if (swizzle > EMU_TMAP_SWIZZLE_128B) {
        emu::log("cuTensorMapEncodeTiled: swizzle %d (a 128B mode with 32B or 64B atoms) is not "
                 "emulated", swizzle);
        return emu::CUDA_ERROR_NOT_SUPPORTED;
    }
    if (l2Promotion < 0 || l2Promotion > 3)
        return bad("l2Promotion %d is not a CUtensorMapL2promotion", l2Promotion);
    if (oobFill < EMU_TMAP_OOB_FILL_NONE || oobFill > EMU_TMAP_OOB_FILL_NAN_REQUEST_ZERO_FMA)
        return bad("oobFill %d is not a CUtensorMapFloatOOBfill", oobFill);
    if (oobFill == EMU_TMAP_OOB_FILL_NAN_REQUEST_ZERO_FMA && !is_float(tensorDataType))
        return bad("the NaN out-of-bounds fill needs a floating-point tensorDataType, not %d",
                   tensorDataType);
    if (interleave == EMU_TMAP_INTERLEAVE_32B && swizzle != EMU_TMAP_SWIZZLE_32B)
        return bad("the 32B interleave needs the 32B swizzle, not swizzle %d", swizzle);

    const uintptr_t g = reinterpret_cast<uintptr_t>(globalAddress);
    const unsigned galign = interleave == EMU_TMAP_INTERLEAVE_32B ? 32 : 16;
    if (g % galign != 0) return bad("globalAddress %p is not %u-byte aligned", globalAddress, galign);
    if (!emu::mem_find(g, 1, nullptr))
        return bad("globalAddress %p is not in a live device allocation", globalAddress);
    if (!globalDim || !boxDim || !elementStrides || (tensorRank > 1 && !globalStrides))
        return bad("a null globalDim, globalStrides, boxDim or elementStrides array");

    EmuTensorMap m;
    memset(&m, 0, sizeof m);
    m.magic = EMU_TENSORMAP_MAGIC;
    m.global = g;
    m.rank = (uint8_t)tensorRank;
    m.dtype = (uint8_t)tensorDataType;
    m.elem_bytes = (uint8_t)elem;
    m.interleave = (uint8_t)interleave;
    m.swizzle = (uint8_t)swizzle;
    m.l2_promotion = (uint8_t)l2Promotion;
    m.oob_fill = (uint8_t)oobFill;
    m.stride[0] = elem;
    for (uint32_t i = 0; i < tensorRank; ++i) {
        if (globalDim[i] == 0 || globalDim[i] > (1ull << 32))
            return bad("globalDim[%u] = %llu is not 1 to 2^32", i,
                       (unsigned long long)globalDim[i]);
        if (boxDim[i] == 0 || boxDim[i] > 256)
            return bad("boxDim[%u] = %u is not 1 to 256", i, boxDim[i]);
        if (elementStrides[i] == 0 || elementStrides[i] > 8)
            return bad("elementStrides[%u] = %u is not 1 to 8", i, elementStrides[i]);
        m.dim[i] = globalDim[i];
        m.box[i] = boxDim[i];
        m.elem_stride[i] = (uint8_t)elementStrides[i];
    }
    const unsigned salign = interleave == EMU_TMAP_INTERLEAVE_32B ? 32 : 16;
    for (uint32_t i = 1; i < tensorRank; ++i) {
        const uint64_t s = globalStrides[i - 1];
        if (s % salign != 0 || s >= (1ull << 40))
            return bad("globalStrides[%u] = %llu is not a multiple of %u below 2^40", i - 1,
                       (unsigned long long)s, salign);
        // Each stride spans the dimension below it (the documented padding is ≥ 0).
        const uint64_t below = m.dim[i - 1] * m.stride[i - 1];
        if (interleave == EMU_TMAP_INTERLEAVE_NONE && s < below)
            return bad("globalStrides[%u] = %llu is smaller than dimension %u's extent of %llu "
                       "bytes", i - 1, (unsigned long long)s, i - 1, (unsigned long long)below);
        m.stride[i] = s;
    }
    const unsigned inner = boxDim[0] * elem;
    if (interleave == EMU_TMAP_INTERLEAVE_NONE) {
        if (inner % 16 != 0)
            return bad("boxDim[0] × element size = %u bytes is not a multiple of 16", inner);
        static const unsigned span[4] = {0, 32, 64, 128};
        if (swizzle != EMU_TMAP_SWIZZLE_NONE && inner > span[swizzle])
            return bad("boxDim[0] × element size = %u bytes exceeds the %u-byte swizzle span",
                       inner, span[swizzle]);
    }
    memcpy(tensorMap, &m, sizeof m);
    return emu::CUDA_SUCCESS;
}

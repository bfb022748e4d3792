// tensormap.h: what the emulated driver writes into a CUtensorMap (cuTensorMapEncodeTiled, in
// src/tensormap.cpp) and the twins of the TMA instructions read back (kernels/cuda/ptx.cuh).
//
// NVIDIA's 128-byte tensor map is opaque and undocumented; the emulator's is its own. It starts
// with a magic word, so a map the emulated driver did not write (an uninitialised one, a copy of a
// real driver's, one built by hand) is refused by the copy instead of being misread.
#pragma once
#include <stdint.h>

#define EMU_TENSORMAP_MAGIC 0x3170616d6f6d656bull  // "kemomap1", little-endian
#define EMU_TENSORMAP_MAX_RANK 5

// The driver API's enums (cuda.h), by value.
enum EmuTensorMapDataType {
    EMU_TMAP_UINT8 = 0,
    EMU_TMAP_UINT16 = 1,
    EMU_TMAP_UINT32 = 2,
    EMU_TMAP_INT32 = 3,
    EMU_TMAP_UINT64 = 4,
    EMU_TMAP_INT64 = 5,
    EMU_TMAP_FLOAT16 = 6,
    EMU_TMAP_FLOAT32 = 7,
    EMU_TMAP_FLOAT64 = 8,
    EMU_TMAP_BFLOAT16 = 9,
    EMU_TMAP_FLOAT32_FTZ = 10,
    EMU_TMAP_TFLOAT32 = 11,
    EMU_TMAP_TFLOAT32_FTZ = 12,
    EMU_TMAP_16U4_ALIGN8B = 13,
    EMU_TMAP_16U4_ALIGN16B = 14,
    EMU_TMAP_16U6_ALIGN16B = 15,
};
enum EmuTensorMapInterleave { EMU_TMAP_INTERLEAVE_NONE = 0, EMU_TMAP_INTERLEAVE_16B, EMU_TMAP_INTERLEAVE_32B };
enum EmuTensorMapSwizzle {
    EMU_TMAP_SWIZZLE_NONE = 0,
    EMU_TMAP_SWIZZLE_32B = 1,
    EMU_TMAP_SWIZZLE_64B = 2,
    EMU_TMAP_SWIZZLE_128B = 3,
    EMU_TMAP_SWIZZLE_128B_ATOM_32B = 4,
    EMU_TMAP_SWIZZLE_128B_ATOM_32B_FLIP_8B = 5,
    EMU_TMAP_SWIZZLE_128B_ATOM_64B = 6,
};
enum EmuTensorMapOobFill { EMU_TMAP_OOB_FILL_NONE = 0, EMU_TMAP_OOB_FILL_NAN_REQUEST_ZERO_FMA = 1 };

// Dimension 0 is the innermost (contiguous) one, as in the driver API.
struct EmuTensorMap {
    uint64_t magic;
    uint64_t global;                          // globalAddress
    uint64_t dim[EMU_TENSORMAP_MAX_RANK];     // globalDim, elements
    uint64_t stride[EMU_TENSORMAP_MAX_RANK];  // bytes: [0] the element size, [i] globalStrides[i − 1]
    uint32_t box[EMU_TENSORMAP_MAX_RANK];     // boxDim, elements
    uint8_t elem_stride[EMU_TENSORMAP_MAX_RANK];
    uint8_t rank, dtype, elem_bytes, interleave, swizzle, l2_promotion, oob_fill;
};

#ifdef __cplusplus
static_assert(sizeof(struct EmuTensorMap) == 128, "a CUtensorMap is 128 bytes");
#endif

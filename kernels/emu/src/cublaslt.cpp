// cublaslt.cpp: the stand-in cuBLASLt (libcublasLt.so.13) of the emulated GPU.
//
// cublasLtMatmul computed on the host, as the cuBLASLt documentation defines it: column-major
// layouts, D = epilogue(alpha·op(A)·op(B) + beta·C), run at once (the emulated driver is
// synchronous, so the stream has nothing queued before it) — or, when the stream is capturing a
// CUDA graph, checked now and recorded as a node of the capture that runs at every replay (the
// driver's kontext_emu_enqueue), as the real cuBLASLt supports capture with a user workspace.
//
// Numerics are those of a tensor-core GEMM with CUBLAS_COMPUTE_32F: the product of two bf16,
// f16 or fp8 values is exact in f32, each output has one f32 accumulator summed over k in order,
// then alpha·acc + beta·C (C read only when beta ≠ 0, as BLAS promises), the bias, the
// activation, and one rounding to D's type through emu/numerics.h, so a GEMM's bf16 output
// rounds like a kernel's bf16 store. The hardware's order of summation differs, so results agree
// with a GPU to accumulation error, not bit for bit.
//
// Strict, not kind: the refusals are the documented ones (cuBLAS documentation, sections
// "cublasLtMatmul()", its "Datatypes supported" and FP8 tables, "cublasLtMatmulAlgoGetHeuristic()",
// "cublasLtMatrixLayoutAttribute_t", "cublasLtMatmulDescAttributes_t", "Tensor Core Usage"):
// unsupported type, compute, order or epilogue combinations are NOT_SUPPORTED from the heuristic
// with no algorithm; impossible configurations (ld < rows, shapes that do not chain, a missing
// bias) are INVALID_VALUE; an algorithm only runs the problem the heuristic chose it for, at the
// alignments the preference promised; every byte the GEMM reads or writes must lie in one live
// emulated device allocation, and D may not overlap what it reads (a race on a GPU). Each
// refusal prints `kontext-emu: <function>: <why>` to stderr.
#include <dlfcn.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "emu/numerics.h"

// ---- the C interface's types and constants (values from cuBLASLt's headers) ------------------
typedef int cublasStatus_t;
enum {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_ALLOC_FAILED = 3,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_ARCH_MISMATCH = 8,
    CUBLAS_STATUS_MAPPING_ERROR = 11,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_INTERNAL_ERROR = 14,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
    CUBLAS_STATUS_LICENSE_ERROR = 16,
};

enum {
    CUDA_R_32F = 0,
    CUDA_R_16F = 2,
    CUDA_R_16BF = 14,
    CUDA_R_8F_E4M3 = 28,
    CUDA_R_8F_E5M2 = 29,
};

enum {
    COMPUTE_32F = 68,
    COMPUTE_32F_PEDANTIC = 69,
    COMPUTE_32F_FAST_16F = 74,
    COMPUTE_32F_FAST_16BF = 75,
    COMPUTE_32F_FAST_TF32 = 77,
};

enum { OP_N = 0, OP_T = 1, OP_C = 2 };
enum { FILL_FULL = 2 };
enum { ORDER_COL = 0 };
enum {
    POINTER_MODE_HOST = 0,
    POINTER_MODE_DEVICE = 1,
    POINTER_MODE_DEVICE_VECTOR = 2,
    POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_ZERO = 3,
    POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_HOST = 4,
};

enum {
    EPILOGUE_DEFAULT = 1,
    EPILOGUE_RELU = 2,
    EPILOGUE_BIAS = 4,
    EPILOGUE_RELU_BIAS = 6,
    EPILOGUE_GELU = 32,
    EPILOGUE_GELU_BIAS = 36,
};

enum {
    DESC_COMPUTE_TYPE = 0,
    DESC_SCALE_TYPE = 1,
    DESC_POINTER_MODE = 2,
    DESC_TRANSA = 3,
    DESC_TRANSB = 4,
    DESC_TRANSC = 5,
    DESC_FILL_MODE = 6,
    DESC_EPILOGUE = 7,
    DESC_BIAS_POINTER = 8,
    DESC_BIAS_BATCH_STRIDE = 10,
    DESC_EPILOGUE_AUX_POINTER = 11,
    DESC_EPILOGUE_AUX_LD = 12,
    DESC_EPILOGUE_AUX_BATCH_STRIDE = 13,
    DESC_ALPHA_VECTOR_BATCH_STRIDE = 14,
    DESC_SM_COUNT_TARGET = 15,
    DESC_A_SCALE_POINTER = 17,
    DESC_B_SCALE_POINTER = 18,
    DESC_C_SCALE_POINTER = 19,
    DESC_D_SCALE_POINTER = 20,
    DESC_AMAX_D_POINTER = 21,
    DESC_EPILOGUE_AUX_DATA_TYPE = 22,
    DESC_EPILOGUE_AUX_SCALE_POINTER = 23,
    DESC_EPILOGUE_AUX_AMAX_POINTER = 24,
    DESC_FAST_ACCUM = 25,
    DESC_BIAS_DATA_TYPE = 26,
    DESC_A_SCALE_MODE = 31,
    DESC_B_SCALE_MODE = 32,
    DESC_C_SCALE_MODE = 33,
    DESC_D_SCALE_MODE = 34,
    DESC_EPILOGUE_AUX_SCALE_MODE = 35,
    DESC_D_OUT_SCALE_POINTER = 36,
    DESC_D_OUT_SCALE_MODE = 37,
    DESC_EMULATION_DESCRIPTOR = 38,
    DESC_ALPHA_BATCH_STRIDE = 39,
    DESC_BETA_BATCH_STRIDE = 40,
};

enum {
    LAYOUT_TYPE = 0,
    LAYOUT_ORDER = 1,
    LAYOUT_ROWS = 2,
    LAYOUT_COLS = 3,
    LAYOUT_LD = 4,
    LAYOUT_BATCH_COUNT = 5,
    LAYOUT_STRIDED_BATCH_OFFSET = 6,
    LAYOUT_PLANE_OFFSET = 7,
    LAYOUT_BATCH_MODE = 8,
};

enum {
    PREF_SEARCH_MODE = 0,
    PREF_MAX_WORKSPACE_BYTES = 1,
    PREF_REDUCTION_SCHEME_MASK = 3,
    PREF_MIN_ALIGNMENT_A_BYTES = 5,
    PREF_MIN_ALIGNMENT_B_BYTES = 6,
    PREF_MIN_ALIGNMENT_C_BYTES = 7,
    PREF_MIN_ALIGNMENT_D_BYTES = 8,
    PREF_MAX_WAVES_COUNT = 9,
    PREF_IMPL_MASK = 12,
};

enum { MAJOR_VERSION = 0, MINOR_VERSION = 1, PATCH_LEVEL = 2 };

// The version this stand-in answers as: cuBLAS 13.0.0 of CUDA 13.0.
static const size_t LT_VERSION = 130000;
static const size_t LT_CUDART_VERSION = 13000;

// ---- descriptors ------------------------------------------------------------------------------
// Plain structs so that attributes are (offset, size) slots; the real library's are opaque too.
struct MatmulDesc {
    int32_t compute_type, scale_type, pointer_mode, trans_a, trans_b, trans_c, fill_mode;
    uint32_t epilogue;
    uint64_t bias;
    int64_t bias_batch_stride;
    uint64_t aux;
    int64_t aux_ld, aux_batch_stride, alpha_vector_batch_stride;
    int32_t sm_count_target;
    uint64_t a_scale, b_scale, c_scale, d_scale, amax_d;
    int32_t aux_data_type;
    uint64_t aux_scale, aux_amax;
    int8_t fast_accum;
    int32_t bias_data_type;
    int32_t a_scale_mode, b_scale_mode, c_scale_mode, d_scale_mode, aux_scale_mode;
    uint64_t d_out_scale;
    int32_t d_out_scale_mode;
    uint64_t emulation_desc;
    int64_t alpha_batch_stride, beta_batch_stride;
};

struct Layout {
    uint32_t type;
    int32_t order;
    uint64_t rows, cols;
    int64_t ld;
    int32_t batch_count;
    int64_t batch_stride;
    int64_t plane_offset;
    int32_t batch_mode;
};

struct Pref {
    uint32_t search_mode;
    uint64_t max_workspace;
    uint32_t reduction_mask;
    uint32_t align_a, align_b, align_c, align_d;
    float max_waves;
    uint64_t impl_mask;
};

struct Handle {
    int (*device_range)(const void*, size_t);
    void (*count_launch)(const char*);  // the driver's launch statistics (kontext_emu_launches)
    // The driver's kontext_emu_enqueue: runs a matmul now, or records it when its stream is
    // capturing.
    int (*enqueue)(void* stream, const char* what, int (*run)(void*), void* ctx, void (*drop)(void*));
};

// What cudarc's bindings lay out: 8 u64 of opaque algorithm, and the heuristic's answer.
struct cublasLtMatmulAlgo_t {
    uint64_t data[8];
};
struct cublasLtMatmulHeuristicResult_t {
    cublasLtMatmulAlgo_t algo;
    size_t workspaceSize;
    cublasStatus_t state;
    float wavesCount;
    int reserved[4];
};
static_assert(sizeof(cublasLtMatmulAlgo_t) == 64, "cublasLtMatmulAlgo_t is 64 bytes");
static_assert(sizeof(cublasLtMatmulHeuristicResult_t) == 96, "heuristic result layout");

struct Slot {
    int id;
    size_t offset, size;
};

#define SLOT(id, type, field) {id, offsetof(type, field), sizeof(((type*)0)->field)}
static const Slot DESC_SLOTS[] = {
    SLOT(DESC_COMPUTE_TYPE, MatmulDesc, compute_type),
    SLOT(DESC_SCALE_TYPE, MatmulDesc, scale_type),
    SLOT(DESC_POINTER_MODE, MatmulDesc, pointer_mode),
    SLOT(DESC_TRANSA, MatmulDesc, trans_a),
    SLOT(DESC_TRANSB, MatmulDesc, trans_b),
    SLOT(DESC_TRANSC, MatmulDesc, trans_c),
    SLOT(DESC_FILL_MODE, MatmulDesc, fill_mode),
    SLOT(DESC_EPILOGUE, MatmulDesc, epilogue),
    SLOT(DESC_BIAS_POINTER, MatmulDesc, bias),
    SLOT(DESC_BIAS_BATCH_STRIDE, MatmulDesc, bias_batch_stride),
    SLOT(DESC_EPILOGUE_AUX_POINTER, MatmulDesc, aux),
    SLOT(DESC_EPILOGUE_AUX_LD, MatmulDesc, aux_ld),
    SLOT(DESC_EPILOGUE_AUX_BATCH_STRIDE, MatmulDesc, aux_batch_stride),
    SLOT(DESC_ALPHA_VECTOR_BATCH_STRIDE, MatmulDesc, alpha_vector_batch_stride),
    SLOT(DESC_SM_COUNT_TARGET, MatmulDesc, sm_count_target),
    SLOT(DESC_A_SCALE_POINTER, MatmulDesc, a_scale),
    SLOT(DESC_B_SCALE_POINTER, MatmulDesc, b_scale),
    SLOT(DESC_C_SCALE_POINTER, MatmulDesc, c_scale),
    SLOT(DESC_D_SCALE_POINTER, MatmulDesc, d_scale),
    SLOT(DESC_AMAX_D_POINTER, MatmulDesc, amax_d),
    SLOT(DESC_EPILOGUE_AUX_DATA_TYPE, MatmulDesc, aux_data_type),
    SLOT(DESC_EPILOGUE_AUX_SCALE_POINTER, MatmulDesc, aux_scale),
    SLOT(DESC_EPILOGUE_AUX_AMAX_POINTER, MatmulDesc, aux_amax),
    SLOT(DESC_FAST_ACCUM, MatmulDesc, fast_accum),
    SLOT(DESC_BIAS_DATA_TYPE, MatmulDesc, bias_data_type),
    SLOT(DESC_A_SCALE_MODE, MatmulDesc, a_scale_mode),
    SLOT(DESC_B_SCALE_MODE, MatmulDesc, b_scale_mode),
    SLOT(DESC_C_SCALE_MODE, MatmulDesc, c_scale_mode),
    SLOT(DESC_D_SCALE_MODE, MatmulDesc, d_scale_mode),
    SLOT(DESC_EPILOGUE_AUX_SCALE_MODE, MatmulDesc, aux_scale_mode),
    SLOT(DESC_D_OUT_SCALE_POINTER, MatmulDesc, d_out_scale),
    SLOT(DESC_D_OUT_SCALE_MODE, MatmulDesc, d_out_scale_mode),
    SLOT(DESC_EMULATION_DESCRIPTOR, MatmulDesc, emulation_desc),
    SLOT(DESC_ALPHA_BATCH_STRIDE, MatmulDesc, alpha_batch_stride),
    SLOT(DESC_BETA_BATCH_STRIDE, MatmulDesc, beta_batch_stride),
};
static const Slot LAYOUT_SLOTS[] = {
    SLOT(LAYOUT_TYPE, Layout, type),
    SLOT(LAYOUT_ORDER, Layout, order),
    SLOT(LAYOUT_ROWS, Layout, rows),
    SLOT(LAYOUT_COLS, Layout, cols),
    SLOT(LAYOUT_LD, Layout, ld),
    SLOT(LAYOUT_BATCH_COUNT, Layout, batch_count),
    SLOT(LAYOUT_STRIDED_BATCH_OFFSET, Layout, batch_stride),
    SLOT(LAYOUT_PLANE_OFFSET, Layout, plane_offset),
    SLOT(LAYOUT_BATCH_MODE, Layout, batch_mode),
};
static const Slot PREF_SLOTS[] = {
    SLOT(PREF_SEARCH_MODE, Pref, search_mode),
    SLOT(PREF_MAX_WORKSPACE_BYTES, Pref, max_workspace),
    SLOT(PREF_REDUCTION_SCHEME_MASK, Pref, reduction_mask),
    SLOT(PREF_MIN_ALIGNMENT_A_BYTES, Pref, align_a),
    SLOT(PREF_MIN_ALIGNMENT_B_BYTES, Pref, align_b),
    SLOT(PREF_MIN_ALIGNMENT_C_BYTES, Pref, align_c),
    SLOT(PREF_MIN_ALIGNMENT_D_BYTES, Pref, align_d),
    SLOT(PREF_MAX_WAVES_COUNT, Pref, max_waves),
    SLOT(PREF_IMPL_MASK, Pref, impl_mask),
};
#undef SLOT

// ---- live objects -----------------------------------------------------------------------------
// Every handle and descriptor is registered by kind, so a destroyed one, or a layout passed
// where a matmul descriptor belongs, is refused instead of read.
enum Kind { KIND_HANDLE = 1, KIND_DESC, KIND_LAYOUT, KIND_PREF };
static std::mutex g_mu;
static std::map<const void*, Kind>& live() {
    static std::map<const void*, Kind> m;
    return m;
}

static void track(const void* p, Kind k) {
    std::lock_guard<std::mutex> g(g_mu);
    live()[p] = k;
}

static bool untrack(const void* p, Kind k) {
    std::lock_guard<std::mutex> g(g_mu);
    auto it = live().find(p);
    if (it == live().end() || it->second != k) return false;
    live().erase(it);
    return true;
}

static bool is_live(const void* p, Kind k) {
    std::lock_guard<std::mutex> g(g_mu);
    auto it = live().find(p);
    return it != live().end() && it->second == k;
}

static void say(const char* fn, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
static void say(const char* fn, const char* fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "kontext-emu: %s: %s\n", fn, msg);
}

// ---- number formats ---------------------------------------------------------------------------
// Every conversion is numerics.h's, so the GEMM rounds as the hardware's cvt does. fp8 outputs
// saturate to the largest finite value (cvt.rn.satfinite, what cuBLASLt's fp8 epilogue uses):
// scaling by D_SCALE_POINTER is the caller's way to stay in range.
static size_t type_size(uint32_t t) {
    switch (t) {
        case CUDA_R_32F: return 4;
        case CUDA_R_16F:
        case CUDA_R_16BF: return 2;
        case CUDA_R_8F_E4M3:
        case CUDA_R_8F_E5M2: return 1;
        default: return 0;
    }
}

static const char* type_name(uint32_t t) {
    switch (t) {
        case CUDA_R_32F: return "CUDA_R_32F";
        case CUDA_R_16F: return "CUDA_R_16F";
        case CUDA_R_16BF: return "CUDA_R_16BF";
        case CUDA_R_8F_E4M3: return "CUDA_R_8F_E4M3";
        case CUDA_R_8F_E5M2: return "CUDA_R_8F_E5M2";
        default: return "an unsupported cudaDataType";
    }
}

static bool is_fp8(uint32_t t) { return t == CUDA_R_8F_E4M3 || t == CUDA_R_8F_E5M2; }

typedef float (*LoadFn)(const uint8_t* base, int64_t idx);
typedef void (*StoreFn)(uint8_t* base, int64_t idx, float v);

static float load_f32(const uint8_t* p, int64_t i) {
    float v;
    memcpy(&v, p + 4 * i, 4);
    return v;
}
static float load_bf16(const uint8_t* p, int64_t i) {
    uint16_t h;
    memcpy(&h, p + 2 * i, 2);
    return emu_bf16_to_f32(h);
}
static float load_f16(const uint8_t* p, int64_t i) {
    uint16_t h;
    memcpy(&h, p + 2 * i, 2);
    return emu_f16_to_f32(h);
}
static float load_e4m3(const uint8_t* p, int64_t i) { return emu_e4m3_to_f32(p[i]); }
static float load_e5m2(const uint8_t* p, int64_t i) { return emu_e5m2_to_f32(p[i]); }

static void store_f32(uint8_t* p, int64_t i, float v) { memcpy(p + 4 * i, &v, 4); }
static void store_bf16(uint8_t* p, int64_t i, float v) {
    uint16_t h = emu_f32_to_bf16_rn(v);
    memcpy(p + 2 * i, &h, 2);
}
static void store_f16(uint8_t* p, int64_t i, float v) {
    uint16_t h = emu_f32_to_f16_rn(v);
    memcpy(p + 2 * i, &h, 2);
}
static void store_e4m3(uint8_t* p, int64_t i, float v) { p[i] = emu_f32_to_e4m3(v, 1); }
static void store_e5m2(uint8_t* p, int64_t i, float v) { p[i] = emu_f32_to_e5m2(v, 1); }

static LoadFn loader(uint32_t t) {
    switch (t) {
        case CUDA_R_32F: return load_f32;
        case CUDA_R_16BF: return load_bf16;
        case CUDA_R_16F: return load_f16;
        case CUDA_R_8F_E4M3: return load_e4m3;
        case CUDA_R_8F_E5M2: return load_e5m2;
        default: return nullptr;
    }
}

static StoreFn storer(uint32_t t) {
    switch (t) {
        case CUDA_R_32F: return store_f32;
        case CUDA_R_16BF: return store_bf16;
        case CUDA_R_16F: return store_f16;
        case CUDA_R_8F_E4M3: return store_e4m3;
        case CUDA_R_8F_E5M2: return store_e5m2;
        default: return nullptr;
    }
}

// The input rounding of the FAST compute types on f32 operands: the tensor cores see bf16, f16
// or tf32 (10 mantissa bits, round to nearest even) copies.
static float round_input(float v, int compute) {
    switch (compute) {
        case COMPUTE_32F_FAST_16BF: return emu_bf16_to_f32(emu_f32_to_bf16_rn(v));
        case COMPUTE_32F_FAST_16F: return emu_f16_to_f32(emu_f32_to_f16_rn(v));
        case COMPUTE_32F_FAST_TF32: {
            uint32_t u = emu_f32_bits(v);
            if ((u & 0x7FFFFFFFu) > 0x7F800000u) return v;
            u += 0xFFFu + ((u >> 13) & 1u);
            return emu_bits_f32(u & ~0x1FFFu);
        }
        default: return v;
    }
}

// ---- the problem a descriptor and four layouts describe --------------------------------------
struct Problem {
    const Layout *a, *b, *c, *d;
    bool ta, tb;
    uint64_t m, n, k;
    int32_t batch;
    int compute;
    bool fp8;
    uint32_t epilogue;
    bool bias, relu, gelu;
    uint32_t bias_type;
    int pointer_mode;
};

static bool pow2(uint64_t v) { return v && !(v & (v - 1)); }

static const char* epilogue_name(uint32_t e) {
    switch (e) {
        case EPILOGUE_DEFAULT: return "DEFAULT";
        case EPILOGUE_RELU: return "RELU";
        case EPILOGUE_BIAS: return "BIAS";
        case EPILOGUE_RELU_BIAS: return "RELU_BIAS";
        case EPILOGUE_GELU: return "GELU";
        case EPILOGUE_GELU_BIAS: return "GELU_BIAS";
        default: return "unsupported";
    }
}

// Checks the configuration against cuBLASLt's documented rules; on refusal writes why.
static cublasStatus_t resolve(const MatmulDesc* desc, const Layout* a, const Layout* b,
                              const Layout* c, const Layout* d, Problem* p, char* why,
                              size_t why_len) {
#define REFUSE(status, ...)                    \
    do {                                       \
        snprintf(why, why_len, __VA_ARGS__);   \
        return status;                         \
    } while (0)
    const Layout* all[4] = {a, b, c, d};
    const char* names[4] = {"A", "B", "C", "D"};
    for (int i = 0; i < 4; i++) {
        const Layout* l = all[i];
        if (l->order != ORDER_COL)
            REFUSE(CUBLAS_STATUS_NOT_SUPPORTED,
                   "%s: CUBLASLT_MATRIX_LAYOUT_ORDER %d; this cuBLASLt runs CUBLASLT_ORDER_COL only",
                   names[i], l->order);
        if (type_size(l->type) == 0)
            REFUSE(CUBLAS_STATUS_NOT_SUPPORTED, "%s: cudaDataType %u is not supported", names[i],
                   l->type);
        if (l->ld < 0 || (uint64_t)l->ld < l->rows)
            REFUSE(CUBLAS_STATUS_INVALID_VALUE,
                   "%s: leading dimension %lld < rows %llu (CUBLASLT_MATRIX_LAYOUT_LD must keep "
                   "columns from overlapping)",
                   names[i], (long long)l->ld, (unsigned long long)l->rows);
        if (l->batch_count < 1)
            REFUSE(CUBLAS_STATUS_INVALID_VALUE, "%s: batch count %d < 1", names[i],
                   l->batch_count);
        if (l->batch_mode != 0)
            REFUSE(CUBLAS_STATUS_NOT_SUPPORTED, "%s: only CUBLASLT_BATCH_MODE_STRIDED is supported",
                   names[i]);
        if (l->plane_offset != 0)
            REFUSE(CUBLAS_STATUS_NOT_SUPPORTED, "%s: CUBLASLT_MATRIX_LAYOUT_PLANE_OFFSET is not "
                   "supported (planar complex)", names[i]);
    }
    for (int t : {desc->trans_a, desc->trans_b})
        if (t != OP_N && t != OP_T && t != OP_C)
            REFUSE(CUBLAS_STATUS_INVALID_VALUE, "TRANSA/TRANSB %d is not a cublasOperation_t", t);
    if (desc->trans_c != OP_N)
        REFUSE(CUBLAS_STATUS_NOT_SUPPORTED, "CUBLASLT_MATMUL_DESC_TRANSC must be CUBLAS_OP_N");
    if (desc->fill_mode != FILL_FULL)
        REFUSE(CUBLAS_STATUS_NOT_SUPPORTED, "CUBLASLT_MATMUL_DESC_FILL_MODE must be FULL");
    p->a = a, p->b = b, p->c = c, p->d = d;
    p->ta = desc->trans_a != OP_N;  // OP_C is OP_T for real types
    p->tb = desc->trans_b != OP_N;
    p->m = d->rows;
    p->n = d->cols;
    uint64_t am = p->ta ? a->cols : a->rows, ak = p->ta ? a->rows : a->cols;
    uint64_t bk = p->tb ? b->cols : b->rows, bn = p->tb ? b->rows : b->cols;
    if (am != p->m || bn != p->n || ak != bk || c->rows != d->rows || c->cols != d->cols)
        REFUSE(CUBLAS_STATUS_INVALID_VALUE,
               "shapes do not chain: op(A) is %llux%llu, op(B) %llux%llu, C %llux%llu, D %llux%llu",
               (unsigned long long)am, (unsigned long long)ak, (unsigned long long)bk,
               (unsigned long long)bn, (unsigned long long)c->rows, (unsigned long long)c->cols,
               (unsigned long long)d->rows, (unsigned long long)d->cols);
    p->k = ak;
    if (a->batch_count != d->batch_count || b->batch_count != d->batch_count ||
        c->batch_count != d->batch_count)
        REFUSE(CUBLAS_STATUS_INVALID_VALUE, "batch counts differ: A %d, B %d, C %d, D %d",
               a->batch_count, b->batch_count, c->batch_count, d->batch_count);
    p->batch = d->batch_count;

    p->compute = desc->compute_type;
    if (desc->scale_type != CUDA_R_32F)
        REFUSE(CUBLAS_STATUS_NOT_SUPPORTED, "scale type %s: only CUDA_R_32F is supported",
               type_name(desc->scale_type));
    // The vector pointer modes (alpha, or alpha and beta, one per row of D) are documented only
    // for the IMMA kernels: ALPHA_DEVICE_VECTOR_BETA_HOST with int8 A/B in the regular TN
    // ordering, DEVICE_VECTOR and ALPHA_DEVICE_VECTOR_BETA_ZERO with the COL32 orderings
    // ("cublasLtMatmul()", "To use IMMA kernels"). No int8 type is emulated, so every GEMM this
    // cuBLASLt runs refuses them, as the documentation leaves them out for bf16, f16, f32 and fp8.
    switch (desc->pointer_mode) {
        case POINTER_MODE_HOST:
        case POINTER_MODE_DEVICE: break;
        case POINTER_MODE_DEVICE_VECTOR:
        case POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_ZERO:
        case POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_HOST:
            REFUSE(CUBLAS_STATUS_NOT_SUPPORTED,
                   "pointer mode %d (a per-row alpha vector): cuBLASLt documents the vector "
                   "pointer modes for IMMA (CUDA_R_8I) kernels only, not for A %s, B %s",
                   desc->pointer_mode, type_name(a->type), type_name(b->type));
        default:
            REFUSE(CUBLAS_STATUS_INVALID_VALUE, "pointer mode %d is not a cublasLtPointerMode_t",
                   desc->pointer_mode);
    }
    p->pointer_mode = desc->pointer_mode;

    // The "Datatypes supported by cublasLtMatmul()" tables, for the compute types emulated.
    p->fp8 = is_fp8(a->type) || is_fp8(b->type);
    uint32_t bias_default = d->type;
    if (p->fp8) {
        if (!is_fp8(a->type) || !is_fp8(b->type) ||
            (a->type == CUDA_R_8F_E5M2 && b->type == CUDA_R_8F_E5M2))
            REFUSE(CUBLAS_STATUS_NOT_SUPPORTED,
                   "A %s with B %s: fp8 GEMMs take E4M3 or E5M2 for both, not both E5M2",
                   type_name(a->type), type_name(b->type));
        bool e5m2 = a->type == CUDA_R_8F_E5M2 || b->type == CUDA_R_8F_E5M2;
        bool ok = (c->type == CUDA_R_16BF &&
                   (d->type == CUDA_R_16BF || d->type == CUDA_R_8F_E4M3 ||
                    (e5m2 && d->type == CUDA_R_8F_E5M2))) ||
                  (c->type == CUDA_R_16F &&
                   (d->type == CUDA_R_16F || d->type == CUDA_R_8F_E4M3 ||
                    (e5m2 && d->type == CUDA_R_8F_E5M2))) ||
                  (c->type == CUDA_R_32F && d->type == CUDA_R_32F);
        if (!ok)
            REFUSE(CUBLAS_STATUS_NOT_SUPPORTED,
                   "fp8 A %s, B %s with C %s and D %s is not in the FP8 table", type_name(a->type),
                   type_name(b->type), type_name(c->type), type_name(d->type));
        // Bias: C's type for 16-bit C, bf16 for f32 C (the FP8 table's bias column).
        bias_default = c->type == CUDA_R_32F ? (uint32_t)CUDA_R_16BF : c->type;
        if (p->compute != COMPUTE_32F)
            REFUSE(CUBLAS_STATUS_NOT_SUPPORTED, "fp8 needs CUBLAS_COMPUTE_32F (compute type %d)",
                   p->compute);
        // "To use FP8 kernels ...": A transposed, B not (the TN format), and the Tensor Core
        // Usage alignment: leading dimensions and m, k multiples of 16 bytes.
        if (!p->ta || p->tb)
            REFUSE(CUBLAS_STATUS_NOT_SUPPORTED,
                   "fp8 needs the TN form: A transposed and B not (TRANSA %d, TRANSB %d)",
                   desc->trans_a, desc->trans_b);
        for (int i = 0; i < 4; i++)
            if ((all[i]->ld * type_size(all[i]->type)) % 16)
                REFUSE(CUBLAS_STATUS_NOT_SUPPORTED,
                       "fp8: %s's leading dimension %lld is not a multiple of 16 bytes", names[i],
                       (long long)all[i]->ld);
        if (p->k % 16)
            REFUSE(CUBLAS_STATUS_NOT_SUPPORTED, "fp8: k = %llu is not a multiple of 16",
                   (unsigned long long)p->k);
        if ((p->m * type_size(d->type)) % 16 || (p->m * type_size(c->type)) % 16)
            REFUSE(CUBLAS_STATUS_NOT_SUPPORTED,
                   "fp8: m = %llu rows of C/D are not a multiple of 16 bytes",
                   (unsigned long long)p->m);
    } else {
        bool ab = a->type == b->type;
        bool cd = c->type == d->type;
        bool ok = ab && cd &&
                  ((a->type == CUDA_R_16BF && (d->type == CUDA_R_16BF || d->type == CUDA_R_32F)) ||
                   (a->type == CUDA_R_16F && (d->type == CUDA_R_16F || d->type == CUDA_R_32F)) ||
                   (a->type == CUDA_R_32F && d->type == CUDA_R_32F));
        if (!ok)
            REFUSE(CUBLAS_STATUS_NOT_SUPPORTED,
                   "A %s, B %s, C %s, D %s is not a supported type combination",
                   type_name(a->type), type_name(b->type), type_name(c->type),
                   type_name(d->type));
        bool fast = p->compute == COMPUTE_32F_FAST_16F || p->compute == COMPUTE_32F_FAST_16BF ||
                    p->compute == COMPUTE_32F_FAST_TF32;
        if (!(p->compute == COMPUTE_32F || p->compute == COMPUTE_32F_PEDANTIC ||
              (fast && a->type == CUDA_R_32F)))
            REFUSE(CUBLAS_STATUS_NOT_SUPPORTED,
                   "compute type %d with %s inputs (this cuBLASLt runs CUBLAS_COMPUTE_32F, "
                   "32F_PEDANTIC, and the 32F_FAST_* types for f32 inputs)",
                   p->compute, type_name(a->type));
    }

    p->epilogue = desc->epilogue;
    switch (desc->epilogue) {
        case EPILOGUE_DEFAULT: p->bias = p->relu = p->gelu = false; break;
        case EPILOGUE_RELU: p->bias = false, p->relu = true, p->gelu = false; break;
        case EPILOGUE_BIAS: p->bias = true, p->relu = false, p->gelu = false; break;
        case EPILOGUE_RELU_BIAS: p->bias = true, p->relu = true, p->gelu = false; break;
        case EPILOGUE_GELU: p->bias = false, p->relu = false, p->gelu = true; break;
        case EPILOGUE_GELU_BIAS: p->bias = true, p->relu = false, p->gelu = true; break;
        default:
            REFUSE(CUBLAS_STATUS_NOT_SUPPORTED,
                   "epilogue %u is not emulated (DEFAULT, RELU, BIAS, RELU_BIAS, GELU, GELU_BIAS)",
                   desc->epilogue);
    }
    p->bias_type = bias_default;
    if (desc->bias_data_type != -1 && (uint32_t)desc->bias_data_type != bias_default)
        REFUSE(CUBLAS_STATUS_NOT_SUPPORTED,
               "CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE %s: this cuBLASLt takes the default bias "
               "type (%s here)",
               type_name((uint32_t)desc->bias_data_type), type_name(bias_default));
    if (desc->aux || desc->aux_scale || desc->aux_amax)
        REFUSE(CUBLAS_STATUS_NOT_SUPPORTED, "epilogue auxiliary buffers are not emulated");
    if (desc->a_scale_mode || desc->b_scale_mode || desc->c_scale_mode || desc->d_scale_mode ||
        desc->aux_scale_mode || desc->d_out_scale || desc->d_out_scale_mode)
        REFUSE(CUBLAS_STATUS_NOT_SUPPORTED,
               "only per-tensor f32 scales (CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F) are emulated");
    if (desc->emulation_desc)
        REFUSE(CUBLAS_STATUS_NOT_SUPPORTED, "emulation descriptors are not supported");
    if (desc->alpha_batch_stride || desc->beta_batch_stride || desc->alpha_vector_batch_stride)
        REFUSE(CUBLAS_STATUS_NOT_SUPPORTED, "per-batch alpha/beta are not emulated");
    return CUBLAS_STATUS_SUCCESS;
#undef REFUSE
}

// What the algorithm is bound to: everything of the problem except the pointers.
static uint64_t fingerprint(const MatmulDesc* desc, const Problem& p) {
    uint64_t h = 1469598103934665603ull;
    auto mix = [&](uint64_t v) {
        for (int i = 0; i < 8; i++) {
            h ^= (v >> (8 * i)) & 0xFF;
            h *= 1099511628211ull;
        }
    };
    for (const Layout* l : {p.a, p.b, p.c, p.d}) {
        mix(l->type), mix((uint64_t)l->order), mix(l->rows), mix(l->cols), mix((uint64_t)l->ld);
        mix((uint64_t)l->batch_count), mix((uint64_t)l->batch_stride);
    }
    mix(p.ta), mix(p.tb), mix((uint64_t)p.compute), mix(p.epilogue), mix(p.bias_type);
    mix((uint64_t)desc->pointer_mode), mix((uint64_t)desc->scale_type);
    mix((uint64_t)desc->bias_batch_stride), mix((uint64_t)desc->fast_accum);
    return h;
}

static const uint64_t ALGO_MAGIC = 0x4B4F4E54454D554Cull;  // identifies this library's algorithms
// The workspace an algorithm claims: what a split-k kernel would, so that a workspace smaller
// than the heuristic's answer is caught; never more than the preference allows.
static const uint64_t ALGO_WORKSPACE = 1u << 20;

struct AlgoInfo {
    uint64_t fingerprint, workspace;
    uint32_t align[4];  // what the algorithm assumes of the A, B, C, D pointers
};

static void algo_pack(const AlgoInfo& i, cublasLtMatmulAlgo_t* a) {
    memset(a, 0, sizeof *a);
    a->data[0] = ALGO_MAGIC;
    a->data[1] = i.fingerprint;
    a->data[2] = i.workspace;
    a->data[3] = (uint64_t)i.align[0] | (uint64_t)i.align[1] << 16 | (uint64_t)i.align[2] << 32 |
                 (uint64_t)i.align[3] << 48;
}

static bool algo_unpack(const cublasLtMatmulAlgo_t* a, AlgoInfo* i) {
    if (a->data[0] != ALGO_MAGIC) return false;
    i->fingerprint = a->data[1];
    i->workspace = a->data[2];
    for (int k = 0; k < 4; k++) i->align[k] = (uint32_t)(a->data[3] >> (16 * k)) & 0xFFFF;
    return true;
}

// ---- memory checks ----------------------------------------------------------------------------
// A column-major operand in bytes: column c of batch b at base + b·bstride + c·stride, width bytes.
struct Region {
    uintptr_t base;
    uint64_t width, stride, cols;
    int64_t bstride;
    int32_t batch;
    bool empty() const { return width == 0 || cols == 0; }
    // [lo, hi) over all batches.
    uintptr_t lo() const {
        return base + (bstride < 0 ? (intptr_t)(batch - 1) * bstride : 0);
    }
    uintptr_t hi() const {
        uintptr_t last = base + (bstride > 0 ? (uintptr_t)(batch - 1) * (uintptr_t)bstride : 0);
        return last + (cols - 1) * stride + width;
    }
};

static Region region_of(const void* ptr, const Layout* l) {
    size_t es = type_size(l->type);
    Region r;
    r.base = (uintptr_t)ptr;
    r.width = l->rows * es;
    r.stride = l->cols > 1 ? (uint64_t)l->ld * es : r.width;
    r.cols = l->cols;
    r.bstride = l->batch_stride * (int64_t)es;
    r.batch = l->batch_count;
    return r;
}

static Region vector_region(const void* ptr, uint64_t bytes, int32_t batch, int64_t bstride) {
    Region r;
    r.base = (uintptr_t)ptr;
    r.width = bytes;
    r.stride = bytes;
    r.cols = 1;
    r.bstride = bstride;
    r.batch = batch;
    return r;
}

// Do two batch-0-shifted strided regions share a byte? Exact: for each column of x, the first
// column of y ending after its start must begin before its end (y's columns are disjoint and
// ascending because ld ≥ rows).
static bool columns_meet(uintptr_t xb, const Region& x, uintptr_t yb, const Region& y) {
    for (uint64_t c = 0; c < x.cols; c++) {
        uintptr_t lo = xb + c * x.stride, hi = lo + x.width;
        uint64_t j = lo < yb + y.width ? 0 : (lo - yb - y.width) / y.stride + 1;
        if (j < y.cols && yb + j * y.stride < hi) return true;
    }
    return false;
}

static bool overlap(const Region& x, const Region& y) {
    if (x.empty() || y.empty()) return false;
    if (x.hi() <= y.lo() || y.hi() <= x.lo()) return false;
    if ((uint64_t)x.batch * y.batch > 4096) return true;  // conservative beyond this
    for (int32_t i = 0; i < x.batch; i++)
        for (int32_t j = 0; j < y.batch; j++) {
            uintptr_t xb = x.base + (intptr_t)i * x.bstride, yb = y.base + (intptr_t)j * y.bstride;
            if (xb + (x.cols - 1) * x.stride + x.width <= yb ||
                yb + (y.cols - 1) * y.stride + y.width <= xb)
                continue;
            if (columns_meet(xb, x, yb, y)) return true;
        }
    return false;
}

// ---- the GEMM ---------------------------------------------------------------------------------
struct Run {
    Problem p;
    const uint8_t *a, *b, *c, *bias;
    uint8_t* d;
    float alpha, beta;  // alpha includes the fp8 A and B scales, beta the C scale
    float d_scale;      // fp8 D only
    bool read_c;
    float* amax;        // fp8 inputs with AMAX_D_POINTER
    int64_t bias_bstride;
    int threads;
};

static int thread_count() {
    static int n = [] {
        const char* e = getenv("KONTEXT_EMU_THREADS");
        int v = e ? atoi(e) : 0;
        if (v <= 0) v = (int)std::thread::hardware_concurrency();
        return v > 0 ? v : 1;
    }();
    return n;
}

template <class F>
static void parallel_for(int64_t tasks, int threads, const F& f) {
    std::atomic<int64_t> next(0);
    auto work = [&] {
        for (int64_t t; (t = next.fetch_add(1)) < tasks;) f(t);
    };
    int extra = (int)std::min<int64_t>(threads, tasks) - 1;
    std::vector<std::thread> pool;
    for (int i = 0; i < extra; i++) pool.emplace_back(work);
    work();
    for (auto& t : pool) t.join();
}

typedef float v8 __attribute__((vector_size(32)));

static const int MR = 8;     // rows of D per micro-tile (one packed A panel)
static const int NR = 8;     // columns of D per micro-tile (one packed B group)
static const int NB = 64;    // columns of D per task
static const int MB = 512;   // rows of D per task
static const int64_t KC = 256;  // k per pass over a task's tile (A and B slices stay in cache)

// acc[j][i] += Σ_k ap[k][i] · bp[k][j] over one k slice, k in order: a rounded f32 product added
// to one f32 accumulator per output, carried between slices in memory, so the sum is the same as
// one pass over k. Products of bf16/f16/fp8 values are exact, so this is the tensor cores' FMA
// up to the order of summation. No FMA contraction (ISO C++ mode), so the AVX2 clone and the
// baseline compute the same bits.
__attribute__((target_clones("avx2", "default")))
static void micro_tile(const float* ap, const float* bp, int64_t k, float* acc) {
    v8 c[NR];
    memcpy(c, acc, sizeof c);
    for (int64_t kk = 0; kk < k; kk++) {
        v8 a;
        memcpy(&a, ap + kk * MR, sizeof a);
        const float* b = bp + kk * NR;
        for (int j = 0; j < NR; j++) c[j] += a * b[j];
    }
    memcpy(acc, c, sizeof c);
}

static float gelu_tanh(float x) {
    const float k0 = 0.7978845608028654f;  // sqrt(2/π)
    return 0.5f * x * (1.0f + tanhf(k0 * (x + 0.044715f * x * x * x)));
}

static void run_batch(const Run& r, int32_t bi) {
    const Problem& p = r.p;
    const Layout *A = p.a, *B = p.b, *C = p.c, *D = p.d;
    const uint64_t m = p.m, n = p.n, k = p.k;
    const uint8_t* a = r.a + bi * A->batch_stride * (int64_t)type_size(A->type);
    const uint8_t* b = r.b + bi * B->batch_stride * (int64_t)type_size(B->type);
    const uint8_t* c = r.read_c ? r.c + bi * C->batch_stride * (int64_t)type_size(C->type) : nullptr;
    uint8_t* d = r.d + bi * D->batch_stride * (int64_t)type_size(D->type);
    const uint8_t* bias = r.bias ? r.bias + bi * r.bias_bstride * (int64_t)type_size(p.bias_type)
                                 : nullptr;
    LoadFn la = loader(A->type), lb = loader(B->type), lc = loader(C->type),
           lbias = loader(p.bias_type);
    StoreFn sd = storer(D->type);
    const bool round = !p.fp8 && A->type == CUDA_R_32F && p.compute != COMPUTE_32F &&
                       p.compute != COMPUTE_32F_PEDANTIC;
    const bool fp8_d = is_fp8(D->type);

    // op(A), m × k, as f32 panels of MR rows: panel q holds rows [q·MR, q·MR + MR) as [k][MR].
    const int64_t panels = (int64_t)((m + MR - 1) / MR);
    std::vector<float> ap((size_t)(panels * (int64_t)k * MR));
    const int64_t lda = A->ld;
    int threads = (double)m * n * k < (1 << 20) ? 1 : r.threads;
    parallel_for(panels, threads, [&](int64_t q) {
        float* out = ap.data() + q * (int64_t)k * MR;
        for (int i = 0; i < MR; i++) {
            uint64_t row = q * MR + i;
            for (uint64_t kk = 0; kk < k; kk++) {
                float v = 0.0f;
                if (row < m) {
                    v = p.ta ? la(a, (int64_t)(kk + row * lda)) : la(a, (int64_t)(row + kk * lda));
                    if (round) v = round_input(v, p.compute);
                }
                out[kk * MR + i] = v;
            }
        }
    });

    const int64_t row_chunks = (int64_t)((m + MB - 1) / MB), col_blocks = (int64_t)((n + NB - 1) / NB);
    std::mutex amax_mu;
    float amax = 0.0f;
    const int64_t ldb = B->ld, ldc = C->ld, ldd = D->ld;
    parallel_for(row_chunks * col_blocks, threads, [&](int64_t t) {
        const uint64_t i0 = (uint64_t)(t % row_chunks) * MB, j0 = (uint64_t)(t / row_chunks) * NB;
        const uint64_t i_end = std::min<uint64_t>(m, i0 + MB), j_end = std::min<uint64_t>(n, j0 + NB);
        const int64_t tile_panels = (int64_t)((i_end - i0 + MR - 1) / MR);
        const int64_t groups = (int64_t)((j_end - j0 + NR - 1) / NR);
        // op(B) columns [j0, j_end) in groups of NR as [group][k][NR], zero past n.
        std::vector<float> bp((size_t)(groups * (int64_t)k * NR));
        for (int64_t g = 0; g < groups; g++)
            for (int jj = 0; jj < NR; jj++) {
                uint64_t col = j0 + g * NR + jj;
                float* out = bp.data() + g * (int64_t)k * NR + jj;
                for (uint64_t kk = 0; kk < k; kk++) {
                    float v = 0.0f;
                    if (col < n) {
                        v = p.tb ? lb(b, (int64_t)(col + kk * ldb)) : lb(b, (int64_t)(kk + col * ldb));
                        if (round) v = round_input(v, p.compute);
                    }
                    out[kk * NR] = v;
                }
            }
        // The task's accumulators, [panel][group][NR][MR].
        std::vector<float> tile((size_t)(tile_panels * groups * NR * MR), 0.0f);
        for (int64_t kc = 0; kc < (int64_t)k; kc += KC) {
            const int64_t kn = std::min<int64_t>(KC, (int64_t)k - kc);
            for (int64_t q = 0; q < tile_panels; q++) {
                const float* apanel = ap.data() + ((int64_t)(i0 / MR) + q) * (int64_t)k * MR + kc * MR;
                for (int64_t g = 0; g < groups; g++)
                    micro_tile(apanel, bp.data() + g * (int64_t)k * NR + kc * NR, kn,
                               tile.data() + (q * groups + g) * NR * MR);
            }
        }
        float local_amax = 0.0f;
        for (int64_t q = 0; q < tile_panels; q++)
            for (int64_t g = 0; g < groups; g++) {
                const float* acc = tile.data() + (q * groups + g) * NR * MR;
                for (int jj = 0; jj < NR; jj++)
                    for (int ii = 0; ii < MR; ii++) {
                        const uint64_t row = i0 + q * MR + ii, col = j0 + g * NR + jj;
                        if (row >= i_end || col >= j_end) continue;
                        float v = r.alpha * acc[jj * MR + ii];
                        if (c) v += r.beta * lc(c, (int64_t)(row + col * ldc));
                        if (bias) v += lbias(bias, (int64_t)row);
                        if (p.relu) v = v > 0.0f ? v : 0.0f;
                        if (p.gelu) v = gelu_tanh(v);
                        if (r.amax) local_amax = std::max(local_amax, fabsf(v));
                        if (fp8_d) v *= r.d_scale;
                        sd(d, (int64_t)(row + col * ldd), v);
                    }
            }
        if (r.amax) {
            std::lock_guard<std::mutex> g(amax_mu);
            amax = std::max(amax, local_amax);
        }
    });
    if (r.amax) *r.amax = std::max(*r.amax, amax);
}

// ---- entry points -----------------------------------------------------------------------------
static cublasStatus_t set_slot(const Slot* slots, size_t count, void* obj, int attr,
                               const void* buf, size_t size, const char* fn) {
    for (size_t i = 0; i < count; i++)
        if (slots[i].id == attr) {
            if (!buf || size != slots[i].size) {
                say(fn, "attribute %d takes %zu bytes (given %zu%s)", attr, slots[i].size, size,
                    buf ? "" : ", buffer NULL");
                return CUBLAS_STATUS_INVALID_VALUE;
            }
            memcpy((char*)obj + slots[i].offset, buf, size);
            return CUBLAS_STATUS_SUCCESS;
        }
    say(fn, "unknown attribute %d", attr);
    return CUBLAS_STATUS_INVALID_VALUE;
}

static cublasStatus_t get_slot(const Slot* slots, size_t count, const void* obj, int attr,
                               void* buf, size_t size, size_t* written, const char* fn) {
    for (size_t i = 0; i < count; i++)
        if (slots[i].id == attr) {
            if (size == 0 && written) {
                *written = slots[i].size;
                return CUBLAS_STATUS_SUCCESS;
            }
            if (!buf || size != slots[i].size) {
                say(fn, "attribute %d takes %zu bytes (given %zu%s)", attr, slots[i].size, size,
                    buf ? "" : ", buffer NULL");
                return CUBLAS_STATUS_INVALID_VALUE;
            }
            memcpy(buf, (const char*)obj + slots[i].offset, size);
            if (written) *written = size;
            return CUBLAS_STATUS_SUCCESS;
        }
    say(fn, "unknown attribute %d", attr);
    return CUBLAS_STATUS_INVALID_VALUE;
}

#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

extern "C" {

size_t cublasLtGetVersion(void) { return LT_VERSION; }
size_t cublasLtGetCudartVersion(void) { return LT_CUDART_VERSION; }

cublasStatus_t cublasLtGetProperty(int type, int* value) {
    if (!value) return CUBLAS_STATUS_INVALID_VALUE;
    switch (type) {
        case MAJOR_VERSION: *value = (int)(LT_VERSION / 10000); return CUBLAS_STATUS_SUCCESS;
        case MINOR_VERSION: *value = (int)(LT_VERSION / 100 % 100); return CUBLAS_STATUS_SUCCESS;
        case PATCH_LEVEL: *value = (int)(LT_VERSION % 100); return CUBLAS_STATUS_SUCCESS;
        default: return CUBLAS_STATUS_INVALID_VALUE;
    }
}

const char* cublasLtGetStatusName(cublasStatus_t s) {
    switch (s) {
        case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
        case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
        case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
        case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
        case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
        case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
        case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
        case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
        case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
        case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
        default: return "CUBLAS_STATUS_UNKNOWN";
    }
}

const char* cublasLtGetStatusString(cublasStatus_t s) {
    switch (s) {
        case CUBLAS_STATUS_SUCCESS: return "success";
        case CUBLAS_STATUS_NOT_INITIALIZED: return "the library was not initialized";
        case CUBLAS_STATUS_ALLOC_FAILED: return "the resource allocation failed";
        case CUBLAS_STATUS_INVALID_VALUE: return "an invalid value was used as an argument";
        case CUBLAS_STATUS_ARCH_MISMATCH: return "an absent device architectural feature is required";
        case CUBLAS_STATUS_MAPPING_ERROR: return "an access to GPU memory space failed";
        case CUBLAS_STATUS_EXECUTION_FAILED: return "the GPU program failed to execute";
        case CUBLAS_STATUS_INTERNAL_ERROR: return "an internal operation failed";
        case CUBLAS_STATUS_NOT_SUPPORTED: return "the functionality requested is not supported";
        case CUBLAS_STATUS_LICENSE_ERROR: return "an error was detected when checking the license";
        default: return "unknown error";
    }
}

cublasStatus_t cublasLtCreate(Handle** out) {
    if (!out) return CUBLAS_STATUS_INVALID_VALUE;
    // The emulated driver must already be in the process (cudarc opens libcuda before
    // cuBLASLt); NOLOAD finds it by soname however it was opened, RTLD_LOCAL included.
    void* drv = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    void* sym = drv ? dlsym(drv, "kontext_emu_device_range") : nullptr;
    if (!sym) {
        say("cublasLtCreate",
            "the emulated driver is not loaded (libcuda.so.1 exporting kontext_emu_device_range); "
            "this cuBLASLt runs only on the emulated GPU");
        if (drv) dlclose(drv);
        return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    void* count = dlsym(drv, "kontext_emu_count_launch");
    if (!count) {
        say("cublasLtCreate", "the emulated driver lacks kontext_emu_count_launch (an older driver?)");
        dlclose(drv);
        return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    void* enqueue = dlsym(drv, "kontext_emu_enqueue");
    if (!enqueue) {
        say("cublasLtCreate", "the emulated driver lacks kontext_emu_enqueue (an older driver?)");
        dlclose(drv);
        return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    Handle* h = new Handle;
    h->device_range = (int (*)(const void*, size_t))sym;
    h->count_launch = (void (*)(const char*))count;
    h->enqueue = (int (*)(void*, const char*, int (*)(void*), void*, void (*)(void*)))enqueue;
    track(h, KIND_HANDLE);
    *out = h;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtDestroy(Handle* h) {
    if (!h || !untrack(h, KIND_HANDLE)) return CUBLAS_STATUS_NOT_INITIALIZED;
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescCreate(MatmulDesc** out, int compute, int scale) {
    if (!out) return CUBLAS_STATUS_INVALID_VALUE;
    MatmulDesc* d = new MatmulDesc();
    d->compute_type = compute;
    d->scale_type = scale;
    d->pointer_mode = POINTER_MODE_HOST;
    d->trans_a = d->trans_b = d->trans_c = OP_N;
    d->fill_mode = FILL_FULL;
    d->epilogue = EPILOGUE_DEFAULT;
    d->aux_data_type = -1;
    d->bias_data_type = -1;
    track(d, KIND_DESC);
    *out = d;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescDestroy(MatmulDesc* d) {
    if (!d) return CUBLAS_STATUS_SUCCESS;
    if (!untrack(d, KIND_DESC)) {
        say("cublasLtMatmulDescDestroy", "%p is not a live matmul descriptor", (void*)d);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    delete d;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescSetAttribute(MatmulDesc* d, int attr, const void* buf,
                                              size_t size) {
    if (!is_live(d, KIND_DESC)) return CUBLAS_STATUS_INVALID_VALUE;
    return set_slot(DESC_SLOTS, COUNT(DESC_SLOTS), d, attr, buf, size,
                    "cublasLtMatmulDescSetAttribute");
}

cublasStatus_t cublasLtMatmulDescGetAttribute(const MatmulDesc* d, int attr, void* buf,
                                              size_t size, size_t* written) {
    if (!is_live(d, KIND_DESC)) return CUBLAS_STATUS_INVALID_VALUE;
    return get_slot(DESC_SLOTS, COUNT(DESC_SLOTS), d, attr, buf, size, written,
                    "cublasLtMatmulDescGetAttribute");
}

cublasStatus_t cublasLtMatrixLayoutCreate(Layout** out, uint32_t type, uint64_t rows,
                                          uint64_t cols, int64_t ld) {
    if (!out) return CUBLAS_STATUS_INVALID_VALUE;
    Layout* l = new Layout();
    l->type = type;
    l->order = ORDER_COL;
    l->rows = rows;
    l->cols = cols;
    l->ld = ld;
    l->batch_count = 1;
    track(l, KIND_LAYOUT);
    *out = l;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutDestroy(Layout* l) {
    if (!l) return CUBLAS_STATUS_SUCCESS;
    if (!untrack(l, KIND_LAYOUT)) {
        say("cublasLtMatrixLayoutDestroy", "%p is not a live matrix layout", (void*)l);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    delete l;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutSetAttribute(Layout* l, int attr, const void* buf,
                                                size_t size) {
    if (!is_live(l, KIND_LAYOUT)) return CUBLAS_STATUS_INVALID_VALUE;
    return set_slot(LAYOUT_SLOTS, COUNT(LAYOUT_SLOTS), l, attr, buf, size,
                    "cublasLtMatrixLayoutSetAttribute");
}

cublasStatus_t cublasLtMatrixLayoutGetAttribute(const Layout* l, int attr, void* buf,
                                                size_t size, size_t* written) {
    if (!is_live(l, KIND_LAYOUT)) return CUBLAS_STATUS_INVALID_VALUE;
    return get_slot(LAYOUT_SLOTS, COUNT(LAYOUT_SLOTS), l, attr, buf, size, written,
                    "cublasLtMatrixLayoutGetAttribute");
}

cublasStatus_t cublasLtMatmulPreferenceCreate(Pref** out) {
    if (!out) return CUBLAS_STATUS_INVALID_VALUE;
    Pref* p = new Pref();
    p->reduction_mask = 7;  // CUBLASLT_REDUCTION_SCHEME_MASK: all allowed
    p->align_a = p->align_b = p->align_c = p->align_d = 256;  // documented default
    p->impl_mask = ~0ull;
    track(p, KIND_PREF);
    *out = p;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceDestroy(Pref* p) {
    if (!p) return CUBLAS_STATUS_SUCCESS;
    if (!untrack(p, KIND_PREF)) {
        say("cublasLtMatmulPreferenceDestroy", "%p is not a live preference", (void*)p);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    delete p;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceSetAttribute(Pref* p, int attr, const void* buf,
                                                    size_t size) {
    if (!is_live(p, KIND_PREF)) return CUBLAS_STATUS_INVALID_VALUE;
    return set_slot(PREF_SLOTS, COUNT(PREF_SLOTS), p, attr, buf, size,
                    "cublasLtMatmulPreferenceSetAttribute");
}

cublasStatus_t cublasLtMatmulPreferenceGetAttribute(const Pref* p, int attr, void* buf,
                                                    size_t size, size_t* written) {
    if (!is_live(p, KIND_PREF)) return CUBLAS_STATUS_INVALID_VALUE;
    return get_slot(PREF_SLOTS, COUNT(PREF_SLOTS), p, attr, buf, size, written,
                    "cublasLtMatmulPreferenceGetAttribute");
}

// One algorithm per problem: this cuBLASLt has one kernel. It is bound to the problem
// (fingerprint), assumes the pointer alignments the preference promised (capped at 16 bytes,
// the widest vector access), and claims workspace like a split-k kernel.
cublasStatus_t cublasLtMatmulAlgoGetHeuristic(Handle* h, MatmulDesc* desc, Layout* a, Layout* b,
                                              Layout* c, Layout* d, Pref* pref, int requested,
                                              cublasLtMatmulHeuristicResult_t* results,
                                              int* returned) {
    static const char* FN = "cublasLtMatmulAlgoGetHeuristic";
    if (returned) *returned = 0;
    if (!is_live(h, KIND_HANDLE)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!is_live(desc, KIND_DESC) || !is_live(a, KIND_LAYOUT) || !is_live(b, KIND_LAYOUT) ||
        !is_live(c, KIND_LAYOUT) || !is_live(d, KIND_LAYOUT) || !is_live(pref, KIND_PREF) ||
        !results || !returned) {
        say(FN, "a descriptor, layout or preference is not live, or an output pointer is NULL");
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (requested <= 0) {
        say(FN, "requestedAlgoCount %d ≤ 0", requested);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    Problem p;
    char why[512];
    cublasStatus_t s = resolve(desc, a, b, c, d, &p, why, sizeof why);
    if (s != CUBLAS_STATUS_SUCCESS) {
        say(FN, "%s", why);
        return s;
    }
    AlgoInfo info;
    const Layout* ls[4] = {a, b, c, d};
    const uint32_t promised[4] = {pref->align_a, pref->align_b, pref->align_c, pref->align_d};
    const char* names[4] = {"A", "B", "C", "D"};
    for (int i = 0; i < 4; i++) {
        uint32_t es = (uint32_t)type_size(ls[i]->type);
        if (!pow2(promised[i]) || promised[i] < es) {
            say(FN, "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_%s_BYTES %u is below its element size %u "
                "or not a power of two", names[i], promised[i], es);
            return CUBLAS_STATUS_NOT_SUPPORTED;
        }
        if (p.fp8 && promised[i] < 16) {
            say(FN, "fp8: %s may be aligned to %u bytes only; fp8 kernels need 16", names[i],
                promised[i]);
            return CUBLAS_STATUS_NOT_SUPPORTED;
        }
        info.align[i] = std::min<uint32_t>(promised[i], 16);
    }
    info.fingerprint = fingerprint(desc, p);
    info.workspace = std::min<uint64_t>(pref->max_workspace, ALGO_WORKSPACE);
    memset(&results[0], 0, sizeof results[0]);
    algo_pack(info, &results[0].algo);
    results[0].workspaceSize = info.workspace;
    results[0].state = CUBLAS_STATUS_SUCCESS;
    results[0].wavesCount = 1.0f;
    *returned = 1;
    return CUBLAS_STATUS_SUCCESS;
}

// A checked matmul with everything it needs at execution: the operands' addresses, the host
// scalars' values as they were at the call (host pointer mode reads them when the matmul is
// enqueued, as cuBLASLt does), and the device scalars' and scales' addresses (read when it
// runs). Run at once, or at every replay of the graph its stream was capturing into.
struct Pending {
    Run r;
    void (*count_launch)(const char*);
    const void *alpha_dev, *beta_dev;  // POINTER_MODE_DEVICE: read at execution
    float alpha_host, beta_host;
    uint64_t scale[4];  // A, B, C, D scale pointers (0: 1)
    uint64_t amax_d;
    void* workspace;
    uint64_t workspace_bytes;
};

static int execute(void* ctx) {
    Pending& q = *static_cast<Pending*>(ctx);
    Run r = q.r;
    float al = q.alpha_host, be = q.beta_host;
    if (q.alpha_dev) memcpy(&al, q.alpha_dev, 4);
    if (q.beta_dev) memcpy(&be, q.beta_dev, 4);
    float sv[4] = {1, 1, 1, 1};
    for (int i = 0; i < 4; i++)
        if (q.scale[i]) memcpy(&sv[i], (const void*)q.scale[i], 4);
    r.alpha = r.p.fp8 ? al * sv[0] * sv[1] : al;
    r.beta = r.p.fp8 ? be * sv[2] : be;
    r.d_scale = sv[3];
    if (q.workspace_bytes) memset(q.workspace, 0xFF, q.workspace_bytes);  // what split-k leaves
    float amax = 0.0f;
    r.amax = q.amax_d ? &amax : nullptr;
    for (int32_t bi = 0; bi < r.p.batch; bi++) run_batch(r, bi);
    if (q.amax_d) memcpy((void*)q.amax_d, &amax, 4);
    q.count_launch("cublasLtMatmul");
    return 0;
}

static void drop_pending(void* ctx) { delete static_cast<Pending*>(ctx); }

cublasStatus_t cublasLtMatmul(Handle* h, MatmulDesc* desc, const void* alpha, const void* A,
                              Layout* adesc, const void* B, Layout* bdesc, const void* beta,
                              const void* C, Layout* cdesc, void* D, Layout* ddesc,
                              const cublasLtMatmulAlgo_t* algo, void* workspace,
                              size_t workspace_bytes, void* stream) {
    static const char* FN = "cublasLtMatmul";
    if (!is_live(h, KIND_HANDLE)) {
        say(FN, "handle %p is not a live cuBLASLt handle", (void*)h);
        return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    if (!is_live(desc, KIND_DESC) || !is_live(adesc, KIND_LAYOUT) ||
        !is_live(bdesc, KIND_LAYOUT) || !is_live(cdesc, KIND_LAYOUT) ||
        !is_live(ddesc, KIND_LAYOUT)) {
        say(FN, "the matmul descriptor or a matrix layout is not live");
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (!alpha || !beta) {
        say(FN, "alpha or beta is NULL");
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    Problem p;
    char why[512];
    cublasStatus_t s = resolve(desc, adesc, bdesc, cdesc, ddesc, &p, why, sizeof why);
    if (s != CUBLAS_STATUS_SUCCESS) {
        say(FN, "%s", why);
        return s;
    }
    const void* ptrs[4] = {A, B, C, D};
    const Layout* ls[4] = {adesc, bdesc, cdesc, ddesc};
    const char* names[4] = {"A", "B", "C", "D"};
    AlgoInfo info;
    if (algo) {
        if (!algo_unpack(algo, &info)) {
            say(FN, "the algorithm was not made by cublasLtMatmulAlgoGetHeuristic");
            return CUBLAS_STATUS_INVALID_VALUE;
        }
        if (info.fingerprint != fingerprint(desc, p)) {
            say(FN, "the algorithm was chosen by the heuristic for another problem (types, "
                "shapes, leading dimensions, transposes or epilogue differ)");
            return CUBLAS_STATUS_INVALID_VALUE;
        }
    } else {
        // A NULL algo runs an implicit heuristic with the default preference: no workspace, and
        // the pointers' own alignment.
        info.workspace = 0;
        for (int i = 0; i < 4; i++) {
            uintptr_t v = (uintptr_t)ptrs[i];
            info.align[i] = v ? (uint32_t)std::min<uintptr_t>(v & (~v + 1), 16) : 16;
            if (p.fp8 && info.align[i] < 16) {
                say(FN, "fp8: %s (%p) is not 16-byte aligned", names[i], ptrs[i]);
                return CUBLAS_STATUS_NOT_SUPPORTED;
            }
        }
    }
    if (workspace_bytes < info.workspace) {
        say(FN, "workspace of %zu bytes; the algorithm needs %llu (its heuristic result's "
            "workspaceSize)", workspace_bytes, (unsigned long long)info.workspace);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (p.m == 0 || p.n == 0) {
        // Nothing to compute; still one matmul of the stream (and of a capture).
        Pending* q = new Pending();
        q->r.p = p;
        q->r.p.batch = 0;
        q->count_launch = h->count_launch;
        return h->enqueue(stream, FN, execute, q, drop_pending) == 0
                   ? CUBLAS_STATUS_SUCCESS
                   : CUBLAS_STATUS_EXECUTION_FAILED;
    }

    // Scalars.
    auto dev = [&](const void* ptr, size_t bytes) { return h->device_range(ptr, bytes) == 1; };
    float al, be;
    if (p.pointer_mode == POINTER_MODE_DEVICE) {
        if (!dev(alpha, 4) || !dev(beta, 4)) {
            say(FN, "pointer mode DEVICE: alpha (%p) or beta (%p) is not in device memory", alpha,
                beta);
            return CUBLAS_STATUS_INVALID_VALUE;
        }
    }
    memcpy(&al, alpha, 4);
    memcpy(&be, beta, 4);
    // In device pointer mode beta is read again when the matmul runs; whether C is read (and
    // so checked) is decided by its value now.
    const bool read_c = be != 0.0f;

    // fp8 scales: device f32 scalars, 1 when unset; documented as INVALID_VALUE elsewhere.
    struct {
        uint64_t ptr;
        const char* name;
    } scales[4] = {{desc->a_scale, "A_SCALE_POINTER"},
                   {desc->b_scale, "B_SCALE_POINTER"},
                   {desc->c_scale, "C_SCALE_POINTER"},
                   {desc->d_scale, "D_SCALE_POINTER"}};
    for (int i = 0; i < 4; i++) {
        if (!scales[i].ptr) continue;
        bool allowed = p.fp8 && (i < 3 || is_fp8(ddesc->type));
        if (!allowed) {
            say(FN, "CUBLASLT_MATMUL_DESC_%s is set but applies only to fp8 %s", scales[i].name,
                i == 3 ? "outputs" : "GEMMs");
            return CUBLAS_STATUS_INVALID_VALUE;
        }
        const void* sp = (const void*)scales[i].ptr;
        if (!dev(sp, 4)) {
            say(FN, "CUBLASLT_MATMUL_DESC_%s %p is not in device memory", scales[i].name, sp);
            return CUBLAS_STATUS_INVALID_VALUE;
        }
    }
    if (desc->amax_d && !p.fp8) {
        say(FN, "CUBLASLT_MATMUL_DESC_AMAX_D_POINTER applies only to fp8 GEMMs");
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (desc->amax_d && !dev((const void*)desc->amax_d, 4)) {
        say(FN, "AMAX_D_POINTER %p is not in device memory", (void*)desc->amax_d);
        return CUBLAS_STATUS_INVALID_VALUE;
    }

    // Operands: null, alignment, device memory.
    Region reg[4];
    for (int i = 0; i < 4; i++) {
        reg[i] = region_of(ptrs[i], ls[i]);
        bool used = i != 2 || read_c;
        if (!used || reg[i].empty()) continue;
        if (!ptrs[i]) {
            say(FN, "%s is NULL", names[i]);
            return CUBLAS_STATUS_INVALID_VALUE;
        }
        uintptr_t v = (uintptr_t)ptrs[i];
        if (v % info.align[i]) {
            say(FN, "%s (%p) is not %u-byte aligned, as the algorithm's preference "
                "(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_%s_BYTES) promised", names[i], ptrs[i],
                info.align[i], names[i]);
            return CUBLAS_STATUS_INVALID_VALUE;
        }
    }
    Region bias_reg = vector_region(nullptr, 0, 1, 0);
    if (p.bias) {
        size_t es = type_size(p.bias_type);
        if (!desc->bias) {
            say(FN, "epilogue %s needs CUBLASLT_MATMUL_DESC_BIAS_POINTER", epilogue_name(p.epilogue));
            return CUBLAS_STATUS_INVALID_VALUE;
        }
        if (desc->bias % es) {
            say(FN, "bias %p is not aligned to its %zu-byte elements", (void*)desc->bias, es);
            return CUBLAS_STATUS_INVALID_VALUE;
        }
        bias_reg = vector_region((const void*)desc->bias, p.m * es, p.batch,
                                 desc->bias_batch_stride * (int64_t)es);
    }
    struct Named {
        const Region* r;
        const char* name;
    };
    std::vector<Named> reads = {{&reg[0], "A"}, {&reg[1], "B"}};
    if (read_c) reads.push_back({&reg[2], "C"});
    if (p.bias) reads.push_back({&bias_reg, "bias"});
    std::vector<Named> checked = reads;
    checked.push_back({&reg[3], "D"});
    for (const Named& x : checked) {
        if (x.r->empty()) continue;
        const void* lo = (const void*)x.r->lo();
        size_t bytes = x.r->hi() - x.r->lo();
        if (!dev(lo, 1)) {
            say(FN, "%s (%p) is not in live device memory", x.name, lo);
            return CUBLAS_STATUS_INVALID_VALUE;
        }
        if (!dev(lo, bytes)) {
            say(FN, "%s (%p, %zu bytes as its layout describes) runs past the end of its device "
                "allocation", x.name, lo, bytes);
            return CUBLAS_STATUS_EXECUTION_FAILED;
        }
    }
    if (info.workspace) {
        if (!workspace) {
            say(FN, "workspace is NULL; the algorithm needs %llu bytes",
                (unsigned long long)info.workspace);
            return CUBLAS_STATUS_INVALID_VALUE;
        }
        if (!dev(workspace, 1) || !dev(workspace, info.workspace)) {
            say(FN, "workspace (%p, %llu bytes used) is not in live device memory", workspace,
                (unsigned long long)info.workspace);
            return CUBLAS_STATUS_INVALID_VALUE;
        }
        Region ws = vector_region(workspace, info.workspace, 1, 0);
        checked.push_back({&ws, "workspace"});
        for (const Named& x : checked)
            if (x.r != &ws && overlap(ws, *x.r)) {
                say(FN, "the workspace overlaps %s", x.name);
                return CUBLAS_STATUS_EXECUTION_FAILED;
            }
        checked.pop_back();
    }
    // D is written while A, B, C and the bias are read: sharing a byte is a race on a GPU.
    // In-place C == D is the one documented exception, with identical layouts.
    if (read_c && C == D) {
        if (cdesc->ld != ddesc->ld || cdesc->type != ddesc->type ||
            cdesc->batch_stride != ddesc->batch_stride) {
            say(FN, "in-place C == D needs identical C and D layouts (ld %lld vs %lld)",
                (long long)cdesc->ld, (long long)ddesc->ld);
            return CUBLAS_STATUS_INVALID_VALUE;
        }
    }
    for (const Named& x : reads) {
        if (x.r == &reg[2] && C == D) continue;
        if (overlap(reg[3], *x.r)) {
            say(FN, "D overlaps %s, which the GEMM reads while it writes D (a race on a GPU)",
                x.name);
            return CUBLAS_STATUS_EXECUTION_FAILED;
        }
    }

    Pending* q = new Pending();
    Run& r = q->r;
    r.p = p;
    r.a = (const uint8_t*)A;
    r.b = (const uint8_t*)B;
    r.c = (const uint8_t*)C;
    r.d = (uint8_t*)D;
    r.bias = p.bias ? (const uint8_t*)desc->bias : nullptr;
    r.bias_bstride = desc->bias_batch_stride;
    r.read_c = read_c;
    r.threads = thread_count();
    q->count_launch = h->count_launch;
    const bool dev_scalars = p.pointer_mode == POINTER_MODE_DEVICE;
    q->alpha_dev = dev_scalars ? alpha : nullptr;
    q->beta_dev = dev_scalars ? beta : nullptr;
    q->alpha_host = al;
    q->beta_host = be;
    for (int i = 0; i < 4; i++) q->scale[i] = scales[i].ptr;
    q->amax_d = desc->amax_d;
    q->workspace = workspace;
    q->workspace_bytes = info.workspace;
    // The descriptors may change or go after this call: everything the matmul needs is in `q`.
    return h->enqueue(stream, FN, execute, q, drop_pending) == 0 ? CUBLAS_STATUS_SUCCESS
                                                                 : CUBLAS_STATUS_EXECUTION_FAILED;
}

}  // extern "C"

// cublaslt_test.cpp: the stand-in cuBLASLt against a naive f64 reference, through its C entry
// points, on emulated device memory from the stand-in driver.
//
// Every check prints one line; the exit status is 1 on any failure. Inputs are fresh random
// values exactly representable in their types, outputs are poisoned (0xFF) before each GEMM, and
// each output's tolerance is what cuBLASLt's numerics allow: f32 accumulation over k
// (|error| ≤ (k+4)·2^-24·Σ|terms|, times the activation's slope, GELU's below 1.13), then one
// round to nearest in D's type (half an ulp of the value's binade: a truncating or double
// rounding fails it).
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <vector>

#include "emu/numerics.h"

// ---- the C interfaces used ------------------------------------------------------------------
enum {
    SUCCESS = 0,
    NOT_INITIALIZED = 1,
    INVALID_VALUE = 7,
    EXECUTION_FAILED = 13,
    NOT_SUPPORTED = 15,
};
enum { R_32F = 0, R_16F = 2, R_16BF = 14, R_E4M3 = 28, R_E5M2 = 29 };
enum { COMPUTE_16F = 64, COMPUTE_32F = 68, COMPUTE_32F_FAST_TF32 = 77 };
enum {
    EPI_DEFAULT = 1,
    EPI_RELU = 2,
    EPI_BIAS = 4,
    EPI_RELU_BIAS = 6,
    EPI_GELU = 32,
    EPI_GELU_BIAS = 36,
    EPI_DRELU = 136,
};
enum {
    DESC_POINTER_MODE = 2,
    DESC_TRANSA = 3,
    DESC_TRANSB = 4,
    DESC_EPILOGUE = 7,
    DESC_BIAS_POINTER = 8,
    DESC_A_SCALE = 17,
    DESC_B_SCALE = 18,
    DESC_D_SCALE = 20,
    DESC_AMAX_D = 21,
};
enum { LAYOUT_ORDER = 1, LAYOUT_BATCH_COUNT = 5, LAYOUT_BATCH_OFFSET = 6 };
enum { PREF_MAX_WS = 1, PREF_ALIGN_A = 5, PREF_ALIGN_B = 6, PREF_ALIGN_C = 7, PREF_ALIGN_D = 8 };

struct Algo {
    uint64_t data[8];
};
struct Heuristic {
    Algo algo;
    size_t workspace;
    int state;
    float waves;
    int reserved[4];
};

typedef void* H;
static int (*cuInit)(unsigned);
static int (*cuDevicePrimaryCtxRetain)(void**, int);
static int (*cuCtxSetCurrent)(void*);
static int (*cuMemAlloc)(uint64_t*, size_t);
static int (*cuMemFree)(uint64_t);
static int (*cuMemcpyHtoD)(uint64_t, const void*, size_t);
static int (*cuMemcpyDtoH)(void*, uint64_t, size_t);

static int (*ltCreate)(H*);
static int (*ltDestroy)(H);
static size_t (*ltGetVersion)();
static const char* (*ltStatusName)(int);
static int (*descCreate)(H*, int, int);
static int (*descDestroy)(H);
static int (*descSet)(H, int, const void*, size_t);
static int (*descGet)(H, int, void*, size_t, size_t*);
static int (*layoutCreate)(H*, int, uint64_t, uint64_t, int64_t);
static int (*layoutDestroy)(H);
static int (*layoutSet)(H, int, const void*, size_t);
static int (*prefCreate)(H*);
static int (*prefDestroy)(H);
static int (*prefSet)(H, int, const void*, size_t);
static int (*heuristic)(H, H, H, H, H, H, H, int, Heuristic*, int*);
static int (*matmul)(H, H, const void*, const void*, H, const void*, H, const void*, const void*,
                     H, void*, H, const Algo*, void*, size_t, void*);

static int failures = 0;
static int checks = 0;

static void report(bool ok, const std::string& what, const std::string& detail) {
    checks++;
    if (!ok) failures++;
    printf("%s %-58s %s\n", ok ? "ok  " : "FAIL", what.c_str(), detail.c_str());
    fflush(stdout);
}

static void* sym(void* lib, const char* name) {
    void* s = dlsym(lib, name);
    if (!s) {
        fprintf(stderr, "cublaslt_test: missing symbol %s: %s\n", name, dlerror());
        exit(2);
    }
    return s;
}

#define BIND(lib, var, name) var = (decltype(var))sym(lib, name)

// ---- random values exactly representable in each type -----------------------------------------
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rnd() {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}
static double uniform() { return (double)(rnd() >> 11) / 9007199254740992.0 * 2.0 - 1.0; }

// The test's own decoders (independent of the library's).
static double dec_f16(uint16_t h) {
    int e = (h >> 10) & 31, m = h & 1023;
    double v = e ? ldexp(1024 + m, e - 25) : ldexp(m, -24);
    return (h >> 15) ? -v : v;
}
static double dec_f8(uint8_t b, int mbits, int bias) {
    int e = (b >> mbits) & ((1 << (7 - mbits)) - 1), m = b & ((1 << mbits) - 1);
    double v = e ? ldexp((1 << mbits) + m, e - bias - mbits) : ldexp(m, 1 - bias - mbits);
    return (b >> 7) ? -v : v;
}

static size_t tsize(int t) { return t == R_32F ? 4 : (t == R_16F || t == R_16BF) ? 2 : 1; }

static const char* tname(int t) {
    switch (t) {
        case R_32F: return "f32";
        case R_16F: return "f16";
        case R_16BF: return "bf16";
        case R_E4M3: return "e4m3";
        case R_E5M2: return "e5m2";
    }
    return "?";
}

// One random element of type t, as bytes, and its exact value.
static double random_elem(int t, uint8_t* out) {
    switch (t) {
        case R_32F: {
            float f = (float)uniform();
            memcpy(out, &f, 4);
            return f;
        }
        case R_16BF: {
            uint16_t h = emu_f32_to_bf16_rn((float)uniform());
            memcpy(out, &h, 2);
            return emu_bf16_to_f32(h);
        }
        case R_16F: {  // |v| in [2^-4, 2)
            uint16_t h = (uint16_t)((rnd() & 1) << 15 | (11 + rnd() % 5) << 10 | (rnd() % 1024));
            memcpy(out, &h, 2);
            return dec_f16(h);
        }
        case R_E4M3: {  // |v| in [2^-3, 4)
            uint8_t b = (uint8_t)((rnd() & 1) << 7 | (4 + rnd() % 5) << 3 | (rnd() % 8));
            *out = b;
            return dec_f8(b, 3, 7);
        }
        case R_E5M2: {
            uint8_t b = (uint8_t)((rnd() & 1) << 7 | (12 + rnd() % 5) << 2 | (rnd() % 4));
            *out = b;
            return dec_f8(b, 2, 15);
        }
    }
    return 0;
}

static double decode(int t, const uint8_t* p) {
    switch (t) {
        case R_32F: {
            float f;
            memcpy(&f, p, 4);
            return f;
        }
        case R_16BF: {
            uint16_t h;
            memcpy(&h, p, 2);
            return emu_bf16_to_f32(h);
        }
        case R_16F: {
            uint16_t h;
            memcpy(&h, p, 2);
            return (h & 0x7C00) == 0x7C00 ? NAN : dec_f16(h);
        }
        case R_E4M3: return (*p & 0x7F) == 0x7F ? NAN : dec_f8(*p, 3, 7);
        case R_E5M2: return (*p & 0x7C) == 0x7C ? NAN : dec_f8(*p, 2, 15);
    }
    return NAN;
}

// Half an ulp of |x| in type t (its binade's step / 2, the subnormal step below the normals):
// the most one round-to-nearest can move a value.
static double half_ulp(int t, double x) {
    int mbits, emin;  // mantissa bits, exponent of the smallest normal
    switch (t) {
        case R_32F: mbits = 23, emin = -126; break;
        case R_16BF: mbits = 7, emin = -126; break;
        case R_16F: mbits = 10, emin = -14; break;
        case R_E4M3: mbits = 3, emin = -6; break;
        default: mbits = 2, emin = -14; break;
    }
    int e = x > 0 ? ilogb(x) : emin;
    if (e < emin) e = emin;
    return ldexp(1.0, e - mbits - 1);
}

// ---- device memory ----------------------------------------------------------------------------
struct Dev {
    uint64_t ptr = 0;
    size_t bytes = 0;
};

static Dev dalloc(size_t bytes) {
    Dev d;
    d.bytes = bytes ? bytes : 1;
    if (cuMemAlloc(&d.ptr, d.bytes)) {
        fprintf(stderr, "cublaslt_test: cuMemAlloc of %zu bytes failed\n", bytes);
        exit(2);
    }
    return d;
}
static void dfree(Dev& d) {
    if (d.ptr) cuMemFree(d.ptr);
    d.ptr = 0;
}
static void upload(const Dev& d, const std::vector<uint8_t>& h) {
    if (!h.empty() && cuMemcpyHtoD(d.ptr, h.data(), h.size())) exit(3);
}
static std::vector<uint8_t> download(const Dev& d, size_t bytes) {
    std::vector<uint8_t> h(bytes);
    if (bytes && cuMemcpyDtoH(h.data(), d.ptr, bytes)) exit(3);
    return h;
}
static void poison(const Dev& d) { upload(d, std::vector<uint8_t>(d.bytes, 0xFF)); }

// A column-major matrix: host bytes, exact values, device copy.
struct Mat {
    int type;
    uint64_t rows, cols;
    int64_t ld;
    int batch = 1;
    int64_t stride = 0;  // elements between batches
    std::vector<uint8_t> bytes;
    std::vector<double> val;
    Dev dev;
    size_t elems() const { return batch > 1 ? (size_t)(stride * (batch - 1)) + one() : one(); }
    size_t one() const { return rows && cols ? (size_t)((cols - 1) * ld + rows) : 0; }
    double at(int b, uint64_t r, uint64_t c) const { return val[b * stride + r + c * ld]; }
};

static Mat make_mat(int type, uint64_t rows, uint64_t cols, int64_t ld, int batch = 1) {
    Mat m;
    m.type = type, m.rows = rows, m.cols = cols, m.ld = ld, m.batch = batch;
    m.stride = batch > 1 ? (int64_t)(ld * cols + 7) : 0;
    size_t n = m.elems();
    m.bytes.assign(n * tsize(type), 0xEE);
    m.val.assign(n, NAN);
    for (int b = 0; b < batch; b++)
        for (uint64_t c = 0; c < cols; c++)
            for (uint64_t r = 0; r < rows; r++) {
                size_t i = b * m.stride + r + c * ld;
                m.val[i] = random_elem(type, &m.bytes[i * tsize(type)]);
            }
    m.dev = dalloc(n * tsize(type));
    upload(m.dev, m.bytes);
    return m;
}

// ---- one GEMM through the library ---------------------------------------------------------------
struct Case {
    std::string name;
    uint64_t m, n, k;
    bool ta = false, tb = false;
    int at = R_16BF, bt = R_16BF, ct = R_16BF, dt = R_16BF;
    int compute = COMPUTE_32F;
    float alpha = 1.0f, beta = 0.0f;
    int epilogue = EPI_DEFAULT;
    int pad = 0;  // extra leading dimension
    int batch = 1;
    bool scales = false, amax = false, in_place = false, device_scalars = false;
};

static H g_handle;

// The tensor cores' view of an f32 operand under CUBLAS_COMPUTE_32F_FAST_TF32: 10 mantissa
// bits, round to nearest even.
static double tf32(double v) {
    float f = (float)v;
    uint32_t u;
    memcpy(&u, &f, 4);
    u = (u + 0xFFFu + ((u >> 13) & 1u)) & ~0x1FFFu;
    memcpy(&f, &u, 4);
    return f;
}

static double gelu(double x) {
    return 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)));
}

static int bias_type_for(const Case& c) {
    bool fp8 = c.at == R_E4M3 || c.at == R_E5M2;
    if (fp8) return c.ct == R_32F ? R_16BF : c.ct;
    return c.dt;
}

struct Ctx {
    H desc = nullptr, la = nullptr, lb = nullptr, lc = nullptr, ld = nullptr, pref = nullptr;
    ~Ctx() {
        if (pref) prefDestroy(pref);
        for (H l : {la, lb, lc, ld})
            if (l) layoutDestroy(l);
        if (desc) descDestroy(desc);
    }
};

static void set_batch(H l, const Mat& m) {
    if (m.batch == 1) return;
    int32_t b = m.batch;
    layoutSet(l, LAYOUT_BATCH_COUNT, &b, 4);
    layoutSet(l, LAYOUT_BATCH_OFFSET, &m.stride, 8);
}

static void run_case(const Case& cs) {
    const uint64_t m = cs.m, n = cs.n, k = cs.k;
    // Stored shapes: A is m×k (k×m when transposed), B k×n (n×k).
    uint64_t ar = cs.ta ? k : m, ac = cs.ta ? m : k, br = cs.tb ? n : k, bc = cs.tb ? k : n;
    auto ldof = [&](uint64_t rows, int t) {
        int64_t ld = (int64_t)rows + cs.pad;
        if (cs.at == R_E4M3 || cs.at == R_E5M2) {  // fp8: 16-byte leading dimensions
            int64_t q = 16 / (int64_t)tsize(t);
            ld = (ld + q - 1) / q * q;
        }
        return ld ? ld : 1;
    };
    Mat A = make_mat(cs.at, ar, ac, ldof(ar, cs.at), cs.batch);
    Mat B = make_mat(cs.bt, br, bc, ldof(br, cs.bt), cs.batch);
    Mat C = make_mat(cs.ct, m, n, ldof(m, cs.ct), cs.batch);
    Mat D = cs.in_place ? C : make_mat(cs.dt, m, n, ldof(m, cs.dt), cs.batch);
    int bt = bias_type_for(cs);
    bool has_bias = cs.epilogue == EPI_BIAS || cs.epilogue == EPI_RELU_BIAS ||
                    cs.epilogue == EPI_GELU_BIAS;
    Mat bias = make_mat(bt, m, 1, (int64_t)m, 1);
    float sv[3] = {0.75f, 1.5f, 0.5f};  // A, B, D scales
    Dev scale = dalloc(16), amax = dalloc(4), scalars = dalloc(8);
    upload(scale, std::vector<uint8_t>((uint8_t*)sv, (uint8_t*)sv + 12));
    upload(amax, std::vector<uint8_t>(4, 0));
    if (!cs.in_place) poison(D.dev);
    std::vector<uint8_t> c_before = C.bytes;

    Ctx x;
    descCreate(&x.desc, cs.compute, R_32F);
    int32_t ta = cs.ta, tb = cs.tb, epi = cs.epilogue;
    descSet(x.desc, DESC_TRANSA, &ta, 4);
    descSet(x.desc, DESC_TRANSB, &tb, 4);
    descSet(x.desc, DESC_EPILOGUE, &epi, 4);
    if (has_bias) descSet(x.desc, DESC_BIAS_POINTER, &bias.dev.ptr, 8);
    if (cs.scales) {
        uint64_t pa = scale.ptr, pb = scale.ptr + 4, pd = scale.ptr + 8;
        descSet(x.desc, DESC_A_SCALE, &pa, 8);
        descSet(x.desc, DESC_B_SCALE, &pb, 8);
        if (cs.dt == R_E4M3 || cs.dt == R_E5M2) descSet(x.desc, DESC_D_SCALE, &pd, 8);
    }
    if (cs.amax) descSet(x.desc, DESC_AMAX_D, &amax.ptr, 8);
    if (cs.device_scalars) {
        int32_t mode = 1;
        descSet(x.desc, DESC_POINTER_MODE, &mode, 4);
        float ab[2] = {cs.alpha, cs.beta};
        upload(scalars, std::vector<uint8_t>((uint8_t*)ab, (uint8_t*)ab + 8));
    }
    layoutCreate(&x.la, A.type, A.rows, A.cols, A.ld);
    layoutCreate(&x.lb, B.type, B.rows, B.cols, B.ld);
    layoutCreate(&x.lc, C.type, C.rows, C.cols, C.ld);
    layoutCreate(&x.ld, D.type, D.rows, D.cols, D.ld);
    set_batch(x.la, A), set_batch(x.lb, B), set_batch(x.lc, C), set_batch(x.ld, D);
    prefCreate(&x.pref);
    uint64_t ws_bytes = 4 << 20;
    prefSet(x.pref, PREF_MAX_WS, &ws_bytes, 8);
    Dev ws = dalloc(ws_bytes);

    Heuristic hr;
    int count = 0;
    int s = heuristic(g_handle, x.desc, x.la, x.lb, x.lc, x.ld, x.pref, 1, &hr, &count);
    if (s != SUCCESS || count != 1) {
        report(false, cs.name, std::string("heuristic: ") + ltStatusName(s));
        return;
    }
    const void* pal = cs.device_scalars ? (const void*)scalars.ptr : &cs.alpha;
    const void* pbe = cs.device_scalars ? (const void*)(scalars.ptr + 4) : &cs.beta;
    auto t0 = std::chrono::steady_clock::now();
    s = matmul(g_handle, x.desc, pal, (void*)A.dev.ptr, x.la, (void*)B.dev.ptr, x.lb, pbe,
               (void*)C.dev.ptr, x.lc, (void*)D.dev.ptr, x.ld, &hr.algo, (void*)ws.ptr, ws_bytes,
               nullptr);
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                    .count();
    if (s != SUCCESS) {
        report(false, cs.name, std::string("matmul: ") + ltStatusName(s));
        return;
    }

    std::vector<uint8_t> got = download(D.dev, D.elems() * tsize(D.type));
    bool fp8_d = cs.dt == R_E4M3 || cs.dt == R_E5M2;
    double sab = cs.scales ? (double)sv[0] * sv[1] : 1.0, sd = cs.scales && fp8_d ? sv[2] : 1.0;
    double worst = 0, worst_err = 0, worst_tol = 0, amax_ref = 0;
    size_t bad = 0;
    for (int b = 0; b < cs.batch; b++)
        for (uint64_t j = 0; j < n; j++)
            for (uint64_t i = 0; i < m; i++) {
                double acc = 0, mag = 0;
                for (uint64_t p = 0; p < k; p++) {
                    double av = cs.ta ? A.at(b, p, i) : A.at(b, i, p);
                    double bv = cs.tb ? B.at(b, j, p) : B.at(b, p, j);
                    if (cs.compute == COMPUTE_32F_FAST_TF32) av = tf32(av), bv = tf32(bv);
                    acc += av * bv;
                    mag += fabs(av * bv);
                }
                double v = cs.alpha * sab * acc;
                mag *= fabs(cs.alpha * sab);
                if (cs.beta != 0) {
                    double cv = C.at(b, i, j);
                    v += cs.beta * cv;
                    mag += fabs(cs.beta * cv);
                }
                if (has_bias) {
                    v += bias.val[i];
                    mag += fabs(bias.val[i]);
                }
                double slope = 1.0;
                if (cs.epilogue == EPI_RELU || cs.epilogue == EPI_RELU_BIAS) v = v > 0 ? v : 0;
                if (cs.epilogue == EPI_GELU || cs.epilogue == EPI_GELU_BIAS) {
                    v = gelu(v);
                    slope = 1.13;
                    mag += 1e-6;  // tanhf's own error, absolute, near 0
                }
                amax_ref = fmax(amax_ref, fabs(v));
                v *= sd;
                double acc_err = (double)(k + 4) * ldexp(1, -24) * mag * slope * sd;
                // The unrounded result lies within acc_err of v; rounding moves it half an ulp of
                // the binade it lands in (at most that of |v| + acc_err).
                double tol = acc_err + half_ulp(D.type, fabs(v) + acc_err) * 1.0000001;
                size_t idx = b * D.stride + i + j * D.ld;
                double g = decode(D.type, &got[idx * tsize(D.type)]);
                double err = fabs(g - v);
                if (!(err <= tol)) bad++;
                double ratio = g != g ? INFINITY : err / tol;
                if (!(ratio <= worst)) worst = ratio, worst_err = err, worst_tol = tol;
            }
    // Nothing outside D's elements was written: the padding keeps the poison (or C's bytes).
    size_t stray = 0;
    for (int b = 0; b < cs.batch; b++)
        for (uint64_t j = 0; j < n; j++)
            for (int64_t i = (int64_t)m; i < (j + 1 < n ? D.ld : (int64_t)m); i++) {
                size_t idx = (b * D.stride + i + j * D.ld) * tsize(D.type);
                uint8_t want = cs.in_place ? c_before[idx] : 0xFF;
                if (got[idx] != want) stray++;
            }
    char detail[256];
    snprintf(detail, sizeof detail, "worst err/tol %.2f (%.2g/%.2g), %zu over, %zu stray, %.1f ms",
             worst, worst_err, worst_tol, bad, stray, ms);
    bool ok = bad == 0 && stray == 0;
    if (cs.amax) {
        float am;
        memcpy(&am, download(amax, 4).data(), 4);
        double amax_tol = amax_ref * 1e-5 + 1e-6;
        bool amax_ok = fabs(am - amax_ref) <= amax_tol;
        ok = ok && amax_ok;
        snprintf(detail + strlen(detail), sizeof detail - strlen(detail), ", amax %g vs %g", am,
                 amax_ref);
    }
    report(ok, cs.name, detail);
    dfree(A.dev), dfree(B.dev), dfree(C.dev), dfree(bias.dev), dfree(scale), dfree(amax),
        dfree(scalars), dfree(ws);
    if (!cs.in_place) dfree(D.dev);
}

// ---- refusals ---------------------------------------------------------------------------------
// A problem built from plain parameters, for the refusal checks.
struct Setup {
    Ctx x;
    Dev a, b, c, d, ws;
    Heuristic hr;
    int count = 0;
    int hs = -1;
    float alpha = 1.0f, beta = 0.0f;
};

static void build(Setup& s, int at, int bt, int dt, uint64_t m, uint64_t n, uint64_t k, bool ta,
                  bool tb, int64_t lda, int64_t ldb, int64_t ldd, uint32_t align = 256,
                  int epilogue = EPI_DEFAULT, int compute = COMPUTE_32F) {
    descCreate(&s.x.desc, compute, R_32F);
    int32_t t0 = ta, t1 = tb, e = epilogue;
    descSet(s.x.desc, DESC_TRANSA, &t0, 4);
    descSet(s.x.desc, DESC_TRANSB, &t1, 4);
    descSet(s.x.desc, DESC_EPILOGUE, &e, 4);
    uint64_t ar = ta ? k : m, ac = ta ? m : k, br = tb ? n : k, bc = tb ? k : n;
    layoutCreate(&s.x.la, at, ar, ac, lda);
    layoutCreate(&s.x.lb, bt, br, bc, ldb);
    layoutCreate(&s.x.lc, dt == R_E4M3 ? R_16BF : dt, m, n, ldd);
    layoutCreate(&s.x.ld, dt, m, n, ldd);
    prefCreate(&s.x.pref);
    uint64_t ws = 4 << 20;
    prefSet(s.x.pref, PREF_MAX_WS, &ws, 8);
    for (int attr : {PREF_ALIGN_A, PREF_ALIGN_B, PREF_ALIGN_C, PREF_ALIGN_D})
        prefSet(s.x.pref, attr, &align, 4);
    s.a = dalloc((size_t)(lda * ac) * tsize(at) + 64);
    s.b = dalloc((size_t)(ldb * bc) * tsize(bt) + 64);
    s.c = dalloc((size_t)(ldd * n) * tsize(dt) + 64);
    s.d = dalloc((size_t)(ldd * n) * tsize(dt) + 64);
    s.ws = dalloc(ws);
    upload(s.a, std::vector<uint8_t>(s.a.bytes, 0x11));
    upload(s.b, std::vector<uint8_t>(s.b.bytes, 0x11));
    s.hs = heuristic(g_handle, s.x.desc, s.x.la, s.x.lb, s.x.lc, s.x.ld, s.x.pref, 1, &s.hr,
                     &s.count);
}

static void free_setup(Setup& s) { dfree(s.a), dfree(s.b), dfree(s.c), dfree(s.d), dfree(s.ws); }

static int run_setup(Setup& s, const void* a, const void* b, void* d, const Algo* algo,
                     size_t ws_bytes, const void* c = nullptr) {
    return matmul(g_handle, s.x.desc, &s.alpha, a, s.x.la, b, s.x.lb, &s.beta,
                  c ? c : (void*)s.c.ptr, s.x.lc, d, s.x.ld, algo, (void*)s.ws.ptr, ws_bytes,
                  nullptr);
}

static void expect(const char* what, int got, int want) {
    report(got == want, what,
           std::string("got ") + ltStatusName(got) + ", want " + ltStatusName(want));
}

static void refusals() {
    const size_t WS = 4 << 20;
    {  // fp8 in the NN form: cuBLASLt's fp8 kernels are TN only.
        Setup s;
        build(s, R_E4M3, R_E4M3, R_16BF, 32, 16, 32, false, false, 32, 32, 32);
        expect("refuse: fp8 NN → heuristic NOT_SUPPORTED", s.hs, NOT_SUPPORTED);
        report(s.count == 0, "refuse: fp8 NN → no algorithm returned",
               "returnedAlgoCount " + std::to_string(s.count));
        free_setup(s);
    }
    {  // fp8 TN with lda of 40 bytes.
        Setup s;
        build(s, R_E4M3, R_E4M3, R_16BF, 32, 16, 32, true, false, 40, 32, 32);
        expect("refuse: fp8 lda not a multiple of 16 bytes", s.hs, NOT_SUPPORTED);
        free_setup(s);
    }
    {  // fp8 with an 8-byte alignment promise.
        Setup s;
        build(s, R_E4M3, R_E4M3, R_16BF, 32, 16, 32, true, false, 32, 32, 32, 8);
        expect("refuse: fp8 with 8-byte pointer alignment", s.hs, NOT_SUPPORTED);
        free_setup(s);
    }
    {  // fp8 with k = 24.
        Setup s;
        build(s, R_E4M3, R_E4M3, R_16BF, 32, 16, 24, true, false, 32, 32, 32);
        expect("refuse: fp8 k not a multiple of 16", s.hs, NOT_SUPPORTED);
        free_setup(s);
    }
    {  // E5M2 × E5M2 is not in the fp8 table.
        Setup s;
        build(s, R_E5M2, R_E5M2, R_16BF, 32, 16, 32, true, false, 32, 32, 32);
        expect("refuse: fp8 E5M2 x E5M2", s.hs, NOT_SUPPORTED);
        free_setup(s);
    }
    {  // fp8 TN that is fine, as the control of the four above.
        Setup s;
        build(s, R_E4M3, R_E4M3, R_16BF, 32, 16, 32, true, false, 32, 32, 32);
        expect("accept: fp8 TN, 16-byte aligned (control)", s.hs, SUCCESS);
        free_setup(s);
    }
    // The per-row alpha vector modes: documented for IMMA (int8) kernels only, so refused for
    // bf16 and fp8 (the gate-on-the-output-features fusion cannot rely on them).
    for (int mode : {2, 3, 4})
        for (int t : {R_16BF, R_E4M3}) {
            Setup s;
            build(s, t, t, R_16BF, 32, 16, 32, true, false, 32, 32, 32);
            int32_t pm = mode;
            descSet(s.x.desc, DESC_POINTER_MODE, &pm, 4);
            s.hs = heuristic(g_handle, s.x.desc, s.x.la, s.x.lb, s.x.lc, s.x.ld, s.x.pref, 1,
                             &s.hr, &s.count);
            std::string what = "refuse: pointer mode " + std::to_string(mode) + " (vector alpha) " +
                               tname(t) + " TN";
            expect(what.c_str(), s.hs, NOT_SUPPORTED);
            free_setup(s);
        }
    {  // ld < rows.
        Setup s;
        build(s, R_16BF, R_16BF, R_16BF, 17, 5, 9, false, false, 16, 9, 17);
        expect("refuse: lda 16 < rows 17 → heuristic INVALID_VALUE", s.hs, INVALID_VALUE);
        int r = run_setup(s, (void*)s.a.ptr, (void*)s.b.ptr, (void*)s.d.ptr, nullptr, WS);
        expect("refuse: lda < rows → matmul (implicit heuristic)", r, INVALID_VALUE);
        free_setup(s);
    }
    {  // Shapes that do not chain: A is 8×9, B 10×5.
        Setup s;
        build(s, R_16BF, R_16BF, R_16BF, 8, 5, 9, false, false, 8, 9, 8);
        layoutDestroy(s.x.lb);
        layoutCreate(&s.x.lb, R_16BF, 10, 5, 10);
        s.hs = heuristic(g_handle, s.x.desc, s.x.la, s.x.lb, s.x.lc, s.x.ld, s.x.pref, 1, &s.hr,
                         &s.count);
        expect("refuse: op(A) k 9 vs op(B) k 10", s.hs, INVALID_VALUE);
        free_setup(s);
    }
    {  // Mixed bf16 × f16.
        Setup s;
        build(s, R_16BF, R_16F, R_16BF, 8, 8, 8, false, false, 8, 8, 8);
        expect("refuse: A bf16 with B f16", s.hs, NOT_SUPPORTED);
        free_setup(s);
    }
    {  // Row-major order.
        Setup s;
        build(s, R_16BF, R_16BF, R_16BF, 8, 8, 8, false, false, 8, 8, 8);
        int32_t row = 1;
        layoutSet(s.x.la, LAYOUT_ORDER, &row, 4);
        s.hs = heuristic(g_handle, s.x.desc, s.x.la, s.x.lb, s.x.lc, s.x.ld, s.x.pref, 1, &s.hr,
                         &s.count);
        expect("refuse: CUBLASLT_ORDER_ROW", s.hs, NOT_SUPPORTED);
        free_setup(s);
    }
    {  // Compute 16F and an epilogue not emulated.
        Setup s, t;
        build(s, R_16BF, R_16BF, R_16BF, 8, 8, 8, false, false, 8, 8, 8, 256, EPI_DEFAULT,
              COMPUTE_16F);
        expect("refuse: CUBLAS_COMPUTE_16F with bf16", s.hs, NOT_SUPPORTED);
        build(t, R_16BF, R_16BF, R_16BF, 8, 8, 8, false, false, 8, 8, 8, 256, EPI_DRELU);
        expect("refuse: epilogue DRELU (not emulated)", t.hs, NOT_SUPPORTED);
        free_setup(s), free_setup(t);
    }
    {  // Pointers: host memory, a range past the allocation's end, misalignment, overlap.
        Setup s;
        build(s, R_16BF, R_16BF, R_16BF, 16, 8, 16, false, false, 16, 16, 16, 16);
        expect("accept: bf16 16x8x16 (control)", s.hs, SUCCESS);
        int r = run_setup(s, (void*)s.a.ptr, (void*)s.b.ptr, (void*)s.d.ptr, &s.hr.algo, WS);
        expect("accept: matmul of the control", r, SUCCESS);
        std::vector<uint8_t> host(4096, 0);
        r = run_setup(s, host.data(), (void*)s.b.ptr, (void*)s.d.ptr, &s.hr.algo, WS);
        expect("refuse: A in host memory", r, INVALID_VALUE);
        // D's 16×8 bf16 elements need 256 bytes: start 128 bytes before the end.
        void* late = (void*)(s.d.ptr + s.d.bytes - 128);
        r = run_setup(s, (void*)s.a.ptr, (void*)s.b.ptr, late, &s.hr.algo, WS);
        expect("refuse: D runs past its allocation's end", r, EXECUTION_FAILED);
        r = run_setup(s, (void*)(s.a.ptr + 2), (void*)s.b.ptr, (void*)s.d.ptr, &s.hr.algo, WS);
        expect("refuse: A 2-byte aligned, 16 promised", r, INVALID_VALUE);
        r = run_setup(s, (void*)s.a.ptr, (void*)s.b.ptr, (void*)s.a.ptr, &s.hr.algo, WS);
        expect("refuse: D overlaps A", r, EXECUTION_FAILED);
        r = run_setup(s, (void*)s.a.ptr, (void*)s.b.ptr, (void*)s.d.ptr, &s.hr.algo, 0);
        expect("refuse: no workspace, the algorithm wants some", r, INVALID_VALUE);
        r = run_setup(s, (void*)s.a.ptr, (void*)s.b.ptr, (void*)s.d.ptr, &s.hr.algo,
                      s.hr.workspace);
        expect("accept: workspace below the preference's maximum", r, SUCCESS);
        r = run_setup(s, (void*)s.a.ptr, (void*)s.b.ptr, nullptr, &s.hr.algo, WS);
        expect("refuse: D NULL", r, INVALID_VALUE);
        uint64_t scale = s.ws.ptr;
        descSet(s.x.desc, DESC_A_SCALE, &scale, 8);
        r = run_setup(s, (void*)s.a.ptr, (void*)s.b.ptr, (void*)s.d.ptr, &s.hr.algo, WS);
        expect("refuse: A scale pointer on a bf16 GEMM", r, INVALID_VALUE);
        scale = 0;
        descSet(s.x.desc, DESC_A_SCALE, &scale, 8);
        // An algorithm for another problem: the same descriptor with TRANSB flipped.
        Setup o;
        build(o, R_16BF, R_16BF, R_16BF, 16, 8, 16, false, true, 16, 8, 16, 16);
        r = run_setup(s, (void*)s.a.ptr, (void*)s.b.ptr, (void*)s.d.ptr, &o.hr.algo, WS);
        expect("refuse: an algorithm chosen for another problem", r, INVALID_VALUE);
        Algo zero = {};
        r = run_setup(s, (void*)s.a.ptr, (void*)s.b.ptr, (void*)s.d.ptr, &zero, WS);
        expect("refuse: an algorithm not from the heuristic", r, INVALID_VALUE);
        // The bias epilogue without a bias.
        int32_t e = EPI_BIAS;
        descSet(s.x.desc, DESC_EPILOGUE, &e, 4);
        Heuristic hb;
        int cnt;
        heuristic(g_handle, s.x.desc, s.x.la, s.x.lb, s.x.lc, s.x.ld, s.x.pref, 1, &hb, &cnt);
        r = run_setup(s, (void*)s.a.ptr, (void*)s.b.ptr, (void*)s.d.ptr, &hb.algo, WS);
        expect("refuse: BIAS epilogue without a bias pointer", r, INVALID_VALUE);
        // A destroyed layout.
        layoutDestroy(s.x.lc);
        H dead = s.x.lc;
        s.x.lc = nullptr;
        r = matmul(g_handle, s.x.desc, &s.alpha, (void*)s.a.ptr, s.x.la, (void*)s.b.ptr, s.x.lb,
                   &s.beta, (void*)s.c.ptr, dead, (void*)s.d.ptr, s.x.ld, nullptr,
                   (void*)s.ws.ptr, WS, nullptr);
        expect("refuse: a destroyed layout", r, INVALID_VALUE);
        free_setup(s), free_setup(o);
    }
    {  // Empty problems: m = 0 does nothing; k = 0 leaves D = beta·C.
        Setup s;
        build(s, R_32F, R_32F, R_32F, 0, 4, 4, false, false, 1, 4, 1);
        expect("accept: m = 0 heuristic", s.hs, SUCCESS);
        int r = run_setup(s, (void*)s.a.ptr, (void*)s.b.ptr, (void*)s.d.ptr, &s.hr.algo, WS);
        expect("accept: m = 0 matmul", r, SUCCESS);
        free_setup(s);
        Setup t;
        build(t, R_32F, R_32F, R_32F, 3, 2, 0, false, false, 3, 1, 3);
        std::vector<float> c = {1, 2, 3, 4, 5, 6};
        upload(t.c, std::vector<uint8_t>((uint8_t*)c.data(), (uint8_t*)c.data() + 24));
        t.beta = 2.0f;
        r = run_setup(t, (void*)t.a.ptr, (void*)t.b.ptr, (void*)t.d.ptr, &t.hr.algo, WS);
        std::vector<uint8_t> d = download(t.d, 24);
        float dv[6];
        memcpy(dv, d.data(), 24);
        bool ok = r == SUCCESS;
        for (int i = 0; i < 6; i++) ok = ok && dv[i] == 2.0f * c[i];
        report(ok, "accept: k = 0 gives D = beta*C", std::string("status ") + ltStatusName(r));
        free_setup(t);
    }
}

// cublasLtCreate in a process without the emulated driver.
static void create_without_driver(const char* lt_path) {
    pid_t pid = fork();
    if (pid == 0) {
        void* lt = dlopen(lt_path, RTLD_NOW | RTLD_LOCAL);
        if (!lt) _exit(100);
        auto create = (int (*)(H*))dlsym(lt, "cublasLtCreate");
        H h;
        int r = create(&h);
        _exit(r == NOT_INITIALIZED ? 0 : 101);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    report(WIFEXITED(st) && WEXITSTATUS(st) == 0, "refuse: cublasLtCreate without the driver",
           "child exit " + std::to_string(WIFEXITED(st) ? WEXITSTATUS(st) : -1));
}

int main() {
    const char* dir = getenv("EMU_LIB_DIR");
    if (!dir) {
        fprintf(stderr, "cublaslt_test: set EMU_LIB_DIR to the stand-in libraries' directory\n");
        return 2;
    }
    std::string cuda_path = std::string(dir) + "/libcuda.so.1";
    std::string lt_path = std::string(dir) + "/libcublasLt.so.13";
    create_without_driver(lt_path.c_str());

    void* cu = dlopen(cuda_path.c_str(), RTLD_NOW | RTLD_GLOBAL);
    if (!cu) {
        fprintf(stderr, "cublaslt_test: %s\n", dlerror());
        return 2;
    }
    BIND(cu, cuInit, "cuInit");
    BIND(cu, cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
    BIND(cu, cuCtxSetCurrent, "cuCtxSetCurrent");
    BIND(cu, cuMemAlloc, "cuMemAlloc_v2");
    BIND(cu, cuMemFree, "cuMemFree_v2");
    BIND(cu, cuMemcpyHtoD, "cuMemcpyHtoD_v2");
    BIND(cu, cuMemcpyDtoH, "cuMemcpyDtoH_v2");
    void* ctx = nullptr;
    if (cuInit(0) || cuDevicePrimaryCtxRetain(&ctx, 0) || cuCtxSetCurrent(ctx)) {
        fprintf(stderr, "cublaslt_test: the emulated driver did not start\n");
        return 2;
    }
    void* lt = dlopen(lt_path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!lt) {
        fprintf(stderr, "cublaslt_test: %s\n", dlerror());
        return 2;
    }
    BIND(lt, ltCreate, "cublasLtCreate");
    BIND(lt, ltDestroy, "cublasLtDestroy");
    BIND(lt, ltGetVersion, "cublasLtGetVersion");
    BIND(lt, ltStatusName, "cublasLtGetStatusName");
    BIND(lt, descCreate, "cublasLtMatmulDescCreate");
    BIND(lt, descDestroy, "cublasLtMatmulDescDestroy");
    BIND(lt, descSet, "cublasLtMatmulDescSetAttribute");
    BIND(lt, descGet, "cublasLtMatmulDescGetAttribute");
    BIND(lt, layoutCreate, "cublasLtMatrixLayoutCreate");
    BIND(lt, layoutDestroy, "cublasLtMatrixLayoutDestroy");
    BIND(lt, layoutSet, "cublasLtMatrixLayoutSetAttribute");
    BIND(lt, prefCreate, "cublasLtMatmulPreferenceCreate");
    BIND(lt, prefDestroy, "cublasLtMatmulPreferenceDestroy");
    BIND(lt, prefSet, "cublasLtMatmulPreferenceSetAttribute");
    BIND(lt, heuristic, "cublasLtMatmulAlgoGetHeuristic");
    BIND(lt, matmul, "cublasLtMatmul");
    expect("cublasLtCreate with the driver", ltCreate(&g_handle), SUCCESS);
    report(ltGetVersion() / 10000 == 13, "cublasLtGetVersion is 13.x",
           std::to_string(ltGetVersion()));
    {
        H d;
        descCreate(&d, COMPUTE_32F, R_32F);
        size_t need = 0;
        int r = descGet(d, DESC_TRANSA, nullptr, 0, &need);
        int32_t bad = 1;
        int r2 = descSet(d, DESC_TRANSA, &bad, 8);
        report(r == SUCCESS && need == 4 && r2 == INVALID_VALUE,
               "attribute sizes: TRANSA is 4 bytes, 8 refused",
               "size " + std::to_string(need) + ", set(8) " + ltStatusName(r2));
        descDestroy(d);
    }

    // Every transpose combination, the non-fp8 type table, odd sizes, beta.
    const uint64_t sizes[][3] = {{1, 1, 1}, {3, 17, 33}, {65, 3, 17}, {17, 33, 65}};
    const int types[][2] = {{R_16BF, R_16BF}, {R_16BF, R_32F}, {R_16F, R_16F}, {R_32F, R_32F}};
    for (auto& ty : types)
        for (int t = 0; t < 4; t++)
            for (auto& sz : sizes) {
                Case c;
                c.m = sz[0], c.n = sz[1], c.k = sz[2];
                c.ta = t & 1, c.tb = (t >> 1) & 1;
                c.at = c.bt = ty[0];
                c.ct = c.dt = ty[1];
                c.beta = (sz[0] & 2) ? 0.5f : 0.0f;
                c.alpha = (sz[1] & 1) ? 1.0f : -1.25f;
                c.pad = (int)(sz[2] % 3);
                char name[128];
                snprintf(name, sizeof name, "%s->%s %s%s m%llu n%llu k%llu beta %g", tname(c.at),
                         tname(c.dt), c.ta ? "T" : "N", c.tb ? "T" : "N",
                         (unsigned long long)c.m, (unsigned long long)c.n,
                         (unsigned long long)c.k, c.beta);
                c.name = name;
                run_case(c);
            }
    // Every epilogue, bf16 and f32 outputs, beta ≠ 0.
    const int epis[] = {EPI_DEFAULT, EPI_RELU, EPI_BIAS, EPI_RELU_BIAS, EPI_GELU, EPI_GELU_BIAS};
    const char* epi_names[] = {"DEFAULT", "RELU", "BIAS", "RELU_BIAS", "GELU", "GELU_BIAS"};
    for (int dt : {R_16BF, R_32F})
        for (int e = 0; e < 6; e++) {
            Case c;
            c.m = 33, c.n = 17, c.k = 65, c.ta = true;
            c.ct = c.dt = dt;
            c.beta = 0.25f;
            c.epilogue = epis[e];
            c.name = std::string("epilogue ") + epi_names[e] + " bf16->" + tname(dt) + " TN 33x17x65";
            run_case(c);
        }
    {  // Strided batches, in place C == D, device-side alpha/beta, tf32 inputs of f32 data.
        Case c;
        c.m = 17, c.n = 9, c.k = 33, c.batch = 3, c.beta = 1.0f, c.epilogue = EPI_BIAS;
        c.name = "batched x3 bf16 NN 17x9x33 bias";
        run_case(c);
        Case d;
        d.m = 33, d.n = 17, d.k = 9, d.beta = -0.5f, d.in_place = true, d.ta = true;
        d.name = "in place C == D bf16 TN 33x17x9 beta -0.5";
        run_case(d);
        Case e;
        e.m = 9, e.n = 5, e.k = 17, e.alpha = 0.5f, e.beta = 2.0f, e.device_scalars = true;
        e.at = e.bt = e.ct = e.dt = R_32F;
        e.name = "pointer mode DEVICE f32 NN 9x5x17";
        run_case(e);
        Case f;
        f.m = 17, f.n = 9, f.k = 65, f.tb = true, f.compute = COMPUTE_32F_FAST_TF32;
        f.at = f.bt = f.ct = f.dt = R_32F;
        f.name = "compute 32F_FAST_TF32 f32 NT 17x9x65";
        run_case(f);
    }
    // fp8 TN with scales: the FP8 table's rows.
    struct F8 {
        int at, bt, ct, dt, epi;
        bool amax;
    } f8[] = {
        {R_E4M3, R_E4M3, R_16BF, R_16BF, EPI_BIAS, false},
        {R_E4M3, R_E4M3, R_32F, R_32F, EPI_GELU_BIAS, false},
        {R_E4M3, R_E5M2, R_16F, R_16F, EPI_RELU_BIAS, false},
        {R_E4M3, R_E4M3, R_16BF, R_E4M3, EPI_BIAS, true},
        {R_E5M2, R_E4M3, R_16BF, R_E5M2, EPI_DEFAULT, true},
    };
    for (auto& f : f8) {
        Case c;
        c.m = 48, c.n = 7, c.k = 64, c.ta = true;
        c.at = f.at, c.bt = f.bt, c.ct = f.ct, c.dt = f.dt, c.epilogue = f.epi;
        c.scales = true, c.amax = f.amax, c.beta = f.ct == f.dt ? 0.5f : 0.0f;
        c.name = std::string("fp8 ") + tname(f.at) + "x" + tname(f.bt) + "->" + tname(f.dt) +
                 " TN 48x7x64 scales" + (f.amax ? " amax" : "");
        run_case(c);
    }
    {  // Something the size of a real layer, timed (the threads over column blocks).
        Case c;
        c.m = 384, c.n = 256, c.k = 512, c.ta = true, c.epilogue = EPI_BIAS;
        c.name = "bf16 TN 384x256x512 bias (timed)";
        run_case(c);
    }
    refusals();
    ltDestroy(g_handle);
    printf("cublaslt_test: %d checks, %d failed\n", checks, failures);
    return failures ? 1 : 0;
}

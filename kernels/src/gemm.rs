//! GEMMs through cuBLASLt, in the engine's row-major terms, with the bias in the epilogue.
//!
//! `C [M, N] = alpha · op(A) · op(B) + beta · C (+ bias [N] on every row)`, A and B bf16, C bf16
//! or f32, accumulation in f32 (`CUBLAS_COMPUTE_32F`). A linear layer `y = x·Wᵀ + b` is
//! `A = x`, `B = W` transposed. cuBLASLt is column-major, so the call computes `Cᵀ = op(B)ᵀ ·
//! op(A)ᵀ`: the row-major B becomes cuBLASLt's A and vice versa ([`lt_call`]), and the bias,
//! per column of the row-major C, is per row of cuBLASLt's D, which is what its `BIAS`
//! epilogue adds. The mapping is pure Rust and tested on the CPU against a column-major
//! interpreter of cuBLASLt's contract.
//!
//! Descriptors, layouts and the heuristic's algorithm are built once per problem (shape,
//! strides, types, alignment) and reused: the denoising loop repeats the same few dozen
//! problems, and after the first step a GEMM is one `cublasLtMatmul` call. The workspace is
//! allocated once, through the counted allocator.
//!
//! Two fused epilogues and an fp8 route, each as the cuBLAS documentation (section
//! "cublasLtMatmul()" and its tables, "cublasLtEpilogue_t") defines it:
//! - [`Epilogue::Gelu`]: `CUBLASLT_EPILOGUE_GELU(_BIAS)`, bias then GELU, and the documented GELU
//!   is the tanh approximation `0.5x(1 + tanh(√(2/π)(x + 0.044715x³)))` (the epilogue table's
//!   footnote), which is Flux's `gelu_tanh` (spec 1.5): the MLP's first GEMM and its activation
//!   in one pass, rounded once.
//! - [`Gemm::linear_fp8`]: e4m3 × e4m3 (or e5m2 weights) → bf16 with per-tensor scales,
//!   `D = alpha·scale_A·scale_B·op(A)·op(B) (+ bias)`; the documented FP8 rules are checked
//!   before the call (TN only, k and leading dimensions multiples of 16 bytes, 16-byte
//!   pointers, bf16 bias for bf16 D) so a violation is an error that names the rule.
//! - A gate on the output features cannot ride on cuBLASLt: the per-row alpha vector
//!   (`CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_HOST`) is documented for the IMMA (int8)
//!   kernels only, so the gated residual folds the gate into the dequantised fp8 weight instead
//!   (`Kernels::dequant_fp8_rows`, then `matmul` with beta = 1 onto the residual).

use crate::desc::{expect_disjoint, expect_valid, DType, MatDesc};
use crate::error::{shape_err, KernelError, Result};
use crate::gpu::{DeviceAlloc, DeviceMat, Gpu};
use crate::libs;
use cudarc::cublaslt::{result as lt, sys};
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

/// One operand as cuBLASLt sees it: a column-major `rows × cols` layout with leading dimension
/// `ld`, used transposed or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LtOperand {
    pub rows: u64,
    pub cols: u64,
    pub ld: i64,
    pub trans: bool,
}

/// The cuBLASLt problem for a row-major GEMM: `D [m, n] = op(A) [m, k] · op(B) [k, n]`
/// (column-major), where cuBLASLt's A is the row-major B and its B the row-major A.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LtCall {
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub a: LtOperand,
    pub b: LtOperand,
    /// D (and C): `m × n`, leading dimension `ldc`.
    pub ldc: i64,
}

/// Row-major `[M, N, K]` of `C = op(A)·op(B)` and the cuBLASLt call for it, after checking
/// shapes, types, the bias and aliasing.
pub fn lt_call(
    a: &MatDesc,
    trans_a: bool,
    b: &MatDesc,
    trans_b: bool,
    c: &MatDesc,
    bias: Option<&MatDesc>,
) -> Result<LtCall> {
    const OP: &str = "gemm";
    for (what, m) in [("A", a), ("B", b), ("C", c)] {
        expect_valid(OP, what, m)?;
    }
    let fp8 = |d: DType| matches!(d, DType::F8E4M3 | DType::F8E5M2);
    let is_fp8 = fp8(a.dtype) && fp8(b.dtype);
    if !is_fp8 && (a.dtype != DType::Bf16 || b.dtype != DType::Bf16) {
        return Err(shape_err(
            OP,
            format!(
                "A {} and B {} must both be bf16 or both fp8 (dequantise an fp8 weight, or \
                 quantise the activations, first)",
                a.show(),
                b.show()
            ),
        ));
    }
    if !matches!(c.dtype, DType::Bf16 | DType::F32) || (is_fp8 && c.dtype != DType::Bf16) {
        return Err(shape_err(
            OP,
            format!(
                "C {} must be bf16{}",
                c.show(),
                if is_fp8 {
                    " for an fp8 GEMM"
                } else {
                    " or f32"
                }
            ),
        ));
    }
    let (m, ka) = if trans_a {
        (a.cols, a.rows)
    } else {
        (a.rows, a.cols)
    };
    let (kb, n) = if trans_b {
        (b.cols, b.rows)
    } else {
        (b.rows, b.cols)
    };
    if ka != kb || (c.rows, c.cols) != (m, n) {
        return Err(shape_err(
            OP,
            format!(
                "op(A) of {}{} is [{m}, {ka}], op(B) of {}{} is [{kb}, {n}], C is {}",
                a.show(),
                if trans_a { "ᵀ" } else { "" },
                b.show(),
                if trans_b { "ᵀ" } else { "" },
                c.show()
            ),
        ));
    }
    if m == 0 || n == 0 || ka == 0 {
        return Err(shape_err(OP, format!("empty problem [{m}, {n}, {ka}]")));
    }
    if let Some(bias) = bias {
        if bias.dtype != c.dtype || (bias.rows, bias.cols) != (1, n) {
            return Err(shape_err(
                OP,
                format!(
                    "bias is {}, expected [1, {n}] {} (the output's type)",
                    bias.show(),
                    c.dtype
                ),
            ));
        }
        expect_disjoint(OP, c, "bias", bias)?;
    }
    expect_disjoint(OP, c, "A", a)?;
    expect_disjoint(OP, c, "B", b)?;
    if is_fp8 {
        check_fp8_rules(a, trans_a, b, trans_b, c, bias, ka)?;
    }
    // A row-major [r, c] matrix with row stride ld is a column-major [c, r] one with leading
    // dimension ld; one row's stride is unused, and cuBLASLt wants ld ≥ its rows.
    let ld = |d: &MatDesc| d.ld.max(d.cols) as i64;
    Ok(LtCall {
        m: n as u64,
        n: m as u64,
        k: ka as u64,
        a: LtOperand {
            rows: b.cols as u64,
            cols: b.rows as u64,
            ld: ld(b),
            trans: trans_b,
        },
        b: LtOperand {
            rows: a.cols as u64,
            cols: a.rows as u64,
            ld: ld(a),
            trans: trans_a,
        },
        ldc: ld(c),
    })
}

/// cuBLASLt's documented conditions for an FP8 GEMM ("cublasLtMatmul()": "To use FP8 kernels";
/// "Tensor Core Usage"; the FP8 type table), in row-major terms: cuBLASLt's A is our B, so its
/// "TN" (A transposed, B not) is `x · Wᵀ`; every leading dimension and k a multiple of 16 bytes,
/// cuBLASLt's m (our N) × 2 bytes of bf16 D too; 16-byte pointers; not e5m2 × e5m2.
fn check_fp8_rules(
    a: &MatDesc,
    trans_a: bool,
    b: &MatDesc,
    trans_b: bool,
    c: &MatDesc,
    bias: Option<&MatDesc>,
    k: usize,
) -> Result<()> {
    const OP: &str = "gemm (fp8)";
    let rule = |why: String| Err(shape_err(OP, why));
    if a.dtype == DType::F8E5M2 && b.dtype == DType::F8E5M2 {
        return rule("e5m2 × e5m2 is not in cuBLASLt's FP8 table".into());
    }
    if trans_a || !trans_b {
        return rule(format!(
            "fp8 GEMMs are TN only: x · Wᵀ with W [N, K] (got op(A) {}, op(B) {})",
            if trans_a { "Aᵀ" } else { "A" },
            if trans_b { "Bᵀ" } else { "B" }
        ));
    }
    if k % 16 != 0 {
        return rule(format!("k = {k} must be a multiple of 16"));
    }
    let n = c.cols;
    if (n * 2) % 16 != 0 {
        return rule(format!(
            "N = {n} output features must be a multiple of 8 (16 bytes of bf16)"
        ));
    }
    let ld_bytes = |d: &MatDesc| d.ld.max(d.cols) * d.dtype.size();
    for (what, d) in [("A", a), ("B", b), ("C", c)] {
        if ld_bytes(d) % 16 != 0 {
            return rule(format!(
                "{what} {}: its row stride must be a multiple of 16 bytes",
                d.show()
            ));
        }
    }
    for (what, d) in [
        ("A", Some(a)),
        ("B", Some(b)),
        ("C", Some(c)),
        ("bias", bias),
    ] {
        if let Some(d) = d {
            if d.addr % 16 != 0 {
                return rule(format!(
                    "{what} {} at {:#x} must be 16-byte aligned",
                    d.show(),
                    d.addr
                ));
            }
        }
    }
    Ok(())
}

/// The largest power of two (≤ 256) dividing `addr`: what cuBLASLt may assume about a pointer.
pub fn alignment(addr: u64) -> u32 {
    if addr == 0 {
        256
    } else {
        (1u64 << addr.trailing_zeros().min(8)) as u32
    }
}

fn cuda_type(d: DType) -> sys::cudaDataType {
    match d {
        DType::F32 => sys::cudaDataType_t::CUDA_R_32F,
        DType::F8E4M3 => sys::cudaDataType_t::CUDA_R_8F_E4M3,
        DType::F8E5M2 => sys::cudaDataType_t::CUDA_R_8F_E5M2,
        _ => sys::cudaDataType_t::CUDA_R_16BF,
    }
}

/// What runs on the accumulator before the store (besides alpha, beta and the bias).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Epilogue {
    /// Nothing: `alpha·A·B + beta·C (+ bias)`.
    None,
    /// GELU, tanh approximation, after the bias (`CUBLASLT_EPILOGUE_GELU_BIAS`).
    Gelu,
}

/// What one cached plan depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    call: LtCall,
    /// Row-major A and B (cuBLASLt's B and A) and C.
    a_dtype: DType,
    b_dtype: DType,
    c_dtype: DType,
    bias: bool,
    epilogue: Epilogue,
    /// Alignment of A, B, C (cuBLASLt's operands) and the bias.
    align: [u32; 4],
}

/// cuBLASLt descriptors and the chosen algorithm for one problem.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each descriptor was created once by this plan and is destroyed once.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.c);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

fn lt_err(op: &str, e: impl std::fmt::Debug) -> KernelError {
    KernelError::Cublas {
        op: op.to_string(),
        msg: format!("{e:?}"),
    }
}

/// cuBLASLt handle, workspace and plan cache.
pub struct Gemm {
    gpu: Arc<Gpu>,
    handle: sys::cublasLtHandle_t,
    workspace: Arc<DeviceAlloc>,
    plans: Mutex<HashMap<PlanKey, Plan>>,
}

// SAFETY: the handle and descriptors are only used while holding `plans`' lock (descriptors are
// mutated per call: the bias pointer), and cuBLASLt handles may be used from any thread.
unsafe impl Send for Gemm {}
// SAFETY: as above.
unsafe impl Sync for Gemm {}

impl Drop for Gemm {
    fn drop(&mut self) {
        self.plans.lock().unwrap_or_else(|p| p.into_inner()).clear();
        // SAFETY: created in `new`, destroyed once, after every plan.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

/// Workspace: cuBLASLt's recommendation for Hopper (32 MiB; 4 MiB before it).
fn workspace_bytes(gpu: &Gpu) -> usize {
    if gpu.info.compute_capability.0 >= 9 {
        32 << 20
    } else {
        4 << 20
    }
}

impl Gemm {
    /// Loads cuBLASLt (an error, not a panic, when it is missing), creates the handle and the
    /// workspace (one counted allocation).
    pub fn new(gpu: &Arc<Gpu>) -> Result<Gemm> {
        libs::ensure_cublaslt()?;
        gpu.context()
            .bind_to_thread()
            .map_err(|e| lt_err("cuCtxSetCurrent", e))?;
        let handle = lt::create_handle().map_err(|e| lt_err("cublasLtCreate", e))?;
        let workspace = gpu.alloc(workspace_bytes(gpu))?;
        Ok(Gemm {
            gpu: gpu.clone(),
            handle,
            workspace,
            plans: Mutex::new(HashMap::new()),
        })
    }

    /// `y [M, N] = x [M, K] · Wᵀ + bias` for a linear layer with `w [N, K]`, `bias [1, N]`.
    pub fn linear(
        &self,
        x: &DeviceMat,
        w: &DeviceMat,
        bias: Option<&DeviceMat>,
        y: &DeviceMat,
    ) -> Result<()> {
        self.matmul(x, false, w, true, y, bias, 1.0, 0.0)
    }

    /// `y = GELU_tanh(x · Wᵀ + bias)` in one pass (`CUBLASLT_EPILOGUE_GELU_BIAS`): shapes as in
    /// [`Gemm::linear`].
    pub fn linear_gelu(
        &self,
        x: &DeviceMat,
        w: &DeviceMat,
        bias: Option<&DeviceMat>,
        y: &DeviceMat,
    ) -> Result<()> {
        let call = Call {
            a: x,
            trans_a: false,
            b: w,
            trans_b: true,
            c: y,
            bias,
            alpha: 1.0,
            beta: 0.0,
            epilogue: Epilogue::Gelu,
            b_scale: None,
        };
        self.run(&call)
    }

    /// `y [M, N] = w_scale · s_x · (x8 · w8ᵀ) (+ bias)` on the fp8 tensor cores, then GELU when
    /// `epilogue` says so: x8 `[M, K]` e4m3 with its per-tensor scale `x_scale` (f32 `[1, 1]`
    /// on the device, as [`crate::Kernels::quantise_e4m3`] leaves it), w8 `[N, K]` e4m3 or e5m2
    /// with its host scale `w_scale`, bias bf16 `[1, N]`, y bf16. The documented FP8 rules
    /// (K and the row strides multiples of 16 bytes, N of 8, 16-byte pointers) are checked
    /// first: a violation is an error naming the rule.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_fp8(
        &self,
        x8: &DeviceMat,
        x_scale: &DeviceMat,
        w8: &DeviceMat,
        w_scale: f32,
        bias: Option<&DeviceMat>,
        y: &DeviceMat,
        epilogue: Epilogue,
    ) -> Result<()> {
        let ds = x_scale.desc();
        if ds.dtype != DType::F32 || (ds.rows, ds.cols) != (1, 1) || ds.addr % 4 != 0 {
            return Err(shape_err(
                "gemm (fp8)",
                format!("the activations' scale {} must be one f32", ds.show()),
            ));
        }
        if x8.desc().dtype != DType::F8E4M3 {
            return Err(shape_err(
                "gemm (fp8)",
                format!("activations {} must be e4m3", x8.desc().show()),
            ));
        }
        if !w_scale.is_finite() {
            return Err(shape_err(
                "gemm (fp8)",
                format!("weight scale {w_scale} is not finite"),
            ));
        }
        let call = Call {
            a: x8,
            trans_a: false,
            b: w8,
            trans_b: true,
            c: y,
            bias,
            alpha: w_scale,
            beta: 0.0,
            epilogue,
            b_scale: Some(ds.addr),
        };
        self.run(&call)
    }

    /// `C = alpha · op(A) · op(B) + beta · C (+ bias on every row)`; see the module docs.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &self,
        a: &DeviceMat,
        trans_a: bool,
        b: &DeviceMat,
        trans_b: bool,
        c: &DeviceMat,
        bias: Option<&DeviceMat>,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        let call = Call {
            a,
            trans_a,
            b,
            trans_b,
            c,
            bias,
            alpha,
            beta,
            epilogue: Epilogue::None,
            b_scale: None,
        };
        self.run(&call)
    }

    fn run(&self, k: &Call) -> Result<()> {
        let (a, b, c, bias, alpha, beta) = (k.a, k.b, k.c, k.bias, k.alpha, k.beta);
        let (da, db, dc) = (a.desc(), b.desc(), c.desc());
        let dbias = bias.map(|x| x.desc());
        let call = lt_call(&da, k.trans_a, &db, k.trans_b, &dc, dbias.as_ref())?;
        let key = PlanKey {
            call,
            a_dtype: da.dtype,
            b_dtype: db.dtype,
            c_dtype: dc.dtype,
            bias: bias.is_some(),
            epilogue: k.epilogue,
            align: [
                alignment(db.addr),
                alignment(da.addr),
                alignment(dc.addr),
                dbias.map_or(256, |d| alignment(d.addr)),
            ],
        };
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        let plan = match plans.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(v) => v.insert(self.plan(&key)?),
        };
        if let Some(bias) = &dbias {
            let ptr = bias.addr;
            // SAFETY: the attribute is a device pointer (8 bytes) read during the call.
            unsafe {
                lt::set_matmul_desc_attribute(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &ptr as *const u64 as *const c_void,
                    std::mem::size_of::<u64>(),
                )
            }
            .map_err(|e| lt_err("set bias pointer", e))?;
        }
        if let Some(ptr) = k.b_scale {
            // The row-major A (the activations) is cuBLASLt's B.
            // SAFETY: as the bias pointer: a device pointer to one f32, read during the call.
            unsafe {
                lt::set_matmul_desc_attribute(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
                    &ptr as *const u64 as *const c_void,
                    std::mem::size_of::<u64>(),
                )
            }
            .map_err(|e| lt_err("set B scale pointer", e))?;
        }
        self.gpu
            .context()
            .bind_to_thread()
            .map_err(|e| lt_err("cuCtxSetCurrent", e))?;
        // SAFETY: lt_call checked that A, B, C (and the bias) have the shapes, strides and types
        // the plan's layouts describe, and DeviceMat guarantees each lies inside a live
        // allocation held by the caller until the stream has run the GEMM (DeviceAlloc's drop
        // synchronises). C does not overlap A, B or the bias. The workspace is ours. An fp8
        // plan's scale pointer was set just above (its plan key differs from a bf16 one's, so a
        // bf16 call never sees a stale one).
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                db.addr as *const c_void,
                plan.a,
                da.addr as *const c_void,
                plan.b,
                dc.addr as *const c_void,
                plan.c,
                dc.addr as *mut c_void,
                plan.c,
                &plan.algo,
                self.workspace.ptr() as *mut c_void,
                self.workspace.bytes(),
                self.gpu.stream().cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(|e| lt_err(&format!("cublasLtMatmul {call:?}"), e))?;
        drop(plans);
        self.gpu.launched("cublasLtMatmul")
    }

    fn plan(&self, key: &PlanKey) -> Result<Plan> {
        let call = &key.call;
        let op = format!("plan {call:?}");
        let layout = |o: &LtOperand, t: sys::cudaDataType| {
            lt::create_matrix_layout(t, o.rows, o.cols, o.ld).map_err(|e| lt_err(&op, e))
        };
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(|e| lt_err(&op, e))?;
        let mut plan = Plan {
            desc,
            a: layout(&call.a, cuda_type(key.b_dtype))?,
            b: layout(&call.b, cuda_type(key.a_dtype))?,
            c: layout(
                &LtOperand {
                    rows: call.m,
                    cols: call.n,
                    ld: call.ldc,
                    trans: false,
                },
                cuda_type(key.c_dtype),
            )?,
            // SAFETY: a plain-data struct; overwritten by the heuristic below.
            algo: unsafe { std::mem::zeroed() },
        };
        let set_desc = |attr: sys::cublasLtMatmulDescAttributes_t, v: i32| {
            // SAFETY: these attributes are 32-bit integers.
            unsafe {
                lt::set_matmul_desc_attribute(
                    plan.desc,
                    attr,
                    &v as *const i32 as *const c_void,
                    std::mem::size_of::<i32>(),
                )
            }
            .map_err(|e| lt_err(&op, e))
        };
        use sys::cublasLtMatmulDescAttributes_t::*;
        set_desc(CUBLASLT_MATMUL_DESC_TRANSA, call.a.trans as i32)?;
        set_desc(CUBLASLT_MATMUL_DESC_TRANSB, call.b.trans as i32)?;
        use sys::cublasLtEpilogue_t as E;
        let epilogue = match (key.epilogue, key.bias) {
            (Epilogue::None, false) => E::CUBLASLT_EPILOGUE_DEFAULT,
            (Epilogue::None, true) => E::CUBLASLT_EPILOGUE_BIAS,
            (Epilogue::Gelu, false) => E::CUBLASLT_EPILOGUE_GELU,
            (Epilogue::Gelu, true) => E::CUBLASLT_EPILOGUE_GELU_BIAS,
        };
        set_desc(CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue as i32)?;

        let pref = lt::create_matmul_pref().map_err(|e| lt_err(&op, e))?;
        let pref = Pref(pref);
        use sys::cublasLtMatmulPreferenceAttributes_t::*;
        let ws = self.workspace.bytes() as u64;
        // SAFETY: MAX_WORKSPACE_BYTES is a u64, the alignments u32s.
        unsafe {
            lt::set_matmul_pref_attribute(
                pref.0,
                CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                8,
            )
            .map_err(|e| lt_err(&op, e))?;
            for (attr, align) in [
                (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align[0]),
                (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align[1]),
                (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align[2]),
                (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align[2]),
            ] {
                lt::set_matmul_pref_attribute(
                    pref.0,
                    attr,
                    &align as *const u32 as *const c_void,
                    4,
                )
                .map_err(|e| lt_err(&op, e))?;
            }
        }
        // SAFETY: all descriptors are live; C and D share one layout.
        let heuristic = unsafe {
            lt::get_matmul_algo_heuristic(
                self.handle,
                plan.desc,
                plan.a,
                plan.b,
                plan.c,
                plan.c,
                pref.0,
            )
        }
        .map_err(|e| {
            lt_err(
                &format!("{op}: no cuBLASLt algorithm (alignments {:?})", key.align),
                e,
            )
        })?;
        plan.algo = heuristic.algo;
        Ok(plan)
    }

    /// Problems planned so far (each costs a heuristic query once).
    pub fn plans(&self) -> usize {
        self.plans.lock().map(|p| p.len()).unwrap_or(0)
    }
}

/// One GEMM as [`Gemm::run`] takes it.
struct Call<'a> {
    a: &'a DeviceMat,
    trans_a: bool,
    b: &'a DeviceMat,
    trans_b: bool,
    c: &'a DeviceMat,
    bias: Option<&'a DeviceMat>,
    alpha: f32,
    beta: f32,
    epilogue: Epilogue,
    /// fp8: device pointer of the row-major A's (the activations') f32 scale.
    b_scale: Option<u64>,
}

/// A matmul preference, destroyed on drop.
struct Pref(sys::cublasLtMatmulPreference_t);

impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created once by create_matmul_pref, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desc::tests::bf;

    /// Element (i, j) of a column-major `rows × cols` operand with leading dimension `ld`, seen
    /// through its transpose flag: cuBLASLt's contract, written out.
    fn lt_elem(data: &[f32], o: &LtOperand, i: usize, j: usize) -> f32 {
        let (r, c) = if o.trans { (j, i) } else { (i, j) };
        assert!(
            (r as u64) < o.rows && (c as u64) < o.cols,
            "index outside the layout"
        );
        data[r + c * o.ld as usize]
    }

    /// Runs `call` the way cuBLASLt would on host buffers holding the row-major operands
    /// (`a_data` is the row-major A = cuBLASLt's B, `b_data` the row-major B = cuBLASLt's A).
    fn run_lt(call: &LtCall, a_data: &[f32], b_data: &[f32], c: &mut [f32], bias: Option<&[f32]>) {
        for j in 0..call.n as usize {
            for i in 0..call.m as usize {
                let mut acc = 0.0f32;
                for k in 0..call.k as usize {
                    acc += lt_elem(b_data, &call.a, i, k) * lt_elem(a_data, &call.b, k, j);
                }
                acc += bias.map_or(0.0, |b| b[i]);
                c[i + j * call.ldc as usize] = acc;
            }
        }
    }

    /// Row-major `[rows, cols]` with stride `ld`, filled with distinct values.
    fn fill(rows: usize, cols: usize, ld: usize, seed: f32) -> Vec<f32> {
        let mut v = vec![f32::NAN; (rows - 1) * ld + cols];
        for r in 0..rows {
            for c in 0..cols {
                v[r * ld + c] = seed + (r * 7 + c * 3) as f32 * 0.25 - (r * c) as f32 * 0.01;
            }
        }
        v
    }

    fn check_mapping(
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
        pad: usize,
        with_bias: bool,
    ) {
        // Stored shapes of A and B, each with a padded row stride.
        let (ar, ac) = if ta { (k, m) } else { (m, k) };
        let (br, bc) = if tb { (n, k) } else { (k, n) };
        let (lda, ldb, ldc) = (ac + pad, bc + pad, n + pad);
        let a = fill(ar, ac, lda, 1.0);
        let b = fill(br, bc, ldb, -2.0);
        let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.5 - 1.0).collect();
        let da = bf(0x10000, ar, ac, lda);
        let db = bf(0x20000, br, bc, ldb);
        let dc = bf(0x30000, m, n, ldc);
        let dbias = bf(0x40000, 1, n, n);
        let call = lt_call(&da, ta, &db, tb, &dc, with_bias.then_some(&dbias)).unwrap();
        let mut c = vec![f32::NAN; (m - 1) * ldc + n];
        run_lt(&call, &a, &b, &mut c, with_bias.then_some(&bias[..]));
        for i in 0..m {
            for j in 0..n {
                let mut want = if with_bias { bias[j] } else { 0.0 };
                for p in 0..k {
                    let av = if ta { a[p * lda + i] } else { a[i * lda + p] };
                    let bv = if tb { b[j * ldb + p] } else { b[p * ldb + j] };
                    want += av * bv;
                }
                let got = c[i * ldc + j];
                assert!(
                    (got - want).abs() <= 1e-3 * want.abs().max(1.0),
                    "m{m} n{n} k{k} ta{ta} tb{tb}: C[{i},{j}] = {got}, want {want}"
                );
            }
        }
    }

    #[test]
    fn row_major_problems_map_onto_cublaslt_correctly() {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            for pad in [0, 3] {
                for bias in [false, true] {
                    check_mapping(5, 7, 4, ta, tb, pad, bias);
                    check_mapping(1, 3, 9, ta, tb, pad, bias);
                }
            }
        }
    }

    #[test]
    fn linear_layer_shape_is_checked() {
        // x [8, 64] · Wᵀ with W [96, 64] → y [8, 96].
        let x = bf(0x1000, 8, 64, 64);
        let w = bf(0x10000, 96, 64, 64);
        let y = bf(0x40000, 8, 96, 96);
        let call = lt_call(&x, false, &w, true, &y, None).unwrap();
        assert_eq!((call.m, call.n, call.k), (96, 8, 64));
        assert!(call.a.trans && !call.b.trans);
        // Wrong output width, wrong inner size, fp8 weight, bias of the wrong length.
        assert!(lt_call(&x, false, &w, true, &bf(0x40000, 8, 95, 96), None).is_err());
        assert!(lt_call(&bf(0x1000, 8, 63, 64), false, &w, true, &y, None).is_err());
        let w8 = MatDesc {
            dtype: DType::F8E4M3,
            ..w
        };
        assert!(lt_call(&x, false, &w8, true, &y, None).is_err());
        assert!(lt_call(&x, false, &w, true, &y, Some(&bf(0x50000, 1, 95, 95))).is_err());
        // f32 output needs an f32 bias.
        let y32 = MatDesc {
            dtype: DType::F32,
            ..y
        };
        assert!(lt_call(&x, false, &w, true, &y32, Some(&bf(0x50000, 1, 96, 96))).is_err());
        // Output overlapping an input.
        assert!(lt_call(&x, false, &w, true, &bf(0x1000, 8, 96, 96), None).is_err());
    }

    fn f8(addr: u64, rows: usize, cols: usize, ld: usize) -> MatDesc {
        MatDesc {
            addr,
            rows,
            cols,
            ld,
            dtype: DType::F8E4M3,
        }
    }

    #[test]
    fn fp8_rules_are_checked_before_the_call() {
        // x [256, 3072] e4m3 · W [3072, 3072]ᵀ e4m3 → y bf16, bf16 bias: a Flux proj.
        let x = f8(0x10_0000, 256, 3072, 3072);
        let w = f8(0x100_0000, 3072, 3072, 3072);
        let y = bf(0x1000_0000, 256, 3072, 3072);
        let bias = bf(0x2000, 1, 3072, 3072);
        let call = lt_call(&x, false, &w, true, &y, Some(&bias)).unwrap();
        assert!(call.a.trans && !call.b.trans, "cuBLASLt's TN");
        // Not TN; k not a multiple of 16; N not a multiple of 8; strides; alignment; e5m2².
        assert!(lt_call(
            &x,
            false,
            &f8(0x100_0000, 3072, 3072, 3072),
            false,
            &y,
            None
        )
        .is_err());
        assert!(lt_call(
            &f8(0x10_0000, 256, 3064, 3064),
            false,
            &f8(0x100_0000, 3072, 3064, 3064),
            true,
            &y,
            None
        )
        .is_err());
        let w_odd = f8(0x100_0000, 3068, 3072, 3072);
        assert!(lt_call(
            &x,
            false,
            &w_odd,
            true,
            &bf(0x1000_0000, 256, 3068, 3068),
            None
        )
        .is_err());
        assert!(lt_call(&f8(0x10_0000, 256, 3072, 3080), false, &w, true, &y, None).is_err());
        assert!(lt_call(&f8(0x10_0008, 256, 3072, 3072), false, &w, true, &y, None).is_err());
        assert!(lt_call(&x, false, &w, true, &y, Some(&bf(0x2002, 1, 3072, 3072))).is_err());
        let e5 = |m: MatDesc| MatDesc {
            dtype: DType::F8E5M2,
            ..m
        };
        assert!(lt_call(&x, false, &e5(w), true, &y, None).is_ok());
        assert!(lt_call(&e5(x), false, &e5(w), true, &y, None).is_err());
        // f32 output, or one fp8 and one bf16 operand.
        let y32 = MatDesc {
            dtype: DType::F32,
            ..y
        };
        assert!(lt_call(&x, false, &w, true, &y32, None).is_err());
        assert!(lt_call(&bf(0x10_0000, 256, 3072, 3072), false, &w, true, &y, None).is_err());
    }

    #[test]
    fn alignments() {
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1002), 2);
        assert_eq!(alignment(0x1010), 16);
        assert_eq!(alignment(0x1100), 256);
    }
}

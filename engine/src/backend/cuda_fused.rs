//! The CUDA backend's fused ops (a child module of [`super`], for its private state):
//! - `linear_gelu`: the MLP's first GEMM with GELU-tanh in cuBLASLt's epilogue
//!   (`CUBLASLT_EPILOGUE_GELU_BIAS`, documented as the tanh approximation), one pass and one
//!   rounding instead of a GEMM, a store and a `gelu_tanh` pass;
//! - `linear_gate_residual` for fp8 weights on the dequantise route: the adaLN gate multiplied
//!   into the dequantised weight (`dequant_fp8_rows`) and the gated bias into a `[1, out]`
//!   vector, then one GEMM with beta = 1 onto the residual: `residual += gate ⊙ (x·Wᵀ + b)`
//!   without the `gate_residual` pass over the activations. (cuBLASLt's per-row alpha vector
//!   would do this for bf16 weights too, but its documentation offers it to int8 kernels only.)
//!   bf16 weights keep the pass: folding the gate into a scaled copy of the weight, as here,
//!   would rewrite every output projection each step, ~14.3 GB of traffic per 1024² step
//!   (3.6 G weight elements read and written) to save ~12.2 GB of `gate_residual` passes (2.0 G
//!   activation elements, x and y read, x written): at Flux's sizes the weights are as large as
//!   the activations, so the fold does not pay (the fp8 route dequantises anyway, so it is free).
//!   Measured by the byte counts of `benches/perf_model.py` (`b_now`), not yet on a GPU.
//! - the fp8 × fp8 route for fp8 weights ([`CudaBackend::set_fp8_gemm`]): the activations
//!   quantised to e4m3 with a per-tensor scale, then cuBLASLt's fp8 GEMM per weight part (each
//!   with its own scale as alpha). Off by default: it doubles the tensor-core rate but adds
//!   e4m3 rounding of the activations (~2.7e-2 relative per GEMM at Flux widths against the
//!   fp8 weight's own product, kernels' `fp8_routes_error_against_bf16`); which route is faster
//!   end to end is for a GPU to measure.
//!
//! - `norm_modulate_linear` on the fp8 × fp8 route: adaLN's norm and modulation written as the
//!   GEMM's e4m3 input directly (`norm_modulate_e4m3`), no bf16 activations, no quantise pass.
//!
//! Layers with LoRA terms take the unfused compositions (the low-rank terms are added to the
//! GEMM's output before the activation or the gate), so LoRA behaviour is unchanged.

use super::{CudaBackend, CudaLinear, CudaTensor};
use crate::backend::{check_linear, check_row_vector, check_same, Backend};
use crate::error::{shape_err, Result};
use crate::layers::LN_EPS;
use kontext_kernels::gemm::Epilogue;
use kontext_kernels::DType;
use std::sync::atomic::{AtomicU8, Ordering};

/// The fp8 × fp8 route: 0 = not set (read `KONTEXT_FP8_GEMM` once), 1 = off, 2 = on.
static FP8_GEMM: AtomicU8 = AtomicU8::new(0);

impl CudaBackend {
    /// Chooses the route of linears with fp8 weights, for the whole process: `true` quantises
    /// the activations to e4m3 and runs cuBLASLt's fp8 GEMM, `false` (the default, also
    /// `KONTEXT_FP8_GEMM=0` or unset) dequantises the weight into bf16 before a bf16 GEMM.
    /// `KONTEXT_FP8_GEMM=1` turns it on without code.
    pub fn set_fp8_gemm(&self, on: bool) {
        FP8_GEMM.store(if on { 2 } else { 1 }, Ordering::Relaxed);
    }

    /// Whether linears with fp8 weights run on the fp8 tensor cores (see
    /// [`CudaBackend::set_fp8_gemm`]).
    pub fn fp8_gemm(&self) -> bool {
        match FP8_GEMM.load(Ordering::Relaxed) {
            0 => {
                let on = std::env::var("KONTEXT_FP8_GEMM").is_ok_and(|v| v == "1");
                FP8_GEMM.store(if on { 2 } else { 1 }, Ordering::Relaxed);
                on
            }
            v => v == 2,
        }
    }
}

/// Whether `w` takes the fp8 × fp8 route: the route is on, the weight is fp8, and cuBLASLt's
/// FP8 rules hold for the layer and each of its parts (K a multiple of 16, every part's rows
/// and first row multiples of 8, so each part's output columns start 16-byte aligned).
/// Otherwise the dequantise route runs, which takes any shape.
fn fp8_route(b: &CudaBackend, w: &CudaLinear) -> bool {
    if !(w.fp8 && b.fp8_gemm() && w.inp % 16 == 0 && w.out % 8 == 0) {
        return false;
    }
    // A planner has no weight (and no parts): its plan assumes one part.
    w.part_scales().is_none_or(|scales| {
        scales
            .iter()
            .all(|(r, _)| r.start % 8 == 0 && r.len() % 8 == 0)
    })
}

/// The fp8 × fp8 route of `y = epilogue(x·Wᵀ + b)` for a bf16 `x` and a fresh `y`, when
/// [`fp8_route`] says so (returns whether it ran). Quantises x (`quantise_e4m3`: e4m3 and a
/// per-tensor scale on the device), then one fp8 GEMM per weight part.
pub(super) fn fp8_linear(
    b: &CudaBackend,
    x: &CudaTensor,
    w: &CudaLinear,
    y: &CudaTensor,
    epilogue: Epilogue,
) -> Result<bool> {
    if !fp8_route(b, w) || x.rows == 0 || w.out == 0 {
        return Ok(false);
    }
    let x8 = b.tensor(DType::F8E4M3, x.rows, w.inp, "fp8 activations")?;
    let scales = b.tensor(DType::F32, 1, 2, "fp8 activation scale")?;
    b.launch(|d| {
        let (x8m, sm) = (x8.mat()?, scales.mat()?);
        d.k.quantise_e4m3(x.mat()?, x8m, sm)?;
        fp8_gemms(b, d, x8m, sm, w, y.mat()?, epilogue)
    })?;
    Ok(true)
}

/// One fp8 GEMM per weight part of `w` (each part's scale as its alpha) on the e4m3
/// activations `x8` with their scale at `scales[1]`, into `y`'s column ranges.
fn fp8_gemms(
    b: &CudaBackend,
    d: &super::Device,
    x8: &kontext_kernels::DeviceMat,
    scales: &kontext_kernels::DeviceMat,
    w: &CudaLinear,
    y: &kontext_kernels::DeviceMat,
    epilogue: Epilogue,
) -> Result<()> {
    let x_scale = scales.cols_range(1, 2)?;
    b.with_weight(d, w, |weight| {
        for (range, scale) in &weight.scales {
            let part = weight.data.rows_range(range.start, range.end)?;
            let bias = match &w.bias {
                Some(bias) => Some(bias.cols_range(range.start, range.end)?),
                None => None,
            };
            d.gemm.linear_fp8(
                x8,
                &x_scale,
                &part,
                *scale,
                bias.as_ref(),
                &y.cols_range(range.start, range.end)?,
                epilogue,
            )?;
        }
        Ok(())
    })
}

/// See [`Backend::norm_modulate_linear`]: on the fp8 × fp8 route, `norm_modulate_e4m3` writes
/// the GEMM's e4m3 input straight from x (the tensor's amax in a first pass over x, the
/// quantised values in a second, from f32: the modulated activations are never stored in bf16
/// nor quantised by a pass of their own), then the fp8 GEMMs. Everything else (bf16 or
/// dequantised weights, LoRA terms, shapes the route does not take) composes `norm_modulate`,
/// which already writes the bf16 GEMM's input dtype, with the linear.
pub(super) fn norm_modulate_linear(
    b: &CudaBackend,
    x: &CudaTensor,
    (shift, scale): (&CudaTensor, &CudaTensor),
    w: &CudaLinear,
    epilogue: Epilogue,
) -> Result<CudaTensor> {
    const OP: &str = "norm_modulate_linear";
    if !fp8_route(b, w) || !w.lora.is_empty() {
        let h = b.norm_modulate(x, shift, scale)?;
        return match epilogue {
            Epilogue::Gelu => b.linear_gelu(&h, w),
            _ => b.linear(&h, w),
        };
    }
    check_row_vector(OP, "shift", b.dims(shift), x.cols)?;
    check_row_vector(OP, "scale", b.dims(scale), x.cols)?;
    let xb = linear_operand(b, x, w, OP)?;
    let (shift, scale) = (b.bf16(shift, OP)?, b.bf16(scale, OP)?);
    b.plan_use(w);
    let y = b.tensor(DType::Bf16, xb.rows, w.out, OP)?;
    if xb.rows == 0 || w.out == 0 {
        return Ok(y);
    }
    let x8 = b.tensor(DType::F8E4M3, xb.rows, w.inp, "fp8 activations")?;
    let scales = b.tensor(DType::F32, 1, 2, "fp8 activation scale")?;
    b.launch(|d| {
        let (x8m, sm) = (x8.mat()?, scales.mat()?);
        d.k.norm_modulate_e4m3(xb.mat()?, shift.mat()?, scale.mat()?, x8m, sm, LN_EPS)?;
        fp8_gemms(b, d, x8m, sm, w, y.mat()?, epilogue)
    })?;
    Ok(y)
}

/// The checks of [`Backend::linear`], then `x` as bf16.
fn linear_operand<'a>(
    b: &CudaBackend,
    x: &'a CudaTensor,
    w: &CudaLinear,
    op: &'static str,
) -> Result<super::Operand<'a>> {
    check_linear(b.dims(x), (w.out, w.inp))?;
    if w.inp == 0 && x.rows > 0 && w.out > 0 {
        return Err(shape_err(
            op,
            "a linear layer with no inputs is not supported on CUDA",
        ));
    }
    b.bf16(x, op)
}

/// See [`Backend::linear_gelu`]: GELU in the GEMM's epilogue (bf16, dequantised fp8 or the fp8
/// route alike); layers with LoRA terms take the composition.
pub(super) fn linear_gelu(b: &CudaBackend, x: &CudaTensor, w: &CudaLinear) -> Result<CudaTensor> {
    if !w.lora.is_empty() {
        let h = b.linear(x, w)?;
        return b.gelu_tanh(&h);
    }
    let x = linear_operand(b, x, w, "linear_gelu")?;
    b.plan_use(w);
    let y = b.tensor(DType::Bf16, x.rows, w.out, "linear_gelu")?;
    if x.rows == 0 || w.out == 0 || fp8_linear(b, &x, w, &y, Epilogue::Gelu)? {
        return Ok(y);
    }
    let scratch = if w.fp8 {
        Some(b.tensor(DType::Bf16, w.out, w.inp, "fp8 weight as bf16")?)
    } else {
        None
    };
    b.launch(|d| {
        b.with_weight(d, w, |weight| {
            let wm = match &scratch {
                Some(s) => {
                    let s = s.mat()?;
                    d.k.dequant_fp8(weight, s)?;
                    s
                }
                None => &weight.data,
            };
            Ok(d.gemm
                .linear_gelu(x.mat()?, wm, w.bias.as_ref(), y.mat()?)?)
        })
    })?;
    Ok(y)
}

/// See [`Backend::linear_gate_residual`]: fused for fp8 weights on the dequantise route (the
/// gate in the dequantised weight and the bias, beta = 1 onto the residual); everything else
/// (bf16 weights, the fp8 × fp8 route, LoRA terms) takes the composition.
pub(super) fn linear_gate_residual(
    b: &CudaBackend,
    x: &CudaTensor,
    w: &CudaLinear,
    gate: &CudaTensor,
    residual: &mut CudaTensor,
) -> Result<()> {
    if !w.fp8 || fp8_route(b, w) || !w.lora.is_empty() {
        let y = b.linear(x, w)?;
        return b.gate_residual(residual, gate, &y);
    }
    const OP: &str = "linear_gate_residual";
    let xb = linear_operand(b, x, w, OP)?;
    b.plan_use(w);
    check_row_vector(OP, "gate", b.dims(gate), w.out)?;
    check_same(OP, b.dims(residual), (xb.rows, w.out))?;
    b.make_bf16(residual, OP)?;
    let gate = b.bf16(gate, OP)?;
    if xb.rows == 0 || w.out == 0 {
        return Ok(());
    }
    let scratch = b.tensor(DType::Bf16, w.out, w.inp, "fp8 weight × gate as bf16")?;
    let gated_bias = match w.bias {
        Some(_) => Some(b.tensor(DType::Bf16, 1, w.out, "gate ⊙ bias")?),
        None => None,
    };
    b.launch(|d| {
        let (sm, gm) = (scratch.mat()?, gate.mat()?);
        b.with_weight(d, w, |wt| Ok(d.k.dequant_fp8_rows(wt, gm, sm)?))?;
        let gb = match (&gated_bias, &w.bias) {
            (Some(t), Some(bias)) => {
                let t = t.mat()?;
                // gate ⊙ bias as 0 + gate ⊙ bias (one rounding), the bias of the gated GEMM.
                d.gpu.fill_bytes(t, 0)?;
                d.k.gate_residual(t, gm, bias)?;
                Some(t)
            }
            _ => None,
        };
        Ok(d.gemm
            .matmul(xb.mat()?, false, sm, true, residual.mat()?, gb, 1.0, 1.0)?)
    })
}

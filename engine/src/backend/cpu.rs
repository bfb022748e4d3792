//! The CPU backend: the f32 reference every GPU kernel is checked against.
//!
//! Every op is a straightforward loop over rows or elements in f32 (reductions for LN, RMSNorm and
//! softmax accumulate in f64), parallel over rows with rayon. Matrix products (the linears and the
//! two products of attention) go through `matrixmultiply::sgemm`, which is threaded itself; it is
//! only ever called from the calling thread, never from inside a rayon loop, so the two thread
//! pools never nest.

#![warn(missing_docs)]

use crate::backend::{
    check_attention, check_concat_cols, check_concat_rows, check_len, check_linear, check_qk_rope,
    check_row_vector, check_same, check_slice_cols, check_slice_rows, linear_shape, Backend,
};
use crate::error::{shape_err, EngineError, Result};
use crate::layers::{gelu_tanh, silu, LN_EPS, RMS_EPS};
use crate::lora::{check_terms, LoraTerm};
use crate::weights::HostWeight;
use rayon::prelude::*;

/// A row-major f32 matrix `[rows, cols]`.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuTensor {
    /// Rows (tokens).
    pub rows: usize,
    /// Columns (features).
    pub cols: usize,
    /// `rows · cols` values, row-major.
    pub data: Vec<f32>,
}

impl CpuTensor {
    /// Wraps `data` as `[rows, cols]`; errors when the length does not match.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Result<CpuTensor> {
        check_len(data.len(), rows, cols)?;
        Ok(CpuTensor { rows, cols, data })
    }

    /// `[rows, cols]` of zeros.
    pub fn zeros(rows: usize, cols: usize) -> CpuTensor {
        CpuTensor {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }
}

/// A linear layer on the CPU: `weight [out, in]` row-major, `bias [out]`.
#[derive(Debug, Clone)]
pub struct CpuLinear {
    /// Output features.
    pub out: usize,
    /// Input features.
    pub inp: usize,
    /// `[out, in]`, row-major.
    pub weight: Vec<f32>,
    /// `[out]`, or none.
    pub bias: Option<Vec<f32>>,
    /// Attached LoRA terms ([`Backend::set_lora`]), added to the product.
    pub lora: Vec<LoraTerm>,
}

/// The f32 CPU reference backend.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend;

/// Query rows per attention block: the score matrix of one block is `ATTN_BLOCK × L` floats
/// (18 MB at L = 8704); 512 rows ran attention ~1.5× faster than 256 or 1024 on the 2-core
/// dev machine (sgemm packs each operand once per call).
const ATTN_BLOCK: usize = 512;

/// `C = alpha·A·B + beta·C` for strided `A [m, k]`, `B [k, n]`, `C [m, n]` (strides in elements).
/// Every product of the CPU backends ([`crate::cpu_encoder`] included) goes through it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    (m, k, n): (usize, usize, usize),
    alpha: f32,
    (a, rsa, csa): (&[f32], usize, usize),
    (b, rsb, csb): (&[f32], usize, usize),
    beta: f32,
    (c, rsc, csc): (&mut [f32], usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    // The last element each operand's strides reach must lie inside its slice: this is what
    // makes the unsafe call below sound. Callers check shapes first; a failure here is a bug.
    let reach = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(reach(m, n, rsc, csc) < c.len(), "gemm: C out of bounds");
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                c[i * rsc + j * csc] *= beta;
            }
        }
        return;
    }
    assert!(reach(m, k, rsa, csa) < a.len(), "gemm: A out of bounds");
    assert!(reach(k, n, rsb, csb) < b.len(), "gemm: B out of bounds");
    // SAFETY: the three asserts above bound every index sgemm computes from (m, k, n) and the
    // strides; `c` is a unique borrow, so it aliases neither `a` nor `b`.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            beta,
            c.as_mut_ptr(),
            rsc as isize,
            csc as isize,
        );
    }
}

/// `x ← softmax(x)` over one row (max-subtracted, f64 sum); `−∞` entries become 0.
pub(crate) fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `y = x · rsqrt(mean(x²) + eps) · scale` over one row or head, in place (f64 mean).
pub(crate) fn rms_norm_in_place(x: &mut [f32], scale: &[f32], eps: f32) {
    let ms = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64;
    let rrms = (1.0 / (ms + eps as f64).sqrt()) as f32;
    for (v, s) in x.iter_mut().zip(scale) {
        *v = (*v * rrms) * s;
    }
}

/// `y = (x − mean(x)) · rsqrt(var(x) + eps)` over one row, before any affine (f64 statistics,
/// biased variance).
pub(crate) fn layer_norm_row(x: &[f32], y: &mut [f32], eps: f32) {
    let d = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / d;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d;
    let rstd = 1.0 / (var + eps as f64).sqrt();
    for (y, &x) in y.iter_mut().zip(x) {
        *y = ((x as f64 - mean) * rstd) as f32;
    }
}

/// Rotates adjacent pairs `(2j, 2j+1)` of one head by `(cos θ_j, sin θ_j)` = `pe[2j], pe[2j+1]`.
fn rope_in_place(x: &mut [f32], pe: &[f32]) {
    for (pair, cs) in x.chunks_exact_mut(2).zip(pe.chunks_exact(2)) {
        let (a, b) = (pair[0], pair[1]);
        let (cos, sin) = (cs[0], cs[1]);
        pair[0] = cos * a - sin * b;
        pair[1] = sin * a + cos * b;
    }
}

/// `f` applied to every element of `x`.
pub(crate) fn map(x: &CpuTensor, f: impl Fn(f32) -> f32 + Sync) -> CpuTensor {
    CpuTensor {
        rows: x.rows,
        cols: x.cols,
        data: x.data.par_iter().map(|&v| f(v)).collect(),
    }
}

/// Multi-head attention over `qkv [L, W]` (q, k, v at columns `[0, D)`, `[D, 2D)`, `[2D, 3D)`,
/// D = H·Dh) → `[L, D]`: per head, `softmax(scale · q·kᵀ + bias_h + mask) · v`, `block` query rows
/// at a time (one sgemm for the scores, one for the values). `bias [H·L, L]` and `causal` (mask
/// keys `j > i`) serve the encoders; the transformer passes neither. `op` names the op in errors.
pub(crate) fn attention_blocked(
    op: &'static str,
    qkv: &CpuTensor,
    (num_heads, head_dim): (usize, usize),
    scale: f32,
    bias: Option<&CpuTensor>,
    causal: bool,
    block: usize,
) -> Result<CpuTensor> {
    let (l, w, hd) = (qkv.rows, qkv.cols, head_dim);
    let d = num_heads * hd;
    check_attention(op, (l, w), (num_heads, hd), bias.map(|b| (b.rows, b.cols)))?;
    let mut out = CpuTensor::zeros(l, d);
    if l == 0 {
        return Ok(out);
    }
    let mut s = vec![0.0f32; block.min(l) * l];
    for h in 0..num_heads {
        let (q, k, v) = (h * hd, d + h * hd, 2 * d + h * hd);
        for q0 in (0..l).step_by(block) {
            let bq = block.min(l - q0);
            let s = &mut s[..bq * l];
            // S = scale · Q_blk · K_hᵀ   [bq, L]
            gemm(
                (bq, hd, l),
                scale,
                (&qkv.data[q0 * w + q..], w, 1),
                (&qkv.data[k..], 1, w),
                0.0,
                (s, l, 1),
            );
            s.par_chunks_mut(l).enumerate().for_each(|(r, row)| {
                let i = q0 + r;
                if let Some(b) = bias {
                    let brow = &b.data[(h * l + i) * l..][..l];
                    row.iter_mut().zip(brow).for_each(|(v, b)| *v += b);
                }
                if causal {
                    row[i + 1..].fill(f32::NEG_INFINITY);
                }
                softmax_in_place(row);
            });
            // O_blk = P · V_h   [bq, Dh] → out rows q0.., columns h·Dh..
            gemm(
                (bq, l, hd),
                1.0,
                (s, l, 1),
                (&qkv.data[v..], w, 1),
                0.0,
                (&mut out.data[q0 * d + h * hd..], d, 1),
            );
        }
    }
    Ok(out)
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Linear = CpuLinear;
    type Vector = Vec<f32>;

    fn name(&self) -> &'static str {
        "cpu"
    }

    /// The CPU holds every weight as f32: 4 bytes per parameter against the memory the
    /// kernel reports available (Linux; elsewhere the check is skipped).
    fn check_memory(&self, params: u64) -> Result<()> {
        let Some(available) = mem_available_bytes() else {
            return Ok(());
        };
        let needed = params.saturating_mul(4);
        // Activations, tokenizers and the maps need room too: keep a tenth free.
        if needed > available / 10 * 9 {
            return Err(EngineError::Config(format!(
                "the model's {:.2} B parameters need {:.1} GB as f32 on the CPU, and {:.1} GB of memory is available. HINT: run on a GPU (--device cuda) or on a machine with more memory",
                params as f64 / 1e9,
                needed as f64 / 1e9,
                available as f64 / 1e9
            )));
        }
        Ok(())
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<CpuTensor> {
        CpuTensor::new(rows, cols, data.to_vec())
    }

    fn download(&self, x: &CpuTensor) -> Result<Vec<f32>> {
        Ok(x.data.clone())
    }

    fn dims(&self, x: &CpuTensor) -> (usize, usize) {
        (x.rows, x.cols)
    }

    fn load_linear(
        &self,
        key: &str,
        weight: HostWeight,
        bias: Option<HostWeight>,
    ) -> Result<CpuLinear> {
        let (out, inp) = linear_shape(key, &weight, bias.as_ref())?;
        Ok(CpuLinear {
            out,
            inp,
            weight: weight.data,
            bias: bias.map(|b| b.data),
            lora: Vec::new(),
        })
    }

    fn load_vector(&self, key: &str, v: HostWeight) -> Result<Vec<f32>> {
        v.expect_shape(key, &[v.data.len()])?;
        Ok(v.data)
    }

    fn linear(&self, x: &CpuTensor, w: &CpuLinear) -> Result<CpuTensor> {
        check_linear(self.dims(x), (w.out, w.inp))?;
        let mut y = CpuTensor::zeros(x.rows, w.out);
        let beta = match &w.bias {
            Some(b) if w.out > 0 => {
                y.data
                    .chunks_exact_mut(w.out)
                    .for_each(|r| r.copy_from_slice(b));
                1.0
            }
            _ => 0.0,
        };
        // y [L, out] = x [L, in] · Wᵀ, Wᵀ read from W [out, in] with strides (1, in).
        gemm(
            (x.rows, w.inp, w.out),
            1.0,
            (&x.data, w.inp, 1),
            (&w.weight, 1, w.inp),
            beta,
            (&mut y.data, w.out, 1),
        );
        for t in &w.lora {
            // h [L, r] = x·Aᵀ, then y[:, row0..row0 + rows] += scale · h·Bᵀ.
            let mut h = vec![0.0f32; x.rows * t.rank];
            gemm(
                (x.rows, w.inp, t.rank),
                1.0,
                (&x.data, w.inp, 1),
                (&t.down, 1, w.inp),
                0.0,
                (&mut h, t.rank, 1),
            );
            gemm(
                (x.rows, t.rank, t.rows),
                t.scale,
                (&h, t.rank, 1),
                (&t.up, 1, t.rank),
                1.0,
                (&mut y.data[t.row0..], w.out, 1),
            );
        }
        Ok(y)
    }

    fn set_lora(&self, w: &mut CpuLinear, key: &str, terms: &[LoraTerm]) -> Result<()> {
        check_terms(key, (w.out, w.inp), terms)?;
        w.lora = terms.to_vec();
        Ok(())
    }

    fn silu(&self, x: &CpuTensor) -> Result<CpuTensor> {
        Ok(map(x, silu))
    }

    fn gelu_tanh(&self, x: &CpuTensor) -> Result<CpuTensor> {
        Ok(map(x, gelu_tanh))
    }

    fn add_assign(&self, a: &mut CpuTensor, b: &CpuTensor) -> Result<()> {
        check_same("add_assign", self.dims(a), self.dims(b))?;
        a.data
            .par_iter_mut()
            .zip(b.data.par_iter())
            .for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn norm_modulate(
        &self,
        x: &CpuTensor,
        shift: &CpuTensor,
        scale: &CpuTensor,
    ) -> Result<CpuTensor> {
        check_row_vector("norm_modulate", "shift", self.dims(shift), x.cols)?;
        check_row_vector("norm_modulate", "scale", self.dims(scale), x.cols)?;
        let mut y = CpuTensor::zeros(x.rows, x.cols);
        if x.cols == 0 {
            return Ok(y);
        }
        y.data
            .par_chunks_mut(x.cols)
            .zip(x.data.par_chunks(x.cols))
            .for_each(|(y, x)| {
                layer_norm_row(x, y, LN_EPS);
                for ((y, s), t) in y.iter_mut().zip(&scale.data).zip(&shift.data) {
                    *y = (1.0 + s) * *y + t;
                }
            });
        Ok(y)
    }

    fn qk_norm_rope(
        &self,
        qkv: &mut CpuTensor,
        num_heads: usize,
        q_scale: &Vec<f32>,
        k_scale: &Vec<f32>,
        pe: &CpuTensor,
        pe_row0: usize,
    ) -> Result<()> {
        let hd = q_scale.len();
        let d = num_heads * hd;
        if hd == 0 || hd % 2 != 0 || k_scale.len() != hd {
            return Err(shape_err(
                "qk_norm_rope",
                format!(
                    "q scale [{hd}] and k scale [{}] must have one even head dim",
                    k_scale.len()
                ),
            ));
        }
        check_qk_rope((num_heads, hd), self.dims(qkv), self.dims(pe), pe_row0)?;
        let pe_rows = &pe.data[pe_row0 * hd..(pe_row0 + qkv.rows) * hd];
        qkv.data
            .par_chunks_mut(qkv.cols)
            .zip(pe_rows.par_chunks(hd))
            .for_each(|(row, pe)| {
                for (part, scale) in [(0, q_scale), (1, k_scale)] {
                    for h in 0..num_heads {
                        let x = &mut row[part * d + h * hd..][..hd];
                        rms_norm_in_place(x, scale, RMS_EPS);
                        rope_in_place(x, pe);
                    }
                }
            });
        Ok(())
    }

    fn attention(&self, qkv: &CpuTensor, num_heads: usize, head_dim: usize) -> Result<CpuTensor> {
        let scale = 1.0 / (head_dim as f32).sqrt();
        attention_blocked(
            "attention",
            qkv,
            (num_heads, head_dim),
            scale,
            None,
            false,
            ATTN_BLOCK,
        )
    }

    fn gate_residual(&self, x: &mut CpuTensor, gate: &CpuTensor, y: &CpuTensor) -> Result<()> {
        check_same("gate_residual", self.dims(x), self.dims(y))?;
        check_row_vector("gate_residual", "gate", self.dims(gate), x.cols)?;
        if x.cols == 0 {
            return Ok(());
        }
        x.data
            .par_chunks_mut(x.cols)
            .zip(y.data.par_chunks(y.cols))
            .for_each(|(x, y)| {
                for i in 0..x.len() {
                    x[i] += gate.data[i] * y[i];
                }
            });
        Ok(())
    }

    fn concat_rows(&self, a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
        check_concat_rows(self.dims(a), self.dims(b))?;
        let mut data = Vec::with_capacity(a.data.len() + b.data.len());
        data.extend_from_slice(&a.data);
        data.extend_from_slice(&b.data);
        CpuTensor::new(a.rows + b.rows, a.cols, data)
    }

    fn concat_cols(&self, a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
        check_concat_cols(self.dims(a), self.dims(b))?;
        let mut data = Vec::with_capacity(a.data.len() + b.data.len());
        for r in 0..a.rows {
            data.extend_from_slice(&a.data[r * a.cols..(r + 1) * a.cols]);
            data.extend_from_slice(&b.data[r * b.cols..(r + 1) * b.cols]);
        }
        CpuTensor::new(a.rows, a.cols + b.cols, data)
    }

    fn euler_step(&self, x: &mut CpuTensor, v: &CpuTensor, dt: &CpuTensor) -> Result<()> {
        check_same("euler_step", self.dims(x), self.dims(v))?;
        check_same("euler_step", self.dims(dt), (1, 1))?;
        let h = dt.data[0];
        for (xi, vi) in x.data.iter_mut().zip(&v.data) {
            *xi += h * vi;
        }
        Ok(())
    }

    fn copy_into(&self, dst: &mut CpuTensor, src: &CpuTensor) -> Result<()> {
        check_same("copy_into", self.dims(dst), self.dims(src))?;
        dst.data.copy_from_slice(&src.data);
        Ok(())
    }

    fn write(&self, dst: &mut CpuTensor, data: &[f32]) -> Result<()> {
        if data.len() != dst.data.len() {
            return Err(shape_err(
                "write",
                format!("{} values for [{}, {}]", data.len(), dst.rows, dst.cols),
            ));
        }
        dst.data.copy_from_slice(data);
        Ok(())
    }

    fn slice_rows(&self, x: &CpuTensor, begin: usize, end: usize) -> Result<CpuTensor> {
        check_slice_rows(self.dims(x), begin, end)?;
        CpuTensor::new(
            end - begin,
            x.cols,
            x.data[begin * x.cols..end * x.cols].to_vec(),
        )
    }

    fn slice_cols(&self, x: &CpuTensor, begin: usize, end: usize) -> Result<CpuTensor> {
        check_slice_cols(self.dims(x), begin, end)?;
        let mut data = Vec::with_capacity(x.rows * (end - begin));
        for r in 0..x.rows {
            data.extend_from_slice(&x.data[r * x.cols + begin..r * x.cols + end]);
        }
        CpuTensor::new(x.rows, end - begin, data)
    }
}

/// `MemAvailable` from /proc/meminfo, in bytes.
fn mem_available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_check_refuses_what_cannot_fit() {
        if mem_available_bytes().is_none() {
            return; // not Linux: the check is skipped by design
        }
        // A petabyte of f32 weights fits nowhere; a thousand fit everywhere.
        let e = CpuBackend
            .check_memory(250_000_000_000_000)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("HINT") && e.contains("GB of memory is available"),
            "{e}"
        );
        CpuBackend.check_memory(1000).unwrap();
    }
}

//! The CUDA backend's fused attention: [`Backend::attention_qk_norm_rope`] on the Hopper kernel
//! of `kontext_kernels::attention_wgmma` (head dim 128 on compute capability 9.0), else on the
//! mma.sync kernel of `kontext_kernels::attention_mma` (head dim 64 or 128, sm_80+); both take
//! QKNorm + RoPE in their prologue and read q, k, v in place (16-byte aligned rows). Elsewhere
//! the unfused `qk_norm_rope` + `attention` kernels, which stay the reference.

use crate::backend::{
    check_attention, check_qk_rope, qk_norm_rope_then_attention, Backend, QkScales,
};
use crate::cuda::{CudaBackend, CudaTensor, CudaVector};
use crate::error::{shape_err, Result};
use crate::layers::RMS_EPS;
use kontext_kernels::attention_mma::{self, Prologue};
use kontext_kernels::attention_wgmma;
use kontext_kernels::DType;

/// Whether the fused kernel takes these operands: decided from shapes and the device alone, so
/// a plan and the run it sizes take the same path (a planner without a GPU assumes sm_80+).
fn fast_path(b: &CudaBackend, qkv: &CudaTensor, head_dim: usize) -> bool {
    let cc = b
        .dev()
        .map_or(attention_mma::MIN_CC, |d| d.gpu.info.compute_capability);
    // Contiguous rows: 16-byte aligned when the width is a multiple of 8 bf16 (allocations
    // are 256-byte aligned).
    attention_mma::supports(head_dim, cc).is_ok() && qkv.cols() % 8 == 0
}

/// Whether the fast path takes the Hopper kernel (which needs a vᵀ scratch): the same rule.
fn hopper_path(b: &CudaBackend, head_dim: usize) -> bool {
    let cc = b
        .dev()
        .map_or(attention_mma::MIN_CC, |d| d.gpu.info.compute_capability);
    attention_wgmma::supports(head_dim, cc).is_ok()
}

/// See [`Backend::attention_qk_norm_rope`].
pub(crate) fn attention_qk_norm_rope(
    b: &CudaBackend,
    qkv: &mut CudaTensor,
    (heads, hd): (usize, usize),
    scales: [QkScales<'_, CudaVector>; 2],
    split: usize,
    pe: &CudaTensor,
    pe_row0: usize,
) -> Result<CudaTensor> {
    const OP: &str = "attention_qk_norm_rope";
    if !fast_path(b, qkv, hd) {
        return qk_norm_rope_then_attention(b, qkv, (heads, hd), scales, split, pe, pe_row0);
    }
    let (l, w) = b.dims(qkv);
    check_attention(OP, (l, w), (heads, hd), None)?;
    check_qk_rope((heads, hd), (l, w), b.dims(pe), pe_row0)?;
    for s in &scales {
        if s.q.n != hd || s.k.n != hd {
            return Err(shape_err(
                OP,
                format!(
                    "q scale [{}] and k scale [{}] for head dim {hd}",
                    s.q.n, s.k.n
                ),
            ));
        }
    }
    if split > l {
        return Err(shape_err(
            OP,
            format!("split = {split} is past the {l} rows of qkv"),
        ));
    }
    b.make_bf16(qkv, OP)?;
    let pe = b.as_dtype(pe, DType::F32, OP)?;
    let out = b.tensor(DType::Bf16, l, heads * hd, "attention")?;
    if l == 0 {
        return Ok(out);
    }
    // vᵀ for the Hopper kernel: [H·Dh, L] with its row stride padded to 8 elements.
    let vt = if hopper_path(b, hd) {
        let (rows, _, ld) = attention_wgmma::vt_shape(l, heads);
        Some(b.tensor(DType::Bf16, rows, ld, "attention vT")?)
    } else {
        None
    };
    b.launch(|dv| {
        let mats =
            [scales[0].q, scales[0].k, scales[1].q, scales[1].k].map(|v| v.mat().map(|m| m.desc()));
        let [q0, k0, q1, k1] = mats;
        let (q0, k0, q1, k1) = (q0?, k0?, q1?, k1?);
        let pe_desc = pe.mat()?.desc();
        let p = Prologue {
            heads,
            head_dim: hd,
            scales: [
                attention_mma::QkScales { q: &q0, k: &k0 },
                attention_mma::QkScales { q: &q1, k: &k1 },
            ],
            split,
            pe: &pe_desc,
            pe_row0,
            eps: RMS_EPS,
        };
        match &vt {
            Some(vt) => {
                let vt = vt.mat()?.cols_range(0, l)?;
                Ok(dv.k.attention_wgmma(qkv.mat()?, &p, &vt, out.mat()?)?)
            }
            None => Ok(dv.k.attention_mma(qkv.mat()?, &p, out.mat()?)?),
        }
    })?;
    Ok(out)
}

impl CudaBackend {
    /// Launches per kernel so far (`Kernels::launch_counts`; empty for a planner): what proves
    /// that the fused kernel, not its fallback, ran.
    pub fn launch_counts(&self) -> Vec<(&'static str, u64)> {
        self.dev().map_or(Vec::new(), |d| d.k.launch_counts())
    }
}

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
    // A planner without a GPU plans for Hopper, whose path needs the vᵀ scratch (the larger
    // plan, as memory::workspace_bytes assumes Hopper's workspace): a plan for an older card
    // then over-counts ~53 MB at 8,704 tokens instead of a Hopper run exceeding its plan.
    let cc = b
        .dev()
        .map_or(attention_wgmma::CC, |d| d.gpu.info.compute_capability);
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
    if !fast_path(b, qkv, hd) {
        return qk_norm_rope_then_attention(b, qkv, (heads, hd), scales, split, pe, pe_row0);
    }
    let l = b.dims(qkv).0;
    let out = b.tensor(DType::Bf16, l, heads * hd, "attention")?;
    fused_into(b, qkv, (heads, hd), scales, split, pe, pe_row0, &out, 0)?;
    Ok(out)
}

/// A single block's two branches side by side ([`Backend::single_block_branches`]): the fused
/// attention writes columns `[0, D)` of `[L, D + M]` in place (the kernel's own output row
/// stride) and GELU reads the MLP columns of `lin1` where the GEMM left them and writes `[D,
/// D + M)`: no slice, no concatenation, one pass over each branch's output.
pub(crate) fn single_block_branches(
    b: &CudaBackend,
    lin1: &mut CudaTensor,
    (heads, hd): (usize, usize),
    scales: QkScales<'_, CudaVector>,
    pe: &CudaTensor,
) -> Result<CudaTensor> {
    const OP: &str = "single_block_branches";
    let (l, w) = b.dims(lin1);
    let d = heads * hd;
    if w < 3 * d {
        return Err(shape_err(
            OP,
            format!(
                "lin1 [{l}, {w}] is narrower than q, k, v ({} columns)",
                3 * d
            ),
        ));
    }
    let m = w - 3 * d;
    let u = b.tensor(
        DType::Bf16,
        l,
        d + m,
        "single block [attention ‖ GELU(mlp)]",
    )?;
    if fast_path(b, lin1, hd) {
        fused_into(b, lin1, (heads, hd), [scales, scales], l, pe, 0, &u, 0)?;
    } else {
        let attn = qk_norm_rope_then_attention(b, lin1, (heads, hd), [scales, scales], l, pe, 0)?;
        b.launch(|dv| Ok(dv.k.copy2d(attn.mat()?, &u.mat()?.cols_range(0, d)?)?))?;
    }
    b.make_bf16(lin1, OP)?;
    if l > 0 && m > 0 {
        b.launch(|dv| {
            Ok(dv.k.unary(
                kontext_kernels::elementwise::Unary::GeluTanh,
                &lin1.mat()?.cols_range(3 * d, w)?,
                &u.mat()?.cols_range(d, d + m)?,
            )?)
        })?;
    }
    Ok(u)
}

/// The fused kernel's launch, its output into columns `[col0, col0 + H·Dh)` of `out`.
#[allow(clippy::too_many_arguments)]
fn fused_into(
    b: &CudaBackend,
    qkv: &mut CudaTensor,
    (heads, hd): (usize, usize),
    scales: [QkScales<'_, CudaVector>; 2],
    split: usize,
    pe: &CudaTensor,
    pe_row0: usize,
    out: &CudaTensor,
    col0: usize,
) -> Result<()> {
    const OP: &str = "attention_qk_norm_rope";
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
    let (oc, ow) = (col0 + heads * hd, b.dims(out).1);
    if b.dims(out).0 != l || oc > ow {
        return Err(shape_err(
            OP,
            format!(
                "output [{}, {ow}] has no [{l}, {oc}] for the heads",
                b.dims(out).0
            ),
        ));
    }
    b.make_bf16(qkv, OP)?;
    let pe = b.as_dtype(pe, DType::F32, OP)?;
    if l == 0 {
        return Ok(());
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
        let out = out.mat()?.cols_range(col0, col0 + heads * hd)?;
        match &vt {
            Some(vt) => {
                let vt = vt.mat()?.cols_range(0, l)?;
                Ok(dv.k.attention_wgmma(qkv.mat()?, &p, &vt, &out)?)
            }
            None => Ok(dv.k.attention_mma(qkv.mat()?, &p, &out)?),
        }
    })
}

impl CudaBackend {
    /// Launches per kernel so far (`Kernels::launch_counts`; empty for a planner): what proves
    /// that the fused kernel, not its fallback, ran.
    pub fn launch_counts(&self) -> Vec<(&'static str, u64)> {
        self.dev().map_or(Vec::new(), |d| d.k.launch_counts())
    }
}

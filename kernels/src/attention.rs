//! Launchers of `cuda/attention.cu`: multi-head attention on a fused qkv buffer (Flux, T5 with
//! its position bias, CLIP causal), and the row softmax of the VAE's wide single head.

use crate::desc::{
    blocks, expect_disjoint, expect_dtype, expect_shape, expect_valid, to_i32, DType, LaunchDims,
    MatDesc, MAX_GRID_X, MAX_GRID_Y,
};
use crate::error::{shape_err, Result};
use crate::gpu::DeviceMat;
use crate::launch::{Arg, Kernel, Loaded};
use crate::{function, Family, Kernels};
use cudarc::driver::CudaModule;
use std::sync::Arc;

pub const FAMILY: Family = Family {
    name: "attention",
    source: include_str!("../cuda/attention.cu"),
    kernels: &[
        Kernel {
            name: "attention",
            args: &[
                Arg::Ptr,
                Arg::I64,
                Arg::I32,
                Arg::I32,
                Arg::I32,
                Arg::F32,
                Arg::I32,
                Arg::Ptr,
                Arg::I64,
                Arg::Ptr,
                Arg::I64,
            ],
        },
        Kernel {
            name: "softmax_rows",
            args: &[
                Arg::Ptr,
                Arg::I64,
                Arg::I32,
                Arg::I32,
                Arg::F32,
                Arg::Ptr,
                Arg::I64,
            ],
        },
    ],
};

/// Queries per block (`ATT_BQ`) and threads per block (`ATT_WARPS · 32`).
pub const QUERIES_PER_BLOCK: usize = 16;
pub const THREADS: u32 = 128;
/// Largest head dim of the plain kernel (`ATT_MAX_DH`); wider heads (the VAE's 512) go through
/// two GEMMs and [`Kernels::softmax_rows`].
pub const MAX_HEAD_DIM: usize = 128;
/// Threads per block of softmax_rows.
pub const SOFTMAX_THREADS: u32 = 256;

pub(crate) struct Functions {
    attention: Loaded,
    softmax_rows: Loaded,
}

impl Functions {
    pub(crate) fn resolve(m: &Arc<CudaModule>) -> Result<Functions> {
        Ok(Functions {
            attention: function(m, &FAMILY, "attention")?,
            softmax_rows: function(m, &FAMILY, "softmax_rows")?,
        })
    }

    /// Every kernel of the family ([`Kernels::launch_counts`]).
    pub(crate) fn loaded(&self) -> Vec<&Loaded> {
        vec![&self.attention, &self.softmax_rows]
    }
}

/// The variant of attention: softmax scale, causal mask, additive position bias.
#[derive(Debug, Clone, Copy)]
pub struct AttentionOpts<'a> {
    /// Multiplies q·k before the softmax: 1/sqrt(Dh) for Flux and CLIP, 1 for T5.
    pub scale: f32,
    /// Keys j ≤ i only (CLIP).
    pub causal: bool,
    /// Additive bias f32 `[H·L, L]` (any row stride): row `h·L + i`, column j is added to the
    /// score of query i and key j in head h (T5's relative position bias; the contract of the
    /// engine's `EncoderBackend::attention_masked`).
    pub bias: Option<&'a MatDesc>,
}

impl AttentionOpts<'static> {
    /// Flux: `1/sqrt(Dh)`, no mask, no bias (spec 1.7).
    pub fn flux(head_dim: usize) -> AttentionOpts<'static> {
        AttentionOpts {
            scale: 1.0 / (head_dim as f32).sqrt(),
            causal: false,
            bias: None,
        }
    }
}

/// A validated attention launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attention {
    pub dims: LaunchDims,
    pub len: i32,
    pub heads: i32,
    pub head_dim: i32,
}

/// Checks qkv bf16 `[L, W ≥ 3·H·Dh]`, `2 ≤ Dh ≤ 128` even, out bf16 `[L, H·Dh]` disjoint from
/// qkv, and the options.
pub fn check(
    qkv: &MatDesc,
    heads: usize,
    head_dim: usize,
    opts: &AttentionOpts,
    out: &MatDesc,
) -> Result<Attention> {
    const OP: &str = "attention";
    expect_valid(OP, "qkv", qkv)?;
    expect_valid(OP, "out", out)?;
    expect_dtype(OP, "qkv", qkv, DType::Bf16)?;
    expect_dtype(OP, "out", out, DType::Bf16)?;
    if heads == 0 || head_dim == 0 || head_dim % 2 != 0 || head_dim > MAX_HEAD_DIM {
        return Err(shape_err(
            OP,
            format!(
                "{heads} heads of dim {head_dim}: the kernel takes an even head dim up to \
                 {MAX_HEAD_DIM} (wider heads: GEMMs and softmax_rows)"
            ),
        ));
    }
    let d = heads * head_dim;
    if qkv.cols < 3 * d {
        return Err(shape_err(
            OP,
            format!(
                "qkv {} cannot hold q, k, v of {heads} heads × {head_dim} (needs {} columns)",
                qkv.show(),
                3 * d
            ),
        ));
    }
    let l = qkv.rows;
    expect_shape(OP, "out", out, l, d)?;
    expect_disjoint(OP, out, "qkv", qkv)?;
    if !(opts.scale.is_finite() && opts.scale > 0.0) {
        return Err(shape_err(
            OP,
            format!("scale = {} must be positive", opts.scale),
        ));
    }
    if let Some(bias) = opts.bias {
        expect_valid(OP, "bias", bias)?;
        expect_dtype(OP, "bias", bias, DType::F32)?;
        if (bias.rows, bias.cols) != (heads * l, l) {
            return Err(shape_err(
                OP,
                format!(
                    "bias is {}, expected [H·L, L] = [{}, {l}]",
                    bias.show(),
                    heads * l
                ),
            ));
        }
        expect_disjoint(OP, out, "bias", bias)?;
    }
    if heads > MAX_GRID_Y as usize {
        return Err(shape_err(OP, format!("{heads} heads exceed grid.y")));
    }
    Ok(Attention {
        dims: LaunchDims::new(
            (blocks(l, QUERIES_PER_BLOCK, u32::MAX >> 1), heads as u32, 1),
            THREADS,
        ),
        len: to_i32(OP, "L", l)?,
        heads: to_i32(OP, "heads", heads)?,
        head_dim: to_i32(OP, "head dim", head_dim)?,
    })
}

/// A validated softmax_rows launch: grid and `(rows, cols)`.
pub fn check_softmax(s: &MatDesc, scale: f32, p: &MatDesc) -> Result<(LaunchDims, i32, i32)> {
    const OP: &str = "softmax_rows";
    expect_valid(OP, "scores", s)?;
    expect_valid(OP, "p", p)?;
    expect_dtype(OP, "scores", s, DType::F32)?;
    expect_dtype(OP, "p", p, DType::Bf16)?;
    expect_shape(OP, "p", p, s.rows, s.cols)?;
    expect_disjoint(OP, p, "scores", s)?;
    if !(scale.is_finite() && scale > 0.0) {
        return Err(shape_err(OP, format!("scale = {scale} must be positive")));
    }
    Ok((
        LaunchDims::new((blocks(s.rows, 1, MAX_GRID_X), 1, 1), SOFTMAX_THREADS),
        to_i32(OP, "rows", s.rows)?,
        to_i32(OP, "cols", s.cols)?,
    ))
}

impl Kernels {
    /// `out [L, H·Dh] = softmax(scale·q·kᵀ + bias, mask) · v` per head, reading q, k, v from
    /// columns `[0, D)`, `[D, 2D)`, `[2D, 3D)` of `qkv [L, W]` (D = H·Dh); see [`AttentionOpts`].
    pub fn attention(
        &self,
        qkv: &DeviceMat,
        heads: usize,
        head_dim: usize,
        opts: AttentionOpts,
        out: &DeviceMat,
    ) -> Result<()> {
        let (dq, dout) = (qkv.desc(), out.desc());
        let plan = check(&dq, heads, head_dim, &opts, &dout)?;
        if dq.rows == 0 {
            return Ok(());
        }
        let (ld, ld_out) = (dq.ld as i64, dout.ld as i64);
        let causal = opts.causal as i32;
        let (bias, ld_bias) = opts.bias.map_or((0u64, 0i64), |b| (b.addr, b.ld as i64));
        let mut l = self.launch(&self.attn.attention);
        l.ptr(&dq.addr)
            .i64(&ld)
            .i32(&plan.len)
            .i32(&plan.heads)
            .i32(&plan.head_dim)
            .f32(&opts.scale)
            .i32(&causal)
            .ptr(&bias)
            .i64(&ld_bias)
            .ptr(&dout.addr)
            .i64(&ld_out);
        // SAFETY: `check` verified that qkv has 3·H·Dh bf16 columns per row, Dh is even and at
        // most the kernel's 128, out is [L, H·Dh] bf16 and overlaps neither qkv nor the bias,
        // and the bias (or null) is f32 [H·L, L] with row stride ld_bias; the arguments match
        // the kernel's parameters in order and type.
        unsafe { l.run(plan.dims) }
    }

    /// `p = softmax(scale·s)` over each row: s f32 `[R, C]`, p bf16 `[R, C]` (the VAE's
    /// single-head attention between its two GEMMs).
    pub fn softmax_rows(&self, s: &DeviceMat, scale: f32, p: &DeviceMat) -> Result<()> {
        let (ds, dp) = (s.desc(), p.desc());
        let (dims, rows, cols) = check_softmax(&ds, scale, &dp)?;
        if ds.is_empty() {
            return Ok(());
        }
        let (lds, ldp) = (ds.ld as i64, dp.ld as i64);
        let mut l = self.launch(&self.attn.softmax_rows);
        l.ptr(&ds.addr)
            .i64(&lds)
            .i32(&rows)
            .i32(&cols)
            .f32(&scale)
            .ptr(&dp.addr)
            .i64(&ldp);
        // SAFETY: `check_softmax` verified s is f32 and p bf16, both [rows, cols], disjoint.
        unsafe { l.run(dims) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desc::tests::bf;

    fn f32m(addr: u64, rows: usize, cols: usize) -> MatDesc {
        MatDesc {
            addr,
            rows,
            cols,
            ld: cols,
            dtype: DType::F32,
        }
    }

    #[test]
    fn flux_single_block_reads_the_linear1_buffer() {
        // linear1 output [8704, 21504]: q, k, v are its first 9216 columns; 24 heads of 128.
        let qkv = bf(0x1000_0000, 8704, 21504, 21504);
        let out = bf(0x9000_0000, 8704, 3072, 3072);
        let p = check(&qkv, 24, 128, &AttentionOpts::flux(128), &out).unwrap();
        assert_eq!(p.dims.grid, (544, 24, 1));
        assert_eq!((p.len, p.heads, p.head_dim), (8704, 24, 128));
    }

    #[test]
    fn head_dim_limits_and_shapes() {
        let qkv = bf(0x100000, 10, 3 * 2 * 64, 3 * 2 * 64);
        let out = bf(0x900000, 10, 128, 128);
        let o = AttentionOpts::flux(64);
        assert!(check(&qkv, 2, 64, &o, &out).is_ok());
        assert!(check(&qkv, 1, 130, &o, &bf(0x900000, 10, 130, 130)).is_err()); // > 128
        assert!(check(&qkv, 2, 63, &o, &out).is_err()); // odd
        assert!(check(&qkv, 3, 64, &o, &bf(0x900000, 10, 192, 192)).is_err()); // qkv too narrow
        assert!(check(&qkv, 2, 64, &o, &bf(0x900000, 9, 128, 128)).is_err()); // out rows
        assert!(check(&qkv, 2, 64, &o, &bf(0x100000 + 2, 10, 128, 384)).is_err()); // overlaps qkv
        let bad_scale = AttentionOpts { scale: 0.0, ..o };
        assert!(check(&qkv, 2, 64, &bad_scale, &out).is_err());
    }

    #[test]
    fn t5_bias_covers_every_head_query_and_key() {
        // T5: 64 heads of 64, L = 512, bias [64·512, 512].
        let qkv = bf(0x1000_0000, 512, 3 * 4096, 3 * 4096);
        let out = bf(0x9000_0000, 512, 4096, 4096);
        let bias = f32m(0x100, 64 * 512, 512);
        let opts = AttentionOpts {
            scale: 1.0,
            causal: false,
            bias: Some(&bias),
        };
        assert!(check(&qkv, 64, 64, &opts, &out).is_ok());
        let short = f32m(0x100, 64 * 512 - 1, 512);
        let opts = AttentionOpts {
            bias: Some(&short),
            ..opts
        };
        assert!(check(&qkv, 64, 64, &opts, &out).is_err());
    }

    #[test]
    fn softmax_shapes() {
        let s = f32m(0x1000, 64, 4096);
        assert!(check_softmax(&s, 1.0 / 512f32.sqrt(), &bf(0x1000_0000, 64, 4096, 4096)).is_ok());
        assert!(check_softmax(&s, 1.0, &bf(0x1000_0000, 64, 4095, 4095)).is_err());
        assert!(check_softmax(&s, -1.0, &bf(0x1000_0000, 64, 4096, 4096)).is_err());
        assert!(check_softmax(
            &bf(0x1000, 64, 4096, 4096),
            1.0,
            &bf(0x1000_0000, 64, 4096, 4096)
        )
        .is_err());
    }
}

//! Launcher of `cuda/qk_norm_rope.cu`: QKNorm then RoPE, in place on the q and k columns of a
//! fused qkv buffer (the contract of the engine's `Backend::qk_norm_rope`).

use crate::desc::{
    blocks, expect_disjoint, expect_dtype, expect_valid, expect_vector, to_i32, DType, LaunchDims,
    MatDesc, MAX_GRID_X,
};
use crate::error::{shape_err, Result};
use crate::gpu::DeviceMat;
use crate::launch::{Arg, Kernel, Loaded};
use crate::{function, Family, Kernels};
use cudarc::driver::CudaModule;
use std::sync::Arc;

pub const FAMILY: Family = Family {
    name: "qk_norm_rope",
    source: include_str!("../cuda/qk_norm_rope.cu"),
    kernels: &[Kernel {
        name: "qk_norm_rope",
        args: &[
            Arg::Ptr,
            Arg::I64,
            Arg::I32,
            Arg::I32,
            Arg::I32,
            Arg::Ptr,
            Arg::Ptr,
            Arg::Ptr,
            Arg::I64,
            Arg::F32,
        ],
    }],
};

/// Threads per block (`QKR_THREADS`): 8 warps, one (q or k, head) each at a time.
pub const THREADS: u32 = 256;

pub(crate) struct Functions {
    qk_norm_rope: Loaded,
}

impl Functions {
    pub(crate) fn resolve(m: &Arc<CudaModule>) -> Result<Functions> {
        Ok(Functions {
            qk_norm_rope: function(m, &FAMILY, "qk_norm_rope")?,
        })
    }

    /// Every kernel of the family ([`Kernels::launch_counts`]).
    pub(crate) fn loaded(&self) -> Vec<&Loaded> {
        vec![&self.qk_norm_rope]
    }
}

/// A validated launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QkNormRope {
    pub dims: LaunchDims,
    pub rows: i32,
    pub heads: i32,
    pub head_dim: i32,
    /// Byte offset of row `pe_row0` in the pe table.
    pub pe_offset: u64,
}

/// Checks the operands: qkv bf16 `[L, W]` with `W ≥ 2·H·Dh`; q_scale, k_scale f32 `[1, Dh]`
/// with Dh even; pe f32 `[Lpe, Dh]` holding rows `[pe_row0, pe_row0 + L)`; nothing read
/// overlaps qkv.
pub fn check(
    qkv: &MatDesc,
    heads: usize,
    q_scale: &MatDesc,
    k_scale: &MatDesc,
    pe: &MatDesc,
    pe_row0: usize,
) -> Result<QkNormRope> {
    const OP: &str = "qk_norm_rope";
    expect_valid(OP, "qkv", qkv)?;
    expect_dtype(OP, "qkv", qkv, DType::Bf16)?;
    let hd = q_scale.cols;
    if heads == 0 || hd == 0 || hd % 2 != 0 {
        return Err(shape_err(
            OP,
            format!("{heads} heads of dim {hd}: need at least one head and an even head dim"),
        ));
    }
    for (what, v) in [("q_scale", q_scale), ("k_scale", k_scale)] {
        expect_valid(OP, what, v)?;
        expect_dtype(OP, what, v, DType::F32)?;
        expect_vector(OP, what, v, hd)?;
        expect_disjoint(OP, qkv, what, v)?;
    }
    if qkv.cols < 2 * heads * hd {
        return Err(shape_err(
            OP,
            format!(
                "qkv {} is narrower than q and k of {heads} heads × {hd} = {}",
                qkv.show(),
                2 * heads * hd
            ),
        ));
    }
    expect_valid(OP, "pe", pe)?;
    expect_dtype(OP, "pe", pe, DType::F32)?;
    if pe.cols != hd || pe_row0 + qkv.rows > pe.rows {
        return Err(shape_err(
            OP,
            format!(
                "pe {} has no rows [{pe_row0}, {}) of width {hd}",
                pe.show(),
                pe_row0 + qkv.rows
            ),
        ));
    }
    expect_disjoint(OP, qkv, "pe", pe)?;
    Ok(QkNormRope {
        dims: LaunchDims::new((blocks(qkv.rows, 1, MAX_GRID_X), 1, 1), THREADS),
        rows: to_i32(OP, "rows", qkv.rows)?,
        heads: to_i32(OP, "heads", heads)?,
        head_dim: to_i32(OP, "head dim", hd)?,
        pe_offset: (pe_row0 * pe.ld * 4) as u64,
    })
}

impl Kernels {
    /// In place on `qkv [L, W]` bf16: per head RMSNorm (eps) × `q_scale` / `k_scale` (f32
    /// `[1, Dh]`), then RoPE with rows `pe_row0..pe_row0 + L` of `pe` (f32 `[Lpe, Dh]`, (cos, sin)
    /// at columns (2j, 2j+1)) (spec 1.5, 1.6).
    #[allow(clippy::too_many_arguments)]
    pub fn qk_norm_rope(
        &self,
        qkv: &DeviceMat,
        heads: usize,
        q_scale: &DeviceMat,
        k_scale: &DeviceMat,
        pe: &DeviceMat,
        pe_row0: usize,
        eps: f32,
    ) -> Result<()> {
        let (dq, dqs, dks, dpe) = (qkv.desc(), q_scale.desc(), k_scale.desc(), pe.desc());
        let plan = check(&dq, heads, &dqs, &dks, &dpe, pe_row0)?;
        if !(eps.is_finite() && eps > 0.0) {
            return Err(shape_err(
                "qk_norm_rope",
                format!("eps = {eps} must be positive"),
            ));
        }
        if dq.rows == 0 {
            return Ok(());
        }
        let ld = dq.ld as i64;
        let pe_ptr = dpe.addr + plan.pe_offset;
        let ld_pe = dpe.ld as i64;
        let mut l = self.launch(&self.qk.qk_norm_rope);
        l.ptr(&dq.addr)
            .i64(&ld)
            .i32(&plan.rows)
            .i32(&plan.heads)
            .i32(&plan.head_dim)
            .ptr(&dqs.addr)
            .ptr(&dks.addr)
            .ptr(&pe_ptr)
            .i64(&ld_pe)
            .f32(&eps);
        // SAFETY: `check` verified that qkv holds 2·H·Dh bf16 columns on each of its rows, the
        // scales are [1, Dh] f32, pe has rows [pe_row0, pe_row0 + L) of Dh f32 (pe_ptr points at
        // row pe_row0), and none of them overlaps qkv; arguments match the kernel's signature.
        unsafe { l.run(plan.dims) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desc::tests::{bf, f32v};

    fn pe(addr: u64, rows: usize, hd: usize) -> MatDesc {
        MatDesc {
            addr,
            rows,
            cols: hd,
            ld: hd,
            dtype: DType::F32,
        }
    }

    #[test]
    fn double_block_txt_rows_use_their_place_in_the_sequence() {
        // img stream of a double block: qkv [8192, 9216], pe rows [512, 8704) of [8704, 128].
        let qkv = bf(0x1000_0000, 8192, 9216, 9216);
        let p = check(
            &qkv,
            24,
            &f32v(0x1000, 128),
            &f32v(0x2000, 128),
            &pe(0x10000, 8704, 128),
            512,
        )
        .unwrap();
        assert_eq!((p.rows, p.heads, p.head_dim), (8192, 24, 128));
        assert_eq!(p.pe_offset, 512 * 128 * 4);
        // One row too many for the table.
        assert!(check(
            &qkv,
            24,
            &f32v(0x1000, 128),
            &f32v(0x2000, 128),
            &pe(0x10000, 8703, 128),
            512
        )
        .is_err());
    }

    #[test]
    fn single_block_linear1_buffer_is_wide_enough() {
        // linear1 output [L, 21504]: q and k are its first 6144 columns.
        let qkv = bf(0x1000_0000, 16, 21504, 21504);
        let ok = |heads, hd: usize, w: usize| {
            check(
                &bf(0x1000_0000, 16, w, w),
                heads,
                &f32v(0x1000, hd),
                &f32v(0x2000, hd),
                &pe(0x10000, 16, hd),
                0,
            )
            .is_ok()
        };
        assert!(check(
            &qkv,
            24,
            &f32v(0x1000, 128),
            &f32v(0x2000, 128),
            &pe(0x10000, 16, 128),
            0
        )
        .is_ok());
        assert!(ok(2, 6, 24));
        assert!(!ok(2, 6, 23)); // narrower than q and k
        assert!(!ok(2, 5, 30)); // odd head dim
        assert!(!ok(0, 6, 24)); // no heads
    }

    #[test]
    fn mismatched_scales_and_aliasing_are_rejected() {
        let qkv = bf(0x100000, 4, 48, 48);
        let pe_ok = pe(0x10000, 4, 8);
        assert!(check(&qkv, 2, &f32v(0x1000, 8), &f32v(0x2000, 6), &pe_ok, 0).is_err());
        assert!(check(&qkv, 2, &f32v(0x1000, 8), &bf(0x2000, 1, 8, 8), &pe_ok, 0).is_err());
        // A scale living inside qkv.
        assert!(check(&qkv, 2, &f32v(0x100000, 8), &f32v(0x2000, 8), &pe_ok, 0).is_err());
        // pe of the wrong width.
        assert!(check(
            &qkv,
            2,
            &f32v(0x1000, 8),
            &f32v(0x2000, 8),
            &pe(0x10000, 4, 6),
            0
        )
        .is_err());
    }
}

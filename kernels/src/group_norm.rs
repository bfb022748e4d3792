//! Launcher of `cuda/group_norm.cu`: GroupNorm (+ optional swish) on a channels-last map.

use crate::desc::{
    expect_disjoint, expect_dtype, expect_same_or_disjoint, expect_shape, expect_valid,
    expect_vector, to_i32, DType, LaunchDims, MatDesc,
};
use crate::error::{shape_err, Result};
use crate::gpu::DeviceMat;
use crate::launch::{Arg, Kernel, Loaded};
use crate::{function, Family, Kernels};
use cudarc::driver::CudaModule;
use std::sync::Arc;

pub const FAMILY: Family = Family {
    name: "group_norm",
    source: include_str!("../cuda/group_norm.cu"),
    kernels: &[Kernel {
        name: "group_norm",
        args: &[
            Arg::Ptr,
            Arg::I32,
            Arg::I32,
            Arg::I32,
            Arg::Ptr,
            Arg::Ptr,
            Arg::F32,
            Arg::I32,
            Arg::Ptr,
        ],
    }],
};

/// Threads per block (`GN_THREADS`); one block per group.
pub const THREADS: u32 = 512;

pub(crate) struct Functions {
    group_norm: Loaded,
}

impl Functions {
    pub(crate) fn resolve(m: &Arc<CudaModule>) -> Result<Functions> {
        Ok(Functions {
            group_norm: function(m, &FAMILY, "group_norm")?,
        })
    }

    /// Every kernel of the family ([`Kernels::launch_counts`]).
    pub(crate) fn loaded(&self) -> Vec<&Loaded> {
        vec![&self.group_norm]
    }
}

/// Checks x bf16 `[P, C]` contiguous, `groups` dividing C, w and b f32 `[1, C]`, y like x (or x
/// itself). Returns the grid and `(P, C, G)`.
pub fn check(
    x: &MatDesc,
    groups: usize,
    w: &MatDesc,
    b: &MatDesc,
    y: &MatDesc,
    eps: f32,
) -> Result<(LaunchDims, [i32; 3])> {
    const OP: &str = "group_norm";
    expect_valid(OP, "x", x)?;
    expect_valid(OP, "y", y)?;
    expect_dtype(OP, "x", x, DType::Bf16)?;
    expect_dtype(OP, "y", y, DType::Bf16)?;
    expect_shape(OP, "y", y, x.rows, x.cols)?;
    for (what, m) in [("x", x), ("y", y)] {
        if m.rows > 1 && m.ld != m.cols {
            return Err(shape_err(
                OP,
                format!("{what} {} must be contiguous", m.show()),
            ));
        }
    }
    if groups == 0 || x.cols % groups != 0 || x.rows == 0 {
        return Err(shape_err(
            OP,
            format!("{} channels cannot form {groups} groups", x.cols),
        ));
    }
    for (what, v) in [("weight", w), ("bias", b)] {
        expect_valid(OP, what, v)?;
        expect_dtype(OP, what, v, DType::F32)?;
        expect_vector(OP, what, v, x.cols)?;
        expect_disjoint(OP, y, what, v)?;
    }
    expect_same_or_disjoint(OP, y, "x", x)?;
    if !(eps.is_finite() && eps > 0.0) {
        return Err(shape_err(OP, format!("eps = {eps} must be positive")));
    }
    // The kernel's per-group element count is an i64; P and C must be ints.
    Ok((
        LaunchDims::new((groups as u32, 1, 1), THREADS),
        [
            to_i32(OP, "pixels", x.rows)?,
            to_i32(OP, "channels", x.cols)?,
            to_i32(OP, "groups", groups)?,
        ],
    ))
}

impl Kernels {
    /// GroupNorm of the channels-last map `x [P, C]` into `y` (may be `x`): `groups` groups of
    /// `C/groups` channels, f32 affine `w`, `b` `[1, C]`, then swish when asked (spec 4.2).
    #[allow(clippy::too_many_arguments)]
    pub fn group_norm(
        &self,
        x: &DeviceMat,
        groups: usize,
        w: &DeviceMat,
        bias: &DeviceMat,
        eps: f32,
        swish: bool,
        y: &DeviceMat,
    ) -> Result<()> {
        let (dx, dw, db, dy) = (x.desc(), w.desc(), bias.desc(), y.desc());
        let (dims, [p, c, g]) = check(&dx, groups, &dw, &db, &dy, eps)?;
        let swish = swish as i32;
        let mut l = self.launch(&self.gn.group_norm);
        l.ptr(&dx.addr)
            .i32(&p)
            .i32(&c)
            .i32(&g)
            .ptr(&dw.addr)
            .ptr(&db.addr)
            .f32(&eps)
            .i32(&swish)
            .ptr(&dy.addr);
        // SAFETY: `check` verified contiguous [P, C] bf16 x and y (equal or disjoint; the kernel
        // reads each element before its thread writes it, after the block's reductions), G | C,
        // and f32 [1, C] parameters that y does not overlap.
        unsafe { l.run(dims) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desc::tests::{bf, f32v};

    #[test]
    fn vae_decoder_shapes() {
        // 1024² output: [1024·1024, 128], 32 groups, in place.
        let x = bf(0x1_0000_0000, 1 << 20, 128, 128);
        let (dims, args) = check(&x, 32, &f32v(0x1000, 128), &f32v(0x2000, 128), &x, 1e-6).unwrap();
        assert_eq!(dims.grid, (32, 1, 1));
        assert_eq!(args, [1 << 20, 128, 32]);
    }

    #[test]
    fn rejects_bad_groups_and_params() {
        let x = bf(0x100000, 16, 64, 64);
        let y = bf(0x200000, 16, 64, 64);
        let (w, b) = (f32v(0x1000, 64), f32v(0x2000, 64));
        assert!(check(&x, 32, &w, &b, &y, 1e-6).is_ok());
        assert!(check(&x, 24, &w, &b, &y, 1e-6).is_err());
        assert!(check(&x, 0, &w, &b, &y, 1e-6).is_err());
        assert!(check(&x, 32, &f32v(0x1000, 63), &b, &y, 1e-6).is_err());
        assert!(check(&x, 32, &w, &bf(0x2000, 1, 64, 64), &y, 1e-6).is_err());
        assert!(check(&x, 32, &w, &b, &bf(0x100000 + 2, 16, 64, 64), 1e-6).is_err());
        assert!(check(&x, 32, &w, &b, &bf(0x200000, 16, 64, 128), 1e-6).is_err());
    }
}

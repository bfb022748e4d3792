//! Launchers of `cuda/norm_modulate.cu`: LayerNorm + adaLN modulation (Flux), LayerNorm with
//! affine (CLIP), RMSNorm (T5); the modulated LayerNorm quantised to e4m3 with a per-tensor
//! scale (the input of an fp8 GEMM). One block per row.

use crate::desc::{
    blocks, expect_disjoint, expect_dtype, expect_shape, expect_valid, expect_vector, to_i32,
    DType, LaunchDims, MatDesc, MAX_GRID_X,
};
use crate::error::{shape_err, Result};
use crate::gpu::DeviceMat;
use crate::launch::{Arg, Kernel, Loaded};
use crate::{function, Family, Kernels};
use cudarc::driver::CudaModule;
use std::sync::Arc;

/// `(x, ldx, y, ldy, rows, cols, a, b, eps)` of norm_modulate and layer_norm.
const NORM_ARGS: &[Arg] = &[
    Arg::Ptr,
    Arg::I64,
    Arg::Ptr,
    Arg::I64,
    Arg::I32,
    Arg::I32,
    Arg::Ptr,
    Arg::Ptr,
    Arg::F32,
];

pub const FAMILY: Family = Family {
    name: "norm_modulate",
    source: include_str!("../cuda/norm_modulate.cu"),
    kernels: &[
        Kernel {
            name: "norm_modulate",
            args: NORM_ARGS,
        },
        Kernel {
            name: "layer_norm",
            args: NORM_ARGS,
        },
        Kernel {
            name: "norm_modulate_amax",
            args: &[
                Arg::Ptr,
                Arg::I64,
                Arg::I32,
                Arg::I32,
                Arg::Ptr,
                Arg::Ptr,
                Arg::F32,
                Arg::Ptr,
            ],
        },
        Kernel {
            name: "norm_modulate_e4m3",
            args: &[
                Arg::Ptr,
                Arg::I64,
                Arg::Ptr,
                Arg::I64,
                Arg::I32,
                Arg::I32,
                Arg::Ptr,
                Arg::Ptr,
                Arg::F32,
                Arg::Ptr,
                Arg::Ptr,
            ],
        },
        Kernel {
            name: "rms_norm",
            args: &[
                Arg::Ptr,
                Arg::I64,
                Arg::Ptr,
                Arg::I64,
                Arg::I32,
                Arg::I32,
                Arg::Ptr,
                Arg::F32,
            ],
        },
    ],
};

/// Threads per block (`NORM_THREADS` in the .cu).
pub const THREADS: u32 = 256;

pub(crate) struct Functions {
    norm_modulate: Loaded,
    norm_modulate_amax: Loaded,
    norm_modulate_e4m3: Loaded,
    layer_norm: Loaded,
    rms_norm: Loaded,
}

impl Functions {
    pub(crate) fn resolve(m: &Arc<CudaModule>) -> Result<Functions> {
        Ok(Functions {
            norm_modulate: function(m, &FAMILY, "norm_modulate")?,
            norm_modulate_amax: function(m, &FAMILY, "norm_modulate_amax")?,
            norm_modulate_e4m3: function(m, &FAMILY, "norm_modulate_e4m3")?,
            layer_norm: function(m, &FAMILY, "layer_norm")?,
            rms_norm: function(m, &FAMILY, "rms_norm")?,
        })
    }

    /// Every kernel of the family ([`Kernels::launch_counts`]).
    pub(crate) fn loaded(&self) -> Vec<&Loaded> {
        vec![
            &self.norm_modulate,
            &self.norm_modulate_amax,
            &self.norm_modulate_e4m3,
            &self.layer_norm,
            &self.rms_norm,
        ]
    }
}

/// A validated row norm: launch shape and the kernel's `int` arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowNorm {
    pub dims: LaunchDims,
    pub rows: i32,
    pub cols: i32,
}

/// Which per-column parameters follow the norm.
#[derive(Debug, Clone, Copy)]
pub enum NormParams<'a> {
    /// `(1 + scale)·LN(x) + shift`, bf16 `[1, cols]` each.
    Modulate {
        shift: &'a MatDesc,
        scale: &'a MatDesc,
    },
    /// `w·LN(x) + b`, f32 `[1, cols]` each.
    Affine { w: &'a MatDesc, b: &'a MatDesc },
    /// `w·x·rsqrt(mean(x²) + eps)`, f32 `[1, cols]`.
    Rms { w: &'a MatDesc },
}

/// Checks `x` and `y` (bf16, same shape, disjoint), the parameters, and `eps`.
pub fn check(
    op: &'static str,
    x: &MatDesc,
    params: NormParams,
    y: &MatDesc,
    eps: f32,
) -> Result<RowNorm> {
    check_into(op, x, params, y, DType::Bf16, eps)
}

/// [`check`] with the output's element type `y_dtype` (bf16, or e4m3 for the quantising pass).
pub fn check_into(
    op: &'static str,
    x: &MatDesc,
    params: NormParams,
    y: &MatDesc,
    y_dtype: DType,
    eps: f32,
) -> Result<RowNorm> {
    expect_valid(op, "x", x)?;
    expect_valid(op, "y", y)?;
    expect_dtype(op, "x", x, DType::Bf16)?;
    expect_dtype(op, "y", y, y_dtype)?;
    expect_shape(op, "y", y, x.rows, x.cols)?;
    expect_disjoint(op, y, "x", x)?;
    let (vectors, dtype): (Vec<(&str, &MatDesc)>, DType) = match params {
        NormParams::Modulate { shift, scale } => {
            (vec![("shift", shift), ("scale", scale)], DType::Bf16)
        }
        NormParams::Affine { w, b } => (vec![("weight", w), ("bias", b)], DType::F32),
        NormParams::Rms { w } => (vec![("weight", w)], DType::F32),
    };
    for (what, v) in vectors {
        expect_valid(op, what, v)?;
        expect_dtype(op, what, v, dtype)?;
        expect_vector(op, what, v, x.cols)?;
        expect_disjoint(op, y, what, v)?;
    }
    if !(eps.is_finite() && eps > 0.0) {
        return Err(shape_err(op, format!("eps = {eps} must be positive")));
    }
    Ok(RowNorm {
        dims: LaunchDims::new((blocks(x.rows, 1, MAX_GRID_X), 1, 1), THREADS),
        rows: to_i32(op, "rows", x.rows)?,
        cols: to_i32(op, "cols", x.cols)?,
    })
}

impl Kernels {
    /// `y = (1 + scale)·LN(x) + shift`: x, y `[L, D]` bf16; shift, scale `[1, D]` bf16 (spec 1.4).
    pub fn norm_modulate(
        &self,
        x: &DeviceMat,
        shift: &DeviceMat,
        scale: &DeviceMat,
        y: &DeviceMat,
        eps: f32,
    ) -> Result<()> {
        let (dx, ds, dc, dy) = (x.desc(), shift.desc(), scale.desc(), y.desc());
        let plan = check(
            "norm_modulate",
            &dx,
            NormParams::Modulate {
                shift: &ds,
                scale: &dc,
            },
            &dy,
            eps,
        )?;
        if dx.is_empty() {
            return Ok(());
        }
        let (ldx, ldy) = (dx.ld as i64, dy.ld as i64);
        let mut l = self.launch(&self.norm.norm_modulate);
        l.ptr(&dx.addr)
            .i64(&ldx)
            .ptr(&dy.addr)
            .i64(&ldy)
            .i32(&plan.rows)
            .i32(&plan.cols)
            .ptr(&ds.addr)
            .ptr(&dc.addr)
            .f32(&eps);
        // SAFETY: `check` verified the kernel's contract: x and y are [rows, cols] bf16 views
        // inside live allocations (DeviceMat), y overlaps nothing it reads, shift and scale are
        // [1, cols] bf16; the arguments match the kernel's parameter list in order and type.
        unsafe { l.run(plan.dims) }
    }

    /// `y = e4m3((1 + scale)·LN(x) + shift) / s)` with the per-tensor `s = max|·| / 448`: x
    /// `[L, D]` bf16, shift and scale `[1, D]` bf16, y `[L, D]` e4m3, `scales` f32 `[1, 2]` (`[0]`
    /// the amax workspace, zeroed here; `[1]` receives `s` for
    /// [`crate::gemm::Gemm::linear_fp8`]). Two passes over x (see the .cu).
    pub fn norm_modulate_e4m3(
        &self,
        x: &DeviceMat,
        shift: &DeviceMat,
        scale: &DeviceMat,
        y: &DeviceMat,
        scales: &DeviceMat,
        eps: f32,
    ) -> Result<()> {
        const OP: &str = "norm_modulate_e4m3";
        let (dx, ds, dc, dy, dq) = (
            x.desc(),
            shift.desc(),
            scale.desc(),
            y.desc(),
            scales.desc(),
        );
        let plan = check_into(
            OP,
            &dx,
            NormParams::Modulate {
                shift: &ds,
                scale: &dc,
            },
            &dy,
            DType::F8E4M3,
            eps,
        )?;
        expect_valid(OP, "scales", &dq)?;
        expect_dtype(OP, "scales", &dq, DType::F32)?;
        expect_vector(OP, "scales", &dq, 2)?;
        for (what, m) in [("x", &dx), ("y", &dy), ("shift", &ds), ("scale", &dc)] {
            expect_disjoint(OP, &dq, what, m)?;
        }
        self.gpu.fill_bytes(&scales.cols_range(0, 1)?, 0)?;
        let (amax, y_scale) = (dq.addr, dq.addr + 4);
        let (ldx, ldy) = (dx.ld as i64, dy.ld as i64);
        if !dx.is_empty() {
            let mut l = self.launch(&self.norm.norm_modulate_amax);
            l.ptr(&dx.addr)
                .i64(&ldx)
                .i32(&plan.rows)
                .i32(&plan.cols)
                .ptr(&ds.addr)
                .ptr(&dc.addr)
                .f32(&eps)
                .ptr(&amax);
            // SAFETY: `check_into` verified x [rows, cols] bf16 and shift, scale [1, cols] bf16;
            // scales is an f32 [1, 2] disjoint from all of them, of which the kernel updates [0].
            unsafe { l.run(plan.dims) }?;
        }
        let mut l = self.launch(&self.norm.norm_modulate_e4m3);
        l.ptr(&dx.addr)
            .i64(&ldx)
            .ptr(&dy.addr)
            .i64(&ldy)
            .i32(&plan.rows)
            .i32(&plan.cols)
            .ptr(&ds.addr)
            .ptr(&dc.addr)
            .f32(&eps)
            .ptr(&amax)
            .ptr(&y_scale);
        // SAFETY: as above, y an e4m3 [rows, cols] view overlapping nothing it reads; the kernel
        // reads scales[0] and writes scales[1] (one thread). Launched even when empty, so
        // scales[1] always holds a scale.
        unsafe { l.run(plan.dims) }
    }

    /// `y = w·LN(x) + b` (CLIP): x, y `[L, D]` bf16; w, b `[1, D]` f32.
    pub fn layer_norm(
        &self,
        x: &DeviceMat,
        w: &DeviceMat,
        bias: &DeviceMat,
        y: &DeviceMat,
        eps: f32,
    ) -> Result<()> {
        let (dx, dw, db, dy) = (x.desc(), w.desc(), bias.desc(), y.desc());
        let plan = check(
            "layer_norm",
            &dx,
            NormParams::Affine { w: &dw, b: &db },
            &dy,
            eps,
        )?;
        if dx.is_empty() {
            return Ok(());
        }
        let (ldx, ldy) = (dx.ld as i64, dy.ld as i64);
        let mut l = self.launch(&self.norm.layer_norm);
        l.ptr(&dx.addr)
            .i64(&ldx)
            .ptr(&dy.addr)
            .i64(&ldy)
            .i32(&plan.rows)
            .i32(&plan.cols)
            .ptr(&dw.addr)
            .ptr(&db.addr)
            .f32(&eps);
        // SAFETY: as in norm_modulate, with w and b [1, cols] f32.
        unsafe { l.run(plan.dims) }
    }

    /// `y = w·x·rsqrt(mean(x²) + eps)` (T5): x, y `[L, D]` bf16; w `[1, D]` f32.
    pub fn rms_norm(&self, x: &DeviceMat, w: &DeviceMat, y: &DeviceMat, eps: f32) -> Result<()> {
        let (dx, dw, dy) = (x.desc(), w.desc(), y.desc());
        let plan = check("rms_norm", &dx, NormParams::Rms { w: &dw }, &dy, eps)?;
        if dx.is_empty() {
            return Ok(());
        }
        let (ldx, ldy) = (dx.ld as i64, dy.ld as i64);
        let mut l = self.launch(&self.norm.rms_norm);
        l.ptr(&dx.addr)
            .i64(&ldx)
            .ptr(&dy.addr)
            .i64(&ldy)
            .i32(&plan.rows)
            .i32(&plan.cols)
            .ptr(&dw.addr)
            .f32(&eps);
        // SAFETY: as in norm_modulate, with w [1, cols] f32.
        unsafe { l.run(plan.dims) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desc::tests::{bf, f32v};

    #[test]
    fn modulate_accepts_the_flux_shapes() {
        // x [8704, 3072]; shift and scale are columns of the [1, 18432] modulation output.
        let x = bf(0x100000, 8704, 3072, 3072);
        let y = bf(0x10000000, 8704, 3072, 3072);
        let shift = bf(0x1000, 1, 3072, 18432);
        let scale = bf(0x1000 + 3072 * 2, 1, 3072, 18432);
        let p = check(
            "t",
            &x,
            NormParams::Modulate {
                shift: &shift,
                scale: &scale,
            },
            &y,
            1e-6,
        )
        .unwrap();
        assert_eq!((p.rows, p.cols), (8704, 3072));
        assert_eq!(p.dims.grid, (8704, 1, 1));
        assert_eq!(p.dims.block, (256, 1, 1));
    }

    #[test]
    fn modulate_rejects_bad_operands() {
        let x = bf(0x100000, 4, 64, 64);
        let y = bf(0x200000, 4, 64, 64);
        let v = bf(0x1000, 1, 64, 64);
        let m = |shift: &MatDesc, y: &MatDesc, eps: f32| {
            check("t", &x, NormParams::Modulate { shift, scale: &v }, y, eps)
        };
        assert!(m(&v, &y, 1e-6).is_ok());
        assert!(m(&bf(0x1000, 1, 63, 63), &y, 1e-6).is_err()); // wrong width
        assert!(m(&f32v(0x1000, 64), &y, 1e-6).is_err()); // f32 shift
        assert!(m(&v, &bf(0x200000, 4, 65, 65), 1e-6).is_err()); // y shape
        assert!(m(&v, &x, 1e-6).is_err()); // in place
        assert!(m(&v, &bf(0x100000 + 64, 4, 64, 64), 1e-6).is_err()); // partial overlap
        assert!(m(&v, &y, 0.0).is_err());
        assert!(m(&v, &y, f32::NAN).is_err());
    }

    #[test]
    fn affine_and_rms_want_f32_parameters() {
        let x = bf(0x100000, 77, 768, 768);
        let y = bf(0x200000, 77, 768, 768);
        let w = f32v(0x1000, 768);
        let b = f32v(0x2000, 768);
        assert!(check("t", &x, NormParams::Affine { w: &w, b: &b }, &y, 1e-5).is_ok());
        assert!(check("t", &x, NormParams::Rms { w: &w }, &y, 1e-6).is_ok());
        let wb = bf(0x1000, 1, 768, 768);
        assert!(check("t", &x, NormParams::Rms { w: &wb }, &y, 1e-6).is_err());
        assert!(check("t", &x, NormParams::Affine { w: &w, b: &wb }, &y, 1e-5).is_err());
    }
}

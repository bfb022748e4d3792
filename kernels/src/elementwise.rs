//! Launchers of `cuda/elementwise.cu`: pointwise ops and copies on 2-D strided views.
//!
//! Every op takes views (`DeviceMat` slices with their own row stride), so the engine's
//! `concat_rows`, `concat_cols`, `slice_rows` and `slice_cols` are [`Kernels::copy2d`] into or out
//! of column/row ranges of a buffer. An output may be exactly an input (in place) or disjoint
//! from it, never partly overlapping.

use crate::desc::{
    blocks, expect_disjoint, expect_dtype, expect_same_or_disjoint, expect_shape, expect_valid,
    expect_vector, to_i32, DType, LaunchDims, MatDesc, MAX_GRID_Y,
};
use crate::error::{shape_err, Result};
use crate::gpu::DeviceMat;
use crate::launch::{Arg, Kernel, Loaded};
use crate::{function, Family, Kernels};
use cudarc::driver::CudaModule;
use std::sync::Arc;

/// `(x, ldx, y, ldy, rows, cols)`: the unary ops, copies, casts and the transpose.
const UNARY: &[Arg] = &[Arg::Ptr, Arg::I64, Arg::Ptr, Arg::I64, Arg::I32, Arg::I32];

pub const FAMILY: Family = Family {
    name: "elementwise",
    source: include_str!("../cuda/elementwise.cu"),
    kernels: &[
        Kernel {
            name: "silu",
            args: UNARY,
        },
        Kernel {
            name: "gelu_tanh",
            args: UNARY,
        },
        Kernel {
            name: "quick_gelu",
            args: UNARY,
        },
        Kernel {
            name: "gelu_tanh_mul",
            args: &[
                Arg::Ptr,
                Arg::I64,
                Arg::Ptr,
                Arg::I64,
                Arg::Ptr,
                Arg::I64,
                Arg::I32,
                Arg::I32,
            ],
        },
        Kernel {
            name: "add_assign",
            args: &[Arg::Ptr, Arg::I64, Arg::Ptr, Arg::I64, Arg::I32, Arg::I32],
        },
        Kernel {
            name: "gate_residual",
            args: &[
                Arg::Ptr,
                Arg::I64,
                Arg::Ptr,
                Arg::Ptr,
                Arg::I64,
                Arg::I32,
                Arg::I32,
            ],
        },
        Kernel {
            name: "scale_shift",
            args: &[
                Arg::Ptr,
                Arg::I64,
                Arg::Ptr,
                Arg::I64,
                Arg::I32,
                Arg::I32,
                Arg::F32,
                Arg::F32,
            ],
        },
        Kernel {
            name: "copy2d",
            args: UNARY,
        },
        Kernel {
            name: "cast_f32_bf16",
            args: UNARY,
        },
        Kernel {
            name: "cast_bf16_f32",
            args: UNARY,
        },
        Kernel {
            name: "gather_rows",
            args: &[
                Arg::Ptr,
                Arg::Ptr,
                Arg::I64,
                Arg::I32,
                Arg::Ptr,
                Arg::I64,
                Arg::I32,
                Arg::I32,
            ],
        },
        Kernel {
            name: "transpose",
            args: UNARY,
        },
        Kernel {
            name: "euler_step",
            args: &[
                Arg::Ptr,
                Arg::I64,
                Arg::Ptr,
                Arg::I64,
                Arg::Ptr,
                Arg::I32,
                Arg::I32,
            ],
        },
    ],
};

/// Threads per block (`EW_THREADS`).
pub const THREADS: u32 = 256;
/// Most blocks along a row (the kernels stride over the rest).
const MAX_BLOCKS_X: u32 = 1024;

pub(crate) struct Functions {
    silu: Loaded,
    gelu_tanh: Loaded,
    quick_gelu: Loaded,
    gelu_tanh_mul: Loaded,
    add_assign: Loaded,
    gate_residual: Loaded,
    scale_shift: Loaded,
    copy2d: Loaded,
    cast_f32_bf16: Loaded,
    cast_bf16_f32: Loaded,
    gather_rows: Loaded,
    pub(crate) transpose: Loaded,
    euler_step: Loaded,
}

impl Functions {
    pub(crate) fn resolve(m: &Arc<CudaModule>) -> Result<Functions> {
        let f = |name| function(m, &FAMILY, name);
        Ok(Functions {
            silu: f("silu")?,
            gelu_tanh: f("gelu_tanh")?,
            quick_gelu: f("quick_gelu")?,
            gelu_tanh_mul: f("gelu_tanh_mul")?,
            add_assign: f("add_assign")?,
            gate_residual: f("gate_residual")?,
            scale_shift: f("scale_shift")?,
            copy2d: f("copy2d")?,
            cast_f32_bf16: f("cast_f32_bf16")?,
            cast_bf16_f32: f("cast_bf16_f32")?,
            gather_rows: f("gather_rows")?,
            transpose: f("transpose")?,
            euler_step: f("euler_step")?,
        })
    }

    /// Every kernel of the family ([`Kernels::launch_counts`]).
    pub(crate) fn loaded(&self) -> Vec<&Loaded> {
        vec![
            &self.silu,
            &self.gelu_tanh,
            &self.quick_gelu,
            &self.gelu_tanh_mul,
            &self.add_assign,
            &self.gate_residual,
            &self.scale_shift,
            &self.copy2d,
            &self.cast_f32_bf16,
            &self.cast_bf16_f32,
            &self.gather_rows,
            &self.transpose,
            &self.euler_step,
        ]
    }
}

/// The pointwise activation of [`Kernels::unary`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unary {
    Silu,
    GeluTanh,
    QuickGelu,
    /// `y = x` (concatenation and slicing).
    Copy,
}

/// Grid for `[rows, cols]`: grid.y over rows (at most 65535, then striding), grid.x over
/// columns.
pub fn dims_2d(rows: usize, cols: usize) -> LaunchDims {
    LaunchDims::new(
        (
            blocks(cols, THREADS as usize, MAX_BLOCKS_X),
            blocks(rows, 1, MAX_GRID_Y),
            1,
        ),
        THREADS,
    )
}

/// Checks a `y = f(x)` op: same shape, the given types, y equal to or disjoint from x.
pub fn check_unary(
    op: &'static str,
    x: &MatDesc,
    xt: DType,
    y: &MatDesc,
    yt: DType,
) -> Result<(LaunchDims, i32, i32)> {
    expect_valid(op, "x", x)?;
    expect_valid(op, "y", y)?;
    expect_dtype(op, "x", x, xt)?;
    expect_dtype(op, "y", y, yt)?;
    expect_shape(op, "y", y, x.rows, x.cols)?;
    if xt == yt {
        expect_same_or_disjoint(op, y, "x", x)?;
    } else {
        expect_disjoint(op, y, "x", x)?;
    }
    Ok((
        dims_2d(x.rows, x.cols),
        to_i32(op, "rows", x.rows)?,
        to_i32(op, "cols", x.cols)?,
    ))
}

/// Checks `out (op)= f(a, b)` with bf16 operands of one shape; `out` equal to or disjoint from
/// each input.
pub fn check_binary(
    op: &'static str,
    a: &MatDesc,
    b: &MatDesc,
    out: &MatDesc,
) -> Result<(LaunchDims, i32, i32)> {
    for (what, m) in [("a", a), ("b", b), ("out", out)] {
        expect_valid(op, what, m)?;
        expect_dtype(op, what, m, DType::Bf16)?;
        expect_shape(op, what, m, a.rows, a.cols)?;
    }
    expect_same_or_disjoint(op, out, "a", a)?;
    expect_same_or_disjoint(op, out, "b", b)?;
    Ok((
        dims_2d(a.rows, a.cols),
        to_i32(op, "rows", a.rows)?,
        to_i32(op, "cols", a.cols)?,
    ))
}

/// Checks `x += gate ⊙ y`: x, y bf16 `[L, D]`, gate bf16 `[1, D]`; x disjoint from y and gate.
pub fn check_gate_residual(
    x: &MatDesc,
    gate: &MatDesc,
    y: &MatDesc,
) -> Result<(LaunchDims, i32, i32)> {
    const OP: &str = "gate_residual";
    for (what, m) in [("x", x), ("gate", gate), ("y", y)] {
        expect_valid(OP, what, m)?;
        expect_dtype(OP, what, m, DType::Bf16)?;
    }
    expect_shape(OP, "y", y, x.rows, x.cols)?;
    expect_vector(OP, "gate", gate, x.cols)?;
    expect_disjoint(OP, x, "y", y)?;
    expect_disjoint(OP, x, "gate", gate)?;
    Ok((
        dims_2d(x.rows, x.cols),
        to_i32(OP, "rows", x.rows)?,
        to_i32(OP, "cols", x.cols)?,
    ))
}

/// Checks `x += dt·v`: x f32 `[L, C]`, v bf16 `[L, C]`, dt f32 `[1, 1]`; x disjoint from both.
pub fn check_euler_step(x: &MatDesc, v: &MatDesc, dt: &MatDesc) -> Result<(LaunchDims, i32, i32)> {
    const OP: &str = "euler_step";
    for (what, m) in [("x", x), ("v", v), ("dt", dt)] {
        expect_valid(OP, what, m)?;
    }
    expect_dtype(OP, "x", x, DType::F32)?;
    expect_dtype(OP, "v", v, DType::Bf16)?;
    expect_dtype(OP, "dt", dt, DType::F32)?;
    expect_shape(OP, "v", v, x.rows, x.cols)?;
    expect_shape(OP, "dt", dt, 1, 1)?;
    expect_disjoint(OP, x, "v", v)?;
    expect_disjoint(OP, x, "dt", dt)?;
    Ok((
        dims_2d(x.rows, x.cols),
        to_i32(OP, "rows", x.rows)?,
        to_i32(OP, "cols", x.cols)?,
    ))
}

/// Checks `y[r] = table[ids[r]]`: ids i32 `[1, L]` or `[L, 1]` contiguous, table bf16 `[V, D]`,
/// y bf16 `[L, D]` disjoint from both.
pub fn check_gather(
    ids: &MatDesc,
    table: &MatDesc,
    y: &MatDesc,
) -> Result<(LaunchDims, i32, i32, i32)> {
    const OP: &str = "gather_rows";
    for (what, m) in [("ids", ids), ("table", table), ("y", y)] {
        expect_valid(OP, what, m)?;
    }
    expect_dtype(OP, "ids", ids, DType::I32)?;
    expect_dtype(OP, "table", table, DType::Bf16)?;
    expect_dtype(OP, "y", y, DType::Bf16)?;
    let n = ids.rows * ids.cols;
    let contiguous = ids.rows <= 1 || (ids.cols == 1 && ids.ld == 1);
    if !contiguous {
        return Err(shape_err(
            OP,
            format!("ids {} must be one contiguous row or column", ids.show()),
        ));
    }
    expect_shape(OP, "y", y, n, table.cols)?;
    expect_disjoint(OP, y, "ids", ids)?;
    expect_disjoint(OP, y, "table", table)?;
    Ok((
        dims_2d(n, table.cols),
        to_i32(OP, "rows", n)?,
        to_i32(OP, "cols", table.cols)?,
        to_i32(OP, "vocab", table.rows)?,
    ))
}

/// Grid of the 32×32-tile transpose.
pub fn transpose_dims(rows: usize, cols: usize) -> LaunchDims {
    LaunchDims {
        grid: (blocks(cols, 32, 65_535), blocks(rows, 32, MAX_GRID_Y), 1),
        block: (32, 8, 1),
    }
}

impl Kernels {
    /// `y = f(x)` for bf16 `[rows, cols]` views (y may be x itself).
    pub fn unary(&self, f: Unary, x: &DeviceMat, y: &DeviceMat) -> Result<()> {
        let (name, func) = match f {
            Unary::Silu => ("silu", &self.ew.silu),
            Unary::GeluTanh => ("gelu_tanh", &self.ew.gelu_tanh),
            Unary::QuickGelu => ("quick_gelu", &self.ew.quick_gelu),
            Unary::Copy => ("copy2d", &self.ew.copy2d),
        };
        let (dx, dy) = (x.desc(), y.desc());
        let (dims, rows, cols) = check_unary(name, &dx, DType::Bf16, &dy, DType::Bf16)?;
        if dx.is_empty() || (f == Unary::Copy && dx == dy) {
            return Ok(());
        }
        let (ldx, ldy) = (dx.ld as i64, dy.ld as i64);
        let mut l = self.launch(func);
        l.ptr(&dx.addr)
            .i64(&ldx)
            .ptr(&dy.addr)
            .i64(&ldy)
            .i32(&rows)
            .i32(&cols);
        // SAFETY: `check_unary` verified two bf16 [rows, cols] views inside live allocations,
        // equal or disjoint (each element is read and written by one thread).
        unsafe { l.run(dims) }
    }

    /// `y = x` between bf16 views (concatenation and slicing).
    pub fn copy2d(&self, x: &DeviceMat, y: &DeviceMat) -> Result<()> {
        self.unary(Unary::Copy, x, y)
    }

    /// Casts between f32 and bf16 views of one shape (`x` f32 → `y` bf16, or bf16 → f32).
    pub fn cast(&self, x: &DeviceMat, y: &DeviceMat) -> Result<()> {
        let (dx, dy) = (x.desc(), y.desc());
        let (name, func) = match (dx.dtype, dy.dtype) {
            (DType::F32, DType::Bf16) => ("cast_f32_bf16", &self.ew.cast_f32_bf16),
            (DType::Bf16, DType::F32) => ("cast_bf16_f32", &self.ew.cast_bf16_f32),
            (a, b) => return Err(shape_err("cast", format!("{a} → {b}: only f32 ↔ bf16"))),
        };
        let (dims, rows, cols) = check_unary(name, &dx, dx.dtype, &dy, dy.dtype)?;
        if dx.is_empty() {
            return Ok(());
        }
        let (ldx, ldy) = (dx.ld as i64, dy.ld as i64);
        let mut l = self.launch(func);
        l.ptr(&dx.addr)
            .i64(&ldx)
            .ptr(&dy.addr)
            .i64(&ldy)
            .i32(&rows)
            .i32(&cols);
        // SAFETY: `check_unary` verified the two views' types and shapes and that they are
        // disjoint.
        unsafe { l.run(dims) }
    }

    /// `y = GELU_tanh(a) ⊙ b` (T5's gated GELU), bf16 views of one shape.
    pub fn gelu_tanh_mul(&self, a: &DeviceMat, bm: &DeviceMat, y: &DeviceMat) -> Result<()> {
        let (da, db, dy) = (a.desc(), bm.desc(), y.desc());
        let (dims, rows, cols) = check_binary("gelu_tanh_mul", &da, &db, &dy)?;
        if da.is_empty() {
            return Ok(());
        }
        let (lda, ldb, ldy) = (da.ld as i64, db.ld as i64, dy.ld as i64);
        let mut l = self.launch(&self.ew.gelu_tanh_mul);
        l.ptr(&da.addr)
            .i64(&lda)
            .ptr(&db.addr)
            .i64(&ldb)
            .ptr(&dy.addr)
            .i64(&ldy)
            .i32(&rows)
            .i32(&cols);
        // SAFETY: `check_binary` verified three bf16 views of one shape, y equal to or disjoint
        // from each input.
        unsafe { l.run(dims) }
    }

    /// `a += b`, bf16 views of one shape, disjoint.
    pub fn add_assign(&self, a: &DeviceMat, bm: &DeviceMat) -> Result<()> {
        let (da, db) = (a.desc(), bm.desc());
        let (dims, rows, cols) = check_binary("add_assign", &da, &db, &da)?;
        expect_disjoint("add_assign", &da, "b", &db)?;
        if da.is_empty() {
            return Ok(());
        }
        let (lda, ldb) = (da.ld as i64, db.ld as i64);
        let mut l = self.launch(&self.ew.add_assign);
        l.ptr(&da.addr)
            .i64(&lda)
            .ptr(&db.addr)
            .i64(&ldb)
            .i32(&rows)
            .i32(&cols);
        // SAFETY: `check_binary` verified two bf16 views of one shape; they are disjoint.
        unsafe { l.run(dims) }
    }

    /// `x += gate ⊙ y`: x, y bf16 `[L, D]`, gate bf16 `[1, D]` broadcast over rows.
    pub fn gate_residual(&self, x: &DeviceMat, gate: &DeviceMat, y: &DeviceMat) -> Result<()> {
        let (dx, dg, dy) = (x.desc(), gate.desc(), y.desc());
        let (dims, rows, cols) = check_gate_residual(&dx, &dg, &dy)?;
        if dx.is_empty() {
            return Ok(());
        }
        let (ldx, ldy) = (dx.ld as i64, dy.ld as i64);
        let mut l = self.launch(&self.ew.gate_residual);
        l.ptr(&dx.addr)
            .i64(&ldx)
            .ptr(&dg.addr)
            .ptr(&dy.addr)
            .i64(&ldy)
            .i32(&rows)
            .i32(&cols);
        // SAFETY: `check_gate_residual` verified x and y [L, D] bf16, gate [1, D] bf16, and that
        // x overlaps neither.
        unsafe { l.run(dims) }
    }

    /// `x += dt·v` (the sampler's Euler update): x f32 `[L, C]`, v bf16 `[L, C]`, dt f32
    /// `[1, 1]` read on the device, so a captured step replays with the dt written before it.
    pub fn euler_step(&self, x: &DeviceMat, v: &DeviceMat, dt: &DeviceMat) -> Result<()> {
        let (dx, dv, dd) = (x.desc(), v.desc(), dt.desc());
        let (dims, rows, cols) = check_euler_step(&dx, &dv, &dd)?;
        if dx.is_empty() {
            return Ok(());
        }
        let (ldx, ldv) = (dx.ld as i64, dv.ld as i64);
        let mut l = self.launch(&self.ew.euler_step);
        l.ptr(&dx.addr)
            .i64(&ldx)
            .ptr(&dv.addr)
            .i64(&ldv)
            .ptr(&dd.addr)
            .i32(&rows)
            .i32(&cols);
        // SAFETY: `check_euler_step` verified x f32 and v bf16 of one shape, dt one f32, x
        // overlapping neither.
        unsafe { l.run(dims) }
    }

    /// `y = x·mul + offset` (latent scaling), bf16 views of one shape (y may be x).
    pub fn scale_shift(&self, x: &DeviceMat, mul: f32, offset: f32, y: &DeviceMat) -> Result<()> {
        let (dx, dy) = (x.desc(), y.desc());
        let (dims, rows, cols) = check_unary("scale_shift", &dx, DType::Bf16, &dy, DType::Bf16)?;
        if dx.is_empty() {
            return Ok(());
        }
        let (ldx, ldy) = (dx.ld as i64, dy.ld as i64);
        let mut l = self.launch(&self.ew.scale_shift);
        l.ptr(&dx.addr)
            .i64(&ldx)
            .ptr(&dy.addr)
            .i64(&ldy)
            .i32(&rows)
            .i32(&cols)
            .f32(&mul)
            .f32(&offset);
        // SAFETY: as in `unary`.
        unsafe { l.run(dims) }
    }

    /// `y[r] = table[ids[r]]`: ids i32 (one row or column of L), table bf16 `[V, D]`, y bf16
    /// `[L, D]`. An id outside `[0, V)` writes a NaN row (checked on the device, so a bad id
    /// shows in every comparison instead of reading out of bounds).
    pub fn gather_rows(&self, ids: &DeviceMat, table: &DeviceMat, y: &DeviceMat) -> Result<()> {
        let (di, dt, dy) = (ids.desc(), table.desc(), y.desc());
        let (dims, rows, cols, vocab) = check_gather(&di, &dt, &dy)?;
        if dy.is_empty() {
            return Ok(());
        }
        let (ldt, ldy) = (dt.ld as i64, dy.ld as i64);
        let mut l = self.launch(&self.ew.gather_rows);
        l.ptr(&di.addr)
            .ptr(&dt.addr)
            .i64(&ldt)
            .i32(&vocab)
            .ptr(&dy.addr)
            .i64(&ldy)
            .i32(&rows)
            .i32(&cols);
        // SAFETY: `check_gather` verified `rows` contiguous i32 ids, a bf16 [vocab, cols]
        // table and a disjoint bf16 [rows, cols] output; the kernel bounds-checks each id.
        unsafe { l.run(dims) }
    }

    /// `y = xᵀ`: x bf16 `[R, C]`, y bf16 `[C, R]`, disjoint.
    pub fn transpose(&self, x: &DeviceMat, y: &DeviceMat) -> Result<()> {
        const OP: &str = "transpose";
        let (dx, dy) = (x.desc(), y.desc());
        expect_valid(OP, "x", &dx)?;
        expect_valid(OP, "y", &dy)?;
        expect_dtype(OP, "x", &dx, DType::Bf16)?;
        expect_dtype(OP, "y", &dy, DType::Bf16)?;
        expect_shape(OP, "y", &dy, dx.cols, dx.rows)?;
        expect_disjoint(OP, &dy, "x", &dx)?;
        if dx.is_empty() {
            return Ok(());
        }
        let (rows, cols) = (to_i32(OP, "rows", dx.rows)?, to_i32(OP, "cols", dx.cols)?);
        let (ldx, ldy) = (dx.ld as i64, dy.ld as i64);
        let mut l = self.launch(&self.ew.transpose);
        l.ptr(&dx.addr)
            .i64(&ldx)
            .ptr(&dy.addr)
            .i64(&ldy)
            .i32(&rows)
            .i32(&cols);
        // SAFETY: checked above: x [R, C] and y [C, R] bf16, disjoint.
        unsafe { l.run(transpose_dims(dx.rows, dx.cols)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desc::tests::bf;

    #[test]
    fn concat_cols_writes_into_a_column_range() {
        // Single block: u [L, 15360] = [attn (3072) | gelu(mlp) (12288)].
        let u = bf(0x1000_0000, 100, 15360, 15360);
        let attn_part = bf(u.addr, 100, 3072, 15360);
        let mlp_part = bf(u.addr + 3072 * 2, 100, 12288, 15360);
        let attn = bf(0x100, 100, 3072, 3072);
        assert!(check_unary("copy2d", &attn, DType::Bf16, &attn_part, DType::Bf16).is_ok());
        // gelu in place on the MLP columns of linear1's output, then copied.
        let h = bf(0x2000_0000, 100, 21504, 21504);
        let h_mlp = bf(h.addr + 9216 * 2, 100, 12288, 21504);
        assert!(check_unary("gelu", &h_mlp, DType::Bf16, &h_mlp, DType::Bf16).is_ok());
        assert!(check_unary("copy2d", &h_mlp, DType::Bf16, &mlp_part, DType::Bf16).is_ok());
        // Writing the attention columns into the MLP range of u would overlap the source.
        let shifted = bf(u.addr + 2, 100, 3072, 15360);
        assert!(check_unary("copy2d", &attn_part, DType::Bf16, &shifted, DType::Bf16).is_err());
    }

    #[test]
    fn grid_covers_rows_beyond_grid_y() {
        let d = dims_2d(100_000, 3072);
        assert_eq!(d.grid, (12, 65_535, 1));
        let d = dims_2d(1, 1);
        assert_eq!(d.grid, (1, 1, 1));
    }

    #[test]
    fn gate_residual_shapes() {
        let x = bf(0x100000, 8, 64, 64);
        let y = bf(0x200000, 8, 64, 64);
        let g = bf(0x1000, 1, 64, 64);
        assert!(check_gate_residual(&x, &g, &y).is_ok());
        assert!(check_gate_residual(&x, &bf(0x1000, 8, 64, 64), &y).is_err());
        assert!(check_gate_residual(&x, &g, &x).is_err()); // y = x
        assert!(check_gate_residual(&x, &g, &bf(0x200000, 8, 63, 64)).is_err());
    }

    #[test]
    fn binary_in_place_and_partial_overlap() {
        let a = bf(0x100000, 8, 64, 128);
        let b = bf(0x100000 + 128, 8, 64, 128); // the other half of each row
        assert!(check_binary("t", &a, &b, &a).is_ok());
        assert!(check_binary("t", &a, &b, &bf(0x100000 + 2, 8, 64, 128)).is_err());
    }

    #[test]
    fn gather_wants_i32_ids_and_a_matching_output() {
        let ids = MatDesc {
            addr: 0x100,
            rows: 1,
            cols: 77,
            ld: 77,
            dtype: DType::I32,
        };
        let table = bf(0x10000, 49408, 768, 768);
        let y = bf(0x4000_0000, 77, 768, 768);
        let (_, rows, cols, vocab) = check_gather(&ids, &table, &y).unwrap();
        assert_eq!((rows, cols, vocab), (77, 768, 49408));
        let ids_f32 = MatDesc {
            dtype: DType::F32,
            ..ids
        };
        assert!(check_gather(&ids_f32, &table, &y).is_err());
        assert!(check_gather(&ids, &table, &bf(0x4000_0000, 76, 768, 768)).is_err());
        let ids_2d = MatDesc {
            rows: 7,
            cols: 11,
            ld: 11,
            ..ids
        };
        assert!(check_gather(&ids_2d, &table, &y).is_err());
    }
}

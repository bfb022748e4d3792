//! Launchers of `cuda/fp8.cu`: an fp8 weight (e4m3fn or e5m2) with its per-tensor scale → bf16
//! (optionally times a per-row factor: the adaLN gate), and bf16 activations → e4m3 with a
//! per-tensor scale (the input of cuBLASLt's fp8 GEMM, [`crate::gemm::Gemm::linear_fp8`]).

use crate::desc::{
    blocks, expect_disjoint, expect_dtype, expect_shape, expect_valid, expect_vector, to_i32,
    DType, LaunchDims, MatDesc, MAX_GRID_Y,
};
use crate::error::{shape_err, Result};
use crate::gpu::DeviceMat;
use crate::launch::{Arg, Kernel, Loaded};
use crate::weights::DeviceWeight;
use crate::{function, Family, Kernels};
use cudarc::driver::CudaModule;
use std::sync::Arc;

pub const FAMILY: Family = Family {
    name: "fp8",
    source: include_str!("../cuda/fp8.cu"),
    kernels: &[
        Kernel {
            name: "fp8_e4m3_to_bf16",
            args: &[Arg::Ptr, Arg::I64, Arg::F32, Arg::Ptr],
        },
        Kernel {
            name: "fp8_e5m2_to_bf16",
            args: &[Arg::Ptr, Arg::I64, Arg::F32, Arg::Ptr],
        },
        Kernel {
            name: "fp8_e4m3_to_bf16_rows",
            args: ROWS_ARGS,
        },
        Kernel {
            name: "fp8_e5m2_to_bf16_rows",
            args: ROWS_ARGS,
        },
        Kernel {
            name: "amax_bf16",
            args: &[Arg::Ptr, Arg::I64, Arg::I32, Arg::I32, Arg::Ptr],
        },
        Kernel {
            name: "quantise_e4m3",
            args: &[
                Arg::Ptr,
                Arg::I64,
                Arg::I32,
                Arg::I32,
                Arg::Ptr,
                Arg::Ptr,
                Arg::I64,
                Arg::Ptr,
            ],
        },
    ],
};

/// `(in, n, cols, scale, g, out)` of the per-row dequantisations.
const ROWS_ARGS: &[Arg] = &[Arg::Ptr, Arg::I64, Arg::I32, Arg::F32, Arg::Ptr, Arg::Ptr];

/// Threads per block (`FP8_THREADS`).
pub const THREADS: u32 = 256;
/// Most blocks (grid-stride beyond): 64 per SM on a 132-SM H100 is plenty for a copy.
const MAX_BLOCKS: u32 = 8448;

pub(crate) struct Functions {
    e4m3: Loaded,
    e5m2: Loaded,
    e4m3_rows: Loaded,
    e5m2_rows: Loaded,
    amax: Loaded,
    quantise: Loaded,
}

impl Functions {
    pub(crate) fn resolve(m: &Arc<CudaModule>) -> Result<Functions> {
        Ok(Functions {
            e4m3: function(m, &FAMILY, "fp8_e4m3_to_bf16")?,
            e5m2: function(m, &FAMILY, "fp8_e5m2_to_bf16")?,
            e4m3_rows: function(m, &FAMILY, "fp8_e4m3_to_bf16_rows")?,
            e5m2_rows: function(m, &FAMILY, "fp8_e5m2_to_bf16_rows")?,
            amax: function(m, &FAMILY, "amax_bf16")?,
            quantise: function(m, &FAMILY, "quantise_e4m3")?,
        })
    }

    /// Every kernel of the family ([`Kernels::launch_counts`]).
    pub(crate) fn loaded(&self) -> Vec<&Loaded> {
        vec![
            &self.e4m3,
            &self.e5m2,
            &self.e4m3_rows,
            &self.e5m2_rows,
            &self.amax,
            &self.quantise,
        ]
    }
}

/// Checks a quantisation `y = e4m3(x / s)`: x bf16 and y e4m3 of one shape, disjoint, and
/// `scales` an f32 `[1, 2]` (amax workspace, then the scale) disjoint from both. Returns the grid
/// and the kernels' `(rows, cols)`.
pub fn check_quantise(
    op: &'static str,
    x: &MatDesc,
    y: &MatDesc,
    scales: &MatDesc,
) -> Result<(LaunchDims, i32, i32)> {
    for (what, m) in [("x", x), ("y", y), ("scales", scales)] {
        expect_valid(op, what, m)?;
    }
    expect_dtype(op, "x", x, DType::Bf16)?;
    expect_dtype(op, "y", y, DType::F8E4M3)?;
    expect_shape(op, "y", y, x.rows, x.cols)?;
    expect_dtype(op, "scales", scales, DType::F32)?;
    expect_vector(op, "scales", scales, 2)?;
    expect_disjoint(op, y, "x", x)?;
    expect_disjoint(op, scales, "x", x)?;
    expect_disjoint(op, scales, "y", y)?;
    Ok((
        quantise_dims(x.rows, x.cols),
        to_i32(op, "rows", x.rows)?,
        to_i32(op, "cols", x.cols)?,
    ))
}

/// Grid of the activation kernels: grid.y over rows, grid.x and the threads over columns.
pub fn quantise_dims(rows: usize, cols: usize) -> LaunchDims {
    LaunchDims::new(
        (
            blocks(cols, THREADS as usize, 64),
            blocks(rows, 1, MAX_GRID_Y),
            1,
        ),
        THREADS,
    )
}

/// Checks a dequantisation: `w` fp8 and `out` bf16 of one shape, both contiguous (the kernel
/// is flat), disjoint, and a finite scale. Returns the grid and the element count.
pub fn check(w: &MatDesc, scale: f32, out: &MatDesc) -> Result<(LaunchDims, i64)> {
    const OP: &str = "fp8_to_bf16";
    if !matches!(w.dtype, DType::F8E4M3 | DType::F8E5M2) {
        return Err(shape_err(OP, format!("weight {} is not fp8", w.show())));
    }
    expect_dtype(OP, "out", out, DType::Bf16)?;
    expect_shape(OP, "out", out, w.rows, w.cols)?;
    for (what, m) in [("weight", w), ("out", out)] {
        if m.rows > 1 && m.ld != m.cols {
            return Err(shape_err(
                OP,
                format!("{what} {} must be contiguous", m.show()),
            ));
        }
    }
    expect_disjoint(OP, out, "weight", w)?;
    if !scale.is_finite() {
        return Err(shape_err(OP, format!("scale {scale} is not finite")));
    }
    let n = w.rows * w.cols;
    Ok((
        LaunchDims::new((blocks(n, THREADS as usize, MAX_BLOCKS), 1, 1), THREADS),
        n as i64,
    ))
}

impl Kernels {
    /// `out = bf16(decode(w) · scale)` for every part of the fp8 weight `[out, in]` (each row
    /// range with its own scale) into a bf16 buffer of the same shape: a scratch region of the
    /// arena, right before the weight's GEMM. A bf16 weight is an error (use it directly).
    pub fn dequant_fp8(&self, w: &DeviceWeight, out: &DeviceMat) -> Result<()> {
        self.dequant_fp8_impl(w, None, out)
    }

    /// [`Kernels::dequant_fp8`] with row r of the output also multiplied by `g[r]` (bf16
    /// `[1, out]`): `out = bf16(decode(w) · scale · g[r])`. With the adaLN gate as `g`, a GEMM
    /// on this weight computes `gate ⊙ (x·Wᵀ)`.
    pub fn dequant_fp8_rows(&self, w: &DeviceWeight, g: &DeviceMat, out: &DeviceMat) -> Result<()> {
        self.dequant_fp8_impl(w, Some(g), out)
    }

    fn dequant_fp8_impl(
        &self,
        w: &DeviceWeight,
        g: Option<&DeviceMat>,
        out: &DeviceMat,
    ) -> Result<()> {
        let (dw, dout) = (w.data.desc(), out.desc());
        if let Some(g) = g {
            let dg = g.desc();
            expect_valid("fp8_to_bf16", "row factor", &dg)?;
            expect_dtype("fp8_to_bf16", "row factor", &dg, DType::Bf16)?;
            expect_vector("fp8_to_bf16", "row factor", &dg, dw.rows)?;
            expect_disjoint("fp8_to_bf16", &dout, "row factor", &dg)?;
        }
        // The whole weight first (shapes, types, contiguity, overlap), then each part.
        check(&dw, 1.0, &dout)?;
        let mut covered = 0;
        for (range, _) in &w.scales {
            if range.start != covered || range.end > dw.rows {
                return Err(shape_err(
                    "fp8_to_bf16",
                    format!(
                        "scale ranges {:?} do not tile the weight's {} rows",
                        w.scales, dw.rows
                    ),
                ));
            }
            covered = range.end;
        }
        if covered != dw.rows {
            return Err(shape_err(
                "fp8_to_bf16",
                format!("scale ranges {:?} leave rows uncovered", w.scales),
            ));
        }
        let e4m3 = dw.dtype == DType::F8E4M3;
        let func = match (e4m3, g.is_some()) {
            (true, false) => &self.fp8.e4m3,
            (false, false) => &self.fp8.e5m2,
            (true, true) => &self.fp8.e4m3_rows,
            (false, true) => &self.fp8.e5m2_rows,
        };
        let cols = to_i32("fp8_to_bf16", "cols", dw.cols)?;
        for (range, scale) in &w.scales {
            let (src, dst) = (
                w.data.rows_range(range.start, range.end)?.desc(),
                out.rows_range(range.start, range.end)?.desc(),
            );
            let (dims, n) = check(&src, *scale, &dst)?;
            if n == 0 {
                continue;
            }
            let mut l = self.launch(func);
            match g {
                None => {
                    l.ptr(&src.addr).i64(&n).f32(scale).ptr(&dst.addr);
                    // SAFETY: `check` verified n contiguous fp8 bytes in and n contiguous bf16
                    // out, disjoint (rows `range` of the weight and of the output).
                    unsafe { l.run(dims) }?;
                }
                Some(g) => {
                    let gr = g.cols_range(range.start, range.end)?.desc();
                    l.ptr(&src.addr)
                        .i64(&n)
                        .i32(&cols)
                        .f32(scale)
                        .ptr(&gr.addr)
                        .ptr(&dst.addr);
                    // SAFETY: as above, and g's elements [range] are a bf16 vector of the
                    // part's rows (n / cols of them), disjoint from the output.
                    unsafe { l.run(dims) }?;
                }
            }
        }
        Ok(())
    }

    /// `y = e4m3(x / s)` with the per-tensor `s = max|x| / 448` (round to nearest even,
    /// saturating): x bf16 `[L, K]`, y e4m3 `[L, K]`, `scales` f32 `[1, 2]`: `[0]` is the amax
    /// workspace (zeroed here), `[1]` receives `s`, for [`crate::gemm::Gemm::linear_fp8`].
    pub fn quantise_e4m3(&self, x: &DeviceMat, y: &DeviceMat, scales: &DeviceMat) -> Result<()> {
        const OP: &str = "quantise_e4m3";
        let (dx, dy, ds) = (x.desc(), y.desc(), scales.desc());
        let (dims, rows, cols) = check_quantise(OP, &dx, &dy, &ds)?;
        let amax = scales.cols_range(0, 1)?;
        self.gpu.fill_bytes(&amax, 0)?;
        let (amax_addr, scale_addr) = (ds.addr, ds.addr + 4);
        let (ldx, ldy) = (dx.ld as i64, dy.ld as i64);
        if !dx.is_empty() {
            let mut l = self.launch(&self.fp8.amax);
            l.ptr(&dx.addr)
                .i64(&ldx)
                .i32(&rows)
                .i32(&cols)
                .ptr(&amax_addr);
            // SAFETY: `check_quantise` verified x a bf16 [rows, cols] view and scales an f32
            // [1, 2] disjoint from it; the kernel reads x and updates scales[0] atomically.
            unsafe { l.run(dims) }?;
        }
        let mut l = self.launch(&self.fp8.quantise);
        l.ptr(&dx.addr)
            .i64(&ldx)
            .i32(&rows)
            .i32(&cols)
            .ptr(&amax_addr)
            .ptr(&dy.addr)
            .i64(&ldy)
            .ptr(&scale_addr);
        // SAFETY: as above, y an e4m3 [rows, cols] view disjoint from x and scales; the kernel
        // reads scales[0] and writes scales[1] (one thread) and y. Launched even when empty, so
        // scales[1] always holds a scale.
        unsafe { l.run(dims) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desc::tests::bf;

    fn f8(addr: u64, rows: usize, cols: usize) -> MatDesc {
        MatDesc {
            addr,
            rows,
            cols,
            ld: cols,
            dtype: DType::F8E4M3,
        }
    }

    #[test]
    fn linear1_weight_dequantises_into_a_scratch_buffer() {
        let w = f8(0x1000_0000, 21504, 3072);
        let out = bf(0x4000_0000, 21504, 3072, 3072);
        let (dims, n) = check(&w, 0.0123, &out).unwrap();
        assert_eq!(n, 21504 * 3072);
        assert_eq!(dims.grid.0, MAX_BLOCKS);
    }

    #[test]
    fn rejects_non_fp8_strided_and_bad_scale() {
        let w = f8(0x1000_0000, 4, 8);
        let out = bf(0x4000_0000, 4, 8, 8);
        assert!(check(&bf(0x1000_0000, 4, 8, 8), 1.0, &out).is_err());
        assert!(check(&w, 1.0, &bf(0x4000_0000, 4, 8, 16)).is_err());
        assert!(check(&w, f32::INFINITY, &out).is_err());
        assert!(check(&w, 1.0, &bf(0x4000_0000, 4, 9, 9)).is_err());
        assert!(check(&w, 1.0, &bf(0x1000_0000, 4, 8, 8)).is_err()); // overlaps
    }
}

//! Launcher of `cuda/fp8.cu`: an fp8 weight (e4m3fn or e5m2) with its per-tensor scale → bf16.

use crate::desc::{
    blocks, expect_disjoint, expect_dtype, expect_shape, DType, LaunchDims, MatDesc,
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
    ],
};

/// Threads per block (`FP8_THREADS`).
pub const THREADS: u32 = 256;
/// Most blocks (grid-stride beyond): 64 per SM on a 132-SM H100 is plenty for a copy.
const MAX_BLOCKS: u32 = 8448;

pub(crate) struct Functions {
    e4m3: Loaded,
    e5m2: Loaded,
}

impl Functions {
    pub(crate) fn resolve(m: &Arc<CudaModule>) -> Result<Functions> {
        Ok(Functions {
            e4m3: function(m, &FAMILY, "fp8_e4m3_to_bf16")?,
            e5m2: function(m, &FAMILY, "fp8_e5m2_to_bf16")?,
        })
    }

    /// Every kernel of the family ([`Kernels::launch_counts`]).
    pub(crate) fn loaded(&self) -> Vec<&Loaded> {
        vec![&self.e4m3, &self.e5m2]
    }
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
        let (dw, dout) = (w.data.desc(), out.desc());
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
        let func = if dw.dtype == DType::F8E4M3 {
            &self.fp8.e4m3
        } else {
            &self.fp8.e5m2
        };
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
            l.ptr(&src.addr).i64(&n).f32(scale).ptr(&dst.addr);
            // SAFETY: `check` verified n contiguous fp8 bytes in and n contiguous bf16 out,
            // disjoint (rows `range` of the weight and of the output).
            unsafe { l.run(dims) }?;
        }
        Ok(())
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

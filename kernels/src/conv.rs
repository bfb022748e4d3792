//! Launchers of `cuda/conv.cu`: im2col for the VAE's convolutions (channels-last `[H·W, C]`, the
//! layout of the engine's `EncoderBackend`) and the nearest ×2 upsample. A kh×kw convolution is
//! `im2col` then `Gemm::linear(col, W, bias)` with the weight permuted by
//! [`crate::weights::conv_weight_khwc`]; a 1×1 stride-1 convolution is the GEMM alone.

use crate::desc::{
    blocks, expect_disjoint, expect_dtype, expect_shape, expect_valid, to_i32, DType, LaunchDims,
    MatDesc, MAX_GRID_Y,
};
use crate::error::{shape_err, Result};
use crate::gpu::DeviceMat;
use crate::launch::{Arg, Kernel, Loaded};
use crate::{function, Family, Kernels};
use cudarc::driver::CudaModule;
use std::sync::Arc;

pub const FAMILY: Family = Family {
    name: "conv",
    source: include_str!("../cuda/conv.cu"),
    kernels: &[
        Kernel {
            name: "im2col",
            // x, H, W, C, kh, kw, stride, pad_top, pad_left, Wo, p0, np, col, ldcol
            args: &[
                Arg::Ptr,
                Arg::I32,
                Arg::I32,
                Arg::I32,
                Arg::I32,
                Arg::I32,
                Arg::I32,
                Arg::I32,
                Arg::I32,
                Arg::I32,
                Arg::I32,
                Arg::I32,
                Arg::Ptr,
                Arg::I64,
            ],
        },
        Kernel {
            name: "upsample_nearest2x",
            args: &[Arg::Ptr, Arg::I32, Arg::I32, Arg::I32, Arg::Ptr],
        },
    ],
};

/// Threads per block (`CONV_THREADS`).
pub const THREADS: u32 = 256;

pub(crate) struct Functions {
    im2col: Loaded,
    upsample: Loaded,
}

impl Functions {
    pub(crate) fn resolve(m: &Arc<CudaModule>) -> Result<Functions> {
        Ok(Functions {
            im2col: function(m, &FAMILY, "im2col")?,
            upsample: function(m, &FAMILY, "upsample_nearest2x")?,
        })
    }

    /// Every kernel of the family ([`Kernels::launch_counts`]).
    pub(crate) fn loaded(&self) -> Vec<&Loaded> {
        vec![&self.im2col, &self.upsample]
    }
}

/// A convolution's geometry on an `h × w` input (batch 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub h: usize,
    pub w: usize,
    /// Kernel height and width.
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub pad_bottom: usize,
    pub pad_right: usize,
}

impl ConvGeometry {
    /// 3×3, stride 1, padding 1 (ResnetBlock conv1/conv2, conv_in/out, Upsample's conv).
    pub fn same3x3(h: usize, w: usize) -> ConvGeometry {
        ConvGeometry {
            h,
            w,
            kh: 3,
            kw: 3,
            stride: 1,
            pad_top: 1,
            pad_left: 1,
            pad_bottom: 1,
            pad_right: 1,
        }
    }

    /// BFL Downsample: pad right and bottom by one, 3×3 stride 2, no other padding (spec 4.2).
    pub fn downsample(h: usize, w: usize) -> ConvGeometry {
        ConvGeometry {
            h,
            w,
            kh: 3,
            kw: 3,
            stride: 2,
            pad_top: 0,
            pad_left: 0,
            pad_bottom: 1,
            pad_right: 1,
        }
    }

    /// Output height: `⌊(h + pad_top + pad_bottom − kh) / stride⌋ + 1` (PyTorch's formula, the
    /// engine's `conv_out_hw`).
    pub fn out_h(&self) -> usize {
        (self.h + self.pad_top + self.pad_bottom).saturating_sub(self.kh) / self.stride.max(1) + 1
    }

    /// Output width, likewise.
    pub fn out_w(&self) -> usize {
        (self.w + self.pad_left + self.pad_right).saturating_sub(self.kw) / self.stride.max(1) + 1
    }

    /// Columns of the im2col matrix (the GEMM's K): `kh·kw·C`.
    pub fn col_width(&self, channels: usize) -> usize {
        self.kh * self.kw * channels
    }

    fn check(&self) -> Result<()> {
        let ok = self.kh >= 1
            && self.kw >= 1
            && self.stride >= 1
            && self.pad_top < self.kh
            && self.pad_bottom < self.kh
            && self.pad_left < self.kw
            && self.pad_right < self.kw
            && self.h + self.pad_top + self.pad_bottom >= self.kh
            && self.w + self.pad_left + self.pad_right >= self.kw;
        if !ok {
            return Err(shape_err(
                "im2col",
                format!("unsupported geometry {self:?}"),
            ));
        }
        Ok(())
    }
}

/// A validated im2col launch and its `int` arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Im2col {
    pub dims: LaunchDims,
    /// H, W, C, kh, kw, stride, pad_top, pad_left, Wo, p0, np.
    pub args: [i32; 11],
}

/// Checks im2col of output pixels `[p0, p0 + col.rows)`: x bf16 `[h·w, C]` contiguous, col bf16
/// `[np, kh·kw·C]`, disjoint.
pub fn check_im2col(x: &MatDesc, g: &ConvGeometry, p0: usize, col: &MatDesc) -> Result<Im2col> {
    const OP: &str = "im2col";
    g.check()?;
    expect_valid(OP, "x", x)?;
    expect_valid(OP, "col", col)?;
    expect_dtype(OP, "x", x, DType::Bf16)?;
    expect_dtype(OP, "col", col, DType::Bf16)?;
    if x.rows != g.h * g.w || (x.rows > 1 && x.ld != x.cols) {
        return Err(shape_err(
            OP,
            format!(
                "x {} is not a contiguous {}×{} channels-last map",
                x.show(),
                g.h,
                g.w
            ),
        ));
    }
    let c = x.cols;
    let pixels = g.out_h() * g.out_w();
    if col.cols != g.col_width(c) || p0 + col.rows > pixels {
        return Err(shape_err(
            OP,
            format!(
                "col {} must be [np, {}] for output pixels [{p0}, {p0} + np) of {pixels}",
                col.show(),
                g.col_width(c)
            ),
        ));
    }
    expect_disjoint(OP, col, "x", x)?;
    let i = |what, v| to_i32(OP, what, v);
    i("pixels", pixels)?;
    i("columns", col.cols)?;
    Ok(Im2col {
        dims: LaunchDims::new(
            (
                blocks(col.cols, THREADS as usize, 64),
                blocks(col.rows, 1, MAX_GRID_Y),
                1,
            ),
            THREADS,
        ),
        args: [
            i("H", g.h)?,
            i("W", g.w)?,
            i("C", c)?,
            i("kh", g.kh)?,
            i("kw", g.kw)?,
            i("stride", g.stride)?,
            i("pad_top", g.pad_top)?,
            i("pad_left", g.pad_left)?,
            i("Wo", g.out_w())?,
            i("p0", p0)?,
            i("np", col.rows)?,
        ],
    })
}

/// Checks the upsample: x bf16 `[h·w, C]`, y bf16 `[4·h·w, C]`, both contiguous, disjoint.
pub fn check_upsample(
    x: &MatDesc,
    h: usize,
    w: usize,
    y: &MatDesc,
) -> Result<(LaunchDims, [i32; 3])> {
    const OP: &str = "upsample_nearest2x";
    expect_valid(OP, "x", x)?;
    expect_valid(OP, "y", y)?;
    expect_dtype(OP, "x", x, DType::Bf16)?;
    expect_dtype(OP, "y", y, DType::Bf16)?;
    expect_shape(OP, "x", x, h * w, x.cols)?;
    expect_shape(OP, "y", y, 4 * h * w, x.cols)?;
    for (what, m) in [("x", x), ("y", y)] {
        if m.rows > 1 && m.ld != m.cols {
            return Err(shape_err(
                OP,
                format!("{what} {} must be contiguous", m.show()),
            ));
        }
    }
    expect_disjoint(OP, y, "x", x)?;
    to_i32(OP, "output pixels", 4 * h * w)?;
    Ok((
        LaunchDims::new(
            (
                blocks(x.cols, THREADS as usize, 64),
                blocks(4 * h * w, 1, MAX_GRID_Y),
                1,
            ),
            THREADS,
        ),
        [
            to_i32(OP, "H", h)?,
            to_i32(OP, "W", w)?,
            to_i32(OP, "C", x.cols)?,
        ],
    ))
}

impl Kernels {
    /// im2col of output pixels `[p0, p0 + col.rows)` of the convolution `g` over the
    /// channels-last map `x [h·w, C]` into `col [np, kh·kw·C]` (column `(ky·kw + kx)·C + ci`).
    pub fn im2col(
        &self,
        x: &DeviceMat,
        g: &ConvGeometry,
        p0: usize,
        col: &DeviceMat,
    ) -> Result<()> {
        let (dx, dc) = (x.desc(), col.desc());
        let plan = check_im2col(&dx, g, p0, &dc)?;
        if dc.is_empty() {
            return Ok(());
        }
        let ldcol = dc.ld as i64;
        let mut l = self.launch(&self.conv.im2col);
        l.ptr(&dx.addr);
        for v in &plan.args {
            l.i32(v);
        }
        l.ptr(&dc.addr).i64(&ldcol);
        // SAFETY: `check_im2col` verified x is a contiguous [H·W, C] bf16 map (the kernel reads
        // only inside it: out-of-image taps are zeros), col is [np, kh·kw·C] bf16 with its own
        // row stride and disjoint from x, and p0 + np ≤ Ho·Wo.
        unsafe { l.run(plan.dims) }
    }

    /// Nearest-neighbour ×2: x `[h·w, C]` → y `[2h·2w, C]`, channels-last bf16.
    pub fn upsample_nearest2x(
        &self,
        x: &DeviceMat,
        h: usize,
        w: usize,
        y: &DeviceMat,
    ) -> Result<()> {
        let (dx, dy) = (x.desc(), y.desc());
        let (dims, [hi, wi, ci]) = check_upsample(&dx, h, w, &dy)?;
        if dx.is_empty() {
            return Ok(());
        }
        let mut l = self.launch(&self.conv.upsample);
        l.ptr(&dx.addr).i32(&hi).i32(&wi).i32(&ci).ptr(&dy.addr);
        // SAFETY: `check_upsample` verified contiguous [h·w, C] in and [4·h·w, C] out, disjoint.
        unsafe { l.run(dims) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desc::tests::bf;

    #[test]
    fn output_sizes_follow_pytorch() {
        assert_eq!(ConvGeometry::same3x3(64, 48).out_h(), 64);
        assert_eq!(ConvGeometry::same3x3(64, 48).out_w(), 48);
        // Downsample: pad (0, 1, 0, 1) then 3×3 stride 2: H → H/2 for even H, and
        // ⌊(H + 1 − 3)/2⌋ + 1 for odd H.
        assert_eq!(ConvGeometry::downsample(1024, 1024).out_h(), 512);
        assert_eq!(ConvGeometry::downsample(7, 9).out_h(), 3);
        assert_eq!(ConvGeometry::downsample(7, 9).out_w(), 4);
    }

    /// The kernel's index arithmetic, in Rust, on a tiny map: every column of every output
    /// pixel reads the input tap the reference convolution uses (or zero in the padding).
    #[test]
    fn im2col_index_math_matches_the_definition() {
        let wide = ConvGeometry {
            kh: 1,
            kw: 3,
            pad_top: 0,
            pad_bottom: 0,
            ..ConvGeometry::same3x3(3, 5)
        };
        for g in [
            ConvGeometry::same3x3(3, 4),
            ConvGeometry::downsample(5, 4),
            wide,
        ] {
            let c = 2;
            let x = |y: usize, xx: usize, ci: usize| (100 * y + 10 * xx + ci) as f32 + 1.0;
            let (ho, wo) = (g.out_h(), g.out_w());
            for p in 0..ho * wo {
                let (oy, ox) = (p / wo, p % wo);
                for j in 0..g.col_width(c) {
                    // conv.cu's arithmetic.
                    let kk = j / c;
                    let ci = j % c;
                    let (ky, kx) = (kk / g.kw, kk % g.kw);
                    let iy = (oy * g.stride + ky) as isize - g.pad_top as isize;
                    let ix = (ox * g.stride + kx) as isize - g.pad_left as isize;
                    let got = if iy >= 0 && (iy as usize) < g.h && ix >= 0 && (ix as usize) < g.w {
                        x(iy as usize, ix as usize, ci)
                    } else {
                        0.0
                    };
                    // The definition: zero-padded input, window at (oy·s, ox·s) in padded
                    // coordinates.
                    let (py, px) = (oy * g.stride + ky, ox * g.stride + kx);
                    assert!(
                        py < g.h + g.pad_top + g.pad_bottom && px < g.w + g.pad_left + g.pad_right
                    );
                    let inside = py >= g.pad_top
                        && py < g.pad_top + g.h
                        && px >= g.pad_left
                        && px < g.pad_left + g.w;
                    let want = if inside {
                        x(py - g.pad_top, px - g.pad_left, ci)
                    } else {
                        0.0
                    };
                    assert_eq!(got, want, "{g:?} p {p} j {j}");
                }
            }
        }
    }

    #[test]
    fn im2col_checks_shapes() {
        let g = ConvGeometry::same3x3(8, 8);
        let x = bf(0x100000, 64, 16, 16);
        let col = bf(0x200000, 64, 144, 144);
        let p = check_im2col(&x, &g, 0, &col).unwrap();
        assert_eq!(p.args, [8, 8, 16, 3, 3, 1, 1, 1, 8, 0, 64]);
        // A window of pixels [32, 64).
        assert!(check_im2col(&x, &g, 32, &bf(0x200000, 32, 144, 144)).is_ok());
        assert!(check_im2col(&x, &g, 33, &bf(0x200000, 32, 144, 144)).is_err());
        assert!(check_im2col(&x, &g, 0, &bf(0x200000, 64, 143, 143)).is_err());
        assert!(check_im2col(&bf(0x100000, 63, 16, 16), &g, 0, &col).is_err());
        let bad = ConvGeometry { stride: 0, ..g };
        assert!(check_im2col(&x, &bad, 0, &col).is_err());
    }

    #[test]
    fn upsample_shapes() {
        let x = bf(0x100000, 16, 8, 8);
        assert!(check_upsample(&x, 4, 4, &bf(0x200000, 64, 8, 8)).is_ok());
        assert!(check_upsample(&x, 4, 4, &bf(0x200000, 63, 8, 8)).is_err());
        assert!(check_upsample(&x, 4, 4, &bf(0x200000, 64, 8, 16)).is_err());
    }
}

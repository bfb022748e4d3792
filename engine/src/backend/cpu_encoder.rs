//! The CPU reference of [`EncoderBackend`]: the autoencoder's and the text encoders' ops in f32.
//!
//! Same rules as [`crate::cpu`]: plain loops in f32 with f64 reductions (norm statistics, softmax
//! sums), rayon over rows or pixels, and `matrixmultiply::sgemm` (threaded itself) called only
//! from the calling thread, never inside a rayon loop.
//!
//! Convolution is im2col + GEMM over `[H·W, C]` maps: for a band of output rows, gather each output
//! pixel's `kh·kw` input pixels (each a contiguous `Cin` slice, zeros outside the padded border)
//! into a column matrix `[pixels, kh·kw·Cin]`, then multiply by the weight reordered to
//! `[Cout, kh·kw·Cin]`. Why this form: it is obviously right (the gather is the definition of the
//! convolution's index arithmetic, the product is one sgemm), it runs at sgemm speed on the CPU,
//! and it is the same decomposition the CUDA `conv` kernel uses as an *implicit* GEMM — there the
//! gather happens while loading the A tile into shared memory, so the `kh·kw`-times larger column
//! matrix never exists and the tensor cores see one GEMM with `K = 9·Cin` (1152 – 4608 for the
//! Flux autoencoder, deep enough to run near peak). A direct convolution kernel would only win
//! for the 3-channel `conv_in` / `conv_out`, which are < 1 % of the autoencoder's FLOPs. On the
//! CPU the band keeps the column matrix ≤ 32 MB (the decoder's last level at 1024² would need
//! 4.6 GB at once).

use crate::backend::Backend;
use crate::cpu::{
    attention_blocked, gemm, layer_norm_row, map, rms_norm_in_place, CpuBackend, CpuTensor,
};
use crate::encoder_backend::{
    check_gate_input, check_groups, check_map, check_vector, conv2d_out_hw, conv_shape,
    EncoderBackend, Pad,
};
use crate::error::Result;
use crate::layers::{gelu_tanh, silu};
use crate::weights::HostWeight;
use rayon::prelude::*;

/// A convolution on the CPU. The weight is reordered at load to `[Cout, kh·kw·Cin]` with the
/// reduction index `(ky·kw + kx)·Cin + ci`, matching the im2col columns.
#[derive(Debug, Clone)]
pub struct CpuConv {
    /// Output channels.
    pub cout: usize,
    /// Input channels.
    pub cin: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// `[Cout, kh·kw·Cin]` row-major.
    pub weight: Vec<f32>,
    /// `[Cout]`.
    pub bias: Option<Vec<f32>>,
}

/// Largest im2col band, in floats (32 MB).
const COL_BAND_FLOATS: usize = 1 << 23;
/// Rows per GroupNorm statistics band.
const GN_BAND_ROWS: usize = 1024;
/// Query rows per block of `attention_masked` (the transformer's `attention` in [`crate::cpu`]
/// uses 512).
const ATTN_BLOCK: usize = 256;

/// Fills `col [pixels, kh·kw·Cin]` for output rows `oy0 .. oy0 + col.len()/(Wo·K)`.
#[allow(clippy::too_many_arguments)]
fn im2col_band(
    x: &[f32],
    (h, w, cin): (usize, usize, usize),
    (kh, kw): (usize, usize),
    stride: usize,
    pad: Pad,
    wo: usize,
    oy0: usize,
    col: &mut [f32],
) {
    let k = kh * kw * cin;
    col.par_chunks_mut(k).enumerate().for_each(|(p, row)| {
        let (oy, ox) = (oy0 + p / wo, p % wo);
        for ky in 0..kh {
            for kx in 0..kw {
                let dst = &mut row[(ky * kw + kx) * cin..][..cin];
                // Input coordinates in the padded frame, then shifted back by the padding.
                let (py, px) = (oy * stride + ky, ox * stride + kx);
                let inside =
                    py >= pad.top && py - pad.top < h && px >= pad.left && px - pad.left < w;
                if inside {
                    let src = ((py - pad.top) * w + (px - pad.left)) * cin;
                    dst.copy_from_slice(&x[src..src + cin]);
                } else {
                    dst.fill(0.0);
                }
            }
        }
    });
}

impl EncoderBackend for CpuBackend {
    type Conv = CpuConv;

    fn load_conv(
        &self,
        key: &str,
        weight: HostWeight,
        bias: Option<HostWeight>,
    ) -> Result<CpuConv> {
        let (cout, cin, kh, kw) = conv_shape(key, &weight, bias.as_ref())?;
        // [Cout, Cin, kh, kw] → [Cout, kh, kw, Cin]
        let mut w = vec![0f32; weight.data.len()];
        for o in 0..cout {
            for i in 0..cin {
                for ky in 0..kh {
                    for kx in 0..kw {
                        w[((o * kh + ky) * kw + kx) * cin + i] =
                            weight.data[((o * cin + i) * kh + ky) * kw + kx];
                    }
                }
            }
        }
        Ok(CpuConv {
            cout,
            cin,
            kh,
            kw,
            weight: w,
            bias: bias.map(|b| b.data),
        })
    }

    fn conv_dims(&self, c: &CpuConv) -> (usize, usize, usize, usize) {
        (c.cout, c.cin, c.kh, c.kw)
    }

    fn conv2d(
        &self,
        x: &CpuTensor,
        (h, w): (usize, usize),
        conv: &CpuConv,
        stride: usize,
        pad: Pad,
    ) -> Result<(CpuTensor, (usize, usize))> {
        let (ho, wo) = conv2d_out_hw(self.dims(x), (h, w), self.conv_dims(conv), stride, pad)?;
        let (k, n) = (conv.kh * conv.kw * conv.cin, conv.cout);
        let mut y = CpuTensor::zeros(ho * wo, n);
        if let Some(b) = &conv.bias {
            y.data
                .par_chunks_mut(n.max(1))
                .for_each(|r| r.copy_from_slice(b));
        }
        let beta = if conv.bias.is_some() { 1.0 } else { 0.0 };
        if ho * wo == 0 || n == 0 {
            return Ok((y, (ho, wo)));
        }
        let band_rows = (COL_BAND_FLOATS / (wo * k).max(1)).clamp(1, ho);
        let mut col = vec![0f32; band_rows * wo * k];
        for oy0 in (0..ho).step_by(band_rows) {
            let rows = band_rows.min(ho - oy0);
            let pixels = rows * wo;
            let col = &mut col[..pixels * k];
            im2col_band(
                &x.data,
                (h, w, conv.cin),
                (conv.kh, conv.kw),
                stride,
                pad,
                wo,
                oy0,
                col,
            );
            // y[band] [pixels, Cout] (+)= col [pixels, K] · Wᵀ, Wᵀ read from W [Cout, K].
            gemm(
                (pixels, k, n),
                1.0,
                (col, k, 1),
                (&conv.weight, 1, k),
                beta,
                (&mut y.data[oy0 * wo * n..], n, 1),
            );
        }
        Ok((y, (ho, wo)))
    }

    fn group_norm(
        &self,
        x: &CpuTensor,
        groups: usize,
        weight: &Vec<f32>,
        bias: &Vec<f32>,
        eps: f32,
        act: bool,
    ) -> Result<CpuTensor> {
        let c = x.cols;
        check_groups(c, groups)?;
        check_vector("group_norm", "weight", weight.len(), c)?;
        check_vector("group_norm", "bias", bias.len(), c)?;
        let mut y = CpuTensor::zeros(x.rows, c);
        if x.rows == 0 || c == 0 {
            return Ok(y);
        }
        let cg = c / groups;
        let count = (x.rows * cg) as f64;
        // Per-group sums of f(channel, value) in f64: each band of rows sums on its own, then the
        // bands are added in order (deterministic, whatever rayon's scheduling).
        let group_sums = |f: &(dyn Fn(usize, f32) -> f64 + Sync)| -> Vec<f64> {
            let bands: Vec<Vec<f64>> = x
                .data
                .par_chunks(c * GN_BAND_ROWS)
                .map(|band| {
                    let mut acc = vec![0f64; groups];
                    for row in band.chunks_exact(c) {
                        for (i, &v) in row.iter().enumerate() {
                            acc[i / cg] += f(i, v);
                        }
                    }
                    acc
                })
                .collect();
            bands.iter().fold(vec![0f64; groups], |mut t, b| {
                t.iter_mut().zip(b).for_each(|(t, b)| *t += b);
                t
            })
        };
        // Two passes: the mean, then the mean squared deviation from it.
        let mean: Vec<f64> = group_sums(&|_, v| v as f64)
            .iter()
            .map(|s| s / count)
            .collect();
        let var = group_sums(&|i, v| (v as f64 - mean[i / cg]).powi(2));
        let stats: Vec<(f32, f32)> = mean
            .iter()
            .zip(&var)
            .map(|(&m, &v)| (m as f32, (1.0 / (v / count + eps as f64).sqrt()) as f32))
            .collect();
        y.data
            .par_chunks_mut(c)
            .zip(x.data.par_chunks(c))
            .for_each(|(y, x)| {
                for i in 0..c {
                    let (mean, rstd) = stats[i / cg];
                    let v = (x[i] - mean) * rstd * weight[i] + bias[i];
                    y[i] = if act { silu(v) } else { v };
                }
            });
        Ok(y)
    }

    fn upsample_nearest2x(&self, x: &CpuTensor, (h, w): (usize, usize)) -> Result<CpuTensor> {
        check_map("upsample_nearest2x", self.dims(x), (h, w))?;
        let c = x.cols;
        let mut y = CpuTensor::zeros(4 * h * w, c);
        if c == 0 {
            return Ok(y);
        }
        y.data.par_chunks_mut(c).enumerate().for_each(|(p, dst)| {
            let (oy, ox) = (p / (2 * w), p % (2 * w));
            let src = ((oy / 2) * w + ox / 2) * c;
            dst.copy_from_slice(&x.data[src..src + c]);
        });
        Ok(y)
    }

    fn layer_norm(
        &self,
        x: &CpuTensor,
        weight: &Vec<f32>,
        bias: &Vec<f32>,
        eps: f32,
    ) -> Result<CpuTensor> {
        let d = x.cols;
        check_vector("layer_norm", "weight", weight.len(), d)?;
        check_vector("layer_norm", "bias", bias.len(), d)?;
        let mut y = CpuTensor::zeros(x.rows, d);
        if d == 0 {
            return Ok(y);
        }
        y.data
            .par_chunks_mut(d)
            .zip(x.data.par_chunks(d))
            .for_each(|(y, x)| {
                layer_norm_row(x, y, eps);
                for ((y, w), b) in y.iter_mut().zip(weight).zip(bias) {
                    *y = *y * w + b;
                }
            });
        Ok(y)
    }

    fn rms_norm(&self, x: &CpuTensor, weight: &Vec<f32>, eps: f32) -> Result<CpuTensor> {
        let d = x.cols;
        check_vector("rms_norm", "weight", weight.len(), d)?;
        let mut y = x.clone();
        if d == 0 {
            return Ok(y);
        }
        y.data
            .par_chunks_mut(d)
            .for_each(|y| rms_norm_in_place(y, weight, eps));
        Ok(y)
    }

    fn attention_masked(
        &self,
        qkv: &CpuTensor,
        num_heads: usize,
        head_dim: usize,
        scale: f32,
        bias: Option<&CpuTensor>,
        causal: bool,
    ) -> Result<CpuTensor> {
        attention_blocked(
            "attention_masked",
            qkv,
            (num_heads, head_dim),
            scale,
            bias,
            causal,
            ATTN_BLOCK,
        )
    }

    fn gelu_tanh_gate(&self, x: &CpuTensor) -> Result<CpuTensor> {
        check_gate_input(self.dims(x))?;
        let f = x.cols / 2;
        let mut y = CpuTensor::zeros(x.rows, f);
        if f == 0 {
            return Ok(y);
        }
        y.data
            .par_chunks_mut(f)
            .zip(x.data.par_chunks(2 * f))
            .for_each(|(y, x)| {
                for i in 0..f {
                    y[i] = gelu_tanh(x[i]) * x[f + i];
                }
            });
        Ok(y)
    }

    fn quick_gelu(&self, x: &CpuTensor) -> Result<CpuTensor> {
        Ok(map(x, quick_gelu))
    }

    fn affine(&self, x: &CpuTensor, mul: f32, add: f32) -> Result<CpuTensor> {
        Ok(map(x, |v| v * mul + add))
    }
}

/// `quick_gelu(x) = x·σ(1.702·x)` (CLIP's activation).
pub fn quick_gelu(x: f32) -> f32 {
    x / (1.0 + (-1.702 * x).exp())
}

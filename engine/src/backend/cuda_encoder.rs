//! The CUDA side of [`EncoderBackend`]: the autoencoder's and the text encoders' ops on the GPU,
//! with the numerics and memory rules of [`crate::cuda`].
//!
//! A convolution is im2col (`conv.cu`) + one cuBLASLt GEMM with the bias in the epilogue, over
//! windows of output pixels so the column buffer stays bounded ([`crate::cuda`]'s
//! `CONV_COL_BYTES`); a 1×1 stride-1 convolution is the GEMM alone. The weight is permuted once at
//! load to `[Cout, kh·kw·Cin]`, the im2col column order (`kontext_kernels::weights::conv_weight_khwc`).

use crate::backend::Backend;
use crate::cuda::{CudaBackend, CudaTensor, CudaVector};
use crate::encoder_backend::{
    check_gate_input, check_groups, check_map, check_vector, conv2d_out_hw, conv_shape,
    EncoderBackend, Pad,
};
use crate::error::{shape_err, Result};
use crate::weights::HostWeight;
use kontext_kernels::conv::ConvGeometry;
use kontext_kernels::elementwise::Unary;
use kontext_kernels::weights::conv_weight_khwc;
use kontext_kernels::{DType, DeviceMat};

/// Largest im2col buffer of one convolution window (bf16 `[pixels, kh·kw·Cin]`): 256 MiB. The
/// decoder's last level at 1024² (128 channels, K = 1152) would need 2.4 GB at once; windows of
/// 116 k pixels keep each GEMM large.
pub const CONV_COL_BYTES: usize = 256 << 20;

/// A convolution on the GPU: weight bf16 `[Cout, kh·kw·Cin]` (im2col order), bias bf16
/// `[1, Cout]`.
pub struct CudaConv {
    /// Output channels.
    pub cout: usize,
    /// Input channels.
    pub cin: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    weight: Option<DeviceMat>,
    bias: Option<DeviceMat>,
}

impl CudaConv {
    fn weight(&self) -> Result<&DeviceMat> {
        self.weight
            .as_ref()
            .ok_or_else(|| shape_err("conv2d", "internal: a planner's weight reached a launch"))
    }
}

/// Output pixels per im2col window for a column width of `k` elements.
pub(crate) fn conv_window(pixels: usize, k: usize) -> usize {
    (CONV_COL_BYTES / (2 * k).max(1)).clamp(1, pixels.max(1))
}

impl EncoderBackend for CudaBackend {
    type Conv = CudaConv;

    fn load_conv(
        &self,
        key: &str,
        weight: HostWeight,
        bias: Option<HostWeight>,
    ) -> Result<CudaConv> {
        let (cout, cin, kh, kw) = conv_shape(key, &weight, bias.as_ref())?;
        self.count_device((cout * kh * kw * cin + bias.as_ref().map_or(0, |_| cout)) * 2);
        let (w, b) = match self.gpu() {
            Some(gpu) => {
                let khwc = conv_weight_khwc(&weight.data, cout, cin, kh, kw)?;
                let w = gpu.upload_bf16(&khwc, cout, kh * kw * cin)?;
                let b = match &bias {
                    Some(b) => Some(gpu.upload_bf16(&b.data, 1, cout)?),
                    None => None,
                };
                (Some(w), b)
            }
            None => (None, None),
        };
        Ok(CudaConv {
            cout,
            cin,
            kh,
            kw,
            weight: w,
            bias: b,
        })
    }

    fn conv_dims(&self, c: &CudaConv) -> (usize, usize, usize, usize) {
        (c.cout, c.cin, c.kh, c.kw)
    }

    fn conv2d(
        &self,
        x: &CudaTensor,
        (h, w): (usize, usize),
        conv: &CudaConv,
        stride: usize,
        pad: Pad,
    ) -> Result<(CudaTensor, (usize, usize))> {
        let (ho, wo) = conv2d_out_hw(self.dims(x), (h, w), self.conv_dims(conv), stride, pad)?;
        if pad.top >= conv.kh
            || pad.bottom >= conv.kh
            || pad.left >= conv.kw
            || pad.right >= conv.kw
            || conv.cin == 0
        {
            return Err(shape_err(
                "conv2d",
                format!(
                    "padding {pad:?} of a {}×{} kernel over {} channels is not supported on CUDA \
                     (each side's padding must be smaller than the kernel)",
                    conv.kh, conv.kw, conv.cin
                ),
            ));
        }
        let x = self.bf16(x, "conv2d")?;
        let (pixels, n, k) = (ho * wo, conv.cout, conv.kh * conv.kw * conv.cin);
        let y = self.tensor(DType::Bf16, pixels, n, "conv2d")?;
        if pixels == 0 || n == 0 {
            return Ok((y, (ho, wo)));
        }
        let pointwise = conv.kh == 1 && conv.kw == 1 && stride == 1 && pad == Pad::same(0);
        if pointwise {
            self.launch(|d| {
                Ok(d.gemm
                    .linear(x.mat()?, conv.weight()?, conv.bias.as_ref(), y.mat()?)?)
            })?;
            return Ok((y, (ho, wo)));
        }
        let g = ConvGeometry {
            h,
            w,
            kh: conv.kh,
            kw: conv.kw,
            stride,
            pad_top: pad.top,
            pad_left: pad.left,
            pad_bottom: pad.bottom,
            pad_right: pad.right,
        };
        let window = conv_window(pixels, k);
        let col = self.tensor(DType::Bf16, window, k, "conv2d im2col")?;
        self.launch(|d| {
            let (xm, ym, cm, wm) = (x.mat()?, y.mat()?, col.mat()?, conv.weight()?);
            for p0 in (0..pixels).step_by(window) {
                let np = window.min(pixels - p0);
                let c = cm.rows_range(0, np)?;
                d.k.im2col(xm, &g, p0, &c)?; // [np, K]
                d.gemm
                    .linear(&c, wm, conv.bias.as_ref(), &ym.rows_range(p0, p0 + np)?)?;
            }
            Ok(())
        })?;
        Ok((y, (ho, wo)))
    }

    fn group_norm(
        &self,
        x: &CudaTensor,
        groups: usize,
        weight: &CudaVector,
        bias: &CudaVector,
        eps: f32,
        silu: bool,
    ) -> Result<CudaTensor> {
        let c = x.cols();
        check_groups(c, groups)?;
        check_vector("group_norm", "weight", weight.n, c)?;
        check_vector("group_norm", "bias", bias.n, c)?;
        let x = self.bf16(x, "group_norm")?;
        let y = self.tensor(DType::Bf16, x.rows(), c, "group_norm")?;
        if x.rows() == 0 || c == 0 {
            return Ok(y);
        }
        self.launch(|d| {
            Ok(d.k.group_norm(
                x.mat()?,
                groups,
                weight.mat()?,
                bias.mat()?,
                eps,
                silu,
                y.mat()?,
            )?)
        })?;
        Ok(y)
    }

    fn upsample_nearest2x(&self, x: &CudaTensor, (h, w): (usize, usize)) -> Result<CudaTensor> {
        check_map("upsample_nearest2x", self.dims(x), (h, w))?;
        let x = self.bf16(x, "upsample_nearest2x")?;
        let y = self.tensor(DType::Bf16, 4 * h * w, x.cols(), "upsample_nearest2x")?;
        if h * w == 0 || x.cols() == 0 {
            return Ok(y);
        }
        self.launch(|d| Ok(d.k.upsample_nearest2x(x.mat()?, h, w, y.mat()?)?))?;
        Ok(y)
    }

    fn layer_norm(
        &self,
        x: &CudaTensor,
        weight: &CudaVector,
        bias: &CudaVector,
        eps: f32,
    ) -> Result<CudaTensor> {
        check_vector("layer_norm", "weight", weight.n, x.cols())?;
        check_vector("layer_norm", "bias", bias.n, x.cols())?;
        let x = self.bf16(x, "layer_norm")?;
        let y = self.tensor(DType::Bf16, x.rows(), x.cols(), "layer_norm")?;
        if x.rows() == 0 || x.cols() == 0 {
            return Ok(y);
        }
        self.launch(|d| {
            Ok(d.k.layer_norm(x.mat()?, weight.mat()?, bias.mat()?, y.mat()?, eps)?)
        })?;
        Ok(y)
    }

    fn rms_norm(&self, x: &CudaTensor, weight: &CudaVector, eps: f32) -> Result<CudaTensor> {
        check_vector("rms_norm", "weight", weight.n, x.cols())?;
        let x = self.bf16(x, "rms_norm")?;
        let y = self.tensor(DType::Bf16, x.rows(), x.cols(), "rms_norm")?;
        if x.rows() == 0 || x.cols() == 0 {
            return Ok(y);
        }
        self.launch(|d| Ok(d.k.rms_norm(x.mat()?, weight.mat()?, y.mat()?, eps)?))?;
        Ok(y)
    }

    fn attention_masked(
        &self,
        qkv: &CudaTensor,
        num_heads: usize,
        head_dim: usize,
        scale: f32,
        bias: Option<&CudaTensor>,
        causal: bool,
    ) -> Result<CudaTensor> {
        self.attention_impl(
            "attention_masked",
            qkv,
            (num_heads, head_dim),
            scale,
            bias,
            causal,
        )
    }

    fn gelu_tanh_gate(&self, x: &CudaTensor) -> Result<CudaTensor> {
        check_gate_input(self.dims(x))?;
        let f = x.cols() / 2;
        let x = self.bf16(x, "gelu_tanh_gate")?;
        let y = self.tensor(DType::Bf16, x.rows(), f, "gelu_tanh_gate")?;
        if x.rows() == 0 || f == 0 {
            return Ok(y);
        }
        self.launch(|d| {
            let xm = x.mat()?;
            Ok(d.k.gelu_tanh_mul(&xm.cols_range(0, f)?, &xm.cols_range(f, 2 * f)?, y.mat()?)?)
        })?;
        Ok(y)
    }

    fn quick_gelu(&self, x: &CudaTensor) -> Result<CudaTensor> {
        self.unary(Unary::QuickGelu, x, "quick_gelu")
    }

    fn affine(&self, x: &CudaTensor, mul: f32, add: f32) -> Result<CudaTensor> {
        let y = self.tensor(DType::Bf16, x.rows(), x.cols(), "affine")?;
        self.launch(|d| {
            let (xm, ym) = (x.mat()?, y.mat()?);
            if x.dtype() == DType::F32 {
                d.k.cast(xm, ym)?;
                d.k.scale_shift(ym, mul, add, ym)?;
            } else {
                d.k.scale_shift(xm, mul, add, ym)?;
            }
            Ok(())
        })?;
        Ok(y)
    }
}

//! The ops the autoencoder and the two text encoders add to the transformer's op set
//! ([`Backend`]). The CPU reference is in [`crate::cpu_encoder`]; the CUDA backend implements the
//! same trait, op for op, and is checked against it.
//!
//! Layouts. Everything stays batch 1 and row-major `[rows, cols]` like the transformer:
//! - text: `[tokens, features]`;
//! - autoencoder feature maps: **`[H·W, C]`** (pixel-major, channels contiguous: NHWC without the
//!   batch). A map's `(H, W)` travels beside the tensor. NHWC is the layout tensor-core
//!   convolutions want (the reduction dimension `ky, kx, c` of an implicit GEMM is then
//!   contiguous per tap), a 1×1 convolution is a plain [`Backend::linear`], and the mid-block
//!   attention reads its tokens without a transpose.
//!
//! How each op maps onto a CUDA kernel family (style.md):
//! - `conv2d` → `conv`: implicit GEMM (`M = Ho·Wo`, `N = Cout`, `K = kh·kw·Cin`), the im2col
//!   gather done while loading the A tile, bias in the epilogue; no column buffer in memory;
//! - `group_norm` (with optional SiLU) → `norm`: per-group statistics, then one apply pass;
//! - `layer_norm`, `rms_norm` → `norm`: one row per block, like `norm_modulate`;
//! - `attention_masked` → `attention`: the flash kernel with a per-head additive bias tile
//!   (T5) or a causal mask (CLIP) and a free softmax scale;
//! - `upsample_nearest2x`, `gelu_tanh_gate`, `quick_gelu`, `affine` → `elementwise`
//!   (`upsample_nearest2x` can also be folded into the next convolution's gather).

use crate::backend::{check_bias, Backend};
use crate::error::{shape_err, Result};
use crate::weights::HostWeight;

/// Zero padding of a convolution's input, in pixels on each side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pad {
    /// Zero rows above.
    pub top: usize,
    /// Zero rows below.
    pub bottom: usize,
    /// Zero columns on the left.
    pub left: usize,
    /// Zero columns on the right.
    pub right: usize,
}

impl Pad {
    /// The same padding `p` on all four sides (`padding=p` in PyTorch).
    pub const fn same(p: usize) -> Pad {
        Pad {
            top: p,
            bottom: p,
            left: p,
            right: p,
        }
    }

    /// The autoencoder's `Downsample`: one zero row at the bottom and one column at the right
    /// (spec 4.2).
    pub const DOWNSAMPLE: Pad = Pad {
        top: 0,
        bottom: 1,
        left: 0,
        right: 1,
    };
}

/// Output size of a convolution with kernel `k`, `stride` and `pad` over an `h × w` input,
/// `None` when the padded input is smaller than the kernel or the stride is 0.
pub fn conv_out_hw(
    (h, w): (usize, usize),
    (kh, kw): (usize, usize),
    stride: usize,
    pad: Pad,
) -> Option<(usize, usize)> {
    let (ph, pw) = (h + pad.top + pad.bottom, w + pad.left + pad.right);
    if stride == 0 || kh == 0 || kw == 0 || ph < kh || pw < kw {
        return None;
    }
    Some(((ph - kh) / stride + 1, (pw - kw) / stride + 1))
}

// Operand checks both backends run before an encoder op (see the checks in [`crate::backend`]).

/// `(Cout, Cin, kh, kw)` of a convolution's host `weight [Cout, Cin, kh, kw]`, its `bias [Cout]`
/// checked.
pub(crate) fn conv_shape(
    key: &str,
    weight: &HostWeight,
    bias: Option<&HostWeight>,
) -> Result<(usize, usize, usize, usize)> {
    let [cout, cin, kh, kw] = weight.shape[..] else {
        return Err(shape_err(
            "load_conv",
            format!(
                "{key}: weight shape {:?} is not [Cout, Cin, kh, kw]",
                weight.shape
            ),
        ));
    };
    weight.expect_shape(key, &[cout, cin, kh, kw])?;
    check_bias(key, bias, cout)?;
    Ok((cout, cin, kh, kw))
}

/// A parameter vector (named `what`) of `len` values has one per channel of `n`.
pub(crate) fn check_vector(op: &'static str, what: &str, len: usize, n: usize) -> Result<()> {
    if len != n {
        return Err(shape_err(
            op,
            format!("{what} has {len} values for {n} channels"),
        ));
    }
    Ok(())
}

/// `x [H·W, C]` is an `h × w` map.
pub(crate) fn check_map(op: &'static str, x: (usize, usize), (h, w): (usize, usize)) -> Result<()> {
    if x.0 != h * w {
        return Err(shape_err(
            op,
            format!("x [{}, {}] is not a {h}×{w} map", x.0, x.1),
        ));
    }
    Ok(())
}

/// `(Ho, Wo)` of `conv2d` with `conv (Cout, Cin, kh, kw)` over `x [H·W, Cin]` of an `hw` map,
/// after checking that `x` is that map, has `Cin` channels and that the kernel fits.
pub(crate) fn conv2d_out_hw(
    x: (usize, usize),
    (h, w): (usize, usize),
    (cout, cin, kh, kw): (usize, usize, usize, usize),
    stride: usize,
    pad: Pad,
) -> Result<(usize, usize)> {
    check_map("conv2d", x, (h, w))?;
    if x.1 != cin {
        return Err(shape_err(
            "conv2d",
            format!("x has {} channels, weight [{cout}, {cin}, {kh}, {kw}]", x.1),
        ));
    }
    conv_out_hw((h, w), (kh, kw), stride, pad).ok_or_else(|| {
        shape_err(
            "conv2d",
            format!(
                "a {kh}×{kw} kernel with stride {stride} and padding {pad:?} does not fit a {h}×{w} map"
            ),
        )
    })
}

/// `c` channels split into `groups` equal groups (`group_norm`).
pub(crate) fn check_groups(c: usize, groups: usize) -> Result<()> {
    if groups == 0 || c % groups != 0 {
        return Err(shape_err(
            "group_norm",
            format!("{c} channels cannot be split into {groups} groups"),
        ));
    }
    Ok(())
}

/// `x [L, 2F]` has an even width (`gelu_tanh_gate`).
pub(crate) fn check_gate_input(x: (usize, usize)) -> Result<()> {
    if x.1 % 2 != 0 {
        return Err(shape_err(
            "gelu_tanh_gate",
            format!("x [{}, {}] is not [L, 2F]", x.0, x.1),
        ));
    }
    Ok(())
}

/// Ops of the autoencoder (spec 4) and the text encoders (spec 5), on top of [`Backend`].
pub trait EncoderBackend: Backend {
    /// A 2-D convolution: weight `[Cout, Cin, kh, kw]` and bias `[Cout]`, in the backend's layout.
    type Conv;

    /// Builds a convolution from host weights: `weight [Cout, Cin, kh, kw]` f32, `bias [Cout]`.
    fn load_conv(
        &self,
        key: &str,
        weight: HostWeight,
        bias: Option<HostWeight>,
    ) -> Result<Self::Conv>;
    /// `(Cout, Cin, kh, kw)` of a convolution.
    fn conv_dims(&self, conv: &Self::Conv) -> (usize, usize, usize, usize);

    /// Cross-correlation like `torch.nn.Conv2d` (no dilation, no groups): `x [H·W, Cin]` of an
    /// `hw = (H, W)` map, zero padding `pad`, `stride` → `[Ho·Wo, Cout]` plus `(Ho, Wo)`.
    fn conv2d(
        &self,
        x: &Self::Tensor,
        hw: (usize, usize),
        conv: &Self::Conv,
        stride: usize,
        pad: Pad,
    ) -> Result<(Self::Tensor, (usize, usize))>;

    /// GroupNorm over `x [N, C]` (N pixels): `C` split into `groups` consecutive channel groups,
    /// mean and biased variance over the `N · C/groups` values of a group, then
    /// `(x − μ)/sqrt(σ² + eps) · weight[c] + bias[c]` (weight, bias `[C]`); followed by
    /// `SiLU` when `silu` (every GroupNorm of the autoencoder except the attention's). Same shape.
    fn group_norm(
        &self,
        x: &Self::Tensor,
        groups: usize,
        weight: &Self::Vector,
        bias: &Self::Vector,
        eps: f32,
        silu: bool,
    ) -> Result<Self::Tensor>;

    /// Nearest-neighbour ×2: `x [H·W, C]` of an `hw` map → `[2H·2W, C]`,
    /// `out[2y + dy, 2x + dx] = x[y, x]`.
    fn upsample_nearest2x(&self, x: &Self::Tensor, hw: (usize, usize)) -> Result<Self::Tensor>;

    /// LayerNorm per row with affine: `x [L, D]`, weight and bias `[D]`, biased variance.
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        weight: &Self::Vector,
        bias: &Self::Vector,
        eps: f32,
    ) -> Result<Self::Tensor>;

    /// T5's LayerNorm (RMSNorm): `weight · x · rsqrt(mean(x²) + eps)` per row of `x [L, D]`,
    /// no mean subtraction, no bias; weight `[D]`.
    fn rms_norm(&self, x: &Self::Tensor, weight: &Self::Vector, eps: f32) -> Result<Self::Tensor>;

    /// Multi-head attention reading q, k, v from columns `[0, D)`, `[D, 2D)`, `[2D, 3D)` of
    /// `qkv [L, W]` (D = H·Dh, W ≥ 3D): `softmax(scale · q·kᵀ + bias_h + mask)·v` per head h.
    /// `bias` is `[H·L, L]` (row `h·L + i` holds query i's bias over the keys; T5's relative
    /// position bias); `causal` masks keys `j > i` (CLIP). Output `[L, D]`, head-major features.
    fn attention_masked(
        &self,
        qkv: &Self::Tensor,
        num_heads: usize,
        head_dim: usize,
        scale: f32,
        bias: Option<&Self::Tensor>,
        causal: bool,
    ) -> Result<Self::Tensor>;

    /// T5's gated GELU on a fused `[wi_0 | wi_1]` projection: `x [L, 2F]` →
    /// `gelu_tanh(x[:, :F]) ⊙ x[:, F:]` `[L, F]`.
    fn gelu_tanh_gate(&self, x: &Self::Tensor) -> Result<Self::Tensor>;

    /// CLIP's `quick_gelu(x) = x·σ(1.702·x)`, elementwise, same shape.
    fn quick_gelu(&self, x: &Self::Tensor) -> Result<Self::Tensor>;

    /// `x·mul + add`, elementwise, same shape (latent scaling, spec 4.5).
    fn affine(&self, x: &Self::Tensor, mul: f32, add: f32) -> Result<Self::Tensor>;
}

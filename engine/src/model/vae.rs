//! The Flux autoencoder (BFL `modules/autoencoder.py`, spec 4): `Encoder`, `Decoder`,
//! `ResnetBlock`, `AttnBlock`, `Downsample`, `Upsample`, and the latent scaling of
//! `AutoEncoder.encode` / `decode` (Kontext: the Gaussian's mean, no sampling).
//!
//! Feature maps are `[H·W, C]` (see [`crate::encoder_backend`]); images and latents cross the API
//! as `[C, H, W]` like the reference. Sizes, channel multipliers, block counts, group count and
//! the scale / shift factors all come from [`VaeConfig`].

use crate::encoder_backend::{EncoderBackend, Pad};
use crate::error::{EngineError, Result};
use crate::model::{observe, StageHook};
use crate::weights::{load_stacked, load_vector, weight, WeightSource};
use kontext_loader::{Vae, VaeConfig};

/// GroupNorm epsilon of every norm in the autoencoder (spec 4.2).
pub const GROUP_NORM_EPS: f32 = 1e-6;

/// Convolution `name` with `.weight [cout, cin, k, k]` and `.bias [cout]`.
fn load_conv<B: EncoderBackend>(
    b: &B,
    src: &dyn WeightSource,
    name: &str,
    (cout, cin, k): (usize, usize, usize),
) -> Result<B::Conv> {
    let w = weight(src, &format!("{name}.weight"), &[cout, cin, k, k])?;
    let bias = weight(src, &format!("{name}.bias"), &[cout])?;
    b.load_conv(name, w, Some(bias))
}

/// `GroupNorm(groups, c)` with affine weight and bias `[c]`.
pub struct GroupNorm<B: EncoderBackend> {
    /// Number of channel groups (32 for Flux).
    pub groups: usize,
    /// Per-channel scale `[c]`.
    pub weight: B::Vector,
    /// Per-channel shift `[c]`.
    pub bias: B::Vector,
}

impl<B: EncoderBackend> GroupNorm<B> {
    fn load(b: &B, src: &dyn WeightSource, name: &str, c: usize, groups: usize) -> Result<Self> {
        Ok(GroupNorm {
            groups,
            weight: load_vector(b, src, &format!("{name}.weight"), c)?,
            bias: load_vector(b, src, &format!("{name}.bias"), c)?,
        })
    }

    /// `[N, C] → [N, C]`, then SiLU when `silu` (BFL: `swish(norm(x))`).
    fn forward(&self, b: &B, x: &B::Tensor, silu: bool) -> Result<B::Tensor> {
        b.group_norm(
            x,
            self.groups,
            &self.weight,
            &self.bias,
            GROUP_NORM_EPS,
            silu,
        )
    }
}

/// `ResnetBlock(cin, cout)`: `conv2(swish(norm2(conv1(swish(norm1(x)))))) + shortcut(x)`,
/// shortcut = `nin_shortcut` (1×1) when `cin ≠ cout` (spec 4.2).
pub struct ResnetBlock<B: EncoderBackend> {
    /// GroupNorm over `cin`.
    pub norm1: GroupNorm<B>,
    /// 3×3, `cin → cout`.
    pub conv1: B::Conv,
    /// GroupNorm over `cout`.
    pub norm2: GroupNorm<B>,
    /// 3×3, `cout → cout`.
    pub conv2: B::Conv,
    /// 1×1 `cin → cout` as a linear `[cout, cin]`, only when `cin ≠ cout`.
    pub nin_shortcut: Option<B::Linear>,
}

impl<B: EncoderBackend> ResnetBlock<B> {
    fn load(
        b: &B,
        src: &dyn WeightSource,
        name: &str,
        (cin, cout): (usize, usize),
        groups: usize,
    ) -> Result<Self> {
        let nin_shortcut = if cin != cout {
            Some(load_stacked(
                b,
                src,
                &[format!("{name}.nin_shortcut")],
                &[cout, cin, 1, 1],
                true,
            )?)
        } else {
            None
        };
        Ok(ResnetBlock {
            norm1: GroupNorm::load(b, src, &format!("{name}.norm1"), cin, groups)?,
            conv1: load_conv(b, src, &format!("{name}.conv1"), (cout, cin, 3))?,
            norm2: GroupNorm::load(b, src, &format!("{name}.norm2"), cout, groups)?,
            conv2: load_conv(b, src, &format!("{name}.conv2"), (cout, cout, 3))?,
            nin_shortcut,
        })
    }

    /// `x [H·W, cin]` → `[H·W, cout]`.
    fn forward(&self, b: &B, x: &B::Tensor, hw: (usize, usize)) -> Result<B::Tensor> {
        let h = self.norm1.forward(b, x, true)?; // [HW, cin]
        let (h, _) = b.conv2d(&h, hw, &self.conv1, 1, Pad::same(1))?; // [HW, cout]
        let h = self.norm2.forward(b, &h, true)?; // [HW, cout]
        let (mut h, _) = b.conv2d(&h, hw, &self.conv2, 1, Pad::same(1))?; // [HW, cout]
        match &self.nin_shortcut {
            Some(nin) => b.add_assign(&mut h, &b.linear(x, nin)?)?, // [HW, cout]
            None => b.add_assign(&mut h, x)?,
        }
        Ok(h)
    }
}

/// `AttnBlock(c)`: `x + proj_out(attention(q, k, v))` with q, k, v = 1×1 convolutions of
/// `GroupNorm(x)` and a single head of width c over the H·W pixels (spec 4.2).
pub struct AttnBlock<B: EncoderBackend> {
    /// GroupNorm over c (no SiLU).
    pub norm: GroupNorm<B>,
    /// `[q; k; v]` stacked: `[3c, c]` with bias `[3c]`.
    pub qkv: B::Linear,
    /// 1×1 output projection as a linear `[c, c]`.
    pub proj_out: B::Linear,
    /// c, the width of the single head.
    pub channels: usize,
}

impl<B: EncoderBackend> AttnBlock<B> {
    fn load(b: &B, src: &dyn WeightSource, name: &str, c: usize, groups: usize) -> Result<Self> {
        let qkv: Vec<String> = ["q", "k", "v"]
            .iter()
            .map(|p| format!("{name}.{p}"))
            .collect();
        Ok(AttnBlock {
            norm: GroupNorm::load(b, src, &format!("{name}.norm"), c, groups)?,
            qkv: load_stacked(b, src, &qkv, &[c, c, 1, 1], true)?,
            proj_out: load_stacked(b, src, &[format!("{name}.proj_out")], &[c, c, 1, 1], true)?,
            channels: c,
        })
    }

    /// `x [H·W, c]` → `[H·W, c]`.
    fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let n = self.norm.forward(b, x, false)?; // [HW, c]
        let qkv = b.linear(&n, &self.qkv)?; // [HW, 3c]
        let a = b.attention(&qkv, 1, self.channels)?; // [HW, c], scale 1/sqrt(c)
        let mut h = b.linear(&a, &self.proj_out)?; // [HW, c]
        b.add_assign(&mut h, x)?; // [HW, c]
        Ok(h)
    }
}

/// `mid`: `block_1`, `attn_1`, `block_2` at the lowest resolution.
pub struct Mid<B: EncoderBackend> {
    /// ResnetBlock(top, top).
    pub block_1: ResnetBlock<B>,
    /// AttnBlock(top).
    pub attn_1: AttnBlock<B>,
    /// ResnetBlock(top, top).
    pub block_2: ResnetBlock<B>,
}

impl<B: EncoderBackend> Mid<B> {
    fn load(b: &B, src: &dyn WeightSource, side: &str, c: usize, groups: usize) -> Result<Self> {
        Ok(Mid {
            block_1: ResnetBlock::load(b, src, &format!("{side}.mid.block_1"), (c, c), groups)?,
            attn_1: AttnBlock::load(b, src, &format!("{side}.mid.attn_1"), c, groups)?,
            block_2: ResnetBlock::load(b, src, &format!("{side}.mid.block_2"), (c, c), groups)?,
        })
    }

    fn forward(&self, b: &B, x: &B::Tensor, hw: (usize, usize)) -> Result<B::Tensor> {
        let h = self.block_1.forward(b, x, hw)?;
        let h = self.attn_1.forward(b, &h)?;
        self.block_2.forward(b, &h, hw)
    }
}

/// One resolution level: resnet blocks, then `Downsample` (encoder) or `Upsample` (decoder)
/// except at the last level the data passes through.
pub struct Level<B: EncoderBackend> {
    /// `num_res_blocks` (encoder) or `num_res_blocks + 1` (decoder) blocks.
    pub block: Vec<ResnetBlock<B>>,
    /// The 3×3 convolution of `downsample` / `upsample`.
    pub resample: Option<B::Conv>,
}

/// The encoder: `[3, H, W]` image → `[2z, H/f, W/f]` moments (mean ‖ logvar).
pub struct Encoder<B: EncoderBackend> {
    /// 3×3, `in → ch`.
    pub conv_in: B::Conv,
    /// Levels 0 … n−1, channels `ch · ch_mult[i]`; all but the last end in a `Downsample`.
    pub down: Vec<Level<B>>,
    /// At `top = ch · ch_mult[n−1]` channels.
    pub mid: Mid<B>,
    /// GroupNorm over `top`, followed by SiLU.
    pub norm_out: GroupNorm<B>,
    /// 3×3, `top → 2z` (mean ‖ logvar).
    pub conv_out: B::Conv,
}

/// The decoder: `[z, h, w]` (unscaled) → `[3, h·f, w·f]`. `up[i]` is level i; it runs from the
/// last level down to 0 (spec 4.4).
pub struct Decoder<B: EncoderBackend> {
    /// 3×3, `z → top`.
    pub conv_in: B::Conv,
    /// At `top` channels.
    pub mid: Mid<B>,
    /// Levels 0 … n−1 by index; all but level 0 end in an `Upsample`.
    pub up: Vec<Level<B>>,
    /// GroupNorm over `ch · ch_mult[0]`, followed by SiLU.
    pub norm_out: GroupNorm<B>,
    /// 3×3, `ch · ch_mult[0] → out`.
    pub conv_out: B::Conv,
}

/// A latent `[channels, height, width]` in f32, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Latent {
    /// `channels · height · width` values, channel-major.
    pub data: Vec<f32>,
    /// z (16 for Flux).
    pub channels: usize,
    /// Image height / 8 for Flux.
    pub height: usize,
    /// Image width / 8 for Flux.
    pub width: usize,
}

/// The autoencoder on backend `B`.
pub struct AutoEncoder<B: EncoderBackend> {
    /// The backend every op runs on.
    pub backend: B,
    /// Sizes and latent factors (from the checkpoint's config or `VaeOptions`).
    pub config: VaeConfig,
    /// Image → moments.
    pub encoder: Encoder<B>,
    /// Latent → image.
    pub decoder: Decoder<B>,
}

/// `[C, H, W]` → `[H·W, C]`.
pub fn chw_to_hwc(x: &[f32], c: usize, hw: usize) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    for ch in 0..c {
        for p in 0..hw {
            y[p * c + ch] = x[ch * hw + p];
        }
    }
    y
}

/// `[H·W, C]` → `[C, H, W]`.
pub fn hwc_to_chw(x: &[f32], c: usize, hw: usize) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    for p in 0..hw {
        for ch in 0..c {
            y[ch * hw + p] = x[p * c + ch];
        }
    }
    y
}

fn validate(c: &VaeConfig) -> Result<()> {
    let err = |m: String| Err(EngineError::Config(format!("autoencoder: {m}")));
    if c.ch_mult.is_empty() || c.ch == 0 || c.z_channels == 0 || c.in_channels == 0 {
        return err(format!(
            "ch {} × ch_mult {:?}, z {} and {} input channels must all be non-zero",
            c.ch, c.ch_mult, c.z_channels, c.in_channels
        ));
    }
    if c.scale_factor == 0.0 || !c.scale_factor.is_finite() || !c.shift_factor.is_finite() {
        return err(format!(
            "scale factor {} / shift factor {} are not usable",
            c.scale_factor, c.shift_factor
        ));
    }
    for m in &c.ch_mult {
        if *m == 0 || c.norm_groups == 0 || (c.ch * m) % c.norm_groups != 0 {
            return err(format!(
                "{} channels (ch {} × {m}) cannot be split into {} groups",
                c.ch * m,
                c.ch,
                c.norm_groups
            ));
        }
    }
    Ok(())
}

impl<B: EncoderBackend> AutoEncoder<B> {
    /// Builds the autoencoder for `config` from canonical (BFL `ae.safetensors`) weights.
    pub fn load(backend: B, config: VaeConfig, src: &dyn WeightSource) -> Result<Self> {
        validate(&config)?;
        let (b, c) = (&backend, &config);
        let g = c.norm_groups;
        let levels = c.ch_mult.len();
        let top = c.ch * c.ch_mult[levels - 1];

        let mut down = Vec::with_capacity(levels);
        let mut block_in = c.ch;
        for (i, m) in c.ch_mult.iter().enumerate() {
            let out = c.ch * m;
            let mut block = Vec::with_capacity(c.num_res_blocks);
            for j in 0..c.num_res_blocks {
                let name = format!("encoder.down.{i}.block.{j}");
                block.push(ResnetBlock::load(b, src, &name, (block_in, out), g)?);
                block_in = out;
            }
            let resample = if i + 1 != levels {
                let name = format!("encoder.down.{i}.downsample.conv");
                Some(load_conv(b, src, &name, (out, out, 3))?)
            } else {
                None
            };
            down.push(Level { block, resample });
        }
        let encoder = Encoder {
            conv_in: load_conv(b, src, "encoder.conv_in", (c.ch, c.in_channels, 3))?,
            down,
            mid: Mid::load(b, src, "encoder", top, g)?,
            norm_out: GroupNorm::load(b, src, "encoder.norm_out", top, g)?,
            conv_out: load_conv(b, src, "encoder.conv_out", (2 * c.z_channels, top, 3))?,
        };

        let mut up: Vec<Option<Level<B>>> = (0..levels).map(|_| None).collect();
        let mut block_in = top;
        for i in (0..levels).rev() {
            let out = c.ch * c.ch_mult[i];
            let mut block = Vec::with_capacity(c.num_res_blocks + 1);
            for j in 0..=c.num_res_blocks {
                let name = format!("decoder.up.{i}.block.{j}");
                block.push(ResnetBlock::load(b, src, &name, (block_in, out), g)?);
                block_in = out;
            }
            let resample = if i != 0 {
                let name = format!("decoder.up.{i}.upsample.conv");
                Some(load_conv(b, src, &name, (out, out, 3))?)
            } else {
                None
            };
            up[i] = Some(Level { block, resample });
        }
        let bottom = c.ch * c.ch_mult[0];
        let decoder = Decoder {
            conv_in: load_conv(b, src, "decoder.conv_in", (top, c.z_channels, 3))?,
            mid: Mid::load(b, src, "decoder", top, g)?,
            up: up.into_iter().flatten().collect(),
            norm_out: GroupNorm::load(b, src, "decoder.norm_out", bottom, g)?,
            conv_out: load_conv(b, src, "decoder.conv_out", (c.out_channels, bottom, 3))?,
        };
        Ok(AutoEncoder {
            encoder,
            decoder,
            config,
            backend,
        })
    }

    /// Builds the autoencoder from a checkpoint opened by the loader.
    pub fn from_vae(backend: B, vae: &Vae) -> Result<Self> {
        AutoEncoder::load(backend, vae.config.clone(), &vae.weights)
    }

    /// Spatial reduction factor `2^(levels − 1)` (8 for Flux).
    pub fn downscale(&self) -> usize {
        1 << (self.config.ch_mult.len() - 1)
    }

    /// The encoder body: `x [H·W, in]` → moments `[h·w, 2z]` and `(h, w)`. Stages:
    /// `encoder.conv_in`, `encoder.down.{i}`, `encoder.mid`, `encoder.moments`, each `[h·w, C]`.
    fn run_encoder(
        &self,
        x: &B::Tensor,
        hw: (usize, usize),
        hook: &mut Option<StageHook<'_>>,
    ) -> Result<(B::Tensor, (usize, usize))> {
        let (b, e) = (&self.backend, &self.encoder);
        let (mut h, mut hw) = b.conv2d(x, hw, &e.conv_in, 1, Pad::same(1))?; // [HW, ch]
        observe(b, hook, || "encoder.conv_in".into(), &h)?;
        for (i, level) in e.down.iter().enumerate() {
            for block in &level.block {
                h = block.forward(b, &h, hw)?; // [hw, ch·mult[i]]
            }
            if let Some(conv) = &level.resample {
                (h, hw) = b.conv2d(&h, hw, conv, 2, Pad::DOWNSAMPLE)?; // [hw/4, ch·mult[i]]
            }
            observe(b, hook, || format!("encoder.down.{i}"), &h)?;
        }
        let h = e.mid.forward(b, &h, hw)?; // [hw, top]
        observe(b, hook, || "encoder.mid".into(), &h)?;
        let h = e.norm_out.forward(b, &h, true)?; // [hw, top]
        let (moments, hw) = b.conv2d(&h, hw, &e.conv_out, 1, Pad::same(1))?; // [hw, 2z]
        observe(b, hook, || "encoder.moments".into(), &moments)?;
        Ok((moments, hw))
    }

    /// `AutoEncoder.encode` for Kontext (spec 2.2, 4.5): `image [in, H, W]` in [−1, 1] →
    /// `scale · (mean − shift)` `[z, H/f, W/f]`, with mean = the first z channels of the encoder's
    /// moments. Stages as in the encoder body, then `latent` `[h·w, z]`.
    pub fn encode(
        &self,
        image: &[f32],
        height: usize,
        width: usize,
        mut hook: Option<StageHook<'_>>,
    ) -> Result<Latent> {
        let (b, c) = (&self.backend, &self.config);
        let n = c.in_channels * height * width;
        if image.len() != n || height == 0 || width == 0 {
            return Err(EngineError::Input {
                name: "image",
                len: image.len(),
                expected: n,
                shape: format!("[{}, {height}, {width}] with H, W > 0", c.in_channels),
            });
        }
        let x = b.upload(
            &chw_to_hwc(image, c.in_channels, height * width),
            height * width,
            c.in_channels,
        )?; // [HW, in]
        let (moments, (h, w)) = self.run_encoder(&x, (height, width), &mut hook)?; // [hw, 2z]
        let mean = b.slice_cols(&moments, 0, c.z_channels)?; // [hw, z]
                                                             // scale · (mean − shift), as x·scale + (−scale·shift) (≤ 1 ulp from the reference order)
        let latent = b.affine(&mean, c.scale_factor, -c.scale_factor * c.shift_factor)?;
        observe(b, &mut hook, || "latent".into(), &latent)?;
        Ok(Latent {
            data: hwc_to_chw(&b.download(&latent)?, c.z_channels, h * w),
            channels: c.z_channels,
            height: h,
            width: w,
        })
    }

    /// `AutoEncoder.decode` (spec 3.6, 4.5): a scaled `latent [z, h, w]` → `z / scale + shift` →
    /// decoder → pixels `[out, h·f, w·f]` (not clamped). Stages: `decoder.conv_in`,
    /// `decoder.mid`, `decoder.up.{i}` (i from the last level down to 0), `pixels`, each
    /// `[H·W, C]`.
    pub fn decode(&self, latent: &Latent, mut hook: Option<StageHook<'_>>) -> Result<Vec<f32>> {
        let (b, c, d) = (&self.backend, &self.config, &self.decoder);
        let (h, w) = (latent.height, latent.width);
        let n = c.z_channels * h * w;
        if latent.data.len() != n || latent.channels != c.z_channels || h == 0 || w == 0 {
            return Err(EngineError::Input {
                name: "latent",
                len: latent.data.len(),
                expected: n,
                shape: format!(
                    "[{}, {h}, {w}] (given {} channels)",
                    c.z_channels, latent.channels
                ),
            });
        }
        let z = b.upload(
            &chw_to_hwc(&latent.data, c.z_channels, h * w),
            h * w,
            c.z_channels,
        )?;
        let z = b.affine(&z, 1.0 / c.scale_factor, c.shift_factor)?; // [hw, z]
        let (mut x, mut hw) = b.conv2d(&z, (h, w), &d.conv_in, 1, Pad::same(1))?; // [hw, top]
        observe(b, &mut hook, || "decoder.conv_in".into(), &x)?;
        x = d.mid.forward(b, &x, hw)?; // [hw, top]
        observe(b, &mut hook, || "decoder.mid".into(), &x)?;
        for (i, level) in d.up.iter().enumerate().rev() {
            for block in &level.block {
                x = block.forward(b, &x, hw)?; // [hw, ch·mult[i]]
            }
            if let Some(conv) = &level.resample {
                let u = b.upsample_nearest2x(&x, hw)?; // [4hw, ch·mult[i]]
                (x, hw) = b.conv2d(&u, (2 * hw.0, 2 * hw.1), conv, 1, Pad::same(1))?;
            }
            observe(b, &mut hook, || format!("decoder.up.{i}"), &x)?;
        }
        let x = d.norm_out.forward(b, &x, true)?; // [HW, ch·mult[0]]
        let (px, hw) = b.conv2d(&x, hw, &d.conv_out, 1, Pad::same(1))?; // [HW, out]
        observe(b, &mut hook, || "pixels".into(), &px)?;
        Ok(hwc_to_chw(&b.download(&px)?, c.out_channels, hw.0 * hw.1))
    }
}

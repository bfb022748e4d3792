//! The building blocks of the Flux transformer, named like BFL's `modules/layers.py`:
//! `EmbedNd`, `timestep_embedding`, `MlpEmbedder`, `QkNorm`, `SelfAttention`, `Modulation`,
//! `DoubleStreamBlock`, `SingleStreamBlock`, `LastLayer` (spec 1.3 – 1.10). Activations are
//! batch 1: `[tokens, features]`. `D` = hidden size, `H` = heads, `Dh` = head dim,
//! `M` = MLP hidden, `Lt` text tokens, `Ni` image tokens, `L = Lt + Ni`.

#![warn(missing_docs)]

use crate::backend::{Backend, QkScales};
use crate::error::{shape_err, EngineError, Result};
use crate::weights::{load_linear, load_vector, WeightSource};

/// LayerNorm epsilon (all `*_norm1/2`, `pre_norm`, `norm_final`; spec 1.5).
pub const LN_EPS: f32 = 1e-6;
/// QKNorm (RMSNorm) epsilon (spec 1.5).
pub const RMS_EPS: f32 = 1e-6;
/// Width of the sinusoidal timestep embedding fed to `time_in` / `guidance_in`.
pub const TIME_EMBED_DIM: usize = 256;

/// `SiLU(x) = x·σ(x)`.
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// GELU, tanh approximation: `0.5·x·(1 + tanh(u))`, `u = sqrt(2/π)·(x + 0.044715·x³)`.
/// Evaluated as `x·σ(2u)` (the identity `0.5·(1 + tanh u) = σ(2u)`): one `exp` instead of a
/// `tanh`, 5× faster here, and no cancellation near `tanh u = −1`.
pub fn gelu_tanh(x: f32) -> f32 {
    let c = (2.0 / std::f32::consts::PI).sqrt();
    let u = c * (x + 0.044715 * x * x * x);
    x / (1.0 + (-2.0 * u).exp())
}

/// Sinusoidal embedding of a scalar in `[0, 1]` (t or raw guidance) → `[dim]` (spec 1.3):
/// `s' = 1000·s`, `half = dim/2`, `f_k = exp(−ln(10000)·k/half)`, output `[cos(s'·f) ‖ sin(s'·f)]`
/// (cosine half first), zero-padded when `dim` is odd. All in f32 like the reference.
pub fn timestep_embedding(s: f32, dim: usize) -> Vec<f32> {
    let s = 1000.0f32 * s;
    let half = dim / 2;
    let neg_ln_max_period = -(10_000f64.ln()) as f32;
    let args: Vec<f32> = (0..half)
        .map(|k| s * (neg_ln_max_period * k as f32 / half as f32).exp())
        .collect();
    let mut out: Vec<f32> = args.iter().map(|a| a.cos()).collect();
    out.extend(args.iter().map(|a| a.sin()));
    out.resize(dim, 0.0);
    out
}

/// RoPE table of the joint sequence (BFL `EmbedND`, spec 1.6).
#[derive(Debug, Clone)]
pub struct EmbedNd {
    /// RoPE base (10000).
    pub theta: f32,
    /// Head dims per id axis (index, row, column); even, summing to `Dh`.
    pub axes_dim: Vec<usize>,
}

impl EmbedNd {
    /// Position ids `[L, n_axes]` (f32) → `pe [L, Dh]` with `(cos θ_j, sin θ_j)` at columns
    /// `(2j, 2j+1)`. Pairs are assigned to the axes in order; within axis `a` of width `d`, local
    /// pair `i` has `ω_i = theta^(−2i/d)` and `θ = id_a · ω_i`, all in f32 like the reference.
    pub fn forward(&self, ids: &[f32]) -> Result<Vec<f32>> {
        let n_axes = self.axes_dim.len();
        if n_axes == 0 || ids.len() % n_axes != 0 || self.axes_dim.iter().any(|d| d % 2 != 0) {
            return Err(EngineError::Config(format!(
                "EmbedNd: {} ids do not split into rows of {n_axes} axes {:?} (each axis dim even)",
                ids.len(),
                self.axes_dim
            )));
        }
        // ω for every pair of the head, in axis order: [Dh/2] (axis, ω).
        let omegas: Vec<(usize, f32)> = self
            .axes_dim
            .iter()
            .enumerate()
            .flat_map(|(axis, &d)| {
                (0..d / 2).map(move |i| {
                    let scale = (2 * i) as f32 / d as f32;
                    (axis, 1.0 / self.theta.powf(scale))
                })
            })
            .collect();
        let mut pe = Vec::with_capacity(ids.len() / n_axes * omegas.len() * 2);
        for token in ids.chunks_exact(n_axes) {
            for &(axis, omega) in &omegas {
                let angle = token[axis] * omega;
                pe.push(angle.cos());
                pe.push(angle.sin());
            }
        }
        Ok(pe)
    }
}

/// `out_layer(SiLU(in_layer(x)))`, both with bias: `[N, in] → [N, D]`, one row per timestep
/// (spec 1.3).
pub struct MlpEmbedder<B: Backend> {
    /// `in_layer` `[D, in]`.
    pub in_layer: B::Linear,
    /// `out_layer` `[D, D]`.
    pub out_layer: B::Linear,
}

impl<B: Backend> MlpEmbedder<B> {
    /// Loads `{name}.in_layer` `[D, in]` and `{name}.out_layer` `[D, D]`.
    pub fn load(b: &B, src: &dyn WeightSource, name: &str, inp: usize, d: usize) -> Result<Self> {
        Ok(MlpEmbedder {
            in_layer: load_linear(b, src, &format!("{name}.in_layer"), d, inp, true)?,
            out_layer: load_linear(b, src, &format!("{name}.out_layer"), d, d, true)?,
        })
    }

    /// `x [N, in] → [N, D]`.
    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let h = b.linear(x, &self.in_layer)?; // [N, D]
        let h = b.silu(&h)?; // [N, D]
        b.linear(&h, &self.out_layer) // [N, D]
    }
}

/// The one step of a batched modulation whose `vec` was `[1, D]`.
fn one_step<T>(mut steps: Vec<T>) -> Result<T> {
    match steps.len() {
        1 => steps
            .pop()
            .ok_or_else(|| shape_err("modulation", "no step")),
        n => Err(shape_err(
            "modulation",
            format!("vec has {n} rows, expected 1"),
        )),
    }
}

/// One adaLN chunk triple, each `[1, D]` broadcast over tokens.
pub struct ModulationOut<T> {
    /// `[1, D]`, added after the norm.
    pub shift: T,
    /// `[1, D]`, used as `1 + scale`.
    pub scale: T,
    /// `[1, D]`, multiplies the branch before the residual add.
    pub gate: T,
}

/// What [`Modulation::forward`] returns: the first triple and, for a double block, the second.
pub type ModulationPair<T> = (ModulationOut<T>, Option<ModulationOut<T>>);

/// `lin(SiLU(vec))` split into 6 (double) or 3 (single) chunks of `D` (spec 1.4).
pub struct Modulation<B: Backend> {
    /// `lin` `[k·D, D]`, k = 6 (double) or 3 (single).
    pub lin: B::Linear,
    /// Whether `lin` gives two triples (double block) or one.
    pub is_double: bool,
    /// Hidden size `D`.
    pub dim: usize,
}

impl<B: Backend> Modulation<B> {
    /// Loads `{name}.lin` `[k·D, D]`, k = 6 (double) or 3 (single).
    pub fn load(b: &B, src: &dyn WeightSource, name: &str, d: usize, double: bool) -> Result<Self> {
        let k = if double { 6 } else { 3 };
        Ok(Modulation {
            lin: load_linear(b, src, &format!("{name}.lin"), k * d, d, true)?,
            is_double: double,
            dim: d,
        })
    }

    /// `vec [1, D]` → (shift, scale, gate) and, for a double block, (shift2, scale2, gate2).
    pub fn forward(&self, b: &B, vec: &B::Tensor) -> Result<ModulationPair<B::Tensor>> {
        one_step(self.forward_batched(b, vec)?)
    }

    /// `vecs [S, D]`, one row per step → per step, what [`Modulation::forward`] gives for that
    /// row: one GEMM over all steps instead of a GEMV per step, so `lin` is read once.
    pub fn forward_batched(
        &self,
        b: &B,
        vecs: &B::Tensor,
    ) -> Result<Vec<ModulationPair<B::Tensor>>> {
        let d = self.dim;
        let k = if self.is_double { 6 } else { 3 };
        let out = b.linear(&b.silu(vecs)?, &self.lin)?; // [S, k·D]
        let chunks = (0..k)
            .map(|i| b.slice_cols(&out, i * d, (i + 1) * d))
            .collect::<Result<Vec<_>>>()?; // k × [S, D]
        let steps = b.dims(vecs).0;
        (0..steps)
            .map(|s| {
                let chunk = |i: usize| b.slice_rows(&chunks[i], s, s + 1); // [1, D]
                let triple = |first: usize| -> Result<ModulationOut<B::Tensor>> {
                    Ok(ModulationOut {
                        shift: chunk(first)?,
                        scale: chunk(first + 1)?,
                        gate: chunk(first + 2)?,
                    })
                };
                let second = if self.is_double {
                    Some(triple(3)?)
                } else {
                    None
                };
                Ok((triple(0)?, second))
            })
            .collect()
    }
}

/// Per-head RMSNorms of q and k with learnable scales `[Dh]` (spec 1.5).
pub struct QkNorm<B: Backend> {
    /// RMSNorm scale of q `[Dh]`.
    pub query_norm: B::Vector,
    /// RMSNorm scale of k `[Dh]`.
    pub key_norm: B::Vector,
}

impl<B: Backend> QkNorm<B> {
    /// Loads `{name}.query_norm.scale` and `{name}.key_norm.scale`, each `[Dh]`.
    pub fn load(b: &B, src: &dyn WeightSource, name: &str, head_dim: usize) -> Result<Self> {
        Ok(QkNorm {
            query_norm: load_vector(b, src, &format!("{name}.query_norm.scale"), head_dim)?,
            key_norm: load_vector(b, src, &format!("{name}.key_norm.scale"), head_dim)?,
        })
    }
}

/// The attention weights of one stream of a double block: `qkv [3D, D]`, QKNorm, `proj [D, D]`.
pub struct SelfAttention<B: Backend> {
    /// `[3D, D]`: q, k, v rows in that order, head h at `h·Dh`.
    pub qkv: B::Linear,
    /// QKNorm of q and k.
    pub norm: QkNorm<B>,
    /// `[D, D]` on the attention output.
    pub proj: B::Linear,
}

/// A stream's MLP: `Linear(D → M) → GELU-tanh → Linear(M → D)` (BFL keys `mlp.0`, `mlp.2`).
pub struct Mlp<B: Backend> {
    /// `mlp.0` `[M, D]`.
    pub fc0: B::Linear,
    /// `mlp.2` `[D, M]`.
    pub fc2: B::Linear,
}

impl<B: Backend> Mlp<B> {
    /// `x [N, D] → [N, D]`.
    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let h = b.linear_gelu(x, &self.fc0)?; // [N, M]
        b.linear(&h, &self.fc2) // [N, D]
    }

    /// A stream's MLP branch: `x += gate ⊙ forward((1 + scale)·LN(x) + shift)`, x `[N, D]`,
    /// `m`'s chunks `[1, D]` (spec 1.8).
    pub fn forward_modulated(
        &self,
        b: &B,
        x: &mut B::Tensor,
        m: &ModulationOut<B::Tensor>,
    ) -> Result<()> {
        let h = b.norm_modulate_linear(x, &m.shift, &m.scale, &self.fc0, true)?; // [N, M]
        b.linear_gate_residual(&h, &self.fc2, &m.gate, x) // [N, D]
    }
}

/// Sizes every block needs.
#[derive(Debug, Clone, Copy)]
pub struct BlockDims {
    /// `D`.
    pub hidden: usize,
    /// `H`.
    pub num_heads: usize,
    /// `Dh`.
    pub head_dim: usize,
    /// `M`.
    pub mlp_hidden: usize,
}

/// A double block's adaLN chunks at one step: per stream, the attention triple (`*_mod1`) and the
/// MLP triple (`*_mod2`), each chunk `[1, D]`.
pub struct DoubleBlockModulation<T> {
    /// Image stream, attention branch.
    pub img_mod1: ModulationOut<T>,
    /// Image stream, MLP branch.
    pub img_mod2: ModulationOut<T>,
    /// Text stream, attention branch.
    pub txt_mod1: ModulationOut<T>,
    /// Text stream, MLP branch.
    pub txt_mod2: ModulationOut<T>,
}

/// MMDiT block: separate weights for the text and image streams, joint attention (spec 1.8).
pub struct DoubleStreamBlock<B: Backend> {
    /// Image-stream adaLN (6 chunks).
    pub img_mod: Modulation<B>,
    /// Image-stream qkv, QKNorm and proj.
    pub img_attn: SelfAttention<B>,
    /// Image-stream MLP.
    pub img_mlp: Mlp<B>,
    /// Text-stream adaLN (6 chunks).
    pub txt_mod: Modulation<B>,
    /// Text-stream qkv, QKNorm and proj.
    pub txt_attn: SelfAttention<B>,
    /// Text-stream MLP.
    pub txt_mlp: Mlp<B>,
    /// Block sizes.
    pub dims: BlockDims,
}

impl<B: Backend> DoubleStreamBlock<B> {
    /// Loads `double_blocks.{i}.*`.
    pub fn load(
        b: &B,
        src: &dyn WeightSource,
        i: usize,
        dims: BlockDims,
        qkv_bias: bool,
    ) -> Result<Self> {
        let (d, m) = (dims.hidden, dims.mlp_hidden);
        let p = format!("double_blocks.{i}");
        let attn = |s: &str| -> Result<SelfAttention<B>> {
            Ok(SelfAttention {
                qkv: load_linear(b, src, &format!("{p}.{s}_attn.qkv"), 3 * d, d, qkv_bias)?,
                norm: QkNorm::load(b, src, &format!("{p}.{s}_attn.norm"), dims.head_dim)?,
                proj: load_linear(b, src, &format!("{p}.{s}_attn.proj"), d, d, true)?,
            })
        };
        let mlp = |s: &str| -> Result<Mlp<B>> {
            Ok(Mlp {
                fc0: load_linear(b, src, &format!("{p}.{s}_mlp.0"), m, d, true)?,
                fc2: load_linear(b, src, &format!("{p}.{s}_mlp.2"), d, m, true)?,
            })
        };
        Ok(DoubleStreamBlock {
            img_mod: Modulation::load(b, src, &format!("{p}.img_mod"), d, true)?,
            img_attn: attn("img")?,
            img_mlp: mlp("img")?,
            txt_mod: Modulation::load(b, src, &format!("{p}.txt_mod"), d, true)?,
            txt_attn: attn("txt")?,
            txt_mlp: mlp("txt")?,
            dims,
        })
    }

    /// `vecs [S, D]`, one row per step → this block's modulation at each step (one GEMM per
    /// stream for all steps).
    pub fn modulation_batched(
        &self,
        b: &B,
        vecs: &B::Tensor,
    ) -> Result<Vec<DoubleBlockModulation<B::Tensor>>> {
        let missing = || EngineError::Config("double block modulation has no second triple".into());
        let img = self.img_mod.forward_batched(b, vecs)?; // S × 2 × 3 × [1, D]
        let txt = self.txt_mod.forward_batched(b, vecs)?; // S × 2 × 3 × [1, D]
        img.into_iter()
            .zip(txt)
            .map(|((img_mod1, img_mod2), (txt_mod1, txt_mod2))| {
                Ok(DoubleBlockModulation {
                    img_mod1,
                    img_mod2: img_mod2.ok_or_else(missing)?,
                    txt_mod1,
                    txt_mod2: txt_mod2.ok_or_else(missing)?,
                })
            })
            .collect()
    }

    /// `img [Ni, D]`, `txt [Lt, D]`, `vec [1, D]`, `pe [Lt + Ni, Dh]` → new `(img, txt)`.
    pub fn forward(
        &self,
        b: &B,
        img: B::Tensor,
        txt: B::Tensor,
        vec: &B::Tensor,
        pe: &B::Tensor,
    ) -> Result<(B::Tensor, B::Tensor)> {
        let m = one_step(self.modulation_batched(b, vec)?)?;
        self.forward_modulated(b, img, txt, &m, pe)
    }

    /// [`DoubleStreamBlock::forward`] with this step's modulation `m` already computed.
    pub fn forward_modulated(
        &self,
        b: &B,
        mut img: B::Tensor,
        mut txt: B::Tensor,
        m: &DoubleBlockModulation<B::Tensor>,
        pe: &B::Tensor,
    ) -> Result<(B::Tensor, B::Tensor)> {
        let BlockDims {
            num_heads: h,
            head_dim: hd,
            ..
        } = self.dims;
        let (lt, _) = b.dims(&txt);
        let (ni, _) = b.dims(&img);
        let DoubleBlockModulation {
            img_mod1,
            img_mod2,
            txt_mod1,
            txt_mod2,
        } = m; // 4 × 3 × [1, D]

        // image q, k, v
        let (qkv_w, m1) = (&self.img_attn.qkv, img_mod1);
        let img_qkv = b.norm_modulate_linear(&img, &m1.shift, &m1.scale, qkv_w, false)?; // [Ni, 3D]

        // text q, k, v
        let (qkv_w, m1) = (&self.txt_attn.qkv, txt_mod1);
        let txt_qkv = b.norm_modulate_linear(&txt, &m1.shift, &m1.scale, qkv_w, false)?; // [Lt, 3D]

        // joint attention, text first: each stream's QKNorm on its rows, RoPE with pe rows [0, L)
        let mut qkv = b.concat_rows(&txt_qkv, &img_qkv)?; // [L, 3D]
        let (tn, im) = (&self.txt_attn.norm, &self.img_attn.norm);
        let scales = [
            QkScales {
                q: &tn.query_norm,
                k: &tn.key_norm,
            },
            QkScales {
                q: &im.query_norm,
                k: &im.key_norm,
            },
        ];
        let attn = b.attention_qk_norm_rope(&mut qkv, (h, hd), scales, lt, pe, 0)?; // [L, D]
        let txt_attn = b.slice_rows(&attn, 0, lt)?; // [Lt, D]
        let img_attn = b.slice_rows(&attn, lt, lt + ni)?; // [Ni, D]

        // image residuals
        b.linear_gate_residual(&img_attn, &self.img_attn.proj, &img_mod1.gate, &mut img)?; // [Ni, D]
        self.img_mlp.forward_modulated(b, &mut img, img_mod2)?; // [Ni, D]

        // text residuals
        b.linear_gate_residual(&txt_attn, &self.txt_attn.proj, &txt_mod1.gate, &mut txt)?; // [Lt, D]
        self.txt_mlp.forward_modulated(b, &mut txt, txt_mod2)?; // [Lt, D]
        Ok((img, txt))
    }
}

/// DiT block with parallel attention and MLP on the joint sequence (spec 1.9).
pub struct SingleStreamBlock<B: Backend> {
    /// `[3D + M, D]`: q, k, v, then the MLP pre-activation.
    pub linear1: B::Linear,
    /// `[D, D + M]` on `[attention ‖ GELU(mlp)]`.
    pub linear2: B::Linear,
    /// QKNorm of q and k.
    pub norm: QkNorm<B>,
    /// adaLN (3 chunks).
    pub modulation: Modulation<B>,
    /// Block sizes.
    pub dims: BlockDims,
}

impl<B: Backend> SingleStreamBlock<B> {
    /// Loads `single_blocks.{i}.*`.
    pub fn load(b: &B, src: &dyn WeightSource, i: usize, dims: BlockDims) -> Result<Self> {
        let (d, m) = (dims.hidden, dims.mlp_hidden);
        let p = format!("single_blocks.{i}");
        Ok(SingleStreamBlock {
            linear1: load_linear(b, src, &format!("{p}.linear1"), 3 * d + m, d, true)?,
            linear2: load_linear(b, src, &format!("{p}.linear2"), d, d + m, true)?,
            norm: QkNorm::load(b, src, &format!("{p}.norm"), dims.head_dim)?,
            modulation: Modulation::load(b, src, &format!("{p}.modulation"), d, false)?,
            dims,
        })
    }

    /// `vecs [S, D]`, one row per step → this block's (shift, scale, gate) at each step (one
    /// GEMM for all steps).
    pub fn modulation_batched(
        &self,
        b: &B,
        vecs: &B::Tensor,
    ) -> Result<Vec<ModulationOut<B::Tensor>>> {
        let m = self.modulation.forward_batched(b, vecs)?; // S × 3 × [1, D]
        Ok(m.into_iter().map(|(m1, _)| m1).collect())
    }

    /// `x [L, D]` (text first), `vec [1, D]`, `pe [L, Dh]` → `[L, D]`.
    pub fn forward(
        &self,
        b: &B,
        x: B::Tensor,
        vec: &B::Tensor,
        pe: &B::Tensor,
    ) -> Result<B::Tensor> {
        let (m1, _) = self.modulation.forward(b, vec)?; // 3 × [1, D]
        self.forward_modulated(b, x, &m1, pe)
    }

    /// [`SingleStreamBlock::forward`] with this step's modulation `m1` already computed.
    pub fn forward_modulated(
        &self,
        b: &B,
        mut x: B::Tensor,
        m1: &ModulationOut<B::Tensor>,
        pe: &B::Tensor,
    ) -> Result<B::Tensor> {
        let BlockDims {
            num_heads: h,
            head_dim: hd,
            ..
        } = self.dims;
        let mut lin1 = b.norm_modulate_linear(&x, &m1.shift, &m1.scale, &self.linear1, false)?; // [L, 3D + M]
        let n = QkScales {
            q: &self.norm.query_norm,
            k: &self.norm.key_norm,
        };
        // QKNorm + RoPE of q, k, attention ‖ GELU of the MLP half, attention first
        let u = b.single_block_branches(&mut lin1, (h, hd), n, pe)?; // [L, D + M]
        b.linear_gate_residual(&u, &self.linear2, &m1.gate, &mut x)?; // [L, D]
        Ok(x)
    }
}

/// The final layer's adaLN chunks at one step, each `[1, D]`.
pub struct LastLayerModulation<T> {
    /// `[1, D]`, added after the norm.
    pub shift: T,
    /// `[1, D]`, used as `1 + scale`.
    pub scale: T,
}

/// `final_layer`: adaLN with (shift, scale) in BFL order, then `linear [out, D]` (spec 1.10).
pub struct LastLayer<B: Backend> {
    /// `adaLN_modulation.1` `[2D, D]`: rows `[0, D)` → shift, `[D, 2D)` → scale.
    pub ada_ln_modulation: B::Linear,
    /// `linear` `[out, D]`.
    pub linear: B::Linear,
    /// Hidden size `D`.
    pub hidden: usize,
}

impl<B: Backend> LastLayer<B> {
    /// Loads `final_layer.*`.
    pub fn load(b: &B, src: &dyn WeightSource, d: usize, out: usize) -> Result<Self> {
        Ok(LastLayer {
            ada_ln_modulation: load_linear(
                b,
                src,
                "final_layer.adaLN_modulation.1",
                2 * d,
                d,
                true,
            )?,
            linear: load_linear(b, src, "final_layer.linear", out, d, true)?,
            hidden: d,
        })
    }

    /// `vecs [S, D]`, one row per step → (shift, scale) at each step (one GEMM for all steps).
    pub fn modulation_batched(
        &self,
        b: &B,
        vecs: &B::Tensor,
    ) -> Result<Vec<LastLayerModulation<B::Tensor>>> {
        let d = self.hidden;
        let m = b.linear(&b.silu(vecs)?, &self.ada_ln_modulation)?; // [S, 2D]
        let shift = b.slice_cols(&m, 0, d)?; // [S, D]
        let scale = b.slice_cols(&m, d, 2 * d)?; // [S, D]
        (0..b.dims(vecs).0)
            .map(|s| {
                Ok(LastLayerModulation {
                    shift: b.slice_rows(&shift, s, s + 1)?, // [1, D]
                    scale: b.slice_rows(&scale, s, s + 1)?, // [1, D]
                })
            })
            .collect()
    }

    /// `img [Ni, D]`, `vec [1, D]` → `[Ni, out]`.
    pub fn forward(&self, b: &B, img: &B::Tensor, vec: &B::Tensor) -> Result<B::Tensor> {
        let m = one_step(self.modulation_batched(b, vec)?)?;
        self.forward_modulated(b, img, &m)
    }

    /// [`LastLayer::forward`] with this step's (shift, scale) already computed.
    pub fn forward_modulated(
        &self,
        b: &B,
        img: &B::Tensor,
        m: &LastLayerModulation<B::Tensor>,
    ) -> Result<B::Tensor> {
        let x = b.norm_modulate(img, &m.shift, &m.scale)?; // [Ni, D]
        b.linear(&x, &self.linear) // [Ni, out]
    }
}

//! `Flux`: the whole transformer, in the order of BFL's `model.py` (spec 1.11).

#![warn(missing_docs)]

use crate::backend::Backend;
use crate::error::{shape_err, EngineError, Result};
use crate::layers::{
    timestep_embedding, BlockDims, DoubleBlockModulation, DoubleStreamBlock, EmbedNd, LastLayer,
    LastLayerModulation, MlpEmbedder, ModulationOut, SingleStreamBlock, TIME_EMBED_DIM,
};
use crate::weights::{load_linear, WeightSource};
use kontext_loader::{FluxConfig, Transformer};

/// Called with each stage's name and its values (row-major): `vec` `[1, D]`, `img_in` `[Ni, D]`,
/// `txt_in` `[Lt, D]`, `double_blocks.{i}.img` `[Ni, D]`, `double_blocks.{i}.txt` `[Lt, D]`,
/// `single_blocks.{i}` `[Lt + Ni, D]` (text first), `output` `[Ni, out]`.
pub type StageHook<'a> = &'a mut dyn FnMut(&str, &[f32]);

/// One forward's inputs on the host (batch 1). `Ni = Nx + Nc`: target rows, then context rows.
#[derive(Debug, Clone, Copy)]
pub struct FluxInputs<'a> {
    /// Packed image tokens `[Ni, in_channels]`.
    pub img: &'a [f32],
    /// Position ids `[Ni, 3]` (spec 2.3).
    pub img_ids: &'a [f32],
    /// T5 hidden states `[Lt, context_in_dim]`.
    pub txt: &'a [f32],
    /// Text position ids `[Lt, 3]` (zeros).
    pub txt_ids: &'a [f32],
    /// Timestep in `[0, 1]` (1 = noise); ×1000 inside the embedding.
    pub t: f32,
    /// Raw guidance (e.g. 2.5); ×1000 inside the embedding. Ignored without `guidance_in`.
    pub guidance: f32,
    /// Pooled CLIP vector `[vec_in_dim]`.
    pub y: &'a [f32],
}

/// Everything one step's forward needs that depends only on (t, guidance, y): `vec` and the adaLN
/// chunks of every block and of the final layer, each `[1, D]`. [`Flux::conditioning`] computes
/// them for all steps of a schedule before the denoising loop.
pub struct StepConditioning<T> {
    /// `vec = time_in(temb(t)) + guidance_in(temb(g)) + vector_in(y)` `[1, D]`.
    pub vec: T,
    /// `double_blocks.{i}.img_mod` / `txt_mod` outputs, one per double block.
    pub double_blocks: Vec<DoubleBlockModulation<T>>,
    /// `single_blocks.{i}.modulation` outputs, one per single block.
    pub single_blocks: Vec<ModulationOut<T>>,
    /// `final_layer.adaLN_modulation` output.
    pub final_layer: LastLayerModulation<T>,
}

/// What the denoising loop keeps on the device from its start to its end ([`Flux::denoise_state`]):
/// a step ([`Flux::denoise_step`]) reads and writes only these, so it is the same work every
/// step and a backend may record it once and replay it ([`Backend::repeat`]).
pub struct DenoiseState<T> {
    /// Packed target latents `[Nx, in_channels]`, f32, updated in place by each step.
    pub x: T,
    /// Packed context latents `[Nc, in_channels]` (all references), fixed.
    pub ctx: T,
    /// T5 hidden states `[Lt, context_in_dim]`.
    pub txt: T,
    /// RoPE table of `[text ‖ target ‖ context]` `[L, Dh]`.
    pub pe: T,
    /// The conditioning the next step reads ([`Flux::set_step`] copies a step's into it).
    pub cond: StepConditioning<T>,
    /// The next step's `t_next − t` `[1, 1]` (f32).
    pub dt: T,
}

/// The Flux (Kontext) transformer on backend `B`.
pub struct Flux<B: Backend> {
    /// The backend every op runs on.
    pub backend: B,
    /// Sizes, from the checkpoint.
    pub config: FluxConfig,
    /// RoPE table builder (`pe_embedder`).
    pub pe_embedder: EmbedNd,
    /// `img_in` `[D, in_channels]`.
    pub img_in: B::Linear,
    /// `time_in`: `[256] → [D]`.
    pub time_in: MlpEmbedder<B>,
    /// `vector_in`: `[vec_in] → [D]`.
    pub vector_in: MlpEmbedder<B>,
    /// `guidance_in`: `[256] → [D]` (guidance-distilled models).
    pub guidance_in: Option<MlpEmbedder<B>>,
    /// `txt_in` `[D, context_in_dim]`.
    pub txt_in: B::Linear,
    /// `depth` double-stream blocks.
    pub double_blocks: Vec<DoubleStreamBlock<B>>,
    /// `depth_single` single-stream blocks.
    pub single_blocks: Vec<SingleStreamBlock<B>>,
    /// `final_layer`.
    pub final_layer: LastLayer<B>,
    /// The LoRAs attached to the linears, at their strengths ([`Flux::set_loras`]).
    pub loras: Vec<crate::lora::ActiveLora>,
}

/// Calls `hook` with a stage's values, downloaded (only when there is a hook). Every model's
/// forward (transformer, autoencoder, text encoders) reports its stages through it.
pub(crate) fn observe<B: Backend>(
    b: &B,
    hook: &mut Option<StageHook<'_>>,
    name: impl FnOnce() -> String,
    x: &B::Tensor,
) -> Result<()> {
    if let Some(h) = hook.as_mut() {
        let data = b.download(x)?;
        h(&name(), &data);
    }
    Ok(())
}

fn check_len(
    name: &'static str,
    data: &[f32],
    rows: usize,
    cols: usize,
    shape: String,
) -> Result<()> {
    if data.len() != rows * cols {
        return Err(EngineError::Input {
            name,
            len: data.len(),
            expected: rows * cols,
            shape,
        });
    }
    Ok(())
}

/// Checks that `cfg` describes a runnable model.
fn validate(cfg: &FluxConfig) -> Result<()> {
    let err = |m: String| Err(EngineError::Config(m));
    if cfg.num_heads == 0 || cfg.head_dim == 0 || cfg.num_heads * cfg.head_dim != cfg.hidden_size {
        return err(format!(
            "hidden size {} is not heads {} × head dim {}",
            cfg.hidden_size, cfg.num_heads, cfg.head_dim
        ));
    }
    let axes_sum: usize = cfg.axes_dim.iter().sum();
    if cfg.axes_dim.len() != 3
        || axes_sum != cfg.head_dim
        || cfg.axes_dim.iter().any(|a| a % 2 != 0)
    {
        return err(format!(
            "RoPE axes {:?} must be 3 even dims summing to the head dim {}",
            cfg.axes_dim, cfg.head_dim
        ));
    }
    Ok(())
}

impl<B: Backend> Flux<B> {
    /// Builds the model for `config` from canonical (BFL-named) weights.
    pub fn load(backend: B, config: FluxConfig, src: &dyn WeightSource) -> Result<Self> {
        validate(&config)?;
        let c = &config;
        let b = &backend;
        let d = c.hidden_size;
        let dims = BlockDims {
            hidden: d,
            num_heads: c.num_heads,
            head_dim: c.head_dim,
            mlp_hidden: c.mlp_hidden,
        };
        let guidance_in = if c.guidance_embed {
            Some(MlpEmbedder::load(b, src, "guidance_in", TIME_EMBED_DIM, d)?)
        } else {
            None
        };
        Ok(Flux {
            pe_embedder: EmbedNd {
                theta: c.theta,
                axes_dim: c.axes_dim.clone(),
            },
            img_in: load_linear(b, src, "img_in", d, c.in_channels, true)?,
            time_in: MlpEmbedder::load(b, src, "time_in", TIME_EMBED_DIM, d)?,
            vector_in: MlpEmbedder::load(b, src, "vector_in", c.vec_in_dim, d)?,
            guidance_in,
            txt_in: load_linear(b, src, "txt_in", d, c.context_in_dim, true)?,
            double_blocks: (0..c.depth)
                .map(|i| DoubleStreamBlock::load(b, src, i, dims, c.qkv_bias))
                .collect::<Result<_>>()?,
            single_blocks: (0..c.depth_single)
                .map(|i| SingleStreamBlock::load(b, src, i, dims))
                .collect::<Result<_>>()?,
            final_layer: LastLayer::load(b, src, d, c.out_channels)?,
            loras: Vec::new(),
            config,
            backend,
        })
    }

    /// Builds the model from a checkpoint opened by the loader (fp8 weights dequantised to f32).
    pub fn from_transformer(backend: B, t: &Transformer) -> Result<Self> {
        Flux::load(backend, t.config.clone(), &t.weights)
    }

    /// `vec = time_in(temb(t)) + guidance_in(temb(g)) + vector_in(y)` for each of the timesteps
    /// `ts` (`[S]`), one guidance and one pooled `y [vec_in]` (host) → `[S, D]`, one row per
    /// step. Guidance and `y` are repeated over the rows so every embedder is one GEMM.
    pub fn embed_vec(&self, ts: &[f32], guidance: f32, y: &[f32]) -> Result<B::Tensor> {
        let b = &self.backend;
        let c = &self.config;
        let s = ts.len();
        check_len("y", y, 1, c.vec_in_dim, format!("[{}]", c.vec_in_dim))?;
        let temb: Vec<f32> = ts
            .iter()
            .flat_map(|&t| timestep_embedding(t, TIME_EMBED_DIM))
            .collect(); // [S, 256]
        let temb = b.upload(&temb, s, TIME_EMBED_DIM)?;
        let mut vec = self.time_in.forward(b, &temb)?; // [S, D]
        if let Some(g) = &self.guidance_in {
            let gemb = timestep_embedding(guidance, TIME_EMBED_DIM).repeat(s); // [S, 256]
            let gv = g.forward(b, &b.upload(&gemb, s, TIME_EMBED_DIM)?)?; // [S, D]
            b.add_assign(&mut vec, &gv)?;
        }
        let ys = b.upload(&y.repeat(s), s, c.vec_in_dim)?; // [S, vec_in]
        let yv = self.vector_in.forward(b, &ys)?; // [S, D]
        b.add_assign(&mut vec, &yv)?; // [S, D]
        Ok(vec)
    }

    /// The conditioning of every step of a schedule at once, before the denoising loop: `vec`
    /// for the timesteps `ts` (`[S]`), then each modulation layer as one GEMM over the `S` rows
    /// (the weights are read once per request, not once per step) → one [`StepConditioning`]
    /// per timestep, in order.
    pub fn conditioning(
        &self,
        ts: &[f32],
        guidance: f32,
        y: &[f32],
    ) -> Result<Vec<StepConditioning<B::Tensor>>> {
        let b = &self.backend;
        let vecs = self.embed_vec(ts, guidance, y)?; // [S, D]
        let mut double: Vec<_> = self
            .double_blocks
            .iter()
            .map(|blk| Ok(blk.modulation_batched(b, &vecs)?.into_iter())) // blocks × S
            .collect::<Result<_>>()?;
        let mut single: Vec<_> = self
            .single_blocks
            .iter()
            .map(|blk| Ok(blk.modulation_batched(b, &vecs)?.into_iter())) // blocks × S
            .collect::<Result<_>>()?;
        let finals = self.final_layer.modulation_batched(b, &vecs)?; // S
        let missing = || shape_err("Flux::conditioning", "a modulation has fewer rows than vec");
        finals
            .into_iter()
            .enumerate()
            .map(|(i, final_layer)| {
                Ok(StepConditioning {
                    vec: b.slice_rows(&vecs, i, i + 1)?, // [1, D]
                    double_blocks: double
                        .iter_mut()
                        .map(|m| m.next().ok_or_else(missing))
                        .collect::<Result<_>>()?,
                    single_blocks: single
                        .iter_mut()
                        .map(|m| m.next().ok_or_else(missing))
                        .collect::<Result<_>>()?,
                    final_layer,
                })
            })
            .collect()
    }

    /// RoPE table of the joint sequence `[text ‖ image]`: ids `[Lt, 3]`, `[Ni, 3]` → `[Lt + Ni, Dh]`.
    pub fn pe(&self, txt_ids: &[f32], img_ids: &[f32]) -> Result<B::Tensor> {
        let ids = [txt_ids, img_ids].concat(); // [L, 3]
        let pe = self.pe_embedder.forward(&ids)?; // [L, Dh]
        let hd = self.config.head_dim;
        self.backend.upload(&pe, pe.len() / hd, hd)
    }

    /// The transformer body on embedded inputs: raw `img [Ni, in]`, raw `txt [Lt, ctx]`, the
    /// step's conditioning, `pe [Lt + Ni, Dh]` → `[Ni, out]`. Calls `hook` after each stage.
    pub fn forward_embedded(
        &self,
        img: &B::Tensor,
        txt: &B::Tensor,
        cond: &StepConditioning<B::Tensor>,
        pe: &B::Tensor,
        mut hook: Option<StageHook<'_>>,
    ) -> Result<B::Tensor> {
        let b = &self.backend;
        let (lt, ni) = (b.dims(txt).0, b.dims(img).0);
        if b.dims(pe).0 != lt + ni {
            return Err(EngineError::Shape {
                op: "Flux::forward",
                detail: format!("pe has {} rows for Lt {lt} + Ni {ni} tokens", b.dims(pe).0),
            });
        }
        if cond.double_blocks.len() != self.double_blocks.len()
            || cond.single_blocks.len() != self.single_blocks.len()
        {
            return Err(shape_err(
                "Flux::forward",
                format!(
                    "conditioning for {} + {} blocks, the model has {} + {}",
                    cond.double_blocks.len(),
                    cond.single_blocks.len(),
                    self.double_blocks.len(),
                    self.single_blocks.len()
                ),
            ));
        }
        let mut img = b.linear(img, &self.img_in)?; // [Ni, D]
        observe(b, &mut hook, || "img_in".into(), &img)?;
        let mut txt = b.linear(txt, &self.txt_in)?; // [Lt, D]
        observe(b, &mut hook, || "txt_in".into(), &txt)?;

        let doubles = self.double_blocks.iter().zip(&cond.double_blocks);
        for (i, (block, m)) in doubles.enumerate() {
            (img, txt) = block.forward_modulated(b, img, txt, m, pe)?; // [Ni, D], [Lt, D]
            observe(b, &mut hook, || format!("double_blocks.{i}.img"), &img)?;
            observe(b, &mut hook, || format!("double_blocks.{i}.txt"), &txt)?;
        }

        let mut x = b.concat_rows(&txt, &img)?; // [L, D], text first
        let singles = self.single_blocks.iter().zip(&cond.single_blocks);
        for (i, (block, m)) in singles.enumerate() {
            x = block.forward_modulated(b, x, m, pe)?; // [L, D]
            observe(b, &mut hook, || format!("single_blocks.{i}"), &x)?;
        }
        let img = b.slice_rows(&x, lt, lt + ni)?; // [Ni, D]

        let out = self
            .final_layer
            .forward_modulated(b, &img, &cond.final_layer)?; // [Ni, out]
        observe(b, &mut hook, || "output".into(), &out)?;
        Ok(out)
    }

    /// Checks `inp`'s text states and ids → the text length `Lt`.
    fn check_text(&self, inp: &FluxInputs<'_>) -> Result<usize> {
        let c = &self.config;
        let lt = inp.txt.len() / c.context_in_dim.max(1);
        check_len(
            "txt",
            inp.txt,
            lt,
            c.context_in_dim,
            format!("[Lt, {}]", c.context_in_dim),
        )?;
        check_len("txt_ids", inp.txt_ids, lt, 3, format!("[Lt = {lt}, 3]"))?;
        Ok(lt)
    }

    /// The denoising loop's state from host inputs: target latents `x [Nx, in]` (f32), context
    /// latents `ctx [Nc, in]`, `inp`'s text, ids (`img_ids` of `[target ‖ context]`), the
    /// conditioning of the first step `cond` and its `dt` (copies: the state owns its memory).
    pub fn denoise_state(
        &self,
        x: &[f32],
        ctx: &[f32],
        inp: &FluxInputs<'_>,
        cond: &StepConditioning<B::Tensor>,
        dt: f32,
    ) -> Result<DenoiseState<B::Tensor>> {
        let c = &self.config;
        let b = &self.backend;
        let cin = c.in_channels.max(1);
        let (nx, nc) = (x.len() / cin, ctx.len() / cin);
        check_len(
            "x",
            x,
            nx,
            c.in_channels,
            format!("[Nx, {}]", c.in_channels),
        )?;
        check_len(
            "ctx",
            ctx,
            nc,
            c.in_channels,
            format!("[Nc, {}]", c.in_channels),
        )?;
        let lt = self.check_text(inp)?;
        check_len(
            "img_ids",
            inp.img_ids,
            nx + nc,
            3,
            format!("[Nx + Nc = {}, 3]", nx + nc),
        )?;
        // A fixed copy of every conditioning tensor: slicing all rows copies.
        let own = |t: &B::Tensor| b.slice_rows(t, 0, b.dims(t).0);
        let triple = |m: &ModulationOut<B::Tensor>| -> Result<ModulationOut<B::Tensor>> {
            Ok(ModulationOut {
                shift: own(&m.shift)?,
                scale: own(&m.scale)?,
                gate: own(&m.gate)?,
            })
        };
        let cond = StepConditioning {
            vec: own(&cond.vec)?,
            double_blocks: cond
                .double_blocks
                .iter()
                .map(|m| {
                    Ok(DoubleBlockModulation {
                        img_mod1: triple(&m.img_mod1)?,
                        img_mod2: triple(&m.img_mod2)?,
                        txt_mod1: triple(&m.txt_mod1)?,
                        txt_mod2: triple(&m.txt_mod2)?,
                    })
                })
                .collect::<Result<_>>()?,
            single_blocks: cond
                .single_blocks
                .iter()
                .map(triple)
                .collect::<Result<_>>()?,
            final_layer: LastLayerModulation {
                shift: own(&cond.final_layer.shift)?,
                scale: own(&cond.final_layer.scale)?,
            },
        };
        Ok(DenoiseState {
            x: b.upload(x, nx, c.in_channels)?,
            ctx: b.upload(ctx, nc, c.in_channels)?,
            txt: b.upload(inp.txt, lt, c.context_in_dim)?,
            pe: self.pe(inp.txt_ids, inp.img_ids)?,
            cond,
            dt: b.upload(&[dt], 1, 1)?,
        })
    }

    /// Rewrites the state's conditioning and dt with the next step's, in place (the host's work
    /// between two steps).
    pub fn set_step(
        &self,
        s: &mut DenoiseState<B::Tensor>,
        cond: &StepConditioning<B::Tensor>,
        dt: f32,
    ) -> Result<()> {
        let b = &self.backend;
        let triple = |dst: &mut ModulationOut<B::Tensor>, src: &ModulationOut<B::Tensor>| {
            b.copy_into(&mut dst.shift, &src.shift)?;
            b.copy_into(&mut dst.scale, &src.scale)?;
            b.copy_into(&mut dst.gate, &src.gate)
        };
        let cur = &mut s.cond;
        if cur.double_blocks.len() != cond.double_blocks.len()
            || cur.single_blocks.len() != cond.single_blocks.len()
        {
            return Err(shape_err("Flux::set_step", "conditioning of another model"));
        }
        b.copy_into(&mut cur.vec, &cond.vec)?;
        for (d, m) in cur.double_blocks.iter_mut().zip(&cond.double_blocks) {
            triple(&mut d.img_mod1, &m.img_mod1)?;
            triple(&mut d.img_mod2, &m.img_mod2)?;
            triple(&mut d.txt_mod1, &m.txt_mod1)?;
            triple(&mut d.txt_mod2, &m.txt_mod2)?;
        }
        for (d, m) in cur.single_blocks.iter_mut().zip(&cond.single_blocks) {
            triple(d, m)?;
        }
        b.copy_into(&mut cur.final_layer.shift, &cond.final_layer.shift)?;
        b.copy_into(&mut cur.final_layer.scale, &cond.final_layer.scale)?;
        b.write(&mut s.dt, &[dt])
    }

    /// One Euler step on the state, device work only: the velocity of `[x ‖ ctx]` under the
    /// state's conditioning, then `x += dt·v` on the target rows.
    pub fn denoise_step(&self, s: &mut DenoiseState<B::Tensor>) -> Result<()> {
        let b = &self.backend;
        let nx = b.dims(&s.x).0;
        let img = if b.dims(&s.ctx).0 == 0 {
            b.slice_rows(&s.x, 0, nx)?
        } else {
            b.concat_rows(&s.x, &s.ctx)? // [Nx + Nc, in]
        };
        let pred = self.forward_embedded(&img, &s.txt, &s.cond, &s.pe, None)?; // [Ni, out]
        let v = b.slice_rows(&pred, 0, nx)?; // [Nx, out]
        b.euler_step(&mut s.x, &v, &s.dt)
    }

    /// What the denoising loop does to the backend's memory, for a plan pass
    /// ([`Backend::planned`]) to size it: the loop's state, one step, the host's rewrite of the
    /// state between steps. The pipeline's loop, the memory plan and the GPU check plan with it.
    pub fn denoise_plan(
        &self,
        x: &[f32],
        ctx: &[f32],
        inp: &FluxInputs<'_>,
        cond: &StepConditioning<B::Tensor>,
        dt: f32,
    ) -> Result<()> {
        let mut s = self.denoise_state(x, ctx, inp, cond, dt)?;
        self.denoise_step(&mut s)?;
        self.set_step(&mut s, cond, dt)
    }

    /// One forward from host inputs → velocity `[Ni, out]` (all image rows; the sampler keeps the
    /// first `Nx`): the conditioning of `inp.t` alone, then [`Flux::forward_conditioned`]. Calls
    /// `hook` with `vec` and every stage of [`Flux::forward_embedded`].
    pub fn forward(&self, inp: &FluxInputs<'_>, hook: Option<StageHook<'_>>) -> Result<Vec<f32>> {
        let cond = self.conditioning(&[inp.t], inp.guidance, inp.y)?;
        let cond = cond
            .first()
            .ok_or_else(|| shape_err("Flux::forward", "no conditioning for t"))?;
        self.forward_conditioned(inp, cond, hook)
    }

    /// One forward with the step's conditioning already computed (by [`Flux::conditioning`], for
    /// `inp.t`, `inp.guidance` and `inp.y`, which are not read here) → velocity `[Ni, out]`.
    /// Calls `hook` with `vec` and every stage of [`Flux::forward_embedded`].
    pub fn forward_conditioned(
        &self,
        inp: &FluxInputs<'_>,
        cond: &StepConditioning<B::Tensor>,
        mut hook: Option<StageHook<'_>>,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let b = &self.backend;
        let ni = inp.img.len() / c.in_channels.max(1);
        check_len(
            "img",
            inp.img,
            ni,
            c.in_channels,
            format!("[Ni, {}]", c.in_channels),
        )?;
        check_len("img_ids", inp.img_ids, ni, 3, format!("[Ni = {ni}, 3]"))?;
        let lt = self.check_text(inp)?;

        observe(b, &mut hook, || "vec".into(), &cond.vec)?; // [1, D]
        let pe = self.pe(inp.txt_ids, inp.img_ids)?; // [L, Dh]
        let img = b.upload(inp.img, ni, c.in_channels)?; // [Ni, in]
        let txt = b.upload(inp.txt, lt, c.context_in_dim)?; // [Lt, ctx]
        let out = self.forward_embedded(&img, &txt, cond, &pe, hook)?; // [Ni, out]
        b.download(&out)
    }
}

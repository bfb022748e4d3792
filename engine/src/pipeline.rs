//! `Pipeline`: the whole of FLUX.1 Kontext, loaded once, used for any number of edits and
//! generations (spec 2, 3). Each call owns its state; the pipeline itself is read-only, so it is
//! `Send + Sync` and calls may run side by side.

use crate::clip::ClipTextModel;
use crate::cpu::CpuBackend;
use crate::error::{EngineError, Result};
use crate::image::RgbImage;
use crate::model::{Flux, FluxInputs, StageHook};
use crate::request::{initial_noise, plan, EditOptions, NoiseSource};
use crate::sampling::{
    image_ids, pack, prepare_kontext, target_rows, txt_ids, unpack, LatentShape,
};
use crate::schedule::get_schedule;
use crate::t5::T5Encoder;
use crate::tokenizer::{TextTokenizer, Truncation};
use crate::vae::{AutoEncoder, Latent};
use crate::Backend;
use kontext_loader::{load_clip, load_t5, load_transformer, load_vae, ModelPaths, SchedulerConfig};
use kontext_loader::{TransformerOptions, VaeOptions};
use std::time::{Duration, Instant};

/// T5 sequence length: always padded to 512 (spec 5.1).
pub const T5_MAX_LENGTH: usize = 512;
/// CLIP sequence length (spec 5.2).
pub const CLIP_MAX_LENGTH: usize = 77;

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The f32 reference backend.
    Cpu,
    /// NVIDIA GPU (not available yet: the CUDA backend is being built).
    Cuda,
}

/// What a running request reports, in order: text, context image, each step, decode.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    EncodingText,
    EncodingImage,
    /// Step `step` of `steps` (1-based) finished, taking `took`.
    Step {
        step: usize,
        steps: usize,
        took: Duration,
    },
    Decoding,
}

/// The result of one request.
#[derive(Debug, Clone)]
pub struct Output {
    pub image: RgbImage,
    /// Seed used, when the noise came from a seed.
    pub seed: Option<u64>,
    /// Things the user should know: resizing, rounding, prompt truncation.
    pub notes: Vec<String>,
    /// Wall time per stage (`text`, `context`, `denoise`, `decode`).
    pub timings: Vec<(&'static str, Duration)>,
}

/// All four models and both tokenizers, ready to run.
pub struct Pipeline {
    pub flux: Flux<CpuBackend>,
    pub vae: AutoEncoder<CpuBackend>,
    pub t5: T5Encoder<CpuBackend>,
    pub clip: ClipTextModel<CpuBackend>,
    pub t5_tokenizer: TextTokenizer,
    pub clip_tokenizer: TextTokenizer,
    pub scheduler: SchedulerConfig,
}

fn missing(part: &str, root: &str) -> EngineError {
    EngineError::Config(format!(
        "the model has no {part} (looked in {root}); a Kontext model folder holds transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/ and tokenizer_2/"
    ))
}

impl Pipeline {
    /// Loads every part found by [`ModelPaths::discover`] (or given one by one).
    pub fn load(paths: &ModelPaths, device: Device) -> Result<Pipeline> {
        if device == Device::Cuda {
            return Err(EngineError::Config(
                "the CUDA backend is not available in this build yet; use --device cpu".into(),
            ));
        }
        let root = paths
            .transformer
            .as_ref()
            .and_then(|p| p.parent())
            .map_or_else(
                || "the given paths".to_string(),
                |p| p.display().to_string(),
            );
        let need = |p: &Option<std::path::PathBuf>, part: &str| {
            p.clone().ok_or_else(|| missing(part, &root))
        };
        let transformer = load_transformer(
            &need(&paths.transformer, "transformer")?,
            &TransformerOptions::default(),
        )?;
        let vae = load_vae(
            &need(&paths.vae, "autoencoder (vae/ or ae.safetensors)")?,
            &VaeOptions::default(),
        )?;
        let t5 = load_t5(&need(&paths.t5, "T5 encoder (text_encoder_2/)")?)?;
        let clip = load_clip(&need(&paths.clip, "CLIP text model (text_encoder/)")?)?;
        let t5_tokenizer = TextTokenizer::t5(
            &need(&paths.t5_tokenizer, "T5 tokenizer (tokenizer_2/)")?,
            T5_MAX_LENGTH,
        )?;
        let clip_tokenizer = TextTokenizer::clip(
            &need(&paths.clip_tokenizer, "CLIP tokenizer (tokenizer/)")?,
            CLIP_MAX_LENGTH,
        )?;
        let scheduler = match &paths.scheduler {
            Some(p) => SchedulerConfig::read(p)?,
            None => SchedulerConfig::default(),
        };
        let pipeline = Pipeline {
            flux: Flux::from_transformer(CpuBackend, &transformer)?,
            vae: AutoEncoder::from_vae(CpuBackend, &vae)?,
            t5: T5Encoder::from_t5(CpuBackend, &t5)?,
            clip: ClipTextModel::from_clip(CpuBackend, &clip)?,
            t5_tokenizer,
            clip_tokenizer,
            scheduler,
        };
        pipeline.check_compatible()?;
        Ok(pipeline)
    }

    /// The parts must fit together: T5 width = the transformer's text width, CLIP width = its
    /// vector width, 2×2 patches of the VAE latent = its input channels.
    fn check_compatible(&self) -> Result<()> {
        let f = &self.flux.config;
        let z = self.vae.config.z_channels;
        let mut problems = Vec::new();
        if self.t5.config.d_model != f.context_in_dim {
            problems.push(format!(
                "T5 width {} ≠ transformer text width {}",
                self.t5.config.d_model, f.context_in_dim
            ));
        }
        if self.clip.config.hidden_size != f.vec_in_dim {
            problems.push(format!(
                "CLIP width {} ≠ transformer vector width {}",
                self.clip.config.hidden_size, f.vec_in_dim
            ));
        }
        if 4 * z != f.in_channels || 4 * z != f.out_channels {
            problems.push(format!(
                "VAE latent channels {z} × 4 ≠ transformer channels {}/{}",
                f.in_channels, f.out_channels
            ));
        }
        if self.vae.downscale() != 8 {
            problems.push(format!(
                "VAE downscales by {}, Kontext needs 8",
                self.vae.downscale()
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(EngineError::Config(format!(
                "model parts do not fit together: {}",
                problems.join("; ")
            )))
        }
    }

    /// Edits `context` following `prompt`.
    pub fn edit(
        &self,
        context: &RgbImage,
        prompt: &str,
        opts: &EditOptions,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Output> {
        self.run(Some(context), prompt, opts, progress, None)
    }

    /// Generates an image from `prompt` alone.
    pub fn generate(
        &self,
        prompt: &str,
        opts: &EditOptions,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Output> {
        self.run(None, prompt, opts, progress, None)
    }

    fn truncation_note(which: &str, t: &Truncation) -> String {
        format!(
            "prompt truncated for {which}: {} tokens, limit {}; dropped: {:?}",
            t.total_tokens, t.max_length, t.dropped_text
        )
    }

    /// T5 hidden states `[512, d]` and CLIP pooled `[d]` for `prompt`.
    pub fn encode_prompt(
        &self,
        prompt: &str,
        notes: &mut Vec<String>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let t5_ids = self.t5_tokenizer.encode(prompt)?;
        if let Some(t) = &t5_ids.truncation {
            notes.push(Self::truncation_note("T5", t));
        }
        let clip_ids = self.clip_tokenizer.encode(prompt)?;
        if let Some(t) = &clip_ids.truncation {
            notes.push(Self::truncation_note("CLIP", t));
        }
        let txt = self
            .t5
            .backend
            .download(&self.t5.forward(&t5_ids.ids, None)?)?; // [512, d]
        let pooled = self.clip.forward(&clip_ids.ids, None)?.pooled; // [d]
        Ok((txt, pooled))
    }

    /// [`Pipeline::edit`] (with a context) or [`Pipeline::generate`] (without), calling `stages`
    /// with `prompt_embeds` `[512, d]`, `pooled` `[d]`, `image_latents` (packed context tokens
    /// `[Nc, 4z]`), `latents_step{i}` (packed target after step i, 1-based) and `pixels`
    /// `[3, H, W]` (decoder output before clamping), for comparison with the reference.
    pub fn run(
        &self,
        context: Option<&RgbImage>,
        prompt: &str,
        opts: &EditOptions,
        progress: &mut dyn FnMut(&Progress),
        mut stages: Option<StageHook<'_>>,
    ) -> Result<Output> {
        let mut observe = |name: &str, v: &[f32]| {
            if let Some(h) = stages.as_mut() {
                h(name, v);
            }
        };
        let plan = plan(context, opts)?;
        let mut notes = plan.notes.clone();
        let mut timings = Vec::new();
        let z = self.vae.config.z_channels;

        progress(&Progress::EncodingText);
        let t0 = Instant::now();
        let (txt, pooled) = self.encode_prompt(prompt, &mut notes)?; // [Lt, d], [d]
        let lt = txt.len() / self.t5.config.d_model;
        observe("prompt_embeds", &txt);
        observe("pooled", &pooled);
        timings.push(("text", t0.elapsed()));

        let t0 = Instant::now();
        let ctx = match &plan.context {
            Some(img) => {
                progress(&Progress::EncodingImage);
                let latent = self
                    .vae
                    .encode(&img.to_tensor(), img.height, img.width, None)?; // [z, h, w]
                Some(latent)
            }
            None => None,
        };
        timings.push(("context", t0.elapsed()));

        let target = LatentShape {
            channels: z,
            height: plan.height / 8,
            width: plan.width / 8,
        };
        let noise = initial_noise(&opts.noise, z, plan.width, plan.height)?; // [z, H/8, W/8]
        let mut x = pack(&noise, target)?; // [Nx, 4z]
        let nx = target.tokens();
        // Context tokens and all image ids are fixed for the whole loop (spec 2.4).
        let (ctx_img, img_ids) = match &ctx {
            Some(l) => {
                let s = LatentShape {
                    channels: l.channels,
                    height: l.height,
                    width: l.width,
                };
                let k = prepare_kontext(&noise, target, &l.data, s)?;
                observe("image_latents", &k.img[nx * 4 * z..]);
                (k.img[nx * 4 * z..].to_vec(), k.img_ids) // [Nc, 4z], [Nx + Nc, 3]
            }
            None => (
                Vec::new(),
                image_ids(target.height / 2, target.width / 2, 0.0),
            ), // [Nx, 3]
        };
        let schedule = get_schedule(opts.steps, nx, &self.scheduler);
        let ids_txt = txt_ids(lt); // [Lt, 3]
        let t0 = Instant::now();
        for (i, w) in schedule.windows(2).enumerate() {
            let step_start = Instant::now();
            let img = [x.as_slice(), &ctx_img].concat(); // [Nx + Nc, 4z]
            let pred = self.flux.forward(
                &FluxInputs {
                    img: &img,
                    img_ids: &img_ids,
                    txt: &txt,
                    txt_ids: &ids_txt,
                    t: w[0],
                    guidance: opts.guidance,
                    y: &pooled,
                },
                None,
            )?; // [Nx + Nc, 4z]
            let v = target_rows(&pred, nx, 4 * z)?; // [Nx, 4z]
            let dt = w[1] - w[0];
            for (xi, vi) in x.iter_mut().zip(v) {
                *xi += dt * vi;
            }
            observe(&format!("latents_step{}", i + 1), &x);
            progress(&Progress::Step {
                step: i + 1,
                steps: opts.steps,
                took: step_start.elapsed(),
            });
        }
        timings.push(("denoise", t0.elapsed()));

        progress(&Progress::Decoding);
        let t0 = Instant::now();
        let latent = Latent {
            data: unpack(&x, target)?,
            channels: z,
            height: target.height,
            width: target.width,
        };
        let pixels = self.vae.decode(&latent, None)?; // [3, H, W]
        observe("pixels", &pixels);
        let image = RgbImage::from_tensor(&pixels, plan.width, plan.height);
        timings.push(("decode", t0.elapsed()));
        Ok(Output {
            image,
            seed: match opts.noise {
                NoiseSource::Seed(s) => Some(s),
                NoiseSource::Tensor(_) => None,
            },
            notes,
            timings,
        })
    }
}

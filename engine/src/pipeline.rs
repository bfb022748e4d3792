//! `Pipeline`: the whole of FLUX.1 Kontext, loaded once, used for any number of edits and
//! generations (spec 2, 3). Each call owns its state; the pipeline itself is read-only, so it is
//! `Send + Sync` and calls may run side by side (on CUDA each plans its own activation pools; the
//! GPU runs their work in order).
//!
//! The four models run on the CPU reference or the CUDA backend ([`Device`]); the request logic
//! ([`Pipeline::run_with`]) is the same generic code for both. Each stage (text, context, the
//! denoising loop, decode) runs inside [`Backend::planned`]: on CUDA its activations come from
//! one pool sized by a dry run, so the denoising loop allocates no device memory.

use crate::backend::{Placement, WeightTally};
use crate::clip::ClipTextModel;
use crate::cpu::CpuBackend;
use crate::cuda::CudaBackend;
use crate::encoder_backend::EncoderBackend;
use crate::error::{EngineError, Result};
use crate::image::RgbImage;
use crate::memory::{Layout, MemoryOptions, MemoryPlan};
use crate::model::{Flux, FluxInputs, StageHook};
use crate::request::{initial_noise, plan_references, EditOptions, NoiseSource, SizePlan};
use crate::sampling::{
    image_ids, pack, prepare_kontext_refs, txt_ids, unpack, LatentShape, RefLayout,
};
use crate::schedule::get_schedule;
use crate::t5::T5Encoder;
use crate::tokenizer::{TextTokenizer, Truncation};
use crate::vae::{AutoEncoder, Latent};
use kontext_loader::{load_clip, load_t5, load_transformer, load_vae, ModelPaths, SchedulerConfig};
use kontext_loader::{Clip, Transformer, TransformerOptions, Vae, VaeOptions, T5};
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
    /// The first NVIDIA GPU (bf16 activations, f32 accumulation; [`CudaBackend`]).
    Cuda,
}

impl Device {
    /// The device a request runs on: the one asked for, or, when none is, the GPU if `probe`
    /// (`kontext_kernels::cuda_available`, a parameter so the choice is testable anywhere) finds
    /// a usable one and the CPU otherwise, with a note saying why. Asking for CUDA without a
    /// usable GPU is an error that says why.
    pub fn select<I: std::fmt::Display>(
        requested: Option<Device>,
        probe: impl FnOnce() -> std::result::Result<I, String>,
    ) -> Result<(Device, Option<String>)> {
        match requested {
            Some(Device::Cpu) => Ok((Device::Cpu, None)),
            Some(Device::Cuda) => match probe() {
                Ok(_) => Ok((Device::Cuda, None)),
                Err(why) => Err(EngineError::Gpu(kontext_kernels::KernelError::NoGpu(why))),
            },
            None => match probe() {
                Ok(_) => Ok((Device::Cuda, None)),
                Err(why) => Ok((
                    Device::Cpu,
                    Some(format!(
                        "no usable CUDA GPU ({why}); running the f32 reference on the CPU \
                         (slow; --device cpu silences this note)"
                    )),
                )),
            },
        }
    }

    /// `"cpu"` or `"cuda"`.
    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }
}

/// What a running request reports, in order: text, context image, the start of the denoising
/// loop, each step, decode.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    EncodingText,
    EncodingImage,
    /// The denoising loop of `steps` steps starts (its memory is in place).
    Denoising {
        steps: usize,
    },
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

/// The four models on one backend.
pub struct Models<B: EncoderBackend> {
    pub flux: Flux<B>,
    pub vae: AutoEncoder<B>,
    pub t5: T5Encoder<B>,
    pub clip: ClipTextModel<B>,
    /// The backend's weight tally after each part was loaded (cumulative), in load order.
    pub weights_by_part: Vec<(&'static str, WeightTally)>,
}

/// The four parts as the loader opened them: headers read, data mapped, nothing converted.
pub struct Components {
    pub transformer: Transformer,
    pub vae: Vae,
    pub t5: T5,
    pub clip: Clip,
}

impl Components {
    /// Opens every part found in `paths` (a missing one is an error naming it).
    pub fn open(paths: &ModelPaths) -> Result<Components> {
        let root = model_root(paths);
        let need = |p: &Option<std::path::PathBuf>, part: &str| {
            p.clone().ok_or_else(|| missing(part, &root))
        };
        Ok(Components {
            transformer: load_transformer(
                &need(&paths.transformer, "transformer")?,
                &TransformerOptions {
                    axes_dim: paths.axes_dim.clone(),
                },
            )?,
            vae: load_vae(
                &need(&paths.vae, "autoencoder (vae/ or ae.safetensors)")?,
                &VaeOptions::default(),
            )?,
            t5: load_t5(&need(&paths.t5, "T5 encoder (text_encoder_2/)")?)?,
            clip: load_clip(&need(&paths.clip, "CLIP text model (text_encoder/)")?)?,
        })
    }

    /// Parameters of all four.
    pub fn param_count(&self) -> u64 {
        [
            &self.transformer.weights,
            &self.vae.weights,
            &self.t5.weights,
            &self.clip.weights,
        ]
        .iter()
        .map(|c| c.param_count() as u64)
        .sum()
    }
}

/// The models on the device they were loaded for. (One per pipeline: the size difference of the
/// variants does not matter.)
#[allow(clippy::large_enum_variant)]
pub enum Engine {
    Cpu(Models<CpuBackend>),
    Cuda(Models<CudaBackend>),
}

/// All four models and both tokenizers, ready to run.
pub struct Pipeline {
    pub engine: Engine,
    pub t5_tokenizer: TextTokenizer,
    pub clip_tokenizer: TextTokenizer,
    pub scheduler: SchedulerConfig,
    /// On CUDA: the memory plan the weights were placed by, and the device budget it was made
    /// for (None on the CPU).
    pub memory: Option<(MemoryPlan, u64)>,
    /// The last prompt's encoding, so that images from one prompt (`--count`, a batch of seeds)
    /// encode it once: with streamed text encoders a new prompt copies 9.5 GB.
    prompt_cache: std::sync::Mutex<Option<PromptEncoding>>,
    /// CUDA requests run one at a time: they share the GPU's one stream, the fit check counts
    /// the memory left for one request, and a step captured as a CUDA graph must be the only
    /// work queued on the stream while it is captured (another request's launches would land
    /// in the graph). The GPU runs one request's kernels at a time either way.
    cuda_requests: std::sync::Mutex<()>,
}

/// A prompt's T5 and CLIP outputs, the notes its encoding made, and the models they came from.
struct PromptEncoding {
    prompt: String,
    models: usize,
    txt: Vec<f32>,
    pooled: Vec<f32>,
    notes: Vec<String>,
}

fn missing(part: &str, root: &str) -> EngineError {
    EngineError::Config(format!(
        "the model has no {part} (looked in {root}); a Kontext model folder holds transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/ and tokenizer_2/"
    ))
}

/// Where the model files were looked for, for messages.
fn model_root(paths: &ModelPaths) -> String {
    paths
        .transformer
        .as_ref()
        .and_then(|p| p.parent())
        .map_or_else(
            || "the given paths".to_string(),
            |p| p.display().to_string(),
        )
}

impl<B: EncoderBackend + Clone> Models<B> {
    /// Loads the transformer, autoencoder and both text encoders found in `paths` onto `backend`,
    /// every weight resident.
    pub fn load(backend: B, paths: &ModelPaths) -> Result<Models<B>> {
        let c = Components::open(paths)?;
        backend.check_memory(c.param_count())?;
        Models::from_components(backend, &c, &Layout::resident())
    }

    /// Builds the four models from opened parts, each placed as `layout` says.
    pub fn from_components(backend: B, c: &Components, layout: &Layout) -> Result<Models<B>> {
        let mut by_part = Vec::new();
        backend.set_placement(layout.transformer.clone());
        let flux = Flux::from_transformer(backend.clone(), &c.transformer);
        backend.set_placement(Placement::default());
        let flux = flux?;
        by_part.push(("transformer", backend.weight_tally()));
        let vae = AutoEncoder::from_vae(backend.clone(), &c.vae)?;
        by_part.push(("vae", backend.weight_tally()));
        backend.set_placement(layout.text.clone());
        let text = T5Encoder::from_t5(backend.clone(), &c.t5).and_then(|t5| {
            let t = backend.weight_tally();
            Ok((t5, t, ClipTextModel::from_clip(backend.clone(), &c.clip)?))
        });
        backend.set_placement(Placement::default());
        let (t5, t5_tally, clip) = text?;
        by_part.push(("t5", t5_tally));
        by_part.push(("clip", backend.weight_tally()));
        let models = Models {
            flux,
            vae,
            t5,
            clip,
            weights_by_part: by_part,
        };
        models.check_compatible()?;
        Ok(models)
    }
}

impl<B: EncoderBackend> Models<B> {
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
        let v = &self.vae.config;
        if v.in_channels != 3 || v.out_channels != 3 {
            problems.push(format!(
                "VAE has {} input / {} output channels; images are RGB (3)",
                v.in_channels, v.out_channels
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
}

impl Pipeline {
    /// Loads every part found by [`ModelPaths::discover`] (or given one by one) onto `device`
    /// (for CUDA: the first GPU, its kernels compiled or taken from the cache).
    pub fn load(paths: &ModelPaths, device: Device) -> Result<Pipeline> {
        Pipeline::load_with(paths, device, &MemoryOptions::default(), None)
    }

    /// [`Pipeline::load`] with the device-memory plan made for `design` (the request the
    /// placement is chosen for: its sizes and steps; default a 1024² edit with one reference,
    /// 28 steps) under `memory`'s options ([`crate::memory`]). On CUDA the plan is made before
    /// any weight moves to the device; a request that fits in no mode is an error here.
    pub fn load_with(
        paths: &ModelPaths,
        device: Device,
        memory: &MemoryOptions,
        design: Option<(&SizePlan, usize)>,
    ) -> Result<Pipeline> {
        // The cheap parts first: a broken tokenizer or scheduler config costs no model load.
        let root = model_root(paths);
        let need = |p: &Option<std::path::PathBuf>, part: &str| {
            p.clone().ok_or_else(|| missing(part, &root))
        };
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
        let (engine, plan) = match device {
            Device::Cpu => (Engine::Cpu(Models::load(CpuBackend, paths)?), None),
            Device::Cuda => {
                let c = Components::open(paths)?;
                let backend = CudaBackend::new(0)?;
                let budget = crate::memory::device_budget(&backend, memory.vram)?;
                let default_design;
                let (sizes, steps) = match design {
                    Some(d) => d,
                    None => {
                        default_design = crate::memory::default_design()?;
                        (&default_design, 28)
                    }
                };
                let cc = backend.gpu().map(|g| g.info.compute_capability);
                let (mut plans, chosen) =
                    crate::memory::choose(&c, sizes, steps, memory, Some(budget), cc)?;
                let plan = plans.swap_remove(chosen.unwrap_or(0));
                crate::memory::check_host(&plan, crate::memory::host_available())?;
                let models = Models::from_components(backend.clone(), &c, &plan.layout)?;
                backend.prepare_streaming()?;
                (Engine::Cuda(models), Some((plan, budget)))
            }
        };
        let pipeline = Pipeline {
            engine,
            t5_tokenizer,
            clip_tokenizer,
            scheduler,
            memory: plan,
            prompt_cache: std::sync::Mutex::new(None),
            cuda_requests: std::sync::Mutex::new(()),
        };
        pipeline.check_tokenizers()?;
        Ok(pipeline)
    }

    /// Every id a tokenizer can produce must have an embedding row, and CLIP's padded length
    /// must fit its position table; otherwise some prompts would fail mid-request.
    fn check_tokenizers(&self) -> Result<()> {
        let (t5, clip) = match &self.engine {
            Engine::Cpu(m) => (&m.t5.config, &m.clip.config),
            Engine::Cuda(m) => (&m.t5.config, &m.clip.config),
        };
        let mut problems = Vec::new();
        if self.t5_tokenizer.vocab_size() > t5.vocab_size {
            problems.push(format!(
                "the T5 tokenizer has {} tokens but the T5 encoder embeds only {}",
                self.t5_tokenizer.vocab_size(),
                t5.vocab_size
            ));
        }
        if self.clip_tokenizer.vocab_size() > clip.vocab_size {
            problems.push(format!(
                "the CLIP tokenizer has {} tokens but the CLIP text model embeds only {}",
                self.clip_tokenizer.vocab_size(),
                clip.vocab_size
            ));
        }
        if CLIP_MAX_LENGTH > clip.max_positions {
            problems.push(format!(
                "CLIP prompts are padded to {CLIP_MAX_LENGTH} tokens but the text model has {} positions",
                clip.max_positions
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(EngineError::Config(format!(
                "tokenizers and text encoders do not fit together: {}",
                problems.join("; ")
            )))
        }
    }

    /// The most device memory held at once since load began (the GPU's allocation counter);
    /// None on the CPU.
    pub fn gpu_peak_bytes(&self) -> Option<u64> {
        match &self.engine {
            Engine::Cuda(m) => m.flux.backend.gpu().map(|g| g.peak_bytes()),
            Engine::Cpu(_) => None,
        }
    }

    /// CUDA launches per kernel so far (the kernels launched at least once); None on the CPU.
    pub fn launch_counts(&self) -> Option<Vec<(&'static str, u64)>> {
        match &self.engine {
            Engine::Cuda(m) => Some(
                m.flux
                    .backend
                    .launch_counts()
                    .into_iter()
                    .filter(|(_, n)| *n > 0)
                    .collect(),
            ),
            Engine::Cpu(_) => None,
        }
    }

    /// Denoising steps captured as CUDA graphs so far and replays of them; None on the CPU.
    pub fn graph_stats(&self) -> Option<(u64, u64)> {
        match &self.engine {
            Engine::Cuda(m) => Some(m.flux.backend.graph_stats()),
            Engine::Cpu(_) => None,
        }
    }

    /// The device the models run on.
    pub fn device(&self) -> Device {
        match self.engine {
            Engine::Cpu(_) => Device::Cpu,
            Engine::Cuda(_) => Device::Cuda,
        }
    }

    /// The transformer's config.
    pub fn flux_config(&self) -> &kontext_loader::FluxConfig {
        match &self.engine {
            Engine::Cpu(m) => &m.flux.config,
            Engine::Cuda(m) => &m.flux.config,
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

    /// Edits following `prompt` with several context images, in order, placed by `layout`
    /// ([`RefLayout`]); the output size defaults to the first one's. One reference is exactly
    /// [`Pipeline::edit`], none [`Pipeline::generate`].
    pub fn edit_references(
        &self,
        references: &[&RgbImage],
        layout: RefLayout,
        prompt: &str,
        opts: &EditOptions,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Output> {
        self.run_references(references, layout, prompt, opts, progress, None)
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
        // The dropped text can be the whole of a huge prompt; its start says enough.
        const SHOWN: usize = 160;
        let mut dropped: String = t.dropped_text.chars().take(SHOWN).collect();
        if t.dropped_text.chars().count() > SHOWN {
            dropped.push('…');
        }
        format!(
            "prompt truncated for {which}: {} tokens, limit {}; dropped: {dropped:?}",
            t.total_tokens, t.max_length
        )
    }

    /// T5 hidden states `[512, d]` and CLIP pooled `[d]` for `prompt`.
    pub fn encode_prompt(
        &self,
        prompt: &str,
        notes: &mut Vec<String>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        match &self.engine {
            Engine::Cpu(m) => self.encode_prompt_with(m, prompt, notes),
            Engine::Cuda(m) => self.encode_prompt_with(m, prompt, notes),
        }
    }

    /// [`Pipeline::encode_prompt`] on the given models.
    pub fn encode_prompt_with<B: EncoderBackend>(
        &self,
        m: &Models<B>,
        prompt: &str,
        notes: &mut Vec<String>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let _turn = self.gpu_turn(m);
        self.encode_prompt_inner(m, prompt, notes)
    }

    /// CUDA work of this pipeline runs one request at a time (see `cuda_requests`): the lock
    /// for work on `m` when it is on CUDA, none on the CPU.
    fn gpu_turn<B: EncoderBackend>(&self, m: &Models<B>) -> Option<std::sync::MutexGuard<'_, ()>> {
        (m.flux.backend.name() == "cuda")
            .then(|| self.cuda_requests.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn encode_prompt_inner<B: EncoderBackend>(
        &self,
        m: &Models<B>,
        prompt: &str,
        notes: &mut Vec<String>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        // Only the pipeline's own models are cached: they live as long as it does (others, run
        // with these tokenizers through `run_with`, may be dropped and their address reused).
        let models = m as *const Models<B> as usize;
        let own = match &self.engine {
            Engine::Cpu(mm) => mm as *const Models<CpuBackend> as usize,
            Engine::Cuda(mm) => mm as *const Models<CudaBackend> as usize,
        };
        if let Some(c) = self
            .prompt_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|c| c.prompt == prompt && c.models == models)
        {
            notes.extend(c.notes.iter().cloned());
            return Ok((c.txt.clone(), c.pooled.clone()));
        }
        let first_note = notes.len();
        let t5_ids = self.t5_tokenizer.encode(prompt)?;
        if let Some(t) = &t5_ids.truncation {
            notes.push(Self::truncation_note("T5", t));
        }
        let clip_ids = self.clip_tokenizer.encode(prompt)?;
        if let Some(t) = &clip_ids.truncation {
            notes.push(Self::truncation_note("CLIP", t));
        }
        let (t5, clip) = (&m.t5, &m.clip);
        let txt = t5
            .backend
            .planned(&mut || t5.forward(&t5_ids.ids, None).map(drop), &mut || {
                t5.backend.download(&t5.forward(&t5_ids.ids, None)?)
            })?; // [512, d]
        let pooled = clip.backend.planned(
            &mut || clip.forward(&clip_ids.ids, None).map(drop),
            &mut || Ok(clip.forward(&clip_ids.ids, None)?.pooled),
        )?; // [d]
        if models == own {
            *self.prompt_cache.lock().unwrap_or_else(|e| e.into_inner()) = Some(PromptEncoding {
                prompt: prompt.to_string(),
                models,
                txt: txt.clone(),
                pooled: pooled.clone(),
                notes: notes[first_note..].to_vec(),
            });
        }
        Ok((txt, pooled))
    }

    /// [`Pipeline::edit`] (with a context) or [`Pipeline::generate`] (without), calling `stages`
    /// with `prompt_embeds` `[512, d]`, `pooled` `[d]`, `image_latents` (packed context tokens
    /// `[Nc, 4z]`), `latents_step{i}` (packed target after step i, 1-based; `latents_step0` the
    /// initial noise) and `pixels`
    /// `[3, H, W]` (decoder output before clamping), for comparison with the reference.
    pub fn run(
        &self,
        context: Option<&RgbImage>,
        prompt: &str,
        opts: &EditOptions,
        progress: &mut dyn FnMut(&Progress),
        stages: Option<StageHook<'_>>,
    ) -> Result<Output> {
        self.run_references(
            context.as_slice(),
            RefLayout::Offset,
            prompt,
            opts,
            progress,
            stages,
        )
    }

    /// [`Pipeline::run`] with any number of context images (none: text-to-image), placed by
    /// `layout`; `image_latents` is then every reference's packed tokens in order `[ΣNc, 4z]`,
    /// and `img_ids` `[Nx + ΣNc, 3]` the ids the transformer gets.
    pub fn run_references(
        &self,
        references: &[&RgbImage],
        layout: RefLayout,
        prompt: &str,
        opts: &EditOptions,
        progress: &mut dyn FnMut(&Progress),
        stages: Option<StageHook<'_>>,
    ) -> Result<Output> {
        match &self.engine {
            Engine::Cpu(m) => self.run_inner(m, references, layout, prompt, opts, progress, stages),
            Engine::Cuda(m) => {
                // The fit check and the run in one turn: no other request takes the memory
                // between them.
                let _turn = self.gpu_turn(m);
                // Sizes only: the run resizes the references itself.
                let dims: Vec<(usize, usize)> =
                    references.iter().map(|r| (r.width, r.height)).collect();
                let sizes = crate::request::plan_sizes(&dims, opts)?;
                self.check_fits(m, &sizes, opts.steps)?;
                self.run_inner(m, references, layout, prompt, opts, progress, stages)
            }
        }
    }

    /// Before a CUDA request starts: its largest stage's activation pools must fit in the
    /// device memory the loaded weights leave (the free memory now, and within the budget the
    /// weights were placed for), else an error naming both and what would make it fit.
    pub fn check_fits(
        &self,
        m: &Models<CudaBackend>,
        sizes: &SizePlan,
        steps: usize,
    ) -> Result<()> {
        let b = &m.flux.backend;
        let Some(gpu) = b.gpu() else {
            return Ok(());
        };
        let pools = crate::memory::stage_pools(m, sizes, steps)?;
        let (stage, need) = pools
            .by_stage()
            .into_iter()
            .max_by_key(|s| s.1)
            .unwrap_or(("", 0));
        let (free, total) = gpu.mem_info()?;
        let mut avail = (free as u64).saturating_sub(crate::memory::headroom(total as u64));
        if let Some((_, budget)) = &self.memory {
            avail = avail.min(budget.saturating_sub(gpu.in_use_bytes()));
        }
        if need > avail {
            let mode = self
                .memory
                .as_ref()
                .map_or("resident", |(p, _)| p.mode().name());
            return Err(EngineError::Config(format!(
                "this request does not fit: its {stage} stage needs {} of activations beside the loaded weights ({} held, memory mode {mode}), and {} is free. HINT: a smaller output size, fewer or smaller context images, or load with a smaller --vram / --memory-mode stream to leave more room",
                crate::memory::gib(need),
                crate::memory::gib(gpu.in_use_bytes()),
                crate::memory::gib(avail)
            )));
        }
        Ok(())
    }

    /// [`Pipeline::run`] on the given models (those of this pipeline, or the same files on
    /// another backend), with this pipeline's tokenizers and scheduler.
    pub fn run_with<B: EncoderBackend>(
        &self,
        m: &Models<B>,
        context: Option<&RgbImage>,
        prompt: &str,
        opts: &EditOptions,
        progress: &mut dyn FnMut(&Progress),
        stages: Option<StageHook<'_>>,
    ) -> Result<Output> {
        let refs = context.as_slice();
        self.run_references_with(m, refs, RefLayout::Offset, prompt, opts, progress, stages)
    }

    /// [`Pipeline::run_references`] on the given models.
    #[allow(clippy::too_many_arguments)]
    pub fn run_references_with<B: EncoderBackend>(
        &self,
        m: &Models<B>,
        references: &[&RgbImage],
        layout: RefLayout,
        prompt: &str,
        opts: &EditOptions,
        progress: &mut dyn FnMut(&Progress),
        stages: Option<StageHook<'_>>,
    ) -> Result<Output> {
        let _turn = self.gpu_turn(m);
        self.run_inner(m, references, layout, prompt, opts, progress, stages)
    }

    #[allow(clippy::too_many_arguments)]
    fn run_inner<B: EncoderBackend>(
        &self,
        m: &Models<B>,
        references: &[&RgbImage],
        layout: RefLayout,
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
        let plan = plan_references(references, opts)?;
        let mut notes = plan.notes.clone();
        let mut timings = Vec::new();
        let z = m.vae.config.z_channels;

        progress(&Progress::EncodingText);
        let t0 = Instant::now();
        let (txt, pooled) = self
            .encode_prompt_inner(m, prompt, &mut notes)
            .map_err(|e| e.in_stage("text encoding"))?; // [Lt, d], [d]
        let lt = txt.len() / m.t5.config.d_model;
        observe("prompt_embeds", &txt);
        observe("pooled", &pooled);
        timings.push(("text", t0.elapsed()));

        let t0 = Instant::now();
        if !plan.references.is_empty() {
            progress(&Progress::EncodingImage);
        }
        let mut ctx = Vec::with_capacity(plan.references.len());
        for img in &plan.references {
            let pixels = img.to_tensor(); // [3, H_k, W_k]
            let vae = &m.vae;
            let encode = || vae.encode(&pixels, img.height, img.width, None);
            // Each reference its own planned stage: its pool fits its size.
            let latent = vae
                .backend
                .planned(&mut || encode().map(drop), &mut || encode())
                .map_err(|e| e.in_stage("context encoding"))?; // [z, h_k, w_k]
            ctx.push(latent);
        }
        timings.push(("context", t0.elapsed()));

        let target = LatentShape {
            channels: z,
            height: plan.height / 8,
            width: plan.width / 8,
        };
        let noise = initial_noise(&opts.noise, z, plan.width, plan.height)?; // [z, H/8, W/8]
        let x = pack(&noise, target)?; // [Nx, 4z]
        let nx = target.tokens();
        // Context tokens and all image ids are fixed for the whole loop (spec 2.4).
        let (ctx_img, img_ids) = if ctx.is_empty() {
            (
                Vec::new(),
                image_ids(target.height / 2, target.width / 2, 0.0),
            ) // [Nx, 3]
        } else {
            let latents: Vec<(&[f32], LatentShape)> = ctx
                .iter()
                .map(|l| {
                    let s = LatentShape {
                        channels: l.channels,
                        height: l.height,
                        width: l.width,
                    };
                    (l.data.as_slice(), s)
                })
                .collect();
            let k = prepare_kontext_refs(&noise, target, &latents, layout)?;
            observe("image_latents", &k.img[nx * 4 * z..]);
            (k.img[nx * 4 * z..].to_vec(), k.img_ids) // [ΣNc, 4z], [Nx + ΣNc, 3]
        };
        observe("img_ids", &img_ids);
        observe("latents_step0", &x);
        let schedule = get_schedule(opts.steps, nx, &self.scheduler);
        let ids_txt = txt_ids(lt); // [Lt, 3]
        let flux = &m.flux;
        let base = FluxInputs {
            img: &[],
            img_ids: &img_ids,
            txt: &txt,
            txt_ids: &ids_txt,
            t: 1.0,
            guidance: opts.guidance,
            y: &pooled,
        };
        let t0 = Instant::now();
        // vec and every block's modulation depend only on (t, guidance, y): all steps at once,
        // before the loop, in memory of their own (one pool on CUDA) that outlives the loop's.
        let timesteps = &schedule[..schedule.len() - 1]; // t of each step
        let conditioning = flux
            .backend
            .planned(
                &mut || {
                    flux.conditioning(timesteps, opts.guidance, &pooled)
                        .map(drop)
                },
                &mut || flux.conditioning(timesteps, opts.guidance, &pooled),
            )
            .map_err(|e| e.in_stage("conditioning"))?; // steps × (vec and every modulation chunk, [1, D] each)
        let first_cond = conditioning
            .first()
            .ok_or_else(|| EngineError::Config("a denoising loop of 0 steps".into()))?;
        // Every step has the shapes of the first: plan it, then loop in its memory. The loop's
        // state lives on the device from the first step to the last; a step is device work only
        // (recorded once and replayed on CUDA, Backend::repeat); between steps the host writes
        // the next step's conditioning and dt into the state and reads the latents back.
        let dts: Vec<f32> = schedule.windows(2).map(|w| w[1] - w[0]).collect();
        let mut plan_step = || flux.denoise_plan(&x, &ctx_img, &base, first_cond, dts[0]);
        let mut denoise = || -> Result<Vec<f32>> {
            progress(&Progress::Denoising { steps: opts.steps });
            let state = flux.denoise_state(&x, &ctx_img, &base, first_cond, dts[0])?;
            let s = std::cell::RefCell::new(state);
            let mut latents = Vec::new();
            let mut step_start = Instant::now();
            flux.backend.repeat(
                opts.steps,
                &mut || flux.denoise_step(&mut s.borrow_mut()),
                &mut |i| {
                    let mut s = s.borrow_mut();
                    latents = flux.backend.download(&s.x)?;
                    if let Some(j) = latents.iter().position(|v| !v.is_finite()) {
                        return Err(EngineError::Config(format!(
                            "the latent became non-finite at step {} (value {j}); the transformer weights or config are broken",
                            i + 1
                        )));
                    }
                    observe(&format!("latents_step{}", i + 1), &latents);
                    if let Some(next) = conditioning.get(i + 1) {
                        flux.set_step(&mut s, next, dts[i + 1])?;
                    }
                    progress(&Progress::Step {
                        step: i + 1,
                        steps: opts.steps,
                        took: step_start.elapsed(),
                    });
                    step_start = Instant::now();
                    Ok(())
                },
            )?;
            Ok(latents)
        };
        let x = flux
            .backend
            .planned(&mut plan_step, &mut denoise)
            .map_err(|e| e.in_stage("denoising"))?;
        timings.push(("denoise", t0.elapsed()));

        progress(&Progress::Decoding);
        let t0 = Instant::now();
        let latent = Latent {
            data: unpack(&x, target)?,
            channels: z,
            height: target.height,
            width: target.width,
        };
        let vae = &m.vae;
        let pixels = vae
            .backend
            .planned(&mut || vae.decode(&latent, None).map(drop), &mut || {
                vae.decode(&latent, None)
            })
            .map_err(|e| e.in_stage("decoding"))?; // [3, H, W]
        observe("pixels", &pixels);
        let image = RgbImage::from_tensor(&pixels, plan.width, plan.height)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu() -> std::result::Result<&'static str, String> {
        Ok("GPU 0: H100")
    }

    fn no_gpu() -> std::result::Result<&'static str, String> {
        Err("the NVIDIA driver library (libcuda.so.1) is not installed".into())
    }

    #[test]
    fn device_selection_follows_the_request_and_the_probe() {
        // Asked for: the CPU needs no probe; CUDA needs a GPU and says why there is none.
        let cpu = Device::select(Some(Device::Cpu), || -> std::result::Result<&str, _> {
            panic!("the CPU must not probe for a GPU")
        });
        assert_eq!(cpu.unwrap(), (Device::Cpu, None));
        assert_eq!(
            Device::select(Some(Device::Cuda), gpu).unwrap(),
            (Device::Cuda, None)
        );
        let err = Device::select(Some(Device::Cuda), no_gpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no usable CUDA GPU") && err.contains("libcuda.so.1"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
        // Not asked for: the GPU when there is one, else the CPU with a note saying why.
        assert_eq!(Device::select(None, gpu).unwrap(), (Device::Cuda, None));
        let (device, note) = Device::select(None, no_gpu).unwrap();
        assert_eq!(device, Device::Cpu);
        let note = note.expect("falling back to the CPU is noted");
        assert!(
            note.contains("libcuda.so.1") && note.contains("CPU"),
            "{note}"
        );
    }

    #[test]
    fn loading_for_cuda_without_a_gpu_is_an_error_not_a_panic() {
        if kontext_kernels::cuda_available().is_ok() {
            return; // a GPU machine: the GPU check loads for CUDA
        }
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/pipeline/tiny-kontext"
        );
        let paths = ModelPaths::discover(std::path::Path::new(dir)).unwrap();
        let err = match Pipeline::load(&paths, Device::Cuda) {
            Ok(_) => panic!("loaded for CUDA without a GPU"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("no usable CUDA GPU"), "{err}");
    }
}

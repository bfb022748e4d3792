//! kontext-fast: FLUX.1 Kontext [dev] from the command line. Thin: parse flags, call the
//! loader / engine, print or write the result.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use kontext_engine::image::RgbImage;
use kontext_engine::lora::LoraSpec;
use kontext_engine::memory::{choose, gib, MemoryOptions, MemoryPlan, Mode, WeightType};
use kontext_engine::pipeline::{Components, Device, Pipeline, Progress};
use kontext_engine::request::{
    plan_sizes, read_noise_file, EditOptions, NoiseSource, ResizePolicy,
};
use kontext_engine::sampling::RefLayout;
use kontext_loader::{open_component, AnyComponent, ModelPaths, ModelSources, TransformerOptions};
use progress::{Reporter, Verbosity};
use std::path::{Path, PathBuf};
use std::time::Instant;

mod progress;

#[derive(Parser)]
#[command(
    name = "kontext-fast",
    version,
    about = "FLUX.1 Kontext [dev]: edit an image from a text instruction, or generate from text",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Show what a checkpoint file or model folder holds: layout, config, dtypes, sizes, problems.
    Inspect {
        /// A model folder (with model_index.json or component sub-folders), a component folder
        /// (transformer/, vae/, text_encoder/, text_encoder_2/) or a single .safetensors file.
        /// Or none, with the component flags: which file serves each part, and what it holds.
        path: Option<PathBuf>,
        #[command(flatten)]
        sources: SourceArgs,
    },
}

/// Where the model's parts are: a Hugging Face folder, component files, a ComfyUI install.
#[derive(clap::Args, Clone, Default)]
struct SourceArgs {
    /// Model folder (as downloaded from black-forest-labs/FLUX.1-Kontext-dev). Optional when the
    /// four component files and the tokenizers are given otherwise.
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// The transformer as one file (bf16, fp16, f32, fp8, ComfyUI scaled fp8), e.g.
    /// flux1-dev-kontext_fp8_scaled.safetensors; replaces --model's. With --comfyui a bare name
    /// is looked up in models/diffusion_models/ (or models/unet/).
    #[arg(long, alias = "diffusion_model", value_name = "FILE")]
    diffusion_model: Option<PathBuf>,
    /// The autoencoder file (ae.safetensors); with --comfyui a bare name is looked up in
    /// models/vae/.
    #[arg(long, value_name = "FILE")]
    vae: Option<PathBuf>,
    /// The CLIP-L text encoder file (clip_l.safetensors); with --comfyui a bare name is looked up
    /// in models/text_encoders/ (or models/clip/).
    #[arg(long, alias = "clip_l", value_name = "FILE")]
    clip_l: Option<PathBuf>,
    /// The T5-XXL encoder file (t5xxl_fp16.safetensors, t5xxl_fp8_e4m3fn_scaled.safetensors);
    /// with --comfyui a bare name is looked up in models/text_encoders/ (or models/clip/).
    #[arg(long, value_name = "FILE")]
    t5xxl: Option<PathBuf>,
    /// A folder holding the two tokenizers as the Hugging Face model has them: tokenizer/ (CLIP)
    /// and tokenizer_2/ (T5).
    #[arg(long, value_name = "DIR")]
    tokenizers: Option<PathBuf>,
    /// A ComfyUI install: bare component names are found in its models/ folders, and the
    /// tokenizers it ships (comfy/sd1_tokenizer, comfy/text_encoders/t5_tokenizer) are used.
    #[arg(long, value_name = "DIR")]
    comfyui: Option<PathBuf>,
    /// RoPE axes split of a single-file transformer whose head dim is not 128 (e.g. 4,6,6; the
    /// real model's 128 needs none).
    #[arg(long, value_delimiter = ',')]
    axes_dim: Option<Vec<usize>>,
}

impl SourceArgs {
    fn sources(&self) -> ModelSources {
        ModelSources {
            model: self.model.clone(),
            diffusion_model: self.diffusion_model.clone(),
            vae: self.vae.clone(),
            clip_l: self.clip_l.clone(),
            t5xxl: self.t5xxl.clone(),
            tokenizers: self.tokenizers.clone(),
            comfyui: self.comfyui.clone(),
        }
    }

    fn any_component(&self) -> bool {
        self.diffusion_model.is_some()
            || self.vae.is_some()
            || self.clip_l.is_some()
            || self.t5xxl.is_some()
            || self.tokenizers.is_some()
            || self.comfyui.is_some()
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ResizeArg {
    /// Snap the context image to the closest preferred Kontext resolution (about 1 MP).
    Preferred,
    /// Keep its size, floored to a multiple of 16.
    None,
}

#[derive(Clone, Copy, ValueEnum)]
enum RefLayoutArg {
    /// ComfyUI's default: every context image at index 1, each placed right of or below the
    /// ones before it.
    Offset,
    /// Context image k at index k + 1, all at the same spatial positions.
    Index,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    sources: SourceArgs,
    /// Context image to edit (PNG, JPEG, WebP); repeat for several, in order (the output size
    /// defaults to the first's). Without it, generate from the prompt alone.
    #[arg(long)]
    image: Vec<PathBuf>,
    /// How several context images are placed (RoPE positions); Kontext dev was trained with one.
    #[arg(long, value_enum, default_value = "offset")]
    ref_layout: RefLayoutArg,
    /// The instruction (edit) or description (generation).
    #[arg(long)]
    prompt: Option<String>,
    /// Output image (.png, .jpg); written atomically, never over the input image.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Output width (multiple of 16; default: the context's width, or 1024).
    #[arg(long)]
    width: Option<usize>,
    /// Output height (multiple of 16; default: the context's height, or 1024).
    #[arg(long)]
    height: Option<usize>,
    #[arg(long, default_value_t = 28)]
    steps: usize,
    /// Distilled guidance (the guidance embedding's input).
    #[arg(long, default_value_t = 2.5)]
    guidance: f32,
    /// Noise seed (PyTorch-compatible CPU generator); random when neither this nor --noise.
    #[arg(long, conflicts_with = "noise")]
    seed: Option<u64>,
    /// Starting noise: safetensors with one f32 tensor `noise` [1, C, H/8, W/8].
    #[arg(long)]
    noise: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "preferred")]
    resize: ResizeArg,
    /// cpu (f32 reference) or cuda; default: cuda when available, else cpu.
    #[arg(long, value_enum)]
    device: Option<DeviceArg>,
    /// A LoRA for the transformer, at a strength (default 1.0; 0.5 = half its effect); repeat
    /// for several. Kohya / sd-scripts, ComfyUI / BFL, PEFT / diffusers, AI-Toolkit and fal
    /// Kontext files are recognised from their keys; a key that fits no layer is an error.
    #[arg(long, value_name = "FILE[:STRENGTH]", value_parser = LoraSpec::parse)]
    lora: Vec<LoraSpec>,
    /// Make N images from one load, with seeds S, S+1, …: the output name takes `{seed}`
    /// (out-{seed}.png), else gets -SEED before its extension.
    #[arg(long, default_value_t = 1, value_name = "N")]
    count: usize,
    /// Print nothing but errors (no stages, no progress, no notes).
    #[arg(long)]
    quiet: bool,
    /// Print a machine-readable summary on stdout.
    #[arg(long)]
    json: bool,
    /// Plan for a GPU of this much memory (GiB, or with a unit: 12G, 800M) instead of the free
    /// memory of the one present; with --dry-run, plan for such a device where there is none.
    #[arg(long, value_name = "GB", value_parser = parse_vram)]
    vram: Option<u64>,
    /// The transformer's weights on the GPU: bf16, or fp8 (e4m3, quantised at load when the
    /// file is not fp8). Default: as stored when everything fits, else fp8.
    #[arg(long, value_name = "bf16|fp8", value_parser = WeightType::parse)]
    weights: Option<WeightType>,
    /// Force a memory mode: resident (everything on the GPU), fp8 (transformer fp8, text
    /// encoders streamed from host memory), stream (also modulation and as many blocks as
    /// needed streamed). Default: the first that fits.
    #[arg(long, value_name = "MODE", value_parser = Mode::parse)]
    memory_mode: Option<Mode>,
    /// Print the request's memory plan (tokens, FLOPs per step, peak per mode, the mode
    /// --vram would get) without loading any weight; reads only the files' headers and needs
    /// no GPU, prompt or output.
    #[arg(long)]
    dry_run: bool,
}

/// `--vram`: a number of GiB, or a number with a unit K, M, G (binary).
fn parse_vram(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let (num, unit) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => (&t[..i], t[i..].trim_end_matches(['B', 'b', 'i'])),
        None => (t, "G"),
    };
    let mult = match unit.to_ascii_uppercase().as_str() {
        "K" => 1u64 << 10,
        "M" => 1 << 20,
        "G" | "" => 1 << 30,
        _ => {
            return Err(format!(
                "--vram {s}: expected GiB, or a size such as 12G or 800M"
            ))
        }
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("--vram {s}: expected GiB, or a size such as 12G or 800M"))?;
    if !(v > 0.0 && v * (mult as f64) < 1e15) {
        return Err(format!("--vram {s}: give a size between 1 byte and 1 PB"));
    }
    Ok((v * mult as f64) as u64)
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Inspect { path, sources }) => inspect(path.as_deref(), &sources),
        None => run(&cli.run),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn run(args: &RunArgs) -> Result<()> {
    let src = &args.sources;
    if src.model.is_none() && !src.any_component() {
        bail!(
            "--model DIR is required, or the component files (--diffusion-model, --vae, --clip-l, \
             --t5xxl) with the tokenizers (--tokenizers DIR or --comfyui DIR); see --help \
             (or `kontext-fast inspect PATH`)"
        );
    }
    let verbosity = Verbosity::detect(args.quiet);
    if args.dry_run {
        return dry_run(args);
    }
    let Some(prompt) = &args.prompt else {
        bail!("--prompt is required");
    };
    let Some(output) = &args.output else {
        bail!("--output PATH is required (.png or .jpg)");
    };
    // Check the output before minutes of work, not after.
    let ext = output
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    if !matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg")) {
        bail!(
            "{}: output must end in .png, .jpg or .jpeg",
            output.display()
        );
    }
    if args.count == 0 || args.count > MAX_COUNT {
        bail!(
            "--count {}: give 1 to {MAX_COUNT} images per run",
            args.count
        );
    }
    let requested = args.device.map(|d| match d {
        DeviceArg::Cuda => Device::Cuda,
        DeviceArg::Cpu => Device::Cpu,
    });
    // The GPU found is named (an emulated one says so: scripts/emulated), so that a run can
    // never be mistaken for one on other hardware.
    let mut gpu = None;
    let (device, note) = Device::select(requested, || {
        let info = kontext_kernels::cuda_available();
        gpu = info.as_ref().ok().map(|i| i.to_string());
        info
    })
    .context("--device cuda")?;
    let mut rep = Reporter::new(verbosity, device.name());
    if let Some(note) = note {
        rep.line(&format!("note: {note}"));
    }
    let gpu = gpu.filter(|_| device == Device::Cuda);
    if let Some(gpu) = &gpu {
        rep.line(&format!("note: running on {gpu}"));
    }
    let several = args.image.len() > 1;
    let references = args
        .image
        .iter()
        .enumerate()
        .map(|(k, path)| {
            RgbImage::open(path).with_context(|| match several {
                true => format!("--image #{}", k + 1),
                false => "--image".to_string(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let layout = match args.ref_layout {
        RefLayoutArg::Offset => RefLayout::Offset,
        RefLayoutArg::Index => RefLayout::Index,
    };
    let noise = match (&args.noise, args.seed) {
        (Some(path), _) => {
            let (values, dims) = read_noise_file(path)?;
            if let (Some(w), Some(h)) = (args.width, args.height) {
                if dims[1] * 8 != h || dims[2] * 8 != w {
                    bail!(
                        "{}: noise is for a {}×{} output but --width/--height ask for {w}×{h}",
                        path.display(),
                        dims[2] * 8,
                        dims[1] * 8
                    );
                }
            }
            (NoiseSource::Tensor(values), Some(dims))
        }
        (None, Some(seed)) => (NoiseSource::Seed(seed), None),
        (None, None) => {
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64 & 0xffff_ffff)
                .unwrap_or(0);
            (NoiseSource::Seed(seed), None)
        }
    };
    let (noise, noise_dims) = noise;
    let opts = EditOptions {
        steps: args.steps,
        guidance: args.guidance,
        noise,
        // A noise file fixes the output size.
        width: args.width.or(noise_dims.map(|d| d[2] * 8)),
        height: args.height.or(noise_dims.map(|d| d[1] * 8)),
        resize: match args.resize {
            ResizeArg::Preferred => ResizePolicy::Preferred,
            ResizeArg::None => ResizePolicy::None,
        },
    };
    // Everything about the request that can be wrong is checked before the model loads.
    opts.validate()?;
    let sizes: Vec<(usize, usize)> = references.iter().map(|r| (r.width, r.height)).collect();
    let design = plan_sizes(&sizes, &opts)?;

    let base_seed = match &opts.noise {
        NoiseSource::Seed(seed) => Some(*seed),
        NoiseSource::Tensor(_) if args.count > 1 => {
            bail!("--count {} with --noise would make the same image {0} times; use --seed S (seeds S, S+1, …)", args.count)
        }
        NoiseSource::Tensor(_) => None,
    };
    let outputs: Vec<(PathBuf, Option<u64>)> = (0..args.count as u64)
        .map(|i| {
            let seed = match base_seed {
                Some(s) => Some(s.checked_add(i).with_context(|| {
                    format!(
                        "--seed {s} with --count {}: the seeds pass 2^64 − 1",
                        args.count
                    )
                })?),
                None => None,
            };
            Ok((output_name(output, seed, args.count), seed))
        })
        .collect::<Result<_>>()?;
    // Every file is checked (a `{seed}` may sit in a folder name) before minutes of work.
    for (out, _) in &outputs {
        check_output(out, &args.image)?;
    }

    let t0 = Instant::now();
    let resolution = src.sources().resolve()?;
    let mut paths = resolution.paths;
    paths.axes_dim = src.axes_dim.clone();
    // Parts that do not come from --model are named, so a run says which files it used.
    for o in resolution.origins.iter().filter(|o| o.how != "--model") {
        rep.line(&format!(
            "note: {}: {} ({})",
            o.part,
            o.path.display(),
            o.how
        ));
    }
    for l in &args.lora {
        if !l.path.is_file() {
            bail!("{}: no such LoRA file (--lora)", l.path.display());
        }
    }
    let what = src
        .model
        .as_ref()
        .map(|m| m.display().to_string())
        .unwrap_or_else(|| "the model".to_string());
    rep.line(&format!(
        "loading {what} ({} of weights)",
        human_bytes(weight_bytes(&paths))
    ));
    let memory = memory_options(args);
    let pipeline = Pipeline::load_configured(
        &paths,
        device,
        &args.lora,
        &memory,
        Some((&design, opts.steps)),
    )
    .with_context(|| {
        let hint = match (device, requested) {
            (Device::Cuda, None) => " on the GPU (--device cpu runs on the CPU)",
            _ => "",
        };
        format!("loading {what}{hint}")
    })?;
    let load_time = t0.elapsed();
    if let Some((plan, budget)) = &pipeline.memory {
        rep.line(&format!(
            "note: {} usable on the GPU: {}",
            gib(*budget),
            plan.summary()
        ));
    }
    for l in pipeline.loras() {
        rep.line(&format!(
            "LoRA {} ({}, {} layers) at strength {}",
            l.lora.path.display(),
            l.lora.format,
            l.lora.targets().len(),
            l.strength
        ));
    }
    if references.len() > 1 {
        rep.context = format!(
            "{} context images ({} layout)",
            references.len(),
            layout.name()
        );
    }
    let refs: Vec<&RgbImage> = references.iter().collect();
    let mut written = Vec::new();
    let mut first = None;
    for (k, (out_path, seed)) in outputs.iter().enumerate() {
        if outputs.len() > 1 {
            rep.prefix = format!(
                "image {}/{} (seed {}): ",
                k + 1,
                outputs.len(),
                seed.unwrap_or(0)
            );
        }
        let mut o = opts.clone();
        if let Some(seed) = seed {
            o.noise = NoiseSource::Seed(*seed);
        }
        let out = pipeline
            .edit_references(&refs, layout, prompt, &o, &mut |p: &Progress| rep.report(p))?;
        for n in &out.notes {
            rep.line(&format!("note: {n}"));
        }
        out.image.save(out_path)?;
        rep.line(&format!(
            "wrote {} ({}×{})",
            out_path.display(),
            out.image.width,
            out.image.height
        ));
        // Only what the summary needs is kept: N images must not hold N images in memory.
        written.push((out_path.clone(), out.seed));
        if first.is_none() {
            first = Some(out);
        }
    }
    if let (true, Some(first)) = (args.json, first) {
        let first_path = &written[0].0;
        let mut timings = serde_json::Map::new();
        timings.insert("load".into(), load_time.as_secs_f64().into());
        for (k, d) in &first.timings {
            timings.insert((*k).into(), d.as_secs_f64().into());
        }
        let summary = serde_json::json!({
            "output": first_path,
            "outputs": written.iter().map(|(p, seed)| serde_json::json!({"output": p, "seed": seed})).collect::<Vec<_>>(),
            "width": first.image.width,
            "height": first.image.height,
            "context": references.first().map(|c| serde_json::json!({"width": c.width, "height": c.height})),
            "references": references.iter().map(|c| serde_json::json!({"width": c.width, "height": c.height})).collect::<Vec<_>>(),
            "ref_layout": layout.name(),
            "seed": first.seed,
            "steps": opts.steps,
            "guidance": opts.guidance,
            "device": device.name(),
            "gpu": gpu,
            "parts": resolution.origins.iter().map(|o| serde_json::json!({"part": o.part, "path": o.path, "from": o.how})).collect::<Vec<_>>(),
            "notes": first.notes,
            "seconds": timings,
            "graphs": pipeline.graph_stats().map(|(captured, replays)| serde_json::json!({"captured": captured, "replays": replays})),
            "launches": pipeline.launch_counts().map(|c| c.into_iter().map(|(k, n)| (k.to_string(), serde_json::Value::from(n))).collect::<serde_json::Map<_, _>>()),
            "memory": pipeline.memory.as_ref().map(|(plan, budget)| serde_json::json!({
                "mode": plan.mode().name(),
                "peak_bytes": plan.peak_bytes,
                "measured_peak_bytes": pipeline.gpu_peak_bytes(),
                "budget_bytes": budget,
                "host_bytes": plan.host_bytes,
                "streamed_blocks": plan.layout.streamed_blocks.len(),
            })),
        });
        println!("{summary}");
    }
    Ok(())
}

/// The memory options of the flags.
fn memory_options(args: &RunArgs) -> MemoryOptions {
    MemoryOptions {
        vram: args.vram,
        weights: args.weights,
        mode: args.memory_mode,
        resident_blocks: None,
    }
}

/// `--dry-run`: the plan of the request in every mode, from the files' headers.
fn dry_run(args: &RunArgs) -> Result<()> {
    let src = &args.sources;
    let mut sizes = Vec::new();
    for (k, path) in args.image.iter().enumerate() {
        let img = RgbImage::open(path).with_context(|| format!("--image #{}", k + 1))?;
        sizes.push((img.width, img.height));
    }
    let opts = EditOptions {
        steps: args.steps,
        width: args.width,
        height: args.height,
        resize: match args.resize {
            ResizeArg::Preferred => ResizePolicy::Preferred,
            ResizeArg::None => ResizePolicy::None,
        },
        ..Default::default()
    };
    opts.validate()?;
    let design = plan_sizes(&sizes, &opts)?;
    let resolution = src.sources().resolve()?;
    let mut paths = resolution.paths;
    paths.axes_dim = src.axes_dim.clone();
    let c = Components::open(&paths)?;
    let memory = memory_options(args);
    // With --vram the plan is for a device of that size; else for the GPU here, if any.
    let (budget, cc, gpu) = match memory.vram {
        Some(v) => (Some(kontext_engine::memory::usable(v)), None, None),
        None => match kontext_kernels::cuda_available() {
            Ok(info) if args.device != Some(DeviceArg::Cpu) => {
                let b = kontext_engine::CudaBackend::new(0)?;
                let budget = kontext_engine::memory::device_budget(&b, None)?;
                (
                    Some(budget),
                    Some(info.compute_capability),
                    Some(info.to_string()),
                )
            }
            _ => (None, None, None),
        },
    };
    // Every mode's plan for the table; the choice among them (or the forced mode's) for the
    // budget. One planner pass per mode.
    let mut all = memory.clone();
    all.mode = None;
    let (plans, fits) = choose(&c, &design, opts.steps, &all, budget, cc)?;
    let chosen = match (memory.mode, budget) {
        (Some(m), Some(_)) => {
            let i = plans.iter().position(|p| p.mode() == m);
            let (ps, j) = choose(&c, &design, opts.steps, &memory, budget, cc)?;
            Some((ps, j.or(i)))
        }
        (None, Some(_)) => Some((plans.clone(), fits)),
        (_, None) => None,
    };
    let (nt, nx, nc) = plans[0].tokens;
    if args.json {
        let mode_json = |p: &MemoryPlan| {
            serde_json::json!({
                "mode": p.mode().name(),
                "peak_bytes": p.peak_bytes,
                "weight_bytes": p.weight_bytes,
                "slot_bytes": p.slot_bytes,
                "host_bytes": p.host_bytes,
                "streamed_blocks": p.layout.streamed_blocks.len(),
                "streamed_bytes_per_step": p.streamed_per_step,
                "stages": p.stages.iter().map(|s| serde_json::json!({"stage": s.stage, "pool_bytes": s.pools, "peak_bytes": s.peak})).collect::<Vec<_>>(),
            })
        };
        let pick = chosen.as_ref().map(|(ps, i)| &ps[i.unwrap_or(0)]);
        let out = serde_json::json!({
            "mode": pick.map(|p| p.mode().name()),
            "peak_bytes": pick.map(|p| p.peak_bytes),
            "chosen": pick.map(mode_json),
            "budget_bytes": budget,
            "gpu": gpu,
            "tokens": {"text": nt, "target": nx, "context": nc},
            "flops_per_step": plans[0].flops_per_step,
            "width": design.width,
            "height": design.height,
            "modes": plans.iter().map(mode_json).collect::<Vec<_>>(),
        });
        println!("{out}");
        return Ok(());
    }
    println!(
        "request: {}×{} output, {} context image(s); tokens: {nt} text + {nx} target + {nc} context = {}",
        design.width,
        design.height,
        design.references.len(),
        nt + nx + nc
    );
    println!(
        "one denoising step: {:.2} TFLOP (GEMMs and attention)",
        plans[0].flops_per_step / 1e12
    );
    for p in &plans {
        let stages: Vec<String> = p
            .stages
            .iter()
            .map(|s| format!("{} {}", s.stage, gib(s.peak)))
            .collect();
        println!(
            "  mode {:<8} peak {:>10}  (resident weights {}, host {}; {})",
            p.mode().name(),
            gib(p.peak_bytes),
            gib(p.weight_bytes),
            gib(p.host_bytes),
            stages.join(", ")
        );
    }
    match (&chosen, budget) {
        (Some((ps, i)), Some(b)) => {
            let p = &ps[i.unwrap_or(0)];
            println!("with {} usable: {}", gib(b), p.summary());
        }
        _ => println!("no GPU here: give --vram GB to see the mode a card of that size gets"),
    }
    Ok(())
}

/// The most images one run makes (`--count`).
const MAX_COUNT: usize = 100_000;

/// An output file the run may write: PNG or JPEG, in a folder that exists, not a folder, not an
/// input image.
fn check_output(output: &Path, images: &[PathBuf]) -> Result<()> {
    let out_dir = output
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !out_dir.is_dir() {
        bail!(
            "{}: folder {} does not exist",
            output.display(),
            out_dir.display()
        );
    }
    if output.is_dir() {
        bail!(
            "{}: is a folder; --output names the image file to write",
            output.display()
        );
    }
    for image in images {
        if same_file(image, output) {
            bail!(
                "{}: refusing to overwrite the input image; choose another --output",
                output.display()
            );
        }
    }
    Ok(())
}

/// The file of one image of `count`: `{seed}` in the name is replaced; else, for several
/// images, `-SEED` goes before the extension.
fn output_name(output: &Path, seed: Option<u64>, count: usize) -> PathBuf {
    let name = output.to_string_lossy();
    match seed {
        Some(seed) if name.contains("{seed}") => {
            PathBuf::from(name.replace("{seed}", &seed.to_string()))
        }
        Some(seed) if count > 1 => {
            let stem = output
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let ext = output
                .extension()
                .map(|e| e.to_string_lossy().into_owned())
                .unwrap_or_default();
            output.with_file_name(format!("{stem}-{seed}.{ext}"))
        }
        _ => output.to_path_buf(),
    }
}

/// Bytes of the weight files behind the resolved parts (what loading maps).
fn weight_bytes(paths: &ModelPaths) -> u64 {
    fn size(p: &Path) -> u64 {
        if p.is_dir() {
            std::fs::read_dir(p)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .map(|e| e.path())
                        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
                        .sum()
                })
                .unwrap_or(0)
        } else {
            std::fs::metadata(p).map_or(0, |m| m.len())
        }
    }
    [&paths.transformer, &paths.vae, &paths.t5, &paths.clip]
        .iter()
        .filter_map(|p| p.as_deref())
        .map(size)
        .sum()
}

fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        0..=999 => format!("{bytes} B"),
        1_000..=999_999 => format!("{:.1} kB", b / 1e3),
        1_000_000..=999_999_999 => format!("{:.1} MB", b / 1e6),
        _ => format!("{:.2} GB", b / 1e9),
    }
}

fn print_component(label: &str, path: &Path, c: &AnyComponent) {
    let w = c.weights();
    println!("{label}: {} ({})", path.display(), w.layout);
    let dtypes: Vec<String> = w
        .dtype_counts()
        .iter()
        .map(|(d, n)| format!("{d} ×{n}"))
        .collect();
    println!("  config:     {}", c.config_text());
    println!("  dtypes:     {}", dtypes.join(", "));
    println!("  fp8 form:   {}", w.quant);
    println!(
        "  parameters: {}; weights {} in {} of files",
        w.param_count(),
        human_bytes(w.stored_bytes() as u64),
        human_bytes(w.file_bytes)
    );
}

fn inspect(path: Option<&Path>, src: &SourceArgs) -> Result<()> {
    let opts = TransformerOptions {
        axes_dim: src.axes_dim.clone(),
    };
    let mut src = src.clone();
    if let Some(path) = path {
        if !path.exists() {
            bail!("{}: no such file or folder", path.display());
        }
        let is_model_folder = path.is_dir()
            && (path.join("model_index.json").is_file()
                || ["transformer", "vae", "text_encoder", "text_encoder_2"]
                    .iter()
                    .any(|d| path.join(d).is_dir())
                || path.join("ae.safetensors").is_file());
        if !is_model_folder {
            let c = open_component(path, &opts)?;
            print_component("component", path, &c);
            return Ok(());
        }
        if src.model.is_some() {
            bail!("give the model folder once: as PATH or as --model");
        }
        src.model = Some(path.to_path_buf());
    } else if src.model.is_none() && !src.any_component() {
        bail!("inspect needs a PATH, or --model / the component flags (see --help)");
    }
    let what = src
        .model
        .as_ref()
        .map(|m| m.display().to_string())
        .unwrap_or_else(|| "the model".into());
    // Discovery first: its own errors (an empty folder, pickle weights) read best alone.
    if let Some(m) = &src.model {
        ModelPaths::discover(m).with_context(|| format!("inspecting {}", m.display()))?;
    }
    let mut failures = Vec::new();
    let resolution = match src.sources().resolve() {
        Ok(r) => Some(r),
        Err(e) => {
            failures.push(e.to_string());
            None
        }
    };
    if let Some(m) = &src.model {
        println!("model folder: {}", m.display());
    }
    let Some(resolution) = resolution else {
        bail!("{}", failures.join("\n"));
    };
    let paths = resolution.paths;
    let from = |part: &str| {
        resolution
            .origins
            .iter()
            .find(|o| o.part == part && o.how != "--model")
            .map(|o| format!(" [from {}]", o.how))
            .unwrap_or_default()
    };
    let path = Path::new(&what);
    let parts = [
        ("transformer", &paths.transformer),
        ("vae", &paths.vae),
        ("t5", &paths.t5),
        ("clip", &paths.clip),
    ];
    for (label, p) in parts {
        match p {
            None => {
                println!("{label}: not found");
                failures.push(format!("{label}: not found in {}", path.display()));
            }
            Some(p) => match open_component(p, &opts) {
                Ok(c) => print_component(&format!("{label}{}", from(label)), p, &c),
                Err(e) => {
                    println!("{label}: {}: FAILED", p.display());
                    failures.push(format!("{label}: {e}"));
                }
            },
        }
    }
    for (label, p) in [
        ("clip tokenizer", &paths.clip_tokenizer),
        ("t5 tokenizer", &paths.t5_tokenizer),
    ] {
        match p {
            Some(p) => println!("{label}: {}{}", p.display(), from(label)),
            None => {
                println!("{label}: not found");
                failures.push(format!("{label}: not found in {}", path.display()));
            }
        }
    }
    match failures.as_slice() {
        [] => Ok(()),
        [one] => bail!("{one}"),
        many => bail!("{} problems:\n{}", many.len(), many.join("\n")),
    }
}

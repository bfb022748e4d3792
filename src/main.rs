//! kontext-fast: FLUX.1 Kontext [dev] from the command line. Thin: parse flags, call the
//! loader / engine, print or write the result.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use kontext_engine::image::RgbImage;
use kontext_engine::lora::LoraSpec;
use kontext_engine::pipeline::{Device, Pipeline, Progress};
use kontext_engine::request::{
    plan_sizes, read_noise_file, EditOptions, NoiseSource, ResizePolicy,
};
use kontext_engine::sampling::RefLayout;
use kontext_loader::{open_component, AnyComponent, ModelPaths, TransformerOptions};
use std::path::{Path, PathBuf};
use std::time::Instant;

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
        path: PathBuf,
        /// RoPE axes split for a single-file transformer whose head dim is not 128 (e.g. 4,6,6).
        #[arg(long, value_delimiter = ',')]
        axes_dim: Option<Vec<usize>>,
    },
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
    /// Model folder (as downloaded from black-forest-labs/FLUX.1-Kontext-dev).
    #[arg(long)]
    model: Option<PathBuf>,
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
    /// Print a machine-readable summary on stdout.
    #[arg(long)]
    json: bool,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Inspect { path, axes_dim }) => {
            inspect(&path, &TransformerOptions { axes_dim })
        }
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
    let Some(model) = &args.model else {
        bail!("--model DIR is required (or use `kontext-fast inspect PATH`); see --help");
    };
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
    for image in &args.image {
        if same_file(image, output) {
            bail!(
                "{}: refusing to overwrite the input image; choose another --output",
                output.display()
            );
        }
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
    if let Some(note) = note {
        eprintln!("note: {note}");
    }
    let gpu = gpu.filter(|_| device == Device::Cuda);
    if let Some(gpu) = &gpu {
        eprintln!("note: running on {gpu}");
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
    plan_sizes(&sizes, &opts)?;

    let t0 = Instant::now();
    let paths = ModelPaths::discover(model)?;
    for l in &args.lora {
        if !l.path.is_file() {
            bail!("{}: no such LoRA file (--lora)", l.path.display());
        }
    }
    let pipeline = Pipeline::load_with_loras(&paths, device, &args.lora).with_context(|| {
        let hint = match (device, requested) {
            (Device::Cuda, None) => " on the GPU (--device cpu runs on the CPU)",
            _ => "",
        };
        format!("loading {}{hint}", model.display())
    })?;
    let load_time = t0.elapsed();
    for l in pipeline.loras() {
        eprintln!(
            "LoRA {} ({}, {} layers) at strength {}",
            l.lora.path.display(),
            l.lora.format,
            l.lora.targets().len(),
            l.strength
        );
    }
    let mut progress = |p: &Progress| match p {
        Progress::EncodingText => eprintln!("encoding the prompt"),
        Progress::EncodingImage => match references.len() {
            1 => eprintln!("encoding the context image"),
            n => eprintln!("encoding {n} context images ({} layout)", layout.name()),
        },
        Progress::Denoising { steps } => {
            eprintln!("denoising: {steps} steps on {}", device.name())
        }
        Progress::Step { step, steps, took } => {
            eprintln!("step {step:>3}/{steps}  {:>8.3} s", took.as_secs_f64())
        }
        Progress::Decoding => eprintln!("decoding"),
    };
    let refs: Vec<&RgbImage> = references.iter().collect();
    let out = pipeline.edit_references(&refs, layout, prompt, &opts, &mut progress)?;
    for n in &out.notes {
        eprintln!("note: {n}");
    }
    out.image.save(output)?;
    eprintln!(
        "wrote {} ({}×{})",
        output.display(),
        out.image.width,
        out.image.height
    );
    if args.json {
        let mut timings = serde_json::Map::new();
        timings.insert("load".into(), load_time.as_secs_f64().into());
        for (k, d) in &out.timings {
            timings.insert((*k).into(), d.as_secs_f64().into());
        }
        let summary = serde_json::json!({
            "output": output,
            "width": out.image.width,
            "height": out.image.height,
            "context": references.first().map(|c| serde_json::json!({"width": c.width, "height": c.height})),
            "references": references.iter().map(|c| serde_json::json!({"width": c.width, "height": c.height})).collect::<Vec<_>>(),
            "ref_layout": layout.name(),
            "seed": out.seed,
            "steps": opts.steps,
            "guidance": opts.guidance,
            "device": device.name(),
            "gpu": gpu,
            "notes": out.notes,
            "seconds": timings,
        });
        println!("{summary}");
    }
    Ok(())
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

fn inspect(path: &Path, opts: &TransformerOptions) -> Result<()> {
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
        let c = open_component(path, opts)?;
        print_component("component", path, &c);
        return Ok(());
    }
    let paths =
        ModelPaths::discover(path).with_context(|| format!("inspecting {}", path.display()))?;
    println!("model folder: {}", path.display());
    let mut failures = Vec::new();
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
            Some(p) => match open_component(p, opts) {
                Ok(c) => print_component(label, p, &c),
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
            Some(p) => println!("{label}: {}", p.display()),
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

//! kontext-fast: FLUX.1 Kontext [dev] from the command line. Thin: parse flags, call the
//! loader / engine, print or write the result.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use kontext_loader::{open_component, AnyComponent, ModelPaths, TransformerOptions};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "kontext-fast",
    version,
    about = "FLUX.1 Kontext [dev] image editing engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect { path, axes_dim } => inspect(&path, &TransformerOptions { axes_dim }),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
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

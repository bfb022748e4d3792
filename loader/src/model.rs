//! Finding the components of a Kontext model: an HF model folder (`model_index.json`, as
//! `black-forest-labs/FLUX.1-Kontext-dev` downloads), or files given one by one.

use crate::clip::{load_clip, Clip};
use crate::error::{LoadError, Result};
use crate::safetensors::SafetensorsFile;
use crate::t5::{load_t5, T5};
use crate::tensors::Component;
use crate::transformer::{load_transformer, Transformer, TransformerOptions, COMFY_PREFIX};
use crate::vae::{load_vae, Vae, VaeOptions};
use std::path::{Path, PathBuf};

/// Where each part of a model lives. Any part may be missing (text-to-image needs no
/// context image, but every part is needed to run; the engine says which is absent).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelPaths {
    pub transformer: Option<PathBuf>,
    pub vae: Option<PathBuf>,
    pub t5: Option<PathBuf>,
    pub clip: Option<PathBuf>,
    /// CLIP tokenizer folder (`tokenizer/`: tokenizer.json, or vocab.json + merges.txt).
    pub clip_tokenizer: Option<PathBuf>,
    /// T5 tokenizer folder (`tokenizer_2/`: tokenizer.json).
    pub t5_tokenizer: Option<PathBuf>,
    /// `scheduler/scheduler_config.json` (the schedule's shift parameters).
    pub scheduler: Option<PathBuf>,
    /// The RoPE axes split of a single-file transformer whose head dim is not 128 (a file has
    /// no config; `--axes-dim`).
    pub axes_dim: Option<Vec<usize>>,
}

fn has_safetensors(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.filter_map(|e| e.ok())
            .any(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
    })
}

fn dir_if(root: &Path, name: &str) -> Option<PathBuf> {
    let p = root.join(name);
    (p.is_dir() && has_safetensors(&p)).then_some(p)
}

fn file_if(root: &Path, names: &[&str]) -> Option<PathBuf> {
    names.iter().map(|n| root.join(n)).find(|p| p.is_file())
}

impl ModelPaths {
    /// Finds the parts of a model folder: the diffusers sub-folders, or the BFL single files at
    /// its root (`flux1-kontext-dev.safetensors`, `ae.safetensors`). The sub-folder wins when
    /// both are present (they hold the same weights).
    pub fn discover(root: &Path) -> Result<ModelPaths> {
        ModelPaths::discover_except(root, &[])
    }

    /// [`ModelPaths::discover`], without the complaint about the sub-folders in `replaced`
    /// (`"transformer"`, `"vae"`, `"text_encoder"`, `"text_encoder_2"`): parts another file
    /// supplies (`--diffusion-model` beside a folder whose `transformer/` holds no weights).
    pub fn discover_except(root: &Path, replaced: &[&str]) -> Result<ModelPaths> {
        if !root.is_dir() {
            return Err(LoadError::UnknownLayout {
                path: root.to_path_buf(),
                reason:
                    "not a folder; a model folder holds model_index.json or the component files"
                        .into(),
            });
        }
        let tok = |name: &str| {
            let p = root.join(name);
            p.is_dir().then_some(p)
        };
        let paths = ModelPaths {
            transformer: dir_if(root, "transformer").or_else(|| {
                file_if(
                    root,
                    &[
                        "flux1-kontext-dev.safetensors",
                        "flux1-dev-kontext.safetensors",
                    ],
                )
            }),
            vae: dir_if(root, "vae").or_else(|| file_if(root, &["ae.safetensors"])),
            t5: dir_if(root, "text_encoder_2"),
            clip: dir_if(root, "text_encoder"),
            clip_tokenizer: tok("tokenizer"),
            t5_tokenizer: tok("tokenizer_2"),
            scheduler: Some(root.join("scheduler/scheduler_config.json")).filter(|p| p.is_file()),
            axes_dim: None,
        };
        // A component folder without safetensors (PyTorch .bin or nothing) would otherwise read
        // as "not found"; say what is there instead.
        let parts = [
            ("transformer", &paths.transformer),
            ("vae", &paths.vae),
            ("text_encoder", &paths.clip),
            ("text_encoder_2", &paths.t5),
        ];
        for (name, found) in parts {
            let dir = root.join(name);
            if found.is_none() && dir.is_dir() && !replaced.contains(&name) {
                let has_bin = std::fs::read_dir(&dir).is_ok_and(|rd| {
                    rd.filter_map(|e| e.ok()).any(|e| {
                        e.path()
                            .extension()
                            .is_some_and(|x| x == "bin" || x == "pt" || x == "ckpt")
                    })
                });
                let reason = if has_bin {
                    format!("{name}/ holds PyTorch pickle weights (.bin/.pt/.ckpt) but no .safetensors. HINT: kontext-fast reads safetensors only; re-save the model with safe_serialization=True or download the safetensors files")
                } else {
                    format!("{name}/ holds no .safetensors file")
                };
                return Err(LoadError::UnknownLayout { path: dir, reason });
            }
        }
        if paths == ModelPaths::default() {
            return Err(LoadError::UnknownLayout {
                path: root.to_path_buf(),
                reason: "no model parts found (expected transformer/, vae/, text_encoder/, text_encoder_2/ or flux1-kontext-dev.safetensors, ae.safetensors)".into(),
            });
        }
        Ok(paths)
    }
}

/// One loaded component of any kind, for tools that take whatever path they are given.
pub enum AnyComponent {
    Transformer(Transformer),
    Vae(Vae),
    T5(T5),
    Clip(Clip),
}

impl AnyComponent {
    pub fn weights(&self) -> &Component {
        match self {
            AnyComponent::Transformer(c) => &c.weights,
            AnyComponent::Vae(c) => &c.weights,
            AnyComponent::T5(c) => &c.weights,
            AnyComponent::Clip(c) => &c.weights,
        }
    }

    /// The config on one line, as Rust debug output.
    pub fn config_text(&self) -> String {
        match self {
            AnyComponent::Transformer(c) => format!("{:?}", c.config),
            AnyComponent::Vae(c) => format!("{:?}", c.config),
            AnyComponent::T5(c) => format!("{:?}", c.config),
            AnyComponent::Clip(c) => format!("{:?}", c.config),
        }
    }
}

/// Which component a file or component folder holds, judged by its keys.
fn kind_of(path: &Path) -> Result<&'static str> {
    let probe = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|err| LoadError::Io {
                path: path.to_path_buf(),
                err,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        files
            .into_iter()
            .next()
            .ok_or_else(|| LoadError::UnknownLayout {
                path: path.to_path_buf(),
                reason: "folder holds no .safetensors file".into(),
            })?
    } else {
        path.to_path_buf()
    };
    let f = SafetensorsFile::open(&probe)?;
    let keys = &f.header.tensors;
    let any = |pred: &dyn Fn(&str) -> bool| keys.keys().any(|k| pred(k));
    Ok(
        if any(&|k| {
            k.starts_with("x_embedder.")
                || k.starts_with("double_blocks.")
                || k.starts_with("single_blocks.")
                || k.starts_with("transformer_blocks.")
                || k.starts_with("single_transformer_blocks.")
                || k.starts_with(COMFY_PREFIX)
                || k == "img_in.weight"
        }) {
            "transformer"
        } else if any(&|k| k.starts_with("encoder.down") || k.starts_with("decoder.")) {
            "vae"
        } else if any(&|k| k.starts_with("encoder.block.") || k == "shared.weight") {
            "t5"
        } else if any(&|k| k.starts_with("text_model.") || k == "embeddings.token_embedding.weight")
        {
            "clip"
        } else {
            return Err(LoadError::UnknownLayout {
                path: path.to_path_buf(),
                reason: "keys match no Kontext component (transformer, autoencoder, T5, CLIP)"
                    .into(),
            });
        },
    )
}

/// Opens a single component file or component folder, whatever it holds.
/// `opts` applies when it is a transformer.
pub fn open_component(path: &Path, opts: &TransformerOptions) -> Result<AnyComponent> {
    Ok(match kind_of(path)? {
        "transformer" => AnyComponent::Transformer(load_transformer(path, opts)?),
        "vae" => AnyComponent::Vae(load_vae(path, &VaeOptions::default())?),
        "t5" => AnyComponent::T5(load_t5(path)?),
        _ => AnyComponent::Clip(load_clip(path)?),
    })
}

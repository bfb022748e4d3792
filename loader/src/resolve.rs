//! Which file serves each part of a model, from what users have: a Hugging Face model folder
//! (`--model`), single component files as ComfyUI and stable-diffusion.cpp users download them
//! (`--diffusion-model`, `--vae`, `--clip-l`, `--t5xxl`), a folder of tokenizers (`--tokenizers`),
//! or a ComfyUI install (`--comfyui`), where bare file names are looked up in its model folders
//! and the tokenizers are the ones it ships. Every part says where it came from (`inspect`, the
//! notes), and a part nobody supplies is one error naming the flag that would.

use crate::error::{LoadError, Result};
use crate::model::ModelPaths;
use std::path::{Path, PathBuf};

/// What the user gave. Every field is optional; a part given by a component flag wins over the
/// same part of `--model`.
#[derive(Debug, Clone, Default)]
pub struct ModelSources {
    pub model: Option<PathBuf>,
    pub diffusion_model: Option<PathBuf>,
    pub vae: Option<PathBuf>,
    pub clip_l: Option<PathBuf>,
    pub t5xxl: Option<PathBuf>,
    pub tokenizers: Option<PathBuf>,
    pub comfyui: Option<PathBuf>,
}

/// Where one part came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Origin {
    /// "transformer", "vae", "t5", "clip", "clip tokenizer", "t5 tokenizer", "scheduler".
    pub part: &'static str,
    pub path: PathBuf,
    /// How it was found: "--model", "--vae", "--comfyui models/vae/", "--tokenizers", ...
    pub how: String,
}

/// The resolved parts and their origins (in the order of [`PARTS`]).
#[derive(Debug, Clone)]
pub struct Resolution {
    pub paths: ModelPaths,
    pub origins: Vec<Origin>,
}

/// The ComfyUI model folders each component is looked up in, in order.
const COMFY_DIRS: [(&str, &[&str]); 4] = [
    ("transformer", &["models/diffusion_models", "models/unet"]),
    ("vae", &["models/vae"]),
    ("t5", &["models/text_encoders", "models/clip"]),
    ("clip", &["models/text_encoders", "models/clip"]),
];

/// The tokenizers a ComfyUI install ships (CLIP: vocab.json + merges.txt; T5: tokenizer.json).
const COMFY_CLIP_TOKENIZER: &str = "comfy/sd1_tokenizer";
const COMFY_T5_TOKENIZER: &str = "comfy/text_encoders/t5_tokenizer";

fn err(path: &Path, reason: String) -> LoadError {
    LoadError::UnknownLayout {
        path: path.to_path_buf(),
        reason,
    }
}

/// A component file given by `flag`: as a path, or (with `--comfyui`, for a bare name that is
/// not a file here) in the install's folders for `part`.
fn component_file(
    flag: &str,
    given: &Path,
    part: &str,
    comfyui: Option<&Path>,
) -> Result<(PathBuf, String)> {
    if given.exists() {
        return Ok((given.to_path_buf(), flag.to_string()));
    }
    // A relative name that is not a file here: ComfyUI shows models in sub-folders of its model
    // folders as `flux/model.safetensors`.
    let bare = given.is_relative();
    if let (true, Some(root)) = (bare, comfyui) {
        let dirs = COMFY_DIRS
            .iter()
            .find(|(p, _)| *p == part)
            .map_or(&[][..], |(_, d)| d);
        for d in dirs {
            let p = root.join(d).join(given);
            if p.is_file() {
                return Ok((p, format!("{flag} in --comfyui {d}/")));
            }
        }
        return Err(err(
            given,
            format!(
                "{flag}: no such file here, nor in {} of the ComfyUI install {}",
                dirs.iter()
                    .map(|d| format!("{d}/"))
                    .collect::<Vec<_>>()
                    .join(" or "),
                root.display()
            ),
        ));
    }
    Err(err(
        given,
        format!(
            "{flag}: no such file{}",
            if bare {
                " (a bare file name is looked up in a ComfyUI install's model folders with \
                 --comfyui DIR)"
            } else {
                ""
            }
        ),
    ))
}

fn tokenizer_dir(dir: PathBuf, what: &str, flag: &str) -> Result<PathBuf> {
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(err(&dir, format!("{flag}: the {what} folder is missing")))
    }
}

impl ModelSources {
    /// Resolves every part; fails on a flag that names nothing, and on a part nobody supplies
    /// (naming the flags that would).
    pub fn resolve(&self) -> Result<Resolution> {
        // Sub-folders a component flag replaces need not hold weights.
        let replaced: Vec<&str> = [
            ("transformer", &self.diffusion_model),
            ("vae", &self.vae),
            ("text_encoder", &self.clip_l),
            ("text_encoder_2", &self.t5xxl),
        ]
        .iter()
        .filter(|(_, given)| given.is_some())
        .map(|(dir, _)| *dir)
        .collect();
        let mut paths = match &self.model {
            Some(m) => ModelPaths::discover_except(m, &replaced)?,
            None => ModelPaths::default(),
        };
        if let Some(root) = &self.comfyui {
            if !root.is_dir() {
                return Err(err(
                    root,
                    "--comfyui: not a folder (a ComfyUI install holds models/ and comfy/)".into(),
                ));
            }
        }
        let comfy = self.comfyui.as_deref();
        let mut origins = Vec::new();
        let overrides: [(&str, &'static str, &Option<PathBuf>); 4] = [
            ("--diffusion-model", "transformer", &self.diffusion_model),
            ("--vae", "vae", &self.vae),
            ("--t5xxl", "t5", &self.t5xxl),
            ("--clip-l", "clip", &self.clip_l),
        ];
        for (flag, part, given) in overrides {
            let slot = match part {
                "transformer" => &mut paths.transformer,
                "vae" => &mut paths.vae,
                "t5" => &mut paths.t5,
                _ => &mut paths.clip,
            };
            match given {
                Some(g) => {
                    let (p, how) = component_file(flag, g, part, comfy)?;
                    *slot = Some(p.clone());
                    origins.push(Origin { part, path: p, how });
                }
                None => {
                    if let Some(p) = slot {
                        origins.push(Origin {
                            part,
                            path: p.clone(),
                            how: "--model".into(),
                        });
                    }
                }
            }
        }
        // Tokenizers: --tokenizers, else --model's, else the ComfyUI install's.
        if let Some(dir) = &self.tokenizers {
            paths.clip_tokenizer = Some(tokenizer_dir(
                dir.join("tokenizer"),
                "CLIP tokenizer (tokenizer/)",
                "--tokenizers",
            )?);
            paths.t5_tokenizer = Some(tokenizer_dir(
                dir.join("tokenizer_2"),
                "T5 tokenizer (tokenizer_2/)",
                "--tokenizers",
            )?);
            for (part, p) in [
                ("clip tokenizer", &paths.clip_tokenizer),
                ("t5 tokenizer", &paths.t5_tokenizer),
            ] {
                origins.push(Origin {
                    part,
                    path: p.clone().unwrap_or_default(),
                    how: "--tokenizers".into(),
                });
            }
        } else {
            for (part, slot, comfy_dir) in [
                (
                    "clip tokenizer",
                    &mut paths.clip_tokenizer,
                    COMFY_CLIP_TOKENIZER,
                ),
                ("t5 tokenizer", &mut paths.t5_tokenizer, COMFY_T5_TOKENIZER),
            ] {
                if let Some(p) = slot.clone() {
                    origins.push(Origin {
                        part,
                        path: p,
                        how: "--model".into(),
                    });
                } else if let Some(root) = comfy {
                    let p = tokenizer_dir(root.join(comfy_dir), part, "--comfyui")?;
                    *slot = Some(p.clone());
                    origins.push(Origin {
                        part,
                        path: p,
                        how: format!("--comfyui {comfy_dir}/"),
                    });
                }
            }
        }
        if let Some(p) = &paths.scheduler {
            origins.push(Origin {
                part: "scheduler",
                path: p.clone(),
                how: "--model".into(),
            });
        }
        let missing: Vec<String> = [
            ("transformer", paths.transformer.is_none(), "--diffusion-model FILE or --model DIR"),
            ("VAE", paths.vae.is_none(), "--vae FILE (ae.safetensors) or --model DIR"),
            ("T5 encoder", paths.t5.is_none(), "--t5xxl FILE or --model DIR"),
            ("CLIP text encoder", paths.clip.is_none(), "--clip-l FILE or --model DIR"),
            (
                "CLIP tokenizer",
                paths.clip_tokenizer.is_none(),
                "--model DIR (its tokenizer/), --tokenizers DIR (holding tokenizer/ and tokenizer_2/) or --comfyui DIR",
            ),
            (
                "T5 tokenizer",
                paths.t5_tokenizer.is_none(),
                "--model DIR (its tokenizer_2/), --tokenizers DIR (holding tokenizer/ and tokenizer_2/) or --comfyui DIR",
            ),
        ]
        .iter()
        .filter(|(_, absent, _)| *absent)
        .map(|(part, _, flag)| format!("no {part}: give {flag}"))
        .collect();
        if !missing.is_empty() {
            let at = self
                .model
                .clone()
                .or_else(|| self.comfyui.clone())
                .unwrap_or_else(|| PathBuf::from("."));
            return Err(err(&at, missing.join("; ")));
        }
        Ok(Resolution { paths, origins })
    }
}

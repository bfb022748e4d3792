//! LoRA files for the Flux transformer: the format detected from the keys, every low-rank pair
//! placed on a canonical BFL linear weight (spec 1.12), with the rows it patches.
//!
//! `ΔW = (alpha / rank) · B·A` (factor 1 without an alpha); the strength is the engine's, applied
//! when the LoRA is attached, so one loaded file serves any strength. The formats people
//! download for Flux and Kontext:
//!
//! | format | module name of `double_blocks.0.img_attn.qkv` | pair | alpha |
//! |---|---|---|---|
//! | Kohya / sd-scripts | `lora_unet_double_blocks_0_img_attn_qkv` | `lora_down` / `lora_up` | `.alpha` |
//! | ComfyUI / BFL-native | `diffusion_model.double_blocks.0.img_attn.qkv` | either | `.alpha` or none |
//! | PEFT / diffusers, AI-Toolkit | `transformer.transformer_blocks.0.attn.to_q` (+ `to_k`, `to_v`) | `lora_A` / `lora_B` | `.alpha`, adapter metadata, or none |
//! | fal Kontext trainer | `base_model.model.double_blocks.0.img_attn.qkv` | `lora_A` / `lora_B` | none |
//!
//! Module names go through the same tables as the checkpoints: BFL names are canonical, Kohya's
//! are BFL names with `_` for `.`, and diffusers names are the sources the checkpoint loader's
//! diffusers table gives for each canonical weight ([`crate::transformer`]), so a LoRA on
//! `to_q` patches rows `[0, D)` of the fused `qkv`, and one on `norm_out.linear` lands on the
//! final layer's swapped halves.
//!
//! Nothing is skipped: a key that names no linear of the model, a pair with a missing half, a
//! rank or width that does not fit, a bias or norm patch (control LoRAs), DoRA and LoCon
//! tensors are all listed in one error.

use crate::dtype::decode_into;
use crate::error::{LoadError, Result};
use crate::tensors::TensorSet;
use crate::transformer::{diffusers_sources, expected_shapes, FluxConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// How a LoRA file names its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    /// sd-scripts: `lora_unet_<bfl name with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`.
    Kohya,
    /// BFL module names, bare or under `diffusion_model.` / `model.diffusion_model.` (ComfyUI),
    /// with `lora_A`/`lora_B` or `lora_down`/`lora_up`.
    Bfl,
    /// diffusers module names, bare or under `transformer.` (PEFT, diffusers, AI-Toolkit).
    Diffusers,
    /// fal's Kontext trainer: BFL module names under `base_model.model.`.
    Fal,
}

impl std::fmt::Display for LoraFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LoraFormat::Kohya => "Kohya / sd-scripts",
            LoraFormat::Bfl => "ComfyUI / BFL-native",
            LoraFormat::Diffusers => "PEFT / diffusers",
            LoraFormat::Fal => "fal Kontext trainer",
        })
    }
}

/// One low-rank pair on a block of rows of one canonical weight: rows `[row0, row0 + rows)` of
/// `target` change by `scale · up · down`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPatch {
    /// Canonical weight key, e.g. `double_blocks.0.img_attn.qkv.weight`.
    pub target: String,
    /// The module name in the file, for messages.
    pub source: String,
    pub rank: usize,
    /// Input features of the target (columns of `down`).
    pub inp: usize,
    /// `A`, `[rank, inp]` row-major, f32.
    pub down: Vec<f32>,
    /// `B` restricted to the patched rows, `[rows, rank]` row-major, f32.
    pub up: Vec<f32>,
    /// First patched row of the target.
    pub row0: usize,
    /// Patched rows.
    pub rows: usize,
    /// `alpha / rank`, or 1 without an alpha.
    pub scale: f32,
}

/// A LoRA file mapped onto a transformer config.
#[derive(Debug, Clone)]
pub struct Lora {
    pub path: PathBuf,
    pub format: LoraFormat,
    /// Whether the file gave alphas (keys or adapter metadata); without, every scale is 1.
    pub has_alpha: bool,
    /// One per pair and target block of rows, in file order of the modules.
    pub patches: Vec<LoraPatch>,
}

impl Lora {
    /// The canonical weights this LoRA changes, each once, in order of first patch.
    pub fn targets(&self) -> Vec<&str> {
        let mut t: Vec<&str> = Vec::new();
        for p in &self.patches {
            if !t.contains(&p.target.as_str()) {
                t.push(&p.target);
            }
        }
        t
    }

    /// `ΔW` of canonical weight `target` `[out, inp]` at strength 1 (f32, f64 sums), for checks
    /// and merges; `None` when the LoRA does not touch it.
    pub fn delta(&self, target: &str, out: usize) -> Option<Vec<f32>> {
        let mut d: Option<Vec<f32>> = None;
        for p in self.patches.iter().filter(|p| p.target == target) {
            let w = d.get_or_insert_with(|| vec![0.0; out * p.inp]);
            for r in 0..p.rows {
                for c in 0..p.inp {
                    let s: f64 = (0..p.rank)
                        .map(|k| p.up[r * p.rank + k] as f64 * p.down[k * p.inp + c] as f64)
                        .sum();
                    w[(p.row0 + r) * p.inp + c] += (p.scale as f64 * s) as f32;
                }
            }
        }
        d
    }
}

/// Where one module of a LoRA file lands: rows `src` of its `up` (all when `None`) onto rows
/// from `row0` of canonical weight `target`.
#[derive(Debug, Clone)]
struct Placement {
    target: String,
    src: Option<(usize, usize)>,
    row0: usize,
    rows: usize,
    inp: usize,
}

/// Every module name of `format` → its placements, for `cfg`'s linears.
fn module_table(cfg: &FluxConfig, format: LoraFormat) -> BTreeMap<String, Vec<Placement>> {
    let d = cfg.hidden_size;
    let mut t: BTreeMap<String, Vec<Placement>> = BTreeMap::new();
    for (key, shape) in expected_shapes(cfg) {
        let (Some(stem), &[out, inp]) = (key.strip_suffix(".weight"), &shape[..]) else {
            continue;
        };
        let whole = |name: String| {
            (
                name,
                Placement {
                    target: key.clone(),
                    src: None,
                    row0: 0,
                    rows: out,
                    inp,
                },
            )
        };
        match format {
            LoraFormat::Bfl | LoraFormat::Fal => {
                let (n, p) = whole(stem.to_string());
                t.entry(n).or_default().push(p);
            }
            LoraFormat::Kohya => {
                let (n, p) = whole(stem.replace('.', "_"));
                t.entry(n).or_default().push(p);
            }
            LoraFormat::Diffusers => {
                let sources = diffusers_sources(&key, d);
                let n = sources.len();
                let mut row0 = 0;
                for (i, s) in sources.iter().enumerate() {
                    // Whole pieces of a fused weight are equal thirds (q, k, v), or three
                    // thirds of D and the MLP rest (`linear1` = [q; k; v; proj_mlp]).
                    let rows = match s.rows {
                        Some((b, e)) => e - b,
                        None if n == 1 => out,
                        None if n == 4 => {
                            if i < 3 {
                                d
                            } else {
                                out - 3 * d
                            }
                        }
                        None => out / n,
                    };
                    let module = s.key.strip_suffix(".weight").unwrap_or(&s.key).to_string();
                    t.entry(module).or_default().push(Placement {
                        target: key.clone(),
                        src: s.rows,
                        row0,
                        rows,
                        inp,
                    });
                    row0 += rows;
                }
            }
        }
    }
    t
}

/// Key prefixes each format may use (longest first, so `model.diffusion_model.` wins).
fn prefixes(format: LoraFormat) -> &'static [&'static str] {
    match format {
        LoraFormat::Kohya => &["lora_unet_"],
        LoraFormat::Bfl => &["model.diffusion_model.", "diffusion_model.", ""],
        LoraFormat::Diffusers => &["transformer.", ""],
        LoraFormat::Fal => &["base_model.model."],
    }
}

/// First name components of BFL and diffusers modules (for files without a prefix).
const BFL_ROOTS: &[&str] = &[
    "double_blocks",
    "single_blocks",
    "img_in",
    "txt_in",
    "time_in",
    "vector_in",
    "guidance_in",
    "final_layer",
];
const DIFFUSERS_ROOTS: &[&str] = &[
    "transformer_blocks",
    "single_transformer_blocks",
    "x_embedder",
    "context_embedder",
    "time_text_embed",
    "norm_out",
    "proj_out",
];

/// The format of a LoRA from its keys; `None` when no key looks like any of them.
pub fn detect_format<'a>(keys: impl IntoIterator<Item = &'a str>) -> Option<LoraFormat> {
    let mut votes: BTreeMap<u8, usize> = BTreeMap::new();
    let root = |k: &str, roots: &[&str]| roots.iter().any(|r| k.split('.').next() == Some(r));
    for k in keys {
        let f = if k.starts_with("lora_unet_") {
            Some(LoraFormat::Kohya)
        } else if k.starts_with("base_model.model.") {
            Some(LoraFormat::Fal)
        } else if k.starts_with("diffusion_model.") || k.starts_with("model.diffusion_model.") {
            Some(LoraFormat::Bfl)
        } else if k.starts_with("transformer.") || root(k, DIFFUSERS_ROOTS) {
            Some(LoraFormat::Diffusers)
        } else if root(k, BFL_ROOTS) {
            Some(LoraFormat::Bfl)
        } else {
            None
        };
        if let Some(f) = f {
            *votes.entry(f as u8).or_default() += 1;
        }
    }
    let all = [
        LoraFormat::Kohya,
        LoraFormat::Bfl,
        LoraFormat::Diffusers,
        LoraFormat::Fal,
    ];
    let best = votes.iter().max_by_key(|(_, n)| **n)?.0;
    all.into_iter().find(|f| *f as u8 == *best)
}

/// What a key of a LoRA file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Down,
    Up,
    Alpha,
}

/// Splits `module.lora_A.weight` into (`module`, role), or says why the key is not a pair's
/// tensor. PEFT's `.default` adapter infix is accepted.
fn split_key(key: &str) -> std::result::Result<(&str, Role), String> {
    const ROLES: &[(&str, Role)] = &[
        (".lora_A.weight", Role::Down),
        (".lora_B.weight", Role::Up),
        (".lora_A.default.weight", Role::Down),
        (".lora_B.default.weight", Role::Up),
        (".lora_down.weight", Role::Down),
        (".lora_up.weight", Role::Up),
        (".alpha", Role::Alpha),
    ];
    for (suffix, role) in ROLES {
        if let Some(m) = key.strip_suffix(suffix) {
            return Ok((m, *role));
        }
    }
    const REFUSED: &[(&str, &str)] = &[
        (
            ".lora_B.bias",
            "a bias patch (control LoRA); only weight patches are supported",
        ),
        (
            ".lora_A.bias",
            "a bias patch (control LoRA); only weight patches are supported",
        ),
        (
            ".diff_b",
            "a bias difference (control LoRA); only weight patches are supported",
        ),
        (
            ".diff",
            "a full weight difference; only low-rank pairs are supported",
        ),
        (
            ".dora_scale",
            "DoRA magnitude; DoRA is not supported, only plain LoRA",
        ),
        (
            ".lora_mid.weight",
            "a LoCon/LyCORIS middle factor; only plain LoRA pairs are supported",
        ),
        (
            ".scale",
            "a norm scale (control LoRA); norm scales cannot be patched",
        ),
        (
            ".bias",
            "a bias (control LoRA); only weight patches are supported",
        ),
    ];
    for (suffix, why) in REFUSED {
        if key.ends_with(suffix) {
            return Err(why.to_string());
        }
    }
    Err(
        "not a LoRA pair's tensor (expected .lora_A/.lora_B/.lora_down/.lora_up.weight or .alpha)"
            .into(),
    )
}

/// The pair of one module as found in the file.
#[derive(Default)]
struct Pair {
    down: Option<String>,
    up: Option<String>,
    alpha: Option<String>,
}

fn read_f32(set: &TensorSet, key: &str) -> Vec<f32> {
    let info = set.info(key).expect("key exists");
    let mut v = Vec::with_capacity(info.numel());
    decode_into(
        info.dtype,
        set.bytes(key).expect("key exists").as_slice(),
        1.0,
        &mut v,
    );
    v
}

/// `lora_alpha` from the PEFT adapter config diffusers' `save_lora_weights` stores in the
/// `lora_adapter_metadata` metadata entry, when a file carries one: `Ok(None)` without.
fn metadata_alpha(set: &TensorSet) -> std::result::Result<Option<f32>, String> {
    for f in &set.files {
        for key in ["lora_adapter_metadata"] {
            let Some(text) = f.header.metadata.get(key) else {
                continue;
            };
            let json: serde_json::Value = serde_json::from_str(text)
                .map_err(|e| format!("metadata {key} is not JSON: {e}"))?;
            // diffusers prefixes each field with the component (`transformer.lora_alpha`).
            let field = |name: &str| json.get(format!("transformer.{name}")).or(json.get(name));
            for pattern in ["alpha_pattern", "rank_pattern"] {
                if field(pattern)
                    .and_then(|p| p.as_object())
                    .is_some_and(|p| !p.is_empty())
                {
                    return Err(format!("metadata {key} has a per-module {pattern}, which is not supported; only one lora_alpha for all modules"));
                }
            }
            // rsLoRA scales by alpha/√rank, not alpha/rank: applying it as plain LoRA would be
            // silently wrong.
            if field("use_rslora").and_then(|v| v.as_bool()) == Some(true) {
                return Err(format!(
                    "metadata {key} says use_rslora (scale alpha/√rank), which is not supported"
                ));
            }
            if let Some(a) = field("lora_alpha").and_then(|a| a.as_f64()) {
                return Ok(Some(a as f32));
            }
        }
    }
    Ok(None)
}

/// Opens the LoRA file at `path` and maps it onto the linears of `cfg`. Every key that cannot be
/// placed and every shape that does not fit is listed in one error.
pub fn load_lora(path: &Path, cfg: &FluxConfig) -> Result<Lora> {
    let set = TensorSet::open(path)?;
    let err = |problems: Vec<String>| LoadError::Layout {
        path: path.to_path_buf(),
        component: "LoRA",
        problems,
    };
    let format = detect_format(set.keys().map(String::as_str)).ok_or_else(|| {
        err(vec![
            "no key looks like a Flux LoRA (lora_unet_…, diffusion_model.…, transformer.…, base_model.model.…, or bare BFL / diffusers module names)".into(),
        ])
    })?;
    let table = module_table(cfg, format);
    let mut problems = Vec::new();
    let mut pairs: BTreeMap<String, Pair> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for key in set.keys() {
        let (module, role) = match split_key(key) {
            Ok(x) => x,
            Err(why) => {
                problems.push(format!("{key}: {why}"));
                continue;
            }
        };
        let local = prefixes(format)
            .iter()
            .find_map(|p| module.strip_prefix(p).filter(|m| table.contains_key(*m)));
        let Some(local) = local else {
            let hint = if key.starts_with("lora_te") || key.starts_with("text_encoder") {
                " (a text-encoder LoRA; only the transformer takes LoRAs)"
            } else {
                ""
            };
            problems.push(format!(
                "{key}: {module} is not a linear layer of this transformer ({format} names){hint}"
            ));
            continue;
        };
        if !pairs.contains_key(local) {
            order.push(local.to_string());
        }
        let pair = pairs.entry(local.to_string()).or_default();
        let slot = match role {
            Role::Down => &mut pair.down,
            Role::Up => &mut pair.up,
            Role::Alpha => &mut pair.alpha,
        };
        if let Some(prev) = slot.replace(key.clone()) {
            problems.push(format!("{key}: same tensor as {prev} under another name"));
        }
        if !set.info(key).is_some_and(|i| i.dtype.is_float()) {
            problems.push(format!("{key}: not a float tensor"));
        }
    }
    let meta_alpha = match metadata_alpha(&set) {
        Ok(a) => a,
        Err(e) => {
            problems.push(e);
            None
        }
    };
    let mut has_alpha = meta_alpha.is_some();
    let mut patches = Vec::new();
    for module in &order {
        let pair = &pairs[module];
        let (Some(dk), Some(uk)) = (&pair.down, &pair.up) else {
            let have = pair
                .down
                .as_ref()
                .or(pair.up.as_ref())
                .or(pair.alpha.as_ref())
                .expect("a pair has at least one key");
            problems.push(format!(
                "{have}: {module} has no {} (a LoRA pair needs both)",
                if pair.down.is_none() {
                    "down/A"
                } else {
                    "up/B"
                }
            ));
            continue;
        };
        let (ds, us) = (
            &set.info(dk).expect("key").shape,
            &set.info(uk).expect("key").shape,
        );
        let places = &table[module];
        let want_rows: usize = places.iter().map(|p| p.rows).sum();
        let inp = places[0].inp;
        let (Some(&rank), true) = (ds.first(), ds.len() == 2 && us.len() == 2) else {
            problems.push(format!(
                "{module}: down {ds:?} and up {us:?} are not matrices"
            ));
            continue;
        };
        if ds[1] != inp || us[1] != rank || us[0] != want_rows || rank == 0 {
            problems.push(format!(
                "{module}: down {ds:?} / up {us:?} do not fit {} [{want_rows}, {inp}] (need down [rank, {inp}], up [{want_rows}, rank])",
                places[0].target
            ));
            continue;
        }
        let alpha = match &pair.alpha {
            Some(ak) => {
                has_alpha = true;
                let v = read_f32(&set, ak);
                if v.len() != 1 || !v[0].is_finite() {
                    problems.push(format!(
                        "{ak}: alpha must be one finite number, found {v:?}"
                    ));
                    continue;
                }
                Some(v[0])
            }
            None => meta_alpha,
        };
        let scale = alpha.map_or(1.0, |a| a / rank as f32);
        let (down, up) = (read_f32(&set, dk), read_f32(&set, uk));
        for p in places {
            let (b, e) = p.src.unwrap_or((0, p.rows));
            patches.push(LoraPatch {
                target: p.target.clone(),
                source: module.clone(),
                rank,
                inp,
                down: down.clone(),
                up: up[b * rank..e * rank].to_vec(),
                row0: p.row0,
                rows: e - b,
                scale,
            });
        }
    }
    if patches.is_empty() && problems.is_empty() {
        problems.push("the file holds no LoRA pair".into());
    }
    if !problems.is_empty() {
        return Err(err(problems));
    }
    Ok(Lora {
        path: path.to_path_buf(),
        format,
        has_alpha,
        patches,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_diffusers_module_lands_on_rows_that_tile_its_target() {
        let cfg = FluxConfig::kontext_dev();
        let table = module_table(&cfg, LoraFormat::Diffusers);
        let mut cover: BTreeMap<String, Vec<(usize, usize)>> = BTreeMap::new();
        for places in table.values() {
            for p in places {
                cover
                    .entry(p.target.clone())
                    .or_default()
                    .push((p.row0, p.row0 + p.rows));
            }
        }
        for (key, shape) in expected_shapes(&cfg) {
            if shape.len() != 2 {
                continue;
            }
            let mut r = cover.remove(&key).unwrap_or_default();
            r.sort();
            let mut next = 0;
            for (b, e) in r {
                assert_eq!(b, next, "{key}");
                next = e;
            }
            assert_eq!(next, shape[0], "{key}");
        }
        assert!(cover.is_empty());
        let q = &table["single_transformer_blocks.3.proj_mlp"][0];
        assert_eq!((q.row0, q.rows), (3 * 3072, 12288));
    }
}

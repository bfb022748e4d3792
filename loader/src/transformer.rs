//! The Flux transformer: config, expected tensors, and the one table that maps the diffusers
//! layout onto the canonical BFL names (spec 1.12, 1.14).

use crate::config::{config_err, push_layer, JsonConfig, Shapes};
use crate::error::{LoadError, Result};
use crate::tensors::{assemble, Component, Expect, Src, TensorSet};
use std::path::Path;

/// Prefix of ComfyUI whole-checkpoint files (spec 1.12).
pub const COMFY_PREFIX: &str = "model.diffusion_model.";

/// `FluxParams` of the BFL reference, read from `config.json` or from tensor shapes.
#[derive(Debug, Clone, PartialEq)]
pub struct FluxConfig {
    /// Packed latent channels per token (64 for Kontext: 16 channels × 2×2).
    pub in_channels: usize,
    pub out_channels: usize,
    /// Pooled CLIP width (768).
    pub vec_in_dim: usize,
    /// T5 width (4096).
    pub context_in_dim: usize,
    pub hidden_size: usize,
    /// MLP hidden width (4 × hidden for Flux).
    pub mlp_hidden: usize,
    pub num_heads: usize,
    pub head_dim: usize,
    /// Double-stream blocks.
    pub depth: usize,
    /// Single-stream blocks.
    pub depth_single: usize,
    /// RoPE split of the head dims over the (index, row, column) axes; sums to `head_dim`.
    pub axes_dim: Vec<usize>,
    pub theta: f32,
    pub qkv_bias: bool,
    pub guidance_embed: bool,
}

impl FluxConfig {
    /// FLUX.1 Kontext [dev] (`configs["flux-dev-kontext"]`, spec 1.1): for benchmarks and
    /// checks at the real shapes without the checkpoint.
    pub fn kontext_dev() -> FluxConfig {
        FluxConfig {
            in_channels: 64,
            out_channels: 64,
            vec_in_dim: 768,
            context_in_dim: 4096,
            hidden_size: 3072,
            mlp_hidden: 12288,
            num_heads: 24,
            head_dim: 128,
            depth: 19,
            depth_single: 38,
            axes_dim: vec![16, 56, 56],
            theta: 10000.0,
            qkv_bias: true,
            guidance_embed: true,
        }
    }
}

/// What the caller may say about a transformer whose files do not say it (single files carry no
/// config).
#[derive(Debug, Clone, Default)]
pub struct TransformerOptions {
    /// RoPE axes split. Needed for single files whose head dim is not 128.
    pub axes_dim: Option<Vec<usize>>,
}

/// A loaded transformer: its config and canonical weights.
pub struct Transformer {
    pub config: FluxConfig,
    pub weights: Component,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Layout {
    Bfl,
    Diffusers,
}

/// The diffusers ↔ BFL name table for everything that is a plain rename. Entries with `{i}` are
/// per block. Fused and reordered tensors (qkv, linear1, final layer) are in [`diffusers_sources`].
const RENAMES: &[(&str, &str)] = &[
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    (
        "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_1",
    ),
    (
        "time_in.out_layer",
        "time_text_embed.timestep_embedder.linear_2",
    ),
    (
        "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_1",
    ),
    (
        "guidance_in.out_layer",
        "time_text_embed.guidance_embedder.linear_2",
    ),
    (
        "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_1",
    ),
    (
        "vector_in.out_layer",
        "time_text_embed.text_embedder.linear_2",
    ),
    (
        "double_blocks.{i}.img_mod.lin",
        "transformer_blocks.{i}.norm1.linear",
    ),
    (
        "double_blocks.{i}.txt_mod.lin",
        "transformer_blocks.{i}.norm1_context.linear",
    ),
    (
        "double_blocks.{i}.img_attn.norm.query_norm.scale",
        "transformer_blocks.{i}.attn.norm_q.weight",
    ),
    (
        "double_blocks.{i}.img_attn.norm.key_norm.scale",
        "transformer_blocks.{i}.attn.norm_k.weight",
    ),
    (
        "double_blocks.{i}.txt_attn.norm.query_norm.scale",
        "transformer_blocks.{i}.attn.norm_added_q.weight",
    ),
    (
        "double_blocks.{i}.txt_attn.norm.key_norm.scale",
        "transformer_blocks.{i}.attn.norm_added_k.weight",
    ),
    (
        "double_blocks.{i}.img_attn.proj",
        "transformer_blocks.{i}.attn.to_out.0",
    ),
    (
        "double_blocks.{i}.txt_attn.proj",
        "transformer_blocks.{i}.attn.to_add_out",
    ),
    (
        "double_blocks.{i}.img_mlp.0",
        "transformer_blocks.{i}.ff.net.0.proj",
    ),
    (
        "double_blocks.{i}.img_mlp.2",
        "transformer_blocks.{i}.ff.net.2",
    ),
    (
        "double_blocks.{i}.txt_mlp.0",
        "transformer_blocks.{i}.ff_context.net.0.proj",
    ),
    (
        "double_blocks.{i}.txt_mlp.2",
        "transformer_blocks.{i}.ff_context.net.2",
    ),
    (
        "single_blocks.{i}.modulation.lin",
        "single_transformer_blocks.{i}.norm.linear",
    ),
    (
        "single_blocks.{i}.norm.query_norm.scale",
        "single_transformer_blocks.{i}.attn.norm_q.weight",
    ),
    (
        "single_blocks.{i}.norm.key_norm.scale",
        "single_transformer_blocks.{i}.attn.norm_k.weight",
    ),
    (
        "single_blocks.{i}.linear2",
        "single_transformer_blocks.{i}.proj_out",
    ),
    ("final_layer.linear", "proj_out"),
];

/// Splits `double_blocks.7.img_mod.lin.weight` into (`double_blocks.{i}.img_mod.lin`, 7, `.weight`).
fn split_block_index(canonical: &str) -> (String, Option<usize>) {
    let mut parts: Vec<&str> = canonical.split('.').collect();
    if parts.len() > 1 {
        if let Ok(i) = parts[1].parse::<usize>() {
            parts[1] = "{i}";
            return (parts.join("."), Some(i));
        }
    }
    (canonical.to_string(), None)
}

/// Source tensors of canonical `name` in a diffusers folder, with `d` = hidden size. The LoRA
/// loader maps diffusers module names through the same table ([`crate::lora`]).
pub(crate) fn diffusers_sources(name: &str, d: usize) -> Vec<Src> {
    let (pattern, idx) = split_block_index(name);
    let i = idx.map(|i| i.to_string()).unwrap_or_default();
    let (stem, suffix) = match pattern.rsplit_once('.') {
        Some((s, suf)) if suf == "weight" || suf == "bias" => (s.to_string(), format!(".{suf}")),
        _ => (pattern.clone(), String::new()),
    };
    let qkv = |names: &[&str]| {
        names
            .iter()
            .map(|n| Src::whole(format!("{}{suffix}", n.replace("{i}", &i))))
            .collect()
    };
    match stem.as_str() {
        "double_blocks.{i}.img_attn.qkv" => qkv(&[
            "transformer_blocks.{i}.attn.to_q",
            "transformer_blocks.{i}.attn.to_k",
            "transformer_blocks.{i}.attn.to_v",
        ]),
        "double_blocks.{i}.txt_attn.qkv" => qkv(&[
            "transformer_blocks.{i}.attn.add_q_proj",
            "transformer_blocks.{i}.attn.add_k_proj",
            "transformer_blocks.{i}.attn.add_v_proj",
        ]),
        "single_blocks.{i}.linear1" => qkv(&[
            "single_transformer_blocks.{i}.attn.to_q",
            "single_transformer_blocks.{i}.attn.to_k",
            "single_transformer_blocks.{i}.attn.to_v",
            "single_transformer_blocks.{i}.proj_mlp",
        ]),
        // diffusers' AdaLayerNormContinuous stores (scale, shift); BFL is (shift, scale).
        "final_layer.adaLN_modulation.1" => {
            let key = format!("norm_out.linear{suffix}");
            vec![Src::rows(key.clone(), d, 2 * d), Src::rows(key, 0, d)]
        }
        _ => {
            // Norm scales map whole names (their diffusers key ends in `.weight`).
            for (bfl, diff) in RENAMES {
                if *bfl == pattern {
                    return vec![Src::whole(diff.replace("{i}", &i))];
                }
                if *bfl == stem {
                    return vec![Src::whole(format!("{}{suffix}", diff.replace("{i}", &i)))];
                }
            }
            // Every canonical name is covered above; reaching here is a table bug, which the
            // layout check then reports as a missing tensor under the canonical name.
            vec![Src::whole(name.to_string())]
        }
    }
}

/// Every canonical tensor and its shape for `cfg` (spec 1.12).
pub fn expected_shapes(cfg: &FluxConfig) -> Vec<(String, Vec<usize>)> {
    let (d, m, hd) = (cfg.hidden_size, cfg.mlp_hidden, cfg.head_dim);
    let mut v: Vec<(String, Vec<usize>)> = Vec::new();
    let mut linear = |name: String, out: usize, inp: usize, bias: bool| {
        push_layer(&mut v, &name, vec![out, inp], bias)
    };
    linear("img_in".into(), d, cfg.in_channels, true);
    linear("txt_in".into(), d, cfg.context_in_dim, true);
    let mut embedders = vec![("time_in", 256), ("vector_in", cfg.vec_in_dim)];
    if cfg.guidance_embed {
        embedders.push(("guidance_in", 256));
    }
    for (e, inp) in embedders {
        linear(format!("{e}.in_layer"), d, inp, true);
        linear(format!("{e}.out_layer"), d, d, true);
    }
    for i in 0..cfg.depth {
        for s in ["img", "txt"] {
            let b = format!("double_blocks.{i}.{s}");
            linear(format!("{b}_mod.lin"), 6 * d, d, true);
            linear(format!("{b}_attn.qkv"), 3 * d, d, cfg.qkv_bias);
            linear(format!("{b}_attn.proj"), d, d, true);
            linear(format!("{b}_mlp.0"), m, d, true);
            linear(format!("{b}_mlp.2"), d, m, true);
        }
    }
    for i in 0..cfg.depth_single {
        let b = format!("single_blocks.{i}");
        linear(format!("{b}.linear1"), 3 * d + m, d, true);
        linear(format!("{b}.linear2"), d, d + m, true);
        linear(format!("{b}.modulation.lin"), 3 * d, d, true);
    }
    linear("final_layer.linear".into(), cfg.out_channels, d, true);
    linear("final_layer.adaLN_modulation.1".into(), 2 * d, d, true);
    for i in 0..cfg.depth {
        for s in ["img", "txt"] {
            for n in ["query_norm", "key_norm"] {
                v.push((
                    format!("double_blocks.{i}.{s}_attn.norm.{n}.scale"),
                    vec![hd],
                ));
            }
        }
    }
    for i in 0..cfg.depth_single {
        for n in ["query_norm", "key_norm"] {
            v.push((format!("single_blocks.{i}.norm.{n}.scale"), vec![hd]));
        }
    }
    v
}

/// Default RoPE split: the real model's (spec 1.1) when the head dim is 128.
fn default_axes(head_dim: usize, path: &Path, opts: &TransformerOptions) -> Result<Vec<usize>> {
    match (&opts.axes_dim, head_dim) {
        (Some(a), _) => Ok(a.clone()),
        (None, 128) => Ok(vec![16, 56, 56]),
        (None, hd) => Err(config_err(
            path,
            format!("a single-file checkpoint with head dim {hd} does not say how RoPE splits it over the 3 axes. HINT: pass the axes split (axes_dim) or use a diffusers folder with config.json"),
        )),
    }
}

/// Infers the config of a BFL single file from its tensor shapes (`prefix` = key prefix).
fn infer_bfl_config(
    set: &TensorSet,
    prefix: &str,
    opts: &TransformerOptions,
) -> Result<FluxConfig> {
    let s = Shapes { set, prefix };
    let hidden_size = s.dim("img_in.weight", 0)?;
    let depth = s.count("double_blocks.")?;
    let (head_dim, mut mlp_hidden) = if depth > 0 {
        (
            s.dim("double_blocks.0.img_attn.norm.query_norm.scale", 0)?,
            s.dim("double_blocks.0.img_mlp.0.weight", 0)?,
        )
    } else {
        let linear1 = s.dim("single_blocks.0.linear1.weight", 0)?;
        (s.dim("single_blocks.0.norm.query_norm.scale", 0)?, linear1)
    };
    if depth == 0 {
        mlp_hidden = mlp_hidden.saturating_sub(3 * hidden_size);
    }
    if head_dim == 0 || hidden_size % head_dim != 0 {
        return Err(config_err(
            &set.root,
            format!("hidden size {hidden_size} is not a multiple of the head dim {head_dim}"),
        ));
    }
    Ok(FluxConfig {
        in_channels: s.dim("img_in.weight", 1)?,
        out_channels: s.dim("final_layer.linear.weight", 0)?,
        vec_in_dim: s.dim("vector_in.in_layer.weight", 1)?,
        context_in_dim: s.dim("txt_in.weight", 1)?,
        hidden_size,
        mlp_hidden,
        num_heads: hidden_size / head_dim,
        head_dim,
        depth,
        depth_single: s.count("single_blocks.")?,
        axes_dim: default_axes(head_dim, &set.root, opts)?,
        theta: 10_000.0,
        qkv_bias: depth == 0 || s.has("double_blocks.0.img_attn.qkv.bias"),
        guidance_embed: s.has("guidance_in.in_layer.weight"),
    })
}

/// Reads a diffusers `transformer/config.json`. The MLP width is not in it (diffusers fixes the
/// ratio at 4), so it is read from the first MLP weight.
fn read_diffusers_config(config_path: &Path, set: &TensorSet) -> Result<FluxConfig> {
    let j = JsonConfig::read(config_path)?;
    let head_dim = j.usize("attention_head_dim")?;
    let num_heads = j.usize("num_attention_heads")?;
    let in_channels = j.usize("in_channels")?;
    let patch = j.usize_or("patch_size", 1)?;
    if patch != 1 {
        return Err(config_err(
            config_path,
            format!("patch_size {patch} is not supported (Flux uses 1)"),
        ));
    }
    let depth = j.usize("num_layers")?;
    let s = Shapes { set, prefix: "" };
    s.expect_count("transformer_blocks.", depth, "num_layers")?;
    s.expect_count(
        "single_transformer_blocks.",
        j.usize("num_single_layers")?,
        "num_single_layers",
    )?;
    let mlp_hidden = if depth > 0 {
        s.dim("transformer_blocks.0.ff.net.0.proj.weight", 0)?
    } else {
        s.dim("single_transformer_blocks.0.proj_mlp.weight", 0)?
    };
    Ok(FluxConfig {
        in_channels,
        out_channels: j.usize_or("out_channels", in_channels)?,
        vec_in_dim: j.usize("pooled_projection_dim")?,
        context_in_dim: j.usize("joint_attention_dim")?,
        hidden_size: head_dim * num_heads,
        mlp_hidden,
        num_heads,
        head_dim,
        depth,
        depth_single: j.usize("num_single_layers")?,
        axes_dim: j.usize_list("axes_dims_rope")?,
        theta: 10_000.0,
        qkv_bias: true,
        guidance_embed: j.bool_or("guidance_embeds", false),
    })
}

fn validate(cfg: &FluxConfig, path: &Path) -> Result<()> {
    let sum: usize = cfg.axes_dim.iter().sum();
    if cfg.axes_dim.len() != 3 || sum != cfg.head_dim || cfg.axes_dim.iter().any(|a| a % 2 != 0) {
        return Err(config_err(
            path,
            format!(
                "axes_dim {:?} must be 3 even numbers summing to the head dim {}",
                cfg.axes_dim, cfg.head_dim
            ),
        ));
    }
    Ok(())
}

/// Opens a Flux transformer from a BFL / ComfyUI single file, or a diffusers `transformer/`
/// folder (or the sharded index inside one).
pub fn load_transformer(path: &Path, opts: &TransformerOptions) -> Result<Transformer> {
    let set = TensorSet::open(path)?;
    let (layout, prefix) = if set.contains("x_embedder.weight") {
        (Layout::Diffusers, "")
    } else if set.contains("img_in.weight") {
        (Layout::Bfl, "")
    } else if set.contains(&format!("{COMFY_PREFIX}img_in.weight")) {
        (Layout::Bfl, COMFY_PREFIX)
    } else {
        return Err(LoadError::UnknownLayout {
            path: path.to_path_buf(),
            reason: "not a Flux transformer: found neither img_in.weight (BFL), model.diffusion_model.img_in.weight (ComfyUI) nor x_embedder.weight (diffusers)".into(),
        });
    };
    let config = match layout {
        Layout::Diffusers => {
            let dir = if path.is_dir() {
                path
            } else {
                path.parent().unwrap_or(Path::new("."))
            };
            let cfg_path = dir.join("config.json");
            if cfg_path.is_file() {
                read_diffusers_config(&cfg_path, &set)?
            } else {
                return Err(config_err(
                    &cfg_path,
                    "a diffusers-named transformer needs its config.json beside the weights",
                ));
            }
        }
        Layout::Bfl => infer_bfl_config(&set, prefix, opts)?,
    };
    validate(&config, path)?;
    let d = config.hidden_size;
    let expects: Vec<Expect> = expected_shapes(&config)
        .into_iter()
        .map(|(name, shape)| match layout {
            Layout::Bfl => Expect::same(name, shape),
            Layout::Diffusers => Expect {
                sources: diffusers_sources(&name, d),
                canonical: name,
                shape,
            },
        })
        .collect();
    let layout_name = match (layout, prefix) {
        (Layout::Diffusers, _) => "diffusers folder",
        (Layout::Bfl, "") => "BFL single file",
        (Layout::Bfl, _) => "ComfyUI single file (model.diffusion_model. prefix)",
    };
    let weights = assemble(&set, "transformer", layout_name, prefix, &expects)?;
    Ok(Transformer { config, weights })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_canonical_name_has_a_diffusers_source() {
        let cfg = FluxConfig::kontext_dev();
        let shapes = expected_shapes(&cfg);
        assert_eq!(shapes.len(), 780, "spec 1.12: 780 tensors");
        let params: usize = shapes
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(params, 11_901_408_320, "spec 1.13 parameter count");
        let mut seen = std::collections::BTreeSet::new();
        for (name, _) in &shapes {
            for s in diffusers_sources(name, 3072) {
                assert_ne!(s.key, *name, "{name} fell through the rename table");
                seen.insert((s.key, s.rows));
            }
        }
        // Every diffusers tensor used once (the final layer's key twice, as two halves).
        let total_sources: usize = shapes
            .iter()
            .map(|(n, _)| diffusers_sources(n, 3072).len())
            .sum();
        assert_eq!(seen.len(), total_sources);
    }
}

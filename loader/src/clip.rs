//! The CLIP-L text model (spec 5.2): config and expected tensors under the Hugging Face names,
//! which both `text_encoder/` and ComfyUI's `clip_l.safetensors` use.

use crate::config::{config_err, push_layer, JsonConfig, Shapes};
use crate::error::{LoadError, Result};
use crate::tensors::{assemble, Component, Expect, Src, TensorSet};
use std::path::Path;

/// `CLIPTextConfig` fields the text model uses.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub num_layers: usize,
    pub max_positions: usize,
    pub layer_norm_eps: f32,
    /// `quick_gelu` for CLIP-L; `gelu` also occurs in other CLIPs.
    pub hidden_act: String,
    /// Decides the pooling rule: 2 means the legacy argmax-of-ids rule (spec 5.2).
    pub eos_token_id: usize,
}

pub struct Clip {
    pub config: ClipConfig,
    pub weights: Component,
}

/// Every canonical CLIP text tensor with its shape.
pub fn expected_shapes(c: &ClipConfig) -> Vec<(String, Vec<usize>)> {
    let (d, f) = (c.hidden_size, c.intermediate_size);
    let mut v = vec![
        (
            "text_model.embeddings.token_embedding.weight".to_string(),
            vec![c.vocab_size, d],
        ),
        (
            "text_model.embeddings.position_embedding.weight".to_string(),
            vec![c.max_positions, d],
        ),
    ];
    for i in 0..c.num_layers {
        let l = format!("text_model.encoder.layers.{i}");
        for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            push_layer(&mut v, &format!("{l}.self_attn.{p}"), vec![d, d], true);
        }
        push_layer(&mut v, &format!("{l}.layer_norm1"), vec![d], true);
        push_layer(&mut v, &format!("{l}.layer_norm2"), vec![d], true);
        push_layer(&mut v, &format!("{l}.mlp.fc1"), vec![f, d], true);
        push_layer(&mut v, &format!("{l}.mlp.fc2"), vec![d, f], true);
    }
    push_layer(&mut v, "text_model.final_layer_norm", vec![d], true);
    v
}

fn read_config(path: &Path) -> Result<ClipConfig> {
    let j = JsonConfig::read(path)?;
    Ok(ClipConfig {
        vocab_size: j.usize("vocab_size")?,
        hidden_size: j.usize("hidden_size")?,
        intermediate_size: j.usize("intermediate_size")?,
        num_heads: j.usize("num_attention_heads")?,
        num_layers: j.usize("num_hidden_layers")?,
        max_positions: j.usize("max_position_embeddings")?,
        layer_norm_eps: j.eps_or("layer_norm_eps", 1e-5)?,
        hidden_act: j.str_or("hidden_act", "quick_gelu").to_string(),
        eos_token_id: j.usize_or("eos_token_id", 2)?,
    })
}

/// Sizes a config-less `clip_l.safetensors`. The head count is not in the weights: CLIP text
/// models use 64-wide heads.
fn infer_config(set: &TensorSet, prefix: &str) -> Result<ClipConfig> {
    let s = Shapes { set, prefix };
    let tok = "embeddings.token_embedding.weight";
    let hidden_size = s.dim(tok, 1)?;
    if hidden_size % 64 != 0 {
        return Err(config_err(&set.root, format!("hidden size {hidden_size} is not a multiple of CLIP's 64-wide heads; use a folder with config.json")));
    }
    Ok(ClipConfig {
        vocab_size: s.dim(tok, 0)?,
        hidden_size,
        intermediate_size: s.dim("encoder.layers.0.mlp.fc1.weight", 0)?,
        num_heads: hidden_size / 64,
        num_layers: s.count("encoder.layers.")?,
        max_positions: s.dim("embeddings.position_embedding.weight", 0)?,
        layer_norm_eps: 1e-5,
        hidden_act: "quick_gelu".into(),
        eos_token_id: 2,
    })
}

/// Opens the CLIP text model from a `text_encoder/` folder or `clip_l.safetensors`.
pub fn load_clip(path: &Path) -> Result<Clip> {
    let set = TensorSet::open(path)?;
    // transformers 5 saves CLIPTextModel without the `text_model.` prefix; older files and
    // ComfyUI's clip_l have it. Both map to the prefixed canonical names.
    let stored_prefix = if set.contains("text_model.embeddings.token_embedding.weight") {
        "text_model."
    } else if set.contains("embeddings.token_embedding.weight") {
        ""
    } else {
        return Err(LoadError::UnknownLayout {
            path: path.to_path_buf(),
            reason: "not a CLIP text model: no text_model.embeddings.token_embedding.weight".into(),
        });
    };
    let (config, layout) = if path.is_dir() && path.join("config.json").is_file() {
        (
            read_config(&path.join("config.json"))?,
            "Hugging Face folder",
        )
    } else {
        (infer_config(&set, stored_prefix)?, "single file")
    };
    Shapes {
        set: &set,
        prefix: stored_prefix,
    }
    .expect_count("encoder.layers.", config.num_layers, "num_hidden_layers")?;
    if config.num_heads == 0 || config.hidden_size % config.num_heads != 0 {
        return Err(config_err(
            path,
            format!(
                "hidden size {} is not a multiple of {} heads",
                config.hidden_size, config.num_heads
            ),
        ));
    }
    let expects: Vec<Expect> = expected_shapes(&config)
        .into_iter()
        .map(|(name, shape)| {
            let stored = format!(
                "{stored_prefix}{}",
                name.strip_prefix("text_model.").unwrap_or(&name)
            );
            Expect {
                canonical: name,
                shape,
                sources: vec![Src::whole(stored)],
            }
        })
        .collect();
    let weights = assemble(&set, "clip", layout, "", &expects)?;
    Ok(Clip { config, weights })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_l_parameter_count_matches_spec() {
        let c = crate::sparse::clip_l();
        let n: usize = expected_shapes(&c)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(n, 123_060_480, "spec 5.2");
    }
}

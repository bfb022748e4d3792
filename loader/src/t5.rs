//! The T5 v1.1 encoder (spec 5.1): config and expected tensors under the Hugging Face names,
//! which both `text_encoder_2/` and ComfyUI's `t5xxl_*.safetensors` use.

use crate::config::{config_err, JsonConfig, Shapes};
use crate::error::{LoadError, Result};
use crate::tensors::{assemble, Component, Expect, Src, TensorSet};
use std::path::Path;

/// `T5Config` fields the encoder uses.
#[derive(Debug, Clone, PartialEq)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f32,
}

pub struct T5 {
    pub config: T5Config,
    pub weights: Component,
}

/// Every canonical T5 encoder tensor with its shape.
pub fn expected_shapes(c: &T5Config) -> Vec<(String, Vec<usize>)> {
    let inner = c.num_heads * c.d_kv;
    let mut v = vec![("shared.weight".to_string(), vec![c.vocab_size, c.d_model])];
    for i in 0..c.num_layers {
        let b = format!("encoder.block.{i}.layer");
        for p in ["q", "k", "v"] {
            v.push((
                format!("{b}.0.SelfAttention.{p}.weight"),
                vec![inner, c.d_model],
            ));
        }
        v.push((
            format!("{b}.0.SelfAttention.o.weight"),
            vec![c.d_model, inner],
        ));
        if i == 0 {
            v.push((
                format!("{b}.0.SelfAttention.relative_attention_bias.weight"),
                vec![c.relative_attention_num_buckets, c.num_heads],
            ));
        }
        v.push((format!("{b}.0.layer_norm.weight"), vec![c.d_model]));
        v.push((
            format!("{b}.1.DenseReluDense.wi_0.weight"),
            vec![c.d_ff, c.d_model],
        ));
        v.push((
            format!("{b}.1.DenseReluDense.wi_1.weight"),
            vec![c.d_ff, c.d_model],
        ));
        v.push((
            format!("{b}.1.DenseReluDense.wo.weight"),
            vec![c.d_model, c.d_ff],
        ));
        v.push((format!("{b}.1.layer_norm.weight"), vec![c.d_model]));
    }
    v.push((
        "encoder.final_layer_norm.weight".to_string(),
        vec![c.d_model],
    ));
    v
}

fn read_config(path: &Path) -> Result<T5Config> {
    let j = JsonConfig::read(path)?;
    let ff = j.str_or("feed_forward_proj", "gated-gelu");
    if ff != "gated-gelu" {
        return Err(config_err(
            path,
            format!("feed_forward_proj {ff:?}: FLUX uses T5 v1.1 (gated-gelu)"),
        ));
    }
    Ok(T5Config {
        vocab_size: j.usize("vocab_size")?,
        d_model: j.usize("d_model")?,
        d_kv: j.usize("d_kv")?,
        d_ff: j.usize("d_ff")?,
        num_layers: j.usize("num_layers")?,
        num_heads: j.usize("num_heads")?,
        relative_attention_num_buckets: j.usize_or("relative_attention_num_buckets", 32)?,
        relative_attention_max_distance: j.usize_or("relative_attention_max_distance", 128)?,
        layer_norm_epsilon: j.eps_or("layer_norm_epsilon", 1e-6)?,
    })
}

/// Sizes a config-less ComfyUI `t5xxl_*.safetensors` from its shapes (`emb` = embedding key).
fn infer_config(set: &TensorSet, emb: &str) -> Result<T5Config> {
    let s = Shapes { set, prefix: "" };
    let bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight";
    let num_heads = s.dim(bias, 1)?;
    let inner = s.dim("encoder.block.0.layer.0.SelfAttention.q.weight", 0)?;
    if num_heads == 0 || inner % num_heads != 0 {
        return Err(config_err(
            &set.root,
            format!("attention width {inner} is not a multiple of {num_heads} heads"),
        ));
    }
    Ok(T5Config {
        vocab_size: s.dim(emb, 0)?,
        d_model: s.dim(emb, 1)?,
        d_kv: inner / num_heads,
        d_ff: s.dim("encoder.block.0.layer.1.DenseReluDense.wi_0.weight", 0)?,
        num_layers: s.count("encoder.block.")?,
        num_heads,
        relative_attention_num_buckets: s.dim(bias, 0)?,
        // Not stored in the weights; T5 v1.1's value (spec 5.1).
        relative_attention_max_distance: 128,
        layer_norm_epsilon: 1e-6,
    })
}

/// Opens the T5 encoder from a `text_encoder_2/` folder (sharded or not) or a single file.
pub fn load_t5(path: &Path) -> Result<T5> {
    let set = TensorSet::open(path)?;
    // Files that keep only the tied copy are read through it.
    let emb = if set.contains("shared.weight") {
        "shared.weight"
    } else {
        "encoder.embed_tokens.weight"
    };
    if !set.contains(emb) || !set.contains("encoder.block.0.layer.0.SelfAttention.q.weight") {
        return Err(LoadError::UnknownLayout {
            path: path.to_path_buf(),
            reason: "not a T5 encoder: no shared.weight / encoder.block.0.layer.0.SelfAttention.q.weight".into(),
        });
    }
    let dir = if path.is_dir() {
        path
    } else {
        path.parent().unwrap_or(Path::new("."))
    };
    let (config, layout) = if path.is_dir() && dir.join("config.json").is_file() {
        (
            read_config(&dir.join("config.json"))?,
            "Hugging Face folder",
        )
    } else {
        (infer_config(&set, emb)?, "single file")
    };
    Shapes {
        set: &set,
        prefix: "",
    }
    .expect_count("encoder.block.", config.num_layers, "num_layers")?;
    let expects: Vec<Expect> = expected_shapes(&config)
        .into_iter()
        .map(|(name, shape)| {
            let src = if name == "shared.weight" {
                emb.to_string()
            } else {
                name.clone()
            };
            Expect {
                canonical: name,
                shape,
                sources: vec![Src::whole(src)],
            }
        })
        .collect();
    let weights = assemble(&set, "t5", layout, "", &expects)?;
    Ok(T5 { config, weights })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xxl_parameter_count_matches_spec() {
        let c = crate::sparse::t5_xxl();
        let n: usize = expected_shapes(&c)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(n, 4_762_310_656, "spec 5.1");
    }
}

//! Sparse checkpoints: files with the real headers whose data is a hole in the file, so the
//! full-size model (24 GB of transformer, 9.5 GB of T5) costs no disk and no download. The
//! memory planner's checks and `--dry-run` tests open them like the real files; only headers
//! are read.

use crate::clip::ClipConfig;
use crate::model::ModelPaths;
use crate::t5::T5Config;
use crate::transformer::FluxConfig;
use crate::vae::VaeConfig;
use std::io::Write;
use std::path::Path;

/// Writes a safetensors file of `tensors` (name, safetensors dtype such as `"BF16"`, shape)
/// whose data section is a hole. Returns the file's length.
pub fn write_sparse(path: &Path, tensors: &[(String, &str, Vec<usize>)]) -> std::io::Result<u64> {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, dtype, shape) in tensors {
        let size = match *dtype {
            "F32" => 4,
            "BF16" | "F16" => 2,
            _ => 1,
        };
        let bytes = size * shape.iter().product::<usize>() as u64;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let json = serde_json::Value::Object(header).to_string();
    let mut f = std::fs::File::create(path)?;
    f.write_all(&(json.len() as u64).to_le_bytes())?;
    f.write_all(json.as_bytes())?;
    let len = 8 + json.len() as u64 + offset;
    f.set_len(len)?;
    Ok(len)
}

/// T5-XXL v1.1's encoder (spec 5.1).
pub fn t5_xxl() -> T5Config {
    T5Config {
        vocab_size: 32128,
        d_model: 4096,
        d_kv: 64,
        d_ff: 10240,
        num_layers: 24,
        num_heads: 64,
        relative_attention_num_buckets: 32,
        relative_attention_max_distance: 128,
        layer_norm_epsilon: 1e-6,
    }
}

/// CLIP ViT-L/14's text model (spec 5.2).
pub fn clip_l() -> ClipConfig {
    ClipConfig {
        vocab_size: 49408,
        hidden_size: 768,
        intermediate_size: 3072,
        num_heads: 12,
        num_layers: 12,
        max_positions: 77,
        layer_norm_eps: 1e-5,
        hidden_act: "quick_gelu".into(),
        eos_token_id: 2,
    }
}

/// The Flux autoencoder (spec 4.1).
pub fn flux_ae() -> VaeConfig {
    VaeConfig {
        in_channels: 3,
        out_channels: 3,
        ch: 128,
        ch_mult: vec![1, 2, 4, 4],
        num_res_blocks: 2,
        z_channels: 16,
        norm_groups: 32,
        scale_factor: 0.3611,
        shift_factor: 0.1159,
    }
}

/// Writes the four parts of FLUX.1 Kontext [dev] at full size into `dir` as ComfyUI single
/// files (transformer in bf16, or plain fp8 for its matrices when `fp8`; T5 and CLIP bf16, the
/// autoencoder f32), every data section a hole, and returns their paths.
pub fn write_full_size_model(dir: &Path, fp8: bool) -> std::io::Result<ModelPaths> {
    let matrix = if fp8 { "F8_E4M3" } else { "BF16" };
    let transformer: Vec<_> = crate::transformer::expected_shapes(&FluxConfig::kontext_dev())
        .into_iter()
        .map(|(n, s)| {
            let dt = if s.len() == 2 { matrix } else { "BF16" };
            (n, dt, s)
        })
        .collect();
    let bf16 =
        |v: Vec<(String, Vec<usize>)>, prefix: &str| -> Vec<(String, &'static str, Vec<usize>)> {
            v.into_iter()
                .map(|(n, s)| (format!("{prefix}{n}"), "BF16", s))
                .collect()
        };
    let vae: Vec<_> = crate::vae::expected_shapes(&flux_ae())
        .into_iter()
        .map(|(n, s)| (n, "F32", s))
        .collect();
    let paths = ModelPaths {
        transformer: Some(dir.join("flux1-kontext-dev.safetensors")),
        vae: Some(dir.join("ae.safetensors")),
        t5: Some(dir.join("t5xxl_fp16.safetensors")),
        clip: Some(dir.join("clip_l.safetensors")),
        ..ModelPaths::default()
    };
    write_sparse(paths.transformer.as_ref().unwrap(), &transformer)?;
    write_sparse(paths.vae.as_ref().unwrap(), &vae)?;
    write_sparse(
        paths.t5.as_ref().unwrap(),
        &bf16(crate::t5::expected_shapes(&t5_xxl()), ""),
    )?;
    write_sparse(
        paths.clip.as_ref().unwrap(),
        &bf16(crate::clip::expected_shapes(&clip_l()), ""),
    )?;
    Ok(paths)
}

//! The same tiny transformer, saved by diffusers in every layout, loads to the same canonical
//! tensors: exactly for 16/32-bit files, within e4m3 rounding for fp8 files.

use kontext_loader::{load_transformer, DType, FluxConfig, Quant, Transformer, TransformerOptions};
use std::path::PathBuf;

fn fixture(name: &str, file: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/transformer"
    ))
    .join(name)
    .join(file)
}

fn meta(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name, "meta.json")).unwrap()).unwrap()
}

fn load(name: &str, file: &str) -> Transformer {
    let axes: Vec<usize> = serde_json::from_value(meta(name)["axes_dim"].clone()).unwrap();
    load_transformer(
        &fixture(name, file),
        &TransformerOptions {
            axes_dim: Some(axes),
        },
    )
    .unwrap_or_else(|e| panic!("{name}/{file}: {e}"))
}

fn config_from_meta(name: &str) -> FluxConfig {
    let m = meta(name);
    let u = |k: &str| m[k].as_u64().unwrap() as usize;
    FluxConfig {
        in_channels: u("in_channels"),
        out_channels: u("out_channels"),
        vec_in_dim: u("vec_in_dim"),
        context_in_dim: u("context_in_dim"),
        hidden_size: u("hidden_size"),
        mlp_hidden: u("mlp_hidden"),
        num_heads: u("num_heads"),
        head_dim: u("head_dim"),
        depth: u("depth"),
        depth_single: u("depth_single"),
        axes_dim: serde_json::from_value(m["axes_dim"].clone()).unwrap(),
        theta: 10000.0,
        qkv_bias: true,
        guidance_embed: true,
    }
}

#[test]
fn diffusers_and_bfl_give_identical_tensors_and_configs() {
    for name in ["a", "b"] {
        let diff = load(name, "diffusers");
        let bfl = load(name, "bfl.safetensors");
        let want = config_from_meta(name);
        assert_eq!(diff.config, want, "{name}: diffusers config");
        assert_eq!(bfl.config, want, "{name}: config inferred from BFL shapes");
        assert_eq!(diff.weights.layout, "diffusers folder");
        assert_eq!(bfl.weights.layout, "BFL single file");
        assert_eq!(diff.weights.weights.len(), bfl.weights.weights.len());
        for (key, w) in &bfl.weights.weights {
            let d = diff.weights.get(key).unwrap();
            assert_eq!(d.shape, w.shape, "{name}: {key}");
            // Bit-exact: both files hold the same f32 values.
            let (a, b) = (d.to_f32(), w.to_f32());
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{name}: {key} differs"
            );
        }
        // The diffusers q/k/v come from three tensors, the final layer from two swapped halves.
        assert_eq!(
            diff.weights
                .get("double_blocks.0.img_attn.qkv.weight")
                .unwrap()
                .parts
                .len(),
            3
        );
        assert_eq!(
            diff.weights
                .get("single_blocks.0.linear1.bias")
                .unwrap()
                .parts
                .len(),
            4
        );
        let fin = diff
            .weights
            .get("final_layer.adaLN_modulation.1.weight")
            .unwrap();
        assert_eq!(fin.parts.len(), 2);
    }
}

/// Largest error e4m3 rounding can leave on `w` with per-tensor `scale`: half a step of the 3-bit
/// mantissa (2^-4 relative) for normals, half the subnormal step (2^-10 · scale) near zero.
fn e4m3_bound(w: f32, scale: f32) -> f32 {
    (w.abs() * 2f32.powi(-4)).max(scale * 2f32.powi(-10)) * 1.0001
}

#[test]
fn fp8_files_match_within_e4m3_rounding() {
    for name in ["a", "b"] {
        let bfl = load(name, "bfl.safetensors");
        for (file, quant) in [
            (
                "bfl_fp8_scaled.safetensors",
                Quant::ScaledFp8 { fp8_matmul: true },
            ),
            ("bfl_fp8.safetensors", Quant::PlainFp8),
        ] {
            let q = load(name, file);
            assert_eq!(q.weights.quant, quant, "{name}/{file}");
            assert_eq!(q.config, bfl.config, "{name}/{file}");
            let mut fp8_count = 0;
            for (key, w) in &bfl.weights.weights {
                let qw = q.weights.get(key).unwrap();
                let scale = qw.parts[0].scale.unwrap_or(1.0);
                if w.shape.len() == 2 {
                    assert_eq!(qw.dtype, DType::F8E4M3, "{name}/{file}: {key}");
                    assert_eq!(
                        qw.parts[0].scale.is_some(),
                        file.contains("scaled"),
                        "{key}"
                    );
                    fp8_count += 1;
                } else {
                    assert_eq!(qw.dtype, DType::BF16, "{name}/{file}: {key}");
                }
                for (i, (x, y)) in w.to_f32().iter().zip(qw.to_f32()).enumerate() {
                    let bound = if qw.dtype == DType::BF16 {
                        x.abs() * 2f32.powi(-8)
                    } else {
                        e4m3_bound(*x, scale)
                    };
                    assert!(
                        (x - y).abs() <= bound,
                        "{name}/{file}: {key}[{i}] {x} vs {y} (bound {bound})"
                    );
                }
            }
            assert!(
                fp8_count > 20,
                "{name}/{file}: only {fp8_count} fp8 weights"
            );
        }
    }
}

#[test]
fn e4m3_decoder_matches_torch_table() {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/fp8_e4m3fn_table.bin"
    ))
    .unwrap();
    assert_eq!(bytes.len(), 1024);
    for code in 0..256usize {
        let torch = f32::from_le_bytes(bytes[4 * code..4 * code + 4].try_into().unwrap());
        let ours = f32::from_bits(kontext_loader::dtype::E4M3_TO_F32[code]);
        if torch.is_nan() {
            assert!(ours.is_nan(), "code {code:#04x}");
        } else {
            assert_eq!(torch.to_bits(), ours.to_bits(), "code {code:#04x}");
        }
    }
}

#[test]
fn sharded_folder_through_index() {
    // Split fixture "a" into two shards with an index, as diffusers does for large models.
    let d = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("a", "bfl.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    let half = names.len() / 2;
    let mut map = serde_json::Map::new();
    for (i, chunk) in [&names[..half], &names[half..]].iter().enumerate() {
        let shard = format!("model-0000{}-of-00002.safetensors", i + 1);
        let views: Vec<_> = chunk
            .iter()
            .map(|n| (n.to_string(), st.tensor(n).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &d.path().join(&shard)).unwrap();
        for n in chunk.iter() {
            map.insert(n.to_string(), serde_json::Value::String(shard.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        d.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let sharded = load_transformer(
        d.path(),
        &TransformerOptions {
            axes_dim: Some(vec![4, 6, 6]),
        },
    )
    .unwrap();
    let single = load("a", "bfl.safetensors");
    assert_eq!(sharded.config, single.config);
    for (k, w) in &single.weights.weights {
        assert_eq!(sharded.weights.get(k).unwrap().to_f32(), w.to_f32(), "{k}");
    }
}

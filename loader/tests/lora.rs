//! LoRA files: the format from the keys, every format onto the same canonical weights and rows,
//! and one error that lists every key the loader cannot place.

use kontext_loader::lora::detect_format;
use kontext_loader::{
    load_lora, load_transformer, FluxConfig, LoadError, Lora, LoraFormat, TransformerOptions,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures"))
}

/// The tiny pipeline's transformer config (D = 32, M = 128, 1 double + 2 single blocks).
fn config() -> FluxConfig {
    let t = load_transformer(
        &fixtures().join("pipeline/tiny-kontext/transformer"),
        &TransformerOptions::default(),
    )
    .unwrap();
    t.config
}

fn fixture(name: &str) -> Lora {
    load_lora(
        &fixtures().join(format!("lora/{name}.safetensors")),
        &config(),
    )
    .unwrap()
}

/// Writes f32 tensors (and optional metadata) as a safetensors file.
fn write(dir: &Path, name: &str, tensors: &[(&str, Vec<usize>)], meta: Option<&str>) -> PathBuf {
    let mut header = serde_json::Map::new();
    if let Some(m) = meta {
        header.insert("__metadata__".into(), serde_json::from_str(m).unwrap());
    }
    let mut data = Vec::new();
    for (i, (key, shape)) in tensors.iter().enumerate() {
        let n: usize = shape.iter().product();
        let begin = data.len();
        for j in 0..n {
            data.extend_from_slice(&(0.01 * ((i * 31 + j) % 17) as f32).to_le_bytes());
        }
        header.insert(
            key.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [begin, data.len()]}),
        );
    }
    let h = serde_json::Value::Object(header).to_string();
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(h.as_bytes());
    bytes.extend_from_slice(&data);
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn problems(e: LoadError) -> Vec<String> {
    match e {
        LoadError::Layout {
            problems,
            component,
            ..
        } => {
            assert_eq!(component, "LoRA");
            problems
        }
        other => panic!("expected a layout error, got {other}"),
    }
}

#[test]
fn every_format_is_detected_and_gives_the_same_delta_on_every_weight() {
    let cfg = config();
    let (d, m) = (cfg.hidden_size, cfg.mlp_hidden);
    let peft = fixture("peft");
    assert_eq!(peft.format, LoraFormat::Diffusers);
    assert!(peft.has_alpha);
    let shapes: BTreeMap<String, Vec<usize>> = kontext_loader::transformer::expected_shapes(&cfg)
        .into_iter()
        .filter(|(_, s)| s.len() == 2)
        .collect();
    // Every linear of the model is patched (the generator's LoRA targets all of them).
    assert_eq!(peft.targets().len(), shapes.len());
    for (name, format, alpha) in [
        ("aitoolkit", LoraFormat::Diffusers, false),
        ("kohya", LoraFormat::Kohya, true),
        ("comfy", LoraFormat::Bfl, true),
        ("fal", LoraFormat::Fal, false),
    ] {
        let other = fixture(name);
        assert_eq!((other.format, other.has_alpha), (format, alpha), "{name}");
        for (key, shape) in &shapes {
            let a = peft.delta(key, shape[0]).unwrap();
            let b = other
                .delta(key, shape[0])
                .unwrap_or_else(|| panic!("{name}: {key} not patched"));
            let worst = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-6, "{name}: {key} differs by {worst}");
        }
    }
    // Split pieces patch rows of the fused weight; the final layer's halves are swapped.
    let rows = |l: &Lora, target: &str| -> Vec<(usize, usize, usize)> {
        l.patches
            .iter()
            .filter(|p| p.target == target)
            .map(|p| (p.row0, p.rows, p.rank))
            .collect()
    };
    let mut qkv = rows(&peft, "double_blocks.0.img_attn.qkv.weight");
    qkv.sort();
    assert_eq!(qkv, [(0, d, 4), (d, d, 4), (2 * d, d, 4)]);
    let mut l1 = rows(&peft, "single_blocks.1.linear1.weight");
    l1.sort();
    assert_eq!(l1, [(0, d, 4), (d, d, 4), (2 * d, d, 4), (3 * d, m, 4)]);
    let ada = "final_layer.adaLN_modulation.1.weight";
    let halves: Vec<_> = peft.patches.iter().filter(|p| p.target == ada).collect();
    assert_eq!(halves.len(), 2);
    let (shift, scale) = if halves[0].row0 == 0 {
        (halves[0], halves[1])
    } else {
        (halves[1], halves[0])
    };
    assert_eq!((shift.row0, scale.row0), (0, d));
    // diffusers' norm_out.linear is [scale; shift]: the shift half is its second half.
    let set = kontext_loader::TensorSet::open(&fixtures().join("lora/peft.safetensors")).unwrap();
    let mut b = Vec::new();
    let k = "transformer.norm_out.linear.lora_B.weight";
    kontext_loader::dtype::decode_into(
        kontext_loader::DType::F32,
        set.bytes(k).unwrap().as_slice(),
        1.0,
        &mut b,
    );
    assert_eq!(shift.up, b[d * 4..]);
    assert_eq!(scale.up, b[..d * 4]);
    // Fused forms: one pair of rank 3r (qkv) or 4r (linear1), alpha/rank as in the PEFT file.
    let kohya = fixture("kohya");
    assert_eq!(
        rows(&kohya, "double_blocks.0.img_attn.qkv.weight"),
        [(0, 3 * d, 12)]
    );
    assert_eq!(
        rows(&kohya, "single_blocks.0.linear1.weight"),
        [(0, 3 * d + m, 16)]
    );
    assert!(kohya.patches.iter().all(|p| p.scale == 2.0));
    assert!(peft.patches.iter().all(|p| p.scale == 2.0));
    assert!(fixture("fal").patches.iter().all(|p| p.scale == 1.0));
}

#[test]
fn format_detection_from_keys() {
    let f = |keys: &[&str]| detect_format(keys.iter().copied());
    assert_eq!(
        f(&["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]),
        Some(LoraFormat::Kohya)
    );
    assert_eq!(
        f(&["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"]),
        Some(LoraFormat::Bfl)
    );
    assert_eq!(
        f(&["double_blocks.0.img_attn.qkv.lora_B.weight"]),
        Some(LoraFormat::Bfl)
    );
    assert_eq!(
        f(&["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]),
        Some(LoraFormat::Diffusers)
    );
    assert_eq!(
        f(&["single_transformer_blocks.0.proj_mlp.lora_A.weight"]),
        Some(LoraFormat::Diffusers)
    );
    assert_eq!(
        f(&["base_model.model.single_blocks.3.linear1.lora_A.weight"]),
        Some(LoraFormat::Fal)
    );
    assert_eq!(f(&["encoder.block.0.weight"]), None);
}

#[test]
fn every_unplaceable_key_and_wrong_shape_is_listed_in_one_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config();
    let d = cfg.hidden_size;
    let q = "transformer.transformer_blocks.0.attn";
    let path = write(
        dir.path(),
        "bad.safetensors",
        &[
            // placeable
            (&format!("{q}.to_q.lora_A.weight"), vec![2, d]),
            (&format!("{q}.to_q.lora_B.weight"), vec![d, 2]),
            // a module the model does not have
            (
                "transformer.transformer_blocks.5.attn.to_q.lora_A.weight",
                vec![2, d],
            ),
            // half a pair
            (&format!("{q}.to_k.lora_A.weight"), vec![2, d]),
            // wrong widths: B has the rows of all of qkv, A the wrong input width
            (&format!("{q}.to_v.lora_A.weight"), vec![2, d + 1]),
            (&format!("{q}.to_v.lora_B.weight"), vec![3 * d, 2]),
            // control-LoRA parts
            (&format!("{q}.to_out.0.lora_B.bias"), vec![d]),
            (&format!("{q}.norm_q.weight"), vec![16]),
            ("transformer.x_embedder.diff_b", vec![d]),
            // DoRA
            (&format!("{q}.to_q.dora_scale"), vec![1, d]),
        ],
        None,
    );
    let p = problems(load_lora(&path, &cfg).unwrap_err());
    let text = p.join("\n");
    println!("{text}");
    for needle in [
        "transformer_blocks.5.attn.to_q is not a linear layer",
        "to_k has no up/B",
        "to_v: down [2, 33] / up [96, 2] do not fit double_blocks.0.img_attn.qkv.weight [32, 32]",
        "to_out.0.lora_B.bias: a bias patch",
        "norm_q.weight",
        "x_embedder.diff_b: a bias difference",
        "dora_scale: DoRA",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    assert_eq!(p.len(), 7, "{text}");
    // The message names the file and says it is a LoRA.
    let msg = load_lora(&path, &cfg).unwrap_err().to_string();
    assert!(
        msg.contains("bad.safetensors") && msg.contains("LoRA"),
        "{msg}"
    );
}

#[test]
fn kohya_text_encoder_keys_and_norm_scales_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config();
    let d = cfg.hidden_size;
    let path = write(
        dir.path(),
        "k.safetensors",
        &[
            ("lora_unet_img_in.lora_down.weight", vec![2, 16]),
            ("lora_unet_img_in.lora_up.weight", vec![d, 2]),
            ("lora_unet_img_in.alpha", vec![]),
            (
                "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
                vec![2, 8],
            ),
            (
                "lora_unet_double_blocks_0_img_attn_norm_query_norm.scale",
                vec![16],
            ),
            ("lora_unet_double_blocks_0_img_attn_qkv.alpha", vec![]),
        ],
        None,
    );
    let p = problems(load_lora(&path, &cfg).unwrap_err());
    let text = p.join("\n");
    assert!(text.contains("text-encoder LoRA"), "{text}");
    assert!(text.contains("norm scale"), "{text}");
    assert!(text.contains("img_attn_qkv has no down/A"), "{text}");
    assert_eq!(p.len(), 3, "{text}");
}

#[test]
fn alpha_from_adapter_metadata_and_the_default_of_one() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config();
    let d = cfg.hidden_size;
    let pair = [
        ("transformer.proj_out.lora_A.weight", vec![4, d]),
        (
            "transformer.proj_out.lora_B.weight",
            vec![cfg.out_channels, 4],
        ),
    ];
    let meta = r#"{"format": "pt", "lora_adapter_metadata": "{\"transformer.lora_alpha\": 8, \"transformer.r\": 4}"}"#;
    let with = load_lora(&write(dir.path(), "m.safetensors", &pair, Some(meta)), &cfg).unwrap();
    assert!(with.has_alpha);
    assert_eq!(with.patches[0].scale, 2.0);
    assert_eq!(with.patches[0].target, "final_layer.linear.weight");
    let without = load_lora(&write(dir.path(), "n.safetensors", &pair, None), &cfg).unwrap();
    assert!(!without.has_alpha);
    assert_eq!(without.patches[0].scale, 1.0);
    let pattern = r#"{"lora_adapter_metadata": "{\"transformer.lora_alpha\": 8, \"transformer.alpha_pattern\": {\"proj_out\": 2}}"}"#;
    let p = problems(
        load_lora(
            &write(dir.path(), "p.safetensors", &pair, Some(pattern)),
            &cfg,
        )
        .unwrap_err(),
    );
    assert!(p[0].contains("alpha_pattern"), "{p:?}");
    // rsLoRA's alpha/√rank is refused, not applied as alpha/rank.
    let rs = r#"{"lora_adapter_metadata": "{\"transformer.lora_alpha\": 8, \"transformer.use_rslora\": true}"}"#;
    let p = problems(
        load_lora(&write(dir.path(), "rs.safetensors", &pair, Some(rs)), &cfg).unwrap_err(),
    );
    assert!(p[0].contains("use_rslora"), "{p:?}");
    // Nothing that looks like a LoRA at all.
    let none = write(dir.path(), "x.safetensors", &[("foo.bar", vec![2])], None);
    let p = problems(load_lora(&none, &cfg).unwrap_err());
    assert!(p[0].contains("no key looks like a Flux LoRA"), "{p:?}");
}

//! Every kind of damaged or wrong checkpoint gets its own typed error naming the file and key.

use kontext_loader::safetensors::SafetensorsFile;
use kontext_loader::{load_transformer, LoadError, TensorSet, TransformerOptions};
use std::path::{Path, PathBuf};

/// Writes a raw safetensors file: 8-byte length, `header`, then `data_len` zero bytes.
fn raw(dir: &Path, name: &str, header: &str, data_len: usize) -> PathBuf {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.resize(v.len() + data_len, 0);
    let p = dir.join(name);
    std::fs::write(&p, v).unwrap();
    p
}

fn open_err(p: &Path) -> LoadError {
    match SafetensorsFile::open(p) {
        Ok(_) => panic!("{} opened but should not", p.display()),
        Err(e) => e,
    }
}

#[test]
fn file_shorter_than_eight_bytes() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("tiny.safetensors");
    std::fs::write(&p, [1, 2, 3]).unwrap();
    let e = open_err(&p);
    assert!(matches!(e, LoadError::TooShort { len: 3, .. }), "{e}");
    assert!(e.to_string().contains("tiny.safetensors"));
}

#[test]
fn header_length_past_end() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("h.safetensors");
    let mut v = 1000u64.to_le_bytes().to_vec();
    v.extend_from_slice(b"{}");
    std::fs::write(&p, v).unwrap();
    assert!(matches!(
        open_err(&p),
        LoadError::HeaderPastEnd {
            header_len: 1000,
            ..
        }
    ));
}

#[test]
fn data_shorter_than_header_says() {
    // A file cut in its data section: the header promises 16 bytes, 10 are there.
    let d = tempfile::tempdir().unwrap();
    let p = raw(
        d.path(),
        "cut.safetensors",
        r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
        10,
    );
    let e = open_err(&p);
    assert!(
        matches!(&e, LoadError::OffsetOutOfRange { key, end: 16, data_len: 10, .. } if key == "w"),
        "{e}"
    );
}

#[test]
fn invalid_json() {
    let d = tempfile::tempdir().unwrap();
    let p = raw(d.path(), "j.safetensors", r#"{"w": {"dtype": "F32""#, 0);
    assert!(matches!(open_err(&p), LoadError::InvalidJson { .. }));
    let p = raw(d.path(), "k.safetensors", r#"[1, 2]"#, 0);
    assert!(matches!(open_err(&p), LoadError::InvalidJson { .. }));
}

#[test]
fn offsets_out_of_range() {
    let d = tempfile::tempdir().unwrap();
    let p = raw(
        d.path(),
        "o.safetensors",
        r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}}"#,
        16,
    );
    assert!(matches!(
        open_err(&p),
        LoadError::OffsetOutOfRange {
            begin: 8,
            end: 4,
            ..
        }
    ));
}

#[test]
fn overlapping_tensors() {
    let d = tempfile::tempdir().unwrap();
    let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    let p = raw(d.path(), "ov.safetensors", h, 12);
    let e = open_err(&p);
    assert!(
        matches!(&e, LoadError::OverlappingTensors { first, second, .. } if first == "a" && second == "b"),
        "{e}"
    );
}

#[test]
fn byte_length_not_shape_times_dtype() {
    let d = tempfile::tempdir().unwrap();
    let p = raw(
        d.path(),
        "l.safetensors",
        r#"{"w":{"dtype":"BF16","shape":[3,3],"data_offsets":[0,16]}}"#,
        16,
    );
    let e = open_err(&p);
    assert!(
        matches!(
            &e,
            LoadError::ByteLengthMismatch {
                expected: 18,
                actual: 16,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("\"w\""));
}

#[test]
fn unknown_dtype() {
    let d = tempfile::tempdir().unwrap();
    let p = raw(
        d.path(),
        "u.safetensors",
        r#"{"w":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}"#,
        8,
    );
    assert!(matches!(open_err(&p), LoadError::UnknownDtype { dtype, .. } if dtype == "C64"));
}

#[test]
fn missing_shard_and_key_not_in_shard() {
    let d = tempfile::tempdir().unwrap();
    raw(
        d.path(),
        "model-00001-of-00002.safetensors",
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        4,
    );
    let index = d.path().join("model.safetensors.index.json");
    std::fs::write(
        &index,
        r#"{"metadata":{},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let e = TensorSet::open(d.path()).err().expect("must fail");
    assert!(
        matches!(&e, LoadError::MissingShard { shard, key, .. } if shard == "model-00002-of-00002.safetensors" && key == "b"),
        "{e}"
    );

    std::fs::write(&index, r#"{"weight_map":{"a":"model-00001-of-00002.safetensors","c":"model-00001-of-00002.safetensors"}}"#).unwrap();
    let e = TensorSet::open(d.path()).err().expect("must fail");
    assert!(
        matches!(&e, LoadError::ShardMissingKey { key, .. } if key == "c"),
        "{e}"
    );
}

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/transformer");

fn opts_a() -> TransformerOptions {
    TransformerOptions {
        axes_dim: Some(vec![4, 6, 6]),
    }
}

type Tensors = Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>;

/// Copies fixture "a"'s BFL file, lets `edit` change its tensors, and writes it back.
fn edited_bfl(dir: &Path, edit: impl FnOnce(&mut Tensors)) -> PathBuf {
    edited(
        &format!("{FIXTURES}/a/bfl.safetensors"),
        &dir.join("edited.safetensors"),
        edit,
    )
}

/// Copies the safetensors file `from` to `to` with its tensors changed by `edit`.
fn edited(from: &str, to: &Path, edit: impl FnOnce(&mut Tensors)) -> PathBuf {
    let bytes = std::fs::read(from).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, to).unwrap();
    to.to_path_buf()
}

fn layout_problems(e: LoadError) -> Vec<String> {
    match e {
        LoadError::Layout { problems, .. } => problems,
        other => panic!("expected a layout error, got {other}"),
    }
}

#[test]
fn missing_keys_are_all_listed() {
    let d = tempfile::tempdir().unwrap();
    let p = edited_bfl(d.path(), |t| {
        t.retain(|(n, ..)| {
            n != "double_blocks.1.txt_mlp.2.bias" && n != "single_blocks.0.linear2.weight"
        })
    });
    let problems = layout_problems(load_transformer(&p, &opts_a()).err().expect("must fail"));
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(problems
        .iter()
        .any(|p| p.contains("missing tensor double_blocks.1.txt_mlp.2.bias")));
    assert!(problems
        .iter()
        .any(|p| p.contains("missing tensor single_blocks.0.linear2.weight")));
}

#[test]
fn wrong_shape() {
    let d = tempfile::tempdir().unwrap();
    let p = edited_bfl(d.path(), |t| {
        let w = t
            .iter_mut()
            .find(|(n, ..)| n == "double_blocks.0.img_attn.proj.bias")
            .unwrap();
        w.2 = vec![31];
        w.3.truncate(31 * 4);
    });
    let problems = layout_problems(load_transformer(&p, &opts_a()).err().expect("must fail"));
    assert_eq!(problems.len(), 1);
    assert!(
        problems[0].contains("double_blocks.0.img_attn.proj.bias: shape [31]"),
        "{}",
        problems[0]
    );
}

#[test]
fn unexpected_key() {
    let d = tempfile::tempdir().unwrap();
    let p = edited_bfl(d.path(), |t| {
        t.push((
            "double_blocks.1.img_mod.lin.extra".into(),
            safetensors::Dtype::F32,
            vec![1],
            vec![0; 4],
        ))
    });
    let problems = layout_problems(load_transformer(&p, &opts_a()).err().expect("must fail"));
    assert_eq!(
        problems,
        vec!["unexpected tensor double_blocks.1.img_mod.lin.extra".to_string()]
    );

    let p = edited_bfl(d.path(), |t| {
        t.push((
            "lora_unet.alpha".into(),
            safetensors::Dtype::F32,
            vec![1],
            vec![0; 4],
        ))
    });
    let problems = layout_problems(load_transformer(&p, &opts_a()).err().expect("must fail"));
    assert_eq!(
        problems,
        vec!["unexpected tensor lora_unet.alpha".to_string()]
    );
}

#[test]
fn fp8_scale_with_wrong_shape() {
    let d = tempfile::tempdir().unwrap();
    let p = edited_bfl(d.path(), |t| {
        let w = t.iter_mut().find(|(n, ..)| n == "img_in.weight").unwrap();
        w.1 = safetensors::Dtype::F8_E4M3;
        w.3 = vec![0x38; w.2.iter().product()];
        t.push((
            "img_in.scale_weight".into(),
            safetensors::Dtype::F32,
            vec![32],
            vec![0; 128],
        ));
    });
    let e = load_transformer(&p, &opts_a()).err().expect("must fail");
    assert!(
        matches!(&e, LoadError::BadScale { key, .. } if key == "img_in.scale_weight"),
        "{e}"
    );
}

#[test]
fn scaled_fp8_without_scale_weight_says_how() {
    let d = tempfile::tempdir().unwrap();
    let p = edited_bfl(d.path(), |t| {
        let w = t.iter_mut().find(|(n, ..)| n == "img_in.weight").unwrap();
        w.1 = safetensors::Dtype::F8_E4M3;
        w.3 = vec![0x38; w.2.iter().product()];
        t.push((
            "scaled_fp8".into(),
            safetensors::Dtype::F32,
            vec![0],
            vec![],
        ));
    });
    let problems = layout_problems(load_transformer(&p, &opts_a()).err().expect("must fail"));
    assert!(
        problems[0].contains("HINT") && problems[0].contains("img_in.scale_weight"),
        "{problems:?}"
    );
}

#[test]
fn truncated_real_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(format!("{FIXTURES}/a/bfl.safetensors")).unwrap();
    let p = d.path().join("cut.safetensors");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_transformer(&p, &opts_a()).err().expect("must fail");
    assert!(matches!(e, LoadError::OffsetOutOfRange { .. }), "{e}");
    std::fs::write(&p, &bytes[..100]).unwrap();
    let e = load_transformer(&p, &opts_a()).err().expect("must fail");
    assert!(matches!(e, LoadError::HeaderPastEnd { .. }), "{e}");
}

#[test]
fn not_a_transformer() {
    let d = tempfile::tempdir().unwrap();
    let p = raw(
        d.path(),
        "x.safetensors",
        r#"{"foo.weight":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        4,
    );
    let e = load_transformer(&p, &TransformerOptions::default())
        .err()
        .expect("must fail");
    assert!(matches!(e, LoadError::UnknownLayout { .. }), "{e}");
}

#[test]
fn single_file_with_unusual_head_dim_asks_for_axes() {
    let e = load_transformer(
        Path::new(&format!("{FIXTURES}/a/bfl.safetensors")),
        &TransformerOptions::default(),
    )
    .err()
    .expect("must fail");
    assert!(
        matches!(&e, LoadError::Config { reason, .. } if reason.contains("HINT")),
        "{e}"
    );
}

#[test]
fn stray_block_index_is_reported_before_sizing_anything() {
    let d = tempfile::tempdir().unwrap();
    let p = edited_bfl(d.path(), |t| {
        t.push((
            "double_blocks.99999999999.x".into(),
            safetensors::Dtype::F32,
            vec![1],
            vec![0; 4],
        ))
    });
    let e = load_transformer(&p, &opts_a()).err().expect("must fail");
    assert!(
        matches!(&e, LoadError::Config { reason, .. } if reason.contains("highest index is 99999999999") && reason.contains("double_blocks.2 is missing")),
        "{e}"
    );
}

/// A copy of fixture "a"'s diffusers folder with `config.json` edited by `edit`.
fn diffusers_copy(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let src = format!("{FIXTURES}/a/diffusers");
    let dst = dir.join("transformer");
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::copy(
        format!("{src}/diffusion_pytorch_model.safetensors"),
        dst.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{src}/config.json")).unwrap())
            .unwrap();
    edit(&mut cfg);
    std::fs::write(dst.join("config.json"), cfg.to_string()).unwrap();
    dst
}

#[test]
fn config_counts_must_match_the_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let p = diffusers_copy(d.path(), |c| c["num_layers"] = 1000.into());
    let e = load_transformer(&p, &TransformerOptions::default())
        .err()
        .expect("must fail");
    assert!(
        e.to_string()
            .contains("config says num_layers = 1000 but the checkpoint holds 2"),
        "{e}"
    );
    let p = diffusers_copy(d.path(), |c| {
        c["num_single_layers"] = 1_000_000_000u64.into()
    });
    let e = load_transformer(&p, &TransformerOptions::default())
        .err()
        .expect("must fail");
    assert!(
        e.to_string().contains("beyond any plausible model size"),
        "{e}"
    );
}

#[test]
fn scalar_parts_of_a_stacked_tensor_are_a_layout_error() {
    let d = tempfile::tempdir().unwrap();
    let dir = diffusers_copy(d.path(), |_| {});
    let file = dir.join("diffusion_pytorch_model.safetensors");
    let src = d.path().join("orig.safetensors");
    std::fs::rename(&file, &src).unwrap();
    edited(src.to_str().unwrap(), &file, |t| {
        for (n, _, shape, bytes) in t.iter_mut() {
            if n == "transformer_blocks.0.attn.to_q.bias"
                || n == "transformer_blocks.0.attn.to_k.bias"
            {
                *shape = vec![];
                bytes.truncate(4);
            }
        }
    });
    let problems = layout_problems(
        load_transformer(&dir, &TransformerOptions::default())
            .err()
            .expect("must fail"),
    );
    assert!(
        problems.iter().any(|p| p.contains("cannot be stacked")),
        "{problems:?}"
    );
}

#[test]
fn negative_fp8_scale_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let p = edited_bfl(d.path(), |t| {
        let w = t.iter_mut().find(|(n, ..)| n == "img_in.weight").unwrap();
        w.1 = safetensors::Dtype::F8_E4M3;
        w.3 = vec![0x38; w.2.iter().product()];
        t.push((
            "img_in.scale_weight".into(),
            safetensors::Dtype::F32,
            vec![],
            (-0.5f32).to_le_bytes().to_vec(),
        ));
    });
    let e = load_transformer(&p, &opts_a()).err().expect("must fail");
    assert!(
        matches!(&e, LoadError::BadScale { reason, .. } if reason.contains("positive")),
        "{e}"
    );
}

#[test]
fn long_problem_lists_are_capped() {
    let d = tempfile::tempdir().unwrap();
    let p = edited_bfl(d.path(), |t| t.retain(|(n, ..)| !n.ends_with(".bias")));
    let problems = layout_problems(load_transformer(&p, &opts_a()).err().expect("must fail"));
    assert_eq!(problems.len(), 21, "{problems:#?}");
    assert!(
        problems[20].starts_with("… and ") && problems[20].ends_with(" more"),
        "{}",
        problems[20]
    );
}

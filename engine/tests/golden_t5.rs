//! Golden test: the f32 CPU T5 encoder against transformers' f32 `T5EncoderModel` (gated-gelu,
//! no attention mask), stage by stage, from the Hugging Face folder and a ComfyUI-style single
//! file. Fixture: `tests/fixtures/encoders/t5` (d_model 32, 2 layers, 4 heads × 8, d_ff 48,
//! 32 buckets, max distance 20 so ~40 tokens reach the logarithmic buckets), the prompt tokenized
//! by the fixture T5 tokenizer and padded to 64. Run with `--nocapture` for the tables.

mod encoder_fixtures;

use encoder_fixtures::{assert_stages, dir, first_failure, meta, Forward};
use kontext_engine::check::tol;
use kontext_engine::t5::{relative_position_bucket, T5Encoder};
use kontext_engine::tokenizer::TextTokenizer;
use kontext_engine::{Backend, CpuBackend};
use kontext_loader::{load_t5, T5Config};
use serde_json::Value;
use std::path::Path;

/// Tolerance of every stage: the f32 engine against an f32 reference of the same math
/// (`check::tol::F32`, 1e-4 on rel_l2 and rel_max; see its comment).
const TOL: f64 = tol::F32;

fn expected_config(m: &Value) -> T5Config {
    let c = &m["config"];
    let n = |k: &str| c[k].as_u64().expect("integer") as usize;
    T5Config {
        vocab_size: n("vocab_size"),
        d_model: n("d_model"),
        d_kv: n("d_kv"),
        d_ff: n("d_ff"),
        num_layers: n("num_layers"),
        num_heads: n("num_heads"),
        relative_attention_num_buckets: n("relative_attention_num_buckets"),
        relative_attention_max_distance: n("relative_attention_max_distance"),
        layer_norm_epsilon: c["layer_norm_epsilon"].as_f64().expect("eps") as f32,
    }
}

fn run(t5: &T5Encoder<CpuBackend>, ids: &[u32]) -> Vec<(String, Vec<f32>)> {
    let mut stages = Vec::new();
    let mut hook = |n: &str, v: &[f32]| stages.push((n.to_string(), v.to_vec()));
    let out = t5.forward(ids, Some(&mut hook)).expect("forward");
    assert_eq!(
        stages.last().map(|s| &s.1),
        Some(&CpuBackend.download(&out).expect("download"))
    );
    stages
}

#[test]
fn t5_matches_transformers_stage_by_stage() {
    let d = dir("t5");
    let m = meta(&d);
    let fwd = Forward::load(&d);
    let want = expected_config(&m);

    // The ids come from our tokenizer and must be the fixture's.
    let tok_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizers/t5");
    let max_len = m["max_length"].as_u64().expect("max_length") as usize;
    let tok = TextTokenizer::t5(&tok_dir, max_len).expect("tokenizer");
    let tokens = tok
        .encode(m["prompt"].as_str().expect("prompt"))
        .expect("encode");
    let ids = fwd.ids("input_ids");
    assert_eq!(tokens.ids, ids, "tokenizer ids differ from the fixture's");
    assert_eq!(
        tokens.len,
        m["real_tokens"].as_u64().expect("count") as usize
    );

    for layout in ["text_encoder_2", "t5xxl.safetensors"] {
        let mut t5 = load_t5(&d.join(layout)).expect("load_t5");
        if layout.ends_with(".safetensors") {
            // A single file has no config: the loader assumes T5 v1.1's max distance 128.
            assert_eq!(t5.config.relative_attention_max_distance, 128);
            t5.config.relative_attention_max_distance = want.relative_attention_max_distance;
        }
        assert_eq!(t5.config, want, "{layout}: config");
        let enc = T5Encoder::from_t5(CpuBackend, &t5).expect("T5 builds");
        let stages = run(&enc, &ids);
        let order: Vec<String> = stages.iter().map(|s| s.0.clone()).collect();
        let names: Vec<String> = m["stages"]
            .as_array()
            .expect("stages")
            .iter()
            .map(|v| v.as_str().expect("name").to_string())
            .collect();
        assert_eq!(order, names);
        assert_stages(
            &format!("T5 encoder ({layout})"),
            &stages,
            |n| fwd.get(n).data.clone(),
            TOL,
        );
    }
}

#[test]
fn relative_position_buckets_equal_transformers() {
    let m = meta(&dir("t5"));
    let b = &m["relative_position_buckets"];
    let lo = b["relative_positions"][0].as_i64().expect("range");
    let tables = b["tables"].as_object().expect("tables");
    for (key, table) in tables {
        let (nb, md) = key.split_once('_').expect("nb_md");
        let (nb, md): (usize, usize) = (nb.parse().expect("nb"), md.parse().expect("md"));
        let mut wrong = Vec::new();
        for (i, want) in table.as_array().expect("list").iter().enumerate() {
            let rel = lo + i as i64;
            let got = relative_position_bucket(rel, nb, md);
            if got as u64 != want.as_u64().expect("bucket") {
                wrong.push((rel, got, want.clone()));
            }
        }
        println!(
            "buckets {nb}, max distance {md}: {} relative positions, {} differ",
            table.as_array().map_or(0, Vec::len),
            wrong.len()
        );
        assert!(
            wrong.is_empty(),
            "{key}: (rel, ours, transformers) {wrong:?}"
        );
    }
}

#[test]
fn spec_traps_leave_the_tolerance() {
    let d = dir("t5");
    let m = meta(&d);
    let fwd = Forward::load(&d);
    let ids = fwd.ids("input_ids");
    let t5 = load_t5(&d.join("text_encoder_2")).expect("load_t5");
    // T5 v1.1's default max distance instead of the config's: the logarithmic buckets move.
    let cfg = T5Config {
        relative_attention_max_distance: 128,
        ..expected_config(&m)
    };
    let enc = T5Encoder::load(CpuBackend, cfg, &t5.weights).expect("builds");
    let (name, c) =
        first_failure(&run(&enc, &ids), |n| fwd.get(n).data.clone(), TOL).expect("caught");
    println!(
        "trap max distance 128 instead of 20   caught at {name} rel_l2 {:.2e}",
        c.rel_l2
    );
    assert_eq!(name, "block.0");
    // Dropping the padding (a mask the reference does not use) changes the real tokens too.
    let enc = T5Encoder::from_t5(CpuBackend, &t5).expect("builds");
    let real = m["real_tokens"].as_u64().expect("count") as usize;
    let out = CpuBackend
        .download(&enc.forward(&ids[..real], None).expect("forward"))
        .expect("download");
    let d_model = expected_config(&m).d_model;
    let want = &fwd.get("final").data[..real * d_model];
    let c = kontext_engine::check::compare(&out, want, TOL);
    println!(
        "trap padding dropped                  rel_l2 {:.2e}",
        c.rel_l2
    );
    assert!(!c.passes());
}

#[test]
fn out_of_vocabulary_ids_are_errors() {
    let d = dir("t5");
    let t5 = load_t5(&d.join("text_encoder_2")).expect("load_t5");
    let enc = T5Encoder::from_t5(CpuBackend, &t5).expect("builds");
    let err = enc
        .forward(&[1, 2, t5.config.vocab_size as u32], None)
        .expect_err("id past the vocabulary");
    assert!(err.to_string().contains("position 2"), "{err}");
    let cfg = T5Config {
        relative_attention_num_buckets: 2,
        ..t5.config.clone()
    };
    assert!(T5Encoder::load(CpuBackend, cfg, &t5.weights).is_err());
}

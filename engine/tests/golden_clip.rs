//! Golden test: the f32 CPU CLIP text model against transformers' f32 `CLIPTextModel`
//! (quick_gelu, causal mask, FLUX's legacy `eos_token_id` 2), stage by stage, from the Hugging
//! Face folder and the same file read as a config-less ComfyUI `clip_l.safetensors`. Fixture:
//! `tests/fixtures/encoders/clip` (hidden 128, 2 heads of 64, intermediate 37, 2 layers) with its
//! own CLIP BPE folder (vocab.json + merges.txt, the first 60 merges of the real one). Two
//! prompts: a short one (every stage) and one cut at 77 tokens (final states and pooled).
//! Run with `--nocapture` for the tables.

mod encoder_fixtures;

use encoder_fixtures::{assert_stages, dir, meta, Forward};
use kontext_engine::check::{compare, tol};
use kontext_engine::clip::{pooled_position, ClipTextModel};
use kontext_engine::tokenizer::{TextTokenizer, CLIP_MAX_LENGTH};
use kontext_engine::{Backend, CpuBackend};
use kontext_loader::{load_clip, ClipConfig};
use serde_json::Value;

/// Tolerance of every stage: the f32 engine against an f32 reference of the same math
/// (`check::tol::F32`, 1e-4 on rel_l2 and rel_max; see its comment).
const TOL: f64 = tol::F32;

fn expected_config(m: &Value) -> ClipConfig {
    let c = &m["config"];
    let n = |k: &str| c[k].as_u64().expect("integer") as usize;
    ClipConfig {
        vocab_size: n("vocab_size"),
        hidden_size: n("hidden_size"),
        intermediate_size: n("intermediate_size"),
        num_heads: n("num_attention_heads"),
        num_layers: n("num_hidden_layers"),
        max_positions: n("max_position_embeddings"),
        layer_norm_eps: c["layer_norm_eps"].as_f64().expect("eps") as f32,
        hidden_act: c["hidden_act"].as_str().expect("act").to_string(),
        eos_token_id: n("eos_token_id"),
    }
}

fn run(clip: &ClipTextModel<CpuBackend>, ids: &[u32]) -> Vec<(String, Vec<f32>)> {
    let mut stages = Vec::new();
    let mut hook = |n: &str, v: &[f32]| stages.push((n.to_string(), v.to_vec()));
    let out = clip.forward(ids, Some(&mut hook)).expect("forward");
    assert_eq!(stages.last().map(|s| &s.1), Some(&out.pooled));
    let last = CpuBackend.download(&out.last_hidden).expect("download");
    assert_eq!(
        stages
            .iter()
            .find(|s| s.0 == "final_layer_norm")
            .map(|s| &s.1),
        Some(&last)
    );
    stages
}

#[test]
fn clip_matches_transformers_stage_by_stage() {
    let d = dir("clip");
    let m = meta(&d);
    let fwd = Forward::load(&d);
    let want = expected_config(&m);
    let tok = TextTokenizer::clip(&d.join("tokenizer"), CLIP_MAX_LENGTH).expect("tokenizer");
    let cases = m["cases"].as_array().expect("cases");

    for layout in ["text_encoder", "text_encoder/model.safetensors"] {
        let clip = load_clip(&d.join(layout)).expect("load_clip");
        assert_eq!(clip.config, want, "{layout}: config");
        let model = ClipTextModel::from_clip(CpuBackend, &clip).expect("CLIP builds");
        for (i, case) in cases.iter().enumerate() {
            let tokens = tok
                .encode(case["prompt"].as_str().expect("prompt"))
                .expect("encode");
            let ids = fwd.ids(&format!("{i}.input_ids"));
            assert_eq!(
                tokens.ids, ids,
                "case {i}: tokenizer ids differ from the fixture's"
            );
            let untruncated = case["tokens_untruncated"].as_u64().expect("count") as usize;
            assert_eq!(
                tokens.truncation.map(|t| t.total_tokens),
                (untruncated > CLIP_MAX_LENGTH).then_some(untruncated)
            );
            let at = case["pooled_position"].as_u64().expect("position") as usize;
            assert_eq!(pooled_position(&ids, want.eos_token_id).expect("eos"), at);

            let keep: Vec<String> = case["stages"]
                .as_array()
                .expect("stages")
                .iter()
                .map(|v| v.as_str().expect("name").to_string())
                .collect();
            let stages: Vec<(String, Vec<f32>)> = run(&model, &ids)
                .into_iter()
                .filter(|(n, _)| keep.contains(n))
                .collect();
            assert_eq!(stages.len(), keep.len(), "case {i}: stage list");
            assert_stages(
                &format!("CLIP text model ({layout}), case {i}, pooled at {at}"),
                &stages,
                |n| fwd.get(&format!("{i}.{n}")).data.clone(),
                TOL,
            );
        }
    }
}

#[test]
fn pooling_rule_follows_the_config() {
    // Legacy rule (eos_token_id 2): argmax of the ids, the first one on ties.
    assert_eq!(
        pooled_position(&[49406, 320, 49407, 49407], 2).ok(),
        Some(2)
    );
    assert_eq!(pooled_position(&[5, 9, 3, 9], 2).ok(), Some(1));
    // Newer configs: the first position holding the end token, even when larger ids exist.
    assert_eq!(pooled_position(&[7, 50, 3, 3], 3).ok(), Some(2));
    assert!(pooled_position(&[7, 50], 3).is_err());
    assert!(pooled_position(&[], 2).is_err());
}

#[test]
fn spec_traps_leave_the_tolerance() {
    let d = dir("clip");
    let m = meta(&d);
    let fwd = Forward::load(&d);
    let clip = load_clip(&d.join("text_encoder")).expect("load_clip");
    let ids = fwd.ids("0.input_ids");
    // One head of 128 instead of two of 64.
    let cfg = ClipConfig {
        num_heads: 1,
        ..expected_config(&m)
    };
    let model = ClipTextModel::load(CpuBackend, cfg, &clip.weights).expect("builds");
    let out = model.forward(&ids, None).expect("forward");
    let c = compare(&out.pooled, &fwd.get("0.pooled").data, TOL);
    println!(
        "trap one head instead of two       pooled rel_l2 {:.2e}",
        c.rel_l2
    );
    assert!(!c.passes());
    // Pooling the last position instead of the first end token.
    let model = ClipTextModel::from_clip(CpuBackend, &clip).expect("builds");
    let out = model.forward(&ids, None).expect("forward");
    let last = CpuBackend
        .download(
            &CpuBackend
                .slice_rows(&out.last_hidden, 76, 77)
                .expect("row"),
        )
        .expect("download");
    let c = compare(&last, &fwd.get("0.pooled").data, TOL);
    println!(
        "trap pooled at the last position   pooled rel_l2 {:.2e}",
        c.rel_l2
    );
    assert!(!c.passes());
}

#[test]
fn wrong_inputs_are_errors() {
    let d = dir("clip");
    let clip = load_clip(&d.join("text_encoder")).expect("load_clip");
    let model = ClipTextModel::from_clip(CpuBackend, &clip).expect("builds");
    let v = clip.config.vocab_size as u32;
    assert!(
        model.forward(&[v - 2, 5, v], None).is_err(),
        "id past the vocabulary"
    );
    assert!(
        model.forward(&vec![v - 1; 78], None).is_err(),
        "past 77 positions"
    );
    let cfg = ClipConfig {
        hidden_act: "gelu".into(),
        ..clip.config.clone()
    };
    assert!(ClipTextModel::load(CpuBackend, cfg, &clip.weights).is_err());
}

//! End to end against diffusers' `FluxKontextPipeline` (tests/fixtures/generate_pipeline.py):
//! the tiny random pipeline saved with `save_pretrained`, an edit of a real photo and a
//! text-to-image, both from injected noise, compared stage by stage and pixel by pixel; and the
//! same edit on `pipeline-dh128`, the real attention geometry (head dim 128, RoPE axes
//! (16, 56, 56)) with bf16 weights.

mod common;

use common::{assert_pixels_match, case_options, fixtures, read_all};

use kontext_engine::check::{compare, tol, Comparison};
use kontext_engine::image::RgbImage;
use kontext_engine::pipeline::{Device, Pipeline};
use kontext_engine::request::{read_noise_file, EditOptions, NoiseSource, ResizePolicy};
use kontext_loader::ModelPaths;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    fixtures().join("pipeline")
}

fn meta_of(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap()
}

fn meta() -> serde_json::Value {
    meta_of(&dir())
}

/// The pipeline fixture in `dir` (its `meta.json` names the folder).
fn load(dir: &Path) -> Pipeline {
    let folder = meta_of(dir)["pipeline_dir"].as_str().unwrap().to_string();
    let paths = ModelPaths::discover(&dir.join(folder)).unwrap();
    Pipeline::load(&paths, Device::Cpu).unwrap()
}

fn run_case(pipeline: &Pipeline, case: &str, noise: NoiseSource) {
    run_fixture_case(&dir(), pipeline, case, noise)
}

/// One case of the pipeline fixture in `dir` against its diffusers stages and PNG.
fn run_fixture_case(dir: &Path, pipeline: &Pipeline, case: &str, noise: NoiseSource) {
    let m = meta_of(dir);
    let c = &m["cases"][case];
    let prompt = c["prompt"].as_str().unwrap();
    let context_file = m["context"]["file"].as_str().unwrap();
    let context = (case == "edit").then(|| RgbImage::open(&dir.join(context_file)).unwrap());
    let opts = case_options(c, noise);
    let mut ours: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    let mut hook = |name: &str, v: &[f32]| {
        ours.insert(name.to_string(), v.to_vec());
    };
    let out = pipeline
        .run(
            context.as_ref(),
            prompt,
            &opts,
            &mut |_| {},
            Some(&mut hook),
        )
        .unwrap();
    let refs = read_all(&dir.join(format!("{case}_stages.safetensors")));
    let last = format!("latents_step{}", opts.steps);
    let mut pairs = vec![
        ("prompt_embeds", "prompt_embeds"),
        ("pooled", "pooled"),
        ("latents_step1", "latents_step1"),
        (last.as_str(), "latents_final"),
        ("pixels", "decoder_output"),
    ];
    if case == "edit" {
        pairs.insert(2, ("image_latents", "image_latents"));
    }
    println!("{case}: stage                {}", Comparison::header());
    for (mine, theirs) in pairs {
        let cmp = compare(&ours[mine], &refs[theirs], tol::F32);
        println!("{case}: {theirs:<20} {}", cmp.row());
        assert!(
            cmp.passes(),
            "{case}: stage {theirs} out of tolerance; later stages not checked"
        );
    }
    assert!(
        out.notes.iter().any(|n| n.contains("truncated for CLIP")) == (case == "edit"),
        "the edit prompt is over CLIP's 77 tokens and must be reported: {:?}",
        out.notes
    );

    let expected = RgbImage::open(&dir.join(format!("{case}_expected.png"))).unwrap();
    assert_pixels_match(case, &out.image, &expected);
}

fn pipeline() -> Pipeline {
    load(&dir())
}

#[test]
fn edit_and_text_to_image_match_diffusers_from_noise_files() {
    let p = pipeline();
    for case in ["edit", "t2i"] {
        let (noise, _) = read_noise_file(&dir().join(format!("{case}_noise.safetensors"))).unwrap();
        run_case(&p, case, NoiseSource::Tensor(noise));
    }
}

#[test]
fn seed_reproduces_diffusers_cpu_generator() {
    // The fixture's noise is torch.randn with a CPU generator seeded per case (f32): the
    // engine's seeded noise must give the same images.
    let p = pipeline();
    for case in ["edit", "t2i"] {
        let seed = meta()["cases"][case]["noise_seed"].as_u64().unwrap();
        run_case(&p, case, NoiseSource::Seed(seed));
    }
}

#[test]
fn pipeline_is_shareable_and_multi_turn() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Pipeline>();
    // The output of one edit is the context of the next, with nothing reloaded; two threads
    // running the same request get the same image.
    let p = pipeline();
    let ctx = RgbImage::open(&dir().join("context.png")).unwrap();
    let opts = EditOptions {
        steps: 2,
        noise: NoiseSource::Seed(5),
        resize: ResizePolicy::None,
        ..Default::default()
    };
    let first = p.edit(&ctx, "make it blue", &opts, &mut |_| {}).unwrap();
    let second = p
        .edit(&first.image, "now add a hat", &opts, &mut |_| {})
        .unwrap();
    assert_eq!((second.image.width, second.image.height), (80, 64));
    assert_ne!(first.image, second.image);
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| p.edit(&ctx, "make it blue", &opts, &mut |_| {}).unwrap());
        let b = s.spawn(|| p.edit(&ctx, "make it blue", &opts, &mut |_| {}).unwrap());
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(a.image, first.image);
    assert_eq!(b.image, first.image);
}

#[test]
fn head_dim_128_pipeline_matches_diffusers() {
    // pipeline-dh128: the tiny pipeline's other parts with a transformer of the real attention
    // geometry (2 heads × 128, RoPE axes (16, 56, 56)), weights in bf16 as in the real checkpoint;
    // an edit of the tiny fixture's context.png to another size (64×64), 2 steps.
    let d = fixtures().join("pipeline-dh128");
    let p = load(&d);
    let cfg = p.flux_config();
    let want = &meta_of(&d)["configs"]["transformer"];
    assert_eq!(cfg.head_dim, 128);
    assert_eq!(cfg.axes_dim, [16, 56, 56]);
    assert_eq!(
        cfg.num_heads as u64,
        want["num_attention_heads"].as_u64().unwrap()
    );
    assert_eq!(
        (cfg.depth as u64, cfg.depth_single as u64),
        (
            want["num_layers"].as_u64().unwrap(),
            want["num_single_layers"].as_u64().unwrap()
        )
    );
    let (noise, _) = read_noise_file(&d.join("edit_noise.safetensors")).unwrap();
    run_fixture_case(&d, &p, "edit", NoiseSource::Tensor(noise));
}

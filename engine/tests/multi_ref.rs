//! Several context images against diffusers (tests/fixtures/generate_multiref.py): the ids built
//! as ComfyUI builds them ("offset" and "index"), fed to diffusers' transformer inside
//! `FluxKontextPipeline`'s own loop, two and three references of different sizes; compared stage
//! by stage and pixel by pixel with the tolerances of `pipeline_e2e.rs`.

mod common;

use common::{assert_pixels_match, fixtures, read_all};

use kontext_engine::check::{compare, tol, Comparison};
use kontext_engine::cuda::CudaBackend;
use kontext_engine::image::RgbImage;
use kontext_engine::pipeline::{Device, Models, Pipeline, Progress};
use kontext_engine::request::{read_noise_file, EditOptions, NoiseSource, ResizePolicy};
use kontext_engine::sampling::RefLayout;
use kontext_loader::ModelPaths;
use std::collections::BTreeMap;
use std::path::PathBuf;

fn dir() -> PathBuf {
    fixtures().join("multiref")
}

fn meta() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("meta.json")).unwrap()).unwrap()
}

fn pipeline() -> Pipeline {
    let paths = ModelPaths::discover(&fixtures().join("pipeline/tiny-kontext")).unwrap();
    Pipeline::load(&paths, Device::Cpu).unwrap()
}

fn layout(name: &str) -> RefLayout {
    match name {
        "offset" => RefLayout::Offset,
        "index" => RefLayout::Index,
        other => panic!("unknown layout {other}"),
    }
}

fn run_case(p: &Pipeline, case: &str) {
    let m = meta();
    let c = &m["cases"][case];
    let refs: Vec<RgbImage> = c["references"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| RgbImage::open(&dir().join(f.as_str().unwrap())).unwrap())
        .collect();
    let refs: Vec<&RgbImage> = refs.iter().collect();
    let (noise, _) = read_noise_file(&dir().join(format!("{case}_noise.safetensors"))).unwrap();
    // The output size is not given: it must default to the first reference's.
    let opts = EditOptions {
        steps: m["num_inference_steps"].as_u64().unwrap() as usize,
        guidance: m["guidance_scale"].as_f64().unwrap() as f32,
        noise: NoiseSource::Tensor(noise),
        width: None,
        height: None,
        resize: ResizePolicy::None,
    };
    let mut ours: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    let mut hook = |name: &str, v: &[f32]| {
        ours.insert(name.to_string(), v.to_vec());
    };
    let out = p
        .run_references(
            &refs,
            layout(c["layout"].as_str().unwrap()),
            m["prompt"].as_str().unwrap(),
            &opts,
            &mut |_| {},
            Some(&mut hook),
        )
        .unwrap();
    let theirs = read_all(&dir().join(format!("{case}_stages.safetensors")));
    // The ids are exact small integers: equal, not close.
    assert_eq!(ours["img_ids"], theirs["img_ids"], "{case}: img_ids");
    let last = format!("latents_step{}", opts.steps);
    println!("{case}: stage                {}", Comparison::header());
    for (mine, reference) in [
        ("image_latents", "image_latents"),
        ("latents_step1", "latents_step1"),
        (last.as_str(), "latents_final"),
        ("pixels", "decoder_output"),
    ] {
        let cmp = compare(&ours[mine], &theirs[reference], tol::F32);
        println!("{case}: {reference:<20} {}", cmp.row());
        assert!(
            cmp.passes(),
            "{case}: stage {reference} out of tolerance; later stages not checked"
        );
    }
    let expected = RgbImage::open(&dir().join(format!("{case}_expected.png"))).unwrap();
    assert_pixels_match(case, &out.image, &expected);
}

#[test]
fn two_and_three_references_match_diffusers_with_comfyui_ids() {
    let p = pipeline();
    for case in ["two_offset", "two_index", "three_offset", "three_index"] {
        run_case(&p, case);
    }
}

#[test]
fn one_reference_is_the_single_image_edit_in_either_layout() {
    let p = pipeline();
    let ctx = RgbImage::open(&fixtures().join("pipeline/context.png")).unwrap();
    // An explicit size: text-to-image would default to 1024².
    let opts = EditOptions {
        steps: 2,
        noise: NoiseSource::Seed(9),
        resize: ResizePolicy::None,
        width: Some(64),
        height: Some(48),
        ..Default::default()
    };
    let single = p.edit(&ctx, "a hat", &opts, &mut |_| {}).unwrap();
    for l in [RefLayout::Offset, RefLayout::Index] {
        let multi = p
            .edit_references(&[&ctx], l, "a hat", &opts, &mut |_| {})
            .unwrap();
        assert_eq!(multi.image, single.image, "{l:?}");
    }
    // No reference at all is text-to-image.
    let t2i = p.generate("a hat", &opts, &mut |_| {}).unwrap();
    let none = p
        .edit_references(&[], RefLayout::Offset, "a hat", &opts, &mut |_| {})
        .unwrap();
    assert_eq!(none.image, t2i.image);
}

#[test]
fn too_many_image_tokens_fail_before_any_model_runs() {
    let p = pipeline();
    let big = RgbImage {
        width: 4096,
        height: 4096,
        pixels: vec![0; 4096 * 4096 * 3],
    };
    let small = RgbImage::open(&dir().join("ref_b.png")).unwrap();
    let opts = EditOptions {
        resize: ResizePolicy::None,
        ..Default::default()
    };
    let mut events = Vec::new();
    let e = p
        .edit_references(&[&big, &small], RefLayout::Offset, "x", &opts, &mut |e| {
            events.push(e.clone())
        })
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("4096×4096 (65536 tokens)") && e.contains("32×64 (8 tokens)"),
        "{e}"
    );
    assert!(events.is_empty(), "{events:?}");
}

#[test]
fn three_references_run_through_every_cuda_op_as_a_plan() {
    // The CUDA backend's control flow without a GPU: each reference is encoded in a pool of its
    // own size and the denoising loop is planned with all context tokens in the sequence.
    let paths = ModelPaths::discover(&fixtures().join("pipeline/tiny-kontext")).unwrap();
    let p = Pipeline::load(&paths, Device::Cpu).unwrap();
    let models = Models::load(CudaBackend::planner(), &paths).unwrap();
    let refs: Vec<RgbImage> = ["ref_a", "ref_b", "ref_c"]
        .iter()
        .map(|r| RgbImage::open(&dir().join(format!("{r}.png"))).unwrap())
        .collect();
    let refs: Vec<&RgbImage> = refs.iter().collect();
    let opts = EditOptions {
        steps: 2,
        noise: NoiseSource::Seed(3),
        resize: ResizePolicy::None,
        ..EditOptions::default()
    };
    for l in [RefLayout::Offset, RefLayout::Index] {
        let mut events = Vec::new();
        let out = p
            .run_references_with(
                &models,
                &refs,
                l,
                "a cat",
                &opts,
                &mut |e| events.push(e.clone()),
                None,
            )
            .unwrap();
        assert_eq!((out.image.width, out.image.height), (64, 48));
        assert!(events.contains(&Progress::Denoising { steps: 2 }));
    }
}

//! LoRAs end to end against diffusers (tests/fixtures/generate_lora.py): one tiny LoRA on the
//! committed tiny pipeline in every file format, an edit at strength 0.75 compared with
//! diffusers' `load_lora_weights` + `set_adapters` run of the PEFT form; then, on the same loaded
//! pipeline, a new strength and the LoRA dropped, with nothing reloaded. Last, fp8 weights: the
//! side product and a merge-and-requantise, each against the f32 merge.

mod common;

use common::{assert_pixels_match, case_options, fixtures, read_all};

use kontext_engine::backend::Backend;
use kontext_engine::check::{compare, tol, Comparison};
use kontext_engine::cpu::CpuBackend;
use kontext_engine::image::RgbImage;
use kontext_engine::lora::{ActiveLora, LoraSpec};
use kontext_engine::pipeline::{Device, Pipeline};
use kontext_engine::request::{read_noise_file, EditOptions, NoiseSource, ResizePolicy};
use kontext_engine::weights::{quantise_e4m3, HostWeight, StoredPart, StoredWeight};
use kontext_loader::{load_lora, DType, LoraFormat, ModelPaths};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn pipeline() -> Pipeline {
    let paths = ModelPaths::discover(&fixtures().join("pipeline/tiny-kontext")).unwrap();
    Pipeline::load(&paths, Device::Cpu).unwrap()
}

/// The fixture's edit on `p`, compared with `latents` (step 1 and final) and the PNG `png`.
fn check_edit(p: &Pipeline, what: &str, latents: [&[f32]; 2], png: &Path) {
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("pipeline/meta.json")).unwrap(),
    )
    .unwrap();
    let c = &meta["cases"]["edit"];
    let (noise, _) = read_noise_file(&fixtures().join("pipeline/edit_noise.safetensors")).unwrap();
    let opts = case_options(c, NoiseSource::Tensor(noise));
    let ctx = RgbImage::open(&fixtures().join("pipeline/context.png")).unwrap();
    let mut ours: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    let mut hook = |name: &str, v: &[f32]| {
        ours.insert(name.to_string(), v.to_vec());
    };
    let out = p
        .run(
            Some(&ctx),
            c["prompt"].as_str().unwrap(),
            &opts,
            &mut |_| {},
            Some(&mut hook),
        )
        .unwrap();
    println!("{what}: stage          {}", Comparison::header());
    let last = format!("latents_step{}", opts.steps);
    for (mine, theirs) in [("latents_step1", latents[0]), (last.as_str(), latents[1])] {
        let cmp = compare(&ours[mine], theirs, tol::F32);
        println!("{what}: {mine:<14} {}", cmp.row());
        assert!(cmp.passes(), "{what}: {mine} out of tolerance");
    }
    let expected = RgbImage::open(png).unwrap();
    assert_pixels_match(what, &out.image, &expected);
}

const FORMATS: [(&str, LoraFormat); 5] = [
    ("peft", LoraFormat::Diffusers),
    ("aitoolkit", LoraFormat::Diffusers),
    ("kohya", LoraFormat::Kohya),
    ("comfy", LoraFormat::Bfl),
    ("fal", LoraFormat::Fal),
];

#[test]
fn every_format_reproduces_diffusers_and_strengths_change_without_reload() {
    let dir = fixtures().join("lora");
    let exp = read_all(&dir.join("expected.safetensors"));
    let e = |s: &str, k: &str| exp[&format!("s{s}.{k}")].as_slice();
    let mut p = pipeline();
    for (name, format) in FORMATS {
        let lora = load_lora(&dir.join(format!("{name}.safetensors")), p.flux_config()).unwrap();
        assert_eq!(lora.format, format, "{name}");
        p.set_loras(&[ActiveLora {
            lora: Arc::new(lora),
            strength: 0.75,
        }])
        .unwrap();
        check_edit(
            &p,
            &format!("{name} @0.75"),
            [e("0.75", "latents_step1"), e("0.75", "latents_final")],
            &dir.join("edit_s0.75.png"),
        );
    }
    // The same loaded pipeline (fal's LoRA attached last): a new strength, then none.
    let mut loras = p.loras().to_vec();
    loras[0].strength = 1.5;
    p.set_loras(&loras).unwrap();
    check_edit(
        &p,
        "fal @1.5",
        [e("1.5", "latents_step1"), e("1.5", "latents_final")],
        &dir.join("edit_s1.5.png"),
    );
    p.set_loras(&[]).unwrap();
    assert!(p.loras().is_empty());
    let base = read_all(&fixtures().join("pipeline/edit_stages.safetensors"));
    check_edit(
        &p,
        "dropped",
        [&base["latents_step1"], &base["latents_final"]],
        &fixtures().join("pipeline/edit_expected.png"),
    );
}

#[test]
fn load_with_loras_takes_file_and_strength() {
    let paths = ModelPaths::discover(&fixtures().join("pipeline/tiny-kontext")).unwrap();
    let spec = format!(
        "{}:0.75",
        fixtures().join("lora/kohya.safetensors").display()
    );
    let spec = LoraSpec::parse(&spec).unwrap();
    assert_eq!(spec.strength, 0.75);
    let p = Pipeline::load_with_loras(&paths, Device::Cpu, &[spec]).unwrap();
    assert_eq!(p.loras().len(), 1);
    assert_eq!(p.loras()[0].lora.format, LoraFormat::Kohya);
    let exp = read_all(&fixtures().join("lora/expected.safetensors"));
    check_edit(
        &p,
        "kohya via load_with_loras",
        [&exp["s0.75.latents_step1"], &exp["s0.75.latents_final"]],
        &fixtures().join("lora/edit_s0.75.png"),
    );
    assert_eq!(
        LoraSpec::parse("a/b.safetensors").unwrap().strength,
        1.0,
        "no strength: 1"
    );
    assert_eq!(
        LoraSpec::parse("C:/x/b.safetensors").unwrap().path,
        PathBuf::from("C:/x/b.safetensors"),
        "a colon that is not a strength stays in the path"
    );
    assert!(LoraSpec::parse("x.safetensors:inf").is_err());
}

/// Relative RMS error of `a` against `b`.
fn rel_rms(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn fp8_side_product_beats_merge_and_requantise() {
    // One fused weight of the fixture's LoRA (double block 0 image qkv, rank 12 in the Kohya
    // form), its base weight quantised to scaled fp8 as a checkpoint stores it. Reference: the
    // f32 merge `W8 + ΔW` applied to activations x. Side product: the fp8 weight as stored plus
    // the low-rank term (the engine's path). Merge and requantise: `quantise(W8 + ΔW)`.
    let paths = ModelPaths::discover(&fixtures().join("pipeline/tiny-kontext")).unwrap();
    let t =
        kontext_loader::load_transformer(paths.transformer.as_ref().unwrap(), &Default::default())
            .unwrap();
    let key = "double_blocks.0.img_attn.qkv.weight";
    let w = t.weights.f32(key).unwrap();
    let (out, inp) = (
        t.weights.get(key).unwrap().shape[0],
        t.weights.get(key).unwrap().shape[1],
    );
    let (codes, scale) = quantise_e4m3(&w);
    let mut w8 = Vec::new();
    kontext_loader::dtype::decode_into(DType::F8E4M3, &codes, scale, &mut w8);
    let lora = load_lora(&fixtures().join("lora/kohya.safetensors"), &t.config).unwrap();
    let delta = lora.delta(key, out).unwrap();
    let merged: Vec<f32> = w8.iter().zip(&delta).map(|(a, d)| a + d).collect();
    let (mcodes, mscale) = quantise_e4m3(&merged);
    let b = CpuBackend;
    let rows = 64;
    let x: Vec<f32> = (0..rows * inp)
        .map(|i| (i * 7919 % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let xt = b.upload(&x, rows, inp).unwrap();
    let stored = |codes: Vec<u8>, scale: f32| StoredWeight {
        dtype: DType::F8E4M3,
        shape: vec![out, inp],
        parts: vec![StoredPart {
            bytes: Cow::Owned(codes),
            rows: out,
            scale,
        }],
    };
    let host = |data: Vec<f32>| HostWeight {
        shape: vec![out, inp],
        data,
    };
    let reference = b.load_linear("ref", host(merged.clone()), None).unwrap();
    let reference = b.download(&b.linear(&xt, &reference).unwrap()).unwrap();
    let mut side = b
        .load_linear_stored(key, stored(codes.clone(), scale), None)
        .unwrap();
    let terms: Vec<_> = lora
        .patches
        .iter()
        .filter(|p| p.target == key)
        .map(|p| kontext_engine::lora::LoraTerm::new(p, 1.0))
        .collect();
    b.set_lora(&mut side, key, &terms).unwrap();
    let side = b.download(&b.linear(&xt, &side).unwrap()).unwrap();
    let requant = b
        .load_linear_stored(key, stored(mcodes, mscale), None)
        .unwrap();
    let requant = b.download(&b.linear(&xt, &requant).unwrap()).unwrap();
    let lora_only: Vec<f32> = {
        let base = b.load_linear("base", host(w8.clone()), None).unwrap();
        let base = b.download(&b.linear(&xt, &base).unwrap()).unwrap();
        reference.iter().zip(&base).map(|(r, b)| r - b).collect()
    };
    let (e_side, e_requant) = (rel_rms(&side, &reference), rel_rms(&requant, &reference));
    let contribution = (lora_only.iter().map(|v| (*v as f64).powi(2)).sum::<f64>()
        / reference.iter().map(|v| (*v as f64).powi(2)).sum::<f64>())
    .sqrt();
    println!(
        "fp8 {key}: relative RMS error vs the f32 merge: side product {e_side:.2e}, merge + requantise {e_requant:.2e} (the LoRA is {contribution:.2e} of the output)"
    );
    assert!(e_side < 1e-5, "side product {e_side}");
    assert!(
        e_requant > 100.0 * e_side,
        "requantising loses more: {e_requant}"
    );
}

fn emulated() {
    assert_eq!(
        std::env::var("KONTEXT_EMULATED").as_deref(),
        Ok("1"),
        "run on the emulated GPU: scripts/emulated cargo test --release -p kontext-engine --test lora_e2e -- --ignored"
    );
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-engine --test lora_e2e -- --ignored"]
fn cuda_linear_with_lora_terms_matches_the_cpu() {
    emulated();
    use kontext_engine::cuda::CudaBackend;
    use kontext_engine::lora::LoraTerm;
    let (cpu, gpu) = (CpuBackend, CudaBackend::new(0).unwrap());
    let (out, inp, rows) = (96, 32, 20);
    let w: Vec<f32> = (0..out * inp)
        .map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) / (inp as f32).sqrt())
        .collect();
    let x: Vec<f32> = (0..rows * inp)
        .map(|i| (i * 7919 % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let term = |row0: usize, n: usize, rank: usize, scale: f32, seed: usize| LoraTerm {
        rank,
        row0,
        rows: n,
        down: (0..rank * inp)
            .map(|i| ((i * 13 + seed) % 29) as f32 / 29.0 - 0.5)
            .collect(),
        up: (0..n * rank)
            .map(|i| ((i * 17 + seed) % 31) as f32 / 62.0 - 0.25)
            .collect(),
        scale,
    };
    // A piece on the middle third (diffusers to_k) and a fused pair on all rows.
    let terms = [term(32, 32, 4, 1.5, 1), term(0, 96, 12, -0.5, 2)];
    let bias = HostWeight {
        shape: vec![out],
        data: (0..out).map(|i| 0.01 * i as f32).collect(),
    };
    let (codes, scale) = quantise_e4m3(&w);
    let bf16_bytes: Vec<u8> = w
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
        .collect();
    for (what, dtype, bytes, s, tolerance) in [
        ("bf16", DType::BF16, bf16_bytes, 1.0, tol::BF16_OP_ROUNDED),
        ("fp8", DType::F8E4M3, codes, scale, tol::BF16_OP_ROUNDED),
    ] {
        let stored = StoredWeight {
            dtype,
            shape: vec![out, inp],
            parts: vec![StoredPart {
                bytes: Cow::Owned(bytes),
                rows: out,
                scale: s,
            }],
        };
        let mut lc = cpu
            .load_linear_stored("w", stored.clone(), Some(bias.clone()))
            .unwrap();
        let mut lg = gpu
            .load_linear_stored("w", stored, Some(bias.clone()))
            .unwrap();
        cpu.set_lora(&mut lc, "w", &terms).unwrap();
        gpu.set_lora(&mut lg, "w", &terms).unwrap();
        let yc = cpu
            .download(
                &cpu.linear(&cpu.upload(&x, rows, inp).unwrap(), &lc)
                    .unwrap(),
            )
            .unwrap();
        let yg = gpu
            .download(
                &gpu.linear(&gpu.upload(&x, rows, inp).unwrap(), &lg)
                    .unwrap(),
            )
            .unwrap();
        let cmp = compare(&yg, &yc, tolerance);
        println!("cuda {what} linear + 2 LoRA terms vs cpu: {}", cmp.row());
        assert!(cmp.passes(), "{what}");
        // Dropping the terms gives the plain layer back.
        gpu.set_lora(&mut lg, "w", &[]).unwrap();
        cpu.set_lora(&mut lc, "w", &[]).unwrap();
        let yc0 = cpu
            .download(
                &cpu.linear(&cpu.upload(&x, rows, inp).unwrap(), &lc)
                    .unwrap(),
            )
            .unwrap();
        let yg0 = gpu
            .download(
                &gpu.linear(&gpu.upload(&x, rows, inp).unwrap(), &lg)
                    .unwrap(),
            )
            .unwrap();
        assert!(compare(&yg0, &yc0, tolerance).passes(), "{what} dropped");
        assert!(!compare(&yc0, &yc, tolerance).passes(), "the terms matter");
    }
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-engine --test lora_e2e -- --ignored"]
fn cuda_pipeline_with_a_lora_matches_the_cpu_and_changes_strength_without_reload() {
    emulated();
    let paths = ModelPaths::discover(&fixtures().join("pipeline/tiny-kontext")).unwrap();
    let mut cpu = Pipeline::load(&paths, Device::Cpu).unwrap();
    let mut gpu = Pipeline::load(&paths, Device::Cuda).unwrap();
    let lora = Arc::new(
        load_lora(
            &fixtures().join("lora/kohya.safetensors"),
            cpu.flux_config(),
        )
        .unwrap(),
    );
    let ctx = RgbImage::open(&fixtures().join("pipeline/context.png")).unwrap();
    let opts = EditOptions {
        steps: 2,
        noise: NoiseSource::Seed(3),
        resize: ResizePolicy::None,
        ..Default::default()
    };
    let run = |p: &Pipeline| {
        let mut lat = Vec::new();
        let mut hook = |name: &str, v: &[f32]| {
            if name == "latents_step2" {
                lat = v.to_vec();
            }
        };
        let out = p
            .run(
                Some(&ctx),
                "make it blue",
                &opts,
                &mut |_| {},
                Some(&mut hook),
            )
            .unwrap();
        (lat, out.image.pixels)
    };
    for strength in [0.75, 1.5, 0.0] {
        let active = [ActiveLora {
            lora: lora.clone(),
            strength,
        }];
        cpu.set_loras(&active).unwrap();
        gpu.set_loras(&active).unwrap();
        let ((lc, pc), (lg, pg)) = (run(&cpu), run(&gpu));
        let cmp = compare(&lg, &lc, tol::BF16_MODEL);
        let worst = pc
            .iter()
            .zip(&pg)
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .max()
            .unwrap();
        println!(
            "cuda vs cpu, kohya LoRA @{strength}: latents {} pixels max {worst} levels",
            cmp.row()
        );
        assert!(
            cmp.passes() && worst <= tol::BF16_PIXEL_LEVELS,
            "@{strength}"
        );
    }
}

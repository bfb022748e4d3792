//! The memory modes on the emulated GPU (kernels/emu): the tiny pipeline loaded in every mode
//! gives the resident mode's image (fp8 within the fp8 tolerance, streaming bit for bit the fp8
//! image: it moves bytes, not numbers), each run's measured peak (the device's allocation
//! counter) stays within its plan, streamed weights are copied one ahead of use, and memory
//! another process takes is a clear error naming the stage and the bytes. Run by
//! `scripts/test` as `scripts/emulated cargo test --release --test memory_emulated -- --ignored`.

mod common;

use common::fixtures;
use kontext_engine::image::RgbImage;
use kontext_engine::memory::{MemoryOptions, Mode};
use kontext_engine::pipeline::{Device, Engine, Pipeline};
use kontext_engine::request::{plan_sizes, EditOptions, NoiseSource, ResizePolicy};
use kontext_engine::sampling::RefLayout;
use kontext_loader::ModelPaths;

fn emulated() {
    assert_eq!(
        std::env::var("KONTEXT_EMULATED").as_deref(),
        Ok("1"),
        "run on the emulated GPU: scripts/emulated cargo test --release --test memory_emulated -- --ignored"
    );
}

/// The tiny pipeline, placed for the request [`edit`] makes.
fn load(opts: &MemoryOptions) -> Pipeline {
    let paths = ModelPaths::discover(&fixtures().join("pipeline/tiny-kontext")).unwrap();
    let ctx = RgbImage::open(&fixtures().join("pipeline/context.png")).unwrap();
    let sizes = plan_sizes(&[(ctx.width, ctx.height)], &options()).unwrap();
    Pipeline::load_with(&paths, Device::Cuda, opts, Some((&sizes, options().steps))).unwrap()
}

fn options() -> EditOptions {
    EditOptions {
        steps: 2,
        noise: NoiseSource::Seed(7),
        resize: ResizePolicy::None,
        ..EditOptions::default()
    }
}

/// The image and the latents after step 1.
fn edit(p: &Pipeline) -> (RgbImage, Vec<f32>) {
    let (image, _, step1) = edit_latents(p);
    (image, step1)
}

/// The image, the initial latents and the latents after step 1.
fn edit_latents(p: &Pipeline) -> (RgbImage, Vec<f32>, Vec<f32>) {
    let ctx = RgbImage::open(&fixtures().join("pipeline/context.png")).unwrap();
    let (mut x0, mut x1) = (Vec::new(), Vec::new());
    let mut hook = |name: &str, v: &[f32]| match name {
        "latents_step0" => x0 = v.to_vec(),
        "latents_step1" => x1 = v.to_vec(),
        _ => {}
    };
    let out = p
        .run_references(
            &[&ctx],
            RefLayout::Offset,
            "a cat",
            &options(),
            &mut |_| {},
            Some(&mut hook),
        )
        .unwrap();
    (out.image, x0, x1)
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn levels(a: &RgbImage, b: &RgbImage) -> (u8, f64) {
    let d: Vec<u8> = a
        .pixels
        .iter()
        .zip(&b.pixels)
        .map(|(x, y)| x.abs_diff(*y))
        .collect();
    let mean = d.iter().map(|&v| v as f64).sum::<f64>() / d.len() as f64;
    (*d.iter().max().unwrap(), mean)
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release --test memory_emulated -- --ignored"]
fn every_mode_gives_the_resident_image_within_its_plan() {
    emulated();
    let mut runs = Vec::new();
    for (mode, resident_blocks) in [
        (Mode::Resident, None),
        (Mode::Fp8, None),
        (Mode::Stream, Some(1)),
    ] {
        let p = load(&MemoryOptions {
            mode: Some(mode),
            resident_blocks,
            ..Default::default()
        });
        let (plan, _) = p.memory.clone().unwrap();
        assert_eq!(plan.mode(), mode);
        let (image, step1) = edit(&p);
        let measured = p.gpu_peak_bytes().unwrap();
        println!(
            "mode {}: planned peak {} B, measured {} B; {}",
            mode.name(),
            plan.peak_bytes,
            measured,
            plan.summary()
        );
        assert!(
            measured <= plan.peak_bytes,
            "measured {measured} > plan {}",
            plan.peak_bytes
        );
        let Engine::Cuda(m) = &p.engine else {
            unreachable!()
        };
        let stats = m.flux.backend.stream_stats();
        match mode {
            Mode::Resident => assert_eq!(stats.bytes, 0),
            _ => {
                // The text encoders and (stream) two of three blocks and the modulation were
                // copied in, and the second step found its weights copied one ahead.
                assert!(stats.prefetched > stats.misses, "{stats:?}");
            }
        }
        if mode == Mode::Stream {
            assert_eq!(plan.layout.streamed_blocks.len(), 2, "{:?}", plan.layout);
            assert!(m.flux.single_blocks.iter().any(|b| b.linear1.is_streamed()));
        }
        println!("  stream copies: {stats:?}");
        // The denoising step is a CUDA graph where the transformer is resident (fp8 streams only
        // the text encoders); a step that streams blocks runs eagerly.
        let graphs = p.graph_stats().unwrap();
        match mode {
            Mode::Stream => assert_eq!(graphs, (0, 0), "streamed blocks: eager"),
            _ => assert_eq!(graphs.0, 1, "{mode:?}: one capture"),
        }
        if mode == Mode::Fp8 {
            // A second image from the same prompt reuses its encoding: T5 (the only user of
            // rms_norm) does not run again and streams nothing, and the image is the same.
            let t5_runs = |p: &Pipeline| {
                let c = p.launch_counts().unwrap();
                c.iter()
                    .find(|(k, _)| *k == "rms_norm")
                    .map_or(0, |(_, n)| *n)
            };
            let before = t5_runs(&p);
            assert!(before > 0);
            let (again, _) = edit(&p);
            assert_eq!(t5_runs(&p), before, "the prompt was encoded again");
            assert_eq!(again.pixels, image.pixels);
        }
        runs.push((image, step1));
    }
    let (resident, fp8, stream) = (&runs[0], &runs[1], &runs[2]);
    assert_eq!(fp8.0.pixels, stream.0.pixels, "streaming changes no value");
    assert_eq!(fp8.1, stream.1);
    // fp8 weights against bf16: the velocity of step 1 (its latents) and the finished image.
    // Tolerance: the tiny random model quantises to 8.5 % per forward (check::tol::FP8_WEIGHTS'
    // measurement); an image within 48 levels, 6 on average, shows the fp8 path is sane while
    // a wrong scale or a dropped part (hundreds of levels) fails it.
    let v = rel_l2(&fp8.1, &resident.1);
    let (max, mean) = levels(&fp8.0, &resident.0);
    println!(
        "fp8 vs bf16: latents after step 1 rel_l2 {v:.2e}; image max {max} levels, mean {mean:.2}"
    );
    assert!(v < 0.15, "{v}");
    assert!(max <= 48 && mean <= 6.0, "max {max}, mean {mean}");
}

/// The image and the velocity of step 1 (`(latents_step1 − latents_step0) / dt`, up to the
/// common factor 1/dt), and the launches per kernel the run made.
fn edit_velocity(p: &Pipeline) -> (RgbImage, Vec<f32>, Vec<(&'static str, u64)>) {
    let before = p.launch_counts().unwrap();
    let (image, x0, x1) = edit_latents(p);
    let after = p.launch_counts().unwrap();
    let ran = after
        .iter()
        .map(|&(k, n)| (k, n - before.iter().find(|b| b.0 == k).map_or(0, |b| b.1)))
        .filter(|&(_, n)| n > 0)
        .collect();
    assert_eq!(x0.len(), x1.len());
    let v = x1.iter().zip(&x0).map(|(a, b)| a - b).collect();
    (image, v, ran)
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release --test memory_emulated -- --ignored"]
fn both_fp8_routes_stay_within_the_fp8_tolerance_of_bf16() {
    // The two routes of fp8 weights (issue 13): dequantise into bf16 then a bf16 GEMM (the
    // default), and e4m3 × e4m3 GEMMs with the activations quantised on the device — adaLN's
    // norm writing e4m3 directly for qkv, linear1 and the MLPs' first layers
    // (norm_modulate_e4m3), the other linears' inputs by quantise_e4m3. Each against the
    // resident bf16 run: step 1's velocity and the finished image.
    emulated();
    let (bf16, v_bf16, _) = edit_velocity(&load(&MemoryOptions {
        mode: Some(Mode::Resident),
        ..Default::default()
    }));
    let p = load(&MemoryOptions {
        mode: Some(Mode::Fp8),
        ..Default::default()
    });
    let Engine::Cuda(m) = &p.engine else {
        unreachable!()
    };
    let b = m.flux.backend.clone();
    b.set_fp8_gemm(false);
    let (deq, v_deq, ran_deq) = edit_velocity(&p);
    b.set_fp8_gemm(true);
    let fp8 = edit_velocity(&p);
    b.set_fp8_gemm(false);
    let (f8, v_f8, ran_f8) = fp8;
    let count = |ran: &[(&str, u64)], k: &str| ran.iter().find(|r| r.0 == k).map_or(0, |r| r.1);
    // Which route ran: the fused norm only on the fp8 × fp8 route, the dequantisation only on
    // the other; per step, one norm_modulate_e4m3 per fused input (4 per double block, 1 per
    // single block).
    let c = &m.flux.config;
    let per_step = (4 * c.depth + c.depth_single) as u64;
    assert_eq!(
        count(&ran_f8, "norm_modulate_e4m3"),
        per_step * options().steps as u64,
        "{ran_f8:?}"
    );
    assert_eq!(
        count(&ran_f8, "norm_modulate_e4m3"),
        count(&ran_f8, "norm_modulate_amax")
    );
    assert!(count(&ran_f8, "quantise_e4m3") > 0, "{ran_f8:?}");
    assert_eq!(count(&ran_deq, "norm_modulate_e4m3"), 0, "{ran_deq:?}");
    assert_eq!(count(&ran_deq, "quantise_e4m3"), 0, "{ran_deq:?}");
    assert!(count(&ran_deq, "fp8_e4m3_to_bf16") > 0, "{ran_deq:?}");
    let (ve_deq, ve_f8) = (rel_l2(&v_deq, &v_bf16), rel_l2(&v_f8, &v_bf16));
    let ((mx_deq, mn_deq), (mx_f8, mn_f8)) = (levels(&deq, &bf16), levels(&f8, &bf16));
    println!(
        "fp8 routes vs bf16, step-1 velocity rel_l2 / image max, mean levels: dequantise \
         {ve_deq:.2e} / {mx_deq}, {mn_deq:.2}; e4m3 x e4m3 {ve_f8:.2e} / {mx_f8}, {mn_f8:.2}"
    );
    // The fp8 tolerance of the tiny random model (as above: 0.15 on the velocity, 48 / 6 levels
    // on the image). The e4m3 activations add their own rounding: the kernels' emulator test
    // (fp8_routes_error_against_bf16) measures the e4m3 × e4m3 GEMM at 3.8e-2 against bf16
    // where the dequantise route is at 2.7e-2, 1.41×, so that route's velocity bound is
    // 1.41 × 0.15 ≈ 0.21 (measured here: 9.8e-2 and 1.44e-1).
    for (v, bound, mx, mn) in [(ve_deq, 0.15, mx_deq, mn_deq), (ve_f8, 0.21, mx_f8, mn_f8)] {
        assert!(v < bound, "{v} ≥ {bound}");
        assert!(mx <= 48 && mn <= 6.0, "max {mx}, mean {mn}");
    }
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release --test memory_emulated -- --ignored"]
fn memory_taken_by_another_process_is_an_error_naming_the_stage_and_the_bytes() {
    emulated();
    let p = load(&MemoryOptions::default());
    let Engine::Cuda(m) = &p.engine else {
        unreachable!()
    };
    let gpu = m.flux.backend.gpu().unwrap().clone();
    // "Another process" takes all but 1 MiB of the free memory.
    let (free, _) = gpu.mem_info().unwrap();
    let _taken = gpu.alloc(free - (1 << 20)).unwrap();
    let ctx = RgbImage::open(&fixtures().join("pipeline/context.png")).unwrap();
    // A request checks first: it does not start.
    let err = p
        .run_references(
            &[&ctx],
            RefLayout::Offset,
            "a cat",
            &options(),
            &mut |_| {},
            None,
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("does not fit") && err.contains("free"),
        "{err}"
    );
    // Run without the check, the failing allocation names its stage and its bytes.
    let err = p
        .run_with(m, Some(&ctx), "a cat", &options(), &mut |_| {}, None)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("text encoding: "), "{err}");
    assert!(
        err.contains("cuMemAlloc of") && err.contains("OUT_OF_MEMORY"),
        "{err}"
    );
    println!("{err}");
}

//! The CUDA backend's control flow without a GPU: `CudaBackend::planner()` runs every op's shape
//! checks, casts and allocations from planning pools, and launches nothing. These tests run the
//! real model code through it: the tiny pipeline end to end, fp8 weights kept fp8, the wide-head
//! attention path, and the activation memory of one denoising step at the real Kontext size,
//! which is what the pool of the denoising loop is sized from.

use kontext_engine::encoder_backend::{EncoderBackend, Pad};
use kontext_engine::image::RgbImage;
use kontext_engine::pipeline::{Device, Models, Pipeline, Progress};
use kontext_engine::request::{EditOptions, NoiseSource, ResizePolicy};
use kontext_engine::sampling::{image_ids, txt_ids};
use kontext_engine::{Backend, CudaBackend, Flux, FluxInputs, HostWeight, WeightSource};
use kontext_kernels::arena::Pool;
use kontext_loader::{load_transformer, FluxConfig, ModelPaths, TransformerOptions};
use std::collections::BTreeMap;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures"))
}

/// Every weight of `cfg` as zeros, allocated lazily (the planner never reads weight values, so
/// the 11.9 B parameters of the real model cost no memory).
struct ZeroWeights(BTreeMap<String, Vec<usize>>);

impl WeightSource for ZeroWeights {
    fn weight(&self, key: &str) -> kontext_engine::Result<HostWeight> {
        let shape = self.0[key].clone();
        Ok(HostWeight {
            data: vec![0.0; shape.iter().product()],
            shape,
        })
    }
    fn has(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }
}

/// The plan of one Kontext step on `flux`: `nx` target and `nc` context tokens, `lt` text tokens.
fn step_inputs(c: &FluxConfig, lt: usize, (h, w): (usize, usize), context: bool) -> Vec<Vec<f32>> {
    let ni = if context { 2 * h * w } else { h * w };
    let mut ids = image_ids(h, w, 0.0);
    if context {
        ids.extend(image_ids(h, w, 1.0));
    }
    vec![
        vec![0.1; ni * c.in_channels],
        ids,
        vec![0.1; lt * c.context_in_dim],
        txt_ids(lt),
        vec![0.1; c.vec_in_dim],
    ]
}

fn forward_plan(flux: &Flux<CudaBackend>, v: &[Vec<f32>]) -> kontext_engine::Result<()> {
    let inp = FluxInputs {
        img: &v[0],
        img_ids: &v[1],
        txt: &v[2],
        txt_ids: &v[3],
        t: 0.5,
        guidance: 2.5,
        y: &v[4],
    };
    let out = flux.forward(&inp, None)?;
    assert!(out.iter().all(|&x| x == 0.0), "a plan downloads zeros");
    Ok(())
}

#[test]
fn one_real_size_step_plans_a_bounded_reproducible_pool() {
    let cfg = FluxConfig::kontext_dev();
    let src = ZeroWeights(
        kontext_loader::transformer::expected_shapes(&cfg)
            .into_iter()
            .collect(),
    );
    let b = CudaBackend::planner();
    let flux = Flux::load(b.clone(), cfg.clone(), &src).unwrap();
    // 1024² edit: 512 text + 4096 target + 4096 context tokens.
    let inputs = step_inputs(&cfg, 512, (64, 64), true);
    let pool = Pool::plan();
    b.with_scope(pool.clone(), true, &mut || forward_plan(&flux, &inputs))
        .unwrap();
    assert_eq!(pool.in_use(), 0, "every activation of the step is returned");
    let again = b.plan_bytes(&mut || forward_plan(&flux, &inputs)).unwrap();
    assert_eq!(pool.peak(), again, "the plan is deterministic");
    // The single block is the deepest: x, linear1's [L, 21504] output, the [attention ‖
    // GELU(mlp)] buffer both branches write in place (no separate attention, MLP slice or GELU
    // output, no concatenation: single_block_branches) and linear2's output, all bf16 at
    // L = 8704 (0.75 GB), plus the f32 RoPE table and a few [1, ·] vectors. (Before the
    // branches wrote in place it was 1.28 GB.)
    let gib = pool.peak() as f64 / (1u64 << 30) as f64;
    println!("activation pool of one 8,704-token step: {gib:.2} GiB");
    assert!(
        pool.peak() > 750_000_000 && pool.peak() < 1 << 30,
        "{gib} GiB"
    );
    // A denoising loop of two steps in the planned pool needs no more than one step.
    let mut steps = 0;
    b.planned(&mut || forward_plan(&flux, &inputs), &mut || {
        for _ in 0..2 {
            forward_plan(&flux, &inputs)?;
            steps += 1;
        }
        Ok(())
    })
    .unwrap();
    assert_eq!((steps, b.last_pool_bytes()), (2, pool.peak()));
}

#[test]
fn fp8_checkpoint_weights_stay_fp8_and_plan_a_dequantisation_scratch() {
    let dir = fixtures().join("transformer/a");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    let axes: Vec<usize> = meta["axes_dim"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let opts = TransformerOptions {
        axes_dim: Some(axes),
    };
    let b = CudaBackend::planner();
    let mut peaks = Vec::new();
    for (file, fp8) in [
        ("bfl.safetensors", false),
        ("bfl_fp8_scaled.safetensors", true),
        ("bfl_fp8.safetensors", true),
    ] {
        let t = load_transformer(&dir.join(file), &opts).unwrap();
        let flux = Flux::from_transformer(b.clone(), &t).unwrap();
        let linears = [
            &flux.img_in,
            &flux.double_blocks[0].img_attn.qkv,
            &flux.single_blocks[0].linear1,
            &flux.final_layer.linear,
        ];
        assert!(linears.iter().all(|l| l.fp8 == fp8), "{file}");
        let c = &t.config;
        let inputs = step_inputs(c, 7, (2, 3), true);
        peaks.push(b.plan_bytes(&mut || forward_plan(&flux, &inputs)).unwrap());
    }
    // The fp8 model plans the same activations plus one bf16 copy of a weight at a time.
    assert!(peaks[1] > peaks[0] && peaks[1] == peaks[2], "{peaks:?}");
}

#[test]
fn tiny_pipeline_runs_through_every_cuda_op_as_a_plan() {
    let paths = ModelPaths::discover(&fixtures().join("pipeline/tiny-kontext")).unwrap();
    let p = Pipeline::load(&paths, Device::Cpu).unwrap();
    let models = Models::load(CudaBackend::planner(), &paths).unwrap();
    let ctx = RgbImage::open(&fixtures().join("pipeline/context.png")).unwrap();
    let opts = EditOptions {
        steps: 2,
        noise: NoiseSource::Seed(3),
        resize: ResizePolicy::None,
        width: Some(80),
        height: Some(64),
        ..EditOptions::default()
    };
    for context in [Some(&ctx), None] {
        let mut events = Vec::new();
        let out = p
            .run_with(
                &models,
                context,
                "a cat",
                &opts,
                &mut |e| events.push(e.clone()),
                None,
            )
            .unwrap();
        assert_eq!((out.image.width, out.image.height), (80, 64));
        assert!(events.contains(&Progress::Denoising { steps: 2 }));
    }
}

#[test]
fn wide_heads_plan_as_gemms_and_shapes_are_checked() {
    let b = CudaBackend::planner();
    // The VAE's single 512-wide head: GEMMs around softmax_rows.
    let qkv = b.upload(&vec![0.0; 40 * 1536], 40, 1536).unwrap();
    let out = b.attention(&qkv, 1, 512).unwrap();
    assert_eq!(b.dims(&out), (40, 512));
    // Wide heads take no bias or mask; a bias must be [H·L, L].
    let bias = b.upload(&vec![0.0; 40 * 40], 40, 40).unwrap();
    assert!(b
        .attention_masked(&qkv, 1, 512, 1.0, Some(&bias), false)
        .is_err());
    assert!(b.attention_masked(&qkv, 1, 512, 1.0, None, true).is_err());
    let small = b.upload(&vec![0.0; 40 * 48], 40, 48).unwrap();
    assert!(b
        .attention_masked(&small, 2, 8, 1.0, Some(&bias), false)
        .is_err());
    let bias2 = b.upload(&vec![0.0; 80 * 40], 80, 40).unwrap();
    let o = b
        .attention_masked(&small, 2, 8, 1.0, Some(&bias2), true)
        .unwrap();
    assert_eq!(b.dims(&o), (40, 16));
    // Convolutions: padding must be smaller than the kernel; the map must match its size.
    let w = HostWeight {
        shape: vec![4, 3, 3, 3],
        data: vec![0.0; 108],
    };
    let conv = b.load_conv("c", w, None).unwrap();
    let x = b.upload(&vec![0.0; 5 * 7 * 3], 35, 3).unwrap();
    let (y, hw) = b.conv2d(&x, (5, 7), &conv, 2, Pad::DOWNSAMPLE).unwrap();
    assert_eq!((b.dims(&y), hw), ((2 * 3, 4), (2, 3)));
    assert!(b.conv2d(&x, (5, 7), &conv, 1, Pad::same(3)).is_err());
    assert!(b.conv2d(&x, (7, 5), &conv, 1, Pad::same(1)).is_ok());
    assert!(b.conv2d(&x, (6, 6), &conv, 1, Pad::same(1)).is_err());
    // Elementwise shape checks mirror the CPU's.
    let mut a = b.upload(&[0.0; 6], 2, 3).unwrap();
    let c = b.upload(&[0.0; 6], 3, 2).unwrap();
    assert!(b.add_assign(&mut a, &c).is_err());
    assert!(b.concat_rows(&a, &c).is_err());
    assert!(b.slice_cols(&a, 2, 4).is_err());
    assert_eq!(b.dims(&b.concat_cols(&a, &a).unwrap()), (2, 6));
    assert!(b.download(&a).unwrap().iter().all(|&v| v == 0.0));
}

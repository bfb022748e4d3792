//! Where the bf16 tolerances of `kontext_engine::check::tol` come from, measured without a GPU.
//!
//! `Bf16Cpu` is the CPU reference with the CUDA backend's rounding points: weights and biases
//! rounded to bf16 at load, every op's tensor inputs rounded to bf16 where the CUDA op casts them
//! (all but the RoPE table and T5's position bias, which stay f32), f32 math, and the output
//! rounded once to bf16, as each CUDA kernel and the cuBLASLt epilogue store it. Running the
//! committed tiny pipeline and the transformer fixtures through it measures how far bf16
//! activations move the results from the f32 reference; the GPU check's tolerances for whole
//! models (`tol::BF16_MODEL`) and pixels (`tol::BF16_PIXEL_LEVELS`) must cover that with margin,
//! and these tests fail if they do not.
//!
//! Run with `--nocapture` for the measured tables.

mod common;

use common::case_options;

use half::bf16;
use kontext_engine::check::{compare, tol, Comparison};
use kontext_engine::cpu_encoder::CpuConv;
use kontext_engine::encoder_backend::{EncoderBackend, Pad};
use kontext_engine::image::RgbImage;
use kontext_engine::pipeline::{Device, Models, Pipeline};
use kontext_engine::request::{read_noise_file, NoiseSource};
use kontext_engine::{Backend, CpuBackend, CpuLinear, CpuTensor, Flux, FluxInputs, HostWeight};
use kontext_engine::{EngineError, StageHook};
use kontext_loader::{load_transformer, ModelPaths, TensorSet, TransformerOptions};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

type R<T> = Result<T, EngineError>;

fn rb(v: f32) -> f32 {
    bf16::from_f32(v).to_f32()
}

fn round(mut t: CpuTensor) -> CpuTensor {
    t.data.iter_mut().for_each(|v| *v = rb(*v));
    t
}

fn rounded(t: &CpuTensor) -> CpuTensor {
    round(t.clone())
}

fn round_weight(mut w: HostWeight) -> HostWeight {
    w.data.iter_mut().for_each(|v| *v = rb(*v));
    w
}

/// The CPU reference with the CUDA backend's bf16 rounding points (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
struct Bf16Cpu;

const C: CpuBackend = CpuBackend;

impl Backend for Bf16Cpu {
    type Tensor = CpuTensor;
    type Linear = CpuLinear;
    type Vector = Vec<f32>;

    fn name(&self) -> &'static str {
        "bf16-emulation"
    }
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> R<CpuTensor> {
        C.upload(data, rows, cols) // uploads stay f32 on the GPU
    }
    fn download(&self, x: &CpuTensor) -> R<Vec<f32>> {
        C.download(x)
    }
    fn dims(&self, x: &CpuTensor) -> (usize, usize) {
        C.dims(x)
    }
    fn load_linear(&self, key: &str, w: HostWeight, b: Option<HostWeight>) -> R<CpuLinear> {
        C.load_linear(key, round_weight(w), b.map(round_weight))
    }
    fn load_vector(&self, key: &str, v: HostWeight) -> R<Vec<f32>> {
        C.load_vector(key, v) // parameter vectors are f32 on the GPU
    }
    fn linear(&self, x: &CpuTensor, w: &CpuLinear) -> R<CpuTensor> {
        Ok(round(C.linear(&rounded(x), w)?))
    }
    fn silu(&self, x: &CpuTensor) -> R<CpuTensor> {
        Ok(round(C.silu(&rounded(x))?))
    }
    fn gelu_tanh(&self, x: &CpuTensor) -> R<CpuTensor> {
        Ok(round(C.gelu_tanh(&rounded(x))?))
    }
    fn add_assign(&self, a: &mut CpuTensor, b: &CpuTensor) -> R<()> {
        *a = rounded(a);
        C.add_assign(a, &rounded(b))?;
        *a = rounded(a);
        Ok(())
    }
    fn norm_modulate(&self, x: &CpuTensor, sh: &CpuTensor, sc: &CpuTensor) -> R<CpuTensor> {
        Ok(round(C.norm_modulate(
            &rounded(x),
            &rounded(sh),
            &rounded(sc),
        )?))
    }
    fn qk_norm_rope(
        &self,
        qkv: &mut CpuTensor,
        h: usize,
        qs: &Vec<f32>,
        ks: &Vec<f32>,
        pe: &CpuTensor,
        row0: usize,
    ) -> R<()> {
        *qkv = rounded(qkv);
        C.qk_norm_rope(qkv, h, qs, ks, pe, row0)?;
        *qkv = rounded(qkv);
        Ok(())
    }
    fn attention(&self, qkv: &CpuTensor, h: usize, hd: usize) -> R<CpuTensor> {
        Ok(round(C.attention(&rounded(qkv), h, hd)?))
    }
    fn gate_residual(&self, x: &mut CpuTensor, g: &CpuTensor, y: &CpuTensor) -> R<()> {
        *x = rounded(x);
        C.gate_residual(x, &rounded(g), &rounded(y))?;
        *x = rounded(x);
        Ok(())
    }
    fn concat_rows(&self, a: &CpuTensor, b: &CpuTensor) -> R<CpuTensor> {
        Ok(round(C.concat_rows(a, b)?))
    }
    fn concat_cols(&self, a: &CpuTensor, b: &CpuTensor) -> R<CpuTensor> {
        Ok(round(C.concat_cols(a, b)?))
    }
    fn slice_rows(&self, x: &CpuTensor, b: usize, e: usize) -> R<CpuTensor> {
        Ok(round(C.slice_rows(x, b, e)?))
    }
    fn euler_step(&self, x: &mut CpuTensor, v: &CpuTensor, dt: &CpuTensor) -> R<()> {
        C.euler_step(x, &rounded(v), dt) // x and dt stay f32, v is the bf16 velocity
    }
    fn copy_into(&self, dst: &mut CpuTensor, src: &CpuTensor) -> R<()> {
        C.copy_into(dst, src)
    }
    fn write(&self, dst: &mut CpuTensor, data: &[f32]) -> R<()> {
        C.write(dst, data)
    }
    fn slice_cols(&self, x: &CpuTensor, b: usize, e: usize) -> R<CpuTensor> {
        Ok(round(C.slice_cols(x, b, e)?))
    }
}

impl EncoderBackend for Bf16Cpu {
    type Conv = CpuConv;

    fn load_conv(&self, key: &str, w: HostWeight, b: Option<HostWeight>) -> R<CpuConv> {
        C.load_conv(key, round_weight(w), b.map(round_weight))
    }
    fn conv_dims(&self, c: &CpuConv) -> (usize, usize, usize, usize) {
        C.conv_dims(c)
    }
    fn conv2d(
        &self,
        x: &CpuTensor,
        hw: (usize, usize),
        c: &CpuConv,
        stride: usize,
        pad: Pad,
    ) -> R<(CpuTensor, (usize, usize))> {
        let (y, hw) = C.conv2d(&rounded(x), hw, c, stride, pad)?;
        Ok((round(y), hw))
    }
    fn group_norm(
        &self,
        x: &CpuTensor,
        g: usize,
        w: &Vec<f32>,
        b: &Vec<f32>,
        eps: f32,
        silu: bool,
    ) -> R<CpuTensor> {
        Ok(round(C.group_norm(&rounded(x), g, w, b, eps, silu)?))
    }
    fn upsample_nearest2x(&self, x: &CpuTensor, hw: (usize, usize)) -> R<CpuTensor> {
        Ok(round(C.upsample_nearest2x(x, hw)?))
    }
    fn layer_norm(&self, x: &CpuTensor, w: &Vec<f32>, b: &Vec<f32>, eps: f32) -> R<CpuTensor> {
        Ok(round(C.layer_norm(&rounded(x), w, b, eps)?))
    }
    fn rms_norm(&self, x: &CpuTensor, w: &Vec<f32>, eps: f32) -> R<CpuTensor> {
        Ok(round(C.rms_norm(&rounded(x), w, eps)?))
    }
    fn attention_masked(
        &self,
        qkv: &CpuTensor,
        h: usize,
        hd: usize,
        scale: f32,
        bias: Option<&CpuTensor>,
        causal: bool,
    ) -> R<CpuTensor> {
        Ok(round(C.attention_masked(
            &rounded(qkv),
            h,
            hd,
            scale,
            bias,
            causal,
        )?))
    }
    fn gelu_tanh_gate(&self, x: &CpuTensor) -> R<CpuTensor> {
        Ok(round(C.gelu_tanh_gate(&rounded(x))?))
    }
    fn quick_gelu(&self, x: &CpuTensor) -> R<CpuTensor> {
        Ok(round(C.quick_gelu(&rounded(x))?))
    }
    fn affine(&self, x: &CpuTensor, mul: f32, add: f32) -> R<CpuTensor> {
        Ok(round(C.affine(&rounded(x), mul, add)?))
    }
}

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures"))
}

fn meta() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("pipeline/meta.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Stages and image of one committed case on `models`.
fn run_case<B: EncoderBackend>(
    p: &Pipeline,
    models: &Models<B>,
    case: &str,
) -> (BTreeMap<String, Vec<f32>>, RgbImage) {
    let m = meta();
    let c = &m["cases"][case];
    let dir = fixtures().join("pipeline");
    let (noise, _) = read_noise_file(&dir.join(format!("{case}_noise.safetensors"))).unwrap();
    let context = (case == "edit").then(|| RgbImage::open(&dir.join("context.png")).unwrap());
    let opts = case_options(c, NoiseSource::Tensor(noise));
    let mut stages = BTreeMap::new();
    let mut hook = |name: &str, v: &[f32]| {
        stages.insert(name.to_string(), v.to_vec());
    };
    let hook: StageHook<'_> = &mut hook;
    let out = p
        .run_with(
            models,
            context.as_ref(),
            c["prompt"].as_str().unwrap(),
            &opts,
            &mut |_| {},
            Some(hook),
        )
        .unwrap();
    (stages, out.image)
}

/// Worst pixel difference in levels and the fraction of values that differ.
fn pixel_diff(a: &RgbImage, b: &RgbImage) -> (i32, f64) {
    let d: Vec<i32> = a
        .pixels
        .iter()
        .zip(&b.pixels)
        .map(|(&x, &y)| (x as i32 - y as i32).abs())
        .collect();
    let off = d.iter().filter(|&&v| v > 0).count() as f64 / d.len() as f64;
    (*d.iter().max().unwrap(), off)
}

#[test]
fn bf16_pipeline_stays_within_the_model_tolerance_of_f32() {
    let paths = ModelPaths::discover(&fixtures().join("pipeline/tiny-kontext")).unwrap();
    let p = Pipeline::load(&paths, Device::Cpu).unwrap();
    let emu = Models::load(Bf16Cpu, &paths).unwrap();
    let kontext_engine::pipeline::Engine::Cpu(f32_models) = &p.engine else {
        unreachable!("loaded for the CPU")
    };
    let mut worst = 0f64;
    for case in ["edit", "t2i"] {
        let (ref_stages, ref_img) = run_case(&p, f32_models, case);
        let (stages, img) = run_case(&p, &emu, case);
        println!("{case}: bf16 emulation vs f32   {}", Comparison::header());
        for (name, want) in &ref_stages {
            let c = compare(&stages[name], want, tol::BF16_MODEL);
            println!("{case}: {name:<22} {}", c.row());
            worst = worst.max(c.rel_l2).max(c.rel_max);
            assert!(c.passes(), "{case}: {name}: {c:?}");
        }
        let (levels, off) = pixel_diff(&img, &ref_img);
        println!(
            "{case}: pixels: max {levels} levels off, {:.2} % of values differ",
            off * 100.0
        );
        assert!(levels <= tol::BF16_PIXEL_LEVELS, "{case}: {levels} levels");
    }
    println!(
        "worst relative error {worst:.3e}; tolerance {:e}",
        tol::BF16_MODEL
    );
}

#[test]
fn bf16_transformer_forward_stays_within_the_model_tolerance_of_f32() {
    for name in ["a", "b"] {
        let dir = fixtures().join("transformer").join(name);
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
        let axes: Vec<usize> = meta["axes_dim"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let set = TensorSet::open(&dir.join("forward.safetensors")).unwrap();
        let get = |k: &str| {
            let mut v = Vec::new();
            let info = set.info(k).unwrap();
            kontext_loader::dtype::decode_into(
                info.dtype,
                set.bytes(k).unwrap().as_slice(),
                1.0,
                &mut v,
            );
            v
        };
        let (img, img_ids, txt, txt_ids, y) = (
            get("img"),
            get("img_ids"),
            get("txt"),
            get("txt_ids"),
            get("pooled"),
        );
        let inp = FluxInputs {
            img: &img,
            img_ids: &img_ids,
            txt: &txt,
            txt_ids: &txt_ids,
            t: get("timestep")[0],
            guidance: get("guidance")[0],
            y: &y,
        };
        for file in ["bfl.safetensors", "bfl_fp8_scaled.safetensors"] {
            let t = load_transformer(
                Path::new(&dir.join(file)),
                &TransformerOptions {
                    axes_dim: Some(axes.clone()),
                },
            )
            .unwrap();
            let f32_model = Flux::from_transformer(CpuBackend, &t).unwrap();
            let emu = Flux::from_transformer(Bf16Cpu, &t).unwrap();
            let want = f32_model.forward(&inp, None).unwrap();
            let got = emu.forward(&inp, None).unwrap();
            let c = compare(&got, &want, tol::BF16_MODEL);
            println!("config {name} {file:<28} {}", c.row());
            assert!(c.passes(), "{name} {file}: {c:?}");
        }
    }
}

#[test]
fn one_op_in_bf16_stays_within_the_op_tolerances() {
    use kontext_engine::random::Rng;
    use kontext_engine::weights::quantise_e4m3;
    let mut rng = Rng::new(17);
    let (m, k, n) = (256, 3072, 1024);
    let x: Vec<f32> = rng.normals(m * k).into_iter().map(rb).collect();
    let w: Vec<f32> = rng
        .normals(n * k)
        .into_iter()
        .map(|v| v / (k as f32).sqrt())
        .collect();
    let bias: Vec<f32> = rng.normals(n).into_iter().map(|v| rb(0.05 * v)).collect();
    let host = |data: Vec<f32>| HostWeight {
        shape: vec![n, k],
        data,
    };
    let bias_w = HostWeight {
        shape: vec![n],
        data: bias,
    };
    let xt = C.upload(&x, m, k).unwrap();
    let mut worst = Vec::new();
    // (weights, what the CPU reference holds, tolerance): bf16 weights both sides see; f32
    // weights the GPU rounds; fp8 weights the GPU dequantises to bf16.
    let w_bf16: Vec<f32> = w.iter().map(|&v| rb(v)).collect();
    let (codes, scale) = quantise_e4m3(&w);
    let mut w_fp8 = Vec::new();
    kontext_loader::dtype::decode_into(kontext_loader::DType::F8E4M3, &codes, scale, &mut w_fp8);
    for (what, weights, t) in [
        ("bf16 weights", w_bf16, tol::BF16_OP),
        ("f32 weights", w.clone(), tol::BF16_OP_ROUNDED),
        ("fp8 weights", w_fp8, tol::BF16_OP_ROUNDED),
    ] {
        let reference = C
            .load_linear("w", host(weights.clone()), Some(bias_w.clone()))
            .unwrap();
        let emulated = Bf16Cpu
            .load_linear("w", host(weights), Some(bias_w.clone()))
            .unwrap();
        let want = C.linear(&xt, &reference).unwrap();
        let got = Bf16Cpu.linear(&xt, &emulated).unwrap();
        let c = compare(&got.data, &want.data, t);
        println!("linear [{m}, {k}]·[{n}, {k}]ᵀ, {what:<13} {}", c.row());
        worst.push((what, c.rel_l2, c.rel_max));
        assert!(c.passes(), "{what}: {c:?}");
    }
    println!("{worst:?}");
}

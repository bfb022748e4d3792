//! Shared by the op tests (`cpu_ops`, `encoder_ops`): random inputs, host weights, the f32
//! comparison that prints one table row per case, and the naive f64 formulas the ops are checked
//! against; and by the end-to-end tests against diffusers (`pipeline_e2e`, `multi_ref`,
//! `lora_e2e`): the fixtures, decoding a stages file, the image tolerance.

#![allow(dead_code)]

use kontext_engine::check::{compare, tol};
use kontext_engine::image::RgbImage;
use kontext_engine::random::Rng;
use kontext_engine::request::{EditOptions, NoiseSource, ResizePolicy};
use kontext_engine::{CpuTensor, HostWeight};
use kontext_loader::TensorSet;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `[rows, cols]` of N(0, 1) values, fresh from `rng`.
pub fn rand(rng: &mut Rng, rows: usize, cols: usize) -> CpuTensor {
    CpuTensor::new(rows, cols, rng.normals(rows * cols)).expect("shape")
}

/// A host weight of `shape`.
pub fn host(shape: &[usize], data: Vec<f32>) -> HostWeight {
    HostWeight {
        shape: shape.to_vec(),
        data,
    }
}

/// Compares at the f32 tolerance, printing the row, and fails with the op's name.
pub fn assert_close(op: &str, out: &[f32], reference: &[f64]) {
    let r: Vec<f32> = reference.iter().map(|&v| v as f32).collect();
    let c = compare(out, &r, tol::F32);
    println!("{op:<52} {}", c.row());
    assert!(c.passes(), "{op}: {c:?}");
}

/// `x·σ(x)`.
pub fn silu_ref(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

/// GELU, tanh form: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
pub fn gelu_tanh_ref(v: f64) -> f64 {
    0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh())
}

/// One row normalised by LayerNorm (biased variance), before the affine.
pub fn ln_ref(x: &[f32], eps: f64) -> Vec<f64> {
    let d = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / d;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d;
    x.iter()
        .map(|&v| (v as f64 - mean) / (var + eps).sqrt())
        .collect()
}

/// One row normalised by RMSNorm, before the scale.
pub fn rms_ref(x: &[f32], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / x.len() as f64;
    x.iter().map(|&v| v as f64 / (ms + eps).sqrt()).collect()
}

/// Multi-head attention on `qkv [L, W]` (q, k, v at columns `[0, D)`, `[D, 2D)`, `[2D, 3D)`):
/// `softmax(scale · q·kᵀ + bias_h)·v` per head over keys `j ≤ i` when `causal`, else all keys;
/// `bias [H·L, L]`. Returns `[L, D]`.
pub fn attention_ref(
    qkv: &CpuTensor,
    (nh, hd): (usize, usize),
    scale: f64,
    bias: Option<&CpuTensor>,
    causal: bool,
) -> Vec<f64> {
    let (l, w, d) = (qkv.rows, qkv.cols, nh * hd);
    let at = |t: usize, c: usize| qkv.data[t * w + c] as f64;
    let mut r = vec![0f64; l * d];
    for h in 0..nh {
        for i in 0..l {
            let keys = if causal { i + 1 } else { l };
            let s: Vec<f64> = (0..keys)
                .map(|j| {
                    let dot: f64 = (0..hd)
                        .map(|e| at(i, h * hd + e) * at(j, d + h * hd + e))
                        .sum();
                    scale * dot + bias.map_or(0.0, |b| b.data[(h * l + i) * l + j] as f64)
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for t in 0..hd {
                r[i * d + h * hd + t] = (0..keys)
                    .map(|j| e[j] / z * at(j, 2 * d + h * hd + t))
                    .sum();
            }
        }
    }
    r
}

/// Pixel tolerance against diffusers' PNG (`round(255·v)`): the f32 engine and f32 diffusers
/// differ by ~1e-6 relative in the decoder output, which can only flip a value sitting on a
/// rounding boundary, by one level. So: no pixel more than 1 level off, and at most 0.5 % of
/// values off at all (measured: 0.07 % edit, 0.02 % text-to-image).
pub const MAX_LEVELS: i32 = 1;
pub const MAX_FRACTION_OFF: f64 = 0.005;

pub fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures"))
}

/// Every tensor of a safetensors file, decoded to f32.
pub fn read_all(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let set = TensorSet::open(path).unwrap();
    set.keys()
        .map(|k| {
            let mut v = Vec::new();
            let info = set.info(k).unwrap();
            kontext_loader::dtype::decode_into(
                info.dtype,
                set.bytes(k).unwrap().as_slice(),
                1.0,
                &mut v,
            );
            (k.clone(), v)
        })
        .collect()
}

/// `got` against diffusers' `expected` within the pipeline test's image tolerance.
pub fn assert_pixels_match(what: &str, got: &RgbImage, expected: &RgbImage) {
    assert_eq!(
        (got.width, got.height),
        (expected.width, expected.height),
        "{what}: size"
    );
    let diffs: Vec<i32> = got
        .pixels
        .iter()
        .zip(&expected.pixels)
        .map(|(&a, &b)| (a as i32 - b as i32).abs())
        .collect();
    let worst = *diffs.iter().max().unwrap();
    let off = diffs.iter().filter(|&&d| d > 0).count() as f64 / diffs.len() as f64;
    println!(
        "{what}: pixels: max {worst} level(s) off, {:.3} % of values differ",
        off * 100.0
    );
    assert!(
        worst <= MAX_LEVELS && off <= MAX_FRACTION_OFF,
        "{what}: max {worst}, {off}"
    );
}

/// The options of one case of the pipeline fixture's `meta.json` (`cases.edit`, `cases.t2i`):
/// its steps, guidance and size, no resizing, with `noise`.
pub fn case_options(case: &serde_json::Value, noise: NoiseSource) -> EditOptions {
    let n = |k: &str| {
        case[k]
            .as_u64()
            .unwrap_or_else(|| panic!("meta.json: no {k}")) as usize
    };
    EditOptions {
        steps: n("num_inference_steps"),
        guidance: case["guidance_scale"].as_f64().unwrap() as f32,
        noise,
        width: Some(n("width")),
        height: Some(n("height")),
        resize: ResizePolicy::None,
    }
}

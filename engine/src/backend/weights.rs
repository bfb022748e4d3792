//! Where a model's weights come from: a loaded checkpoint, or an in-memory or generated set
//! (random weights for tests, checks and benchmarks, or weights a test has altered).
//!
//! A source gives each weight in f32 ([`WeightSource::weight`], fp8 dequantised) and, when it has
//! them, as stored ([`WeightSource::stored`]: the checkpoint's bytes with their dtype and fp8
//! scales). Linear layers are built from the stored form when there is one
//! ([`Backend::load_linear_stored`]): the CPU decodes it to the same f32 values, the CUDA backend
//! keeps fp8 weights fp8 on the GPU.

#![warn(missing_docs)]

use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::random::Rng;
use kontext_loader::dtype::decode_into;
use kontext_loader::{Component, DType, FluxConfig, Weight};
use rayon::prelude::*;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// A host tensor in f32 with its shape (`[out, in]` for a linear weight, `[n]` for a vector).
#[derive(Debug, Clone, PartialEq)]
pub struct HostWeight {
    /// Dimensions, e.g. `[out, in]`.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub data: Vec<f32>,
}

impl HostWeight {
    /// Checks that the weight has `expected` shape; `key` names it in the error.
    pub fn expect_shape(&self, key: &str, expected: &[usize]) -> Result<()> {
        if self.shape != expected || self.data.len() != expected.iter().product::<usize>() {
            return Err(EngineError::WeightShape {
                key: key.to_string(),
                expected: expected.to_vec(),
                found: self.shape.clone(),
            });
        }
        Ok(())
    }
}

/// One block of rows of a stored weight: its bytes in the weight's dtype and the scale that
/// multiplies them (1 unless fp8 with a scale).
#[derive(Debug, Clone)]
pub struct StoredPart<'a> {
    /// `rows · cols` little-endian elements.
    pub bytes: Cow<'a, [u8]>,
    /// Rows (first dimension) of the weight this part holds.
    pub rows: usize,
    /// Multiplies every decoded value (the fp8 `scale_weight` / `weight_scale`).
    pub scale: f32,
}

/// A weight as the checkpoint stores it: dtype, shape `[rows, …]` and consecutive row blocks, each
/// with its scale (diffusers' q, k and v of a scaled-fp8 file are three parts of one qkv).
#[derive(Debug, Clone)]
pub struct StoredWeight<'a> {
    /// Stored element type (bf16, f16, f32, fp8).
    pub dtype: DType,
    /// Dimensions; the first is the rows the parts add up to.
    pub shape: Vec<usize>,
    /// Row blocks in order.
    pub parts: Vec<StoredPart<'a>>,
}

impl<'a> StoredWeight<'a> {
    /// The loader's weight, borrowed (no copy).
    pub fn from_weight(w: &'a Weight) -> StoredWeight<'a> {
        StoredWeight {
            dtype: w.dtype,
            shape: w.shape.clone(),
            parts: w
                .parts
                .iter()
                .map(|p| StoredPart {
                    bytes: Cow::Borrowed(p.bytes.as_slice()),
                    rows: p.rows,
                    scale: p.scale.unwrap_or(1.0),
                })
                .collect(),
        }
    }

    /// First dimension (the linear layer's outputs).
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(0)
    }

    /// Product of the other dimensions (the linear layer's inputs; `Cin` of a 1×1 convolution).
    pub fn cols(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    /// Whether the weight is stored as float8.
    pub fn is_fp8(&self) -> bool {
        self.dtype.is_fp8()
    }

    /// The values in f32 (`stored · scale` per part, in row order): exactly
    /// `kontext_loader::Weight::to_f32`.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows() * self.cols());
        for p in &self.parts {
            decode_into(self.dtype, &p.bytes, p.scale, &mut out);
        }
        out
    }

    /// Checks shape `expected` (the config's) and that the parts hold exactly its bytes.
    pub fn expect_shape(&self, key: &str, expected: &[usize]) -> Result<()> {
        let row_bytes = self.cols() * self.dtype.size_bytes();
        let rows: usize = self.parts.iter().map(|p| p.rows).sum();
        let whole = self
            .parts
            .iter()
            .all(|p| p.bytes.len() == p.rows * row_bytes);
        if self.shape != expected || rows != self.rows() || !whole {
            return Err(EngineError::WeightShape {
                key: key.to_string(),
                expected: expected.to_vec(),
                found: self.shape.clone(),
            });
        }
        Ok(())
    }

    /// Weights stacked along their first dimension into one `[Σ rows, cols]` weight (the
    /// encoders' fused q, k, v; T5's `[wi_0; wi_1]`). `None` when their dtypes or widths differ
    /// (the caller then stacks f32 values instead).
    pub fn stack(ws: Vec<StoredWeight<'a>>) -> Option<StoredWeight<'a>> {
        let first = ws.first()?;
        let (dtype, cols) = (first.dtype, first.cols());
        if ws.iter().any(|w| w.dtype != dtype || w.cols() != cols) {
            return None;
        }
        let rows = ws.iter().map(StoredWeight::rows).sum();
        Some(StoredWeight {
            dtype,
            shape: vec![rows, cols],
            parts: ws.into_iter().flat_map(|w| w.parts).collect(),
        })
    }
}

/// Named weights under their canonical BFL keys (spec 1.12).
pub trait WeightSource {
    /// The weight `key` in f32.
    fn weight(&self, key: &str) -> Result<HostWeight>;
    /// Whether `key` exists (optional tensors: qkv bias, guidance embedder).
    fn has(&self, key: &str) -> bool;
    /// The weight `key` as stored, when the source has stored bytes (a checkpoint; generated fp8
    /// weights); `None` for sources of f32 values only, which are then read with
    /// [`WeightSource::weight`].
    fn stored(&self, key: &str) -> Result<Option<StoredWeight<'_>>> {
        let _ = key;
        Ok(None)
    }
}

impl WeightSource for Component {
    fn weight(&self, key: &str) -> Result<HostWeight> {
        let w = self.get(key)?;
        Ok(HostWeight {
            shape: w.shape.clone(),
            data: w.to_f32(),
        })
    }

    fn has(&self, key: &str) -> bool {
        self.weights.contains_key(key)
    }

    fn stored(&self, key: &str) -> Result<Option<StoredWeight<'_>>> {
        Ok(Some(StoredWeight::from_weight(self.get(key)?)))
    }
}

/// The weight `key` of `src`, checked to have `shape`.
pub(crate) fn weight(src: &dyn WeightSource, key: &str, shape: &[usize]) -> Result<HostWeight> {
    let w = src.weight(key)?;
    w.expect_shape(key, shape)?;
    Ok(w)
}

/// Loads `{name}.weight [out, inp]` and, when `bias`, `{name}.bias [out]`: from the stored form
/// when the source has it ([`Backend::load_linear_stored`]), else from f32 values.
pub(crate) fn load_linear<B: Backend>(
    b: &B,
    src: &dyn WeightSource,
    name: &str,
    out: usize,
    inp: usize,
    bias: bool,
) -> Result<B::Linear> {
    let key = format!("{name}.weight");
    let stored = src.stored(&key)?;
    let bias = if bias {
        Some(weight(src, &format!("{name}.bias"), &[out])?)
    } else {
        None
    };
    match stored {
        Some(w) => {
            w.expect_shape(&key, &[out, inp])?;
            b.load_linear_stored(name, w, bias)
        }
        None => b.load_linear(name, weight(src, &key, &[out, inp])?, bias),
    }
}

/// Linears `names` stacked along their outputs into one `[n·out, inp]` linear (the encoders'
/// fused q, k, v; T5's `[wi_0; wi_1]`): each `{name}.weight` of `shape` (`[out, inp]`, or
/// `[out, inp, 1, 1]` for a 1×1 convolution) and, when `bias`, each `{name}.bias [out]`.
pub(crate) fn load_stacked<B: Backend>(
    b: &B,
    src: &dyn WeightSource,
    names: &[String],
    shape: &[usize],
    bias: bool,
) -> Result<B::Linear> {
    let (out, inp) = (shape[0], shape[1..].iter().product::<usize>());
    let rows = names.len() * out;
    let mut bv = Vec::new();
    if bias {
        for n in names {
            bv.extend(weight(src, &format!("{n}.bias"), &[out])?.data);
        }
    }
    let bias = bias.then_some(HostWeight {
        shape: vec![rows],
        data: bv,
    });
    let mut stored = Vec::with_capacity(names.len());
    for n in names {
        let key = format!("{n}.weight");
        match src.stored(&key)? {
            Some(w) => {
                w.expect_shape(&key, shape)?;
                stored.push(w);
            }
            None => break,
        }
    }
    if stored.len() == names.len() {
        if let Some(w) = StoredWeight::stack(stored) {
            return b.load_linear_stored(&names.join("+"), w, bias);
        }
    }
    let mut w = Vec::with_capacity(rows * inp);
    for n in names {
        w.extend(weight(src, &format!("{n}.weight"), shape)?.data);
    }
    b.load_linear(
        &names.join("+"),
        HostWeight {
            shape: vec![rows, inp],
            data: w,
        },
        bias,
    )
}

/// Loads the vector `key [n]`.
pub(crate) fn load_vector<B: Backend>(
    b: &B,
    src: &dyn WeightSource,
    key: &str,
    n: usize,
) -> Result<B::Vector> {
    b.load_vector(key, weight(src, key, &[n])?)
}

/// In-memory weights, e.g. from [`random_weights`] or a test that alters a loaded model.
pub type WeightMap = BTreeMap<String, HostWeight>;

impl WeightSource for WeightMap {
    fn weight(&self, key: &str) -> Result<HostWeight> {
        self.get(key)
            .cloned()
            .ok_or_else(|| EngineError::MissingWeight {
                key: key.to_string(),
            })
    }

    fn has(&self, key: &str) -> bool {
        self.contains_key(key)
    }
}

/// Every tensor of `source` that `cfg` expects, copied into a [`WeightMap`] (f32).
pub fn to_weight_map(cfg: &FluxConfig, source: &dyn WeightSource) -> Result<WeightMap> {
    kontext_loader::transformer::expected_shapes(cfg)
        .into_iter()
        .map(|(key, _)| source.weight(&key).map(|w| (key, w)))
        .collect()
}

/// Random weights for `cfg`, like the fixtures' generator: 2-D weights N(0, 1/fan_in),
/// biases N(0, 0.05²), norm scales 1 + 0.2·N(0, 1). Deterministic in `seed`.
pub fn random_weights(cfg: &FluxConfig, seed: u64) -> WeightMap {
    let mut rng = Rng::new(seed);
    kontext_loader::transformer::expected_shapes(cfg)
        .into_iter()
        .map(|(key, shape)| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if shape.len() == 2 {
                let std = 1.0 / (shape[1] as f32).sqrt();
                (0..n).map(|_| std * rng.normal()).collect()
            } else if key.ends_with(".bias") {
                (0..n).map(|_| 0.05 * rng.normal()).collect()
            } else {
                (0..n).map(|_| 1.0 + 0.2 * rng.normal()).collect()
            };
            (key, HostWeight { shape, data })
        })
        .collect()
}

/// FNV-1a of a key: the per-tensor stream of [`LazyRandomWeights`].
fn key_hash(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Values per independently seeded chunk of a generated tensor (so chunks fill in parallel).
const RANDOM_CHUNK: usize = 1 << 16;

/// `n` values uniform in `[mean − a, mean + a]` with `a = std·√3` (standard deviation `std`),
/// deterministic in `seed`, filled in parallel.
pub fn uniform_values(n: usize, mean: f32, std: f32, seed: u64) -> Vec<f32> {
    let a = std * 3f32.sqrt();
    let mut v = vec![0f32; n];
    v.par_chunks_mut(RANDOM_CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut rng = Rng::new(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for x in chunk {
                *x = mean + a * (2.0 * rng.uniform() as f32 - 1.0);
            }
        });
    v
}

/// Random weights for `cfg` made on demand, one tensor at a time and in parallel: what the real
/// Kontext size needs (11.9 B parameters; [`random_weights`] would hold 48 GB of f32 and draw
/// them on one thread). Same spreads as [`random_weights`] (2-D weights std `1/√fan_in`, biases
/// 0.05, norm scales 1 ± 0.2) but uniform rather than normal: ~20× cheaper to draw, and the
/// checks and timings that use it do not depend on the distribution's shape. Deterministic in
/// the seed and the key.
pub struct LazyRandomWeights {
    shapes: BTreeMap<String, Vec<usize>>,
    seed: u64,
}

impl LazyRandomWeights {
    /// Every tensor `cfg` expects, generated when asked for.
    pub fn new(cfg: &FluxConfig, seed: u64) -> LazyRandomWeights {
        LazyRandomWeights {
            shapes: kontext_loader::transformer::expected_shapes(cfg)
                .into_iter()
                .collect(),
            seed,
        }
    }
}

impl WeightSource for LazyRandomWeights {
    fn weight(&self, key: &str) -> Result<HostWeight> {
        let shape = self
            .shapes
            .get(key)
            .ok_or_else(|| EngineError::MissingWeight {
                key: key.to_string(),
            })?;
        let n = shape.iter().product();
        let seed = self.seed ^ key_hash(key);
        let data = if shape.len() == 2 {
            uniform_values(n, 0.0, 1.0 / (shape[1] as f32).sqrt(), seed)
        } else if key.ends_with(".bias") {
            uniform_values(n, 0.0, 0.05, seed)
        } else {
            uniform_values(n, 1.0, 0.2, seed)
        };
        Ok(HostWeight {
            shape: shape.clone(),
            data,
        })
    }

    fn has(&self, key: &str) -> bool {
        self.shapes.contains_key(key)
    }
}

/// Largest finite float8 e4m3fn value.
pub const E4M3_MAX: f32 = 448.0;

/// `v` rounded to the nearest float8 e4m3fn code (ties to even), saturating at ±448; NaN gives
/// the NaN code. The inverse of `kontext_loader::dtype::E4M3_TO_F32` on every finite code.
pub fn f32_to_e4m3fn(v: f32) -> u8 {
    if v.is_nan() {
        return 0x7F;
    }
    let sign = if v.is_sign_negative() { 0x80u8 } else { 0 };
    let a = v.abs();
    if a < 2f32.powi(-6) {
        // Subnormals m·2^−9, m ∈ 0..=8 (m = 8 is the smallest normal, code 0x08).
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    let bits = a.to_bits();
    let exp = (bits >> 23) as i32 - 127;
    let mant = bits & 0x7F_FFFF;
    // Keep 3 mantissa bits, rounding the 20 dropped ones to nearest even.
    let (mut m, rest) = (mant >> 20, mant & 0xF_FFFF);
    if rest > 0x8_0000 || (rest == 0x8_0000 && m & 1 == 1) {
        m += 1;
    }
    let mut e = exp + 7;
    if m == 8 {
        m = 0;
        e += 1;
    }
    if e > 15 || (e == 15 && m == 7) {
        return sign | 0x7E; // 448: e4m3fn has no infinity
    }
    sign | ((e as u8) << 3) | m as u8
}

/// `w` as a scaled-fp8 checkpoint stores it: e4m3fn codes and the per-tensor scale
/// `max |w| / 448` (1 for an all-zero tensor), so that `code · scale` approximates `w`.
pub fn quantise_e4m3(w: &[f32]) -> (Vec<u8>, f32) {
    let max = w.par_iter().map(|v| v.abs()).reduce(|| 0.0, f32::max);
    let scale = if max > 0.0 && max.is_finite() {
        max / E4M3_MAX
    } else {
        1.0
    };
    let codes = w.par_iter().map(|&v| f32_to_e4m3fn(v / scale)).collect();
    (codes, scale)
}

/// A source whose 2-D (linear) weights are float8 e4m3fn with a per-tensor scale, as a
/// scaled-fp8 checkpoint stores them ([`quantise_e4m3`]); vectors and biases stay f32. Runs and
/// times the fp8 path without an fp8 checkpoint. [`WeightSource::weight`] gives the dequantised
/// values, so the f32 and the stored paths see the same weights.
pub struct Fp8Weights<S> {
    /// The f32 weights that get quantised.
    pub inner: S,
}

/// A quantised weight: shape, e4m3fn codes, scale.
type Quantised = (Vec<usize>, Vec<u8>, f32);

impl<S: WeightSource> Fp8Weights<S> {
    fn quantised(&self, key: &str) -> Result<Option<Quantised>> {
        let w = self.inner.weight(key)?;
        if w.shape.len() != 2 {
            return Ok(None);
        }
        let (codes, scale) = quantise_e4m3(&w.data);
        Ok(Some((w.shape, codes, scale)))
    }
}

impl<S: WeightSource> WeightSource for Fp8Weights<S> {
    fn weight(&self, key: &str) -> Result<HostWeight> {
        match self.quantised(key)? {
            Some((shape, codes, scale)) => {
                let mut data = Vec::with_capacity(codes.len());
                decode_into(DType::F8E4M3, &codes, scale, &mut data);
                Ok(HostWeight { shape, data })
            }
            None => self.inner.weight(key),
        }
    }

    fn has(&self, key: &str) -> bool {
        self.inner.has(key)
    }

    fn stored(&self, key: &str) -> Result<Option<StoredWeight<'_>>> {
        Ok(self
            .quantised(key)?
            .map(|(shape, codes, scale)| StoredWeight {
                dtype: DType::F8E4M3,
                parts: vec![StoredPart {
                    bytes: Cow::Owned(codes),
                    rows: shape[0],
                    scale,
                }],
                shape,
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kontext_loader::dtype::E4M3_TO_F32;

    fn e4m3(code: u8) -> f32 {
        f32::from_bits(E4M3_TO_F32[code as usize])
    }

    #[test]
    fn e4m3_encoding_inverts_the_loader_table_and_rounds_to_nearest_even() {
        for code in 0..=255u8 {
            if code & 0x7F == 0x7F {
                assert!(e4m3(code).is_nan());
                continue;
            }
            assert_eq!(f32_to_e4m3fn(e4m3(code)), code, "code {code:#04x}");
        }
        // Between each pair of neighbouring positive codes: below the midpoint rounds down, above
        // rounds up, the midpoint itself to the even code.
        for code in 0..0x7Eu8 {
            let (lo, hi) = (e4m3(code), e4m3(code + 1));
            let mid = 0.5 * (lo + hi);
            assert_eq!(f32_to_e4m3fn(mid - (hi - lo) * 0.01), code);
            assert_eq!(f32_to_e4m3fn(mid + (hi - lo) * 0.01), code + 1);
            let even = if code % 2 == 0 { code } else { code + 1 };
            assert_eq!(f32_to_e4m3fn(mid), even, "midpoint after {code:#04x}");
            assert_eq!(f32_to_e4m3fn(-mid), even | 0x80);
        }
        assert_eq!(f32_to_e4m3fn(1000.0), 0x7E);
        assert_eq!(f32_to_e4m3fn(-f32::INFINITY), 0xFE);
        assert_eq!(f32_to_e4m3fn(f32::NAN), 0x7F);
        assert_eq!(f32_to_e4m3fn(1e-9), 0x00);
    }

    #[test]
    fn quantised_weights_stay_within_half_a_step() {
        let w = uniform_values(10_000, 0.0, 0.7, 3);
        let (codes, scale) = quantise_e4m3(&w);
        let max = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_eq!(scale, max / 448.0);
        for (&v, &c) in w.iter().zip(&codes) {
            let back = e4m3(c) * scale;
            // Half a step of 3 mantissa bits (2^-4 relative), or half the subnormal spacing.
            let bound = (v.abs() * 2f32.powi(-4)).max(scale * 2f32.powi(-10)) * 1.0001;
            assert!((back - v).abs() <= bound, "{v} → {back}");
        }
        assert_eq!(quantise_e4m3(&[0.0; 4]).1, 1.0);
    }

    #[test]
    fn lazy_random_weights_have_the_configured_spread_and_are_reproducible() {
        let cfg = FluxConfig {
            hidden_size: 64,
            mlp_hidden: 256,
            num_heads: 2,
            head_dim: 32,
            axes_dim: vec![8, 12, 12],
            depth: 1,
            depth_single: 1,
            ..FluxConfig::kontext_dev()
        };
        let src = LazyRandomWeights::new(&cfg, 11);
        let w = src.weight("single_blocks.0.linear1.weight").unwrap();
        assert_eq!(w.shape, vec![3 * 64 + 256, 64]);
        let n = w.data.len() as f64;
        let mean = w.data.iter().map(|&v| v as f64).sum::<f64>() / n;
        let std = (w
            .data
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        assert!(
            mean.abs() < 0.01 && (std - 0.125).abs() < 0.005,
            "{mean} {std}"
        );
        assert_eq!(
            src.weight("single_blocks.0.linear1.weight").unwrap(),
            w,
            "deterministic"
        );
        assert_ne!(
            src.weight("single_blocks.0.linear2.weight").unwrap().data[..8],
            w.data[..8]
        );
        let scale = src.weight("single_blocks.0.norm.query_norm.scale").unwrap();
        assert!(scale
            .data
            .iter()
            .all(|&v| (v - 1.0).abs() <= 0.2 * 3f32.sqrt()));
        assert!(src.weight("no.such.weight").is_err());
    }

    #[test]
    fn fp8_source_stores_codes_and_gives_their_values_in_f32() {
        let cfg = FluxConfig {
            hidden_size: 64,
            mlp_hidden: 256,
            num_heads: 2,
            head_dim: 32,
            axes_dim: vec![8, 12, 12],
            depth: 1,
            depth_single: 1,
            ..FluxConfig::kontext_dev()
        };
        let src = Fp8Weights {
            inner: LazyRandomWeights::new(&cfg, 5),
        };
        let key = "double_blocks.0.img_attn.proj.weight";
        let stored = src
            .stored(key)
            .unwrap()
            .expect("2-D weights are stored as fp8");
        stored.expect_shape(key, &[64, 64]).unwrap();
        assert!(stored.is_fp8());
        assert_eq!(stored.to_f32(), src.weight(key).unwrap().data);
        // Vectors and biases are not quantised.
        assert!(src
            .stored("double_blocks.0.img_attn.proj.bias")
            .unwrap()
            .is_none());
        assert_eq!(
            src.weight("double_blocks.0.img_attn.proj.bias").unwrap(),
            src.inner
                .weight("double_blocks.0.img_attn.proj.bias")
                .unwrap()
        );
    }

    #[test]
    fn stacking_keeps_part_order_and_scales_and_refuses_mixed_types() {
        let part = |bytes: Vec<u8>, rows, scale| StoredPart {
            bytes: Cow::Owned(bytes),
            rows,
            scale,
        };
        let a = StoredWeight {
            dtype: DType::F8E4M3,
            shape: vec![1, 2, 1, 1],
            parts: vec![part(vec![0x38, 0x40], 1, 2.0)],
        };
        let b = StoredWeight {
            dtype: DType::F8E4M3,
            shape: vec![2, 2, 1, 1],
            parts: vec![
                part(vec![0x38, 0xB8], 1, 0.5),
                part(vec![0x30, 0x00], 1, 1.0),
            ],
        };
        let s = StoredWeight::stack(vec![a.clone(), b.clone()]).unwrap();
        assert_eq!(s.shape, vec![3, 2]);
        s.expect_shape("s", &[3, 2]).unwrap();
        assert_eq!(s.to_f32(), vec![2.0, 4.0, 0.5, -0.5, 0.5, 0.0]);
        let c = StoredWeight {
            dtype: DType::BF16,
            shape: vec![1, 2],
            parts: vec![part(vec![0, 0, 0, 0], 1, 1.0)],
        };
        assert!(StoredWeight::stack(vec![a.clone(), c]).is_none());
        // A part with the wrong byte count fails the shape check.
        let bad = StoredWeight {
            parts: vec![part(vec![0x38], 1, 1.0)],
            ..a
        };
        assert!(bad.expect_shape("bad", &[1, 2, 1, 1]).is_err());
    }
}

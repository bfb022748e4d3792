//! Where a model's weights come from: a loaded checkpoint (fp8 dequantised to f32) or an
//! in-memory map (random weights for tests and benchmarks, or weights a test has altered).

#![warn(missing_docs)]

use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::random::Rng;
use kontext_loader::{Component, FluxConfig};
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

/// Named weights under their canonical BFL keys (spec 1.12).
pub trait WeightSource {
    /// The weight `key` in f32.
    fn weight(&self, key: &str) -> Result<HostWeight>;
    /// Whether `key` exists (optional tensors: qkv bias, guidance embedder).
    fn has(&self, key: &str) -> bool;
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
}

/// The weight `key` of `src`, checked to have `shape`.
pub(crate) fn weight(src: &dyn WeightSource, key: &str, shape: &[usize]) -> Result<HostWeight> {
    let w = src.weight(key)?;
    w.expect_shape(key, shape)?;
    Ok(w)
}

/// Loads `{name}.weight [out, inp]` and, when `bias`, `{name}.bias [out]`.
pub(crate) fn load_linear<B: Backend>(
    b: &B,
    src: &dyn WeightSource,
    name: &str,
    out: usize,
    inp: usize,
    bias: bool,
) -> Result<B::Linear> {
    let w = weight(src, &format!("{name}.weight"), &[out, inp])?;
    let bias = if bias {
        Some(weight(src, &format!("{name}.bias"), &[out])?)
    } else {
        None
    };
    b.load_linear(name, w, bias)
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
    let (mut w, mut bv) = (Vec::new(), Vec::new());
    for n in names {
        w.extend(weight(src, &format!("{n}.weight"), shape)?.data);
        if bias {
            bv.extend(weight(src, &format!("{n}.bias"), &[out])?.data);
        }
    }
    let rows = names.len() * out;
    b.load_linear(
        &names.join("+"),
        HostWeight {
            shape: vec![rows, inp],
            data: w,
        },
        bias.then_some(HostWeight {
            shape: vec![rows],
            data: bv,
        }),
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

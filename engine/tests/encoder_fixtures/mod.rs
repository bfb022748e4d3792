//! Shared by the golden tests of the autoencoder and the text encoders: reading the fixtures of
//! `tests/fixtures/encoders/` (written by `tests/fixtures/generate_encoders.py`) and the stage
//! table that names the first stage out of tolerance.

#![allow(dead_code)]

use kontext_engine::check::{compare, Comparison};
use kontext_loader::dtype::{decode_into, DType};
use kontext_loader::TensorSet;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `tests/fixtures/encoders/<name>`.
pub fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/encoders")
        .join(name)
}

/// `meta.json` of a fixture folder.
pub fn meta(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("meta.json")).expect("meta.json");
    serde_json::from_str(&text).expect("meta.json is JSON")
}

/// One tensor of `forward.safetensors`: shape and values (f32; int64 ids converted).
pub struct Stage {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Every tensor of a fixture's `forward.safetensors`.
pub struct Forward(pub BTreeMap<String, Stage>);

impl Forward {
    pub fn load(dir: &Path) -> Forward {
        let set = TensorSet::open(&dir.join("forward.safetensors")).expect("forward.safetensors");
        let map = set
            .keys()
            .map(|k| {
                let info = set.info(k).expect("listed key");
                let bytes = set.bytes(k).expect("listed key");
                let data = if info.dtype == DType::I64 {
                    bytes
                        .as_slice()
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                        .collect()
                } else {
                    let mut v = Vec::new();
                    decode_into(info.dtype, bytes.as_slice(), 1.0, &mut v);
                    v
                };
                (
                    k.clone(),
                    Stage {
                        shape: info.shape.clone(),
                        data,
                    },
                )
            })
            .collect();
        Forward(map)
    }

    pub fn get(&self, key: &str) -> &Stage {
        self.0
            .get(key)
            .unwrap_or_else(|| panic!("forward.safetensors has no {key}"))
    }

    /// Token ids stored as int64.
    pub fn ids(&self, key: &str) -> Vec<u32> {
        self.get(key).data.iter().map(|&v| v as u32).collect()
    }
}

/// Prints the table of `ours` (in order) against `reference(stage)` at `tol` and panics at the
/// first stage out of tolerance, naming it: that is where the computation diverged.
pub fn assert_stages(
    title: &str,
    ours: &[(String, Vec<f32>)],
    reference: impl Fn(&str) -> Vec<f32>,
    tol: f64,
) -> Vec<(String, Comparison)> {
    println!("\n{title} (tolerance {tol:e} on rel_l2 and rel_max)");
    println!("{:<20}{}", "stage", Comparison::header());
    let mut rows = Vec::new();
    let mut first = None;
    for (name, v) in ours {
        let c = compare(v, &reference(name), tol);
        println!("{name:<20}{}", c.row());
        if !c.passes() && first.is_none() {
            first = Some((name.clone(), c));
        }
        rows.push((name.clone(), c));
    }
    if let Some((stage, c)) = first {
        panic!("{title}: first stage out of tolerance: {stage}: {c:?}");
    }
    rows
}

/// The first stage of `ours` out of tolerance, without printing (for the trap checks).
pub fn first_failure(
    ours: &[(String, Vec<f32>)],
    reference: impl Fn(&str) -> Vec<f32>,
    tol: f64,
) -> Option<(String, Comparison)> {
    ours.iter().find_map(|(name, v)| {
        let c = compare(v, &reference(name), tol);
        (!c.passes()).then(|| (name.clone(), c))
    })
}

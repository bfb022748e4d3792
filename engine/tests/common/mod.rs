//! What the end-to-end tests against diffusers share: the fixtures, decoding a stages file, and
//! the image tolerance of the pipeline test.

#![allow(dead_code)] // each test file uses its part

use kontext_engine::image::RgbImage;
use kontext_loader::TensorSet;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Diffusers' images against ours: at most one level off, on at most 0.5 % of the values (f32
/// on both sides; the rounding of the last step's pixels may land either side).
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

//! The Lanczos resize reproduces PIL's `Image.resize(size, LANCZOS)` exactly (fixtures from
//! tests/fixtures/generate_resize.py), so the context image the model sees is the reference's.

use kontext_engine::image::RgbImage;
use std::path::PathBuf;

#[test]
fn lanczos_matches_pil_exactly() {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures"));
    let src = RgbImage::open(&root.join("pipeline/context.png")).unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(root.join("resize")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_str().unwrap().to_string();
        let Some((w, h)) = name
            .strip_prefix("lanczos_")
            .and_then(|s| s.split_once('x'))
        else {
            continue;
        };
        let (w, h): (usize, usize) = (w.parse().unwrap(), h.parse().unwrap());
        let want = RgbImage::open(&path).unwrap();
        let got = src.resize_lanczos(w, h);
        let off = got
            .pixels
            .iter()
            .zip(&want.pixels)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            off,
            0,
            "{name}: {off} of {} values differ from PIL",
            want.pixels.len()
        );
        checked += 1;
    }
    assert_eq!(checked, 8);
}

#[test]
fn exif_orientation_is_applied() {
    let root = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/resize"
    ));
    let got = RgbImage::open(&root.join("exif_orientation6.jpg")).unwrap();
    let want = RgbImage::open(&root.join("exif_orientation6_upright.png")).unwrap();
    assert_eq!(
        (got.width, got.height),
        (want.width, want.height),
        "rotation not applied"
    );
    // Same decoder family, different implementations: a few levels apart at most on average;
    // an unrotated or mirrored picture is tens of levels off.
    let mean: f64 = got
        .pixels
        .iter()
        .zip(&want.pixels)
        .map(|(&a, &b)| (a as f64 - b as f64).abs())
        .sum::<f64>()
        / got.pixels.len() as f64;
    assert!(mean < 3.0, "mean difference {mean} levels");
}

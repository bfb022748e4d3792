//! Golden test: the f32 CPU autoencoder against diffusers' f32 `AutoencoderKL` (Flux layout, no
//! quant convs), stage by stage, from both file layouts (`ae.safetensors` names and the diffusers
//! `vae/` folder). Fixture: `tests/fixtures/encoders/vae` (ch 8, ch_mult [1, 2, 2], 2 res blocks,
//! 4 groups, z 16, a 24×32 image), written by `tests/fixtures/generate_encoders.py`.
//!
//! The encoder is fed the fixture image; the decoder is fed the fixture's (diffusers) latent, so
//! each half is judged on its own. Run with `--nocapture` for the tables.

mod encoder_fixtures;

use encoder_fixtures::{assert_stages, dir, first_failure, meta, Forward};
use kontext_engine::check::tol;
use kontext_engine::vae::{chw_to_hwc, AutoEncoder, Latent};
use kontext_engine::{CpuBackend, EngineError};
use kontext_loader::{load_vae, VaeConfig, VaeOptions};
use serde_json::Value;

/// Tolerance of every stage: the f32 engine against an f32 reference of the same math
/// (`check::tol::F32`, 1e-4 on rel_l2 and rel_max; see its comment).
const TOL: f64 = tol::F32;

fn options(m: &Value) -> VaeOptions {
    let c = &m["config_bfl"];
    VaeOptions {
        norm_groups: c["norm_groups"].as_u64().expect("groups") as usize,
        scale_factor: c["scale_factor"].as_f64().expect("scale") as f32,
        shift_factor: c["shift_factor"].as_f64().expect("shift") as f32,
    }
}

fn expected_config(m: &Value) -> VaeConfig {
    let c = &m["config_bfl"];
    let n = |k: &str| c[k].as_u64().expect("integer") as usize;
    let o = options(m);
    VaeConfig {
        in_channels: n("in_channels"),
        out_channels: n("out_ch"),
        ch: n("ch"),
        ch_mult: c["ch_mult"]
            .as_array()
            .expect("ch_mult")
            .iter()
            .map(|v| v.as_u64().expect("mult") as usize)
            .collect(),
        num_res_blocks: n("num_res_blocks"),
        z_channels: n("z_channels"),
        norm_groups: o.norm_groups,
        scale_factor: o.scale_factor,
        shift_factor: o.shift_factor,
    }
}

fn names(m: &Value, key: &str) -> Vec<String> {
    m[key]
        .as_array()
        .expect("stage list")
        .iter()
        .map(|v| v.as_str().expect("name").to_string())
        .collect()
}

/// A fixture stage `[1, C, H, W]` in the engine's `[H·W, C]` layout.
fn hwc(fwd: &Forward, name: &str) -> Vec<f32> {
    let s = fwd.get(name);
    let [1, c, h, w] = s.shape[..] else {
        panic!("{name}: shape {:?} is not [1, C, H, W]", s.shape)
    };
    chw_to_hwc(&s.data, c, h * w)
}

fn fixture_latent(fwd: &Forward) -> Latent {
    let s = fwd.get("latent");
    Latent {
        data: s.data.clone(),
        channels: s.shape[1],
        height: s.shape[2],
        width: s.shape[3],
    }
}

/// Encoder stages and the returned latent.
fn encode(ae: &AutoEncoder<CpuBackend>, fwd: &Forward) -> (Vec<(String, Vec<f32>)>, Latent) {
    let img = fwd.get("image");
    let (h, w) = (img.shape[2], img.shape[3]);
    let mut stages = Vec::new();
    let mut hook = |n: &str, v: &[f32]| stages.push((n.to_string(), v.to_vec()));
    let latent = ae.encode(&img.data, h, w, Some(&mut hook)).expect("encode");
    (stages, latent)
}

/// Decoder stages and the returned pixels `[3, H, W]`.
fn decode(ae: &AutoEncoder<CpuBackend>, fwd: &Forward) -> (Vec<(String, Vec<f32>)>, Vec<f32>) {
    let mut stages = Vec::new();
    let mut hook = |n: &str, v: &[f32]| stages.push((n.to_string(), v.to_vec()));
    let px = ae
        .decode(&fixture_latent(fwd), Some(&mut hook))
        .expect("decode");
    (stages, px)
}

#[test]
fn autoencoder_matches_diffusers_stage_by_stage_in_both_layouts() {
    let d = dir("vae");
    let m = meta(&d);
    let fwd = Forward::load(&d);
    let want = expected_config(&m);
    for layout in ["ae.safetensors", "diffusers"] {
        let vae = load_vae(&d.join(layout), &options(&m)).expect("load_vae");
        assert_eq!(vae.config, want, "{layout}: config");
        let ae = AutoEncoder::from_vae(CpuBackend, &vae).expect("autoencoder builds");

        let (stages, latent) = encode(&ae, &fwd);
        let order: Vec<&String> = stages.iter().map(|s| &s.0).collect();
        assert_eq!(
            order,
            names(&m, "encoder_stages").iter().collect::<Vec<_>>()
        );
        assert_stages(
            &format!("VAE encoder ({layout})"),
            &stages,
            |n| hwc(&fwd, n),
            TOL,
        );
        let lat = fwd.get("latent");
        assert_eq!(
            (latent.channels, latent.height, latent.width),
            (lat.shape[1], lat.shape[2], lat.shape[3])
        );
        let c = kontext_engine::check::compare(&latent.data, &lat.data, TOL);
        assert!(c.passes(), "returned latent [z, h, w]: {c:?}");

        let (stages, px) = decode(&ae, &fwd);
        let order: Vec<&String> = stages.iter().map(|s| &s.0).collect();
        assert_eq!(
            order,
            names(&m, "decoder_stages").iter().collect::<Vec<_>>()
        );
        assert_stages(
            &format!("VAE decoder ({layout})"),
            &stages,
            |n| hwc(&fwd, n),
            TOL,
        );
        let c = kontext_engine::check::compare(&px, &fwd.get("pixels").data, TOL);
        assert!(c.passes(), "returned pixels [3, H, W]: {c:?}");
    }
}

#[test]
fn decoder_output_has_a_real_dynamic_range() {
    // The check can only see errors if the random decoder is neither saturated nor flat.
    let fwd = Forward::load(&dir("vae"));
    let px = &fwd.get("pixels").data;
    let n = px.len() as f64;
    let mean = px.iter().map(|&v| v as f64).sum::<f64>() / n;
    let std = (px.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    let saturated = px.iter().filter(|v| v.abs() >= 1.0).count() as f64 / n;
    println!("pixels: std {std:.3}, |x| ≥ 1: {:.1} %", 100.0 * saturated);
    assert!(
        std > 0.3 && saturated < 0.25,
        "std {std}, saturated {saturated}"
    );
}

#[test]
fn spec_traps_leave_the_tolerance() {
    // Each mistake must be caught by the stage comparison, at the stage where it happens.
    let d = dir("vae");
    let m = meta(&d);
    let fwd = Forward::load(&d);
    let vae = load_vae(&d.join("ae.safetensors"), &options(&m)).expect("load_vae");
    let traps: [(&str, VaeConfig, &str); 2] = [
        (
            "GroupNorm with twice the groups",
            VaeConfig {
                norm_groups: 2 * vae.config.norm_groups,
                ..vae.config.clone()
            },
            "encoder.down.0",
        ),
        (
            "latent without scale and shift",
            VaeConfig {
                scale_factor: 1.0,
                shift_factor: 0.0,
                ..vae.config.clone()
            },
            "latent",
        ),
    ];
    for (what, cfg, stage) in traps {
        let ae = AutoEncoder::load(CpuBackend, cfg, &vae.weights).expect("builds");
        let (stages, _) = encode(&ae, &fwd);
        let fail = first_failure(&stages, |n| hwc(&fwd, n), TOL);
        let (name, c) = fail.unwrap_or_else(|| panic!("{what}: not caught"));
        println!(
            "trap {what:<34} caught at {name:<16} rel_l2 {:.2e}",
            c.rel_l2
        );
        assert_eq!(name, stage, "{what}");
        assert!(c.rel_l2 > 100.0 * TOL, "{what}: {c:?}");
    }
    // The decoder must unscale: decoding the scaled latent as if unscaled fails at conv_in.
    let ae = AutoEncoder::load(
        CpuBackend,
        VaeConfig {
            scale_factor: 1.0,
            shift_factor: 0.0,
            ..vae.config.clone()
        },
        &vae.weights,
    )
    .expect("builds");
    let (stages, _) = decode(&ae, &fwd);
    let (name, c) = first_failure(&stages, |n| hwc(&fwd, n), TOL).expect("caught");
    println!(
        "trap {:<34} caught at {name:<16} rel_l2 {:.2e}",
        "decode without unscaling", c.rel_l2
    );
    assert_eq!(name, "decoder.conv_in");
}

#[test]
fn wrong_inputs_are_errors() {
    let d = dir("vae");
    let m = meta(&d);
    let vae = load_vae(&d.join("ae.safetensors"), &options(&m)).expect("load_vae");
    let ae = AutoEncoder::from_vae(CpuBackend, &vae).expect("builds");
    assert!(ae.encode(&[0.0; 10], 2, 2, None).is_err());
    assert!(ae.encode(&[], 0, 0, None).is_err());
    let bad = Latent {
        data: vec![0.0; 16 * 4],
        channels: 4,
        height: 4,
        width: 4,
    };
    assert!(ae.decode(&bad, None).is_err());
    // A config the weights do not fit names the tensor.
    let cfg = VaeConfig {
        ch: 16,
        ..vae.config.clone()
    };
    let err = AutoEncoder::load(CpuBackend, cfg, &vae.weights)
        .err()
        .expect("mismatch");
    assert!(matches!(err, EngineError::WeightShape { .. }), "{err}");
    let cfg = VaeConfig {
        norm_groups: 3,
        ..vae.config.clone()
    };
    assert!(AutoEncoder::load(CpuBackend, cfg, &vae.weights).is_err());
}

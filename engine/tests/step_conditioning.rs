//! The conditioning of a whole schedule computed before the loop (`Flux::conditioning`: `vec` and
//! every modulation as one GEMM over `[steps, D]`) against the per-step path (`Flux::forward`:
//! the conditioning of one t, a `[1, D]` GEMV per layer), on the two fixture models
//! (`tests/fixtures/transformer/{a,b}`) at several timesteps: every conditioning tensor, then
//! every stage of the forward.
//!
//! Run with `--nocapture` to see the per-t error table.

use kontext_engine::check::{compare, tol, Comparison};
use kontext_engine::{CpuBackend, CpuTensor, Flux, FluxInputs, StepConditioning};
use kontext_loader::dtype::decode_into;
use kontext_loader::{load_transformer, TensorSet, TransformerOptions};
use std::collections::BTreeMap;
use std::path::Path;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/transformer");

/// The BFL-file model of fixture `name` and the tensors of its `forward.safetensors`.
fn fixture(name: &str) -> (Flux<CpuBackend>, BTreeMap<String, Vec<f32>>) {
    let dir = Path::new(ROOT).join(name);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    let axes_dim = meta["axes_dim"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let opts = TransformerOptions {
        axes_dim: Some(axes_dim),
    };
    let t = load_transformer(&dir.join("bfl.safetensors"), &opts).unwrap();
    let flux = Flux::from_transformer(CpuBackend, &t).unwrap();
    let set = TensorSet::open(&dir.join("forward.safetensors")).unwrap();
    let tensors = set
        .keys()
        .map(|k| {
            let mut v = Vec::new();
            let info = set.info(k).unwrap();
            decode_into(info.dtype, set.bytes(k).unwrap().as_slice(), 1.0, &mut v);
            (k.clone(), v)
        })
        .collect();
    (flux, tensors)
}

/// Every tensor of a step's conditioning, named after the layer it comes from.
fn flatten(c: &StepConditioning<CpuTensor>) -> Vec<(String, &[f32])> {
    let mut out = vec![("vec".to_string(), c.vec.data.as_slice())];
    for (i, m) in c.double_blocks.iter().enumerate() {
        for (stream, m) in [
            ("img_mod1", &m.img_mod1),
            ("img_mod2", &m.img_mod2),
            ("txt_mod1", &m.txt_mod1),
            ("txt_mod2", &m.txt_mod2),
        ] {
            for (chunk, t) in [("shift", &m.shift), ("scale", &m.scale), ("gate", &m.gate)] {
                out.push((format!("double_blocks.{i}.{stream}.{chunk}"), &t.data[..]));
            }
        }
    }
    for (i, m) in c.single_blocks.iter().enumerate() {
        for (chunk, t) in [("shift", &m.shift), ("scale", &m.scale), ("gate", &m.gate)] {
            out.push((format!("single_blocks.{i}.{chunk}"), &t.data[..]));
        }
    }
    out.push(("final_layer.shift".into(), &c.final_layer.shift.data[..]));
    out.push(("final_layer.scale".into(), &c.final_layer.scale.data[..]));
    out
}

/// Every stage the hook reports for one forward.
fn stages(run: impl FnOnce(&mut dyn FnMut(&str, &[f32]))) -> Vec<(String, Vec<f32>)> {
    let mut stages = Vec::new();
    run(&mut |name: &str, v: &[f32]| stages.push((name.to_string(), v.to_vec())));
    stages
}

/// `pairs` compared at `tol::F32` (the f32 tolerance: the two paths run the same math and may
/// differ only in the order of a GEMM's sums, when sgemm blocks `[S, D]` rows differently from
/// one row; that is ~√K·2^-24 ≈ 1e-6 relative per op). Asserts every pair passes; returns the
/// worst (by rel_max) with its name, and how many of the pairs are bit-identical.
fn worst<'a>(
    what: &str,
    pairs: impl Iterator<Item = (String, &'a [f32], &'a [f32])>,
) -> (String, Comparison, usize, usize) {
    let mut worst = (String::new(), compare(&[], &[], tol::F32));
    let (mut identical, mut n) = (0, 0);
    for (name, got, want) in pairs {
        let c = compare(got, want, tol::F32);
        assert!(c.passes(), "{what}: {name}: {c:?}");
        n += 1;
        identical += usize::from(got == want);
        if c.rel_max > worst.1.rel_max || worst.0.is_empty() {
            worst = (name, c);
        }
    }
    (worst.0, worst.1, identical, n)
}

#[test]
fn precomputed_conditioning_matches_the_per_step_forward() {
    println!(
        "\n{:<7}{:>7}  {:<10}{:<26}{}  bit-identical",
        "config",
        "t",
        "compared",
        "worst",
        Comparison::header()
    );
    for name in ["a", "b"] {
        let (flux, fx) = fixture(name);
        let inp = FluxInputs {
            img: &fx["img"],
            img_ids: &fx["img_ids"],
            txt: &fx["txt"],
            txt_ids: &fx["txt_ids"],
            t: fx["timestep"][0],
            guidance: fx["guidance"][0],
            y: &fx["pooled"],
        };
        // A 28-step-like spread, the fixture's own t, both ends of the schedule.
        let ts = [1.0, 0.9884, inp.t, 0.7031, 0.3448, 0.1047];
        let all = flux.conditioning(&ts, inp.guidance, inp.y).unwrap();
        assert_eq!(all.len(), ts.len());
        for (&t, cond) in ts.iter().zip(&all) {
            let inp = FluxInputs { t, ..inp };

            // The conditioning tensors: batched over the schedule vs computed for t alone.
            let one = flux.conditioning(&[t], inp.guidance, inp.y).unwrap();
            let (ours, single) = (flatten(cond), flatten(&one[0]));
            assert_eq!(ours.len(), single.len());
            let (n, c, same, all) = worst(
                &format!("{name}, t = {t}, conditioning"),
                ours.into_iter()
                    .zip(single)
                    .map(|((n, got), (_, want))| (n, got, want)),
            );
            println!(
                "{name:<7}{t:>7.4}  {:<10}{n:<26}{}  {same}/{all} tensors",
                "cond",
                c.row()
            );

            // The forward: precomputed conditioning vs `Flux::forward` (per-step), every stage.
            let got = stages(|h| {
                flux.forward_conditioned(&inp, cond, Some(h)).unwrap();
            });
            let want = stages(|h| {
                flux.forward(&inp, Some(h)).unwrap();
            });
            let names: Vec<_> = got.iter().map(|s| &s.0).collect();
            assert_eq!(names, want.iter().map(|s| &s.0).collect::<Vec<_>>());
            let (n, c, same, all) = worst(
                &format!("{name}, t = {t}, forward"),
                got.iter()
                    .zip(&want)
                    .map(|(g, w)| (g.0.clone(), &g.1[..], &w.1[..])),
            );
            println!(
                "{name:<7}{t:>7.4}  {:<10}{n:<26}{}  {same}/{all} stages",
                "forward",
                c.row()
            );
        }
    }
}

#[test]
fn conditioning_must_fit_the_model() {
    let (flux, fx) = fixture("a");
    // A pooled vector of the wrong width is refused with its name.
    let Err(err) = flux.conditioning(&[0.5], 2.5, &fx["pooled"][1..]) else {
        panic!("a short y is refused");
    };
    let err = err.to_string();
    assert!(err.starts_with("input y:"), "{err}");
    // No timesteps, no conditioning.
    assert!(flux
        .conditioning(&[], 2.5, &fx["pooled"])
        .unwrap()
        .is_empty());
    // The conditioning of another model (one block short) is refused, not misread.
    let mut cond = flux
        .conditioning(&[0.5], 2.5, &fx["pooled"])
        .unwrap()
        .remove(0);
    cond.single_blocks.pop();
    let inp = FluxInputs {
        img: &fx["img"],
        img_ids: &fx["img_ids"],
        txt: &fx["txt"],
        txt_ids: &fx["txt_ids"],
        t: 0.5,
        guidance: 2.5,
        y: &fx["pooled"],
    };
    let Err(err) = flux.forward_conditioned(&inp, &cond, None) else {
        panic!("a conditioning one block short is refused");
    };
    let err = err.to_string();
    assert!(err.contains("conditioning for"), "{err}");
}

//! Golden test: the f32 CPU transformer against diffusers' f32 forward, stage by stage, for the
//! two tiny fixture models (`tests/fixtures/transformer/{a,b}`, written by
//! `tests/fixtures/generate.py`), loaded from each of the four file layouts. Then the spec-8
//! traps: each wrong variant is run and shown to leave the tolerance by far, so the golden
//! comparison would catch it.
//!
//! Run with `--nocapture` to see the per-stage error tables.

use kontext_engine::check::{compare, tol, Comparison};
use kontext_engine::sampling::{image_ids, txt_ids};
use kontext_engine::weights::to_weight_map;
use kontext_engine::{CpuBackend, Flux, FluxInputs, HostWeight, WeightMap};
use kontext_loader::dtype::decode_into;
use kontext_loader::{load_transformer, FluxConfig, TensorSet, TransformerOptions};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");
const CONFIGS: [&str; 2] = ["a", "b"];

/// One fixture directory: meta.json and every tensor of forward.safetensors (f32).
struct Fixture {
    name: &'static str,
    dir: PathBuf,
    meta: serde_json::Value,
    tensors: BTreeMap<String, Vec<f32>>,
}

impl Fixture {
    fn load(name: &'static str) -> Fixture {
        let dir = Path::new(ROOT).join("transformer").join(name);
        let text = std::fs::read_to_string(dir.join("meta.json")).expect("meta.json");
        let meta: serde_json::Value = serde_json::from_str(&text).expect("meta.json is JSON");
        let set = TensorSet::open(&dir.join("forward.safetensors")).expect("forward.safetensors");
        let tensors = set
            .keys()
            .map(|k| {
                let info = set.info(k).expect("listed key");
                let bytes = set.bytes(k).expect("listed key");
                let mut v = Vec::new();
                decode_into(info.dtype, bytes.as_slice(), 1.0, &mut v);
                (k.clone(), v)
            })
            .collect();
        Fixture {
            name,
            dir,
            meta,
            tensors,
        }
    }

    fn n(&self, key: &str) -> usize {
        self.meta[key].as_u64().expect("integer in meta.json") as usize
    }

    fn axes_dim(&self) -> Vec<usize> {
        self.meta["axes_dim"]
            .as_array()
            .expect("axes_dim")
            .iter()
            .map(|v| v.as_u64().expect("axis") as usize)
            .collect()
    }

    fn get(&self, key: &str) -> &[f32] {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("{}: forward.safetensors has no {key}", self.name))
    }

    fn stages(&self) -> Vec<String> {
        self.meta["stages"]
            .as_array()
            .expect("stages")
            .iter()
            .map(|v| v.as_str().expect("stage name").to_string())
            .collect()
    }

    fn inputs(&self) -> FluxInputs<'_> {
        FluxInputs {
            img: self.get("img"),
            img_ids: self.get("img_ids"),
            txt: self.get("txt"),
            txt_ids: self.get("txt_ids"),
            t: self.get("timestep")[0],
            guidance: self.get("guidance")[0],
            y: self.get("pooled"),
        }
    }

    fn opts(&self) -> TransformerOptions {
        TransformerOptions {
            axes_dim: Some(self.axes_dim()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Layout {
    Diffusers,
    Bfl,
    Fp8Scaled,
    Fp8Plain,
}

impl Layout {
    fn path(self, fx: &Fixture) -> PathBuf {
        fx.dir.join(match self {
            Layout::Diffusers => "diffusers",
            Layout::Bfl => "bfl.safetensors",
            Layout::Fp8Scaled => "bfl_fp8_scaled.safetensors",
            Layout::Fp8Plain => "bfl_fp8.safetensors",
        })
    }
}

/// The config and f32 weights of `fx` in `layout` (fp8 dequantised by the loader).
fn open(fx: &Fixture, layout: Layout) -> (FluxConfig, WeightMap) {
    let path = layout.path(fx);
    let t = load_transformer(&path, &fx.opts())
        .unwrap_or_else(|e| panic!("{}: {layout:?}: {e}", fx.name));
    let c = &t.config;
    let got = [
        c.hidden_size,
        c.num_heads,
        c.head_dim,
        c.depth,
        c.depth_single,
        c.in_channels,
        c.context_in_dim,
        c.vec_in_dim,
        c.mlp_hidden,
    ];
    let want = [
        "hidden_size",
        "num_heads",
        "head_dim",
        "depth",
        "depth_single",
        "in_channels",
        "context_in_dim",
        "vec_in_dim",
        "mlp_hidden",
    ]
    .map(|k| fx.n(k));
    assert_eq!(
        got, want,
        "{}: {layout:?}: config differs from meta.json",
        fx.name
    );
    assert_eq!(c.axes_dim, fx.axes_dim());
    let map = to_weight_map(c, &t.weights).expect("all weights");
    (t.config.clone(), map)
}

fn model(cfg: &FluxConfig, w: &WeightMap) -> Flux<CpuBackend> {
    Flux::load(CpuBackend, cfg.clone(), w).expect("model builds")
}

/// Every stage of one forward, in order.
fn run(m: &Flux<CpuBackend>, inp: &FluxInputs<'_>) -> Vec<(String, Vec<f32>)> {
    let mut stages = Vec::new();
    let mut hook = |name: &str, v: &[f32]| stages.push((name.to_string(), v.to_vec()));
    let out = m.forward(inp, Some(&mut hook)).expect("forward");
    assert_eq!(stages.last().map(|s| &s.1), Some(&out));
    stages
}

/// Prints a stage table of `ours` against `reference(stage)` at `tol`; returns the first stage
/// that leaves it (the stage where the computation diverged), or `None`.
fn table(
    title: &str,
    ours: &[(String, Vec<f32>)],
    reference: impl Fn(&str) -> Vec<f32>,
    tol: f64,
) -> Option<(String, Comparison)> {
    println!("\n{title} (tolerance {tol:e} on rel_l2 and rel_max)");
    println!("{:<24}{}", "stage", Comparison::header());
    let mut first = None;
    for (name, v) in ours {
        let c = compare(v, &reference(name), tol);
        println!("{name:<24}{}", c.row());
        if !c.passes() && first.is_none() {
            first = Some((name.clone(), c));
        }
    }
    first
}

fn assert_matches(title: &str, ours: &[(String, Vec<f32>)], fx: &Fixture, tol: f64) {
    let names: Vec<&String> = ours.iter().map(|s| &s.0).collect();
    assert_eq!(names, fx.stages().iter().collect::<Vec<_>>(), "stage list");
    if let Some((stage, c)) = table(title, ours, |s| fx.get(s).to_vec(), tol) {
        panic!("{title}: first stage out of tolerance: {stage}: {c:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// golden comparisons, one test per file layout
// ---------------------------------------------------------------------------------------------

#[test]
fn diffusers_folder_matches_diffusers_forward() {
    for name in CONFIGS {
        let fx = Fixture::load(name);
        let (cfg, w) = open(&fx, Layout::Diffusers);
        let title = format!("config {name}, diffusers folder vs diffusers");
        assert_matches(&title, &run(&model(&cfg, &w), &fx.inputs()), &fx, tol::F32);
    }
}

#[test]
fn bfl_file_matches_diffusers_forward() {
    for name in CONFIGS {
        let fx = Fixture::load(name);
        let (cfg, w) = open(&fx, Layout::Bfl);
        let title = format!("config {name}, BFL file vs diffusers");
        assert_matches(&title, &run(&model(&cfg, &w), &fx.inputs()), &fx, tol::F32);
    }
}

/// Nearest e4m3fn value of `x` with ties to the even code, by search over torch's own decode
/// table (`fp8_e4m3fn_table.bin`): independent of the loader's decoder. |x| ≥ 480 gives NaN,
/// like PyTorch's cast (spec 6.1).
fn round_e4m3(x: f32, table: &[f32]) -> f32 {
    if x.is_nan() || x.abs() >= 480.0 {
        return f32::NAN;
    }
    let mut best = (f32::INFINITY, 0usize);
    for (code, &v) in table.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        let d = (v - x).abs();
        // ties: prefer the even code (mantissa LSB 0); equal values (±0) keep the first
        if d < best.0 || (d == best.0 && v != table[best.1] && code % 2 == 0) {
            best = (d, code);
        }
    }
    table[best.1]
}

fn e4m3_table() -> Vec<f32> {
    let bytes = std::fs::read(Path::new(ROOT).join("fp8_e4m3fn_table.bin")).expect("fp8 table");
    let mut v = Vec::new();
    decode_into(kontext_loader::DType::F32, &bytes, 1.0, &mut v);
    assert_eq!(v.len(), 256);
    v
}

/// The f32 weights as the fixture generator quantised them, recomputed here from `bfl.safetensors`
/// (f32): 2-D weights through e4m3fn (scaled: `W/s` with `s = amax/448`, dequantised `q·s`; plain:
/// a plain cast), 1-D tensors through bf16.
fn quantise_like_generator(f32_weights: &WeightMap, scaled: bool) -> WeightMap {
    let table = e4m3_table();
    f32_weights
        .iter()
        .map(|(k, w)| {
            let data = if w.shape.len() == 2 {
                let s = if scaled {
                    w.data.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 448.0
                } else {
                    1.0
                };
                w.data
                    .iter()
                    .map(|&v| {
                        if scaled {
                            round_e4m3(v / s, &table) * s
                        } else {
                            round_e4m3(v, &table)
                        }
                    })
                    .collect()
            } else {
                w.data
                    .iter()
                    .map(|&v| half::bf16::from_f32(v).to_f32())
                    .collect()
            };
            (
                k.clone(),
                HostWeight {
                    shape: w.shape.clone(),
                    data,
                },
            )
        })
        .collect()
}

/// fp8 file: (1) the dequantised weights equal an independent quantisation of the f32 weights,
/// and the forward matches an f32 forward of those weights at f32 tolerance (the fp8 path is
/// exact); (2) against diffusers' forward of the unquantised weights the error stays within the
/// quantisation tolerance (the quantisation is sane).
fn check_fp8(layout: Layout) {
    for name in CONFIGS {
        let fx = Fixture::load(name);
        let (cfg, w8) = open(&fx, layout);
        let (_, w32) = open(&fx, Layout::Bfl);
        let emulated = quantise_like_generator(&w32, layout == Layout::Fp8Scaled);
        let mut differing = 0;
        for (k, w) in &w8 {
            let e = &emulated[k];
            assert_eq!(w.shape, e.shape, "{k}");
            differing += w.data.iter().zip(&e.data).filter(|(a, b)| a != b).count();
        }
        println!("\nconfig {name}, {layout:?}: {differing} weights differ from the independent quantisation");
        assert_eq!(
            differing, 0,
            "loader's dequantised weights differ from the emulation"
        );

        let ours = run(&model(&cfg, &w8), &fx.inputs());
        let exact = run(&model(&cfg, &emulated), &fx.inputs());
        let title = format!("config {name}, {layout:?} vs f32 forward of the dequantised weights");
        let lookup = |s: &str| {
            exact
                .iter()
                .find(|e| e.0 == s)
                .map(|e| e.1.clone())
                .unwrap_or_default()
        };
        if let Some((stage, c)) = table(&title, &ours, lookup, tol::F32) {
            panic!("{title}: first stage out of tolerance: {stage}: {c:?}");
        }
        let title = format!("config {name}, {layout:?} vs diffusers (f32 weights)");
        assert_matches(&title, &ours, &fx, tol::FP8_WEIGHTS);
    }
}

#[test]
fn fp8_scaled_file_matches_within_quantisation_error() {
    check_fp8(Layout::Fp8Scaled);
}

#[test]
fn fp8_plain_file_matches_within_quantisation_error() {
    check_fp8(Layout::Fp8Plain);
}

#[test]
fn rope_table_matches_diffusers() {
    for name in CONFIGS {
        let fx = Fixture::load(name);
        let (cfg, w) = open(&fx, Layout::Bfl);
        let m = model(&cfg, &w);
        let ids = [fx.get("txt_ids"), fx.get("img_ids")].concat();
        let pe = m.pe_embedder.forward(&ids).expect("pe"); // [L, Dh]: (cos, sin) pairs
                                                           // diffusers stores each pair's cos (sin) twice: columns 2j and 2j+1
        let (cos, sin) = (fx.get("rope_cos"), fx.get("rope_sin"));
        let ours_cos: Vec<f32> = pe.chunks(2).flat_map(|p| [p[0], p[0]]).collect();
        let ours_sin: Vec<f32> = pe.chunks(2).flat_map(|p| [p[1], p[1]]).collect();
        // f32 angles (BFL) vs f64 angles (diffusers): ≤ a few 1e-7 for ids ≤ 4
        let c = compare(&ours_cos, cos, tol::F32);
        let s = compare(&ours_sin, sin, tol::F32);
        println!(
            "config {name}: rope cos {}\nconfig {name}: rope sin {}",
            c.row(),
            s.row()
        );
        assert!(c.passes() && s.passes());
    }
}

// ---------------------------------------------------------------------------------------------
// spec-8 traps: the wrong variant must leave the tolerance by far
// ---------------------------------------------------------------------------------------------

/// A wrong variant is "caught" when its output is this many f32 tolerances out (3e-3 relative):
/// 600× the largest rounding difference measured between the engine and diffusers (5e-6), so
/// no reordering of f32 arithmetic could produce it. The smallest trap (context ids axis 0 on
/// config a, whose 2 index-axis pairs turn by 1 and 0.01 rad) is at ~140×.
const CAUGHT: f64 = 30.0;

/// Output of the variant against the fixture output; asserts it is caught and returns rel_l2.
fn assert_caught(what: &str, fx: &Fixture, out: &[f32], reference: &[f32]) -> f64 {
    let c = compare(out, reference, tol::F32);
    println!(
        "{:<8}{what:<52}{:>10.3e} {:>10.3e} {:>9.0}x  caught",
        fx.name,
        c.rel_l2,
        c.rel_max,
        c.rel_l2 / tol::F32
    );
    assert!(
        c.rel_l2 > CAUGHT * tol::F32,
        "{}: {what}: the wrong variant is within {} × tolerance of the reference: {c:?}",
        fx.name,
        CAUGHT
    );
    c.rel_l2
}

fn trap_header() {
    println!(
        "\n{:<8}{:<52}{:>10} {:>10} {:>10}",
        "config", "wrong variant vs fixture", "rel_l2", "rel_max", "× F32 tol"
    );
}

fn output_of(m: &Flux<CpuBackend>, inp: &FluxInputs<'_>) -> Vec<f32> {
    m.forward(inp, None).expect("forward")
}

/// Rotate-half RoPE pairs dims (j, j + Dh/2) with frequency j; adjacent pairs (2j, 2j+1).
/// Moving q/k dim j to 2j and j + Dh/2 to 2j + 1 (rows of every qkv / linear1 weight and bias,
/// and the QKNorm scales) makes our adjacent RoPE compute exactly what a rotate-half engine
/// computes on the original weights: RMSNorm is per element after the permutation, and q·k is
/// invariant under a common permutation of q and k.
fn as_rotate_half(w: &WeightMap, cfg: &FluxConfig) -> WeightMap {
    let (d, hd) = (cfg.hidden_size, cfg.head_dim);
    // new position → old position within one head
    let src = |p: usize| if p % 2 == 0 { p / 2 } else { p / 2 + hd / 2 };
    let mut out = w.clone();
    for (k, v) in out.iter_mut() {
        let fused = k.contains("_attn.qkv.") || k.contains(".linear1.");
        if fused {
            // rows: q [0, D), k [D, 2D); each row is `cols` wide
            let cols = if v.shape.len() == 2 { v.shape[1] } else { 1 };
            let old = w[k].data.clone();
            for part in 0..2 {
                for h in 0..cfg.num_heads {
                    for p in 0..hd {
                        let (dst, from) = (part * d + h * hd + p, part * d + h * hd + src(p));
                        v.data[dst * cols..(dst + 1) * cols]
                            .copy_from_slice(&old[from * cols..(from + 1) * cols]);
                    }
                }
            }
        } else if k.ends_with("_norm.scale") {
            let old = w[k].data.clone();
            for p in 0..hd {
                v.data[p] = old[src(p)];
            }
        }
    }
    out
}

#[test]
fn trap_rope_rotate_half_is_caught() {
    trap_header();
    for name in CONFIGS {
        let fx = Fixture::load(name);
        let (cfg, w) = open(&fx, Layout::Bfl);
        let right = model(&cfg, &w);
        let wrong = model(&cfg, &as_rotate_half(&w, &cfg));
        // The permutation alone changes nothing: with all ids 0 RoPE is the identity and both
        // models agree, so below only the pair convention differs.
        let zeros = vec![0.0f32; fx.get("img_ids").len()];
        let inp0 = FluxInputs {
            img_ids: &zeros,
            ..fx.inputs()
        };
        let c = compare(
            &output_of(&wrong, &inp0),
            &output_of(&right, &inp0),
            tol::F32,
        );
        assert!(
            c.passes(),
            "permutation is not neutral without rotation: {c:?}"
        );
        assert_caught(
            "RoPE rotate-half pairs (j, j+Dh/2)",
            &fx,
            &output_of(&wrong, &fx.inputs()),
            fx.get("output"),
        );
    }
}

#[test]
fn trap_context_offset_is_caught() {
    trap_header();
    for name in CONFIGS {
        let fx = Fixture::load(name);
        let (nx, nc, lt) = (fx.n("Nx"), fx.n("Nc"), fx.n("Lt"));
        let grid = |k: &str, d: &str| fx.meta[k][d].as_u64().expect("grid") as usize;
        // the engine's ids are the fixture's ids, exactly
        let mut ids = image_ids(grid("target_grid", "h"), grid("target_grid", "w"), 0.0);
        ids.extend(image_ids(
            grid("context_grid", "h"),
            grid("context_grid", "w"),
            1.0,
        ));
        assert_eq!(ids, fx.get("img_ids"), "{name}: Kontext ids (spec 2.3)");
        assert_eq!(txt_ids(lt), fx.get("txt_ids"));
        assert_eq!(ids.len(), (nx + nc) * 3);

        let (cfg, w) = open(&fx, Layout::Bfl);
        let m = model(&cfg, &w);
        let mut no_offset = ids.clone();
        for row in no_offset.chunks_mut(3).skip(nx) {
            row[0] = 0.0;
        }
        let inp = FluxInputs {
            img_ids: &no_offset,
            ..fx.inputs()
        };
        let out = output_of(&m, &inp);
        let oc = cfg.out_channels;
        assert_caught(
            "context ids axis 0 = 0 (target rows)",
            &fx,
            &out[..nx * oc],
            &fx.get("output")[..nx * oc],
        );
    }
}

#[test]
fn trap_final_layer_halves_are_caught() {
    trap_header();
    for name in CONFIGS {
        let fx = Fixture::load(name);
        let (cfg, w) = open(&fx, Layout::Bfl);
        let d = cfg.hidden_size;
        let mut swapped = w.clone();
        for key in [
            "final_layer.adaLN_modulation.1.weight",
            "final_layer.adaLN_modulation.1.bias",
        ] {
            let v = swapped.get_mut(key).expect(key);
            let half = v.data.len() / 2;
            assert_eq!(v.shape[0], 2 * d);
            v.data.rotate_left(half); // [shift; scale] → [scale; shift] (diffusers order)
        }
        let right = run(&model(&cfg, &w), &fx.inputs());
        let wrong = run(&model(&cfg, &swapped), &fx.inputs());
        // everything before the final layer is identical; only the output moves
        let n = right.len();
        assert_eq!(right[..n - 1], wrong[..n - 1]);
        assert_caught(
            "final layer (scale, shift) order",
            &fx,
            &wrong[n - 1].1,
            fx.get("output"),
        );
    }
}

#[test]
fn trap_sequence_order_is_caught() {
    trap_header();
    for name in CONFIGS {
        let fx = Fixture::load(name);
        let (cfg, w) = open(&fx, Layout::Bfl);
        let m = model(&cfg, &w);
        let (nx, nc, lt, ic, oc) = (
            fx.n("Nx"),
            fx.n("Nc"),
            fx.n("Lt"),
            cfg.in_channels,
            cfg.out_channels,
        );
        let inp = fx.inputs();
        let reference = fx.get("output");

        // (1) RoPE rows not in token order: pe built from [img ids ‖ txt ids] while the tokens
        //     are [text ‖ image].
        let ids = [inp.img_ids, inp.txt_ids].concat();
        let (t_ids, i_ids) = ids.split_at(lt * 3);
        let out = output_of(
            &m,
            &FluxInputs {
                txt_ids: t_ids,
                img_ids: i_ids,
                ..inp
            },
        );
        assert_caught(
            "pe rows [image ‖ text], tokens [text ‖ image]",
            &fx,
            &out,
            reference,
        );

        // (2) [context ‖ target] with ids following the tokens: attention has no mask and RoPE
        //     comes from the ids, so the rows come out permuted and otherwise equal …
        let img = [&inp.img[nx * ic..], &inp.img[..nx * ic]].concat();
        let img_ids = [&inp.img_ids[nx * 3..], &inp.img_ids[..nx * 3]].concat();
        let out = output_of(
            &m,
            &FluxInputs {
                img: &img,
                img_ids: &img_ids,
                ..inp
            },
        );
        let c = compare(&out[nc * oc..], &reference[..nx * oc], tol::F32);
        assert!(
            c.passes(),
            "{name}: target rows after the context rows: {c:?}"
        );
        //     … so the order matters where the sampler slices: pred[:Nx] is then wrong.
        assert_caught(
            "[context ‖ target], sampler keeps the first Nx rows",
            &fx,
            &out[..nx * oc],
            &reference[..nx * oc],
        );

        // (3) joint sequence [image ‖ text] in the single blocks: the stage the golden test
        //     compares would be the row-rotated one.
        let stages = run(&m, &inp);
        let (_, first_single) = stages
            .iter()
            .find(|s| s.0 == "single_blocks.0")
            .expect("single_blocks.0");
        let d = cfg.hidden_size;
        let img_first = [&first_single[lt * d..], &first_single[..lt * d]].concat();
        assert_caught(
            "single_blocks.0 as [image ‖ text]",
            &fx,
            &img_first,
            fx.get("single_blocks.0"),
        );
    }
}

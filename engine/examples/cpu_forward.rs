//! Times one f32 CPU forward of a mid-size random Flux model:
//! `cargo run -p kontext-engine --release --example cpu_forward`.
//! (hidden 512 = 8 heads × 64, MLP 2048, 4 double + 8 single blocks, 500 text + 500 target +
//! 500 context tokens; the real model is 3072 wide with 19 + 38 blocks and ~8700 tokens.)

use kontext_engine::check::{compare, tol};
use kontext_engine::random::Rng;
use kontext_engine::sampling::{image_ids, txt_ids};
use kontext_engine::{random_weights, CpuBackend, Flux, FluxInputs};
use kontext_loader::FluxConfig;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cfg = FluxConfig {
        in_channels: 64,
        out_channels: 64,
        vec_in_dim: 768,
        context_in_dim: 4096,
        hidden_size: 512,
        mlp_hidden: 2048,
        num_heads: 8,
        head_dim: 64,
        depth: 4,
        depth_single: 8,
        axes_dim: vec![8, 28, 28],
        theta: 10_000.0,
        qkv_bias: true,
        guidance_embed: true,
    };
    let (lt, grid) = (500, (20, 25)); // Nx = Nc = 500
    let t0 = Instant::now();
    let model = Flux::load(CpuBackend, cfg.clone(), &random_weights(&cfg, 7))?;
    println!("random weights + load: {:.2} s", t0.elapsed().as_secs_f64());

    let nx = grid.0 * grid.1;
    let ni = 2 * nx;
    let mut rng = Rng::new(8);
    let img = rng.normals(ni * cfg.in_channels);
    let txt = rng.normals(lt * cfg.context_in_dim);
    let y = rng.normals(cfg.vec_in_dim);
    let mut img_ids = image_ids(grid.0, grid.1, 0.0);
    img_ids.extend(image_ids(grid.0, grid.1, 1.0));
    let txt_ids = txt_ids(lt);
    let inp = FluxInputs {
        img: &img,
        img_ids: &img_ids,
        txt: &txt,
        txt_ids: &txt_ids,
        t: 0.7,
        guidance: 2.5,
        y: &y,
    };

    // FLOPs of the linears (2 per MAC) and of attention (QKᵀ and PV), spec 7.1's formula.
    let (d, m, l) = (
        cfg.hidden_size as f64,
        cfg.mlp_hidden as f64,
        (lt + ni) as f64,
    );
    let w_blk = 4.0 * d * d + 2.0 * d * m;
    let blocks = (cfg.depth + cfg.depth_single) as f64;
    let linear = 2.0 * w_blk * blocks * l + 2.0 * lt as f64 * cfg.context_in_dim as f64 * d;
    let attention = blocks * 4.0 * d * l * l;
    let gflop = (linear + attention) / 1e9;

    let threads = rayon::current_num_threads();
    println!(
        "forward: L = {} tokens ({lt} text + {nx} target + {nx} context), {gflop:.1} GFLOP, {threads} rayon threads",
        lt + ni
    );
    let mut times = Vec::new();
    for run in 0..3 {
        let t = Instant::now();
        let out = model.forward(&inp, None)?;
        let s = t.elapsed().as_secs_f64();
        assert!(out.iter().all(|v| v.is_finite()));
        println!("  run {run}: {s:.3} s  ({:.1} GFLOP/s)", gflop / s);
        times.push(s);
    }
    times.sort_by(f64::total_cmp);
    println!("best {:.3} s, median {:.3} s", times[0], times[1]);

    // A 4-step loop: the conditioning per step (`forward`) vs all steps' at once, before the loop.
    let ts = [1.0, 0.75, 0.5, 0.25];
    let t = Instant::now();
    let per_step: Vec<Vec<f32>> = ts
        .iter()
        .map(|&t| model.forward(&FluxInputs { t, ..inp }, None))
        .collect::<Result<_, _>>()?;
    let s_per_step = t.elapsed().as_secs_f64() / ts.len() as f64;
    let t = Instant::now();
    let conditioning = model.conditioning(&ts, inp.guidance, inp.y)?;
    let s_cond = t.elapsed().as_secs_f64();
    let precomputed: Vec<Vec<f32>> = ts
        .iter()
        .zip(&conditioning)
        .map(|(&t, c)| model.forward_conditioned(&FluxInputs { t, ..inp }, c, None))
        .collect::<Result<_, _>>()?;
    let s_pre = (t.elapsed().as_secs_f64() - s_cond) / ts.len() as f64;
    let worst = per_step
        .iter()
        .zip(&precomputed)
        .map(|(a, b)| compare(b, a, tol::F32).rel_max)
        .fold(0.0, f64::max);
    println!(
        "{}-step loop: {s_per_step:.3} s/step with per-step modulation, {s_pre:.3} s/step precomputed \
         (+ {:.1} ms once for all steps); outputs differ by rel_max {worst:.1e}",
        ts.len(),
        s_cond * 1e3
    );
    Ok(())
}

//! kontext-gpu-check: the engine's CUDA backend against its CPU reference, on a GPU, in one run
//! that prints one table. Built here by `scripts/gpu-check build` (into `gpu-bin/`), run on the
//! GPU machine by `scripts/gpu-check` from the repository root (it reads `tests/fixtures/`).
//!
//! Sections, in order (each row is printed when it is measured, and the whole table again at the
//! end):
//! - `op`: every op of `Backend` and `EncoderBackend` on `CudaBackend` vs `CpuBackend`, fresh
//!   random inputs (rounded to bf16, so both sides see the same values), outputs poisoned with
//!   NaN first, at tiny, odd and real Kontext shapes (8,704 tokens: 512 text + 4096 target +
//!   4096 context; D 3072, 24 heads × 128, MLP 12288; the VAE at 1024²). At real sizes the CPU
//!   computes sampled rows (row-wise ops) or bands of output rows (convolutions); attention, whose
//!   rows are not independent, is computed whole. Real-size ops whose check passed are timed
//!   (median of 3 batches, CUDA events, activations from a planned pool).
//! - `block`: a double-stream and a single-stream block at the real widths on 1,024 tokens.
//! - `model`: the transformer fixtures (bf16 and scaled-fp8 files; fp8 stays fp8 on the GPU) and
//!   the committed tiny pipeline (edit and text-to-image from their noise files) on CUDA vs CPU,
//!   plus the CPU vs diffusers' reference for scale; device allocations inside the denoising loop
//!   (must be 0).
//! - `step`: one transformer step at the real size (FLUX.1 Kontext [dev] config, random weights,
//!   bf16 then fp8), timed, with its FLOP count (spec 7: 165.45 TFLOP) and TFLOP/s; allocations
//!   during the timed steps (must be 0) and a finite output.
//!
//! Tolerances are those of `kontext_engine::check::tol`, each with its reason there. Exit status:
//! 0 when every check passed, 1 when one failed, 2 when the GPU could not be set up.
//!
//! Flags: `--fixtures DIR` (default `tests/fixtures`), `--quick` (tiny and odd shapes and the
//! fixtures only), `--no-step` (skip the real-size step), `--budget SECS` (default 420: sections
//! that would start later are skipped and reported), `--dry-run` (no GPU: `CudaBackend::planner()`
//! stands in for it, so every comparison fails; runs the check's own logic and the CPU
//! references, and measures their time, on a machine without a GPU).

use kontext_engine::check::{compare, tol, Comparison};
use kontext_engine::encoder_backend::{EncoderBackend, Pad};
use kontext_engine::image::RgbImage;
use kontext_engine::layers::{BlockDims, DoubleStreamBlock, SingleStreamBlock};
use kontext_engine::pipeline::{Device, Engine, Pipeline, Progress};
use kontext_engine::random::Rng;
use kontext_engine::request::{read_noise_file, EditOptions, NoiseSource, ResizePolicy};
use kontext_engine::sampling::{image_ids, txt_ids};
use kontext_engine::weights::{
    quantise_e4m3, Fp8Weights, LazyRandomWeights, StoredPart, StoredWeight, WeightMap,
};
use kontext_engine::{
    Backend, CpuBackend, CudaBackend, EngineError, Flux, FluxInputs, HostWeight, QkScales,
    WeightSource,
};
use kontext_kernels::arena::Pool;
use kontext_kernels::Gpu;
use kontext_loader::{load_transformer, FluxConfig, ModelPaths, TensorSet, TransformerOptions};
use rayon::prelude::*;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

type R<T> = Result<T, Box<dyn std::error::Error>>;
type E<T> = Result<T, EngineError>;

// Real Kontext sizes (1024² edit: 512 text + 4096 target + 4096 context tokens).
const LT: usize = 512;
const NI: usize = 8192;
const L: usize = LT + NI;
const D: usize = 3072;
const H: usize = 24;
const DH: usize = 128;
const M: usize = 12288;

/// A host matrix `[rows, cols]`, row-major.
#[derive(Clone)]
struct Mat {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl Mat {
    /// The rows `idx`, in order.
    fn pick(&self, idx: &[usize]) -> Mat {
        Mat {
            rows: idx.len(),
            cols: self.cols,
            data: pick(&self.data, self.cols, idx),
        }
    }
}

fn pick(v: &[f32], cols: usize, idx: &[usize]) -> Vec<f32> {
    idx.iter()
        .flat_map(|&r| v[r * cols..(r + 1) * cols].iter().copied())
        .collect()
}

fn rb(v: f32) -> f32 {
    half::bf16::from_f32(v).to_f32()
}

fn up<B: Backend>(b: &B, m: &Mat) -> E<B::Tensor> {
    b.upload(&m.data, m.rows, m.cols)
}

fn host(shape: &[usize], data: Vec<f32>) -> HostWeight {
    HostWeight {
        shape: shape.to_vec(),
        data,
    }
}

/// A linear layer's weight for both backends: f32 values, or fp8 codes with a scale (stored).
enum Wt {
    F32(HostWeight),
    Fp8 {
        rows: usize,
        cols: usize,
        codes: Vec<u8>,
        scale: f32,
    },
}

fn load_lin<B: Backend>(b: &B, w: &Wt, bias: Option<&Mat>) -> E<B::Linear> {
    let bias = bias.map(|m| host(&[m.cols], m.data.clone()));
    match w {
        Wt::F32(h) => b.load_linear("w", h.clone(), bias),
        Wt::Fp8 {
            rows,
            cols,
            codes,
            scale,
        } => b.load_linear_stored(
            "w",
            StoredWeight {
                dtype: kontext_loader::DType::F8E4M3,
                shape: vec![*rows, *cols],
                parts: vec![StoredPart {
                    bytes: Cow::Borrowed(codes),
                    rows: *rows,
                    scale: *scale,
                }],
            },
            bias,
        ),
    }
}

/// One row of the table.
struct Row {
    section: &'static str,
    name: String,
    shape: String,
    cmp: Option<Comparison>,
    ok: bool,
    note: String,
    ms: Option<f64>,
    rate: String,
}

impl Row {
    fn header() -> String {
        format!(
            "{:<7} {:<30} {:<36} {:>9} {:>9} {:>9} {:>15} {:>8} {:<6} {:>10} {:>14}  note",
            "section",
            "check",
            "shape",
            "max_abs",
            "rel_l2",
            "rel_max",
            "over/n",
            "tol",
            "result",
            "ms",
            "rate"
        )
    }

    fn line(&self) -> String {
        let (a, l2, mx, over, t) = match &self.cmp {
            Some(c) => (
                format!("{:.2e}", c.max_abs),
                format!("{:.2e}", c.rel_l2),
                format!("{:.2e}", c.rel_max),
                format!("{}/{}", c.over_tol + c.nonfinite, c.n),
                format!("{:.1e}", c.tol),
            ),
            None => Default::default(),
        };
        let ms = self.ms.map_or(String::new(), |m| format!("{m:.3}"));
        format!(
            "{:<7} {:<30} {:<36} {a:>9} {l2:>9} {mx:>9} {over:>15} {t:>8} {:<6} {ms:>10} {:>14}  {}",
            self.section,
            self.name,
            self.shape,
            if self.ok { "ok" } else { "FAIL" },
            self.rate,
            self.note
        )
    }
}

struct Check {
    cpu: CpuBackend,
    cuda: CudaBackend,
    /// None in a dry run (`--dry-run`: the planner in place of the GPU).
    gpu: Option<Arc<Gpu>>,
    rng: Rng,
    rows: Vec<Row>,
    fixtures: PathBuf,
    start: Instant,
    budget: f64,
}

impl Check {
    fn gpu(&self) -> R<&Arc<Gpu>> {
        self.gpu
            .as_ref()
            .ok_or_else(|| "no GPU: a dry run (--dry-run) plans only".into())
    }

    fn seed(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// `[rows, cols]` of N(mean, std²) rounded to bf16, fresh, drawn in parallel.
    fn randn(&mut self, rows: usize, cols: usize, mean: f32, std: f32) -> Mat {
        let mut m = self.randn_f32(rows, cols, mean, std);
        m.data.par_iter_mut().for_each(|v| *v = rb(*v));
        m
    }

    /// Like [`Check::randn`] without the rounding (f32 values only the CPU keeps exactly).
    fn randn_f32(&mut self, rows: usize, cols: usize, mean: f32, std: f32) -> Mat {
        let seed = self.seed();
        let mut data = vec![0f32; rows * cols];
        data.par_chunks_mut(1 << 16).enumerate().for_each(|(i, c)| {
            let mut rng = Rng::new(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            c.iter_mut().for_each(|v| *v = mean + std * rng.normal());
        });
        Mat { rows, cols, data }
    }

    /// Rows the CPU recomputes: all of a small matrix; else the first, the last and 30 random.
    fn sample(&mut self, n: usize) -> Vec<usize> {
        if n <= 64 {
            return (0..n).collect();
        }
        let mut v: Vec<usize> = (0..30)
            .map(|_| (self.rng.next_u64() % n as u64) as usize)
            .collect();
        v.extend([0, n - 1]);
        v.sort_unstable();
        v.dedup();
        v
    }

    fn push(&mut self, row: Row) {
        println!("{}", row.line());
        let _ = std::io::stdout().flush();
        self.rows.push(row);
    }

    /// Compares and records one row; returns whether it passed.
    fn record(
        &mut self,
        section: &'static str,
        name: &str,
        shape: &str,
        got: &[f32],
        want: &[f32],
        t: f64,
    ) -> bool {
        let c = compare(got, want, t);
        let ok = c.passes();
        let note = if c.nonfinite > 0 {
            format!("{} NaN/Inf (unwritten or overflow)", c.nonfinite)
        } else {
            String::new()
        };
        self.push(Row {
            section,
            name: name.to_string(),
            shape: shape.to_string(),
            cmp: Some(c),
            ok,
            note,
            ms: None,
            rate: String::new(),
        });
        ok
    }

    /// Adds a timing to the last row.
    fn timed(&mut self, ms: f64, rate: String) {
        if let Some(r) = self.rows.last_mut() {
            r.ms = Some(ms);
            r.rate = rate;
            println!("{:<7} {:<30} timed: {ms:.3} ms, {}", "", r.name, r.rate);
        }
    }

    /// A passing row that is a statement, not a comparison.
    fn note(&mut self, section: &'static str, name: &str, what: String) {
        self.push(Row {
            section,
            name: name.to_string(),
            shape: String::new(),
            cmp: None,
            ok: true,
            note: what,
            ms: None,
            rate: String::new(),
        });
    }

    fn fail(&mut self, section: &'static str, name: &str, why: String) {
        self.push(Row {
            section,
            name: name.to_string(),
            shape: String::new(),
            cmp: None,
            ok: false,
            note: why.replace('\n', " | "),
            ms: None,
            rate: String::new(),
        });
    }

    fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Runs one check; an error or a panic becomes a FAIL row and the run goes on.
    fn guard(&mut self, section: &'static str, name: &str, f: impl FnOnce(&mut Check) -> R<()>) {
        if self.elapsed() > self.budget {
            self.fail(
                section,
                name,
                format!("SKIPPED: the {:.0} s budget is spent", self.budget),
            );
            return;
        }
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self)));
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.fail(section, name, format!("error: {e}")),
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                self.fail(section, name, format!("panic: {msg}"));
            }
        }
    }

    /// Median milliseconds of one call of `f` on the GPU: planned pool, one warm-up, 3 batches
    /// of `reps` calls timed with CUDA events; poisoning off.
    fn time(&self, reps: usize, f: &mut dyn FnMut() -> E<()>) -> R<f64> {
        self.cuda.set_poison(false);
        let bytes = self.cuda.plan_bytes(f)?;
        let gpu = self.gpu()?.clone();
        let pool = Pool::new(&gpu, bytes)?;
        let mut times = Vec::new();
        let r = self.cuda.with_scope(pool, false, &mut || {
            f()?;
            for _ in 0..3 {
                let ms = gpu.time_ms(|| {
                    for _ in 0..reps {
                        f()?;
                    }
                    Ok::<(), EngineError>(())
                })?;
                times.push(ms / reps as f64);
            }
            Ok(())
        });
        self.cuda.set_poison(true);
        r?;
        times.sort_by(|a, b| a.total_cmp(b));
        Ok(times[times.len() / 2])
    }
}

fn tflops(flop: f64, ms: f64) -> String {
    format!("{:.1} TFLOP/s", flop / ms / 1e9)
}

fn gbs(bytes: f64, ms: f64) -> String {
    format!("{:.0} GB/s", bytes / ms / 1e6)
}

// ---------------------------------------------------------------------------------------------
// Transformer ops

fn linear_on<B: Backend>(b: &B, x: &Mat, w: &Wt, bias: Option<&Mat>) -> E<Vec<f32>> {
    let lin = load_lin(b, w, bias)?;
    b.download(&b.linear(&up(b, x)?, &lin)?)
}

fn ck_linear(
    c: &mut Check,
    name: &str,
    (m, k, n): (usize, usize, usize),
    bias: bool,
    fp8: bool,
) -> R<()> {
    let x = c.randn(m, k, 0.0, 1.0);
    let std = 1.0 / (k as f32).sqrt();
    let w = if fp8 {
        let wv = c.randn_f32(n, k, 0.0, std);
        let (codes, scale) = quantise_e4m3(&wv.data);
        Wt::Fp8 {
            rows: n,
            cols: k,
            codes,
            scale,
        }
    } else {
        Wt::F32(host(&[n, k], c.randn(n, k, 0.0, std).data))
    };
    let b = bias.then(|| c.randn(1, n, 0.0, 0.05));
    let rows = c.sample(m);
    let got = pick(&linear_on(&c.cuda, &x, &w, b.as_ref())?, n, &rows);
    let want = linear_on(&c.cpu, &x.pick(&rows), &w, b.as_ref())?;
    let t = if fp8 {
        tol::BF16_OP_ROUNDED
    } else {
        tol::BF16_OP
    };
    let label = format!("{name}{}", if fp8 { " fp8" } else { "" });
    let shape = format!(
        "[{m}, {k}]·[{n}, {k}]ᵀ{}{}",
        if bias { " +b" } else { "" },
        if rows.len() < m { " (rows)" } else { "" }
    );
    if c.record("op", &label, &shape, &got, &want, t) && m * n * k >= 1 << 30 {
        let lin = load_lin(&c.cuda, &w, b.as_ref())?;
        let xd = c.cuda.upload_bf16(&x.data, m, k)?;
        let cuda = c.cuda.clone();
        let ms = c.time(3, &mut || cuda.linear(&xd, &lin).map(drop))?;
        c.timed(ms, tflops(2.0 * (m * n * k) as f64, ms));
    }
    Ok(())
}

fn ck_norm_modulate(c: &mut Check, rows: usize, cols: usize) -> R<()> {
    let x = c.randn(rows, cols, 0.3, 2.0);
    let (sh, sc) = (c.randn(1, cols, 0.0, 0.5), c.randn(1, cols, 0.0, 0.5));
    fn on<B: Backend>(b: &B, x: &Mat, sh: &Mat, sc: &Mat) -> E<Vec<f32>> {
        b.download(&b.norm_modulate(&up(b, x)?, &up(b, sh)?, &up(b, sc)?)?)
    }
    let idx = c.sample(rows);
    let got = pick(&on(&c.cuda, &x, &sh, &sc)?, cols, &idx);
    let want = on(&c.cpu, &x.pick(&idx), &sh, &sc)?;
    if c.record(
        "op",
        "norm_modulate",
        &format!("[{rows}, {cols}]"),
        &got,
        &want,
        tol::BF16_OP,
    ) && rows >= 4096
    {
        let cuda = c.cuda.clone();
        let xd = cuda.upload_bf16(&x.data, rows, cols)?;
        let (a, b) = (
            cuda.upload_bf16(&sh.data, 1, cols)?,
            cuda.upload_bf16(&sc.data, 1, cols)?,
        );
        let ms = c.time(10, &mut || cuda.norm_modulate(&xd, &a, &b).map(drop))?;
        c.timed(ms, gbs((4 * rows * cols) as f64, ms));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn ck_qk_norm_rope(
    c: &mut Check,
    rows: usize,
    heads: usize,
    hd: usize,
    w: usize,
    lpe: usize,
    row0: usize,
) -> R<()> {
    let x = c.randn(rows, w, 0.0, 1.5);
    let qs = c.randn_f32(1, hd, 1.0, 0.2).data;
    let ks = c.randn_f32(1, hd, 1.0, 0.2).data;
    let angles = c.randn_f32(lpe, hd / 2, 0.0, 3.0).data;
    let pe: Vec<f32> = angles.iter().flat_map(|a| [a.cos(), a.sin()]).collect();
    #[allow(clippy::too_many_arguments)]
    fn on<B: Backend>(
        b: &B,
        x: &Mat,
        heads: usize,
        qs: &[f32],
        ks: &[f32],
        pe: &[f32],
        lpe: usize,
        row0: usize,
    ) -> E<Vec<f32>> {
        let hd = qs.len();
        let mut t = up(b, x)?;
        let q = b.load_vector("q", host(&[hd], qs.to_vec()))?;
        let k = b.load_vector("k", host(&[hd], ks.to_vec()))?;
        let pe = b.upload(pe, lpe, hd)?;
        b.qk_norm_rope(&mut t, heads, &q, &k, &pe, row0)?;
        b.download(&t)
    }
    let idx = c.sample(rows);
    let got = pick(&on(&c.cuda, &x, heads, &qs, &ks, &pe, lpe, row0)?, w, &idx);
    let pe_rows: Vec<usize> = idx.iter().map(|&r| row0 + r).collect();
    let pe_s = pick(&pe, hd, &pe_rows);
    let want = on(&c.cpu, &x.pick(&idx), heads, &qs, &ks, &pe_s, idx.len(), 0)?;
    let shape = format!("[{rows}, {w}] H{heads} Dh{hd} pe+{row0}");
    if c.record("op", "qk_norm_rope", &shape, &got, &want, tol::BF16_OP) && rows >= 4096 {
        let cuda = c.cuda.clone();
        let mut xd = cuda.upload_bf16(&x.data, rows, w)?;
        let q = cuda.load_vector("q", host(&[hd], qs.clone()))?;
        let k = cuda.load_vector("k", host(&[hd], ks.clone()))?;
        let ped = cuda.upload(&pe, lpe, hd)?;
        let ms = c.time(10, &mut || {
            cuda.qk_norm_rope(&mut xd, heads, &q, &k, &ped, row0)
        })?;
        c.timed(ms, gbs((2 * 2 * rows * 2 * heads * hd) as f64, ms));
    }
    Ok(())
}

fn ck_attention(c: &mut Check, l: usize, heads: usize, hd: usize, extra: usize) -> R<()> {
    let w = 3 * heads * hd + extra;
    let qkv = c.randn(l, w, 0.0, 1.0);
    fn on<B: Backend>(b: &B, qkv: &Mat, heads: usize, hd: usize) -> E<Vec<f32>> {
        b.download(&b.attention(&up(b, qkv)?, heads, hd)?)
    }
    let got = on(&c.cuda, &qkv, heads, hd)?;
    let want = on(&c.cpu, &qkv, heads, hd)?;
    let shape = format!("L{l} H{heads} Dh{hd} W{w}");
    if c.record("op", "attention", &shape, &got, &want, tol::BF16_OP) && l >= 4096 {
        let cuda = c.cuda.clone();
        let qd = cuda.upload_bf16(&qkv.data, l, w)?;
        let ms = c.time(1, &mut || cuda.attention(&qd, heads, hd).map(drop))?;
        c.timed(ms, tflops(4.0 * (l * l * heads * hd) as f64, ms));
    }
    Ok(())
}

/// `Backend::attention_qk_norm_rope` CUDA vs CPU, and which kernels the CUDA side launched: the
/// tensor-core kernel for head dims 64 and 128 (and not the plain pair), the plain pair else.
fn ck_attention_fused(
    c: &mut Check,
    l: usize,
    (heads, hd): (usize, usize),
    extra: usize,
    split: usize,
) -> R<()> {
    let w = 3 * heads * hd + extra;
    let qkv = c.randn(l, w, 0.0, 1.5);
    let sc: Vec<Vec<f32>> = (0..4).map(|_| c.randn_f32(1, hd, 1.0, 0.2).data).collect();
    let angles = c.randn_f32(l, hd / 2, 0.0, 3.0).data;
    let pe: Vec<f32> = angles.iter().flat_map(|a| [a.cos(), a.sin()]).collect();
    fn on<B: Backend>(
        b: &B,
        qkv: &Mat,
        (heads, hd): (usize, usize),
        sc: &[Vec<f32>],
        pe: &[f32],
        split: usize,
    ) -> E<Vec<f32>> {
        let mut t = up(b, qkv)?;
        let v = sc
            .iter()
            .map(|s| b.load_vector("qk scale", host(&[hd], s.clone())))
            .collect::<E<Vec<_>>>()?;
        let pe = b.upload(pe, qkv.rows, hd)?;
        let scales = [
            QkScales { q: &v[0], k: &v[1] },
            QkScales { q: &v[2], k: &v[3] },
        ];
        b.download(&b.attention_qk_norm_rope(&mut t, (heads, hd), scales, split, &pe, 0)?)
    }
    let count = |b: &CudaBackend| -> std::collections::HashMap<&'static str, u64> {
        b.launch_counts().into_iter().collect()
    };
    let before = count(&c.cuda);
    let got = on(&c.cuda, &qkv, (heads, hd), &sc, &pe, split)?;
    let after = count(&c.cuda);
    let want = on(&c.cpu, &qkv, (heads, hd), &sc, &pe, split)?;
    let shape = format!("L{l} H{heads} Dh{hd} W{w} split{split}");
    // q̂, k̂ and the probabilities are bf16 operands of the tensor-core products.
    let ok = c.record(
        "op",
        "attention_qk_norm_rope",
        &shape,
        &got,
        &want,
        tol::BF16_OP_ROUNDED,
    );
    if after.is_empty() {
        c.note("op", "attention launches", "no GPU: not counted".into());
        return Ok(());
    }
    let ran =
        |name: &str| after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0);
    // Head dim 128 on sm_90 takes the Hopper kernel, the other fast cases the mma.sync one.
    let cc = c.cuda.gpu().map(|g| g.info.compute_capability);
    let hopper = cc.is_some_and(|cc| kontext_kernels::attention_wgmma::supports(hd, cc).is_ok());
    let fast = if hopper {
        "attention_wgmma_d128".to_string()
    } else {
        format!("attention_mma_d{hd}")
    };
    let other = if hopper {
        format!("attention_mma_d{hd}")
    } else {
        "attention_wgmma_d128".to_string()
    };
    let seen = format!(
        "{fast} {}, {other} {}, attention_mma_k_norm_rope {}, attention {}, qk_norm_rope {}",
        ran(&fast),
        ran(&other),
        ran("attention_mma_k_norm_rope"),
        ran("attention"),
        ran("qk_norm_rope")
    );
    let expect_fast = kontext_kernels::attention_mma::HEAD_DIMS.contains(&hd) && w % 8 == 0;
    let as_expected = if expect_fast {
        ran(&fast) == 1
            && ran(&other) == 0
            && ran("attention_mma_k_norm_rope") == 1
            && ran("attention") == 0
            && ran("qk_norm_rope") == 0
    } else {
        ran("attention") == 1 && ran("qk_norm_rope") >= 1 && ran("attention_mma_k_norm_rope") == 0
    };
    let what = format!(
        "{shape}: {} path; launched {seen}",
        if expect_fast { "fused" } else { "fallback" }
    );
    if as_expected {
        c.note("op", "attention launches", what);
    } else {
        c.fail("op", "attention launches", what);
    }
    if ok && l >= 4096 && expect_fast {
        let cuda = c.cuda.clone();
        let mut qd = cuda.upload_bf16(&qkv.data, l, w)?;
        let v = sc
            .iter()
            .map(|s| cuda.load_vector("qk scale", host(&[hd], s.clone())))
            .collect::<E<Vec<_>>>()?;
        let ped = cuda.upload(&pe, l, hd)?;
        let ms = c.time(1, &mut || {
            let scales = [
                QkScales { q: &v[0], k: &v[1] },
                QkScales { q: &v[2], k: &v[3] },
            ];
            cuda.attention_qk_norm_rope(&mut qd, (heads, hd), scales, split, &ped, 0)
                .map(drop)
        })?;
        c.timed(ms, tflops(4.0 * (l * l * heads * hd) as f64, ms));
    }
    Ok(())
}

/// The elementwise ops and copies, by name, on any backend.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Ew {
    Silu,
    GeluTanh,
    QuickGelu,
    GeluTanhGate,
    Affine,
    AddAssign,
    GateResidual,
    ConcatRows(usize),
    ConcatCols(usize),
    SliceRows(usize, usize),
    SliceCols(usize, usize),
    RoundTrip,
}

fn ew_on<B: EncoderBackend>(b: &B, op: Ew, x: &Mat, y: &Mat) -> E<Vec<f32>> {
    let t = up(b, x)?;
    let out = match op {
        Ew::Silu => b.silu(&t)?,
        Ew::GeluTanh => b.gelu_tanh(&t)?,
        Ew::QuickGelu => b.quick_gelu(&t)?,
        Ew::GeluTanhGate => b.gelu_tanh_gate(&t)?,
        Ew::Affine => b.affine(&t, 1.0 / 0.3611, 0.1159)?,
        Ew::AddAssign => {
            let mut t = t;
            b.add_assign(&mut t, &up(b, y)?)?;
            t
        }
        Ew::GateResidual => {
            // y holds the [L, D] branch in its first rows and the [1, D] gate in its last.
            let g = b.slice_rows(&up(b, y)?, y.rows - 1, y.rows)?;
            let branch = b.slice_rows(&up(b, y)?, 0, y.rows - 1)?;
            let mut t = t;
            b.gate_residual(&mut t, &g, &branch)?;
            t
        }
        Ew::ConcatRows(_) => b.concat_rows(&t, &up(b, y)?)?,
        Ew::ConcatCols(_) => b.concat_cols(&t, &up(b, y)?)?,
        Ew::SliceRows(s, e) => b.slice_rows(&t, s, e)?,
        Ew::SliceCols(s, e) => b.slice_cols(&t, s, e)?,
        Ew::RoundTrip => t,
    };
    b.download(&out)
}

fn ck_ew(c: &mut Check, op: Ew, rows: usize, cols: usize) -> R<()> {
    let x = c.randn(rows, cols, 0.0, 2.0);
    let y = match op {
        Ew::AddAssign => c.randn(rows, cols, 0.0, 1.0),
        Ew::GateResidual => c.randn(rows + 1, cols, 0.0, 1.0),
        Ew::ConcatRows(n) => c.randn(n, cols, 0.0, 1.0),
        Ew::ConcatCols(n) => c.randn(rows, n, 0.0, 1.0),
        _ => Mat {
            rows: 0,
            cols,
            data: Vec::new(),
        },
    };
    let x = if op == Ew::RoundTrip {
        c.randn_f32(rows, cols, 0.0, 2.0) // f32 values: uploads keep f32
    } else {
        x
    };
    // Row-wise ops compare sampled rows; copies and row-selecting ops compare everything.
    let rowwise = matches!(
        op,
        Ew::Silu | Ew::GeluTanh | Ew::QuickGelu | Ew::GeluTanhGate | Ew::Affine | Ew::AddAssign
    );
    let full = ew_on(&c.cuda, op, &x, &y)?;
    let out_elems = full.len();
    let (got, want) = if rowwise {
        let idx = c.sample(rows);
        let ys = if op == Ew::AddAssign {
            y.pick(&idx)
        } else {
            y.clone()
        };
        let out_cols = full.len() / rows.max(1);
        (
            pick(&full, out_cols, &idx),
            ew_on(&c.cpu, op, &x.pick(&idx), &ys)?,
        )
    } else {
        (full, ew_on(&c.cpu, op, &x, &y)?)
    };
    let exact = matches!(
        op,
        Ew::ConcatRows(_)
            | Ew::ConcatCols(_)
            | Ew::SliceRows(..)
            | Ew::SliceCols(..)
            | Ew::RoundTrip
    );
    let t = if exact { tol::EXACT } else { tol::BF16_OP };
    let name = match op {
        Ew::Silu => "silu".to_string(),
        Ew::GeluTanh => "gelu_tanh".into(),
        Ew::QuickGelu => "quick_gelu".into(),
        Ew::GeluTanhGate => "gelu_tanh_gate".into(),
        Ew::Affine => "affine".into(),
        Ew::AddAssign => "add_assign".into(),
        Ew::GateResidual => "gate_residual".into(),
        Ew::ConcatRows(_) => "concat_rows".into(),
        Ew::ConcatCols(_) => "concat_cols".into(),
        Ew::SliceRows(..) => "slice_rows".into(),
        Ew::SliceCols(..) => "slice_cols".into(),
        Ew::RoundTrip => "upload/download (f32)".into(),
    };
    let shape = match op {
        Ew::ConcatRows(n) => format!("[{rows}, {cols}] ‖ [{n}, {cols}]"),
        Ew::ConcatCols(n) => format!("[{rows}, {cols}] | [{rows}, {n}]"),
        Ew::SliceRows(s, e) => format!("rows [{s}, {e}) of [{rows}, {cols}]"),
        Ew::SliceCols(s, e) => format!("cols [{s}, {e}) of [{rows}, {cols}]"),
        _ => format!("[{rows}, {cols}]"),
    };
    if c.record("op", &name, &shape, &got, &want, t) && rows * cols >= 1 << 24 {
        let cuda = c.cuda.clone();
        let xd = cuda.upload_bf16(&x.data, rows, cols)?;
        let yd = cuda.upload_bf16(&y.data, y.rows, y.cols)?;
        // gate_residual's branch and gate, split off before the timing.
        let (branch, gate) = if op == Ew::GateResidual {
            let n = rows * cols;
            (
                Some(cuda.upload_bf16(&y.data[..n], rows, cols)?),
                Some(cuda.upload_bf16(&y.data[n..], 1, cols)?),
            )
        } else {
            (None, None)
        };
        let mut acc = cuda.upload_bf16(&x.data, rows, cols)?;
        let ms = c.time(10, &mut || match op {
            Ew::Silu => cuda.silu(&xd).map(drop),
            Ew::GeluTanh => cuda.gelu_tanh(&xd).map(drop),
            Ew::QuickGelu => cuda.quick_gelu(&xd).map(drop),
            Ew::GeluTanhGate => cuda.gelu_tanh_gate(&xd).map(drop),
            Ew::Affine => cuda.affine(&xd, 2.0, 0.5).map(drop),
            Ew::AddAssign => cuda.add_assign(&mut acc, &yd),
            Ew::GateResidual => match (&gate, &branch) {
                (Some(g), Some(b)) => cuda.gate_residual(&mut acc, g, b),
                _ => Ok(()),
            },
            Ew::ConcatRows(_) => cuda.concat_rows(&xd, &yd).map(drop),
            Ew::ConcatCols(_) => cuda.concat_cols(&xd, &yd).map(drop),
            Ew::SliceRows(s, e) => cuda.slice_rows(&xd, s, e).map(drop),
            Ew::SliceCols(s, e) => cuda.slice_cols(&xd, s, e).map(drop),
            Ew::RoundTrip => Ok(()),
        })?;
        let bytes = 2 * (rows * cols + y.rows * y.cols + out_elems);
        c.timed(ms, gbs(bytes as f64, ms));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Encoder ops

fn ck_norm(c: &mut Check, rms: bool, rows: usize, cols: usize) -> R<()> {
    let x = c.randn(rows, cols, 0.3, 2.0);
    let w = c.randn_f32(1, cols, 1.0, 0.2).data;
    let bias = c.randn_f32(1, cols, 0.0, 0.2).data;
    fn on<B: EncoderBackend>(b: &B, rms: bool, x: &Mat, w: &[f32], bias: &[f32]) -> E<Vec<f32>> {
        let n = w.len();
        let wv = b.load_vector("w", host(&[n], w.to_vec()))?;
        let t = up(b, x)?;
        let y = if rms {
            b.rms_norm(&t, &wv, 1e-6)?
        } else {
            let bv = b.load_vector("b", host(&[n], bias.to_vec()))?;
            b.layer_norm(&t, &wv, &bv, 1e-5)?
        };
        b.download(&y)
    }
    let got = on(&c.cuda, rms, &x, &w, &bias)?;
    let want = on(&c.cpu, rms, &x, &w, &bias)?;
    let name = if rms { "rms_norm" } else { "layer_norm" };
    c.record(
        "op",
        name,
        &format!("[{rows}, {cols}]"),
        &got,
        &want,
        tol::BF16_OP,
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn ck_attention_masked(
    c: &mut Check,
    name: &str,
    l: usize,
    heads: usize,
    hd: usize,
    scale: f32,
    with_bias: bool,
    causal: bool,
) -> R<()> {
    let qkv = c.randn(l, 3 * heads * hd, 0.0, 1.0);
    let bias = with_bias.then(|| c.randn_f32(heads * l, l, 0.0, 2.0));
    fn on<B: EncoderBackend>(
        b: &B,
        qkv: &Mat,
        (heads, hd, scale): (usize, usize, f32),
        bias: Option<&Mat>,
        causal: bool,
    ) -> E<Vec<f32>> {
        let bias = bias.map(|m| up(b, m)).transpose()?;
        b.download(&b.attention_masked(&up(b, qkv)?, heads, hd, scale, bias.as_ref(), causal)?)
    }
    let got = on(&c.cuda, &qkv, (heads, hd, scale), bias.as_ref(), causal)?;
    let want = on(&c.cpu, &qkv, (heads, hd, scale), bias.as_ref(), causal)?;
    // Heads wider than 128 run as GEMMs + softmax with bf16 probabilities (BF16_OP_ROUNDED).
    let t = if hd > 128 {
        tol::BF16_OP_ROUNDED
    } else {
        tol::BF16_OP
    };
    let shape = format!(
        "L{l} H{heads} Dh{hd}{}{}",
        if with_bias { " +bias" } else { "" },
        if causal { " causal" } else { "" }
    );
    if c.record("op", name, &shape, &got, &want, t) && l >= 4096 {
        let cuda = c.cuda.clone();
        let qd = cuda.upload_bf16(&qkv.data, l, 3 * heads * hd)?;
        let ms = c.time(1, &mut || {
            cuda.attention_masked(&qd, heads, hd, scale, None, causal)
                .map(drop)
        })?;
        c.timed(ms, tflops(4.0 * (l * l * heads * hd) as f64, ms));
    }
    Ok(())
}

/// A convolution over an `h × w` map; at real sizes the CPU computes two bands of output rows
/// (top and bottom edge, where the padding is) from the input rows they read.
#[allow(clippy::too_many_arguments)]
fn ck_conv(
    c: &mut Check,
    name: &str,
    (h, w): (usize, usize),
    (cin, cout, k): (usize, usize, usize),
    stride: usize,
    pad: Pad,
    band: Option<usize>,
) -> R<()> {
    let x = c.randn(h * w, cin, 0.0, 1.0);
    let std = 1.0 / ((cin * k * k) as f32).sqrt();
    let wt = c.randn(cout, cin * k * k, 0.0, std).data;
    let bias = c.randn(1, cout, 0.0, 0.05).data;
    fn on<B: EncoderBackend>(
        b: &B,
        x: &Mat,
        hw: (usize, usize),
        (cout, cin, k): (usize, usize, usize),
        (wt, bias): (&[f32], &[f32]),
        (stride, pad): (usize, Pad),
    ) -> E<(Vec<f32>, (usize, usize))> {
        let conv = b.load_conv(
            "c",
            host(&[cout, cin, k, k], wt.to_vec()),
            Some(host(&[cout], bias.to_vec())),
        )?;
        let (y, ohw) = b.conv2d(&up(b, x)?, hw, &conv, stride, pad)?;
        Ok((b.download(&y)?, ohw))
    }
    let dims = (cout, cin, k);
    let (full, (ho, wo)) = on(&c.cuda, &x, (h, w), dims, (&wt, &bias), (stride, pad))?;
    let (got, want) = match band {
        None => {
            let (want, _) = on(&c.cpu, &x, (h, w), dims, (&wt, &bias), (stride, pad))?;
            (full.clone(), want)
        }
        Some(n) => {
            let (mut got, mut want) = (Vec::new(), Vec::new());
            for (oy0, oy1) in [(0, n), (ho - n, ho)] {
                let start = (oy0 * stride) as isize - pad.top as isize;
                let end = ((oy1 - 1) * stride + k) as isize - pad.top as isize;
                let (r0, r1) = (start.max(0) as usize, (end.min(h as isize)) as usize);
                let bpad = Pad {
                    top: (-start).max(0) as usize,
                    bottom: (end - h as isize).max(0) as usize,
                    ..pad
                };
                let xb = Mat {
                    rows: (r1 - r0) * w,
                    cols: cin,
                    data: x.data[r0 * w * cin..r1 * w * cin].to_vec(),
                };
                let (wb, bhw) = on(
                    &c.cpu,
                    &xb,
                    (r1 - r0, w),
                    dims,
                    (&wt, &bias),
                    (stride, bpad),
                )?;
                if bhw != (oy1 - oy0, wo) {
                    return Err(format!("band geometry {bhw:?} ≠ {:?}", (oy1 - oy0, wo)).into());
                }
                got.extend_from_slice(&full[oy0 * wo * cout..oy1 * wo * cout]);
                want.extend(wb);
            }
            (got, want)
        }
    };
    let shape = format!(
        "{h}×{w}×{cin} → {ho}×{wo}×{cout} k{k} s{stride}{}",
        if band.is_some() { " (bands)" } else { "" }
    );
    if c.record("op", name, &shape, &got, &want, tol::BF16_OP) && h * w >= 1 << 16 {
        let cuda = c.cuda.clone();
        let conv = cuda.load_conv(
            "c",
            host(&[cout, cin, k, k], wt.clone()),
            Some(host(&[cout], bias.clone())),
        )?;
        let xd = cuda.upload_bf16(&x.data, h * w, cin)?;
        let ms = c.time(1, &mut || {
            cuda.conv2d(&xd, (h, w), &conv, stride, pad).map(drop)
        })?;
        c.timed(ms, tflops(2.0 * (ho * wo * cout * cin * k * k) as f64, ms));
    }
    Ok(())
}

fn ck_group_norm(c: &mut Check, pixels: usize, ch: usize, groups: usize, silu: bool) -> R<()> {
    let x = c.randn(pixels, ch, 0.5, 2.0);
    let w = c.randn_f32(1, ch, 1.0, 0.2).data;
    let bias = c.randn_f32(1, ch, 0.0, 0.2).data;
    fn on<B: EncoderBackend>(
        b: &B,
        x: &Mat,
        w: &[f32],
        bias: &[f32],
        groups: usize,
        silu: bool,
    ) -> E<Vec<f32>> {
        let n = w.len();
        let wv = b.load_vector("w", host(&[n], w.to_vec()))?;
        let bv = b.load_vector("b", host(&[n], bias.to_vec()))?;
        b.download(&b.group_norm(&up(b, x)?, groups, &wv, &bv, 1e-6, silu)?)
    }
    let got = on(&c.cuda, &x, &w, &bias, groups, silu)?;
    let want = on(&c.cpu, &x, &w, &bias, groups, silu)?;
    let name = if silu {
        "group_norm+silu"
    } else {
        "group_norm"
    };
    if c.record(
        "op",
        name,
        &format!("[{pixels}, {ch}] G{groups}"),
        &got,
        &want,
        tol::BF16_OP,
    ) && pixels >= 1 << 16
    {
        let cuda = c.cuda.clone();
        let wv = cuda.load_vector("w", host(&[ch], w.clone()))?;
        let bv = cuda.load_vector("b", host(&[ch], bias.clone()))?;
        let xd = cuda.upload_bf16(&x.data, pixels, ch)?;
        let ms = c.time(3, &mut || {
            cuda.group_norm(&xd, groups, &wv, &bv, 1e-6, silu).map(drop)
        })?;
        c.timed(ms, gbs((4 * 2 * pixels * ch) as f64, ms));
    }
    Ok(())
}

fn ck_upsample(c: &mut Check, (h, w): (usize, usize), ch: usize) -> R<()> {
    let x = c.randn(h * w, ch, 0.0, 1.0);
    fn on<B: EncoderBackend>(b: &B, x: &Mat, hw: (usize, usize)) -> E<Vec<f32>> {
        b.download(&b.upsample_nearest2x(&up(b, x)?, hw)?)
    }
    let got = on(&c.cuda, &x, (h, w))?;
    let want = on(&c.cpu, &x, (h, w))?;
    if c.record(
        "op",
        "upsample_nearest2x",
        &format!("{h}×{w}×{ch}"),
        &got,
        &want,
        tol::EXACT,
    ) && h * w >= 1 << 14
    {
        let cuda = c.cuda.clone();
        let xd = cuda.upload_bf16(&x.data, h * w, ch)?;
        let ms = c.time(3, &mut || cuda.upsample_nearest2x(&xd, (h, w)).map(drop))?;
        c.timed(ms, gbs((2 * 5 * h * w * ch) as f64, ms));
    }
    Ok(())
}

/// (name, (M, K, N), bias, fp8 weight).
type LinearCase = (&'static str, (usize, usize, usize), bool, bool);
/// (name, (H, W), (Cin, Cout, k), stride, padding).
type ConvCase = (
    &'static str,
    (usize, usize),
    (usize, usize, usize),
    usize,
    Pad,
);

fn ops(c: &mut Check, real: bool) {
    // Transformer ops: tiny, odd, then the real shapes.
    let linears: &[LinearCase] = &[
        ("linear", (3, 8, 5), true, false),
        ("linear", (37, 61, 45), true, false),
        ("linear", (37, 61, 45), false, false),
        ("linear", (37, 61, 45), true, true),
        ("linear", (1, 96, 72), true, true),
    ];
    for &(name, mkn, bias, fp8) in linears {
        c.guard("op", name, |c| ck_linear(c, name, mkn, bias, fp8));
    }
    let ew: &[(Ew, usize, usize)] = &[
        (Ew::Silu, 1, 1),
        (Ew::Silu, 3, 300),
        (Ew::GeluTanh, 67, 1000),
        (Ew::QuickGelu, 67, 1000),
        (Ew::GeluTanhGate, 7, 26),
        (Ew::Affine, 35, 4),
        (Ew::AddAssign, 67, 1000),
        (Ew::GateResidual, 67, 1000),
        (Ew::ConcatRows(5), 3, 7),
        (Ew::ConcatCols(13), 9, 7),
        (Ew::SliceRows(2, 7), 9, 7),
        (Ew::SliceCols(3, 11), 9, 13),
        (Ew::RoundTrip, 9, 13),
    ];
    for &(op, r, cc) in ew {
        c.guard("op", &format!("{op:?}"), |c| ck_ew(c, op, r, cc));
    }
    for (r, cc) in [(1, 8), (37, 3001)] {
        c.guard("op", "norm_modulate", |c| ck_norm_modulate(c, r, cc));
    }
    for (r, h, hd, w, lpe, row0) in [(3, 2, 8, 48, 5, 2), (9, 3, 6, 61, 9, 0)] {
        c.guard("op", "qk_norm_rope", |c| {
            ck_qk_norm_rope(c, r, h, hd, w, lpe, row0)
        });
    }
    for (l, h, hd, extra) in [(5, 2, 8, 0), (37, 3, 64, 5), (300, 24, 128, 12288)] {
        c.guard("op", "attention", |c| ck_attention(c, l, h, hd, extra));
    }
    // (L, heads, Dh, extra columns, split): fused (Dh 64, 128; two streams or one), fallback
    // (Dh 6, odd width; two streams).
    for (l, h, hd, extra, split) in [(37, 1, 64, 8, 20), (100, 2, 128, 0, 100), (9, 3, 6, 1, 4)] {
        c.guard("op", "attention_qk_norm_rope", |c| {
            ck_attention_fused(c, l, (h, hd), extra, split)
        });
    }
    // A single block's branches into one buffer: fused attention (Dh 64), fallback (Dh 6).
    for (l, h, hd, m) in [(37, 1, 64, 24), (9, 3, 6, 5)] {
        c.guard("op", "single_block_branches", |c| {
            ck_single_branches(c, l, (h, hd), m)
        });
    }
    // Encoder ops, tiny and odd.
    c.guard("op", "layer_norm", |c| ck_norm(c, false, 5, 33));
    c.guard("op", "rms_norm", |c| ck_norm(c, true, 5, 33));
    c.guard("op", "attention_masked", |c| {
        ck_attention_masked(c, "attention_masked", 37, 3, 8, 1.0, true, true)
    });
    c.guard("op", "attention_masked", |c| {
        ck_attention_masked(
            c,
            "attention (wide head)",
            100,
            1,
            512,
            1.0 / 512f32.sqrt(),
            false,
            false,
        )
    });
    let convs: &[ConvCase] = &[
        ("conv2d 3×3", (5, 7), (3, 4, 3), 1, Pad::same(1)),
        ("conv2d downsample", (9, 8), (4, 8, 3), 2, Pad::DOWNSAMPLE),
        ("conv2d downsample", (7, 9), (5, 6, 3), 2, Pad::DOWNSAMPLE),
        ("conv2d 1×1", (6, 5), (16, 8, 1), 1, Pad::same(0)),
    ];
    for &(name, hw, dims, s, p) in convs {
        c.guard("op", name, |c| ck_conv(c, name, hw, dims, s, p, None));
    }
    c.guard("op", "group_norm", |c| ck_group_norm(c, 35, 12, 3, true));
    c.guard("op", "group_norm", |c| ck_group_norm(c, 6, 8, 4, false));
    c.guard("op", "upsample_nearest2x", |c| ck_upsample(c, (2, 3), 4));
    if !real {
        return;
    }

    // Real Kontext shapes. Double block streams: img Ni = 8192 rows, txt Lt = 512; single
    // blocks and attention over L = 8704.
    let real_linears: &[LinearCase] = &[
        ("linear img_in", (NI, 64, D), true, false),
        ("linear txt_in", (LT, 4096, D), true, false),
        ("linear modulation (double)", (1, D, 6 * D), true, false),
        ("linear img_attn.qkv", (NI, D, 3 * D), true, false),
        ("linear img_attn.proj", (NI, D, D), true, false),
        ("linear img_mlp.0", (NI, D, M), true, false),
        ("linear img_mlp.2", (NI, M, D), true, false),
        ("linear single linear1", (L, D, 3 * D + M), true, false),
        ("linear single linear2", (L, D + M, D), true, false),
        ("linear final_layer", (NI, D, 64), true, false),
        ("linear single linear1", (L, D, 3 * D + M), true, true),
        ("linear img_mlp.2", (NI, M, D), true, true),
    ];
    for &(name, mkn, bias, fp8) in real_linears {
        c.guard("op", name, |c| ck_linear(c, name, mkn, bias, fp8));
    }
    c.guard("op", "norm_modulate", |c| ck_norm_modulate(c, NI, D));
    // img stream of a double block (pe rows after the text), and a single block's linear1.
    c.guard("op", "qk_norm_rope", |c| {
        ck_qk_norm_rope(c, NI, H, DH, 3 * D, L, LT)
    });
    c.guard("op", "qk_norm_rope", |c| {
        ck_qk_norm_rope(c, L, H, DH, 3 * D + M, L, 0)
    });
    c.guard("op", "attention", |c| ck_attention(c, L, H, DH, M));
    // A single block's linear1 buffer; a double block's [txt ‖ img] qkv.
    c.guard("op", "attention_qk_norm_rope", |c| {
        ck_attention_fused(c, L, (H, DH), M, L)
    });
    c.guard("op", "attention_qk_norm_rope", |c| {
        ck_attention_fused(c, L, (H, DH), 0, LT)
    });
    c.guard("op", "single_block_branches", |c| {
        ck_single_branches(c, L, (H, DH), M)
    });
    let real_ew: &[(Ew, usize, usize)] = &[
        (Ew::Silu, 1, D),
        (Ew::GeluTanh, L, M),
        (Ew::GateResidual, NI, D),
        (Ew::AddAssign, L, D),
        (Ew::ConcatRows(NI), LT, 3 * D),
        (Ew::ConcatCols(M), L, D),
        (Ew::SliceRows(LT, L), L, D),
        (Ew::SliceCols(3 * D, 3 * D + M), L, 3 * D + M),
        (Ew::SliceCols(D, 2 * D), 1, 6 * D),
        (Ew::RoundTrip, NI, 64),
        // T5-XXL and CLIP-L shapes.
        (Ew::GeluTanhGate, 512, 2 * 10240),
        (Ew::QuickGelu, 77, 3072),
        (Ew::Affine, 128 * 128, 16),
    ];
    for &(op, r, cc) in real_ew {
        c.guard("op", &format!("{op:?}"), |c| ck_ew(c, op, r, cc));
    }
    c.guard("op", "rms_norm", |c| ck_norm(c, true, 512, 4096));
    c.guard("op", "layer_norm", |c| ck_norm(c, false, 77, 768));
    c.guard("op", "attention_masked", |c| {
        ck_attention_masked(c, "attention_masked (T5)", 512, 64, 64, 1.0, true, false)
    });
    c.guard("op", "attention_masked", |c| {
        ck_attention_masked(c, "attention_masked (CLIP)", 77, 12, 64, 0.125, false, true)
    });
    // The VAE's mid-block attention at 1024² (128² latent pixels, one 512-wide head).
    c.guard("op", "attention (VAE mid)", |c| {
        ck_attention_masked(
            c,
            "attention (VAE mid, wide)",
            128 * 128,
            1,
            512,
            1.0 / 512f32.sqrt(),
            false,
            false,
        )
    });
    // The VAE at 1024²: decoder's last level and conv_out, encoder's conv_in, its first
    // Downsample, a mid-block convolution at 128² and a 1×1 shortcut.
    let real_convs: &[ConvCase] = &[
        ("conv2d conv_in", (1024, 1024), (3, 128, 3), 1, Pad::same(1)),
        (
            "conv2d up.0 3×3",
            (1024, 1024),
            (128, 128, 3),
            1,
            Pad::same(1),
        ),
        (
            "conv2d down.0 downsample",
            (1024, 1024),
            (128, 128, 3),
            2,
            Pad::DOWNSAMPLE,
        ),
        ("conv2d mid 3×3", (128, 128), (512, 512, 3), 1, Pad::same(1)),
        (
            "conv2d conv_out",
            (1024, 1024),
            (128, 3, 3),
            1,
            Pad::same(1),
        ),
        (
            "conv2d nin_shortcut 1×1",
            (512, 512),
            (256, 128, 1),
            1,
            Pad::same(0),
        ),
    ];
    for &(name, hw, dims, s, p) in real_convs {
        c.guard("op", name, |c| ck_conv(c, name, hw, dims, s, p, Some(4)));
    }
    c.guard("op", "group_norm", |c| {
        ck_group_norm(c, 1024 * 1024, 128, 32, true)
    });
    c.guard("op", "upsample_nearest2x", |c| {
        ck_upsample(c, (128, 128), 512)
    });
}

// ---------------------------------------------------------------------------------------------
// Blocks at the real widths

fn ck_blocks(c: &mut Check, lt: usize, ni: usize) -> R<()> {
    let cfg = FluxConfig::kontext_dev();
    let dims = BlockDims {
        hidden: D,
        num_heads: H,
        head_dim: DH,
        mlp_hidden: M,
    };
    // One double and one single block's random weights, rounded to bf16 so both sides hold the
    // same weights and only the activations' rounding differs.
    let src = LazyRandomWeights::new(&cfg, c.seed());
    let mut map = WeightMap::new();
    for (key, _) in kontext_loader::transformer::expected_shapes(&cfg) {
        if key.starts_with("double_blocks.0.") || key.starts_with("single_blocks.0.") {
            let mut w = src.weight(&key)?;
            w.data.par_iter_mut().for_each(|v| *v = rb(*v));
            map.insert(key, w);
        }
    }
    let l = lt + ni;
    let img = c.randn(ni, D, 0.0, 1.0);
    let txt = c.randn(lt, D, 0.0, 1.0);
    let vec = c.randn(1, D, 0.0, 1.0);
    let angles = c.randn_f32(l, DH / 2, 0.0, 3.0).data;
    let pe: Vec<f32> = angles.iter().flat_map(|a| [a.cos(), a.sin()]).collect();
    fn double<B: Backend>(
        b: &B,
        w: &WeightMap,
        dims: BlockDims,
        (img, txt, vec): (&Mat, &Mat, &Mat),
        pe: &[f32],
    ) -> E<(Vec<f32>, Vec<f32>)> {
        let blk = DoubleStreamBlock::load(b, w, 0, dims, true)?;
        let pe = b.upload(pe, img.rows + txt.rows, dims.head_dim)?;
        let (i, t) = blk.forward(b, up(b, img)?, up(b, txt)?, &up(b, vec)?, &pe)?;
        Ok((b.download(&i)?, b.download(&t)?))
    }
    fn single<B: Backend>(
        b: &B,
        w: &WeightMap,
        dims: BlockDims,
        (x, vec): (&Mat, &Mat),
        pe: &[f32],
    ) -> E<Vec<f32>> {
        let blk = SingleStreamBlock::load(b, w, 0, dims)?;
        let pe = b.upload(pe, x.rows, dims.head_dim)?;
        b.download(&blk.forward(b, up(b, x)?, &up(b, vec)?, &pe)?)
    }
    let (gi, gt) = double(&c.cuda, &map, dims, (&img, &txt, &vec), &pe)?;
    let (wi, wt) = double(&c.cpu, &map, dims, (&img, &txt, &vec), &pe)?;
    let shape = format!("Lt {lt} + Ni {ni}, D{D} H{H}×{DH} M{M}");
    c.record(
        "block",
        "double block: img",
        &shape,
        &gi,
        &wi,
        tol::BF16_MODEL,
    );
    c.record(
        "block",
        "double block: txt",
        &shape,
        &gt,
        &wt,
        tol::BF16_MODEL,
    );
    let x = Mat {
        rows: l,
        cols: D,
        data: [txt.data.clone(), img.data.clone()].concat(),
    };
    let g = single(&c.cuda, &map, dims, (&x, &vec), &pe)?;
    let w = single(&c.cpu, &map, dims, (&x, &vec), &pe)?;
    c.record("block", "single block", &shape, &g, &w, tol::BF16_MODEL);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Models: the transformer fixtures and the tiny pipeline

fn decode_all(path: &Path) -> R<BTreeMap<String, Vec<f32>>> {
    let set = TensorSet::open(path)?;
    let mut out = BTreeMap::new();
    for k in set.keys() {
        let info = set.info(k).ok_or("listed key")?;
        if !info.dtype.is_float() {
            continue;
        }
        let mut v = Vec::new();
        let bytes = set.bytes(k).ok_or("listed key")?;
        kontext_loader::dtype::decode_into(info.dtype, bytes.as_slice(), 1.0, &mut v);
        out.insert(k.clone(), v);
    }
    Ok(out)
}

fn ck_transformer_fixture(c: &mut Check, name: &str) -> R<()> {
    let dir = c.fixtures.join("transformer").join(name);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json"))?)?;
    let axes: Vec<usize> = meta["axes_dim"]
        .as_array()
        .ok_or("axes_dim")?
        .iter()
        .filter_map(|v| v.as_u64().map(|v| v as usize))
        .collect();
    let t = decode_all(&dir.join("forward.safetensors"))?;
    let g = |k: &str| {
        t.get(k)
            .ok_or_else(|| format!("forward.safetensors: no {k}"))
    };
    let inp = FluxInputs {
        img: g("img")?,
        img_ids: g("img_ids")?,
        txt: g("txt")?,
        txt_ids: g("txt_ids")?,
        t: g("timestep")?[0],
        guidance: g("guidance")?[0],
        y: g("pooled")?,
    };
    // Device bytes the weights took: the fp8 file's must be the bf16 file's less one byte per
    // fp8 element (plus at most a few bytes of scales per weight): fp8 stays one byte on the GPU.
    let mut uploaded: Vec<(u64, usize, usize)> = Vec::new(); // (bytes, fp8 elements, fp8 weights)
    for file in ["bfl.safetensors", "bfl_fp8_scaled.safetensors"] {
        let tr = load_transformer(
            &dir.join(file),
            &TransformerOptions {
                axes_dim: Some(axes.clone()),
            },
        )?;
        let before = c.gpu.as_ref().map_or(0, |g| g.allocated_bytes());
        let on_gpu = Flux::from_transformer(c.cuda.clone(), &tr)?;
        let after = c.gpu.as_ref().map_or(0, |g| g.allocated_bytes());
        let fp8_weights: Vec<usize> = tr
            .weights
            .weights
            .values()
            .filter(|w| w.dtype.size_bytes() == 1)
            .map(|w| w.numel())
            .collect();
        uploaded.push((after - before, fp8_weights.iter().sum(), fp8_weights.len()));
        let fp8 = on_gpu.double_blocks[0].img_attn.qkv.fp8;
        let got = on_gpu.forward(&inp, None)?;
        let want = Flux::from_transformer(CpuBackend, &tr)?.forward(&inp, None)?;
        let label = format!("transformer {name} {}", if fp8 { "fp8" } else { "bf16" });
        c.record("model", &label, file, &got, &want, tol::BF16_MODEL);
        if file.contains("fp8") && !fp8 {
            c.fail(
                "model",
                &label,
                "fp8 weights did not stay fp8 on the GPU".into(),
            );
        }
    }
    if let [(bf16_bytes, _, _), (fp8_bytes, elems, count)] = uploaded[..] {
        if c.gpu.is_some() {
            let saved = bf16_bytes as i64 - fp8_bytes as i64;
            let label = format!("transformer {name} fp8 bytes");
            // Per fp8 weight: its scales (one f32 per part, at most 3 parts) may be uploaded.
            let ok =
                elems > 0 && saved <= elems as i64 && saved >= elems as i64 - 16 * count as i64;
            let note = format!(
                "weights {fp8_bytes} B on the device, {bf16_bytes} B as bf16: {saved} B saved \
                 for {elems} fp8 elements in {count} weights (1 byte each, not 2)"
            );
            if ok {
                c.note("model", &label, note);
            } else {
                c.fail("model", &label, note);
            }
        }
    }
    Ok(())
}

struct CaseRun {
    stages: BTreeMap<String, Vec<f32>>,
    image: RgbImage,
    /// Device allocations counted at the loop's start and after its last step (CUDA).
    loop_allocs: Option<(u64, u64)>,
    steps: usize,
}

fn run_case(c: &Check, p: &Pipeline, case: &str) -> R<CaseRun> {
    let dir = c.fixtures.join("pipeline");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json"))?)?;
    let m = &meta["cases"][case];
    let (noise, _) = read_noise_file(&dir.join(format!("{case}_noise.safetensors")))?;
    let context = match case {
        "edit" => Some(RgbImage::open(&dir.join("context.png"))?),
        _ => None,
    };
    let num = |k: &str| {
        m[k].as_u64()
            .ok_or_else(|| format!("meta.json: {case}.{k}"))
    };
    let opts = EditOptions {
        steps: num("num_inference_steps")? as usize,
        guidance: m["guidance_scale"].as_f64().ok_or("guidance_scale")? as f32,
        noise: NoiseSource::Tensor(noise),
        width: Some(num("width")? as usize),
        height: Some(num("height")? as usize),
        resize: ResizePolicy::None,
    };
    let gpu = match &p.engine {
        Engine::Cuda(models) => models.flux.backend.gpu().cloned(),
        Engine::Cpu(_) => None,
    };
    let mut stages = BTreeMap::new();
    let mut hook = |name: &str, v: &[f32]| {
        stages.insert(name.to_string(), v.to_vec());
    };
    let (mut start, mut end) = (None, None);
    let mut progress = |e: &Progress| {
        if let Some(g) = &gpu {
            match e {
                Progress::Denoising { .. } => start = Some(g.allocations()),
                Progress::Step { .. } => end = Some(g.allocations()),
                _ => {}
            }
        }
    };
    let out = p.run(
        context.as_ref(),
        m["prompt"].as_str().ok_or("prompt")?,
        &opts,
        &mut progress,
        Some(&mut hook),
    )?;
    Ok(CaseRun {
        stages,
        image: out.image,
        loop_allocs: start.zip(end),
        steps: opts.steps,
    })
}

fn pixel_diff(a: &RgbImage, b: &RgbImage) -> (i32, f64) {
    let d: Vec<i32> = a
        .pixels
        .iter()
        .zip(&b.pixels)
        .map(|(&x, &y)| (x as i32 - y as i32).abs())
        .collect();
    let off = d.iter().filter(|&&v| v > 0).count() as f64 / d.len().max(1) as f64;
    (d.iter().copied().max().unwrap_or(0), off)
}

fn ck_pipeline(c: &mut Check) -> R<()> {
    let paths = ModelPaths::discover(&c.fixtures.join("pipeline/tiny-kontext"))?;
    let cpu = Pipeline::load(&paths, Device::Cpu)?;
    let cuda = Pipeline::load(&paths, Device::Cuda)?;
    if let Engine::Cuda(m) = &cuda.engine {
        m.flux.backend.set_poison(true);
    }
    for case in ["edit", "t2i"] {
        let refs = decode_all(
            &c.fixtures
                .join(format!("pipeline/{case}_stages.safetensors")),
        )?;
        let ours = run_case(c, &cpu, case)?;
        let gpu = run_case(c, &cuda, case)?;
        let last = format!("latents_step{}", ours.steps);
        let mut pairs = vec![
            ("prompt_embeds", "prompt_embeds"),
            ("pooled", "pooled"),
            ("latents_step1", "latents_step1"),
            (last.as_str(), "latents_final"),
            ("pixels", "decoder_output"),
        ];
        if case == "edit" {
            pairs.insert(2, ("image_latents", "image_latents"));
        }
        for (stage, theirs) in pairs {
            let (Some(g), Some(w)) = (gpu.stages.get(stage), ours.stages.get(stage)) else {
                c.fail(
                    "model",
                    &format!("{case}: {stage}"),
                    "stage not reported".into(),
                );
                continue;
            };
            c.record(
                "model",
                &format!("{case} cuda vs cpu: {stage}"),
                &format!("{} values", w.len()),
                g,
                w,
                tol::BF16_MODEL,
            );
            if let Some(r) = refs.get(theirs) {
                c.record(
                    "model",
                    &format!("{case} cpu vs diffusers: {stage}"),
                    &format!("{} values", r.len()),
                    w,
                    r,
                    tol::F32,
                );
            }
        }
        let (levels, off) = pixel_diff(&gpu.image, &ours.image);
        c.push(Row {
            section: "model",
            name: format!("{case} cuda vs cpu: image"),
            shape: format!("{}×{}", gpu.image.width, gpu.image.height),
            cmp: None,
            ok: levels <= tol::BF16_PIXEL_LEVELS
                && (gpu.image.width, gpu.image.height) == (ours.image.width, ours.image.height),
            note: format!(
                "max {levels} levels off (tol {}), {:.1} % of values differ",
                tol::BF16_PIXEL_LEVELS,
                off * 100.0
            ),
            ms: None,
            rate: String::new(),
        });
        let expected = RgbImage::open(&c.fixtures.join(format!("pipeline/{case}_expected.png")))?;
        let (cl, coff) = pixel_diff(&ours.image, &expected);
        let (gl, goff) = pixel_diff(&gpu.image, &expected);
        println!(
            "{case}: vs diffusers' PNG: cpu max {cl} levels ({:.2} % differ), cuda max {gl} levels ({:.1} % differ)",
            coff * 100.0,
            goff * 100.0
        );
        let (ok, note) = match gpu.loop_allocs {
            Some((a, b)) => (a == b, format!("{} device allocations", b - a)),
            None => (false, "no Denoising/Step events seen".to_string()),
        };
        c.push(Row {
            section: "model",
            name: format!("{case} cuda: loop allocations"),
            shape: format!("{} steps", gpu.steps),
            cmp: None,
            ok,
            note: format!("{note} (must be 0)"),
            ms: None,
            rate: String::new(),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// One real-size transformer step

/// FLOPs of one step by spec 7.1's rules: block GEMMs, attention, embedders and final layer.
fn step_flops(cfg: &FluxConfig, lt: usize, nx: usize, nc: usize) -> f64 {
    let (d, m) = (cfg.hidden_size as f64, cfg.mlp_hidden as f64);
    let (ni, l) = ((nx + nc) as f64, (lt + nx + nc) as f64);
    let blocks = (cfg.depth + cfg.depth_single) as f64;
    let w_blk = 4.0 * d * d + 2.0 * d * m;
    2.0 * w_blk * blocks * l
        + blocks * 4.0 * d * l * l
        + 2.0 * ni * cfg.in_channels as f64 * d
        + 2.0 * lt as f64 * cfg.context_in_dim as f64 * d
        + 2.0 * nx as f64 * d * cfg.out_channels as f64
}

/// One denoising step of the real transformer at a 1024² edit, or (`tiny`) of a 2-block,
/// 2-head × 128 one at 8×8 + 8×8 image tokens and 16 text tokens: the same code, small enough
/// for the emulated GPU.
fn ck_step(c: &mut Check, fp8: bool, tiny: bool) -> R<()> {
    let (cfg, lt, side) = if tiny {
        let cfg = FluxConfig {
            vec_in_dim: 32,
            context_in_dim: 64,
            hidden_size: 256,
            mlp_hidden: 1024,
            num_heads: 2,
            depth: 1,
            depth_single: 1,
            ..FluxConfig::kontext_dev()
        };
        (cfg, 16, 8)
    } else {
        (FluxConfig::kontext_dev(), LT, 64)
    };
    let seed = c.seed();
    let t0 = Instant::now();
    c.cuda.set_poison(false);
    let flux = if fp8 {
        Flux::load(
            c.cuda.clone(),
            cfg.clone(),
            &Fp8Weights {
                inner: LazyRandomWeights::new(&cfg, seed),
            },
        )?
    } else {
        Flux::load(
            c.cuda.clone(),
            cfg.clone(),
            &LazyRandomWeights::new(&cfg, seed),
        )?
    };
    let load_s = t0.elapsed().as_secs_f64();
    let gpu = c.gpu()?.clone();
    let (free, total) = gpu.mem_info()?;
    println!(
        "step: {} model loaded in {load_s:.1} s; GPU memory {:.1} of {:.1} GiB in use",
        if fp8 { "fp8" } else { "bf16" },
        (total - free) as f64 / (1u64 << 30) as f64,
        total as f64 / (1u64 << 30) as f64
    );
    // fp8 weights: both routes on the one loaded model (issue 13: measure both, keep the
    // faster) — dequantised into bf16 GEMMs (the default), then e4m3 × e4m3 GEMMs.
    let routes: &[bool] = if fp8 { &[false, true] } else { &[false] };
    for &e4m3 in routes {
        c.cuda.set_fp8_gemm(e4m3);
        c.cuda.set_poison(false);
        // 1024² edit: 64×64 target tokens at index 0, 64×64 context tokens at index 1.
        let (nx, nc) = (side * side, side * side);
        let x = c.randn(nx, cfg.in_channels, 0.0, 1.0).data;
        let ctx = c.randn(nc, cfg.in_channels, 0.0, 1.0).data;
        let mut ids = image_ids(side, side, 0.0);
        ids.extend(image_ids(side, side, 1.0));
        let txt = c.randn(lt, cfg.context_in_dim, 0.0, 0.3).data;
        let tids = txt_ids(lt);
        let y = c.randn(1, cfg.vec_in_dim, 0.0, 1.0).data;
        let inp = FluxInputs {
            img: &[],
            img_ids: &ids,
            txt: &txt,
            txt_ids: &tids,
            t: 0.7,
            guidance: 2.5,
            y: &y,
        };
        let mut out = Vec::new();
        let (mut times, mut graph_times) = (Vec::new(), Vec::new());
        let mut allocs = (0, 0);
        let (mut eager1, mut graph1) = (Vec::new(), Vec::new());
        // As the pipeline runs a step: the modulation of every step is computed once before the
        // loop (issue 7), the loop's state lives on the device, and a step is the forward plus the
        // Euler update (Flux::denoise_step); timed eagerly (CUDA events around its launches) and
        // as the pipeline runs it, one CUDA graph replayed (host clock around launch + sync).
        let mut cond = Vec::new();
        c.cuda.planned(
            &mut || flux.conditioning(&[inp.t], inp.guidance, inp.y).map(drop),
            &mut || {
                cond = flux.conditioning(&[inp.t], inp.guidance, inp.y)?;
                Ok::<(), EngineError>(())
            },
        )?;
        let cond = &cond[0];
        let dt = -0.01;
        let captures_before = c.cuda.graph_stats().0;
        c.cuda.planned(
            &mut || flux.denoise_plan(&x, &ctx, &inp, cond, dt),
            &mut || {
                let s = std::cell::RefCell::new(flux.denoise_state(&x, &ctx, &inp, cond, dt)?);
                flux.denoise_step(&mut s.borrow_mut())?; // warm-up: cuBLASLt plans, caches
                allocs.0 = gpu.allocations();
                for _ in 0..2 {
                    let ms = gpu.time_ms(|| flux.denoise_step(&mut s.borrow_mut()))?;
                    times.push(ms);
                }
                // Run 0 eager (the warm-up that decides), runs 1 and 2 replays of one graph.
                let mut last = Instant::now();
                c.cuda.repeat(
                    3,
                    &mut || flux.denoise_step(&mut s.borrow_mut()),
                    &mut |i| {
                        if i > 0 {
                            graph_times.push(last.elapsed().as_secs_f64() * 1e3);
                        }
                        last = Instant::now();
                        Ok(())
                    },
                )?;
                allocs.1 = gpu.allocations();
                out = flux.backend.download(&s.borrow().x)?;
                // A replayed step equals the eager step from the same state: one eager step from
                // x0, then x0 written back and a repeat of 2 (run 0 eager, whose result is
                // replaced by x0 again, run 1 a fresh capture's replay).
                let b = &flux.backend;
                let x0 = out.clone();
                flux.denoise_step(&mut s.borrow_mut())?;
                eager1 = b.download(&s.borrow().x)?;
                b.write(&mut s.borrow_mut().x, &x0)?;
                b.repeat(
                    2,
                    &mut || flux.denoise_step(&mut s.borrow_mut()),
                    &mut |i| {
                        if i == 0 {
                            b.write(&mut s.borrow_mut().x, &x0)
                        } else {
                            graph1 = b.download(&s.borrow().x)?;
                            Ok(())
                        }
                    },
                )?;
                Ok(())
            },
        )?;
        c.cuda.set_poison(true);
        // cuBLASLt may pick a reduction order that differs between runs; the step's f32 latents
        // must then still agree to the f32 op tolerance (bit for bit on the emulated GPU).
        let same = eager1 == graph1;
        let graph_ok = c.record(
            "step",
            &format!(
                "graph replay == eager step{}",
                if same { " (bit for bit)" } else { "" }
            ),
            &format!(
                "{} latents, {}",
                graph1.len(),
                match (fp8, e4m3) {
                    (false, _) => "bf16",
                    (true, false) => "fp8 dequantised",
                    (true, true) => "fp8 e4m3 x e4m3",
                }
            ),
            &graph1,
            &eager1,
            1e-5,
        );
        let ms = times
            .iter()
            .chain(&graph_times)
            .copied()
            .fold(f64::INFINITY, f64::min);
        let flop = step_flops(&cfg, lt, nx, nc);
        let label = format!(
            "transformer step {}{}",
            match (fp8, e4m3) {
                (false, _) => "bf16",
                (true, false) => "fp8 (dequantised)",
                (true, true) => "fp8 (e4m3 x e4m3)",
            },
            if tiny { " (tiny)" } else { "" }
        );
        let nonfinite = out.iter().filter(|v| !v.is_finite()).count();
        let pool = c.cuda.last_pool_bytes() as f64 / (1u64 << 30) as f64;
        let captured = c.cuda.graph_stats().0 > captures_before;
        let ok = nonfinite == 0 && !out.is_empty() && allocs.0 == allocs.1 && captured && graph_ok;
        c.push(Row {
            section: "step",
            name: label.clone(),
            shape: format!(
                "L{} ({lt}+{nx}+{nc}) {}+{} blocks",
                lt + nx + nc,
                cfg.depth,
                cfg.depth_single
            ),
            cmp: None,
            ok,
            note: format!(
                "{:.2} TFLOP (spec 7: 165.45); {} allocations in the timed steps; {nonfinite} NaN/Inf in the latents; pool {pool:.2} GiB; eager runs {:?} ms, CUDA-graph replays {:?} ms (the figure: the faster)",
                flop / 1e12,
                allocs.1 - allocs.0,
                times.iter().map(|t| format!("{t:.0}")).collect::<Vec<_>>(),
                graph_times.iter().map(|t| format!("{t:.0}")).collect::<Vec<_>>()
            ),
            ms: ok.then_some(ms),
            rate: if ok { tflops(flop, ms) } else { String::new() },
        });
        // One machine-readable line for benches/compare.py; the step section runs last, so
        // "correctness_passed" covers every check of this run before it.
        if tiny {
            continue; // no figure: the tiny step only proves the code
        }
        let mut sorted: Vec<f64> = times.iter().chain(&graph_times).copied().collect();
        sorted.sort_by(f64::total_cmp);
        let gpu_name = kontext_kernels::cuda_available()
            .map(|d| d.name)
            .unwrap_or_default();
        println!(
            "BENCH_JSON {}",
            serde_json::json!({
                "bench": "engine_step",
                "dtype": match (fp8, e4m3) {
                    (false, _) => "bf16",
                    (true, false) => "fp8",
                    (true, true) => "fp8_e4m3_gemm",
                },
                "gpu": gpu_name,
                "tokens": {"text": LT, "target": nx, "context": nc},
                "ms_median": sorted.get(sorted.len() / 2),
                "ms_min": sorted.first(),
                "ms_eager": times,
                "ms_graph": graph_times,
                "correctness_passed": ok && c.rows.iter().all(|r| r.ok),
            })
        );
    }
    c.cuda.set_fp8_gemm(false);
    Ok(())
}

// ---------------------------------------------------------------------------------------------

struct Opts {
    fixtures: PathBuf,
    quick: bool,
    dry_run: bool,
    step: bool,
    step_tiny: bool,
    budget: f64,
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        fixtures: PathBuf::from("tests/fixtures"),
        quick: false,
        dry_run: false,
        step: true,
        step_tiny: false,
        budget: 420.0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--fixtures" => o.fixtures = args.next().ok_or("--fixtures needs a folder")?.into(),
            "--quick" => o.quick = true,
            "--dry-run" => o.dry_run = true,
            "--no-step" => o.step = false,
            "--step-tiny" => o.step_tiny = true,
            "--budget" => {
                o.budget = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .ok_or("--budget needs seconds")?
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("kontext-gpu-check: {e}");
            return ExitCode::from(2);
        }
    };
    let start = Instant::now();
    let (cuda, gpu) = if opts.dry_run {
        println!(
            "dry run: the planner stands in for the GPU (its outputs are zeros: comparisons fail)"
        );
        (CudaBackend::planner(), None)
    } else {
        let info = match kontext_kernels::cuda_available() {
            Ok(i) => i,
            Err(why) => {
                eprintln!("kontext-gpu-check: no usable GPU: {why}");
                return ExitCode::from(2);
            }
        };
        println!("{info}");
        let cuda = match CudaBackend::new(0) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("kontext-gpu-check: setting up the CUDA backend failed: {e}");
                return ExitCode::from(2);
            }
        };
        if let Some(r) = cuda.kernels_report() {
            println!(
                "kernels: {} via NVRTC {}.{}: compiled {:?}, cached {:?}, {:.2} s",
                r.arch, r.nvrtc_version.0, r.nvrtc_version.1, r.compiled, r.cached, r.seconds
            );
        }
        let gpu = cuda.gpu().cloned();
        (cuda, gpu)
    };
    let device = gpu
        .as_ref()
        .map_or("no GPU (dry run)".to_string(), |g| g.info.name.clone());
    cuda.set_poison(true);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    println!(
        "seed {seed:#x}; rayon threads {}; fixtures {}",
        rayon::current_num_threads(),
        opts.fixtures.display()
    );
    let mut c = Check {
        cpu: CpuBackend,
        cuda,
        gpu: gpu.clone(),
        rng: Rng::new(seed),
        rows: Vec::new(),
        fixtures: opts.fixtures.clone(),
        start,
        budget: opts.budget,
    };
    println!("\n{}", Row::header());
    ops(&mut c, !opts.quick);
    println!("[{:.0} s] ops done", c.elapsed());
    if !opts.quick {
        c.guard("block", "blocks", |c| ck_blocks(c, 256, 768));
    }
    for name in ["a", "b"] {
        c.guard("model", &format!("transformer {name}"), |c| {
            ck_transformer_fixture(c, name)
        });
    }
    c.guard("model", "tiny pipeline", ck_pipeline);
    println!("[{:.0} s] models done", c.elapsed());
    let launched: Vec<String> = c
        .cuda
        .launch_counts()
        .into_iter()
        .filter(|&(_, n)| n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    println!("kernel launches: {}", launched.join(", "));
    if opts.step_tiny {
        // The step section's code at a tiny shape (the emulated GPU's check of it).
        c.guard("step", "transformer step bf16 (tiny)", |c| {
            ck_step(c, false, true)
        });
        c.guard("step", "transformer step fp8 (tiny)", |c| {
            ck_step(c, true, true)
        });
    }
    if opts.step && !opts.quick {
        c.guard("step", "transformer step bf16", |c| {
            ck_step(c, false, false)
        });
        c.guard("step", "transformer step fp8", |c| ck_step(c, true, false));
    }

    let failed = c.rows.iter().filter(|r| !r.ok).count();
    println!(
        "\n==== kontext-gpu-check: {} ({}) ====",
        device,
        if failed == 0 {
            "all passed"
        } else {
            "FAILURES"
        }
    );
    println!("{}", Row::header());
    for r in &c.rows {
        println!("{}", r.line());
    }
    // The end of the output, compact (a device run returns the last 12 kB): timings, failures.
    println!("\ntimings ({device}):");
    for r in c.rows.iter().filter(|r| r.ms.is_some()) {
        println!(
            "  {:<30} {:<36} {:>10.3} ms {:>14}",
            r.name,
            r.shape,
            r.ms.unwrap_or(0.0),
            r.rate
        );
    }
    if failed > 0 {
        println!("failed:");
        for r in c.rows.iter().filter(|r| !r.ok) {
            let worst = r
                .cmp
                .map(|c| {
                    format!(
                        " rel_l2 {:.2e} rel_max {:.2e} tol {:.1e}",
                        c.rel_l2, c.rel_max, c.tol
                    )
                })
                .unwrap_or_default();
            println!("  {} {} [{}]{worst} {}", r.section, r.name, r.shape, r.note);
        }
    }
    println!(
        "\n{} ({} rows, {failed} failed; {:.0} s; {} device allocations, {:.1} GiB allocated in all)",
        if failed == 0 { "GPU CHECK OK" } else { "GPU CHECK FAILED" },
        c.rows.len(),
        c.elapsed(),
        gpu.as_ref().map_or(0, |g| g.allocations()),
        gpu.as_ref().map_or(0, |g| g.allocated_bytes()) as f64 / (1u64 << 30) as f64
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// `Backend::single_block_branches` CUDA (attention and GELU written in place into one
/// `[L, D + M]` buffer) vs the CPU's slice, GELU and concatenation, on a poisoned output.
fn ck_single_branches(c: &mut Check, l: usize, (heads, hd): (usize, usize), m: usize) -> R<()> {
    let w = 3 * heads * hd + m;
    let lin1 = c.randn(l, w, 0.0, 1.5);
    let sc: Vec<Vec<f32>> = (0..2).map(|_| c.randn_f32(1, hd, 1.0, 0.2).data).collect();
    let angles = c.randn_f32(l, hd / 2, 0.0, 3.0).data;
    let pe: Vec<f32> = angles.iter().flat_map(|a| [a.cos(), a.sin()]).collect();
    fn on<B: Backend>(
        b: &B,
        lin1: &Mat,
        (heads, hd): (usize, usize),
        sc: &[Vec<f32>],
        pe: &[f32],
    ) -> E<Vec<f32>> {
        let mut t = up(b, lin1)?;
        let v = sc
            .iter()
            .map(|s| b.load_vector("qk scale", host(&[hd], s.clone())))
            .collect::<E<Vec<_>>>()?;
        let pe = b.upload(pe, lin1.rows, hd)?;
        let scales = QkScales { q: &v[0], k: &v[1] };
        b.download(&b.single_block_branches(&mut t, (heads, hd), scales, &pe)?)
    }
    let got = on(&c.cuda, &lin1, (heads, hd), &sc, &pe)?;
    let want = on(&c.cpu, &lin1, (heads, hd), &sc, &pe)?;
    c.record(
        "op",
        "single_block_branches",
        &format!("L{l} H{heads} Dh{hd} M{m}"),
        &got,
        &want,
        tol::BF16_OP_ROUNDED,
    );
    Ok(())
}

//! The production GEMM path (`kontext_kernels::gemm::Gemm`: the row-major → cuBLASLt mapping,
//! the plan cache, the bias epilogue) on the stand-in cuBLASLt, against an f64 reference on
//! fresh random data, with outputs poisoned (0xFF: NaN in bf16 and f32) before every GEMM.
//!
//! Tolerance per element, from the numerics cuBLASLt promises with `CUBLAS_COMPUTE_32F`:
//! - accumulation: the K products of bf16 values are exact in f32, and the sum, alpha·acc,
//!   beta·C and the bias add are at most K + 4 roundings of 2^-24 each, so
//!   |error| ≤ (K + 4)·2^-24·(|alpha|·Σ|a·b| + |beta·c| + |bias|);
//! - then one rounding to the output: half an ulp, ≤ 2^-8 relative for bf16 (8 significant
//!   bits), 2^-24 for f32.

use super::harness::gpu;
use kontext_kernels::gemm::Gemm;
use kontext_kernels::{DType, DeviceMat, Gpu};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

fn gemm() -> &'static Gemm {
    static GEMM: OnceLock<Gemm> = OnceLock::new();
    GEMM.get_or_init(|| Gemm::new(&gpu()).expect("cuBLASLt (the stand-in) opens"))
}

/// Fresh values in [-1, 1) for every check: a new seed per call (printed on failure).
fn fresh(n: usize) -> (Vec<f32>, u64) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let seed = base ^ NEXT.fetch_add(0x9E37_79B9, Ordering::Relaxed);
    (super::harness::random(n, seed), seed)
}

/// A row-major `[rows, cols]` matrix of `dtype` with row stride `ld`, filled with fresh values;
/// returns it and the exact values it holds (read back: bf16 rounding included).
fn random_mat(
    g: &Arc<Gpu>,
    dtype: DType,
    rows: usize,
    cols: usize,
    ld: usize,
) -> (DeviceMat, Vec<f64>, u64) {
    let bytes = ((rows.max(1) - 1) * ld + cols) * dtype.size();
    let mem = g.alloc(bytes).expect("alloc");
    let m = DeviceMat::new(mem, 0, rows, cols, ld, dtype).expect("view");
    let (data, seed) = fresh(rows * cols);
    g.write_f32(&m, &data).expect("upload");
    let exact = g
        .read_f32(&m)
        .expect("read back")
        .into_iter()
        .map(f64::from)
        .collect();
    (m, exact, seed)
}

/// Poisoned output `[rows, cols]` of `dtype` (row stride `ld`).
fn poisoned(g: &Arc<Gpu>, dtype: DType, rows: usize, cols: usize, ld: usize) -> DeviceMat {
    let bytes = ((rows.max(1) - 1) * ld + cols) * dtype.size();
    let mem = g.alloc(bytes).expect("alloc");
    let m = DeviceMat::new(mem, 0, rows, cols, ld, dtype).expect("view");
    g.fill_bytes(&m, 0xFF).expect("poison");
    m
}

/// One row-major GEMM problem: `C [m, n] = alpha·op(A)·op(B) + beta·C0 + bias`.
struct Problem<'a> {
    m: usize,
    n: usize,
    k: usize,
    a: &'a [f64],
    ta: bool,
    b: &'a [f64],
    tb: bool,
    c0: Option<&'a [f64]>,
    bias: Option<&'a [f64]>,
    alpha: f64,
    beta: f64,
}

/// The f64 reference and each element's tolerance for output type `out` (see the module docs).
fn reference(p: &Problem, out: DType) -> (Vec<f64>, Vec<f64>) {
    let (m, n, k) = (p.m, p.n, p.k);
    let rel_out = if out == DType::Bf16 {
        2f64.powi(-8)
    } else {
        2f64.powi(-24)
    };
    let mut want = vec![0.0; m * n];
    let mut tol = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let (mut acc, mut mag) = (0.0, 0.0);
            for q in 0..k {
                let av = if p.ta { p.a[q * m + i] } else { p.a[i * k + q] };
                let bv = if p.tb { p.b[j * k + q] } else { p.b[q * n + j] };
                acc += av * bv;
                mag += (av * bv).abs();
            }
            let mut v = p.alpha * acc;
            mag *= p.alpha.abs();
            if let Some(c0) = p.c0 {
                v += p.beta * c0[i * n + j];
                mag += (p.beta * c0[i * n + j]).abs();
            }
            if let Some(bias) = p.bias {
                v += bias[j];
                mag += bias[j].abs();
            }
            let acc_err = (k as f64 + 4.0) * 2f64.powi(-24) * mag;
            want[i * n + j] = v;
            tol[i * n + j] = acc_err + rel_out * (v.abs() + acc_err) + 1e-30;
        }
    }
    (want, tol)
}

/// The comparison: max abs and relative error, the worst index, the count over tolerance;
/// fails on any NaN/Inf or any element over its tolerance.
fn compare(what: &str, got: &[f32], want: &[f64], tol: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let (mut max_abs, mut max_rel, mut worst, mut worst_ratio, mut over) = (0f64, 0f64, 0, 0f64, 0);
    for (i, (&g, (&w, &t))) in got.iter().zip(want.iter().zip(tol)).enumerate() {
        assert!(
            g.is_finite(),
            "{what}: element {i} is {g} (want {w}): unwritten or overflowed"
        );
        let err = (f64::from(g) - w).abs();
        max_abs = max_abs.max(err);
        max_rel = max_rel.max(err / w.abs().max(1e-3));
        if err / t > worst_ratio {
            (worst, worst_ratio) = (i, err / t);
        }
        if err > t {
            over += 1;
        }
    }
    eprintln!(
        "{what}: max abs {max_abs:.3e}, max rel {max_rel:.3e}, worst [{worst}] err/tol {worst_ratio:.2}, {over} over"
    );
    assert_eq!(
        over, 0,
        "{what}: {over} elements over tolerance; worst [{worst}] got {} want {} (tol {:.3e})",
        got[worst], want[worst], tol[worst]
    );
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn linear_matches_f64_reference() {
    let g = gpu();
    // (M tokens, K in, N out): odd sizes, one element, and a slice of a real layer's width.
    for (m, k, n) in [
        (1, 1, 1),
        (3, 17, 33),
        (65, 33, 17),
        (130, 96, 72),
        (64, 3072, 96),
    ] {
        for with_bias in [false, true] {
            let (x, xv, sx) = random_mat(&g, DType::Bf16, m, k, k);
            let (w, wv, sw) = random_mat(&g, DType::Bf16, n, k, k);
            let (bias, bv, _) = random_mat(&g, DType::Bf16, 1, n, n);
            let y = poisoned(&g, DType::Bf16, m, n, n);
            gemm()
                .linear(&x, &w, with_bias.then_some(&bias), &y)
                .expect("linear");
            let p = Problem {
                m,
                n,
                k,
                a: &xv,
                ta: false,
                b: &wv,
                tb: true,
                c0: None,
                bias: with_bias.then_some(&bv[..]),
                alpha: 1.0,
                beta: 0.0,
            };
            let (want, tol) = reference(&p, DType::Bf16);
            let got = g.read_f32(&y).expect("read");
            compare(
                &format!("linear [{m},{k}]·[{n},{k}]ᵀ bias {with_bias} (seeds {sx:x} {sw:x})"),
                &got,
                &want,
                &tol,
            );
        }
    }
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn matmul_transposes_alpha_beta_and_f32_output() {
    let g = gpu();
    for (m, n, k) in [(5, 7, 4), (17, 3, 33), (33, 65, 9)] {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            for out in [DType::Bf16, DType::F32] {
                for with_bias in [false, true] {
                    let (a, av, sa) = if ta {
                        random_mat(&g, DType::Bf16, k, m, m)
                    } else {
                        random_mat(&g, DType::Bf16, m, k, k)
                    };
                    let (b, bv, sb) = if tb {
                        random_mat(&g, DType::Bf16, n, k, k)
                    } else {
                        random_mat(&g, DType::Bf16, k, n, n)
                    };
                    // C starts with values (beta ≠ 0 reads them); the bias has C's type.
                    let (c, cv, _) = random_mat(&g, out, m, n, n);
                    let (bias, biasv, _) = random_mat(&g, out, 1, n, n);
                    let (alpha, beta) = (-1.5f32, 0.75f32);
                    gemm()
                        .matmul(&a, ta, &b, tb, &c, with_bias.then_some(&bias), alpha, beta)
                        .expect("matmul");
                    let p = Problem {
                        m,
                        n,
                        k,
                        a: &av,
                        ta,
                        b: &bv,
                        tb,
                        c0: Some(&cv),
                        bias: with_bias.then_some(&biasv[..]),
                        alpha: alpha.into(),
                        beta: beta.into(),
                    };
                    let (want, tol) = reference(&p, out);
                    let got = g.read_f32(&c).expect("read");
                    compare(
                        &format!(
                            "matmul {m}x{n}x{k} ta {ta} tb {tb} {out} bias {with_bias} (seeds {sa:x} {sb:x})"
                        ),
                        &got,
                        &want,
                        &tol,
                    );
                }
            }
        }
    }
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn strided_views_write_only_their_elements() {
    let g = gpu();
    // x is a column range of a wider activation, y a column range of a wider output (a fused
    // projection's slice): row strides larger than the widths, unaligned starts.
    let (m, k, n) = (19, 40, 24);
    let (wide, _, _) = random_mat(&g, DType::Bf16, m, k + 13, k + 13);
    let x = wide.cols_range(5, 5 + k).expect("x view");
    let xv: Vec<f64> = g
        .read_f32(&x)
        .expect("read")
        .into_iter()
        .map(f64::from)
        .collect();
    let (w, wv, _) = random_mat(&g, DType::Bf16, n, k, k);
    let out = poisoned(&g, DType::Bf16, m, n + 9, n + 9);
    let y = out.cols_range(3, 3 + n).expect("y view");
    gemm().linear(&x, &w, None, &y).expect("linear");
    let p = Problem {
        m,
        n,
        k,
        a: &xv,
        ta: false,
        b: &wv,
        tb: true,
        c0: None,
        bias: None,
        alpha: 1.0,
        beta: 0.0,
    };
    let (want, tol) = reference(&p, DType::Bf16);
    compare(
        "linear into a strided view",
        &g.read_f32(&y).expect("read"),
        &want,
        &tol,
    );
    // Everything of the wider output outside the view still holds the poison.
    let all = g.read_bytes(&out).expect("read all");
    let row_bytes = (n + 9) * 2;
    let stray = all
        .iter()
        .enumerate()
        .filter(|&(i, &b)| {
            let col = (i % row_bytes) / 2;
            !(3..3 + n).contains(&col) && b != 0xFF
        })
        .count();
    assert_eq!(stray, 0, "{stray} bytes outside the view were written");
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn plans_are_reused_and_stay_correct() {
    let g = gpu();
    // Its own Gemm: the shared one gains plans from the tests running beside this one.
    let gemm = Gemm::new(&g).expect("cuBLASLt (the stand-in) opens");
    let (m, k, n) = (9, 48, 20);
    let (w, wv, _) = random_mat(&g, DType::Bf16, n, k, k);
    let (bias, bv, _) = random_mat(&g, DType::Bf16, 1, n, n);
    let mut planned = None;
    for round in 0..3 {
        // New inputs and outputs each round (fresh allocations: same alignments, new pointers).
        let (x, xv, _) = random_mat(&g, DType::Bf16, m, k, k);
        let y = poisoned(&g, DType::Bf16, m, n, n);
        gemm.linear(&x, &w, Some(&bias), &y).expect("linear");
        let p = Problem {
            m,
            n,
            k,
            a: &xv,
            ta: false,
            b: &wv,
            tb: true,
            c0: None,
            bias: Some(&bv),
            alpha: 1.0,
            beta: 0.0,
        };
        let (want, tol) = reference(&p, DType::Bf16);
        compare(
            &format!("cached plan, round {round}"),
            &g.read_f32(&y).expect("read"),
            &want,
            &tol,
        );
        let plans = gemm.plans();
        match planned {
            None => planned = Some(plans),
            Some(p0) => assert_eq!(plans, p0, "round {round} planned the same problem again"),
        }
    }
}

/// The e4m3fn code of `v` (round to nearest even, saturating), by search over the loader's table.
fn e4m3_rne(v: f32) -> u8 {
    use kontext_loader::dtype::E4M3_TO_F32;
    let sign = if v.is_sign_negative() { 0x80 } else { 0 };
    let a = f64::from(v.abs());
    let (mut best, mut best_err) = (0u8, f64::INFINITY);
    for code in 0..=0x7Eu8 {
        let err = (f64::from(f32::from_bits(E4M3_TO_F32[code as usize])) - a).abs();
        if err < best_err || (err == best_err && code % 2 == 0) {
            (best, best_err) = (code, err);
        }
    }
    best | sign
}

/// `x [m, k] · wᵀ` (w `[n, k]`) in f64, on every core.
fn matmul_f64(x: &[f64], w: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut y = vec![0.0; m * n];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let rows = m.div_ceil(threads);
    std::thread::scope(|s| {
        for (t, out) in y.chunks_mut(rows * n).enumerate() {
            s.spawn(move || {
                for (r, row) in out.chunks_mut(n).enumerate() {
                    let xi = &x[(t * rows + r) * k..][..k];
                    for (j, o) in row.iter_mut().enumerate() {
                        *o = xi.iter().zip(&w[j * k..][..k]).map(|(a, b)| a * b).sum();
                    }
                }
            });
        }
    });
    y
}

fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    let (mut e, mut r) = (0.0, 0.0);
    for (&g, &w) in got.iter().zip(want) {
        assert!(g.is_finite(), "unwritten or overflowed output");
        e += (f64::from(g) - w).powi(2);
        r += w * w;
    }
    (e / r).sqrt()
}

/// The two routes for an fp8 weight at a Flux width (in = out = 3072, L = 256), against the f64
/// product with the bf16 weight the fp8 one was quantised from, and against the f64 product with
/// the fp8 weight itself (what an fp8 checkpoint defines): (i) dequantise into bf16 + bf16 GEMM,
/// (ii) e4m3 activations (per-tensor scale) × e4m3 weight on cuBLASLt's fp8 path.
#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn fp8_routes_error_against_bf16() {
    let g = gpu();
    let k8 = kontext_kernels::Kernels::load(&g).expect("kernels");
    let (l, kin, n) = (256, 3072, 3072);
    // Activations like a modulated LayerNorm's: N(0, 1) with a few large outliers; weights
    // N(0, 0.02²) as in Flux's linears. Box–Muller on the harness' uniform stream.
    let normal = |count: usize, std: f32, seed: u64| -> Vec<f32> {
        let u = super::harness::random(2 * count, seed);
        (0..count)
            .map(|i| {
                let (a, b) = ((u[2 * i] + 1.0) * 0.5 + 1e-7, u[2 * i + 1]);
                let z = (-2.0 * a.ln()).sqrt() * (std::f32::consts::PI * b).cos();
                half::bf16::from_f32(std * z).to_f32()
            })
            .collect()
    };
    let mut x = normal(l * kin, 1.0, 11);
    for i in (0..x.len()).step_by(1009) {
        x[i] = half::bf16::from_f32(x[i] * 20.0).to_f32();
    }
    let w = normal(n * kin, 0.02, 12);
    let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
    let w_scale = amax / 448.0;
    let codes: Vec<u8> = w.iter().map(|&v| e4m3_rne(v / w_scale)).collect();
    let wq: Vec<f64> = codes
        .iter()
        .map(|&c| {
            f64::from(f32::from_bits(
                kontext_loader::dtype::E4M3_TO_F32[c as usize],
            )) * f64::from(w_scale)
        })
        .collect();
    let xd: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let wd: Vec<f64> = w.iter().map(|&v| f64::from(v)).collect();
    let ref_bf16 = matmul_f64(&xd, &wd, l, kin, n);
    let ref_fp8 = matmul_f64(&xd, &wq, l, kin, n);

    let dx = g.upload_bf16(&x, l, kin).expect("x");
    let w8 = g.upload_bytes(&codes, DType::F8E4M3, n, kin).expect("w8");
    let weight = kontext_kernels::weights::DeviceWeight::single(w8, w_scale);
    // (i) dequantise, bf16 GEMM.
    let wb = poisoned(&g, DType::Bf16, n, kin, kin);
    k8.dequant_fp8(&weight, &wb).expect("dequant");
    let y1 = poisoned(&g, DType::Bf16, l, n, n);
    gemm().linear(&dx, &wb, None, &y1).expect("bf16 gemm");
    let y1 = g.read_f32(&y1).expect("read");
    // (ii) quantised activations, fp8 GEMM.
    let x8 = poisoned(&g, DType::F8E4M3, l, kin, kin);
    let scales = poisoned(&g, DType::F32, 1, 2, 2);
    k8.quantise_e4m3(&dx, &x8, &scales).expect("quantise");
    let y2 = poisoned(&g, DType::Bf16, l, n, n);
    gemm()
        .linear_fp8(
            &x8,
            &scales.cols_range(1, 2).expect("scale"),
            &weight.data,
            w_scale,
            None,
            &y2,
            kontext_kernels::gemm::Epilogue::None,
        )
        .expect("fp8 gemm");
    let y2 = g.read_f32(&y2).expect("read");
    let (d_bf, d_f8) = (rel_l2(&y1, &ref_bf16), rel_l2(&y1, &ref_fp8));
    let (q_bf, q_f8) = (rel_l2(&y2, &ref_bf16), rel_l2(&y2, &ref_fp8));
    eprintln!(
        "fp8 routes, [{l}, {kin}]·[{n}, {kin}]ᵀ, ‖y − ref‖/‖ref‖:\n\
         (i)  dequantise + bf16 GEMM: {d_bf:.3e} vs the bf16 weight, {d_f8:.3e} vs the fp8 weight\n\
         (ii) fp8 × fp8 (e4m3 x):     {q_bf:.3e} vs the bf16 weight, {q_f8:.3e} vs the fp8 weight"
    );
    // (i) is the fp8 weight's product up to bf16 output rounding; (ii) adds the activations'
    // e4m3 rounding (3 mantissa bits: ~2.5e-2 relative), which is about the weight's own.
    assert!(d_f8 < 4e-3, "dequantise route {d_f8:.3e}");
    assert!(q_f8 < 4e-2, "fp8 route {q_f8:.3e}");
    assert!(
        d_bf < 4e-2 && q_bf < 6e-2,
        "vs bf16: {d_bf:.3e}, {q_bf:.3e}"
    );
}

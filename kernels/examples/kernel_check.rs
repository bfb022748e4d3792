//! GPU check of every kernel and of the cuBLASLt wrapper against f64 references on the host,
//! then timings at the real Kontext sizes. Needs a GPU; built here, run on the GPU machine by
//! `scripts/gpu-check` (as `gpu-bin/kernel-check`).
//!
//! Every check draws fresh random inputs (rounded to bf16, so GPU and reference see the same
//! values), poisons the output with NaN first (0xFF bytes), and compares with tolerances stated
//! per kind (see `Tol`). Sizes: tiny and odd ones, and the production shapes. The table lists
//! op, shape, max abs and max relative error, the worst index, the count over tolerance and the
//! verdict; timings follow. Exit status 0 only when every check passes.
//!
//! Flags: `--expect-cached` fails unless every module came from the on-disk cache (the second
//! start of `scripts/gpu-check`); `--load-only` stops after loading the kernels; `--no-timing`
//! skips the timing table; `--small` skips the production-size checks (for compute-sanitizer).

use half::bf16;
use kontext_kernels::arena::{Arena, ArenaPlan, Pool};
use kontext_kernels::attention::AttentionOpts;
use kontext_kernels::attention_mma::{Prologue, QkScales};
use kontext_kernels::conv::ConvGeometry;
use kontext_kernels::elementwise::Unary;
use kontext_kernels::gemm::{Epilogue, Gemm};
use kontext_kernels::weights::DeviceWeight;
use kontext_kernels::{cuda_available, DType, DeviceMat, Gpu, Kernels};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

type R<T> = Result<T, Box<dyn std::error::Error>>;

/// splitmix64 + Box–Muller: fresh inputs per check, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
    /// `n` values uniform with standard deviation `std`, rounded to bf16: cheap inputs for
    /// timing (never zeros, which can run faster than real data).
    fn fast_bf16s(&mut self, n: usize, std: f32) -> Vec<f32> {
        let a = std * 3f32.sqrt();
        (0..n)
            .map(|_| rb(a * (((self.next_u64() >> 40) as f32 / (1u32 << 24) as f32) * 2.0 - 1.0)))
            .collect()
    }

    /// `n` values `N(mean, std²)` rounded to bf16 (the values both sides see).
    fn bf16s(&mut self, n: usize, mean: f32, std: f32) -> Vec<f32> {
        (0..n).map(|_| rb(mean + std * self.normal())).collect()
    }
}

/// Round to bf16 and back.
fn rb(v: f32) -> f32 {
    bf16::from_f32(v).to_f32()
}

/// One bf16 ulp at `v`'s magnitude.
fn ulp_bf16(v: f64) -> f64 {
    let a = v.abs().max(f32::MIN_POSITIVE as f64);
    2f64.powi(a.log2().floor() as i32 - 7)
}

/// One e4m3 ulp at `v`'s magnitude (3 mantissa bits; subnormals below 2^-6 step by 2^-9).
fn ulp_e4m3(v: f64) -> f64 {
    let a = v.abs().max(2f64.powi(-6));
    2f64.powi(a.log2().floor() as i32 - 3)
}

/// The e4m3fn code of `v`, round to nearest even, saturating to ±448, NaN to 0x7F: by search over
/// the loader's decoding table (nearest finite magnitude, ties to the even code), so it shares
/// nothing with the conversion under test.
fn e4m3_rne(v: f32) -> u8 {
    use kontext_loader::dtype::E4M3_TO_F32;
    if v.is_nan() {
        return 0x7F;
    }
    let sign = if v.is_sign_negative() { 0x80 } else { 0 };
    let a = v.abs() as f64;
    let mut best = 0u8;
    let mut best_err = f64::INFINITY;
    for code in 0..=0x7Eu8 {
        let err = (f32::from_bits(E4M3_TO_F32[code as usize]) as f64 - a).abs();
        if err < best_err || (err == best_err && code % 2 == 0) {
            (best, best_err) = (code, err);
        }
    }
    best | sign
}

/// Decoded e4m3 codes.
fn e4m3_values(codes: &[u8]) -> Vec<f32> {
    use kontext_loader::dtype::E4M3_TO_F32;
    codes
        .iter()
        .map(|&b| f32::from_bits(E4M3_TO_F32[b as usize]))
        .collect()
}

/// The per-tensor scale of an amax, as common.cuh's e4m3_scale computes it (f32).
fn e4m3_scale(amax: f32) -> f32 {
    if amax == 0.0 {
        1.0
    } else {
        (amax / 448.0).max(f32::MIN_POSITIVE)
    }
}

/// How a result is compared with its reference.
#[derive(Clone, Copy)]
enum Tol {
    /// Elementwise: |got − ref| ≤ ulps · ulp_bf16(ref) + floor. For kernels that compute in f32
    /// from exact bf16 inputs and round once: the GPU's value is the f32 result rounded, within
    /// 0.5 ulp + the f32 error, so 1 ulp holds with a wide margin; `floor` covers outputs that
    /// cancel to near zero.
    Ulp { ulps: f64, floor: f64 },
    /// ‖got − ref‖₂ / ‖ref‖₂ ≤ tol (GEMM, attention: long f32 sums in another order, then one
    /// bf16 rounding ≈ 1e-3; METHOD.md puts bf16-operand products at 1e-3 … 1e-2).
    Norm(f64),
    /// Bit-exact (NaN matches NaN): fp8 decoding, copies, gathers.
    Exact,
    /// e4m3 quantisation of an f64 reference (values in units of the scale): within half an
    /// e4m3 ulp of the reference, plus 2^-12 relative for the f32-vs-f64 difference of the
    /// value being rounded (an RNE tie can go either way).
    E4m3Half,
}

impl Tol {
    fn show(&self) -> String {
        match self {
            Tol::Ulp { ulps, floor } => format!("{ulps} ulp + {floor:.0e}"),
            Tol::Norm(t) => format!("‖e‖/‖r‖ ≤ {t:.0e}"),
            Tol::Exact => "exact".to_string(),
            Tol::E4m3Half => "½ e4m3 ulp".to_string(),
        }
    }
}

struct Row {
    op: String,
    shape: String,
    max_abs: f64,
    max_rel: f64,
    worst: usize,
    bad: usize,
    n: usize,
    tol: String,
    ok: bool,
    note: String,
}

struct Check {
    gpu: Arc<Gpu>,
    k: Kernels,
    gemm: Gemm,
    rng: Rng,
    rows: Vec<Row>,
    /// Skip the production sizes (under compute-sanitizer).
    small: bool,
}

impl Check {
    fn up(&self, v: &[f32], rows: usize, cols: usize) -> R<DeviceMat> {
        Ok(self.gpu.upload_bf16(v, rows, cols)?)
    }
    fn up32(&self, v: &[f32], rows: usize, cols: usize) -> R<DeviceMat> {
        Ok(self.gpu.upload_f32(v, rows, cols)?)
    }
    /// A bf16 output poisoned with NaN.
    fn out(&self, rows: usize, cols: usize) -> R<DeviceMat> {
        let m = self.gpu.alloc_mat(DType::Bf16, rows, cols)?;
        self.gpu.fill_bytes(&m, 0xFF)?;
        Ok(m)
    }
    fn read(&self, m: &DeviceMat) -> R<Vec<f32>> {
        self.gpu.synchronize()?;
        Ok(self.gpu.read_f32(m)?)
    }

    /// Compares and records one row of the table.
    fn compare(&mut self, op: &str, shape: &str, got: &[f32], want: &[f64], tol: Tol) {
        let mut row = Row {
            op: op.to_string(),
            shape: shape.to_string(),
            max_abs: 0.0,
            max_rel: 0.0,
            worst: 0,
            bad: 0,
            n: got.len(),
            tol: tol.show(),
            ok: true,
            note: String::new(),
        };
        if got.len() != want.len() {
            row.ok = false;
            row.note = format!("length {} vs {}", got.len(), want.len());
            self.rows.push(row);
            return;
        }
        let (mut err2, mut ref2) = (0.0f64, 0.0f64);
        let mut worst_excess = f64::NEG_INFINITY;
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let g = g as f64;
            if w.is_nan() || g.is_nan() || g.is_infinite() {
                // Only a NaN where the reference has one, or the same infinity, passes.
                if !((w.is_nan() && g.is_nan()) || g == w) {
                    row.bad += 1;
                    if worst_excess < f64::INFINITY {
                        worst_excess = f64::INFINITY;
                        row.worst = i;
                    }
                }
                continue;
            }
            let e = (g - w).abs();
            err2 += e * e;
            ref2 += w * w;
            row.max_abs = row.max_abs.max(e);
            if w != 0.0 {
                row.max_rel = row.max_rel.max(e / w.abs());
            }
            let limit = match tol {
                Tol::Ulp { ulps, floor } => ulps * ulp_bf16(w) + floor,
                Tol::E4m3Half => 0.5 * ulp_e4m3(w) + w.abs() * 2f64.powi(-12),
                Tol::Exact | Tol::Norm(_) => 0.0,
            };
            let over = match tol {
                Tol::Exact => (g as f32).to_bits() != (w as f32).to_bits(),
                Tol::Ulp { .. } | Tol::E4m3Half => e > limit,
                Tol::Norm(_) => false,
            };
            if over {
                row.bad += 1;
            }
            if e - limit > worst_excess {
                worst_excess = e - limit;
                row.worst = i;
            }
        }
        if let Tol::Norm(t) = tol {
            let rel = (err2 / ref2.max(1e-300)).sqrt();
            row.note = format!("‖e‖/‖r‖ = {rel:.2e}");
            if rel > t {
                row.ok = false;
            }
        }
        if row.bad > 0 {
            row.ok = false;
            row.note = format!(
                "{} (worst: got {} want {:.6})",
                row.note, got[row.worst], want[row.worst]
            );
        }
        self.rows.push(row);
    }
}

fn shape(d: &[usize]) -> String {
    format!("{d:?}")
}

// ---------------------------------------------------------------------------------------------
// References (f64 on the host, straight from the definitions; the engine's CpuBackend computes
// the same functions in f32).

fn ref_norm(x: &[f32], rows: usize, cols: usize, eps: f64, center: bool) -> Vec<(f64, f64)> {
    (0..rows)
        .map(|r| {
            let row = &x[r * cols..][..cols];
            let mean = if center {
                row.iter().map(|&v| v as f64).sum::<f64>() / cols as f64
            } else {
                0.0
            };
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
            (mean, 1.0 / (var + eps).sqrt())
        })
        .collect()
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}
fn gelu_tanh(x: f64) -> f64 {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
}
fn quick_gelu(x: f64) -> f64 {
    x / (1.0 + (-1.702 * x).exp())
}

/// Attention of query rows `qs` (all heads) on `qkv [L, W]` (f32 values of bf16), f64.
#[allow(clippy::too_many_arguments)]
fn ref_attention(
    qkv: &[f32],
    l: usize,
    w: usize,
    heads: usize,
    hd: usize,
    scale: f64,
    causal: bool,
    bias: Option<&[f32]>,
    qs: &[usize],
) -> Vec<f64> {
    let d = heads * hd;
    let mut out = Vec::with_capacity(qs.len() * d);
    for &i in qs {
        for h in 0..heads {
            let q = &qkv[i * w + h * hd..][..hd];
            let keys = if causal { i + 1 } else { l };
            let mut s: Vec<f64> = (0..keys)
                .map(|j| {
                    let k = &qkv[j * w + d + h * hd..][..hd];
                    let dot: f64 = q.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum();
                    scale * dot + bias.map_or(0.0, |b| b[(h * l + i) * l + j] as f64)
                })
                .collect();
            let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let mut sum = 0.0;
            for v in s.iter_mut() {
                *v = (*v - mx).exp();
                sum += *v;
            }
            for dd in 0..hd {
                let mut acc = 0.0;
                for (j, p) in s.iter().enumerate() {
                    acc += p * qkv[j * w + 2 * d + h * hd + dd] as f64;
                }
                out.push(acc / sum);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Checks

fn check_norms(c: &mut Check) -> R<()> {
    for (rows, cols) in [(1, 8), (7, 40), (37, 3000), (256, 3072)] {
        let x = c.rng.bf16s(rows * cols, 0.3, 2.0);
        // shift and scale as columns of a wider modulation row, like the real [1, 6·D] vector.
        let m = c.rng.bf16s(3 * cols, 0.0, 0.5);
        let dx = c.up(&x, rows, cols)?;
        let dm = c.up(&m, 1, 3 * cols)?;
        let (shift, scale) = (dm.cols_range(0, cols)?, dm.cols_range(cols, 2 * cols)?);
        let y = c.out(rows, cols)?;
        c.k.norm_modulate(&dx, &shift, &scale, &y, 1e-6)?;
        let got = c.read(&y)?;
        let stats = ref_norm(&x, rows, cols, 1e-6, true);
        let want: Vec<f64> = (0..rows * cols)
            .map(|e| {
                let (r, j) = (e / cols, e % cols);
                let (mean, rstd) = stats[r];
                (1.0 + m[cols + j] as f64) * ((x[e] as f64 - mean) * rstd) + m[j] as f64
            })
            .collect();
        c.compare(
            "norm_modulate",
            &shape(&[rows, cols]),
            &got,
            &want,
            Tol::Ulp {
                ulps: 1.0,
                floor: 1e-5,
            },
        );

        let w = c.rng.bf16s(cols, 1.0, 0.2);
        let b = c.rng.bf16s(cols, 0.0, 0.2);
        let (dw, db) = (c.up32(&w, 1, cols)?, c.up32(&b, 1, cols)?);
        let y = c.out(rows, cols)?;
        c.k.layer_norm(&dx, &dw, &db, &y, 1e-5)?;
        let got = c.read(&y)?;
        let stats = ref_norm(&x, rows, cols, 1e-5, true);
        let want: Vec<f64> = (0..rows * cols)
            .map(|e| {
                let (r, j) = (e / cols, e % cols);
                w[j] as f64 * ((x[e] as f64 - stats[r].0) * stats[r].1) + b[j] as f64
            })
            .collect();
        c.compare(
            "layer_norm",
            &shape(&[rows, cols]),
            &got,
            &want,
            Tol::Ulp {
                ulps: 1.0,
                floor: 1e-5,
            },
        );

        let y = c.out(rows, cols)?;
        c.k.rms_norm(&dx, &dw, &y, 1e-6)?;
        let got = c.read(&y)?;
        let stats = ref_norm(&x, rows, cols, 1e-6, false);
        let want: Vec<f64> = (0..rows * cols)
            .map(|e| w[e % cols] as f64 * x[e] as f64 * stats[e / cols].1)
            .collect();
        c.compare(
            "rms_norm",
            &shape(&[rows, cols]),
            &got,
            &want,
            Tol::Ulp {
                ulps: 1.0,
                floor: 1e-5,
            },
        );
    }
    Ok(())
}

fn check_qk_norm_rope(c: &mut Check) -> R<()> {
    // (rows, heads, head dim, width, pe rows, pe_row0): tiny, odd width, a double block's img
    // stream (pe offset by 512 text rows), a single block's linear1 buffer.
    for (rows, heads, hd, w, lpe, row0) in [
        (3, 2, 8, 48, 5, 2),
        (9, 3, 6, 61, 9, 0),
        (200, 24, 128, 9216, 712, 512),
        (64, 24, 128, 21504, 64, 0),
    ] {
        let x = c.rng.bf16s(rows * w, 0.0, 1.5);
        let qs = c.rng.bf16s(hd, 1.0, 0.2);
        let ks = c.rng.bf16s(hd, 1.0, 0.2);
        let angles: Vec<f32> = (0..lpe * hd / 2).map(|_| 3.0 * c.rng.normal()).collect();
        let pe: Vec<f32> = angles.iter().flat_map(|a| [a.cos(), a.sin()]).collect();
        let dx = c.up(&x, rows, w)?;
        let (dq, dk, dpe) = (
            c.up32(&qs, 1, hd)?,
            c.up32(&ks, 1, hd)?,
            c.up32(&pe, lpe, hd)?,
        );
        c.k.qk_norm_rope(&dx, heads, &dq, &dk, &dpe, row0, 1e-6)?;
        let got = c.read(&dx)?;
        let mut want: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        for r in 0..rows {
            let per = &pe[(row0 + r) * hd..][..hd];
            for (part, sc) in [(0, &qs), (1, &ks)] {
                for h in 0..heads {
                    let o = r * w + part * heads * hd + h * hd;
                    let ms = x[o..o + hd]
                        .iter()
                        .map(|&v| (v as f64).powi(2))
                        .sum::<f64>()
                        / hd as f64;
                    let rr = 1.0 / (ms + 1e-6).sqrt();
                    for j in 0..hd / 2 {
                        let a = x[o + 2 * j] as f64 * rr * sc[2 * j] as f64;
                        let b = x[o + 2 * j + 1] as f64 * rr * sc[2 * j + 1] as f64;
                        let (cs, sn) = (per[2 * j] as f64, per[2 * j + 1] as f64);
                        want[o + 2 * j] = cs * a - sn * b;
                        want[o + 2 * j + 1] = sn * a + cs * b;
                    }
                }
            }
        }
        // v and every column past k must come back bit for bit: compare all, elementwise 1 ulp
        // (untouched values are exact, so any change shows).
        c.compare(
            "qk_norm_rope",
            &format!("[{rows}, {w}] H{heads} Dh{hd} pe+{row0}"),
            &got,
            &want,
            Tol::Ulp {
                ulps: 1.0,
                floor: 1e-5,
            },
        );
        let untouched: Vec<f32> = (0..rows)
            .flat_map(|r| got[r * w + 2 * heads * hd..(r + 1) * w].to_vec())
            .collect();
        let orig: Vec<f64> = (0..rows)
            .flat_map(|r| x[r * w + 2 * heads * hd..(r + 1) * w].to_vec())
            .map(|v| v as f64)
            .collect();
        c.compare(
            "qk_norm_rope (v, rest)",
            &format!("[{rows}, {}]", w - 2 * heads * hd),
            &untouched,
            &orig,
            Tol::Exact,
        );
    }
    Ok(())
}

fn check_attention(c: &mut Check) -> R<()> {
    // (L, heads, hd, extra columns, causal, bias): tiny, odd L, CLIP, T5 (bias), a Flux-sized
    // head count at a small L, and the real Kontext L (sampled rows).
    let cases: [(usize, usize, usize, usize, bool, bool); 6] = [
        (5, 2, 8, 0, false, false),
        (37, 3, 64, 5, false, false),
        (77, 12, 64, 0, true, false),
        (129, 4, 64, 0, false, true),
        (300, 24, 128, 12288, false, false),
        (8704, 24, 128, 0, false, false),
    ];
    for (l, heads, hd, extra, causal, with_bias) in cases {
        if c.small && l > 1000 {
            continue;
        }
        let d = heads * hd;
        let w = 3 * d + extra;
        let qkv = c.rng.bf16s(l * w, 0.0, 1.0);
        let bias: Option<Vec<f32>> =
            with_bias.then(|| (0..heads * l * l).map(|_| 2.0 * c.rng.normal()).collect());
        let dqkv = c.up(&qkv, l, w)?;
        let dbias = match &bias {
            Some(b) => Some(c.up32(b, heads * l, l)?),
            None => None,
        };
        let bias_desc = dbias.as_ref().map(|b| b.desc());
        let scale = if with_bias {
            1.0
        } else {
            1.0 / (hd as f32).sqrt()
        };
        let opts = AttentionOpts {
            scale,
            causal,
            bias: bias_desc.as_ref(),
        };
        let out = c.out(l, d)?;
        c.k.attention(&dqkv, heads, hd, opts, &out)?;
        let got = c.read(&out)?;
        let qs: Vec<usize> = if l <= 512 {
            (0..l).collect()
        } else {
            let mut v: Vec<usize> = (0..14)
                .map(|_| (c.rng.next_u64() % l as u64) as usize)
                .collect();
            v.extend([0, l - 1]);
            v
        };
        let want = ref_attention(
            &qkv,
            l,
            w,
            heads,
            hd,
            scale as f64,
            causal,
            bias.as_deref(),
            &qs,
        );
        let got_rows: Vec<f32> = qs
            .iter()
            .flat_map(|&i| got[i * d..(i + 1) * d].to_vec())
            .collect();
        let name = match (causal, with_bias) {
            (true, _) => "attention causal",
            (_, true) => "attention +bias",
            _ => "attention",
        };
        let sampled = if qs.len() < l {
            format!(" ({} rows)", qs.len())
        } else {
            String::new()
        };
        c.compare(
            name,
            &format!("L{l} H{heads} Dh{hd} W{w}{sampled}"),
            &got_rows,
            &want,
            Tol::Norm(4e-3),
        );
    }
    // The VAE's wide head: S = QKᵀ (f32, GEMM), softmax_rows, P·V (GEMM).
    let (l, dh) = (96, 512);
    let q = c.rng.bf16s(l * dh, 0.0, 1.0);
    let kk = c.rng.bf16s(l * dh, 0.0, 1.0);
    let (dq, dk) = (c.up(&q, l, dh)?, c.up(&kk, l, dh)?);
    let s = c.gpu.alloc_mat(DType::F32, l, l)?;
    c.gemm.matmul(&dq, false, &dk, true, &s, None, 1.0, 0.0)?;
    let p = c.out(l, l)?;
    let scale = 1.0 / (dh as f32).sqrt();
    c.k.softmax_rows(&s, scale, &p)?;
    let sv = c.read(&s)?;
    let got = c.read(&p)?;
    let want: Vec<f64> = (0..l)
        .flat_map(|r| {
            let row = &sv[r * l..(r + 1) * l];
            let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let e: Vec<f64> = row
                .iter()
                .map(|&v| ((v as f64 - mx) * scale as f64).exp())
                .collect();
            let sum: f64 = e.iter().sum();
            e.into_iter().map(move |v| v / sum)
        })
        .collect();
    c.compare(
        "softmax_rows",
        &shape(&[l, l]),
        &got,
        &want,
        Tol::Ulp {
            ulps: 1.0,
            floor: 1e-6,
        },
    );
    Ok(())
}

/// QKNorm then RoPE of the q and k columns of `x [rows, w]` in f64 (rows `[0, split)` with
/// `scales[0]`, the others with `scales[1]`; pe rows from `row0`): the reference of the fused
/// prologue, the same definition `check_qk_norm_rope` checks the plain kernel against.
#[allow(clippy::too_many_arguments)]
fn ref_qk_norm_rope(
    x: &[f32],
    (rows, w): (usize, usize),
    (heads, hd): (usize, usize),
    scales: [(&[f32], &[f32]); 2],
    split: usize,
    pe: &[f32],
    row0: usize,
) -> Vec<f64> {
    let mut y: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for r in 0..rows {
        let per = &pe[(row0 + r) * hd..][..hd];
        let (qs, ks) = scales[usize::from(r >= split)];
        for (part, sc) in [(0, qs), (1, ks)] {
            for h in 0..heads {
                let o = r * w + part * heads * hd + h * hd;
                let ms = x[o..o + hd]
                    .iter()
                    .map(|&v| (v as f64).powi(2))
                    .sum::<f64>()
                    / hd as f64;
                let rr = 1.0 / (ms + 1e-6).sqrt();
                for j in 0..hd / 2 {
                    let a = x[o + 2 * j] as f64 * rr * sc[2 * j] as f64;
                    let b = x[o + 2 * j + 1] as f64 * rr * sc[2 * j + 1] as f64;
                    let (cs, sn) = (per[2 * j] as f64, per[2 * j + 1] as f64);
                    y[o + 2 * j] = cs * a - sn * b;
                    y[o + 2 * j + 1] = sn * a + cs * b;
                }
            }
        }
    }
    y
}

fn check_attention_mma(c: &mut Check) -> R<()> {
    if let Err(e) = kontext_kernels::attention_mma::supports(128, c.gpu.info.compute_capability) {
        println!("attention_mma: skipped ({e})");
        return Ok(());
    }
    // (L, heads, Dh, extra columns, split, pe_row0): one query, odd lengths (no multiple of a
    // tile; one head; both head dims), a tile-aligned length, then a single block's linear1
    // buffer at Flux width. split < L: two streams' QKNorms in one call (a double block).
    let cases: [(usize, usize, usize, usize, usize, usize); 6] = [
        (1, 1, 64, 0, 1, 0),
        (37, 1, 128, 8, 20, 3),
        (130, 1, 64, 0, 130, 5),
        (77, 3, 128, 0, 0, 0),
        (256, 2, 128, 0, 100, 0),
        (600, 24, 128, 12288, 600, 0),
    ];
    for case in cases {
        fused_attention_case(c, case, false)?;
    }
    Ok(())
}

fn check_attention_wgmma(c: &mut Check) -> R<()> {
    if let Err(e) = kontext_kernels::attention_wgmma::supports(128, c.gpu.info.compute_capability) {
        println!("attention_wgmma: skipped ({e})");
        return Ok(());
    }
    // Head dim 128 only. One query; fewer keys than a tile (three heads, the second consumer
    // warpgroup without rows); two query blocks; five key tiles (the 3-stage ring wraps); a
    // tile-aligned length; a single block's linear1 buffer at Flux width.
    let cases: [(usize, usize, usize, usize, usize, usize); 6] = [
        (1, 1, 128, 0, 1, 0),
        (37, 3, 128, 8, 20, 3),
        (130, 1, 128, 0, 77, 5),
        (257, 3, 128, 0, 100, 0),
        (512, 2, 128, 0, 512, 0),
        (600, 24, 128, 12288, 600, 0),
    ];
    for case in cases {
        fused_attention_case(c, case, true)?;
    }
    Ok(())
}

/// One case of the fused attention (QKNorm + RoPE + attention) on the mma.sync kernel or, with
/// `wgmma`, the Hopper one (whose vᵀ scratch is checked too).
fn fused_attention_case(
    c: &mut Check,
    (l, heads, hd, extra, split, row0): (usize, usize, usize, usize, usize, usize),
    wgmma: bool,
) -> R<()> {
    let name = if wgmma {
        "attention_wgmma"
    } else {
        "attention_mma"
    };
    {
        if c.small && l * heads > 1024 {
            return Ok(());
        }
        let d = heads * hd;
        let w = 3 * d + extra;
        let x = c.rng.bf16s(l * w, 0.0, 1.5);
        let sc: Vec<Vec<f32>> = (0..4).map(|_| c.rng.bf16s(hd, 1.0, 0.3)).collect();
        let lpe = row0 + l;
        let angles: Vec<f32> = (0..lpe * hd / 2).map(|_| 3.0 * c.rng.normal()).collect();
        let pe: Vec<f32> = angles.iter().flat_map(|a| [a.cos(), a.sin()]).collect();
        let dx = c.up(&x, l, w)?;
        let dsc: Vec<DeviceMat> = sc.iter().map(|v| c.up32(v, 1, hd)).collect::<R<_>>()?;
        let dpe = c.up32(&pe, lpe, hd)?;
        // The output is the first D columns of a wider buffer (the next GEMM's operand).
        let wide = c.out(l, d + 24)?;
        let out = wide.cols_range(0, d)?;
        let descs: Vec<_> = dsc.iter().map(|m| m.desc()).collect();
        let pe_desc = dpe.desc();
        let p = Prologue {
            heads,
            head_dim: hd,
            scales: [
                QkScales {
                    q: &descs[0],
                    k: &descs[1],
                },
                QkScales {
                    q: &descs[2],
                    k: &descs[3],
                },
            ],
            split,
            pe: &pe_desc,
            pe_row0: row0,
            eps: 1e-6,
        };
        let mut vt_got = None;
        if wgmma {
            let (rows, cols, ld) = kontext_kernels::attention_wgmma::vt_shape(l, heads);
            let vt = c.out(rows, ld)?.cols_range(0, cols)?;
            c.k.attention_wgmma(&dx, &p, &vt, &out)?;
            vt_got = Some(c.read(&vt)?);
        } else {
            c.k.attention_mma(&dx, &p, &out)?;
        }
        let got = c.read(&out)?;
        let got_qkv = c.read(&dx)?;
        let normed = ref_qk_norm_rope(
            &x,
            (l, w),
            (heads, hd),
            [(&sc[0], &sc[1]), (&sc[2], &sc[3])],
            split,
            &pe,
            row0,
        );
        let normed32: Vec<f32> = normed.iter().map(|&v| v as f32).collect();
        let qs: Vec<usize> = if l <= 300 {
            (0..l).collect()
        } else {
            let mut v: Vec<usize> = (0..30)
                .map(|_| (c.rng.next_u64() % l as u64) as usize)
                .collect();
            v.extend([0, l - 1]);
            v
        };
        let want = ref_attention(
            &normed32,
            l,
            w,
            heads,
            hd,
            1.0 / (hd as f64).sqrt(),
            false,
            None,
            &qs,
        );
        let got_rows: Vec<f32> = qs
            .iter()
            .flat_map(|&i| got[i * d..(i + 1) * d].to_vec())
            .collect();
        let sampled = if qs.len() < l {
            format!(" ({} rows)", qs.len())
        } else {
            String::new()
        };
        // bf16 q̂, k̂ and P into f32 products, one bf16 rounding: ‖e‖/‖r‖ ≈ 2e-3 measured.
        c.compare(
            name,
            &format!("L{l} H{heads} Dh{hd} W{w} split{split} pe+{row0}{sampled}"),
            &got_rows,
            &want,
            Tol::Norm(1e-2),
        );
        // The k prologue's in-place result, 1 ulp of the f64 reference like qk_norm_rope; q, v
        // and the columns past them come back bit for bit.
        let (k_got, k_want): (Vec<f32>, Vec<f64>) = (0..l)
            .flat_map(|r| (r * w + d..r * w + 2 * d).map(|i| (got_qkv[i], normed[i])))
            .unzip();
        c.compare(
            &format!("{name} (k̂ in place)"),
            &format!("[{l}, {d}]"),
            &k_got,
            &k_want,
            Tol::Ulp {
                ulps: 1.0,
                floor: 1e-5,
            },
        );
        let (rest_got, rest_want): (Vec<f32>, Vec<f64>) = (0..l)
            .flat_map(|r| {
                (r * w..r * w + d)
                    .chain(r * w + 2 * d..(r + 1) * w)
                    .map(|i| (got_qkv[i], x[i] as f64))
            })
            .unzip();
        c.compare(
            &format!("{name} (q, v, rest)"),
            &format!("[{l}, {}]", w - d),
            &rest_got,
            &rest_want,
            Tol::Exact,
        );
        // vᵀ: v transposed bit for bit.
        if let Some(vt) = vt_got {
            let vt_want: Vec<f64> = (0..d)
                .flat_map(|r| (0..l).map(move |j| (r, j)))
                .map(|(r, j)| x[j * w + 2 * d + r] as f64)
                .collect();
            c.compare(name, &format!("vT [{d}, {l}]"), &vt, &vt_want, Tol::Exact);
        }
    }
    Ok(())
}

fn check_elementwise(c: &mut Check) -> R<()> {
    for (rows, cols) in [(1, 1), (3, 300), (67, 1000), (70_000, 3)] {
        let x = c.rng.bf16s(rows * cols, 0.0, 3.0);
        let dx = c.up(&x, rows, cols)?;
        for (f, name, r) in [
            (Unary::Silu, "silu", silu as fn(f64) -> f64),
            (Unary::GeluTanh, "gelu_tanh", gelu_tanh),
            (Unary::QuickGelu, "quick_gelu", quick_gelu),
        ] {
            let y = c.out(rows, cols)?;
            c.k.unary(f, &dx, &y)?;
            let got = c.read(&y)?;
            let want: Vec<f64> = x.iter().map(|&v| r(v as f64)).collect();
            c.compare(
                name,
                &shape(&[rows, cols]),
                &got,
                &want,
                Tol::Ulp {
                    ulps: 1.0,
                    floor: 1e-6,
                },
            );
        }
        // add_assign, gate_residual, scale_shift, gelu_tanh_mul.
        let b = c.rng.bf16s(rows * cols, 0.0, 1.0);
        let g = c.rng.bf16s(cols, 0.0, 1.0);
        let (db, dg) = (c.up(&b, rows, cols)?, c.up(&g, 1, cols)?);
        let a = c.up(&x, rows, cols)?;
        c.k.add_assign(&a, &db)?;
        let got = c.read(&a)?;
        let want: Vec<f64> = x
            .iter()
            .zip(&b)
            .map(|(&u, &v)| u as f64 + v as f64)
            .collect();
        c.compare(
            "add_assign",
            &shape(&[rows, cols]),
            &got,
            &want,
            Tol::Ulp {
                ulps: 1.0,
                floor: 1e-6,
            },
        );
        let a = c.up(&x, rows, cols)?;
        c.k.gate_residual(&a, &dg, &db)?;
        let got = c.read(&a)?;
        let want: Vec<f64> = (0..rows * cols)
            .map(|e| x[e] as f64 + g[e % cols] as f64 * b[e] as f64)
            .collect();
        c.compare(
            "gate_residual",
            &shape(&[rows, cols]),
            &got,
            &want,
            Tol::Ulp {
                ulps: 1.0,
                floor: 1e-6,
            },
        );
        let y = c.out(rows, cols)?;
        c.k.scale_shift(&dx, 0.3611, -0.1159, &y)?;
        let got = c.read(&y)?;
        let want: Vec<f64> = x
            .iter()
            .map(|&v| v as f64 * 0.3611f32 as f64 + (-0.1159f32) as f64)
            .collect();
        c.compare(
            "scale_shift",
            &shape(&[rows, cols]),
            &got,
            &want,
            Tol::Ulp {
                ulps: 1.0,
                floor: 1e-6,
            },
        );
        let y = c.out(rows, cols)?;
        c.k.gelu_tanh_mul(&dx, &db, &y)?;
        let got = c.read(&y)?;
        let want: Vec<f64> = x
            .iter()
            .zip(&b)
            .map(|(&u, &v)| gelu_tanh(u as f64) * v as f64)
            .collect();
        c.compare(
            "gelu_tanh_mul",
            &shape(&[rows, cols]),
            &got,
            &want,
            Tol::Ulp {
                ulps: 1.0,
                floor: 1e-6,
            },
        );
        // Casts both ways.
        let xf: Vec<f32> = (0..rows * cols).map(|_| 3.0 * c.rng.normal()).collect();
        let dxf = c.up32(&xf, rows, cols)?;
        let y = c.out(rows, cols)?;
        c.k.cast(&dxf, &y)?;
        let got = c.read(&y)?;
        let want: Vec<f64> = xf.iter().map(|&v| rb(v) as f64).collect();
        c.compare(
            "cast_f32_bf16",
            &shape(&[rows, cols]),
            &got,
            &want,
            Tol::Exact,
        );
        let y32 = c.gpu.alloc_mat(DType::F32, rows, cols)?;
        c.gpu.fill_bytes(&y32, 0xFF)?;
        c.k.cast(&dx, &y32)?;
        let got = c.read(&y32)?;
        let want: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        c.compare(
            "cast_bf16_f32",
            &shape(&[rows, cols]),
            &got,
            &want,
            Tol::Exact,
        );
        // euler_step: x f32 += dt·v with dt read on the device; the f32 product and sum, each
        // rounded, as the CPU loop computes them (exact).
        let dt = -0.0357f32;
        let xs = c.up32(&xf, rows, cols)?;
        let ddt = c.up32(&[dt], 1, 1)?;
        c.k.euler_step(&xs, &dx, &ddt)?;
        let got = c.read(&xs)?;
        let want: Vec<f64> = xf
            .iter()
            .zip(&x)
            .map(|(&u, &v)| (u + dt * v) as f64)
            .collect();
        c.compare("euler_step", &shape(&[rows, cols]), &got, &want, Tol::Exact);
    }
    // concat_cols / slice through copy2d into column ranges; the gap columns stay poisoned.
    let (l, ca, cb) = (33, 17, 50);
    let a = c.rng.bf16s(l * ca, 0.0, 1.0);
    let b = c.rng.bf16s(l * cb, 0.0, 1.0);
    let (da, db) = (c.up(&a, l, ca)?, c.up(&b, l, cb)?);
    let u = c.out(l, ca + cb + 3)?;
    c.k.copy2d(&da, &u.cols_range(0, ca)?)?;
    c.k.copy2d(&db, &u.cols_range(ca, ca + cb)?)?;
    let got = c.read(&u)?;
    let want: Vec<f64> = (0..l)
        .flat_map(|r| {
            let mut row: Vec<f64> = a[r * ca..(r + 1) * ca].iter().map(|&v| v as f64).collect();
            row.extend(b[r * cb..(r + 1) * cb].iter().map(|&v| v as f64));
            row.extend([f64::NAN; 3]);
            row
        })
        .collect();
    c.compare(
        "copy2d (concat_cols)",
        &shape(&[l, ca + cb + 3]),
        &got,
        &want,
        Tol::Exact,
    );
    // transpose.
    let (r, cc) = (45, 70);
    let x = c.rng.bf16s(r * cc, 0.0, 1.0);
    let dx = c.up(&x, r, cc)?;
    let y = c.out(cc, r)?;
    c.k.transpose(&dx, &y)?;
    let got = c.read(&y)?;
    let want: Vec<f64> = (0..cc * r)
        .map(|e| x[(e % r) * cc + e / r] as f64)
        .collect();
    c.compare("transpose", &shape(&[r, cc]), &got, &want, Tol::Exact);
    // gather_rows with one bad id (its row must be NaN).
    let (vocab, dim) = (1000, 64);
    let table = c.rng.bf16s(vocab * dim, 0.0, 1.0);
    let dt = c.up(&table, vocab, dim)?;
    let mut ids: Vec<i32> = (0..77)
        .map(|_| (c.rng.next_u64() % vocab as u64) as i32)
        .collect();
    ids[5] = vocab as i32;
    let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    let di = c.gpu.upload_bytes(&bytes, DType::I32, 1, ids.len())?;
    let y = c.out(ids.len(), dim)?;
    c.k.gather_rows(&di, &dt, &y)?;
    let got = c.read(&y)?;
    let want: Vec<f64> = ids
        .iter()
        .flat_map(|&id| {
            (0..dim).map(move |j| {
                if (id as usize) < vocab {
                    id as usize * dim + j
                } else {
                    usize::MAX
                }
            })
        })
        .map(|i| {
            if i == usize::MAX {
                f64::NAN
            } else {
                table[i] as f64
            }
        })
        .collect();
    c.compare(
        "gather_rows (+bad id)",
        &shape(&[ids.len(), dim]),
        &got,
        &want,
        Tol::Exact,
    );
    Ok(())
}

fn check_fp8(c: &mut Check) -> R<()> {
    use kontext_loader::dtype::{e5m2_to_f32, E4M3_TO_F32};
    // Every code, several scales: bit-exact against the loader's decoding × scale, rounded.
    let codes: Vec<u8> = (0..=255u8).collect();
    for (dt, name) in [
        (DType::F8E4M3, "fp8_e4m3_to_bf16"),
        (DType::F8E5M2, "fp8_e5m2_to_bf16"),
    ] {
        for scale in [1.0f32, 0.0123, 3.5] {
            let w = c.gpu.upload_bytes(&codes, dt, 16, 16)?;
            let weight = DeviceWeight::single(w, scale);
            let out = c.out(16, 16)?;
            c.k.dequant_fp8(&weight, &out)?;
            let got = c.read(&out)?;
            let want: Vec<f64> = codes
                .iter()
                .map(|&b| {
                    let v = if dt == DType::F8E4M3 {
                        f32::from_bits(E4M3_TO_F32[b as usize])
                    } else {
                        e5m2_to_f32(b)
                    };
                    rb(v * scale) as f64
                })
                .collect();
            c.compare(
                name,
                &format!("256 codes × {scale}"),
                &got,
                &want,
                Tol::Exact,
            );
        }
    }
    // An odd-sized weight of random codes (no NaN codes) in three parts with their own scales,
    // uploaded through upload_weight like diffusers' to_q / to_k / to_v of a scaled-fp8 file.
    let (cols, part_rows, part_scales) = (1001, [10usize, 20, 7], [0.25f32, 3.0, 0.0123]);
    let rows: usize = part_rows.iter().sum();
    let bytes: Vec<u8> = (0..rows * cols)
        .map(|_| {
            let b = (c.rng.next_u64() & 0xFF) as u8;
            if b & 0x7F == 0x7F {
                b & 0xF0
            } else {
                b
            }
        })
        .collect();
    let mut parts = Vec::new();
    let mut row0 = 0;
    for (&n, &s) in part_rows.iter().zip(&part_scales) {
        parts.push((&bytes[row0 * cols..(row0 + n) * cols], s));
        row0 += n;
    }
    let weight = kontext_kernels::weights::upload_weight(
        &c.gpu,
        &parts,
        kontext_kernels::weights::HostDType::F8E4M3,
        rows,
        cols,
    )?;
    let out = c.out(rows, cols)?;
    c.k.dequant_fp8(&weight, &out)?;
    let got = c.read(&out)?;
    let row_scale: Vec<f32> = part_rows
        .iter()
        .zip(&part_scales)
        .flat_map(|(&n, &s)| std::iter::repeat_n(s, n))
        .collect();
    let want: Vec<f64> = bytes
        .iter()
        .enumerate()
        .map(|(i, &b)| rb(f32::from_bits(E4M3_TO_F32[b as usize]) * row_scale[i / cols]) as f64)
        .collect();
    c.compare(
        "fp8_e4m3_to_bf16 (3 parts)",
        &shape(&[rows, cols]),
        &got,
        &want,
        Tol::Exact,
    );
    Ok(())
}

/// The activation side of the fp8 route: `quantise_e4m3` (bit-exact: the reference does the
/// kernel's f32 operations and rounds by search), `norm_modulate_e4m3` (against the f64
/// LayerNorm), and the gate folded into the dequantised weight (bit-exact).
fn check_fp8_activations(c: &mut Check) -> R<()> {
    for (rows, cols) in [(1, 8), (7, 40), (37, 3000), (256, 3072)] {
        if c.small && rows * cols > 1 << 20 {
            continue;
        }
        // Mostly N(0, 1) with a few large values: the amax sits far out, as in real activations.
        let mut x = c.rng.bf16s(rows * cols, 0.0, 1.0);
        for i in (0..x.len()).step_by(997) {
            x[i] = rb(x[i] * 40.0);
        }
        let dx = c.up(&x, rows, cols)?;
        let y = c.gpu.alloc_mat(DType::F8E4M3, rows, cols)?;
        c.gpu.fill_bytes(&y, 0xFF)?;
        let scales = c.gpu.alloc_mat(DType::F32, 1, 2)?;
        c.gpu.fill_bytes(&scales, 0xFF)?;
        c.k.quantise_e4m3(&dx, &y, &scales)?;
        c.gpu.synchronize()?;
        let got = e4m3_values(&c.gpu.read_bytes(&y)?);
        let got_scale = c.read(&scales)?[1];
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = e4m3_scale(amax);
        let inv = 1.0 / scale;
        let want: Vec<f64> = e4m3_values(&x.iter().map(|&v| e4m3_rne(v * inv)).collect::<Vec<_>>())
            .into_iter()
            .map(f64::from)
            .collect();
        c.compare(
            "quantise_e4m3",
            &shape(&[rows, cols]),
            &got,
            &want,
            Tol::Exact,
        );
        c.compare(
            "quantise_e4m3 scale",
            &shape(&[rows, cols]),
            &[got_scale],
            &[scale as f64],
            Tol::Exact,
        );

        // The fused norm: LN + modulation, quantised from f32.
        let m = c.rng.bf16s(2 * cols, 0.0, 0.5);
        let dm = c.up(&m, 1, 2 * cols)?;
        let (shift, sc) = (dm.cols_range(0, cols)?, dm.cols_range(cols, 2 * cols)?);
        c.gpu.fill_bytes(&y, 0xFF)?;
        c.gpu.fill_bytes(&scales, 0xFF)?;
        c.k.norm_modulate_e4m3(&dx, &shift, &sc, &y, &scales, 1e-6)?;
        c.gpu.synchronize()?;
        let got = e4m3_values(&c.gpu.read_bytes(&y)?);
        let got_scale = c.read(&scales)?[1] as f64;
        let stats = ref_norm(&x, rows, cols, 1e-6, true);
        let v: Vec<f64> = (0..rows * cols)
            .map(|e| {
                let (r, j) = (e / cols, e % cols);
                let (mean, rstd) = stats[r];
                (1.0 + m[cols + j] as f64) * ((x[e] as f64 - mean) * rstd) + m[j] as f64
            })
            .collect();
        let amax = v.iter().fold(0f64, |a, b| a.max(b.abs()));
        c.compare(
            "norm_modulate_e4m3 scale",
            &shape(&[rows, cols]),
            &[got_scale as f32],
            &[amax / 448.0],
            Tol::Ulp {
                ulps: 0.0,
                floor: amax / 448.0 * 1e-5,
            },
        );
        let want_q: Vec<f64> = v
            .iter()
            .map(|&t| (t / got_scale).clamp(-448.0, 448.0))
            .collect();
        c.compare(
            "norm_modulate_e4m3",
            &shape(&[rows, cols]),
            &got,
            &want_q,
            Tol::E4m3Half,
        );
        // The same, dequantised, against the exact value: the error fp8 activations add (e4m3's
        // 3 mantissa bits: ≤ 2^-4 relative per element, ~2.5e-2 in norm).
        let deq: Vec<f32> = got.iter().map(|&q| (q as f64 * got_scale) as f32).collect();
        c.compare(
            "norm_modulate_e4m3 (·s)",
            &shape(&[rows, cols]),
            &deq,
            &v,
            Tol::Norm(4e-2),
        );
    }
    // The gate folded into the dequantised weight: bit-exact (decode · scale · g in f32).
    let (rows, cols) = (24, 136);
    let codes: Vec<u8> = (0..rows * cols)
        .map(|_| (c.rng.next_u64() & 0xFF) as u8 & 0xF7) // no NaN codes (S.1111.111)
        .collect();
    let w = c.gpu.upload_bytes(&codes, DType::F8E4M3, rows, cols)?;
    let weight = DeviceWeight::single(w, 0.0123);
    let g = c.rng.bf16s(rows, 0.0, 1.0);
    let dg = c.up(&g, 1, rows)?;
    let out = c.out(rows, cols)?;
    c.k.dequant_fp8_rows(&weight, &dg, &out)?;
    let got = c.read(&out)?;
    let want: Vec<f64> = e4m3_values(&codes)
        .iter()
        .enumerate()
        .map(|(i, &v)| rb(v * 0.0123 * g[i / cols]) as f64)
        .collect();
    c.compare(
        "fp8_e4m3_to_bf16_rows",
        &shape(&[rows, cols]),
        &got,
        &want,
        Tol::Exact,
    );
    Ok(())
}

fn check_conv(c: &mut Check) -> R<()> {
    // im2col + GEMM against a direct convolution: same 3×3, the Downsample, a 1×3, on odd sizes.
    let wide = ConvGeometry {
        kh: 1,
        kw: 3,
        pad_top: 0,
        pad_bottom: 0,
        ..ConvGeometry::same3x3(5, 7)
    };
    for (g, cin, cout) in [
        (ConvGeometry::same3x3(9, 7), 5, 6),
        (ConvGeometry::downsample(9, 8), 4, 8),
        (ConvGeometry::same3x3(16, 16), 128, 64),
        (wide, 3, 2),
    ] {
        let (h, w) = (g.h, g.w);
        let x = c.rng.bf16s(h * w * cin, 0.0, 1.0);
        let wt = c.rng.bf16s(cout * cin * g.kh * g.kw, 0.0, 0.2);
        let bias = c.rng.bf16s(cout, 0.0, 0.1);
        let perm = kontext_kernels::weights::conv_weight_khwc(&wt, cout, cin, g.kh, g.kw)?;
        let dx = c.up(&x, h * w, cin)?;
        let dw = c.up(&perm, cout, g.kh * g.kw * cin)?;
        let dbias = c.up(&bias, 1, cout)?;
        let (ho, wo) = (g.out_h(), g.out_w());
        // Two pixel windows, to exercise p0.
        let col = c.out(ho * wo, g.col_width(cin))?;
        let half = ho * wo / 2;
        c.k.im2col(&dx, &g, 0, &col.rows_range(0, half)?)?;
        c.k.im2col(&dx, &g, half, &col.rows_range(half, ho * wo)?)?;
        let y = c.out(ho * wo, cout)?;
        c.gemm.linear(&col, &dw, Some(&dbias), &y)?;
        let got = c.read(&y)?;
        let mut want = vec![0.0f64; ho * wo * cout];
        for oy in 0..ho {
            for ox in 0..wo {
                for o in 0..cout {
                    let mut acc = bias[o] as f64;
                    for i in 0..cin {
                        for ky in 0..g.kh {
                            for kx in 0..g.kw {
                                let iy = (oy * g.stride + ky) as isize - g.pad_top as isize;
                                let ix = (ox * g.stride + kx) as isize - g.pad_left as isize;
                                if iy < 0 || ix < 0 || iy as usize >= h || ix as usize >= w {
                                    continue;
                                }
                                let xv = x[(iy as usize * w + ix as usize) * cin + i] as f64;
                                acc += xv * wt[((o * cin + i) * g.kh + ky) * g.kw + kx] as f64;
                            }
                        }
                    }
                    want[(oy * wo + ox) * cout + o] = acc;
                }
            }
        }
        c.compare(
            "conv (im2col+gemm)",
            &format!("{h}×{w}×{cin}→{cout} k{}×{} s{}", g.kh, g.kw, g.stride),
            &got,
            &want,
            Tol::Norm(4e-3),
        );
    }
    // Upsample.
    let (h, w, ch) = (5, 3, 7);
    let x = c.rng.bf16s(h * w * ch, 0.0, 1.0);
    let dx = c.up(&x, h * w, ch)?;
    let y = c.out(4 * h * w, ch)?;
    c.k.upsample_nearest2x(&dx, h, w, &y)?;
    let got = c.read(&y)?;
    let want: Vec<f64> = (0..4 * h * w * ch)
        .map(|e| {
            let (p, ci) = (e / ch, e % ch);
            let (oy, ox) = (p / (2 * w), p % (2 * w));
            x[((oy / 2) * w + ox / 2) * ch + ci] as f64
        })
        .collect();
    c.compare(
        "upsample_nearest2x",
        &shape(&[h, w, ch]),
        &got,
        &want,
        Tol::Exact,
    );
    Ok(())
}

fn check_group_norm(c: &mut Check) -> R<()> {
    for (p, ch, groups, swish) in [
        (30, 64, 32, true),
        (7, 32, 32, false),
        (4096, 512, 32, true),
    ] {
        if c.small && p * ch > 1 << 16 {
            continue;
        }
        let x = c.rng.bf16s(p * ch, 0.5, 2.0);
        let w = c.rng.bf16s(ch, 1.0, 0.2);
        let b = c.rng.bf16s(ch, 0.0, 0.2);
        let dx = c.up(&x, p, ch)?;
        let (dw, db) = (c.up32(&w, 1, ch)?, c.up32(&b, 1, ch)?);
        let y = c.out(p, ch)?;
        c.k.group_norm(&dx, groups, &dw, &db, 1e-6, swish, &y)?;
        let got = c.read(&y)?;
        let cg = ch / groups;
        let mut want = vec![0.0f64; p * ch];
        for g in 0..groups {
            let vals: Vec<f64> = (0..p)
                .flat_map(|pp| (0..cg).map(move |j| (pp, g * cg + j)))
                .map(|(pp, cc)| x[pp * ch + cc] as f64)
                .collect();
            let mean = vals.iter().sum::<f64>() / vals.len() as f64;
            let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
            let rstd = 1.0 / (var + 1e-6).sqrt();
            for pp in 0..p {
                for j in 0..cg {
                    let cc = g * cg + j;
                    let v = w[cc] as f64 * (x[pp * ch + cc] as f64 - mean) * rstd + b[cc] as f64;
                    want[pp * ch + cc] = if swish { silu(v) } else { v };
                }
            }
        }
        let name = if swish {
            "group_norm+swish"
        } else {
            "group_norm"
        };
        c.compare(
            name,
            &format!("[{p}, {ch}] G{groups}"),
            &got,
            &want,
            Tol::Ulp {
                ulps: 1.0,
                floor: 1e-5,
            },
        );
    }
    Ok(())
}

fn check_gemm(c: &mut Check) -> R<()> {
    // (M, K, N, bias, f32 out): odd sizes, a single row (the modulation GEMV), a Flux-shaped one.
    for (m, k, n, bias, f32_out) in [
        (37, 72, 40, true, false),
        (1, 3072, 256, true, false),
        (5, 33, 7, false, true),
        (128, 3072, 3072, true, false),
    ] {
        if c.small && m * n * k > 1 << 26 {
            continue;
        }
        let x = c.rng.bf16s(m * k, 0.0, 1.0);
        let w = c.rng.bf16s(n * k, 0.0, 1.0 / (k as f32).sqrt());
        let b = c.rng.bf16s(n, 0.0, 0.1);
        let (dx, dw) = (c.up(&x, m, k)?, c.up(&w, n, k)?);
        let y = if f32_out {
            let y = c.gpu.alloc_mat(DType::F32, m, n)?;
            c.gpu.fill_bytes(&y, 0xFF)?;
            y
        } else {
            c.out(m, n)?
        };
        let db = if f32_out {
            c.up32(&b, 1, n)?
        } else {
            c.up(&b, 1, n)?
        };
        c.gemm.linear(&dx, &dw, bias.then_some(&db), &y)?;
        let got = c.read(&y)?;
        let want: Vec<f64> = (0..m * n)
            .map(|e| {
                let (i, j) = (e / n, e % n);
                let dot: f64 = (0..k)
                    .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                    .sum();
                dot + if bias { b[j] as f64 } else { 0.0 }
            })
            .collect();
        let tol = if f32_out {
            Tol::Norm(1e-5)
        } else {
            Tol::Norm(4e-3)
        };
        c.compare(
            if f32_out {
                "gemm (f32 out)"
            } else {
                "gemm linear"
            },
            &format!("[{m}, {k}]·[{n}, {k}]ᵀ{}", if bias { " +b" } else { "" }),
            &got,
            &want,
            tol,
        );
    }
    Ok(())
}

/// The fused GEMMs: GELU in the epilogue, the fp8 × fp8 route, and the gated residual on the
/// dequantised weight, each against the f64 composition of the unfused ops.
fn check_gemm_fused(c: &mut Check) -> R<()> {
    for (m, k, n) in [(37, 64, 40), (1, 3072, 256), (128, 3072, 3072)] {
        if c.small && m * n * k > 1 << 26 {
            continue;
        }
        let x = c.rng.bf16s(m * k, 0.0, 1.0);
        let w = c.rng.bf16s(n * k, 0.0, 1.0 / (k as f32).sqrt());
        let b = c.rng.bf16s(n, 0.0, 0.1);
        let (dx, dw, db) = (c.up(&x, m, k)?, c.up(&w, n, k)?, c.up(&b, 1, n)?);
        let dot = |xs: &[f32], ws: &[f32], i: usize, j: usize| -> f64 {
            (0..k)
                .map(|p| xs[i * k + p] as f64 * ws[j * k + p] as f64)
                .sum()
        };
        let label = format!("[{m}, {k}]·[{n}, {k}]ᵀ +b");

        let y = c.out(m, n)?;
        c.gemm.linear_gelu(&dx, &dw, Some(&db), &y)?;
        let got = c.read(&y)?;
        let want: Vec<f64> = (0..m * n)
            .map(|e| gelu_tanh(dot(&x, &w, e / n, e % n) + b[e % n] as f64))
            .collect();
        c.compare("gemm + GELU epilogue", &label, &got, &want, Tol::Norm(4e-3));

        // fp8 × fp8: the quantised activations and an e4m3 weight with a scale, read back, are
        // the reference's inputs, so this isolates the GEMM (accumulation, bf16 output).
        let codes: Vec<u8> = w.iter().map(|&v| e4m3_rne(v * 448.0 * 0.25)).collect();
        let w_scale = 1.0 / (448.0 * 0.25);
        let w8 = c.gpu.upload_bytes(&codes, DType::F8E4M3, n, k)?;
        let x8 = c.gpu.alloc_mat(DType::F8E4M3, m, k)?;
        let scales = c.gpu.alloc_mat(DType::F32, 1, 2)?;
        c.k.quantise_e4m3(&dx, &x8, &scales)?;
        let xs = scales.cols_range(1, 2)?;
        for epi in [Epilogue::None, Epilogue::Gelu] {
            let y = c.out(m, n)?;
            c.gemm
                .linear_fp8(&x8, &xs, &w8, w_scale, Some(&db), &y, epi)?;
            let got = c.read(&y)?;
            let sx = c.read(&scales)?[1];
            let xq: Vec<f32> = e4m3_values(&c.gpu.read_bytes(&x8)?)
                .iter()
                .map(|&q| q * sx)
                .collect();
            let wq: Vec<f32> = e4m3_values(&codes).iter().map(|&q| q * w_scale).collect();
            let want: Vec<f64> = (0..m * n)
                .map(|e| {
                    let v = dot(&xq, &wq, e / n, e % n) + b[e % n] as f64;
                    if epi == Epilogue::Gelu {
                        gelu_tanh(v)
                    } else {
                        v
                    }
                })
                .collect();
            let op = if epi == Epilogue::Gelu {
                "gemm fp8×fp8 + GELU"
            } else {
                "gemm fp8×fp8"
            };
            c.compare(op, &label, &got, &want, Tol::Norm(4e-3));
        }

        // residual += gate ⊙ (x·Wᵀ + b) with the gate in the dequantised weight and the bias,
        // beta = 1 onto the residual: one GEMM, no gate_residual pass.
        let g = c.rng.bf16s(n, 0.0, 1.0);
        let res = c.rng.bf16s(m * n, 0.0, 1.0);
        let dg = c.up(&g, 1, n)?;
        let dres = c.up(&res, m, n)?;
        let wq = DeviceWeight::single(w8, w_scale);
        let wg = c.out(n, k)?;
        c.k.dequant_fp8_rows(&wq, &dg, &wg)?;
        let gb = c.out(1, n)?;
        c.gpu.fill_bytes(&gb, 0)?;
        c.k.gate_residual(&gb, &dg, &db)?;
        c.gemm
            .matmul(&dx, false, &wg, true, &dres, Some(&gb), 1.0, 1.0)?;
        let got = c.read(&dres)?;
        let wf: Vec<f32> = e4m3_values(&codes).iter().map(|&q| q * w_scale).collect();
        let want: Vec<f64> = (0..m * n)
            .map(|e| {
                let j = e % n;
                res[e] as f64 + g[j] as f64 * (dot(&x, &wf, e / n, j) + b[j] as f64)
            })
            .collect();
        c.compare("gemm gated residual", &label, &got, &want, Tol::Norm(4e-3));
    }
    Ok(())
}

/// Runs a block of launches against arena memory twice and checks the second run allocated
/// nothing: the mechanism the denoising loop relies on.
fn check_no_allocation(c: &mut Check) -> R<()> {
    // A persistent stream `x` from a stack arena; each step's temporaries from a pool sized by a
    // planning pass of the same allocations, returned when they drop (the engine's pattern).
    let (l, d) = (64, 256);
    let temporaries = |pool: &Pool| -> R<Vec<Arc<kontext_kernels::arena::PoolRegion>>> {
        Ok(vec![
            pool.region(l * d * 2, "h")?,
            pool.region(l * 3 * d * 2, "qkv")?,
            pool.region(l * d * 2, "attn")?,
        ])
    };
    let plan = Pool::plan();
    drop(temporaries(&plan)?);
    let pool = Pool::new(&c.gpu, plan.peak())?;
    let mut arena_plan = ArenaPlan::new();
    arena_plan.mat(DType::Bf16, l, d);
    let mut arena = Arena::new(&c.gpu, arena_plan.bytes())?;
    let x = arena.mat(DType::Bf16, l, d, "x")?;
    let (wv, bv, mv) = (
        c.rng.bf16s(3 * d * d, 0.0, 0.05),
        c.rng.bf16s(3 * d, 0.0, 0.05),
        c.rng.bf16s(3 * d, 0.0, 0.1),
    );
    let (w, b, m) = (
        c.up(&wv, 3 * d, d)?,
        c.up(&bv, 1, 3 * d)?,
        c.up(&mv, 1, 3 * d)?,
    );
    let sc = c.up32(&vec![1.0; 64], 1, 64)?;
    let pe = c.up32(
        &(0..l * 64)
            .map(|i| if i % 2 == 0 { 1.0 } else { 0.0 })
            .collect::<Vec<_>>(),
        l,
        64,
    )?;
    c.gpu.write_f32(&x, &c.rng.bf16s(l * d, 0.0, 1.0))?;
    let step = |c: &mut Check| -> R<()> {
        let h = pool.mat(DType::Bf16, l, d, "h")?;
        let qkv = pool.mat(DType::Bf16, l, 3 * d, "qkv")?;
        let attn = pool.mat(DType::Bf16, l, d, "attn")?;
        c.k.norm_modulate(&x, &m.cols_range(0, d)?, &m.cols_range(d, 2 * d)?, &h, 1e-6)?;
        c.gemm.linear(&h, &w, Some(&b), &qkv)?;
        c.k.qk_norm_rope(&qkv, 4, &sc, &sc, &pe, 0, 1e-6)?;
        c.k.attention(&qkv, 4, 64, AttentionOpts::flux(64), &attn)?;
        c.k.gate_residual(&x, &m.cols_range(2 * d, 3 * d)?, &attn)?;
        Ok(())
    };
    step(c)?; // plans the GEMM (host-side descriptors only)
    c.gpu.synchronize()?;
    let before = c.gpu.allocations();
    for _ in 0..3 {
        step(c)?;
    }
    c.gpu.synchronize()?;
    let after = c.gpu.allocations();
    let leaked = pool.in_use();
    let row = Row {
        op: "no allocation in steps".to_string(),
        shape: format!("3 × 5 launches, pool {} B", plan.peak()),
        max_abs: 0.0,
        max_rel: 0.0,
        worst: 0,
        bad: (after - before) as usize + leaked,
        n: 15,
        tol: "0 allocations".to_string(),
        ok: after == before && leaked == 0 && pool.peak() <= plan.peak(),
        note: format!(
            "{} allocations, {leaked} bytes still in use, peak {}",
            after - before,
            pool.peak()
        ),
    };
    c.rows.push(row);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Timing at the real size (8,704 tokens: 512 text + 4096 target + 4096 context).

fn time_ms(c: &Check, reps: usize, mut f: impl FnMut() -> R<()>) -> R<f64> {
    use cudarc::driver::sys::CUevent_flags;
    f()?;
    f()?;
    c.gpu.synchronize()?;
    let ctx = c.gpu.context();
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        start.record(c.gpu.stream())?;
        f()?;
        end.record(c.gpu.stream())?;
        end.synchronize()?;
        times.push(start.elapsed_ms(&end)? as f64);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

fn timings(c: &mut Check) -> R<Vec<(String, String, f64, String)>> {
    let (l, d, m) = (8704usize, 3072usize, 12288usize);
    let mut rows = Vec::new();
    let rand = |c: &mut Check, r: usize, cc: usize, std: f32| -> R<DeviceMat> {
        let v = c.rng.fast_bf16s(r * cc, std);
        Ok(c.gpu.upload_bf16(&v, r, cc)?)
    };
    let gbs = |bytes: f64, ms: f64| format!("{:.0} GB/s", bytes / ms / 1e6);
    let tfs = |flop: f64, ms: f64| format!("{:.0} TFLOP/s", flop / ms / 1e9);

    let x = rand(c, l, d, 1.0)?;
    let y = c.out(l, d)?;
    let md = rand(c, 1, 6 * d, 0.3)?;
    let ms = time_ms(c, 10, || {
        Ok(c.k.norm_modulate(
            &x,
            &md.cols_range(0, d)?,
            &md.cols_range(d, 2 * d)?,
            &y,
            1e-6,
        )?)
    })?;
    rows.push((
        "norm_modulate".into(),
        format!("[{l}, {d}]"),
        ms,
        gbs((2 * 2 * l * d) as f64, ms),
    ));
    let ms = time_ms(c, 10, || {
        Ok(c.k.gate_residual(&y, &md.cols_range(2 * d, 3 * d)?, &x)?)
    })?;
    rows.push((
        "gate_residual".into(),
        format!("[{l}, {d}]"),
        ms,
        gbs((3 * 2 * l * d) as f64, ms),
    ));

    let h = rand(c, l, 21504, 1.0)?;
    let sc = c.up32(&vec![1.0; 128], 1, 128)?;
    let angles: Vec<f32> = (0..l * 64).map(|i| (i % 977) as f32 * 0.01).collect();
    let pe: Vec<f32> = angles.iter().flat_map(|a| [a.cos(), a.sin()]).collect();
    let dpe = c.up32(&pe, l, 128)?;
    let ms = time_ms(c, 10, || {
        Ok(c.k.qk_norm_rope(&h, 24, &sc, &sc, &dpe, 0, 1e-6)?)
    })?;
    rows.push((
        "qk_norm_rope".into(),
        format!("[{l}, 2·{d}] of 21504"),
        ms,
        gbs((2 * 2 * l * 2 * d) as f64, ms),
    ));
    let attn = c.out(l, d)?;
    let ms = time_ms(c, 3, || {
        Ok(c.k.attention(&h, 24, 128, AttentionOpts::flux(128), &attn)?)
    })?;
    rows.push((
        "attention (plain)".into(),
        format!("L{l} H24 Dh128"),
        ms,
        tfs(4.0 * (l * l * d) as f64, ms),
    ));
    let dpe_d = dpe.desc();
    let sd = sc.desc();
    let scales = QkScales { q: &sd, k: &sd };
    let p = Prologue {
        heads: 24,
        head_dim: 128,
        scales: [scales, scales],
        split: l,
        pe: &dpe_d,
        pe_row0: 0,
        eps: 1e-6,
    };
    let ms = time_ms(c, 3, || Ok(c.k.attention_mma(&h, &p, &attn)?))?;
    rows.push((
        "attention_mma (+k̂ pass)".into(),
        format!("L{l} H24 Dh128"),
        ms,
        tfs(4.0 * (l * l * d) as f64, ms),
    ));
    if kontext_kernels::attention_wgmma::supports(128, c.gpu.info.compute_capability).is_ok() {
        let (vr, vc, vld) = kontext_kernels::attention_wgmma::vt_shape(l, 24);
        let vt = c.out(vr, vld)?.cols_range(0, vc)?;
        let ms = time_ms(c, 3, || Ok(c.k.attention_wgmma(&h, &p, &vt, &attn)?))?;
        rows.push((
            "attention_wgmma (+k̂, vᵀ)".into(),
            format!("L{l} H24 Dh128"),
            ms,
            tfs(4.0 * (l * l * d) as f64, ms),
        ));
    }
    let mlp = h.cols_range(9216, 21504)?;
    let ms = time_ms(c, 10, || Ok(c.k.unary(Unary::GeluTanh, &mlp, &mlp)?))?;
    rows.push((
        "gelu_tanh (in place)".into(),
        format!("[{l}, {m}]"),
        ms,
        gbs((2 * 2 * l * m) as f64, ms),
    ));
    let u = c.out(l, 15360)?;
    let ms = time_ms(c, 10, || Ok(c.k.copy2d(&mlp, &u.cols_range(d, 15360)?)?))?;
    rows.push((
        "copy2d (concat_cols)".into(),
        format!("[{l}, {m}]"),
        ms,
        gbs((2 * 2 * l * m) as f64, ms),
    ));

    let codes: Vec<u8> = (0..21504 * d)
        .map(|i| (i * 37 % 251) as u8 & 0x7E)
        .collect();
    let w8 = c.gpu.upload_bytes(&codes, DType::F8E4M3, 21504, d)?;
    let wb = c.out(21504, d)?;
    let w8 = DeviceWeight::single(w8, 0.01);
    let ms = time_ms(c, 10, || Ok(c.k.dequant_fp8(&w8, &wb)?))?;
    rows.push((
        "fp8_e4m3_to_bf16".into(),
        format!("[21504, {d}]"),
        ms,
        gbs((3 * 21504 * d) as f64, ms),
    ));

    for (name, n, k) in [
        ("gemm qkv", 9216, d),
        ("gemm linear1", 21504, d),
        ("gemm mlp.2", d, m),
        ("gemm linear2", d, 15360),
    ] {
        let a = rand(c, l, k, 1.0)?;
        let w = rand(c, n, k, 0.02)?;
        let b = rand(c, 1, n, 0.1)?;
        let out = c.out(l, n)?;
        let ms = time_ms(c, 5, || Ok(c.gemm.linear(&a, &w, Some(&b), &out)?))?;
        rows.push((
            name.into(),
            format!("[{l}, {k}]·[{n}, {k}]ᵀ"),
            ms,
            tfs(2.0 * (l * n * k) as f64, ms),
        ));
    }
    // The VAE's largest 3×3 conv at 1024² output: 128 → 128 channels; im2col in 8 windows.
    let (hh, ww, ch) = (1024usize, 1024usize, 128usize);
    let g = ConvGeometry::same3x3(hh, ww);
    let xm = rand(c, hh * ww, ch, 1.0)?;
    let win = hh * ww / 8;
    let col = c.out(win, 9 * ch)?;
    let ms = time_ms(c, 5, || Ok(c.k.im2col(&xm, &g, 0, &col)?))?;
    rows.push((
        "im2col (1/8 of 1024²)".into(),
        format!("[{win}, {}]", 9 * ch),
        ms,
        gbs((2 * win * 9 * ch + 2 * win * 9 * ch) as f64, ms),
    ));
    let gn_w = c.up32(&vec![1.0; ch], 1, ch)?;
    let gn_b = c.up32(&vec![0.0; ch], 1, ch)?;
    let ms = time_ms(c, 5, || {
        Ok(c.k.group_norm(&xm, 32, &gn_w, &gn_b, 1e-6, true, &xm)?)
    })?;
    rows.push((
        "group_norm+swish".into(),
        format!("[{}, {ch}] G32", hh * ww),
        ms,
        gbs((3 * 2 * hh * ww * ch) as f64, ms),
    ));
    Ok(rows)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let flag = |f: &str| args.iter().any(|a| a == f);
    let opts = Opts {
        expect_cached: flag("--expect-cached"),
        load_only: flag("--load-only"),
        timing: !flag("--no-timing") && !flag("--small"),
        small: flag("--small"),
    };
    if let Some(bad) = args[1..].iter().find(|a| {
        !["--expect-cached", "--load-only", "--no-timing", "--small"].contains(&a.as_str())
    }) {
        eprintln!("kernel-check: unknown flag {bad}");
        return ExitCode::from(2);
    }
    match run(opts) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("kernel-check: {e}");
            ExitCode::from(2)
        }
    }
}

struct Opts {
    expect_cached: bool,
    load_only: bool,
    timing: bool,
    small: bool,
}

fn run(opts: Opts) -> R<bool> {
    let info = cuda_available().map_err(|e| format!("no GPU: {e}"))?;
    println!("{info}");
    let gpu = Gpu::new(0)?;
    let t = Instant::now();
    let k = Kernels::load(&gpu)?;
    let r = &k.report;
    println!(
        "kernels: {} via NVRTC {}.{} (headers {}): compiled {:?}, cached {:?}, {:.2} s",
        r.arch,
        r.nvrtc_version.0,
        r.nvrtc_version.1,
        r.include_dir,
        r.compiled,
        r.cached,
        r.seconds
    );
    for w in &r.warnings {
        println!("warning: {w}");
    }
    let mut ok = true;
    if opts.expect_cached && !r.compiled.is_empty() {
        println!(
            "FAIL: a second start compiled {:?} (expected every module from the cache)",
            r.compiled
        );
        ok = false;
    }
    if opts.load_only {
        println!("{}", if ok { "LOAD OK" } else { "FAILED" });
        return Ok(ok);
    }
    let gemm = Gemm::new(&gpu)?;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    println!("seed {seed:#x}; load {:.2} s", t.elapsed().as_secs_f64());
    let mut c = Check {
        gpu: gpu.clone(),
        k,
        gemm,
        rng: Rng(seed),
        rows: Vec::new(),
        small: opts.small,
    };
    type Step = fn(&mut Check) -> R<()>;
    let steps: [(&str, Step); 13] = [
        ("norms", check_norms),
        ("qk_norm_rope", check_qk_norm_rope),
        ("attention", check_attention),
        ("attention_mma", check_attention_mma),
        ("attention_wgmma", check_attention_wgmma),
        ("elementwise", check_elementwise),
        ("fp8", check_fp8),
        ("fp8 activations", check_fp8_activations),
        ("conv", check_conv),
        ("group_norm", check_group_norm),
        ("gemm", check_gemm),
        ("gemm fused", check_gemm_fused),
        ("allocations", check_no_allocation),
    ];
    for (name, step) in steps {
        if let Err(e) = step(&mut c) {
            println!("FAIL: {name} stopped: {e}");
            ok = false;
        }
    }
    println!(
        "\n{:<24} {:<34} {:>10} {:>10} {:>9} {:>7} {:<22} result",
        "op", "shape", "max abs", "max rel", "worst", "bad", "tolerance"
    );
    for r in &c.rows {
        println!(
            "{:<24} {:<34} {:>10.3e} {:>10.3e} {:>9} {:>7} {:<22} {} {}",
            r.op,
            r.shape,
            r.max_abs,
            r.max_rel,
            r.worst,
            format!("{}/{}", r.bad, r.n),
            r.tol,
            if r.ok { "ok" } else { "FAIL" },
            r.note
        );
        ok &= r.ok;
    }
    if opts.timing {
        match timings(&mut c) {
            Ok(rows) => {
                println!(
                    "\n{:<24} {:<34} {:>10} {:>14}   (median of timed runs, {})",
                    "kernel", "shape", "ms", "rate", c.gpu.info.name
                );
                for (op, shape, ms, rate) in rows {
                    println!("{op:<24} {shape:<34} {ms:>10.3} {rate:>14}");
                }
            }
            Err(e) => {
                println!("FAIL: timing stopped: {e}");
                ok = false;
            }
        }
    }
    println!(
        "\n{} ({} checks, {} device allocations, {:.1} GiB)",
        if ok { "ALL OK" } else { "FAILED" },
        c.rows.len(),
        c.gpu.allocations(),
        c.gpu.allocated_bytes() as f64 / (1u64 << 30) as f64
    );
    Ok(ok)
}

//! `cuda/attention_mma.cu` on the emulated GPU: the real source against an f64 reference (QKNorm,
//! RoPE, attention composed as the unfused ops define them), under every block/thread order and
//! the race check; and mutants of the same source, compiled through the same NVRTC path, that
//! the check must catch: a broken fragment layout, a dropped barrier or cp.async wait, a RoPE
//! row off by one. Then the launcher through `Kernels`, with its launch counts.

use super::harness::{
    arg, buffer, compile, control, function, gpu, mutate, poisoned, random, read, run, serial,
};
use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::LaunchConfig;
use half::bf16;
use kontext_kernels::attention_mma::{self, Prologue, QkScales};
use kontext_kernels::Kernels;
use std::ffi::c_void;

const SOURCE: &str = attention_mma::FAMILY.source;

pub(super) fn bf16_round(v: &[f32]) -> (Vec<u16>, Vec<f32>) {
    let bits: Vec<u16> = v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
    let vals = bits.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
    (bits, vals)
}

/// One problem: qkv `[l, 3·heads·hd]`, two streams' scales split at `split`, pe from row `row0`.
#[derive(Clone, Copy)]
pub(super) struct Case {
    pub(super) l: usize,
    pub(super) heads: usize,
    pub(super) hd: usize,
    pub(super) split: usize,
    pub(super) row0: usize,
    pub(super) seed: u64,
}

/// QKNorm + RoPE + softmax(q̂·k̂ᵀ/√Dh)·v in f64, from the bf16 inputs.
pub(super) fn reference(c: Case, x: &[f32], sc: &[Vec<f32>], pe: &[f32]) -> Vec<f64> {
    let (l, hd) = (c.l, c.hd);
    let d = c.heads * hd;
    let w = 3 * d;
    let mut y: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for r in 0..l {
        let per = &pe[(c.row0 + r) * hd..][..hd];
        let s = if r < c.split { 0 } else { 2 };
        for part in 0..2 {
            let scale = &sc[s + part];
            for h in 0..c.heads {
                let o = r * w + part * d + h * hd;
                let ms = (0..hd).map(|i| (x[o + i] as f64).powi(2)).sum::<f64>() / hd as f64;
                let rr = 1.0 / (ms + 1e-6).sqrt();
                for j in 0..hd / 2 {
                    let a = x[o + 2 * j] as f64 * rr * scale[2 * j] as f64;
                    let b = x[o + 2 * j + 1] as f64 * rr * scale[2 * j + 1] as f64;
                    let (cs, sn) = (per[2 * j] as f64, per[2 * j + 1] as f64);
                    y[o + 2 * j] = cs * a - sn * b;
                    y[o + 2 * j + 1] = sn * a + cs * b;
                }
            }
        }
    }
    let scale = 1.0 / (hd as f64).sqrt();
    let mut out = vec![0.0; l * d];
    for h in 0..c.heads {
        for i in 0..l {
            let q = &y[i * w + h * hd..][..hd];
            let s: Vec<f64> = (0..l)
                .map(|j| {
                    let k = &y[j * w + d + h * hd..][..hd];
                    scale * q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>()
                })
                .collect();
            let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let p: Vec<f64> = s.iter().map(|v| (v - mx).exp()).collect();
            let sum: f64 = p.iter().sum();
            for dd in 0..hd {
                let acc: f64 = (0..l).map(|j| p[j] * y[j * w + 2 * d + h * hd + dd]).sum();
                out[i * d + h * hd + dd] = acc / sum;
            }
        }
    }
    out
}

/// Runs the two kernels of `source` (possibly mutated) on case `c`: the verdict of the launches
/// and ‖out − ref‖/‖ref‖ (NaN when the output holds NaN or a launch failed).
fn attention(source: &str, c: Case) -> (Result<(), cudarc::driver::DriverError>, f64) {
    let m = compile("attention_mma.cu", source).expect("compiles");
    let knr = function(&m, "attention_mma_k_norm_rope");
    let name = format!("attention_mma_d{}", c.hd);
    let f = function(&m, &name);
    let smem = attention_mma::smem_bytes(c.hd);
    f.set_attribute(
        CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .expect("the dynamic shared memory opt-in");
    let o = Operands::new(c);
    let r = o.k_pass(&knr, c);
    if r.is_err() {
        return (r, f64::NAN);
    }
    let d = c.heads * c.hd;
    let (qp, op) = (o.qkv.ptr(), o.out.ptr());
    let (s0q, s1q) = (o.scales[0].ptr(), o.scales[2].ptr());
    let pe_ptr = o.pe_ptr(c);
    let (ld, l32, h32, split) = (3 * d as i64, c.l as i32, c.heads as i32, c.split as i32);
    let (ld_pe, eps, scale, ld_out) = (c.hd as i64, 1e-6f32, 1.0 / (c.hd as f32).sqrt(), d as i64);
    let cfg = LaunchConfig {
        grid_dim: (c.l.div_ceil(64) as u32, c.heads as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: smem,
    };
    let mut p: Vec<*mut c_void> = vec![
        arg(&qp),
        arg(&ld),
        arg(&l32),
        arg(&h32),
        arg(&s0q),
        arg(&s1q),
        arg(&split),
        arg(&pe_ptr),
        arg(&ld_pe),
        arg(&eps),
        arg(&scale),
        arg(&op),
        arg(&ld_out),
    ];
    let r = run(&f, cfg, &mut p);
    if r.is_err() {
        return (r, f64::NAN);
    }
    (r, o.error(c))
}

type Alloc = std::sync::Arc<kontext_kernels::gpu::DeviceAlloc>;

/// A case's operands, for both fused attentions' checks: qkv (random, bf16), the QKNorm scales
/// (q, k of stream 0, then of stream 1), the RoPE table; on the host as the reference reads
/// them and on the device, with the output [L, H·Dh] poisoned.
pub(super) struct Operands {
    x: Vec<f32>,
    sc: Vec<Vec<f32>>,
    pe: Vec<f32>,
    pub(super) qkv: Alloc,
    pub(super) scales: Vec<Alloc>,
    dpe: Alloc,
    pub(super) out: Alloc,
}

impl Operands {
    pub(super) fn new(c: Case) -> Operands {
        let w = 3 * c.heads * c.hd;
        let (x_bits, x) = bf16_round(
            &random(c.l * w, c.seed)
                .iter()
                .map(|v| 2.0 * v)
                .collect::<Vec<_>>(),
        );
        let sc: Vec<Vec<f32>> = (0..4)
            .map(|i| {
                let v: Vec<f32> = random(c.hd, c.seed + 1 + i)
                    .iter()
                    .map(|r| 1.0 + 0.3 * r)
                    .collect();
                bf16_round(&v).1
            })
            .collect();
        // One spare row past the last used one: an off-by-one row reads real (wrong) angles
        // instead of faulting at the guard page, so the check itself has to see it.
        let lpe = c.row0 + c.l + 1;
        let pe: Vec<f32> = random(lpe * c.hd / 2, c.seed + 9)
            .iter()
            .flat_map(|r| {
                let a = 3.0 * r;
                [a.cos(), a.sin()]
            })
            .collect();
        Operands {
            qkv: buffer(&x_bits),
            scales: sc.iter().map(|v| buffer(v)).collect(),
            dpe: buffer(&pe),
            out: poisoned::<u16>(c.l * c.heads * c.hd),
            x,
            sc,
            pe,
        }
    }

    /// The device address of pe row `row0`, where the kernels start reading.
    pub(super) fn pe_ptr(&self, c: Case) -> u64 {
        self.dpe.ptr() + (c.row0 * c.hd * 4) as u64
    }

    /// `attention_mma_k_norm_rope` (`knr`): QKNorm + RoPE of qkv's k columns, in place, the
    /// pass both fused kernels start with.
    pub(super) fn k_pass(
        &self,
        knr: &cudarc::driver::CudaFunction,
        c: Case,
    ) -> Result<(), cudarc::driver::DriverError> {
        let (qp, s0k, s1k, pe_ptr) = (
            self.qkv.ptr(),
            self.scales[1].ptr(),
            self.scales[3].ptr(),
            self.pe_ptr(c),
        );
        let (ld, l32, h32, hd32, split) = (
            (3 * c.heads * c.hd) as i64,
            c.l as i32,
            c.heads as i32,
            c.hd as i32,
            c.split as i32,
        );
        let (ld_pe, eps) = (c.hd as i64, 1e-6f32);
        let cfg = LaunchConfig {
            grid_dim: (c.l as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut p: Vec<*mut c_void> = vec![
            arg(&qp),
            arg(&ld),
            arg(&l32),
            arg(&h32),
            arg(&hd32),
            arg(&s0k),
            arg(&s1k),
            arg(&split),
            arg(&pe_ptr),
            arg(&ld_pe),
            arg(&eps),
        ];
        run(knr, cfg, &mut p)
    }

    /// ‖out − ref‖/‖ref‖ of the output against the f64 reference (NaN when out holds NaN).
    pub(super) fn error(&self, c: Case) -> f64 {
        let got: Vec<f32> = read::<u16>(&self.out)
            .iter()
            .map(|&b| bf16::from_bits(b).to_f32())
            .collect();
        let want = reference(c, &self.x, &self.sc, &self.pe);
        let (mut e2, mut r2) = (0.0f64, 0.0f64);
        for (&g, &w) in got.iter().zip(&want) {
            e2 += (g as f64 - w).powi(2);
            r2 += w * w;
        }
        (e2 / r2).sqrt()
    }
}

/// bf16 q̂, k̂ and probabilities into f32 products, one bf16 rounding of the output: measured
/// ≈ 3e-3 (kernel_check's table); a mutant that multiplies wrong elements lands near 1.
const TOL: f64 = 1e-2;

/// Odd lengths (each 2 query tiles and 2 key tiles, the second with a tail: the double buffer
/// and its wait run), one and two heads, two streams, a pe offset.
const CASES: [Case; 2] = [
    Case {
        l: 70,
        heads: 2,
        hd: 64,
        split: 30,
        row0: 2,
        seed: 31,
    },
    Case {
        l: 100,
        heads: 1,
        hd: 128,
        split: 100,
        row0: 0,
        seed: 32,
    },
];

/// The verdict on a mutant: the launch refused (named by the emulator), or the result off.
fn caught(r: (Result<(), cudarc::driver::DriverError>, f64)) -> String {
    match r.0 {
        Err(e) => {
            let msg = control::last_error();
            control::clear_fault();
            format!("launch refused: {msg} ({e:?})")
        }
        Ok(()) if r.1.is_nan() || r.1 > TOL => format!("result off: ‖e‖/‖r‖ = {:.3e}", r.1),
        Ok(()) => panic!("the mutant passed the check (‖e‖/‖r‖ = {:.3e})", r.1),
    }
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn attention_mma_matches_the_reference_in_every_order_and_the_race_check() {
    let _g = serial();
    for c in CASES {
        for order in [0, 1, 2] {
            control::set_order(order, 5);
            control::set_racecheck(1);
            let (r, err) = attention(SOURCE, c);
            control::set_racecheck(0);
            control::set_order(0, 1);
            if let Err(e) = r {
                panic!(
                    "L{} Dh{} order {order}: {e:?}: {}",
                    c.l,
                    c.hd,
                    control::last_error()
                );
            }
            eprintln!(
                "L{} H{} Dh{} order {order}: ‖e‖/‖r‖ = {err:.3e}",
                c.l, c.heads, c.hd
            );
            assert!(err < TOL, "L{} Dh{} order {order}: {err:.3e}", c.l, c.hd);
        }
    }
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn a_broken_fragment_layout_is_caught() {
    let _g = serial();
    for (what, from, to) in [
        // V loaded without .trans: B gets key pairs of one dim instead of dim pairs of one key.
        (
            "v without .trans",
            "ldmatrix_x4_trans(b, vt + v_off",
            "ldmatrix_x4(b, vt + v_off",
        ),
        // q̂ rows 8–15 of each warp read from rows 0–7: the wrong lane → row mapping of A.
        (
            "A rows of lanes 8-15",
            "const int a_off = (warp * 16 + (lane & 15)) * S",
            "const int a_off = (warp * 16 + (lane & 7)) * S",
        ),
        // The k̂ matrices of the x4 in the wrong order: keys 8–15 paired with dims 0–7.
        (
            "k̂ x4 matrix order",
            "const int b_off = ((lane & 7) + 8 * (lane >> 4)) * S + 8 * ((lane >> 3) & 1);",
            "const int b_off = ((lane & 7) + 8 * ((lane >> 3) & 1)) * S + 8 * (lane >> 4);",
        ),
    ] {
        for c in CASES {
            let verdict = caught(attention(&mutate(SOURCE, from, to), c));
            assert!(verdict.starts_with("result off"), "{what}: {verdict}");
            eprintln!("{what}, Dh{}: {verdict}", c.hd);
        }
    }
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn a_dropped_barrier_or_cp_async_wait_is_caught() {
    let _g = serial();
    for (what, from, to) in [
        // Threads read k̂/v rows that other threads' copies deliver, before those have landed.
        (
            "barrier after the wait",
            "__syncthreads();  // every thread's copies of tile t",
            "// every thread's copies of tile t",
        ),
        // Tile t is read while its copies are still in flight.
        ("cp.async wait", "cp_async_wait<1>();", ""),
    ] {
        for c in CASES {
            control::set_order(2, 3);
            control::set_racecheck(1);
            let r = attention(&mutate(SOURCE, from, to), c);
            control::set_racecheck(0);
            control::set_order(0, 1);
            let verdict = caught(r);
            eprintln!("{what} dropped, Dh{}: {verdict}", c.hd);
        }
    }
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn a_rope_row_off_by_one_is_caught() {
    let _g = serial();
    for (what, from, to) in [
        (
            "q̂ (prologue)",
            "pe + (i64)i * ld_pe",
            "pe + (i64)(i + 1) * ld_pe",
        ),
        (
            "k̂ (k pass)",
            "pe + (i64)r * ld_pe",
            "pe + (i64)(r + 1) * ld_pe",
        ),
    ] {
        for c in CASES {
            let verdict = caught(attention(&mutate(SOURCE, from, to), c));
            assert!(verdict.starts_with("result off"), "{what}: {verdict}");
            eprintln!("pe row + 1 for {what}, Dh{}: {verdict}", c.hd);
        }
    }
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn the_launcher_runs_both_kernels_and_counts_them() {
    let _g = serial();
    let gpu = gpu();
    let k = Kernels::load(&gpu).expect("every family loads");
    let count = |k: &Kernels, name: &str| {
        k.launch_counts()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, c)| c)
            .unwrap_or_else(|| panic!("no counter for {name}"))
    };
    let (l, heads, hd) = (20usize, 2usize, 64usize);
    let d = heads * hd;
    let qkv = gpu
        .upload_bf16(&random(l * 3 * d, 7), l, 3 * d)
        .expect("upload");
    let sc = gpu.upload_f32(&vec![1.0; hd], 1, hd).expect("upload");
    let pe_host: Vec<f32> = (0..l * hd)
        .map(|i| if i % 2 == 0 { 1.0 } else { 0.0 })
        .collect();
    let pe = gpu.upload_f32(&pe_host, l, hd).expect("upload");
    let out = gpu
        .alloc_mat(kontext_kernels::DType::Bf16, l, d)
        .expect("alloc");
    let (sd, ped) = (sc.desc(), pe.desc());
    let s = QkScales { q: &sd, k: &sd };
    let p = Prologue {
        heads,
        head_dim: hd,
        scales: [s, s],
        split: l,
        pe: &ped,
        pe_row0: 0,
        eps: 1e-6,
    };
    k.attention_mma(&qkv, &p, &out).expect("runs");
    gpu.synchronize().expect("synchronises");
    assert_eq!(count(&k, "attention_mma_k_norm_rope"), 1);
    assert_eq!(count(&k, "attention_mma_d64"), 1);
    assert_eq!(count(&k, "attention_mma_d128"), 0);
    assert_eq!(count(&k, "attention"), 0);
    assert_eq!(count(&k, "qk_norm_rope"), 0);
    // Dh 96: Unsupported before anything is launched.
    let p96 = Prologue { head_dim: 96, ..p };
    let e = k.attention_mma(&qkv, &p96, &out).unwrap_err();
    assert!(
        matches!(e, kontext_kernels::KernelError::Unsupported { .. }),
        "{e}"
    );
    assert_eq!(count(&k, "attention_mma_k_norm_rope"), 1);
}

//! `cuda/attention_wgmma.cu` on the emulated GPU (sm_90a): the real source, behind the real k
//! pass and transpose, with the tensor maps the launcher builds, against the f64 reference of
//! attention_mma.rs (QKNorm, RoPE, attention composed as the unfused ops define them), in every
//! block/thread order and under the race check; mutants of the same source that the check must
//! catch: a broken P → A fragment mapping, an unswizzled q̂ tile, a dropped or wrong-parity
//! mbarrier wait, a RoPE row off by one, a missing key mask. Then the launcher through `Kernels`
//! with its launch counts, and the mma.sync kernel still chosen below sm_90.

use super::attention_mma::{Case, Operands};
use super::harness::{arg, compile, control, function, gpu, mutate, poisoned, random, run, serial};
use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaFunction, CudaModule, LaunchConfig};
use kontext_kernels::attention_mma::{self, Prologue, QkScales};
use kontext_kernels::attention_wgmma::{self, tensor_maps, vt_shape};
use kontext_kernels::{elementwise, DType, Kernels, MatDesc};
use std::ffi::c_void;
use std::sync::{Arc, OnceLock};

const SOURCE: &str = attention_wgmma::FAMILY.source;

/// Whether the emulated device runs sm_90a code (KONTEXT_EMU_CC=9.0, the default).
fn hopper() -> bool {
    let cc = gpu().info.compute_capability;
    let ok = cc == attention_wgmma::CC;
    if !ok {
        eprintln!("skipped: wgmma needs sm_90a, the emulated device is {cc:?}");
    }
    ok
}

/// The k pass (attention_mma.cu) and the transpose (elementwise.cu), compiled once.
fn helpers() -> (CudaFunction, CudaFunction) {
    static M: OnceLock<(Arc<CudaModule>, Arc<CudaModule>)> = OnceLock::new();
    let (a, e) = M.get_or_init(|| {
        (
            compile("attention_mma.cu", attention_mma::FAMILY.source).expect("compiles"),
            compile("elementwise.cu", elementwise::FAMILY.source).expect("compiles"),
        )
    });
    (
        function(a, "attention_mma_k_norm_rope"),
        function(e, "transpose"),
    )
}

fn bf16_desc(addr: u64, rows: usize, cols: usize, ld: usize) -> MatDesc {
    MatDesc {
        addr,
        rows,
        cols,
        ld,
        dtype: DType::Bf16,
    }
}

/// Runs the k pass, the transpose and the attention kernel of `source` (possibly mutated) on case
/// `c` (head dim 128): the verdict of the launches and ‖out − ref‖/‖ref‖ (NaN when the output
/// holds NaN or a launch failed).
fn attention(source: &str, c: Case) -> (Result<(), cudarc::driver::DriverError>, f64) {
    assert_eq!(c.hd, 128);
    let (knr, transpose) = helpers();
    let m = compile("attention_wgmma.cu", source).expect("compiles");
    let f = function(&m, "attention_wgmma_d128");
    f.set_attribute(
        CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        attention_wgmma::SMEM_BYTES as i32,
    )
    .expect("the dynamic shared memory opt-in");
    let o = Operands::new(c);
    let r = o.k_pass(&knr, c);
    if r.is_err() {
        return (r, f64::NAN);
    }
    let d = c.heads * c.hd;
    let w = 3 * d;
    // vᵀ with its padding columns poisoned: the kernel must never read past key L − 1.
    let (vt_rows, vt_cols, vt_ld) = vt_shape(c.l, c.heads);
    let vt = poisoned::<u16>(vt_rows * vt_ld);
    let (qp, op, vtp) = (o.qkv.ptr(), o.out.ptr(), vt.ptr());
    let (s0q, s1q) = (o.scales[0].ptr(), o.scales[2].ptr());
    let pe_ptr = o.pe_ptr(c);
    let (ld, l32, h32, split) = (w as i64, c.l as i32, c.heads as i32, c.split as i32);
    let (ld_pe, eps, scale, ld_out) = (c.hd as i64, 1e-6f32, 1.0 / (c.hd as f32).sqrt(), d as i64);
    let v_ptr = qp + (2 * d * 2) as u64;
    let (ld_vt, d32) = (vt_ld as i64, d as i32);
    let td = elementwise::transpose_dims(c.l, d);
    let cfg = LaunchConfig {
        grid_dim: td.grid,
        block_dim: td.block,
        shared_mem_bytes: 0,
    };
    let mut p: Vec<*mut c_void> = vec![
        arg(&v_ptr),
        arg(&ld),
        arg(&vtp),
        arg(&ld_vt),
        arg(&l32),
        arg(&d32),
    ];
    let r = run(&transpose, cfg, &mut p);
    if r.is_err() {
        return (r, f64::NAN);
    }
    let (kmap, vmap) = tensor_maps(
        &bf16_desc(qp, c.l, w, w),
        &bf16_desc(vtp, vt_rows, vt_cols, vt_ld),
    )
    .expect("the tensor maps encode");
    let cfg = LaunchConfig {
        grid_dim: (c.l.div_ceil(128) as u32, c.heads as u32, 1),
        block_dim: (384, 1, 1),
        shared_mem_bytes: attention_wgmma::SMEM_BYTES,
    };
    let mut p: Vec<*mut c_void> = vec![
        arg(&kmap),
        arg(&vmap),
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

/// As attention_mma.rs: bf16 q̂, k̂ and probabilities into f32 products (≈ 3e-3 measured); a
/// mutant that multiplies wrong elements lands near 1.
const TOL: f64 = 1e-2;

const fn case(l: usize, heads: usize, split: usize, row0: usize, seed: u64) -> Case {
    Case {
        l,
        heads,
        hd: 128,
        split,
        row0,
        seed,
    }
}

/// One query of one key tile; < one tile with a tail (and a second query warpgroup with no rows);
/// two query blocks and three key tiles with a tail; five key tiles (the 3-stage ring wraps, so
/// the empty barriers and the parities run); one real tile-aligned shape. One and three heads,
/// two streams split inside a tile, pe offsets.
const CASES: [Case; 5] = [
    case(1, 1, 1, 0, 41),
    case(37, 3, 20, 3, 42),
    case(130, 1, 77, 0, 43),
    case(257, 3, 100, 5, 44),
    case(512, 1, 512, 0, 45),
];

/// The verdict on a mutant: the launch refused (named by the emulator), the result off, or
/// (`Err`) passed.
fn verdict(r: (Result<(), cudarc::driver::DriverError>, f64)) -> Result<String, String> {
    match r.0 {
        Err(e) => {
            let msg = control::last_error();
            control::clear_fault();
            Ok(format!("launch refused: {msg} ({e:?})"))
        }
        Ok(()) if r.1.is_nan() || r.1 > TOL => Ok(format!("result off: ‖e‖/‖r‖ = {:.3e}", r.1)),
        Ok(()) => Err(format!("passed (‖e‖/‖r‖ = {:.3e})", r.1)),
    }
}

/// As [`verdict`], a mutant that passes failing the test.
fn caught(r: (Result<(), cudarc::driver::DriverError>, f64)) -> String {
    verdict(r).unwrap_or_else(|e| panic!("the mutant {e}"))
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn attention_wgmma_matches_the_reference() {
    let _g = serial();
    if !hopper() {
        return;
    }
    for c in CASES {
        let (r, err) = attention(SOURCE, c);
        if let Err(e) = r {
            panic!("L{} H{}: {e:?}: {}", c.l, c.heads, control::last_error());
        }
        eprintln!(
            "L{} H{} split {} pe row {}: ‖e‖/‖r‖ = {err:.3e}",
            c.l, c.heads, c.split, c.row0
        );
        assert!(err < TOL, "L{} H{}: {err:.3e}", c.l, c.heads);
    }
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn attention_wgmma_in_every_order_and_the_race_check() {
    let _g = serial();
    if !hopper() {
        return;
    }
    for c in [CASES[1], CASES[3]] {
        for order in [1, 2] {
            control::set_order(order, 7);
            control::set_racecheck(1);
            let (r, err) = attention(SOURCE, c);
            control::set_racecheck(0);
            control::set_order(0, 1);
            if let Err(e) = r {
                panic!("L{} order {order}: {e:?}: {}", c.l, control::last_error());
            }
            eprintln!(
                "L{} H{} order {order} + race check: ‖e‖/‖r‖ = {err:.3e}",
                c.l, c.heads
            );
            assert!(err < TOL, "L{} order {order}: {err:.3e}", c.l);
        }
    }
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn a_broken_fragment_layout_is_caught() {
    let _g = serial();
    if !hopper() {
        return;
    }
    for (what, from, to) in [
        // P → A: rows g + 8 take the keys 8–15 of row g (registers 1 and 2 of the A fragment
        // swapped).
        (
            "P -> A register order",
            "pa[kk][1] = awg_pack(sc[8 * kk + 2], sc[8 * kk + 3]);\n        pa[kk][2] = awg_pack(sc[8 * kk + 4], sc[8 * kk + 5]);",
            "pa[kk][1] = awg_pack(sc[8 * kk + 4], sc[8 * kk + 5]);\n        pa[kk][2] = awg_pack(sc[8 * kk + 2], sc[8 * kk + 3]);",
        ),
        // The q̂ tile written without the 128B swizzle that its descriptor declares.
        (
            "q̂ not swizzled",
            "return (unsigned)(r * 128 + (b ^ ((r & 7) << 4)));",
            "return (unsigned)(r * 128 + b);",
        ),
        // The second half of the k̂ tile (dims 64–127) read from the first.
        (
            "k̂ half offset",
            "dk[kk] = wgmma_desc(st + (kk / 4) * AWG_HALF_BYTES",
            "dk[kk] = wgmma_desc(st + 0 * AWG_HALF_BYTES",
        ),
    ] {
        for c in [CASES[1], CASES[3]] {
            let verdict = caught(attention(&mutate(SOURCE, from, to), c));
            assert!(verdict.starts_with("result off"), "{what}: {verdict}");
            eprintln!("{what}, L{}: {verdict}", c.l);
        }
    }
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn a_dropped_or_wrong_mbarrier_wait_is_caught() {
    let _g = serial();
    if !hopper() {
        return;
    }
    for (what, from, to) in [
        // Consumers read the first stage before the producer's copies fill it. (Dropping the
        // loop's wait for the later tiles shows on no emulated order: the twin's copies land at
        // issue and the scheduler runs the producer between the consumers' many collectives, so
        // it is never behind them. The wrong parity of that same wait is caught below.)
        (
            "first full wait dropped",
            "mbarrier_wait_parity(&full[0], 0u);",
            "",
        ),
        // The wrong phase: the first wait passes at once, later ones one fill early (or never:
        // a consumer that runs ahead arrives twice on a stage's empty barrier before the
        // producer looks, which then waits for a phase that never comes).
        (
            "full wait parity",
            "mbarrier_wait_parity(&full[sn], (unsigned)((t + 1) / AWG_STAGES) & 1u);",
            "mbarrier_wait_parity(&full[sn], (unsigned)((t + 1) / AWG_STAGES + 1) & 1u);",
        ),
        // The producer's first wait on a stage passes at once: it refills the stage under the
        // consumers, or completes a phase they have not waited for yet (then they wait forever).
        (
            "empty wait parity",
            "mbarrier_wait_parity(&empty[s], (unsigned)((t / AWG_STAGES) - 1) & 1u);",
            "mbarrier_wait_parity(&empty[s], (unsigned)(t / AWG_STAGES) & 1u);",
        ),
        // The producer refills a stage the consumers are still reading.
        (
            "empty wait dropped",
            "if (t >= AWG_STAGES) mbarrier_wait_parity(&empty[s], (unsigned)((t / AWG_STAGES) - 1) & 1u);",
            "",
        ),
    ] {
        // Five key tiles: the ring wraps, so a stage is reused while the mutant's wait is wrong.
        // Whether a missing wait shows depends on who runs first (forward order lets the
        // producer's copies land before the consumers look, as a fast TMA might): the check
        // must see it in at least one order, as the race check (two orders per launch) does.
        let c = CASES[3];
        // A hang is a catch too: the emulator names the endless wait, after fewer idle passes
        // than its default (a correct run of this case never spins that long in one stretch).
        control::set_spin_limit(20_000);
        let mut seen = 0;
        for order in [0, 1, 2] {
            control::set_order(order, 3);
            let r = attention(&mutate(SOURCE, from, to), c);
            control::set_order(0, 1);
            let v = verdict(r);
            seen += v.is_ok() as usize;
            eprintln!(
                "{what}, L{} order {order}: {}",
                c.l,
                v.unwrap_or_else(|e| e)
            );
        }
        control::set_racecheck(1);
        let r = attention(&mutate(SOURCE, from, to), c);
        control::set_racecheck(0);
        let v = verdict(r);
        seen += v.is_ok() as usize;
        eprintln!("{what}, L{} race check: {}", c.l, v.unwrap_or_else(|e| e));
        control::set_spin_limit(0);
        assert!(seen > 0, "{what}: no order caught it");
    }
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn a_rope_row_off_by_one_or_a_missing_key_mask_is_caught() {
    let _g = serial();
    if !hopper() {
        return;
    }
    for (what, from, to) in [
        (
            "pe row + 1 in the q̂ prologue",
            "pe + (i64)i * ld_pe",
            "pe + (i64)(i + 1) * ld_pe",
        ),
        // Keys ≥ L (zero-filled by the copy) would take part with score 0.
        (
            "key mask dropped",
            "if (tail && k0 + 8 * i + 2 * t4 + (j & 1) >= L) x = NEG_INF;",
            "",
        ),
    ] {
        for c in [CASES[1], CASES[3]] {
            let verdict = caught(attention(&mutate(SOURCE, from, to), c));
            assert!(verdict.starts_with("result off"), "{what}: {verdict}");
            eprintln!("{what}, L{}: {verdict}", c.l);
        }
    }
}

fn count(k: &Kernels, name: &str) -> u64 {
    k.launch_counts()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, c)| c)
        .unwrap_or_else(|| panic!("no counter for {name}"))
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn the_launcher_runs_three_kernels_and_matches_the_mma_kernel() {
    let _g = serial();
    if !hopper() {
        return;
    }
    let gpu = gpu();
    let k = Kernels::load(&gpu).expect("every family loads");
    let (l, heads, hd) = (70usize, 2usize, 128usize);
    let d = heads * hd;
    let host = random(l * 3 * d, 17);
    let sc = gpu
        .upload_f32(
            &random(hd, 18)
                .iter()
                .map(|r| 1.0 + 0.3 * r)
                .collect::<Vec<_>>(),
            1,
            hd,
        )
        .expect("upload");
    let pe_host: Vec<f32> = random(l * hd / 2, 19)
        .iter()
        .flat_map(|r| [(3.0 * r).cos(), (3.0 * r).sin()])
        .collect();
    let pe = gpu.upload_f32(&pe_host, l, hd).expect("upload");
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
    // The same inputs through both kernels (each normalises its own copy of k in place).
    let run = |wgmma: bool| -> Vec<f32> {
        let qkv = gpu.upload_bf16(&host, l, 3 * d).expect("upload");
        let out = gpu.alloc_mat(DType::Bf16, l, d).expect("alloc");
        gpu.fill_bytes(&out, 0xFF).expect("poison");
        if wgmma {
            let (r, c, ldv) = vt_shape(l, heads);
            let vt = gpu.alloc_mat(DType::Bf16, r, ldv).expect("alloc");
            let vt = vt.cols_range(0, c).expect("a view of the first L columns");
            k.attention_wgmma(&qkv, &p, &vt, &out).expect("runs");
        } else {
            k.attention_mma(&qkv, &p, &out).expect("runs");
        }
        gpu.read_f32(&out).expect("read")
    };
    let (a, b) = (run(true), run(false));
    gpu.synchronize().expect("synchronises");
    let (mut e2, mut r2) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(&b) {
        e2 += (x as f64 - y as f64).powi(2);
        r2 += (y as f64).powi(2);
    }
    let rel = (e2 / r2).sqrt();
    eprintln!("launcher L{l} H{heads}: wgmma vs mma.sync ‖e‖/‖r‖ = {rel:.3e}");
    assert!(rel < 5e-3, "{rel:.3e}");
    assert_eq!(count(&k, "attention_mma_k_norm_rope"), 2);
    assert_eq!(count(&k, "transpose"), 1);
    assert_eq!(count(&k, "attention_wgmma_d128"), 1);
    assert_eq!(count(&k, "attention_mma_d128"), 1);
    // Dh 64: Unsupported before anything is launched.
    let qkv = gpu
        .upload_bf16(&host[..l * 3 * 128], l, 3 * 128)
        .expect("upload");
    let out = gpu.alloc_mat(DType::Bf16, l, 128).expect("alloc");
    let vt = gpu.alloc_mat(DType::Bf16, 128, 72).expect("alloc");
    let s64 = gpu.upload_f32(&[1.0; 64], 1, 64).expect("upload");
    let pe64 = gpu.upload_f32(&vec![0.5; l * 64], l, 64).expect("upload");
    let (s64d, pe64d) = (s64.desc(), pe64.desc());
    let s = QkScales { q: &s64d, k: &s64d };
    let p64 = Prologue {
        heads: 2,
        head_dim: 64,
        scales: [s, s],
        pe: &pe64d,
        ..p
    };
    let e = k.attention_wgmma(&qkv, &p64, &vt, &out).unwrap_err();
    assert!(
        matches!(e, kontext_kernels::KernelError::Unsupported { .. }),
        "{e}"
    );
    assert_eq!(count(&k, "attention_mma_k_norm_rope"), 2);
}

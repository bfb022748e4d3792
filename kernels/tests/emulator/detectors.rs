//! The emulator's detectors, each proven by mutants of the project's real kernels that it
//! catches, and by the unmutated kernels that it lets pass: out-of-bounds access (guard pages
//! and canaries), a `__syncthreads` some threads never reach, warp collectives whose masks are
//! wrong, races (two orders, compared), misaligned vector access.

use super::harness::{
    arg, buffer, compile, control, function, mutate, poisoned, read, run, serial, with_common,
};
use cudarc::driver::LaunchConfig;
use half::bf16;
use kontext_kernels::{COMMON_CUH, FAMILIES};
use std::ffi::c_void;

fn family(name: &str) -> &'static str {
    FAMILIES
        .iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("no family {name}"))
        .source
}

fn bf16s(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect()
}

fn f32s(bits: &[u16]) -> Vec<f32> {
    bits.iter().map(|&b| bf16::from_bits(b).to_f32()).collect()
}

/// A failed launch: the driver's error and the emulator's message; the fault is then cleared
/// so the next test has a usable context.
fn expect_fault(r: Result<(), cudarc::driver::DriverError>, what: &[&str]) -> String {
    let e = r.expect_err("the emulator must refuse this launch");
    let msg = control::last_error();
    control::clear_fault();
    for w in what {
        assert!(
            msg.contains(w),
            "expected {w:?} in the emulator's report, got: {msg} ({e:?})"
        );
    }
    msg
}

// ---- silu (elementwise.cu): bounds ------------------------------------------------------------

/// Runs elementwise.cu's `silu` (possibly mutated) over `[1, cols]`, x and y allocated exactly.
fn silu(
    source: &str,
    cols: usize,
) -> (Result<(), cudarc::driver::DriverError>, Vec<f32>, Vec<f32>) {
    let m = compile("elementwise.cu", source).expect("compiles");
    let f = function(&m, "silu");
    let xs: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
    let x = buffer(&bf16s(&xs));
    let y = poisoned::<u16>(cols);
    let (xp, yp) = (x.ptr(), y.ptr());
    let (ld, rows, n) = (cols as i64, 1i32, cols as i32);
    let cfg = LaunchConfig {
        grid_dim: (cols.div_ceil(256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut p: Vec<*mut c_void> = vec![arg(&xp), arg(&ld), arg(&yp), arg(&ld), arg(&rows), arg(&n)];
    let r = run(&f, cfg, &mut p);
    let want: Vec<f32> = f32s(&bf16s(&xs))
        .iter()
        .map(|&v| v / (1.0 + (-v).exp()))
        .collect();
    // After a fault the context is unusable until the test clears it: read only after success.
    let got = if r.is_ok() {
        f32s(&read::<u16>(&y))
    } else {
        Vec::new()
    };
    (r, got, want)
}

const SILU_BOUND: &str = "c < (cols); c += gridDim.x * blockDim.x)";
const SILU_BOUND_OFF_BY_ONE: &str = "c <= (cols); c += gridDim.x * blockDim.x)";

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn out_of_bounds_read_past_an_allocation_is_stopped_and_named() {
    let _g = serial();
    let src = family("elementwise");
    // 256 bf16 = 512 bytes: the data ends on the guard page, so x[256] faults at once.
    let (r, y, want) = silu(src, 256);
    r.expect("the unmutated kernel runs");
    for (a, b) in y.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-2 * b.abs().max(1.0), "silu {a} vs {b}");
    }
    let (r, _, _) = silu(&mutate(src, SILU_BOUND, SILU_BOUND_OFF_BY_ONE), 256);
    let msg = expect_fault(
        r,
        &[
            "silu",
            "past the end of the 512-byte allocation",
            "block (0,0,0)",
        ],
    );
    eprintln!("caught: {msg}");
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn out_of_bounds_write_into_the_slack_is_found_by_the_canary() {
    let _g = serial();
    let src = family("elementwise");
    // 100 bf16 = 200 bytes: y[100] lands in the 56 bytes of slack before the 256 round.
    let (r, _, _) = silu(src, 100);
    r.expect("the unmutated kernel runs");
    let (r, _, _) = silu(&mutate(src, SILU_BOUND, SILU_BOUND_OFF_BY_ONE), 100);
    // The first clobbered canary byte: 200 or 201 (a NaN's low byte is the canary's own 0xFF).
    let msg = expect_fault(r, &["silu", "of the 200-byte allocation", "(past its end)"]);
    eprintln!("caught: {msg}");
}

// ---- rms_norm (norm_modulate.cu + common.cuh's block_sum): barriers, shuffles, races -----------

/// rms_norm over `[rows, cols]` from `source`; the launch verdict and the max error against the
/// f64 reference (NaN when the output holds NaN).
fn rms_norm(
    source: &str,
    rows: usize,
    cols: usize,
) -> (Result<(), cudarc::driver::DriverError>, f64) {
    let m = compile("norm_modulate.cu", source).expect("compiles");
    let f = function(&m, "rms_norm");
    let xs: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let ws: Vec<f32> = (0..cols).map(|i| 0.5 + (i % 7) as f32 / 7.0).collect();
    let x = buffer(&bf16s(&xs));
    let w = buffer(&ws);
    let y = poisoned::<u16>(rows * cols);
    let (xp, wp, yp) = (x.ptr(), w.ptr(), y.ptr());
    let (ld, r32, c32, eps) = (cols as i64, rows as i32, cols as i32, 1e-6f32);
    // Two blocks for `rows` rows: the grid-stride loop reuses shared memory between rows.
    let cfg = LaunchConfig {
        grid_dim: (2, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut p: Vec<*mut c_void> = vec![
        arg(&xp),
        arg(&ld),
        arg(&yp),
        arg(&ld),
        arg(&r32),
        arg(&c32),
        arg(&wp),
        arg(&eps),
    ];
    let res = run(&f, cfg, &mut p);
    if res.is_err() {
        return (res, f64::NAN);
    }
    let xb = f32s(&bf16s(&xs));
    let y = f32s(&read::<u16>(&y));
    let mut worst = 0.0f64;
    for r in 0..rows {
        let row = &xb[r * cols..(r + 1) * cols];
        let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / cols as f64;
        let inv = 1.0 / (ms + 1e-6).sqrt();
        for c in 0..cols {
            let want = ws[c] as f64 * row[c] as f64 * inv;
            let err = (y[r * cols + c] as f64 - want).abs() / want.abs().max(1e-3);
            worst = if err.is_nan() {
                f64::NAN
            } else {
                worst.max(err)
            };
            if worst.is_nan() {
                return (res, worst);
            }
        }
    }
    (res, worst)
}

/// The reference check every mutant must fail: the launch fails, or its result is off.
fn caught(r: (Result<(), cudarc::driver::DriverError>, f64)) -> String {
    match r.0 {
        Err(e) => {
            let msg = control::last_error();
            control::clear_fault();
            format!("launch refused: {msg} ({e:?})")
        }
        Ok(()) if r.1.is_nan() || r.1 > 1e-2 => {
            format!("result off: max relative error {:.3e}", r.1)
        }
        Ok(()) => panic!(
            "the mutant passed the check (max relative error {:.3e})",
            r.1
        ),
    }
}

fn norm_with(common: &str) -> String {
    with_common(family("norm_modulate"), common)
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn unmutated_block_reductions_pass_under_every_order_and_the_race_check() {
    let _g = serial();
    for order in [0, 1, 2] {
        control::set_order(order, 11);
        control::set_racecheck(1);
        let (r, err) = rms_norm(&norm_with(COMMON_CUH), 5, 700);
        control::set_racecheck(0);
        control::set_order(0, 1);
        r.expect("unmutated rms_norm runs");
        assert!(err <= 1e-2, "order {order}: max relative error {err}");
    }
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn a_removed_barrier_is_caught() {
    let _g = serial();
    // block_sum's second barrier: warps read scratch before every warp has written it.
    let site = "    if (lane == 0) scratch[warp] = v;\n    __syncthreads();\n    v = lane < nwarps ? scratch[lane] : 0.0f;";
    let mutant = mutate(
        COMMON_CUH,
        site,
        "    if (lane == 0) scratch[warp] = v;\n    v = lane < nwarps ? scratch[lane] : 0.0f;",
    );
    control::set_racecheck(1);
    let verdict = caught(rms_norm(&norm_with(&mutant), 5, 700));
    control::set_racecheck(0);
    eprintln!("barrier removed: {verdict}");
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn a_wrong_shuffle_offset_is_caught() {
    let _g = serial();
    // warp_sum starting at offset 8: lanes 16 apart are never added.
    let mutant = mutate(
        COMMON_CUH,
        "for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);",
        "for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);",
    );
    let verdict = caught(rms_norm(&norm_with(&mutant), 5, 700));
    assert!(verdict.starts_with("result off"), "{verdict}");
    eprintln!("shuffle offset 8: {verdict}");
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn a_shuffle_mask_that_leaves_out_the_caller_is_refused() {
    let _g = serial();
    let mutant = mutate(
        COMMON_CUH,
        "for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);",
        "for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0x0000ffffu, v, o);",
    );
    let verdict = caught(rms_norm(&norm_with(&mutant), 5, 700));
    // Lanes 0–15 find that they read lanes the mask leaves out, lanes 16–31 that the mask leaves
    // them out: whichever the emulator meets first, it names the kernel and the mask.
    assert!(
        verdict.contains("rms_norm") && verdict.contains("mask 0x0000ffff"),
        "{verdict}"
    );
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn a_barrier_some_threads_skip_is_an_error_not_a_hang() {
    let _g = serial();
    // Whole warps leave before the first block_sum: its warp shuffles complete, its barrier
    // cannot.
    let src = mutate(
        family("norm_modulate"),
        "    __shared__ float scratch[32];\n",
        "    __shared__ float scratch[32];\n    if (threadIdx.x >= 64) return;\n",
    );
    let verdict = caught(rms_norm(&src, 3, 300));
    assert!(
        verdict.contains("rms_norm")
            && verdict.contains("__syncthreads not reached by every thread"),
        "{verdict}"
    );
    eprintln!("{verdict}");
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn a_collective_waiting_for_an_exited_lane_is_an_error() {
    let _g = serial();
    // One lane leaves: its warp's shuffles name a lane that is gone.
    let src = mutate(
        family("norm_modulate"),
        "    __shared__ float scratch[32];\n",
        "    __shared__ float scratch[32];\n    if (threadIdx.x == 37) return;\n",
    );
    let verdict = caught(rms_norm(&src, 3, 300));
    assert!(
        verdict.contains("rms_norm") && verdict.contains("exited"),
        "{verdict}"
    );
}

// ---- attention.cu: misaligned vector access ---------------------------------------------------

fn attention(source: &str) -> Result<(), cudarc::driver::DriverError> {
    let m = compile("attention.cu", source).expect("compiles");
    let f = function(&m, "attention");
    let (l, heads, dh) = (20usize, 2usize, 16usize);
    let d = heads * dh;
    let qkv = buffer(&bf16s(&super::harness::random(l * 3 * d, 5)));
    let out = poisoned::<u16>(l * d);
    let (qp, op) = (qkv.ptr(), out.ptr());
    let null = 0u64;
    let (ld, l32, h32, dh32, ldo, ldb) = (
        (3 * d) as i64,
        l as i32,
        heads as i32,
        dh as i32,
        d as i64,
        0i64,
    );
    let (scale, causal) = (0.25f32, 0i32);
    let cfg = LaunchConfig {
        grid_dim: (l.div_ceil(16) as u32, heads as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut p: Vec<*mut c_void> = vec![
        arg(&qp),
        arg(&ld),
        arg(&l32),
        arg(&h32),
        arg(&dh32),
        arg(&scale),
        arg(&causal),
        arg(&null),
        arg(&ldb),
        arg(&op),
        arg(&ldo),
    ];
    run(&f, cfg, &mut p)
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn a_misaligned_vector_load_faults_as_on_a_gpu() {
    let _g = serial();
    let src = family("attention");
    attention(src).expect("the unmutated kernel runs");
    // The score loop's bf16x2 loads from shared memory, started one element off.
    let mutant = mutate(
        src,
        "for (int d = 0; d < head_dim; d += 2) {",
        "for (int d = 1; d < head_dim; d += 2) {",
    );
    let msg = expect_fault(attention(&mutant), &["attention", "misaligned"]);
    eprintln!("caught: {msg}");
}

// ---- a race the order change exposes ----------------------------------------------------------

const LAST_WRITER: &str = r#"
extern "C" __global__ void last_writer(int* out, int racy) {
    __shared__ int s;
    if (racy || threadIdx.x == 0) s = threadIdx.x;  // racy: every thread writes, unordered
    __syncthreads();
    if (threadIdx.x == 0) out[blockIdx.x] = s;
}
"#;

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn the_race_check_finds_a_shared_memory_race_and_passes_the_fixed_kernel() {
    let _g = serial();
    let m = compile("last_writer.cu", LAST_WRITER).expect("compiles");
    let f = function(&m, "last_writer");
    let out = poisoned::<i32>(4);
    let op = out.ptr();
    let cfg = LaunchConfig {
        grid_dim: (4, 1, 1),
        block_dim: (64, 1, 1),
        shared_mem_bytes: 0,
    };
    control::set_racecheck(1);
    let fixed = 0i32;
    let r = run(&f, cfg, &mut [arg(&op), arg(&fixed)]);
    let fixed_out = read::<i32>(&out);
    let racy = 1i32;
    let r2 = run(&f, cfg, &mut [arg(&op), arg(&racy)]);
    control::set_racecheck(0);
    r.expect("the fixed kernel passes the race check");
    assert_eq!(fixed_out, vec![0; 4]);
    let msg = expect_fault(r2, &["last_writer", "race"]);
    eprintln!("caught: {msg}");
}

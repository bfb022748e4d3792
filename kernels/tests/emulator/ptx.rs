//! The PTX twins of `kernels/cuda/ptx.cuh` against the PTX ISA's documented behaviour. The test
//! kernels (`kernels/emu/tests/ptx_twins.cu`) fill fragments by the documented layout formulas;
//! here the results are compared with CPU products (f64) or the documented lane mapping, and a
//! deliberately wrong fill is shown to be caught.

use super::harness::{compile, dims, download, function, gpu, random, serial, upload};
use cudarc::driver::{CudaModule, PushKernelArg};
use half::bf16;
use kontext_loader::dtype::E4M3_TO_F32;
use std::sync::{Arc, OnceLock};

const PTX_CUH: &str = include_str!("../../cuda/ptx.cuh");
const TWINS: &str = include_str!("../../emu/tests/ptx_twins.cu");

/// Launches `f` with the arguments and synchronises: the driver's verdict. (harness::run takes a
/// closure over `LaunchArgs<'_>`, which only accepts `'static` arguments.)
macro_rules! launch {
    ($f:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let gpu = gpu();
        let stream = gpu.stream();
        let mut b = stream.launch_builder($f);
        $(b.arg($arg);)+
        // SAFETY: test kernels on the emulated GPU, arguments as the kernel declares them; a kernel
        // that strays is stopped by the emulator (guard pages), never touching host memory.
        unsafe { b.launch($cfg) }.and_then(|_| stream.synchronize())
    }};
}

/// Whether the emulated device (KONTEXT_EMU_CC) has compute capability `major.minor` or newer;
/// the test kernels compile instructions newer than the target out, so their tests skip.
fn has_cc(major: i32, minor: i32, what: &str) -> bool {
    let cc = gpu().info.compute_capability;
    let ok = cc >= (major, minor);
    if !ok {
        eprintln!("skipped: {what} needs sm_{major}{minor}, the emulated device is {cc:?}");
    }
    ok
}

/// The test kernels with `ptx.cuh` pasted in where they include it (the NVRTC wrapper hands NVRTC
/// only `common.cuh`); `#pragma once` goes, meaningless in a main file.
fn module() -> Arc<CudaModule> {
    // Each test runs on its own thread; cuModuleGetFunction wants the context current there.
    gpu()
        .context()
        .bind_to_thread()
        .expect("the emulated context binds");
    static M: OnceLock<Arc<CudaModule>> = OnceLock::new();
    M.get_or_init(|| {
        let header: String = PTX_CUH
            .lines()
            .filter(|l| l.trim() != "#pragma once")
            .map(|l| format!("{l}\n"))
            .collect();
        let source = TWINS.replacen("#include \"ptx.cuh\"", &header, 1);
        compile("ptx_twins", &source).unwrap_or_else(|e| panic!("ptx_twins.cu: {e}"))
    })
    .clone()
}

fn bf16_round(v: &[f32]) -> (Vec<u16>, Vec<f32>) {
    let bits: Vec<u16> = v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
    let vals = bits.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
    (bits, vals)
}

/// D = A·B + C in f64 for row-major A [m][k], B [k][n], C [m][n]; also Σ|a·b| + |c| per element,
/// the scale the accumulation error is measured against.
fn matmul(a: &[f32], b: &[f32], c: &[f32], m: usize, k: usize, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut d = vec![0.0; m * n];
    let mut scale = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = c[i * n + j] as f64;
            let mut a_s = (c[i * n + j] as f64).abs();
            for p in 0..k {
                let prod = a[i * k + p] as f64 * b[p * n + j] as f64;
                s += prod;
                a_s += prod.abs();
            }
            d[i * n + j] = s;
            scale[i * n + j] = a_s;
        }
    }
    (d, scale)
}

/// Largest |got − want| / (Σ|a·b| + |c|) and where; NaN counts as infinitely wrong.
fn worst(got: &[f32], want: &[f64], scale: &[f64]) -> (f64, usize) {
    let mut w = (0.0f64, 0usize);
    for i in 0..got.len() {
        let e = if got[i].is_finite() {
            (got[i] as f64 - want[i]).abs() / scale[i].max(1e-30)
        } else {
            f64::INFINITY
        };
        if e > w.0 {
            w = (e, i);
        }
    }
    w
}

// f32 accumulation of ≤ 48 exact products, rounded once per mma by the twin (twice or more on a
// GPU, which truncates while aligning): a few f32 ulps of Σ|a·b|.
const MMA_TOL: f64 = 1e-5;
// A wrong fragment layout multiplies the wrong elements: errors of the order of the values.
const MUTANT_MIN: f64 = 0.05;

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn ldmatrix_matches_the_documented_fragment_layout() {
    let _s = serial();
    let m = module();
    let f = function(&m, "ldmatrix_layout");
    // Element (matrix i, row j, column c) = i·4096 + j·256 + c·16 + 7: every element distinct.
    let src: Vec<u16> = (0..256u16)
        .map(|e| (e / 64) * 4096 + ((e / 8) % 8) * 256 + (e % 8) * 16 + 7)
        .collect();
    let val = |i: usize, j: usize, c: usize| src[i * 64 + j * 8 + c] as u32;
    let s = upload(&src);
    let mut out = upload(&vec![0xDEAD_BEEFu32; 32 * 14]);
    launch!(&f, dims(1, 32), &s, &mut out).expect("ldmatrix_layout runs");
    let got = download(&out);
    let mut bad = Vec::new();
    for lane in 0..32usize {
        let (row, pair) = (lane / 4, 2 * (lane % 4));
        let mut k = 0;
        for (trans, counts) in [(false, [1, 2, 4]), (true, [1, 2, 4])] {
            for num in counts {
                for i in 0..num {
                    // Register i: matrix i; plain: row lane/4, columns 2·(lane%4) and +1;
                    // .trans: column lane/4, rows 2·(lane%4) and +1. Low half first.
                    let want = if trans {
                        val(i, pair, row) | val(i, pair + 1, row) << 16
                    } else {
                        val(i, row, pair) | val(i, row, pair + 1) << 16
                    };
                    if got[lane * 14 + k] != want {
                        bad.push(format!(
                            "lane {lane} x{num}{} r{i}: got {:#010x}, want {want:#010x}",
                            if trans { ".trans" } else { "" },
                            got[lane * 14 + k]
                        ));
                    }
                    k += 1;
                }
            }
        }
    }
    eprintln!(
        "ldmatrix: 32 lanes × 14 registers, {} mismatches",
        bad.len()
    );
    assert!(bad.is_empty(), "{}", bad[..bad.len().min(12)].join("\n"));
}

/// Runs mma_bf16_layout for `warps` tiles of 16×8 with K = 16·ksteps; (normalised error, where).
fn mma_bf16(warps: usize, ksteps: i32, mutant: i32, seed: u64) -> (f64, usize) {
    let m = module();
    let f = function(&m, "mma_bf16_layout");
    let k = 16 * ksteps as usize;
    let (a_bits, a) = bf16_round(&random(warps * 16 * k, seed));
    let (b_bits, b) = bf16_round(&random(warps * k * 8, seed + 1));
    let c = random(warps * 128, seed + 2);
    let (da, db, dc) = (upload(&a_bits), upload(&b_bits), upload(&c));
    let mut dd = upload(&vec![f32::NAN; warps * 128]);
    launch!(
        &f,
        dims(1, 32 * warps as u32),
        &da,
        &db,
        &dc,
        &mut dd,
        &ksteps,
        &mutant
    )
    .expect("mma_bf16_layout runs");
    let got = download(&dd);
    let mut want = Vec::new();
    let mut scale = Vec::new();
    for w in 0..warps {
        let (d, s) = matmul(
            &a[w * 16 * k..(w + 1) * 16 * k],
            &b[w * k * 8..(w + 1) * k * 8],
            &c[w * 128..(w + 1) * 128],
            16,
            k,
            8,
        );
        want.extend(d);
        scale.extend(s);
    }
    worst(&got, &want, &scale)
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn mma_m16n8k16_bf16_matches_a_cpu_product() {
    let _s = serial();
    for (warps, ksteps, seed) in [(1, 1, 11), (4, 3, 12), (2, 8, 13)] {
        let (e, at) = mma_bf16(warps, ksteps, 0, seed);
        eprintln!(
            "mma.m16n8k16.bf16: {warps} warps, K = {}: max normalised error {e:.2e} at {at}",
            16 * ksteps
        );
        assert!(e <= MMA_TOL, "error {e:.3e} at {at} (K = {})", 16 * ksteps);
    }
}

/// The test can fail: fragments filled by a wrong layout give a wrong product.
#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn mma_bf16_with_a_wrong_fragment_layout_mismatches() {
    let _s = serial();
    for (mutant, what) in [
        (1, "A filled with g = lane % 8, t = lane / 8"),
        (2, "B's two bf16 halves swapped"),
    ] {
        let (e, at) = mma_bf16(2, 2, mutant, 21);
        eprintln!("mutant {mutant} ({what}): max normalised error {e:.2e} at {at}");
        assert!(
            e > MUTANT_MIN,
            "mutant {mutant} ({what}) was not caught: error {e:.3e}"
        );
    }
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn cp_async_ldmatrix_and_mma_compose() {
    let _s = serial();
    let m = module();
    let f = function(&m, "ldmatrix_mma");
    let (a_bits, a) = bf16_round(&random(256, 31));
    let (b_bits, b) = bf16_round(&random(128, 32));
    let (da, db) = (upload(&a_bits), upload(&b_bits));
    let mut dd = upload(&vec![f32::NAN; 128]);
    launch!(&f, dims(1, 32), &da, &db, &mut dd).expect("ldmatrix_mma runs");
    let (want, scale) = matmul(&a, &b, &[0.0; 128], 16, 16, 8);
    let (e, at) = worst(&download(&dd), &want, &scale);
    eprintln!("cp.async → ldmatrix.x4 / .x2.trans → mma: max normalised error {e:.2e} at {at}");
    assert!(e <= MMA_TOL, "error {e:.3e} at {at}");
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn mma_m16n8k32_e4m3_matches_a_cpu_product() {
    let _s = serial();
    if !has_cc(8, 9, "mma.m16n8k32.e4m3") {
        return;
    }
    let m = module();
    let f = function(&m, "mma_e4m3_layout");
    // Random codes without the two NaN encodings (0x7F, 0xFF), magnitudes up to 448.
    let codes = |n: usize, seed: u64| -> Vec<u8> {
        random(n, seed)
            .iter()
            .map(|&x| (((x + 1.0) * 127.99) as u8).min(0xFE))
            .map(|c| if c & 0x7F == 0x7F { c - 1 } else { c })
            .collect()
    };
    let (a8, b8) = (codes(16 * 32, 41), codes(32 * 8, 42));
    let dec = |v: &[u8]| -> Vec<f32> {
        v.iter()
            .map(|&c| f32::from_bits(E4M3_TO_F32[c as usize]))
            .collect()
    };
    let (a, b) = (dec(&a8), dec(&b8));
    let c: Vec<f32> = random(128, 43).iter().map(|x| x * 1000.0).collect();
    let (da, db, dc) = (upload(&a8), upload(&b8), upload(&c));
    let mut dd = upload(&vec![f32::NAN; 128]);
    launch!(&f, dims(1, 32), &da, &db, &dc, &mut dd).expect("mma_e4m3_layout runs");
    let (want, scale) = matmul(&a, &b, &c, 16, 32, 8);
    let (e, at) = worst(&download(&dd), &want, &scale);
    eprintln!("mma.m16n8k32.e4m3: max normalised error {e:.2e} at {at}");
    assert!(e <= MMA_TOL, "error {e:.3e} at {at}");
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn cp_async_copies_at_the_wait_that_retires_its_group() {
    let _s = serial();
    let m = module();
    let f = function(&m, "cp_async_groups");
    let src: Vec<u32> = (0..256 * 4u32).map(|i| 0x1000_0000 + i * 7).collect();
    let chunk =
        |c: usize| -> [u32; 4] { [src[4 * c], src[4 * c + 1], src[4 * c + 2], src[4 * c + 3]] };
    let ds = upload(&src);
    let mut out = upload(&vec![0xDEAD_BEEFu32; 640 * 4]);
    launch!(&f, dims(1, 64), &ds, &mut out).expect("cp_async_groups runs");
    let got = download(&out);
    let at = |slot: usize| -> [u32; 4] {
        [
            got[4 * slot],
            got[4 * slot + 1],
            got[4 * slot + 2],
            got[4 * slot + 3],
        ]
    };
    let sentinel = [0xA5A5_A5A5u32; 4];
    let mut bad = Vec::new();
    let mut check = |what: &str, tid: usize, got: [u32; 4], want: [u32; 4]| {
        if got != want {
            bad.push(format!(
                "thread {tid}, {what}: got {got:08x?}, want {want:08x?}"
            ));
        }
    };
    for t in 0..64 {
        check("before any wait", t, at(t), sentinel);
        check("wait_group 1, group 0", t, at(128 + t), chunk(t));
        check("wait_group 1, group 1", t, at(192 + t), sentinel);
        check("wait_group 0, group 0", t, at(256 + t), chunk(t));
        check("wait_group 0, group 1", t, at(320 + t), chunk(64 + t));
        // Zero-fill: the first t % 17 bytes from chunk 128 + t, the rest zero (little-endian).
        let n = t % 17;
        let mut bytes = [0u8; 16];
        for (i, byte) in bytes.iter_mut().enumerate().take(n) {
            *byte = (chunk(128 + t)[i / 4] >> (8 * (i % 4))) as u8;
        }
        let mut z = [0u32; 4];
        for (i, w) in z.iter_mut().enumerate() {
            *w = u32::from_le_bytes([
                bytes[4 * i],
                bytes[4 * i + 1],
                bytes[4 * i + 2],
                bytes[4 * i + 3],
            ]);
        }
        check("zero-fill", t, at(384 + t), z);
        check(
            "uncommitted, after wait_group 0",
            t,
            at(512 + t),
            chunk(64 + t),
        );
        check(
            "uncommitted, after wait_all",
            t,
            at(576 + t),
            chunk(192 + t),
        );
    }
    eprintln!(
        "cp.async: 64 threads × 8 snapshots, {} mismatches",
        bad.len()
    );
    assert!(bad.is_empty(), "{}", bad[..bad.len().min(12)].join("\n"));
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn mbarrier_phases_complete_when_every_thread_arrives() {
    let _s = serial();
    let m = module();
    let f = function(&m, "mbarrier_phases");
    let mut out = upload(&vec![0xDEAD_BEEFu32; 4 * 64 * 5]);
    launch!(&f, dims(1, 64), &mut out).expect("mbarrier_phases runs");
    let got = download(&out);
    let names = [
        "phase p done before arriving",
        "phase p−1 done before arriving",
        "phase p done after the wait",
        "the other parity done after the wait",
        "stale neighbour values",
    ];
    let want = [0u32, 1, 1, 0, 0];
    let mut bad = Vec::new();
    for p in 0..4 {
        for t in 0..64 {
            for k in 0..5 {
                let g = got[(p * 64 + t) * 5 + k];
                if g != want[k] {
                    bad.push(format!(
                        "phase {p}, thread {t}: {} = {g}, want {}",
                        names[k], want[k]
                    ));
                }
            }
        }
    }
    eprintln!(
        "mbarrier: 4 phases × 64 threads × 5 observations, {} mismatches",
        bad.len()
    );
    assert!(bad.is_empty(), "{}", bad[..bad.len().min(12)].join("\n"));
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn mbarrier_tx_count_and_bulk_copies() {
    let _s = serial();
    if !has_cc(9, 0, "mbarrier expect-tx and bulk copies") {
        return;
    }
    let m = module();
    let f = function(&m, "mbarrier_tx");
    let src: Vec<u32> = (0..64 * 4u32)
        .map(|i| 0x7700_0000 ^ (i * 2654435761u32))
        .collect();
    let ds = upload(&src);
    let mut out = upload(&vec![0xDEAD_BEEFu32; 64 * 4]);
    let mut flags = upload(&[7u32; 5]);
    launch!(&f, dims(1, 32), &ds, &mut out, &mut flags).expect("mbarrier_tx runs");
    let flags = download(&flags);
    eprintln!("mbarrier tx flags {flags:?} (want [0, 0, 1, 0, 1])");
    assert_eq!(flags, [0, 0, 1, 0, 1], "phase completion vs tx-count");
    assert_eq!(
        download(&out),
        src,
        "bulk-copied data as read after the waits"
    );
}

/// The emulated driver's test-only control entry points (kernels/emu/src/driver.cpp): the last
/// failure's message, and forgetting a sticky fault so the next case can launch.
fn emu_fault() -> String {
    // SAFETY: libcuda.so.1 is the emulated driver (gpu() checked), already loaded; the symbols
    // have the C signatures declared here.
    unsafe {
        let lib = libloading::Library::new("libcuda.so.1").expect("the emulated driver");
        let last: libloading::Symbol<unsafe extern "C" fn(*mut u8, usize) -> usize> = lib
            .get(b"kontext_emu_last_error")
            .expect("kontext_emu_last_error");
        let clear: libloading::Symbol<unsafe extern "C" fn()> = lib
            .get(b"kontext_emu_clear_fault")
            .expect("kontext_emu_clear_fault");
        let mut buf = vec![0u8; 1024];
        let n = last(buf.as_mut_ptr(), buf.len()).min(buf.len() - 1);
        clear();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

/// Each misuse stops the launch (on a GPU: a fault, a hang or garbage), naming the instruction
/// and what was wrong.
#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn misuse_of_the_twins_fails_the_launch() {
    let _s = serial();
    let m = module();
    let src = upload(&vec![0u8; 256]);
    let mut gdst = upload(&vec![0u8; 256]);
    let g16 = upload(&vec![0u16; 256]);
    let cases: [(&str, i32, &str); 7] = [
        ("cp_async_misuse", 0, "not 16-byte aligned"),
        (
            "cp_async_misuse",
            1,
            "global-memory address where shared memory is required",
        ),
        ("cp_async_misuse", 2, "src-size is larger than cp-size"),
        ("ldmatrix_misuse", 0, "not 16-byte aligned"),
        (
            "ldmatrix_misuse",
            1,
            "global-memory address where shared memory is required",
        ),
        ("mbarrier_misuse", 0, "was not initialised"),
        ("mbarrier_misuse", 1, "more arrivals than the current phase"),
    ];
    for (name, kind, want) in cases {
        if name == "mbarrier_misuse" && kind == 1 && !has_cc(9, 0, "mbarrier.arrive.expect_tx") {
            continue;
        }
        let f = function(&m, name);
        let r = match name {
            "cp_async_misuse" => launch!(&f, dims(1, 32), &src, &mut gdst, &kind),
            "ldmatrix_misuse" => launch!(&f, dims(1, 32), &g16, &kind),
            _ => launch!(&f, dims(1, 32), &kind),
        };
        let message = emu_fault();
        eprintln!("{name}({kind}): {r:?}: {message}");
        assert!(r.is_err(), "{name}({kind}) was not refused");
        assert!(
            message.contains(name) && message.contains(want),
            "{name}({kind}): the message should name the kernel and say {want:?}: {message}"
        );
    }
    // After the refusals (and clear_fault) a correct kernel runs again.
    let f = function(&m, "mbarrier_phases");
    let mut out = upload(&vec![0u32; 4 * 64 * 5]);
    launch!(&f, dims(1, 64), &mut out).expect("a correct kernel after the faults");
}

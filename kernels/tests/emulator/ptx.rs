//! The PTX twins of `kernels/cuda/ptx.cuh` against the PTX ISA's documented behaviour. The test
//! kernels (`kernels/emu/tests/ptx_twins.cu`) fill fragments by the documented layout formulas;
//! here the results are compared with CPU products (f64) or the documented lane mapping, and a
//! deliberately wrong fill is shown to be caught.

use super::harness::{
    arg, buffer, compile, dims, download, function, gpu, poisoned, random, read, run, serial,
    upload,
};
use cudarc::driver::{sys, CudaModule, LaunchConfig, PushKernelArg};
use half::bf16;
use kontext_loader::dtype::E4M3_TO_F32;
use std::ffi::c_void;
use std::sync::{Arc, OnceLock};

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

/// The test kernels, compiled once (NVRTC gets `ptx.cuh` in memory beside `common.cuh`).
fn module() -> Arc<CudaModule> {
    // Each test runs on its own thread; cuModuleGetFunction wants the context current there.
    gpu()
        .context()
        .bind_to_thread()
        .expect("the emulated context binds");
    static M: OnceLock<Arc<CudaModule>> = OnceLock::new();
    M.get_or_init(|| compile("ptx_twins", TWINS).unwrap_or_else(|e| panic!("ptx_twins.cu: {e}")))
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

// ---- Hopper: wgmma and TMA tensor copies -------------------------------------------------------

/// A launch of `threads` threads in one block with `smem` bytes of dynamic shared memory.
fn block(threads: u32, smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// Runs wgmma_m64n{n} on A [64][64] and B [64][n] (bf16, fresh random), the tiles laid out for
/// swizzle span `span` (0, 32, 64, 128): the outputs and the normalised error against f64.
fn wgmma(n: usize, span: i32, mutant: i32, seed: u64) -> (Vec<f32>, f64, usize) {
    let m = module();
    let f = function(&m, &format!("wgmma_m64n{n}"));
    let (a_bits, a) = bf16_round(&random(64 * 64, seed));
    let (b_bits, b) = bf16_round(&random(64 * n, seed + 1));
    let (da, db) = (upload(&a_bits), upload(&b_bits));
    let mut dd = upload(&vec![1234.5f32; 64 * n]);
    // The tiles, and for the mutants room to misread into (poisoned: NaN) rather than past the
    // end, which the twin would refuse. Past 48 KiB a kernel opts in, as on a GPU.
    let smem = if mutant == 0 {
        (64 * 64 * 2 + n * 64 * 2) as u32
    } else {
        96 << 10
    };
    f.set_attribute(
        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        96 << 10,
    )
    .expect("cuFuncSetAttribute");
    launch!(&f, block(128, smem), &da, &db, &mut dd, &span, &mutant).unwrap_or_else(|e| {
        panic!(
            "wgmma_m64n{n} ({span}, mutant {mutant}): {e:?}: {}",
            emu_fault()
        )
    });
    let got = download(&dd);
    let (want, scale) = matmul(&a, &b, &vec![0.0; 64 * n], 64, 64, n);
    let (e, at) = worst(&got, &want, &scale);
    (got, e, at)
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn wgmma_m64nnk16_bf16_matches_a_cpu_product() {
    let _s = serial();
    if !has_cc(9, 0, "wgmma") {
        return;
    }
    let mut seed = 51;
    for n in [64, 128, 256] {
        for span in [0, 32, 64, 128] {
            let (_, e, at) = wgmma(n, span, 0, seed);
            seed += 2;
            eprintln!(
                "wgmma m64n{n}k16 × 4 (K = 64), {}: max normalised error {e:.2e} at {at}",
                if span == 0 {
                    "no swizzle".to_string()
                } else {
                    format!("{span}B swizzle")
                }
            );
            assert!(
                e <= MMA_TOL,
                "m64n{n}, swizzle {span}: error {e:.3e} at {at}"
            );
        }
    }
}

/// The test can fail: a wrong descriptor or layout gives a wrong product, and accumulators read
/// before wgmma_wait_group are NaN.
#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn wgmma_with_a_wrong_layout_mismatches() {
    let _s = serial();
    if !has_cc(9, 0, "wgmma") {
        return;
    }
    for (n, span, mutant, what) in [
        (64, 0, 1, "LBO and SBO swapped"),
        (128, 0, 1, "LBO and SBO swapped"),
        (64, 128, 2, "tiles written without the 128B swizzle"),
        (256, 64, 2, "tiles written without the 64B swizzle"),
        (64, 32, 2, "tiles written without the 32B swizzle"),
        (128, 128, 3, "SBO halved (128B swizzle)"),
        (64, 0, 3, "SBO halved (no swizzle)"),
    ] {
        let (_, e, at) = wgmma(n, span, mutant, 71);
        eprintln!("m64n{n}, swizzle {span}, mutant {mutant} ({what}): max normalised error {e:.2e} at {at}");
        assert!(
            e > MUTANT_MIN,
            "mutant {mutant} ({what}) was not caught: error {e:.3e}"
        );
    }
    let (got, _, _) = wgmma(64, 128, 4, 73);
    let nan = got.iter().filter(|x| x.is_nan()).count();
    eprintln!(
        "accumulators stored before the wait: {nan} of {} NaN",
        got.len()
    );
    assert_eq!(
        nan,
        got.len(),
        "a read before wgmma_wait_group must see NaN"
    );
}

/// wgmma with A from registers (the P·V product of attention_wgmma.cu): the documented fragment
/// gives the CPU product, registers 1 and 2 swapped do not.
#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn wgmma_with_a_from_registers_matches_a_cpu_product() {
    let _s = serial();
    if !has_cc(9, 0, "wgmma") {
        return;
    }
    let m = module();
    let f = function(&m, "wgmma_rs_m64n128");
    f.set_attribute(
        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        16 << 10,
    )
    .expect("cuFuncSetAttribute");
    let (a_bits, a) = bf16_round(&random(64 * 64, 91));
    let (b_bits, b) = bf16_round(&random(64 * 128, 92));
    let (want, scale) = matmul(&a, &b, &vec![0.0; 64 * 128], 64, 64, 128);
    for mutant in [0i32, 1] {
        let (da, db) = (upload(&a_bits), upload(&b_bits));
        let mut dd = upload(&vec![1234.5f32; 64 * 128]);
        launch!(&f, block(128, 16 << 10), &da, &db, &mut dd, &mutant).unwrap_or_else(|e| {
            panic!("wgmma_rs_m64n128 (mutant {mutant}): {e:?}: {}", emu_fault())
        });
        let (e, at) = worst(&download(&dd), &want, &scale);
        eprintln!("wgmma m64n128k16, A from registers × 4, mutant {mutant}: max normalised error {e:.2e} at {at}");
        if mutant == 0 {
            assert!(e <= MMA_TOL, "error {e:.3e} at {at}");
        } else {
            assert!(e >= MUTANT_MIN, "the swapped fragment went unseen: {e:.3e}");
        }
    }
}

/// A CUtensorMap of a row-major [rows][cols] bf16 matrix at `ptr` with `stride` bytes a row.
#[allow(clippy::too_many_arguments)]
fn encode_2d(
    ptr: u64,
    cols: u64,
    rows: u64,
    stride: u64,
    bx: [u32; 2],
    swizzle: sys::CUtensorMapSwizzle,
    oob: sys::CUtensorMapFloatOOBfill,
) -> (sys::CUresult, sys::CUtensorMap) {
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    let dims = [cols, rows];
    let strides = [stride];
    let es = [1u32, 1];
    // SAFETY: every array has the rank's length (strides rank − 1); the map is 128 bytes, aligned.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            2,
            ptr as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            bx.as_ptr(),
            es.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            swizzle,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_NONE,
            oob,
        )
    };
    (r, map)
}

/// The bf16 value the host expects at shared byte offset `o` of a TMA box: the documented swizzle
/// undone by rows and chunks (span S: in row j of S bytes, stored chunk c holds logical chunk
/// c ^ (j % 8) / (128 / S)), then the element of the matrix or the out-of-bounds fill.
fn expected_box_element(
    o: usize,
    span: usize,
    box_cols: usize,
    at: (i64, i64),
    matrix: &[u16],
    (rows, cols): (usize, usize),
) -> Option<u16> {
    let row_bytes = box_cols * 2;
    let (j, in_row) = (o / row_bytes, o % row_bytes);
    // Rows per step of the chunk permutation: 1, 2, 4 for spans of 128, 64, 32 bytes.
    let logical = match 128usize.checked_div(span) {
        None => in_row,
        Some(rows_per_step) => ((in_row / 16) ^ ((j % 8) / rows_per_step)) * 16 + in_row % 16,
    };
    let (r, c) = (at.1 + j as i64, at.0 + (logical / 2) as i64);
    if r < 0 || c < 0 || r >= rows as i64 || c >= cols as i64 {
        None
    } else {
        Some(matrix[r as usize * cols + c as usize])
    }
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn tma_2d_copies_a_box_with_its_swizzle_and_out_of_bounds_fill() {
    use sys::CUtensorMapFloatOOBfill::*;
    use sys::CUtensorMapSwizzle::*;
    let _s = serial();
    if !has_cc(9, 0, "cp.async.bulk.tensor") {
        return;
    }
    let m = module();
    let f = function(&m, "tma_2d");
    // [100][200] bf16, every element distinct and nonzero (zero marks the fill).
    let (rows, cols) = (100usize, 200usize);
    let matrix: Vec<u16> = (0..rows * cols).map(|i| (i % 65000 + 1) as u16).collect();
    let g = buffer(&matrix);
    let cases = [
        (
            CU_TENSOR_MAP_SWIZZLE_128B,
            128,
            [64u32, 32],
            (0i64, 0i64),
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        ),
        (
            CU_TENSOR_MAP_SWIZZLE_128B,
            128,
            [64, 32],
            (128, 80),
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        ),
        (
            CU_TENSOR_MAP_SWIZZLE_128B,
            128,
            [64, 32],
            (160, 50),
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        ),
        (
            CU_TENSOR_MAP_SWIZZLE_128B,
            128,
            [64, 32],
            (-16, -8),
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        ),
        (
            CU_TENSOR_MAP_SWIZZLE_64B,
            64,
            [32, 16],
            (180, 90),
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        ),
        (
            CU_TENSOR_MAP_SWIZZLE_32B,
            32,
            [16, 24],
            (8, 3),
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        ),
        (
            CU_TENSOR_MAP_SWIZZLE_NONE,
            0,
            [24, 8],
            (184, 96),
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        ),
        (
            CU_TENSOR_MAP_SWIZZLE_128B,
            128,
            [64, 32],
            (150, 90),
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA,
        ),
    ];
    for (swizzle, span, bx, at, oob) in cases {
        let (r, map) = encode_2d(
            g.ptr(),
            cols as u64,
            rows as u64,
            2 * cols as u64,
            bx,
            swizzle,
            oob,
        );
        assert_eq!(
            r,
            sys::CUresult::CUDA_SUCCESS,
            "cuTensorMapEncodeTiled {bx:?} {swizzle:?}"
        );
        let bytes = bx[0] * 2 * bx[1];
        let out = poisoned::<u8>(bytes as usize);
        let (op, x, y, kind) = (out.ptr(), at.0 as i32, at.1 as i32, 0i32);
        let mut p = vec![
            arg(&map),
            arg(&op),
            arg(&x),
            arg(&y),
            arg(&bytes),
            arg(&kind),
        ];
        run(&f, block(32, 4096), &mut p).expect("tma_2d runs");
        let got: Vec<u16> = read::<u8>(&out)
            .chunks(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        let (mut bad, mut filled) = (Vec::new(), 0);
        for (i, &v) in got.iter().enumerate() {
            let want = expected_box_element(2 * i, span, bx[0] as usize, at, &matrix, (rows, cols));
            let ok = match (want, oob) {
                (Some(w), _) => v == w,
                (None, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) => v == 0,
                // bf16 NaN: exponent all ones, mantissa nonzero.
                (None, _) => v & 0x7F80 == 0x7F80 && v & 0x7F != 0,
            };
            filled += want.is_none() as usize;
            if !ok {
                bad.push(format!("shared element {i}: got {v:#06x}, want {want:?}"));
            }
        }
        eprintln!(
            "TMA 2d box {bx:?} at {at:?}, {swizzle:?}, {oob:?}: {} elements, {filled} filled, {} mismatches",
            got.len(),
            bad.len()
        );
        assert!(bad.is_empty(), "{}", bad[..bad.len().min(12)].join("\n"));
    }
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn tma_1d_with_the_map_in_global_memory() {
    let _s = serial();
    if !has_cc(9, 0, "cp.async.bulk.tensor") {
        return;
    }
    let m = module();
    let f = function(&m, "tma_1d");
    let v: Vec<f32> = (0..1000).map(|i| i as f32 + 0.5).collect();
    let g = buffer(&v);
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    let (dims, bx, es) = ([1000u64], [64u32], [1u32]);
    // SAFETY: rank 1 (no strides), arrays of length 1, a 128-byte aligned map.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
            1,
            g.ptr() as *mut c_void,
            dims.as_ptr(),
            std::ptr::null(),
            bx.as_ptr(),
            es.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    assert_eq!(r, sys::CUresult::CUDA_SUCCESS);
    let dmap = buffer(&map.opaque);
    let out = poisoned::<f32>(64);
    let (mp, op, x, bytes) = (dmap.ptr(), out.ptr(), 960i32, 256u32);
    let mut p = vec![arg(&mp), arg(&op), arg(&x), arg(&bytes)];
    run(&f, block(32, 256), &mut p).expect("tma_1d runs");
    let got = read::<f32>(&out);
    let want: Vec<f32> = (960..1024)
        .map(|i| if i < 1000 { i as f32 + 0.5 } else { 0.0 })
        .collect();
    eprintln!("TMA 1d: 64 f32 from element 960 of 1000 (24 filled)");
    assert_eq!(got, want);
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn cu_tensor_map_encode_tiled_refuses_what_the_driver_refuses() {
    use sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE as FILL0;
    use sys::CUtensorMapSwizzle::*;
    let _s = serial();
    if !has_cc(9, 0, "cuTensorMapEncodeTiled") {
        return;
    }
    let g = buffer(&[0u16; 100 * 200]);
    let host = [0u16; 64];
    let p = g.ptr();
    let (ok, _) = encode_2d(
        p,
        200,
        100,
        400,
        [64, 32],
        CU_TENSOR_MAP_SWIZZLE_128B,
        FILL0,
    );
    assert_eq!(ok, sys::CUresult::CUDA_SUCCESS, "the valid map");
    let refusals = [
        (
            "globalAddress 8 bytes off 16-byte alignment",
            encode_2d(
                p + 8,
                200,
                100,
                400,
                [64, 32],
                CU_TENSOR_MAP_SWIZZLE_NONE,
                FILL0,
            )
            .0,
        ),
        (
            "globalAddress in host memory",
            encode_2d(
                host.as_ptr() as u64,
                8,
                8,
                16,
                [8, 8],
                CU_TENSOR_MAP_SWIZZLE_NONE,
                FILL0,
            )
            .0,
        ),
        (
            "stride 392, not a multiple of 16",
            encode_2d(
                p,
                196,
                100,
                392,
                [64, 32],
                CU_TENSOR_MAP_SWIZZLE_NONE,
                FILL0,
            )
            .0,
        ),
        (
            "stride 384 below the row's 400 bytes",
            encode_2d(
                p,
                200,
                100,
                384,
                [64, 32],
                CU_TENSOR_MAP_SWIZZLE_NONE,
                FILL0,
            )
            .0,
        ),
        (
            "stride 2^40",
            encode_2d(
                p,
                200,
                100,
                1 << 40,
                [64, 32],
                CU_TENSOR_MAP_SWIZZLE_NONE,
                FILL0,
            )
            .0,
        ),
        (
            "boxDim 257",
            encode_2d(
                p,
                200,
                100,
                400,
                [64, 257],
                CU_TENSOR_MAP_SWIZZLE_NONE,
                FILL0,
            )
            .0,
        ),
        (
            "boxDim 0",
            encode_2d(p, 200, 100, 400, [64, 0], CU_TENSOR_MAP_SWIZZLE_NONE, FILL0).0,
        ),
        (
            "box row of 8 bytes",
            encode_2d(p, 200, 100, 400, [4, 8], CU_TENSOR_MAP_SWIZZLE_NONE, FILL0).0,
        ),
        (
            "box row of 256 bytes with the 128B swizzle",
            encode_2d(
                p,
                200,
                100,
                400,
                [128, 8],
                CU_TENSOR_MAP_SWIZZLE_128B,
                FILL0,
            )
            .0,
        ),
        (
            "box row of 64 bytes with the 32B swizzle",
            encode_2d(p, 200, 100, 400, [32, 8], CU_TENSOR_MAP_SWIZZLE_32B, FILL0).0,
        ),
        (
            "globalDim 0",
            encode_2d(p, 0, 100, 400, [64, 32], CU_TENSOR_MAP_SWIZZLE_NONE, FILL0).0,
        ),
    ];
    let mut bad = Vec::new();
    for (what, r) in refusals {
        eprintln!("{what}: {r:?}");
        if r != sys::CUresult::CUDA_ERROR_INVALID_VALUE {
            bad.push(format!("{what}: {r:?}, want CUDA_ERROR_INVALID_VALUE"));
        }
    }
    // Rank, element strides and the NaN fill of an integer type, through the raw entry point.
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    let dims = [200u64, 100, 1, 1, 1, 1];
    let strides = [400u64, 40000, 40000, 40000, 40000];
    let bx = [64u32, 32, 1, 1, 1, 1];
    let mut encode = |rank: u32, es: [u32; 6], dtype, oob| {
        // SAFETY: the arrays hold 6 entries, more than any rank asks for.
        unsafe {
            sys::cuTensorMapEncodeTiled(
                &mut map,
                dtype,
                rank,
                p as *mut c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                bx.as_ptr(),
                es.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_NONE,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_NONE,
                oob,
            )
        }
    };
    use sys::CUtensorMapDataType::*;
    use sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA as FILLNAN;
    let ones = [1u32; 6];
    let raw = [
        (
            "rank 0",
            encode(0, ones, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, FILL0),
        ),
        (
            "rank 6",
            encode(6, ones, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, FILL0),
        ),
        (
            "elementStrides 9",
            encode(
                2,
                [1, 9, 1, 1, 1, 1],
                CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                FILL0,
            ),
        ),
        (
            "NaN fill of UINT16",
            encode(2, ones, CU_TENSOR_MAP_DATA_TYPE_UINT16, FILLNAN),
        ),
    ];
    for (what, r) in raw {
        eprintln!("{what}: {r:?}");
        if r != sys::CUresult::CUDA_ERROR_INVALID_VALUE {
            bad.push(format!("{what}: {r:?}, want CUDA_ERROR_INVALID_VALUE"));
        }
    }
    assert_eq!(
        encode(
            2,
            [1, 8, 1, 1, 1, 1],
            CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            FILLNAN
        ),
        sys::CUresult::CUDA_SUCCESS,
        "elementStrides 8 with the NaN fill of bf16 is valid"
    );
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// Each misuse of a Hopper twin stops the launch, naming the instruction and what was wrong.
#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn misuse_of_the_hopper_twins_fails_the_launch() {
    use sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE as FILL0;
    let _s = serial();
    if !has_cc(9, 0, "wgmma and cp.async.bulk.tensor") {
        return;
    }
    let m = module();
    let f = function(&m, "wgmma_misuse");
    for (kind, want) in [
        (0, "not in the block's dynamic shared memory"),
        (1, "issues different descriptors"),
        (2, "no wgmma_fence"),
        (3, "past the block's 4096 bytes of dynamic shared memory"),
    ] {
        let r = launch!(&f, block(128, 4096), &kind);
        let message = emu_fault();
        eprintln!("wgmma_misuse({kind}): {r:?}: {message}");
        assert!(r.is_err(), "wgmma_misuse({kind}) was not refused");
        assert!(
            message.contains("wgmma") && message.contains(want),
            "wgmma_misuse({kind}): the message should name wgmma and say {want:?}: {message}"
        );
    }
    let f = function(&m, "tma_2d");
    let g = buffer(&vec![0u16; 64 * 64]);
    let (_, good) = encode_2d(
        g.ptr(),
        64,
        64,
        128,
        [64, 8],
        sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
        FILL0,
    );
    let zero = sys::CUtensorMap { opaque: [0; 16] };
    let out = poisoned::<u8>(1024);
    for (map, kind, want) in [
        (&zero, 0, "was not written by the emulated driver"),
        (&good, 1, "not in the block's dynamic shared memory"),
        (&good, 2, "a 3d copy with a tensor map of rank 2"),
    ] {
        let (op, x, y, bytes) = (out.ptr(), 0i32, 0i32, 1024u32);
        let mut p = vec![
            arg(map),
            arg(&op),
            arg(&x),
            arg(&y),
            arg(&bytes),
            arg(&kind),
        ];
        let r = run(&f, block(32, 4096), &mut p);
        let message = emu_fault();
        eprintln!("tma_2d({kind}): {r:?}: {message}");
        assert!(r.is_err(), "tma_2d({kind}) was not refused");
        assert!(
            message.contains("cp.async.bulk.tensor") && message.contains(want),
            "tma_2d({kind}): the message should name the instruction and say {want:?}: {message}"
        );
    }
}

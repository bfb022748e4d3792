//! The emulated device's semantics and the driver's refusals: warp collectives as CUDA defines
//! them, barriers with reductions, atomics across blocks, dynamic shared memory, 3-D indices,
//! poisoned shared memory; launches past the device's limits, modules for another architecture,
//! out of memory, copies outside an allocation.

use super::harness::{arg, buffer, compile, control, function, gpu, poisoned, read, run, serial};
use cudarc::driver::LaunchConfig;
use kontext_kernels::nvrtc::Nvrtc;
use kontext_kernels::Family;

const KERNELS: &str = r#"
#include "common.cuh"

// out[32·k + lane]: k = 0 shfl idx (lane 5), 1 up 3, 2 down 3, 3 xor 1, 4 idx in width 8
// (source 2), 5 xor 4 in width 8, 6 ballot(lane odd), 7 any(lane == 9), 8 all(lane < 40),
// 9 __syncthreads_count(lane odd, block of 64), 10 and, 11 or.
extern "C" __global__ void collectives(int* out) {
    const int lane = threadIdx.x & 31;
    const int v = 100 + (int)threadIdx.x;
    int* o = out + (threadIdx.x >> 5) * 12 * 32;
    o[0 * 32 + lane] = __shfl_sync(FULL_MASK, v, 5);
    o[1 * 32 + lane] = __shfl_up_sync(FULL_MASK, v, 3);
    o[2 * 32 + lane] = __shfl_down_sync(FULL_MASK, v, 3);
    o[3 * 32 + lane] = __shfl_xor_sync(FULL_MASK, v, 1);
    o[4 * 32 + lane] = __shfl_sync(FULL_MASK, v, 2, 8);
    o[5 * 32 + lane] = __shfl_xor_sync(FULL_MASK, v, 4, 8);
    o[6 * 32 + lane] = (int)__ballot_sync(FULL_MASK, lane & 1);
    o[7 * 32 + lane] = __any_sync(FULL_MASK, lane == 9);
    o[8 * 32 + lane] = __all_sync(FULL_MASK, lane < 40);
    o[9 * 32 + lane] = __syncthreads_count(threadIdx.x & 1);
    o[10 * 32 + lane] = __syncthreads_and(threadIdx.x < 64);
    o[11 * 32 + lane] = __syncthreads_or(threadIdx.x == 63);
}

extern "C" __global__ void count_threads(unsigned int* total, float* fsum) {
    atomicAdd(total, 1u);
    atomicAdd(fsum, 0.5f);
}

// Dynamic shared memory and 3-D indices: each thread writes its linear index into shared
// memory at a reversed position, and reads its own position back after the barrier.
extern "C" __global__ void dynamic_smem(int* out) {
    extern __shared__ __align__(16) int buf[];
    const int n = blockDim.x * blockDim.y * blockDim.z;
    const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const int b = blockIdx.x + gridDim.x * blockIdx.y;
    buf[n - 1 - t] = t + 1000 * b;
    __syncthreads();
    out[b * n + t] = buf[t];
}

// Shared memory nobody wrote reads as the emulator's poison. (The write that never happens
// keeps g++ from folding the reads of a never-written static into its zero initialiser.)
extern "C" __global__ void read_unwritten_smem(unsigned int* out, int never) {
    __shared__ unsigned int s[64];
    if (never) s[threadIdx.x] = 0;
    out[threadIdx.x] = s[threadIdx.x];
}

extern "C" __global__ void __launch_bounds__(128) bounded(int* out) { out[threadIdx.x] = 1; }

// Writes dynamic shared memory at [offset, offset + blockDim.x) ints.
extern "C" __global__ void dynamic_smem_at(int* out, int offset) {
    extern __shared__ int buf[];
    buf[offset + threadIdx.x] = 1;
    __syncthreads();
    out[threadIdx.x] = buf[offset + threadIdx.x];
}

// Thread 0 waits for a flag nobody sets: a spin-wait that can never end.
extern "C" __global__ void spin_forever(volatile int* flag) {
    if (threadIdx.x == 0)
        while (*flag == 0) __nanosleep(100);
}
"#;

fn module() -> std::sync::Arc<cudarc::driver::CudaModule> {
    compile("runtime_test.cu", KERNELS).expect("the test kernels compile")
}

fn cfg(grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: block,
        shared_mem_bytes: smem,
    }
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn warp_collectives_and_block_reductions_follow_cuda() {
    let m = module();
    let f = function(&m, "collectives");
    let out = poisoned::<i32>(2 * 12 * 32);
    let p = out.ptr();
    run(&f, cfg((1, 1, 1), (64, 1, 1), 0), &mut [arg(&p)]).expect("runs");
    let o = read::<i32>(&out);
    for warp in 0..2usize {
        for lane in 0..32usize {
            let t = (warp * 32 + lane) as i32;
            let v = |l: usize| 100 + (warp * 32 + l) as i32;
            let at = |k: usize| o[warp * 12 * 32 + k * 32 + lane];
            assert_eq!(at(0), v(5));
            assert_eq!(at(1), if lane >= 3 { v(lane - 3) } else { v(lane) });
            assert_eq!(at(2), if lane + 3 < 32 { v(lane + 3) } else { v(lane) });
            assert_eq!(at(3), v(lane ^ 1));
            assert_eq!(at(4), v((lane & !7) + 2));
            assert_eq!(at(5), v(lane ^ 4));
            assert_eq!(at(6) as u32, 0xAAAA_AAAA);
            assert_eq!(at(7), 1);
            assert_eq!(at(8), 1);
            assert_eq!(at(9), 32, "thread {t}");
            assert_eq!(at(10), 1);
            assert_eq!(at(11), 1);
        }
    }
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn atomics_are_atomic_across_blocks_on_several_workers() {
    let m = module();
    let f = function(&m, "count_threads");
    let total = buffer(&[0u32]);
    let fsum = buffer(&[0f32]);
    let (a, b) = (total.ptr(), fsum.ptr());
    run(&f, cfg((97, 1, 1), (256, 1, 1), 0), &mut [arg(&a), arg(&b)]).expect("runs");
    assert_eq!(read::<u32>(&total), vec![97 * 256]);
    assert_eq!(read::<f32>(&fsum), vec![97.0 * 256.0 * 0.5]);
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn dynamic_shared_memory_and_three_dimensional_indices() {
    let m = module();
    let f = function(&m, "dynamic_smem");
    let n = 8 * 4 * 2;
    let blocks = 3 * 2;
    let out = poisoned::<i32>(n * blocks);
    let p = out.ptr();
    run(
        &f,
        cfg((3, 2, 1), (8, 4, 2), (n * 4) as u32),
        &mut [arg(&p)],
    )
    .expect("runs");
    let o = read::<i32>(&out);
    for b in 0..blocks {
        for t in 0..n {
            assert_eq!(
                o[b * n + t],
                (n - 1 - t) as i32 + 1000 * b as i32,
                "block {b} thread {t}"
            );
        }
    }
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn shared_memory_starts_poisoned() {
    let m = module();
    let f = function(&m, "read_unwritten_smem");
    let out = buffer(&[0u32; 64]);
    let (p, never) = (out.ptr(), 0i32);
    run(
        &f,
        cfg((2, 1, 1), (64, 1, 1), 0),
        &mut [arg(&p), arg(&never)],
    )
    .expect("runs");
    assert!(read::<u32>(&out).iter().all(|&v| v == 0xFFFF_FFFF));
}

/// A launch the driver must refuse, and what it says.
fn refused(c: LaunchConfig, name: &str, what: &str) {
    let _g = serial();
    let m = module();
    let f = function(&m, name);
    let out = poisoned::<i32>(2048);
    let (p, never) = (out.ptr(), 0i32);
    // Every kernel named here takes (int* out[, int]); an extra parameter is never read.
    let e = run(&f, c, &mut [arg(&p), arg(&never)]).expect_err("the launch must be refused");
    let msg = control::last_error();
    control::clear_fault();
    assert!(msg.contains(what) && msg.contains(name), "{msg} ({e:?})");
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn launches_past_the_device_limits_are_refused() {
    refused(
        cfg((1, 1, 1), (1025, 1, 1), 0),
        "read_unwritten_smem",
        "exceeds the device's limits",
    );
    refused(
        cfg((1, 1, 1), (8, 8, 65), 0),
        "read_unwritten_smem",
        "exceeds the device's limits",
    );
    refused(
        cfg((1, 65536, 1), (32, 1, 1), 0),
        "read_unwritten_smem",
        "grid exceeds",
    );
    refused(
        cfg((1, 1, 1), (256, 1, 1), 0),
        "bounded",
        "__launch_bounds__(128)",
    );
    refused(
        cfg((1, 1, 1), (64, 1, 1), 49153),
        "dynamic_smem",
        "dynamic shared memory",
    );
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn a_module_for_another_architecture_is_refused() {
    let gpu = gpu();
    let nvrtc = Nvrtc::load().expect("the stand-in NVRTC loads");
    let family = Family {
        name: "runtime_test",
        source: KERNELS,
        kernels: &[],
    };
    // Another major version (binary compatibility stops there), or the arch-specific target of
    // another device.
    for arch in ["sm_80", "sm_100a"] {
        let compiled = nvrtc.compile(&family, arch).expect("compiles");
        let e = gpu
            .context()
            .load_module(cudarc::nvrtc::Ptx::from_binary(compiled.cubin))
            .expect_err("a module for another architecture must not load");
        assert!(
            format!("{e:?}").contains("NO_BINARY_FOR_GPU"),
            "{arch}: {e:?}"
        );
    }
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn allocations_past_the_memory_cap_fail_as_out_of_memory() {
    let gpu = gpu();
    let (free, total) = gpu.mem_info().expect("cuMemGetInfo");
    assert!(
        free <= total && total == gpu.info.total_memory,
        "{free} {total}"
    );
    let Err(e) = gpu.alloc(total + 1) else {
        panic!("more than the device holds must fail");
    };
    assert!(e.to_string().contains("OUT_OF_MEMORY"), "{e}");
    gpu.alloc(1 << 20).expect("and the device still works");
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn copies_outside_an_allocation_are_refused() {
    let _g = serial();
    let a = poisoned::<u8>(1000);
    let data = vec![0u8; 1001];
    // SAFETY: the copy is one byte longer than the allocation; the emulator must refuse it.
    let r = unsafe { cudarc::driver::result::memcpy_htod_sync(a.ptr(), &data[..]) };
    assert!(r.is_err());
    let msg = control::last_error();
    assert!(msg.contains("not inside one live allocation"), "{msg}");
    let mut back = vec![0u8; 10];
    // SAFETY: a read starting 995 bytes in, 10 long: 5 bytes past the end.
    let r = unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut back, a.ptr() + 995) };
    assert!(r.is_err());
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn dynamic_shared_memory_past_the_launch_size_faults() {
    let _g = serial();
    let m = module();
    let f = function(&m, "dynamic_smem_at");
    let out = poisoned::<i32>(64);
    let p = out.ptr();
    // 4096 bytes = 1024 ints: the last 64 fit, one more does not.
    let inside = 1024 - 64;
    run(
        &f,
        cfg((1, 1, 1), (64, 1, 1), 4096),
        &mut [arg(&p), arg(&inside)],
    )
    .expect("in bounds");
    assert_eq!(read::<i32>(&out), vec![1; 64]);
    let past = 1024 - 63;
    let e = run(
        &f,
        cfg((1, 1, 1), (64, 1, 1), 4096),
        &mut [arg(&p), arg(&past)],
    )
    .expect_err("one int past the dynamic shared memory must fault");
    let msg = control::last_error();
    control::clear_fault();
    assert!(
        msg.contains("dynamic_smem_at") && msg.contains("dynamic shared memory"),
        "{msg} {e:?}"
    );
}

#[test]
#[ignore = "emulated GPU: scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored"]
fn a_spin_wait_that_never_ends_is_an_error_not_a_hang() {
    let _g = serial();
    let m = module();
    let f = function(&m, "spin_forever");
    let flag = buffer(&[0i32]);
    let p = flag.ptr();
    let e = run(&f, cfg((1, 1, 1), (32, 1, 1), 0), &mut [arg(&p)])
        .expect_err("a wait nobody ends must fail");
    let msg = control::last_error();
    control::clear_fault();
    assert!(
        msg.contains("spin_forever") && msg.contains("can never end"),
        "{msg} {e:?}"
    );
}

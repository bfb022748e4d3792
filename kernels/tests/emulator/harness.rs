//! What every emulator test uses: the emulated GPU, a test kernel compiled through the production
//! NVRTC path (the stand-in NVRTC under scripts/emulated), and raw launches through cudarc.

#![allow(dead_code)] // each test file uses its part

use cudarc::driver::{CudaFunction, CudaModule, DriverError, LaunchConfig};
use cudarc::nvrtc::Ptx;
use kontext_kernels::nvrtc::Nvrtc;
use kontext_kernels::{Family, Gpu};
use std::ffi::c_void;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// The emulated GPU, shared by the tests of this binary. Panics with the way to run the tests
/// when the process is not on the emulated GPU (scripts/emulated sets KONTEXT_EMULATED=1).
pub fn gpu() -> Arc<Gpu> {
    static GPU: OnceLock<Arc<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| {
        assert_eq!(
            std::env::var("KONTEXT_EMULATED").as_deref(),
            Ok("1"),
            "run these tests on the emulated GPU: scripts/emulated cargo test --release -p \
             kontext-kernels --test emulator -- --ignored"
        );
        let gpu = Gpu::new(0).expect("the emulated GPU opens");
        assert!(
            gpu.info.name.contains("emulated"),
            "not the emulated GPU: {}",
            gpu.info.name
        );
        gpu
    });
    let gpu = GPU.get().expect("initialised above").clone();
    // Each test runs on its own thread; the driver wants the context current on each.
    gpu.context().bind_to_thread().expect("cuCtxSetCurrent");
    gpu
}

/// Tests that change the emulator's process-wide settings (through its control entry points)
/// or expect a sticky fault hold this lock.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Compiles `source` (a test kernel family; `common.cuh` is available to it) for the emulated
/// GPU's architecture through the production NVRTC path and loads it.
pub fn compile(name: &'static str, source: &str) -> Result<Arc<CudaModule>, String> {
    let gpu = gpu();
    let nvrtc = Nvrtc::load().map_err(|e| e.to_string())?;
    let family = Family {
        name,
        source: Box::leak(source.to_string().into_boxed_str()),
        kernels: &[],
    };
    let compiled = nvrtc
        .compile(&family, &gpu.info.arch())
        .map_err(|e| e.to_string())?;
    gpu.context()
        .load_module(Ptx::from_binary(compiled.cubin))
        .map_err(|e| format!("{e:?}"))
}

/// Kernel `name` of a module.
pub fn function(m: &Arc<CudaModule>, name: &str) -> CudaFunction {
    m.load_function(name)
        .unwrap_or_else(|e| panic!("{name}: {e:?}"))
}

/// A 1-D launch configuration.
pub fn dims(grid: u32, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Device buffer helpers on the shared GPU's stream.
pub fn upload<T: cudarc::driver::DeviceRepr + Clone + Unpin>(
    data: &[T],
) -> cudarc::driver::CudaSlice<T> {
    gpu().stream().clone_htod(data).expect("upload")
}

pub fn download<T: cudarc::driver::DeviceRepr + Clone + Default + Unpin>(
    buf: &cudarc::driver::CudaSlice<T>,
) -> Vec<T> {
    gpu().stream().clone_dtoh(buf).expect("download")
}

/// Launches `f` with raw device addresses and scalars (cuLaunchKernel's parameter array, built
/// by the caller as `&mut [*mut c_void]`) and synchronises: the driver's verdict.
pub fn run(
    f: &CudaFunction,
    cfg: LaunchConfig,
    params: &mut [*mut c_void],
) -> Result<(), DriverError> {
    let gpu = gpu();
    // SAFETY: test kernels on the emulated GPU, parameters laid out by the caller for the kernel's
    // signature; a kernel that strays is what the tests look for, and the emulator stops it
    // (guard pages) instead of letting it touch host memory.
    unsafe {
        cudarc::driver::result::launch_kernel(
            f.cu_function(),
            cfg.grid_dim,
            cfg.block_dim,
            cfg.shared_mem_bytes,
            gpu.stream().cu_stream(),
            params,
        )
    }?;
    gpu.stream().synchronize()
}

/// The address of a parameter, as cuLaunchKernel wants it.
pub fn arg<T>(v: &T) -> *mut c_void {
    v as *const T as *mut c_void
}

/// A device allocation of exactly `data`'s size holding `data` (freed on drop): kernels that
/// stray one element past it hit the emulator's guard page or canary.
pub fn buffer<T: Copy>(data: &[T]) -> Arc<kontext_kernels::gpu::DeviceAlloc> {
    let a = gpu()
        .alloc(std::mem::size_of_val(data))
        .expect("cuMemAlloc");
    // SAFETY: the allocation holds exactly `data`'s bytes.
    unsafe { cudarc::driver::result::memcpy_htod_sync(a.ptr(), data) }.expect("cuMemcpyHtoD");
    a
}

/// A device allocation of `n` elements of `T` filled with 0xFF bytes (NaN as f32 and bf16).
pub fn poisoned<T: Copy>(n: usize) -> Arc<kontext_kernels::gpu::DeviceAlloc> {
    let bytes = n * std::mem::size_of::<T>();
    buffer(&vec![0xFFu8; bytes])
}

/// The contents of an allocation as `T`s.
pub fn read<T: Copy + Default>(a: &kontext_kernels::gpu::DeviceAlloc) -> Vec<T> {
    let mut out = vec![T::default(); a.bytes() / std::mem::size_of::<T>()];
    // SAFETY: `out` has the allocation's size.
    unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut out, a.ptr()) }.expect("cuMemcpyDtoH");
    out
}

/// `source` with `from` replaced by `to`, where `from` occurs exactly once (so a mutant stays
/// the mutant it claims to be when the sources change).
pub fn mutate(source: &str, from: &str, to: &str) -> String {
    assert_eq!(
        source.matches(from).count(),
        1,
        "the mutation site {from:?} must occur exactly once"
    );
    source.replace(from, to)
}

/// The family source with `#include "common.cuh"` replaced by the (possibly mutated) header.
pub fn with_common(source: &str, common: &str) -> String {
    mutate(source, "#include \"common.cuh\"", common)
}

/// The emulator's own entry points (driver.cpp, "never called by production code").
pub mod control {
    use std::ffi::c_char;

    fn lib() -> &'static libloading::Library {
        static LIB: std::sync::OnceLock<libloading::Library> = std::sync::OnceLock::new();
        // SAFETY: the emulated driver is already loaded (gpu()); this only takes a reference.
        LIB.get_or_init(|| unsafe { libloading::Library::new("libcuda.so.1") }.expect("libcuda"))
    }

    /// The message of the last failure the emulator reported.
    pub fn last_error() -> String {
        let mut buf = vec![0u8; 4096];
        // SAFETY: the symbol has this signature (driver.cpp) and writes at most `len` bytes.
        unsafe {
            let f: libloading::Symbol<unsafe extern "C" fn(*mut c_char, usize) -> usize> = lib()
                .get(b"kontext_emu_last_error")
                .expect("kontext_emu_last_error");
            f(buf.as_mut_ptr() as *mut c_char, buf.len());
        }
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    }

    /// Forgets a sticky fault, so that the next test can use the context.
    pub fn clear_fault() {
        // SAFETY: no arguments; resets the emulator's sticky error.
        unsafe {
            let f: libloading::Symbol<unsafe extern "C" fn()> = lib()
                .get(b"kontext_emu_clear_fault")
                .expect("kontext_emu_clear_fault");
            f();
        }
    }

    /// Block and thread order (0 forward, 1 reverse, 2 shuffle) and the race check.
    pub fn set_order(order: i32, seed: u64) {
        // SAFETY: plain values.
        unsafe {
            let f: libloading::Symbol<unsafe extern "C" fn(i32, u64)> = lib()
                .get(b"kontext_emu_set_order")
                .expect("kontext_emu_set_order");
            f(order, seed);
        }
    }

    pub fn set_racecheck(on: i32) {
        // SAFETY: a plain value.
        unsafe {
            let f: libloading::Symbol<unsafe extern "C" fn(i32)> = lib()
                .get(b"kontext_emu_set_racecheck")
                .expect("kontext_emu_set_racecheck");
            f(on);
        }
    }

    /// Passes of only yields before a block's spin-wait counts as hung (0: the default, 5e7).
    pub fn set_spin_limit(passes: i64) {
        // SAFETY: a plain value (C long).
        unsafe {
            let f: libloading::Symbol<unsafe extern "C" fn(std::ffi::c_long)> = lib()
                .get(b"kontext_emu_set_spin_limit")
                .expect("kontext_emu_set_spin_limit");
            f(passes as std::ffi::c_long);
        }
    }

    /// Launches of kernel `name` so far.
    pub fn launches(name: &str) -> u64 {
        let c = std::ffi::CString::new(name).expect("no NUL");
        // SAFETY: a NUL-terminated name.
        unsafe {
            let f: libloading::Symbol<unsafe extern "C" fn(*const c_char) -> u64> = lib()
                .get(b"kontext_emu_launches")
                .expect("kontext_emu_launches");
            f(c.as_ptr())
        }
    }
}

/// A deterministic xorshift stream of f32 in [-1, 1).
pub fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

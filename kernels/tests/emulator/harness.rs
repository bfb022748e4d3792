//! What every emulator test uses: the emulated GPU, a test kernel compiled through the production
//! NVRTC path (the stand-in NVRTC under scripts/emulated), and raw launches through cudarc.

use cudarc::driver::{CudaFunction, CudaModule, DriverError, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use kontext_kernels::nvrtc::Nvrtc;
use kontext_kernels::{Family, Gpu};
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
        assert!(gpu.info.name.contains("emulated"), "not the emulated GPU: {}", gpu.info.name);
        gpu
    })
    .clone()
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
    m.load_function(name).unwrap_or_else(|e| panic!("{name}: {e:?}"))
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

/// Launches `f` with the arguments pushed by `args` and synchronises; the driver's verdict.
pub fn run(
    f: &CudaFunction,
    cfg: LaunchConfig,
    args: impl FnOnce(&mut cudarc::driver::LaunchArgs<'_>),
) -> Result<(), DriverError> {
    let gpu = gpu();
    let stream = gpu.stream();
    let mut b = stream.launch_builder(f);
    args(&mut b);
    // SAFETY: test kernels on the emulated GPU; a kernel that strays is what the tests look for,
    // and the emulator stops it (guard pages) instead of letting it touch host memory.
    unsafe { b.launch(cfg) }?;
    stream.synchronize()
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

/// Touches the items above that a test file may not use, so that each file compiles alone.
#[allow(dead_code)]
fn _uses() {
    let _ = PushKernelArg::arg::<i32>;
}

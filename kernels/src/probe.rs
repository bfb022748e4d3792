//! Is there a usable CUDA GPU? Answered without panicking on machines with no driver.
//!
//! cudarc panics inside `CudaContext::new` when `libcuda` is absent, so the probe first asks
//! cudarc's loader whether the library opens at all, then initialises the driver and reads the
//! device's properties, all behind `catch_unwind` (a driver too old for a symbol cudarc wants
//! would also panic).

use cudarc::driver::{result, sys};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The oldest architecture the kernels are compiled for (Ampere, sm_80: bf16 and `cvt.rn.bf16`).
pub const MIN_COMPUTE_CAPABILITY: (i32, i32) = (8, 0);

/// What the engine reports about the GPU it runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// `(major, minor)`: (9, 0) for H100 and H200.
    pub compute_capability: (i32, i32),
    pub multiprocessors: i32,
    pub total_memory: usize,
    /// CUDA version the driver supports, `(major, minor)`: (13, 0) for driver 580.
    pub driver_cuda_version: (i32, i32),
}

impl DeviceInfo {
    /// The NVRTC target for this device: `sm_90a` on Hopper (its architecture-specific features),
    /// `sm_XY` otherwise.
    pub fn arch(&self) -> String {
        arch_for(self.compute_capability)
    }
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (maj, min) = self.compute_capability;
        let (dmaj, dmin) = self.driver_cuda_version;
        write!(
            f,
            "GPU {}: {} (sm_{maj}{min}, {} SMs, {:.1} GiB), driver CUDA {dmaj}.{dmin}",
            self.ordinal,
            self.name,
            self.multiprocessors,
            self.total_memory as f64 / (1u64 << 30) as f64
        )
    }
}

/// The NVRTC `--gpu-architecture` for a compute capability.
pub fn arch_for((major, minor): (i32, i32)) -> String {
    if (major, minor) == (9, 0) {
        "sm_90a".to_string()
    } else {
        format!("sm_{major}{minor}")
    }
}

/// The first CUDA GPU, or why there is none: no driver library, no device, a driver that fails
/// to initialise, or a device older than sm_80. Never panics.
pub fn cuda_available() -> Result<DeviceInfo, String> {
    device_info(0)
}

/// Like [`cuda_available`] for the device `ordinal`.
pub fn device_info(ordinal: usize) -> Result<DeviceInfo, String> {
    match catch_unwind(AssertUnwindSafe(|| probe(ordinal))) {
        Ok(r) => r,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(format!("the CUDA driver could not be used: {msg}"))
        }
    }
}

fn probe(ordinal: usize) -> Result<DeviceInfo, String> {
    // SAFETY: only tries to open the driver library under cudarc's candidate names.
    if !unsafe { sys::is_culib_present() } {
        return Err(
            "the NVIDIA driver library (libcuda.so.1) is not installed or not on the library \
             search path"
                .to_string(),
        );
    }
    result::init().map_err(|e| format!("cuInit failed ({e:?}): is an NVIDIA GPU visible here?"))?;
    let count = result::device::get_count().map_err(|e| format!("cuDeviceGetCount: {e:?}"))?;
    if count <= 0 {
        return Err("the NVIDIA driver is installed but reports no GPU".to_string());
    }
    if ordinal >= count as usize {
        return Err(format!("GPU {ordinal} requested, but only {count} present"));
    }
    let dev = result::device::get(ordinal as i32).map_err(|e| format!("cuDeviceGet: {e:?}"))?;
    let name = result::device::get_name(dev).map_err(|e| format!("cuDeviceGetName: {e:?}"))?;
    let attr = |a: sys::CUdevice_attribute| {
        // SAFETY: `dev` came from cuDeviceGet above.
        unsafe { result::device::get_attribute(dev, a) }
            .map_err(|e| format!("cuDeviceGetAttribute({a:?}): {e:?}"))
    };
    use sys::CUdevice_attribute::*;
    let cc = (
        attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
        attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
    );
    let multiprocessors = attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
    // SAFETY: as above.
    let total_memory = unsafe { result::device::total_mem(dev) }
        .map_err(|e| format!("cuDeviceTotalMem: {e:?}"))?;
    let mut v = 0i32;
    // SAFETY: writes one int through a valid pointer.
    unsafe { sys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(|e| format!("cuDriverGetVersion: {e:?}"))?;
    let info = DeviceInfo {
        ordinal,
        name,
        compute_capability: cc,
        multiprocessors,
        total_memory,
        driver_cuda_version: (v / 1000, (v % 1000) / 10),
    };
    if cc < MIN_COMPUTE_CAPABILITY {
        return Err(format!(
            "{info}: kontext-fast needs compute capability 8.0 (Ampere) or newer"
        ));
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names() {
        assert_eq!(arch_for((8, 0)), "sm_80");
        assert_eq!(arch_for((8, 9)), "sm_89");
        assert_eq!(arch_for((9, 0)), "sm_90a");
        assert_eq!(arch_for((12, 0)), "sm_120");
    }

    /// On a machine without a GPU the probe answers with a reason and does not panic; on one
    /// with a GPU it describes it. Either way it returns.
    #[test]
    fn probe_returns_without_panicking() {
        match cuda_available() {
            Ok(info) => {
                eprintln!("probe: {info}");
                assert!(info.compute_capability >= MIN_COMPUTE_CAPABILITY);
            }
            Err(why) => {
                eprintln!("probe: {why}");
                assert!(!why.is_empty());
            }
        }
    }

    /// Where the driver library does not open (CI, this project's build machines), the probe
    /// must say so plainly instead of panicking like `CudaContext::new`.
    #[test]
    fn probe_without_driver_names_the_driver() {
        // SAFETY: opening the driver library only runs its initialisers.
        let driver = unsafe { libloading::Library::new("libcuda.so.1") };
        if driver.is_ok() {
            return; // a machine with a driver: covered by the test above
        }
        let why = cuda_available().expect_err("no libcuda, yet a GPU was found");
        assert!(why.contains("libcuda"), "{why}");
    }
}

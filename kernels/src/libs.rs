//! Finding the CUDA libraries and headers at run time, without ever letting cudarc panic.
//!
//! cudarc (dynamic loading) opens `libcuda`, `libnvrtc` and `libcublasLt` by name on first use
//! and panics when none of its candidate names opens. So every entry point here first makes sure
//! the library is loadable and answers with an error otherwise:
//!
//! - `KONTEXT_NVRTC_LIB` / `KONTEXT_CUBLASLT_LIB` name a library file by absolute path (the pip
//!   wheels' `nvidia/cuda_nvrtc/lib/libnvrtc.so.12`, see `scripts/nvrtc-env`). It is opened here
//!   once and kept open; cudarc's later open by soname (`libnvrtc.so.12`) then finds it already
//!   loaded.
//! - Otherwise the system search path (`LD_LIBRARY_PATH`, the ldconfig cache: a CUDA toolkit
//!   installed by the distribution's packages), then `$CUDA_HOME/lib64`, `$CUDA_PATH/lib64` and
//!   `/usr/local/cuda/lib64`.
//!
//! The CUDA headers NVRTC needs (`cuda_bf16.h`) are found next to the NVRTC library that was
//! loaded (toolkit `lib64/../include`, wheel `nvidia/cuda_nvrtc/lib/../../cuda_runtime/include`,
//! CUDA 13 wheel `nvidia/cu13/lib/../include`), or through `KONTEXT_CUDA_INCLUDE`.

use crate::error::{KernelError, Result};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// Environment variable: absolute path of the NVRTC library to use.
pub const ENV_NVRTC_LIB: &str = "KONTEXT_NVRTC_LIB";
/// Environment variable: absolute path of the cuBLASLt library to use.
pub const ENV_CUBLASLT_LIB: &str = "KONTEXT_CUBLASLT_LIB";
/// Environment variable: directory holding `cuda_bf16.h` for NVRTC.
pub const ENV_CUDA_INCLUDE: &str = "KONTEXT_CUDA_INCLUDE";

/// How to get the CUDA libraries, for error messages.
pub const INSTALL_HINT: &str = "install a CUDA 12.x or 13.x toolkit, or the NVIDIA wheels \
(`pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12 nvidia-cublas-cu12`) and point \
KONTEXT_NVRTC_LIB, KONTEXT_CUBLASLT_LIB and KONTEXT_CUDA_INCLUDE at them (see the README)";

/// Libraries opened by path and kept open for the life of the process.
static PRELOADED: Mutex<Vec<libloading::Library>> = Mutex::new(Vec::new());

fn preload(path: &Path) -> std::result::Result<(), String> {
    // SAFETY: opening a shared library runs its initialisers; these are NVIDIA's CUDA libraries,
    // which the process is about to use anyway, and they are never unloaded (kept below).
    let lib = unsafe { libloading::Library::new(path) }
        .map_err(|e| format!("{}: {e}", path.display()))?;
    PRELOADED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(lib);
    Ok(())
}

/// Directories where a CUDA toolkit keeps its libraries, from the usual environment variables.
fn toolkit_lib_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(v) = std::env::var_os(var) {
            dirs.push(PathBuf::from(v).join("lib64"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    dirs
}

/// Makes the library `what` loadable by cudarc: through `env` (a path), the system search path
/// (`present()` is cudarc's own check), or a toolkit directory holding one of `names`.
fn ensure(
    what: &'static str,
    env: &str,
    names: &[&str],
    present: fn() -> bool,
) -> std::result::Result<(), String> {
    if let Some(path) = std::env::var_os(env) {
        let path = PathBuf::from(path);
        preload(&path).map_err(|e| format!("{env} is set but {what} does not open: {e}"))?;
        if !present() {
            return Err(format!(
                "{env}={} opened, but its soname is not one cudarc looks for (a .so.12 or .so.13 library)",
                path.display()
            ));
        }
        return Ok(());
    }
    if present() {
        return Ok(());
    }
    let mut tried = Vec::new();
    for dir in toolkit_lib_dirs() {
        for name in names {
            let p = dir.join(name);
            if p.exists() && preload(&p).is_ok() && present() {
                return Ok(());
            }
            tried.push(p.display().to_string());
        }
    }
    Err(format!(
        "{what} is not on the library search path, {env} is not set, and none of {} exists; {INSTALL_HINT}",
        tried.join(", ")
    ))
}

fn nvrtc_present() -> bool {
    // SAFETY: only tries to open the candidate library names (cudarc's own lookup).
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

fn cublaslt_present() -> bool {
    // SAFETY: as above.
    unsafe { cudarc::cublaslt::sys::is_culib_present() }
}

/// Makes NVRTC loadable (once per process); afterwards cudarc's NVRTC calls cannot panic for a
/// missing library.
pub fn ensure_nvrtc() -> Result<()> {
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        ensure(
            "NVRTC (libnvrtc)",
            ENV_NVRTC_LIB,
            &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"],
            nvrtc_present,
        )
    })
    .clone()
    .map_err(|detail| KernelError::Library {
        what: "NVRTC",
        detail,
    })
}

/// Makes cuBLASLt loadable (once per process).
pub fn ensure_cublaslt() -> Result<()> {
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        ensure(
            "cuBLASLt (libcublasLt)",
            ENV_CUBLASLT_LIB,
            &["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"],
            cublaslt_present,
        )
    })
    .clone()
    .map_err(|detail| KernelError::Library {
        what: "cuBLASLt",
        detail,
    })
}

/// Where the loaded library whose file name starts with `prefix` lives, read from
/// `/proc/self/maps` (Linux); `None` when it is not loaded or the map is unreadable.
pub fn loaded_library_path(prefix: &str) -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .map(PathBuf::from)
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && !n.contains("builtins"))
        })
}

/// Candidate include directories for an NVRTC library at `lib` (see the module docs).
pub fn include_candidates(lib: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(v) = std::env::var_os(ENV_CUDA_INCLUDE) {
        dirs.push(PathBuf::from(v));
    }
    if let Some(lib) = lib {
        let lib = lib.canonicalize().unwrap_or_else(|_| lib.to_path_buf());
        if let Some(dir) = lib.parent() {
            dirs.push(dir.join("../include"));
            dirs.push(dir.join("../../cuda_runtime/include"));
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(v) = std::env::var_os(var) {
            dirs.push(PathBuf::from(v).join("include"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/include"));
    dirs
}

/// The first directory holding `cuda_bf16.h`, for NVRTC's `-I`.
pub fn cuda_include_dir(nvrtc_lib: Option<&Path>) -> Result<PathBuf> {
    let candidates = include_candidates(nvrtc_lib);
    if let Some(v) = std::env::var_os(ENV_CUDA_INCLUDE) {
        let dir = PathBuf::from(v);
        if !dir.join("cuda_bf16.h").is_file() {
            return Err(KernelError::Library {
                what: "CUDA headers",
                detail: format!("{ENV_CUDA_INCLUDE}={} has no cuda_bf16.h", dir.display()),
            });
        }
    }
    candidates
        .iter()
        .find(|d| d.join("cuda_bf16.h").is_file())
        .map(|d| d.canonicalize().unwrap_or_else(|_| d.clone()))
        .ok_or_else(|| KernelError::Library {
            what: "CUDA headers (cuda_bf16.h)",
            detail: format!(
                "looked in {}; set {ENV_CUDA_INCLUDE} or {INSTALL_HINT}",
                candidates
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
}

//! Compiling the kernel families with NVRTC into cubins for one GPU architecture.
//!
//! Each `kernels/cuda/<family>.cu` is compiled on its own, with `common.cuh` and `ptx.cuh` handed
//! to NVRTC as in-memory headers (the sources are compiled into the binary, so a carried binary
//! needs no source tree). Output is a cubin for a real architecture (`sm_80`, `sm_89`, `sm_90a`, …), loaded
//! with `cuModuleLoadData`; nothing is left for the driver to JIT.

use crate::error::{KernelError, Result};
use crate::libs;
use crate::Family;
use cudarc::nvrtc::sys;
use std::ffi::{c_char, CString};
use std::path::PathBuf;

/// NVRTC, loaded, with the headers it compiles against.
#[derive(Debug, Clone)]
pub struct Nvrtc {
    /// `(major, minor)` of the library, part of the module cache key.
    pub version: (i32, i32),
    /// Where the library was loaded from, when known.
    pub library: Option<PathBuf>,
    /// The directory passed as `-I` (holds `cuda_bf16.h`).
    pub include_dir: PathBuf,
    /// Architectures this NVRTC can target, as numbers (`90` for sm_90).
    pub supported_archs: Vec<i32>,
}

/// A compiled family: the cubin and NVRTC's log (empty when it had nothing to say).
#[derive(Debug, Clone)]
pub struct Compiled {
    pub cubin: Vec<u8>,
    pub log: String,
}

fn check(op: &str, r: sys::nvrtcResult) -> Result<()> {
    if r == sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(KernelError::Library {
            what: "NVRTC",
            detail: format!("{op} returned {r:?}"),
        })
    }
}

impl Nvrtc {
    /// Loads NVRTC (see [`libs`] for where it is looked for) and finds the CUDA headers.
    pub fn load() -> Result<Nvrtc> {
        libs::ensure_nvrtc()?;
        let (mut major, mut minor) = (0, 0);
        // SAFETY: NVRTC is loadable (ensure_nvrtc); nvrtcVersion writes two ints.
        check("nvrtcVersion", unsafe {
            sys::nvrtcVersion(&mut major, &mut minor)
        })?;
        let mut n = 0;
        // SAFETY: writes one int.
        check("nvrtcGetNumSupportedArchs", unsafe {
            sys::nvrtcGetNumSupportedArchs(&mut n)
        })?;
        let mut supported_archs = vec![0i32; n.max(0) as usize];
        // SAFETY: the buffer holds exactly the `n` ints NVRTC reported.
        check("nvrtcGetSupportedArchs", unsafe {
            sys::nvrtcGetSupportedArchs(supported_archs.as_mut_ptr())
        })?;
        let library = std::env::var_os(libs::ENV_NVRTC_LIB)
            .map(PathBuf::from)
            .or_else(|| libs::loaded_library_path("libnvrtc"));
        let include_dir = libs::cuda_include_dir(library.as_deref())?;
        Ok(Nvrtc {
            version: (major, minor),
            library,
            include_dir,
            supported_archs,
        })
    }

    /// Whether this NVRTC can compile for `arch` (`"sm_90a"`, `"sm_89"`, …).
    pub fn supports(&self, arch: &str) -> bool {
        let digits: String = arch
            .trim_start_matches("sm_")
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        digits
            .parse::<i32>()
            .is_ok_and(|a| self.supported_archs.contains(&a))
    }

    /// The options every family is compiled with. Warnings are part of the contract: the CI test
    /// (`kernels/tests/nvrtc_compile.rs`) fails on any log output, including ptxas' notes about
    /// register spills or local memory.
    pub fn options(&self, arch: &str) -> Vec<String> {
        vec![
            format!("--gpu-architecture={arch}"),
            format!("-I{}", self.include_dir.display()),
            "--std=c++17".to_string(),
            "-lineinfo".to_string(),
            "-Xptxas=--warn-on-spills".to_string(),
            "-Xptxas=--warn-on-local-memory-usage".to_string(),
        ]
    }

    /// Compiles one family for `arch` into a cubin. An error carries NVRTC's log; on success the
    /// log is returned too (warnings), for the caller to report or reject.
    pub fn compile(&self, family: &Family, arch: &str) -> Result<Compiled> {
        if !self.supports(arch) {
            return Err(KernelError::Compile {
                family: family.name,
                arch: arch.to_string(),
                log: format!(
                    "NVRTC {}.{} cannot target {arch} (it supports sm_{:?}); use a newer CUDA",
                    self.version.0, self.version.1, self.supported_archs
                ),
            });
        }
        let c = |s: &str| {
            CString::new(s).map_err(|_| KernelError::Compile {
                family: family.name,
                arch: arch.to_string(),
                log: format!("a source, name or option contains a NUL byte: {s:.80}"),
            })
        };
        let src = c(family.source)?;
        let name = c(&format!("{}.cu", family.name))?;
        let texts = crate::HEADERS
            .iter()
            .map(|(_, text)| c(text))
            .collect::<Result<Vec<CString>>>()?;
        let names = crate::HEADERS
            .iter()
            .map(|(name, _)| c(name))
            .collect::<Result<Vec<CString>>>()?;
        let headers: Vec<*const c_char> = texts.iter().map(|t| t.as_ptr()).collect();
        let header_names: Vec<*const c_char> = names.iter().map(|n| n.as_ptr()).collect();
        let options = self
            .options(arch)
            .iter()
            .map(|o| c(o))
            .collect::<Result<Vec<CString>>>()?;
        let option_ptrs: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();

        let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
        // SAFETY: every pointer is a NUL-terminated string that outlives the call; the two header
        // arrays have the length passed.
        check("nvrtcCreateProgram", unsafe {
            sys::nvrtcCreateProgram(
                &mut prog,
                src.as_ptr(),
                name.as_ptr(),
                headers.len() as i32,
                headers.as_ptr(),
                header_names.as_ptr(),
            )
        })?;
        let program = Program(prog);
        // SAFETY: `prog` is a live program; the option pointers outlive the call.
        let compiled = unsafe {
            sys::nvrtcCompileProgram(program.0, option_ptrs.len() as i32, option_ptrs.as_ptr())
        };
        let log = program.log()?;
        if compiled != sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(KernelError::Compile {
                family: family.name,
                arch: arch.to_string(),
                log: if log.is_empty() {
                    format!("{compiled:?}")
                } else {
                    log
                },
            });
        }
        let mut size = 0usize;
        // SAFETY: `prog` compiled successfully; writes one size.
        check("nvrtcGetCUBINSize", unsafe {
            sys::nvrtcGetCUBINSize(program.0, &mut size)
        })?;
        let mut cubin = vec![0u8; size];
        // SAFETY: the buffer has the size NVRTC reported.
        check("nvrtcGetCUBIN", unsafe {
            sys::nvrtcGetCUBIN(program.0, cubin.as_mut_ptr() as *mut c_char)
        })?;
        Ok(Compiled { cubin, log })
    }
}

/// An NVRTC program, destroyed on drop.
struct Program(sys::nvrtcProgram);

impl Program {
    fn log(&self) -> Result<String> {
        let mut size = 0usize;
        // SAFETY: `self.0` is a live program; writes one size.
        check("nvrtcGetProgramLogSize", unsafe {
            sys::nvrtcGetProgramLogSize(self.0, &mut size)
        })?;
        let mut buf = vec![0u8; size.max(1)];
        // SAFETY: the buffer has the size NVRTC reported (at least 1 byte for the NUL).
        check("nvrtcGetProgramLog", unsafe {
            sys::nvrtcGetProgramLog(self.0, buf.as_mut_ptr() as *mut c_char)
        })?;
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Ok(String::from_utf8_lossy(&buf[..end]).trim().to_string())
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the program was created by nvrtcCreateProgram and is destroyed once.
        unsafe {
            sys::nvrtcDestroyProgram(&mut self.0);
        }
    }
}

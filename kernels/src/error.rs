//! The crate's error type: every variant says which op, kernel, file or library it concerns.

use std::path::PathBuf;

/// Errors of kernel compilation, device memory and launches.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// No usable CUDA GPU (no driver library, no device, or a device older than sm_80).
    #[error("no usable CUDA GPU: {0}")]
    NoGpu(String),
    /// A CUDA library (NVRTC, cuBLASLt) or the CUDA headers could not be found.
    #[error("{what} not found: {detail}")]
    Library { what: &'static str, detail: String },
    /// NVRTC rejected a kernel source.
    #[error("NVRTC could not compile {family}.cu for {arch}:\n{log}")]
    Compile {
        family: &'static str,
        arch: String,
        log: String,
    },
    /// A launcher's operands do not fit the kernel's contract (shape, dtype, alignment, aliasing).
    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },
    /// A fast kernel does not take these operands (head dim, architecture); the caller falls
    /// back to the general kernel. Distinct from [`KernelError::Shape`], which is a caller's bug.
    #[error("{op}: {msg}")]
    Unsupported { op: &'static str, msg: String },
    /// A CUDA driver call failed.
    #[error("CUDA driver error in {op}: {msg}")]
    Driver { op: String, msg: String },
    /// A cuBLASLt call failed.
    #[error("cuBLASLt error in {op}: {msg}")]
    Cublas { op: String, msg: String },
    /// The on-disk module cache could not be read or written.
    #[error("kernel cache {}: {msg}", path.display())]
    Cache { path: PathBuf, msg: String },
    /// The activation arena is smaller than a request needs (a planning bug: the plan and the
    /// forward pass disagree).
    #[error(
        "arena of {capacity} bytes cannot hold {requested} more bytes at offset {used} ({what})"
    )]
    Arena {
        what: String,
        capacity: usize,
        used: usize,
        requested: usize,
    },
}

/// `Result` with [`KernelError`].
pub type Result<T> = std::result::Result<T, KernelError>;

pub(crate) fn shape_err(op: &'static str, msg: impl Into<String>) -> KernelError {
    KernelError::Shape {
        op,
        msg: msg.into(),
    }
}

pub(crate) fn driver_err(op: impl Into<String>, e: impl std::fmt::Debug) -> KernelError {
    KernelError::Driver {
        op: op.into(),
        msg: format!("{e:?}"),
    }
}

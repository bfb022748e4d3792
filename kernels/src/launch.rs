//! Kernel signatures and the checked argument builder every launcher uses.
//!
//! Each family lists its kernels with their parameter kinds ([`Kernel`]); a test parses the
//! `.cu` sources and checks the lists against the real parameter lists
//! (`kernels/tests/nvrtc_compile.rs`). At launch, `Launch` checks that the launcher pushed
//! exactly those kinds, in order, before anything reaches the driver: a launcher and its kernel
//! cannot silently disagree about an argument's size or position.

use crate::desc::LaunchDims;
use crate::error::{driver_err, KernelError, Result};
use crate::gpu::Gpu;
use cudarc::driver::{CudaFunction, LaunchArgs, PushKernelArg};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The kind of one kernel parameter, as passed by value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arg {
    /// Any pointer (`const bf16*`, `float*`, …): a 64-bit device address.
    Ptr,
    /// `i64` (`long long`): row strides, element counts.
    I64,
    /// `int`: dimensions, flags.
    I32,
    /// `float`: scales, epsilons.
    F32,
    /// `const __grid_constant__ CUtensorMap`: a TMA tensor map, 128 bytes by value (the launch
    /// copies it, so a captured CUDA graph replays it without a host buffer that must outlive
    /// the capture).
    TensorMap,
}

/// A TMA tensor map (`cuTensorMapEncodeTiled`'s output) as a kernel parameter by value.
#[derive(Debug, Clone, Copy)]
#[repr(transparent)]
pub struct TensorMap(pub cudarc::driver::sys::CUtensorMap);

// SAFETY: plain 128 bytes (16 × u64, 128-byte aligned), the kernel parameter's exact layout
// (`CUtensorMap`, a `__grid_constant__` by-value struct).
unsafe impl cudarc::driver::DeviceRepr for TensorMap {}

/// One `extern "C" __global__` function: its name and parameter kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernel {
    pub name: &'static str,
    pub args: &'static [Arg],
}

/// A resolved kernel function with its signature and the count of its launches.
pub(crate) struct Loaded {
    pub(crate) func: CudaFunction,
    pub(crate) sig: &'static Kernel,
    /// Executions so far (one relaxed increment each): what proves which kernel of a fast path
    /// and its fallback ran ([`crate::Kernels::launch_counts`]). A launch captured into a CUDA
    /// graph is not an execution; the graph adds it on every replay ([`crate::graph`]), so it
    /// is shared with the graphs that captured it.
    pub(crate) launches: Arc<AtomicU64>,
}

impl Loaded {
    pub(crate) fn new(func: CudaFunction, sig: &'static Kernel) -> Loaded {
        Loaded {
            func,
            sig,
            launches: Arc::new(AtomicU64::new(0)),
        }
    }
}

/// Arguments being pushed for one launch, checked against the kernel's signature.
pub(crate) struct Launch<'a> {
    gpu: &'a Gpu,
    sig: &'static Kernel,
    launches: &'a Arc<AtomicU64>,
    args: LaunchArgs<'a>,
    pushed: Vec<Arg>,
}

impl<'a> Launch<'a> {
    pub(crate) fn new(gpu: &'a Gpu, k: &'a Loaded) -> Launch<'a> {
        Launch {
            gpu,
            sig: k.sig,
            launches: &k.launches,
            args: gpu.stream().launch_builder(&k.func),
            pushed: Vec::with_capacity(k.sig.args.len()),
        }
    }

    /// A device address (`T*` parameter).
    pub(crate) fn ptr(&mut self, v: &'a u64) -> &mut Self {
        self.pushed.push(Arg::Ptr);
        self.args.arg(v);
        self
    }

    /// An `i64` parameter.
    pub(crate) fn i64(&mut self, v: &'a i64) -> &mut Self {
        self.pushed.push(Arg::I64);
        self.args.arg(v);
        self
    }

    /// An `int` parameter.
    pub(crate) fn i32(&mut self, v: &'a i32) -> &mut Self {
        self.pushed.push(Arg::I32);
        self.args.arg(v);
        self
    }

    /// A `float` parameter.
    pub(crate) fn f32(&mut self, v: &'a f32) -> &mut Self {
        self.pushed.push(Arg::F32);
        self.args.arg(v);
        self
    }

    /// A `const __grid_constant__ CUtensorMap` parameter.
    pub(crate) fn tensor_map(&mut self, v: &'a TensorMap) -> &mut Self {
        self.pushed.push(Arg::TensorMap);
        self.args.arg(v);
        self
    }

    /// Launches on the GPU's stream after checking the pushed kinds against the signature;
    /// then, with `KONTEXT_CUDA_SYNC=1`, waits and names the kernel on a fault.
    ///
    /// # Safety
    /// The caller has validated every operand against the kernel's contract (shapes, types,
    /// bounds, aliasing): the kernel will only touch memory inside the regions it was given.
    pub(crate) unsafe fn run(self, dims: LaunchDims) -> Result<()> {
        // SAFETY: the caller's contract, unchanged; no dynamic shared memory.
        unsafe { self.run_with_smem(dims, 0) }
    }

    /// [`Launch::run`] with `smem_bytes` of dynamic shared memory (the kernel's limit raised at
    /// resolve time where it passes 48 KiB).
    ///
    /// # Safety
    /// As [`Launch::run`]; the kernel's use of dynamic shared memory fits `smem_bytes`.
    pub(crate) unsafe fn run_with_smem(mut self, dims: LaunchDims, smem_bytes: u32) -> Result<()> {
        if self.pushed != self.sig.args {
            return Err(KernelError::Shape {
                op: "launch",
                msg: format!(
                    "internal: {} takes {:?}, the launcher pushed {:?}",
                    self.sig.name, self.sig.args, self.pushed
                ),
            });
        }
        // SAFETY: the argument kinds match the kernel's parameter list (checked above, and the
        // list against the source by the compile test); operand validity is the caller's
        // contract (this function's `# Safety`).
        let mut cfg = dims.config();
        cfg.shared_mem_bytes = smem_bytes;
        unsafe { self.args.launch(cfg) }
            .map_err(|e| driver_err(format!("launch {}", self.sig.name), e))?;
        if !self.gpu.captured(self.launches) {
            self.launches.fetch_add(1, Ordering::Relaxed);
        }
        self.gpu.launched(self.sig.name)
    }
}

/// The parameter kinds of a C parameter list (`"const bf16* x, i64 ld, int n"`), as the compile
/// test reads them from the sources; `None` for a type it does not know.
pub fn parse_params(list: &str) -> Option<Vec<Arg>> {
    let list = list.trim();
    if list.is_empty() || list == "void" {
        return Some(Vec::new());
    }
    list.split(',')
        .map(|p| {
            let p = p
                .replace("__restrict__", " ")
                .replace("__grid_constant__", " ")
                .replace("const", " ");
            if p.contains('*') {
                return Some(Arg::Ptr);
            }
            let words: Vec<&str> = p.split_whitespace().collect();
            let ty = words[..words.len().saturating_sub(1)].join(" ");
            match ty.as_str() {
                "i64" | "long long" | "int64_t" => Some(Arg::I64),
                "int" | "int32_t" => Some(Arg::I32),
                "float" => Some(Arg::F32),
                "CUtensorMap" => Some(Arg::TensorMap),
                _ => None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_parameter_lists() {
        assert_eq!(
            parse_params("const bf16* __restrict__ x, i64 ldx, bf16* y, int rows, float eps"),
            Some(vec![Arg::Ptr, Arg::I64, Arg::Ptr, Arg::I32, Arg::F32])
        );
        assert_eq!(
            parse_params("const unsigned char* in, long long n"),
            Some(vec![Arg::Ptr, Arg::I64])
        );
        assert_eq!(
            parse_params("const __grid_constant__ CUtensorMap map, int n"),
            Some(vec![Arg::TensorMap, Arg::I32])
        );
        assert_eq!(parse_params("double x"), None);
        assert_eq!(parse_params(""), Some(vec![]));
    }
}

//! kontext-kernels: the CUDA kernels of kontext-fast and their typed launchers.
//!
//! - `kernels/cuda/<family>.cu`: CUDA C, one family per file, bf16 activations, f32 math,
//!   compiled at run time by NVRTC for the GPU in use ([`nvrtc`]) and cached on disk
//!   ([`cache`]); `common.cuh` is the only shared code.
//! - `kernels/src/<family>.rs`: the family's launchers, methods of [`Kernels`]. Each validates
//!   shapes, types, alignment and aliasing in pure Rust (unit-tested without a GPU) before its
//!   `unsafe` launch.
//! - [`Kernels::load`] compiles or loads every family and resolves every function once, at
//!   start-up.
//! - Building blocks for the engine's CUDA backend: [`gpu::Gpu`] (context, stream, counted
//!   allocations, [`gpu::DeviceMat`]), [`arena::Pool`] and [`arena::Arena`] (activations from
//!   one allocation planned per request),
//!   [`gemm::Gemm`] (cuBLASLt, bias in the epilogue), [`weights`] (upload from the checkpoint's
//!   bytes; fp8 stays fp8 with its scale).
//! - [`probe::cuda_available`] says whether there is a usable GPU without panicking.
//!
//! Nothing here links CUDA at build time (cudarc with dynamic loading): the crate builds and its
//! tests run on machines without a GPU or a CUDA toolkit.

pub mod arena;
pub mod attention;
pub mod attention_mma;
pub mod attention_wgmma;
pub mod cache;
pub mod conv;
pub mod desc;
pub mod elementwise;
pub mod error;
pub mod fp8;
pub mod gemm;
pub mod gpu;
pub mod graph;
pub mod group_norm;
pub mod launch;
pub mod libs;
pub mod norm_modulate;
pub mod nvrtc;
pub mod probe;
pub mod qk_norm_rope;
pub mod weights;

pub use desc::{DType, MatDesc};
pub use error::{KernelError, Result};
pub use gpu::{DeviceMat, Gpu};
pub use probe::{cuda_available, DeviceInfo};

use cache::{CacheKey, ModuleCache};
use cudarc::driver::CudaModule;
use cudarc::nvrtc::Ptx;
use launch::{Launch, Loaded};
use nvrtc::Nvrtc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

pub use launch::{Arg, Kernel};

/// One kernel family: its source and the `extern "C"` kernels it defines, with their parameter
/// kinds.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    pub name: &'static str,
    pub source: &'static str,
    pub kernels: &'static [Kernel],
}

/// The header every family includes.
pub const COMMON_CUH: &str = include_str!("../cuda/common.cuh");

/// Every inline-PTX instruction, each beside its emulated twin (style.md: a kernel never writes
/// `asm` itself).
pub const PTX_CUH: &str = include_str!("../cuda/ptx.cuh");

/// The headers a family may include, handed to NVRTC in memory (name, text): the sources are
/// compiled into the binary, so a carried binary needs no source tree.
pub const HEADERS: [(&str, &str); 2] = [("common.cuh", COMMON_CUH), ("ptx.cuh", PTX_CUH)];

/// Every kernel family (what the NVRTC test compiles; `Kernels::load` loads the same nine).
pub const FAMILIES: [Family; 9] = [
    norm_modulate::FAMILY,
    qk_norm_rope::FAMILY,
    attention::FAMILY,
    attention_mma::FAMILY,
    attention_wgmma::FAMILY,
    elementwise::FAMILY,
    fp8::FAMILY,
    conv::FAMILY,
    group_norm::FAMILY,
];

/// What [`Kernels::load`] did, for the start-up log and the GPU check.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub arch: String,
    pub nvrtc_version: (i32, i32),
    pub include_dir: String,
    /// Families compiled by NVRTC this time.
    pub compiled: Vec<&'static str>,
    /// Families loaded from the on-disk cache.
    pub cached: Vec<&'static str>,
    /// NVRTC logs of families that compiled with warnings, and cache write failures.
    pub warnings: Vec<String>,
    pub seconds: f64,
}

/// Every kernel function, resolved once at start-up, with the GPU they launch on.
pub struct Kernels {
    pub gpu: Arc<Gpu>,
    pub report: LoadReport,
    norm: norm_modulate::Functions,
    qk: qk_norm_rope::Functions,
    attn: attention::Functions,
    amma: attention_mma::Functions,
    awg: attention_wgmma::Functions,
    ew: elementwise::Functions,
    fp8: fp8::Functions,
    conv: conv::Functions,
    gn: group_norm::Functions,
}

/// Kernel `name` of `family` from its module, with its signature.
pub(crate) fn function(
    m: &Arc<CudaModule>,
    family: &'static Family,
    name: &'static str,
) -> Result<Loaded> {
    let sig = family
        .kernels
        .iter()
        .find(|k| k.name == name)
        .ok_or_else(|| KernelError::Shape {
            op: "resolve",
            msg: format!("internal: {}.cu lists no kernel {name}", family.name),
        })?;
    let func = m.load_function(name).map_err(|e| {
        error::driver_err(format!("cuModuleGetFunction {}::{name}", family.name), e)
    })?;
    Ok(Loaded::new(func, sig))
}

impl Kernels {
    /// Compiles (or loads from the cache) every family for `gpu`'s architecture and resolves
    /// every kernel function. Needs NVRTC and the CUDA headers (see [`libs`]).
    pub fn load(gpu: &Arc<Gpu>) -> Result<Kernels> {
        let start = Instant::now();
        let nvrtc = Nvrtc::load()?;
        let cache = ModuleCache::from_env();
        let mut report = LoadReport {
            arch: gpu.info.arch(),
            nvrtc_version: nvrtc.version,
            include_dir: nvrtc.include_dir.display().to_string(),
            ..LoadReport::default()
        };
        let mut load = |family: &Family| load_family(gpu, &nvrtc, &cache, family, &mut report);
        let norm = norm_modulate::Functions::resolve(&load(&norm_modulate::FAMILY)?)?;
        let qk = qk_norm_rope::Functions::resolve(&load(&qk_norm_rope::FAMILY)?)?;
        let attn = attention::Functions::resolve(&load(&attention::FAMILY)?)?;
        let amma = attention_mma::Functions::resolve(&load(&attention_mma::FAMILY)?)?;
        let awg = attention_wgmma::Functions::resolve(
            &load(&attention_wgmma::FAMILY)?,
            gpu.info.compute_capability,
        )?;
        let ew = elementwise::Functions::resolve(&load(&elementwise::FAMILY)?)?;
        let fp8 = fp8::Functions::resolve(&load(&fp8::FAMILY)?)?;
        let conv = conv::Functions::resolve(&load(&conv::FAMILY)?)?;
        let gn = group_norm::Functions::resolve(&load(&group_norm::FAMILY)?)?;
        report.seconds = start.elapsed().as_secs_f64();
        let k = Kernels {
            gpu: gpu.clone(),
            norm,
            qk,
            attn,
            amma,
            awg,
            ew,
            fp8,
            conv,
            gn,
            report,
        };
        // Every listed kernel is counted: a family's `loaded()` that forgot one would hide it.
        let listed: usize = FAMILIES.iter().map(|f| f.kernels.len()).sum();
        if k.launch_counts().len() != listed {
            return Err(KernelError::Shape {
                op: "resolve",
                msg: format!(
                    "internal: {} kernels counted, the families list {listed}",
                    k.launch_counts().len()
                ),
            });
        }
        Ok(k)
    }

    /// Executions so far per kernel, every kernel of every family (`(name, count)`, in family
    /// order): cheap counters, valid on a real GPU too, so a check can prove which kernel of a
    /// fast path and its fallback ran. A launch captured into a CUDA graph counts once per
    /// replay of the graph, not when captured ([`graph`]).
    pub fn launch_counts(&self) -> Vec<(&'static str, u64)> {
        let mut all: Vec<&Loaded> = Vec::new();
        all.extend(self.norm.loaded());
        all.extend(self.qk.loaded());
        all.extend(self.attn.loaded());
        all.extend(self.amma.loaded());
        all.extend(self.awg.loaded());
        all.extend(self.ew.loaded());
        all.extend(self.fp8.loaded());
        all.extend(self.conv.loaded());
        all.extend(self.gn.loaded());
        all.iter()
            .map(|k| (k.sig.name, k.launches.load(Ordering::Relaxed)))
            .collect()
    }

    /// A checked argument builder for `k` on the GPU's stream.
    pub(crate) fn launch<'a>(&'a self, k: &'a Loaded) -> Launch<'a> {
        Launch::new(&self.gpu, k)
    }
}

/// The module of one family: from the cache when its cubin loads, else compiled (and cached).
fn load_family(
    gpu: &Arc<Gpu>,
    nvrtc: &Nvrtc,
    cache: &ModuleCache,
    family: &Family,
    report: &mut LoadReport,
) -> Result<Arc<CudaModule>> {
    let arch = report.arch.clone();
    let key = CacheKey::new(
        family.name,
        family.source,
        &HEADERS.map(|(_, text)| text).concat(),
        &nvrtc.options(&arch),
        &arch,
        nvrtc.version,
    );
    if let Some(cubin) = cache.get(&key) {
        match gpu.context().load_module(Ptx::from_binary(cubin)) {
            Ok(m) => {
                report.cached.push(family.name);
                return Ok(m);
            }
            Err(_) => cache.remove(&key), // damaged or foreign: compile afresh
        }
    }
    let compiled = nvrtc.compile(family, &arch)?;
    if !compiled.log.is_empty() {
        report
            .warnings
            .push(format!("{}.cu ({arch}): {}", family.name, compiled.log));
    }
    if let Err(e) = cache.put(&key, &compiled.cubin) {
        report.warnings.push(e.to_string());
    }
    report.compiled.push(family.name);
    gpu.context()
        .load_module(Ptx::from_binary(compiled.cubin))
        .map_err(|e| error::driver_err(format!("cuModuleLoadData {}.cu ({arch})", family.name), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The integer value of `#define name N` in `source`.
    fn define(source: &str, name: &str) -> usize {
        source
            .lines()
            .filter_map(|l| l.trim().strip_prefix("#define "))
            .find_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some(name)).then(|| w.next().and_then(|v| v.parse().ok()))?
            })
            .unwrap_or_else(|| panic!("no integer #define {name}"))
    }

    /// The launchers size grids and blocks from Rust constants that the kernels assume through
    /// their own #defines (block_sum's warp count, attention's queries per block): a mismatch
    /// would compile and launch, and compute wrong results.
    #[test]
    fn launch_constants_match_the_sources() {
        let src = |f: &Family| f.source;
        let n = src(&norm_modulate::FAMILY);
        assert_eq!(define(n, "NORM_THREADS"), norm_modulate::THREADS as usize);
        let q = src(&qk_norm_rope::FAMILY);
        assert_eq!(define(q, "QKR_THREADS"), qk_norm_rope::THREADS as usize);
        let a = src(&attention::FAMILY);
        let (warps, qpw) = (define(a, "ATT_WARPS"), define(a, "ATT_QPW"));
        assert_eq!(warps * 32, attention::THREADS as usize);
        assert_eq!(warps * qpw, attention::QUERIES_PER_BLOCK);
        assert_eq!(define(a, "ATT_MAX_DH"), attention::MAX_HEAD_DIM);
        assert_eq!(
            define(a, "SOFTMAX_THREADS"),
            attention::SOFTMAX_THREADS as usize
        );
        let m = src(&attention_mma::FAMILY);
        assert_eq!(
            define(m, "AMMA_WARPS") * 32,
            attention_mma::THREADS as usize
        );
        assert_eq!(define(m, "AMMA_BQ"), attention_mma::QUERIES_PER_BLOCK);
        assert_eq!(define(m, "AMMA_BQ"), 16 * define(m, "AMMA_WARPS"));
        assert_eq!(define(m, "AMMA_BK"), attention_mma::KEYS_PER_TILE);
        assert_eq!(define(m, "AMMA_PAD"), attention_mma::ROW_PAD);
        assert_eq!(
            define(m, "AMMA_KNR_THREADS"),
            attention_mma::K_THREADS as usize
        );
        let w = src(&attention_wgmma::FAMILY);
        assert_eq!(define(w, "AWG_THREADS"), attention_wgmma::THREADS as usize);
        assert_eq!(define(w, "AWG_BQ"), attention_wgmma::QUERIES_PER_BLOCK);
        assert_eq!(define(w, "AWG_BK"), attention_wgmma::KEYS_PER_TILE);
        assert_eq!(define(w, "AWG_DH"), attention_wgmma::HEAD_DIM);
        assert_eq!(define(w, "AWG_STAGES"), attention_wgmma::STAGES);
        // Two consumer warpgroups of 64 rows each, after the producer's.
        assert_eq!(
            define(w, "AWG_THREADS"),
            128 * (1 + define(w, "AWG_BQ") / 64)
        );
        assert_eq!(define(w, "AWG_CONSUMERS"), 2 * 128);
        let e = src(&elementwise::FAMILY);
        assert_eq!(define(e, "EW_THREADS"), elementwise::THREADS as usize);
        let t = elementwise::transpose_dims(1, 1).block;
        assert_eq!(
            (define(e, "TR_TILE"), define(e, "TR_ROWS")),
            (t.0 as usize, t.1 as usize)
        );
        assert_eq!(
            define(src(&fp8::FAMILY), "FP8_THREADS"),
            fp8::THREADS as usize
        );
        assert_eq!(
            define(src(&conv::FAMILY), "CONV_THREADS"),
            conv::THREADS as usize
        );
        assert_eq!(
            define(src(&group_norm::FAMILY), "GN_THREADS"),
            group_norm::THREADS as usize
        );
    }
}

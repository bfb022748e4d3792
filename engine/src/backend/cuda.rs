//! The CUDA backend: the transformer's op set on an NVIDIA GPU, on top of kontext-kernels. The
//! encoders' ops are in [`crate::cuda_encoder`]. Checked op by op against [`crate::cpu`] by the GPU
//! check (`engine/examples/gpu_check.rs`).
//!
//! Numerics: activations are bf16 in device memory; every kernel computes in f32 and rounds once
//! when it stores; products accumulate in f32 (cuBLASLt, `CUBLAS_COMPUTE_32F`). Host data comes
//! in as f32 and stays f32 on the device ([`Backend::upload`]): the RoPE table and T5's position
//! bias are read in f32 by their kernels, and an op whose kernel reads bf16 first casts an f32
//! operand (one rounding, the same the reference model in bf16 does).
//!
//! Tensors: every [`CudaTensor`] is a contiguous row-major `[rows, cols]` matrix of its own (slices
//! and concatenations copy, so in-place ops never reach through a view into another tensor).
//!
//! Memory: weights are uploaded once, at load, each its own allocation. Activations come from the
//! current *scope* of the calling thread:
//! - none: each tensor is its own device allocation (ops called one by one, as in a check);
//! - a pool ([`Backend::planned`]): the work is first run as a plan — same calls, same shapes,
//!   outputs taken from a planning [`Pool`] with no memory, no launches — which measures the peak;
//!   one pool of exactly that size is allocated and the real run takes every tensor from it.
//!   Placement in a pool is deterministic, so the real run fits by construction, and a loop of
//!   forwards (the denoising loop) makes no device allocation at all, which
//!   [`kontext_kernels::Gpu::allocations`] lets a check assert.
//!
//! The scope is per thread, so concurrent requests on one backend each plan and use their own
//! pool (the GPU still runs their work in order, on one stream).
//!
//! Weights: linear layers are bf16 `[out, in]` with a bf16 bias (the GEMM epilogue's type), except
//! fp8 checkpoint weights, which stay fp8 on the GPU with their per-part scales (1 byte per weight:
//! the transformer is 11.9 GB instead of 23.8) and are dequantised by `fp8.cu` into a bf16 scratch
//! tensor of the current scope right before their GEMM. Parameter vectors are f32.
//!
//! [`CudaBackend::planner`] is the same backend without a GPU, planning only: it runs the model
//! code's shape flow and measures activation memory on machines without a GPU (the unit tests).

#![warn(missing_docs)]

use crate::backend::{
    check_attention, check_bias, check_concat_cols, check_concat_rows, check_len, check_linear,
    check_qk_rope, check_row_vector, check_same, check_slice_cols, check_slice_rows, linear_shape,
    Backend, Placement, WeightTally,
};
use crate::cuda_stream::{StreamStats, StreamedWeight, Streamer};
use crate::error::{shape_err, EngineError, Result};
use crate::layers::{LN_EPS, RMS_EPS};
use crate::lora::{check_terms, LoraTerm};
use crate::weights::{quantise_e4m3, HostWeight, StoredWeight};
use half::bf16;
use kontext_kernels::arena::{Pool, PoolRegion};
use kontext_kernels::attention::{AttentionOpts, MAX_HEAD_DIM};
use kontext_kernels::elementwise::Unary;
use kontext_kernels::gemm::Gemm;
use kontext_kernels::weights::{upload_weight, DeviceWeight, HostDType};
use kontext_kernels::{DType, DeviceMat, Gpu, Kernels};
use rayon::prelude::*;
use std::cell::RefCell;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

// The fused ops (GEMM epilogues, the fp8 × fp8 route): a child module, so they reach the
// backend's private state.
#[path = "cuda_fused.rs"]
mod fused;

// The step captured as a CUDA graph (`Backend::repeat`): a child module for the same reason.
#[path = "cuda_graph.rs"]
mod graph;

/// Largest score block of the wide-head attention path (f32 `[bq, L]`): 256 MiB. The VAE's
/// mid-block at 1024² has L = 16384, so 4096 queries per block.
const ATTN_SCORE_BYTES: usize = 256 << 20;

/// What the GPU side holds: the device, every kernel function, cuBLASLt.
pub(crate) struct Device {
    pub(crate) gpu: Arc<Gpu>,
    pub(crate) k: Kernels,
    pub(crate) gemm: Gemm,
    /// Created with the first streamed weight.
    streamer: OnceLock<Streamer>,
}

struct Shared {
    /// None: a planner without a GPU.
    dev: Option<Device>,
    /// Fill every new activation with 0xFF bytes (NaN) before its op writes it.
    poison: AtomicBool,
    /// Bytes of the last pool [`Backend::planned`] allocated.
    last_pool_bytes: AtomicUsize,
    placement: Mutex<Placement>,
    tally: Mutex<WeightTally>,
    /// Steps captured as CUDA graphs, and replays of them ([`CudaBackend::graph_stats`]).
    graph_captures: AtomicU64,
    graph_replays: AtomicU64,
}

/// The CUDA backend. Cheap to clone: clones share the GPU, the kernels and the weights' device.
#[derive(Clone)]
pub struct CudaBackend {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.shared.dev {
            Some(d) => write!(f, "CudaBackend({})", d.gpu.info),
            None => write!(f, "CudaBackend(planner)"),
        }
    }
}

/// Where a thread's new activations come from (see the module docs).
#[derive(Clone)]
struct Scope {
    /// The backend this scope belongs to (the address of its shared state).
    owner: usize,
    pool: Pool,
    /// A plan: regions without memory, no launches.
    planning: bool,
}

thread_local! {
    static SCOPE: RefCell<Option<Scope>> = const { RefCell::new(None) };
}

/// Restores the previous scope of the thread when dropped (also on an error or a panic).
struct ScopeGuard(Option<Scope>);

impl Drop for ScopeGuard {
    fn drop(&mut self) {
        let prev = self.0.take();
        SCOPE.with(|s| *s.borrow_mut() = prev);
    }
}

/// A device activation: a contiguous row-major `[rows, cols]` matrix, bf16 (op outputs) or f32
/// (uploads). In a plan it has a pool region but no memory.
pub struct CudaTensor {
    rows: usize,
    cols: usize,
    dtype: DType,
    mem: Mem,
}

enum Mem {
    Device(DeviceMat),
    Planned { _region: Arc<PoolRegion> },
}

impl std::fmt::Debug for CudaTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.mem {
            Mem::Device(_) => "",
            Mem::Planned { .. } => " (planned)",
        };
        write!(
            f,
            "CudaTensor[{}, {}] {}{kind}",
            self.rows, self.cols, self.dtype
        )
    }
}

impl CudaTensor {
    /// Rows (tokens, pixels).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (features, channels).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Element type in device memory.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device matrix; an error for a tensor of a plan, which has no memory.
    pub fn mat(&self) -> Result<&DeviceMat> {
        match &self.mem {
            Mem::Device(m) => Ok(m),
            Mem::Planned { .. } => Err(shape_err(
                "cuda",
                format!(
                    "internal: a planned [{}, {}] tensor reached a launch",
                    self.rows, self.cols
                ),
            )),
        }
    }
}

/// An operand in the type a kernel reads: the tensor itself, or a converted copy.
pub(crate) enum Operand<'a> {
    Same(&'a CudaTensor),
    Cast(CudaTensor),
}

impl Deref for Operand<'_> {
    type Target = CudaTensor;
    fn deref(&self) -> &CudaTensor {
        match self {
            Operand::Same(t) => t,
            Operand::Cast(t) => t,
        }
    }
}

/// A linear layer on the GPU: weight `[out, in]` (bf16, or fp8 with its scales) and a bf16 bias
/// `[1, out]`.
pub struct CudaLinear {
    /// Output features.
    pub out: usize,
    /// Input features.
    pub inp: usize,
    /// Whether the weight is fp8 (dequantised into a scratch tensor before each GEMM).
    pub fp8: bool,
    weight: Home,
    bias: Option<DeviceMat>,
    lora: Vec<CudaLoraTerm>,
}

/// Where a linear weight lives.
enum Home {
    /// A planner's: nowhere.
    Planned,
    Device(DeviceWeight),
    /// Host memory, copied in before each use.
    Streamed(Arc<StreamedWeight>),
}

/// An attached LoRA term on the GPU: `A [rank, in]` and `B [rows, rank]` in bf16 (the
/// activations' type, as PEFT keeps an adapter in the base layer's dtype); none in a planner.
struct CudaLoraTerm {
    rank: usize,
    row0: usize,
    rows: usize,
    scale: f32,
    ab: Option<(DeviceMat, DeviceMat)>,
}

impl CudaLinear {
    /// Device bytes of the weight and bias (0 for a planner's; a streamed weight's are in its
    /// slot, not counted here).
    pub fn device_bytes(&self) -> usize {
        let w = match &self.weight {
            Home::Device(w) => w.data.desc().span_bytes(),
            Home::Planned | Home::Streamed(_) => 0,
        };
        w + self.bias.as_ref().map_or(0, |b| b.desc().span_bytes())
    }

    /// The row ranges and scales of the weight's parts (None for a planner's).
    fn part_scales(&self) -> Option<&[(std::ops::Range<usize>, f32)]> {
        match &self.weight {
            Home::Device(w) => Some(&w.scales),
            Home::Streamed(s) => Some(&s.scales),
            Home::Planned => None,
        }
    }

    /// Whether the weight lives in host memory and is copied in for each use.
    pub fn is_streamed(&self) -> bool {
        matches!(self.weight, Home::Streamed(_))
    }
}

/// A parameter vector on the GPU: f32 `[1, n]`.
pub struct CudaVector {
    /// Length.
    pub n: usize,
    mat: Option<DeviceMat>,
}

impl CudaVector {
    pub(crate) fn mat(&self) -> Result<&DeviceMat> {
        self.mat
            .as_ref()
            .ok_or_else(|| shape_err("vector", "internal: a planner's vector reached a launch"))
    }
}

/// The checkpoint's element type in the kernels' terms.
fn host_dtype(key: &str, d: kontext_loader::DType) -> Result<HostDType> {
    use kontext_loader::DType as L;
    Ok(match d {
        L::F32 => HostDType::F32,
        L::F16 => HostDType::F16,
        L::BF16 => HostDType::Bf16,
        L::F8E4M3 => HostDType::F8E4M3,
        L::F8E5M2 => HostDType::F8E5M2,
        other => {
            return Err(shape_err(
                "load_linear",
                format!("{key}: a {} tensor is not a weight", other.name()),
            ))
        }
    })
}

/// f32 values → little-endian bf16 bytes (round to nearest even), in parallel.
pub(crate) fn bf16_bytes(data: &[f32]) -> Vec<u8> {
    let mut bytes = vec![0u8; data.len() * 2];
    bytes
        .par_chunks_mut(2)
        .zip(data.par_iter())
        .for_each(|(b, &v)| b.copy_from_slice(&bf16::from_f32(v).to_le_bytes()));
    bytes
}

impl CudaBackend {
    /// Opens GPU `ordinal`, compiles (or loads from the cache) every kernel family and creates
    /// the cuBLASLt handle. No GPU, no driver or no CUDA libraries is an error, never a panic.
    pub fn new(ordinal: usize) -> Result<CudaBackend> {
        let gpu = Gpu::new(ordinal)?;
        let k = Kernels::load(&gpu)?;
        let gemm = Gemm::new(&gpu)?;
        Ok(CudaBackend {
            shared: Arc::new(Shared {
                dev: Some(Device {
                    gpu,
                    k,
                    gemm,
                    streamer: OnceLock::new(),
                }),
                poison: AtomicBool::new(false),
                last_pool_bytes: AtomicUsize::new(0),
                placement: Mutex::default(),
                tally: Mutex::default(),
                graph_captures: AtomicU64::new(0),
                graph_replays: AtomicU64::new(0),
            }),
        })
    }

    /// The backend without a GPU, planning only: every op checks its operands' shapes, takes its
    /// output from the planning pool of the current scope and launches nothing; downloads give
    /// zeros and weights hold no data. Measures activation memory and exercises the model code's
    /// shape flow on machines without a GPU.
    pub fn planner() -> CudaBackend {
        CudaBackend {
            shared: Arc::new(Shared {
                dev: None,
                poison: AtomicBool::new(false),
                last_pool_bytes: AtomicUsize::new(0),
                placement: Mutex::default(),
                tally: Mutex::default(),
                graph_captures: AtomicU64::new(0),
                graph_replays: AtomicU64::new(0),
            }),
        }
    }

    /// The placement weights are loaded with now.
    fn placement(&self) -> Placement {
        self.shared
            .placement
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Counts `bytes` of device weight memory.
    pub(crate) fn count_device(&self, bytes: usize) {
        self.shared
            .tally
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .device += bytes as u64;
    }

    /// Allocates the streaming slots now (after loading), so that no later stage allocates
    /// them. Nothing when nothing is streamed or for a planner.
    pub fn prepare_streaming(&self) -> Result<()> {
        if let Some(s) = self.shared.dev.as_ref().and_then(|d| d.streamer.get()) {
            s.prepare()?;
        }
        Ok(())
    }

    /// Copies the streamed weights took so far (zeros when nothing is streamed).
    pub fn stream_stats(&self) -> StreamStats {
        self.shared
            .dev
            .as_ref()
            .and_then(|d| d.streamer.get())
            .map(Streamer::stats)
            .unwrap_or_default()
    }

    /// In a plan pass, tells the streamer `w` is used here (it learns the order of use).
    pub(crate) fn plan_use(&self, w: &CudaLinear) {
        if self.planning() {
            if let (Home::Streamed(s), Some(d)) = (&w.weight, &self.shared.dev) {
                if let Some(st) = d.streamer.get() {
                    st.observe(s);
                }
            }
        }
    }

    /// Runs `f` with `w`'s weight on the device: its resident copy, or its slot after the
    /// streamer copied it in.
    pub(crate) fn with_weight<T>(
        &self,
        d: &Device,
        w: &CudaLinear,
        f: impl FnOnce(&DeviceWeight) -> Result<T>,
    ) -> Result<T> {
        match &w.weight {
            Home::Device(dw) => f(dw),
            Home::Streamed(s) => d
                .streamer
                .get()
                .ok_or_else(|| {
                    shape_err("linear", "internal: a streamed weight without a streamer")
                })?
                .with(s, f),
            Home::Planned => Err(shape_err(
                "linear",
                "internal: a planner's weight reached a launch",
            )),
        }
    }

    /// Builds a linear layer's weight `[out, inp]` from its parts as the device holds them
    /// (`dtype` bf16 or fp8; each part's bytes and scale, fp8 scales kept per part), placed as
    /// [`CudaBackend::set_placement`] says, and counts its bytes.
    fn place_weight(
        &self,
        key: &str,
        parts: &[(&[u8], f32)],
        dtype: DType,
        (out, inp): (usize, usize),
    ) -> Result<Home> {
        let bytes = out * inp * dtype.size();
        let stream = self.placement().streams(key);
        {
            let mut t = self.shared.tally.lock().unwrap_or_else(|e| e.into_inner());
            if stream {
                t.host += bytes as u64;
                t.streamed += 1;
                t.largest_streamed = t.largest_streamed.max(bytes as u64);
            } else {
                t.device += bytes as u64;
            }
        }
        let Some(d) = &self.shared.dev else {
            return Ok(Home::Planned);
        };
        let host = if dtype == DType::Bf16 {
            HostDType::Bf16
        } else {
            HostDType::F8E4M3
        };
        if !stream {
            return Ok(Home::Device(upload_weight(&d.gpu, parts, host, out, inp)?));
        }
        let mut pinned = d.gpu.alloc_pinned(bytes)?;
        let mut scales = Vec::with_capacity(parts.len());
        let (mut at, mut row0) = (0, 0);
        for &(p, scale) in parts {
            pinned.as_mut_slice()[at..at + p.len()].copy_from_slice(p);
            let rows = p.len() / (inp * dtype.size()).max(1);
            scales.push((row0..row0 + rows, scale));
            at += p.len();
            row0 += rows;
        }
        if dtype == DType::Bf16 {
            scales = vec![(0..out, 1.0)];
        }
        let streamer = match d.streamer.get() {
            Some(s) => s,
            None => {
                let s = Streamer::new(&d.gpu)?;
                d.streamer.get_or_init(|| s)
            }
        };
        Ok(Home::Streamed(streamer.add(
            pinned,
            dtype,
            (out, inp),
            scales,
        )?))
    }

    /// The GPU (None for a planner).
    pub fn gpu(&self) -> Option<&Arc<Gpu>> {
        self.shared.dev.as_ref().map(|d| &d.gpu)
    }

    /// What loading the kernels did (None for a planner).
    pub fn kernels_report(&self) -> Option<&kontext_kernels::LoadReport> {
        self.shared.dev.as_ref().map(|d| &d.k.report)
    }

    /// When on, every new activation is filled with NaN (0xFF bytes) before its op writes it, so
    /// an element an op fails to write shows in any comparison. For checks; costs a memset per
    /// tensor.
    pub fn set_poison(&self, on: bool) {
        self.shared.poison.store(on, Ordering::Relaxed);
    }

    /// Bytes of the pool the last [`Backend::planned`] call allocated (or planned).
    pub fn last_pool_bytes(&self) -> usize {
        self.shared.last_pool_bytes.load(Ordering::Relaxed)
    }

    /// Host f32 `[rows, cols]` → a bf16 tensor (rounded to nearest even): an input that enters
    /// ops without a cast (timings; `upload` keeps f32).
    pub fn upload_bf16(&self, data: &[f32], rows: usize, cols: usize) -> Result<CudaTensor> {
        let x = self.upload(data, rows, cols)?;
        let y = self.tensor(DType::Bf16, rows, cols, "upload_bf16")?;
        if rows * cols > 0 {
            self.launch(|d| Ok(d.k.cast(x.mat()?, y.mat()?)?))?;
        }
        Ok(y)
    }

    /// Runs `f` with this thread's new activations from `pool` (a plan when `planning`).
    pub fn with_scope<T>(
        &self,
        pool: Pool,
        planning: bool,
        f: &mut dyn FnMut() -> Result<T>,
    ) -> Result<T> {
        let scope = Scope {
            owner: self.id(),
            pool,
            planning: planning || self.shared.dev.is_none(),
        };
        let prev = SCOPE.with(|s| s.borrow_mut().replace(scope));
        let _guard = ScopeGuard(prev);
        f()
    }

    /// Runs `f` as a plan and returns the bytes a pool needs for it.
    pub fn plan_bytes(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<usize> {
        let plan = Pool::plan();
        self.with_scope(plan.clone(), true, f)?;
        Ok(plan.peak())
    }

    fn id(&self) -> usize {
        Arc::as_ptr(&self.shared) as usize
    }

    fn scope(&self) -> Option<Scope> {
        SCOPE.with(|s| {
            s.borrow()
                .as_ref()
                .filter(|s| s.owner == self.id())
                .cloned()
        })
    }

    /// Whether ops only plan (a planner, or a planning scope).
    pub(crate) fn planning(&self) -> bool {
        self.shared.dev.is_none() || self.scope().is_some_and(|s| s.planning)
    }

    pub(crate) fn dev(&self) -> Result<&Device> {
        self.shared
            .dev
            .as_ref()
            .ok_or_else(|| shape_err("cuda", "a planner has no GPU"))
    }

    /// Queues `f`'s launches, unless this is a plan.
    pub(crate) fn launch(&self, f: impl FnOnce(&Device) -> Result<()>) -> Result<()> {
        if self.planning() {
            return Ok(());
        }
        f(self.dev()?)
    }

    /// A new `[rows, cols]` activation of `dtype` from the current scope (poisoned when asked).
    pub(crate) fn tensor(
        &self,
        dtype: DType,
        rows: usize,
        cols: usize,
        what: &str,
    ) -> Result<CudaTensor> {
        let bytes = rows * cols * dtype.size();
        let scope = self.scope();
        let mem = match (&self.shared.dev, scope) {
            (Some(_), Some(s)) if !s.planning => Mem::Device(s.pool.mat(dtype, rows, cols, what)?),
            (_, Some(s)) => Mem::Planned {
                _region: s.pool.region(bytes, what)?,
            },
            (Some(d), None) => Mem::Device(d.gpu.alloc_mat(dtype, rows, cols)?),
            (None, None) => Mem::Planned {
                _region: Pool::plan().region(bytes, what)?,
            },
        };
        if let Mem::Device(m) = &mem {
            if self.shared.poison.load(Ordering::Relaxed) {
                self.dev()?.gpu.fill_bytes(m, 0xFF)?;
            }
        }
        Ok(CudaTensor {
            rows,
            cols,
            dtype,
            mem,
        })
    }

    /// `x` as `dtype` (bf16 or f32): itself, or a converted copy from the current scope.
    pub(crate) fn as_dtype<'a>(
        &self,
        x: &'a CudaTensor,
        dtype: DType,
        what: &str,
    ) -> Result<Operand<'a>> {
        if x.dtype == dtype {
            return Ok(Operand::Same(x));
        }
        let y = self.tensor(dtype, x.rows, x.cols, what)?;
        self.launch(|d| Ok(d.k.cast(x.mat()?, y.mat()?)?))?;
        Ok(Operand::Cast(y))
    }

    /// `x` as bf16, shorthand of [`CudaBackend::as_dtype`].
    pub(crate) fn bf16<'a>(&self, x: &'a CudaTensor, what: &str) -> Result<Operand<'a>> {
        self.as_dtype(x, DType::Bf16, what)
    }

    /// Turns an f32 tensor that an op updates in place into bf16 first.
    pub(crate) fn make_bf16(&self, x: &mut CudaTensor, what: &str) -> Result<()> {
        if x.dtype != DType::Bf16 {
            let y = self.tensor(DType::Bf16, x.rows, x.cols, what)?;
            self.launch(|d| Ok(d.k.cast(x.mat()?, y.mat()?)?))?;
            *x = y;
        }
        Ok(())
    }

    /// Copies the view `src` (bf16 or f32) into the bf16 view `dst` of the same shape.
    pub(crate) fn copy_into(d: &Device, src: &DeviceMat, dst: &DeviceMat) -> Result<()> {
        if src.dtype() == DType::F32 {
            d.k.cast(src, dst)?;
        } else {
            d.k.copy2d(src, dst)?;
        }
        Ok(())
    }

    /// `y = f(x)` elementwise into a new bf16 tensor (an f32 `x` is cast into `y` first).
    pub(crate) fn unary(&self, f: Unary, x: &CudaTensor, what: &str) -> Result<CudaTensor> {
        let y = self.tensor(DType::Bf16, x.rows, x.cols, what)?;
        self.launch(|d| {
            let (xm, ym) = (x.mat()?, y.mat()?);
            if x.dtype == DType::F32 {
                d.k.cast(xm, ym)?;
                d.k.unary(f, ym, ym)?;
            } else {
                d.k.unary(f, xm, ym)?;
            }
            Ok(())
        })?;
        Ok(y)
    }

    /// A bf16 linear layer from f32 values `[out, inp]` and a bias.
    fn linear_from_f32(
        &self,
        key: &str,
        out: usize,
        inp: usize,
        data: &[f32],
        bias: Option<&[f32]>,
    ) -> Result<CudaLinear> {
        let fp8 = self.placement().fp8;
        let planning = self.shared.dev.is_none();
        let weight = if fp8 {
            let (codes, scale) = if planning {
                (vec![0; out * inp], 1.0)
            } else {
                quantise_e4m3(data)
            };
            self.place_weight(key, &[(&codes, scale)], DType::F8E4M3, (out, inp))?
        } else {
            let bytes = if planning {
                vec![0; out * inp * 2]
            } else {
                bf16_bytes(data)
            };
            self.place_weight(key, &[(&bytes, 1.0)], DType::Bf16, (out, inp))?
        };
        Ok(CudaLinear {
            out,
            inp,
            fp8,
            weight,
            bias: self.upload_bias(bias)?,
            lora: Vec::new(),
        })
    }

    /// A bias `[out]` as bf16 `[1, out]` (the GEMM epilogue's type).
    fn upload_bias(&self, bias: Option<&[f32]>) -> Result<Option<DeviceMat>> {
        if let Some(b) = bias {
            self.count_device(b.len() * 2);
        }
        match (&self.shared.dev, bias) {
            (Some(d), Some(b)) => Ok(Some(d.gpu.upload_bf16(b, 1, b.len())?)),
            _ => Ok(None),
        }
    }

    /// Attention of the transformer and the encoders (see [`Backend::attention`] and
    /// `EncoderBackend::attention_masked`): the fused kernel for even head dims up to 128; wider
    /// heads (the VAE's single 512-wide head) as two GEMMs around a row softmax, in blocks of
    /// queries.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention_impl(
        &self,
        op: &'static str,
        qkv: &CudaTensor,
        (heads, hd): (usize, usize),
        scale: f32,
        bias: Option<&CudaTensor>,
        causal: bool,
    ) -> Result<CudaTensor> {
        let l = qkv.rows;
        let d = heads * hd;
        check_attention(op, self.dims(qkv), (heads, hd), bias.map(|b| self.dims(b)))?;
        let fused = hd % 2 == 0 && hd <= MAX_HEAD_DIM;
        if !fused && (bias.is_some() || causal) {
            return Err(shape_err(
                op,
                format!(
                    "head dim {hd}: heads wider than {MAX_HEAD_DIM} (or odd) run as GEMMs + \
                     softmax, which take neither a bias nor a causal mask on CUDA"
                ),
            ));
        }
        let qkv = self.bf16(qkv, op)?;
        let bias = bias.map(|b| self.as_dtype(b, DType::F32, op)).transpose()?;
        let out = self.tensor(DType::Bf16, l, d, op)?;
        if l == 0 || d == 0 {
            return Ok(out);
        }
        if fused {
            self.launch(|dv| {
                let bias_desc = bias
                    .as_ref()
                    .map(|b| b.mat().map(|m| m.desc()))
                    .transpose()?;
                let opts = AttentionOpts {
                    scale,
                    causal,
                    bias: bias_desc.as_ref(),
                };
                Ok(dv.k.attention(qkv.mat()?, heads, hd, opts, out.mat()?)?)
            })?;
            return Ok(out);
        }
        let bq = (ATTN_SCORE_BYTES / (l * 4)).clamp(1, l);
        let s = self.tensor(DType::F32, bq, l, "attention scores")?;
        let p = self.tensor(DType::Bf16, bq, l, "attention probabilities")?;
        self.launch(|dv| {
            let (qm, om) = (qkv.mat()?, out.mat()?);
            for h in 0..heads {
                let k = qm.cols_range(d + h * hd, d + (h + 1) * hd)?; // [L, Dh]
                let v = qm.cols_range(2 * d + h * hd, 2 * d + (h + 1) * hd)?; // [L, Dh]
                for q0 in (0..l).step_by(bq) {
                    let n = bq.min(l - q0);
                    let q = qm
                        .rows_range(q0, q0 + n)?
                        .cols_range(h * hd, (h + 1) * hd)?;
                    let (sv, pv) = (s.mat()?.rows_range(0, n)?, p.mat()?.rows_range(0, n)?);
                    dv.gemm.matmul(&q, false, &k, true, &sv, None, 1.0, 0.0)?; // [n, L] f32
                    dv.k.softmax_rows(&sv, scale, &pv)?; // [n, L] bf16
                    let o = om
                        .rows_range(q0, q0 + n)?
                        .cols_range(h * hd, (h + 1) * hd)?;
                    dv.gemm.matmul(&pv, false, &v, false, &o, None, 1.0, 0.0)?; // [n, Dh]
                }
            }
            Ok(())
        })?;
        Ok(out)
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Linear = CudaLinear;
    type Vector = CudaVector;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn set_placement(&self, p: Placement) {
        *self
            .shared
            .placement
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = p;
    }

    fn weight_tally(&self) -> WeightTally {
        *self.shared.tally.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<CudaTensor> {
        check_len(data.len(), rows, cols)?;
        let t = self.tensor(DType::F32, rows, cols, "upload")?;
        self.launch(|d| Ok(d.gpu.write_f32(t.mat()?, data)?))?;
        Ok(t)
    }

    fn download(&self, x: &CudaTensor) -> Result<Vec<f32>> {
        if self.planning() {
            return Ok(vec![0.0; x.rows * x.cols]);
        }
        Ok(self.dev()?.gpu.read_f32(x.mat()?)?)
    }

    fn dims(&self, x: &CudaTensor) -> (usize, usize) {
        (x.rows, x.cols)
    }

    fn load_linear(
        &self,
        key: &str,
        weight: HostWeight,
        bias: Option<HostWeight>,
    ) -> Result<CudaLinear> {
        let (out, inp) = linear_shape(key, &weight, bias.as_ref())?;
        self.linear_from_f32(
            key,
            out,
            inp,
            &weight.data,
            bias.as_ref().map(|b| &b.data[..]),
        )
    }

    fn load_linear_stored(
        &self,
        key: &str,
        weight: StoredWeight<'_>,
        bias: Option<HostWeight>,
    ) -> Result<CudaLinear> {
        let (out, inp) = (weight.rows(), weight.cols());
        weight.expect_shape(key, &weight.shape.clone())?;
        check_bias(key, bias.as_ref(), out)?;
        let dtype = host_dtype(key, weight.dtype)?;
        let stored_fp8 = matches!(dtype, HostDType::F8E4M3 | HostDType::F8E5M2);
        let fp8 = stored_fp8 || self.placement().fp8;
        let bias_dev = self.upload_bias(bias.as_ref().map(|b| &b.data[..]))?;
        let planning = self.shared.dev.is_none();
        let home = if planning {
            // Only the bytes count: no value is read (a dry run on the real files reads headers).
            let bytes = vec![0u8; out * inp * if fp8 { 1 } else { 2 }];
            let dt = if fp8 { DType::F8E4M3 } else { DType::Bf16 };
            self.place_weight(key, &[(&bytes, 1.0)], dt, (out, inp))?
        } else if dtype == HostDType::F8E5M2 {
            // e5m2 has no place in a streamed or quantised layout; kept as stored, resident.
            let d = self.dev()?;
            let parts: Vec<(&[u8], f32)> = weight
                .parts
                .iter()
                .map(|p| (&p.bytes[..], p.scale))
                .collect();
            self.count_device(out * inp);
            Home::Device(upload_weight(&d.gpu, &parts, dtype, out, inp)?)
        } else if stored_fp8 {
            // fp8 stays fp8, each part with its scale; dequantised before each GEMM.
            let parts: Vec<(&[u8], f32)> = weight
                .parts
                .iter()
                .map(|p| (&p.bytes[..], p.scale))
                .collect();
            self.place_weight(key, &parts, DType::F8E4M3, (out, inp))?
        } else if fp8 {
            // Quantised at load: one scale per stored tensor (part).
            let quantised: Vec<(Vec<u8>, f32)> = weight
                .parts
                .iter()
                .map(|p| {
                    let mut v = Vec::with_capacity(p.rows * inp);
                    kontext_loader::dtype::decode_into(weight.dtype, &p.bytes, p.scale, &mut v);
                    quantise_e4m3(&v)
                })
                .collect();
            let parts: Vec<(&[u8], f32)> = quantised.iter().map(|(c, s)| (&c[..], *s)).collect();
            self.place_weight(key, &parts, DType::F8E4M3, (out, inp))?
        } else {
            // bf16 without a scale is taken as stored; anything else through f32 to bf16.
            let converted: Vec<std::borrow::Cow<'_, [u8]>> = weight
                .parts
                .iter()
                .map(|p| {
                    if dtype == HostDType::Bf16 && p.scale == 1.0 {
                        std::borrow::Cow::Borrowed(&p.bytes[..])
                    } else {
                        let mut v = Vec::with_capacity(p.rows * inp);
                        kontext_loader::dtype::decode_into(weight.dtype, &p.bytes, p.scale, &mut v);
                        std::borrow::Cow::Owned(bf16_bytes(&v))
                    }
                })
                .collect();
            let parts: Vec<(&[u8], f32)> = converted.iter().map(|c| (&c[..], 1.0)).collect();
            self.place_weight(key, &parts, DType::Bf16, (out, inp))?
        };
        Ok(CudaLinear {
            out,
            inp,
            fp8,
            weight: home,
            bias: bias_dev,
            lora: Vec::new(),
        })
    }

    fn load_vector(&self, key: &str, v: HostWeight) -> Result<CudaVector> {
        v.expect_shape(key, &[v.data.len()])?;
        self.count_device(v.data.len() * 4);
        let mat = match &self.shared.dev {
            Some(d) => Some(d.gpu.upload_f32(&v.data, 1, v.data.len())?),
            None => None,
        };
        Ok(CudaVector {
            n: v.data.len(),
            mat,
        })
    }

    fn planned<T>(
        &self,
        step: &mut dyn FnMut() -> Result<()>,
        body: &mut dyn FnMut() -> Result<T>,
    ) -> Result<T> {
        let bytes = self.plan_bytes(step)?;
        self.shared.last_pool_bytes.store(bytes, Ordering::Relaxed);
        match &self.shared.dev {
            Some(d) => self.with_scope(Pool::new(&d.gpu, bytes)?, false, body),
            None => self.with_scope(Pool::plan(), true, body),
        }
    }

    /// Captures `body` once as a CUDA graph and replays it `times` times; eager with
    /// `KONTEXT_CUDA_GRAPH=0`, when planning, or when weights are streamed (`cuda_graph.rs`).
    fn repeat(
        &self,
        times: usize,
        body: &mut dyn FnMut() -> Result<()>,
        after: &mut dyn FnMut(usize) -> Result<()>,
    ) -> Result<()> {
        self.repeat_graph(times, body, after)
    }

    fn linear(&self, x: &CudaTensor, w: &CudaLinear) -> Result<CudaTensor> {
        check_linear(self.dims(x), (w.out, w.inp))?;
        if w.inp == 0 && x.rows > 0 && w.out > 0 {
            return Err(shape_err(
                "linear",
                "a linear layer with no inputs is not supported on CUDA",
            ));
        }
        let x = self.bf16(x, "linear")?;
        let y = self.tensor(DType::Bf16, x.rows, w.out, "linear")?;
        if x.rows == 0 || w.out == 0 {
            return Ok(y);
        }
        self.plan_use(w);
        let fp8_route = fused::fp8_linear(self, &x, w, &y, kontext_kernels::gemm::Epilogue::None)?;
        let scratch = if w.fp8 && !fp8_route {
            Some(self.tensor(DType::Bf16, w.out, w.inp, "fp8 weight as bf16")?)
        } else {
            None
        };
        self.launch(|d| {
            if fp8_route {
                return Ok(());
            }
            self.with_weight(d, w, |weight| {
                let wm = match &scratch {
                    Some(s) => {
                        let s = s.mat()?;
                        d.k.dequant_fp8(weight, s)?;
                        s
                    }
                    None => &weight.data,
                };
                Ok(d.gemm.linear(x.mat()?, wm, w.bias.as_ref(), y.mat()?)?)
            })
        })?;
        for t in &w.lora {
            // h [L, r] = x·Aᵀ, then y[:, row0..row0 + rows] += scale · h·Bᵀ, accumulated onto
            // the base output in f32 with one rounding.
            let h = self.tensor(DType::Bf16, x.rows, t.rank, "lora x·Aᵀ")?;
            self.launch(|d| {
                let (a, b) = t.ab.as_ref().ok_or_else(|| {
                    shape_err("linear", "internal: a planner's LoRA reached a launch")
                })?;
                d.gemm.linear(x.mat()?, a, None, h.mat()?)?;
                let cols = y.mat()?.cols_range(t.row0, t.row0 + t.rows)?;
                Ok(d.gemm
                    .matmul(h.mat()?, false, b, true, &cols, None, t.scale, 1.0)?)
            })?;
        }
        Ok(y)
    }

    fn set_lora(&self, w: &mut CudaLinear, key: &str, terms: &[LoraTerm]) -> Result<()> {
        check_terms(key, (w.out, w.inp), terms)?;
        let mut lora = Vec::with_capacity(terms.len());
        for t in terms {
            let ab = match &self.shared.dev {
                Some(d) => Some((
                    d.gpu.upload_bf16(&t.down, t.rank, w.inp)?,
                    d.gpu.upload_bf16(&t.up, t.rows, t.rank)?,
                )),
                None => None,
            };
            lora.push(CudaLoraTerm {
                rank: t.rank,
                row0: t.row0,
                rows: t.rows,
                scale: t.scale,
                ab,
            });
        }
        w.lora = lora;
        Ok(())
    }

    fn linear_gelu(&self, x: &CudaTensor, w: &CudaLinear) -> Result<CudaTensor> {
        fused::linear_gelu(self, x, w)
    }

    fn norm_modulate_linear(
        &self,
        x: &CudaTensor,
        shift: &CudaTensor,
        scale: &CudaTensor,
        w: &CudaLinear,
        gelu: bool,
    ) -> Result<CudaTensor> {
        let epilogue = if gelu {
            kontext_kernels::gemm::Epilogue::Gelu
        } else {
            kontext_kernels::gemm::Epilogue::None
        };
        fused::norm_modulate_linear(self, x, (shift, scale), w, epilogue)
    }

    fn linear_gate_residual(
        &self,
        x: &CudaTensor,
        w: &CudaLinear,
        gate: &CudaTensor,
        residual: &mut CudaTensor,
    ) -> Result<()> {
        fused::linear_gate_residual(self, x, w, gate, residual)
    }

    fn silu(&self, x: &CudaTensor) -> Result<CudaTensor> {
        self.unary(Unary::Silu, x, "silu")
    }

    fn gelu_tanh(&self, x: &CudaTensor) -> Result<CudaTensor> {
        self.unary(Unary::GeluTanh, x, "gelu_tanh")
    }

    fn add_assign(&self, a: &mut CudaTensor, b: &CudaTensor) -> Result<()> {
        check_same("add_assign", self.dims(a), self.dims(b))?;
        self.make_bf16(a, "add_assign")?;
        let b = self.bf16(b, "add_assign")?;
        self.launch(|d| Ok(d.k.add_assign(a.mat()?, b.mat()?)?))
    }

    fn norm_modulate(
        &self,
        x: &CudaTensor,
        shift: &CudaTensor,
        scale: &CudaTensor,
    ) -> Result<CudaTensor> {
        check_row_vector("norm_modulate", "shift", self.dims(shift), x.cols)?;
        check_row_vector("norm_modulate", "scale", self.dims(scale), x.cols)?;
        let x = self.bf16(x, "norm_modulate")?;
        let shift = self.bf16(shift, "norm_modulate")?;
        let scale = self.bf16(scale, "norm_modulate")?;
        let y = self.tensor(DType::Bf16, x.rows, x.cols, "norm_modulate")?;
        if x.rows == 0 || x.cols == 0 {
            return Ok(y);
        }
        self.launch(|d| {
            Ok(d.k.norm_modulate(x.mat()?, shift.mat()?, scale.mat()?, y.mat()?, LN_EPS)?)
        })?;
        Ok(y)
    }

    fn qk_norm_rope(
        &self,
        qkv: &mut CudaTensor,
        num_heads: usize,
        q_scale: &CudaVector,
        k_scale: &CudaVector,
        pe: &CudaTensor,
        pe_row0: usize,
    ) -> Result<()> {
        let hd = q_scale.n;
        if hd == 0 || hd % 2 != 0 || k_scale.n != hd || num_heads == 0 {
            return Err(shape_err(
                "qk_norm_rope",
                format!(
                    "q scale [{hd}] and k scale [{}] must have one even head dim ({num_heads} heads)",
                    k_scale.n
                ),
            ));
        }
        check_qk_rope((num_heads, hd), self.dims(qkv), self.dims(pe), pe_row0)?;
        self.make_bf16(qkv, "qk_norm_rope")?;
        let pe = self.as_dtype(pe, DType::F32, "qk_norm_rope")?;
        if qkv.rows == 0 {
            return Ok(());
        }
        self.launch(|dv| {
            Ok(dv.k.qk_norm_rope(
                qkv.mat()?,
                num_heads,
                q_scale.mat()?,
                k_scale.mat()?,
                pe.mat()?,
                pe_row0,
                RMS_EPS,
            )?)
        })
    }

    fn attention(&self, qkv: &CudaTensor, num_heads: usize, head_dim: usize) -> Result<CudaTensor> {
        let scale = 1.0 / (head_dim as f32).sqrt();
        self.attention_impl("attention", qkv, (num_heads, head_dim), scale, None, false)
    }

    /// The tensor-core kernel with QKNorm and RoPE fused in, where it applies
    /// ([`crate::backend::cuda_attention`]); else the default's two ops.
    fn attention_qk_norm_rope(
        &self,
        qkv: &mut CudaTensor,
        dims: (usize, usize),
        scales: [crate::backend::QkScales<'_, CudaVector>; 2],
        split: usize,
        pe: &CudaTensor,
        pe_row0: usize,
    ) -> Result<CudaTensor> {
        crate::backend::cuda_attention::attention_qk_norm_rope(
            self, qkv, dims, scales, split, pe, pe_row0,
        )
    }

    /// Both branches written in place into one buffer ([`crate::backend::cuda_attention`]).
    fn single_block_branches(
        &self,
        lin1: &mut CudaTensor,
        dims: (usize, usize),
        scales: crate::backend::QkScales<'_, CudaVector>,
        pe: &CudaTensor,
    ) -> Result<CudaTensor> {
        crate::backend::cuda_attention::single_block_branches(self, lin1, dims, scales, pe)
    }

    fn gate_residual(&self, x: &mut CudaTensor, gate: &CudaTensor, y: &CudaTensor) -> Result<()> {
        check_same("gate_residual", self.dims(x), self.dims(y))?;
        check_row_vector("gate_residual", "gate", self.dims(gate), x.cols)?;
        self.make_bf16(x, "gate_residual")?;
        let gate = self.bf16(gate, "gate_residual")?;
        let y = self.bf16(y, "gate_residual")?;
        self.launch(|d| Ok(d.k.gate_residual(x.mat()?, gate.mat()?, y.mat()?)?))
    }

    fn euler_step(&self, x: &mut CudaTensor, v: &CudaTensor, dt: &CudaTensor) -> Result<()> {
        check_same("euler_step", self.dims(x), self.dims(v))?;
        check_same("euler_step", self.dims(dt), (1, 1))?;
        if x.dtype != DType::F32 || dt.dtype != DType::F32 {
            return Err(shape_err(
                "euler_step",
                "the latents and dt must be f32 tensors (made by upload)",
            ));
        }
        let v = self.bf16(v, "euler_step")?;
        self.launch(|d| Ok(d.k.euler_step(x.mat()?, v.mat()?, dt.mat()?)?))
    }

    fn copy_into(&self, dst: &mut CudaTensor, src: &CudaTensor) -> Result<()> {
        check_same("copy_into", self.dims(dst), self.dims(src))?;
        if dst.rows * dst.cols == 0 {
            return Ok(());
        }
        match (src.dtype, dst.dtype) {
            (s, t) if s == t => self.launch(|d| Ok(d.gpu.copy_mat(src.mat()?, dst.mat()?)?)),
            (DType::F32, DType::Bf16) | (DType::Bf16, DType::F32) => {
                self.launch(|d| Ok(d.k.cast(src.mat()?, dst.mat()?)?))
            }
            (s, t) => Err(shape_err("copy_into", format!("{s} into {t}"))),
        }
    }

    fn write(&self, dst: &mut CudaTensor, data: &[f32]) -> Result<()> {
        check_len(data.len(), dst.rows, dst.cols)?;
        if dst.dtype != DType::F32 {
            return Err(shape_err(
                "write",
                "only into an f32 tensor (made by upload)",
            ));
        }
        self.launch(|d| Ok(d.gpu.write_f32(dst.mat()?, data)?))
    }

    fn concat_rows(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        check_concat_rows(self.dims(a), self.dims(b))?;
        let y = self.tensor(DType::Bf16, a.rows + b.rows, a.cols, "concat_rows")?;
        self.launch(|d| {
            let ym = y.mat()?;
            Self::copy_into(d, a.mat()?, &ym.rows_range(0, a.rows)?)?;
            Self::copy_into(d, b.mat()?, &ym.rows_range(a.rows, a.rows + b.rows)?)
        })?;
        Ok(y)
    }

    fn concat_cols(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        check_concat_cols(self.dims(a), self.dims(b))?;
        let y = self.tensor(DType::Bf16, a.rows, a.cols + b.cols, "concat_cols")?;
        self.launch(|d| {
            let ym = y.mat()?;
            Self::copy_into(d, a.mat()?, &ym.cols_range(0, a.cols)?)?;
            Self::copy_into(d, b.mat()?, &ym.cols_range(a.cols, a.cols + b.cols)?)
        })?;
        Ok(y)
    }

    fn slice_rows(&self, x: &CudaTensor, begin: usize, end: usize) -> Result<CudaTensor> {
        check_slice_rows(self.dims(x), begin, end)?;
        let y = self.tensor(DType::Bf16, end - begin, x.cols, "slice_rows")?;
        self.launch(|d| Self::copy_into(d, &x.mat()?.rows_range(begin, end)?, y.mat()?))?;
        Ok(y)
    }

    fn slice_cols(&self, x: &CudaTensor, begin: usize, end: usize) -> Result<CudaTensor> {
        check_slice_cols(self.dims(x), begin, end)?;
        let y = self.tensor(DType::Bf16, x.rows, end - begin, "slice_cols")?;
        self.launch(|d| Self::copy_into(d, &x.mat()?.cols_range(begin, end)?, y.mat()?))?;
        Ok(y)
    }
}

/// Errors with no GPU (`cuda_available` says why) before anything is loaded.
pub fn require_gpu() -> Result<kontext_kernels::DeviceInfo> {
    kontext_kernels::cuda_available()
        .map_err(|why| EngineError::Gpu(kontext_kernels::KernelError::NoGpu(why)))
}

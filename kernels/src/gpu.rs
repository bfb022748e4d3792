//! The GPU: one context, one stream, counted device allocations, and device matrices.
//!
//! Every byte of device memory the engine uses comes from [`Gpu::alloc`], which counts
//! allocations, so a check can assert that the denoising loop allocates nothing (the loop's
//! activations come from an [`Arena`](crate::arena::Arena) allocated once). All work runs on one
//! non-blocking stream, in order, so kernels never race each other; host reads synchronise it.
//! `KONTEXT_CUDA_SYNC=1` synchronises after every launch, so a fault is reported by the kernel
//! that caused it (after every replay while a graph captured the launches: [`crate::graph`]).

use crate::arena::PoolRegion;
use crate::desc::{DType, MatDesc};
use crate::error::{driver_err, shape_err, KernelError, Result};
use crate::probe::{device_info, DeviceInfo};
use cudarc::driver::{result, sys, CudaContext, CudaStream};
use half::bf16;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Alignment of every allocation and arena region: enough for 16-byte vector loads and for
/// cuBLASLt's preferred 256-byte alignment.
pub const ALIGN: usize = 256;

/// One CUDA device, its stream and the allocation counters.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    pub info: DeviceInfo,
    allocations: AtomicU64,
    allocated_bytes: AtomicU64,
    /// Bytes of the allocations alive now, and the most ever alive at once: the measured peak a
    /// memory plan is checked against.
    in_use_bytes: AtomicU64,
    peak_bytes: AtomicU64,
    pinned_bytes: AtomicU64,
    sync_each_launch: bool,
    /// While a CUDA graph is being captured on the stream ([`Gpu::capture`]): the launch
    /// counter of every kernel launch captured so far, one entry per launch.
    pub(crate) capture: Mutex<Option<Vec<Arc<AtomicU64>>>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("info", &self.info)
            .field("allocations", &self.allocations())
            .finish()
    }
}

impl Gpu {
    /// Opens GPU `ordinal` after probing for it: no driver, no device or a pre-sm_80 device is
    /// an error, never a panic.
    pub fn new(ordinal: usize) -> Result<Arc<Gpu>> {
        let info = device_info(ordinal).map_err(KernelError::NoGpu)?;
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err("CudaContext::new", e))?;
        // SAFETY: event tracking orders cudarc's own CudaSlice buffers across streams. This
        // crate never hands CudaSlices to kernels (it passes raw pointers of its own
        // allocations) and runs everything on one stream, so there is nothing to track.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| driver_err("cuStreamCreate", e))?;
        Ok(Arc::new(Gpu {
            ctx,
            stream,
            info,
            allocations: AtomicU64::new(0),
            allocated_bytes: AtomicU64::new(0),
            in_use_bytes: AtomicU64::new(0),
            peak_bytes: AtomicU64::new(0),
            pinned_bytes: AtomicU64::new(0),
            sync_each_launch: std::env::var("KONTEXT_CUDA_SYNC").as_deref() == Ok("1"),
            capture: Mutex::new(None),
        }))
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every kernel and copy of this crate runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Device allocations made so far through [`Gpu::alloc`] (the denoising loop must not add
    /// any).
    pub fn allocations(&self) -> u64 {
        self.allocations.load(Ordering::Relaxed)
    }

    /// Bytes allocated so far (never decreases).
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated_bytes.load(Ordering::Relaxed)
    }

    /// Bytes of device memory this process holds through [`Gpu::alloc`] now.
    pub fn in_use_bytes(&self) -> u64 {
        self.in_use_bytes.load(Ordering::Relaxed)
    }

    /// The most bytes held at once since the GPU was opened or [`Gpu::reset_peak`].
    pub fn peak_bytes(&self) -> u64 {
        self.peak_bytes.load(Ordering::Relaxed)
    }

    /// Starts a new peak measurement from what is held now.
    pub fn reset_peak(&self) {
        self.peak_bytes
            .store(self.in_use_bytes(), Ordering::Relaxed);
    }

    /// Bytes of page-locked host memory held through [`Gpu::alloc_pinned`].
    pub fn pinned_bytes(&self) -> u64 {
        self.pinned_bytes.load(Ordering::Relaxed)
    }

    /// `(free, total)` device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx
            .mem_get_info()
            .map_err(|e| driver_err("cuMemGetInfo", e))
    }

    /// Waits for all work queued on the stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver_err("cuStreamSynchronize", e))
    }

    /// Milliseconds the stream spends on the work `f` queues: CUDA events recorded before and
    /// after it, then waited for (host time between launches counts only where the GPU waits).
    pub fn time_ms<E: From<KernelError>>(
        &self,
        f: impl FnOnce() -> std::result::Result<(), E>,
    ) -> std::result::Result<f64, E> {
        use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
        let event = || {
            self.ctx
                .new_event(Some(CU_EVENT_DEFAULT))
                .map_err(|e| driver_err("cuEventCreate", e))
        };
        let (start, end) = (event()?, event()?);
        start
            .record(&self.stream)
            .map_err(|e| driver_err("cuEventRecord", e))?;
        f()?;
        end.record(&self.stream)
            .map_err(|e| driver_err("cuEventRecord", e))?;
        end.synchronize()
            .map_err(|e| driver_err("cuEventSynchronize", e))?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(|e| driver_err("cuEventElapsedTime", e))?;
        Ok(ms as f64)
    }

    /// Whether a graph is being captured on the stream now (the launch with `counter` is then
    /// recorded, not executed: the capture remembers its counter instead of it counting).
    pub(crate) fn captured(&self, counter: &Arc<AtomicU64>) -> bool {
        let mut c = self.capture.lock().unwrap_or_else(|e| e.into_inner());
        match c.as_mut() {
            Some(launches) => {
                launches.push(counter.clone());
                true
            }
            None => false,
        }
    }

    /// Whether a CUDA graph is being captured on the stream.
    pub fn is_capturing(&self) -> bool {
        self.capture
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// After a launch: with `KONTEXT_CUDA_SYNC=1`, waits for it and names the kernel on a fault
    /// (not while capturing: the capture's work runs at replay, which then synchronises).
    pub(crate) fn launched(&self, kernel: &str) -> Result<()> {
        if self.sync_each_launch && !self.is_capturing() {
            self.stream
                .synchronize()
                .map_err(|e| driver_err(format!("kernel {kernel} (KONTEXT_CUDA_SYNC=1)"), e))?;
        }
        Ok(())
    }

    /// `bytes` of uninitialised device memory (one counted allocation; none for 0 bytes).
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<Arc<DeviceAlloc>> {
        if bytes == 0 {
            return Ok(Arc::new(DeviceAlloc {
                ptr: 0,
                bytes: 0,
                gpu: self.clone(),
            }));
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_err("cuCtxSetCurrent", e))?;
        // SAFETY: a plain allocation; the memory is uninitialised, which is fine for bytes.
        let ptr = unsafe { result::malloc_sync(bytes) }.map_err(|e| {
            driver_err(
                format!("cuMemAlloc of {bytes} bytes"),
                format!("{e:?} (free/total: {:?})", self.mem_info().ok()),
            )
        })?;
        self.allocations.fetch_add(1, Ordering::Relaxed);
        self.allocated_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        let now = self.in_use_bytes.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
        self.peak_bytes.fetch_max(now, Ordering::Relaxed);
        Ok(Arc::new(DeviceAlloc {
            ptr,
            bytes,
            gpu: self.clone(),
        }))
    }

    /// `bytes` of page-locked host memory (uninitialised).
    pub fn alloc_pinned(self: &Arc<Self>, bytes: usize) -> Result<PinnedHost> {
        if bytes == 0 {
            return Ok(PinnedHost {
                ptr: std::ptr::null_mut(),
                bytes: 0,
                gpu: self.clone(),
            });
        }
        self.bind()?;
        // SAFETY: a plain page-locked allocation; freed by PinnedHost's drop.
        let ptr = unsafe { result::malloc_host(bytes, 0) }.map_err(|e| {
            driver_err(
                format!("cuMemHostAlloc of {bytes} bytes of page-locked host memory"),
                e,
            )
        })?;
        self.pinned_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        Ok(PinnedHost {
            ptr: ptr as *mut u8,
            bytes,
            gpu: self.clone(),
        })
    }

    /// A new copy stream beside the main one.
    pub fn copy_queue(self: &Arc<Self>) -> Result<CopyQueue> {
        let stream = self
            .ctx
            .new_stream()
            .map_err(|e| driver_err("cuStreamCreate", e))?;
        Ok(CopyQueue {
            stream,
            gpu: self.clone(),
        })
    }

    /// Work queued on the main stream from now on waits for the copies before `fence`.
    pub fn wait_for(&self, fence: &CopyFence) -> Result<()> {
        self.stream
            .wait(&fence.0)
            .map_err(|e| driver_err("cuStreamWaitEvent", e))
    }

    /// A new contiguous `[rows, cols]` matrix of `dtype` (one counted allocation).
    pub fn alloc_mat(
        self: &Arc<Self>,
        dtype: DType,
        rows: usize,
        cols: usize,
    ) -> Result<DeviceMat> {
        let mem = self.alloc(rows * cols * dtype.size())?;
        DeviceMat::new(mem, 0, rows, cols, cols, dtype)
    }

    /// Uploads host f32 `[rows, cols]` as a new bf16 matrix (rounded to nearest even).
    pub fn upload_bf16(
        self: &Arc<Self>,
        data: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<DeviceMat> {
        let m = self.alloc_mat(DType::Bf16, rows, cols)?;
        self.write_f32(&m, data)?;
        Ok(m)
    }

    /// Uploads host f32 `[rows, cols]` as a new f32 matrix.
    pub fn upload_f32(
        self: &Arc<Self>,
        data: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<DeviceMat> {
        let m = self.alloc_mat(DType::F32, rows, cols)?;
        self.write_f32(&m, data)?;
        Ok(m)
    }

    /// Uploads raw little-endian element bytes as a new `[rows, cols]` matrix of `dtype`.
    pub fn upload_bytes(
        self: &Arc<Self>,
        bytes: &[u8],
        dtype: DType,
        rows: usize,
        cols: usize,
    ) -> Result<DeviceMat> {
        let m = self.alloc_mat(dtype, rows, cols)?;
        self.write_bytes(&m, bytes)?;
        Ok(m)
    }

    /// Writes host f32 values into `dst` (bf16: rounded; f32: as is), no allocation.
    pub fn write_f32(&self, dst: &DeviceMat, data: &[f32]) -> Result<()> {
        // Host and device are both little-endian, so plain values are their own byte image
        // (bytemuck views them without a copy).
        match dst.dtype() {
            DType::Bf16 => {
                let v: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
                self.write_bytes(dst, bytemuck::cast_slice(&v))
            }
            DType::F32 => self.write_bytes(dst, bytemuck::cast_slice(data)),
            other => Err(shape_err(
                "write_f32",
                format!("cannot write f32 values into a {other} matrix"),
            )),
        }
    }

    /// Writes raw element bytes (row-major, `rows·cols` elements) into `dst`, no allocation.
    pub fn write_bytes(&self, dst: &DeviceMat, bytes: &[u8]) -> Result<()> {
        let d = dst.desc();
        let row_bytes = d.cols * d.dtype.size();
        if bytes.len() != d.rows * row_bytes {
            return Err(shape_err(
                "write_bytes",
                format!("{} bytes for {}", bytes.len(), d.show()),
            ));
        }
        self.bind()?;
        // A contiguous matrix is one copy; a strided view one copy per row.
        let (rows, row_bytes) = if d.ld == d.cols {
            (1, bytes.len())
        } else {
            (d.rows, row_bytes)
        };
        for (r, chunk) in bytes.chunks(row_bytes.max(1)).enumerate().take(rows) {
            let addr = d.addr + (r * d.ld * d.dtype.size()) as u64;
            // SAFETY: `dst` lies inside its allocation (checked by DeviceMat::new), so row r's
            // `row_bytes` are device memory; the host chunk is live until the stream is
            // synchronised below.
            unsafe { result::memcpy_htod_async(addr, chunk, self.stream.cu_stream()) }
                .map_err(|e| driver_err("cuMemcpyHtoDAsync", e))?;
        }
        self.synchronize()
    }

    /// `dst = src` on the device, byte for byte: two views of one dtype and shape, each row one
    /// async copy on the stream (one copy when both are contiguous). Queued, not waited for, so
    /// it may be captured into a graph.
    pub fn copy_mat(&self, src: &DeviceMat, dst: &DeviceMat) -> Result<()> {
        let (s, d) = (src.desc(), dst.desc());
        if s.dtype != d.dtype || s.rows != d.rows || s.cols != d.cols {
            return Err(shape_err(
                "copy_mat",
                format!("{} into {}: dtype and shape must match", s.show(), d.show()),
            ));
        }
        if s.is_empty() {
            return Ok(());
        }
        self.bind()?;
        let size = s.dtype.size();
        let contiguous = s.ld == s.cols && d.ld == d.cols;
        let (rows, row_bytes) = if contiguous {
            (1, s.rows * s.cols * size)
        } else {
            (s.rows, s.cols * size)
        };
        for r in 0..rows {
            let (from, to) = (
                s.addr + (r * s.ld * size) as u64,
                d.addr + (r * d.ld * size) as u64,
            );
            // SAFETY: both views lie inside their allocations (checked by DeviceMat::new), so
            // row r's `row_bytes` are device memory on both sides.
            unsafe { result::memcpy_dtod_async(to, from, row_bytes, self.stream.cu_stream()) }
                .map_err(|e| driver_err("cuMemcpyDtoDAsync", e))?;
        }
        Ok(())
    }

    /// Reads `src` back as row-major f32 (bf16 and fp8 are decoded exactly; fp8 without scale).
    pub fn read_f32(&self, src: &DeviceMat) -> Result<Vec<f32>> {
        let bytes = self.read_bytes(src)?;
        Ok(match src.dtype() {
            // pod_collect_to_vec copies into aligned storage: the byte buffer has no f32
            // alignment guarantee.
            DType::Bf16 => bytemuck::pod_collect_to_vec::<u8, bf16>(&bytes)
                .into_iter()
                .map(bf16::to_f32)
                .collect(),
            DType::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(&bytes),
            DType::I32 => bytemuck::pod_collect_to_vec::<u8, i32>(&bytes)
                .into_iter()
                .map(|v| v as f32)
                .collect(),
            DType::F8E4M3 | DType::F8E5M2 => {
                return Err(shape_err(
                    "read_f32",
                    "read fp8 weights with read_bytes (decoding needs the loader's table)",
                ))
            }
        })
    }

    /// Reads `src` back as row-major element bytes.
    pub fn read_bytes(&self, src: &DeviceMat) -> Result<Vec<u8>> {
        let d = src.desc();
        let row_bytes = d.cols * d.dtype.size();
        let mut out = vec![0u8; d.rows * row_bytes];
        self.bind()?;
        let (rows, row_bytes) = if d.ld == d.cols {
            (1, out.len())
        } else {
            (d.rows, row_bytes)
        };
        for (r, chunk) in out.chunks_mut(row_bytes.max(1)).enumerate().take(rows) {
            let addr = d.addr + (r * d.ld * d.dtype.size()) as u64;
            // SAFETY: as in write_bytes; `out` outlives the synchronisation below.
            unsafe { result::memcpy_dtoh_async(chunk, addr, self.stream.cu_stream()) }
                .map_err(|e| driver_err("cuMemcpyDtoHAsync", e))?;
        }
        self.synchronize()?;
        Ok(out)
    }

    /// Sets every byte of `dst`'s elements to `byte` (0xFF poisons bf16 and f32 with NaN), row
    /// by row so the gaps of a strided view are untouched. Queued on the stream.
    pub fn fill_bytes(&self, dst: &DeviceMat, byte: u8) -> Result<()> {
        let d = dst.desc();
        if d.is_empty() {
            return Ok(());
        }
        self.bind()?;
        let size = d.dtype.size();
        // SAFETY: rows × (cols·size) bytes at pitch ld·size all lie inside `dst`'s allocation.
        unsafe {
            sys::cuMemsetD2D8Async(
                d.addr,
                d.ld.max(d.cols) * size, // a single row's stride is unused; keep pitch ≥ width
                byte,
                d.cols * size,
                d.rows,
                self.stream.cu_stream(),
            )
        }
        .result()
        .map_err(|e| driver_err("cuMemsetD2D8Async", e))
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_err("cuCtxSetCurrent", e))
    }
}

/// One device allocation, freed when the last [`DeviceMat`] using it is dropped.
pub struct DeviceAlloc {
    ptr: u64,
    bytes: usize,
    gpu: Arc<Gpu>,
}

impl DeviceAlloc {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }
}

impl std::fmt::Debug for DeviceAlloc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceAlloc({:#x}, {} bytes)", self.ptr, self.bytes)
    }
}

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        if self.ptr == 0 {
            return;
        }
        // Queued kernels may still use the memory: wait for them first. Errors cannot be
        // returned from drop; a failed free leaks, which is the safe direction.
        let _ = self.gpu.bind();
        let _ = self.gpu.synchronize();
        // SAFETY: `ptr` came from cuMemAlloc, is freed once, and no queued work uses it any more.
        if unsafe { result::free_sync(self.ptr) }.is_ok() {
            self.gpu
                .in_use_bytes
                .fetch_sub(self.bytes as u64, Ordering::Relaxed);
        }
    }
}

/// Page-locked host memory: what asynchronous copies to the device read from without the
/// driver staging them (block streaming keeps the streamed weights here).
pub struct PinnedHost {
    ptr: *mut u8,
    bytes: usize,
    gpu: Arc<Gpu>,
}

// SAFETY: the buffer is plain memory owned by this value; access goes through &self / &mut self.
unsafe impl Send for PinnedHost {}
// SAFETY: as above; shared access is read-only.
unsafe impl Sync for PinnedHost {}

impl PinnedHost {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn as_slice(&self) -> &[u8] {
        if self.bytes == 0 {
            return &[];
        }
        // SAFETY: `ptr` points to `bytes` bytes allocated by cuMemHostAlloc, alive while self is.
        unsafe { std::slice::from_raw_parts(self.ptr, self.bytes) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        if self.bytes == 0 {
            return &mut [];
        }
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.bytes) }
    }
}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        // A queued copy may still read the buffer: wait for every stream of the context.
        let _ = self.gpu.bind();
        let _ = self.gpu.ctx.synchronize();
        // SAFETY: allocated by cuMemHostAlloc, freed once, no copy reads it any more.
        if unsafe { result::free_host(self.ptr as *mut std::ffi::c_void) }.is_ok() {
            self.gpu
                .pinned_bytes
                .fetch_sub(self.bytes as u64, Ordering::Relaxed);
        }
    }
}

/// A second stream for host-to-device copies that overlap the kernels of the main stream, with
/// the two orderings block streaming needs.
pub struct CopyQueue {
    stream: Arc<CudaStream>,
    gpu: Arc<Gpu>,
}

/// The point on a [`CopyQueue`] up to which its copies are done, for the main stream to wait on.
pub struct CopyFence(cudarc::driver::CudaEvent);

impl CopyQueue {
    /// Copies queued from now on wait for all work queued on the main stream so far (so they
    /// never overwrite memory a queued kernel still reads).
    pub fn after_compute(&self) -> Result<()> {
        let e = self
            .gpu
            .stream
            .record_event(None)
            .map_err(|e| driver_err("cuEventRecord", e))?;
        self.stream
            .wait(&e)
            .map_err(|e| driver_err("cuStreamWaitEvent", e))
    }

    /// Queues a copy of all of `src` to `offset` bytes into `dst`.
    pub fn upload(&self, src: &PinnedHost, dst: &DeviceAlloc, offset: usize) -> Result<()> {
        if offset + src.bytes > dst.bytes {
            return Err(shape_err(
                "CopyQueue::upload",
                format!(
                    "{} bytes at offset {offset} do not fit an allocation of {}",
                    src.bytes, dst.bytes
                ),
            ));
        }
        if src.bytes == 0 {
            return Ok(());
        }
        self.gpu.bind()?;
        // SAFETY: the range lies inside `dst` (checked above); `src` is pinned memory the caller
        // keeps alive until the fence of this copy has been waited for (PinnedHost's drop
        // synchronises the context as well).
        unsafe {
            result::memcpy_htod_async(
                dst.ptr + offset as u64,
                src.as_slice(),
                self.stream.cu_stream(),
            )
        }
        .map_err(|e| driver_err("cuMemcpyHtoDAsync (copy stream)", e))
    }

    /// A fence after every copy queued so far.
    pub fn fence(&self) -> Result<CopyFence> {
        self.stream
            .record_event(None)
            .map(CopyFence)
            .map_err(|e| driver_err("cuEventRecord", e))
    }

    /// Waits on the host for every queued copy.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver_err("cuStreamSynchronize (copy stream)", e))
    }
}

/// A row-major matrix in device memory: a region of a [`DeviceAlloc`] with shape, row stride and
/// element type. Cloning and slicing share the memory (like views); the allocation lives as
/// long as any of them. Launchers check operands for overlap, since two views may alias.
#[derive(Clone)]
pub struct DeviceMat {
    mem: Arc<DeviceAlloc>,
    /// The pool region this matrix lives in, returned to its pool when the last view drops.
    region: Option<Arc<PoolRegion>>,
    offset: usize,
    rows: usize,
    cols: usize,
    ld: usize,
    dtype: DType,
}

impl std::fmt::Debug for DeviceMat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceMat{}", self.desc().show())
    }
}

impl DeviceMat {
    /// `[rows, cols]` of `dtype` with row stride `ld`, starting `offset` bytes into `mem`;
    /// errors unless the whole region lies inside the allocation and is element-aligned.
    pub fn new(
        mem: Arc<DeviceAlloc>,
        offset: usize,
        rows: usize,
        cols: usize,
        ld: usize,
        dtype: DType,
    ) -> Result<DeviceMat> {
        let m = DeviceMat {
            mem,
            region: None,
            offset,
            rows,
            cols,
            ld,
            dtype,
        };
        region_in_bounds(&m.desc(), offset, m.mem.bytes)?;
        Ok(m)
    }

    /// `[rows, cols]` of `dtype` at the start of a pool `region` of `mem` (contiguous).
    pub(crate) fn in_region(
        mem: Arc<DeviceAlloc>,
        region: Arc<PoolRegion>,
        rows: usize,
        cols: usize,
        dtype: DType,
    ) -> Result<DeviceMat> {
        let mut m = DeviceMat::new(mem, region.offset(), rows, cols, cols, dtype)?;
        if m.desc().span_bytes() > region.bytes() {
            return Err(shape_err(
                "pool region",
                format!("{} does not fit {} bytes", m.desc().show(), region.bytes()),
            ));
        }
        m.region = Some(region);
        Ok(m)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row stride in elements.
    pub fn ld(&self) -> usize {
        self.ld
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Operand description for launchers.
    pub fn desc(&self) -> MatDesc {
        MatDesc {
            addr: self.mem.ptr + self.offset as u64,
            rows: self.rows,
            cols: self.cols,
            ld: self.ld,
            dtype: self.dtype,
        }
    }

    /// Device address of the first element.
    pub fn ptr(&self) -> u64 {
        self.mem.ptr + self.offset as u64
    }

    /// The allocation this region belongs to.
    pub fn alloc(&self) -> &Arc<DeviceAlloc> {
        &self.mem
    }

    /// Rows `[begin, end)` as a view.
    pub fn rows_range(&self, begin: usize, end: usize) -> Result<DeviceMat> {
        if begin > end || end > self.rows {
            return Err(shape_err(
                "rows_range",
                format!("rows [{begin}, {end}) of {}", self.desc().show()),
            ));
        }
        self.view(
            self.offset + begin * self.ld * self.dtype.size(),
            end - begin,
            self.cols,
            self.ld,
        )
    }

    /// Columns `[begin, end)` as a view (same row stride).
    pub fn cols_range(&self, begin: usize, end: usize) -> Result<DeviceMat> {
        if begin > end || end > self.cols {
            return Err(shape_err(
                "cols_range",
                format!("columns [{begin}, {end}) of {}", self.desc().show()),
            ));
        }
        self.view(
            self.offset + begin * self.dtype.size(),
            self.rows,
            end - begin,
            self.ld,
        )
    }

    /// The same memory seen as `[rows, cols]` contiguous (only for contiguous matrices).
    pub fn reshape(&self, rows: usize, cols: usize) -> Result<DeviceMat> {
        if self.ld != self.cols && self.rows > 1 {
            return Err(shape_err(
                "reshape",
                format!("{} is not contiguous", self.desc().show()),
            ));
        }
        if rows * cols != self.rows * self.cols {
            return Err(shape_err(
                "reshape",
                format!("{} cannot be [{rows}, {cols}]", self.desc().show()),
            ));
        }
        self.view(self.offset, rows, cols, cols)
    }

    /// Another region of the same memory (and pool region), bounds-checked.
    fn view(&self, offset: usize, rows: usize, cols: usize, ld: usize) -> Result<DeviceMat> {
        let mut m = DeviceMat::new(self.mem.clone(), offset, rows, cols, ld, self.dtype)?;
        m.region = self.region.clone();
        Ok(m)
    }
}

/// Checks that the region `d`, starting `offset` bytes into an allocation of `alloc_bytes`,
/// lies inside it and is aligned to its elements.
pub fn region_in_bounds(d: &MatDesc, offset: usize, alloc_bytes: usize) -> Result<()> {
    if d.rows > 1 && d.ld < d.cols {
        return Err(shape_err(
            "device region",
            format!("{} has a row stride below its width", d.show()),
        ));
    }
    if offset % d.dtype.size() != 0 {
        return Err(shape_err(
            "device region",
            format!(
                "{} at byte offset {offset} is not element-aligned",
                d.show()
            ),
        ));
    }
    let end = offset.checked_add(d.span_bytes());
    if end.is_none_or(|e| e > alloc_bytes) {
        return Err(shape_err(
            "device region",
            format!(
                "{} at byte offset {offset} runs past its {alloc_bytes}-byte allocation",
                d.show()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desc::tests::bf;

    #[test]
    fn regions_must_fit_their_allocation() {
        assert!(region_in_bounds(&bf(0, 4, 8, 8), 0, 64).is_ok());
        assert!(region_in_bounds(&bf(0, 4, 8, 8), 2, 64).is_err());
        assert!(region_in_bounds(&bf(0, 4, 8, 8), 1, 1024).is_err()); // misaligned
        assert!(region_in_bounds(&bf(0, 4, 8, 16), 0, 112).is_ok()); // (3·16 + 8)·2 bytes
        assert!(region_in_bounds(&bf(0, 4, 8, 16), 0, 111).is_err());
        assert!(region_in_bounds(&bf(0, 4, 8, 4), 0, 1 << 20).is_err()); // stride < width
        assert!(region_in_bounds(&bf(0, 0, 8, 8), 64, 64).is_ok()); // empty at the end
    }
}

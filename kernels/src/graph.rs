//! CUDA graphs: the work a closure queues on the GPU's stream, captured once and replayed with
//! one launch.
//!
//! [`Gpu::capture`] runs the closure between `cuStreamBeginCapture` (global mode) and
//! `cuStreamEndCapture`: the driver records every kernel launch (with its parameter values as
//! they were at the call), copy and cuBLASLt matmul instead of running them, and the graph
//! replays them in order on the same stream. What the driver refuses during a global capture
//! (synchronising the stream, allocating or freeing device memory, synchronous or pageable
//! copies) fails the closure's call and invalidates the capture, so a closure that reads back or
//! allocates fails loudly; the emulated driver refuses the same calls (kernels/README.md).
//!
//! Replays reuse the captured addresses: every buffer the closure touched must outlive the
//! graph (or at least every replay) at the same address, which the caller guarantees.
//!
//! Launch counters ([`crate::Kernels::launch_counts`]) count executions: a captured launch does
//! not count, and every replay adds the launches the graph holds.

use crate::error::{driver_err, KernelError, Result};
use crate::gpu::Gpu;
use cudarc::driver::{sys, CudaGraph};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// An instantiated CUDA graph captured on a [`Gpu`]'s stream; dropping it destroys the graph
/// and its executable.
pub struct Graph {
    gpu: Arc<Gpu>,
    graph: CudaGraph,
    /// The launch counter of each kernel the graph launches, and how many times per replay.
    counts: Vec<(Arc<AtomicU64>, u64)>,
    nodes: usize,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Graph({} nodes, {} kernel launches)",
            self.nodes,
            self.kernel_launches()
        )
    }
}

/// Ends a capture left open by a panicking closure, so the stream is usable again.
struct Capturing<'a> {
    gpu: &'a Gpu,
    open: bool,
}

impl Drop for Capturing<'_> {
    fn drop(&mut self) {
        *self.gpu.capture.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if self.open {
            // SAFETY: the stream is capturing (begun by Gpu::capture, not ended); the graph the
            // driver returns, if any, is destroyed at once and never launched.
            unsafe {
                if let Ok(g) =
                    cudarc::driver::result::stream::end_capture(self.gpu.stream().cu_stream())
                {
                    if !g.is_null() {
                        let _ = cudarc::driver::result::graph::destroy(g);
                    }
                }
            }
        }
    }
}

impl Gpu {
    /// Captures the work `f` queues on this GPU's stream as a CUDA graph (global capture mode)
    /// and instantiates it. `f` must queue device work only: a call the driver refuses during a
    /// capture (a host read or write of device memory, an allocation, a synchronisation) makes
    /// `f` fail, and that error is returned (the capture is then ended and discarded).
    pub fn capture<E: From<KernelError>>(
        self: &Arc<Self>,
        f: impl FnOnce() -> std::result::Result<(), E>,
    ) -> std::result::Result<Graph, E> {
        {
            let mut c = self.capture.lock().unwrap_or_else(|e| e.into_inner());
            if c.is_some() {
                return Err(KernelError::Shape {
                    op: "capture",
                    msg: "a CUDA graph is already being captured on this stream".into(),
                }
                .into());
            }
            *c = Some(Vec::new());
        }
        let mut guard = Capturing {
            gpu: self,
            open: false,
        };
        self.stream()
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL)
            .map_err(|e| driver_err("cuStreamBeginCapture", e))?;
        guard.open = true;
        let body = f();
        guard.open = false;
        let ended = self.stream().end_capture(sys::CUgraphInstantiate_flags(0));
        let launches = self
            .capture
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default();
        drop(guard);
        // The closure's own error names the refused call; the end of an invalidated capture
        // only says that it was.
        body?;
        let graph = ended
            .map_err(|e| driver_err("cuStreamEndCapture / cuGraphInstantiate", e))?
            .ok_or_else(|| driver_err("cuStreamEndCapture", "the driver returned no graph"))?;
        let mut nodes = 0usize;
        // SAFETY: a graph owned by `graph` and alive; a null node array asks for the count only.
        unsafe { sys::cuGraphGetNodes(graph.cu_graph(), std::ptr::null_mut(), &mut nodes) }
            .result()
            .map_err(|e| driver_err("cuGraphGetNodes", e))?;
        let mut counts: Vec<(Arc<AtomicU64>, u64)> = Vec::new();
        for c in launches {
            match counts.iter_mut().find(|(k, _)| Arc::ptr_eq(k, &c)) {
                Some((_, n)) => *n += 1,
                None => counts.push((c, 1)),
            }
        }
        Ok(Graph {
            gpu: self.clone(),
            graph,
            counts,
            nodes,
        })
    }
}

impl Graph {
    /// Queues one replay of the graph on the stream (with `KONTEXT_CUDA_SYNC=1`, waits for it)
    /// and adds its kernel launches to the launch counters.
    pub fn launch(&self) -> Result<()> {
        self.graph
            .launch()
            .map_err(|e| driver_err("cuGraphLaunch", e))?;
        for (counter, n) in &self.counts {
            counter.fetch_add(*n, Ordering::Relaxed);
        }
        self.gpu.launched("a CUDA graph")
    }

    /// Nodes of the graph (kernels, copies, memsets, matmuls), as the driver counts them.
    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// Launches of this crate's kernels per replay (cuBLASLt's matmuls not included).
    pub fn kernel_launches(&self) -> u64 {
        self.counts.iter().map(|(_, n)| n).sum()
    }
}

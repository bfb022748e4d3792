//! [`Backend::repeat`](crate::backend::Backend::repeat) on the CUDA backend: the repeated body
//! (the denoising step) captured once as a CUDA graph ([`kontext_kernels::graph::Graph`]) and
//! replayed, so a step costs one launch on the host instead of one per kernel.
//!
//! Why replaying is correct:
//! - Kernel parameters (addresses, sizes, scalars) are copied into the graph when it is
//!   captured, so the body must do the same thing every run on the same memory: tensors made
//!   before the loop (x, the conditioning, a device step counter) are updated in place, and any
//!   per-step difference is read by the kernels from device memory.
//! - Tensors the body makes are taken from the current scope's activation [`Pool`] during the
//!   capture and returned to it when the body drops them. Placement in a pool is deterministic
//!   and nothing else takes from that pool while the loop runs (the loop is the only work of its
//!   request, on this thread), so those offsets stay free between replays and the graph keeps
//!   writing and reading them as the captured run did. `after` must not keep a tensor of the
//!   pool alive across runs for the same reason.
//! - The graph's memory (the pool, the weights, the tensors made before) outlives the graph:
//!   it is dropped at the end of this call, before any of them can be.
//! - Checked: the pool holds as many bytes after the capture as before it. A step that keeps a
//!   tensor it made (`x = op(x)` instead of an in-place op; an f32 `x` that an op replaces by
//!   its bf16 copy) or drops one made before would replay reads of memory no longer its own, so
//!   it is refused instead.
//!
//! The first run is eager (a warm-up: cuBLASLt's first call for a shape and any lazy module
//! load happen outside the capture), and it decides: a body that used a streamed weight (weight
//! streaming copies each one on a second stream with host-side bookkeeping per use, which a
//! replay would skip) stays eager; otherwise runs 2 … `times` replay one capture. In the fp8
//! memory mode the text encoders stream but the transformer is resident, so its step is captured.
//!
//! What the capture refuses (a download, an upload, an allocation — a body outside a pool scope
//! allocates every tensor —, a synchronisation) fails the capture with the driver's error, named
//! as the capture; there is no silent eager fallback. Eager throughout when planning (no device)
//! and with `KONTEXT_CUDA_GRAPH=0`.
//!
//! [`Pool`]: kontext_kernels::arena::Pool

use super::CudaBackend;
use crate::error::{shape_err, Result};
use std::sync::atomic::Ordering;

/// The stage named on a failed capture.
const CAPTURE: &str = "capturing the repeated step as a CUDA graph (the step must be device \
                       work only: no download, upload, allocation or synchronisation; \
                       KONTEXT_CUDA_GRAPH=0 runs it eagerly)";

impl CudaBackend {
    /// `body` `times` times with `after(i)` after run `i`: captured once and replayed, or eager
    /// (see the module docs for when).
    pub(crate) fn repeat_graph(
        &self,
        times: usize,
        body: &mut dyn FnMut() -> Result<()>,
        after: &mut dyn FnMut(usize) -> Result<()>,
    ) -> Result<()> {
        let dev = match &self.shared.dev {
            Some(d) if !self.planning() => Some(d),
            _ => None,
        };
        let eager = |from: usize,
                     body: &mut dyn FnMut() -> Result<()>,
                     after: &mut dyn FnMut(usize) -> Result<()>| {
            for i in from..times {
                body()?;
                after(i)?;
            }
            Ok(())
        };
        let graphs = std::env::var("KONTEXT_CUDA_GRAPH").as_deref() != Ok("0");
        let Some(d) = dev.filter(|_| graphs && times > 0) else {
            return eager(0, body, after);
        };
        let streamed = || d.streamer.get().map_or(0, |s| s.uses());
        let before = streamed();
        body()?;
        after(0)?;
        if streamed() != before {
            return eager(1, body, after);
        }
        if times == 1 {
            return Ok(());
        }
        let pool = self.scope().map(|s| s.pool);
        let held = pool.as_ref().map(|p| p.in_use());
        let graph = d.gpu.capture(&mut *body).map_err(|e| e.in_stage(CAPTURE))?;
        let now = pool.as_ref().map(|p| p.in_use());
        if held != now {
            return Err(shape_err(
                "repeat",
                format!(
                    "the captured step changed the activations it holds ({} bytes of the pool \
                     in use before it, {} after): it keeps a tensor it made or drops one made \
                     before (`x = op(x)`, or an f32 x replaced by its bf16 copy), and a CUDA \
                     graph replays the addresses of the capture; update tensors made before the \
                     loop in place",
                    held.unwrap_or(0),
                    now.unwrap_or(0)
                ),
            ));
        }
        self.shared.graph_captures.fetch_add(1, Ordering::Relaxed);
        for i in 1..times {
            graph.launch()?;
            self.shared.graph_replays.fetch_add(1, Ordering::Relaxed);
            d.gpu.synchronize()?;
            after(i)?;
        }
        Ok(())
    }

    /// Steps captured as CUDA graphs so far, and replays of them: what proves that the
    /// denoising loop ran as a graph.
    pub fn graph_stats(&self) -> (u64, u64) {
        (
            self.shared.graph_captures.load(Ordering::Relaxed),
            self.shared.graph_replays.load(Ordering::Relaxed),
        )
    }

    /// Whether [`Backend::repeat`](crate::backend::Backend::repeat) may capture a graph (a
    /// device, graphs not switched off; a body that uses a streamed weight still runs eagerly).
    pub fn graphs_enabled(&self) -> bool {
        self.shared.dev.is_some() && std::env::var("KONTEXT_CUDA_GRAPH").as_deref() != Ok("0")
    }
}

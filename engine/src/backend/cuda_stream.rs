//! Block streaming: linear weights kept in page-locked host memory and copied onto the device
//! just before their GEMM, for cards that cannot hold the whole model (memory mode 3, and the
//! text encoders in modes 2 and 3).
//!
//! Two device slots, each as large as the largest streamed weight, alternate: while the GEMM of
//! weight *i* reads one slot, weight *i + 1* is copied into the other on a copy stream. Which
//! weight follows which is learned from the order they are used in (the order of a forward is
//! the same every step), so the model code needs no hook: the first forward copies each weight
//! when it is asked for (a *miss*, the main stream waiting for the copy), every later one finds
//! it copied one weight ahead. Orderings: a copy into a slot waits for every kernel queued
//! before it (the slot's previous weight may still be read), and a GEMM waits for the copy of
//! its weight. The state is behind one lock held across the launch, so concurrent requests on
//! one backend are correct (they take turns, and their interleaving shows up as misses).

use crate::error::{shape_err, Result};
use kontext_kernels::gpu::{CopyFence, CopyQueue, DeviceAlloc, PinnedHost};
use kontext_kernels::weights::DeviceWeight;
use kontext_kernels::{DType, DeviceMat, Gpu};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A linear layer's weight that lives in host memory: its bytes as the device holds them
/// (bf16, or fp8 with per-part scales).
pub(crate) struct StreamedWeight {
    pub(crate) id: usize,
    pub(crate) host: PinnedHost,
    pub(crate) dtype: DType,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) scales: Vec<(Range<usize>, f32)>,
}

/// Copies made so far, for checks and the run summary.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StreamStats {
    /// Weights copied one ahead of use (the copy overlapped earlier work).
    pub prefetched: u64,
    /// Weights copied when asked for (the main stream waited).
    pub misses: u64,
    /// Bytes copied from host memory.
    pub bytes: u64,
}

struct State {
    /// The weight in a slot that the main stream may be reading: (id, slot).
    current: Option<(usize, usize)>,
    /// The weight being copied into the other slot.
    pending: Option<(usize, usize, CopyFence)>,
    /// The weight used after each weight last time.
    successor: HashMap<usize, usize>,
    /// The last weight a plan pass used.
    planned_last: Option<usize>,
    stats: StreamStats,
}

/// The slots, the copy stream and what is streamed.
pub(crate) struct Streamer {
    gpu: Arc<Gpu>,
    queue: CopyQueue,
    slots: Mutex<Option<[Arc<DeviceAlloc>; 2]>>,
    items: Mutex<Vec<Arc<StreamedWeight>>>,
    state: Mutex<State>,
    /// Calls of [`Streamer::with`] so far: whether some work used a streamed weight.
    uses: AtomicU64,
}

impl Streamer {
    pub(crate) fn new(gpu: &Arc<Gpu>) -> Result<Streamer> {
        Ok(Streamer {
            gpu: gpu.clone(),
            queue: gpu.copy_queue()?,
            slots: Mutex::new(None),
            items: Mutex::new(Vec::new()),
            state: Mutex::new(State {
                current: None,
                pending: None,
                successor: HashMap::new(),
                planned_last: None,
                stats: StreamStats::default(),
            }),
            uses: AtomicU64::new(0),
        })
    }

    /// Registers a weight whose bytes are in `host`.
    pub(crate) fn add(
        &self,
        host: PinnedHost,
        dtype: DType,
        (rows, cols): (usize, usize),
        scales: Vec<(Range<usize>, f32)>,
    ) -> Result<Arc<StreamedWeight>> {
        if host.bytes() != rows * cols * dtype.size() {
            return Err(shape_err(
                "streamed weight",
                format!("{} bytes for [{rows}, {cols}] {dtype}", host.bytes()),
            ));
        }
        // Locks in the order `with` takes them: slots, then items.
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if slots.is_some() {
            return Err(shape_err(
                "streamed weight",
                "internal: a weight was added after the streaming slots were allocated",
            ));
        }
        let mut items = self.items.lock().unwrap_or_else(|e| e.into_inner());
        let w = Arc::new(StreamedWeight {
            id: items.len(),
            host,
            dtype,
            rows,
            cols,
            scales,
        });
        items.push(w.clone());
        Ok(w)
    }

    /// Bytes of one slot: the largest streamed weight.
    pub(crate) fn slot_bytes(&self) -> usize {
        let items = self.items.lock().unwrap_or_else(|e| e.into_inner());
        items.iter().map(|w| w.host.bytes()).max().unwrap_or(0)
    }

    /// Allocates the two slots (once, after loading: the denoising loop allocates nothing).
    pub(crate) fn prepare(&self) -> Result<()> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if slots.is_none() {
            let bytes = self.slot_bytes();
            if bytes > 0 {
                *slots = Some([self.gpu.alloc(bytes)?, self.gpu.alloc(bytes)?]);
            }
        }
        Ok(())
    }

    /// Streamed weights used so far (each [`Streamer::with`]).
    pub(crate) fn uses(&self) -> u64 {
        self.uses.load(Ordering::Relaxed)
    }

    pub(crate) fn stats(&self) -> StreamStats {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).stats
    }

    /// A plan pass uses `w` (no copy): its order teaches the successors before the real pass,
    /// so even a stage that runs once (the text encoders) finds its weights copied ahead.
    pub(crate) fn observe(&self, w: &StreamedWeight) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(prev) = st.planned_last.filter(|&p| p != w.id) {
            st.successor.insert(prev, w.id);
        }
        st.planned_last = Some(w.id);
    }

    /// Runs `f` with `w` on the device (in a slot), queuing the copy of the weight that came
    /// after it last time into the other slot first.
    pub(crate) fn with<T>(
        &self,
        w: &StreamedWeight,
        f: impl FnOnce(&DeviceWeight) -> Result<T>,
    ) -> Result<T> {
        self.uses.fetch_add(1, Ordering::Relaxed);
        self.prepare()?;
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slots = slots
            .as_ref()
            .ok_or_else(|| shape_err("streamed weight", "internal: no streaming slots"))?;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let slot = match st.current {
            Some((id, slot)) if id == w.id => slot,
            current => {
                if let Some((prev, _)) = current {
                    st.successor.insert(prev, w.id);
                }
                st.planned_last = None;
                let slot = match st.pending.take() {
                    Some((id, slot, fence)) if id == w.id => {
                        self.gpu.wait_for(&fence)?;
                        slot
                    }
                    _ => {
                        // The copy stream is in order: this copy lands after any copy still in
                        // flight into the same slot.
                        let slot = current.map_or(0, |(_, s)| 1 - s);
                        self.queue.after_compute()?;
                        self.queue.upload(&w.host, &slots[slot], 0)?;
                        self.gpu.wait_for(&self.queue.fence()?)?;
                        st.stats.misses += 1;
                        st.stats.bytes += w.host.bytes() as u64;
                        slot
                    }
                };
                st.current = Some((w.id, slot));
                if let Some(&next) = st.successor.get(&w.id).filter(|&&n| n != w.id) {
                    let item = self
                        .items
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(next)
                        .cloned();
                    if let Some(item) = item {
                        // Everything queued so far, the last reads of the other slot included,
                        // comes before the copy that overwrites it.
                        self.queue.after_compute()?;
                        self.queue.upload(&item.host, &slots[1 - slot], 0)?;
                        st.pending = Some((next, 1 - slot, self.queue.fence()?));
                        st.stats.prefetched += 1;
                        st.stats.bytes += item.host.bytes() as u64;
                    }
                }
                slot
            }
        };
        let data = DeviceMat::new(slots[slot].clone(), 0, w.rows, w.cols, w.cols, w.dtype)?;
        let dw = DeviceWeight {
            data,
            scales: w.scales.clone(),
        };
        f(&dw)
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        // Copies may still be writing into the slots.
        let _ = self.queue.synchronize();
    }
}

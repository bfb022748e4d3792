//! Activations from one allocation, planned for the request's sizes. Two disciplines:
//!
//! - [`Arena`] (with [`ArenaPlan`]): regions handed out stack-wise. [`Arena::mark`] before a
//!   block's temporaries, [`Arena::release`] after, so the peak is the deepest block rather than
//!   the sum. Releasing does not free memory; it lets later regions reuse it, so a view kept past
//!   its release reads whatever is written there next (the launchers' overlap checks catch a
//!   released region passed alongside its successor).
//! - [`Pool`]: regions returned when the last [`DeviceMat`] view of them drops (first fit over a
//!   free list with coalescing) — what a backend whose ops return fresh tensors (the engine's
//!   `Backend` trait) needs. Placement is deterministic: the same sequence of allocations and
//!   drops lands on the same offsets. So a planning pass with [`Pool::plan`] (no memory, same
//!   calls) measures the peak, [`Pool::new`] allocates exactly that once per request (one counted
//!   device allocation), and the real pass fits by construction; the denoising loop then never
//!   allocates.

use crate::desc::DType;
use crate::error::{KernelError, Result};
use crate::gpu::{DeviceAlloc, DeviceMat, Gpu, ALIGN};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A position in the arena's stack, to release back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ArenaMark(usize);

/// The bookkeeping shared by the plan and the arena: a bump pointer with a high-water mark.
#[derive(Debug, Clone, Default)]
pub struct Bump {
    top: usize,
    peak: usize,
    capacity: Option<usize>,
}

impl Bump {
    /// Reserves `bytes` at the next [`ALIGN`]ed offset; returns the offset.
    pub fn take(&mut self, bytes: usize, what: &str) -> Result<usize> {
        let start = self.top.next_multiple_of(ALIGN);
        let end = start + bytes;
        if let Some(cap) = self.capacity {
            if end > cap {
                return Err(KernelError::Arena {
                    what: what.to_string(),
                    capacity: cap,
                    used: self.top,
                    requested: bytes,
                });
            }
        }
        self.top = end;
        self.peak = self.peak.max(end);
        Ok(start)
    }

    pub fn mark(&self) -> ArenaMark {
        ArenaMark(self.top)
    }

    /// Returns to `mark`; regions taken after it may be handed out again.
    pub fn release(&mut self, mark: ArenaMark) {
        self.top = self.top.min(mark.0);
    }

    /// Bytes in use now.
    pub fn used(&self) -> usize {
        self.top
    }

    /// The most bytes ever in use.
    pub fn peak(&self) -> usize {
        self.peak
    }
}

/// A dry run of the arena: records sizes, holds no memory.
#[derive(Debug, Clone, Default)]
pub struct ArenaPlan {
    bump: Bump,
}

impl ArenaPlan {
    pub fn new() -> ArenaPlan {
        ArenaPlan::default()
    }

    /// Records a `[rows, cols]` matrix of `dtype`.
    pub fn mat(&mut self, dtype: DType, rows: usize, cols: usize) {
        // A plan has no capacity, so `take` cannot fail.
        let _ = self.bump.take(rows * cols * dtype.size(), "plan");
    }

    pub fn mark(&self) -> ArenaMark {
        self.bump.mark()
    }

    pub fn release(&mut self, mark: ArenaMark) {
        self.bump.release(mark)
    }

    /// Bytes an [`Arena`] needs for everything recorded.
    pub fn bytes(&self) -> usize {
        self.bump.peak()
    }
}

/// Activation memory: one device allocation, regions handed out stack-wise.
#[derive(Debug)]
pub struct Arena {
    mem: Arc<DeviceAlloc>,
    bump: Bump,
}

impl Arena {
    /// One allocation of `bytes` (the peak of an [`ArenaPlan`]).
    pub fn new(gpu: &Arc<Gpu>, bytes: usize) -> Result<Arena> {
        Ok(Arena {
            mem: gpu.alloc(bytes)?,
            bump: Bump {
                capacity: Some(bytes),
                ..Bump::default()
            },
        })
    }

    /// A contiguous `[rows, cols]` matrix of `dtype` from the arena (no device allocation).
    /// `what` names it in the error when the arena is too small.
    pub fn mat(&mut self, dtype: DType, rows: usize, cols: usize, what: &str) -> Result<DeviceMat> {
        let offset = self.bump.take(rows * cols * dtype.size(), what)?;
        DeviceMat::new(self.mem.clone(), offset, rows, cols, cols, dtype)
    }

    pub fn mark(&self) -> ArenaMark {
        self.bump.mark()
    }

    pub fn release(&mut self, mark: ArenaMark) {
        self.bump.release(mark)
    }

    /// Releases everything (the next step or request starts from the bottom).
    pub fn reset(&mut self) {
        self.bump.release(ArenaMark(0))
    }

    pub fn capacity(&self) -> usize {
        self.mem.bytes()
    }

    pub fn used(&self) -> usize {
        self.bump.used()
    }

    pub fn peak(&self) -> usize {
        self.bump.peak()
    }
}

/// The free list of a [`Pool`]: offsets in bytes, every block a multiple of [`ALIGN`].
#[derive(Debug, Default)]
struct FreeList {
    /// Free blocks below `top`, offset → length, never adjacent (coalesced).
    free: BTreeMap<usize, usize>,
    /// End of the highest block in use.
    top: usize,
    peak: usize,
    /// None while planning (grows without bound).
    capacity: Option<usize>,
    in_use: usize,
}

impl FreeList {
    /// First fit among the free blocks, else above `top`.
    fn take(&mut self, bytes: usize, what: &str) -> Result<(usize, usize)> {
        let len = bytes.max(1).next_multiple_of(ALIGN);
        let fit = self
            .free
            .iter()
            .find(|(_, &l)| l >= len)
            .map(|(&o, &l)| (o, l));
        let offset = if let Some((o, l)) = fit {
            self.free.remove(&o);
            if l > len {
                self.free.insert(o + len, l - len);
            }
            o
        } else {
            let o = self.top;
            if let Some(cap) = self.capacity {
                if o + len > cap {
                    return Err(KernelError::Arena {
                        what: what.to_string(),
                        capacity: cap,
                        used: self.in_use,
                        requested: len,
                    });
                }
            }
            self.top = o + len;
            self.peak = self.peak.max(self.top);
            o
        };
        self.in_use += len;
        Ok((offset, len))
    }

    /// Returns a block, merging it with free neighbours and lowering `top` when it was last.
    fn give(&mut self, mut offset: usize, mut len: usize) {
        self.in_use -= len;
        if let Some((&o, &l)) = self.free.range(..offset).next_back() {
            if o + l == offset {
                self.free.remove(&o);
                offset = o;
                len += l;
            }
        }
        if let Some(&l) = self.free.get(&(offset + len)) {
            self.free.remove(&(offset + len));
            len += l;
        }
        if offset + len == self.top {
            self.top = offset;
        } else {
            self.free.insert(offset, len);
        }
    }
}

/// A block of a [`Pool`], given back when dropped (when its last [`DeviceMat`] view drops).
#[derive(Debug)]
pub struct PoolRegion {
    offset: usize,
    bytes: usize,
    list: Arc<Mutex<FreeList>>,
}

impl PoolRegion {
    /// Byte offset in the pool.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Length in bytes (a multiple of [`ALIGN`]).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for PoolRegion {
    fn drop(&mut self) {
        self.list
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .give(self.offset, self.bytes);
    }
}

/// Activation memory whose regions come back when their tensors drop; see the module docs.
#[derive(Debug, Clone)]
pub struct Pool {
    list: Arc<Mutex<FreeList>>,
    mem: Option<Arc<DeviceAlloc>>,
}

impl Pool {
    /// A planning pool: no memory, unbounded; hands out [`PoolRegion`]s and records the peak.
    pub fn plan() -> Pool {
        Pool {
            list: Arc::new(Mutex::new(FreeList::default())),
            mem: None,
        }
    }

    /// A pool of `bytes` (the peak of a planning pass): one counted device allocation.
    pub fn new(gpu: &Arc<Gpu>, bytes: usize) -> Result<Pool> {
        let bytes = bytes.next_multiple_of(ALIGN);
        Ok(Pool {
            list: Arc::new(Mutex::new(FreeList {
                capacity: Some(bytes),
                ..FreeList::default()
            })),
            mem: Some(gpu.alloc(bytes)?),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FreeList> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A region of `bytes` (planning and real pools alike).
    pub fn region(&self, bytes: usize, what: &str) -> Result<Arc<PoolRegion>> {
        let (offset, bytes) = self.lock().take(bytes, what)?;
        Ok(Arc::new(PoolRegion {
            offset,
            bytes,
            list: self.list.clone(),
        }))
    }

    /// A contiguous `[rows, cols]` matrix of `dtype` in a new region (no device allocation).
    /// Errors on a planning pool, which has no memory.
    pub fn mat(&self, dtype: DType, rows: usize, cols: usize, what: &str) -> Result<DeviceMat> {
        let mem = self.mem.clone().ok_or_else(|| {
            crate::error::shape_err("pool", format!("{what}: a planning pool has no memory"))
        })?;
        let region = self.region(rows * cols * dtype.size(), what)?;
        DeviceMat::in_region(mem, region, rows, cols, dtype)
    }

    /// The most bytes ever spanned (what [`Pool::new`] needs for the same sequence of calls).
    pub fn peak(&self) -> usize {
        self.lock().peak
    }

    /// Bytes in live regions now.
    pub fn in_use(&self) -> usize {
        self.lock().in_use
    }

    /// Capacity of a real pool (None while planning).
    pub fn capacity(&self) -> Option<usize> {
        self.lock().capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A forward-like sequence: a persistent tensor, per-layer temporaries freed out of order.
    fn forward(pool: &Pool) -> Vec<usize> {
        let mut offsets = Vec::new();
        let x = pool.region(1000, "x").unwrap();
        offsets.push(x.offset());
        for layer in 0..3 {
            let a = pool.region(3000 + layer, "a").unwrap();
            let b = pool.region(500, "b").unwrap();
            offsets.extend([a.offset(), b.offset()]);
            drop(a); // a dies before b: leaves a hole that c may take
            let c = pool.region(2000, "c").unwrap();
            offsets.push(c.offset());
            drop(b);
            drop(c);
        }
        drop(x);
        offsets
    }

    #[test]
    fn pool_plan_and_run_place_identically() {
        let plan = Pool::plan();
        let planned = forward(&plan);
        assert_eq!(plan.in_use(), 0);
        // A pool with exactly the planned peak places everything at the same offsets.
        let run = Pool {
            list: Arc::new(Mutex::new(FreeList {
                capacity: Some(plan.peak()),
                ..FreeList::default()
            })),
            mem: None,
        };
        assert_eq!(forward(&run), planned);
        assert_eq!(run.peak(), plan.peak());
        // The hole left by `a` is reused by `c`, so the peak is x + a + b, not x + a + b + c.
        let x = 1024; // 1000 rounded to ALIGN
        assert_eq!(plan.peak(), x + 3072 + 512);
    }

    #[test]
    fn pool_coalesces_and_lowers_top() {
        let p = Pool::plan();
        let a = p.region(256, "a").unwrap();
        let b = p.region(256, "b").unwrap();
        let c = p.region(256, "c").unwrap();
        drop(a);
        drop(b); // merges with a's block
        let d = p.region(512, "d").unwrap();
        assert_eq!(d.offset(), 0);
        drop(c); // the highest block: top comes down
        drop(d);
        assert_eq!(p.in_use(), 0);
        let e = p.region(2048, "e").unwrap();
        assert_eq!(e.offset(), 0);
        assert_eq!(p.peak(), 2048);
    }

    #[test]
    fn pool_with_capacity_reports_what_did_not_fit() {
        let run = Pool {
            list: Arc::new(Mutex::new(FreeList {
                capacity: Some(1024),
                ..FreeList::default()
            })),
            mem: None,
        };
        let _a = run.region(768, "a").unwrap();
        let err = run.region(512, "attention out").unwrap_err().to_string();
        assert!(err.contains("attention out"), "{err}");
        assert!(run.mat(DType::Bf16, 1, 1, "m").is_err()); // no memory
    }

    #[test]
    fn bump_aligns_and_tracks_the_peak() {
        let mut b = Bump::default();
        assert_eq!(b.take(10, "a").unwrap(), 0);
        assert_eq!(b.take(10, "b").unwrap(), ALIGN);
        let m = b.mark();
        assert_eq!(b.take(1000, "c").unwrap(), 2 * ALIGN);
        b.release(m);
        assert_eq!(b.used(), ALIGN + 10);
        assert_eq!(b.peak(), 2 * ALIGN + 1000);
        assert_eq!(b.take(4, "d").unwrap(), 2 * ALIGN); // reuses c's space
    }

    #[test]
    fn bump_with_capacity_reports_what_did_not_fit() {
        let mut b = Bump {
            capacity: Some(1024),
            ..Bump::default()
        };
        b.take(600, "x").unwrap();
        let err = b.take(600, "mlp hidden").unwrap_err().to_string();
        assert!(err.contains("mlp hidden") && err.contains("1024"), "{err}");
    }

    #[test]
    fn plan_peak_is_the_deepest_block() {
        // Two "blocks", each with a temporary, released in between: the peak is one block.
        let mut p = ArenaPlan::new();
        p.mat(DType::Bf16, 4, 64); // residual stream, 512 bytes
        for _ in 0..2 {
            let m = p.mark();
            p.mat(DType::Bf16, 4, 256); // 2048 bytes
            p.mat(DType::F32, 1, 3); // 12 bytes
            p.release(m);
        }
        // [0, 512) residual, [512, 2560) temporary, [2560, 2572) vector (all offsets aligned).
        assert_eq!(p.bytes(), 2572);
    }
}

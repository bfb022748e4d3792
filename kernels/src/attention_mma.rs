//! Launchers of `cuda/attention_mma.cu`: the Flux attention on tensor cores (mma.sync, sm_80+)
//! with QKNorm and RoPE fused into it, reading q, k, v in place from a fused qkv buffer (the
//! contract of the engine's `Backend::attention_qk_norm_rope`).
//!
//! Head dims 64 and 128 only: anything else (and a GPU older than sm_80) is
//! [`KernelError::Unsupported`], for the caller to take the plain kernels
//! ([`Kernels::qk_norm_rope`] + [`Kernels::attention`]) instead.

use crate::desc::{
    blocks, expect_disjoint, expect_dtype, expect_shape, expect_valid, expect_vector, to_i32,
    DType, LaunchDims, MatDesc, MAX_GRID_X, MAX_GRID_Y,
};
use crate::error::{driver_err, shape_err, KernelError, Result};
use crate::gpu::DeviceMat;
use crate::launch::{Arg, Kernel, Loaded};
use crate::{function, Family, Kernels};
use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::CudaModule;
use std::sync::Arc;

const ATTENTION_ARGS: &[Arg] = &[
    Arg::Ptr,
    Arg::I64,
    Arg::I32,
    Arg::I32,
    Arg::Ptr,
    Arg::Ptr,
    Arg::I32,
    Arg::Ptr,
    Arg::I64,
    Arg::F32,
    Arg::F32,
    Arg::Ptr,
    Arg::I64,
];

pub const FAMILY: Family = Family {
    name: "attention_mma",
    source: include_str!("../cuda/attention_mma.cu"),
    kernels: &[
        Kernel {
            name: "attention_mma_k_norm_rope",
            args: &[
                Arg::Ptr,
                Arg::I64,
                Arg::I32,
                Arg::I32,
                Arg::I32,
                Arg::Ptr,
                Arg::Ptr,
                Arg::I32,
                Arg::Ptr,
                Arg::I64,
                Arg::F32,
            ],
        },
        Kernel {
            name: "attention_mma_d64",
            args: ATTENTION_ARGS,
        },
        Kernel {
            name: "attention_mma_d128",
            args: ATTENTION_ARGS,
        },
    ],
};

/// The head dims the kernels are built for (`attention_mma_d64`, `attention_mma_d128`).
pub const HEAD_DIMS: [usize; 2] = [64, 128];
/// Queries per block (`AMMA_BQ`: 16 per warp) and threads per block (`AMMA_WARPS · 32`).
pub const QUERIES_PER_BLOCK: usize = 64;
pub const THREADS: u32 = 128;
/// Keys per shared-memory tile (`AMMA_BK`) and the tiles' row padding (`AMMA_PAD`, elements).
pub const KEYS_PER_TILE: usize = 64;
pub const ROW_PAD: usize = 8;
/// Threads per block of the k prologue (`AMMA_KNR_THREADS`).
pub const K_THREADS: u32 = 256;
/// Oldest compute capability with cp.async and bf16 mma.sync.
pub const MIN_CC: (i32, i32) = (8, 0);

/// Dynamic shared memory of the attention kernel for head dim `dh`: the q̂ tile and two stages
/// of k and v tiles, rows of `dh + 8` bf16.
pub const fn smem_bytes(dh: usize) -> u32 {
    ((QUERIES_PER_BLOCK + 4 * KEYS_PER_TILE) * (dh + ROW_PAD) * 2) as u32
}

pub(crate) struct Functions {
    pub(crate) k_norm_rope: Loaded,
    d64: Loaded,
    d128: Loaded,
}

impl Functions {
    pub(crate) fn resolve(m: &Arc<CudaModule>) -> Result<Functions> {
        let f = Functions {
            k_norm_rope: function(m, &FAMILY, "attention_mma_k_norm_rope")?,
            d64: function(m, &FAMILY, "attention_mma_d64")?,
            d128: function(m, &FAMILY, "attention_mma_d128")?,
        };
        // Past 48 KiB a kernel must opt in to its dynamic shared memory, once per function.
        for (k, dh) in [(&f.d64, 64), (&f.d128, 128)] {
            k.func
                .set_attribute(
                    CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem_bytes(dh) as i32,
                )
                .map_err(|e| {
                    driver_err(
                        format!(
                            "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES = {}) {}",
                            smem_bytes(dh),
                            k.sig.name
                        ),
                        e,
                    )
                })?;
        }
        Ok(f)
    }

    /// Every kernel of the family ([`Kernels::launch_counts`]).
    pub(crate) fn loaded(&self) -> Vec<&Loaded> {
        vec![&self.k_norm_rope, &self.d64, &self.d128]
    }
}

/// QKNorm scales of one stream: f32 `[1, Dh]` for q and for k.
#[derive(Debug, Clone, Copy)]
pub struct QkScales<'a> {
    pub q: &'a MatDesc,
    pub k: &'a MatDesc,
}

/// The prologue of one fused attention call: heads, QKNorm scales per stream, RoPE table.
#[derive(Debug, Clone, Copy)]
pub struct Prologue<'a> {
    pub heads: usize,
    pub head_dim: usize,
    /// Rows `[0, split)` take `scales[0]`, rows `[split, L)` `scales[1]` (a double block's
    /// `[txt ‖ img]`: split = Lt; a single block: split = L).
    pub scales: [QkScales<'a>; 2],
    pub split: usize,
    /// f32 `[Lpe, Dh]`, `(cos, sin)` at columns `(2j, 2j + 1)`; row `pe_row0 + r` rotates row r.
    pub pe: &'a MatDesc,
    pub pe_row0: usize,
    /// RMSNorm epsilon (1e-6 for Flux).
    pub eps: f32,
}

/// A validated launch pair: the k prologue, then the attention kernel for `head_dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionMma {
    pub k_dims: LaunchDims,
    pub dims: LaunchDims,
    pub smem: u32,
    pub len: i32,
    pub heads: i32,
    pub head_dim: i32,
    pub split: i32,
    /// Byte offset of row `pe_row0` in the pe table.
    pub pe_offset: u64,
}

/// Whether the kernels take head dim `head_dim` on a GPU of compute capability `cc`: an
/// [`KernelError::Unsupported`] naming why not, for the caller to fall back.
pub fn supports(head_dim: usize, cc: (i32, i32)) -> Result<()> {
    const OP: &str = "attention_mma";
    if cc < MIN_CC {
        return Err(KernelError::Unsupported {
            op: OP,
            msg: format!(
                "sm_{}{}: the kernel needs sm_80 or newer (cp.async, bf16 mma.sync)",
                cc.0, cc.1
            ),
        });
    }
    if !HEAD_DIMS.contains(&head_dim) {
        return Err(KernelError::Unsupported {
            op: OP,
            msg: format!("head dim {head_dim}: the kernel is built for {HEAD_DIMS:?}"),
        });
    }
    Ok(())
}

fn expect_aligned16(op: &'static str, what: &str, m: &MatDesc) -> Result<()> {
    if m.addr % 16 != 0 || (m.rows > 1 && m.ld % 8 != 0) {
        return Err(shape_err(
            op,
            format!(
                "{what} {} at {:#x}: cp.async and the paired stores need a 16-byte aligned \
                 start and a row stride that is a multiple of 8 elements",
                m.show(),
                m.addr
            ),
        ));
    }
    Ok(())
}

/// Checks qkv bf16 `[L, W ≥ 3·H·Dh]` and out bf16 `[L, H·Dh]` (both 16-byte aligned, row
/// strides multiples of 8), out disjoint from everything read, the scales f32 `[1, Dh]`, pe f32
/// `[Lpe ≥ pe_row0 + L, Dh]`, split ≤ L, eps > 0; Dh ∈ [`HEAD_DIMS`] and cc ≥ 8.0 (else
/// [`KernelError::Unsupported`]).
pub fn check(qkv: &MatDesc, p: &Prologue, out: &MatDesc, cc: (i32, i32)) -> Result<AttentionMma> {
    const OP: &str = "attention_mma";
    let (heads, hd) = (p.heads, p.head_dim);
    supports(hd, cc)?;
    expect_valid(OP, "qkv", qkv)?;
    expect_valid(OP, "out", out)?;
    expect_dtype(OP, "qkv", qkv, DType::Bf16)?;
    expect_dtype(OP, "out", out, DType::Bf16)?;
    if heads == 0 {
        return Err(shape_err(OP, "no heads"));
    }
    let d = heads * hd;
    if qkv.cols < 3 * d {
        return Err(shape_err(
            OP,
            format!(
                "qkv {} cannot hold q, k, v of {heads} heads × {hd} (needs {} columns)",
                qkv.show(),
                3 * d
            ),
        ));
    }
    let l = qkv.rows;
    expect_shape(OP, "out", out, l, d)?;
    expect_aligned16(OP, "qkv", qkv)?;
    expect_aligned16(OP, "out", out)?;
    expect_disjoint(OP, out, "qkv", qkv)?;
    for (i, s) in p.scales.iter().enumerate() {
        for (what, v) in [("q_scale", s.q), ("k_scale", s.k)] {
            let what = format!("{what} of stream {i}");
            expect_valid(OP, &what, v)?;
            expect_dtype(OP, &what, v, DType::F32)?;
            expect_vector(OP, &what, v, hd)?;
            expect_disjoint(OP, out, &what, v)?;
            expect_disjoint(OP, qkv, &what, v)?; // the k prologue writes qkv
        }
    }
    expect_valid(OP, "pe", p.pe)?;
    expect_dtype(OP, "pe", p.pe, DType::F32)?;
    if p.pe.cols != hd || p.pe_row0 + l > p.pe.rows {
        return Err(shape_err(
            OP,
            format!(
                "pe {} has no rows [{}, {}) of width {hd}",
                p.pe.show(),
                p.pe_row0,
                p.pe_row0 + l
            ),
        ));
    }
    expect_disjoint(OP, out, "pe", p.pe)?;
    expect_disjoint(OP, qkv, "pe", p.pe)?;
    if p.split > l {
        return Err(shape_err(
            OP,
            format!("split = {} is past the {l} rows", p.split),
        ));
    }
    if !(p.eps.is_finite() && p.eps > 0.0) {
        return Err(shape_err(OP, format!("eps = {} must be positive", p.eps)));
    }
    if heads > MAX_GRID_Y as usize {
        return Err(shape_err(OP, format!("{heads} heads exceed grid.y")));
    }
    Ok(AttentionMma {
        k_dims: LaunchDims::new((blocks(l, 1, MAX_GRID_X), 1, 1), K_THREADS),
        dims: LaunchDims::new(
            (blocks(l, QUERIES_PER_BLOCK, u32::MAX >> 1), heads as u32, 1),
            THREADS,
        ),
        smem: smem_bytes(hd),
        len: to_i32(OP, "L", l)?,
        heads: to_i32(OP, "heads", heads)?,
        head_dim: to_i32(OP, "head dim", hd)?,
        split: to_i32(OP, "split", p.split)?,
        pe_offset: (p.pe_row0 * p.pe.ld * 4) as u64,
    })
}

impl Kernels {
    /// The k pass both fused attentions start with: QKNorm + RoPE of qkv's k columns, in place.
    /// `plan` comes from [`check`] on these operands.
    pub(crate) fn k_norm_rope_pass(
        &self,
        dq: &MatDesc,
        p: &Prologue,
        plan: &AttentionMma,
    ) -> Result<()> {
        let (ld, ld_pe) = (dq.ld as i64, p.pe.ld as i64);
        let pe_ptr = p.pe.addr + plan.pe_offset;
        let [s0, s1] = p.scales;
        let mut l = self.launch(&self.amma.k_norm_rope);
        l.ptr(&dq.addr)
            .i64(&ld)
            .i32(&plan.len)
            .i32(&plan.heads)
            .i32(&plan.head_dim)
            .ptr(&s0.k.addr)
            .ptr(&s1.k.addr)
            .i32(&plan.split)
            .ptr(&pe_ptr)
            .i64(&ld_pe)
            .f32(&p.eps);
        // SAFETY: `check` verified that qkv holds q, k, v of H heads × Dh bf16 on each row, the
        // k scales are f32 [1, Dh] and pe_ptr points at row pe_row0 of an f32 table with rows
        // [pe_row0, pe_row0 + L) of Dh columns, none of them overlapping qkv; the arguments
        // match the kernel's parameters in order and type.
        unsafe { l.run(plan.k_dims) }
    }

    /// `out [L, H·Dh] = softmax(q̂·k̂ᵀ / sqrt(Dh)) · v` per head, with q̂, k̂ = RoPE(RMSNorm(q, k)
    /// × scale) (spec 1.5 – 1.7), q, k, v read from columns `[0, D)`, `[D, 2D)`, `[2D, 3D)` of
    /// `qkv [L, W]` bf16 (D = H·Dh). The k columns of qkv are normalised and rotated in place
    /// (the first of the two launches); q and v are not written. See [`check`] for the operands;
    /// an unsupported head dim or GPU is [`KernelError::Unsupported`], before anything runs.
    pub fn attention_mma(&self, qkv: &DeviceMat, p: &Prologue, out: &DeviceMat) -> Result<()> {
        let (dq, dout) = (qkv.desc(), out.desc());
        let plan = check(&dq, p, &dout, self.gpu.info.compute_capability)?;
        if dq.rows == 0 {
            return Ok(());
        }
        let (ld, ld_out, ld_pe) = (dq.ld as i64, dout.ld as i64, p.pe.ld as i64);
        let pe_ptr = p.pe.addr + plan.pe_offset;
        let [s0, s1] = p.scales;
        let (eps, scale) = (p.eps, 1.0 / (p.head_dim as f32).sqrt());
        self.k_norm_rope_pass(&dq, p, &plan)?;
        let f = if p.head_dim == 64 {
            &self.amma.d64
        } else {
            &self.amma.d128
        };
        let mut l = self.launch(f);
        l.ptr(&dq.addr)
            .i64(&ld)
            .i32(&plan.len)
            .i32(&plan.heads)
            .ptr(&s0.q.addr)
            .ptr(&s1.q.addr)
            .i32(&plan.split)
            .ptr(&pe_ptr)
            .i64(&ld_pe)
            .f32(&eps)
            .f32(&scale)
            .ptr(&dout.addr)
            .i64(&ld_out);
        // SAFETY: `check` verified qkv, the q scales and pe as for the k pass, and out is bf16 [L, H·Dh] disjoint from every operand; qkv and out
        // start 16-byte aligned with row strides that are multiples of 8 elements (cp.async,
        // bf16x2 stores); the dynamic shared memory is the kernel's smem_bytes(Dh), opted in at
        // resolve time; Dh selects the kernel built for it.
        unsafe { l.run_with_smem(plan.dims, plan.smem) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desc::tests::{bf, f32v};

    fn pe(addr: u64, rows: usize, hd: usize) -> MatDesc {
        MatDesc {
            addr,
            rows,
            cols: hd,
            ld: hd,
            dtype: DType::F32,
        }
    }

    const CC: (i32, i32) = (9, 0);

    fn prologue<'a>(s: &'a [MatDesc; 4], pe: &'a MatDesc, hd: usize, split: usize) -> Prologue<'a> {
        Prologue {
            heads: 24,
            head_dim: hd,
            scales: [
                QkScales { q: &s[0], k: &s[1] },
                QkScales { q: &s[2], k: &s[3] },
            ],
            split,
            pe,
            pe_row0: 0,
            eps: 1e-6,
        }
    }

    fn scales(hd: usize) -> [MatDesc; 4] {
        [
            f32v(0x1000, hd),
            f32v(0x2000, hd),
            f32v(0x3000, hd),
            f32v(0x4000, hd),
        ]
    }

    #[test]
    fn single_block_reads_linear1_and_writes_the_linear2_operand() {
        // linear1 output [8704, 21504]; the output is the first 3072 columns of [8704, 15360].
        let qkv = bf(0x1000_0000, 8704, 21504, 21504);
        let out = bf(0x9000_0000, 8704, 3072, 15360);
        let (s, t) = (scales(128), pe(0x10000, 8704, 128));
        let p = check(&qkv, &prologue(&s, &t, 128, 8704), &out, CC).unwrap();
        assert_eq!(p.dims.grid, (136, 24, 1));
        assert_eq!(p.dims.block, (THREADS, 1, 1));
        assert_eq!(p.smem, 87_040);
        assert_eq!(smem_bytes(64), 46_080);
        assert_eq!((p.len, p.heads, p.head_dim, p.split), (8704, 24, 128, 8704));
    }

    #[test]
    fn other_head_dims_and_old_gpus_are_unsupported_not_errors() {
        let qkv = bf(0x100000, 10, 3 * 24 * 96, 3 * 24 * 96);
        let out = bf(0x900000, 10, 24 * 96, 24 * 96);
        let (s, t) = (scales(96), pe(0x10000, 10, 96));
        let e = check(&qkv, &prologue(&s, &t, 96, 10), &out, CC).unwrap_err();
        assert!(matches!(e, KernelError::Unsupported { .. }), "{e}");
        let (s, t) = (scales(128), pe(0x10000, 10, 128));
        let qkv = bf(0x100000, 10, 9216, 9216);
        let out = bf(0x900000, 10, 3072, 3072);
        let e = check(&qkv, &prologue(&s, &t, 128, 10), &out, (7, 5)).unwrap_err();
        assert!(matches!(e, KernelError::Unsupported { .. }), "{e}");
        assert!(check(&qkv, &prologue(&s, &t, 128, 10), &out, (8, 0)).is_ok());
    }

    #[test]
    fn bad_operands_are_shape_errors() {
        let (s, t) = (scales(64), pe(0x10000, 40, 64));
        let p = prologue(&s, &t, 64, 40);
        let p = Prologue { heads: 2, ..p };
        let ok_qkv = bf(0x100000, 40, 384, 384);
        let ok_out = bf(0x900000, 40, 128, 128);
        let shape = |qkv: &MatDesc, p: &Prologue, out: &MatDesc| {
            matches!(check(qkv, p, out, CC), Err(KernelError::Shape { .. }))
        };
        assert!(check(&ok_qkv, &p, &ok_out, CC).is_ok());
        assert!(shape(&bf(0x100000, 40, 383, 383), &p, &ok_out)); // too narrow
        assert!(shape(&bf(0x100002, 40, 384, 384), &p, &ok_out)); // misaligned start
        assert!(shape(&bf(0x100000, 40, 384, 388), &p, &ok_out)); // stride not a multiple of 8
        assert!(shape(&ok_qkv, &p, &bf(0x900000, 40, 128, 132))); // out stride
        assert!(shape(&ok_qkv, &p, &bf(0x900000, 39, 128, 128))); // out rows
        assert!(shape(&ok_qkv, &p, &bf(0x100000 + 256, 40, 128, 384))); // out inside qkv's v
        let late = Prologue { split: 41, ..p };
        assert!(shape(&ok_qkv, &late, &ok_out));
        let off = Prologue { pe_row0: 1, ..p };
        assert!(shape(&ok_qkv, &off, &ok_out)); // pe has no row 40
        let eps = Prologue { eps: 0.0, ..p };
        assert!(shape(&ok_qkv, &eps, &ok_out));
        let short = [f32v(0x1000, 64), f32v(0x2000, 32), s[2], s[3]];
        let bad = prologue(&short, &t, 64, 40);
        assert!(shape(&ok_qkv, &Prologue { heads: 2, ..bad }, &ok_out));
        let inside = [f32v(0x100000, 64), s[1], s[2], s[3]]; // a scale inside qkv
        let bad = prologue(&inside, &t, 64, 40);
        assert!(shape(&ok_qkv, &Prologue { heads: 2, ..bad }, &ok_out));
    }
}

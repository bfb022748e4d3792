//! Launchers of `cuda/attention_wgmma.cu`: the Flux attention on Hopper (sm_90a: wgmma, TMA
//! tensor copies, a producer and two consumer warpgroups) with QKNorm and RoPE of q fused in —
//! the contract of [`Kernels::attention_mma`], plus a scratch buffer for vᵀ.
//!
//! Three launches per call: k normalised and rotated in place (the mma.sync family's
//! `attention_mma_k_norm_rope`), vᵀ written by the `transpose` kernel (`elementwise.cu`), then
//! `attention_wgmma_d128`, which reads k̂ and vᵀ tiles through two TMA tensor maps built here
//! on the host and passed by value.
//!
//! Head dim 128 on compute capability 9.0 only (wgmma is sm_90a-specific): anything else is
//! [`KernelError::Unsupported`], for the caller to take the mma.sync kernel or the plain ones.

use crate::attention_mma::{self, Prologue};
use crate::desc::{
    blocks, expect_disjoint, expect_dtype, expect_shape, expect_valid, DType, LaunchDims, MatDesc,
    MAX_GRID_Y,
};
use crate::elementwise::transpose_dims;
use crate::error::{driver_err, shape_err, KernelError, Result};
use crate::gpu::DeviceMat;
use crate::launch::{Arg, Kernel, Loaded, TensorMap};
use crate::{function, Family, Kernels};
use cudarc::driver::sys;
use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::CudaModule;
use std::ffi::c_void;
use std::sync::Arc;

pub const FAMILY: Family = Family {
    name: "attention_wgmma",
    source: include_str!("../cuda/attention_wgmma.cu"),
    kernels: &[Kernel {
        name: "attention_wgmma_d128",
        args: &[
            Arg::TensorMap,
            Arg::TensorMap,
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
        ],
    }],
};

/// The one head dim the kernel is built for (`AWG_DH`).
pub const HEAD_DIM: usize = 128;
/// Threads per block (`AWG_THREADS`: one producer and two consumer warpgroups) and queries per
/// block (`AWG_BQ`: 64 per consumer warpgroup).
pub const THREADS: u32 = 384;
pub const QUERIES_PER_BLOCK: usize = 128;
/// Keys per tile (`AWG_BK`) and stages of the k̂/vᵀ ring (`AWG_STAGES`).
pub const KEYS_PER_TILE: usize = 64;
pub const STAGES: usize = 3;
/// The only compute capability with wgmma (sm_90a code runs on 9.0 alone).
pub const CC: (i32, i32) = (9, 0);

/// Dynamic shared memory: two q̂ tiles of 64 × 128 bf16, `STAGES` × (k̂ tile 64 × 128 + vᵀ tile
/// 128 × 64) bf16, then a full and an empty mbarrier per stage.
pub const SMEM_BYTES: u32 = (2 * 64 * HEAD_DIM * 2
    + STAGES * (KEYS_PER_TILE * HEAD_DIM * 2 + HEAD_DIM * KEYS_PER_TILE * 2)
    + 2 * STAGES * 8) as u32;
// An H100's opt-in limit per block (227 KiB): one block per SM.
const _: () = assert!(SMEM_BYTES <= 227 << 10);

pub(crate) struct Functions {
    d128: Loaded,
}

impl Functions {
    /// The family's functions on a device of compute capability `cc`. The kernel is loaded on
    /// every device (its body is empty off sm_90a, and the launch counters list it), but opts in
    /// to its shared memory only where it runs: 128 KiB is past the 99 KiB that sm_86 / sm_89 /
    /// sm_120 cards allow, where the driver refuses the attribute, which would fail the load.
    pub(crate) fn resolve(m: &Arc<CudaModule>, cc: (i32, i32)) -> Result<Functions> {
        let f = Functions {
            d128: function(m, &FAMILY, "attention_wgmma_d128")?,
        };
        if supports(HEAD_DIM, cc).is_err() {
            return Ok(f);
        }
        // Past 48 KiB a kernel must opt in to its dynamic shared memory, once per function.
        f.d128
            .func
            .set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                SMEM_BYTES as i32,
            )
            .map_err(|e| {
                driver_err(
                    format!(
                        "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES = {SMEM_BYTES}) \
                         attention_wgmma_d128"
                    ),
                    e,
                )
            })?;
        Ok(f)
    }

    /// Every kernel of the family ([`Kernels::launch_counts`]).
    pub(crate) fn loaded(&self) -> Vec<&Loaded> {
        vec![&self.d128]
    }
}

/// Whether the kernel takes head dim `head_dim` on a GPU of compute capability `cc`: an
/// [`KernelError::Unsupported`] naming why not, for the caller to fall back.
pub fn supports(head_dim: usize, cc: (i32, i32)) -> Result<()> {
    const OP: &str = "attention_wgmma";
    if cc != CC {
        return Err(KernelError::Unsupported {
            op: OP,
            msg: format!(
                "sm_{}{}: the kernel is sm_90a code (wgmma exists on compute capability 9.0 only)",
                cc.0, cc.1
            ),
        });
    }
    if head_dim != HEAD_DIM {
        return Err(KernelError::Unsupported {
            op: OP,
            msg: format!("head dim {head_dim}: the kernel is built for {HEAD_DIM}"),
        });
    }
    Ok(())
}

/// The vᵀ scratch a call of `heads` heads over `len` tokens needs: bf16 `[heads·128, len]` with
/// a row stride of `len` rounded up to 8 elements (the tensor map's 16-byte stride).
pub fn vt_shape(len: usize, heads: usize) -> (usize, usize, usize) {
    (heads * HEAD_DIM, len, len.div_ceil(8) * 8)
}

/// A validated launch: the k prologue and the attention kernel's shapes (from
/// [`attention_mma::check`]), the transpose's grid, the attention grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionWgmma {
    pub mma: attention_mma::AttentionMma,
    pub transpose_dims: LaunchDims,
    pub dims: LaunchDims,
}

/// [`attention_mma::check`]'s operands (same rules), head dim 128 on cc 9.0, and `vt` bf16
/// `[H·128, L]` with a 16-byte aligned start and a row stride that is a multiple of 8 elements,
/// disjoint from qkv, out and the read-only operands.
pub fn check(
    qkv: &MatDesc,
    p: &Prologue,
    vt: &MatDesc,
    out: &MatDesc,
    cc: (i32, i32),
) -> Result<AttentionWgmma> {
    const OP: &str = "attention_wgmma";
    supports(p.head_dim, cc)?;
    let mma = attention_mma::check(qkv, p, out, cc)?;
    let (l, d) = (qkv.rows, p.heads * HEAD_DIM);
    expect_valid(OP, "vt", vt)?;
    expect_dtype(OP, "vt", vt, DType::Bf16)?;
    expect_shape(OP, "vt", vt, d, l)?;
    if vt.addr % 16 != 0 || (vt.rows > 1 && vt.ld % 8 != 0) {
        return Err(shape_err(
            OP,
            format!(
                "vt {} at {:#x}: the tensor map needs a 16-byte aligned start and a row stride \
                 that is a multiple of 8 elements",
                vt.show(),
                vt.addr
            ),
        ));
    }
    expect_disjoint(OP, vt, "qkv", qkv)?;
    expect_disjoint(OP, vt, "out", out)?;
    expect_disjoint(OP, vt, "pe", p.pe)?;
    for (i, s) in p.scales.iter().enumerate() {
        expect_disjoint(OP, vt, &format!("q_scale of stream {i}"), s.q)?;
        expect_disjoint(OP, vt, &format!("k_scale of stream {i}"), s.k)?;
    }
    if p.heads > MAX_GRID_Y as usize {
        return Err(shape_err(OP, format!("{} heads exceed grid.y", p.heads)));
    }
    Ok(AttentionWgmma {
        mma,
        transpose_dims: transpose_dims(l, d),
        dims: LaunchDims::new(
            (
                blocks(l, QUERIES_PER_BLOCK, u32::MAX >> 1),
                p.heads as u32,
                1,
            ),
            THREADS,
        ),
    })
}

/// A 2-D bf16 tensor map: `cols` × `rows` elements at `addr`, rows `ld` elements apart, boxes of
/// `box_cols` (128 bytes: the 128B swizzle span) × `box_rows`, out-of-bound elements zero.
fn encode_2d(
    addr: u64,
    (cols, rows, ld): (usize, usize, usize),
    (box_cols, box_rows): (u32, u32),
) -> Result<TensorMap> {
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    let dims = [cols as u64, rows as u64];
    let strides = [(ld * 2) as u64];
    let boxes = [box_cols, box_rows];
    let element_strides = [1u32, 1];
    // SAFETY: rank 2: `dims`, `boxes`, `element_strides` hold 2 entries, `strides` 1; the map is
    // a writable, 64-byte aligned CUtensorMap. The driver only encodes (no device access).
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            2,
            addr as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(driver_err(
            format!(
                "cuTensorMapEncodeTiled ({cols} × {rows}, stride {ld}, box {box_cols} × {box_rows})"
            ),
            r,
        ));
    }
    Ok(TensorMap(map))
}

/// The kernel's two tensor maps: k̂ boxes [64 keys][64 dims] over qkv (all its columns, L rows)
/// and vᵀ boxes [128 dims][64 keys] over vt ([H·128, L]); keys ≥ L read as zeros.
pub fn tensor_maps(qkv: &MatDesc, vt: &MatDesc) -> Result<(TensorMap, TensorMap)> {
    let k = encode_2d(
        qkv.addr,
        (qkv.cols, qkv.rows, qkv.ld),
        (64, KEYS_PER_TILE as u32),
    )?;
    let v = encode_2d(
        vt.addr,
        (vt.cols, vt.rows, vt.ld),
        (KEYS_PER_TILE as u32, HEAD_DIM as u32),
    )?;
    Ok((k, v))
}

impl Kernels {
    /// [`Kernels::attention_mma`] on the Hopper kernel: the same result, the k columns of qkv
    /// normalised and rotated in place the same way; `vt` (bf16 `[H·128, L]`, see [`vt_shape`])
    /// is scratch that receives vᵀ. See [`check`]; an unsupported head dim or GPU is
    /// [`KernelError::Unsupported`], before anything runs.
    pub fn attention_wgmma(
        &self,
        qkv: &DeviceMat,
        p: &Prologue,
        vt: &DeviceMat,
        out: &DeviceMat,
    ) -> Result<()> {
        let (dq, dvt, dout) = (qkv.desc(), vt.desc(), out.desc());
        let plan = check(&dq, p, &dvt, &dout, self.gpu.info.compute_capability)?;
        if dq.rows == 0 {
            return Ok(());
        }
        let (ld, ld_out, ld_pe) = (dq.ld as i64, dout.ld as i64, p.pe.ld as i64);
        let pe_ptr = p.pe.addr + plan.mma.pe_offset;
        let [s0, s1] = p.scales;
        let (eps, scale) = (p.eps, 1.0 / (p.head_dim as f32).sqrt());
        let m = &plan.mma;
        // `check` validated the operands through attention_mma::check: the same k pass.
        self.k_norm_rope_pass(&dq, p, m)?;
        // vᵀ: the v columns [2D, 3D) of qkv, [L, D], transposed into vt [D, L].
        let d = p.heads * HEAD_DIM;
        let v_addr = dq.addr + (2 * d * 2) as u64;
        let (ld_vt, rows, cols) = (dvt.ld as i64, m.len, m.heads * m.head_dim);
        let mut l = self.launch(&self.ew.transpose);
        l.ptr(&v_addr)
            .i64(&ld)
            .ptr(&dvt.addr)
            .i64(&ld_vt)
            .i32(&rows)
            .i32(&cols);
        // SAFETY: v is columns [2D, 3D) of qkv's L rows (stride ld) and vt is bf16 [D, L]
        // (stride ld_vt ≥ L), disjoint from qkv (checked).
        unsafe { l.run(plan.transpose_dims) }?;
        let (kmap, vmap) = tensor_maps(&dq, &dvt)?;
        let mut l = self.launch(&self.awg.d128);
        l.tensor_map(&kmap)
            .tensor_map(&vmap)
            .ptr(&dq.addr)
            .i64(&ld)
            .i32(&m.len)
            .i32(&m.heads)
            .ptr(&s0.q.addr)
            .ptr(&s1.q.addr)
            .i32(&m.split)
            .ptr(&pe_ptr)
            .i64(&ld_pe)
            .f32(&eps)
            .f32(&scale)
            .ptr(&dout.addr)
            .i64(&ld_out);
        // SAFETY: `check` verified qkv, the q scales and pe as for the k pass; out is bf16 [L, H·128] disjoint from every operand; the maps cover
        // exactly qkv [L, W] and vt [D, L] (the copies zero-fill past them); the dynamic shared
        // memory is SMEM_BYTES, opted in at resolve time.
        unsafe { l.run_with_smem(plan.dims, SMEM_BYTES) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention_mma::QkScales;
    use crate::desc::tests::{bf, f32v};

    fn pe(addr: u64, rows: usize) -> MatDesc {
        MatDesc {
            addr,
            rows,
            cols: HEAD_DIM,
            ld: HEAD_DIM,
            dtype: DType::F32,
        }
    }

    fn prologue<'a>(s: &'a [MatDesc; 2], pe: &'a MatDesc, heads: usize, l: usize) -> Prologue<'a> {
        let sc = QkScales { q: &s[0], k: &s[1] };
        Prologue {
            heads,
            head_dim: HEAD_DIM,
            scales: [sc, sc],
            split: l,
            pe,
            pe_row0: 0,
            eps: 1e-6,
        }
    }

    #[test]
    fn single_block_shapes_at_full_size() {
        let qkv = bf(0x1000_0000, 8704, 21504, 21504);
        let out = bf(0x9000_0000, 8704, 3072, 15360);
        let (rows, cols, ld) = vt_shape(8704, 24);
        assert_eq!((rows, cols, ld), (3072, 8704, 8704));
        let vt = bf(0xF000_0000, rows, cols, ld);
        let s = [f32v(0x1000, 128), f32v(0x2000, 128)];
        let t = pe(0x10000, 8704);
        let p = check(&qkv, &prologue(&s, &t, 24, 8704), &vt, &out, CC).unwrap();
        assert_eq!(p.dims.grid, (68, 24, 1));
        assert_eq!(p.dims.block, (THREADS, 1, 1));
        assert_eq!(SMEM_BYTES, 131_120);
        assert_eq!(vt_shape(37, 1), (128, 37, 40));
    }

    #[test]
    fn other_gpus_and_head_dims_are_unsupported() {
        let qkv = bf(0x100000, 10, 3 * 128, 3 * 128);
        let out = bf(0x900000, 10, 128, 128);
        let vt = bf(0xA00000, 128, 10, 16);
        let s = [f32v(0x1000, 128), f32v(0x2000, 128)];
        let t = pe(0x10000, 10);
        let p = prologue(&s, &t, 1, 10);
        for cc in [(8, 0), (8, 9), (10, 0), (12, 0)] {
            let e = check(&qkv, &p, &vt, &out, cc).unwrap_err();
            assert!(matches!(e, KernelError::Unsupported { .. }), "{cc:?}: {e}");
        }
        let p64 = Prologue { head_dim: 64, ..p };
        let e = check(&qkv, &p64, &vt, &out, CC).unwrap_err();
        assert!(matches!(e, KernelError::Unsupported { .. }), "{e}");
        assert!(check(&qkv, &p, &vt, &out, CC).is_ok());
    }

    #[test]
    fn a_bad_vt_is_a_shape_error() {
        let qkv = bf(0x100000, 10, 3 * 128, 3 * 128);
        let out = bf(0x900000, 10, 128, 128);
        let s = [f32v(0x1000, 128), f32v(0x2000, 128)];
        let t = pe(0x10000, 10);
        let p = prologue(&s, &t, 1, 10);
        let shape = |vt: MatDesc| {
            matches!(
                check(&qkv, &p, &vt, &out, CC),
                Err(KernelError::Shape { .. })
            )
        };
        assert!(shape(bf(0xA00000, 128, 9, 16))); // too few keys
        assert!(shape(bf(0xA00000, 64, 10, 16))); // too few rows
        assert!(shape(bf(0xA00000, 128, 10, 12))); // stride not a multiple of 8
        assert!(shape(bf(0xA00002, 128, 10, 16))); // misaligned start
        assert!(shape(bf(0x100000, 128, 10, 16))); // inside qkv
        assert!(shape(bf(0x900000, 128, 10, 16))); // on out
    }
}

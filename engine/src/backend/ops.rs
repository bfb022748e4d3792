//! The op set of the Flux transformer, as one trait that the CPU reference and the CUDA backend
//! implement.
//!
//! Op boundaries follow the fused GPU kernels planned for the CUDA backend (style.md, kernel
//! families): `linear` is a GEMM with the bias in the epilogue, `norm_modulate` is LayerNorm and
//! the adaLN modulation in one pass, `qk_norm_rope` is the attention prologue (QKNorm then RoPE on
//! the q/k columns of a fused qkv buffer), `attention` reads q, k and v straight from that buffer,
//! and `gate_residual` is the residual epilogue. Everything is batch 1: an activation is a
//! row-major matrix `[rows, cols]` (tokens × features).

#![warn(missing_docs)]

use crate::error::{shape_err, Result};
use crate::lora::LoraTerm;
use crate::weights::{HostWeight, StoredWeight};
use std::sync::Arc;

/// Which linear weights loaded next live in host memory and are copied in for each use.
#[derive(Clone, Default)]
pub enum StreamRule {
    /// None: every weight resident.
    #[default]
    None,
    /// Every linear weight.
    All,
    /// The linear weights whose key the predicate accepts.
    Keys(Arc<dyn Fn(&str) -> bool + Send + Sync>),
}

impl std::fmt::Debug for StreamRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StreamRule::None => "None",
            StreamRule::All => "All",
            StreamRule::Keys(_) => "Keys(..)",
        })
    }
}

/// How the weights loaded next are placed; set per component by the memory plan
/// ([`crate::memory`]). Backends that hold everything in host memory ignore it.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// Linear weights stored in bf16, f16 or f32 are quantised to float8 e4m3fn at load, one
    /// scale per stored tensor (`max |w| / 448`); fp8 weights stay as stored either way.
    pub fp8: bool,
    /// Which linear weights stream from host memory (biases and vectors stay on the device).
    pub stream: StreamRule,
}

impl Placement {
    /// Whether the linear weight `key` streams.
    pub fn streams(&self, key: &str) -> bool {
        match &self.stream {
            StreamRule::None => false,
            StreamRule::All => true,
            StreamRule::Keys(f) => f(key),
        }
    }
}

/// Weight bytes a backend loaded so far, by where they live. The CUDA planner counts the same
/// bytes without allocating them, so a plan's weight figures are those of the real load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WeightTally {
    /// Device memory of resident weights, biases, vectors and convolution kernels.
    pub device: u64,
    /// Host memory (page-locked) of streamed weights.
    pub host: u64,
    /// The largest streamed weight (each of the two device slots holds one).
    pub largest_streamed: u64,
    /// Streamed linear weights.
    pub streamed: u64,
}

/// The ops one forward of the Flux transformer needs (spec 1.3 – 1.10).
pub trait Backend {
    /// An activation, row-major `[rows, cols]` f32 (CPU) or a device buffer (CUDA).
    type Tensor;
    /// A `Linear(in → out)`: weight `[out, in]` and optional bias `[out]`; computes `x·Wᵀ + b`.
    type Linear;
    /// A 1-D parameter such as a QKNorm scale `[head_dim]`.
    type Vector;

    /// Short name for messages and benchmark tables (`"cpu"`, `"cuda"`).
    fn name(&self) -> &'static str;

    /// Checks, before any weight is converted, that `params` weights fit in this backend's
    /// memory, so a model too large for the machine is a clear error rather than an abort in
    /// the allocator. The default accepts everything.
    fn check_memory(&self, params: u64) -> Result<()> {
        let _ = params;
        Ok(())
    }

    /// Places the weights loaded from now on. The default ignores it (host memory holds all).
    fn set_placement(&self, p: Placement) {
        let _ = p;
    }

    /// Weight bytes loaded so far (zero for backends that do not count them).
    fn weight_tally(&self) -> WeightTally {
        WeightTally::default()
    }

    /// Host f32 `[rows, cols]` → tensor.
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Tensor>;
    /// Tensor → host f32, row-major `[rows, cols]`.
    fn download(&self, x: &Self::Tensor) -> Result<Vec<f32>>;
    /// `(rows, cols)` of a tensor.
    fn dims(&self, x: &Self::Tensor) -> (usize, usize);

    /// Builds a linear layer from host weights: `weight [out, in]`, `bias [out]`.
    fn load_linear(
        &self,
        key: &str,
        weight: HostWeight,
        bias: Option<HostWeight>,
    ) -> Result<Self::Linear>;
    /// Builds a linear layer from the weight as the checkpoint stores it (`[out, in]`, bytes with
    /// dtype and per-part scales) and a host bias `[out]`. The default decodes it to f32 (the
    /// values `load_linear` would get from the same source) and calls [`Backend::load_linear`];
    /// the CUDA backend keeps fp8 weights fp8 on the GPU.
    fn load_linear_stored(
        &self,
        key: &str,
        weight: StoredWeight<'_>,
        bias: Option<HostWeight>,
    ) -> Result<Self::Linear> {
        let data = weight.to_f32();
        let shape = vec![weight.rows(), weight.cols()];
        self.load_linear(key, HostWeight { shape, data }, bias)
    }
    /// Attaches LoRA `terms` to linear `w` (named `key`), replacing any attached before (none:
    /// the plain layer again): from then on [`Backend::linear`] adds, per term, `scale ·
    /// (x·Aᵀ)·Bᵀ` to output columns `[row0, row0 + rows)`. The base weight is not touched, so
    /// strengths can change between requests without reloading it ([`crate::lora`]). The
    /// default refuses: a backend without it cannot run LoRAs.
    fn set_lora(&self, w: &mut Self::Linear, key: &str, terms: &[LoraTerm]) -> Result<()> {
        let _ = w;
        if terms.is_empty() {
            return Ok(());
        }
        Err(crate::error::EngineError::Config(format!(
            "{key}: the {} backend does not apply LoRAs",
            self.name()
        )))
    }
    /// Builds a 1-D parameter from host data `[n]`.
    fn load_vector(&self, key: &str, v: HostWeight) -> Result<Self::Vector>;

    /// Runs `body`, whose backend work repeats the work of `step` (the denoising loop: one
    /// forward shape, many times), with activation memory planned from `step`. The CPU allocates
    /// per op and just runs `body`. The CUDA backend runs `step` once as a plan (no memory, no
    /// launches) to measure the peak of its activations, allocates one pool of that size, and
    /// runs `body` from it, so `body` makes no device allocation. Results of `step` are
    /// meaningless (downloads give zeros) and are dropped.
    fn planned<T>(
        &self,
        step: &mut dyn FnMut() -> Result<()>,
        body: &mut dyn FnMut() -> Result<T>,
    ) -> Result<T> {
        let _ = step;
        body()
    }

    /// Runs `body` `times` times, then `after(i)` on the host after run `i`. `body` must be device
    /// work only (no host reads or writes, no tensor outliving one run except those made before),
    /// the same every run: the CUDA backend captures it once as a CUDA graph and replays it
    /// (`KONTEXT_CUDA_GRAPH=0` runs it eagerly instead); other backends call it `times` times.
    fn repeat(
        &self,
        times: usize,
        body: &mut dyn FnMut() -> Result<()>,
        after: &mut dyn FnMut(usize) -> Result<()>,
    ) -> Result<()> {
        for i in 0..times {
            body()?;
            after(i)?;
        }
        Ok(())
    }

    /// `x [L, in] · Wᵀ + b → [L, out]` (GEMM, bias in the epilogue), plus the low-rank terms of
    /// any attached LoRA ([`Backend::set_lora`]).
    fn linear(&self, x: &Self::Tensor, w: &Self::Linear) -> Result<Self::Tensor>;
    /// `SiLU(x) = x·σ(x)`, elementwise, same shape.
    fn silu(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// GELU, tanh approximation, elementwise, same shape (spec 1.5).
    fn gelu_tanh(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// `a += b`, both `[rows, cols]`.
    fn add_assign(&self, a: &mut Self::Tensor, b: &Self::Tensor) -> Result<()>;
    /// `(1 + scale)·LN(x) + shift`: x `[L, D]`, shift and scale `[1, D]` broadcast over rows;
    /// LN without affine, eps 1e-6, biased variance (spec 1.4, 1.5).
    fn norm_modulate(
        &self,
        x: &Self::Tensor,
        shift: &Self::Tensor,
        scale: &Self::Tensor,
    ) -> Result<Self::Tensor>;
    /// In place on the q and k parts of a fused buffer `qkv [L, W]` (q = columns `[0, H·Dh)`,
    /// k = `[H·Dh, 2·H·Dh)`, head h at `h·Dh`, W ≥ 2·H·Dh): per head RMSNorm (eps 1e-6) times
    /// `q_scale` / `k_scale` `[Dh]`, then RoPE on adjacent pairs `(2j, 2j+1)` with row
    /// `pe_row0 + r` of `pe [Lpe, Dh]` (`(cos θ_j, sin θ_j)` at columns `(2j, 2j+1)`) (spec 1.5, 1.6).
    fn qk_norm_rope(
        &self,
        qkv: &mut Self::Tensor,
        num_heads: usize,
        q_scale: &Self::Vector,
        k_scale: &Self::Vector,
        pe: &Self::Tensor,
        pe_row0: usize,
    ) -> Result<()>;
    /// Non-causal multi-head attention, softmax scale `1/sqrt(head_dim)`, no mask, reading q, k, v
    /// from columns `[0, D)`, `[D, 2D)`, `[2D, 3D)` of `qkv [L, W]` (D = H·Dh, W ≥ 3D).
    /// Output `[L, D]`, head-major features `h·Dh + d` (spec 1.7).
    fn attention(
        &self,
        qkv: &Self::Tensor,
        num_heads: usize,
        head_dim: usize,
    ) -> Result<Self::Tensor>;
    /// The attention with its prologue, as one op: [`Backend::qk_norm_rope`] on the q and k
    /// columns of `qkv [L, W]` (rows `[0, split)` with `scales[0]`, rows `[split, L)` with
    /// `scales[1]`, pe rows from `pe_row0`), then [`Backend::attention`] → `[L, H·Dh]`. A double
    /// block passes its concatenated `[txt ‖ img]` qkv with split = Lt and pe_row0 = 0 (pe's rows
    /// are the joint sequence's, text first); a single block split = L. Afterwards the q and k
    /// columns of qkv hold unspecified values (normalised, or not, by a fused kernel); v and the
    /// columns past it are untouched. The default composes the two ops (the CPU reference);
    /// the CUDA backend runs one fused tensor-core kernel where it applies.
    fn attention_qk_norm_rope(
        &self,
        qkv: &mut Self::Tensor,
        (num_heads, head_dim): (usize, usize),
        scales: [QkScales<'_, Self::Vector>; 2],
        split: usize,
        pe: &Self::Tensor,
        pe_row0: usize,
    ) -> Result<Self::Tensor> {
        qk_norm_rope_then_attention(self, qkv, (num_heads, head_dim), scales, split, pe, pe_row0)
    }
    /// A single block's parallel branches side by side, `[attention ‖ GELU_tanh(mlp)]`
    /// `[L, D + M]`, from its linear1 output `lin1 [L, 3D + M]` (q, k, v, then the MLP's
    /// pre-activation): [`Backend::attention_qk_norm_rope`] on the first 3D columns (split = L,
    /// pe rows from 0) and GELU of the rest (spec 1.9). The default slices, activates and
    /// concatenates; the CUDA backend writes both into one buffer in place.
    fn single_block_branches(
        &self,
        lin1: &mut Self::Tensor,
        (num_heads, head_dim): (usize, usize),
        scales: QkScales<'_, Self::Vector>,
        pe: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        let (l, w) = self.dims(lin1);
        let d = num_heads * head_dim;
        if w < 3 * d {
            return Err(shape_err(
                "single_block_branches",
                format!(
                    "lin1 [{l}, {w}] is narrower than q, k, v ({} columns)",
                    3 * d
                ),
            ));
        }
        let attn =
            self.attention_qk_norm_rope(lin1, (num_heads, head_dim), [scales, scales], l, pe, 0)?; // [L, D]
        let mlp = self.slice_cols(lin1, 3 * d, w)?; // [L, M]
        let mlp = self.gelu_tanh(&mlp)?;
        self.concat_cols(&attn, &mlp)
    }
    /// `x += gate ⊙ y`: x and y `[L, D]`, gate `[1, D]` broadcast over rows.
    fn gate_residual(
        &self,
        x: &mut Self::Tensor,
        gate: &Self::Tensor,
        y: &Self::Tensor,
    ) -> Result<()>;
    /// `GELU_tanh(x·Wᵀ + b)` (an MLP's first layer): [`Backend::linear`] then
    /// [`Backend::gelu_tanh`], which a backend may fuse (CUDA: GELU in the GEMM's epilogue).
    fn linear_gelu(&self, x: &Self::Tensor, w: &Self::Linear) -> Result<Self::Tensor> {
        let h = self.linear(x, w)?;
        self.gelu_tanh(&h)
    }
    /// `linear(norm_modulate(x, shift, scale), w)`, or [`Backend::linear_gelu`] when `gelu`: a
    /// block's adaLN input straight into its first GEMM (qkv, linear1, the MLP's first layer).
    /// The default composes the ops; the CUDA backend on the fp8 × fp8 route writes the e4m3
    /// GEMM input from x in one fused kernel.
    fn norm_modulate_linear(
        &self,
        x: &Self::Tensor,
        shift: &Self::Tensor,
        scale: &Self::Tensor,
        w: &Self::Linear,
        gelu: bool,
    ) -> Result<Self::Tensor> {
        let h = self.norm_modulate(x, shift, scale)?;
        if gelu {
            self.linear_gelu(&h, w)
        } else {
            self.linear(&h, w)
        }
    }
    /// `residual += gate ⊙ (x·Wᵀ + b)` (a block's output projection onto its stream):
    /// [`Backend::linear`] then [`Backend::gate_residual`], which a backend may fuse (CUDA, fp8
    /// weights: the gate in the dequantised weight, the GEMM accumulating onto the residual).
    fn linear_gate_residual(
        &self,
        x: &Self::Tensor,
        w: &Self::Linear,
        gate: &Self::Tensor,
        residual: &mut Self::Tensor,
    ) -> Result<()> {
        let y = self.linear(x, w)?;
        self.gate_residual(residual, gate, &y)
    }
    /// The sampler's Euler update `x += dt·v`: x `[L, C]` (f32 on every backend: the latents
    /// keep full precision between steps), v `[L, C]`, dt `[1, 1]`. dt is a tensor so that a
    /// step recorded once ([`Backend::repeat`]) replays with the value written before it.
    fn euler_step(&self, x: &mut Self::Tensor, v: &Self::Tensor, dt: &Self::Tensor) -> Result<()>;
    /// `dst = src`, both `[rows, cols]`, into `dst`'s memory (a recorded step's inputs are
    /// rewritten in place between replays).
    fn copy_into(&self, dst: &mut Self::Tensor, src: &Self::Tensor) -> Result<()>;
    /// Host values into `dst [rows, cols]`'s memory, in place (see [`Backend::copy_into`]).
    fn write(&self, dst: &mut Self::Tensor, data: &[f32]) -> Result<()>;
    /// `[a; b]` along rows: `[La, C] ‖ [Lb, C] → [La + Lb, C]`.
    fn concat_rows(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    /// `[a | b]` along features: `[L, Ca] ‖ [L, Cb] → [L, Ca + Cb]`.
    fn concat_cols(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    /// Rows `[begin, end)` of `x [L, C]` → `[end − begin, C]`.
    fn slice_rows(&self, x: &Self::Tensor, begin: usize, end: usize) -> Result<Self::Tensor>;
    /// Columns `[begin, end)` of `x [L, C]` → `[L, end − begin]`.
    fn slice_cols(&self, x: &Self::Tensor, begin: usize, end: usize) -> Result<Self::Tensor>;
}

/// The QKNorm scales `[Dh]` of q and of k of one stream (`Backend::attention_qk_norm_rope`).
pub struct QkScales<'a, V> {
    /// `query_norm.scale`.
    pub q: &'a V,
    /// `key_norm.scale`.
    pub k: &'a V,
}

impl<V> Clone for QkScales<'_, V> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<V> Copy for QkScales<'_, V> {}

/// [`Backend::attention_qk_norm_rope`] as the two unfused ops: the default, and a fast path's
/// fallback. Two streams are normalised each in its own row range (sliced and joined again).
pub fn qk_norm_rope_then_attention<B: Backend + ?Sized>(
    b: &B,
    qkv: &mut B::Tensor,
    (num_heads, head_dim): (usize, usize),
    [first, rest]: [QkScales<'_, B::Vector>; 2],
    split: usize,
    pe: &B::Tensor,
    pe_row0: usize,
) -> Result<B::Tensor> {
    let (l, _) = b.dims(qkv);
    if split > l {
        return Err(shape_err(
            "attention_qk_norm_rope",
            format!("split = {split} is past the {l} rows of qkv"),
        ));
    }
    if split == l || split == 0 {
        let s = if split == l { first } else { rest };
        b.qk_norm_rope(qkv, num_heads, s.q, s.k, pe, pe_row0)?;
    } else {
        let mut a = b.slice_rows(qkv, 0, split)?; // [split, W]
        let mut c = b.slice_rows(qkv, split, l)?; // [L − split, W]
        b.qk_norm_rope(&mut a, num_heads, first.q, first.k, pe, pe_row0)?;
        b.qk_norm_rope(&mut c, num_heads, rest.q, rest.k, pe, pe_row0 + split)?;
        *qkv = b.concat_rows(&a, &c)?; // [L, W]
    }
    b.attention(qkv, num_heads, head_dim)
}

// Operand checks both backends run before an op: backend-independent, on `(rows, cols)` pairs,
// so the CPU reference and the CUDA backend refuse the same operands with the same errors.

/// `len` values make a `[rows, cols]` tensor.
pub(crate) fn check_len(len: usize, rows: usize, cols: usize) -> Result<()> {
    if len != rows * cols {
        return Err(shape_err(
            "tensor",
            format!("{len} values cannot be [{rows}, {cols}]"),
        ));
    }
    Ok(())
}

/// A layer's optional host `bias` is `[n]`; `key` is the layer's.
pub(crate) fn check_bias(key: &str, bias: Option<&HostWeight>, n: usize) -> Result<()> {
    match bias {
        Some(b) => b.expect_shape(&format!("{key} (bias)"), &[n]),
        None => Ok(()),
    }
}

/// `(out, in)` of a linear layer's host `weight [out, in]`, its `bias [out]` checked.
pub(crate) fn linear_shape(
    key: &str,
    weight: &HostWeight,
    bias: Option<&HostWeight>,
) -> Result<(usize, usize)> {
    let [out, inp] = weight.shape[..] else {
        return Err(shape_err(
            "load_linear",
            format!("{key}: weight shape {:?} is not 2-D", weight.shape),
        ));
    };
    weight.expect_shape(key, &[out, inp])?;
    check_bias(key, bias, out)?;
    Ok((out, inp))
}

/// `x [L, in]` fits a linear layer `(out, in)`.
pub(crate) fn check_linear(x: (usize, usize), (out, inp): (usize, usize)) -> Result<()> {
    if x.1 != inp {
        return Err(shape_err(
            "linear",
            format!("x [{}, {}] but weight [{out}, {inp}]", x.0, x.1),
        ));
    }
    Ok(())
}

/// `a` and `b` have the same `[rows, cols]`.
pub(crate) fn check_same(op: &'static str, a: (usize, usize), b: (usize, usize)) -> Result<()> {
    if a != b {
        return Err(shape_err(
            op,
            format!("operands [{}, {}] and [{}, {}] differ", a.0, a.1, b.0, b.1),
        ));
    }
    Ok(())
}

/// `v` (named `what`) is a row vector `[1, cols]`.
pub(crate) fn check_row_vector(
    op: &'static str,
    what: &str,
    v: (usize, usize),
    cols: usize,
) -> Result<()> {
    if v != (1, cols) {
        return Err(shape_err(
            op,
            format!("{what} is [{}, {}], expected [1, {cols}]", v.0, v.1),
        ));
    }
    Ok(())
}

/// `qkv [L, W]` holds q and k of `num_heads × hd`, and `pe [Lpe, hd]` has rows
/// `[pe_row0, pe_row0 + L)` (`qk_norm_rope`, after each backend's check of the scales).
pub(crate) fn check_qk_rope(
    (num_heads, hd): (usize, usize),
    qkv: (usize, usize),
    pe: (usize, usize),
    pe_row0: usize,
) -> Result<()> {
    let d = num_heads * hd;
    if qkv.1 < 2 * d {
        return Err(shape_err(
            "qk_norm_rope",
            format!(
                "qkv [{}, {}] is narrower than q and k of {num_heads} heads × {hd} = {}",
                qkv.0,
                qkv.1,
                2 * d
            ),
        ));
    }
    if pe.1 != hd || pe_row0 + qkv.0 > pe.0 {
        return Err(shape_err(
            "qk_norm_rope",
            format!(
                "pe [{}, {}] has no rows [{pe_row0}, {}) of width {hd}",
                pe.0,
                pe.1,
                pe_row0 + qkv.0
            ),
        ));
    }
    Ok(())
}

/// `qkv [L, W]` holds q, k and v of `heads × hd` (W ≥ 3·H·Dh, Dh > 0), and `bias` is `[H·L, L]`.
pub(crate) fn check_attention(
    op: &'static str,
    (l, w): (usize, usize),
    (heads, hd): (usize, usize),
    bias: Option<(usize, usize)>,
) -> Result<()> {
    let d = heads * hd;
    if hd == 0 || w < 3 * d {
        return Err(shape_err(
            op,
            format!(
                "qkv [{l}, {w}] cannot hold q, k, v of {heads} heads × {hd} (needs {} columns)",
                3 * d
            ),
        ));
    }
    if let Some(b) = bias {
        if b != (heads * l, l) {
            return Err(shape_err(
                op,
                format!(
                    "bias [{}, {}] is not [H·L, L] = [{}, {l}]",
                    b.0,
                    b.1,
                    heads * l
                ),
            ));
        }
    }
    Ok(())
}

/// `a [La, C]` and `b [Lb, C]` have the same width (`concat_rows`).
pub(crate) fn check_concat_rows(a: (usize, usize), b: (usize, usize)) -> Result<()> {
    if a.1 != b.1 {
        return Err(shape_err(
            "concat_rows",
            format!("[{}, {}] and [{}, {}] differ in width", a.0, a.1, b.0, b.1),
        ));
    }
    Ok(())
}

/// `a [L, Ca]` and `b [L, Cb]` have the same rows (`concat_cols`).
pub(crate) fn check_concat_cols(a: (usize, usize), b: (usize, usize)) -> Result<()> {
    if a.0 != b.0 {
        return Err(shape_err(
            "concat_cols",
            format!("[{}, {}] and [{}, {}] differ in rows", a.0, a.1, b.0, b.1),
        ));
    }
    Ok(())
}

/// Rows `[begin, end)` lie in `x [L, C]` (`slice_rows`).
pub(crate) fn check_slice_rows(x: (usize, usize), begin: usize, end: usize) -> Result<()> {
    if begin > end || end > x.0 {
        return Err(shape_err(
            "slice_rows",
            format!("rows [{begin}, {end}) of [{}, {}]", x.0, x.1),
        ));
    }
    Ok(())
}

/// Columns `[begin, end)` lie in `x [L, C]` (`slice_cols`).
pub(crate) fn check_slice_cols(x: (usize, usize), begin: usize, end: usize) -> Result<()> {
    if begin > end || end > x.1 {
        return Err(shape_err(
            "slice_cols",
            format!("columns [{begin}, {end}) of [{}, {}]", x.0, x.1),
        ));
    }
    Ok(())
}

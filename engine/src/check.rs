//! The one comparison helper of the project, and its tolerances (style.md: "tolerances live in
//! one place, each with a comment saying why").

#![warn(missing_docs)]

/// Tolerances on the relative errors of [`Comparison`] (both `rel_l2` and `rel_max`).
pub mod tol {
    /// f32 engine vs an f32 reference of the same math (diffusers / PyTorch CPU): only the order
    /// of floating-point operations differs (GEMM blocking, SDPA's softmax, our f64 reductions in
    /// LN/RMSNorm/softmax). Each op then differs by a few ulps (~1e-7 relative, ~√K·2^-24 for a
    /// K-long dot product); ~30 ops in sequence per block and softmax's sensitivity to its logits
    /// take that to a few 1e-6 (measured on the fixtures: ≤ 5e-6 at every stage). 1e-4 leaves
    /// 20× margin, while every mistake in the spec-8 list moves a stage by 1e-2 or more.
    pub const F32: f64 = 1e-4;

    /// f32 forward with fp8 (e4m3fn) weights vs the f32 forward of the original weights.
    /// e4m3 has 3 mantissa bits: rounding costs a weight at most 2^-4 of its value, and ~2.5 %
    /// RMS for weights spread over the binades (uniform rounding error 2^-4/√3 ≈ 3.6 % of the
    /// binade's low end, less relative to larger values). The rounding errors of a K-long dot
    /// product are independent, so a linear's output moves by that same ~2.5 % of its norm, not
    /// K times it (measured on the fixtures: `img_in`, `txt_in` 2.4 – 2.8 %). The residual
    /// stream carries each block's error on and the linears on the path add roughly in
    /// quadrature: ~2.5 % · √(depth + depth_single + 3) ≈ 7 % for the fixture models (measured
    /// worst stage 8.5 % rel_l2, 9.0 % rel_max, both fp8 layouts). 0.15 leaves ~1.7× margin.
    /// This loose check only shows the quantisation is sane; the fp8 path itself is checked
    /// exactly, against an f32 forward of the dequantised weights at [`F32`].
    pub const FP8_WEIGHTS: f64 = 0.15;

    // The CUDA backend (bf16 activations, f32 math and accumulation) against the f32 CPU
    // reference. bf16 keeps 8 significant bits: rounding a value moves it by at most
    // u = 2^-8 ≈ 3.9e-3 of itself.

    /// Copies (concatenation, slicing, upsampling) of bf16 values: nothing is computed.
    pub const EXACT: f64 = 0.0;

    /// One CUDA op whose inputs are values both sides see exactly (bf16-representable
    /// activations and weights): f32 math, one rounding at the store. Each element then differs
    /// by at most u of its own value, so `rel_max` (relative to max |ref|) ≤ u, and `rel_l2` is
    /// about u/√3 ≈ 2e-3; f32 summation order (cuBLASLt's tiles, the kernels' reductions, vs
    /// sgemm and f64 statistics on the CPU) adds ~√K·2^-24 < 1e-5 even for K = 15360. 5e-3
    /// covers u with that slack. A wrong epsilon, scale, RoPE row or mask moves an op by 1e-2 or
    /// more.
    pub const BF16_OP: f64 = 5e-3;

    /// One CUDA op that also rounds an operand the CPU keeps in f32: fp8 weights, dequantised
    /// (code · scale) to bf16 before their GEMM; f32 weights rounded at upload; the wide-head
    /// attention's probabilities (stored bf16 between its two GEMMs). Each rounded operand
    /// carries an independent error ≤ u; in a K-long dot product they average to about u/√3
    /// of the output's spread, and the output's own rounding adds up to u. Measured with the
    /// CPU emulation (`engine/tests/bf16_emulation.rs`, a [256, 3072]·[1024, 3072]ᵀ linear):
    /// 2.3e-3 rel_l2 and 3.3e-3 rel_max for f32 and for fp8 weights (bf16 weights: 1.7e-3 and
    /// 3.1e-3, under [`BF16_OP`]). 1e-2 leaves 3×.
    pub const BF16_OP_ROUNDED: f64 = 1e-2;

    /// Whole models and pipeline stages in bf16 (CUDA) against f32 (CPU), random weights.
    /// Measured with the CPU emulation of the CUDA backend's rounding points
    /// (`engine/tests/bf16_emulation.rs`): the tiny pipeline's stages ≤ 2.0e-2 rel_l2 and
    /// ≤ 5.5e-2 rel_max (T5's output, whose residual stream is rounded after every block), the
    /// transformer fixtures' forwards ≤ 9.6e-3 (bf16 and fp8 files). The GPU sums in another order,
    /// a different draw of the same rounding noise; 0.15 leaves ~3× the worst measured. A wiring
    /// mistake (wrong rows, wrong stream, a missed op) moves a stage by O(1).
    pub const BF16_MODEL: f64 = 0.15;

    /// Output pixels of the tiny pipeline in bf16 (CUDA) vs f32 (CPU), in levels of 255.
    /// Measured with the CPU emulation: at most 8 levels (≈ 2 % of the decoder's range, where
    /// `BF16_MODEL` measured 2e-2 on the pixels stage); 24 leaves 3×.
    pub const BF16_PIXEL_LEVELS: i32 = 24;
}

/// Errors of `out` against `reference` (same length), in f64.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    /// Values compared.
    pub n: usize,
    /// `max |out − ref|`.
    pub max_abs: f64,
    /// Index of `max_abs`.
    pub worst_index: usize,
    /// `‖out − ref‖₂ / ‖ref‖₂`.
    pub rel_l2: f64,
    /// `max |out − ref| / max |ref|`.
    pub rel_max: f64,
    /// Elements with `|out − ref| > tol · max |ref|`.
    pub over_tol: usize,
    /// NaN or ±Inf in `out` or `reference`; any fails the comparison.
    pub nonfinite: usize,
    /// The tolerance these numbers were judged with.
    pub tol: f64,
}

impl Comparison {
    /// Finite, same length, and both relative errors within `tol`.
    pub fn passes(&self) -> bool {
        self.nonfinite == 0 && self.rel_l2 <= self.tol && self.rel_max <= self.tol
    }

    /// One table row: `max_abs rel_l2 rel_max worst over/n`.
    pub fn row(&self) -> String {
        format!(
            "{:>10.3e} {:>10.3e} {:>10.3e} {:>7} {:>5}/{:<6} {}",
            self.max_abs,
            self.rel_l2,
            self.rel_max,
            self.worst_index,
            self.over_tol,
            self.n,
            if self.passes() { "ok" } else { "FAIL" }
        )
    }

    /// Header matching [`Comparison::row`].
    pub fn header() -> &'static str {
        "   max_abs     rel_l2    rel_max   worst  over/n"
    }
}

/// Compares `out` against `reference` with tolerance `tol`. A length mismatch counts every
/// missing value as non-finite, so it fails.
pub fn compare(out: &[f32], reference: &[f32], tol: f64) -> Comparison {
    let n = out.len().min(reference.len());
    let mut c = Comparison {
        n,
        max_abs: 0.0,
        worst_index: 0,
        rel_l2: 0.0,
        rel_max: 0.0,
        over_tol: 0,
        nonfinite: out.len().abs_diff(reference.len()),
        tol,
    };
    let (mut diff2, mut ref2, mut ref_max) = (0.0f64, 0.0f64, 0.0f64);
    for (i, (&o, &r)) in out.iter().zip(reference).enumerate() {
        if !o.is_finite() || !r.is_finite() {
            c.nonfinite += 1;
            continue;
        }
        let (o, r) = (o as f64, r as f64);
        let d = (o - r).abs();
        diff2 += d * d;
        ref2 += r * r;
        ref_max = ref_max.max(r.abs());
        if d > c.max_abs {
            c.max_abs = d;
            c.worst_index = i;
        }
    }
    let ratio = |a: f64, b: f64| {
        if b > 0.0 {
            a / b
        } else if a == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    };
    c.rel_l2 = ratio(diff2.sqrt(), ref2.sqrt());
    c.rel_max = ratio(c.max_abs, ref_max);
    c.over_tol = out
        .iter()
        .zip(reference)
        .filter(|(&o, &r)| (o as f64 - r as f64).abs() > tol * ref_max)
        .count();
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_reports_errors_and_fails_on_nan() {
        let c = compare(&[1.0, 2.0, 3.5], &[1.0, 2.0, 4.0], 0.1);
        assert_eq!(c.worst_index, 2);
        assert!((c.max_abs - 0.5).abs() < 1e-12);
        assert!((c.rel_max - 0.125).abs() < 1e-12);
        assert!((c.rel_l2 - 0.5 / 21f64.sqrt()).abs() < 1e-12);
        assert_eq!(c.over_tol, 1);
        assert!(!c.passes());
        assert!(compare(&[1.0, 2.0], &[1.0, 2.0], 0.0).passes());
        assert!(!compare(&[f32::NAN, 2.0], &[1.0, 2.0], 1.0).passes());
        assert!(!compare(&[1.0], &[1.0, 2.0], 1.0).passes());
    }
}

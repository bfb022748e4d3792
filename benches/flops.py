#!/usr/bin/env python3
"""FLOP, parameter and byte counts for one FLUX.1 Kontext transformer step (spec section 7).

Pure Python, no torch. Used by torch_baseline.py; run it alone to check the counts against the
spec's numbers:

    python3 benches/flops.py            # prints the table, exits non-zero on a mismatch

Counting rules (spec 7.1), with D = hidden size, M = MLP width, L = Lt + Ni the joint sequence:
  - block linears: 2 * Wblk * (n_double + n_single) * L, where Wblk = 4*D*D + 2*D*M is the GEMM
    weight count of one double-block stream (qkv + proj + mlp in/out) and equally of one single
    block (linear1 D x (3D+M), linear2 (D+M) x D); the double block runs its two streams over
    Lt and Ni rows, which together are L
  - attention: (n_double + n_single) * 4 * D * L^2 (QK^T and PV, 2 FLOPs per MAC, all heads)
  - embedders and final layer: 2*Ni*in*D + 2*Lt*ctx*D + 2*Nx*D*out (the final layer on the target
    rows only; diffusers applies proj_out to all Ni rows, 2*Nc*D*out = 1.6 GFLOP more at 1024^2)
  - not counted: the modulation / vec MLPs (matrix-vector work on ~3.25 B weights, 6.5 GFLOP, but
    6.5 GB of bf16 weight reads when redone each step), norms, RoPE, softmax, elementwise
"""

from __future__ import annotations

import dataclasses
import sys


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """The transformer's shape parameters, named as in diffusers' FluxTransformer2DModel."""

    in_channels: int = 64
    out_channels: int = 64
    num_layers: int = 19  # double-stream blocks
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096  # T5-XXL hidden size
    pooled_projection_dim: int = 768  # CLIP-L pooled
    guidance_embeds: bool = True
    axes_dims_rope: tuple = (16, 56, 56)
    mlp_ratio: float = 4.0
    timestep_dim: int = 256  # sinusoidal embedding width fed to the time / guidance MLPs

    @property
    def hidden(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp(self) -> int:
        return int(self.hidden * self.mlp_ratio)

    def diffusers_kwargs(self) -> dict:
        """Constructor arguments of diffusers.FluxTransformer2DModel."""
        return dict(
            patch_size=1,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            num_layers=self.num_layers,
            num_single_layers=self.num_single_layers,
            attention_head_dim=self.attention_head_dim,
            num_attention_heads=self.num_attention_heads,
            joint_attention_dim=self.joint_attention_dim,
            pooled_projection_dim=self.pooled_projection_dim,
            guidance_embeds=self.guidance_embeds,
            axes_dims_rope=tuple(self.axes_dims_rope),
        )


# FLUX.1 Kontext [dev] (spec 1.1).
KONTEXT_DEV = FluxConfig()

# A tiny config with the same structure, for the CPU dry run (head dim 16 = 4 + 6 + 6).
TINY = FluxConfig(
    in_channels=8,
    out_channels=8,
    num_layers=2,
    num_single_layers=3,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=12,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)


def block_gemm_weights(cfg: FluxConfig) -> int:
    """Wblk: GEMM weights of one double-block stream (= of one single block)."""
    d, m = cfg.hidden, cfg.mlp
    double_stream = 3 * d * d + d * d + 2 * d * m  # qkv, proj, mlp in + out
    single = d * (3 * d + m) + (d + m) * d  # linear1, linear2
    assert double_stream == single
    return double_stream


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """FLOPs of one forward (one denoising step) at the given token counts."""

    text: int
    target: int
    context: int
    linear: int
    attention: int
    embed: int

    @property
    def seq(self) -> int:
        return self.text + self.target + self.context

    @property
    def total(self) -> int:
        return self.linear + self.attention + self.embed


def step_flops(cfg: FluxConfig, text: int, target: int, context: int) -> StepFlops:
    """Spec 7.1 at Lt = text, Nx = target, Nc = context (Ni = Nx + Nc, L = Lt + Ni)."""
    d = cfg.hidden
    ni = target + context
    seq = text + ni
    blocks = cfg.num_layers + cfg.num_single_layers
    linear = 2 * block_gemm_weights(cfg) * blocks * seq
    attention = blocks * 4 * d * seq * seq
    embed = 2 * ni * cfg.in_channels * d + 2 * text * cfg.joint_attention_dim * d + 2 * target * d * cfg.out_channels
    return StepFlops(text, target, context, linear, attention, embed)


def param_counts(cfg: FluxConfig) -> dict:
    """Parameter counts of diffusers' FluxTransformer2DModel (weights + biases + norm scales).

    'modulation' is the vec-dependent part (time / guidance / pooled MLPs, every adaLN linear,
    the final adaLN): matrix-vector work per step, or once per schedule (spec 7.4). 'adaln' is
    its adaLN linears alone (57 blocks + final), the spec's "3.25 B"; the vec MLPs add 32 M.
    """
    d, m, hd, t = cfg.hidden, cfg.mlp, cfg.attention_head_dim, cfg.timestep_dim
    lin = lambda i, o: i * o + o  # noqa: E731  (nn.Linear with bias)
    embedders = lin(cfg.in_channels, d) + lin(cfg.joint_attention_dim, d)
    vec_mlps = (lin(t, d) + lin(d, d)) * (2 if cfg.guidance_embeds else 1) + lin(cfg.pooled_projection_dim, d) + lin(d, d)
    double_mod = 2 * lin(d, 6 * d)  # norm1, norm1_context (AdaLayerNormZero)
    double_gemm = 2 * (3 * lin(d, d) + lin(d, d) + lin(d, m) + lin(m, d))  # both streams
    double_norms = 4 * hd  # RMSNorm q, k, added_q, added_k
    single_mod = lin(d, 3 * d)  # AdaLayerNormZeroSingle
    single_gemm = 3 * lin(d, d) + lin(d, m) + lin(d + m, d)  # to_q/k/v, proj_mlp, proj_out
    single_norms = 2 * hd
    final = lin(d, 2 * d) + lin(d, cfg.out_channels)  # norm_out (adaLN continuous), proj_out
    gemm = cfg.num_layers * double_gemm + cfg.num_single_layers * single_gemm
    adaln = cfg.num_layers * double_mod + cfg.num_single_layers * single_mod + lin(d, 2 * d)
    total = (
        embedders
        + vec_mlps
        + cfg.num_layers * (double_mod + double_gemm + double_norms)
        + cfg.num_single_layers * (single_mod + single_gemm + single_norms)
        + final
    )
    return {"total": total, "block_gemm": gemm, "modulation": vec_mlps + adaln, "adaln": adaln}


def diffusers_counted_flops(cfg: FluxConfig, text: int, target: int, context: int) -> int:
    """What torch's FlopCounterMode counts for diffusers' forward (matmuls and attention only).

    The spec total plus the two things it leaves out: the modulation matrix-vector products
    (2 FLOPs per weight, batch 1; biases are not counted as FLOPs) and proj_out on the context
    rows (diffusers runs the final layer on all Ni rows; the engine can skip them, spec 2.4).
    """
    d, t = cfg.hidden, cfg.timestep_dim
    adaln_w = cfg.num_layers * 2 * d * 6 * d + cfg.num_single_layers * d * 3 * d + d * 2 * d
    vec_w = (t * d + d * d) * (2 if cfg.guidance_embeds else 1) + cfg.pooled_projection_dim * d + d * d
    spec = step_flops(cfg, text, target, context).total
    return spec + 2 * (adaln_w + vec_w) + 2 * context * d * cfg.out_channels


# Team-measured dense ceilings on one H100 (spec 7.3; KINDS.md: 798 TFLOP/s bf16 8192^3).
H100_BF16_TFLOPS = 800.0
H100_FP8_TFLOPS = 1600.0


def floors_ms(f: StepFlops, bf16_tflops: float = H100_BF16_TFLOPS, fp8_tflops: float = H100_FP8_TFLOPS) -> dict:
    """Compute-bound lower bounds per step in ms (spec 7.3)."""
    return {
        "bf16": f.total / (bf16_tflops * 1e12) * 1e3,
        "fp8_linears": ((f.linear + f.embed) / (fp8_tflops * 1e12) + f.attention / (bf16_tflops * 1e12)) * 1e3,
        "fp8_all": f.total / (fp8_tflops * 1e12) * 1e3,
    }


def grid(tokens: int) -> tuple:
    """A near-square (rows, cols) patch grid with rows * cols == tokens."""
    rows = int(tokens**0.5)
    while rows > 1 and tokens % rows:
        rows -= 1
    return rows, tokens // rows


def self_check(verbose: bool = True) -> list:
    """Compares the counts with spec 7.2 / 7.3 / 7.4; returns the list of failures."""
    failures = []

    def check(name, got, want, tol):
        ok = abs(got - want) <= tol
        if verbose:
            print(f"  {'ok ' if ok else 'BAD'} {name:<52} {got:>16.4f}  (spec {want}, tol {tol})")
        if not ok:
            failures.append(f"{name}: {got} vs spec {want}")

    cfg = KONTEXT_DEV
    check("Wblk (GEMM weights per block stream)", block_gemm_weights(cfg), 113_246_208, 0)
    k = step_flops(cfg, 512, 4096, 4096)  # 1024^2 edit: 512 text + 4096 target + 4096 context
    check("L (1024^2 edit)", k.seq, 8704, 0)
    check("block linear TFLOP (L=8704)", k.linear / 1e12, 112.37, 0.005)
    check("attention TFLOP (L=8704)", k.attention / 1e12, 53.06, 0.005)
    check("embed + final TFLOP (L=8704)", k.embed / 1e12, 0.018, 0.0005)
    check("total TFLOP (L=8704)", k.total / 1e12, 165.45, 0.01)
    check("softmax exps (57*24*L^2), 1e11", cfg.num_attention_heads * 57 * k.seq**2 / 1e11, 1.04, 0.005)
    t = step_flops(cfg, 512, 4096, 0)  # 1024^2 text-to-image
    check("block linear TFLOP (t2i, L=4608)", t.linear / 1e12, 59.49, 0.005)
    check("attention TFLOP (t2i, L=4608)", t.attention / 1e12, 14.87, 0.005)
    check("total TFLOP (t2i, L=4608)", t.total / 1e12, 74.38, 0.01)
    # Largest preferred resolution (800x1328 -> 50x83 = 4150 tokens). The spec's "~168.5" is a
    # slip: its own formula gives 168.17 (113.77 linear + 54.39 attention + 0.018).
    big = step_flops(cfg, 512, 4150, 4150)
    check("total TFLOP (Nx=Nc=4150, L=8812; spec says ~168.5)", big.total / 1e12, 168.17, 0.005)
    fl = floors_ms(k)
    check("floor ms, all bf16 at 800", fl["bf16"], 206.8, 0.05)
    check("floor ms, fp8 linears at 1600", fl["fp8_linears"], 136.6, 0.05)
    check("floor ms, all fp8 at 1600", fl["fp8_all"], 103.4, 0.05)
    p = param_counts(cfg)
    check("weights GB bf16 (all parameters)", p["total"] * 2 / 1e9, 23.80, 0.005)
    check("weights GB fp8 (all parameters)", p["total"] / 1e9, 11.90, 0.005)
    check("adaLN modulation parameters, 1e9", p["adaln"] / 1e9, 3.25, 0.005)
    return failures


def main() -> int:
    print("spec section 7 counts, FLUX.1 Kontext [dev] config:")
    failures = self_check()
    k = step_flops(KONTEXT_DEV, 512, 4096, 4096)
    p = param_counts(KONTEXT_DEV)
    print(
        f"1024^2 edit: L={k.seq}  linear {k.linear / 1e12:.2f} + attention {k.attention / 1e12:.2f}"
        f" + embed {k.embed / 1e12:.3f} = {k.total / 1e12:.2f} TFLOP/step;"
        f" parameters {p['total']:,} (block GEMMs {p['block_gemm']:,}, modulation {p['modulation']:,})"
    )
    if failures:
        print("FLOP COUNT CHECK FAILED:", *failures, sep="\n  ")
        return 1
    print("flop count check: all match the spec")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Performance model of one FLUX.1 Kontext denoising step: every kernel at the real shapes, scheduled
in tiles on a card's ceilings. A PREDICTION, not a measurement: no GPU has run this project yet.

    python3 benches/perf_model.py                        # 1024^2 edit on an H100 SXM, the per-kernel tables
    python3 benches/perf_model.py --card H200 --shape 512sq
    python3 benches/perf_model.py --summary              # every shape x card x path, one line each
    python3 benches/perf_model.py --check                # internal consistency (exit 1 on a failure)

Counts come from flops.py (FluxConfig, step_flops, param_counts, diffusers_counted_flops): the model
splits the same work into kernels and --check proves the pieces add up to flops.py's totals.

The schedule. A kernel is `tiles` independent output tiles; `slots` of them run at once (SMs x CTAs
per SM); they run in waves = ceil(tiles / slots). A wave takes the longer of
  - compute: one tile's FLOPs (its padded work: a GEMM tile computes all BM x BN outputs even past
    the matrix edge) at the slot's share of the ceiling, times the tile shape's efficiency; SMs
    are private, so a partial last wave costs a whole tile time (wave quantisation), and
  - memory: the wave's share of the kernel's unique bytes at HBM bandwidth, or at what the wave's
    active SMs can draw (an SM draws at most HBM_SM_SHARE x its even share: about half the SMs
    saturate HBM), so that a small grid is not credited with the whole bandwidth.
Unique bytes: every operand read once from HBM and every output written once (L2 serves the
re-reads of a GEMM's operands across tiles and attention's K/V across query tiles).

Assumptions (each replaceable by a measurement; benches/ceilings.json `measured`):
  - ceilings: datasheet numbers until a GPU run fills `measured` (cuBLAS reaches ~80 % of the
    datasheet bf16 figure at 8192^3, so spec-based GEMM times are ~20 % optimistic);
  - GEMM tiles (cuBLASLt's heuristic, modelled): 128x256 at the ceiling, 128x128 at 0.90 of it,
    64x128 at 0.80 (smaller tiles re-read operands more per FLOP); the shortest predicted schedule
    is taken, as the heuristic would;
  - attention: tensor-core kernels run 128 queries x 1 head per tile, one tile per SM, at their
    targets (issue 13: mma.sync 300, Hopper wgmma 450 TFLOP/s; a PREDICTION for the Hopper kernel
    as built, attention_wgmma.cu: 128 queries x 1 head per block, 64-key tiles in a 3-stage TMA
    ring, its two products not yet overlapped, never timed on a GPU). The Hopper path also pays
    the vT pass its P.V operand needs (elementwise.cu's transpose of v: read + write L x D bf16
    per attention, ~53 MB per layer at 8,704 tokens); the k pass is counted in qk_norm_rope. The plain CUDA-core kernel
    (kernels/cuda/attention.cu) runs 16 queries x 1 head per CTA, 9 CTAs per SM (shared memory),
    bound by shared-memory wavefronts: per query and 32-key tile it issues Dh/2 k loads, Dh/2 q
    loads and Dh v loads (2 Dh wavefronts, one per clock per SM) for 4 * 32 * Dh FLOPs: 64 FLOP per
    clock per SM, 1/4 of the SM's 256 FP32 FLOP per clock;
  - elementwise kernels: memory-bound row kernels (4096-element chunks, 16 CTAs per SM); FLOPs
    per element are rough and never binding;
  - modulation: the engine computes every step's modulation vectors once per request (one
    [steps x D] GEMM per layer, spec 7.4), so a step carries 1/steps of it; the per-step GEMV
    (diffusers' way) is listed for comparison and is in no path.

Paths:
  (a)  today: cuBLASLt bf16 GEMMs (bias epilogue), the plain attention kernel, every elementwise
       step its own pass (norm_modulate, qk_norm_rope, gate_residual, GELU) and the copies
       the backend makes (qkv concat, slices, the single block's MLP slice and concat);
  (a8) today with an fp8 checkpoint: (a) plus fp8.cu dequantising every weight into a bf16
       scratch before its GEMM (read 1 + write 2 + GEMM read 2 bytes per weight);
  (b)  fast bf16: tensor-core attention, GELU in the MLP-in GEMM's epilogue, gate + residual in
       the output GEMMs' epilogues (they read the residual instead of writing y), no copies (qkv
       written in place, a row-permuted linear1 so that [attention | GELU(mlp)] is one strided
       operand); norm_modulate and qk_norm_rope stay separate passes;
  (c)  fast fp8: (b) with the block GEMMs on cuBLASLt fp8 (e4m3 weights and activations, per-tensor
       scales, bf16 out) at the fp8 ceiling; each fp8 GEMM input quantised by its own pass
       (amax read, then read + fp8 write); attention, embedders, final layer stay bf16.
  (b now), (c now), (c8 now): the engine as built (Hopper attention; bf16, fp8 dequantised, fp8 x
       fp8): GELU in the MLP-in epilogue; the gated residual in the GEMM only for dequantised fp8
       weights, else a pass; the single block's branches written into one buffer (one GELU pass);
       the double block's qkv concat and attention slices still copies; k's QKNorm + RoPE a pass,
       q's in the attention prologue; on the fp8 x fp8 route adaLN's norm writes e4m3 itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from flops import (  # noqa: E402
    KONTEXT_DEV,
    FluxConfig,
    block_gemm_weights,
    diffusers_counted_flops,
    floors_ms,
    param_counts,
    step_flops,
)

HERE = os.path.dirname(os.path.abspath(__file__))
CEILINGS = os.path.join(HERE, "ceilings.json")

# Token counts (text, target, context) of the shapes that matter.
SHAPES = {
    "1024sq": ("1024^2 edit: 512 text + 4096 target + 4096 context", (512, 4096, 4096)),
    "512sq": ("512^2 edit: 512 text + 1024 target + 1024 context", (512, 1024, 1024)),
    "1024sq_2ref": ("1024^2 edit, two 1024^2 references: 512 + 4096 + 8192", (512, 4096, 8192)),
}
STEPS = 28  # the default schedule; the modulation GEMMs are amortised over it

# GEMM tile shapes (BM x BN) and the fraction of the dense ceiling each reaches (see the header).
GEMM_TILES = (((128, 256), 1.00), ((128, 128), 0.90), ((64, 128), 0.80))
HBM_SM_SHARE = 2.0  # an SM draws at most 2x its even share of HBM bandwidth
ATTN_TILE_Q = 128  # queries per tensor-core attention tile
PLAIN_TILE_Q, PLAIN_CTAS_PER_SM = 16, 9  # attention.cu: ATT_BQ queries per CTA; 24.7 KB smem each
# attention.cu's shared-memory bound: 4*32*Dh FLOPs per 2*Dh wavefronts (one per clock) over the
# SM's 256 FP32 FLOPs per clock: 64 / 256.
PLAIN_FRACTION_OF_FP32 = (4 * 32) / 2 / 256
EW_CHUNK, EW_CTAS_PER_SM = 4096, 16  # elementwise kernels: elements per CTA, CTAs per SM

BF16, FP8 = 2, 1  # bytes per element


@dataclasses.dataclass(frozen=True)
class Card:
    name: str
    sms: int
    bf16_tflops: float
    fp8_tflops: float
    fp32_tflops: float
    hbm_tbs: float
    attention_plain_tflops: float
    attention_mma_sync_tflops: float
    attention_hopper_tflops: float
    measured: tuple  # the keys that came from `measured`

    def rate(self, unit: str) -> float:
        """FLOP/s of a compute unit: bf16, fp8, fp32, attn_plain, attn_mma_sync, attn_hopper."""
        return {
            "bf16": self.bf16_tflops,
            "fp8": self.fp8_tflops,
            "fp32": self.fp32_tflops,
            "attn_plain": self.attention_plain_tflops,
            "attn_mma_sync": self.attention_mma_sync_tflops,
            "attn_hopper": self.attention_hopper_tflops,
        }[unit] * 1e12

    @property
    def bw(self) -> float:
        return self.hbm_tbs * 1e12


CARD_KEYS = ("sms", "bf16_tflops", "fp8_tflops", "fp32_tflops", "hbm_tbs", "attention_plain_tflops",
             "attention_mma_sync_tflops", "attention_hopper_tflops")


def load_cards(path: str = CEILINGS) -> dict:
    """Cards from ceilings.json: spec numbers, attention targets, replaced key by key by `measured`."""
    with open(path, encoding="utf-8") as f:
        j = json.load(f)
    for k in ("spec", "targets", "measured"):
        if not isinstance(j.get(k), dict):
            raise SystemExit(f"{path}: no '{k}' object")
    cards = {}
    for name, s in j["spec"].items():
        v = dict(s)
        v.setdefault("attention_plain_tflops", PLAIN_FRACTION_OF_FP32 * v["fp32_tflops"])
        v.setdefault("attention_mma_sync_tflops", j["targets"]["attention_mma_sync_tflops"])
        v.setdefault("attention_hopper_tflops", j["targets"]["attention_hopper_tflops"])
        m = j["measured"].get(name, {})
        unknown = set(m) - set(CARD_KEYS) - {"date", "commit", "how"}
        if unknown:
            raise SystemExit(f"{path}: measured[{name!r}] has unknown keys {sorted(unknown)}")
        v.update({k: m[k] for k in CARD_KEYS if k in m})
        cards[name] = Card(name=name, measured=tuple(k for k in CARD_KEYS if k in m),
                           **{k: v[k] for k in CARD_KEYS})
    unknown_cards = set(j["measured"]) - set(cards)
    if unknown_cards:
        raise SystemExit(f"{path}: measured cards {sorted(unknown_cards)} have no spec entry")
    return cards


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Kernel:
    """One kernel launch shape, `count` launches per step (fractional: once per request / steps)."""

    name: str
    kind: str  # gemm, attention, elementwise
    count: float
    shape: str
    flops: float  # useful FLOPs per launch
    w_bytes: float  # weights read per launch
    r_bytes: float  # activations read
    wr_bytes: float  # activations written
    unit: str  # Card.rate unit the compute runs at
    tiles: int = 1
    slots_per_sm: int = 1
    tile_flops: float = 0.0  # padded work of one tile
    tile_eff: float = 1.0
    tile: str = ""
    group: str = ""  # block GEMM, attention, ... (for the --check sums)
    mnk: tuple = ()  # a GEMM's (M, N, K)

    @property
    def bytes(self) -> float:
        return self.w_bytes + self.r_bytes + self.wr_bytes

    def schedule(self, card: Card) -> dict:
        """Per-launch time (s) from the wave schedule, and its parts."""
        slots = card.sms * self.slots_per_sm
        waves = math.ceil(self.tiles / slots)
        t_tile = self.tile_flops / (card.rate(self.unit) * self.tile_eff / slots)
        per_sm_bw = HBM_SM_SHARE * card.bw / card.sms
        t, compute_waves = 0.0, 0
        for w in range(waves):
            active = min(slots, self.tiles - w * slots)
            bw = min(card.bw, math.ceil(active / self.slots_per_sm) * per_sm_bw)
            t_mem = self.bytes * active / self.tiles / bw
            t += max(t_tile, t_mem)
            compute_waves += t_tile >= t_mem
        return {
            "time": t,
            "waves": waves,
            "wave_eff": self.tiles / (waves * slots),
            "bound": "compute" if compute_waves * 2 >= waves else "memory",
            "roofline": max(self.flops / card.rate(self.unit), self.bytes / card.bw),
        }


def gemm(name, count, m, n, k, card, *, a=BF16, w=BF16, extra_read=0.0, unit="bf16", group="",
         epi_flops=0.0):
    """y [m, n] (bf16) = x [m, k] . W [n, k]^T + bias, with the tile the schedule likes best."""
    best = None
    for (bm, bn), eff in GEMM_TILES:
        kern = Kernel(
            name=name, kind="gemm", count=count, shape=f"{m}x{n}x{k}", flops=2.0 * m * n * k + epi_flops,
            w_bytes=n * k * w + n * BF16, r_bytes=m * k * a + extra_read, wr_bytes=m * n * BF16, unit=unit,
            tiles=math.ceil(m / bm) * math.ceil(n / bn), tile_flops=2.0 * bm * bn * k, tile_eff=eff,
            tile=f"{bm}x{bn}", group=group, mnk=(m, n, k),
        )
        t = kern.schedule(card)["time"]
        if best is None or t < best[0]:
            best = (t, kern)
    return best[1]


def attention(name, count, seq, cfg: FluxConfig, kernel: str):
    """softmax(q k^T / sqrt(Dh)) v over all heads of the fused qkv; FLOPs as spec 7.1 (4 D L^2)."""
    h, dh, d = cfg.num_attention_heads, cfg.attention_head_dim, cfg.hidden
    plain = kernel == "plain"
    bq = PLAIN_TILE_Q if plain else ATTN_TILE_Q
    return Kernel(
        name=name, kind="attention", count=count, shape=f"L={seq} H={h} Dh={dh}", flops=4.0 * d * seq * seq,
        w_bytes=0.0, r_bytes=seq * 3 * d * BF16, wr_bytes=seq * d * BF16, unit=f"attn_{kernel}",
        tiles=math.ceil(seq / bq) * h, slots_per_sm=PLAIN_CTAS_PER_SM if plain else 1,
        tile_flops=4.0 * bq * seq * dh, tile=f"{bq}q x 1 head", group="attention",
    )


def elementwise(name, count, elems, *, read, write, flops_per_elem, extra_read=0.0, group="elementwise"):
    """A memory-bound pass over `elems` elements reading `read` and writing `write` bytes per element."""
    tiles = max(1, math.ceil(elems / EW_CHUNK))
    return Kernel(
        name=name, kind="elementwise", count=count, shape=f"{elems / 1e6:.2f}M el", flops=flops_per_elem * elems,
        w_bytes=0.0, r_bytes=elems * read + extra_read, wr_bytes=elems * write, unit="fp32", tiles=tiles,
        slots_per_sm=EW_CTAS_PER_SM, tile_flops=flops_per_elem * elems / tiles, tile=f"{EW_CHUNK} el",
        group=group,
    )


@dataclasses.dataclass(frozen=True)
class Path:
    key: str
    label: str
    attention: str  # plain, mma_sync, hopper
    fused: bool
    weights: str  # bf16, fp8_dequant (fp8 weights, bf16 GEMMs), fp8 (cuBLASLt fp8 GEMMs)
    built: bool = False  # the engine as built now (see the module docs), not a design target


PATHS = {
    "a": Path("a", "(a) today, bf16", "plain", False, "bf16"),
    "a8": Path("a8", "(a8) today, fp8 checkpoint (dequantise into bf16)", "plain", False, "fp8_dequant"),
    "b_mma": Path("b_mma", "(b) fast bf16, mma.sync attention", "mma_sync", True, "bf16"),
    "b": Path("b", "(b) fast bf16, Hopper attention", "hopper", True, "bf16"),
    "c": Path("c", "(c) fast fp8, Hopper attention", "hopper", True, "fp8"),
    "b_now": Path("b_now", "(b now) the engine as built, bf16, on an H100/H200", "hopper", False, "bf16", True),
    "c_now": Path("c_now", "(c now) as built, fp8 weights dequantised (the default)", "hopper", False,
                  "fp8_dequant", True),
    "c8_now": Path("c8_now", "(c8 now) as built, fp8 x fp8 (KONTEXT_FP8_GEMM=1)", "hopper", False, "fp8", True),
}


def step_kernels(cfg: FluxConfig, tokens: tuple, path: Path, card: Card, steps: int = STEPS) -> list:
    """Every kernel of one denoising step (spec 1: 19 double + 38 single blocks) on `path`."""
    lt, nx, nc = tokens
    ni, d, m = nx + nc, cfg.hidden, cfg.mlp
    seq = lt + ni
    nd, ns = cfg.num_layers, cfg.num_single_layers
    fp8 = path.weights == "fp8"
    ks = []

    # What the engine as built fuses (path.built): GELU in the MLP-in GEMM's epilogue; the gate
    # and residual in the output GEMMs only for dequantised fp8 weights (the gate folded into the
    # dequantised weight, beta = 1 onto the residual), else a gate_residual pass; the single
    # block's [attention | GELU(mlp)] written in place (one GELU pass from linear1's MLP columns,
    # no slice or concat), the double block's qkv concat and attention slices still copies; q's
    # QKNorm + RoPE in the attention prologue, k's in its own in-place pass; on the fp8 x fp8
    # route adaLN's norm writes the e4m3 input of qkv / linear1 / MLP-in (two passes over x).
    fuse_gelu = path.fused or path.built
    fuse_residual = path.fused or (path.built and path.weights == "fp8_dequant")
    norm_e4m3 = path.built and fp8

    def block_gemm(name, count, rows, n, k, *, residual=False, gelu=False, normed=False):
        """A block GEMM on this path: fp8 or bf16, with the fused epilogue of the fast paths.
        `normed`: its input is adaLN's norm output (written as e4m3 by the norm on norm_e4m3)."""
        fr, fg = residual and fuse_residual, gelu and fuse_gelu
        extra = rows * n * BF16 if fr else 0.0
        epi = 15.0 * rows * n if fg else 0.0
        suffix = "+gate_residual" if fr else "+gelu" if fg else ""
        ks.append(gemm(name + suffix, count, rows, n, k, card, a=FP8 if fp8 else BF16, w=FP8 if fp8 else BF16,
                       extra_read=extra, unit="fp8" if fp8 else "bf16", group="block_gemm", epi_flops=epi))
        if path.weights == "fp8_dequant":  # fp8.cu: e4m3 -> bf16 scratch, before every GEMM
            ks.append(elementwise(name + " fp8 dequant", count, n * k, read=FP8, write=BF16, flops_per_elem=1,
                                  group="fp8_dequant"))
        if fp8 and not (normed and norm_e4m3):  # the GEMM's input as e4m3: amax pass, then quantise
            ks.append(elementwise(name + " act quantise", count, rows * k, read=2 * BF16, write=FP8,
                                  flops_per_elem=3, group="fp8_quantise"))
        if residual and path.built and not fr:
            ks.append(elementwise(name + " gate_residual", count, rows * n, read=2 * BF16, write=BF16,
                                  flops_per_elem=2))

    def other_gemm(name, count, rows, n, k, group):
        # An fp8 checkpoint stores every 2-D weight in fp8. (a8) dequantises each before its GEMM;
        # (c) runs the modulation GEMMs in fp8 too, and keeps the small embedders and final layer as
        # bf16 copies made at load time.
        f8 = fp8 and group == "modulation"
        ks.append(gemm(name, count, rows, n, k, card, a=FP8 if f8 else BF16, w=FP8 if f8 else BF16,
                       unit="fp8" if f8 else "bf16", group=group))
        if path.weights == "fp8_dequant":
            ks.append(elementwise(name + " fp8 dequant", count, n * k, read=FP8, write=BF16, flops_per_elem=1,
                                  group="fp8_dequant"))

    def norm_modulate(name, count, rows, *, feeds_gemm=True):
        if norm_e4m3 and feeds_gemm:  # norm_modulate_amax, then norm_modulate_e4m3 (x read twice)
            ks.append(elementwise(name + " e4m3", count, rows * d, read=2 * BF16, write=FP8, flops_per_elem=16))
        else:
            ks.append(elementwise(name, count, rows * d, read=BF16, write=BF16, flops_per_elem=8))

    def qk_norm_rope(name, count, rows):
        # q and k in place (2 D per row), the RoPE table's cos / sin (f32, Dh per row); as built,
        # q's part is the attention kernel's prologue and only k gets the pass
        parts = 1 if path.built and path.attention != "plain" else 2
        ks.append(elementwise(name, count, rows * parts * d, read=BF16, write=BF16, flops_per_elem=10,
                              extra_read=rows * cfg.attention_head_dim * 4))

    def v_transpose(name, count, rows):
        # The Hopper kernel's P.V operand: v [L, D] of the qkv buffer written as vT [D, L].
        if path.attention == "hopper":
            ks.append(elementwise(name, count, rows * d, read=BF16, write=BF16, flops_per_elem=0,
                                  group="v_transpose"))

    def copy(name, count, elems, *, built_too=True):
        if not path.fused and (built_too or not path.built):
            ks.append(elementwise(name, count, elems, read=BF16, write=BF16, flops_per_elem=0, group="copy"))

    # embedders (every step: txt_in's output does not change between steps, the engine recomputes it)
    other_gemm("img_in", 1, ni, d, cfg.in_channels, "embed")
    other_gemm("txt_in", 1, lt, d, cfg.joint_attention_dim, "embed")

    # modulation: every step's vectors in one [steps x D] GEMM per layer, once per request
    t = cfg.timestep_dim
    g = 2 if cfg.guidance_embeds else 1
    for name, count, n, k in (
        ("mod: time/guidance MLP in", g, d, t),
        ("mod: time/guidance MLP out", g, d, d),
        ("mod: vector MLP in", 1, d, cfg.pooled_projection_dim),
        ("mod: vector MLP out", 1, d, d),
        ("mod: double adaLN (D->6D)", 2 * nd, 6 * d, d),
        ("mod: single adaLN (D->3D)", ns, 3 * d, d),
        ("mod: final adaLN (D->2D)", 1, 2 * d, d),
    ):
        other_gemm(name, count / steps, steps, n, k, "modulation")

    # double-stream blocks: image stream (Ni rows) and text stream (Lt rows), joint attention
    for stream, rows in (("img", ni), ("txt", lt)):
        p = f"double.{stream}"
        norm_modulate(f"{p}.norm_modulate", 2 * nd, rows)
        block_gemm(f"{p}.qkv", nd, rows, 3 * d, d, normed=True)
        qk_norm_rope(f"{p}.qk_norm_rope", nd, rows)
        block_gemm(f"{p}.proj", nd, rows, d, d, residual=True)
        block_gemm(f"{p}.mlp_in", nd, rows, m, d, gelu=True, normed=True)
        if not fuse_gelu:
            ks.append(elementwise(f"{p}.gelu", nd, rows * m, read=BF16, write=BF16, flops_per_elem=15))
        block_gemm(f"{p}.mlp_out", nd, rows, d, m, residual=True)
        if not path.fused and not path.built:
            ks.append(elementwise(f"{p}.gate_residual", 2 * nd, rows * d, read=2 * BF16, write=BF16,
                                  flops_per_elem=2))
    copy("double.concat_qkv", nd, seq * 3 * d)
    copy("double.slice_attn", nd, seq * d)
    ks.append(attention("double.attention", nd, seq, cfg, path.attention))
    v_transpose("double.v_transpose", nd, seq)

    # single-stream blocks over the joint sequence
    copy("concat txt|img, slice img", 1, seq * d + ni * d)
    norm_modulate("single.norm_modulate", ns, seq)
    # the GELU of the fast designs rides linear1's epilogue (row-permuted weight); as built it is
    # one pass from linear1's MLP columns into the [attention | GELU(mlp)] buffer
    block_gemm("single.linear1", ns, seq, 3 * d + m, d, gelu=path.fused, normed=True)
    qk_norm_rope("single.qk_norm_rope", ns, seq)
    ks.append(attention("single.attention", ns, seq, cfg, path.attention))
    v_transpose("single.v_transpose", ns, seq)
    copy("single.slice_mlp", ns, seq * m, built_too=False)
    if not path.fused:
        ks.append(elementwise("single.gelu", ns, seq * m, read=BF16, write=BF16, flops_per_elem=15))
    copy("single.concat_attn_mlp", ns, seq * (d + m), built_too=False)
    block_gemm("single.linear2", ns, seq, d, d + m, residual=True)
    if not path.fused and not path.built:
        ks.append(elementwise("single.gate_residual", ns, seq * d, read=2 * BF16, write=BF16, flops_per_elem=2))

    # final layer (the engine runs it on all Ni rows; only the Nx target rows are kept)
    norm_modulate("final.norm_modulate", 1, ni, feeds_gemm=False)
    other_gemm("final.linear", 1, ni, cfg.out_channels, d, "final")
    return ks


def evaluate(ks: list, card: Card) -> list:
    """(kernel, schedule) for every kernel."""
    return [(k, k.schedule(card)) for k in ks]


def total_ms(rows: list) -> float:
    return sum(k.count * s["time"] for k, s in rows) * 1e3


def diffusers_modulation_ms(cfg: FluxConfig, card: Card, tokens: tuple) -> float:
    """The modulation as per-step GEMVs (bf16), diffusers' way: weight-bandwidth bound."""
    lt, nx, nc = tokens
    w = (diffusers_counted_flops(cfg, lt, nx, nc) - step_flops(cfg, lt, nx, nc).total
         - 2 * nc * cfg.hidden * cfg.out_channels) / 2
    k = gemm("mod GEMV", 1, 1, int(w // cfg.hidden), cfg.hidden, card)
    return k.schedule(card)["time"] * 1e3


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------

def print_table(rows: list, title: str):
    print(f"\n{title}")
    hdr = (f"  {'kernel':<34} {'n/step':>6} {'shape (MxNxK)':>20} {'GFLOP':>8} {'W MB':>8} {'rd MB':>8} "
           f"{'wr MB':>8} {'FLOP/B':>7} {'tile':>13} {'tiles':>6} {'waves':>5} {'eff':>5} {'bound':>7} {'ms':>8}")
    print(hdr)
    for k, s in rows:
        c = k.count
        cnt = f"{c:.0f}" if c >= 1 and abs(c - round(c)) < 1e-9 else f"{c:.3f}"
        print(f"  {k.name:<34} {cnt:>6} {k.shape:>20} {c * k.flops / 1e9:8.1f} {c * k.w_bytes / 1e6:8.1f} "
              f"{c * k.r_bytes / 1e6:8.1f} {c * k.wr_bytes / 1e6:8.1f} {k.flops / max(k.bytes, 1):7.1f} "
              f"{k.tile:>13} {k.tiles:6d} {s['waves']:5d} {s['wave_eff']:5.2f} {s['bound']:>7} "
              f"{c * s['time'] * 1e3:8.3f}")
    by_group = {}
    for k, s in rows:
        by_group[k.group or k.kind] = by_group.get(k.group or k.kind, 0.0) + k.count * s["time"] * 1e3
    parts = ", ".join(f"{g} {v:.1f}" for g, v in sorted(by_group.items(), key=lambda kv: -kv[1]))
    print(f"  total {total_ms(rows):.1f} ms/step  ({parts})")


def summary(cards: dict, cfg: FluxConfig = KONTEXT_DEV) -> list:
    """One record per shape x card x path."""
    out = []
    for skey, (label, tokens) in SHAPES.items():
        f = step_flops(cfg, *tokens)
        for card in cards.values():
            fl = floors_ms(f, card.bf16_tflops, card.fp8_tflops)
            for p in PATHS.values():
                rows = evaluate(step_kernels(cfg, tokens, p, card), card)
                out.append({
                    "shape": skey, "shape_label": label, "card": card.name, "path": p.key,
                    "path_label": p.label, "ms": total_ms(rows),
                    "floor_ms_bf16": fl["bf16"], "floor_ms_fp8_linears": fl["fp8_linears"],
                    "ceilings_measured": list(card.measured),
                })
    return out


def print_summary(recs: list):
    print("\nPREDICTED ms per step (no GPU run; ceilings from benches/ceilings.json, spec unless measured)")
    print(f"  {'shape':<12} {'card':<9} " + " ".join(f"{k:>7}" for k in PATHS)
          + f" {'roof bf16':>10} {'roof fp8':>9}")
    seen = {}
    for r in recs:
        seen.setdefault((r["shape"], r["card"]), {})[r["path"]] = r
    for (shape, card), by in seen.items():
        any_r = next(iter(by.values()))
        print(f"  {shape:<12} {card:<9} " + " ".join(f"{by[k]['ms']:7.1f}" for k in PATHS)
              + f" {any_r['floor_ms_bf16']:10.1f} {any_r['floor_ms_fp8_linears']:9.1f}")
    print("  paths: " + "; ".join(f"{p.key} = {p.label}" for p in PATHS.values()))
    print("  roof: every FLOP at the dense ceiling (attention included), flops.py floors_ms at this card's "
          "bf16 / fp8 figures; spec 7.3's floors (206.8 / 136.6 ms) use 800 / 1600 TFLOP/s")


# ---------------------------------------------------------------------------------------------
# --check
# ---------------------------------------------------------------------------------------------

def consistency(cfg: FluxConfig, tokens: tuple, card: Card, path: Path, ks: list) -> list:
    """(name, ok, detail) for every consistency rule on one step's kernel list."""
    lt, nx, nc = tokens
    f = step_flops(cfg, *tokens)
    rows = evaluate(ks, card)
    out = []

    def close(a, b):
        return abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1.0)

    def flops_of(group):
        return sum(k.count * 2.0 * math.prod(k.mnk) for k in ks if k.group == group)

    out.append(("block GEMM FLOPs = flops.py linear", close(flops_of("block_gemm"), f.linear),
                f"{flops_of('block_gemm'):.6e} vs {f.linear:.6e}"))
    att = sum(k.count * k.flops for k in ks if k.group == "attention")
    out.append(("attention FLOPs = flops.py attention", close(att, f.attention), f"{att:.6e} vs {f.attention:.6e}"))
    emb = flops_of("embed") + flops_of("final")
    want = f.embed + 2 * nc * cfg.hidden * cfg.out_channels  # the final layer runs on all Ni rows
    out.append(("embed + final FLOPs = flops.py embed + the context rows' proj_out", close(emb, want), ""))
    # rows = steps and count = n / steps: the FLOPs are 2 x weights x n
    mod = flops_of("modulation") / 2
    mod_w = (diffusers_counted_flops(cfg, *tokens) - f.total - 2 * nc * cfg.hidden * cfg.out_channels) / 2
    out.append(("modulation weights = flops.py's", close(mod, mod_w), f"{mod:.6e} vs {mod_w:.6e}"))
    wb = FP8 if path.weights == "fp8" else BF16  # (a8)'s GEMMs read the bf16 scratch
    blk = [k for k in ks if k.group == "block_gemm"]
    blk_w = sum(k.count * (k.w_bytes - k.mnk[1] * BF16) for k in blk)  # less the bias
    want_w = (cfg.num_layers * 2 + cfg.num_single_layers) * block_gemm_weights(cfg) * wb
    out.append(("block GEMM weight bytes = Wblk x 76 streams", close(blk_w, want_w), ""))
    att_n = sum(k.count for k in ks if k.group == "attention")
    vt_n = sum(k.count for k in ks if k.group == "v_transpose")
    out.append(("one vT pass per Hopper attention", vt_n == (att_n if path.attention == "hopper" else 0),
                f"{vt_n} passes, {att_n} attentions"))
    low = [k.name for k, s in rows if s["time"] < s["roofline"] * (1 - 1e-9)]
    out.append(("every kernel >= its roofline", not low, ", ".join(low[:3])))
    bad_eff = [k.name for k, s in rows if not 0 < s["wave_eff"] <= 1]
    out.append(("wave efficiency in (0, 1]", not bad_eff, ", ".join(bad_eff[:3])))
    linear_rate = card.rate("fp8" if path.weights == "fp8" else "bf16")
    floor = (f.linear + f.embed) / linear_rate + f.attention / card.rate("bf16")
    out.append(("step >= pure-roofline floor", total_ms(rows) >= floor * 1e3,
                f"{total_ms(rows):.1f} vs {floor * 1e3:.1f} ms"))
    return out


def check(cards: dict, cfg: FluxConfig = KONTEXT_DEV) -> list:
    """Internal consistency, and mutants it must catch; returns the failures."""
    failures = []

    def expect(name, ok, detail=""):
        print(f"  {'ok ' if ok else 'BAD'} {name}{(': ' + detail) if detail else ''}")
        if not ok:
            failures.append(f"{name} {detail}")

    def close(a, b, rel=1e-9):
        return abs(a - b) <= rel * max(abs(a), abs(b), 1.0)

    for skey, (_, tokens) in SHAPES.items():
        for card in cards.values():
            for p in PATHS.values():
                rules = consistency(cfg, tokens, card, p, step_kernels(cfg, tokens, p, card))
                bad = [(n, d) for n, ok, d in rules if not ok]
                for name, detail in bad:
                    expect(f"{skey} {card.name} {p.key}: {name}", False, detail)
                if not bad:
                    expect(f"{skey} {card.name} {p.key}: {len(rules)} rules", True, rules[-1][2])

    # The rules catch broken kernel lists: each mutant must fail the rule named.
    card, tokens, path = next(iter(cards.values())), SHAPES["1024sq"][1], PATHS["b"]

    def mutant(what, rule, edit):
        ks = step_kernels(cfg, tokens, path, card)
        edit(ks)
        verdict = {n: ok for n, ok, _ in consistency(cfg, tokens, card, path, ks)}
        expect(f"mutant caught: {what}", verdict[rule] is False, rule)

    mutant("single.linear2 left out", "block GEMM FLOPs = flops.py linear",
           lambda ks: ks.remove(next(k for k in ks if k.name.startswith("single.linear2"))))
    mutant("double attention once per step", "attention FLOPs = flops.py attention",
           lambda ks: setattr(next(k for k in ks if k.name == "double.attention"), "count", 1))
    mutant("the single blocks' vT pass left out", "one vT pass per Hopper attention",
           lambda ks: ks.remove(next(k for k in ks if k.name == "single.v_transpose")))
    mutant("final layer on the target rows only", "embed + final FLOPs = flops.py embed + the context rows' proj_out",
           lambda ks: ks.__setitem__(ks.index(next(k for k in ks if k.name == "final.linear")),
                                     gemm("final.linear", 1, tokens[1], 64, cfg.hidden, card, group="final")))
    mutant("a GEMM tile above the ceiling", "every kernel >= its roofline",
           lambda ks: setattr(next(k for k in ks if k.name.startswith("single.linear1")), "tile_eff", 1.5))

    p = param_counts(cfg)
    d, m = cfg.hidden, cfg.mlp
    biases = cfg.num_layers * 2 * (3 * d + d + m + d) + cfg.num_single_layers * (3 * d + m + d)
    expect("Wblk x 76 + biases = flops.py block_gemm parameters",
           (cfg.num_layers * 2 + cfg.num_single_layers) * block_gemm_weights(cfg) + biases == p["block_gemm"])
    # The schedule itself: a compute-bound GEMM filling whole waves runs at its roofline; one tile
    # more costs a wave; a memory-bound pass is not charged a whole wave for its last tile.
    c = next(iter(cards.values()))
    k1 = gemm("t", 1, 128 * 12, 256 * c.sms // 12, 8192, c)
    s1 = k1.schedule(c)
    expect("whole waves of 128x256 tiles: time = FLOPs / ceiling",
           close(s1["time"], k1.flops / c.rate("bf16")) and k1.tile == "128x256" and s1["bound"] == "compute",
           f"{s1['time']:.4e} s, tile {k1.tile}")
    k2 = Kernel("t", "gemm", 1, "", 0, 0, 0, 0, "bf16", tiles=c.sms + 1, tile_flops=1e9)
    expect("one tile past a wave costs a second wave", close(k2.schedule(c)["time"], 2e9 / (c.rate("bf16") / c.sms)))
    wave = c.sms * EW_CTAS_PER_SM * EW_CHUNK
    e = elementwise("t", 1, wave + EW_CHUNK, read=2, write=2, flops_per_elem=1)
    want = wave * 4 / c.bw + EW_CHUNK * 4 / (HBM_SM_SHARE * c.bw / c.sms)
    expect("memory-bound pass: a one-tile last wave costs that tile's bytes at one SM's draw",
           close(e.schedule(c)["time"], want), f"{e.schedule(c)['time']:.4e} vs {want:.4e} s")
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--card", default="H100 SXM")
    ap.add_argument("--shape", default="1024sq", choices=sorted(SHAPES))
    ap.add_argument("--paths", default="a,b,c", help="paths with a per-kernel table (a, a8, b_mma, b, c, b_now, c_now, c8_now)")
    ap.add_argument("--summary", action="store_true", help="only the shape x card x path summary")
    ap.add_argument("--check", action="store_true", help="internal consistency checks; exit 1 on a failure")
    ap.add_argument("--json", help="write the summary records to this file")
    ap.add_argument("--ceilings", default=CEILINGS)
    a = ap.parse_args()
    cards = load_cards(a.ceilings)
    if a.check:
        print("perf model consistency:")
        failures = check(cards)
        if failures:
            print("PERF MODEL CHECK FAILED:", *failures, sep="\n  ")
            return 1
        print("perf model check: all consistent")
        return 0
    if a.card not in cards:
        raise SystemExit(f"--card {a.card!r}: one of {sorted(cards)}")
    recs = summary(cards)
    if not a.summary:
        label, tokens = SHAPES[a.shape]
        card = cards[a.card]
        src = "measured: " + ", ".join(card.measured) if card.measured else "spec / targets"
        print(f"PREDICTION (no GPU run). {label}; {card.name}: {card.sms} SMs, bf16 {card.bf16_tflops:.0f}, "
              f"fp8 {card.fp8_tflops:.0f}, attention plain {card.attention_plain_tflops:.1f} / mma.sync "
              f"{card.attention_mma_sync_tflops:.0f} / Hopper {card.attention_hopper_tflops:.0f} TFLOP/s, "
              f"HBM {card.hbm_tbs} TB/s ({src})")
        for key in a.paths.split(","):
            if key not in PATHS:
                raise SystemExit(f"--paths: {key!r} is not one of {sorted(PATHS)}")
            rows = evaluate(step_kernels(KONTEXT_DEV, tokens, PATHS[key], card), card)
            print_table(rows, f"{PATHS[key].label}: {label}, {card.name}")
        print(f"\n  for comparison, the modulation as per-step GEMVs (diffusers; in no path): "
              f"{diffusers_modulation_ms(KONTEXT_DEV, card, tokens):.2f} ms/step")
    print_summary(recs)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(recs, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

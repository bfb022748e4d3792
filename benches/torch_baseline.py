#!/usr/bin/env python3
"""PyTorch baseline: diffusers' FluxTransformer2DModel, one denoising step, FLUX.1 Kontext [dev] shapes.

One forward of the real-size transformer (19 double + 38 single blocks, 24 heads x 128, bf16,
random weights) on a 1024^2 edit: 512 text + 4096 target + 4096 context tokens (L = 8704), with
Kontext position ids (context axis 0 = 1), timestep and guidance; attention through PyTorch's
scaled_dot_product_attention (diffusers' default). Eager by default; --compile uses torch.compile
(mode max-autotune-no-cudagraphs), which takes minutes to compile: leave it off inside a
15-minute lease unless that is the point of the run.

Prints the GPU, versions, the card's measured ceilings (bf16 / fp8 GEMM, SDPA alone, copy
bandwidth; --no-ceiling skips them), ms per step (median and min of --steps, CUDA events after
--warmup), achieved TFLOP/s against 165.45 TFLOP (spec 7, counted by flops.py), peak memory,
and last one machine-readable line, `BENCH_JSON {...}`, that benches/compare.py (or anything
else) parses.

    python3 benches/torch_baseline.py                         # GPU: the measurement
    python3 benches/torch_baseline.py --dry-run-cpu-tiny      # CPU, tiny config, f32: a self-test

diffusers: the GPU machine has PyTorch but not diffusers. benches/fetch_wheels.sh downloads the
pure-Python wheel into benches/wheels/ (git-ignored; carry it). When wheels are there this
script unpacks them under $TMPDIR and puts them first on sys.path (diffusers always; a
dependency only when the machine lacks a version diffusers accepts); --no-wheels uses whatever
is installed. The diffusers actually imported is printed (diffusers_file).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import flops  # noqa: E402

# Dependencies of diffusers 0.42.1 that a carried wheel may stand in for, with the lowest
# version diffusers accepts (its dependency_versions_table). Everything else it needs
# (filelock, numpy, regex, requests, Pillow, packaging) is on the GPU image (KINDS.md);
# importlib_metadata is only imported on Python < 3.8.
DEP_MIN = {"huggingface-hub": "1.32.0", "safetensors": "0.8.0"}


def _vtuple(v: str) -> tuple:
    out = []
    for part in v.split("."):
        num = "".join(ch for ch in part if ch.isdigit())
        out.append(int(num) if num else 0)
        if not part.isdigit():
            break
    return tuple(out)


def use_carried_wheels(wheel_dir: str) -> list:
    """Unpacks benches/wheels/*.whl and prepends them to sys.path; returns what was used."""
    wheels = sorted(glob.glob(os.path.join(wheel_dir, "*.whl")))
    if not wheels:
        return []
    import importlib.metadata as md

    root = os.path.join(tempfile.gettempdir(), "kontext-bench-wheels")
    used = []
    for whl in wheels:
        stem = os.path.basename(whl)[: -len(".whl")]
        dist = stem.split("-")[0].lower().replace("_", "-")
        if dist != "diffusers":
            try:
                have = md.version(dist)
            except md.PackageNotFoundError:
                have = None
            need = DEP_MIN.get(dist)
            if have is not None and (need is None or _vtuple(have) >= _vtuple(need)):
                print(f"wheels: {stem}: not used, the machine has {dist} {have}")
                continue
        target = os.path.join(root, stem)
        if not os.path.isdir(target):
            tmp = tempfile.mkdtemp(dir=os.path.dirname(target) if os.path.isdir(root) else None)
            with zipfile.ZipFile(whl) as z:  # a pure-Python wheel unpacked is an install
                z.extractall(tmp)
            os.makedirs(root, exist_ok=True)
            try:
                os.rename(tmp, target)
            except OSError:  # another process got there first
                pass
        sys.path.insert(0, target)
        used.append(stem)
        print(f"wheels: {stem}: on sys.path from {target}")
    return used


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens-text", type=int, help="Lt, T5 tokens (default 512; 8 in the dry run)")
    p.add_argument("--target", type=int, help="Nx, target tokens (default 4096 = 1024^2; 16 in the dry run)")
    p.add_argument("--context", type=int, help="Nc, context tokens (default 4096 = 1024^2, 0 = text-to-image; 16 in the dry run)")
    p.add_argument("--steps", type=int, default=10, help="timed forwards (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed forwards first (default 3)")
    p.add_argument("--compile", action="store_true", help="torch.compile, mode max-autotune-no-cudagraphs (minutes of compiling)")
    p.add_argument("--no-ceiling", action="store_true", help="skip the GEMM / SDPA / copy ceilings")
    p.add_argument("--profile", action="store_true", help="profile one more forward: time per kernel class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", help="also write the JSON result to this file")
    p.add_argument("--wheels", default=os.path.join(HERE, "wheels"), help="carried wheels (default benches/wheels)")
    p.add_argument("--no-wheels", action="store_true", help="use the installed diffusers")
    p.add_argument("--dry-run-cpu-tiny", action="store_true", help="tiny config on the CPU in f32 (no GPU needed)")
    return p.parse_args(argv)


def kontext_ids(torch, text, target, context, device):
    """txt_ids [Lt, 3] zeros; img_ids [Nx + Nc, 3]: target (0, r, c), context (1, r, c) (spec 2.3)."""

    def grid_ids(tokens, index):
        rows, cols = flops.grid(tokens)
        ids = torch.zeros(rows, cols, 3, dtype=torch.float32)
        ids[..., 0] = index
        ids[..., 1] = torch.arange(rows, dtype=torch.float32)[:, None]
        ids[..., 2] = torch.arange(cols, dtype=torch.float32)[None, :]
        return ids.reshape(tokens, 3)

    parts = [grid_ids(target, 0)] + ([grid_ids(context, 1)] if context else [])
    return torch.zeros(text, 3).to(device), torch.cat(parts).to(device)


def init_weights(torch, model, seed, device):
    """Seeded random weights in place: matrices N(0, 1/fan_in), biases N(0, 0.02^2), norm scales 1."""
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p.shape[1] ** -0.5, generator=gen)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.fill_(1.0)


def fmt_flop(x: float) -> str:
    return f"{x / 1e12:.4f} TFLOP" if x >= 1e10 else f"{x / 1e6:.3f} MFLOP"


class Timer:
    """CUDA events on a GPU (synchronised per step), perf_counter on the CPU."""

    def __init__(self, torch, cuda):
        self.torch, self.cuda = torch, cuda

    def time(self, fn, n):
        torch = self.torch
        out = []
        for _ in range(n):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                out.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e3)
        return out


def ceilings(torch, timer):
    """The card's own numbers, same run: bf16 and fp8 GEMM 8192^3, SDPA at the real shape, copy."""
    res = {}
    dev = "cuda"
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    timer.time(lambda: a @ b, 3)
    ms = statistics.median(timer.time(lambda: a @ b, 20))
    res["bf16_gemm_8192_tflops"] = 2 * n**3 / ms / 1e9
    try:  # fp8 e4m3 x e4m3 -> bf16 through cuBLASLt (torch._scaled_mm wants B column-major)
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.to(torch.float8_e4m3fn).t().contiguous().t()
        one = torch.ones((), device=dev, dtype=torch.float32)
        f = lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
        timer.time(f, 3)
        ms = statistics.median(timer.time(f, 20))
        res["fp8_gemm_8192_tflops"] = 2 * n**3 / ms / 1e9
        del a8, b8
    except Exception as e:  # noqa: BLE001
        res["fp8_gemm_8192_error"] = f"{type(e).__name__}: {e}"[:200]
    del a, b
    # SDPA alone, one block's attention at L = 8704, 24 heads x 128 (0.931 TFLOP).
    seq = 8704
    q, k, v = (torch.randn(1, 24, seq, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    timer.time(lambda: sdpa(q, k, v), 3)
    ms = statistics.median(timer.time(lambda: sdpa(q, k, v), 20))
    res["sdpa_8704_ms"] = ms
    res["sdpa_8704_tflops"] = 4 * 24 * 128 * seq * seq / ms / 1e9
    del q, k, v
    # Device-to-device copy, 2 GiB: bytes read + bytes written.
    src = torch.empty(1 << 30, device=dev, dtype=torch.float16).normal_()
    dst = torch.empty_like(src)
    timer.time(lambda: dst.copy_(src), 3)
    ms = statistics.median(timer.time(lambda: dst.copy_(src), 20))
    res["copy_tbps"] = 2 * src.numel() * 2 / ms / 1e9
    del src, dst
    torch.cuda.empty_cache()
    return res


def classify(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("flash", "fmha", "attention", "sdpa", "cudnn_generated_fort_native_sdpa")):
        return "attention"
    if any(s in n for s in ("gemm", "xmma", "cutlass", "nvjet", "sm90_", "matmul", "addmm", "aten::mm", "aten::bmm")):
        return "gemm"
    return "other"


def profile_once(torch, step, cuda):
    """One profiled forward: device time per kernel class and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        if cuda:
            us = getattr(e, "self_device_time_total", None)
            if us is None:
                us = getattr(e, "self_cuda_time_total", 0)
        else:
            if not e.key.startswith("aten::"):
                continue
            us = e.self_cpu_time_total
        if us > 0:
            rows.append((us, e.count, e.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows) or 1.0
    by_class = {}
    for us, _, key in rows:
        c = classify(key)
        by_class[c] = by_class.get(c, 0.0) + us
    print(f"profile ({'device' if cuda else 'CPU'} time of one forward, {total / 1e3:.1f} ms summed):")
    for c, us in sorted(by_class.items(), key=lambda kv: -kv[1]):
        print(f"  {c:<10} {us / 1e3:9.1f} ms  {100 * us / total:5.1f} %")
    for us, count, key in rows[:10]:
        print(f"  {us / 1e3:9.1f} ms {count:6d}x  {key[:100]}")
    return {c: us / 1e3 for c, us in by_class.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()

    fails = flops.self_check(verbose=False)
    if fails:
        print("flops.py disagrees with the spec:", *fails, sep="\n  ")
        return 1

    used_wheels = [] if args.no_wheels else use_carried_wheels(args.wheels)

    import torch

    tiny = args.dry_run_cpu_tiny
    if tiny:
        cfg = flops.TINY
        device, dtype = "cpu", torch.float32
        defaults = (8, 16, 16)
        steps = min(args.steps, 3)
        warmup = min(args.warmup, 1)
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --dry-run-cpu-tiny for the CPU self-test")
            return 2
        cfg = flops.KONTEXT_DEV
        device, dtype = "cuda", torch.bfloat16
        defaults = (512, 4096, 4096)  # 1024^2 edit: 512 text + 4096 target + 4096 context
        steps, warmup = args.steps, args.warmup
    cuda = device == "cuda"
    given = (args.tokens_text, args.target, args.context)
    text, target, context = (d if g is None else g for g, d in zip(given, defaults))

    import diffusers
    from diffusers import FluxTransformer2DModel

    diffusers.utils.logging.set_verbosity_error()

    fl = flops.step_flops(cfg, text, target, context)
    if not tiny and (text, target, context) == (512, 4096, 4096):
        # The 1024^2 edit: 512 text + 4096 target + 4096 context, L = 8704.
        assert abs(fl.total / 1e12 - 165.45) <= 0.01, fl.total

    info = {
        "bench": "torch_baseline",
        "impl": "diffusers FluxTransformer2DModel, " + ("torch.compile max-autotune-no-cudagraphs" if args.compile else "eager"),
        "attention": "torch scaled_dot_product_attention (diffusers default)",
        "diffusers_attn_backend": os.environ.get("DIFFUSERS_ATTN_BACKEND", "native"),
        "config": "tiny (CPU dry run)" if tiny else "FLUX.1 Kontext [dev]",
        "dtype": str(dtype).replace("torch.", ""),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "diffusers_file": diffusers.__file__,
        "wheels_used": used_wheels,
        "tokens": {"text": text, "target": target, "context": context, "seq": fl.seq},
        "tflop_per_step": fl.total / 1e12,
        "tflop_linear": fl.linear / 1e12,
        "tflop_attention": fl.attention / 1e12,
    }
    if cuda:
        prop = torch.cuda.get_device_properties(0)
        info.update(
            gpu=prop.name,
            sm_count=prop.multi_processor_count,
            gpu_mem_gib=prop.total_memory / 2**30,
            cudnn=torch.backends.cudnn.version(),
            sdpa_enabled={
                "flash": torch.backends.cuda.flash_sdp_enabled(),
                "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                "math": torch.backends.cuda.math_sdp_enabled(),
            },
        )
    else:
        info.update(gpu=None, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    print(
        f"{info['config']}: {info['impl']}, {info['dtype']} on {info.get('gpu') or 'CPU'};"
        f" torch {info['torch']} (CUDA {info['cuda']}), diffusers {info['diffusers']} from {os.path.dirname(info['diffusers_file'])}"
    )
    print(
        f"tokens: {text} text + {target} target + {context} context = {fl.seq};"
        f" {fmt_flop(fl.linear)} linear + {fmt_flop(fl.attention)} attention + {fmt_flop(fl.embed)} embed"
        f" = {fmt_flop(fl.total)}/step (spec 7)"
    )

    timer = Timer(torch, cuda)
    if cuda and not args.no_ceiling:
        t0 = time.time()
        try:
            c = info["ceilings"] = ceilings(torch, timer)
            print(
                f"ceilings ({time.time() - t0:.1f}s): bf16 GEMM 8192^3 {c['bf16_gemm_8192_tflops']:.0f} TFLOP/s,"
                f" fp8 GEMM {c.get('fp8_gemm_8192_tflops', float('nan')):.0f} TFLOP/s,"
                f" SDPA L=8704 {c['sdpa_8704_ms']:.2f} ms ({c['sdpa_8704_tflops']:.0f} TFLOP/s),"
                f" copy {c['copy_tbps']:.2f} TB/s"
            )
            if "fp8_gemm_8192_error" in c:
                print(f"  fp8 GEMM: {c['fp8_gemm_8192_error']}")
        except Exception as e:  # noqa: BLE001  (the step timing below stands without them)
            info["ceilings_error"] = f"{type(e).__name__}: {e}"[:300]
            print(f"ceilings failed: {info['ceilings_error']}")
            torch.cuda.empty_cache()

    # Model: built on the device in its dtype (no CPU init, no f32 copy), then seeded weights.
    t0 = time.time()
    torch.manual_seed(args.seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = FluxTransformer2DModel(**cfg.diffusers_kwargs())
    torch.set_default_dtype(prev)
    model.eval().requires_grad_(False)
    init_weights(torch, model, args.seed, device)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == flops.param_counts(cfg)["total"], (n_params, flops.param_counts(cfg))
    assert all(p.dtype == dtype and p.device.type == device for p in model.parameters())
    if cuda:
        torch.cuda.synchronize()
        info["weights_gib"] = torch.cuda.memory_allocated() / 2**30
    info["params"] = n_params
    info["init_s"] = time.time() - t0
    print(f"model: {n_params:,} parameters, built and initialised on {device} in {info['init_s']:.1f}s")

    # Inputs (spec 1.2): packed latents [1, Ni, 64], T5 states [1, Lt, 4096], CLIP pooled [1, 768].
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    ni = target + context
    hidden = torch.randn(1, ni, cfg.in_channels, generator=gen, device=device, dtype=dtype)
    enc = torch.randn(1, text, cfg.joint_attention_dim, generator=gen, device=device, dtype=dtype)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=gen, device=device, dtype=dtype)
    timestep = torch.full((1,), 0.9, device=device, dtype=dtype)  # t in [0, 1]; the model scales by 1000
    guidance = torch.full((1,), 2.5, device=device, dtype=dtype)
    txt_ids, img_ids = kontext_ids(torch, text, target, context, device)

    fwd = torch.compile(model, mode="max-autotune-no-cudagraphs") if args.compile else model
    result = {}

    def step():
        with torch.inference_mode():
            result["out"] = fwd(
                hidden_states=hidden,
                encoder_hidden_states=enc,
                pooled_projections=pooled,
                timestep=timestep,
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=guidance,
                return_dict=False,
            )[0]

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if args.compile:
        print("torch.compile (max-autotune-no-cudagraphs): the first forward compiles, which takes minutes ...", flush=True)
    t0 = time.time()
    warm = timer.time(step, max(warmup, 1))
    info["warmup_s"] = time.time() - t0
    info["warmup_ms"] = warm
    out = result["out"]
    assert tuple(out.shape) == (1, ni, cfg.out_channels), out.shape
    info["output_finite"] = bool(torch.isfinite(out).all())
    info["output_rms"] = float(out.float().pow(2).mean().sqrt())
    print(f"warm-up: {len(warm)} forwards in {info['warmup_s']:.1f}s; output {tuple(out.shape)}, finite {info['output_finite']}, rms {info['output_rms']:.3g}")

    ms = timer.time(step, steps)
    med = statistics.median(ms)
    floors = flops.floors_ms(fl)
    info.update(
        steps=steps,
        warmup=max(warmup, 1),
        ms_all=[round(x, 3) for x in ms],
        ms_median=med,
        ms_min=min(ms),
        ms_mean=statistics.fmean(ms),
        ms_max=max(ms),
        tflops_median=fl.total / med / 1e9,
        tflops_best=fl.total / min(ms) / 1e9,
        floor_ms=floors,
    )
    if cuda:
        info["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        info["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        info["vs_floor_bf16"] = med / floors["bf16"]
    line = f"step: median {med:.2f} ms, min {min(ms):.2f} ms, max {max(ms):.2f} ms over {steps}"
    if cuda:
        line += (
            f" -> {info['tflops_median']:.1f} TFLOP/s (median); {info['vs_floor_bf16']:.2f}x the bf16 floor"
            f" {floors['bf16']:.1f} ms; peak memory {info['peak_mem_gib']:.1f} GiB"
        )
    print(line)

    if args.profile:
        try:
            info["profile_ms"] = profile_once(torch, step, cuda)
        except Exception as e:  # noqa: BLE001  (the timing above stands without it)
            print(f"profile failed: {type(e).__name__}: {e}")
            info["profile_error"] = f"{type(e).__name__}: {e}"[:300]

    if tiny:
        # The FLOP helper against torch's own count of the diffusers forward, at the tiny config
        # here and at the real config and token counts on the meta device (no memory, no math).
        from torch.utils.flop_counter import FlopCounterMode

        def counted(m, dev, dt, lt, nx, nc):
            c = m.config
            ids_t, ids_i = kontext_ids(torch, lt, nx, nc, dev)
            fc = FlopCounterMode(display=False)
            with fc, torch.inference_mode():
                m(
                    hidden_states=torch.zeros(1, nx + nc, c.in_channels, device=dev, dtype=dt),
                    encoder_hidden_states=torch.zeros(1, lt, c.joint_attention_dim, device=dev, dtype=dt),
                    pooled_projections=torch.zeros(1, c.pooled_projection_dim, device=dev, dtype=dt),
                    timestep=torch.zeros(1, device=dev, dtype=dt),
                    guidance=torch.zeros(1, device=dev, dtype=dt),
                    img_ids=ids_i.to(dev),
                    txt_ids=ids_t.to(dev),
                    return_dict=False,
                )
            return fc.get_total_flops()

        got = counted(model, device, dtype, text, target, context)
        want = flops.diffusers_counted_flops(cfg, text, target, context)
        print(f"check: FlopCounterMode on the tiny model {got:,} FLOP, flops.py {want:,} -> {'ok' if got == want else 'MISMATCH'}")
        assert got == want
        t0 = time.time()
        with torch.device("meta"):
            big = FluxTransformer2DModel(**flops.KONTEXT_DEV.diffusers_kwargs())
        assert sum(p.numel() for p in big.parameters()) == flops.param_counts(flops.KONTEXT_DEV)["total"]
        got = counted(big, "meta", torch.float32, 512, 4096, 4096)
        want = flops.diffusers_counted_flops(flops.KONTEXT_DEV, 512, 4096, 4096)
        spec = flops.step_flops(flops.KONTEXT_DEV, 512, 4096, 4096).total
        print(
            f"check: FlopCounterMode on the full model (meta device, L=8704) {got / 1e12:.4f} TFLOP"
            f" = spec {spec / 1e12:.4f} + modulation GEMVs and proj_out on context rows {(want - spec) / 1e9:.2f} GFLOP"
            f" -> {'ok' if got == want else 'MISMATCH'} ({time.time() - t0:.1f}s)"
        )
        assert got == want
        info["flop_check"] = "ok"

    info["total_s"] = time.time() - t_start
    blob = json.dumps(info, sort_keys=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(blob + "\n")
    print("BENCH_JSON " + blob)
    return 0 if info["output_finite"] else 3


if __name__ == "__main__":
    sys.exit(main())

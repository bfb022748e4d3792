#!/usr/bin/env python3
"""Collects `BENCH_JSON {...}` lines from benchmark logs and prints one table with the ratios.

    python3 benches/compare.py $OUT/*.log            # or: ... | python3 benches/compare.py -

Records it understands (any other keys are ignored):
  - torch_baseline.py's: {"bench": "torch_baseline", "dtype": "bfloat16", "gpu": ..., "tokens": {...},
    "ms_median": ..., "ms_min": ..., "ceilings": {"bf16_gemm_8192_tflops": ..., "fp8_gemm_8192_tflops": ...}}
  - the engine's step benchmark, one per precision:
    {"bench": "engine_step", "dtype": "bf16" | "fp8", "gpu": "<torch.cuda / cudaGetDeviceProperties name>",
     "tokens": {"text": 512, "target": 4096, "context": 4096}, "ms_median": ..., "ms_min": ...,
     "correctness_passed": true}
For each engine record: ms, TFLOP/s (spec 7 count), the ratio to the compute floor (at the card's
ceilings measured in the same run when the baseline record has them, else 800 / 1600 TFLOP/s),
the speed-up over the diffusers baseline at the same tokens on the same card, and the issue-7
targets (bf16 <= 250 ms, fp8 <= 160 ms, >= 2x diffusers bf16). A figure whose record lacks
"correctness_passed": true, or whose card differs from the baseline's, is marked as not counting.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flops  # noqa: E402

TARGET_MS = {"bf16": 250.0, "fp8": 160.0}  # issue 7, 1024^2 edit (L = 8704)
TARGET_SPEEDUP = 2.0  # over diffusers eager bf16


def records(lines):
    for line in lines:
        i = line.find("BENCH_JSON ")
        if i >= 0:
            try:
                yield json.loads(line[i + len("BENCH_JSON ") :])
            except json.JSONDecodeError as e:
                print(f"compare: unreadable BENCH_JSON line ({e}): {line[:120]!r}", file=sys.stderr)


def tokens_of(r):
    t = r.get("tokens", {})
    return (t.get("text", 512), t.get("target", 4096), t.get("context", 4096))


def short_dtype(d):
    return {"bfloat16": "bf16", "float8_e4m3fn": "fp8", "float32": "f32"}.get(d, d)


def main(argv) -> int:
    paths = argv or ["-"]
    recs = []
    for p in paths:
        if p == "-":
            recs += list(records(sys.stdin))
        else:
            with open(p, errors="replace") as f:
                recs += list(records(f))
    if not recs:
        print("compare: no BENCH_JSON records found")
        return 1
    base = {}
    for r in recs:
        if r.get("bench") == "torch_baseline":
            base[tokens_of(r)] = r  # the last one per token count
    hdr = f"{'bench':<16} {'dtype':<5} {'L':>5} {'median ms':>10} {'min ms':>8} {'TFLOP/s':>8} {'x floor':>8} {'vs torch':>9}  notes"
    print(hdr)
    print("-" * len(hdr))
    for r in recs:
        tok = tokens_of(r)
        dt = short_dtype(r.get("dtype", "?"))
        ms = r.get("ms_median")
        if ms is None:
            continue
        if str(r.get("config", "")).startswith("tiny"):
            print(f"{r.get('bench', '?'):<16} {dt:<5} {sum(tok):>5} {ms:>10.2f} {r.get('ms_min', float('nan')):>8.2f}  (tiny CPU dry run: no rates)")
            continue
        fl = flops.step_flops(flops.KONTEXT_DEV, *tok)
        b = base.get(tok)
        ceil = (b or {}).get("ceilings", {})
        floors = flops.floors_ms(
            fl,
            ceil.get("bf16_gemm_8192_tflops", flops.H100_BF16_TFLOPS),
            ceil.get("fp8_gemm_8192_tflops", flops.H100_FP8_TFLOPS),
        )
        floor = floors["fp8_linears"] if dt == "fp8" else floors["bf16"]
        notes = []
        vs = ""
        if r.get("bench") != "torch_baseline":
            if r.get("correctness_passed") is not True:
                notes.append("NOT COUNTED: correctness not passed in this run")
            if b is None:
                notes.append("no baseline at these tokens")
            else:
                if b.get("gpu") != r.get("gpu"):
                    notes.append(f"NOT COMPARABLE: card {r.get('gpu')!r} vs baseline {b.get('gpu')!r}")
                speedup = b["ms_median"] / ms
                vs = f"{speedup:.2f}x"
                if tok == (512, 4096, 4096):
                    notes.append(f">= {TARGET_SPEEDUP:.0f}x diffusers: {'met' if speedup >= TARGET_SPEEDUP else 'missed'}")
            if dt in TARGET_MS and tok == (512, 4096, 4096):
                notes.append(f"<= {TARGET_MS[dt]:.0f} ms: {'met' if ms <= TARGET_MS[dt] else 'missed'}")
        else:
            notes.append(f"{r.get('impl', '')}; {r.get('gpu')}")
        print(
            f"{r.get('bench', '?'):<16} {dt:<5} {sum(tok):>5} {ms:>10.2f} {r.get('ms_min', float('nan')):>8.2f}"
            f" {fl.total / ms / 1e9:>8.1f} {ms / floor:>8.2f} {vs:>9}  {'; '.join(notes)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

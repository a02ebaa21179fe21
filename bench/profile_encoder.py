"""Where the Triton encoder's time goes, kernel by kernel, on the GPU (torch.profiler / CUPTI).

    python -m bench.profile_encoder [--batch-sizes 8 1] [--dtype bf16] [--replays 20] [--out PATH]

One vit_base encoder on a seeded random checkpoint, as ``bench.variant_ab`` builds it. For each
batch size: one call (tuning, graph capture), then ``replays`` timed calls with CUDA events
(the encoder's own path: a CUDA graph replay up to ``GRAPH_MAX_BATCH``), then the same calls
under ``torch.profiler``. The kernels of those calls are summed by name and reported in
microseconds per scan (12 layers; per call / B), with their share of the event-timed wall
time: the rest is the gaps between kernels (launch, the tail of one kernel before the next
starts). Attention rows are also given in TFLOP/s (0.747 TFLOP a scan at N = 4500).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile

import brainjepa_fast as bj
from bench.compare import time_forward

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ATTN_TFLOP_PER_SCAN = 12 * 4 * 4500 ** 2 * 64 * 12 / 1e12  # 12 heads x 12 layers


def kernel_table(enc: bj.Encoder, x: torch.Tensor, replays: int, layers: int) -> dict[str, float]:
    """Summed device time (us) per kernel over ``replays`` calls of ``enc(x)``. A kernel that
    runs k * ``layers`` times a call is split by its place in the layer (``name[i]``, i < k):
    the fused matmuls serve two ops each (qkv and fc1, proj and fc2), in that order."""
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            enc(x)
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    per_call = len(events) // replays
    counts: dict[str, int] = defaultdict(int)
    for e in events[:per_call]:
        counts[e.name] += 1
    totals: dict[str, float] = defaultdict(float)
    seen: dict[str, int] = defaultdict(int)
    for i, e in enumerate(events):
        if i % per_call == 0:
            seen.clear()
        k = counts[e.name] // layers if counts[e.name] % layers == 0 else 0
        label = f"{e.name}[{seen[e.name] % k}]" if k > 1 else e.name
        seen[e.name] += 1
        totals[label] += e.device_time
    return dict(totals)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 1])
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("bench/results/profile_encoder.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "base.safetensors"
        bj.save_random_checkpoint(ckpt, seed=0)
        enc = bj.load(ckpt, device="cuda", dtype=DTYPES[args.dtype], backend="triton")
    report = dict(meta=dict(device=torch.cuda.get_device_name(), torch=torch.__version__, dtype=args.dtype,
                            replays=args.replays), batches={})
    for B in args.batch_sizes:
        x = torch.randn(B, 1, 450, 160, device="cuda", generator=torch.Generator("cuda").manual_seed(B))
        timing = time_forward(enc, x, warmup=2, reps=args.replays)
        wall_us = statistics.median(timing.times_ms) * 1e3 / B
        per_scan = {name: us / args.replays / B for name, us in kernel_table(enc, x, args.replays, enc.config.depth).items()}
        busy = sum(per_scan.values())
        print(f"\nB={B} {args.dtype}: {wall_us:.1f} us/scan (events, median), kernels {busy:.1f} us/scan "
              f"({100 * busy / wall_us:.1f}%), gaps {wall_us - busy:.1f}")
        rows = []
        for name, us in sorted(per_scan.items(), key=lambda kv: -kv[1]):
            tflops = ATTN_TFLOP_PER_SCAN / (us * 1e-6) if "attn" in name else None
            rows.append(dict(kernel=name, us_per_scan=us, share=us / wall_us, attention_tflops=tflops))
            extra = f"  {tflops:6.1f} TFLOP/s" if tflops else ""
            print(f"  {us:8.1f} us  {100 * us / wall_us:5.1f}%  {name[:70]}{extra}")
        report["batches"][str(B)] = dict(wall_us_per_scan=wall_us, kernel_us_per_scan=busy, kernels=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

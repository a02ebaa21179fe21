"""Which cuBLAS kernels run the encoder's four matmul shapes, and how fast (GPU).

    python -m bench.cublas_tiles [--batch 8] [--dtype bf16] [--out PATH]

For qkv, fc1, proj and fc2 (``bench.linear_lab.MATMULS``) at M = batch * 4500 tokens:
``torch.nn.functional.linear`` (bias included, no GELU or residual), profiled over 20 calls after a
warm-up with ``torch.profiler``; prints each GPU kernel's name (cuBLAS's kernel names spell the tile
shape, the cluster shape and the schedule: ``nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN``
is a 192x192 tile, K steps of 64 in 4 stages, a 2x1 cluster, the cooperative schedule), its mean
duration and the matmul's TFLOP/s: the tiles, clusters and schedules our Gluon matmul is up against.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from bench.linear_lab import DTYPES, MATMULS, TOKENS_PER_SCAN


def profile_shape(M: int, K: int, N: int, dtype: torch.dtype, calls: int = 20) -> list[dict]:
    """GPU kernels of ``calls`` ``F.linear`` calls [M, K] x [N, K]^T + b: name, calls, mean us."""
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    w = torch.randn(N, K, device="cuda", dtype=dtype) * K ** -0.5
    b = torch.randn(N, device="cuda", dtype=dtype)
    for _ in range(5):
        F.linear(x, w, b)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            F.linear(x, w, b)
        torch.cuda.synchronize()
    total: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            total[event.name] += event.device_time
            count[event.name] += 1
    return [dict(kernel=name, calls=count[name], mean_us=total[name] / count[name])
            for name in total]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--out", type=Path, default=Path("bench/results/cublas_tiles.json"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("cublas_tiles needs a CUDA GPU")
    M = args.batch * TOKENS_PER_SCAN
    rows = []
    for op, (_, K, N, _) in MATMULS.items():
        for k in profile_shape(M, K, N, DTYPES[args.dtype]):
            tflops = 2 * M * N * K / (k["mean_us"] * 1e-6) / 1e12
            rows.append(dict(op=op, M=M, N=N, K=K, **k, tflops_if_whole_matmul=tflops))
            print(f"{op:4s} M={M} N={N} K={K}: {k['mean_us']:8.1f} us x{k['calls']:3d}  "
                  f"{tflops:6.1f} TFLOP/s  {k['kernel']}", flush=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                cuda=torch.version.cuda, dtype=args.dtype, batch=args.batch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

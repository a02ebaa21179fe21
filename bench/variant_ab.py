"""A/B of the Triton encoder with different sets of attention variants to tune over (GPU).

    python -m bench.variant_ab [--arms pingpong,tma,overlap pingpong,tma] [--batch-sizes 1 8]
                               [--rounds 3] [--reps 30] [--out PATH]

One bf16 vit_base encoder on a seeded random checkpoint; each arm sets
``flash_attention.DEFAULT_VARIANTS`` and ``DEFAULT_GLUON_VARIANTS`` (the Gluon ones of the arm),
forgets the attention picks and the captured graphs, runs one untimed call (tuning, capture),
then times ``reps`` calls with CUDA events
(``bench.compare.time_forward``; median ms per scan). Arms alternate within each round, so clock
drift hits them alike. Also records the attention configuration the tuner picked per arm and
the error against the fp32 PyTorch path.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Optional

import torch

import brainjepa_fast as bj
import brainjepa_kernels.flash_attention as fa
from bench.compare import time_forward
from brainjepa_kernels._runtime import _TUNED
from tests.helpers import rel_err


def set_arm(enc: bj.Encoder, variants: tuple[str, ...]) -> None:
    """Tune attention over ``variants`` from the next call on (Gluon variants among them are
    offered where the Gluon kernel runs): forget picks and graphs."""
    for name in variants:
        if name not in fa.VARIANTS and name not in fa.GLUON_VARIANTS:
            raise SystemExit(f"--arms: unknown attention variant {name!r}")
    fa.DEFAULT_VARIANTS = tuple(v for v in variants if v in fa.VARIANTS)
    fa.DEFAULT_GLUON_VARIANTS = tuple(v for v in variants if v in fa.GLUON_VARIANTS)
    for key in [k for k in _TUNED if k[0] == "flash_attention"]:
        del _TUNED[key]
    if enc._triton_runner is not None:
        enc._triton_runner._graphs.clear()


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", nargs="+", default=["pingpong,tma,overlap", "pingpong,tma"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--out", type=Path, default=Path("bench/results/variant_ab.json"))
    args = p.parse_args(argv)
    arms = [tuple(a.split(",")) for a in args.arms]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "base.safetensors"
        bj.save_random_checkpoint(ckpt, seed=0)
        ref_enc = bj.load(ckpt, device="cuda", backend="torch")
        enc = bj.load(ckpt, device="cuda", dtype=torch.bfloat16, backend="triton")
    rows = []
    for B in args.batch_sizes:
        x = torch.randn(B, 1, 450, 160, device="cuda", generator=torch.Generator("cuda").manual_seed(B))
        with torch.no_grad():
            ref = ref_enc(x).float()
        for rnd in range(args.rounds):
            for arm in arms:
                set_arm(enc, arm)
                timing = time_forward(enc, x, warmup=1, reps=args.reps)  # the untimed first call tunes and captures
                ms = statistics.median(timing.times_ms)
                err = rel_err(timing.output.float(), ref)
                picks = sorted({str(v) for k, v in _TUNED.items() if k[0] == "flash_attention"})
                row = dict(batch=B, round=rnd, arm=",".join(arm), ms_per_scan=ms / B, rel_err=err, picks=picks)
                rows.append(row)
                print(f"B={B} round {rnd} {row['arm']:24s} {ms / B:7.3f} ms/scan  err {err:.2e}  {picks}", flush=True)
    summary = {}
    for B in args.batch_sizes:
        for arm in arms:
            name = ",".join(arm)
            vals = [r["ms_per_scan"] for r in rows if r["batch"] == B and r["arm"] == name]
            summary[f"B={B} {name}"] = dict(median=statistics.median(vals), min=min(vals), max=max(vals))
            print(f"B={B} {name:24s} median {statistics.median(vals):.3f} (min {min(vals):.3f}, max {max(vals):.3f})")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, reps=args.reps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, summary=summary, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

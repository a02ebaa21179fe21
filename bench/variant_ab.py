"""A/B of the Triton encoder with different sets of attention variants to tune over (GPU).

    python -m bench.variant_ab [--arms pingpong,tma,overlap pingpong,tma lab:128s3ap] [--batch-sizes 1 8]
                               [--rounds 3] [--reps 30] [--matmul-arms ws ws-rowstats triton] [--out PATH]

One bf16 vit_base encoder on a seeded random checkpoint; each arm sets
``flash_attention.DEFAULT_VARIANTS`` and ``DEFAULT_GLUON_VARIANTS`` (the Gluon ones of the arm),
or, as ``lab:SPEC``, runs attention with the lab kernel of ``bench.attention_ws_lab`` in
configuration SPEC (``flash_attention`` replaced for that arm),
with several ``--matmul-arms`` each arm runs once per matmul arm (:data:`MATMUL_ARMS`): ``ws``
(the Gluon matmul offered, passing LayerNorm statistics in chunks), ``ws-rowstats`` (offered,
statistics from ``row_stats``: ``brainjepa_fast.triton_backend.CHUNK_STATS``), ``triton`` (not
offered: ``kernels.matmul_hopper.OFFERED``), labelled after the attention variants; each forgets the tuners' picks and
the captured graphs, runs one untimed call (tuning, capture),
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
import brainjepa_fast.triton_backend as triton_backend
import brainjepa_kernels.matmul_hopper as matmul_hopper
from bench.compare import time_forward
from brainjepa_kernels._runtime import _TUNED
from tests.helpers import rel_err


#: matmul arm -> (Gluon matmul offered, chunk statistics)
MATMUL_ARMS = {"ws": (True, True), "ws-rowstats": (True, False), "triton": (False, False)}

#: The package's attention entry point, restored by every arm that is not a lab arm.
FLASH_ATTENTION = fa.flash_attention


def lab_attention(spec: str):
    """``flash_attention``'s stand-in for arm ``lab:SPEC``: qkv [B, N, 3, H, 64] -> [B, N, H*64]
    by :func:`bench.attention_ws_lab.attention_ws` in configuration SPEC."""
    from bench.attention_ws_lab import attention_ws, parse_config

    try:
        kwargs = parse_config(spec)
    except ValueError as exc:
        raise SystemExit(f"--arms: {exc}") from exc

    def attention(qkv: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        return attention_ws(qkv, **kwargs, out=out)
    return attention


def set_arm(enc: bj.Encoder, variants: tuple[str, ...], matmul: str = "ws") -> None:
    """Tune attention over ``variants`` from the next call on (Gluon variants among them are
    offered where the Gluon kernel runs), or run it with the lab kernel (``("lab:SPEC",)``),
    and run the matmuls as the ``matmul`` arm says (:data:`MATMUL_ARMS`): forget picks and
    graphs."""
    if any(name.startswith("lab:") for name in variants):
        if len(variants) > 1:
            raise SystemExit(f"--arms: a lab arm is one lab:SPEC alone, got {','.join(variants)}")
        fa.flash_attention = lab_attention(variants[0][len("lab:"):])
    else:
        for name in variants:
            if name not in fa.VARIANTS and name not in fa.GLUON_VARIANTS:
                raise SystemExit(f"--arms: unknown attention variant {name!r}")
        fa.flash_attention = FLASH_ATTENTION
    fa.DEFAULT_VARIANTS = tuple(v for v in variants if v in fa.VARIANTS)
    fa.DEFAULT_GLUON_VARIANTS = tuple(v for v in variants if v in fa.GLUON_VARIANTS)
    matmul_hopper.OFFERED, triton_backend.CHUNK_STATS = MATMUL_ARMS[matmul]
    for key in [k for k in _TUNED if k[0] in ("flash_attention", "layernorm_linear", "linear_residual")]:
        del _TUNED[key]
    if enc._triton_runner is not None:
        enc._triton_runner._graphs.clear()


def arm_name(arm: tuple[str, ...], matmul: str, matmul_arms: list[str]) -> str:
    """The arm's label: its attention variants, plus the matmul arm when there are several."""
    return ",".join(arm) + (f" {matmul}" if len(matmul_arms) > 1 else "")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", nargs="+", default=["pingpong,tma,overlap", "pingpong,tma"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--matmul-arms", nargs="+", default=["ws"], choices=sorted(MATMUL_ARMS),
                   help="matmul arms to run each attention arm with")
    p.add_argument("--out", type=Path, default=Path("bench/results/variant_ab.json"))
    args = p.parse_args(argv)
    arms = [(tuple(a.split(",")), matmul) for a in args.arms for matmul in args.matmul_arms]
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
            for arm, matmul in arms:
                set_arm(enc, arm, matmul)
                timing = time_forward(enc, x, warmup=1, reps=args.reps)  # the untimed first call tunes and captures
                ms = statistics.median(timing.times_ms)
                err = rel_err(timing.output.float(), ref)
                picks = sorted(f"{k[0]}{tuple(k[1:4])}: {v}" for k, v in _TUNED.items())  # (M or B, N, K or H)
                name = arm_name(arm, matmul, args.matmul_arms)
                row = dict(batch=B, round=rnd, arm=name, ms_per_scan=ms / B, rel_err=err, picks=picks)
                rows.append(row)
                attn = [p for p in picks if p.startswith("flash_attention")]
                ws_picks = sum("WsConfig" in p for p in picks)
                print(f"B={B} round {rnd} {row['arm']:28s} {ms / B:7.3f} ms/scan  err {err:.2e}  {attn} "
                      f"Gluon matmul picked for {ws_picks} of {len(picks) - len(attn)} matmul shapes", flush=True)
    summary = {}
    for B in args.batch_sizes:
        for arm, matmul in arms:
            name = arm_name(arm, matmul, args.matmul_arms)
            vals = [r["ms_per_scan"] for r in rows if r["batch"] == B and r["arm"] == name]
            summary[f"B={B} {name}"] = dict(median=statistics.median(vals), min=min(vals), max=max(vals))
            print(f"B={B} {name:24s} median {statistics.median(vals):.3f} (min {min(vals):.3f}, max {max(vals):.3f})")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, reps=args.reps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, summary=summary, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Lab for the Gluon attention kernel (``kernels/flash_attention_hopper.py``, variant ``"overlap"``
of ``flash_attention``): its configurations beside the package's tuned ``flash_attention``.

    python -m bench.gluon_attention_lab                  # GPU: check, then time against flash_attention
    python -m bench.gluon_attention_lab --compile-only   # any machine: sm_90 compile, registers, waits

Configurations are ``BLOCK_MxBLOCK_NxSTAGES[uUNROLL]`` (see the kernel module). On the GPU each is
checked against the fp32 reference (bf16 kernel bound) on a poisoned output, then timed as a
replayed CUDA graph; the tuned ``flash_attention`` and its pick launched directly are timed twice,
alternating. ``--compile-only`` prints, per configuration, the PTX order of wgmma issues, waits and
exponentials (the main loop's overlap), registers, spills, and the SASS counts of wgmma and of
waits for them (ptxas's serialization shows as one wait per wgmma): the things to check before
spending device time.

History (2026-11-27): written in session 4; first GPU run in session 5 (H100): correct, but 387
against 426 TFLOP/s at B=8, because ptxas had serialized every wgmma (kernel docstring); fixed,
then two steps per loop iteration: 428.8 at B=8 and 390.8 at B=1 (tuned Triton kernel: 428.3 and
377-380 in the same run). A warp-specialized version (producer warp for the TMA loads) was correct
but slower (commit 76238cc, removed in f61c8a4;
``bench/results/2026-11-27-h100-gluon/gluon_lab_4_ws.log``).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import triton

from brainjepa_kernels.flash_attention import HEAD_DIM, AttnConfig
from brainjepa_kernels.flash_attention_hopper import _attn_fwd_overlap, kernel_args, launch


def gluon_attention(qkv: torch.Tensor, block_m: int = 64, block_n: int = 128, stages: int = 3, unroll: int = 2,
                    anchored: int = 0, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The package's overlap kernel with one lab configuration: qkv [B, N, 3, H, 64] -> [B, N, H*64]."""
    B, N, _, H, D = qkv.shape
    if out is None:
        out = torch.empty(B, N, H * D, device=qkv.device, dtype=qkv.dtype)
    launch(qkv, out, AttnConfig(block_m, block_n, block_m // 16, stages), unroll=unroll, anchored=bool(anchored))
    return out


def compile_for_hopper(block_m: int, block_n: int, stages: int, unroll: int = 1, anchored: int = 0,
                       dtype: torch.dtype = torch.bfloat16) -> dict:
    """sm_90 compile without a GPU: registers, spills, shared memory and the main loop's order of
    wgmma issues, waits and ex2 (from the PTX)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from bench.attention_lab import compile_sm90, cubin_usage

    qkv = torch.empty(8, 4500, 3, 12, HEAD_DIM, dtype=dtype)
    out = torch.empty(8, 4500, 12 * HEAD_DIM, dtype=dtype)
    args, meta, _ = kernel_args(qkv, out, AttnConfig(block_m, block_n, block_m // 16, stages), unroll=unroll,
                                anchored=bool(anchored))
    kernel = compile_sm90(_attn_fwd_overlap, args, meta, GluonASTSource)
    row = dict(block_m=block_m, block_n=block_n, stages=stages, unroll=unroll, anchored=anchored,
               smem=kernel.metadata.shared, sequence=ptx_sequence(kernel.asm["ptx"]))
    row.update(cubin_usage(kernel))
    row.update(sass_waits(kernel))
    return row


def ptx_sequence(ptx: str) -> str:
    """The PTX's order of wgmma issues (``mma``), commits, waits (``wait0``, ``wait1``), exponentials
    (``ex2``) and mbarrier waits, runs counted: ``"mmax4 commit ex2x64 wait0 ..."``."""
    seq: list[list] = []
    for line in ptx.splitlines():
        t = line.strip()
        word = ("mma" if t.startswith("wgmma.mma_async") else "commit" if t.startswith("wgmma.commit_group")
                else "wait" + t.split()[-1].rstrip(";") if t.startswith("wgmma.wait_group")
                else "ex2" if "ex2.approx" in t else "mbar.wait" if "mbarrier.try_wait" in t else None)
        if word:
            if seq and seq[-1][0] == word:
                seq[-1][1] += 1
            else:
                seq.append([word, 1])
    return " ".join(f"{w}x{n}" if n > 1 else w for w, n in seq)


def warp_specialized_ptx(ptx: str) -> dict:
    """Of a warp-specialized kernel's PTX: the partitions' ``setmaxnreg`` values (``"inc 232"``,
    ...) and the waits that leave one wgmma group in flight (``wait_group 1``)."""
    setmaxnreg = re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)
    return dict(setmaxnreg=sorted({f"{kind} {n}" for kind, n in setmaxnreg}),
                ptx_wait1=len(re.findall(r"wgmma\.wait_group\.sync\.aligned\s+1;", ptx)))


def sass_text(kernel) -> str:
    """The SASS of a compiled kernel (``nvdisasm``)."""
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        return subprocess.run([str(nvdisasm), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout


def sass_waits(kernel) -> dict:
    """wgmma instructions (``HGMMA``) and waits for them (``WARPGROUP.DEPBAR``) in the SASS: ptxas
    serializes every wgmma of a kernel (one wait after each, its warning C7514) when it cannot
    prove that no other instruction touches an accumulator in flight, whatever the PTX says."""
    sass = sass_text(kernel)
    return dict(hgmma=sass.count("HGMMA."), depbar=sass.count("WARPGROUP.DEPBAR"))


def run_gpu(shapes: list[tuple[int, int]], configs: list[tuple[int, int, int, int]]) -> int:
    """Check each configuration against the fp32 reference (the bf16 kernel bound), then time it
    and the package's tuned ``flash_attention`` as replayed CUDA graphs (``graph_time_ms``, median;
    as the encoder runs them), into preallocated outputs."""
    from bench.attention_lab import random_qkv, tflops
    from brainjepa_kernels._runtime import _TUNED, graph_time_ms
    from brainjepa_kernels.flash_attention import attention_reference, flash_attention, launch
    from tests.helpers import KERNEL_TOL, rel_err

    bound = KERNEL_TOL[("cuda", torch.bfloat16)]
    failed = 0
    for B, N in shapes:
        qkv = random_qkv(B, N, torch.bfloat16)
        H = qkv.shape[3]
        ref = attention_reference(qkv)
        out = torch.empty(B, N, H * HEAD_DIM, device=qkv.device, dtype=qkv.dtype)
        flash_attention(qkv, out)  # tunes
        variant, pick = next(v for k, v in _TUNED.items() if k[:5] == ("flash_attention", B, N, H, qkv.dtype))
        for _ in range(2):  # public call and its pick launched directly, alternating
            ms = graph_time_ms(lambda: flash_attention(qkv, out))
            print(f"B={B} N={N} flash_attention (tuned): {ms:.3f} ms {tflops(B, N, ms):.1f} TFLOP/s", flush=True)
            ms = graph_time_ms(lambda: launch(qkv, out, pick, variant))
            print(f"B={B} N={N} its pick {variant} {pick} launched directly: {ms:.3f} ms {tflops(B, N, ms):.1f} "
                  f"TFLOP/s", flush=True)
        for cfg in configs:
            name = "gluon {}x{} s{} u{}{}".format(*cfg[:4], " anchored" if cfg[4] else "")
            out.fill_(float("nan"))  # poisoned: a row left unwritten fails the check
            try:
                err = rel_err(gluon_attention(qkv, *cfg, out=out), ref)
            except Exception as exc:  # a lab: report and go on
                print(f"B={B} N={N} {name}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                failed += 1
                continue
            ok = err <= bound
            failed += not ok
            ms = graph_time_ms(lambda: gluon_attention(qkv, *cfg, out=out))
            print(f"B={B} N={N} {name}: err {err:.2e} {'ok' if ok else 'WRONG'}  {ms:.3f} ms "
                  f"{tflops(B, N, ms):.1f} TFLOP/s", flush=True)
    return 1 if failed else 0


def print_compiles(configs: list, compile_fn: Callable[[Any], dict]) -> int:
    """``--compile-only``: one JSON line per configuration (``compile_fn(config)``); at the first
    that fails, its error and exit status 1."""
    for cfg in configs:
        try:
            print(json.dumps(compile_fn(cfg)), flush=True)
        except Exception as exc:
            print(f"{cfg}: {type(exc).__name__}: {str(exc)[-1500:]}", flush=True)
            return 1
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compile-only", action="store_true")
    p.add_argument("--configs", nargs="+",
                   default=["64x128x3u2", "64x128x3", "64x64x3", "128x64x4"],
                   help="BLOCK_MxBLOCK_NxSTAGES[uUNROLL][a] (BLOCK_M = 16 * warps; BLOCK_N 64 or 128; STAGES >= 3; "
                        "UNROLL 1 or 2; a: softmax anchored at the first key block)")
    args = p.parse_args(argv)
    configs = []
    for spec in args.configs:
        found = re.fullmatch(r"(64|128)x(64|128)x(\d+)(?:u([12]))?(a?)", spec)
        if not found:
            p.error(f"--configs: expected BLOCK_MxBLOCK_NxSTAGES[uUNROLL][a] such as 64x128x3u2a, got {spec!r}")
        bm, bn, st, un, anchored = found.groups()
        configs.append((int(bm), int(bn), int(st), int(un or 1), int(anchored == "a")))
    if args.compile_only:
        return print_compiles(configs, lambda cfg: compile_for_hopper(*cfg))
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (or --compile-only)")
    return run_gpu([(8, 4500), (1, 4500), (2, 777), (1, 13500)], configs)


if __name__ == "__main__":
    sys.exit(main())

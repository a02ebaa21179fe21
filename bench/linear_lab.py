"""GPU lab for the fused linear kernels: correctness, then time against cuBLAS.

    python -m bench.linear_lab [--dtypes bf16,fp16] [--batches 8,1] [--out PATH]

For each encoder matmul (qkv: LayerNorm + [768 -> 2304]; fc1: LayerNorm + [768 -> 3072] + GELU;
proj: [768 -> 768] + residual; fc2: [3072 -> 768] + residual) at M = B * 4500 tokens it checks
every variant against the float32 PyTorch reference (relative error, KERNEL_TOL bounds) and
times it as a replayed CUDA graph (``triton.testing.do_bench_cudagraph``, median: kernel time
without the host's launch cost, as the encoder runs them), on fresh random inputs without zeros:

* ``cfg <tile>``: each default candidate of ``kernels._runtime.matmul_candidates`` (persistent
  grid, host TMA descriptors): 128x256 vs 128x128 vs 64x128 tiles, subtiled epilogue, flattened
  or not. ``best`` is what the launcher's tuner would pick.
* ``non-persistent``: the best tile with one program per tile (first dtype only, as the next two).
* ``device-desc``: the best tile with in-kernel (device-side) descriptors.
* ``+row_stats`` (LayerNorm ops): the best configuration including the ``row_stats`` pass (the
  op as the encoder calls it without shared statistics: the first qkv, and all off Hopper).
* ``chunk stats`` (Gluon configurations): LayerNorm ops merging given chunk statistics instead
  of reading (mean, rstd); residual ops also writing them (the encoder's path on Hopper).
* cuBLAS equivalents: ``F.linear`` on a pre-normalised input (the bare GEMM), ``+F.gelu``,
  ``layer_norm+F.linear`` (the unfused op), ``addmm(residual)+bias``.

TFLOP/s counts the GEMM's 2*M*N*K for every row. It also times the memory-bound kernels
(row_stats, layernorm, patch_embed) against PyTorch in GB/s. Results are written after every
measurement to a JSON file (default bench/results/linear_lab.json), so a crash loses nothing
measured before it. About a minute on an H100, mostly compilation.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import triton

from brainjepa_kernels._runtime import MatmulConfig, candidates_for
from brainjepa_kernels.layernorm import (STATS_CHUNK, chunk_stats_reference, layernorm, layernorm_reference, row_stats,
                                        row_stats_reference)
from brainjepa_kernels.layernorm_linear import fold_layernorm, layernorm_linear_folded, layernorm_linear_reference
from brainjepa_kernels.linear_residual import linear_residual, linear_residual_reference
from brainjepa_kernels.patch_embed import patch_embed, patch_embed_reference
from tests.helpers import KERNEL_TOL, rel_err

TOKENS_PER_SCAN = 4500  # 450 ROIs x 10 time patches
ROIS, FRAMES, DIM = 450, 160, 768

#: op -> (LayerNorm-fused?, K, N, activation)
MATMULS = {
    "qkv": (True, 768, 2304, None),
    "fc1": (True, 768, 3072, "gelu"),
    "proj": (False, 768, 768, None),
    "fc2": (False, 3072, 768, None),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def short(cfg) -> str:
    """128x256x64 s3 w8 [sub] [nofl] [np] [dd] [2/sm]; ws 128x128x64 s4 for the Gluon kernel."""
    if not isinstance(cfg, MatmulConfig):
        return f"ws {cfg.block_m}x{cfg.block_n}x{cfg.block_k} s{cfg.stages}"
    flags = [("sub", cfg.subtile), ("nofl", not cfg.flatten), ("np", not cfg.persistent),
             ("dd", cfg.device_descriptors), (f"{cfg.programs_per_sm}/sm", cfg.programs_per_sm > 1)]
    return f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} s{cfg.num_stages} w{cfg.num_warps}" + "".join(
        f" {name}" for name, on in flags if on)


class Lab:
    """Collects measurements and rewrites the JSON file after each one."""

    def __init__(self, out_path: Path):
        self.out_path = out_path
        self.rows: list[dict] = []
        self.meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                         started=time.strftime("%Y-%m-%d %H:%M:%S"))
        self.t0 = time.time()

    def save(self) -> None:
        self.meta["elapsed_s"] = round(time.time() - self.t0, 1)
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        self.out_path.write_text(json.dumps(dict(meta=self.meta, results=self.rows), indent=1))

    def measure(self, op: str, batch: int, dtype: torch.dtype, variant: str, fn: Callable[[], object],
                out: Optional[torch.Tensor], ref: Optional[torch.Tensor], work: float, unit: str,
                config: Optional[MatmulConfig] = None) -> dict:
        """Run ``fn`` once (compiles; checks ``out`` against ``ref`` if given), then time it.
        ``work``: FLOPs (unit TFLOP/s) or bytes (unit GB/s). Returns the recorded row (with
        ``ms`` unless it erred)."""
        row = dict(op=op, batch=batch, dtype=str(dtype).replace("torch.", ""), variant=variant,
                   config=dataclasses.asdict(config) if config else None)
        try:
            if out is not None:
                out.fill_(float("nan"))
            fn()
            torch.cuda.synchronize()
            if ref is not None:
                err = rel_err(out, ref)
                row.update(rel_err=err, ok=bool(err <= KERNEL_TOL[("cuda", dtype)]))
            ms = triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
            rate = work / ms / (1e9 if unit == "TFLOP/s" else 1e6)
            row.update(ms=ms, rate=rate, unit=unit)
        except Exception as err:  # a variant that does not compile or fit is a result, not the end
            row.update(error=f"{type(err).__name__}: {str(err)[:300]}")
        self.rows.append(row)
        self.save()
        status = row.get("error") or (f"{row['ms'] * 1e3:9.1f} us {row['rate']:7.1f} {unit}"
                                      + (f"  err {row['rel_err']:.1e}{'' if row['ok'] else ' FAIL'}" if ref is not None else ""))
        print(f"{op:11s} B={batch} {row['dtype']:8s} {variant:40s} {status}", flush=True)
        return row


def _matmul_problem(op: str, batch: int, dtype: torch.dtype):
    fused_ln, K, N, activation = MATMULS[op]
    M = batch * TOKENS_PER_SCAN
    x = (torch.randn(M, K, device="cuda") + 0.5 * torch.randn(M, 1, device="cuda")).to(dtype)
    w = (torch.randn(N, K, device="cuda") / math.sqrt(K)).to(dtype)
    b = (0.5 * torch.randn(N, device="cuda")).to(dtype)
    ln_w = (1.0 + 0.3 * torch.randn(K, device="cuda")).to(dtype)
    ln_b = (0.3 * torch.randn(K, device="cuda")).to(dtype)
    residual = torch.randn(M, N, device="cuda").to(dtype)
    return fused_ln, M, K, N, activation, x, w, b, ln_w, ln_b, residual


def bench_matmul(lab: Lab, op: str, batch: int, dtype: torch.dtype, variants: bool) -> None:
    """Candidates and cuBLAS for one op; ``variants``: also the best tile non-persistent, with
    device-side descriptors and (LayerNorm ops) with row_stats."""
    fused_ln, M, K, N, act, x, w, b, ln_w, ln_b, residual = _matmul_problem(op, batch, dtype)
    flops = 2.0 * M * N * K
    out = torch.empty(M, N, device="cuda", dtype=dtype)
    if fused_ln:
        folded = fold_layernorm(ln_w, ln_b, w, b)
        stats = row_stats(x)
        chunks = chunk_stats_reference(x)
        ref = layernorm_linear_reference(x.float(), ln_w.float(), ln_b.float(), w.float(), b.float(), act)

        def run(cfg: MatmulConfig, mode: str = "given") -> Callable[[], object]:
            given = dict(given=dict(stats=stats), row_stats={}, chunks=dict(chunk_stats=chunks))[mode]
            return lambda: layernorm_linear_folded(x, folded, act, out=out, configs=[cfg], **given)
    else:
        ref = linear_residual_reference(x.float(), w.float(), b.float(), residual.float())
        chunks = torch.empty(M, triton.cdiv(N, STATS_CHUNK), 2, device="cuda")

        def run(cfg: MatmulConfig, mode: str = "given") -> Callable[[], object]:
            written = dict(chunk_stats=chunks) if mode == "chunks" else {}
            return lambda: linear_residual(x, w, b, residual, out=out, configs=[cfg], **written)

    def measure(variant: str, cfg: MatmulConfig, mode: str = "given") -> dict:
        return lab.measure(op, batch, dtype, variant, run(cfg, mode), out, ref, flops, "TFLOP/s", cfg)

    rows = {cfg: measure(f"cfg {short(cfg)}", cfg) for cfg in candidates_for(x)}
    timed = {cfg: row["ms"] for cfg, row in rows.items() if "ms" in row and row.get("ok")}
    if timed:
        best = min(timed, key=timed.get)
        rows[best]["best"] = True
        lab.save()
        print(f"{'':11s} best: {short(best)}")
    for cfg in [c for c in timed if not isinstance(c, MatmulConfig)]:
        measure(f"chunk stats {short(cfg)}", cfg, "chunks")
    if timed and variants and isinstance(best, MatmulConfig):
        measure(f"non-persistent {short(best)}", dataclasses.replace(best, persistent=False))
        measure(f"device-desc {short(best)}", dataclasses.replace(best, device_descriptors=True))
    if timed and fused_ln:
        measure(f"+row_stats {short(best)}", best, "row_stats")

    # cuBLAS equivalents
    if fused_ln:
        xn = F.layer_norm(x, (K,), ln_w, ln_b, 1e-6)
        lab.measure(op, batch, dtype, "cublas F.linear (pre-normalised x)", lambda: F.linear(xn, w, b),
                    None, None, flops, "TFLOP/s")
        if act == "gelu":
            lab.measure(op, batch, dtype, "cublas F.linear+F.gelu", lambda: F.gelu(F.linear(xn, w, b)),
                        None, None, flops, "TFLOP/s")
        lab.measure(op, batch, dtype, "cublas layer_norm+F.linear" + ("+F.gelu" if act else ""),
                    lambda: layernorm_linear_reference(x, ln_w, ln_b, w, b, act), None, None, flops, "TFLOP/s")
    else:
        lab.measure(op, batch, dtype, "cublas F.linear", lambda: F.linear(x, w, b), None, None, flops, "TFLOP/s")
        lab.measure(op, batch, dtype, "cublas addmm(residual)+bias",
                    lambda: torch.addmm(residual, x, w.t()).add_(b), None, None, flops, "TFLOP/s")


def bench_memory_bound(lab: Lab, batch: int, dtype: torch.dtype) -> None:
    M = batch * TOKENS_PER_SCAN
    x = (torch.randn(M, DIM, device="cuda") + torch.randn(M, 1, device="cuda")).to(dtype)
    g = (1.0 + 0.3 * torch.randn(DIM, device="cuda")).to(dtype)
    s = (0.3 * torch.randn(DIM, device="cuda")).to(dtype)
    nbytes = x.numel() * x.element_size()
    stats = torch.empty(M, 2, device="cuda")
    lab.measure("row_stats", batch, dtype, "triton", lambda: row_stats(x, out=stats), stats,
                row_stats_reference(x.float()), nbytes, "GB/s")
    lab.measure("row_stats", batch, dtype, "torch var_mean", lambda: torch.var_mean(x, dim=-1, correction=0),
                None, None, nbytes, "GB/s")
    y = torch.empty_like(x)
    lab.measure("layernorm", batch, dtype, "triton", lambda: layernorm(x, g, s, out=y), y,
                layernorm_reference(x.float(), g.float(), s.float()), 2 * nbytes, "GB/s")
    lab.measure("layernorm", batch, dtype, "torch F.layer_norm", lambda: layernorm_reference(x, g, s),
                None, None, 2 * nbytes, "GB/s")

    scan = torch.randn(batch, 1, ROIS, FRAMES, device="cuda") + 1.0
    pw = (torch.randn(DIM, 1, 1, 16, device="cuda") / 4).to(dtype)
    pb = (0.5 * torch.randn(DIM, device="cuda")).to(dtype)
    pos = (0.5 * torch.randn(TOKENS_PER_SCAN, DIM, device="cuda")).to(dtype)
    tokens = torch.empty(batch, TOKENS_PER_SCAN, DIM, device="cuda", dtype=dtype)
    pbytes = scan.numel() * 4 + tokens.numel() * tokens.element_size() + pos.numel() * pos.element_size()
    lab.measure("patch_embed", batch, dtype, "triton (x fp32)", lambda: patch_embed(scan, pw, pb, pos, out=tokens),
                tokens, patch_embed_reference(scan, pw.float(), pb.float(), pos.float()), pbytes, "GB/s")
    lab.measure("patch_embed", batch, dtype, "torch conv2d+transpose+pos",
                lambda: patch_embed_reference(scan, pw, pb, pos), None, None, pbytes, "GB/s")


def summary(lab: Lab) -> None:
    """Best Triton variant vs the best cuBLAS row per (op, batch, dtype)."""
    print(f"\n{'op':11s} {'B':>2s} {'dtype':8s} {'best triton (correct)':42s} {'rate':>8s} {'cuBLAS/torch best':36s} "
          f"{'rate':>8s}")
    keys = dict.fromkeys((r["op"], r["batch"], r["dtype"]) for r in lab.rows)
    for key in keys:
        rows = [r for r in lab.rows if (r["op"], r["batch"], r["dtype"]) == key and "rate" in r]
        ours = [r for r in rows if (r["config"] is not None or r["variant"].startswith("triton")) and r.get("ok")]
        theirs = [r for r in rows if r["config"] is None and not r["variant"].startswith("triton")]
        if not ours or not theirs:
            continue
        a = max(ours, key=lambda r: r["rate"])
        c = max(theirs, key=lambda r: r["rate"])
        print(f"{key[0]:11s} {key[1]:2d} {key[2]:8s} {a['variant']:42s} {a['rate']:8.1f} {c['variant']:36s} "
              f"{c['rate']:8.1f} {a['unit']}")
    failed = [r for r in lab.rows if r.get("ok") is False or "error" in r]
    print(f"\n{len(failed)} variant(s) failed or erred; {len(lab.rows)} rows in {lab.out_path} "
          f"({time.time() - lab.t0:.0f} s)")


def compile_ws_only() -> list[dict]:
    """sm_90 compile of every Gluon configuration (``kernels.matmul_hopper.CONFIGS``) with the
    epilogue of each encoder matmul at B=8, with and without chunk statistics (merged by the
    LayerNorm epilogue, written by the residual one), without a GPU: registers at launch, spills,
    shared memory, the partitions' ``setmaxnreg`` values, the PTX waits that leave one product in flight
    (``wait_group 1``), and the SASS counts of wgmma and of waits for them (one per wgmma would
    mean ptxas serialized them)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from bench.attention_lab import compile_sm90, cubin_usage
    from bench.gluon_attention_lab import sass_waits, warp_specialized_ptx
    from brainjepa_kernels.matmul_hopper import CONFIGS, _matmul_ws_kernel, kernel_args

    rows = []
    for op, (fused_ln, K, N, activation) in MATMULS.items():
        M = 8 * TOKENS_PER_SCAN
        x, w, out = (torch.empty(*shape, dtype=torch.bfloat16) for shape in ((M, K), (N, K), (M, N)))
        for cfg, chunked in itertools.product(CONFIGS, (False, True)):
            chunks = torch.empty(M, triton.cdiv(K if fused_ln else N, STATS_CHUNK), 2) if chunked else None
            if fused_ln:
                args, meta, _ = kernel_args(x, w, out, cfg, "layernorm", torch.empty(N), torch.empty(N),
                                            None if chunked else torch.empty(M, 2), gelu=activation == "gelu",
                                            chunk_stats=chunks)
            else:
                args, meta, _ = kernel_args(x, w, out, cfg, "residual", torch.empty(N), residual=out,
                                            chunk_stats=chunks)
            kernel = compile_sm90(_matmul_ws_kernel, args, meta, GluonASTSource)
            row = dict(op=op, config=dataclasses.asdict(cfg), chunk_stats=chunked, smem=kernel.metadata.shared,
                       **warp_specialized_ptx(kernel.asm["ptx"]), **sass_waits(kernel), **cubin_usage(kernel))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="bf16,fp16", help="comma list of bf16, fp16")
    parser.add_argument("--batches", default="8,1", help="comma list of batch sizes (M = B * 4500)")
    parser.add_argument("--ops", default=",".join(MATMULS), help="comma list of matmuls (qkv, fc1, proj, fc2)")
    parser.add_argument("--no-memory-bound", action="store_true", help="skip row_stats, layernorm, patch_embed")
    parser.add_argument("--out", type=Path, default=Path("bench/results/linear_lab.json"))
    parser.add_argument("--compile-ws", action="store_true",
                        help="compile the Gluon kernel's configurations for sm_90 and report (no GPU needed)")
    args = parser.parse_args(argv)
    if args.compile_ws:
        compile_ws_only()
        return 0
    if not torch.cuda.is_available():
        print("linear_lab needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    lab = Lab(args.out)
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    for dtype in dtypes:
        for batch in batches:
            for op in args.ops.split(","):
                bench_matmul(lab, op, batch, dtype, variants=dtype == dtypes[0])
            if not args.no_memory_bound:
                bench_memory_bound(lab, batch, dtype)
    summary(lab)
    return 0


if __name__ == "__main__":
    sys.exit(main())

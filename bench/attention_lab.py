"""GPU lab for the flash-attention variants: correctness, then time against torch SDPA.

    python -m bench.attention_lab [--variants a,b] [--dtypes bf16,fp16] [--first-config] [--out PATH]
    python -m bench.attention_lab --compile-only [--variants ...] [--dtypes ...]   # no GPU needed

On CUDA, for every variant of :data:`kernels.flash_attention.VARIANTS` and every one of its
configurations: run once on the standard scan (qkv [8, 4500, 3, 12, 64]) into a NaN-poisoned
``out`` and check it against :func:`attention_reference` (relative error, ``KERNEL_TOL``), check
a ragged shape ([1, 777, 3, 12, 64]), then time [8, 4500] and [1, 4500] with
``triton.testing.do_bench`` (median, L2 flushed) on fresh N(0, 1) inputs. Per variant and shape
the fastest correct configuration is marked ``best`` (what the launcher's tuner would pick);
then the public :func:`flash_attention` (tuned over the default variants' configurations) at
both shapes. Alongside: ``torch.nn.functional.scaled_dot_product_attention`` with the flash and
cuDNN backends on q/k/v permuted views of the same buffer (no copies). TFLOP/s =
4*B*H*N^2*64 / t. Also recorded per kernel: registers, spills and shared memory.

Results go to a JSON file (default bench/results/attention_lab.json) rewritten after every
measurement, so a compiler crash loses nothing measured before it (rerun the rest with
``--variants``). Mostly compilation (6 kernels per dtype); ``--dtypes bf16`` halves it.

``--compile-only`` compiles every variant and configuration for sm_90 on any machine (ptxas
ships with Triton) and reports registers, spills (stack), shared memory and the tensor-core
precision of the products (``precision``: fp32 must say tf32x3): a preflight before spending
device time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import triton

from brainjepa_kernels._runtime import _TUNED
from brainjepa_kernels.flash_attention import VARIANTS, AttnConfig, attention_reference, flash_attention, launch
from tests.helpers import KERNEL_TOL, rel_err

DEVICE = "cuda"
HEADS, HEAD_DIM = 12, 64
SHAPES = ((8, 4500), (1, 4500))  # (B, N) timed
CHECK_SHAPES = ((8, 4500), (1, 777))  # (B, N) checked against the reference
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def short(cfg: AttnConfig) -> str:
    regs = f" r{cfg.maxnreg}" if cfg.maxnreg else ""
    return f"{cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}{regs}"


def tflops(B: int, N: int, ms: float) -> float:
    return 4.0 * B * HEADS * N * N * HEAD_DIM / ms / 1e9


def random_qkv(B: int, N: int, dtype: torch.dtype) -> torch.Tensor:
    """A fresh [B, N, 3, H, 64] projection output, N(0, 1) (never zeros): scores of std ~1."""
    return torch.randn(B, N, 3, HEADS, HEAD_DIM, device=DEVICE).to(dtype)


#: variant -> configurations timed besides the variant's own (``--extra-configs``).
EXTRA_CONFIGS: dict[str, tuple[AttnConfig, ...]] = {}


def parse_extra(spec: str) -> tuple[str, AttnConfig]:
    """``"tma:64x128w4s2"`` -> ("tma", AttnConfig(64, 128, 4, 2)); a suffix ``r168`` caps the
    registers per thread (``maxnreg``)."""
    found = re.fullmatch(r"(\w+):(\d+)x(\d+)w(\d+)s(\d+)(?:r(\d+))?", spec)
    if not found or found.group(1) not in VARIANTS:
        raise argparse.ArgumentTypeError(f"expected VARIANT:BMxBNwWARPSsSTAGES[rMAXNREG] (e.g. tma:64x128w4s2), "
                                         f"got {spec!r}")
    return found.group(1), AttnConfig(*(int(g) if g else None for g in found.groups()[1:]))


def configs_of(variant: str, dtype: torch.dtype) -> tuple[AttnConfig, ...]:
    return VARIANTS[variant].configs_for(dtype) + EXTRA_CONFIGS.get(variant, ())


def kernel_info(kernel) -> dict:
    """Registers, spills, shared memory of a compiled kernel."""
    return dict(regs=getattr(kernel, "n_regs", None), spills=getattr(kernel, "n_spills", None),
                smem=kernel.metadata.shared)


class Lab:
    """Collects measurements and rewrites the JSON file after each one."""

    def __init__(self, out_path: Path):
        self.out_path = out_path
        self.rows: list[dict] = []
        self.meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                         started=time.strftime("%Y-%m-%d %H:%M:%S"), heads=HEADS, head_dim=HEAD_DIM)
        self.t0 = time.time()

    def save(self) -> None:
        self.meta["elapsed_s"] = round(time.time() - self.t0, 1)
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        self.out_path.write_text(json.dumps(dict(meta=self.meta, results=self.rows), indent=1))

    def record(self, row: dict) -> dict:
        self.rows.append(row)
        self.save()
        if "error" in row:
            status = row["error"]
        elif "ms" in row:
            status = f"{row['ms']:8.3f} ms {row['tflops']:6.1f} TFLOP/s"
        else:
            status = f"err {row['rel_err']:.1e}{'' if row['ok'] else ' FAIL'}"
        extra = "".join(f" {k}={row[k]}" for k in ("regs", "spills") if row.get(k) is not None)
        print(f"[{time.time() - self.t0:6.1f}s] {row['name']:34s} {row['dtype']:9s} B={row['B']} N={row['N']:5d} "
              f"{status}{extra}", flush=True)
        return row


def check(lab: Lab, name: str, variant: str, cfg: AttnConfig, dtype: torch.dtype,
          refs: dict[tuple, tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Every check shape into a NaN-poisoned out; records errors. True when all pass."""
    ok = True
    for B, N in CHECK_SHAPES:
        qkv, ref = refs[(B, N)]
        row = dict(name=name, variant=variant, config=dataclasses.asdict(cfg), dtype=str(dtype)[6:], B=B, N=N)
        try:
            out = torch.full((B, N, HEADS * HEAD_DIM), float("nan"), device=DEVICE, dtype=dtype)
            t = time.time()
            kernel = launch(qkv, out, cfg, variant)
            torch.cuda.synchronize(DEVICE)
            err = rel_err(out, ref)
            row.update(rel_err=err, ok=bool(err <= KERNEL_TOL[("cuda", dtype)]), first_call_s=round(time.time() - t, 2),
                       **kernel_info(kernel))
        except Exception as exc:  # a variant that does not compile or fit is a result, not the end
            row.update(error=f"{type(exc).__name__}: {str(exc)[:300]}", ok=False)
        ok = ok and row["ok"]
        lab.record(row)
    return ok


def time_op(lab: Lab, name: str, B: int, N: int, dtype: torch.dtype, make_fn: Callable[[torch.Tensor], Callable],
            graph: bool = False, **fields) -> dict:
    """Time ``make_fn(qkv)()`` on a fresh qkv [B, N, 3, H, 64]: ``triton.testing.do_bench``
    (eager calls, host work included where the GPU waits for it), or with ``graph`` a replayed
    CUDA graph (``do_bench_cudagraph``: GPU time only)."""
    row = dict(name=name, dtype=str(dtype)[6:], B=B, N=N, **fields)
    try:
        fn = make_fn(random_qkv(B, N, dtype))
        fn()
        if graph:
            ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        else:
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        row.update(ms=ms, tflops=tflops(B, N, ms))
    except Exception as exc:
        row.update(error=f"{type(exc).__name__}: {str(exc)[:300]}")
    return lab.record(row)


def bench_variant(lab: Lab, variant: str, dtype: torch.dtype, refs: dict, first_only: bool) -> Optional[float]:
    """Check and time every configuration (or the first); mark the best per shape. Returns the
    best ms at the first timed shape."""
    timed: dict[int, dict] = {}
    cfgs = configs_of(variant, dtype)
    for cfg in cfgs[:1] if first_only else cfgs:
        name = f"{variant} {short(cfg)}"
        if not check(lab, name, variant, cfg, dtype, refs):
            continue
        for B, N in SHAPES:
            def make_fn(qkv, cfg=cfg):
                out = torch.empty(qkv.shape[0], qkv.shape[1], HEADS * HEAD_DIM, device=DEVICE, dtype=dtype)
                return lambda: launch(qkv, out, cfg, variant)
            row = time_op(lab, name, B, N, dtype, make_fn, variant=variant, config=dataclasses.asdict(cfg))
            if "ms" in row and (B not in timed or row["ms"] < timed[B]["ms"]):
                timed[B] = row
    for row in timed.values():
        row["best"] = True
        print(f"{'':9s} best {row['name']} B={row['B']}: {row['ms']:.3f} ms {row['tflops']:.1f} TFLOP/s")
    lab.save()
    return timed[SHAPES[0][0]]["ms"] if SHAPES[0][0] in timed else None


def bench_sdpa(lab: Lab, dtype: torch.dtype) -> None:
    """torch SDPA (flash, cuDNN backends) on q/k/v permuted views [B, H, N, 64] of qkv; a backend
    that rejects the strided views is timed on contiguous copies made outside the timed call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def make_fn(backend, contiguous: bool):
        def make(qkv):
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
            if contiguous:
                q, k, v = q.contiguous(), k.contiguous(), v.contiguous()

            def fn():
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return fn
        return make

    for label, backend in (("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION)):
        for B, N in SHAPES:
            if "error" in time_op(lab, label, B, N, dtype, make_fn(backend, False)):
                time_op(lab, label + " (contiguous copies)", B, N, dtype, make_fn(backend, True))


def print_summary(lab: Lab) -> None:
    """One line per (dtype, variant or SDPA backend): the best configuration's ms and TFLOP/s per
    timed shape."""
    best: dict[tuple[str, str], dict[int, dict]] = {}
    for row in lab.rows:
        if "ms" not in row or (row.get("variant") and not row.get("best")):
            continue
        name = row.get("variant") or row["name"]
        best.setdefault((row["dtype"], name), {})[row["B"]] = row
    header = "".join(f" | B={B} N={N}: ms  TFLOP/s  config      " for B, N in SHAPES)
    print(f"\n{'dtype':9s} {'variant':34s}{header}")

    def cell(row: Optional[dict]) -> str:
        if row is None:
            return f" | {'-':>36s}"
        cfg = short(AttnConfig(**row["config"])) if row.get("config") else ""
        return f" | {row['ms']:8.3f} {row['tflops']:7.1f}  {cfg:17s}"

    for (dtype, name), by_b in best.items():
        print(f"{dtype:9s} {name:34s}" + "".join(cell(by_b.get(B)) for B, _ in SHAPES))


def run_lab(variants: list[str], dtypes: list[str], out_path: Path, first_only: bool) -> None:
    lab = Lab(out_path)
    lab.meta.update(variants=variants, dtypes=dtypes)
    for dname in dtypes:
        dtype = DTYPES[dname]
        torch.manual_seed(0)
        refs = {}
        for B, N in CHECK_SHAPES:
            qkv = random_qkv(B, N, dtype)
            refs[(B, N)] = (qkv, torch.cat([attention_reference(qkv[b:b + 1]) for b in range(B)]))
        if dtype != torch.float32:
            bench_sdpa(lab, dtype)
        best = {v: bench_variant(lab, v, dtype, refs, first_only) for v in variants}
        # The tuned public path (what the encoder calls): the default variants' union.
        for B, N in SHAPES:
            time_op(lab, "flash_attention (default, tuned)", B, N, dtype, lambda qkv: (lambda: flash_attention(qkv)))
            time_op(lab, "flash_attention (default, graph)", B, N, dtype, lambda qkv: (lambda: flash_attention(qkv)),
                    graph=True)
            picked = [cfg for key, cfg in _TUNED.items() if key[:5] == ("flash_attention", B, N, HEADS, dtype)]
            print(f"{'':9s} tuner's pick for B={B} N={N}: {picked}")
        ranked = sorted(((ms, v) for v, ms in best.items() if ms), key=lambda x: x[0])
        print(f"{dname}: fastest at B={SHAPES[0][0]}: " + ", ".join(
            f"{v} {tflops(*SHAPES[0], ms):.0f}" for ms, v in ranked[:5]) + " TFLOP/s")
        del refs
        torch.cuda.empty_cache()
    print_summary(lab)
    print(f"wrote {out_path} ({time.time() - lab.t0:.0f}s)")


# ---------------------------------------------------------------------------------------------
# --compile-only: sm_90 compilation without a GPU
# ---------------------------------------------------------------------------------------------


def compile_for_hopper(variant: str, cfg: AttnConfig, dtype: torch.dtype, B: int = 8, N: int = 4500) -> dict:
    """Compile the kernel :func:`launch` would run for qkv [B, N, 3, 12, 64] for sm_90 (CPU
    tensors stand in for the GPU ones; nothing runs). Returns smem, registers, stack (spills) and
    the ``input_precision`` of the products (as Triton's IR names it)."""
    import brainjepa_kernels.flash_attention as fa

    qkv = torch.empty(B, N, 3, HEADS, HEAD_DIM, dtype=dtype)
    out = torch.empty(B, N, HEADS * HEAD_DIM, dtype=dtype)
    args, meta = fa.kernel_args(qkv, out, cfg, variant)
    t = time.time()
    kernel = compile_sm90(fa._attn_fwd, args, meta)
    # The f32 x f32 products' input_precision (16-bit products: their own dtype, whatever it says).
    precision = sorted(set(re.findall(r"inputPrecision = (\w+)", kernel.asm["ttir"])))
    precision = (",".join(precision) or "tf32") if dtype == torch.float32 else str(dtype)[6:]
    row = dict(smem=kernel.metadata.shared, precision=precision,
               compile_s=round(time.time() - t, 1))
    row.update(cubin_usage(kernel))
    return row


def compile_sm90(fn, args: tuple, meta: dict, source_cls=None):
    """Compile the JIT function ``fn`` (Triton, or Gluon with ``source_cls`` = ``GluonASTSource``)
    for sm_90 as a launch ``fn[grid](*args, **meta)`` would, without a GPU (CPU tensors stand in
    for the GPU ones); returns Triton's compiled kernel (``asm``, ``metadata``)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    kwargs = dict(meta, debug=False, instrumentation_mode="")
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    source = (source_cls or ASTSource)(fn, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__)


def cubin_usage(kernel) -> dict:
    """Registers and stack bytes (spills) of a compiled kernel, from ``cuobjdump -res-usage``."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"attention_lab_{os.getpid()}.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    usage = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    cubin.unlink()
    row = {}
    for key, name in (("REG", "regs"), ("STACK", "stack")):
        found = re.search(rf"{key}:(\d+)", usage)
        row[name] = int(found.group(1)) if found else None
    return row


def run_compile_only(variants: list[str], dtypes: list[str], first_only: bool) -> list[dict]:
    rows = []
    for dname in dtypes:
        for variant in variants:
            cfgs = configs_of(variant, DTYPES[dname])
            for cfg in cfgs[:1] if first_only else cfgs:
                row = dict(variant=variant, dtype=dname, config=dataclasses.asdict(cfg))
                try:
                    row.update(compile_for_hopper(variant, cfg, DTYPES[dname]))
                except Exception as exc:
                    row.update(error=f"{type(exc).__name__}: {str(exc)[-300:]}")
                rows.append(row)
                status = row.get("error") or (f"smem {row['smem']:6d} regs {row['regs']} stack {row['stack']} "
                                              f"precision {row['precision']} ({row['compile_s']}s)")
                print(f"{variant:14s} {dname:5s} {short(cfg):16s} {status}", flush=True)
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated keys of VARIANTS")
    parser.add_argument("--dtypes", default="bf16,fp16", help="comma-separated: bf16, fp16, fp32")
    parser.add_argument("--out", type=Path, default=Path("bench/results/attention_lab.json"))
    parser.add_argument("--compile-only", action="store_true", help="compile for sm_90 and report; no GPU needed")
    parser.add_argument("--first-config", action="store_true", help="each variant's first configuration only")
    parser.add_argument("--extra-configs", nargs="*", type=parse_extra, default=[],
                        help="more configurations to time, VARIANT:BMxBNwWARPSsSTAGES (e.g. tma:64x128w4s2)")
    args = parser.parse_args(argv)
    for variant, cfg in args.extra_configs:
        EXTRA_CONFIGS[variant] = EXTRA_CONFIGS.get(variant, ()) + (cfg,)
    variants = [v for v in args.variants.split(",") if v]
    dtypes = [d for d in args.dtypes.split(",") if d]
    unknown = [v for v in variants if v not in VARIANTS] + [d for d in dtypes if d not in DTYPES]
    if unknown:
        parser.error(f"unknown variants/dtypes: {unknown} (variants: {list(VARIANTS)}, dtypes: {list(DTYPES)})")
    if args.compile_only:
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            parser.error("--compile-only compiles real kernels: unset TRITON_INTERPRET")
        rows = run_compile_only(variants, dtypes, args.first_config)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(meta=dict(target="cuda:90", triton=triton.__version__), results=rows),
                                       indent=1))
        return 1 if any("error" in r for r in rows) else 0
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --compile-only)")
    run_lab(variants, dtypes, args.out, args.first_config)
    return 0


if __name__ == "__main__":
    sys.exit(main())

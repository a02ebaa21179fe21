"""Compare the original Brain-JEPA code path, PyTorch and our kernels, in one process on one device.

    python -m bench.compare                          # every variant, B = 1, 8, 32, scan scaling
    python -m bench.compare --batch-sizes 1 8        # other batch sizes
    python -m bench.compare --quick --out /tmp/bq    # smoke run: vit_base, B=1, 32 frames, 1 rep

Variants (all on the same seeded random checkpoint and the same seeded N(0, 1) scans):

* ``original_fp32``: :class:`~brainjepa_fast.original.OriginalVisionTransformer`, the original
  code path with attention written out as ``softmax(q kᵀ) v`` (an explicit N x N matrix).
* ``torch_fp32``: ``Encoder(backend="torch")`` in float32 (SDPA): **the reference** every other
  variant's output is compared with.
* ``torch_bf16``: the same with bfloat16 weights (eager).
* ``compile_bf16``: ``torch.compile`` of the bf16 torch-backend forward; its compile time (the
  first call) is reported apart from the steady-state timings.
* ``triton_bf16`` / ``triton_fp16`` / ``triton_fp32``: ``Encoder(backend="triton")``, our
  kernels (fp32 runs 3xTF32 products).

For each variant and workload: median ms per batch and per sample (CUDA events on a GPU,
``perf_counter`` on the CPU; warm-up calls excluded), TFLOP/s against :func:`flops_per_sample`,
peak memory (GPU), ‖out − ref‖ / ‖ref‖ and cosine similarity against the reference, and a FLAG
when the error exceeds the variant's tolerance. Results go to ``--out`` (default
``bench/results/<date>-<device>/``): ``results.md``, ``results.json``, ``plot.png``.

On the CPU (the default without CUDA) only the original path and the torch backend in fp32 and
bf16 run, at B = 1; Triton and ``torch.compile`` rows are listed as skipped.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import importlib.metadata
import json
import math
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from brainjepa_fast.config import ENCODER_TOLERANCE, N_ROIS, PATCH_T, PRETRAIN_FRAMES, get_config, parse_precision

ROOT = Path(__file__).resolve().parent.parent
MODEL = get_config("vit_base")
GIB = 1024**3

Forward = Callable[[torch.Tensor], torch.Tensor]


# -- work per sample ---------------------------------------------------------------------------
def tokens_for(frames: int) -> int:
    """Tokens of one scan of ``frames`` frames: 450 ROIs x ``frames / 16`` time patches."""
    return N_ROIS * (frames // PATCH_T)


def flops_per_sample(n_tokens: int, dim: int = MODEL.embed_dim, depth: int = MODEL.depth,
                     mlp_dim: int = MODEL.mlp_dim, patch: int = PATCH_T) -> float:
    """Forward FLOPs of one scan of ``n_tokens`` tokens (a multiply-add counts 2).

    ``depth * (2 N D (3D + D + 2 * mlp) + 4 N² D) + 2 N * patch * D``: the qkv, proj, fc1 and fc2
    matmuls, q kᵀ and p v over all heads, and the patch-embedding conv. LayerNorm, softmax, GELU
    and the residual adds are not counted. 1.511e12 for the standard 4500 tokens.
    """
    linears = 2 * n_tokens * dim * (3 * dim + dim + 2 * mlp_dim)
    attention = 4 * n_tokens * n_tokens * dim
    return float(depth * (linears + attention) + 2 * n_tokens * patch * dim)


STANDARD_TFLOP_PER_SAMPLE = 1.511
if round(flops_per_sample(tokens_for(PRETRAIN_FRAMES)) / 1e12, 3) != STANDARD_TFLOP_PER_SAMPLE:
    raise AssertionError("flops_per_sample(4500) no longer gives 1.511 TFLOP")


# -- variants ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One way to run the encoder: implementation, precision, and its error tolerance."""

    key: str
    label: str
    impl: str  # "original" | "torch" | "compile" | "triton"
    precision: str  # "fp32" | "bf16" | "fp16"
    tolerance: float  # bound on ‖out − ref‖ / ‖ref‖ against the fp32 reference

    @property
    def dtype(self) -> torch.dtype:
        return parse_precision(self.precision)


REFERENCE = "torch_fp32"
TOL = ENCODER_TOLERANCE
VARIANTS: Tuple[Variant, ...] = (
    Variant("original_fp32", "original code path (softmax(q kᵀ) v), fp32", "original", "fp32", TOL["torch", "fp32"]),
    Variant("torch_fp32", "PyTorch SDPA, fp32 (reference)", "torch", "fp32", TOL["torch", "fp32"]),
    Variant("torch_bf16", "PyTorch SDPA, bf16", "torch", "bf16", TOL["torch", "bf16"]),
    Variant("compile_bf16", "torch.compile SDPA, bf16", "compile", "bf16", TOL["torch", "bf16"]),
    Variant("triton_bf16", "ours (Triton), bf16", "triton", "bf16", TOL["triton", "bf16"]),
    Variant("triton_fp16", "ours (Triton), fp16", "triton", "fp16", TOL["triton", "fp16"]),
    Variant("triton_fp32", "ours (Triton), fp32 (3xTF32 products)", "triton", "fp32", TOL["triton", "fp32"]),
)
VARIANT_BY_KEY = {v.key: v for v in VARIANTS}
CPU_VARIANTS = ("original_fp32", "torch_fp32", "torch_bf16")


# -- settings ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """``batch`` scans of 450 ROIs x ``frames`` frames."""

    batch: int
    frames: int

    @property
    def tokens(self) -> int:
        return tokens_for(self.frames)

    @property
    def name(self) -> str:
        return f"B={self.batch} T={self.frames}"


@dataclass
class Settings:
    """Everything one run measures, resolved from the command line and the device."""

    device: torch.device
    batch_sizes: List[int]
    frames: int  # scan length of the batch-size table
    scaling_frames: List[int]  # scan lengths of the scaling table (B = 1)
    variants: List[str]
    variants_explicit: bool  # --variants given (else the device's default set)
    warmup: int
    reps: int
    seed: int
    weights: Optional[Path]
    compile_mode: str
    quick: bool
    out: Path
    command: str

    def workloads(self) -> List[Workload]:
        """Batch-size workloads, then the scan lengths at B = 1, without repeats."""
        items = [Workload(b, self.frames) for b in self.batch_sizes]
        items += [Workload(1, f) for f in self.scaling_frames]
        return list(dict.fromkeys(items))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.compare",
        description="Time and check the Brain-JEPA encoder: original code path, PyTorch, torch.compile, "
                    "Triton kernels. Writes results.md, results.json and plot.png.")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="default 1 8 32 (CUDA), 1 (CPU)")
    p.add_argument("--frames", type=int, help="scan length of the batch-size table (default 160)")
    p.add_argument("--scaling-frames", type=int, nargs="*",
                   help="scan lengths timed at B=1 for the scaling table (default 160 320 480; none to skip)")
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANT_BY_KEY),
                   help=f"variants to run (default: all on CUDA, {' '.join(CPU_VARIANTS)} on CPU); "
                        f"{REFERENCE} always runs")
    p.add_argument("--warmup", type=int, help="untimed calls before timing, the first included (default 3 CUDA, 1 CPU)")
    p.add_argument("--reps", type=int, help="timed repetitions (default 10 CUDA, 3 CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random checkpoint and the inputs")
    p.add_argument("--weights", type=Path, help="a real checkpoint instead of the seeded random one")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode (default 'default')")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: B=1, 32 frames, scaling 16 32, 1 warm-up, 1 rep (same code paths)")
    p.add_argument("--out", type=Path, help="output folder (default bench/results/<date>-<device>/)")
    p.add_argument("--fail-on-flag", action="store_true", help="exit 3 when an error exceeds its tolerance")
    return p.parse_args(argv)


def resolve_settings(args: argparse.Namespace, argv: Sequence[str]) -> Settings:
    """Fill unset options from the device defaults (or ``--quick``) and check them."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")
    cuda = device.type == "cuda"
    if args.quick:
        defaults = dict(batch_sizes=[1], frames=32, scaling_frames=[16, 32], warmup=1, reps=1)
    elif cuda:
        defaults = dict(batch_sizes=[1, 8, 32], frames=160, scaling_frames=[160, 320, 480], warmup=3, reps=10)
    else:
        defaults = dict(batch_sizes=[1], frames=160, scaling_frames=[160, 320, 480], warmup=1, reps=3)

    def pick(name: str):
        value = getattr(args, name)
        return defaults[name] if value is None else value

    frames, scaling = pick("frames"), pick("scaling_frames")
    for f in [frames, *scaling]:
        if f <= 0 or f % PATCH_T:
            raise SystemExit(f"error: scan lengths must be positive multiples of {PATCH_T} frames, got {f}")
    batch_sizes = pick("batch_sizes")
    if any(b <= 0 for b in batch_sizes):
        raise SystemExit(f"error: batch sizes must be positive, got {batch_sizes}")
    chosen = args.variants or (list(VARIANT_BY_KEY) if cuda else list(CPU_VARIANTS))
    variants = [REFERENCE] + [v.key for v in VARIANTS if v.key in chosen and v.key != REFERENCE]
    warmup, reps = max(1, pick("warmup")), max(1, pick("reps"))
    command = "python -m bench.compare" + (" " + shlex.join(argv) if argv else "")
    out = args.out or ROOT / "bench" / "results" / f"{dt.date.today().isoformat()}-{device_slug(device)}"
    return Settings(device, list(batch_sizes), frames, list(scaling), variants, bool(args.variants), warmup, reps,
                    args.seed, args.weights, args.compile_mode, args.quick, Path(out), command)


# -- environment -------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    """The card's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_slug(device: torch.device) -> str:
    """``nvidia-h100-80gb-hbm3`` / ``cpu``: the device part of the default output folder."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def _command_output(cmd: Sequence[str], cwd: Optional[Path] = None) -> Optional[str]:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def _package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def gpu_driver(device: torch.device) -> Optional[str]:
    """NVIDIA driver version from ``nvidia-smi``; else the CUDA driver API version torch sees."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    out = _command_output(["nvidia-smi", f"--id={index}", "--query-gpu=driver_version", "--format=csv,noheader"])
    if out:
        return out.splitlines()[0].strip()
    getter = getattr(torch._C, "_cuda_getDriverVersion", None)
    if getter is not None:
        v = getter()
        return f"CUDA driver API {v // 1000}.{v % 1000 // 10} (nvidia-smi unavailable)"
    return None


def capture_environment(device: torch.device) -> Dict[str, Any]:
    """Versions, device and settings that decide the numbers (recorded with every result)."""
    env: Dict[str, Any] = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": str(device),
        "device_name": device_name(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "numpy": _package_version("numpy"),
        "brainjepa_fast": _package_version("brainjepa-fast"),
        "cuda": torch.version.cuda,
        "cpu": device_name(torch.device("cpu")),
        "cpu_threads": torch.get_num_threads(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "git_commit": _command_output(["git", "rev-parse", "HEAD"], ROOT),
        "git_dirty": None,
    }
    status = _command_output(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"], ROOT)
    if env["git_commit"] is not None and status is not None:
        env["git_dirty"] = bool(status)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "driver": gpu_driver(device),
            "cudnn": torch.backends.cudnn.version(),
            "gpu_memory_gib": round(props.total_memory / GIB, 1),
            "sm_count": props.multi_processor_count,
            "compute_capability": f"{props.major}.{props.minor}",
        })
    return env


def use_exact_fp32() -> None:
    """fp32 PyTorch paths in true fp32: no TF32 in cuBLAS or cuDNN (the patch-embed conv)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


# -- models ------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


def build_original(weights: Path, device: torch.device, frames: int) -> torch.nn.Module:
    """The original encoder for scans of ``frames`` frames, loaded from ``weights``.

    Its ``emb_h`` table is the checkpoint's for the pretraining length (160 frames); for other
    lengths the original code builds its own with the same formula, so that key is not loaded.
    """
    from brainjepa_fast.checkpoint import read_component
    from brainjepa_fast.original import OriginalVisionTransformer
    from brainjepa_fast.position import load_gradient

    model = OriginalVisionTransformer(load_gradient(None), MODEL.name, img_size=(N_ROIS, frames))
    state = read_component(weights, "target_encoder")
    if state["pos_embed_proj.emb_h"].shape != model.pos_embed_proj.emb_h.shape:
        del state["pos_embed_proj.emb_h"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"pos_embed_proj.emb_h"}:
        raise RuntimeError(f"original model: missing {missing}, unexpected {unexpected}")
    model.gradient_pos_embed = model.gradient_pos_embed.to(device)  # not a buffer: move it once
    return model.to(device).eval()


def build_encoder(variant: Variant, weights: Path, device: torch.device) -> torch.nn.Module:
    """``brainjepa_fast.load`` with the variant's dtype and backend (compile: the torch one)."""
    import brainjepa_fast

    backend = "triton" if variant.impl == "triton" else "torch"
    return brainjepa_fast.load(weights, device=device, dtype=variant.dtype, backend=backend)


def make_forward(variant: Variant, model: torch.nn.Module, frames: int, compile_mode: str) -> Forward:
    """The callable timed for ``variant``. ``compile``: ``torch.compile`` of the encoder's
    PyTorch forward (``Encoder.forward_torch``, what ``backend="torch"`` runs after its input
    checks), static shapes, one compiled graph per workload."""
    if variant.impl != "compile":
        return model
    compiled = torch.compile(model.forward_torch, mode=compile_mode, dynamic=False)
    n_t = frames // PATCH_T
    return lambda x: compiled(x, n_t)


def skip_reason(variant: Variant, device: torch.device) -> Optional[str]:
    """Why ``variant`` cannot run on ``device`` at all (``None`` when it can)."""
    if variant.impl == "triton" and device.type != "cuda":
        return "Triton kernels need a CUDA GPU"
    return None


def free_memory(device: torch.device) -> Optional[int]:
    """Bytes a new allocation can use on ``device`` (``None`` when unknown)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def original_bytes_per_sample(tokens: int) -> int:
    """Peak working memory of one scan on the original path: two live ``heads x N x N`` fp32
    score matrices (q kᵀ and its scaled copy, then the softmax) plus the MLP activations."""
    return 2 * MODEL.num_heads * tokens * tokens * 4 + 8 * tokens * MODEL.mlp_dim * 4


def original_chunk(work: Workload, device: torch.device) -> Tuple[int, str]:
    """Samples per call that fit the original path's N x N scores (0: not even one)."""
    need = original_bytes_per_sample(work.tokens)
    free = free_memory(device)
    if free is None:
        return work.batch, ""
    fit = int(0.8 * free // need)
    if fit < 1:
        return 0, (f"original path needs ~{need / GIB:.1f} GiB per scan for its N x N attention scores, "
                   f"{free / GIB:.1f} GiB free")
    if fit >= work.batch:
        return work.batch, ""
    calls = -(-work.batch // fit)
    chunk = -(-work.batch // calls)  # equal slices: 32 scans fitting 25 run as 2 x 16
    return chunk, (f"run {chunk} scan(s) per call: {work.batch} scans' N x N scores need "
                   f"~{work.batch * need / GIB:.1f} GiB")


def chunked(model: torch.nn.Module, chunk: int) -> Forward:
    """``model`` over the batch in slices of ``chunk`` scans, outputs concatenated."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= chunk:
            return model(x)
        return torch.cat([model(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])
    return forward


# -- timing and errors -------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    times_ms: List[float]
    first_call_s: float
    peak_bytes: Optional[int]
    output: torch.Tensor


def time_forward(forward: Forward, x: torch.Tensor, warmup: int, reps: int) -> Timing:
    """Run ``forward(x)`` ``warmup`` times untimed (the first, which compiles/tunes, is timed
    apart), then ``reps`` times timed: CUDA events on a GPU, ``perf_counter`` on the CPU. Peak
    GPU memory is taken over the timed calls (weights and input included)."""
    device = x.device
    cuda = device.type == "cuda"
    with torch.inference_mode(), (torch.cuda.device(device) if cuda else contextlib.nullcontext()):
        t0 = time.perf_counter()
        out = forward(x)
        synchronize(device)
        first = time.perf_counter() - t0
        for _ in range(warmup - 1):
            out = None
            out = forward(x)
        synchronize(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(reps):
            out = None
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = forward(x)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                out = forward(x)
                times.append((time.perf_counter() - t0) * 1e3)
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
    return Timing(times, first, peak, out)


def error_metrics(out: torch.Tensor, ref: torch.Tensor) -> Dict[str, float]:
    """``rel_err`` = ‖out − ref‖ / ‖ref‖, ``cosine`` of the flattened outputs and the lowest
    per-token cosine, in float64, one scan at a time (``ref`` may live on the CPU)."""
    if tuple(out.shape) != tuple(ref.shape):
        raise ValueError(f"output shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    dot = oo = rr = dd = 0.0
    min_cos = math.inf
    for i in range(out.shape[0]):
        o = out[i].to(torch.float64)
        r = ref[i].to(device=o.device, dtype=torch.float64)
        dot += float((o * r).sum())
        oo += float((o * o).sum())
        rr += float((r * r).sum())
        dd += float(((o - r) ** 2).sum())
        min_cos = min(min_cos, float(F.cosine_similarity(o, r, dim=-1).min()))
    return {
        "rel_err": math.sqrt(dd) / math.sqrt(rr),
        "cosine": dot / math.sqrt(oo * rr) if oo > 0 else math.nan,
        "min_token_cosine": min_cos,
    }


# -- measuring ---------------------------------------------------------------------------------
@dataclass
class Measurement:
    """One variant on one workload. ``status``: ok, skipped, OOM or error (``note`` says why)."""

    variant: str
    batch: int
    frames: int
    tokens: int
    status: str
    note: str = ""
    tolerance: Optional[float] = None
    times_ms: List[float] = field(default_factory=list)
    ms_per_batch: Optional[float] = None
    ms_per_sample: Optional[float] = None
    tflops: Optional[float] = None
    peak_gib: Optional[float] = None
    first_call_s: Optional[float] = None
    rel_err: Optional[float] = None
    cosine: Optional[float] = None
    min_token_cosine: Optional[float] = None
    flag: bool = False
    is_reference: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower()


def describe_failure(exc: BaseException) -> Tuple[str, str]:
    """``(status, note)`` of a failed measurement: ``OOM`` or ``error`` with the first message line."""
    if is_oom(exc):
        return "OOM", f"out of memory ({type(exc).__name__})"
    text = str(exc).strip()
    return "error", f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def make_input(work: Workload, seed: int) -> torch.Tensor:
    """Seeded N(0, 1) scans ``[B, 1, 450, T]`` in float32 on the CPU (z-scored fMRI-like; no zeros)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + work.batch * 1009 + work.frames)
    return torch.randn((work.batch, 1, N_ROIS, work.frames), generator=gen)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(variant: Variant, forward: Forward, x: torch.Tensor, work: Workload, settings: Settings,
            ref: Optional[torch.Tensor]) -> Tuple[Measurement, Optional[torch.Tensor]]:
    """Time ``forward`` on ``x`` and compare its output with ``ref``; returns the measurement and
    the output (float32, CPU) when ``variant`` is the reference."""
    m = Measurement(variant.key, work.batch, work.frames, work.tokens, "ok", tolerance=variant.tolerance)
    timing = time_forward(forward, x, settings.warmup, settings.reps)
    m.times_ms = [round(t, 4) for t in timing.times_ms]
    m.ms_per_batch = statistics.median(timing.times_ms)
    m.ms_per_sample = m.ms_per_batch / work.batch
    m.tflops = flops_per_sample(work.tokens) * work.batch / (m.ms_per_batch * 1e-3) / 1e12
    m.first_call_s = timing.first_call_s
    if timing.peak_bytes is not None:
        m.peak_gib = timing.peak_bytes / GIB
    out = timing.output
    ref_out = None
    if variant.key == REFERENCE:
        ref_out = out.float().cpu()
        m.is_reference, m.rel_err, m.cosine, m.min_token_cosine = True, 0.0, 1.0, 1.0
        if not torch.isfinite(out).all():
            m.flag, m.note = True, "non-finite values in the reference output"
    elif ref is None:
        m.note = "no reference output for this workload (reference did not run)"
    else:
        errs = error_metrics(out, ref)
        m.rel_err, m.cosine, m.min_token_cosine = errs["rel_err"], errs["cosine"], errs["min_token_cosine"]
        m.flag = not (m.rel_err <= variant.tolerance)  # NaN flags too
    return m, ref_out


def measure_original(variant: Variant, model: torch.nn.Module, chunk: int, note: str, x: torch.Tensor,
                     work: Workload, settings: Settings, ref: Optional[torch.Tensor]
                     ) -> Tuple[Measurement, Optional[torch.Tensor], str]:
    """:func:`measure` for the original path, ``chunk`` scans per call; on out-of-memory the
    chunk is halved down to one scan per call before giving up."""
    while True:
        try:
            m, ref_out = measure(variant, chunked(model, chunk), x, work, settings, ref)
            return m, ref_out, note
        except Exception as exc:  # noqa: BLE001
            if not is_oom(exc) or chunk == 1:
                raise
        release(x.device)
        chunk //= 2
        note = f"run {chunk} scan(s) per call (more ran out of memory)"


def run_variant(variant: Variant, settings: Settings, weights: Path, inputs: Dict[Workload, torch.Tensor],
                refs: Dict[Workload, torch.Tensor]) -> List[Measurement]:
    """Every workload of ``variant``; the model is built once (the original once per scan length)."""
    device = settings.device
    results: List[Measurement] = []
    reason = skip_reason(variant, device)
    model, model_frames = None, None
    for work in settings.workloads():
        def record(status: str, note: str) -> None:
            results.append(Measurement(variant.key, work.batch, work.frames, work.tokens, status, note,
                                       tolerance=variant.tolerance))
            log(f"{variant.key:14s} {work.name:12s} {status}: {note}")

        if reason is not None:
            record("skipped", reason)
            continue
        x = inputs[work].to(device)
        note = ""
        try:
            if variant.impl == "original":
                chunk, note = original_chunk(work, device)
                if chunk == 0:
                    record("skipped", note)
                    continue
                if model_frames != work.frames:
                    model = None
                    release(device)
                    model, model_frames = build_original(weights, device, work.frames), work.frames
                m, ref_out, note = measure_original(variant, model, chunk, note, x, work, settings, refs.get(work))
            else:
                if model is None:
                    model = build_encoder(variant, weights, device)
                forward = make_forward(variant, model, work.frames, settings.compile_mode)
                m, ref_out = measure(variant, forward, x, work, settings, refs.get(work))
        except Exception as exc:  # noqa: BLE001 - every failure is recorded, the run goes on
            failure = describe_failure(exc)
        else:
            failure = None
        finally:
            del x
        if failure is not None:  # outside the handler: the traceback's tensors are gone now
            release(device)
            record(*failure)
            continue
        m.note = "; ".join(s for s in (note, m.note) if s)
        if ref_out is not None:
            refs[work] = ref_out
        results.append(m)
        flag = "  FLAG" if m.flag else ""
        log(f"{variant.key:14s} {work.name:12s} {m.ms_per_batch:10.2f} ms/batch {m.ms_per_sample:10.2f} ms/sample "
            f"{m.tflops:7.2f} TFLOP/s  rel.err {m.rel_err if m.rel_err is not None else float('nan'):.2e}{flag}")
    del model
    if variant.impl == "compile":
        torch._dynamo.reset()
    release(device)
    return results


def run_all(settings: Settings, weights: Path,
            progress: Optional[Callable[[List[Measurement]], None]] = None) -> List[Measurement]:
    """Run every variant (the reference first) on every workload; ``progress(results so far)``
    is called after each variant."""
    inputs = {w: make_input(w, settings.seed) for w in settings.workloads()}
    refs: Dict[Workload, torch.Tensor] = {}
    results: List[Measurement] = []
    for key in settings.variants:
        results += run_variant(VARIANT_BY_KEY[key], settings, weights, inputs, refs)
        if progress is not None:
            progress(results)
    for variant in VARIANTS:  # variants not chosen still appear, as skipped
        if variant.key not in settings.variants:
            reason = skip_reason(variant, settings.device) or (
                "not selected (--variants)" if settings.variants_explicit
                else f"not run on the CPU by default (--variants {variant.key} asks for it)")
            results += [Measurement(variant.key, w.batch, w.frames, w.tokens, "skipped", reason,
                                    tolerance=variant.tolerance) for w in settings.workloads()]
    return results


# -- writers -----------------------------------------------------------------------------------
def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def settings_record(settings: Settings) -> Dict[str, Any]:
    return {
        "device": str(settings.device), "batch_sizes": settings.batch_sizes, "frames": settings.frames,
        "scaling_frames": settings.scaling_frames, "variants": settings.variants, "warmup": settings.warmup,
        "reps": settings.reps, "seed": settings.seed, "compile_mode": settings.compile_mode,
        "quick": settings.quick, "command": settings.command,
        "checkpoint": str(settings.weights) if settings.weights else
        f"random (save_random_checkpoint seed={settings.seed}, perturb=0.02)",
        "inputs": f"N(0, 1) float32 scans, seeded from {settings.seed}",
        "model": MODEL.name, "rois": N_ROIS,
    }


def write_json(path: Path, env: Dict[str, Any], settings: Settings, results: List[Measurement],
               runtime_s: float, complete: bool = True) -> None:
    doc = {
        "schema": 1,
        "complete": complete,
        "environment": env,
        "settings": settings_record(settings),
        "flops": {
            "per_sample_standard": flops_per_sample(tokens_for(PRETRAIN_FRAMES)),
            "formula": "12 * (2*N*768*(2304+768+3072+3072) + 4*N*N*768) + 2*N*16*768",
        },
        "reference": REFERENCE,
        "variants": [asdict(v) for v in VARIANTS],
        "measurements": [asdict(m) for m in results],
        "runtime_s": runtime_s,
    }
    path.write_text(json.dumps(_clean(doc), indent=2) + "\n")


def fmt_ms(v: Optional[float]) -> str:
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def fmt_rate(v: Optional[float]) -> str:
    """TFLOP/s: three significant figures below 100."""
    if v is None:
        return "—"
    return f"{v:.0f}" if v >= 100 else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


def fmt_num(v: Optional[float], spec: str) -> str:
    return "—" if v is None else ("NaN" if isinstance(v, float) and math.isnan(v) else format(v, spec))


def check_cell(m: Measurement) -> str:
    if not m.ok:
        return m.status
    if m.is_reference:
        return "FLAG" if m.flag else "ref"
    if m.rel_err is None:
        return "—"
    return "**FLAG**" if m.flag else "ok"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def speedup(m: Measurement, by_key: Dict[Tuple[str, int, int], Measurement]) -> Optional[float]:
    """Original path's ms/sample over ``m``'s, same workload (``None`` when either did not run)."""
    orig = by_key.get(("original_fp32", m.batch, m.frames))
    if orig is None or not orig.ok or not m.ok:
        return None
    return orig.ms_per_sample / m.ms_per_sample


def markdown(env: Dict[str, Any], settings: Settings, results: List[Measurement], runtime_s: float,
             complete: bool = True) -> str:
    """``results.md``: header (device, versions, command), a summary table for the README,
    the full batch-size and scan-length tables, first-call (compile) times and skips."""
    by_key = {(m.variant, m.batch, m.frames): m for m in results}
    ran = [v for v in VARIANTS if any(m.variant == v.key and m.status != "skipped" for m in results)]
    T, toks = settings.frames, tokens_for(settings.frames)
    gpu = settings.device.type == "cuda"
    lines = [f"# Brain-JEPA encoder benchmark: {env['device_name']}", ""]
    if not complete:
        lines += [f"**Partial results**: written after {len({m.variant for m in results})} of "
                  f"{len(settings.variants)} variants; the run did not finish.", ""]
    hw = f"- Device: {env['device_name']} (`{env['device']}`"
    if gpu:
        hw += (f", {env['gpu_memory_gib']} GiB, {env['sm_count']} SMs, compute {env['compute_capability']}); "
               f"driver {env['driver']}; CUDA {env['cuda']}; cuDNN {env['cudnn']}")
    else:
        hw += f", {env['cpu_threads']} threads)"
    commit = env.get("git_commit")
    lines += [
        hw,
        f"- Software: torch {env['torch']}, triton {env['triton']}, Python {env['python']}, "
        f"brainjepa-fast {env['brainjepa_fast']}"
        + (f", commit {commit[:12]}{' (uncommitted changes)' if env.get('git_dirty') else ''}" if commit else ""),
        f"- Date: {env['date_utc']}; total run time {runtime_s / 60:.1f} min",
        f"- Command: `{settings.command}`",
        f"- Model: {MODEL.name} ({MODEL.depth} blocks, {MODEL.num_heads} heads of {MODEL.head_dim}, MLP "
        f"{MODEL.mlp_dim}); scans of {N_ROIS} ROIs x {T} frames = {toks} tokens, "
        f"{flops_per_sample(toks) / 1e12:.3f} TFLOP per scan",
        f"- Weights: {settings_record(settings)['checkpoint']}; inputs: {settings_record(settings)['inputs']}",
        f"- Timing: median of {settings.reps} timed call(s) after {settings.warmup} warm-up call(s), "
        + ("CUDA events" if gpu else "time.perf_counter") + "; TF32 off for the fp32 PyTorch paths",
        f"- Accuracy: ‖out − ref‖/‖ref‖ and cosine against `{REFERENCE}` (same weights and scans); "
        "**FLAG** = error above the variant's tolerance",
        "",
    ]
    # Summary (README): ms per scan at each batch size, speed-up over the original code path.
    lines += [f"## Summary: ms per scan ({T} frames), speed-up over the original code path", ""]
    header = ["Variant"] + [f"B={b}" for b in settings.batch_sizes] + ["max rel. error", "tolerance", "check"]
    rows = []
    for v in ran:
        cells = [v.label]
        errs, checks = [], []
        for b in settings.batch_sizes:
            m = by_key.get((v.key, b, T))
            if m is None or not m.ok:
                cells.append(m.status if m else "—")
                continue
            s = speedup(m, by_key)
            cells.append(fmt_ms(m.ms_per_sample) + (f" (×{s:.1f})" if s is not None and v.impl != "original" else ""))
            if m.rel_err is not None:
                errs.append(m.rel_err)
            checks.append(check_cell(m))
        worst = max(errs, key=lambda e: (math.isnan(e), e)) if errs else None
        check = "**FLAG**" if "**FLAG**" in checks or "FLAG" in checks else ("ref" if "ref" in checks else
                                                                            ("ok" if checks else "—"))
        rows.append(cells + [fmt_num(worst, ".2e"), f"{v.tolerance:.1e}", check])
    lines += table(header, rows) + [""]
    # Full batch-size table.
    lines += [f"## By batch size ({T} frames, {toks} tokens per scan)", ""]
    header = ["Variant", "B", "ms/batch", "ms/scan", "TFLOP/s", "× original", "peak GiB", "rel. error",
              "cosine", "min token cos", "tolerance", "check", "note"]
    rows = []
    for v in ran:
        for b in settings.batch_sizes:
            m = by_key.get((v.key, b, T))
            if m is None:
                continue
            s = speedup(m, by_key)
            rows.append([v.label, str(b), fmt_ms(m.ms_per_batch), fmt_ms(m.ms_per_sample), fmt_rate(m.tflops),
                         fmt_num(s, ".1f"), fmt_num(m.peak_gib, ".2f"), fmt_num(m.rel_err, ".2e"),
                         fmt_num(m.cosine, ".6f"), fmt_num(m.min_token_cosine, ".5f"), f"{v.tolerance:.1e}",
                         check_cell(m), m.note])
    lines += table(header, rows) + [""]
    # Scan-length scaling.
    if settings.scaling_frames:
        base = settings.scaling_frames[0]
        lines += [f"## Scan length (B=1): cost against tokens", ""]
        header = ["Variant", "frames", "tokens", "TFLOP/scan", "ms/scan", f"time ÷ time at {base} frames", "TFLOP/s",
                  "peak GiB", "rel. error", "check", "note"]
        rows = []
        for v in ran:
            first = by_key.get((v.key, 1, base))
            for f in settings.scaling_frames:
                m = by_key.get((v.key, 1, f))
                if m is None:
                    continue
                growth = m.ms_per_sample / first.ms_per_sample if (m.ok and first is not None and first.ok) else None
                rows.append([v.label, str(f), str(m.tokens), f"{flops_per_sample(m.tokens) / 1e12:.3f}",
                             fmt_ms(m.ms_per_sample), fmt_num(growth, ".2f"), fmt_rate(m.tflops),
                             fmt_num(m.peak_gib, ".2f"), fmt_num(m.rel_err, ".2e"), check_cell(m), m.note])
        lines += table(header, rows) + [""]
    # First call: compile, autotune, CUDA-graph capture; not in the timings above.
    workloads = settings.workloads()
    lines += ["## First call (s): torch.compile compile time, Triton autotuning and graph capture, "
              "library start-up; excluded from the timings above", ""]
    rows = []
    for v in ran:
        cells = [v.label]
        for w in workloads:
            m = by_key.get((v.key, w.batch, w.frames))
            cells.append(fmt_num(m.first_call_s, ".1f") if m is not None and m.ok else (m.status if m else "—"))
        rows.append(cells)
    lines += table(["Variant"] + [w.name for w in workloads], rows) + [""]
    # Skips, OOMs and errors.
    lines += ["## Not run", ""]
    notes: Dict[Tuple[str, str, str], List[str]] = {}
    for m in results:
        if not m.ok:
            notes.setdefault((m.variant, m.status, m.note), []).append(f"B={m.batch} T={m.frames}")
    if not notes:
        lines.append("Every variant ran on every workload.")
    for (key, status, note), where in notes.items():
        scope = "all workloads" if len(where) == len(workloads) else ", ".join(where)
        lines.append(f"- {VARIANT_BY_KEY[key].label} — {status} ({scope}): {note}")
    lines += ["", "FLOPs per scan: 12 * (2*N*768*(2304+768+3072+3072) + 4*N²*768) + 2*N*16*768 "
              "(1.511 TFLOP at N = 4500); TFLOP/s = FLOPs / median time.", ""]
    return "\n".join(lines)


def write_plot(path: Path, env: Dict[str, Any], settings: Settings, results: List[Measurement]) -> None:
    """ms per scan by variant and batch size (bars, log scale) and against tokens (B = 1).
    Without matplotlib (``pip install matplotlib``, or the ``bench`` extra) no plot is written."""
    try:
        import matplotlib
    except ImportError:
        log(f"matplotlib is not installed: {path.name} not written (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [v for v in VARIANTS if any(m.variant == v.key and m.ok for m in results)]
    by_key = {(m.variant, m.batch, m.frames): m for m in results}
    colors = {v.key: plt.get_cmap("tab10")(i) for i, v in enumerate(VARIANTS)}
    panels = 2 if settings.scaling_frames else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 5), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / max(1, len(ran))
    for i, v in enumerate(ran):
        for j, b in enumerate(settings.batch_sizes):
            m = by_key.get((v.key, b, settings.frames))
            xpos = j + (i - (len(ran) - 1) / 2) * width
            if m is not None and m.ok:
                ax.bar(xpos, m.ms_per_sample, width, color=colors[v.key], label=v.label if j == 0 else None)
                ax.text(xpos, m.ms_per_sample, fmt_ms(m.ms_per_sample), ha="center", va="bottom", fontsize=6,
                        rotation=90 if len(ran) > 4 else 0)
            elif m is not None and m.status != "skipped":
                ax.text(xpos, 0.02, m.status, rotation=90, ha="center", va="bottom",
                        transform=ax.get_xaxis_transform(), fontsize=7)
    ax.set_xticks(range(len(settings.batch_sizes)), [f"B={b}" for b in settings.batch_sizes])
    ax.set_yscale("log")
    ax.set_ylabel("ms per scan (median)")
    ax.set_title(f"{tokens_for(settings.frames)} tokens per scan ({settings.frames} frames)")
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7)
    if panels == 2:
        ax = axes[0][1]
        for v in ran:
            pts = [(by_key[(v.key, 1, f)].tokens, by_key[(v.key, 1, f)].ms_per_sample)
                   for f in settings.scaling_frames if (v.key, 1, f) in by_key and by_key[(v.key, 1, f)].ok]
            if pts:
                ax.plot(*zip(*pts), marker="o", color=colors[v.key], label=v.label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens per scan (450 ROIs x frames / 16)")
        ax.set_ylabel("ms per scan, B=1 (median)")
        ax.set_title("Scan length")
        ax.grid(which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Brain-JEPA encoder ({MODEL.name}) on {env['device_name']}, torch {env['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(out: Path, env: Dict[str, Any], settings: Settings, results: List[Measurement],
                  runtime_s: float, complete: bool = True) -> None:
    """``results.json``, ``results.md`` and ``plot.png`` in ``out`` (``complete=False``: a run
    still going, so an interrupted run leaves what it measured)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", env, settings, results, runtime_s, complete)
    (out / "results.md").write_text(markdown(env, settings, results, runtime_s, complete))
    write_plot(out / "plot.png", env, settings, results)


# -- main --------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    settings = resolve_settings(args, argv)
    start = time.perf_counter()
    use_exact_fp32()
    env = capture_environment(settings.device)
    log(f"{env['device_name']} ({settings.device}); workloads "
        f"{', '.join(w.name for w in settings.workloads())}; variants {', '.join(settings.variants)}")
    with tempfile.TemporaryDirectory(prefix="bj-compare-") as tmp:
        weights = settings.weights
        if weights is None:
            from brainjepa_fast import save_random_checkpoint

            weights = save_random_checkpoint(Path(tmp) / "random.safetensors", settings.seed, perturb=0.02)
        def partial(done: List[Measurement]) -> None:
            write_results(settings.out, env, settings, done, time.perf_counter() - start, complete=False)

        results = run_all(settings, weights, partial)
    runtime = time.perf_counter() - start
    write_results(settings.out, env, settings, results, runtime)
    log(f"wrote {settings.out}/results.md, results.json, plot.png in {runtime:.0f} s")
    flagged = [m for m in results if m.flag]
    errors = [m for m in results if m.status == "error"]
    for m in flagged:
        log(f"FLAG: {m.variant} B={m.batch} T={m.frames}: rel. error {m.rel_err} > {m.tolerance}")
    for m in errors:
        log(f"ERROR: {m.variant} B={m.batch} T={m.frames}: {m.note}")
    if errors:
        return 1
    return 3 if (flagged and args.fail_on_flag) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``brainjepa-fast encode | demo | info`` (also ``python -m brainjepa_fast``).

``encode`` writes one file per scan into the output directory, ``<scan stem>.safetensors``
(tensor ``embeddings`` ``[N_tokens, D]``, tokens ROI-major: token ``r * T/16 + t``) or
``<scan stem>.npy``. With ``--pool mean`` the file holds only the mean over tokens, ``[D]``
(tensor ``pooled``); the tokens are not kept, so a cohort's outputs stay a few KB per scan.
Outputs are float32 by default, whatever the compute precision (``--output-dtype float16``, or
``bfloat16`` in safetensors, halves them). Every scan is read, preprocessed and
checked before the model is loaded or anything is written, so a bad scan stops the run with
nothing written; then the scans are read again (memory stays bounded), encoded in batches of
equal shape, and each output is written atomically. In that second pass a thread reads the next
batch while the encoder runs, and ``--writers`` threads write the outputs: a standard scan's
tokens are 13.8 MB of float32, far longer to write and fsync than a GPU takes to encode them.

Bad input of any kind exits with status 2 and one line ``brainjepa-fast: error: ...`` on
stderr; Ctrl-C exits with 130 and leaves no temporary files.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .api import encode, load
from .checkpoint import describe_checkpoint, save_random_checkpoint
from .config import N_ROIS, PRECISIONS, PRETRAIN_FRAMES, parse_precision
from .errors import BrainJEPAError, ConfigError
from .fmri import LAYOUTS, Preprocess, check_frames, find_scans, load_robust_params, read_scan
from .fmri import logger as READER_LOGGER
from .outputs import OUTPUT_DTYPES, OUTPUT_FORMATS, BackgroundWriter, check_output_options, plan_outputs

PROG = "brainjepa-fast"
PKG_LOGGER = logging.getLogger("brainjepa_fast")
DEVICES = ("auto", "cpu", "cuda", "mps")
BACKEND_CHOICES = ("auto", "torch", "triton")
#: Output-writing threads: on this project's test machine (a virtual disk, 224 MB/s for one
#: writer) 4 writers wrote 2.1x faster than one, 8 slower than 4 (``bench/NOTES.md``).
DEFAULT_WRITERS = 4
ENCODE_DESCRIPTION = (
    "Embed each scan into OUT/<scan stem>.safetensors (tensor 'embeddings' [N_tokens, D], tokens "
    "ROI-major) or .npy; with --pool mean only the token mean [D] (tensor 'pooled'). Existing "
    "outputs are skipped unless --overwrite. All scans are checked before anything is written."
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


@contextmanager
def _logger_level(logger: logging.Logger, level: int) -> Iterator[None]:
    """Set ``logger``'s level for the duration of the block."""
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


def _device(name: str) -> Optional[str]:
    """``--device`` -> ``load(device=...)`` (``None`` for auto); ConfigError if it is not available."""
    available = {
        "auto": True,
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
    }
    if not available[name]:
        raise ConfigError(f"--device {name}: this PyTorch ({torch.__version__}) sees no {name} device; "
                          f"use --device auto or cpu")
    return None if name == "auto" else name


def _add_runtime_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``encode`` and ``demo``."""
    p.add_argument("--device", choices=DEVICES, default="auto", help="default: auto (CUDA, then MPS, then CPU)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="compute precision (default: fp32)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                   help="auto: Triton kernels on CUDA when available, else PyTorch")
    p.add_argument("--batch-size", type=_positive_int, default=8, metavar="N",
                   help="scans of equal shape encoded together (default: 8)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or info messages")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Brain-JEPA fMRI encoder: scans -> token embeddings.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{encode,demo,info}")

    enc = sub.add_parser("encode", help="embed scans into one output file per scan", description=ENCODE_DESCRIPTION)
    enc.add_argument("inputs", nargs="+", metavar="INPUT",
                     help="scan files (.safetensors with tensor 'fmri', .npy, .csv) or directories of them")
    enc.add_argument("--weights", required=True, help="checkpoint (.safetensors or original .pth.tar)")
    enc.add_argument("--output", required=True, metavar="OUT", help="output directory (created if missing)")
    enc.add_argument("--gradient", metavar="CSV", help="brain-gradient table 450 x 30 (default: the shipped one)")
    enc.add_argument("--layout", choices=LAYOUTS, default="auto",
                     help="which axis holds the 450 ROIs: RT (rows), TR (columns), auto (the axis of length 450)")
    pre = enc.add_argument_group("preprocessing (applied in this order; all off by default)")
    pre.add_argument("--robust-params", metavar="NPZ",
                     help="per-ROI robust scaling with 'medians' and 'iqrs' of an .npz (pretraining)")
    pre.add_argument("--zscore", action="store_true", help="whole-scan z-score (fine-tuning default)")
    pre.add_argument("--resample", type=_positive_int, metavar="FRAMES",
                     help=f"centred temporal sampling to FRAMES frames (e.g. {PRETRAIN_FRAMES})")
    pre.add_argument("--sampling-rate", type=_positive_int, default=3, metavar="N",
                     help="frame step of --resample (default: 3, the original's)")
    pre.add_argument("--crop-pad", type=_positive_int, metavar="FRAMES",
                     help="keep the first FRAMES frames, or zero-pad at the end")
    enc.add_argument("--pool", choices=("mean",), help="store the token mean [D] (tensor 'pooled') instead of tokens")
    enc.add_argument("--format", choices=OUTPUT_FORMATS, default="safetensors", dest="fmt",
                     help="output file format (default: safetensors)")
    enc.add_argument("--output-dtype", choices=tuple(OUTPUT_DTYPES), default="float32",
                     help="stored dtype (default: float32; float16, or bfloat16 in safetensors, halve the files)")
    enc.add_argument("--overwrite", action="store_true", help="recompute scans whose output exists")
    enc.add_argument("--writers", type=_positive_int, default=DEFAULT_WRITERS, metavar="N",
                     help=f"threads writing outputs while the encoder runs (default: {DEFAULT_WRITERS})")
    _add_runtime_options(enc)
    enc.set_defaults(func=cmd_encode)

    demo = sub.add_parser("demo", help="encode a synthetic scan with a random vit_base checkpoint")
    demo.add_argument("--seed", type=int, default=0)
    _add_runtime_options(demo)
    demo.set_defaults(func=cmd_demo)

    info = sub.add_parser("info", help="summarise a checkpoint")
    info.add_argument("checkpoint")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    info.set_defaults(func=cmd_info)
    return parser


# --------------------------------------------------------------------------------------
# encode
# --------------------------------------------------------------------------------------
@dataclass
class EncodeReport:
    """What an encode run did; ``shapes`` are the distinct output shapes written."""

    out_dir: Path
    encoded: int = 0
    skipped: int = 0
    shapes: set = field(default_factory=set)
    seconds: float = 0.0
    device: str = ""
    precision: str = ""
    backend: str = ""
    backend_reason: str = ""


def run_encode(args: argparse.Namespace) -> EncodeReport:
    """The ``encode`` pipeline: find -> plan outputs -> read/preprocess/check -> load -> encode -> write."""
    start = time.perf_counter()
    device = _device(args.device)
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--output {out_dir}: exists and is not a directory")
    check_output_options(args.fmt, args.output_dtype)
    scans = find_scans(args.inputs)
    outputs = plan_outputs(scans, out_dir, args.fmt)
    todo = [(s, o) for s, o in zip(scans, outputs) if args.overwrite or not o.exists()]
    report = EncodeReport(out_dir, skipped=len(scans) - len(todo), precision=args.precision)
    if report.skipped:
        print(f"skipped {report.skipped} of {len(scans)} scans whose output already exists in {out_dir} "
              f"(--overwrite to recompute)")
    if not todo:
        return report
    preprocess = Preprocess(
        robust=load_robust_params(args.robust_params) if args.robust_params else None,
        zscore=args.zscore, resample_to=args.resample, sampling_rate=args.sampling_rate,
        crop_pad_to=args.crop_pad,
    )

    def prepared(scan: Path) -> np.ndarray:
        return preprocess(read_scan(scan, layout=args.layout, n_rois=N_ROIS), scan)

    def progress(**kwargs) -> tqdm:
        return tqdm(unit="scan", file=sys.stderr, disable=args.quiet or None, **kwargs)

    # Pass 1: read and check every scan before loading the model or writing anything.
    groups: dict[tuple, list] = {}  # preprocessed shape -> [(scan, output)]
    with logging_redirect_tqdm(loggers=[PKG_LOGGER]):  # log lines print above the bar
        for scan, out in progress(iterable=todo, desc="checking"):
            x = prepared(scan)
            check_frames(x.shape[1], scan)
            groups.setdefault(x.shape, []).append((scan, out))

    encoder = load(args.weights, args.gradient, device=device, dtype=parse_precision(args.precision),
                   backend=args.backend)
    report.device, report.backend, report.backend_reason = (
        str(encoder.norm.weight.device), encoder.backend, encoder.backend_reason)

    # Pass 2: read the scans again (memory stays bounded), encode batches of equal shape, write
    # each output atomically. The reader's notes (e.g. "transposed") were logged in pass 1. The
    # next batch is read while this one encodes; outputs are written in background threads.
    metadata = {"weights": str(args.weights), "precision": args.precision, "backend": report.backend,
                "preprocess": preprocess.describe(), "layout": args.layout}
    key = "pooled" if args.pool else "embeddings"
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = [items[i : i + args.batch_size] for items in groups.values()
               for i in range(0, len(items), args.batch_size)]

    def read_batch(batch: list) -> np.ndarray:
        return np.stack([prepared(scan) for scan, _ in batch])

    with _logger_level(READER_LOGGER, logging.WARNING), progress(total=len(todo), desc="encoding") as bar:
        def written() -> None:
            report.encoded += 1
            bar.update(1)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="brainjepa-fast-reader") as reader, \
                BackgroundWriter(args.writers, max_pending=2 * args.writers, on_written=written) as writer:
            upcoming = reader.submit(read_batch, batches[0])
            for batch, following in itertools.zip_longest(batches, batches[1:]):
                x = upcoming.result()
                if following is not None:
                    upcoming = reader.submit(read_batch, following)
                emb = encode(x, encoder)  # [B, N, D] on the encoder's device
                if args.pool == "mean":
                    emb = emb.float().mean(dim=1)  # [B, D]
                emb = emb.cpu()  # one copy per batch; the writers convert to the output dtype
                for (scan, out), e in zip(batch, emb):
                    writer.submit(out, e, args.fmt, key, {**metadata, "source": str(scan)}, args.output_dtype)
                    report.shapes.add(tuple(e.shape))
    report.seconds = time.perf_counter() - start
    return report


def _print_report(report: EncodeReport) -> None:
    if not report.encoded:
        print(f"nothing to encode: every output already exists in {report.out_dir}")
        return
    shapes = ", ".join(str(list(s)) for s in sorted(report.shapes))
    print(f"encoded {report.encoded} scan{'s' * (report.encoded != 1)} in {report.seconds:.1f} s "
          f"-> {report.out_dir} (output shape {shapes})")
    print(f"device {report.device}, precision {report.precision}, "
          f"backend {report.backend} ({report.backend_reason})")


def cmd_encode(args: argparse.Namespace) -> int:
    _print_report(run_encode(args))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Random vit_base checkpoint + one seeded 450 x 160 scan, through the ``encode`` path."""
    with tempfile.TemporaryDirectory(prefix="brainjepa-demo-") as tmp:
        tmp = Path(tmp)
        weights = save_random_checkpoint(tmp / "random_vit_base.safetensors", args.seed, variant="vit_base")
        scan = tmp / "synthetic_scan.npy"
        rng = np.random.default_rng(args.seed)
        np.save(scan, rng.standard_normal((N_ROIS, PRETRAIN_FRAMES)).astype(np.float32))
        print(f"demo: random vit_base checkpoint (seed {args.seed}), synthetic scan {N_ROIS} x {PRETRAIN_FRAMES}")
        encode_args = build_parser().parse_args([
            "encode", str(scan), "--weights", str(weights), "--output", str(tmp / "out"), "--zscore",
            "--device", args.device, "--precision", args.precision, "--backend", args.backend,
            "--batch-size", str(args.batch_size), *(["--quiet"] if args.quiet else []),
        ])
        _print_report(run_encode(encode_args))
    print("(checkpoint, scan and output were temporary files, now removed)")
    return 0


# --------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    desc = describe_checkpoint(args.checkpoint)
    if args.json:
        print(json.dumps(desc, indent=2))
        return 0
    print(f"checkpoint:    {desc['path']}")
    print(f"format:        {desc['format']}")
    print(f"DDP 'module.': {'yes' if desc['module_prefix'] else 'no'}")
    print(f"tensors:       {desc['total_tensors']}")
    print(f"{'component':<16} {'tensors':>7} {'parameters':>13}  {'variant':<10} dtype")
    for name, comp in desc["components"].items():
        print(f"{name:<16} {comp['tensors']:>7} {comp['parameters']:>13,}  {comp['variant'] or '-':<10} {comp['dtype']}")
    return 0


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; return the exit status (0 ok, 2 bad input or usage, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (2) and --help (0), argparse already printed
        return int(e.code or 0)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    quiet = getattr(args, "quiet", False)
    if not quiet:
        PKG_LOGGER.addHandler(handler)
    try:
        with _logger_level(PKG_LOGGER, logging.WARNING if quiet else logging.INFO):
            return args.func(args)
    except (BrainJEPAError, OSError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        PKG_LOGGER.removeHandler(handler)

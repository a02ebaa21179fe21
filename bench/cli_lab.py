"""Throughput of ``brainjepa-fast encode`` around the encoder: reading, preprocessing, copying
and writing, with the encoder replaced by a stand-in that takes a fixed time per scan.

On a GPU the encoder takes ~3.45 ms per scan (bf16, B=8, H100; ``bench/results``), while one
[4500, 768] float32 output is 13.8 MB to write and fsync. This lab measures whether the CLI
keeps such an encoder busy. Everything but the encoder is real: synthetic scans on this
machine's disk (``--scans`` files of 450 x ``--frames``), the CLI's own reading, checks,
preprocessing and atomic writes into a fresh output directory. The stand-in sleeps
``--ms-per-scan`` per scan (a sleeping thread releases the GIL, as a GPU wait does) and returns
a fixed tensor.

    python -m bench.cli_lab --scans 48 --ms-per-scan 3.45 --batch-size 8
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import brainjepa_fast.cli as cli
from brainjepa_fast.config import N_ROIS


class StandInEncoder(torch.nn.Module):
    """Sleeps ``seconds_per_scan`` per scan and returns ``[B, N, D]`` views of one fixed tensor."""

    def __init__(self, seconds_per_scan: float, tokens: int, dim: int = 768, max_batch: int = 64):
        super().__init__()
        self.seconds_per_scan = seconds_per_scan
        self.norm = torch.nn.LayerNorm(dim)  # api.encode reads the device from norm.weight
        self.out = torch.randn(1, tokens, dim).expand(max_batch, tokens, dim)
        self.backend, self.backend_reason = "stand-in", f"sleeps {seconds_per_scan * 1e3:.2f} ms per scan"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds_per_scan * x.shape[0])
        return self.out[: x.shape[0]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scans", type=int, default=48)
    p.add_argument("--frames", type=int, default=160)
    p.add_argument("--ms-per-scan", type=float, default=3.45)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--fmt", default="safetensors")
    p.add_argument("--extra", default="", help="more encode options in one string, e.g. --extra='--pool mean'")
    p.add_argument("--dir", default=None, help="where the scans and outputs go (default: a temp dir)")
    args = p.parse_args()

    root = Path(tempfile.mkdtemp(prefix="cli_lab_", dir=args.dir))
    try:
        scans = root / "scans"
        scans.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.scans):
            np.save(scans / f"sub{i:05d}.npy", rng.standard_normal((N_ROIS, args.frames), dtype=np.float32))
        stand_in = StandInEncoder(args.ms_per_scan / 1e3, N_ROIS * args.frames // 16)
        cli.load = lambda *a, **k: stand_in  # the CLI's model loading, replaced
        argv = ["encode", str(scans), "--weights", str(root / "unused.safetensors"), "--output", str(root / "out"),
                "--device", "cpu", "--batch-size", str(args.batch_size), "--format", args.fmt, "--quiet", *args.extra.split()]
        start = time.perf_counter()
        code = cli.main(argv)
        seconds = time.perf_counter() - start
        assert code == 0, f"encode exited with {code}"
        written = sorted((root / "out").iterdir())
        assert len(written) == args.scans, f"{len(written)} outputs for {args.scans} scans"
        encoder_s = args.scans * args.ms_per_scan / 1e3
        print(f"{args.scans} scans of 450 x {args.frames}, B={args.batch_size}, {args.fmt} {args.extra}: "
              f"{seconds:.2f} s, {seconds / args.scans * 1e3:.1f} ms per scan "
              f"({args.scans / seconds:.0f} scans/s; the encoder alone {encoder_s:.2f} s, "
              f"{encoder_s / seconds:.0%} busy)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

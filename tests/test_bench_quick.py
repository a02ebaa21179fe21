"""``python -m bench.compare --quick`` end to end: it runs, writes its three files, and every
variant that can run on this machine ran, with finite timings and errors under tolerance."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
ALL_VARIANTS = {"original_fp32", "torch_fp32", "torch_bf16", "compile_bf16", "triton_bf16", "triton_fp16",
                "triton_fp32"}
CPU_VARIANTS = {"original_fp32", "torch_fp32", "torch_bf16"}


def test_compare_quick(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "bench.compare", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"

    for name in ("results.md", "results.json"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    if importlib.util.find_spec("matplotlib") is not None:  # the plot is skipped without it
        assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["flops"]["per_sample_standard"] == pytest.approx(1.511e12, rel=5e-4)
    assert doc["environment"]["torch"] == torch.__version__
    assert doc["settings"]["quick"] is True and doc["complete"] is True
    measurements = doc["measurements"]
    assert {m["variant"] for m in measurements} == ALL_VARIANTS  # skipped ones are listed too
    expected = ALL_VARIANTS if torch.cuda.is_available() else CPU_VARIANTS
    ran = [m for m in measurements if m["status"] == "ok"]
    assert {m["variant"] for m in ran} == expected, [(m["variant"], m["status"], m["note"]) for m in measurements]
    for m in ran:
        what = f"{m['variant']} B={m['batch']} T={m['frames']}"
        for key in ("ms_per_batch", "ms_per_sample", "tflops", "first_call_s", "rel_err", "cosine"):
            assert m[key] is not None and math.isfinite(m[key]), f"{what}: {key} = {m[key]}"
        assert m["ms_per_batch"] > 0 and m["tflops"] > 0, what
        assert m["rel_err"] <= m["tolerance"] and not m["flag"], f"{what}: rel. error {m['rel_err']:.2e}"
        assert m["cosine"] > 0.999, what
    reference = [m for m in ran if m["is_reference"]]
    assert reference and all(m["variant"] == "torch_fp32" for m in reference)

    md = (tmp_path / "results.md").read_text()
    assert "## Summary" in md and "## Scan length" in md and "FLAG" not in md.replace("**FLAG** =", "")
    assert doc["settings"]["command"] in md

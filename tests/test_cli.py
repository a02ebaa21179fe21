"""End-to-end CLI runs on a shared random vit_base checkpoint and short (16-frame) scans."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file

import brainjepa_fast as bj
from brainjepa_fast import outputs
from brainjepa_fast.cli import main
from brainjepa_fast.config import N_ROIS
from brainjepa_fast.fmri import Preprocess
from helpers import scratch_checkpoint

ROOT = Path(__file__).resolve().parents[1]
T = 16  # one time patch: 450 tokens, fast on CPU
D = 768


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Iterator[Path]:
    with scratch_checkpoint(tmp_path_factory, "w.safetensors", seed=0) as path:
        yield path


@pytest.fixture(scope="module")
def encoder(weights):
    return bj.load(weights, device="cpu")


def _scan(seed: int, frames: int = T) -> np.ndarray:
    return np.random.default_rng(seed).normal(1.0, 2.0, size=(N_ROIS, frames)).astype(np.float32)


def _reference(encoder, x: np.ndarray) -> np.ndarray:
    """The API's embeddings of one preprocessed scan ``[R, T]`` -> ``[N, D]``."""
    return bj.encode(x, encoder)[0].float().numpy()


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_error_line(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("brainjepa-fast: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _files(directory: Path) -> list[str]:
    """All entries of ``directory`` including hidden temporaries ([] when it does not exist)."""
    return sorted(os.listdir(directory)) if directory.exists() else []


# ----------------------------------------------------------------------------- encode
def test_encode_directory_to_safetensors(tmp_path, capsys, weights, encoder):
    scans = tmp_path / "scans"
    scans.mkdir()
    a, b, c = _scan(1), _scan(2), _scan(3)
    np.save(scans / "a.npy", a)
    np.save(scans / "b.npy", b.T)  # [T, R]: read as such and transposed
    np.savetxt(scans / "c.csv", c, delimiter=",", fmt="%.9g")
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "encode", scans, "--weights", weights, "--output", out,
                             "--device", "cpu", "--batch-size", "2")
    assert code == 0, err
    assert "encoded 3 scans" in stdout and "[450, 768]" in stdout and "device cpu" in stdout
    assert "backend torch" in stdout and "precision fp32" in stdout
    assert err.count("transposed") == 1 and "b.npy" in err  # logged once, not again when encoding
    assert _files(out) == ["a.safetensors", "b.safetensors", "c.safetensors"]
    for name, x in [("a", a), ("b", b), ("c", c)]:
        path = out / f"{name}.safetensors"
        tensors = load_file(str(path))
        assert list(tensors) == ["embeddings"] and tensors["embeddings"].shape == (N_ROIS * T // 16, D)
        np.testing.assert_allclose(tensors["embeddings"], _reference(encoder, x), rtol=1e-4, atol=1e-4)
        with safe_open(str(path), framework="np") as f:
            assert f.metadata()["source"].endswith(name + (".csv" if name == "c" else ".npy"))


def test_encode_pool_mean_npy(tmp_path, capsys, weights, encoder):
    x = _scan(4)
    np.save(tmp_path / "s.npy", x)
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "encode", tmp_path / "s.npy", "--weights", weights, "--output", out,
                             "--device", "cpu", "--pool", "mean", "--format", "npy")
    assert code == 0, err
    pooled = np.load(out / "s.npy")
    assert pooled.shape == (D,) and pooled.dtype == np.float32
    np.testing.assert_allclose(pooled, _reference(encoder, x).mean(axis=0), rtol=1e-4, atol=1e-5)
    assert "[768]" in stdout


def test_encode_pool_mean_safetensors_key(tmp_path, capsys, weights):
    np.save(tmp_path / "s.npy", _scan(5))
    code, _, err = _run(capsys, "encode", tmp_path / "s.npy", "--weights", weights, "--output", tmp_path / "o",
                        "--device", "cpu", "--pool", "mean")
    assert code == 0, err
    tensors = load_file(str(tmp_path / "o" / "s.safetensors"))
    assert list(tensors) == ["pooled"] and tensors["pooled"].shape == (D,)


def test_encode_bfloat16_outputs(tmp_path, capsys, weights, encoder):
    x = _scan(9)
    np.save(tmp_path / "s.npy", x)
    code, _, err = _run(capsys, "encode", tmp_path / "s.npy", "--weights", weights, "--output", tmp_path / "o",
                        "--device", "cpu", "--output-dtype", "bfloat16")
    assert code == 0, err
    from safetensors.torch import load_file as load_torch

    stored = load_torch(str(tmp_path / "o" / "s.safetensors"))["embeddings"]
    assert stored.dtype == torch.bfloat16
    torch.testing.assert_close(stored.float(), torch.from_numpy(_reference(encoder, x)), rtol=2**-8, atol=1e-5)


def test_bfloat16_npy_is_refused_before_any_work(tmp_path, capsys, weights):
    np.save(tmp_path / "s.npy", _scan(10))
    code, _, err = _run(capsys, "encode", tmp_path / "s.npy", "--weights", weights, "--output", tmp_path / "o",
                        "--device", "cpu", "--format", "npy", "--output-dtype", "bfloat16")
    assert code == 2
    _assert_one_error_line(err, "bfloat16", "--format safetensors")
    assert _files(tmp_path / "o") == []


def test_encode_preprocessing_options(tmp_path, capsys, weights, encoder):
    x = _scan(6, frames=50)
    np.save(tmp_path / "long.npy", x)
    rng = np.random.default_rng(7)
    medians, iqrs = rng.normal(size=N_ROIS), rng.uniform(0.5, 2.0, size=N_ROIS)
    np.savez(tmp_path / "params.npz", medians=medians, iqrs=iqrs)
    code, _, err = _run(capsys, "encode", tmp_path / "long.npy", "--weights", weights, "--output", tmp_path / "o",
                        "--device", "cpu", "--format", "npy", "--robust-params", tmp_path / "params.npz",
                        "--zscore", "--resample", "32", "--sampling-rate", "1", "--crop-pad", "16")
    assert code == 0, err
    pre = Preprocess(robust=(medians, iqrs), zscore=True, resample_to=32, sampling_rate=1, crop_pad_to=16)
    expected = _reference(encoder, pre(x))
    np.testing.assert_allclose(np.load(tmp_path / "o" / "long.npy"), expected, rtol=1e-4, atol=1e-4)


def test_skip_existing_then_overwrite(tmp_path, capsys, weights):
    np.save(tmp_path / "s1.npy", _scan(7))
    np.save(tmp_path / "s2.npy", _scan(8))
    out = tmp_path / "out"
    args = ["encode", tmp_path / "s1.npy", "--weights", weights, "--output", out, "--device", "cpu", "--format", "npy"]
    assert _run(capsys, *args)[0] == 0
    first = out / "s1.npy"
    before = first.stat()

    code, stdout, _ = _run(capsys, *args[:2], tmp_path / "s2.npy", *args[2:])
    assert code == 0
    assert "skipped 1 of 2" in stdout and "encoded 1 scan " in stdout
    assert first.stat().st_ino == before.st_ino and first.stat().st_mtime_ns == before.st_mtime_ns
    assert _files(out) == ["s1.npy", "s2.npy"]

    code, stdout, _ = _run(capsys, *args)
    assert code == 0 and "skipped 1 of 1" in stdout and "nothing to encode" in stdout

    code, stdout, _ = _run(capsys, *args, "--overwrite")
    assert code == 0 and "skipped" not in stdout and "encoded 1 scan " in stdout
    assert first.stat().st_ino != before.st_ino  # replaced by a new file (os.replace)
    assert _files(out) == ["s1.npy", "s2.npy"]


def test_batches_of_two_lengths_through_the_reader_and_writers(tmp_path, capsys, weights, encoder):
    """Five scans of two lengths (two shape groups), batches of 2, three writer threads: every
    output is its own scan's embedding."""
    scans = {f"s{i}": _scan(20 + i, frames=T * (1 + i % 2)) for i in range(5)}
    for name, x in scans.items():
        np.save(tmp_path / f"{name}.npy", x)
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "encode", *[tmp_path / f"{n}.npy" for n in scans], "--weights", weights,
                             "--output", out, "--device", "cpu", "--format", "npy", "--batch-size", "2",
                             "--writers", "3")
    assert code == 0, err
    assert "encoded 5 scans" in stdout and "[450, 768]" in stdout and "[900, 768]" in stdout
    assert _files(out) == sorted(f"{n}.npy" for n in scans)
    for name, x in scans.items():
        np.testing.assert_allclose(np.load(out / f"{name}.npy"), _reference(encoder, x), rtol=1e-4, atol=1e-4)


def test_failed_write_stops_with_complete_outputs_then_resumes(tmp_path, capsys, weights, monkeypatch):
    """A write failing mid-run (disk full) exits 2 with one line; the outputs already written are
    complete, nothing temporary is left, and the next run encodes only what is missing."""
    for i in range(6):
        np.save(tmp_path / f"s{i}.npy", _scan(30 + i))
    real_replace = outputs.os.replace

    def replace(src, dst):
        if os.path.basename(dst) == "s3.npy":
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace)
    out = tmp_path / "out"
    args = ["encode", *[tmp_path / f"s{i}.npy" for i in range(6)], "--weights", weights, "--output", out,
            "--device", "cpu", "--format", "npy", "--batch-size", "2"]
    code, _, err = _run(capsys, *args)
    assert code == 2
    _assert_one_error_line(err, "No space left on device")
    written = _files(out)
    assert "s3.npy" not in written and all(name.endswith(".npy") and not name.startswith(".") for name in written)
    assert {"s0.npy", "s1.npy", "s2.npy"} <= set(written)
    for name in written:
        assert np.load(out / name).shape == (N_ROIS * T // 16, D)

    monkeypatch.setattr(outputs.os, "replace", real_replace)
    code, stdout, err = _run(capsys, *args)
    assert code == 0, err
    assert f"skipped {len(written)} of 6" in stdout and f"encoded {6 - len(written)} scan" in stdout
    assert _files(out) == [f"s{i}.npy" for i in range(6)]


def test_refuses_to_overwrite_an_input(tmp_path, capsys, weights):
    scan = tmp_path / "s.npy"
    np.save(scan, _scan(9))
    original = scan.read_bytes()
    code, _, err = _run(capsys, "encode", scan, "--weights", weights, "--output", tmp_path, "--format", "npy")
    assert code == 2
    _assert_one_error_line(err, "refusing to overwrite input scan", "s.npy")
    assert scan.read_bytes() == original and _files(tmp_path) == ["s.npy"]


def _bad_scan_cases(tmp_path: Path) -> dict:
    wrong_rois = tmp_path / "wrong_rois.npy"
    np.save(wrong_rois, np.ones((400, T), np.float32))
    nan = tmp_path / "nan.npy"
    x = _scan(10)
    x[2, 5] = np.nan
    np.save(nan, x)
    odd = tmp_path / "odd.npy"
    np.save(odd, _scan(11, frames=20))
    return {
        "wrong ROI count": ([wrong_rois], ["wrong_rois.npy", "expected 450 ROIs", "(400, 16)"]),
        "NaN": ([nan], ["nan.npy", "1 non-finite", "(2, 5)"]),
        "T not a multiple of 16": ([odd], ["odd.npy", "20 frames", "--resample", "--crop-pad"]),
    }


@pytest.mark.parametrize("case", ["wrong ROI count", "NaN", "T not a multiple of 16"])
def test_bad_scan_among_good_writes_nothing(tmp_path, capsys, weights, case):
    good = tmp_path / "good.npy"
    np.save(good, _scan(12))
    bad, needles = _bad_scan_cases(tmp_path)[case]
    out = tmp_path / "out"
    code, _, err = _run(capsys, "encode", good, *bad, "--weights", weights, "--output", out, "--device", "cpu")
    assert code == 2
    _assert_one_error_line(err, *needles)
    assert _files(out) == []


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--weights", "{tmp}/missing.safetensors"], ["missing.safetensors"]),
        (["--backend", "triton"], ["triton", "unavailable"]),
        (["--robust-params", "{tmp}/nope.npz"], ["nope.npz", "not found"]),
        (["--gradient", "{tmp}/grad.csv"], ["grad.csv"]),
    ],
    ids=["missing weights", "triton on cpu", "missing robust params", "bad gradient"],
)
def test_option_errors(tmp_path, capsys, weights, extra, needles):
    np.save(tmp_path / "s.npy", _scan(13))
    (tmp_path / "grad.csv").write_text("1,2,3\n4,5,6\n")
    out = tmp_path / "out"
    argv = ["encode", tmp_path / "s.npy", "--weights", weights, "--output", out, "--device", "cpu"]
    argv += [e.format(tmp=tmp_path) for e in extra]  # a repeated option overrides the earlier one
    code, _, err = _run(capsys, *argv)
    assert code == 2
    _assert_one_error_line(err, *needles)
    assert _files(out) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device(tmp_path, capsys, weights):
    np.save(tmp_path / "s.npy", _scan(15))
    code, _, err = _run(capsys, "encode", tmp_path / "s.npy", "--weights", weights, "--output", tmp_path / "o",
                        "--device", "cuda")
    assert code == 2
    _assert_one_error_line(err, "--device cuda", "no cuda device")
    assert _files(tmp_path / "o") == []


def test_missing_input(tmp_path, capsys, weights):
    code, _, err = _run(capsys, "encode", tmp_path / "ghost.npy", "--weights", weights, "--output", tmp_path / "o")
    assert code == 2
    _assert_one_error_line(err, "ghost.npy", "no such file")


def test_usage_error_keeps_argparse_code(capsys):
    code, _, err = _run(capsys, "encode", "x.npy", "--output", "o")
    assert code == 2 and "--weights" in err and "usage:" in err
    assert _run(capsys, "--help")[0] == 0


def test_interrupt_removes_temp_files(tmp_path, capsys, weights, monkeypatch):
    np.save(tmp_path / "s.npy", _scan(14))
    out = tmp_path / "out"
    seen = []

    def interrupted_replace(src, dst):
        seen.append(src)
        assert os.path.exists(src)  # the temporary file was written...
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs.os, "replace", interrupted_replace)
    code, _, err = _run(capsys, "encode", tmp_path / "s.npy", "--weights", weights, "--output", out, "--device", "cpu")
    assert code == 130 and "interrupted" in err and len(seen) == 1
    assert _files(out) == []  # ...and removed


# ----------------------------------------------------------------------------- demo / info
def test_demo(capsys):
    code, stdout, err = _run(capsys, "demo", "--seed", "1", "--device", "cpu")
    assert code == 0, err
    assert "output shape [4500, 768]" in stdout
    assert "device cpu" in stdout and "precision fp32" in stdout and "backend torch (auto:" in stdout
    assert " s -> " in stdout  # wall time


def test_info_module_entry_point(weights):
    proc = subprocess.run([sys.executable, "-m", "brainjepa_fast", "info", str(weights)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "format:        safetensors" in proc.stdout and "tensors:       384" in proc.stdout
    line = next(l for l in proc.stdout.splitlines() if l.startswith("target_encoder"))
    assert line.split() == ["target_encoder", "151", "86,808,960", "vit_base", "F32"]


def test_info_json(capsys, weights):
    code, stdout, _ = _run(capsys, "info", weights, "--json")
    assert code == 0
    desc = json.loads(stdout)
    assert desc["format"] == "safetensors" and desc["total_tensors"] == 384
    assert desc["components"]["target_encoder"]["variant"] == "vit_base"


def test_info_missing_checkpoint(tmp_path, capsys):
    code, _, err = _run(capsys, "info", tmp_path / "none.safetensors")
    assert code == 2
    _assert_one_error_line(err, "none.safetensors")

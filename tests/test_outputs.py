"""Atomic output writing and output-path planning."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file

from brainjepa_fast import outputs
from brainjepa_fast.errors import ConfigError
from brainjepa_fast.outputs import BackgroundWriter, output_path, plan_outputs, write_embeddings


@pytest.fixture
def emb() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(90, 24)).astype(np.float32)


def test_write_npy(tmp_path, emb):
    write_embeddings(tmp_path / "a.npy", emb, "npy", "embeddings")
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), emb)
    assert os.listdir(tmp_path) == ["a.npy"]


def test_write_safetensors_with_key_and_metadata(tmp_path, emb):
    path = tmp_path / "a.safetensors"
    write_embeddings(path, torch.from_numpy(emb), "safetensors", "pooled", {"source": "x.npy"})
    loaded = load_file(str(path))
    assert list(loaded) == ["pooled"]
    np.testing.assert_array_equal(loaded["pooled"], emb)
    with safe_open(str(path), framework="np") as f:
        assert f.metadata() == {"source": "x.npy"}
    assert os.listdir(tmp_path) == ["a.safetensors"]


def test_low_precision_tensors_are_stored_as_float32(tmp_path, emb):
    half = torch.from_numpy(emb).to(torch.bfloat16)
    write_embeddings(tmp_path / "b.npy", half, "npy", "embeddings")
    out = np.load(tmp_path / "b.npy")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, half.float().numpy())


@pytest.mark.parametrize("fmt,dtype", [("npy", "float16"), ("safetensors", "float16"), ("safetensors", "bfloat16")])
def test_smaller_output_dtypes(tmp_path, emb, fmt, dtype):
    path = tmp_path / f"h.{fmt}"
    write_embeddings(path, emb, fmt, "embeddings", dtype=dtype)
    if fmt == "npy":
        stored = torch.from_numpy(np.load(path))
    else:
        from safetensors.torch import load_file as load_torch

        stored = load_torch(str(path))["embeddings"]
    assert stored.dtype == outputs.OUTPUT_DTYPES[dtype]
    assert torch.equal(stored, torch.from_numpy(emb).to(outputs.OUTPUT_DTYPES[dtype]))


def test_output_dtype_errors(tmp_path, emb):
    with pytest.raises(ConfigError, match="bfloat16 needs --format safetensors"):
        write_embeddings(tmp_path / "a.npy", emb, "npy", "embeddings", dtype="bfloat16")
    with pytest.raises(ConfigError, match="unknown output dtype 'float64'"):
        write_embeddings(tmp_path / "a.npy", emb, "npy", "embeddings", dtype="float64")
    assert os.listdir(tmp_path) == []


def test_new_file_permissions_follow_umask(tmp_path, emb):
    old = os.umask(0o022)
    try:
        write_embeddings(tmp_path / "p.npy", emb, "npy", "embeddings")
    finally:
        os.umask(old)
    assert (tmp_path / "p.npy").stat().st_mode & 0o777 == 0o644


def test_unknown_format(tmp_path, emb):
    with pytest.raises(ConfigError, match="'h5'.*safetensors, npy"):
        write_embeddings(tmp_path / "a.h5", emb, "h5", "embeddings")


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_write_leaves_old_file_and_no_temp(tmp_path, emb, monkeypatch, exc):
    path = tmp_path / "a.npy"
    path.write_bytes(b"previous content")

    def fail(src, dst):
        assert os.path.basename(src).startswith(".a.npy.") and os.path.getsize(src) > 0
        raise exc

    monkeypatch.setattr(outputs.os, "replace", fail)
    with pytest.raises(type(exc)):
        write_embeddings(path, emb, "npy", "embeddings")
    assert path.read_bytes() == b"previous content"
    assert os.listdir(tmp_path) == ["a.npy"]


def test_overwrite_replaces_content(tmp_path, emb):
    path = tmp_path / "a.npy"
    write_embeddings(path, emb, "npy", "embeddings")
    write_embeddings(path, emb * 2, "npy", "embeddings")
    np.testing.assert_array_equal(np.load(path), emb * 2)
    assert os.listdir(tmp_path) == ["a.npy"]


def test_output_path():
    assert output_path("/data/sub-01.csv", "/out", "safetensors").as_posix() == "/out/sub-01.safetensors"
    assert output_path("x.safetensors", "o", "npy").as_posix() == "o/x.npy"


def test_plan_outputs_rejects_stem_collisions(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    scans = [tmp_path / "a" / "s1.npy", tmp_path / "b" / "s1.csv"]
    with pytest.raises(ConfigError) as e:
        plan_outputs(scans, tmp_path / "out", "npy")
    msg = str(e.value)
    assert "s1.npy" in msg and "s1.csv" in msg and "both write" in msg


def test_plan_outputs_refuses_to_replace_an_input(tmp_path):
    scans = [tmp_path / "x.csv", tmp_path / "s1.npy"]
    assert plan_outputs(scans, tmp_path, "safetensors") == [tmp_path / "x.safetensors", tmp_path / "s1.safetensors"]
    with pytest.raises(ConfigError, match=r"refusing to overwrite input scan .*s1\.npy"):
        plan_outputs(scans, tmp_path, "npy")


# ----------------------------------------------------------------------------- background writer
def test_background_writer_writes_everything(tmp_path, emb):
    done = []
    with BackgroundWriter(workers=3, max_pending=4, on_written=lambda: done.append(1)) as writer:
        for i in range(10):
            writer.submit(tmp_path / f"{i}.npy", torch.from_numpy(emb * i).bfloat16(), "npy", "embeddings")
    assert len(done) == 10
    assert sorted(os.listdir(tmp_path)) == sorted(f"{i}.npy" for i in range(10))
    for i in range(10):
        np.testing.assert_array_equal(np.load(tmp_path / f"{i}.npy"), torch.from_numpy(emb * i).bfloat16().float().numpy())


def test_background_writer_bounds_the_queue(tmp_path, emb, monkeypatch):
    """With max_pending outputs queued, submit waits for the oldest to be written."""
    release = threading.Event()
    real_write = outputs.write_embeddings

    def held_write(*args):
        release.wait(timeout=10)
        real_write(*args)

    monkeypatch.setattr(outputs, "write_embeddings", held_write)
    done = []
    with BackgroundWriter(workers=2, max_pending=2, on_written=lambda: done.append(1)) as writer:
        writer.submit(tmp_path / "0.npy", emb, "npy", "embeddings")
        writer.submit(tmp_path / "1.npy", emb, "npy", "embeddings")
        assert done == [] and os.listdir(tmp_path) == []  # both writes are held
        threading.Timer(0.2, release.set).start()
        writer.submit(tmp_path / "2.npy", emb, "npy", "embeddings")  # returns once 0.npy is written
        assert release.is_set() and len(done) >= 1 and (tmp_path / "0.npy").exists()
    assert len(done) == 3


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_background_writer_failure_leaves_complete_outputs_only(tmp_path, emb, monkeypatch, exc):
    real_replace = outputs.os.replace

    def replace(src, dst):
        if os.path.basename(dst) == "3.npy":
            raise exc
        real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace)
    done = []
    with pytest.raises(type(exc)):
        with BackgroundWriter(workers=2, max_pending=3, on_written=lambda: done.append(1)) as writer:
            for i in range(8):
                writer.submit(tmp_path / f"{i}.npy", emb, "npy", "embeddings")
    names = sorted(os.listdir(tmp_path))
    assert "3.npy" not in names and not [n for n in names if n.endswith(".tmp")]
    assert {"0.npy", "1.npy", "2.npy"} <= set(names)
    for name in names:
        np.testing.assert_array_equal(np.load(tmp_path / name), emb)
    assert len(done) == 3  # on_written ran for the outputs before the failed one, in order


def test_background_writer_rejects_bad_arguments(tmp_path, emb):
    with pytest.raises(ValueError, match="workers and max_pending must be >= 1"):
        BackgroundWriter(workers=0, max_pending=1)
    with BackgroundWriter(workers=1, max_pending=1) as writer, pytest.raises(ConfigError, match="'h5'"):
        writer.submit(tmp_path / "a.h5", emb, "h5", "embeddings")

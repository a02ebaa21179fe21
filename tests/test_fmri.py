"""Reading scans (formats, orientation, every bad input) and the preprocessing steps."""
from __future__ import annotations

import logging
import struct
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from brainjepa_fast.config import N_ROIS
from brainjepa_fast.errors import ConfigError, ScanError
from brainjepa_fast.fmri import (
    Preprocess,
    check_frames,
    crop_or_pad,
    find_scans,
    load_robust_params,
    read_scan,
    resample,
    resample_indices,
    robust_scale,
    zscore,
)

T = 32


@pytest.fixture
def scan() -> np.ndarray:
    """A random [450, 32] float32 scan (no zeros, no structure)."""
    return np.random.default_rng(0).normal(3.0, 2.0, size=(N_ROIS, T)).astype(np.float32)


def _save(path, array):
    """Write ``array`` in the format given by ``path``'s suffix."""
    suffix = path.suffix
    if suffix == ".npy":
        np.save(path, array)
    elif suffix == ".safetensors":
        save_file({"fmri": np.ascontiguousarray(array)}, str(path))
    elif suffix == ".csv":
        np.savetxt(path, array, delimiter=",", fmt="%.9g")
    else:
        raise AssertionError(suffix)
    return path


# ----------------------------------------------------------------------------- reading
@pytest.mark.parametrize("suffix", [".npy", ".safetensors", ".csv"])
def test_read_roundtrip_each_format(tmp_path, scan, suffix):
    out = read_scan(_save(tmp_path / f"s{suffix}", scan))
    assert out.dtype == np.float32 and out.shape == (N_ROIS, T)
    np.testing.assert_array_equal(out, scan)


@pytest.mark.parametrize("shape", [(1, N_ROIS, T), (1, 1, N_ROIS, T)])
def test_read_safetensors_leading_singletons(tmp_path, scan, shape):
    out = read_scan(_save(tmp_path / "s.safetensors", scan.reshape(shape)))
    np.testing.assert_array_equal(out, scan)


def test_read_integer_data_as_float32(tmp_path):
    ints = np.arange(N_ROIS * T, dtype=np.int16).reshape(N_ROIS, T)
    out = read_scan(_save(tmp_path / "i.npy", ints))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, ints.astype(np.float32))


def test_auto_layout_transposes_tr_and_logs(tmp_path, scan, caplog):
    path = _save(tmp_path / "tr.npy", scan.T.copy())
    with caplog.at_level(logging.INFO, logger="brainjepa_fast.fmri"):
        out = read_scan(path)
    np.testing.assert_array_equal(out, scan)
    assert "transposed" in caplog.text and "tr.npy" in caplog.text and "[32, 450]" in caplog.text


def test_auto_layout_keeps_rt_silently(tmp_path, scan, caplog):
    with caplog.at_level(logging.INFO, logger="brainjepa_fast.fmri"):
        out = read_scan(_save(tmp_path / "rt.npy", scan))
    np.testing.assert_array_equal(out, scan)
    assert "transposed" not in caplog.text


def test_explicit_layouts(tmp_path):
    square = np.random.default_rng(1).normal(size=(N_ROIS, N_ROIS)).astype(np.float32)
    path = _save(tmp_path / "sq.npy", square)
    np.testing.assert_array_equal(read_scan(path, layout="RT"), square)
    np.testing.assert_array_equal(read_scan(path, layout="TR"), square.T)


def test_explicit_layout_with_wrong_axis(tmp_path, scan):
    path = _save(tmp_path / "rt.npy", scan)
    with pytest.raises(ScanError) as e:
        read_scan(path, layout="TR")
    msg = str(e.value)
    assert "rt.npy" in msg and "450" in msg and "(450, 32)" in msg and "columns" in msg


def test_unknown_layout(tmp_path, scan):
    with pytest.raises(ConfigError, match="'XY'.*auto, RT, TR"):
        read_scan(_save(tmp_path / "s.npy", scan), layout="XY")


def test_ambiguous_orientation(tmp_path):
    path = _save(tmp_path / "square.npy", np.ones((N_ROIS, N_ROIS), np.float32))
    with pytest.raises(ScanError) as e:
        read_scan(path)
    msg = str(e.value)
    assert "square.npy" in msg and "ambiguous" in msg and "(450, 450)" in msg and "--layout" in msg


@pytest.mark.parametrize("shape", [(400, 160), (160, 400)])
def test_wrong_roi_count(tmp_path, shape):
    path = _save(tmp_path / "small.npy", np.ones(shape, np.float32))
    with pytest.raises(ScanError) as e:
        read_scan(path)
    msg = str(e.value)
    assert "small.npy" in msg and "expected 450 ROIs" in msg and str(shape) in msg


@pytest.mark.parametrize("shape", [(N_ROIS,), (2, N_ROIS, T), (N_ROIS, T, 2)])
def test_not_2d(tmp_path, shape):
    path = _save(tmp_path / "nd.npy", np.ones(shape, np.float32))
    with pytest.raises(ScanError) as e:
        read_scan(path)
    assert "nd.npy" in str(e.value) and "2-D" in str(e.value) and str(shape) in str(e.value)


def test_no_frames(tmp_path):
    path = _save(tmp_path / "empty_t.npy", np.ones((N_ROIS, 0), np.float32))
    with pytest.raises(ScanError, match=r"empty_t\.npy.*no frames"):
        read_scan(path)


@pytest.mark.parametrize("layout", ["RT", "TR"])
def test_non_finite_values(tmp_path, scan, layout):
    scan[3, 7] = np.nan
    scan[10, 2] = np.inf
    scan[200, 0] = -np.inf
    stored = scan if layout == "RT" else scan.T.copy()
    path = _save(tmp_path / "bad.npy", stored)
    with pytest.raises(ScanError) as e:
        read_scan(path)
    msg = str(e.value)
    # the first index is reported in (roi, frame) order whatever the file's layout
    assert "bad.npy" in msg and "3 non-finite" in msg and "(roi, frame) = (3, 7)" in msg


def test_float64_overflowing_float32_counts_as_non_finite(tmp_path, scan):
    big = scan.astype(np.float64)
    big[5, 5] = 1e300
    with pytest.raises(ScanError, match=r"big\.npy: 1 non-finite.*\(5, 5\)"):
        read_scan(_save(tmp_path / "big.npy", big))


@pytest.mark.parametrize("suffix", [".npy", ".safetensors", ".csv"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(ScanError) as e:
        read_scan(path)
    assert f"empty{suffix}" in str(e.value) and "empty (0 bytes)" in str(e.value)


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_truncated_file(tmp_path, scan, suffix):
    path = _save(tmp_path / f"cut{suffix}", scan)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ScanError) as e:
        read_scan(path)
    assert f"cut{suffix}" in str(e.value) and "truncated or corrupt" in str(e.value)


def test_safetensors_header_that_lies(tmp_path, scan):
    """A well-formed header claiming a bigger tensor than the data it covers."""
    path = _save(tmp_path / "liar.safetensors", scan)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["fmri"]["shape"] = [N_ROIS, 2 * T]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])
    with pytest.raises(ScanError, match=r"liar\.safetensors: not a readable safetensors file"):
        read_scan(path)


def test_garbage_npy(tmp_path):
    path = tmp_path / "junk.npy"
    path.write_bytes(b"this is not a numpy file at all")
    with pytest.raises(ScanError, match=r"junk\.npy: not a readable \.npy file"):
        read_scan(path)


def test_pickled_npy_is_refused(tmp_path):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ScanError, match=r"obj\.npy"):
        read_scan(path)


def test_missing_fmri_key(tmp_path, scan):
    path = tmp_path / "keys.safetensors"
    save_file({"bold": scan, "mask": np.ones(3, np.float32)}, str(path))
    with pytest.raises(ScanError) as e:
        read_scan(path)
    msg = str(e.value)
    assert "keys.safetensors" in msg and "'fmri'" in msg and "'bold', 'mask'" in msg


def test_csv_non_numeric_cell(tmp_path, scan):
    path = _save(tmp_path / "text.csv", scan)
    lines = path.read_text().splitlines()
    cells = lines[4].split(",")
    cells[2] = "abc"
    lines[4] = ",".join(cells)
    path.write_text("\n".join(lines))
    with pytest.raises(ScanError) as e:
        read_scan(path)
    msg = str(e.value)
    assert "text.csv" in msg and "line 5" in msg and "column 3" in msg and "'abc'" in msg


def test_csv_header_is_rejected(tmp_path, scan):
    path = tmp_path / "header.csv"
    path.write_text(",".join(f"t{i}" for i in range(T)) + "\n" + ",".join(map(str, scan[0])))
    with pytest.raises(ScanError, match=r"header\.csv: line 1, column 1.*'t0'"):
        read_scan(path)


def test_csv_ragged_rows(tmp_path, scan):
    path = _save(tmp_path / "ragged.csv", scan)
    lines = path.read_text().splitlines()
    lines[9] = lines[9] + ",1.0"
    path.write_text("\n".join(lines))
    with pytest.raises(ScanError, match=r"ragged\.csv: line 10 has 33 values, expected 32"):
        read_scan(path)


def test_unknown_suffix(tmp_path, scan):
    path = tmp_path / "scan.nii"
    path.write_bytes(b"x")
    with pytest.raises(ScanError) as e:
        read_scan(path)
    msg = str(e.value)
    assert "scan.nii" in msg and "'.nii'" in msg and ".safetensors, .npy, .csv" in msg


def test_missing_file(tmp_path):
    with pytest.raises(ScanError, match=r"nope\.npy: scan file not found"):
        read_scan(tmp_path / "nope.npy")


# ----------------------------------------------------------------------------- find_scans
def test_find_scans_expands_directories(tmp_path, scan):
    for name in ["b.npy", "a.csv", "c.safetensors", "notes.txt", "._a.npy"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.npy").write_bytes(b"x")
    extra = tmp_path / "sub" / "deep.npy"
    found = find_scans([str(tmp_path), str(extra), str(tmp_path / "b.npy")])
    assert [p.name for p in found] == ["a.csv", "b.npy", "c.safetensors", "deep.npy"]


def test_find_scans_errors(tmp_path):
    (tmp_path / "notes.txt").write_bytes(b"x")
    with pytest.raises(ScanError, match="no scan files"):
        find_scans([str(tmp_path)])
    with pytest.raises(ScanError, match=r"notes\.txt: unsupported scan format '\.txt'"):
        find_scans([str(tmp_path / "notes.txt")])
    with pytest.raises(ScanError, match=r"missing\.npy: no such file or directory"):
        find_scans([str(tmp_path / "missing.npy")])


# ----------------------------------------------------------------------------- check_frames
def test_check_frames(tmp_path):
    check_frames(160, tmp_path / "ok.npy")
    check_frames(16)
    with pytest.raises(ScanError) as e:
        check_frames(150, tmp_path / "odd.npy")
    msg = str(e.value)
    assert "odd.npy" in msg and "150 frames" in msg and "multiple of 16" in msg
    assert "--resample" in msg and "--crop-pad 144" in msg


# ----------------------------------------------------------------------------- robust scaling
def _robust_params(seed=2):
    rng = np.random.default_rng(seed)
    return rng.normal(size=N_ROIS), rng.uniform(0.5, 2.0, size=N_ROIS)


def test_robust_scale_matches_hand_computation(scan):
    medians, iqrs = _robust_params()
    out = robust_scale(scan, medians, iqrs)
    expected = np.empty_like(scan)
    for r in range(N_ROIS):
        for t in range(T):
            expected[r, t] = (float(scan[r, t]) - medians[r]) / iqrs[r]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_load_robust_params(tmp_path):
    medians, iqrs = _robust_params()
    np.savez(tmp_path / "p.npz", medians=medians, iqrs=iqrs)
    got_m, got_i = load_robust_params(tmp_path / "p.npz")
    np.testing.assert_array_equal(got_m, medians)
    np.testing.assert_array_equal(got_i, iqrs)


def test_load_robust_params_errors(tmp_path):
    medians, iqrs = _robust_params()
    np.savez(tmp_path / "short.npz", medians=medians[:400], iqrs=iqrs)
    with pytest.raises(ConfigError, match=r"short\.npz: medians must have 450 entries .*\(400,\)"):
        load_robust_params(tmp_path / "short.npz")
    zero = iqrs.copy()
    zero[17] = 0
    np.savez(tmp_path / "zero.npz", medians=medians, iqrs=zero)
    with pytest.raises(ConfigError, match=r"zero\.npz: iqrs must be non-zero, got 1 zero entries \(first at ROI 17\)"):
        load_robust_params(tmp_path / "zero.npz")
    np.savez(tmp_path / "keys.npz", median=medians, iqrs=iqrs)
    with pytest.raises(ConfigError, match=r"keys\.npz: missing array\(s\) medians; the file holds median, iqrs"):
        load_robust_params(tmp_path / "keys.npz")
    with pytest.raises(ConfigError, match=r"absent\.npz: .*not found"):
        load_robust_params(tmp_path / "absent.npz")


def test_load_robust_params_rejects_non_npz(tmp_path):
    np.save(tmp_path / "single.npy", np.ones(N_ROIS))
    with pytest.raises(ConfigError, match=r"single\.npy: expected an \.npz archive .*got a single array"):
        load_robust_params(tmp_path / "single.npy")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(ConfigError, match=r"junk\.npz: not a readable \.npz file"):
        load_robust_params(tmp_path / "junk.npz")


def test_robust_scale_wrong_length(scan):
    medians, iqrs = _robust_params()
    with pytest.raises(ConfigError, match=r"iqrs must have 450 entries .*\(449,\)"):
        robust_scale(scan, medians, iqrs[:-1])


# ----------------------------------------------------------------------------- zscore
def test_zscore_matches_unbiased_hand_computation():
    x = np.random.default_rng(3).normal(5.0, 3.0, size=(6, 16)).astype(np.float32)
    x64 = x.astype(np.float64)
    mean = x64.sum() / x64.size
    std = np.sqrt(((x64 - mean) ** 2).sum() / (x64.size - 1))
    out = zscore(x)
    np.testing.assert_allclose(out, (x64 - mean) / std, rtol=1e-5, atol=1e-6)
    biased = (x64 - mean) / x64.std()  # ddof=0 would differ by sqrt(96/95) ~ 0.5%
    assert not np.allclose(out, biased, rtol=1e-3, atol=0)
    torch_ref = (torch.from_numpy(x) - torch.from_numpy(x).mean()) / torch.from_numpy(x).std()
    np.testing.assert_array_equal(out, torch_ref.numpy())


def test_zscore_constant_scan(tmp_path):
    with pytest.raises(ScanError, match=r"flat\.npy: cannot z-score a constant scan \(std = 0\.0"):
        zscore(np.full((N_ROIS, T), 2.5, np.float32), tmp_path / "flat.npy")


# ----------------------------------------------------------------------------- resample
def test_resample_490_to_160_matches_original_formula():
    n_frames, frames, rate = 490, 160, 3
    x = np.tile(np.arange(n_frames, dtype=np.float32), (4, 1)) + 1000 * np.arange(4, dtype=np.float32)[:, None]
    out = resample(x, frames, rate)
    # the original's formula with the centred start: clip 480, delta 10, start 5, end 484
    expected = np.floor(np.linspace(5.0, 484.0, frames)).astype(np.int64)
    assert out.shape == (4, frames)
    np.testing.assert_array_equal(out[0], expected)
    np.testing.assert_array_equal(out[3], expected + 3000)
    np.testing.assert_array_equal(resample_indices(n_frames, frames, rate).numpy(), expected)
    assert (expected[0], expected[1], expected[-1]) == (5, 8, 484)


def test_resample_short_scan_repeats_last_frame():
    idx = resample_indices(200, 160, 3).numpy()
    expected = np.minimum(np.floor(np.linspace(0.0, 479.0, 160)), 199).astype(np.int64)
    np.testing.assert_array_equal(idx, expected)
    assert idx[-1] == 199 and (idx == 199).sum() > 1


def test_resample_rejects_bad_options():
    with pytest.raises(ConfigError, match="frames >= 1"):
        resample_indices(490, 0)


# ----------------------------------------------------------------------------- crop / pad
def test_crop_or_pad(scan):
    np.testing.assert_array_equal(crop_or_pad(scan, 16), scan[:, :16])
    padded = crop_or_pad(scan, 48)
    assert padded.shape == (N_ROIS, 48)
    np.testing.assert_array_equal(padded[:, :T], scan)
    assert not padded[:, T:].any()


# ----------------------------------------------------------------------------- Preprocess
def test_preprocess_applies_steps_in_documented_order():
    rng = np.random.default_rng(4)
    x = rng.normal(2.0, 1.5, size=(N_ROIS, 490)).astype(np.float32)
    medians, iqrs = _robust_params()
    pre = Preprocess(robust=(medians, iqrs), zscore=True, resample_to=160, crop_pad_to=144)
    expected = crop_or_pad(resample(zscore(robust_scale(x, medians, iqrs)), 160, 3), 144)
    out = pre(x)
    assert out.shape == (N_ROIS, 144) and out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)
    # z-scoring after resampling would give different numbers: the order is observable
    other = zscore(resample(robust_scale(x, medians, iqrs), 160, 3))[:, :144]
    assert not np.allclose(out, other)
    assert pre.describe() == "robust, zscore, resample 160 (rate 3), crop/pad 144"


def test_preprocess_default_is_identity(scan):
    np.testing.assert_array_equal(Preprocess()(scan), scan)
    assert Preprocess().describe() == "none"


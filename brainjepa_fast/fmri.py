"""Reading fMRI scans from disk and preprocessing them the way Brain-JEPA did.

A scan is a float32 array ``[R, T]``: ``R = 450`` ROIs (Schaefer-400 cortical + Tian-III
subcortical, in the order of the gradient table) by ``T`` frames. :func:`read_scan` reads
``.safetensors`` (tensor ``fmri``), ``.npy`` and ``.csv`` files and returns that layout,
transposing ``[T, R]`` files. The encoder wants ``[B, 1, R, T]`` with ``T % 16 == 0``.

Preprocessing follows the original data pipelines (``src/datasets/ukbiobank_scale.py`` for
pretraining, ``src/datasets/hca_sex_datasets.py`` for fine-tuning); every step is opt-in
and :class:`Preprocess` applies them in the fine-tuning order: normalise, then sample frames.
Every bad input raises :class:`~brainjepa_fast.errors.ScanError` (or ``ConfigError`` for a bad
option) naming the file and what was expected and found.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .config import N_ROIS, PATCH_T
from .errors import ConfigError, ScanError

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
SCAN_SUFFIXES = (".safetensors", ".npy", ".csv")
LAYOUTS = ("auto", "RT", "TR")
SAFETENSORS_KEY = "fmri"


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------
def read_scan(path: PathLike, *, layout: str = "auto", n_rois: int = N_ROIS) -> np.ndarray:
    """Read one scan and return it as a finite float32 array ``[R, T]`` with ``R == n_rois``.

    ``layout`` tells which axis holds the ROIs: ``"RT"`` (rows are ROIs), ``"TR"`` (rows are
    frames; the array is transposed) or ``"auto"``: the axis of length ``n_rois`` (an INFO
    log line says when a ``[T, R]`` file was transposed; a square ``[n_rois, n_rois]`` scan is
    ambiguous and raises). Leading singleton dimensions (``[1, R, T]``, ``[1, 1, R, T]``) are
    dropped. Integer data is converted to float32.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    path = Path(path)
    raw = _load_array(path)
    while raw.ndim > 2 and raw.shape[0] == 1:
        raw = raw[0]
    if raw.ndim != 2:
        raise ScanError(
            f"{path}: expected a 2-D scan [ROIs, frames] (leading singleton dimensions allowed), "
            f"got shape {tuple(raw.shape)}"
        )
    scan = _orient(raw, path, layout, n_rois)
    if scan.shape[1] == 0:
        raise ScanError(f"{path}: the scan has {scan.shape[0]} ROIs but no frames (shape {tuple(scan.shape)})")
    with np.errstate(over="ignore"):  # float64 beyond float32 range becomes Inf, reported below
        scan = np.ascontiguousarray(scan, dtype=np.float32)
    _check_finite(scan, path)
    return scan


def _load_array(path: Path) -> np.ndarray:
    """Load the raw numeric array of ``path`` by suffix; any unreadable file raises ScanError."""
    suffix = _check_suffix(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise ScanError(f"{path}: scan file not found") from None
    except OSError as e:
        raise ScanError(f"{path}: cannot read the scan file: {e.strerror or e}") from None
    if path.is_dir():
        raise ScanError(f"{path}: is a directory, expected a scan file")
    if stat.st_size == 0:
        raise ScanError(f"{path}: the scan file is empty (0 bytes)")
    if suffix == ".csv":
        return _load_csv(path)
    if suffix == ".npy":
        raw = _call_reader(path, ".npy file", lambda: np.load(path, allow_pickle=False))
    else:
        raw = _load_safetensors(path)
    if raw.dtype.kind not in "iuf":
        raise ScanError(f"{path}: expected numeric (integer or float) data, got dtype {raw.dtype}")
    return raw


def _check_suffix(path: Path) -> str:
    """Return the lower-case suffix of ``path``; raise ScanError unless it is a scan format."""
    suffix = path.suffix.lower()
    if suffix not in SCAN_SUFFIXES:
        raise ScanError(
            f"{path}: unsupported scan format {path.suffix or '(no suffix)'!r}: "
            f"expected one of {', '.join(SCAN_SUFFIXES)}"
        )
    return suffix


def _call_reader(path: Path, what: str, read):
    """Run a library reader, turning its exceptions (corrupt/truncated files) into ScanError."""
    try:
        return read()
    except OSError as e:
        raise ScanError(f"{path}: cannot read the scan file: {e.strerror or e}") from None
    except Exception as e:  # numpy/safetensors raise many types for corrupt files
        detail = " ".join(str(e).split()) or type(e).__name__
        raise ScanError(f"{path}: not a readable {what} (truncated or corrupt?): {detail}") from None


def _load_safetensors(path: Path) -> np.ndarray:
    """The tensor ``fmri`` of a safetensors file, as numpy (bf16 is widened to float32)."""
    from safetensors import safe_open

    def read() -> Tuple[list, Optional[torch.Tensor]]:
        with safe_open(str(path), framework="pt") as f:
            keys = sorted(f.keys())
            return keys, (f.get_tensor(SAFETENSORS_KEY) if SAFETENSORS_KEY in keys else None)

    keys, tensor = _call_reader(path, "safetensors file", read)
    if tensor is None:
        raise ScanError(
            f"{path}: no tensor named {SAFETENSORS_KEY!r}; the file holds "
            f"{', '.join(repr(k) for k in keys) if keys else 'no tensors'}"
        )
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise ScanError(f"{path}: expected numeric (integer or float) data, got dtype {tensor.dtype}")
    return tensor.numpy()


def _load_csv(path: Path) -> np.ndarray:
    """Parse a header-less comma-separated table of numbers (one row per line)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ScanError(f"{path}: not a text CSV file (cannot decode it as UTF-8)") from None
    except OSError as e:
        raise ScanError(f"{path}: cannot read the scan file: {e.strerror or e}") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        cells = line.split(",")
        try:
            row = [float(c) for c in cells]
        except ValueError:
            col, cell = next((i, c) for i, c in enumerate(cells, start=1) if not _is_number(c))
            raise ScanError(
                f"{path}: line {lineno}, column {col}: expected a number, got {cell.strip()!r} "
                f"(CSV scans are comma-separated numbers without a header)"
            ) from None
        if rows and len(row) != len(rows[0]):
            raise ScanError(
                f"{path}: line {lineno} has {len(row)} values, expected {len(rows[0])} like the first row"
            )
        rows.append(row)
    if not rows:
        raise ScanError(f"{path}: the CSV file holds no numbers")
    return np.asarray(rows, dtype=np.float64)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _orient(raw: np.ndarray, path: Path, layout: str, n_rois: int) -> np.ndarray:
    """Return ``raw`` as ``[R, T]`` following ``layout`` (see :func:`read_scan`)."""
    shape = tuple(raw.shape)
    if layout == "auto":
        if shape[0] == n_rois and shape[1] == n_rois:
            raise ScanError(
                f"{path}: orientation is ambiguous: both axes of shape {shape} have {n_rois} entries; "
                f"pass layout='RT' or 'TR' (--layout RT|TR) to say which axis holds the ROIs"
            )
        if shape[1] == n_rois:
            logger.info("%s: read as [T, R] = %s and transposed to [R, T]", path, list(shape))
            return raw.T
        if shape[0] == n_rois:
            return raw
        raise ScanError(
            f"{path}: expected {n_rois} ROIs on one axis, got shape {shape}"
        )
    scan = raw if layout == "RT" else raw.T
    if scan.shape[0] != n_rois:
        axis = "rows" if layout == "RT" else "columns"
        raise ScanError(
            f"{path}: with layout {layout} the {axis} are ROIs: expected {n_rois}, got shape {shape}"
        )
    return scan


def _check_finite(scan: np.ndarray, path: Path) -> None:
    bad = ~np.isfinite(scan)
    if bad.any():
        roi, frame = (int(i) for i in np.argwhere(bad)[0])
        raise ScanError(
            f"{path}: {int(bad.sum())} non-finite values (NaN/Inf; values beyond float32 range count too), "
            f"the first at (roi, frame) = ({roi}, {frame})"
        )


def find_scans(inputs: Sequence[PathLike]) -> list[Path]:
    """Expand ``inputs`` to scan files: files as given, directories to their scan files.

    Directories are listed non-recursively and sorted by name; hidden files (``.name``, e.g.
    macOS ``._scan.npy``) and files whose suffix is not one of ``SCAN_SUFFIXES`` are ignored
    there, but a file named explicitly must have one. A file named twice is returned once.
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(
                p for p in path.iterdir()
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in SCAN_SUFFIXES
            ))
        elif path.exists():
            _check_suffix(path)
            found.append(path)
        else:
            raise ScanError(f"{path}: no such file or directory")
    unique: dict[Path, Path] = {}
    for p in found:
        unique.setdefault(p.resolve(), p)
    if not unique:
        raise ScanError(
            f"no scan files ({', '.join(SCAN_SUFFIXES)}) found in {', '.join(str(i) for i in inputs) or '(no inputs)'}"
        )
    return list(unique.values())


# --------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------
def load_robust_params(path: PathLike, n_rois: int = N_ROIS) -> Tuple[np.ndarray, np.ndarray]:
    """Read robust-scaling parameters: an ``.npz`` with float arrays ``medians`` and ``iqrs``.

    This is the original's ``normalization_params_train.npz`` (per-ROI median and inter-quartile
    range of the training scans' ROI means), each of length ``n_rois``. Returns float64 arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: robust-scaling parameter file not found")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as e:  # truncated or foreign files raise many types
        raise ConfigError(f"{path}: not a readable .npz file: {' '.join(str(e).split())}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ConfigError(f"{path}: expected an .npz archive with arrays 'medians' and 'iqrs', got a single array")
    with npz:
        missing = [k for k in ("medians", "iqrs") if k not in npz.files]
        if missing:
            raise ConfigError(
                f"{path}: missing array(s) {', '.join(missing)}; the file holds {', '.join(npz.files) or 'nothing'}"
            )
        try:
            medians, iqrs = (np.asarray(npz[k], dtype=np.float64) for k in ("medians", "iqrs"))
        except Exception as e:
            raise ConfigError(f"{path}: cannot read 'medians'/'iqrs' as numbers: {' '.join(str(e).split())}") from None
    _check_robust(medians, iqrs, n_rois, str(path))
    return medians, iqrs


def _check_robust(medians: np.ndarray, iqrs: np.ndarray, n_rois: int, source: str) -> None:
    for name, arr in (("medians", medians), ("iqrs", iqrs)):
        if arr.shape != (n_rois,):
            raise ConfigError(f"{source}: {name} must have {n_rois} entries (one per ROI), got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise ConfigError(f"{source}: {name} holds {int((~np.isfinite(arr)).sum())} non-finite values")
    zero = np.flatnonzero(iqrs == 0)
    if zero.size:
        raise ConfigError(
            f"{source}: iqrs must be non-zero, got {zero.size} zero entries (first at ROI {int(zero[0])})"
        )


def robust_scale(x: np.ndarray, medians: np.ndarray, iqrs: np.ndarray) -> np.ndarray:
    """Per-ROI robust scaling ``(x - median[:, None]) / iqr[:, None]`` of ``x`` ``[R, T]``.

    As in the original pretraining loader, the arithmetic runs in float64 (the parameters'
    precision) and the result is cast to float32.
    """
    medians, iqrs = np.asarray(medians, np.float64), np.asarray(iqrs, np.float64)
    _check_robust(medians, iqrs, x.shape[0], "robust-scaling parameters")
    return ((x - medians[:, None]) / iqrs[:, None]).astype(np.float32)


def zscore(x: np.ndarray, path: Optional[PathLike] = None) -> np.ndarray:
    """Whole-scan z-score ``(x - x.mean()) / x.std()`` with the unbiased std, as ``Tensor.std()``.

    The fine-tuning loaders' ``use_normalization``; computed with torch in float32 so the numbers
    match the original. A constant scan (std 0) raises ScanError (naming ``path`` when given).
    """
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    std = t.std()
    if not torch.isfinite(std) or std.item() == 0:
        raise ScanError(f"{path or 'scan'}: cannot z-score a constant scan (std = {std.item()}, shape {tuple(x.shape)})")
    return ((t - t.mean()) / std).numpy()


def resample_indices(n_frames: int, frames: int, sampling_rate: int = 3) -> torch.Tensor:
    """Frame indices (int64 ``[frames]``) of the original temporal sampling, centred.

    ``clip = sampling_rate * frames``; ``start = max(n_frames - clip, 0) / 2`` (the original draws
    ``start`` uniformly from ``[0, delta]`` for training; the centre makes it deterministic);
    ``end = start + clip - 1``; indices ``linspace(start, end, frames)`` clamped to
    ``[0, n_frames - 1]`` and truncated to integers, exactly as the original. Scans shorter than
    the clip repeat their last frame.
    """
    if frames < 1 or sampling_rate < 1:
        raise ConfigError(f"resample needs frames >= 1 and sampling_rate >= 1, got {frames} and {sampling_rate}")
    clip = sampling_rate * frames
    start = max(n_frames - clip, 0) / 2
    end = start + clip - 1
    return torch.linspace(start, end, frames).clamp(0, n_frames - 1).long()


def resample(x: np.ndarray, frames: int = 160, sampling_rate: int = 3) -> np.ndarray:
    """Sample ``frames`` frames of ``x`` ``[R, T]`` every ``sampling_rate`` frames, centred:
    ``x[:, resample_indices(T, frames, sampling_rate)]``, e.g. 490 -> 160 frames."""
    return x[:, resample_indices(x.shape[1], frames, sampling_rate).numpy()]


def crop_or_pad(x: np.ndarray, frames: int) -> np.ndarray:
    """Keep the first ``frames`` frames of ``x`` ``[R, T]``, or append zero frames up to ``frames``.

    Zero padding equals the scan mean when the scan was z-scored (zero is not neutral otherwise).
    """
    if frames < 1:
        raise ConfigError(f"crop/pad needs frames >= 1, got {frames}")
    if x.shape[1] >= frames:
        return x[:, :frames]
    return np.pad(x, ((0, 0), (0, frames - x.shape[1])))


def check_frames(n_frames: int, path: Optional[PathLike] = None) -> None:
    """Raise ScanError unless ``n_frames`` is a positive multiple of the 16-frame patch."""
    if n_frames <= 0 or n_frames % PATCH_T:
        raise ScanError(
            f"{path or 'scan'}: the encoder needs a frame count that is a multiple of {PATCH_T}, got {n_frames} "
            f"frames; resample (--resample 160) or crop/pad (--crop-pad {max(PATCH_T, n_frames // PATCH_T * PATCH_T)})"
        )


@dataclass(frozen=True, eq=False)
class Preprocess:
    """The opt-in preprocessing of a scan ``[R, T]``, applied in this order:

    1. ``robust``: ``(medians, iqrs)`` per-ROI robust scaling (:func:`robust_scale`), pretraining;
    2. ``zscore``: whole-scan z-score (:func:`zscore`), the fine-tuning default;
    3. ``resample_to``: centred temporal sampling every ``sampling_rate`` frames (:func:`resample`);
    4. ``crop_pad_to``: keep the first frames or zero-pad at the end (:func:`crop_or_pad`).

    Normalising before sampling frames is the fine-tuning loaders' order (the pretraining loader
    standardised after sampling; with 160 of 490 frames the statistics barely differ).
    """

    robust: Optional[Tuple[np.ndarray, np.ndarray]] = None
    zscore: bool = False
    resample_to: Optional[int] = None
    sampling_rate: int = 3
    crop_pad_to: Optional[int] = None

    def __call__(self, x: np.ndarray, path: Optional[PathLike] = None) -> np.ndarray:
        """Preprocess ``x`` ``[R, T]``; ``path`` only names the scan in errors."""
        if self.robust is not None:
            x = robust_scale(x, *self.robust)
        if self.zscore:
            x = zscore(x, path)
        if self.resample_to is not None:
            x = resample(x, self.resample_to, self.sampling_rate)
        if self.crop_pad_to is not None:
            x = crop_or_pad(x, self.crop_pad_to)
        return np.ascontiguousarray(x, dtype=np.float32)

    def describe(self) -> str:
        """A short text of the steps, e.g. ``"zscore, resample 160 (rate 3)"``, or ``"none"``."""
        steps = []
        if self.robust is not None:
            steps.append("robust")
        if self.zscore:
            steps.append("zscore")
        if self.resample_to is not None:
            steps.append(f"resample {self.resample_to} (rate {self.sampling_rate})")
        if self.crop_pad_to is not None:
            steps.append(f"crop/pad {self.crop_pad_to}")
        return ", ".join(steps) or "none"

"""Writing embeddings: one file per scan, written atomically.

Each output is first written to a hidden temporary file in the destination directory
(``.<name>.<pid>.<random>.tmp``), flushed and fsync'ed, then renamed over the destination with
``os.replace``, so a reader, a crash or Ctrl-C never leaves a half-written output behind: the
destination holds either its old content or the complete new one, and the temporary file is
removed on any failure. Outputs are float32 whatever precision the encoder computed in.
"""
from __future__ import annotations

import io
import os
import secrets
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .errors import ConfigError

OUTPUT_FORMATS = ("safetensors", "npy")
PathLike = Union[str, Path]


def output_path(scan: PathLike, out_dir: PathLike, fmt: str) -> Path:
    """The output file of ``scan`` in ``out_dir``: ``<out_dir>/<scan stem>.<fmt>``."""
    _check_format(fmt)
    return Path(out_dir) / f"{Path(scan).stem}.{fmt}"


def plan_outputs(scans: Sequence[PathLike], out_dir: PathLike, fmt: str) -> list[Path]:
    """Output paths of ``scans`` (see :func:`output_path`), one per scan, in order.

    Raises ConfigError when two scans would write the same output (same stem) or an output
    would replace one of the input scans.
    """
    outputs = [output_path(s, out_dir, fmt) for s in scans]
    inputs = {Path(s).resolve(): Path(s) for s in scans}
    owner: dict[Path, Path] = {}
    for scan, out in zip(scans, outputs):
        key = out.resolve()
        if key in inputs:
            raise ConfigError(
                f"refusing to overwrite input scan {inputs[key]} with its embeddings {out}; "
                f"choose another output directory or --format"
            )
        if key in owner:
            raise ConfigError(
                f"scans {owner[key]} and {scan} would both write {out}: rename one, "
                f"or encode them into different output directories"
            )
        owner[key] = Path(scan)
    return outputs


def write_embeddings(
    path: PathLike,
    data: Union[np.ndarray, torch.Tensor],
    fmt: str,
    key: str,
    metadata: Optional[Mapping[str, str]] = None,
) -> None:
    """Atomically write ``data`` (any shape, e.g. tokens ``[N, D]`` or pooled ``[D]``) as float32.

    ``fmt`` is ``"safetensors"`` (one tensor named ``key``, plus the string ``metadata`` in the
    header) or ``"npy"`` (a plain array; ``key`` and ``metadata`` are not stored).
    """
    _check_format(fmt)
    if isinstance(data, torch.Tensor):
        array = data.detach().to("cpu", torch.float32).contiguous().numpy()
    else:
        array = np.ascontiguousarray(data, dtype=np.float32)
    if fmt == "safetensors":
        from safetensors.numpy import save

        payload = save({key: array}, metadata=dict(metadata) if metadata else None)
    else:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        payload = buffer.getvalue()
    _atomic_write(Path(path), payload)


def _check_format(fmt: str) -> None:
    if fmt not in OUTPUT_FORMATS:
        raise ConfigError(f"unknown output format {fmt!r}: expected one of {', '.join(OUTPUT_FORMATS)}")


def _atomic_write(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` through a temporary sibling file, fsync and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        # os.open with mode 0o666 lets the umask decide the permissions, as for any new file.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # includes KeyboardInterrupt: never leave the temporary file behind
        tmp.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

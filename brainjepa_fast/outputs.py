"""Writing embeddings: one file per scan, written atomically.

Each output is first written to a hidden temporary file in the destination directory
(``.<name>.<pid>.<random>.tmp``), flushed and fsync'ed, then renamed over the destination with
``os.replace``, so a reader, a crash or Ctrl-C never leaves a half-written output behind: the
destination holds either its old content or the complete new one, and the temporary file is
removed on any failure. Outputs are float32 whatever precision the encoder computed in, unless
a smaller ``dtype`` is asked for (float16 in either format, bfloat16 in safetensors): half the
bytes to write and store.

:class:`BackgroundWriter` runs these writes in a few threads, so that writing and fsyncing
(13.8 MB per standard scan's tokens) overlap the encoder and each other.
"""
from __future__ import annotations

import io
import os
import secrets
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Deque, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .errors import ConfigError

OUTPUT_FORMATS = ("safetensors", "npy")
#: Stored dtypes by name; numpy (hence ``.npy``) has no bfloat16.
OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PathLike = Union[str, Path]


def output_path(scan: PathLike, out_dir: PathLike, fmt: str) -> Path:
    """The output file of ``scan`` in ``out_dir``: ``<out_dir>/<scan stem>.<fmt>``."""
    check_output_options(fmt)
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
    dtype: str = "float32",
) -> None:
    """Atomically write ``data`` (any shape, e.g. tokens ``[N, D]`` or pooled ``[D]``) as ``dtype``
    (a name in :data:`OUTPUT_DTYPES`; default float32, whatever ``data``'s dtype).

    ``fmt`` is ``"safetensors"`` (one tensor named ``key``, plus the string ``metadata`` in the
    header) or ``"npy"`` (a plain array; ``key`` and ``metadata`` are not stored).
    """
    check_output_options(fmt, dtype)
    tensor = (data if isinstance(data, torch.Tensor) else torch.from_numpy(np.asarray(data))).detach()
    tensor = tensor.to("cpu", OUTPUT_DTYPES[dtype]).contiguous()
    if fmt == "safetensors":
        from safetensors.torch import save

        payload = save({key: tensor}, metadata=dict(metadata) if metadata else None)
    else:
        buffer = io.BytesIO()
        np.save(buffer, tensor.numpy(), allow_pickle=False)
        payload = buffer.getvalue()
    _atomic_write(Path(path), payload)


def check_output_options(fmt: str, dtype: str = "float32") -> None:
    """Raise :class:`ConfigError` for an unknown format or dtype, or bfloat16 in ``.npy``."""
    if fmt not in OUTPUT_FORMATS:
        raise ConfigError(f"unknown output format {fmt!r}: expected one of {', '.join(OUTPUT_FORMATS)}")
    if dtype not in OUTPUT_DTYPES:
        raise ConfigError(f"unknown output dtype {dtype!r}: expected one of {', '.join(OUTPUT_DTYPES)}")
    if fmt == "npy" and dtype == "bfloat16":
        raise ConfigError("output dtype bfloat16 needs --format safetensors: .npy (numpy) has no bfloat16")


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


class BackgroundWriter:
    """:func:`write_embeddings` in ``workers`` threads, at most ``max_pending`` outputs queued
    (their arrays stay in memory until written); ``on_written()`` is called in the caller's
    thread for each finished output, oldest first.

    Use it as a context manager. Leaving the block normally waits for every write and raises the
    first error; leaving it on an exception (a failed write, Ctrl-C) cancels the writes not yet
    started and waits for the running ones. Each write is atomic, so the directory then holds
    complete outputs only.
    """

    def __init__(self, workers: int, max_pending: int, on_written: Callable[[], None] = lambda: None):
        if workers < 1 or max_pending < 1:
            raise ValueError(f"workers and max_pending must be >= 1, got {workers} and {max_pending}")
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="brainjepa-fast-writer")
        self._pending: Deque[Future] = deque()
        self._max_pending = max_pending
        self._on_written = on_written

    def submit(self, path: PathLike, data: Union[np.ndarray, torch.Tensor], fmt: str, key: str,
               metadata: Optional[Mapping[str, str]] = None, dtype: str = "float32") -> None:
        """Queue one :func:`write_embeddings` (``data`` on the CPU); blocks while ``max_pending``
        are queued."""
        check_output_options(fmt, dtype)
        while len(self._pending) >= self._max_pending:
            self._finish_oldest()
        self._pending.append(self._pool.submit(write_embeddings, path, data, fmt, key, metadata, dtype))

    def _finish_oldest(self) -> None:
        self._pending.popleft().result()  # a writer's exception is raised here
        self._on_written()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                while self._pending:
                    self._finish_oldest()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

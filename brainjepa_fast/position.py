"""Brain-JEPA positional table: ``[emb_t | emb_g]``, 384 + 384 dims for vit_base.

Tokens are ROI-major (token = roi * n_t + t, n_t = T / 16).

* ``emb_t`` (stored in checkpoints as ``pos_embed_proj.emb_h``, ``[R * n_t, D/2]``): the 1-D
  sin/cos table of the time-patch index ``t`` (sin half, then cos half,
  omega_i = 1 / 10000^(i / (D/4))), computed in float64 like the original's numpy code.
* ``emb_g``: ``Linear(30 -> D/2)`` of each ROI's brain-gradient row, repeated over time, then
  min-max scaled to [-1, 1] over the whole table.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from .config import N_GRADIENTS, N_ROIS
from .errors import ConfigError

PathLike = Union[str, Path]


def sincos_table(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """1-D sin/cos embedding ``[M, dim]`` (float32) of ``positions`` ``[M]``, computed in float64."""
    if dim % 2:
        raise ConfigError(f"sin/cos table needs an even width, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def time_table(n_rois: int, n_t: int, dim: int) -> torch.Tensor:
    """``emb_t`` ``[n_rois * n_t, dim]``: the time-patch index of each ROI-major token, embedded."""
    t = torch.arange(n_t).repeat(n_rois)
    return sincos_table(dim, t)


def gradient_table(
    gradient: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, n_t: int
) -> torch.Tensor:
    """``emb_g`` ``[R * n_t, D/2]`` in float32 from ``gradient`` ``[R, G]`` and ``Linear(G -> D/2)``.

    Min-max scaling spans the whole table; repeating rows over time does not change it, so it is
    taken before the repeat.
    """
    proj = F.linear(gradient.float(), weight.float(), bias.float())
    proj = (proj - proj.min()) / (proj.max() - proj.min()) * 2 - 1
    return proj.repeat_interleave(n_t, dim=0)


def default_gradient_path() -> Path:
    """The 450 x 30 population brain-gradient table shipped with the package."""
    return Path(str(resources.files("brainjepa_fast") / "data" / "gradient_mapping_450.csv"))


def load_gradient(path: Optional[PathLike] = None, n_rois: int = N_ROIS) -> torch.Tensor:
    """Read a brain-gradient table ``[n_rois, 30]`` (CSV, no header) as float32.

    ``path=None`` reads the table shipped inside the package (Schaefer-400 + Tian-III, 450 ROIs).
    """
    path = Path(path) if path is not None else default_gradient_path()
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read gradient table: {exc}") from None
    if table.shape != (n_rois, N_GRADIENTS):
        raise ConfigError(
            f"{path}: gradient table must be {n_rois} x {N_GRADIENTS} (ROIs x gradients), "
            f"got {table.shape[0]} x {table.shape[1]}"
        )
    if not np.isfinite(table).all():
        raise ConfigError(f"{path}: gradient table holds NaN/Inf")
    return torch.from_numpy(table).float()

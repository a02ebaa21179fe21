"""The one-call API: :func:`load` a checkpoint into an :class:`Encoder`, :func:`encode` scans."""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from .checkpoint import COMPONENTS, infer_variant, read_component, validate_state_dict
from .errors import CheckpointError, ScanError
from .model import Encoder
from .position import PathLike, load_gradient


def default_device() -> torch.device:
    """CUDA if present, then Apple's MPS, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load(
    weights: PathLike,
    gradient: Optional[PathLike] = None,
    *,
    component: str = "target_encoder",
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
) -> Encoder:
    """Load an :class:`Encoder` from a Brain-JEPA checkpoint.

    Args:
        weights: ``.safetensors`` (published layout) or the original ``.pth.tar``.
        gradient: brain-gradient CSV (450 x 30); ``None`` uses the table shipped in the package.
        component: ``"target_encoder"`` (inference), ``"encoder"``; see :data:`COMPONENTS`.
        device: default :func:`default_device`.
        dtype: compute dtype (``torch.float32``, ``torch.bfloat16``, ``torch.float16``);
            default float32. Weights are cast once here, never per call.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns the encoder in eval mode. Every missing, unexpected or misshapen key is reported by
    name in a :class:`CheckpointError`.
    """
    if component == "predictor" or component not in COMPONENTS:
        raise CheckpointError(f"component {component!r} is not an encoder: use 'target_encoder' or 'encoder'")
    state = read_component(weights, component)
    source = f"{weights} [{component}]"
    variant, frames = infer_variant(state, source)
    table = load_gradient(gradient)
    encoder = Encoder(variant, table, frames=frames, backend=backend)
    validate_state_dict(encoder, state, source)
    encoder.load_state_dict(state)
    encoder.to(device=torch.device(device) if device is not None else default_device(), dtype=dtype)
    encoder.backend  # resolve now: an impossible backend request fails at load, not mid-cohort
    return encoder.eval()


ArrayLike = Union[torch.Tensor, np.ndarray]


def as_batch(x: ArrayLike) -> torch.Tensor:
    """``[R, T]``, ``[B, R, T]`` or ``[B, 1, R, T]`` (tensor or ndarray) -> float tensor ``[B, 1, R, T]``."""
    t = torch.as_tensor(x) if isinstance(x, np.ndarray) else x
    if not isinstance(t, torch.Tensor):
        raise ScanError(f"expected a tensor or ndarray, got {type(x).__name__}")
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        t = t.float()  # integers and float64 (numpy's default); the encoder casts to its own dtype
    if t.ndim == 2:
        t = t[None, None]
    elif t.ndim == 3:
        t = t[:, None]
    elif t.ndim != 4 or t.shape[1] != 1:
        raise ScanError(f"expected [R, T], [B, R, T] or [B, 1, R, T], got {list(t.shape)}")
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise ScanError(f"input holds {bad} NaN/Inf values")
    return t


def encode(
    x: ArrayLike,
    encoder: Optional[Encoder] = None,
    *,
    batch_size: Optional[int] = None,
    **load_kwargs,
) -> torch.Tensor:
    """Embed scans: ``x`` ``[R, T]`` / ``[B, R, T]`` / ``[B, 1, R, T]`` -> ``[B, R*T/16, D]``.

    With ``encoder=None`` the encoder is built by ``load(**load_kwargs)`` (``weights=`` needed).
    Runs without autograd, ``batch_size`` scans at a time (default: all), and returns the
    embeddings on the encoder's device in its dtype: ``[B, 4500, 768]`` for standard scans.
    Scans move to the device as they are (float32 usually): the Triton patch embedding reads them
    in their own dtype, the PyTorch path casts them.
    """
    if encoder is None:
        if "weights" not in load_kwargs:
            raise CheckpointError("encode() needs an encoder or weights=<checkpoint path>")
        encoder = load(**load_kwargs)
    elif load_kwargs:
        raise TypeError(f"encode() got load options {sorted(load_kwargs)} together with an encoder")
    batch = as_batch(x)
    ref = encoder.norm.weight
    step = batch_size or batch.shape[0]
    outs = []
    with torch.inference_mode():
        for i in range(0, batch.shape[0], step):
            chunk = batch[i : i + step].to(device=ref.device, non_blocking=True)
            outs.append(encoder(chunk))
    return outs[0] if len(outs) == 1 else torch.cat(outs)

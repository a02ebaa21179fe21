"""Reading, checking and writing Brain-JEPA checkpoints.

Published layout: one safetensors file of float32 tensors whose keys start with a component,
``encoder.`` / ``predictor.`` / ``target_encoder.`` (384 tensors for vit_base: 151 + 82 + 151);
inference uses ``target_encoder``. A DDP ``module.`` segment may follow (or precede) the
component. The original training code saves the same as a ``.pth.tar`` dict
``{"encoder": sd, "predictor": sd, "target_encoder": sd, "epoch": ..., ...}``; a bare encoder
state dict (e.g. a fine-tuned encoder saved with ``torch.save(model.state_dict())``) is read too.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import N_GRADIENTS, N_ROIS, PATCH_T, PREDICTOR_DEPTH, PREDICTOR_DIM, VARIANTS, get_config
from .errors import CheckpointError
from .position import PathLike, time_table

COMPONENTS = ("encoder", "predictor", "target_encoder")
StateDict = Dict[str, torch.Tensor]


def strip_module_prefix(state: StateDict) -> StateDict:
    """Drop the ``module.`` that DDP puts in front of every key."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def _split_flat(keys: Iterable[str]) -> Dict[str, Dict[str, str]]:
    """Group flat keys ``[module.]component.[module.]name`` by component: ``{comp: {name: key}}``."""
    groups: Dict[str, Dict[str, str]] = {}
    for key in keys:
        parts = key.split(".")
        if parts[0] == "module":
            parts = parts[1:]
        if len(parts) > 1 and parts[0] in COMPONENTS:
            name = ".".join(parts[2:] if parts[1] == "module" else parts[1:])
            groups.setdefault(parts[0], {})[name] = key
    return groups


def _load_pth(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or non-pickle files
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(exc).__name__}): expected a .safetensors file, or a "
            ".pth/.pth.tar written by torch.save that loads with weights_only=True (tensors, dicts, numbers)"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of components, got {type(obj).__name__}")
    return obj


def _pth_components(path: Path, obj: dict) -> Dict[str, StateDict]:
    comps = {c: obj[c] for c in COMPONENTS if isinstance(obj.get(c), dict)}
    if not comps and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        flat = _split_flat(obj)
        if flat:
            comps = {c: {n: obj[k] for n, k in names.items()} for c, names in flat.items()}
        else:  # a bare encoder state dict
            comps = {"target_encoder": obj}
    if not comps:
        raise CheckpointError(
            f"{path}: no component found: expected keys {', '.join(COMPONENTS)}, got {', '.join(map(str, list(obj)[:8]))}"
        )
    return {c: strip_module_prefix(sd) for c, sd in comps.items()}


def read_component(path: PathLike, component: str = "target_encoder") -> StateDict:
    """Return the state dict of ``component`` from a ``.safetensors`` or ``.pth``/``.pth.tar`` file.

    Keys come back without component or ``module.`` prefixes, tensors as stored, on the CPU.
    """
    path = Path(path)
    if component not in COMPONENTS:
        raise CheckpointError(f"unknown component {component!r}: expected one of {', '.join(COMPONENTS)}")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                groups = _split_flat(f.keys())
                if component not in groups:
                    raise CheckpointError(
                        f"{path}: no '{component}.' tensors; components present: {', '.join(sorted(groups)) or 'none'}"
                    )
                return {name: f.get_tensor(key) for name, key in groups[component].items()}
        except (SafetensorError, OSError, ValueError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    comps = _pth_components(path, _load_pth(path))
    if component not in comps:
        raise CheckpointError(f"{path}: no '{component}' component; present: {', '.join(sorted(comps))}")
    return comps[component]


def infer_variant(state: StateDict, source: str) -> Tuple[str, int]:
    """``(variant, frames)`` of an encoder state dict, from its shapes."""
    for key in ("patch_embed.proj.weight", "pos_embed_proj.emb_h"):
        if key not in state:
            raise CheckpointError(f"{source}: missing key {key!r}: not a Brain-JEPA encoder state dict")
    dim = state["patch_embed.proj.weight"].shape[0]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for name, cfg in VARIANTS.items():
        if cfg.embed_dim == dim and cfg.depth == depth:
            break
    else:
        known = ", ".join(f"{n} ({c.embed_dim} dims, {c.depth} blocks)" for n, c in VARIANTS.items())
        raise CheckpointError(f"{source}: {dim} dims and {depth} blocks match no variant; known: {known}")
    n_tokens = state["pos_embed_proj.emb_h"].shape[0]
    if n_tokens % N_ROIS:
        raise CheckpointError(f"{source}: pos_embed_proj.emb_h has {n_tokens} rows, not a multiple of {N_ROIS} ROIs")
    return name, n_tokens // N_ROIS * PATCH_T


def _describe_mismatch(expected: Dict[str, torch.Size], state: StateDict, source: str) -> Optional[str]:
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshapen = [
        f"{k} expected {list(expected[k])} got {list(state[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k])
    ]

    def listing(label: str, items: list) -> str:
        shown = "; ".join(items[:6]) + (f"; ... ({len(items) - 6} more)" if len(items) > 6 else "")
        return f"{len(items)} {label}: {shown}"

    parts = [listing(label, items) for label, items in
             (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)) if items]
    return f"{source}: " + " | ".join(parts) if parts else None


def validate_state_dict(module: torch.nn.Module, state: StateDict, source: str) -> None:
    """Raise :class:`CheckpointError` naming every missing, unexpected or misshapen key, and NaN/Inf."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    problem = _describe_mismatch(expected, state, source)
    if problem:
        raise CheckpointError(problem)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{source}: NaN/Inf in {len(bad)} tensors: {', '.join(bad[:6])}")


# -- writing random checkpoints ---------------------------------------------------------------
def _encoder_shapes(variant: str, n_tokens: int) -> Dict[str, torch.Size]:
    from .model import Encoder  # local: model imports this module lazily too

    with torch.device("meta"):
        enc = Encoder(variant, torch.empty(N_ROIS, N_GRADIENTS), frames=n_tokens // N_ROIS * PATCH_T)
    return {k: v.shape for k, v in enc.state_dict().items()}


def _predictor_shapes(variant: str, n_tokens: int) -> Dict[str, torch.Size]:
    """The original ``VisionTransformerPredictor``: 6 blocks at 384 dims, heads as the encoder's."""
    from .model import Block

    cfg, P = get_config(variant), PREDICTOR_DIM
    shapes: Dict[str, torch.Size] = {
        "mask_token": torch.Size([1, 1, P]),
        "predictor_embed.weight": torch.Size([P, cfg.embed_dim]),
        "predictor_embed.bias": torch.Size([P]),
        "predictor_2dpe_proj.emb_h": torch.Size([n_tokens, P // 2]),
        "predictor_2dpe_proj.predictor_pos_embed_proj.weight": torch.Size([P // 2, N_GRADIENTS]),
        "predictor_2dpe_proj.predictor_pos_embed_proj.bias": torch.Size([P // 2]),
    }
    with torch.device("meta"):
        block = Block(P, cfg.num_heads, P * cfg.mlp_ratio)
    for i in range(PREDICTOR_DEPTH):
        shapes.update({f"predictor_blocks.{i}.{k}": v.shape for k, v in block.state_dict().items()})
    shapes.update({
        "predictor_norm.weight": torch.Size([P]),
        "predictor_norm.bias": torch.Size([P]),
        "predictor_proj.weight": torch.Size([cfg.embed_dim, P]),
        "predictor_proj.bias": torch.Size([cfg.embed_dim]),
    })
    return shapes


def _init_tensor(name: str, shape: torch.Size, gen: torch.Generator, perturb: float) -> torch.Tensor:
    """The original initialisation: trunc-normal(0.02) weights (Linear, Conv2d, mask token), zero
    biases, LayerNorm (1, 0), sin/cos ``emb_h``. ``perturb`` > 0 adds N(0, perturb) to biases and
    LayerNorm parameters, as training moves them, so tests see every parameter."""
    layer = name.rsplit(".", 1)[0]
    if name.endswith("emb_h"):
        n_rois, half = N_ROIS, shape[1]
        return time_table(n_rois, shape[0] // n_rois, half)
    is_norm = layer.endswith(("norm", "norm1", "norm2"))
    if name.endswith(".bias") or is_norm:
        t = torch.ones(shape) if (is_norm and name.endswith(".weight")) else torch.zeros(shape)
        if perturb > 0:
            t += perturb * torch.randn(shape, generator=gen)
        return t
    t = torch.empty(shape)
    return torch.nn.init.trunc_normal_(t, std=0.02, a=-2.0, b=2.0, generator=gen)


def random_state_dicts(
    seed: int, variant: str = "vit_base", *, frames: int = 160, perturb: float = 0.0
) -> Dict[str, StateDict]:
    """Seeded random ``{component: state dict}`` in the published layout (float32, CPU).

    The original starts ``target_encoder`` as a copy of ``encoder``; here each component draws
    its own values (from one seeded stream), so loading the wrong component cannot pass a test.
    """
    get_config(variant)
    n_tokens = N_ROIS * (frames // PATCH_T)
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "encoder": _encoder_shapes(variant, n_tokens),
        "predictor": _predictor_shapes(variant, n_tokens),
    }
    shapes["target_encoder"] = shapes["encoder"]
    return {
        comp: {name: _init_tensor(name, shape, gen, perturb) for name, shape in shapes[comp].items()}
        for comp in COMPONENTS
    }


def save_random_checkpoint(
    path: PathLike,
    seed: int,
    variant: str = "vit_base",
    *,
    module_prefix: bool = False,
    perturb: float = 0.0,
) -> Path:
    """Write a seeded random checkpoint in the exact published layout; return its path.

    ``.safetensors``: flat keys ``<component>.[module.]<name>`` (384 tensors for vit_base).
    ``.pth``/``.pth.tar``: the original training code's dict ``{"encoder", "predictor",
    "target_encoder", "epoch"}``. ``module_prefix`` writes DDP-style ``module.`` keys.
    """
    path = Path(path)
    comps = random_state_dicts(seed, variant, perturb=perturb)
    pre = "module." if module_prefix else ""
    if path.suffix == ".safetensors":
        flat = {f"{c}.{pre}{k}": v.contiguous() for c, sd in comps.items() for k, v in sd.items()}
        save_file(flat, str(path), metadata={"variant": variant, "seed": str(seed)})
    else:
        obj = {c: {f"{pre}{k}": v for k, v in sd.items()} for c, sd in comps.items()}
        obj["epoch"] = 0
        torch.save(obj, path)
    return path


def describe_checkpoint(path: PathLike) -> dict:
    """Summary of a checkpoint: format, DDP prefix, tensor counts, parameters and variant per component."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    shapes: Dict[str, Dict[str, Tuple[torch.Size, torch.dtype]]] = {}
    module_prefix = False
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                module_prefix = any(".module." in k or k.startswith("module.") for k in keys)
                for comp, names in _split_flat(keys).items():
                    shapes[comp] = {}
                    for name, key in names.items():
                        sl = f.get_slice(key)
                        shapes[comp][name] = (torch.Size(sl.get_shape()), sl.get_dtype())
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
        fmt, total = "safetensors", len(keys)
    else:
        obj = _load_pth(path)
        module_prefix = any(
            isinstance(sd, dict) and any(str(k).startswith("module.") for k in sd) for sd in obj.values()
        )
        comps = _pth_components(path, obj)
        shapes = {c: {k: (v.shape, v.dtype) for k, v in sd.items()} for c, sd in comps.items()}
        fmt, total = "pth", sum(len(sd) for sd in comps.values())
    summary = {}
    for comp, entries in shapes.items():
        variant = None
        if comp != "predictor":
            try:
                variant = infer_variant({k: torch.empty(s, device="meta") for k, (s, _) in entries.items()}, str(path))[0]
            except CheckpointError:
                variant = None
        dtypes = sorted({str(d).replace("torch.", "") for _, d in entries.values()})
        summary[comp] = {
            "tensors": len(entries),
            "parameters": sum(math.prod(s) for s, _ in entries.values()),
            "variant": variant,
            "dtype": ",".join(dtypes),
        }
    return {"path": str(path), "format": fmt, "module_prefix": module_prefix, "total_tensors": total,
            "components": summary}

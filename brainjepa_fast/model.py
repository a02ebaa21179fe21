"""The Brain-JEPA encoder, state-dict compatible with the original ``VisionTransformer``.

Layout (vit_base): scan ``[B, 1, R=450, T=160]`` -> ``Conv2d(1, 768, (1,16), stride (1,16))``
-> tokens ``[B, N = R * T/16, 768]`` in ROI-major order, plus the positional table of
:mod:`brainjepa_fast.position` -> 12 pre-norm blocks -> final LayerNorm -> ``[B, N, 768]``.
No cls token. Parameter names and shapes are the original's, so ``Encoder.load_state_dict``
takes a ``target_encoder`` state dict as it is.

Backends: ``"torch"`` runs the modules below (attention through
``F.scaled_dot_product_attention``, which serves CPU, MPS and CUDA); ``"triton"`` runs the
hand-written kernels of :mod:`brainjepa_kernels` (inference on CUDA); ``"auto"`` picks Triton
on CUDA when it is importable and the torch path otherwise (``encoder.backend_reason`` says why).
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import CPU_ATTENTION_CHUNK, CPU_MLP_ROWS, LN_EPS, N_ROIS, PATCH_T, PRETRAIN_FRAMES, EncoderConfig, get_config
from .errors import ConfigError, ScanError
from .position import PathLike, gradient_table, load_gradient, time_table

BACKENDS = ("auto", "torch", "triton")


class PatchEmbed(nn.Module):
    """``[B, 1, R, T]`` -> ``[B, R * T/16, D]``: one 16-frame temporal patch per token, ROI-major.

    ``proj`` is the original's ``Conv2d(1, D, (1, 16), stride (1, 16))`` (same parameters), but the
    forward computes it as a matrix product over the unfolded patches, ``[B, R, T/16, 16] @ W^T``:
    the same sums, and exact fp32 on CUDA too, where cuDNN runs fp32 convolutions in TF32 by
    default (``torch.backends.cudnn.allow_tf32``; 2.6e-4 relative error at B=1 on an H100).
    """

    def __init__(self, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=(1, PATCH_T), stride=(1, PATCH_T))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = x[:, 0].unflatten(-1, (-1, PATCH_T))  # [B, R, T/16, 16]
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias).flatten(1, 2)


class GradientPositionEmbedding(nn.Module):
    """``[emb_t | emb_g]`` positional table ``[R * n_t, D]`` (the original's ``GradTs_2dPE``).

    ``emb_h`` holds ``emb_t`` for the pretraining length (``n_t`` = 10) as the checkpoint stores
    it; other lengths use the same formula, which equals ``emb_h`` on the first 10 patches.
    """

    def __init__(self, embed_dim: int, n_rois: int, n_t: int, n_gradients: int):
        super().__init__()
        self.n_rois = n_rois
        self.emb_h = nn.Parameter(time_table(n_rois, n_t, embed_dim // 2), requires_grad=False)
        self.predictor_pos_embed_proj = nn.Linear(n_gradients, embed_dim // 2)

    def forward(self, gradient: torch.Tensor, n_t: int) -> torch.Tensor:
        """Positional table ``[R * n_t, D]`` in float32 for scans of ``n_t`` time patches."""
        half = self.emb_h.shape[1]
        if self.emb_h.shape[0] == self.n_rois * n_t:
            emb_t = self.emb_h.float()
        else:
            emb_t = time_table(self.n_rois, n_t, half).to(self.emb_h.device)
        proj = self.predictor_pos_embed_proj
        emb_g = gradient_table(gradient, proj.weight, proj.bias, n_t)
        return torch.cat([emb_t, emb_g], dim=1)


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int = CPU_ATTENTION_CHUNK) -> torch.Tensor:
    """Exact ``softmax(q kᵀ / √d) v`` for CPU inference in bf16, one head at a time.

    ``q, k, v``: ``[B, H, N, d]`` (any strides) -> ``[B, H, N, d]``. Scores are formed for
    ``chunk`` query rows of one head at a time (``[chunk, N]``, a few MB, cache-resident)
    as two matrix products and a softmax. PyTorch's CPU SDPA runs bf16 at fp32 speed on CPUs
    without AMX (measured 366 vs 142 ms a layer on a 2-core AMD EPYC, see ``bench/NOTES.md``;
    on AMX CPUs SDPA packs bf16 for the matrix units and is kept, see :func:`use_cpu_attention`);
    the scores round to bf16 before the softmax (fp32 inside), which the bf16 whole-encoder
    tolerance covers. (fp16 matrix products are ~20x slower than SDPA on such CPUs, so fp16
    keeps SDPA.) No autograd: it keeps no ``N x N`` state for backward.
    """
    B, H, N, d = q.shape
    out = q.new_empty(B, H, N, d)
    scale = d ** -0.5
    for b in range(B):
        for h in range(H):
            qh, kt, vh = q[b, h] * scale, k[b, h].t(), v[b, h]
            for i in range(0, N, chunk):
                probs = torch.softmax(torch.mm(qh[i : i + chunk], kt), dim=-1)
                torch.mm(probs, vh, out=out[b, h, i : i + chunk])
    return out


@functools.lru_cache(maxsize=None)
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles, with which PyTorch's SDPA runs bf16 on the matrix units
    (probed once, not in every layer's forward)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


def use_cpu_attention(x: torch.Tensor) -> bool:
    """Whether :func:`cpu_attention` serves ``x``: bf16 on a CPU without AMX, no autograd."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and not (torch.is_grad_enabled() and x.requires_grad)
            and not cpu_has_amx())


class Attention(nn.Module):
    """Multi-head self-attention over all tokens: ``qkv`` (with bias) -> attention -> ``proj``.

    Attention is ``F.scaled_dot_product_attention``, except for bf16 CPU inference,
    where :func:`cpu_attention` is faster.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attention = cpu_attention if use_cpu_attention(qkv) else F.scaled_dot_product_attention
        out = attention(qkv[0], qkv[1], qkv[2])  # [B, H, N, hd]
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))`` with exact (erf) GELU."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x += attn(LN1(x)); x += mlp(LN2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        if x.device.type == "cpu" and not torch.is_grad_enabled():
            return self.mlp_in_row_chunks(x)
        return x + self.mlp(self.norm2(x))

    def mlp_in_row_chunks(self, x: torch.Tensor, rows: int = CPU_MLP_ROWS) -> torch.Tensor:
        """``x += mlp(LN2(x))``, ``rows`` tokens at a time, in place on ``x`` [..., D] (or on a
        contiguous copy, which is returned; CPU inference). The [rows, 4D] hidden activations
        stay cache-sized and below the size for which glibc maps fresh, page-faulting memory on
        every layer: fp32 8.3-8.6 -> 7.8-8.0 s a scan on the 2-core EPYC (``bench/NOTES.md``).
        Same arithmetic: every op here is per token."""
        x = x.contiguous()
        flat = x.view(-1, x.shape[-1])
        for start in range(0, flat.shape[0], rows):
            chunk = flat[start : start + rows]
            chunk += self.mlp(self.norm2(chunk))
        return x


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    """Whether Triton can be imported (looked up once: ~30 us a lookup, paid by every forward)."""
    return importlib.util.find_spec("triton") is not None


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the Triton backend cannot run on ``device`` (``None`` when it can)."""
    if device.type != "cuda":
        return f"device is {device.type}, Triton kernels need CUDA"
    if not triton_installed():
        return "Triton is not installed"
    return None


class Encoder(nn.Module):
    """Brain-JEPA encoder: ``forward(x [B, 1, R, T]) -> [B, R * T/16, D]``.

    Args:
        variant: ``"vit_small"``, ``"vit_base"`` (the published model) or ``"vit_large"``.
        gradient: brain-gradient table ``[R, 30]`` (tensor) or a CSV path; ``None`` reads the
            450 x 30 table shipped with the package.
        frames: frames the checkpoint's ``emb_h`` was built for (160: the model was pretrained
            on 160 frames). ``forward`` accepts any ``T`` that is a multiple of 16.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see module docstring).
    """

    def __init__(
        self,
        variant: str = "vit_base",
        gradient: Union[torch.Tensor, PathLike, None] = None,
        *,
        frames: int = PRETRAIN_FRAMES,
        backend: str = "auto",
    ):
        super().__init__()
        self.config: EncoderConfig = get_config(variant)
        if not isinstance(gradient, torch.Tensor):
            gradient = load_gradient(gradient)
        gradient = gradient.detach().float().reshape(-1, gradient.shape[-1])
        if frames % PATCH_T:
            raise ConfigError(f"frames must be a multiple of {PATCH_T}, got {frames}")
        n_rois, n_grad = gradient.shape
        cfg = self.config
        self.n_rois = n_rois
        self.patch_embed = PatchEmbed(cfg.embed_dim)
        self.pos_embed_proj = GradientPositionEmbedding(cfg.embed_dim, n_rois, frames // PATCH_T, n_grad)
        self.blocks = nn.ModuleList(Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_dim) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=LN_EPS)
        self.register_buffer("gradient", gradient, persistent=False)
        self.backend_request = backend
        self.set_backend(backend)
        self._triton_runner = None

    # -- backend selection -------------------------------------------------------------------
    def set_backend(self, backend: str) -> None:
        """Choose ``"auto"``, ``"torch"`` or ``"triton"``; resolved against the current device."""
        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        self.backend_request = backend

    def _resolve_backend(self) -> Tuple[str, str]:
        device = self.norm.weight.device
        reason = triton_unavailable_reason(device)
        if self.backend_request == "torch":
            return "torch", "backend='torch' requested"
        if self.backend_request == "triton":
            if reason is not None:
                raise ConfigError(f"backend='triton' is unavailable: {reason}")
            return "triton", "backend='triton' requested"
        if reason is not None:
            return "torch", f"auto: {reason}; using PyTorch (SDPA)"
        return "triton", "auto: CUDA device and Triton available"

    @property
    def backend(self) -> str:
        """The implementation ``forward`` runs on the module's current device."""
        return self._resolve_backend()[0]

    @property
    def backend_reason(self) -> str:
        """Why :attr:`backend` was chosen (e.g. ``"auto: device is cpu, ..."``)."""
        return self._resolve_backend()[1]

    # -- forward ----------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> int:
        """Validate ``x`` ``[B, 1, R, T]`` on the encoder's device; return the number of time
        patches ``T / 16``."""
        if x.device != self.norm.weight.device:
            raise ScanError(f"encoder input is on {x.device}, the encoder on {self.norm.weight.device}: "
                            f"move the input (brainjepa_fast.encode does)")
        if x.ndim != 4 or x.shape[1] != 1:
            raise ScanError(f"encoder input must be [B, 1, R, T], got {list(x.shape)}")
        if x.shape[2] != self.n_rois:
            raise ScanError(f"encoder input has {x.shape[2]} ROIs, expected {self.n_rois} (the gradient table's rows)")
        if x.shape[3] % PATCH_T or x.shape[3] == 0:
            raise ScanError(f"encoder input has T={x.shape[3]} frames, expected a positive multiple of {PATCH_T}")
        return x.shape[3] // PATCH_T

    def position_table(self, n_t: int) -> torch.Tensor:
        """Positional table ``[R * n_t, D]`` in float32."""
        return self.pos_embed_proj(self.gradient, n_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_t = self.check_input(x)
        backend, _ = self._resolve_backend()
        if backend == "triton" and self._needs_autograd():
            if self.backend_request == "triton":
                raise ConfigError(
                    "backend='triton' is inference-only: run under torch.inference_mode() / "
                    "torch.no_grad(), or use backend='torch' to fine-tune"
                )
            backend = "torch"  # auto: training and autograd take the differentiable path
        if backend == "triton":
            if self._triton_runner is None:
                from .triton_backend import TritonRunner

                self._triton_runner = TritonRunner()
            return self._triton_runner(self, x, n_t)
        return self.forward_torch(x, n_t)

    def _needs_autograd(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

    def forward_torch(self, x: torch.Tensor, n_t: int) -> torch.Tensor:
        """The PyTorch path (CPU, MPS, CUDA; differentiable, for fine-tuning)."""
        dtype = self.norm.weight.dtype
        x = self.patch_embed(x.to(dtype)) + self.position_table(n_t).to(dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    # -- conversion -------------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: nn.Module, *, backend: str = "auto") -> "Encoder":
        """Convert an original-layout encoder (e.g. one a user fine-tuned) into an :class:`Encoder`.

        Reads ``module.state_dict()`` (a DDP ``module.`` prefix is stripped), infers the variant
        from the shapes, and takes the gradient table from ``module.gradient_pos_embed`` when the
        module has one (the original's attribute), else the shipped table. Weights are copied to
        the module's device and dtype.
        """
        from .checkpoint import infer_variant, strip_module_prefix, validate_state_dict

        state = strip_module_prefix(module.state_dict())
        variant, frames = infer_variant(state, source=type(module).__name__)
        gradient = getattr(module, "gradient_pos_embed", None)
        if isinstance(gradient, torch.Tensor):
            gradient = gradient.detach().cpu()
        else:
            gradient = None
        enc = cls(variant, gradient, frames=frames, backend=backend)
        validate_state_dict(enc, state, source=type(module).__name__)
        enc.load_state_dict(state)
        ref = next(iter(state.values()))
        return enc.to(device=ref.device, dtype=ref.dtype)

    def _apply(self, fn, recurse=True):
        # The gradient table follows the module's device but stays float32: a bf16 copy would
        # round the ROI coordinates before the projection.
        gradient = self.gradient
        super()._apply(fn, recurse)
        self.gradient = gradient.to(self.gradient.device)
        return self

    def extra_repr(self) -> str:
        return f"variant={self.config.name}, rois={self.n_rois}, backend={self.backend_request!r}"

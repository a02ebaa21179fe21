"""Inference on CUDA through the hand-written Triton kernels of :mod:`brainjepa_kernels`.

One encoder layer runs as five kernels::

    qkv = layernorm_linear(x, LN1, W_qkv)          # LN folded into W_qkv at load; [M, 3D]
    o   = flash_attention(qkv.view(B, N, 3, H, 64))  # reads the packed qkv in place; [M, D]
    x   = linear_residual(o, W_proj, x)             # bias + residual in the epilogue, in place
    h   = layernorm_linear(x, LN2, W_fc1, "gelu")   # erf GELU in the epilogue; [M, 4D]
    x   = linear_residual(h, W_fc2, x)

(M = B * N tokens, row-major ``[M, D]`` residual stream in the compute dtype), after
``patch_embed`` (conv + bias + positional table in one pass) and before the final LayerNorm.
The LayerNorm matmuls need each row's mean and rstd: on Hopper (fp16/bf16, batches of at least
:data:`CHUNK_STATS_MIN_ROWS` tokens) the two residual updates write them per 128-column chunk
from their epilogue (the Gluon matmul of :mod:`brainjepa_kernels.matmul_hopper`) and the next
LayerNorm matmul merges them; elsewhere, and for the first layer, ``row_stats`` reads x once more
to compute them.
Weights are prepared once per (device, dtype, scan length, parameter version): LayerNorm gains
and biases folded into the following weights, the positional table precomputed. Small batches
replay a captured CUDA graph, which removes the launch gaps between the ~60 kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Tuple

import torch

if TYPE_CHECKING:
    from .model import Encoder

#: Whether the residual updates pass the next LayerNorm its row statistics in chunks where the
#: Gluon matmul runs (else ``row_stats`` computes them; ``bench.variant_ab`` turns it off for A/B).
CHUNK_STATS = True

#: The chunk statistics are used for batches of at least this many tokens (B * N): they fix proj
#: and fc2 to the Gluon kernel, which the tuner does not pick for them at small M. Encoder bf16
#: A/B on an H100 (ms per scan, chunks against row_stats, 2026-11-27): B=8 3.119 against 3.158;
#: B=4 3.312 / 3.287; B=2 3.485 / 3.423; B=1 3.951 / 3.865 (bench/results/2026-11-27-h100-s8/).
CHUNK_STATS_MIN_ROWS = 32768

#: Batches up to this size replay a CUDA graph (launch gaps matter there; larger batches are
#: long enough per kernel that the graph's memory pool would be the only effect).
GRAPH_MAX_BATCH = 8


def _parameter_state(slots: Tuple) -> Tuple:
    """(identity, in-place version) of the parameter in each (module, name) slot."""
    return tuple((id(p), p._version) for p in (m._parameters[name] for m, name in slots))


@dataclass
class BlockWeights:
    qkv: "object"  # brainjepa_kernels.layernorm_linear.FoldedLinear
    proj_w: torch.Tensor
    proj_b: torch.Tensor
    fc1: "object"
    fc2_w: torch.Tensor
    fc2_b: torch.Tensor


@dataclass
class Plan:
    """Everything the kernels read, in the compute dtype, prepared once."""

    key: Tuple
    patch_w: torch.Tensor  # [D, 16]
    patch_b: torch.Tensor  # [D]
    pos: torch.Tensor  # [R * n_t, D] float32
    blocks: List[BlockWeights]
    norm_w: torch.Tensor
    norm_b: torch.Tensor


class TritonRunner:
    """Runs an :class:`~brainjepa_fast.model.Encoder` forward with the Triton kernels."""

    def __init__(self, use_cuda_graphs: bool = True):
        self.use_cuda_graphs = use_cuda_graphs
        self._plans: Dict[int, Plan] = {}
        self._graphs: Dict[Tuple, Tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    # -- preparation --------------------------------------------------------------------------
    @staticmethod
    def _plan_key(enc: "Encoder", n_t: int) -> Tuple:
        w = enc.norm.weight
        slots = tuple((m, name) for m in enc.modules() for name in m._parameters)
        return (w.device, w.dtype, n_t, slots, _parameter_state(slots))

    @staticmethod
    def _is_current(plan: Plan, enc: "Encoder") -> bool:
        """Whether ``plan`` still matches every parameter of ``enc`` (same objects, no in-place
        update since): checked through the (module, name) slots recorded in the key, without
        walking the module tree (a walk costs ~130 us, which at B=1 delays the graph replay)."""
        w = enc.norm.weight
        device, dtype, _, slots, state = plan.key
        return w.device == device and w.dtype == dtype and _parameter_state(slots) == state

    def plan(self, enc: "Encoder", n_t: int) -> Plan:
        """The prepared weights for ``n_t`` time patches (rebuilt when any parameter changed)."""
        from brainjepa_kernels.layernorm_linear import fold_layernorm

        cached = self._plans.get(n_t)
        if cached is not None and self._is_current(cached, enc):
            return cached
        key = self._plan_key(enc, n_t)
        dtype = enc.norm.weight.dtype
        blocks = []
        with torch.no_grad():
            for blk in enc.blocks:
                blocks.append(BlockWeights(
                    qkv=fold_layernorm(blk.norm1.weight, blk.norm1.bias, blk.attn.qkv.weight, blk.attn.qkv.bias, dtype),
                    proj_w=blk.attn.proj.weight, proj_b=blk.attn.proj.bias,
                    fc1=fold_layernorm(blk.norm2.weight, blk.norm2.bias, blk.mlp.fc1.weight, blk.mlp.fc1.bias, dtype),
                    fc2_w=blk.mlp.fc2.weight, fc2_b=blk.mlp.fc2.bias,
                ))
            conv = enc.patch_embed.proj
            plan = Plan(
                key=key,
                patch_w=conv.weight.reshape(conv.weight.shape[0], -1).contiguous(),
                patch_b=conv.bias,
                pos=enc.position_table(n_t).contiguous(),
                blocks=blocks,
                norm_w=enc.norm.weight,
                norm_b=enc.norm.bias,
            )
        self._plans[n_t] = plan
        self._graphs.clear()
        return plan

    # -- execution ----------------------------------------------------------------------------
    @staticmethod
    def run(plan: Plan, x: torch.Tensor, num_heads: int) -> torch.Tensor:
        """Eager kernel sequence: ``x`` ``[B, 1, R, T]`` (any float dtype) -> ``[B, N, D]``."""
        import triton

        from brainjepa_kernels._runtime import hopper_module
        from brainjepa_kernels.flash_attention import flash_attention
        from brainjepa_kernels.layernorm import STATS_CHUNK, layernorm
        from brainjepa_kernels.layernorm_linear import layernorm_linear_folded
        from brainjepa_kernels.linear_residual import linear_residual
        from brainjepa_kernels.patch_embed import patch_embed

        tokens = patch_embed(x, plan.patch_w, plan.patch_b, plan.pos)  # [B, N, D]
        B, N, D = tokens.shape
        h = tokens.view(B * N, D)
        # On Hopper the residual updates write the next LayerNorm's row statistics in chunks (the
        # Gluon matmul's epilogue), so no row_stats pass reads h before qkv and fc1 (but the first).
        hopper = hopper_module()
        chunked = CHUNK_STATS and B * N >= CHUNK_STATS_MIN_ROWS and hopper is not None and hopper.supports(h)
        chunks = torch.empty(B * N, triton.cdiv(D, STATS_CHUNK), 2, device=h.device) if chunked else None
        for i, blk in enumerate(plan.blocks):
            # Each intermediate is dropped after its last use, so that the allocator can reuse
            # qkv's and the attention output's memory for fc1's wider output.
            qkv = layernorm_linear_folded(h, blk.qkv, chunk_stats=chunks if i > 0 else None)
            attn = flash_attention(qkv.view(B, N, 3, num_heads, D // num_heads))
            del qkv
            linear_residual(attn.view(B * N, D), blk.proj_w, blk.proj_b, h, out=h, chunk_stats=chunks)
            del attn
            hidden = layernorm_linear_folded(h, blk.fc1, activation="gelu", chunk_stats=chunks)
            linear_residual(hidden, blk.fc2_w, blk.fc2_b, h, out=h, chunk_stats=chunks)
            del hidden
        return layernorm(h, plan.norm_w, plan.norm_b).view(B, N, D)

    def __call__(self, enc: "Encoder", x: torch.Tensor, n_t: int) -> torch.Tensor:
        """``[B, N, D]`` for the CUDA scans ``x`` ``[B, 1, R, T]``, on ``x``'s GPU: Triton launches
        (and ``torch.cuda.graph`` captures) on the current device, so it is set to ``x``'s."""
        with torch.cuda.device(x.device):
            return self._forward(enc, x, n_t)

    def _forward(self, enc: "Encoder", x: torch.Tensor, n_t: int) -> torch.Tensor:
        plan = self.plan(enc, n_t)
        heads = enc.config.num_heads
        if not self.use_cuda_graphs or x.shape[0] > GRAPH_MAX_BATCH:
            return self.run(plan, x, heads)
        key = (tuple(x.shape), x.dtype, x.device)
        entry = self._graphs.get(key)
        if entry is None:
            static_x = x.clone()
            side = torch.cuda.Stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):  # compile and autotune outside the capture
                self.run(plan, static_x, heads)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # An explicit capture stream: torch.cuda.graph's default one lives on whichever GPU
            # captured first in the process, and entering it would make that GPU current.
            with torch.cuda.graph(graph, stream=side):
                static_out = self.run(plan, static_x, heads)
            if len(self._graphs) >= 2:  # keep memory bounded: at most two batch shapes
                self._graphs.pop(next(iter(self._graphs)))
            entry = self._graphs[key] = (graph, static_x, static_out)
        graph, static_x, static_out = entry
        static_x.copy_(x)
        graph.replay()
        return static_out.clone()


"""Linear layer whose epilogue adds the bias and the residual stream (proj and fc2 of every
encoder block): ``out = residual + x @ w^T + b``.

The main loop is the same persistent TMA matmul as :mod:`kernels.layernorm_linear`'s (tile
configurations, tuner and tile order from :mod:`kernels._runtime`, see
:class:`kernels._runtime.MatmulConfig`); the epilogue loads the residual tile through its own
tensor descriptor, adds it and the bias in float32 and stores the tile.
On Hopper (fp16/bf16, residual in x's dtype) the tuner also tries :mod:`kernels.matmul_hopper`,
a warp-specialized Gluon kernel with the same epilogue that overlaps it with the next tile's
main loop.

In-place update: ``out`` may be ``residual`` itself (``h = linear_residual(x, w, b, h, out=h)``).
Every output tile is produced by exactly one program, which loads that tile's residual before
computing and storing the same tile (the store depends on the loaded values, so no schedule can
reorder them), and no program reads a tile another program writes. ``out`` must otherwise not
overlap ``residual``, ``x`` or ``w``.
"""
from __future__ import annotations

from typing import Callable, Hashable, Optional, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._runtime import (MatmulConfig, as_rows, candidates_for, check_dtype, check_out, check_tma_matrix,
                       grouped_tile, hopper_module, matmul_operands, select_config, split_columns, tile_matmul,
                       tma_operand)
from .layernorm import STATS_CHUNK


@triton.jit
def _residual_epilogue(acc, bias_ptr, res_desc, out_desc, off_m, off_n, N, BLOCK_N: tl.constexpr):
    """Store ``residual + acc + b`` for the [BLOCK_M, BLOCK_N] tile at (off_m, off_n)."""
    cols = off_n + tl.arange(0, BLOCK_N)
    b = tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    res = res_desc.load([off_m, off_n]).to(tl.float32)
    out_desc.store([off_m, off_n], (res + acc + b[None, :]).to(out_desc.dtype))


@triton.jit(do_not_specialize=["M", "num_programs"])
def _linear_residual_kernel(x_desc, w_desc, res_desc, out_desc, bias_ptr, M, N, K, num_programs,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr, SUBTILE: tl.constexpr, FLATTEN: tl.constexpr,
                            DEVICE_DESC: tl.constexpr):
    """out [M, N] = residual [M, N] + x [M, K] @ w[N, K]^T + b [N] (matrices via descriptors, or
    pointers with DEVICE_DESC). Program p handles tiles p, p + num_programs, ...
    (num_programs = #tiles: one tile each)."""
    STORE_N: tl.constexpr = BLOCK_N // 2 if SUBTILE else BLOCK_N
    x_desc = tma_operand(x_desc, M, K, BLOCK_M, BLOCK_K, DEVICE_DESC)
    w_desc = tma_operand(w_desc, N, K, BLOCK_N, BLOCK_K, DEVICE_DESC)
    res_desc = tma_operand(res_desc, M, N, BLOCK_M, STORE_N, DEVICE_DESC)
    out_desc = tma_operand(out_desc, M, N, BLOCK_M, STORE_N, DEVICE_DESC)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Separate epilogue counter: see kernels.layernorm_linear._ln_linear_kernel.
    tile_id_c = tl.program_id(0) - num_programs
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, num_programs,
                            flatten=FLATTEN):
        acc = tile_matmul(x_desc, w_desc, tile_id, num_pid_m, num_pid_n, K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)

        tile_id_c += num_programs
        pid_m, pid_n = grouped_tile(tile_id_c, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        if SUBTILE:
            left, right = split_columns(acc, BLOCK_M, BLOCK_N)
            _residual_epilogue(left, bias_ptr, res_desc, out_desc, off_m, off_n, N, BLOCK_N // 2)
            _residual_epilogue(right, bias_ptr, res_desc, out_desc, off_m, off_n + BLOCK_N // 2, N, BLOCK_N // 2)
        else:
            _residual_epilogue(acc, bias_ptr, res_desc, out_desc, off_m, off_n, N, BLOCK_N)


def linear_residual(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, residual: torch.Tensor,
                    out: Optional[torch.Tensor] = None, *,
                    configs: Optional[Sequence[Hashable]] = None,
                    chunk_stats: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``residual + x @ w^T + b`` with float32 accumulation.

    x: [..., K] contiguous, fp32 (3xTF32 dots)/fp16/bf16; w: [N, K] (``nn.Linear`` layout) in
    x.dtype; b: [N], any supported float dtype; residual: [..., N] contiguous, any supported float
    dtype (e.g. an fp32 residual stream under bf16 compute). out: like ``residual`` (same shape and
    dtype), may be ``residual`` itself for an in-place update; K * itemsize and N * itemsize
    multiples of 16 bytes (TMA). configs: candidate configurations, :class:`MatmulConfig` or
    :class:`kernels.matmul_hopper.WsConfig` (default :func:`kernels._runtime.candidates_for`; the
    Gluon kernel only for a residual in x.dtype); the fastest is picked on first use of each
    shape, timed into a scratch output so an in-place call is applied once. chunk_stats: if given,
    [M, cdiv(N, STATS_CHUNK), 2] float32 that receives the output rows' statistics per chunk of
    :data:`kernels.layernorm.STATS_CHUNK` (128) columns
    (:func:`kernels.layernorm.chunk_stats_reference`'s format, for the LayerNorm that reads
    ``out`` next); only the Gluon kernel writes them, so it is the only candidate (sm_90 GPU,
    fp16/bf16, residual in x.dtype). Returns ``out``.
    """
    check_dtype(x, "x")
    x2 = as_rows(x, "x")
    check_tma_matrix(x2, "x")
    M, K = x2.shape
    if w.dim() != 2 or w.shape[1] != K or w.dtype != x.dtype or w.device != x.device:
        raise ValueError(f"w: expected [N, {K}] {x.dtype} on {x.device} (x's), got {tuple(w.shape)} {w.dtype} "
                         f"on {w.device}")
    check_tma_matrix(w, "w")
    N = w.shape[0]
    check_dtype(b, "b")
    if tuple(b.shape) != (N,) or b.device != x.device or not b.is_contiguous():
        raise ValueError(f"b: expected a contiguous tensor of shape ({N},) on {x.device}, got {tuple(b.shape)} "
                         f"on {b.device}")
    check_dtype(residual, "residual")
    check_out(residual, (*x.shape[:-1], N), residual.dtype, x.device, "residual")
    if out is None:
        out = torch.empty_like(residual)
    check_out(out, tuple(residual.shape), residual.dtype, x.device)
    if M == 0:
        return out
    res2, out2 = residual.view(M, N), out.view(M, N)
    check_tma_matrix(res2, "residual")
    check_tma_matrix(out2, "out")

    def launch(cfg: Hashable, dst: torch.Tensor) -> None:
        if not isinstance(cfg, MatmulConfig):
            hopper_module().launch(x2, w, dst, cfg, "residual", b, residual=res2, chunk_stats=chunk_stats)
            return
        x_desc, w_desc, res_desc, out_desc = matmul_operands(cfg, x2, w, res2, dst)
        programs = cfg.num_programs(M, N, x.device)
        _linear_residual_kernel[(programs,)](x_desc, w_desc, res_desc, out_desc, b, M, N, K, programs,
                                             **cfg.meta())

    def make_runner() -> Callable[[Hashable], None]:
        scratch = torch.empty_like(out2)
        return lambda cfg: launch(cfg, scratch)

    candidates = tuple(configs) if configs else candidates_for(x, hopper_ok=residual.dtype == x.dtype)
    if chunk_stats is not None:
        check_out(chunk_stats, (M, triton.cdiv(N, STATS_CHUNK), 2), torch.float32, x.device, "chunk_stats")
        candidates = tuple(cfg for cfg in candidates if not isinstance(cfg, MatmulConfig))
        if not candidates:
            raise ValueError("chunk_stats: only the Gluon kernel writes them (sm_90 GPU, fp16/bf16 x, residual "
                             f"in x.dtype); got x {x.dtype} on {x.device}, residual {residual.dtype}")
    key = ("linear_residual", M, N, K, x.dtype, residual.dtype, chunk_stats is not None)
    launch(select_config(key, candidates, make_runner), out2)
    return out


def linear_residual_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The unfused PyTorch ops :func:`linear_residual` must equal."""
    return residual + F.linear(x, w, b)

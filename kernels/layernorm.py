"""LayerNorm over the last dimension, and the per-row statistics the fused LayerNorm-matmul needs.

``row_stats(x)`` writes (mean, rstd) per row in float32; ``layernorm(x, w, b)`` is the encoder's
final LayerNorm. Both read a block of rows into registers (K <= 1024, the rows of every encoder
variant) and compute exact two-pass statistics in float32: mean first, then the variance of the
centred row, so a large per-row mean costs no precision. Memory-bound: one read of x (plus one
write of y for ``layernorm``).

``chunk_stats_reference`` and ``merge_chunk_stats`` define the per-chunk statistics that the
warp-specialized matmul (:mod:`kernels.matmul_hopper`) passes from the residual update that
writes a LayerNorm's input to the matmul that normalises it, which saves ``row_stats``' read.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._runtime import check_dtype, check_out

#: Largest row the kernels hold in registers.
MAX_K = 1024

#: Columns per chunk of the chunk statistics (:func:`chunk_stats_reference`): the Gluon matmul's tile width.
STATS_CHUNK = 128


@triton.jit
def _load_rows_and_stats(x_ptr, rows, M, K, stride_xm, eps, BLOCK_K: tl.constexpr):
    """Rows ``rows`` of x in float32 ([ROWS, BLOCK_K], zero past K) and their statistics:
    returns (x, mean, rstd, col_mask) with mean, rstd of shape [ROWS]."""
    cols = tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / K
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.math.rsqrt(tl.sum(centred * centred, axis=1) / K + eps)
    return x, mean, rstd, cols < K


@triton.jit
def _row_stats_kernel(x_ptr, stats_ptr, M, K, stride_xm, eps,
                      ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """stats[m] = (mean, rstd) of row m of x [M, K] (row stride ``stride_xm``, unit column stride)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    _, mean, rstd, _ = _load_rows_and_stats(x_ptr, rows, M, K, stride_xm, eps, BLOCK_K)
    in_range = rows < M
    tl.store(stats_ptr + 2 * rows, mean, mask=in_range)
    tl.store(stats_ptr + 2 * rows + 1, rstd, mask=in_range)


@triton.jit
def _layernorm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, K, stride_xm, eps,
                      ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[m] = (x[m] - mean) * rstd * w + b, x and y [M, K] with row stride ``stride_xm`` / K."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    x, mean, rstd, col_ok = _load_rows_and_stats(x_ptr, rows, M, K, stride_xm, eps, BLOCK_K)
    cols = tl.arange(0, BLOCK_K)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = (x - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
    mask = (rows[:, None] < M) & col_ok[None, :]
    tl.store(y_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def _launch_shape(K: int, device: torch.device) -> tuple[int, int, int]:
    """(ROWS, BLOCK_K, num_warps): about 4K elements per program on the GPU, tiny blocks off it."""
    block_k = triton.next_power_of_2(K)
    if device.type != "cuda":
        return 4, block_k, 4
    return max(1, 4096 // block_k), block_k, 4 if block_k <= 512 else 8


def _check_rows(x: torch.Tensor, name: str) -> None:
    check_dtype(x, name)
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"{name}: expected a 2-D tensor with unit column stride, got shape {tuple(x.shape)}, "
                         f"strides {x.stride()}")
    if not 0 < x.shape[1] <= MAX_K:
        raise ValueError(f"{name}: rows of {x.shape[1]} elements; the kernels hold rows of 1..{MAX_K} in registers")


def row_stats(x: torch.Tensor, eps: float = 1e-6, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-row LayerNorm statistics of ``x`` [M, K] (fp32/fp16/bf16, unit column stride, any row
    stride, K <= 1024): returns ``out`` [M, 2] float32 with ``out[m] = (mean, 1/sqrt(var + eps))``,
    the biased variance as in ``F.layer_norm``."""
    _check_rows(x, "x")
    M, K = x.shape
    if out is None:
        out = torch.empty((M, 2), device=x.device, dtype=torch.float32)
    check_out(out, (M, 2), torch.float32, x.device)
    if M == 0:
        return out
    rows, block_k, num_warps = _launch_shape(K, x.device)
    _row_stats_kernel[(triton.cdiv(M, rows),)](x, out, M, K, x.stride(0), eps,
                                              ROWS=rows, BLOCK_K=block_k, num_warps=num_warps)
    return out


def row_stats_reference(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """PyTorch equivalent of :func:`row_stats`, in float32."""
    var, mean = torch.var_mean(x.float(), dim=-1, correction=0)
    return torch.stack([mean, torch.rsqrt(var + eps)], dim=-1)


def chunk_stats_reference(x: torch.Tensor, chunk: int = STATS_CHUNK) -> torch.Tensor:
    """Per-row statistics of ``x`` [M, K] in column chunks of ``chunk`` (the last one may be
    shorter), in float32: [M, cdiv(K, chunk), 2] with (mean, M2 = sum of squared deviations from
    that mean) per chunk. The format the warp-specialized matmul's residual epilogue writes for
    the next LayerNorm (:mod:`kernels.matmul_hopper`)."""
    M, K = x.shape
    out = x.new_empty((M, triton.cdiv(K, chunk), 2), dtype=torch.float32)
    for c, part in enumerate(x.float().split(chunk, dim=1)):
        mean = part.mean(dim=1)
        out[:, c, 0] = mean
        out[:, c, 1] = ((part - mean[:, None]) ** 2).sum(dim=1)
    return out


def merge_chunk_stats(chunk_stats: torch.Tensor, K: int, eps: float = 1e-6, chunk: int = STATS_CHUNK) -> torch.Tensor:
    """(mean, rstd) per row, [M, 2] float32 as :func:`row_stats` returns, of a K-wide matrix from
    its chunk statistics [M, cdiv(K, chunk), 2] (:func:`chunk_stats_reference`'s format): the
    mean first, then ``M2 = sum_c (M2_c + n_c (mean_c - mean)^2)``, exact for any spread of
    the chunk means."""
    # n_c = min(chunk, K - chunk * c): built on the device, with no host-to-device copy, so that
    # it can be captured in a CUDA graph (the tuner times candidates that way).
    starts = torch.arange(chunk_stats.shape[1], device=chunk_stats.device, dtype=torch.float32) * chunk
    counts = (K - starts).clamp(max=chunk)
    means, m2s = chunk_stats[..., 0], chunk_stats[..., 1]
    mean = (means * counts).sum(dim=1) / K
    m2 = (m2s + counts * (means - mean[:, None]) ** 2).sum(dim=1)
    return torch.stack([mean, torch.rsqrt(m2.clamp_min(0) / K + eps)], dim=-1)


def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LayerNorm of ``x`` [..., K] over its last dimension (K <= 1024) with gain ``weight`` [K] and
    shift ``bias`` [K] (any supported float dtype); statistics and arithmetic in float32, result in
    ``x.dtype`` written to ``out`` (contiguous, same shape as ``x``) or a new tensor."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    _check_rows(x2, "x")
    for t, name in ((weight, "weight"), (bias, "bias")):
        check_dtype(t, name)
        if tuple(t.shape) != (K,) or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor of shape ({K},), got {tuple(t.shape)}")
    if out is None:
        out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    check_out(out, tuple(x.shape), x.dtype, x.device)
    M = x2.shape[0]
    if M == 0:
        return out
    rows, block_k, num_warps = _launch_shape(K, x.device)
    _layernorm_kernel[(triton.cdiv(M, rows),)](x2, weight, bias, out, M, K, x2.stride(0), eps,
                                              ROWS=rows, BLOCK_K=block_k, num_warps=num_warps)
    return out


def layernorm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``F.layer_norm`` over the last dimension (what :func:`layernorm` must equal)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

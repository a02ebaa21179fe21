"""LayerNorm fused into the matmul that follows it (qkv and fc1 of every encoder block).

For a row x of K elements with mean mu and rstd r, LayerNorm with gain g and shift beta followed
by ``nn.Linear(W [N, K], b)`` is

    LN(x) @ W^T + b = r * (x @ (W * g)^T - mu * rowsum(W * g)) + (b + W @ beta).

So the LayerNorm's gain and shift are folded into the weights once, at load time
(:func:`fold_layernorm`): ``W' = W * g[None, :]`` rounded to the compute dtype, ``b' = b + W @ beta``
and ``c = rowsum(W')`` in float32, ``c`` taken from the *rounded* ``W'`` so that the mean term
cancels exactly against what the tensor cores multiply. The kernel's main loop is then a plain
matmul of the raw activations with ``W'`` (TMA loads, wgmma on Hopper: no normalised copy of x in
memory, no register round trip of the A tile) and the LayerNorm lives in the epilogue,
``y = rstd * (acc - mean * c) + b'``, with (mean, rstd) per row from
:func:`kernels.layernorm.row_stats` (one extra read of x) or passed in. The epilogue optionally
applies the exact erf GELU (fc1).

Precision: in fp16/bf16 the products are exact in the fp32 accumulator and the subtraction is
exact for the rounded ``W'``, so the result is as accurate as ``F.linear`` on a normalised bf16
copy (it skips that copy's rounding). In fp32 the dots run as 3xTF32 (``_runtime.F32_PRECISION``):
with plain TF32 the raw x would be rounded to 10 bits rather than the centred one, an error that
grows like |mean| / std of a row.

Schedule (see :class:`kernels._runtime.MatmulConfig`): persistent grid of one program per SM
walking output tiles in grouped order, host-side tensor descriptors for x, W' and the output,
software-pipelined K loop, optionally subtiled epilogue.

On Hopper (fp16/bf16) the tuner also tries :mod:`kernels.matmul_hopper`, a warp-specialized
Gluon kernel with the same epilogue that overlaps it with the next tile's main loop.
"""
from __future__ import annotations

from typing import Hashable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._runtime import (MatmulConfig, as_rows, candidates_for, check_dtype, check_out, check_tma_matrix, grouped_tile,
                       hopper_module, matmul_operands, select_config, split_columns, tile_matmul, tma_operand)
from .layernorm import MAX_K, STATS_CHUNK, merge_chunk_stats, row_stats

ACTIVATIONS = (None, "gelu")


@triton.jit
def gelu(x, APPROX_RCP: tl.constexpr = False):
    """Exact (erf) GELU, ``x * Phi(x)``, in float32 for finite x: 14 instructions (12 FMA-pipe, 2
    MUFU) instead of the ~33 of ``0.5 * x * (1 + erf(x / sqrt(2)))`` with libdevice's erf; 13 with
    APPROX_RCP (NVIDIA GPUs only: inline PTX, which the interpreter cannot run). It is
    what the fc1 epilogue spends its time on: in the warp-specialized matmul the epilogue of one
    consumer must fit under the other's main loop (Nsight Compute, session 10: ~21 instructions an
    element there, and longer than the main loop).

    With u = |x| and h = 1 - Phi(u) = erfc(u / sqrt(2)) / 2, GELU(x) = relu(x) - u * h for either
    sign, and with z = u / sqrt(2) and t = 1 / (1 + p z),

        erfc(z) = t * P(t) * exp(-z^2)    (absolute error <= 1.5e-7 for every z >= 0)

    with the degree-4 P and p of M. Abramowitz & I. Stegun, *Handbook of Mathematical Functions*,
    7.1.26. Below, P's coefficients are halved (the 1/2 of h) and p divided by sqrt(2), so
    h = t * P(t) * 2^(-u^2 log2(e) / 2); t is rsqrt(d^2) (one MUFU op and the square, no division
    sequence), or with APPROX_RCP ``rcp.approx.ftz.f32`` (the MUFU op alone; Triton has no
    approximate reciprocal, and its ``fdiv`` adds range checks). With
    fp32 rounding the error is < 2e-7 * max(1, |x|) (tested), within one fp32 rounding of torch's
    own float32 GELU, and for x << 0 more accurate than the 1 + erf(x) form, which cancels.
    """
    u = tl.abs(x)
    d = 1.0 + u * 0.2316418882663604  # 1 + p z, z = u / sqrt(2)
    if APPROX_RCP:
        t = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [d], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        t = tl.math.rsqrt(d * d)
    q = 0.5307027145 * t + -0.7265760135
    q = q * t + 0.7107068705
    q = q * t + -0.142248368
    q = q * t + 0.127414796
    h = t * q * tl.math.exp2(u * u * -0.7213475204444817)  # log2(e) / 2
    return tl.maximum(x, 0.0) - u * h


@triton.jit
def _ln_epilogue(acc, mean, rstd, colsum_ptr, bias_ptr, out_desc, off_m, off_n, N,
                 BLOCK_N: tl.constexpr, GELU: tl.constexpr):
    """Store ``act(rstd * (acc - mean * c) + b')`` for the [BLOCK_M, BLOCK_N] tile at (off_m, off_n);
    ``mean``, ``rstd`` are the tile's rows' statistics [BLOCK_M]."""
    cols = off_n + tl.arange(0, BLOCK_N)
    c = tl.load(colsum_ptr + cols, mask=cols < N, other=0.0)
    b = tl.load(bias_ptr + cols, mask=cols < N, other=0.0)
    y = rstd[:, None] * (acc - mean[:, None] * c[None, :]) + b[None, :]
    if GELU:
        y = gelu(y)
    out_desc.store([off_m, off_n], y.to(out_desc.dtype))


@triton.jit(do_not_specialize=["M", "num_programs"])
def _ln_linear_kernel(x_desc, w_desc, out_desc, stats_ptr, colsum_ptr, bias_ptr,
                      M, N, K, num_programs,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, SUBTILE: tl.constexpr, FLATTEN: tl.constexpr,
                      DEVICE_DESC: tl.constexpr, GELU: tl.constexpr):
    """out [M, N] = act(LN(x) @ W^T + b) from raw x [M, K], folded W' [N, K] (descriptors, or
    pointers with DEVICE_DESC), stats [M, 2] (mean, rstd) fp32, colsum c [N] fp32 and folded bias
    b' [N] fp32. Program p handles tiles p, p + num_programs, ... (num_programs = #tiles: one each)."""
    STORE_N: tl.constexpr = BLOCK_N // 2 if SUBTILE else BLOCK_N
    x_desc = tma_operand(x_desc, M, K, BLOCK_M, BLOCK_K, DEVICE_DESC)
    w_desc = tma_operand(w_desc, N, K, BLOCK_N, BLOCK_K, DEVICE_DESC)
    out_desc = tma_operand(out_desc, M, N, BLOCK_M, STORE_N, DEVICE_DESC)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # The epilogue recomputes its tile from a counter of its own: when the tile and K loops are
    # flattened, the next tile's loads are issued during this tile's epilogue, and Triton's
    # pipeliner is known to mishandle a value shared by both (see its persistent-matmul tutorial).
    tile_id_c = tl.program_id(0) - num_programs
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, num_programs,
                            flatten=FLATTEN):
        acc = tile_matmul(x_desc, w_desc, tile_id, num_pid_m, num_pid_n, K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)

        tile_id_c += num_programs
        pid_m, pid_n = grouped_tile(tile_id_c, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        rows = off_m + tl.arange(0, BLOCK_M)
        mean = tl.load(stats_ptr + 2 * rows, mask=rows < M, other=0.0)
        rstd = tl.load(stats_ptr + 2 * rows + 1, mask=rows < M, other=0.0)
        if SUBTILE:
            left, right = split_columns(acc, BLOCK_M, BLOCK_N)
            _ln_epilogue(left, mean, rstd, colsum_ptr, bias_ptr, out_desc, off_m, off_n, N, BLOCK_N // 2, GELU)
            _ln_epilogue(right, mean, rstd, colsum_ptr, bias_ptr, out_desc, off_m, off_n + BLOCK_N // 2, N,
                         BLOCK_N // 2, GELU)
        else:
            _ln_epilogue(acc, mean, rstd, colsum_ptr, bias_ptr, out_desc, off_m, off_n, N, BLOCK_N, GELU)


class FoldedLinear(NamedTuple):
    """A LayerNorm + ``nn.Linear`` pair folded for :func:`layernorm_linear_folded`.

    ``weight`` [N, K] compute dtype: ``W * ln_w[None, :]``; ``bias`` [N] float32:
    ``b + W @ ln_b``; ``colsum`` [N] float32: ``weight.float().sum(1)``.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    colsum: torch.Tensor


def fold_layernorm(ln_w: torch.Tensor, ln_b: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                   dtype: Optional[torch.dtype] = None) -> FoldedLinear:
    """Fold LayerNorm gain ``ln_w`` [K] and shift ``ln_b`` [K] into the linear layer ``w`` [N, K]
    (``nn.Linear`` layout), ``b`` [N]; the weight is rounded to ``dtype`` (default ``w.dtype``).
    Sums are taken in float64 and stored in float32. Done once when the encoder loads."""
    N, K = w.shape
    if tuple(ln_w.shape) != (K,) or tuple(ln_b.shape) != (K,) or tuple(b.shape) != (N,):
        raise ValueError(f"fold_layernorm: w {tuple(w.shape)} needs ln_w, ln_b of shape ({K},) and b of ({N},), "
                         f"got {tuple(ln_w.shape)}, {tuple(ln_b.shape)}, {tuple(b.shape)}")
    w64 = w.double()
    weight = (w64 * ln_w.double()[None, :]).to(dtype or w.dtype).contiguous()
    bias = (b.double() + w64 @ ln_b.double()).float()
    colsum = weight.double().sum(1).float()
    return FoldedLinear(weight, bias, colsum)


def _check_folded(folded: FoldedLinear, K: int, dtype: torch.dtype, device: torch.device) -> int:
    w = folded.weight
    if w.dim() != 2 or w.shape[1] != K or w.dtype != dtype or w.device != device:
        raise ValueError(f"folded.weight: expected [N, {K}] {dtype} on {device} (x's), got "
                         f"{tuple(w.shape)} {w.dtype} on {w.device}")
    check_tma_matrix(w, "folded.weight")
    N = w.shape[0]
    for t, name in ((folded.bias, "folded.bias"), (folded.colsum, "folded.colsum")):
        if tuple(t.shape) != (N,) or t.dtype != torch.float32 or t.device != device or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous float32 tensor of shape ({N},) on {device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")
    return N


def layernorm_linear_folded(x: torch.Tensor, folded: FoldedLinear, activation: Optional[str] = None,
                            eps: float = 1e-6, stats: Optional[torch.Tensor] = None,
                            out: Optional[torch.Tensor] = None, *,
                            configs: Optional[Sequence[Hashable]] = None,
                            chunk_stats: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``act(LayerNorm(x) @ W^T + b)`` with the LayerNorm folded into ``folded`` (the hot path).

    x: [..., K] contiguous, fp32/fp16/bf16, dtype of ``folded.weight`` [N, K]; K * itemsize and
    N * itemsize multiples of 16 bytes (TMA). activation: None or ``"gelu"`` (exact erf).
    stats: [M, 2] float32 (mean, rstd) per row of x (M = x.numel() / K), e.g. shared with another
    consumer; computed by :func:`row_stats` with ``eps`` when None. out: [..., N] in x.dtype,
    contiguous, not overlapping x. configs: candidate configurations, :class:`MatmulConfig` (the
    Triton kernel) or :class:`kernels.matmul_hopper.WsConfig` (default :func:`candidates_for`);
    the fastest is picked on first use of each shape. chunk_stats: instead of ``stats``, x's row
    statistics per chunk of STATS_CHUNK (128) columns, [M, cdiv(K, STATS_CHUNK), 2] float32 (K <= 1024) as
    :func:`kernels.linear_residual.linear_residual` writes them: the Gluon kernel merges them in
    its epilogue, a Triton configuration gets them merged by :func:`merge_chunk_stats` first.
    Returns ``out``.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    check_dtype(x, "x")
    x2 = as_rows(x, "x")
    check_tma_matrix(x2, "x")
    M, K = x2.shape
    N = _check_folded(folded, K, x.dtype, x.device)
    if out is None:
        out = torch.empty((*x.shape[:-1], N), device=x.device, dtype=x.dtype)
    check_out(out, (*x.shape[:-1], N), x.dtype, x.device)
    if M == 0:
        return out
    out2 = out.view(M, N)
    check_tma_matrix(out2, "out")
    if chunk_stats is not None:
        if stats is not None:
            raise ValueError("layernorm_linear_folded: pass stats or chunk_stats, not both")
        check_out(chunk_stats, (M, triton.cdiv(K, STATS_CHUNK), 2), torch.float32, x.device, "chunk_stats")
        if K > MAX_K:
            raise ValueError(f"chunk_stats: rows of at most {MAX_K} columns, got {K}")
    else:
        if stats is None:
            stats = row_stats(x2, eps)
        check_out(stats, (M, 2), torch.float32, x.device, "stats")

    def launch(cfg: Hashable) -> None:
        if not isinstance(cfg, MatmulConfig):
            hopper_module().launch(x2, folded.weight, out2, cfg, "layernorm", folded.colsum, folded.bias, stats,
                                   gelu=activation == "gelu", chunk_stats=chunk_stats, eps=eps)
            return
        x_desc, w_desc, out_desc = matmul_operands(cfg, x2, folded.weight, out2)
        programs = cfg.num_programs(M, N, x.device)
        rows = merge_chunk_stats(chunk_stats, K, eps) if chunk_stats is not None else stats
        _ln_linear_kernel[(programs,)](x_desc, w_desc, out_desc, rows, folded.colsum, folded.bias,
                                       M, N, K, programs, GELU=activation == "gelu", **cfg.meta())

    candidates = tuple(configs) if configs else candidates_for(x)
    key = ("layernorm_linear", M, N, K, x.dtype, activation, chunk_stats is not None)
    launch(select_config(key, candidates, lambda: launch))
    return out


def layernorm_linear(x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, w: torch.Tensor,
                     b: torch.Tensor, activation: Optional[str] = None, eps: float = 1e-6,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``act(F.linear(F.layer_norm(x, (K,), ln_w, ln_b, eps), w, b))`` for x [..., K], ``w`` [N, K]
    (``nn.Linear`` layout), ``b`` [N]; returns [..., N] in x.dtype.

    Folds the LayerNorm into the weights on every call (a few small kernels); the encoder folds
    once at load with :func:`fold_layernorm` and calls :func:`layernorm_linear_folded`.
    """
    return layernorm_linear_folded(x, fold_layernorm(ln_w, ln_b, w, b, x.dtype), activation, eps, out=out)


def layernorm_linear_reference(x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, w: torch.Tensor,
                               b: torch.Tensor, activation: Optional[str] = None, eps: float = 1e-6) -> torch.Tensor:
    """The unfused PyTorch ops :func:`layernorm_linear` must equal."""
    y = F.linear(F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps), w, b)
    return F.gelu(y, approximate="none") if activation == "gelu" else y

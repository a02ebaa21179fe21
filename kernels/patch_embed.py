"""Patch embedding of an fMRI scan: ``Conv2d(1, D, kernel=(1, P), stride=(1, P))`` over the
[ROI, time] image, flattened to tokens ROI-major (token ``r * n_t + t``), plus the positional
embedding, in one memory-bound pass:

    out[b, r * n_t + t, :] = sum_k x[b, r, P * t + k] * w[:, k] + bias + pos[r * n_t + t, :]

x is read in its own dtype (the scan is usually float32 while the model runs in bf16/fp16), the
16-term sums are float32-accurate (a tensor-core dot in "tf32x3": three tf32 products, relative
error ~2^-22; the interpreter computes plain fp32), and the result is written once in the
weight's dtype: no cast pass, no conv output in [B, D, R, n_t] to transpose.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._runtime import check_dtype, check_out


@triton.jit
def _patch_embed_kernel(x_ptr, w_ptr, b_ptr, pos_ptr, out_ptr,
                        n_tokens, tokens_per_scan, n_t, D,
                        stride_xb, stride_xr, stride_xt,
                        PATCH: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """out [n_tokens, D] (contiguous) for tokens g = b * tokens_per_scan + r * n_t + t; x [B, R, T]
    with strides (stride_xb, stride_xr, stride_xt); w [D, PATCH], b [D], pos [tokens_per_scan, D]
    contiguous. Program (i, j): tokens i*BLOCK_T.., channels j*BLOCK_D.."""
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ch = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tok_ok = tok < n_tokens
    ch_ok = ch < D
    scan = tok // tokens_per_scan
    within = tok % tokens_per_scan
    roi = within // n_t
    t = within % n_t
    k = tl.arange(0, PATCH)
    row = scan.to(tl.int64) * stride_xb + roi.to(tl.int64) * stride_xr + (t * PATCH).to(tl.int64) * stride_xt
    patches = tl.load(x_ptr + row[:, None] + k[None, :] * stride_xt, mask=tok_ok[:, None], other=0.0)
    weight_t = tl.load(w_ptr + ch[None, :] * PATCH + k[:, None], mask=ch_ok[None, :], other=0.0)
    # fp32 on tensor cores: three tf32 products (hi*hi + hi*lo + lo*hi), error ~2^-22 relative.
    acc = tl.dot(patches.to(tl.float32), weight_t.to(tl.float32), input_precision="tf32x3")

    mask = tok_ok[:, None] & ch_ok[None, :]
    bias = tl.load(b_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32)
    pos = tl.load(pos_ptr + within[:, None].to(tl.int64) * D + ch[None, :], mask=mask, other=0.0).to(tl.float32)
    acc += bias[None, :] + pos
    tl.store(out_ptr + tok[:, None].to(tl.int64) * D + ch[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def _as_patch_weight(w: torch.Tensor) -> torch.Tensor:
    """[D, 1, 1, P] (Conv2d weight) or [D, P] -> contiguous [D, P]."""
    if w.dim() == 4 and w.shape[1] == 1 and w.shape[2] == 1:
        w = w.reshape(w.shape[0], w.shape[3])
    if w.dim() != 2 or not w.is_contiguous():
        raise ValueError(f"w: expected a contiguous Conv2d weight [D, 1, 1, P] or [D, P], got {tuple(w.shape)}")
    return w


def patch_embed(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, pos: torch.Tensor,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Tokens of a batch of scans: ``[B, R * n_t, D]`` in ``w.dtype``.

    x: [B, 1, R, T] or [B, R, T], any strides, fp32/fp16/bf16, T = n_t * P; w: Conv2d weight
    [D, 1, 1, P] or [D, P] (P a power of two >= 16, 16 in Brain-JEPA); b: [D]; pos: [R * n_t, D]
    (or [1, R * n_t, D]) contiguous; b and pos in any supported float dtype. out: optional
    contiguous [B, R * n_t, D] in w.dtype. Returns ``out``.
    """
    if x.dim() == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() != 3:
        raise ValueError(f"x: expected [B, 1, R, T] or [B, R, T], got {tuple(x.shape)}")
    for t, name in ((x, "x"), (w, "w"), (b, "b"), (pos, "pos")):
        check_dtype(t, name)
    w2 = _as_patch_weight(w)
    D, P = w2.shape
    B, R, T = x.shape
    if P < 16 or P & (P - 1) or T % P:
        raise ValueError(f"patch length {P} must be a power of two >= 16 dividing T = {T}")
    n_t = T // P
    if tuple(b.shape) != (D,) or not b.is_contiguous():
        raise ValueError(f"b: expected a contiguous tensor of shape ({D},), got {tuple(b.shape)}")
    if pos.shape[-2:] != (R * n_t, D) or pos.numel() != R * n_t * D or not pos.is_contiguous():
        raise ValueError(f"pos: expected a contiguous [{R * n_t}, {D}] tensor, got {tuple(pos.shape)}")
    if not (x.device == w.device == b.device == pos.device):
        raise ValueError("x, w, b and pos must be on the same device")
    if out is None:
        out = torch.empty((B, R * n_t, D), device=x.device, dtype=w.dtype)
    check_out(out, (B, R * n_t, D), w.dtype, x.device)
    n_tokens = B * R * n_t
    if n_tokens == 0:
        return out
    block_t, block_d = (16, 128) if x.device.type == "cuda" else (16, 32)  # sm_90: 94 registers, no spills
    grid = (triton.cdiv(n_tokens, block_t), triton.cdiv(D, block_d))
    _patch_embed_kernel[grid](x, w2, b, pos, out, n_tokens, R * n_t, n_t, D, *x.stride(),
                              PATCH=P, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)
    return out


def patch_embed_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``Conv2d(kernel=(1, P), stride=(1, P))`` -> ``flatten(2).transpose(1, 2)`` -> ``+ pos``, computed
    in w.dtype (x cast to it) as the PyTorch model does."""
    if x.dim() == 3:
        x = x[:, None]
    w4 = w if w.dim() == 4 else w[:, None, None, :]
    y = F.conv2d(x.to(w.dtype), w4, b.to(w.dtype), stride=(1, w4.shape[-1]))
    return y.flatten(2).transpose(1, 2) + pos.reshape(-1, w4.shape[0]).to(w.dtype)

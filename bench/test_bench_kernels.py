"""Each Triton kernel against the PyTorch functions it replaces, at the encoder's B=8 shapes in bf16.

    pytest bench/test_bench_kernels.py --benchmark-save=NAME

One benchmark group per op and shape, holding ``impl=triton`` (ours) and ``impl=torch``:

* ``attention``: ``flash_attention(qkv)`` vs ``F.scaled_dot_product_attention`` (+ the head
  transpose back to ``[B, N, 768]`` the torch model does).
* ``ln_linear-qkv`` / ``ln_linear-fc1``: ``layernorm_linear_folded`` (LayerNorm folded into the
  weights once, as the encoder runs it; fc1 with erf GELU) vs ``F.layer_norm`` + ``F.linear``
  (+ ``F.gelu``).
* ``linear_residual-proj`` / ``linear_residual-fc2``: ``linear_residual`` vs
  ``residual + addmm(b, x, wᵀ)``.
* ``patch_embed``: ``patch_embed`` vs ``conv2d`` + flatten/transpose + positional table.

Each case checks its output against the float32 reference once before timing. GPU only:
skipped without CUDA (the kernels run on the CPU only under the slow Triton interpreter).
"""
from __future__ import annotations

from typing import Callable, Tuple

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

B, N, D, HEADS, HEAD_DIM, MLP = 8, 4500, 768, 12, 64, 3072
M = B * N  # tokens in the batch
R, T, PATCH = 450, 160, 16
DTYPE = torch.bfloat16
TOL = 2e-2  # bf16 relative error against the float32 reference
ROUNDS, WARMUP = 50, 5
IMPLS = ("triton", "torch")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double(), ref.double()
    return float((out64 - ref64).norm() / ref64.norm())


def check(fn: Callable[[], torch.Tensor], reference: Callable[[], torch.Tensor], what: str) -> None:
    """One call of ``fn`` must match the float32 ``reference`` before it is timed."""
    with torch.inference_mode():
        out, ref = fn(), reference()
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    err = rel_err(out, ref)
    assert err <= TOL, f"{what}: relative error {err:.3e} > {TOL:.1e}"


# -- attention ---------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_attention(timed, benchmark, device, impl):
    from brainjepa_kernels.flash_attention import attention_reference, flash_attention

    benchmark.group = f"attention B={B} N={N} H={HEADS} bf16"
    qkv = torch.randn(B, N, 3, HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    if impl == "triton":
        out = torch.empty(B, N, D, device=device, dtype=DTYPE)
        fn = lambda: flash_attention(qkv, out=out)  # noqa: E731
    else:
        def fn() -> torch.Tensor:
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
    one = qkv[:1]  # the float32 reference materialises N x N scores: check one scan

    def first_scan() -> torch.Tensor:
        if impl == "triton":
            return flash_attention(one)
        q, k, v = one.permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, N, D)

    check(first_scan, lambda: attention_reference(one), f"attention[{impl}]")
    timed(fn, device=device, rounds=ROUNDS, warmup_rounds=WARMUP, flops=4 * B * N * N * D,
          impl=impl, shape=f"qkv [{B}, {N}, 3, {HEADS}, {HEAD_DIM}]", dtype=DTYPE)


# -- LayerNorm + linear ------------------------------------------------------------------------
def _ln_linear_problem(n_out: int, device: torch.device) -> Tuple[torch.Tensor, ...]:
    x = torch.randn(M, D, device=device).to(DTYPE)
    ln_w = (1.0 + 0.1 * torch.randn(D, device=device)).to(DTYPE)
    ln_b = (0.1 * torch.randn(D, device=device)).to(DTYPE)
    w = (torch.randn(n_out, D, device=device) / D ** 0.5).to(DTYPE)
    b = (0.1 * torch.randn(n_out, device=device)).to(DTYPE)
    return x, ln_w, ln_b, w, b


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layer,n_out,activation", [("qkv", 3 * D, None), ("fc1", MLP, "gelu")])
def test_layernorm_linear(timed, benchmark, device, impl, layer, n_out, activation):
    from brainjepa_kernels.layernorm_linear import (fold_layernorm, layernorm_linear_folded,
                                                    layernorm_linear_reference)

    benchmark.group = f"ln_linear-{layer} M={M} {D}->{n_out}{' +gelu' if activation else ''} bf16"
    x, ln_w, ln_b, w, b = _ln_linear_problem(n_out, device)
    if impl == "triton":
        folded = fold_layernorm(ln_w, ln_b, w, b, DTYPE)  # once, at load, as the encoder does
        out = torch.empty(M, n_out, device=device, dtype=DTYPE)
        fn = lambda: layernorm_linear_folded(x, folded, activation=activation, out=out)  # noqa: E731
    else:
        def fn() -> torch.Tensor:
            y = F.linear(F.layer_norm(x, (D,), ln_w, ln_b, 1e-6), w, b)
            return F.gelu(y) if activation else y
    check(fn, lambda: layernorm_linear_reference(*(t.float() for t in (x, ln_w, ln_b, w, b)), activation=activation),
          f"{layer}[{impl}]")
    timed(fn, device=device, rounds=ROUNDS, warmup_rounds=WARMUP, flops=2 * M * n_out * D,
          impl=impl, shape=f"x [{M}, {D}] @ w [{n_out}, {D}]ᵀ", activation=activation, dtype=DTYPE)


# -- linear + residual -------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layer,k", [("proj", D), ("fc2", MLP)])
def test_linear_residual(timed, benchmark, device, impl, layer, k):
    from brainjepa_kernels.linear_residual import linear_residual, linear_residual_reference

    benchmark.group = f"linear_residual-{layer} M={M} {k}->{D} bf16"
    x = torch.randn(M, k, device=device).to(DTYPE)
    w = (torch.randn(D, k, device=device) / k ** 0.5).to(DTYPE)
    b = (0.1 * torch.randn(D, device=device)).to(DTYPE)
    residual = torch.randn(M, D, device=device).to(DTYPE)
    out = torch.empty(M, D, device=device, dtype=DTYPE)
    if impl == "triton":
        fn = lambda: linear_residual(x, w, b, residual, out=out)  # noqa: E731
    else:
        fn = lambda: torch.add(residual, torch.addmm(b, x, w.t()), out=out)  # noqa: E731
    check(fn, lambda: linear_residual_reference(x.float(), w.float(), b.float(), residual.float()),
          f"{layer}[{impl}]")
    timed(fn, device=device, rounds=ROUNDS, warmup_rounds=WARMUP, flops=2 * M * D * k,
          impl=impl, shape=f"x [{M}, {k}] @ w [{D}, {k}]ᵀ + residual [{M}, {D}]", dtype=DTYPE)


# -- patch embedding ---------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_patch_embed(timed, benchmark, device, impl):
    from brainjepa_kernels.patch_embed import patch_embed, patch_embed_reference

    benchmark.group = f"patch_embed B={B} [{R} x {T}] -> [{N}, {D}] bf16"
    x = torch.randn(B, 1, R, T, device=device)  # the encoder's float32 input
    w = (torch.randn(D, 1, 1, PATCH, device=device) / PATCH ** 0.5).to(DTYPE)
    b = (0.1 * torch.randn(D, device=device)).to(DTYPE)
    pos = torch.randn(N, D, device=device)  # float32, precomputed once per scan length
    if impl == "triton":
        out = torch.empty(B, N, D, device=device, dtype=DTYPE)
        fn = lambda: patch_embed(x, w, b, pos, out=out)  # noqa: E731
    else:
        pos_c = pos.to(DTYPE)
        fn = lambda: F.conv2d(x.to(DTYPE), w, b, stride=(1, PATCH)).flatten(2).transpose(1, 2) + pos_c  # noqa: E731
    check(fn, lambda: patch_embed_reference(x, w.float(), b.float(), pos), f"patch_embed[{impl}]")
    bytes_moved = x.numel() * 4 + pos.numel() * 4 + B * N * D * 2
    timed(fn, device=device, rounds=ROUNDS, warmup_rounds=WARMUP, flops=2 * B * N * PATCH * D,
          bytes_moved=bytes_moved, impl=impl, shape=f"x [{B}, 1, {R}, {T}] fp32 -> [{B}, {N}, {D}]", dtype=DTYPE)


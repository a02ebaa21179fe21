"""kernels.linear_residual: residual + x @ w^T + b against PyTorch in float32, including the
in-place update of the residual stream (out is residual)."""
from __future__ import annotations

import pytest
import torch

from helpers import (KERNEL_TOL, SMALL_DEVICE as DEVICE, SMALL_DTYPES, assert_close,
                     poison_, requires_cuda, requires_hopper, requires_triton)

pytestmark = requires_triton


def _problem(m: int, k: int, n: int, dtype: torch.dtype, res_dtype=None, device=DEVICE):
    x = torch.randn(m, k, device=device) + 0.5 * torch.randn(m, 1, device=device)
    w = torch.randn(n, k, device=device) / k ** 0.5
    b = 0.5 * torch.randn(n, device=device)
    residual = 2.0 * torch.randn(m, n, device=device) + 0.5
    return x.to(dtype), w.to(dtype), b.to(dtype), residual.to(res_dtype or dtype)


def _reference(x, w, b, residual):
    from brainjepa_kernels.linear_residual import linear_residual_reference

    return linear_residual_reference(x.float(), w.float(), b.float(), residual.float())


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("m,k,n", [(1, 64, 64), (77, 72, 200), (300, 256, 128)])
def test_linear_residual(m, k, n, dtype):
    from brainjepa_kernels.linear_residual import linear_residual

    x, w, b, residual = _problem(m, k, n, dtype)
    out = poison_(torch.empty_like(residual))
    got = linear_residual(x, w, b, residual, out=out)
    assert got is out
    assert_close(got, _reference(x, w, b, residual), KERNEL_TOL[(DEVICE.type, dtype)], f"{m}x{k}x{n}")


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
def test_in_place_update_of_the_residual(dtype):
    """out=residual: every tile reads its residual before overwriting it, once (several tiles
    per program, ragged edges)."""
    from brainjepa_kernels.linear_residual import linear_residual

    x, w, b, h = _problem(150, 96, 136, dtype)
    x = x.view(3, 50, 96)
    h = h.view(3, 50, 136)
    ref = _reference(x, w, b, h)
    got = linear_residual(x, w, b, h, out=h)
    assert got is h
    assert_close(h, ref, KERNEL_TOL[(DEVICE.type, dtype)], "in place")


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
def test_schedules_and_fp32_residual(dtype):
    """Other schedules (one program per tile, no subtiling, ragged K, device-side descriptors) and a
    float32 residual stream under 16-bit / fp32 compute, updated in place."""
    from brainjepa_kernels._runtime import MatmulConfig
    from brainjepa_kernels.linear_residual import linear_residual

    x, w, b, h = _problem(100, 80, 72, dtype, res_dtype=torch.float32)
    ref = _reference(x, w, b, h)
    for cfg in ([MatmulConfig(32, 32, 32, 1, 4, persistent=False)], [MatmulConfig(64, 16, 16, 2, 4, group_m=2)],
                [MatmulConfig(64, 64, 32, 2, 4, device_descriptors=True)]):
        out = poison_(torch.empty_like(h))
        linear_residual(x, w, b, h, out=out, configs=cfg)
        assert out.dtype == torch.float32
        assert_close(out, ref, KERNEL_TOL[(DEVICE.type, dtype)], str(cfg[0]))
    linear_residual(x, w, b, h, out=h, configs=[MatmulConfig(16, 32, 64, 2, 4, subtile=True)])
    assert_close(h, ref, KERNEL_TOL[(DEVICE.type, dtype)], "fp32 residual in place")


def test_rejects_bad_arguments():
    from brainjepa_kernels.linear_residual import linear_residual

    x, w, b, r = _problem(8, 64, 32, torch.float16)
    with pytest.raises(ValueError, match="w:"):
        linear_residual(x, w.float(), b, r)
    with pytest.raises(ValueError, match="w:"):
        linear_residual(x, w[:, :32], b, r)
    with pytest.raises(ValueError, match="b:"):
        linear_residual(x, w, b[:16], r)
    with pytest.raises(ValueError, match="residual"):
        linear_residual(x, w, b, r[:4])
    with pytest.raises(ValueError, match="out"):
        linear_residual(x, w, b, r, out=torch.empty_like(r, dtype=torch.float32))
    with pytest.raises(ValueError, match="16 bytes"):  # fp16 rows of 36 elements: 72 bytes
        linear_residual(*_problem(8, 64, 36, torch.float16))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m", [4500, 13500, 36000])
@pytest.mark.parametrize("k,n", [(768, 768), (3072, 768)])
def test_linear_residual_full_size(m, k, n, dtype):
    from brainjepa_kernels.linear_residual import linear_residual

    x, w, b, residual = _problem(m, k, n, dtype, device="cuda")
    out = poison_(torch.empty_like(residual))
    linear_residual(x, w, b, residual, out=out)
    assert_close(out, _reference(x, w, b, residual), KERNEL_TOL[("cuda", dtype)], f"{m}x{k}x{n}")


@pytest.mark.gpu
@requires_cuda
def test_in_place_while_tuning():
    """First call on a new shape tunes (times every candidate) into scratch: the in-place update of
    the caller's residual must still happen exactly once."""
    from brainjepa_kernels.linear_residual import linear_residual

    x, w, b, h = _problem(4321, 768, 768, torch.bfloat16, device="cuda")
    ref = _reference(x, w, b, h)
    linear_residual(x, w, b, h, out=h)
    assert_close(h, ref, KERNEL_TOL[("cuda", torch.bfloat16)], "in place, first call")

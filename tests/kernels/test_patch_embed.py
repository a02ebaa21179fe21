"""kernels.patch_embed: Conv2d (1, 16) patch embedding + positional embedding in one pass,
against the PyTorch conv -> flatten -> transpose -> + pos in float32."""
from __future__ import annotations

import pytest
import torch

from helpers import (KERNEL_TOL, SMALL_DEVICE as DEVICE, SMALL_DTYPES, assert_close,
                     poison_, requires_cuda, requires_triton)

pytestmark = requires_triton


def _problem(b: int, r: int, t: int, d: int, dtype: torch.dtype, x_dtype=torch.float32, device=DEVICE):
    """Scan x [b, 1, r, t] (non-zero mean), Conv2d weight [d, 1, 1, 16], bias [d], pos [r * t/16, d]."""
    x = (torch.randn(b, 1, r, t, device=device) + 1.0).to(x_dtype)
    w = (torch.randn(d, 1, 1, 16, device=device) / 4.0).to(dtype)
    bias = (0.5 * torch.randn(d, device=device)).to(dtype)
    pos = (0.5 * torch.randn(r * (t // 16), d, device=device)).to(dtype)
    return x, w, bias, pos


def _reference(x, w, bias, pos):
    from brainjepa_kernels.patch_embed import patch_embed_reference

    return patch_embed_reference(x.float(), w.float(), bias.float(), pos.float())


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("b,r,t,d", [(1, 3, 16, 64), (2, 7, 48, 40), (3, 13, 160, 96)])
def test_patch_embed(b, r, t, d, dtype):
    """float32 scan, weights/output in ``dtype``: no separate cast pass."""
    from brainjepa_kernels.patch_embed import patch_embed

    x, w, bias, pos = _problem(b, r, t, d, dtype)
    out = poison_(torch.empty(b, r * (t // 16), d, device=DEVICE, dtype=dtype))
    got = patch_embed(x, w, bias, pos, out=out)
    assert got is out and got.dtype == dtype
    assert_close(got, _reference(x, w, bias, pos), KERNEL_TOL[(DEVICE.type, dtype)], f"{b}x{r}x{t}x{d}")


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
def test_input_layouts(dtype):
    """x as [B, R, T] and as a strided view (time-major storage), x in the model dtype, w as
    [D, 16], pos as [1, R * n_t, D]."""
    from brainjepa_kernels.patch_embed import patch_embed

    x, w, bias, pos = _problem(2, 5, 32, 48, dtype, x_dtype=dtype)
    ref = _reference(x, w, bias, pos)
    strided = x[:, 0].transpose(1, 2).contiguous().transpose(1, 2)
    for xi in (x[:, 0], strided):
        got = patch_embed(xi, w.view(48, 16), bias, pos[None])
        assert got.shape == (2, 10, 48)
        assert_close(got, ref, KERNEL_TOL[(DEVICE.type, dtype)], f"strides {xi.stride()}")


def test_token_order_is_roi_major():
    """Token r * n_t + t holds ROI r, time patch t (a zero weight except one tap isolates x)."""
    from brainjepa_kernels.patch_embed import patch_embed

    x = torch.arange(2 * 3 * 32, dtype=torch.float32, device=DEVICE).view(2, 1, 3, 32)
    w = torch.zeros(16, 1, 1, 16, device=DEVICE)
    w[:, 0, 0, 0] = 1.0
    got = patch_embed(x, w, torch.zeros(16, device=DEVICE), torch.zeros(6, 16, device=DEVICE))
    expect = x[:, 0, :, ::16].reshape(2, 6)  # first frame of each patch, ROI-major
    torch.testing.assert_close(got[..., 0], expect, rtol=0, atol=0)


def test_rejects_bad_arguments():
    from brainjepa_kernels.patch_embed import patch_embed

    x, w, bias, pos = _problem(1, 3, 32, 16, torch.float32)
    with pytest.raises(ValueError, match="divid"):
        patch_embed(x[..., :24], w, bias, pos)
    with pytest.raises(ValueError, match="pos"):
        patch_embed(x, w, bias, pos[:5])
    with pytest.raises(ValueError, match="b:"):
        patch_embed(x, w, bias[:8], pos)
    with pytest.raises(ValueError, match="out"):
        patch_embed(x, w, bias, pos, out=torch.empty(1, 6, 16, device=DEVICE, dtype=torch.float16))
    with pytest.raises(ValueError, match="x:"):
        patch_embed(x[0, 0], w, bias, pos)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("batch", [1, 8])
def test_patch_embed_full_size(batch, dtype):
    from brainjepa_kernels.patch_embed import patch_embed

    x, w, bias, pos = _problem(batch, 450, 160, 768, dtype, device="cuda")
    out = poison_(torch.empty(batch, 4500, 768, device="cuda", dtype=dtype))
    patch_embed(x, w, bias, pos, out=out)
    assert_close(out, _reference(x, w, bias, pos), KERNEL_TOL[("cuda", dtype)], f"B={batch}")

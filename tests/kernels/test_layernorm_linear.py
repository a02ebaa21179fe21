"""kernels.layernorm_linear: LayerNorm folded into the next matmul (+ optional exact GELU)
against F.linear(F.layer_norm(x)) in float32 on the same rounded inputs."""
from __future__ import annotations

import pytest
import torch

from helpers import (HAS_TRITON, KERNEL_TOL, SMALL_DEVICE as DEVICE, SMALL_DTYPES, assert_close,
                     poison_, requires_cuda, requires_hopper, requires_triton)

pytestmark = requires_triton

if HAS_TRITON:
    import triton.language as tl
    from triton import jit

    from brainjepa_kernels.layernorm_linear import gelu

    @jit
    def gelu_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, APPROX_RCP: tl.constexpr):
        """y = gelu(x) elementwise: the epilogue's GELU on its own."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, gelu(tl.load(x_ptr + offs, mask=offs < n), APPROX_RCP), mask=offs < n)


def _problem(m: int, k: int, n: int, dtype: torch.dtype, device=DEVICE, row_mean: float = 0.5):
    """x [m, k] with non-zero per-row means, non-trivial LayerNorm affine, nn.Linear-scaled w, b."""
    x = torch.randn(m, k, device=device) * (0.5 + torch.rand(m, 1, device=device)) + row_mean * torch.randn(m, 1, device=device)
    ln_w = 1.0 + 0.5 * torch.randn(k, device=device)
    ln_b = 0.5 * torch.randn(k, device=device)
    w = torch.randn(n, k, device=device) / k ** 0.5
    b = 0.5 * torch.randn(n, device=device)
    return tuple(t.to(dtype) for t in (x, ln_w, ln_b, w, b))


def _reference(x, ln_w, ln_b, w, b, activation=None):
    from brainjepa_kernels.layernorm_linear import layernorm_linear_reference

    return layernorm_linear_reference(*(t.float() for t in (x, ln_w, ln_b, w, b)), activation=activation)


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("m,k,n", [(1, 64, 64), (77, 72, 200), (300, 256, 128)])
def test_layernorm_linear(m, k, n, activation, dtype):
    from brainjepa_kernels.layernorm_linear import layernorm_linear

    args = _problem(m, k, n, dtype)
    out = poison_(torch.empty(m, n, device=DEVICE, dtype=dtype))
    got = layernorm_linear(*args, activation=activation, out=out)
    assert got is out
    assert_close(got, _reference(*args, activation), KERNEL_TOL[(DEVICE.type, dtype)], f"{m}x{k}x{n} {activation}")


def test_leading_dims_and_large_row_means():
    """x [B, T, K] keeps its leading dims; a row mean 8x its std exercises the mean correction."""
    from brainjepa_kernels.layernorm_linear import layernorm_linear

    x, ln_w, ln_b, w, b = _problem(6 * 25, 128, 96, torch.float32, row_mean=8.0)
    x = x.view(6, 25, 128)
    got = layernorm_linear(x, ln_w, ln_b, w, b, activation="gelu")
    assert got.shape == (6, 25, 96)
    assert_close(got, _reference(x, ln_w, ln_b, w, b, "gelu"), KERNEL_TOL[(DEVICE.type, torch.float32)], "3-D")


def test_fold_layernorm():
    """W' = W * g rounded; b' = b + W @ beta; c = rowsum of the *rounded* W'."""
    from brainjepa_kernels.layernorm_linear import fold_layernorm

    _, ln_w, ln_b, w, b = _problem(1, 64, 32, torch.float32)
    folded = fold_layernorm(ln_w, ln_b, w, b, torch.float16)
    assert folded.weight.dtype == torch.float16 and folded.bias.dtype == folded.colsum.dtype == torch.float32
    torch.testing.assert_close(folded.weight, (w * ln_w).half())
    torch.testing.assert_close(folded.bias, b + w @ ln_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded.colsum, folded.weight.double().sum(1).float(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
def test_folded_with_given_stats_and_schedules(dtype):
    """The hot path with precomputed stats, under other schedules: one program per tile, no
    epilogue subtiling, K not a multiple of block_k, tiles taller than wide, device-side
    descriptors."""
    from brainjepa_kernels._runtime import MatmulConfig
    from brainjepa_kernels.layernorm import row_stats
    from brainjepa_kernels.layernorm_linear import fold_layernorm, layernorm_linear_folded

    x, ln_w, ln_b, w, b = _problem(130, 80, 136, dtype)
    folded = fold_layernorm(ln_w, ln_b, w, b)
    stats = row_stats(x)
    ref = _reference(x, ln_w, ln_b, w, b, "gelu")
    configs = ([MatmulConfig(32, 32, 32, 1, 4, persistent=False)], [MatmulConfig(64, 32, 16, 2, 4, group_m=2)],
               [MatmulConfig(16, 64, 64, 2, 4, subtile=True, flatten=False)],
               [MatmulConfig(64, 64, 32, 2, 4, device_descriptors=True)])
    for cfg in configs:
        out = poison_(torch.empty(130, 136, device=DEVICE, dtype=dtype))
        layernorm_linear_folded(x, folded, "gelu", stats=stats, out=out, configs=cfg)
        assert_close(out, ref, KERNEL_TOL[(DEVICE.type, dtype)], str(cfg[0]))


def test_stats_are_used():
    """Wrong statistics must change the result (the epilogue really applies them)."""
    from brainjepa_kernels.layernorm import row_stats
    from brainjepa_kernels.layernorm_linear import fold_layernorm, layernorm_linear_folded

    x, ln_w, ln_b, w, b = _problem(64, 64, 64, torch.float32)
    folded = fold_layernorm(ln_w, ln_b, w, b)
    stats = row_stats(x)
    stats[:, 1] *= 2.0
    got = layernorm_linear_folded(x, folded, stats=stats)
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(got, _reference(x, ln_w, ln_b, w, b), 0.1, "doubled rstd")


def test_rejects_bad_arguments():
    from brainjepa_kernels.layernorm_linear import fold_layernorm, layernorm_linear, layernorm_linear_folded

    x, ln_w, ln_b, w, b = _problem(8, 64, 32, torch.float16)
    folded = fold_layernorm(ln_w, ln_b, w, b)
    with pytest.raises(ValueError, match="activation"):
        layernorm_linear_folded(x, folded, activation="relu")
    with pytest.raises(ValueError, match="folded.weight"):
        layernorm_linear_folded(x.float(), folded)
    with pytest.raises(ValueError, match="16 bytes"):  # fp16 rows of 60 elements: 120 bytes
        xs, *rest = _problem(8, 60, 32, torch.float16)
        layernorm_linear(xs, *rest)
    with pytest.raises(ValueError, match="stats"):
        layernorm_linear_folded(x, folded, stats=torch.zeros(7, 2, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        layernorm_linear_folded(x.t(), folded)
    with pytest.raises(ValueError, match="fold_layernorm"):
        fold_layernorm(ln_w[:32], ln_b, w, b)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m", [4500, 13500, 36000])
@pytest.mark.parametrize("n,activation", [(2304, None), (3072, "gelu")])
def test_layernorm_linear_full_size(m, n, activation, dtype):
    from brainjepa_kernels.layernorm_linear import fold_layernorm, layernorm_linear_folded

    x, ln_w, ln_b, w, b = _problem(m, 768, n, dtype, device="cuda")
    out = poison_(torch.empty(m, n, device="cuda", dtype=dtype))
    layernorm_linear_folded(x, fold_layernorm(ln_w, ln_b, w, b), activation, out=out)
    assert_close(out, _reference(x, ln_w, ln_b, w, b, activation), KERNEL_TOL[("cuda", dtype)], f"{m}x{n}")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # d * d at |x| = 1e30: inf, as meant
@pytest.mark.parametrize("approx_rcp", [False, pytest.param(True, marks=requires_cuda)], ids=["rsqrt", "rcp"])
def test_gelu_epilogue_function_is_exact_erf_gelu(approx_rcp):
    """The epilogue's ``gelu`` (Abramowitz & Stegun's erfc form, no libdevice erf) against
    x * erfc(-x / sqrt(2)) / 2 in float64 over [-12, 12] and N(0, 3) samples (interpreter on CPU,
    the compiled code on a GPU: MUFU rsqrt or rcp and exp2 approximations included): |error| <=
    5e-7 * max(1, |x|), below one fp32 rounding of torch's own float32 GELU on the same inputs
    (~3.6e-7, measured). The approximate reciprocal (the Gluon fc1's) is inline PTX: GPU only."""
    import triton

    torch.manual_seed(0)
    x = torch.cat([torch.linspace(-12, 12, 48001), 3 * torch.randn(16000), torch.tensor([0.0, 1e-30, -1e30, 1e30])])
    x = x.to("cuda" if approx_rcp else DEVICE)
    y = poison_(torch.empty_like(x))
    gelu_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024, APPROX_RCP=approx_rcp)
    x64 = x.double()
    ref = x64 * torch.special.erfc(-x64 / 2 ** 0.5) / 2
    err = ((y.double() - ref).abs() / x64.abs().clamp(min=1)).max().item()
    assert err <= 5e-7, err

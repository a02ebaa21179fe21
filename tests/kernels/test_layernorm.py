"""kernels.layernorm: row statistics and the final LayerNorm against PyTorch in float32."""
from __future__ import annotations

import pytest
import torch

from helpers import (KERNEL_TOL, SMALL_DEVICE as DEVICE, SMALL_DTYPES, assert_close,
                     poison_, requires_cuda, requires_triton)

pytestmark = requires_triton


def _rows(m: int, k: int, dtype: torch.dtype, device=DEVICE, mean_scale: float = 2.0) -> torch.Tensor:
    """Random rows with a per-row offset (non-zero means) and per-row scale."""
    x = torch.randn(m, k, device=device) * (0.5 + torch.rand(m, 1, device=device)) + mean_scale * torch.randn(m, 1, device=device)
    return x.to(dtype)


def _affine(k: int, dtype: torch.dtype, device=DEVICE) -> tuple[torch.Tensor, torch.Tensor]:
    return ((1.0 + 0.5 * torch.randn(k, device=device)).to(dtype), (0.5 * torch.randn(k, device=device)).to(dtype))


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("m,k", [(1, 64), (77, 200), (300, 256), (33, 1024)])
def test_row_stats(m, k, dtype):
    from brainjepa_kernels.layernorm import row_stats, row_stats_reference

    x = _rows(m, k, dtype)
    out = poison_(torch.empty(m, 2, device=DEVICE))
    got = row_stats(x, eps=1e-6, out=out)
    assert got is out
    ref = row_stats_reference(x.float(), eps=1e-6)
    assert_close(got[:, 0], ref[:, 0], KERNEL_TOL[(DEVICE.type, torch.float32)], "mean")
    assert_close(got[:, 1], ref[:, 1], KERNEL_TOL[(DEVICE.type, torch.float32)], "rstd")


def test_row_stats_strided_rows_and_eps():
    """Row stride > K (a column slice), and eps reaches the kernel (constant rows: rstd = eps^-1/2)."""
    from brainjepa_kernels.layernorm import row_stats, row_stats_reference

    wide = _rows(50, 160, torch.float32)
    wide[:10, :96] = 3.0
    x = wide[:, :96]
    got = row_stats(x, eps=1e-2)
    assert_close(got, row_stats_reference(x, eps=1e-2), KERNEL_TOL[(DEVICE.type, torch.float32)], "strided")
    assert torch.allclose(got[:10, 1], torch.full((10,), 10.0, device=DEVICE), rtol=1e-4)


def test_row_stats_is_two_pass():
    """Rows with |mean| = 300 std: E[x^2] - E[x]^2 in float32 would lose ~1e-2 of the variance."""
    from brainjepa_kernels.layernorm import row_stats, row_stats_reference

    x = torch.randn(64, 768, device=DEVICE) + 300.0
    got = row_stats(x)
    ref = row_stats_reference(x)
    assert_close(got[:, 1], ref[:, 1], KERNEL_TOL[(DEVICE.type, torch.float32)], "rstd at large mean")


@pytest.mark.parametrize("k", [64, 200, 768, 1000])
def test_merged_chunk_stats_equal_row_stats(k):
    """The chunk statistics' format (:func:`chunk_stats_reference`, 128-column chunks, a shorter
    last one for ragged K) merged by :func:`merge_chunk_stats` gives the two-pass (mean, rstd),
    also for row means 1000x the spread with chunk means that differ (a per-chunk offset)."""
    from brainjepa_kernels.layernorm import chunk_stats_reference, merge_chunk_stats, row_stats_reference

    x = _rows(300, k, torch.float64, mean_scale=1000.0) + 3.0 * torch.randn(1, k, device=DEVICE, dtype=torch.float64)
    chunks = chunk_stats_reference(x)
    assert chunks.shape == (300, -(-k // 128), 2) and chunks.dtype == torch.float32
    got = merge_chunk_stats(chunks, k, eps=1e-3)
    ref = row_stats_reference(x, eps=1e-3).float()
    assert_close(got[:, 0], ref[:, 0], 1e-6, "mean")
    assert_close(got[:, 1], ref[:, 1], 1e-5, "rstd")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("k", [200, 768])
def test_merge_chunk_stats_in_a_cuda_graph(k):
    """:func:`merge_chunk_stats` captured in a CUDA graph (as the tuner times the Triton
    LayerNorm matmuls that merge chunks; a host-to-device copy would fail the capture) and
    replayed on new statistics gives what it gives eagerly."""
    from brainjepa_kernels.layernorm import chunk_stats_reference, merge_chunk_stats

    chunks = chunk_stats_reference(_rows(300, k, torch.float32, device="cuda"))
    out = torch.empty(300, 2, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(merge_chunk_stats(chunks, k))
    chunks.copy_(chunk_stats_reference(_rows(300, k, torch.float32, device="cuda")))
    poison_(out)
    graph.replay()
    assert_close(out, merge_chunk_stats(chunks, k), 1e-6, f"k={k}")


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (7, 11, 200), (300, 256)])
def test_layernorm(shape, dtype):
    from brainjepa_kernels.layernorm import layernorm, layernorm_reference

    k = shape[-1]
    x = _rows(int(torch.tensor(shape[:-1]).prod()), k, dtype).view(shape)
    w, b = _affine(k, dtype)
    out = poison_(torch.empty(shape, device=DEVICE, dtype=dtype))
    got = layernorm(x, w, b, eps=1e-6, out=out)
    assert got is out and got.dtype == dtype
    ref = layernorm_reference(x.float(), w.float(), b.float(), eps=1e-6)
    assert_close(got, ref, KERNEL_TOL[(DEVICE.type, dtype)], f"layernorm {shape} {dtype}")


def test_layernorm_fp32_affine_on_half_input():
    """Gain/shift may be float32 while x is fp16: result in x's dtype."""
    from brainjepa_kernels.layernorm import layernorm, layernorm_reference

    x = _rows(40, 128, torch.float16)
    w, b = _affine(128, torch.float32)
    got = layernorm(x, w, b)
    assert got.dtype == torch.float16
    assert_close(got, layernorm_reference(x.float(), w, b), KERNEL_TOL[(DEVICE.type, torch.float16)], "mixed")


def test_layernorm_rejects_bad_arguments():
    from brainjepa_kernels.layernorm import layernorm, row_stats

    x = _rows(4, 64, torch.float32)
    w, b = _affine(64, torch.float32)
    with pytest.raises(ValueError, match="1..1024"):
        row_stats(_rows(2, 1032, torch.float32))
    with pytest.raises(ValueError, match="weight"):
        layernorm(x, w[:32], b)
    with pytest.raises(ValueError, match="out"):
        layernorm(x, w, b, out=torch.empty(4, 32, device=DEVICE))
    with pytest.raises(ValueError, match="out"):
        row_stats(x, out=torch.empty(4, 2, device=DEVICE, dtype=torch.float16))
    with pytest.raises(TypeError, match="int64"):
        row_stats(x.long())


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m", [4500, 13500, 36000])
def test_layernorm_full_size(m, dtype):
    from brainjepa_kernels.layernorm import layernorm, layernorm_reference, row_stats, row_stats_reference

    x = _rows(m, 768, dtype, device="cuda")
    w, b = _affine(768, dtype, device="cuda")
    stats = row_stats(x, out=poison_(torch.empty(m, 2, device="cuda")))
    assert_close(stats, row_stats_reference(x.float()), KERNEL_TOL[("cuda", torch.float32)], "stats")
    got = layernorm(x, w, b, out=poison_(torch.empty_like(x)))
    assert_close(got, layernorm_reference(x.float(), w.float(), b.float()), KERNEL_TOL[("cuda", dtype)], "layernorm")

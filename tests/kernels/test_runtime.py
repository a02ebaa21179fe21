"""kernels._runtime: the per-process tuner must not race the caller's queued GPU work, and must
launch on the current GPU."""
from __future__ import annotations

import pytest
import torch

from helpers import KERNEL_TOL, assert_close, requires_cuda, requires_triton

pytestmark = requires_triton


def _inputs(m: int, k: int, n: int, seed: int, device: str = "cuda") -> tuple[torch.Tensor, ...]:
    """Seeded bf16 operands of ``linear_residual`` on ``device``: x [m, k], w [n, k], b [n],
    and the bf16 block the residual [m, n] is copied from (same size as the tuner's scratch)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, generator=g, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, generator=g, device=device, dtype=torch.bfloat16) / k ** 0.5
    b = torch.randn(n, generator=g, device=device, dtype=torch.bfloat16)
    source = torch.randn(m, n, generator=g, device=device, dtype=torch.bfloat16)
    return x, w, b, source


@pytest.mark.gpu
@requires_cuda
def test_tuning_waits_for_the_callers_queued_work():
    """The residual is copied from a block that is freed at once, while the copy still waits
    behind ~0.5 s of queued GPU work; the tuner's scratch output (same size) then gets that
    block (the output is allocated before). Were the timing launches (on the tuner's own stream) not ordered after
    the queued work, they would overwrite the block before the copy reads it."""
    from brainjepa_kernels._runtime import matmul_candidates
    from brainjepa_kernels.linear_residual import linear_residual, linear_residual_reference

    m, k, n, seed = 12347, 768, 768, 3
    configs = matmul_candidates(torch.bfloat16, torch.device("cuda"))[2:4]
    warm = _inputs(256, k, n, seed)
    linear_residual(*warm[:3], warm[3].clone(), configs=configs)  # compiles both candidates
    del warm
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # no other cached free block of the scratch's size

    x, w, b, source = _inputs(m, k, n, seed)
    torch.cuda._sleep(1_000_000_000)  # GPU clock cycles queued ahead of the copy below
    residual = source.clone()
    out = torch.empty_like(source)
    del source  # its block returns to the allocator while the clone above is still queued
    linear_residual(x, w, b, residual, out=out, configs=configs)  # new shape: tunes
    torch.cuda.synchronize()

    x0, w0, b0, source0 = _inputs(m, k, n, seed)
    assert torch.equal(residual, source0), "the residual was overwritten while its copy was queued"
    assert_close(out, linear_residual_reference(x0.float(), w0.float(), b0.float(), source0.float()),
                 KERNEL_TOL[("cuda", torch.bfloat16)], f"{m}x{k}x{n}")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_tuning_on_a_second_gpu():
    """A capture on GPU 0 first makes ``torch.cuda.graph``'s process-wide default capture stream
    live there (as any earlier work in a process can); tuning on GPU 1 (under
    ``torch.cuda.device(1)``, as the encoder runs) must still launch and capture on GPU 1.
    ``triton.testing.do_bench_cudagraph`` failed here: "Pointer argument ... cannot be accessed"."""
    from brainjepa_kernels._runtime import matmul_candidates
    from brainjepa_kernels.linear_residual import linear_residual, linear_residual_reference

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ones(8, device="cuda:0").mul_(2)
    m, k, n, seed = 333, 768, 768, 5
    x, w, b, source = _inputs(m, k, n, seed, device="cuda:1")
    configs = matmul_candidates(torch.bfloat16, x.device)[2:4]
    with torch.cuda.device(1):
        out = linear_residual(x, w, b, source, configs=configs)
        torch.cuda.synchronize()
    assert out.device == x.device
    assert_close(out, linear_residual_reference(x.float(), w.float(), b.float(), source.float()),
                 KERNEL_TOL[("cuda", torch.bfloat16)], f"cuda:1 {m}x{k}x{n}")

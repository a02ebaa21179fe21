"""The warp-specialized Gluon matmul for Hopper (:mod:`kernels.matmul_hopper`), among the
configurations :func:`layernorm_linear_folded` and :func:`linear_residual` tune over on an sm_90
GPU.

Gluon has no CPU interpreter, so off-GPU the kernel is compiled for sm_90 (ptxas ships with
Triton) and its resources and SASS checked; on an sm_90 GPU its results are checked against
:func:`layernorm_linear_reference` and :func:`linear_residual_reference` by ‖out − ref‖/‖ref‖
on NaN-poisoned outputs (the residual also in place), ragged M (one
row; fewer rows than a tile; tile counts that leave the two consumers and the last wave uneven),
K not a multiple of the K step, N not a multiple of the tile, fp16 and bf16, with and without
GELU, and that nothing past the output is written. The chunk statistics (the residual epilogue
writes them for the next LayerNorm, the LayerNorm epilogue merges them) are checked against
:func:`kernels.layernorm.chunk_stats_reference` and against the same kernel given ``row_stats``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import KERNEL_TOL, assert_close, poison_, requires_hopper, requires_triton
from test_layernorm_linear import _problem, _reference

pytestmark = requires_triton

GPU_DTYPES = [torch.bfloat16, torch.float16]


def test_compiles_for_hopper_without_spills():
    """Each configuration, compiled by ptxas for sm_90 with the epilogue and shape of each encoder
    matmul (``bench.linear_lab --compile-ws``, in a process without the interpreter): no spills, within
    the 227 KB of shared memory, the partitions at 248 / 232 / 24 registers (setmaxnreg; 240 / 240 / 24
    for the residual epilogue writing chunk statistics), eight
    wgmma per K step in each consumer's loop (a 128-row tile is two m64 instructions per 16-wide
    K slice), each consumer's loop keeps one K step's products in flight (``wait_group 1`` in its
    PTX) and ptxas did not serialize them (a wait per wgmma would show as one
    ``WARPGROUP.DEPBAR`` per ``HGMMA``; each consumer waits once per step and once per tile)."""
    from brainjepa_kernels.matmul_hopper import CONFIGS

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.linear_lab", "--compile-ws"], cwd=Path(__file__).resolve().parents[2],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert len(rows) == 8 * len(CONFIGS), rows  # four matmuls, with and without chunk statistics
    for row in rows:
        # The residual epilogue writing chunk statistics spills one loop-invariant register (8
        # bytes of stack: stored before the loop, reloaded once per tile; 24-120 bytes in the
        # other arrangements tried, see bench/NOTES.md).
        writes_chunks = row["chunk_stats"] and row["op"] in ("proj", "fc2")
        assert row["stack"] <= (8 if writes_chunks else 0) and row["regs"] <= 168 and row["smem"] <= 232448, row
        consumers = {"inc 240", "dec 240"} if writes_chunks else {"dec 248", "inc 232"}
        assert consumers | {"dec 24"} <= set(row["setmaxnreg"]), row
        assert row["hgmma"] == 16 and row["depbar"] <= 4 and row["ptx_wait1"] == 2, row


def test_offered_only_where_it_runs():
    """Off an sm_90 GPU (and for fp32) the tuners' candidates are the Triton kernels' alone; on
    one, the Gluon configurations follow them unless the caller's epilogue rules them out."""
    from brainjepa_kernels._runtime import candidates_for, matmul_candidates
    from brainjepa_kernels.matmul_hopper import CONFIGS, supports

    for x in (torch.empty(4, 64), torch.empty(4, 64, dtype=torch.bfloat16)):
        assert not supports(x)
        assert candidates_for(x) == matmul_candidates(x.dtype, x.device)
    if torch.cuda.is_available() and supports(x := torch.empty(4, 64, device="cuda", dtype=torch.bfloat16)):
        assert candidates_for(x) == matmul_candidates(x.dtype, x.device) + CONFIGS
        assert candidates_for(x, hopper_ok=False) == matmul_candidates(x.dtype, x.device)


@pytest.mark.gpu
@requires_hopper
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("m,k,n", [(1, 768, 2304), (77, 72, 200), (300, 768, 3072), (4500, 768, 3072),
                                   (36000, 768, 2304), (13500 + 77, 768, 3072)])
def test_gpu_matches_reference(m, k, n, activation, dtype):
    from brainjepa_kernels.layernorm_linear import fold_layernorm, layernorm_linear_folded
    from brainjepa_kernels.matmul_hopper import CONFIGS

    x, ln_w, ln_b, w, b = _problem(m, k, n, dtype, device="cuda")
    folded = fold_layernorm(ln_w, ln_b, w, b)
    ref = _reference(x, ln_w, ln_b, w, b, activation)
    room = poison_(torch.empty(m + 300, n, device="cuda", dtype=dtype))
    for cfg in CONFIGS:
        out = poison_(room[:m])
        layernorm_linear_folded(x, folded, activation, out=out, configs=[cfg])
        assert_close(out, ref, KERNEL_TOL[("cuda", dtype)], f"{cfg} {m}x{k}x{n} {activation}")
        assert torch.isnan(room[m:]).all(), f"{cfg}: wrote past the output"


@pytest.mark.gpu
@requires_hopper
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("m,k,n", [(1, 768, 768), (77, 72, 200), (300, 3072, 768), (36000, 768, 768),
                                   (13500 + 77, 3072, 768)])
def test_gpu_residual_matches_reference(m, k, n, in_place, dtype):
    from brainjepa_kernels.linear_residual import linear_residual, linear_residual_reference
    from brainjepa_kernels.matmul_hopper import CONFIGS

    x = torch.randn(m, k, device="cuda").to(dtype)
    w = (torch.randn(n, k, device="cuda") / k ** 0.5).to(dtype)
    b = (0.5 * torch.randn(n, device="cuda")).to(dtype)
    residual = torch.randn(m, n, device="cuda").to(dtype)
    ref = linear_residual_reference(x.float(), w.float(), b.float(), residual.float())
    for cfg in CONFIGS:
        room = poison_(torch.empty(m + 300, n, device="cuda", dtype=dtype))
        out = room[:m]
        if in_place:
            out.copy_(residual)
        linear_residual(x, w, b, out if in_place else residual, out=out, configs=[cfg])
        assert_close(out, ref, KERNEL_TOL[("cuda", dtype)], f"{cfg} {m}x{k}x{n} in_place={in_place}")
        assert torch.isnan(room[m:]).all(), f"{cfg}: wrote past the output"


def test_chunk_stats_need_the_gluon_kernel():
    """Off an sm_90 GPU no candidate writes chunk statistics: a clear error, not a silent skip;
    and a LayerNorm matmul takes one kind of statistics."""
    from brainjepa_kernels.layernorm_linear import fold_layernorm, layernorm_linear_folded
    from brainjepa_kernels.linear_residual import linear_residual
    from helpers import SMALL_DEVICE

    if torch.cuda.is_available():
        pytest.skip("the CPU path's error")
    x = torch.randn(5, 64, device=SMALL_DEVICE)
    w, b = torch.randn(128, 64, device=SMALL_DEVICE), torch.zeros(128, device=SMALL_DEVICE)
    chunks = torch.empty(5, 1, 2, device=SMALL_DEVICE)
    with pytest.raises(ValueError, match="only the Gluon kernel"):
        linear_residual(x, w, b, torch.randn(5, 128, device=SMALL_DEVICE), chunk_stats=chunks)
    folded = fold_layernorm(torch.ones(64), torch.zeros(64), w, b)
    with pytest.raises(ValueError, match="not both"):
        layernorm_linear_folded(x, folded, stats=torch.empty(5, 2), chunk_stats=chunks)
    with pytest.raises(ValueError, match="chunk_stats"):
        layernorm_linear_folded(x, folded, chunk_stats=torch.empty(5, 2, 2))


#: ‖chunk − given‖/‖given‖ bound for the LayerNorm epilogue merging chunk statistics against the
#: same kernel given ``row_stats``' (both exact to fp32 rounding: the outputs may differ by an
#: output rounding step where the two fp32 results straddle one).
CHUNK_VS_GIVEN_TOL = {torch.bfloat16: 1e-3, torch.float16: 2e-4}


@pytest.mark.gpu
@requires_hopper
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("row_mean", [0.5, 100.0])
@pytest.mark.parametrize("m,k", [(1, 768), (77, 72), (300, 200), (13500 + 77, 768)])
def test_gpu_layernorm_merges_chunk_stats(m, k, row_mean, dtype):
    """Chunk statistics of x (128-column chunks; K = 72 or 200 leaves a short last one) merged in
    the epilogue, against ``row_stats``' (mean, rstd) given to the same kernel, with row means
    100x the spread; and against the fp32 reference."""
    from brainjepa_kernels.layernorm import chunk_stats_reference, row_stats
    from brainjepa_kernels.layernorm_linear import fold_layernorm, layernorm_linear_folded
    from brainjepa_kernels.matmul_hopper import CONFIGS

    x, ln_w, ln_b, w, b = _problem(m, k, 384, dtype, device="cuda", row_mean=row_mean)
    folded = fold_layernorm(ln_w, ln_b, w, b)
    stats, chunks = row_stats(x), chunk_stats_reference(x)
    ref = _reference(x, ln_w, ln_b, w, b)
    for cfg in CONFIGS:
        merged = layernorm_linear_folded(x, folded, chunk_stats=chunks, configs=[cfg],
                                         out=poison_(torch.empty(m, 384, device="cuda", dtype=dtype)))
        given = layernorm_linear_folded(x, folded, stats=stats, configs=[cfg])
        assert_close(merged, given, CHUNK_VS_GIVEN_TOL[dtype], f"{cfg} {m}x{k} row mean {row_mean}: chunks vs given")
        assert_close(merged, ref, KERNEL_TOL[("cuda", dtype)], f"{cfg} {m}x{k} row mean {row_mean}")


@pytest.mark.gpu
@requires_hopper
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("m,k,n", [(1, 768, 768), (77, 72, 200), (13500 + 77, 3072, 768)])
def test_gpu_residual_writes_chunk_stats(m, k, n, in_place, dtype):
    """The residual epilogue's chunk statistics of its output (as stored) against
    :func:`chunk_stats_reference` of that output (N = 200: a 72-column last chunk), on a
    NaN-poisoned buffer; and they feed the next LayerNorm as ``row_stats`` would (eps 1e-6)."""
    from brainjepa_kernels.layernorm import chunk_stats_reference, merge_chunk_stats, row_stats
    from brainjepa_kernels.linear_residual import linear_residual, linear_residual_reference
    from brainjepa_kernels.matmul_hopper import CONFIGS

    x = torch.randn(m, k, device="cuda").to(dtype)
    w = (torch.randn(n, k, device="cuda") / k ** 0.5).to(dtype)
    b = (0.5 * torch.randn(n, device="cuda")).to(dtype)
    residual = (torch.randn(m, n, device="cuda") + 3.0 * torch.randn(m, 1, device="cuda")).to(dtype)
    ref = linear_residual_reference(x.float(), w.float(), b.float(), residual.float())
    for cfg in CONFIGS:
        out = poison_(torch.empty(m, n, device="cuda", dtype=dtype))
        if in_place:
            out.copy_(residual)
        chunks = poison_(torch.empty(m, -(-n // 128), 2, device="cuda"))
        linear_residual(x, w, b, out if in_place else residual, out=out, configs=[cfg], chunk_stats=chunks)
        assert_close(out, ref, KERNEL_TOL[("cuda", dtype)], f"{cfg} {m}x{k}x{n} in_place={in_place}")
        expected = chunk_stats_reference(out)
        assert_close(chunks[..., 0], expected[..., 0], 1e-5, f"{cfg} {m}x{k}x{n}: chunk means")
        assert_close(chunks[..., 1], expected[..., 1], 1e-5, f"{cfg} {m}x{k}x{n}: chunk M2")
        assert_close(merge_chunk_stats(chunks, n), row_stats(out), 1e-5, f"{cfg} {m}x{k}x{n}: merged")

"""The Gluon attention kernel for Hopper (:mod:`kernels.flash_attention_hopper`), variant
``"overlap"`` of :func:`flash_attention`.

Gluon has no CPU interpreter, so off-GPU the kernel is compiled for sm_90 (ptxas ships with
Triton) and its SASS checked for the overlap it exists for; its results are checked on an sm_90
GPU against :func:`attention_reference` by ‖out − ref‖/‖ref‖ on NaN-poisoned outputs, ragged N
(only the masked tail: N < 128; an odd and an even number of main-loop steps; no tail), fp16 and
bf16. The CPU tests also pin how :func:`flash_attention` offers the variant.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import assert_close, requires_hopper, requires_triton
from test_flash_attention import DEFAULT_VARIANTS, random_qkv, run, tol
from brainjepa_kernels.flash_attention import (DEFAULT_GLUON_VARIANTS, GLUON_VARIANTS, HEAD_DIM, LOG2E,
                                               OVERLAP_ANCHORED, VARIANTS, AttnConfig, attention_reference, candidates,
                                               flash_attention, overlap_supports)

pytestmark = requires_triton


def test_compiles_for_hopper_with_scores_in_flight_during_the_softmax():
    """The package configuration (two steps per loop iteration), compiled by ptxas for sm_90: no
    spills; in the PTX main loop the next block's q k^T wgmma is committed before the softmax's
    exponentials and waited for after them, twice per iteration, the order Triton source does not
    give; and ptxas kept it: at most one SASS wait for each group of four wgmma, not one after every
    wgmma (the serialization of its message C7514, which the first version of the kernel met)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "bench.gluon_attention_lab", "--compile-only", "--configs", "64x128x3u2",
           "64x128x3u2a"]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    online, anchored = (json.loads(line) for line in proc.stdout.strip().splitlines()[-2:])
    # Per step 64 exponentials a thread (a 64 x 128 block over 128 threads), plus the two of the
    # rescale factors where the max runs (the anchored main loop has none).
    for row, exps in ((online, 66), (anchored, 64)):
        assert row["stack"] == 0, row
        step = f"mmax4 commit ex2x{exps} wait0 mmax8 commit"
        assert f"{step} mbar.wait {step}" in row["sequence"], row
        assert row["depbar"] * 4 <= row["hgmma"], row


def test_offered_where_it_can_run():
    """``overlap=True`` (the caller saw :func:`overlap_supports`) adds the kernel's configurations
    under each default Gluon variant after the default variants'; ``variant="overlap"`` (or
    ``"overlap_anchored"``) gives only its own; explicit ``configs`` leave them out of the
    default; off an sm_90 GPU they are not supported and forcing one is an error."""
    from brainjepa_kernels.flash_attention_hopper import CONFIGS
    for name in GLUON_VARIANTS:
        assert candidates(torch.bfloat16, name) == tuple((name, cfg) for cfg in CONFIGS)
    cfg = AttnConfig(64, 64, 4, 3)
    assert candidates(torch.bfloat16, configs=[cfg], overlap=True) == tuple((n, cfg) for n in DEFAULT_VARIANTS)
    if torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET") == "1":
        default = candidates(torch.bfloat16)
        gluon_pairs = tuple((name, cfg) for name in DEFAULT_GLUON_VARIANTS for cfg in CONFIGS)
        assert candidates(torch.bfloat16, overlap=True) == default + gluon_pairs
    qkv = random_qkv(1, 8, 1, torch.float32)
    assert not overlap_supports(qkv)
    for name in GLUON_VARIANTS:
        with pytest.raises(ValueError, match=name):
            flash_attention(qkv, variant=name)
        assert name not in VARIANTS  # the interpreter tests parametrized over VARIANTS never see it


def test_rejects_configurations_it_cannot_run():
    from brainjepa_kernels.flash_attention_hopper import kernel_args
    qkv = torch.zeros(1, 8, 3, 1, HEAD_DIM, dtype=torch.bfloat16)
    out = torch.zeros(1, 8, HEAD_DIM, dtype=torch.bfloat16)
    for cfg in (AttnConfig(32, 128, 2, 3), AttnConfig(64, 128, 8, 3), AttnConfig(64, 32, 4, 3),
                AttnConfig(64, 128, 4, 2)):
        with pytest.raises(ValueError, match="cfg"):
            kernel_args(qkv, out, cfg)
    with pytest.raises(ValueError, match="contiguous"):
        kernel_args(qkv.float(), out.float(), AttnConfig(64, 128, 4, 3))


# ---------------------------------------------------------------------------------------------
# sm_90 GPU
# ---------------------------------------------------------------------------------------------

GPU_DTYPES = (torch.bfloat16, torch.float16)


@pytest.mark.gpu
@requires_hopper
@pytest.mark.parametrize("variant", list(GLUON_VARIANTS))
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("B, N, H", [(2, 1, 12), (2, 77, 12), (2, 300, 12), (1, 384, 3), (2, 4500, 12),
                                     (1, 13500, 2)])
def test_gpu_matches_reference(variant, dtype, B, N, H):
    """N = 1 and 77: the masked tail only; 300: one main-loop step (odd) and a tail; 384: two
    steps (one unrolled pair), no tail; 4500 and 13500: the encoder's scans."""
    qkv = random_qkv(B, N, H, dtype, device="cuda", seed=N)
    assert_close(run(qkv, variant), attention_reference(qkv), tol(dtype, "cuda"), f"{variant} {dtype} N={N}")


@pytest.mark.gpu
@requires_hopper
@pytest.mark.parametrize("variant", list(GLUON_VARIANTS))
def test_gpu_growing_scores_and_scale(variant):
    """Key magnitudes ramping up along the sequence (the running max jumps at every block: each
    rescale of acc and l must hold; anchored: p grows far above 1), with a softmax scale other
    than 1/8."""
    N = 1000
    qkv = random_qkv(1, N, 2, torch.float16, device="cuda", seed=5)
    qkv[:, :, 1] *= torch.linspace(0.2, 3.0, N, device="cuda").view(1, N, 1, 1).to(torch.float16)
    out = flash_attention(qkv, variant=variant, sm_scale=0.2)
    assert_close(out, attention_reference(qkv, sm_scale=0.2), tol(torch.float16, "cuda"), f"{variant} ramp")


@pytest.mark.gpu
@requires_hopper
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("N", [300, 4500])
def test_gpu_anchored_redo_after_overflow(dtype, N):
    """One late key scores so far above the first key block (checked on the fp32 scores) that the
    anchored pass overflows in some rows: those programs must run again with the running max."""
    B, H = 1, 2
    qkv = random_qkv(B, N, H, dtype, device="cuda", seed=23)
    qkv[:, N - 40, 1] *= 40.0 if dtype == torch.float16 else 400.0
    q, k = qkv.float()[0, :, 0], qkv.float()[0, :, 1]
    s = torch.einsum("nhd,mhd->hnm", q, k) * HEAD_DIM ** -0.5 * LOG2E
    excess = (s.amax(-1) - s[..., :128].amax(-1)).max().item()
    assert excess > (16 if dtype == torch.float16 else 128), f"the input must overflow the anchor ({excess:.0f})"
    out = run(qkv, OVERLAP_ANCHORED)
    assert torch.isfinite(out).all(), "overflow not redone"
    assert_close(out, attention_reference(qkv), tol(dtype, "cuda"), f"anchored redo {dtype} N={N}")


@pytest.mark.gpu
@requires_hopper
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("variant", list(GLUON_VARIANTS))
def test_gpu_other_batches_and_heads_never_leak(variant):
    """NaN in batch 1 and in head 1 of batch 0: batch 0 head 0 stays exact, so neither its query
    tile (whose rows past N are batch 1's), nor its key blocks, nor its masked tail read another
    batch's keys or another head's columns; NaN in batch 0 leaves the last batch, whose tiles run
    past the end of qkv, exact."""
    B, N, H = 2, 333, 2
    qkv = random_qkv(B, N, H, torch.float16, device="cuda", seed=13)
    ref0 = attention_reference(qkv[:1])[..., :HEAD_DIM]
    ref1 = attention_reference(qkv[1:])
    leaky = qkv.clone()
    leaky[1] = float("nan")
    leaky[0, :, :, 1] = float("nan")
    out = run(leaky, variant)
    assert_close(out[:1, :, :HEAD_DIM], ref0, tol(torch.float16, "cuda"), "batch 0 head 0")
    leaky = qkv.clone()
    leaky[0] = float("nan")
    assert_close(run(leaky, variant)[1:], ref1, tol(torch.float16, "cuda"), "last batch")


@pytest.mark.gpu
@requires_hopper
def test_gpu_strided_qkv_falls_back():
    """A strided qkv (token padding) is not for this kernel: forcing it is an error, the default
    tunes over the Triton variants only."""
    B, N, H = 1, 100, 2
    buf = torch.randn(B, N, 3 * H * HEAD_DIM + 64, device="cuda", dtype=torch.bfloat16)
    qkv = buf[..., :3 * H * HEAD_DIM].view(B, N, 3, H, HEAD_DIM)
    assert not overlap_supports(qkv)
    for name in GLUON_VARIANTS:
        with pytest.raises(ValueError, match=name):
            flash_attention(qkv, variant=name)
    assert_close(run(qkv, None), attention_reference(qkv), tol(torch.bfloat16, "cuda"), "strided default")

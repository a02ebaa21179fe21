"""Flash attention over the packed qkv projection (:mod:`kernels.flash_attention`).

Every variant against :func:`attention_reference` (fp32 softmax attention of the same rounded
inputs) by ‖out − ref‖/‖ref‖. Off-GPU the kernels run under Triton's interpreter (fp32, fp16;
small heads and sequences, blocks of 16, so ragged query tiles, ragged key tails and the
unmasked main loop are all exercised); the ``gpu`` tests take the encoder's shapes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

from helpers import KERNEL_TOL, assert_close, poison_, requires_cuda, requires_triton
from brainjepa_kernels.flash_attention import (DEFAULT_VARIANTS, HEAD_DIM, INTERPRET_CONFIG, LOG2E, VARIANTS,
                                               AttnConfig, attention_reference, candidates, flash_attention)

pytestmark = requires_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CPU_DTYPES = (torch.float32, torch.float16)


def random_qkv(B: int, N: int, H: int, dtype: torch.dtype, device: str = DEVICE, seed: int = 0) -> torch.Tensor:
    """qkv [B, N, 3, H, 64] ~ N(0, 1): scores q.k / 8 have std ~1, a softmax far from uniform."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(B, N, 3, H, HEAD_DIM, generator=g).to(device=device, dtype=dtype)


def run(qkv: torch.Tensor, variant: Optional[str], **kwargs) -> torch.Tensor:
    """flash_attention into a NaN-poisoned ``out``, so a row or column the kernel skips fails."""
    B, N, _, H, D = qkv.shape
    out = poison_(torch.empty(B, N, H * D, device=qkv.device, dtype=qkv.dtype))
    result = flash_attention(qkv, out, variant=variant, **kwargs)
    assert result is out
    return out


def tol(dtype: torch.dtype, device=DEVICE) -> float:
    return KERNEL_TOL[(torch.device(device).type, dtype)]


# ---------------------------------------------------------------------------------------------
# CPU (interpreter) and GPU alike: small shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("B, N, H", [(2, 1, 2), (2, 77, 2), (1, 300, 1)])
def test_matches_reference(variant, dtype, B, N, H):
    """Ragged N: a single key (tail step only), 77 (ragged query tile and key tail), 300."""
    qkv = random_qkv(B, N, H, dtype, seed=N)
    assert_close(run(qkv, variant), attention_reference(qkv), tol(dtype), f"{variant} {dtype} N={N}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_no_ragged_tail(variant):
    """N a multiple of every block: the masked tail step is skipped (fp32, exact on CPU)."""
    qkv = random_qkv(1, 128, 2, torch.float32, seed=3)
    assert_close(run(qkv, variant), attention_reference(qkv), tol(torch.float32), variant)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("sm_scale", [0.3, 0.05])
def test_explicit_scale(variant, sm_scale):
    """A softmax scale that is not a power of two (Q_IN_REGISTERS splits it into a power of two
    applied to Q and the rest applied to the scores; the others fold all of it into exp2)."""
    qkv = random_qkv(1, 77, 2, torch.float16, seed=11)
    assert_close(run(qkv, variant, sm_scale=sm_scale), attention_reference(qkv, sm_scale=sm_scale),
                 tol(torch.float16), f"{variant} sm_scale={sm_scale}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_growing_scores_rescale(variant):
    """Key magnitudes ramp up along the sequence, so the running row max jumps again and again
    (scores up to ~20): every rescaling of acc and l must stay exact (fp32: plain fp32 on the
    CPU, 3xTF32 products on the GPU)."""
    N = 160
    qkv = random_qkv(1, N, 2, torch.float32, seed=5)
    qkv[:, :, 1] *= torch.linspace(0.2, 6.0, N, device=qkv.device).view(1, N, 1, 1)
    assert_close(run(qkv, variant), attention_reference(qkv), tol(torch.float32), variant)


ANCHORED = [name for name, spec in VARIANTS.items() if spec.anchored]


@pytest.mark.parametrize("variant", ANCHORED)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_anchored_redo_after_overflow(variant, dtype):
    """One late key scores so far above the first key block (16 keys under the interpreter, at
    most 128 on the GPU) that the anchored pass overflows (p beyond fp16's or fp32's range in some
    rows, checked here on the fp32 scores): those programs must redo the rows with the running
    max and still match the reference."""
    B, N, H = 1, 300, 2
    qkv = random_qkv(B, N, H, dtype, seed=19)
    qkv[:, 260, 1] *= 40.0 if dtype == torch.float16 else 400.0
    q, k = qkv.float()[0, :, 0], qkv.float()[0, :, 1]  # [N, H, 64]
    s = torch.einsum("nhd,mhd->hnm", q, k) * HEAD_DIM ** -0.5 * LOG2E
    block = INTERPRET_CONFIG.block_n if DEVICE == "cpu" else 128
    excess = (s.amax(-1) - s[..., :block].amax(-1)).max().item()
    assert excess > (16 if dtype == torch.float16 else 128), f"the input must overflow the anchor ({excess:.0f})"
    out = run(qkv, variant)
    assert torch.isfinite(out).all(), f"{variant}: overflow not redone"
    assert_close(out, attention_reference(qkv), tol(dtype), variant)


def test_default_variant_and_scale():
    """The public call with defaults (allocated ``out``) and an explicit softmax scale."""
    qkv = random_qkv(2, 50, 3, torch.float16, seed=7)
    out = flash_attention(qkv)
    assert out.shape == (2, 50, 3 * HEAD_DIM) and out.dtype == torch.float16
    assert_close(out, attention_reference(qkv), tol(torch.float16), "default")
    scaled = flash_attention(qkv, sm_scale=0.3)
    assert_close(scaled, attention_reference(qkv, sm_scale=0.3), tol(torch.float16), "sm_scale=0.3")
    assert (scaled.float() - out.float()).norm() > 0.1 * out.float().norm(), "sm_scale ignored"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reads_packed_layout_in_place(variant):
    """q, k, v built separately and packed as the qkv linear's output: the kernel must take slot
    0 as q, 1 as k, 2 as v and head h from columns h*64, equal to SDPA on the separate tensors,
    and read a strided view in place (token and batch padding full of NaN, never read)."""
    B, N, H = 2, 45, 3
    g = torch.Generator(device="cpu").manual_seed(11)
    q, k, v = (torch.randn(B, N, H, HEAD_DIM, generator=g).to(DEVICE) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2).reshape(B, N, H * HEAD_DIM)
    buf = torch.full((B, N + 3, 3 * H * HEAD_DIM + 8), float("nan"), device=DEVICE)
    qkv = buf[:, :N, :3 * H * HEAD_DIM].view(B, N, 3, H, HEAD_DIM)
    qkv.copy_(torch.stack([q, k, v], dim=2))
    before = buf.clone()
    assert_close(run(qkv, variant), expected, tol(torch.float32), variant)
    assert torch.equal(buf.nan_to_num(7.0), before.nan_to_num(7.0)), "qkv was modified"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on the NaN inputs
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_other_batches_and_heads_never_leak(variant):
    """NaN in batch 1 and in head 1 of batch 0 (its q, k and v): batch 0 head 0's output is
    exact and finite, so no query tile or key tail of batch 0 reads past its own N rows or
    outside its head's columns (contiguous qkv: batch 0's rows past N are batch 1's)."""
    B, N, H = 2, 37, 2
    qkv = random_qkv(B, N, H, torch.float32, seed=13)
    ref = attention_reference(qkv[:1])[..., :HEAD_DIM]
    qkv[1] = float("nan")
    qkv[0, :, :, 1] = float("nan")
    out = run(qkv, variant)
    assert_close(out[:1, :, :HEAD_DIM], ref, tol(torch.float32), variant)
    assert torch.isnan(out[1]).all() and torch.isnan(out[0, :, HEAD_DIM:]).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_last_batch_tail_stays_in_bounds(variant):
    """The last batch's ragged tiles run past the end of qkv: those rows must read as zero."""
    qkv = random_qkv(2, 21, 1, torch.float32, seed=17)
    qkv[0] = float("nan")
    out = run(qkv, variant)
    assert_close(out[1:], attention_reference(qkv[1:]), tol(torch.float32), variant)


def test_default_candidates():
    """The default tunes over the union of the default variants' configurations, each tagged
    with its variant (few enough to compile on first use); ``variant=`` narrows to one variant,
    ``configs=`` replaces the configurations."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        expected = tuple((name, cfg) for name in DEFAULT_VARIANTS for cfg in VARIANTS[name].configs_for(dtype))
        assert {"pingpong", "tma_anchored"} <= set(DEFAULT_VARIANTS) and 3 <= len(expected) <= 8
        if DEVICE == "cuda":
            assert candidates(dtype) == expected
            assert candidates(dtype, "ptr") == tuple(("ptr", cfg) for cfg in VARIANTS["ptr"].configs_for(dtype))
        else:  # the interpreter runs the first pair, untimed
            assert candidates(dtype) == tuple((name, INTERPRET_CONFIG) for name in DEFAULT_VARIANTS)
    cfg = AttnConfig(32, 32, 4, 1)
    assert candidates(torch.float16, configs=[cfg]) == tuple((name, cfg) for name in DEFAULT_VARIANTS)
    assert candidates(torch.float16, "tma", [cfg]) == (("tma", cfg),)


def test_wider_blocks():
    """Explicit ``configs`` through the default path: 32 x 32 blocks (a sub-tile pair of 64 rows)."""
    qkv = random_qkv(1, 100, 1, torch.float16, seed=19)
    out = run(qkv, None, configs=(AttnConfig(32, 32, 4, 1),))
    assert_close(out, attention_reference(qkv), tol(torch.float16), "configs=32x32")


def test_rejects_bad_inputs():
    qkv = random_qkv(1, 8, 2, torch.float32)
    with pytest.raises(ValueError, match="qkv"):
        flash_attention(qkv[..., :32].contiguous())
    with pytest.raises(ValueError, match="packed"):
        flash_attention(qkv.transpose(2, 3).contiguous().transpose(2, 3))
    with pytest.raises(TypeError):
        flash_attention(qkv.double())
    with pytest.raises(ValueError, match="out"):
        flash_attention(qkv, torch.empty(1, 8, 2 * HEAD_DIM, dtype=torch.float16, device=qkv.device))
    with pytest.raises(ValueError, match="variant"):
        flash_attention(qkv, variant="nope")


def test_tma_needs_aligned_strides():
    """A token stride of 3*H*64 + 2 elements cannot be a TMA stride; the pointer variant takes it."""
    B, N, H = 1, 9, 1
    buf = torch.randn(B, N, 3 * H * HEAD_DIM + 2, device=DEVICE)
    qkv = buf[..., :3 * H * HEAD_DIM].view(B, N, 3, H, HEAD_DIM)
    with pytest.raises(ValueError, match="TMA"):
        flash_attention(qkv, variant="tma")
    assert_close(run(qkv, "ptr"), attention_reference(qkv), tol(torch.float32), "ptr")


def test_every_variant_compiles_for_hopper(tmp_path):
    """Each variant's first bf16 and fp32 configuration compiles for sm_90 without a GPU (ptxas
    ships with Triton; ``python -m bench.attention_lab --compile-only``); the 16-bit ones spill
    nothing, and fp32 products are 3xTF32."""
    report = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "bench.attention_lab", "--compile-only", "--first-config", "--dtypes", "bf16,fp32",
           "--out", str(report)]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(report.read_text())["results"]
    assert {(row["variant"], row["dtype"]) for row in rows} == {(v, d) for v in VARIANTS for d in ("bf16", "fp32")}
    for row in rows:
        if row["dtype"] == "fp32":
            assert row["precision"] == "tf32x3", row
        else:
            assert row["stack"] == 0, row


# ---------------------------------------------------------------------------------------------
# GPU: the encoder's shapes
# ---------------------------------------------------------------------------------------------

GPU_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("B, N, H", [(2, 1, 12), (2, 77, 12), (2, 300, 12), (2, 4500, 12), (1, 13500, 2)])
def test_gpu_default_variant(dtype, B, N, H):
    """The default (tuned) variant on a standard scan (4500 tokens), a long one (13500) and
    ragged short sequences, in every dtype."""
    qkv = random_qkv(B, N, H, dtype, device="cuda", seed=N)
    assert_close(run(qkv, None), attention_reference(qkv), tol(dtype, "cuda"), f"{dtype} N={N}")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("variant, cfg", [(v, c) for v in VARIANTS for c in VARIANTS[v].configs], ids=str)
@pytest.mark.parametrize("N", [77, 4500])
def test_gpu_every_configuration_bf16(variant, cfg, N):
    """Each variant with each of its 16-bit configurations (no tuning: whichever the tuner picks
    is checked), bf16, 12 heads."""
    qkv = random_qkv(2, N, 12, torch.bfloat16, device="cuda", seed=N)
    out = run(qkv, variant, configs=(cfg,))
    assert_close(out, attention_reference(qkv), tol(torch.bfloat16, "cuda"), f"{variant} {cfg} N={N}")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gpu_every_variant_fp32(variant):
    """fp32 inputs (3xTF32 products) through each variant's fp32 configuration."""
    qkv = random_qkv(1, 333, 4, torch.float32, device="cuda", seed=1)
    out = run(qkv, variant, configs=VARIANTS[variant].configs_fp32[:1])
    assert_close(out, attention_reference(qkv), tol(torch.float32, "cuda"), variant)

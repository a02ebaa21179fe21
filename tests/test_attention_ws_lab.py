"""``bench/attention_ws_lab.py`` (FA3's two-warpgroup schedule in Gluon, a lab kernel) on a
machine without a GPU: what ptxas makes of it for sm_90, and the configurations it refuses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import requires_triton

pytestmark = requires_triton
ROOT = Path(__file__).resolve().parents[1]


def test_compiles_for_hopper_with_the_softmax_under_the_second_product():
    """Anchored with ping-pong turns, online without (two consumer warpgroups, 128-key blocks),
    and anchored with three consumers (64-key blocks): no spills; in the PTX each step issues
    S_j = Q K_j^T (4 wgmma) and O += P_{j-1} V_{j-1} (8), waits for the first only (wait_group
    1), runs the block's exponentials (64 a thread, 66 with the rescale factors), then waits for
    the second; in the SASS every exponential of a step still comes before that wait (the
    version with P in registers had 0-6 of 64 there) and ptxas did not serialize the wgmmas (one
    wait after each: its message C7513, met by that version too); the consumers run at 232 (two)
    or 160 (three) registers and more, the producer at 24."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "bench.attention_ws_lab", "--compile-only", "--configs", "128s3ap", "128s3",
           "64s4apc3"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    anchored, online, three = (json.loads(line) for line in proc.stdout.strip().splitlines()[-3:])
    for row, waits, products, exps, regs in ((anchored, "mbar.waitx2", "mmax4 commit mmax8", 64, "inc 232"),
                                            (online, "mbar.wait", "mmax4 commit mmax8", 66, "inc 232"),
                                            (three, "mbar.waitx2", "mmax4 commit mmax4", 32, "inc 160")):
        assert row["stack"] == 0, row
        assert f"{waits} {products} commit wait1 ex2x{exps} wait0" in row["sequence"], row
        assert row["depbar"] * 4 <= row["hgmma"], row
        assert row["exps_under_pv"] and min(row["exps_under_pv"]) >= exps, row
        assert {regs, "dec 24"} <= set(row["setmaxnreg"]), row


def test_rejects_what_it_cannot_run():
    from bench.attention_ws_lab import kernel_args, parse_config

    assert parse_config("64s4ap") == dict(block_n=64, stages=4, anchored=True, pingpong=True, consumers=2)
    assert parse_config("128s2c3") == dict(block_n=128, stages=2, anchored=False, pingpong=False, consumers=3)
    with pytest.raises(ValueError, match="BLOCK_NsSTAGES"):
        parse_config("96s3")
    qkv = torch.randn(1, 10, 3, 2, 64)
    with pytest.raises(ValueError, match="fp16/bf16"):
        kernel_args(qkv, torch.empty(1, 10, 128))
    with pytest.raises(ValueError, match="block_n 64 or 128"):
        kernel_args(qkv.half(), torch.empty(1, 10, 128, dtype=torch.float16), block_n=32)
    with pytest.raises(ValueError, match="consumers 2 or 3"):
        kernel_args(qkv.half(), torch.empty(1, 10, 128, dtype=torch.float16), consumers=4)


def test_variant_ab_lab_arm_replaces_and_restores_flash_attention(monkeypatch):
    """``bench.variant_ab``'s arm ``lab:SPEC`` runs the encoder's attention with this lab kernel
    (the runner looks ``flash_attention`` up at every eager call); the next arm gets the
    package's function back; a malformed arm is refused."""
    import brainjepa_fast.triton_backend as triton_backend
    import brainjepa_kernels.flash_attention as fa
    import brainjepa_kernels.matmul_hopper as matmul_hopper
    from bench import variant_ab

    # set_arm changes these module settings: monkeypatch puts them back after the test.
    for module, name in ((fa, "flash_attention"), (fa, "DEFAULT_VARIANTS"), (fa, "DEFAULT_GLUON_VARIANTS"),
                         (matmul_hopper, "OFFERED"), (triton_backend, "CHUNK_STATS")):
        monkeypatch.setattr(module, name, getattr(module, name))

    class NoRunner:
        _triton_runner = None

    variant_ab.set_arm(NoRunner(), ("lab:64s4apc3",), "triton")
    assert fa.flash_attention is not variant_ab.FLASH_ATTENTION
    with pytest.raises(ValueError, match="fp16/bf16"):  # the lab's launcher checks the input
        fa.flash_attention(torch.randn(1, 10, 3, 2, 64))
    variant_ab.set_arm(NoRunner(), ("pingpong",), "triton")
    assert fa.flash_attention is variant_ab.FLASH_ATTENTION and fa.DEFAULT_VARIANTS == ("pingpong",)
    for bad in (("lab:64s9x",), ("lab:128s3ap", "pingpong"), ("nonesuch",)):
        with pytest.raises(SystemExit, match="--arms"):
            variant_ab.set_arm(NoRunner(), bad, "triton")

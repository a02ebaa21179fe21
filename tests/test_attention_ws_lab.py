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

"""bench/gluon_attention_lab.py: the Gluon attention lab compiles for sm_90 (no GPU needed) with
the overlap it exists for. Its results and speed are checked by the lab itself on a GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import requires_triton

pytestmark = requires_triton


def test_compiles_for_hopper_with_scores_in_flight_during_the_softmax():
    """One configuration, compiled by ptxas for sm_90: no spills, and in the main loop the next
    block's q k^T wgmma is committed before the softmax's exponentials and waited for only after
    them (``wait_group 1``), the PTX order Triton source does not give."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "bench.gluon_attention_lab", "--compile-only", "--configs", "128x3"]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["stack"] == 0, row
    assert "mmax4 commit ex2x34 wait1 mmax4 commit wait1" in row["sequence"], row

"""The whole encoder per backend and precision (one benchmark group per device and workload).

    pytest bench/test_bench_encoder.py --benchmark-save=NAME

CUDA: B=8 standard scans (450 x 160 -> 4500 tokens): torch fp32 / bf16 (SDPA), triton bf16 /
fp16 / fp32 (our kernels; fp32 with 3xTF32 products). CPU: the torch backend only, fp32 and bf16, at
B=1 and 32 frames (900 tokens) so it finishes in seconds; the triton cases are skipped.
For accuracy against the fp32 reference and the original code path, run ``python -m bench.compare``.
"""
from __future__ import annotations

import pytest
import torch

from bench.compare import flops_per_sample, tokens_for

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
BATCH, FRAMES = (8, 160) if HAS_CUDA else (1, 32)
ROUNDS, WARMUP = (10, 3) if HAS_CUDA else (3, 1)
CASES = [("torch", "fp32"), ("torch", "bf16"), ("triton", "bf16"), ("triton", "fp16"), ("triton", "fp32")]


@pytest.mark.parametrize("backend,precision", CASES, ids=[f"{b}-{p}" for b, p in CASES])
def test_encoder(timed, benchmark, random_checkpoint, backend, precision):
    import brainjepa_fast
    from brainjepa_fast.config import parse_precision

    if backend == "triton" and not HAS_CUDA:
        pytest.skip("the Triton backend needs a CUDA GPU")
    benchmark.group = f"encoder {DEVICE.type} B={BATCH} T={FRAMES} ({tokens_for(FRAMES)} tokens)"
    enc = brainjepa_fast.load(random_checkpoint, device=DEVICE, dtype=parse_precision(precision), backend=backend)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 1, 450, FRAMES, generator=gen).to(DEVICE)
    out = timed(lambda: enc(x), device=DEVICE, rounds=ROUNDS, warmup_rounds=WARMUP,
                flops=flops_per_sample(tokens_for(FRAMES)) * BATCH, backend=backend, precision=precision,
                batch=BATCH, frames=FRAMES)
    assert out.shape == (BATCH, tokens_for(FRAMES), 768)
    assert torch.isfinite(out).all()

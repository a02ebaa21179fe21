"""The whole encoder on ``backend="triton"`` against the fp32 PyTorch reference (GPU only).

CPU coverage of the same code path: ``test_triton_runner_under_interpreter`` runs the kernel
sequence of :mod:`brainjepa_fast.triton_backend` under Triton's interpreter on a small scan.
"""
from __future__ import annotations

import pytest
import torch

import brainjepa_fast as bj
from brainjepa_fast.config import ENCODER_TOLERANCE
from brainjepa_fast import triton_backend
from brainjepa_fast.triton_backend import TritonRunner
from helpers import HAS_CUDA, assert_close, requires_cuda, requires_triton, scratch_checkpoint

PRECISION = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
ENCODER_TOL = {dtype: ENCODER_TOLERANCE["triton", name] for dtype, name in PRECISION.items()}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    with scratch_checkpoint(tmp_path_factory, "base.safetensors", seed=21, perturb=0.02) as path:
        yield path


@requires_triton
@pytest.mark.skipif(HAS_CUDA, reason="the interpreter variant is for CPU-only machines")
def test_triton_runner_under_interpreter(tmp_path):
    """Kernel sequence (patch embed, fused LN+linear, attention, residual linears, final LN) in
    fp32 under the interpreter, vit_small on a 2-patch scan, against the torch path."""
    path = bj.save_random_checkpoint(tmp_path / "s.safetensors", seed=4, variant="vit_small", perturb=0.02)
    enc = bj.load(path, device="cpu", backend="torch")
    del enc.blocks[2:]  # two blocks keep the interpreter run short; the sequence is per block
    x = torch.randn(2, 1, 450, 32)
    with torch.inference_mode():
        ref = enc(x)
        plan = TritonRunner().plan(enc, n_t=2)
        out = TritonRunner.run(plan, x, enc.config.num_heads)
    assert_close(out, ref, 1e-4, "interpreted encoder")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("batch,chunk_stats", [(1, False), (3, False), (1, True), (3, True)])
def test_encoder_matches_fp32_reference(ckpt, dtype, batch, chunk_stats, monkeypatch):
    """Both ways of getting the LayerNorm statistics (row_stats; on Hopper in fp16/bf16, chunks
    from the residual epilogues, forced at these batch sizes), eager then replayed."""
    monkeypatch.setattr(triton_backend, "CHUNK_STATS_MIN_ROWS", 0 if chunk_stats else 1 << 62)
    torch.manual_seed(batch)
    x = torch.randn(batch, 1, 450, 160, device="cuda")
    ref = bj.encode(x, bj.load(ckpt, device="cuda", backend="torch"))
    enc = bj.load(ckpt, device="cuda", dtype=dtype, backend="triton")
    assert enc.backend == "triton"
    out = bj.encode(x, enc)  # first call: eager + graph capture; second: replay
    out2 = bj.encode(x, enc)
    err = assert_close(out.float(), ref, ENCODER_TOL[dtype], f"triton {dtype} B={batch}")
    assert torch.equal(out, out2), "graph replay differs from the first run"
    print(f"encoder triton {dtype} B={batch} chunk_stats={chunk_stats}: rel err {err:.2e}")


@pytest.mark.gpu
@requires_cuda
def test_long_scan_and_new_weights(ckpt):
    """T=480 (13500 tokens) and a weight update after the first call (the plan must rebuild)."""
    enc = bj.load(ckpt, device="cuda", dtype=torch.bfloat16, backend="triton")
    x = torch.randn(1, 1, 450, 480, device="cuda")
    ref_enc = bj.load(ckpt, device="cuda", backend="torch")
    assert_close(bj.encode(x, enc).float(), bj.encode(x, ref_enc), ENCODER_TOL[torch.bfloat16], "T=480")
    with torch.no_grad():
        for e in (enc, ref_enc):
            e.blocks[0].mlp.fc1.weight.mul_(1.5)
            e.norm.bias.add_(0.1)
    assert_close(bj.encode(x, enc).float(), bj.encode(x, ref_enc), ENCODER_TOL[torch.bfloat16], "after update")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("batch", [1, 9])  # CUDA-graph replay, and eager launches (B > 8)
def test_encoder_on_a_second_gpu(ckpt, batch):
    """Kernels, tuning and graph capture run on the input's GPU while the current device is 0,
    also after a capture on GPU 0 (which puts ``torch.cuda.graph``'s process-wide default capture
    stream there: reusing it made the encoder launch on GPU 0 with GPU 1's tensors)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ones(8, device="cuda:0").mul_(2)
    torch.manual_seed(batch)
    x = torch.randn(batch, 1, 450, 160, device="cuda:1")
    ref = bj.encode(x, bj.load(ckpt, device="cuda:1", backend="torch"))
    enc = bj.load(ckpt, device="cuda:1", dtype=torch.bfloat16, backend="triton")
    assert torch.cuda.current_device() == 0
    for call in ("first", "second"):
        out = bj.encode(x, enc)
        assert out.device == x.device
        assert_close(out.float(), ref, ENCODER_TOL[torch.bfloat16], f"cuda:1 B={batch}, {call} call")


@pytest.mark.gpu
@requires_cuda
def test_peak_memory_not_above_eager_sdpa(ckpt):
    """Steady-state peak at B=8 bf16: everything resident (weights, folded weights, graph pool,
    input, output) plus the activations of one call, measured from before the load. The first
    call (compilation, tuning, capture) is a one-off and runs before the measured call."""
    x = torch.randn(8, 1, 450, 160, device="cuda")
    peaks = {}
    for backend in ("torch", "triton"):
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        enc = bj.load(ckpt, device="cuda", dtype=torch.bfloat16, backend=backend)
        out = bj.encode(x, enc)
        del out
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out = bj.encode(x, enc)
        torch.cuda.synchronize()
        peaks[backend] = torch.cuda.max_memory_allocated() - base
        del enc, out
    print(f"peak memory B=8 bf16 (GiB): { {k: round(v / 2**30, 3) for k, v in peaks.items()} }")
    assert peaks["triton"] <= peaks["torch"]


@pytest.mark.gpu
@requires_cuda
def test_batch_64_runs(ckpt):
    enc = bj.load(ckpt, device="cuda", dtype=torch.bfloat16, backend="triton")
    out = bj.encode(torch.randn(64, 450, 160, device="cuda"), enc)
    assert out.shape == (64, 4500, 768) and torch.isfinite(out).all()


@pytest.mark.gpu
@requires_cuda
def test_autograd_falls_back_to_torch_on_auto(ckpt):
    enc = bj.load(ckpt, device="cuda", dtype=torch.bfloat16, backend="auto")
    assert enc.backend == "triton"
    out = enc(torch.randn(1, 1, 450, 32, device="cuda"))
    assert out.requires_grad  # the differentiable path ran
    enc.set_backend("triton")
    with pytest.raises(bj.ConfigError, match="inference-only"):
        enc(torch.randn(1, 1, 450, 32, device="cuda"))


@requires_triton
def test_plan_rebuilds_on_any_parameter_change():
    """The prepared weights are reused while nothing changed, and rebuilt after an in-place
    update of any parameter or the replacement of a parameter object (CPU: no kernels run)."""
    enc = bj.Encoder("vit_small")
    runner = TritonRunner()
    plan = runner.plan(enc, 10)
    assert runner.plan(enc, 10) is plan
    with torch.no_grad():
        enc.blocks[3].mlp.fc1.weight.add_(1.0)
    updated = runner.plan(enc, 10)
    assert updated is not plan
    assert torch.equal(updated.blocks[3].fc1.weight, (enc.blocks[3].mlp.fc1.weight * enc.blocks[3].norm2.weight))
    enc.blocks[0].attn.proj.weight = torch.nn.Parameter(enc.blocks[0].attn.proj.weight + 1.0)
    replaced = runner.plan(enc, 10)
    assert replaced is not updated and replaced.blocks[0].proj_w is enc.blocks[0].attn.proj.weight

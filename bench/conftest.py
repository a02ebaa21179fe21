"""Shared fixtures of the pytest-benchmark suites in ``bench/``.

    pytest bench/ --benchmark-save=NAME          # run and save under .benchmarks/
    pytest bench/ --benchmark-compare            # run and compare with the latest saved run

The default ``pytest`` run (``testpaths = ["tests"]``) does not collect these files. Every timed
call ends with ``torch.cuda.synchronize()``, so pytest-benchmark's wall clock sees the GPU work,
not just the kernel launches.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import pytest
import torch


def synchronised(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """``fn`` followed by a device synchronisation (a no-op on the CPU)."""
    if device.type != "cuda":
        return fn

    def call() -> Any:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return call


@pytest.fixture
def timed(benchmark):
    """``timed(fn, device=..., rounds=..., warmup_rounds=..., flops=..., bytes_moved=..., **info)``:
    time ``fn()`` with ``benchmark.pedantic`` (one call per round, synchronised) and record
    ``info`` plus TFLOP/s and GB/s of the median round in ``extra_info``. Returns ``fn``'s result."""

    def run(fn: Callable[[], Any], *, device: torch.device, rounds: int, warmup_rounds: int,
            flops: Optional[float] = None, bytes_moved: Optional[float] = None, **info: Any) -> Any:
        with torch.inference_mode():
            result = benchmark.pedantic(synchronised(fn, device), rounds=rounds, warmup_rounds=warmup_rounds,
                                        iterations=1)
        benchmark.extra_info.update({k: str(v) if isinstance(v, torch.dtype) else v for k, v in info.items()})
        benchmark.extra_info["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        median = getattr(stats, "median", None)
        if flops is not None:
            benchmark.extra_info["flops"] = flops
            if median:
                benchmark.extra_info["tflops_median"] = float(f"{flops / median / 1e12:.4g}")
        if bytes_moved is not None:
            benchmark.extra_info["bytes"] = bytes_moved
            if median:
                benchmark.extra_info["gbps_median"] = float(f"{bytes_moved / median / 1e9:.4g}")
        return result

    return run


@pytest.fixture(scope="session", autouse=True)
def exact_fp32():
    """fp32 PyTorch baselines in true fp32 (no TF32), as in ``bench.compare``."""
    from bench.compare import use_exact_fp32

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    use_exact_fp32()
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_float32_matmul_precision(saved[2])


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory):
    """A seeded random vit_base checkpoint (the published layout), written once per session."""
    from brainjepa_fast import save_random_checkpoint

    return save_random_checkpoint(tmp_path_factory.mktemp("bench") / "random.safetensors", 0, perturb=0.02)


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record the GPU, driver and library versions with every saved run (``--benchmark-save``).

    Only what stays the same between runs on one machine: pytest-benchmark warns when a compared
    run's machine_info differs (the commit is in its own ``commit_info``)."""
    from bench.compare import capture_environment

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = capture_environment(device)
    stable = ("device_name", "driver", "cuda", "cudnn", "torch", "triton", "numpy", "python", "cpu",
              "cpu_threads", "gpu_memory_gib", "compute_capability")
    machine_info["brainjepa_bench"] = {k: env[k] for k in stable if k in env}

"""Why attention is slower inside the encoder than in the labs (GPU): the same kernel, timed on
different inputs and after different kernels, with the SM clock sampled.

    python -m bench.attention_context [--batch 8] [--layers 0 6 11] [--wave-batches 6 7 8 9] [--out PATH]

Session 10's profile gave attention 438 TFLOP/s inside the bf16 encoder at B=8 (1703 us per
scan) where the labs time the tuned ``flash_attention`` at 468 on random inputs of the same
shape, on the same kind of card: 108 us per scan, the whole gap to the 3.0 ms goal. This script
separates the candidate causes, in one process on one card:

* inputs: the qkv the encoder computes (captured at ``--layers`` from an eager call on a seeded
  random checkpoint) against ``torch.randn`` of the same shape, and ``randn`` scaled to the
  captured tensor's standard deviation (data-dependent power, hence clock);
* neighbours: attention alone, replayed back to back (the labs' method) against attention
  replayed after a cuBLAS matmul of the qkv projection's size in the same graph (the encoder's
  order: the matmul's power draw may leave the clock low when attention starts);
* configurations: the tuner's pick and each candidate of the same variants, per input;
* partial last waves: the pick's rate on random inputs at batch sizes around B.

Every kernel timing is a replayed CUDA graph (median, ``graph_time_ms``); while each runs,
``nvidia-smi`` samples the SM clock and power every 20 ms (median reported). The encoder is timed
over 30 calls (``bench.compare.time_forward``: its own graph replays, CUDA events, median) with
the clock sampled the same way.
Output: one line per measurement and a JSON file.

What it showed (session 11, H100, ``bench/results/2026-11-27-s11/run1/``): the card sat at its
power cap (688-700 W) in every measurement, and attention ran at ~1830 MHz alone but the encoder
at ~1755 (the matmuls at ~1440): the gap is the clock, not the inputs (real activations were
faster than ``randn``) or the preceding matmul. The batch-size sweep did not isolate partial
waves: the clock moved by more (1575-1815 MHz) than any wave effect.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

import brainjepa_fast as bj
import brainjepa_kernels.flash_attention as fa
from bench.attention_lab import HEAD_DIM, HEADS
from bench.compare import time_forward
from bench.linear_lab import TOKENS_PER_SCAN as TOKENS
from brainjepa_kernels._runtime import _TUNED, graph_time_ms


@contextmanager
def sampled_clock(samples: list) -> Iterator[None]:
    """Append (SM clock MHz, power W) pairs sampled by ``nvidia-smi`` every 20 ms while the block
    runs (nothing when nvidia-smi is missing)."""
    try:
        proc = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                                 "-lms", "20"], stdout=subprocess.PIPE, text=True)
    except FileNotFoundError:
        yield
        return
    try:
        yield
    finally:
        proc.terminate()
        out, _ = proc.communicate()
        for line in out.splitlines():
            parts = [p.strip() for p in line.split(",")]
            try:
                samples.append((float(parts[0]), float(parts[1])))
            except (ValueError, IndexError):
                continue


def median_of(samples: list, i: int) -> Optional[float]:
    """Median of field ``i`` (0: SM clock, 1: power) of :func:`sampled_clock`'s samples, or None."""
    return statistics.median(sample[i] for sample in samples) if samples else None


def timed(fn: Callable[[], object], label: str, flop: float, rows: list, **extra) -> float:
    """``graph_time_ms`` of ``fn`` (stretched to ~300 ms of replays so that the clock samples
    cover it), printed and recorded with the median SM clock and power during it."""
    samples: list = []
    with sampled_clock(samples):
        ms = graph_time_ms(fn, rep_ms=300.0)
    clock, power = median_of(samples, 0), median_of(samples, 1)
    row = dict(label=label, ms=ms, tflops=flop / ms / 1e9 if flop else None, sm_mhz=clock, power_w=power, **extra)
    rows.append(row)
    rate = f"{row['tflops']:6.1f} TFLOP/s" if flop else " " * 14
    print(f"{label:58s} {ms:8.4f} ms {rate}  SM {clock} MHz  {power} W", flush=True)
    return ms


def capture_qkv(enc: bj.Encoder, x: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """The qkv [B, N, 3, H, 64] that ``flash_attention`` receives at each of ``layers`` during one
    eager call of the Triton encoder (graphs off for that call; the tuners pick on it)."""
    seen: dict[int, torch.Tensor] = {}
    calls = [0]
    original = fa.flash_attention

    def recording(qkv: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if calls[0] in layers:
            seen[calls[0]] = qkv.clone()
        calls[0] += 1
        return original(qkv, *args, **kwargs)

    fa.flash_attention = recording
    try:
        enc(x)  # builds the runner
        runner = enc._triton_runner
        runner.use_cuda_graphs, graphs = False, runner.use_cuda_graphs
        calls[0] = 0
        enc(x)
        runner.use_cuda_graphs = graphs
    finally:
        fa.flash_attention = original
    torch.cuda.synchronize()
    return seen


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--layers", type=int, nargs="+", default=[0, 6, 11])
    p.add_argument("--wave-batches", type=int, nargs="+", default=[4, 6, 7, 8, 9, 10, 11, 12])
    p.add_argument("--out", type=Path, default=Path("bench/results/attention_context.json"))
    args = p.parse_args(argv)
    B = args.batch
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "base.safetensors"
        bj.save_random_checkpoint(ckpt, seed=0)
        enc = bj.load(ckpt, device="cuda", dtype=torch.bfloat16, backend="triton")
    x = torch.randn(B, 1, 450, 160, device="cuda", generator=torch.Generator("cuda").manual_seed(B))
    rows: list = []
    with torch.inference_mode():
        captured = capture_qkv(enc, x, args.layers)
        pick = next(v for k, v in _TUNED.items() if k[0] == "flash_attention" and k[1] == B)
        print(f"tuner's pick for B={B}: {pick}", flush=True)
        enc(x)  # captures the graph
        samples: list = []
        with sampled_clock(samples):  # one untimed replay, then 30 timed
            ms = statistics.median(time_forward(enc, x, warmup=1, reps=30).times_ms)
        clock = median_of(samples, 0)
        rows.append(dict(label="encoder", ms=ms, ms_per_scan=ms / B, sm_mhz=clock))
        print(f"encoder B={B}: {ms / B:.3f} ms per scan (30 calls, median)  SM {clock} MHz", flush=True)

        attn_flop = 4 * B * HEADS * TOKENS ** 2 * HEAD_DIM
        inputs = {f"layer {i} qkv": q for i, q in sorted(captured.items())}
        ref = captured[min(captured)]
        gen = torch.Generator("cuda").manual_seed(1)
        inputs["randn"] = torch.randn(ref.shape, device="cuda", dtype=ref.dtype, generator=gen)
        inputs["randn x layer-0 std"] = (torch.randn(ref.shape, device="cuda", generator=gen)
                                         * ref.float().std()).to(ref.dtype)
        for name, q in inputs.items():
            print(f"{name}: std {q.float().std():.3f}, |max| {q.float().abs().max():.2f}", flush=True)
        out = torch.empty(B, TOKENS, HEADS * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        variant, cfg = pick
        pairs = [pick] + [pr for pr in fa.candidates(torch.bfloat16, overlap=fa.overlap_supports(ref))
                          if pr != pick and pr[0] == variant]
        for name, q in inputs.items():
            for var, c in pairs:
                timed(lambda: fa.launch(q, out, c, var), f"attention {name}: {var} {c.block_m}x{c.block_n}",
                      attn_flop, rows, input=name, variant=var, config=str(c))

        # The encoder's neighbour: the qkv projection's matmul (cuBLAS, same size) before attention.
        a = torch.randn(B * TOKENS, 768, device="cuda", dtype=torch.bfloat16, generator=gen)
        w = torch.randn(768, 3 * 768, device="cuda", dtype=torch.bfloat16, generator=gen) / 28.0
        mm_out = torch.empty(B * TOKENS, 3 * 768, device="cuda", dtype=torch.bfloat16)
        mm_flop = 2 * B * TOKENS * 768 * 3 * 768
        t_mm = timed(lambda: torch.mm(a, w, out=mm_out), "cuBLAS qkv-sized matmul alone", mm_flop, rows)
        t_both = timed(lambda: (torch.mm(a, w, out=mm_out), fa.launch(ref, out, cfg, variant)),
                       "matmul then attention (layer-0 qkv), same graph", 0.0, rows)
        t_attn = timed(lambda: fa.launch(ref, out, cfg, variant), "attention (layer-0 qkv) alone again", attn_flop,
                       rows)
        print(f"attention after the matmul: {t_both - t_mm:.4f} ms ({attn_flop / (t_both - t_mm) / 1e9:.1f} TFLOP/s) "
              f"against {t_attn:.4f} alone", flush=True)

        # Partial last waves: the pick's rate on randn inputs at batch sizes around B.
        for b in args.wave_batches:
            q = torch.randn(b, TOKENS, 3, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
            o = torch.empty(b, TOKENS, HEADS * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            timed(lambda: fa.launch(q, o, cfg, variant), f"attention randn B={b}: {variant} {cfg.block_m}x{cfg.block_n}",
                  4 * b * HEADS * TOKENS ** 2 * HEAD_DIM, rows, input="randn", batch=b)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, batch=B, pick=str(pick),
                date=time.strftime("%Y-%m-%d"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One kernel of the encoder, launched twice at the B=8 shape: a target for Nsight Compute.

    ncu -k regex:_attn_fwd -s 1 -c 1 ... python -m bench.ncu_target attention pingpong_anchored:64x64w4s3r168
    ncu -k regex:_ln_linear -s 1 -c 1 ... python -m bench.ncu_target fc1 128x256x64s3w8sub
    ncu -k regex:_matmul_ws -s 1 -c 1 ... python -m bench.ncu_target fc1 ws128x128x64s4
    ncu -k regex:_matmul_ws -s 1 -c 1 ... python -m bench.ncu_target qkv ws128x128x64s4
    ncu -k regex:_attn_fwd_ws -s 1 -c 1 ... python -m bench.ncu_target attention-ws 128s3ap

The first launch compiles (skip it with ``-s 1``), the second is the one to profile. Inputs are
fresh random bf16 tensors of the shapes the encoder runs at B=8 (qkv [8, 4500, 3, 12, 64]; the
fc1 matmul [36000, 768] -> [36000, 3072] with its LayerNorm folded and the erf GELU; qkv the
same without the GELU, to 2304 columns; attention-ws the FA3-schedule lab of
``bench.attention_ws_lab``).
"""
from __future__ import annotations

import sys

import torch

from bench.attention_lab import parse_extra, random_qkv
from brainjepa_kernels._runtime import MatmulConfig
from brainjepa_kernels.flash_attention import launch
from brainjepa_kernels.layernorm_linear import fold_layernorm, layernorm_linear_folded
from brainjepa_kernels.matmul_hopper import WsConfig


def matmul_config(spec: str):
    """``BMxBNxBKsSwW[sub]`` (Triton kernel), e.g. ``128x256x64s3w8sub``, or ``wsBMxBNxBKsS``
    (the Gluon kernel of ``kernels.matmul_hopper``), e.g. ``ws128x128x64s4``."""
    if spec.startswith("ws"):
        tile, stages = spec[2:].split("s")
        bm, bn, bk = map(int, tile.split("x"))
        return WsConfig(bm, bn, bk, int(stages))
    tile, rest = spec.split("s", 1)
    stages, rest = rest.split("w", 1)
    bm, bn, bk = map(int, tile.split("x"))
    warps = int(rest.replace("sub", ""))
    return MatmulConfig(bm, bn, bk, int(stages), warps, subtile=rest.endswith("sub"))


def main(argv: list[str]) -> int:
    op, spec = argv
    gen = torch.Generator("cuda").manual_seed(0)
    if op == "attention":
        variant, cfg = parse_extra(spec)
        qkv = random_qkv(8, 4500, torch.bfloat16)
        out = torch.empty(8, 4500, 768, device="cuda", dtype=torch.bfloat16)
        for _ in range(2):
            launch(qkv, out, cfg, variant)
    elif op == "attention-ws":
        from bench.attention_ws_lab import attention_ws, parse_config

        qkv = random_qkv(8, 4500, torch.bfloat16)
        out = torch.empty(8, 4500, 768, device="cuda", dtype=torch.bfloat16)
        for _ in range(2):
            attention_ws(qkv, **parse_config(spec), out=out)
    elif op in ("fc1", "qkv"):
        n_out = 3072 if op == "fc1" else 2304
        x = torch.randn(36000, 768, device="cuda", generator=gen).to(torch.bfloat16)
        w = torch.randn(n_out, 768, device="cuda", generator=gen) * 768 ** -0.5
        folded = fold_layernorm(torch.rand(768, device="cuda", generator=gen) + 0.5,
                                torch.randn(768, device="cuda", generator=gen) * 0.1, w,
                                torch.randn(n_out, device="cuda", generator=gen) * 0.1, torch.bfloat16)
        for _ in range(2):
            layernorm_linear_folded(x, folded, activation="gelu" if op == "fc1" else None,
                                    configs=[matmul_config(spec)])
    else:
        raise SystemExit(f"op: expected attention, attention-ws, fc1 or qkv, got {op!r}")
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

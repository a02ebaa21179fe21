"""Lab (not part of the package): attention in Gluon with the score product of the next key block
in flight during this block's softmax, the overlap Triton source cannot express.

    python -m bench.gluon_attention_lab                  # GPU: check, then time against flash_attention
    python -m bench.gluon_attention_lab --compile-only   # any machine: sm_90 compile, registers, PTX waits

Status: written and compiled for sm_90 offline (session 4, 2026-11-27); NOT yet run on a GPU, so
neither its results nor its speed are known. ``--compile-only`` prints the order of wgmma issues,
waits and exponentials in the main loop, the thing to check before spending device time.

Why: the Triton kernel (``kernels/flash_attention.py``) computes ``s = q k^T`` for a key block and
waits for it before the softmax (``wgmma.wait_group 0``); the softmax's ~34 ``ex2`` per thread and
its FMAs then run while the tensor cores idle, unless another program on the SM fills them. Here
each iteration j issues ``S_{j+1} = Q K_{j+1}^T`` asynchronously, runs the softmax of ``S_j``, then
issues ``O += P_j V_j`` and waits only for ``S_{j+1}`` (``warpgroup_mma_wait(1)``): FA3's
intra-warpgroup pipelining, written with Gluon's explicit ``warpgroup_mma(..., is_async=True)``.

Layout: qkv [B, N, 3, H, 64] contiguous, read as the matrix [B*N, 3*H*64] through TMA for Q and the
full key blocks (those never cross into the next batch); the ragged last key block is read with
masked loads (zeros past N), so no other batch's keys or values are ever multiplied. Output rows
past N are not stored. BLOCK_N = 64, so the score and output accumulators share one wgmma layout.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Optional

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_init, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from brainjepa_kernels.flash_attention import HEAD_DIM, LOG2E

BLOCK_N = 64


@gluon.jit
def _softmax_update(s, m_i, l_i, qk_scale):
    """Online-softmax bookkeeping for raw scores s [BM, BN] (fp32): returns (p, alpha, m, l)."""
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
    l_new = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_new


@gluon.jit
def _attn_fwd_overlap(q_desc, kv_desc, qkv_ptr, out_ptr, qk_scale, N, H,
                      BLOCK_M: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    """out[b, rows, h*64:(h+1)*64] for the BLOCK_M query rows of program (b, h, pid_m) (numbered
    head by head, as the Triton kernel). q_desc / kv_desc: TMA descriptors over qkv as
    [B*N, 3*H*64] with boxes [BLOCK_M, 64] / [64, 64]; qkv_ptr the same matrix; out_ptr
    [B*N, H*64]. BLOCK_M = 16 * num_warps (each warpgroup owns 64 rows). K/V blocks cycle through
    STAGES >= 3 shared-memory slots (slot of block i: i % STAGES, barrier phase (i // STAGES) & 1)."""
    D: gl.constexpr = 64
    BN: gl.constexpr = 64
    gl.static_assert(STAGES >= 3, "slot of block j - 1 is refilled while block j + 1 is read")
    dtype: gl.constexpr = q_desc.dtype
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BN, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    rows_of: gl.constexpr = gl.SliceLayout(1, mma)
    cols_of: gl.constexpr = gl.SliceLayout(0, mma)
    ld: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8],
                                        warps_per_cta=[num_warps, 1], order=[1, 0])

    n_m = gl.cdiv(N, BLOCK_M)
    pid = gl.program_id(0)
    pid_m = pid % n_m
    b = pid // n_m // H
    h = pid // n_m % H
    row0 = pid_m * BLOCK_M
    base = b * N  # first row of batch b in the [B*N, 3*H*D] matrix
    q_col = h * D
    k_col = (H + h) * D
    v_col = (2 * H + h) * D

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, D], kv_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, D], kv_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(kv_bar.index(i), count=1)

    n_full = N // BN
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [base + row0, q_col], q_bar, q_smem)
    for i in gl.static_range(STAGES):
        ok = i < n_full
        mbarrier.expect(kv_bar.index(i), 2 * kv_desc.block_type.nbytes, pred=ok)
        tma.async_copy_global_to_shared(kv_desc, [base + i * BN, k_col], kv_bar.index(i), k_smem.index(i), pred=ok)
        tma.async_copy_global_to_shared(kv_desc, [base + i * BN, v_col], kv_bar.index(i), v_smem.index(i), pred=ok)

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=rows_of)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=rows_of)
    acc = gl.zeros([BLOCK_M, D], gl.float32, layout=mma)
    mbarrier.wait(q_bar, 0)

    if n_full > 0:
        mbarrier.wait(kv_bar.index(0), 0)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), gl.zeros([BLOCK_M, BN], gl.float32, layout=mma),
                          use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s, ))
        acc = warpgroup_mma_init(acc)  # loop-carried as an in-flight accumulator
        for j in range(0, n_full - 1):
            nxt = (j + 1) % STAGES
            mbarrier.wait(kv_bar.index(nxt), ((j + 1) // STAGES) & 1)
            s_next = warpgroup_mma(q_smem, k_smem.index(nxt).permute((1, 0)),
                                   gl.zeros([BLOCK_M, BN], gl.float32, layout=mma), use_acc=False, is_async=True)
            p, alpha, m_i, l_i = _softmax_update(s, m_i, l_i, qk_scale)
            acc = warpgroup_mma_wait(1, deps=(acc, ))  # P_{j-1} V_{j-1} done (issued before s_next)
            # Its slot (block j - 1) is free: load block j - 1 + STAGES into it.
            refill = j - 1 + STAGES
            ok = (j >= 1) & (refill < n_full)
            slot = refill % STAGES
            mbarrier.expect(kv_bar.index(slot), 2 * kv_desc.block_type.nbytes, pred=ok)
            tma.async_copy_global_to_shared(kv_desc, [base + refill * BN, k_col], kv_bar.index(slot),
                                            k_smem.index(slot), pred=ok)
            tma.async_copy_global_to_shared(kv_desc, [base + refill * BN, v_col], kv_bar.index(slot),
                                            v_smem.index(slot), pred=ok)
            acc = acc * gl.expand_dims(alpha, 1)
            acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_smem.index(j % STAGES), acc,
                                is_async=True)
            s = warpgroup_mma_wait(1, deps=(s_next, ))  # S_{j+1} done; P_j V_j may still run
        last = n_full - 1
        p, alpha, m_i, l_i = _softmax_update(s, m_i, l_i, qk_scale)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        acc = acc * gl.expand_dims(alpha, 1)
        acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_smem.index(last % STAGES), acc,
                            is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc, ))

    n_main = n_full * BN
    if n_main < N:  # ragged last key block: masked loads, zeros past N
        k_tail = gl.allocate_shared_memory(dtype, [BN, D], kv_desc.layout)
        v_tail = gl.allocate_shared_memory(dtype, [BN, D], kv_desc.layout)
        t_rows = n_main + gl.arange(0, BN, layout=gl.SliceLayout(1, ld))
        t_cols = gl.arange(0, D, layout=gl.SliceLayout(0, ld))
        offs = gl.expand_dims((base + t_rows).to(gl.int64) * (3 * H * D), 1) + gl.expand_dims(t_cols, 0)
        live = gl.expand_dims(t_rows < N, 1)
        k_tail.store(gl.load(qkv_ptr + offs + k_col, mask=live, other=0.0))
        v_tail.store(gl.load(qkv_ptr + offs + v_col, mask=live, other=0.0))
        fence_async_shared()
        s = warpgroup_mma(q_smem, k_tail.permute((1, 0)), gl.zeros([BLOCK_M, BN], gl.float32, layout=mma),
                          use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s, ))
        key = n_main + gl.arange(0, BN, layout=cols_of)
        s = gl.where(gl.expand_dims(key < N, 0), s, float("-inf"))
        p, alpha, m_i, l_i = _softmax_update(s, m_i, l_i, qk_scale)
        acc = acc * gl.expand_dims(alpha, 1)
        acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_tail, acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc, ))

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(kv_bar.index(i))
    o = acc * gl.expand_dims(1.0 / l_i, 1)
    rows = row0 + gl.arange(0, BLOCK_M, layout=rows_of)
    cols = gl.arange(0, D, layout=cols_of)
    o_offs = gl.expand_dims((base + rows).to(gl.int64) * (H * D), 1) + gl.expand_dims(q_col + cols, 0)
    gl.store(out_ptr + o_offs, o.to(dtype), mask=gl.expand_dims(rows < N, 1))


def kernel_args(qkv: torch.Tensor, out: torch.Tensor, block_m: int, stages: int) -> tuple[tuple, dict, tuple]:
    """Arguments, meta-parameters and grid of one launch for qkv [B, N, 3, H, 64] (contiguous,
    fp16/bf16) into out [B, N, H*64]."""
    B, N, _, H, D = qkv.shape
    if D != HEAD_DIM or not qkv.is_contiguous() or qkv.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"qkv: expected contiguous fp16/bf16 [B, N, 3, H, 64], got {tuple(qkv.shape)} {qkv.dtype}")
    mat = qkv.view(B * N, 3 * H * D)
    gdt = gl.bfloat16 if qkv.dtype == torch.bfloat16 else gl.float16
    q_desc = TensorDescriptor(mat, list(mat.shape), list(mat.stride()), [block_m, D],
                              gl.NVMMASharedLayout.get_default_for([block_m, D], gdt))
    kv_desc = TensorDescriptor(mat, list(mat.shape), list(mat.stride()), [BLOCK_N, D],
                               gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], gdt))
    args = (q_desc, kv_desc, mat, out, D ** -0.5 * LOG2E, N, H)
    meta = dict(BLOCK_M=block_m, STAGES=stages, num_warps=block_m // 16)
    return args, meta, (triton.cdiv(N, block_m) * B * H,)


def gluon_attention(qkv: torch.Tensor, block_m: int = 128, stages: int = 3) -> torch.Tensor:
    """softmax(q k^T / 8) v per head for qkv [B, N, 3, H, 64] -> [B, N, H*64] (qkv's dtype)."""
    B, N, _, H, D = qkv.shape
    out = torch.empty(B, N, H * D, device=qkv.device, dtype=qkv.dtype)
    args, meta, grid = kernel_args(qkv, out, block_m, stages)
    _attn_fwd_overlap[grid](*args, **meta)
    return out


def compile_for_hopper(block_m: int, stages: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """sm_90 compile without a GPU: registers, spills, shared memory and the main loop's order of
    wgmma issues, waits and ex2 (from the PTX)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from bench.attention_lab import compile_sm90, cubin_usage

    qkv = torch.empty(8, 4500, 3, 12, HEAD_DIM, dtype=dtype)
    out = torch.empty(8, 4500, 12 * HEAD_DIM, dtype=dtype)
    args, meta, _ = kernel_args(qkv, out, block_m, stages)
    kernel = compile_sm90(_attn_fwd_overlap, args, meta, GluonASTSource)
    seq = []
    for line in kernel.asm["ptx"].splitlines():
        t = line.strip()
        word = ("mma" if t.startswith("wgmma.mma_async") else "commit" if t.startswith("wgmma.commit_group")
                else "wait" + t.split()[-1].rstrip(";") if t.startswith("wgmma.wait_group")
                else "ex2" if "ex2.approx" in t else "mbar.wait" if "mbarrier.try_wait" in t else None)
        if word:
            if seq and seq[-1][0] == word:
                seq[-1][1] += 1
            else:
                seq.append([word, 1])
    row = dict(block_m=block_m, stages=stages, smem=kernel.metadata.shared,
               sequence=" ".join(f"{w}x{n}" if n > 1 else w for w, n in seq))
    row.update(cubin_usage(kernel))
    return row


def run_gpu(shapes: list[tuple[int, int]], configs: list[tuple[int, int]]) -> int:
    """Check each configuration against the fp32 reference (the bf16 kernel bound), then time it
    and the package's tuned ``flash_attention`` with ``do_bench`` (median)."""
    from bench.attention_lab import random_qkv, tflops
    from brainjepa_kernels.flash_attention import attention_reference, flash_attention
    from tests.helpers import KERNEL_TOL, rel_err

    bound = KERNEL_TOL[("cuda", torch.bfloat16)]
    failed = 0
    for B, N in shapes:
        qkv = random_qkv(B, N, torch.bfloat16)
        ref = attention_reference(qkv)
        ms = triton.testing.do_bench(lambda: flash_attention(qkv), return_mode="median")
        print(f"B={B} N={N} flash_attention (tuned): {ms:.3f} ms {tflops(B, N, ms):.1f} TFLOP/s", flush=True)
        for block_m, stages in configs:
            name = f"gluon {block_m}x{BLOCK_N} s{stages}"
            try:
                err = rel_err(gluon_attention(qkv, block_m, stages), ref)
            except Exception as exc:  # a lab: report and go on
                print(f"B={B} N={N} {name}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                failed += 1
                continue
            ok = err <= bound
            failed += not ok
            ms = triton.testing.do_bench(lambda: gluon_attention(qkv, block_m, stages), return_mode="median")
            print(f"B={B} N={N} {name}: err {err:.2e} {'ok' if ok else 'WRONG'}  {ms:.3f} ms "
                  f"{tflops(B, N, ms):.1f} TFLOP/s", flush=True)
    return 1 if failed else 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compile-only", action="store_true")
    p.add_argument("--configs", nargs="+", default=["128x3", "128x4", "64x3", "64x4"],
                   help="BLOCK_MxSTAGES pairs (BLOCK_M = 16 * warps)")
    args = p.parse_args(argv)
    configs = []
    for spec in args.configs:
        found = re.fullmatch(r"(64|128)x(\d+)", spec)
        if not found:
            p.error(f"--configs: expected 64xS or 128xS, got {spec!r}")
        configs.append((int(found.group(1)), int(found.group(2))))
    if args.compile_only:
        for block_m, stages in configs:
            try:
                print(json.dumps(compile_for_hopper(block_m, stages)), flush=True)
            except Exception as exc:
                print(f"{block_m}x{stages}: {type(exc).__name__}: {str(exc)[-1500:]}", flush=True)
                return 1
        return 0
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (or --compile-only)")
    return run_gpu([(8, 4500), (1, 4500), (2, 777), (1, 13500)], configs)


if __name__ == "__main__":
    sys.exit(main())

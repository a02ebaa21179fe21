"""Attention for Hopper (sm_90) in Gluon, with the next key block's scores computed on the tensor
cores while this block's softmax runs: the overlap that Triton source cannot express.

Same contract as :func:`kernels.flash_attention.flash_attention`, which tunes over this kernel
(variant ``"overlap"``) beside its Triton variants where :func:`supports` holds (sm_90 GPU, fp16 or
bf16, contiguous ``qkv``): ``out`` [B, N, H*64] = softmax(q_h k_h^T * scale) v_h per head, from the
packed projection ``qkv`` [B, N, 3, H, 64], read in place. The function it must equal is
:func:`kernels.flash_attention.attention_reference` (fp32 softmax attention of the same inputs).

Why a second kernel: the Triton kernel waits for each block's ``s = q k^T`` (``wgmma.wait_group 0``)
before the softmax, so its ~66 exponentials per thread and block run while the tensor cores idle
unless another program on the SM fills them (at head dim 64 the two take about equal time). Gluon
exposes Hopper's ``warpgroup_mma(..., is_async=True)`` and explicit waits, so each main-loop step j
(:func:`_kv_step`)

1. issues ``S_{j+1} = Q K_{j+1}^T`` (asynchronous),
2. runs the online softmax of ``S_j`` while ``S_{j+1}`` and ``O += P_{j-1} V_{j-1}`` run,
3. waits for both (one ``wait_group 0``), refills the K/V slot of block j - 1 through TMA,
4. rescales O and issues ``O += P_j V_j`` (asynchronous, P from registers),

FA3's intra-warpgroup pipelining. Two steps per loop iteration (``UNROLL=2``) let the scores of
consecutive blocks alternate between two register sets; with one step the compiler copies them
back into one set every iteration (~60 extra moves a thread), which cost 3% (below).

ptxas pitfall: waiting at the end of a step for only the older of two groups in flight
(``wait_group 1``) made ptxas serialize *every* wgmma of the kernel (a SASS ``WARPGROUP.DEPBAR``
after each ``HGMMA``; its info message C7514, "non wgmma instructions reading accumulator registers
of a wgmma between start and end of the pipeline stage"), though the PTX order was right. The
lab's ``--compile-only`` and the CPU test check the SASS for that.

Layout: qkv is read as the matrix [B*N, 3*H*64] through TMA (Q tiles and the full key blocks,
which never cross into the next batch); the ragged last key block (N % BLOCK_N keys) with masked
pointer loads (zeros past N), so no other batch's keys or values are multiplied; query rows past N
are computed and not stored. One warpgroup (4 warps, 64 query rows) per program by default.

Measured (H100 80GB HBM3, bf16, TFLOP/s, CUDA-graph replay, 2026-11-27, ``bench/gluon_attention_lab``):
[8, 4500, 3, 12, 64] 428.8 against 428.3 for the tuned Triton kernel, [1, 4500, ...] 390.8 against
377-380, [1, 13500, 3, 12, 64] 432.6 against 429-431, [2, 777, ...] 197 against 242 (few key blocks:
the prologue and tail weigh more). With the anchored softmax (variant ``"overlap_anchored"``,
session 6, same card): 439.0 at B=8 (420.6 online), 416.0 at B=1 (395.2 online); the Triton
``tma_anchored`` 128x64 reached 482.6 at B=8 in the same session's lab (``do_bench``).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_init, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ._runtime import is_hopper
from .flash_attention import _D, LOG2E, AttnConfig

#: Configurations :func:`kernels.flash_attention.flash_attention` tunes over: 64 query rows (one
#: warpgroup) x 128-key blocks, 3 K/V slots (106 KB of shared memory, 250 registers: two programs
#: per SM). Lab, same H100 run: 64x64 blocks 398 and 128x64 (two warpgroups) 401 at B=8, against 429.
CONFIGS = (AttnConfig(64, 128, 4, 3),)


@gluon.jit
def _softmax_update(s, m_i, l_i, qk_scale):
    """Online-softmax bookkeeping for raw scores s [BM, BN] (fp32): returns (p, alpha, m, l)."""
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
    l_new = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_new


@gluon.jit
def _softmax_anchored(s, m_i, l_i, qk_scale):
    """The same with m_i kept (the anchor, see :func:`kernels.flash_attention._attend_keys`): no
    row max, no rescaling; returns (p, l)."""
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_i, 1))
    return p, l_i + gl.sum(p, axis=1)


@gluon.jit
def _kv_step(j, s, acc, m_i, l_i, qk_scale, q_smem, k_smem, v_smem, kv_bar, kv_desc, n_full, base, k_col, v_col,
             BLOCK_M: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr, mma_s: gl.constexpr,
             p_layout: gl.constexpr, rows_of: gl.constexpr, ANCHORED: gl.constexpr):
    """Main-loop iteration j (block j + 1 exists): issue S_{j+1} = Q K_{j+1}^T, run the softmax of
    S_j (``s``) while it and P_{j-1} V_{j-1} (``acc``, in flight) run, retire both, refill block
    j - 1's slot, issue P_j V_j. ANCHORED: keep m (no max, no rescaling). Returns (S_{j+1}, acc in
    flight, m, l)."""
    nxt = (j + 1) % STAGES
    mbarrier.wait(kv_bar.index(nxt), ((j + 1) // STAGES) & 1)
    s_next = warpgroup_mma(q_smem, k_smem.index(nxt).permute((1, 0)),
                           gl.zeros([BLOCK_M, BN], gl.float32, layout=mma_s), use_acc=False, is_async=True)
    if ANCHORED:
        p, l_i = _softmax_anchored(s, m_i, l_i, qk_scale)
    else:
        p, alpha, m_i, l_i = _softmax_update(s, m_i, l_i, qk_scale)
    # Retire both groups with one wait_group 0. (Waiting for only the older one, wait_group 1,
    # made ptxas serialize every wgmma of the kernel: it could not tell which group a
    # wait_group 1 at the loop's end leaves in flight.)
    acc, s_next = warpgroup_mma_wait(0, deps=(acc, s_next))
    # Block j - 1's slot is free: load block j - 1 + STAGES into it.
    refill = j - 1 + STAGES
    ok = (j >= 1) & (refill < n_full)
    slot = refill % STAGES
    mbarrier.expect(kv_bar.index(slot), 2 * kv_desc.block_type.nbytes, pred=ok)
    tma.async_copy_global_to_shared(kv_desc, [base + refill * BN, k_col], kv_bar.index(slot), k_smem.index(slot),
                                    pred=ok)
    tma.async_copy_global_to_shared(kv_desc, [base + refill * BN, v_col], kv_bar.index(slot), v_smem.index(slot),
                                    pred=ok)
    if not ANCHORED:
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, rows_of), 1)
    acc = warpgroup_mma(gl.convert_layout(p.to(q_smem.dtype), p_layout), v_smem.index(j % STAGES), acc,
                        is_async=True)  # in flight into the next iteration's softmax
    return s_next, acc, m_i, l_i


@gluon.jit
def _attend_keys(q_smem, k_smem, v_smem, kv_bar, kv_desc, qkv_ptr, qk_scale, N, H, base, k_col, v_col,
                 BLOCK_M: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr, UNROLL: gl.constexpr,
                 ANCHORED: gl.constexpr, mma: gl.constexpr, mma_s: gl.constexpr, p_layout: gl.constexpr,
                 rows_of: gl.constexpr, rows_s: gl.constexpr, ld: gl.constexpr):
    """(acc [BLOCK_M, 64] fp32, l [BLOCK_M]) of the query tile in ``q_smem`` over all N keys of
    its (batch, head): the N // BN full key blocks through the pipelined loop (TMA into the STAGES
    slots of k_smem / v_smem, barriers ``kv_bar`` fresh: block i's phase is (i // STAGES) & 1),
    then the ragged rest through slot 0 with masked loads (zeros past N), an online step.
    ANCHORED: the row max of the first full block is the anchor m, kept for every full block (see
    :func:`kernels.flash_attention._attend_keys`); the caller redoes overflowed programs."""
    D: gl.constexpr = _D
    dtype: gl.constexpr = kv_desc.dtype
    n_full = N // BN
    for i in gl.static_range(STAGES):
        ok = i < n_full
        mbarrier.expect(kv_bar.index(i), 2 * kv_desc.block_type.nbytes, pred=ok)
        tma.async_copy_global_to_shared(kv_desc, [base + i * BN, k_col], kv_bar.index(i), k_smem.index(i), pred=ok)
        tma.async_copy_global_to_shared(kv_desc, [base + i * BN, v_col], kv_bar.index(i), v_smem.index(i), pred=ok)

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=rows_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=rows_s)
    acc = gl.zeros([BLOCK_M, D], gl.float32, layout=mma)
    if n_full > 0:
        mbarrier.wait(kv_bar.index(0), 0)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), gl.zeros([BLOCK_M, BN], gl.float32, layout=mma_s),
                          use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s, ))
        if ANCHORED:
            m_i = gl.max(s, axis=1) * qk_scale
        acc = warpgroup_mma_init(acc)  # loop-carried as an in-flight accumulator
        if UNROLL == 2:
            for jj in range(0, (n_full - 1) // 2):
                s, acc, m_i, l_i = _kv_step(2 * jj, s, acc, m_i, l_i, qk_scale, q_smem, k_smem, v_smem, kv_bar,
                                            kv_desc, n_full, base, k_col, v_col, BLOCK_M, BN, STAGES, mma_s,
                                            p_layout, rows_of, ANCHORED)
                s, acc, m_i, l_i = _kv_step(2 * jj + 1, s, acc, m_i, l_i, qk_scale, q_smem, k_smem, v_smem, kv_bar,
                                            kv_desc, n_full, base, k_col, v_col, BLOCK_M, BN, STAGES, mma_s,
                                            p_layout, rows_of, ANCHORED)
            if (n_full - 1) % 2 == 1:
                s, acc, m_i, l_i = _kv_step(n_full - 2, s, acc, m_i, l_i, qk_scale, q_smem, k_smem, v_smem, kv_bar,
                                            kv_desc, n_full, base, k_col, v_col, BLOCK_M, BN, STAGES, mma_s,
                                            p_layout, rows_of, ANCHORED)
        else:
            for j in range(0, n_full - 1):
                s, acc, m_i, l_i = _kv_step(j, s, acc, m_i, l_i, qk_scale, q_smem, k_smem, v_smem, kv_bar, kv_desc,
                                            n_full, base, k_col, v_col, BLOCK_M, BN, STAGES, mma_s, p_layout, rows_of,
                                            ANCHORED)
        last = n_full - 1
        if ANCHORED:
            p, l_i = _softmax_anchored(s, m_i, l_i, qk_scale)
        else:
            p, alpha, m_i, l_i = _softmax_update(s, m_i, l_i, qk_scale)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        if not ANCHORED:
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, rows_of), 1)
        acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_smem.index(last % STAGES), acc,
                            is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc, ))

    n_main = n_full * BN
    if n_main < N:  # ragged last key block through slot 0 (every load above has landed, every product retired)
        gl.thread_barrier()  # no warp of the group still reads slot 0
        t_rows = n_main + gl.arange(0, BN, layout=gl.SliceLayout(1, ld))
        t_cols = gl.arange(0, D, layout=gl.SliceLayout(0, ld))
        offs = gl.expand_dims((base + t_rows).to(gl.int64) * (3 * H * D), 1) + gl.expand_dims(t_cols, 0)
        live = gl.expand_dims(t_rows < N, 1)
        k_smem.index(0).store(gl.load(qkv_ptr + offs + k_col, mask=live, other=0.0))
        v_smem.index(0).store(gl.load(qkv_ptr + offs + v_col, mask=live, other=0.0))
        fence_async_shared()
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)),
                          gl.zeros([BLOCK_M, BN], gl.float32, layout=mma_s), use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s, ))
        key = n_main + gl.arange(0, BN, layout=gl.SliceLayout(0, mma_s))
        s = gl.where(gl.expand_dims(key < N, 0), s, float("-inf"))
        p, alpha, m_i, l_i = _softmax_update(s, m_i, l_i, qk_scale)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, rows_of), 1)
        acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_smem.index(0), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
    return acc, l_i


@gluon.jit(do_not_specialize=["N", "H"])
def _attn_fwd_overlap(q_desc, kv_desc, qkv_ptr, out_ptr, qk_scale, N, H,
                      BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, UNROLL: gl.constexpr,
                      ANCHORED: gl.constexpr, num_warps: gl.constexpr):
    """out[b, rows, h*64:(h+1)*64] for the BLOCK_M query rows of program (b, h, pid_m) (numbered
    head by head, as in :func:`kernels.flash_attention._attn_fwd`). q_desc / kv_desc: TMA
    descriptors over qkv as [B*N, 3*H*64] with boxes [BLOCK_M, 64] / [BLOCK_N, 64]; qkv_ptr the same matrix; out_ptr
    [B*N, H*64]. BLOCK_M = 16 * num_warps (each warpgroup owns 64 rows). K/V blocks cycle through
    STAGES >= 3 shared-memory slots (slot of block i: i % STAGES, barrier phase (i // STAGES) & 1).
    UNROLL 2: two steps per loop iteration, so the scores of consecutive blocks alternate between
    two register sets instead of being copied back into one at every iteration. ANCHORED: the
    softmax anchored at the first key block's row max; programs where that overflowed (any of
    their rows < N with a non-finite l or acc) run again with the running max."""
    D: gl.constexpr = _D
    BN: gl.constexpr = BLOCK_N
    gl.static_assert(STAGES >= 3, "slot of block j - 1 is refilled while block j + 1 is read")
    dtype: gl.constexpr = q_desc.dtype
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, D, 16])
    mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                    instr_shape=[16, BN, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    rows_of: gl.constexpr = gl.SliceLayout(1, mma)
    cols_of: gl.constexpr = gl.SliceLayout(0, mma)
    rows_s: gl.constexpr = gl.SliceLayout(1, mma_s)  # m, l: per row of the scores
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
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [base + row0, q_col], q_bar, q_smem)
    mbarrier.wait(q_bar, 0)

    acc, l_i = _attend_keys(q_smem, k_smem, v_smem, kv_bar, kv_desc, qkv_ptr, qk_scale, N, H, base, k_col, v_col,
                            BLOCK_M, BN, STAGES, UNROLL, ANCHORED, mma, mma_s, p_layout, rows_of, rows_s, ld)
    if ANCHORED:
        rows_l = row0 + gl.arange(0, BLOCK_M, layout=rows_s)
        bad_l = gl.sum(((rows_l < N) & ~(l_i < float("inf"))).to(gl.int32), axis=0)
        rows_a = row0 + gl.arange(0, BLOCK_M, layout=rows_of)
        acc_bad = gl.sum((~(gl.abs(acc) < float("inf"))).to(gl.int32), axis=1)
        bad_acc = gl.sum(gl.where(rows_a < N, acc_bad, 0), axis=0)
        if bad_l + bad_acc > 0:  # a key scored far above the anchor (or NaN inputs): the running max
            redo_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(STAGES):
                mbarrier.init(redo_bar.index(i), count=1)
            acc, l_i = _attend_keys(q_smem, k_smem, v_smem, redo_bar, kv_desc, qkv_ptr, qk_scale, N, H, base, k_col,
                                    v_col, BLOCK_M, BN, STAGES, UNROLL, False, mma, mma_s, p_layout, rows_of, rows_s,
                                    ld)
            for i in gl.static_range(STAGES):
                mbarrier.invalidate(redo_bar.index(i))

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(kv_bar.index(i))
    o = acc * gl.expand_dims(gl.convert_layout(1.0 / l_i, rows_of), 1)
    rows = row0 + gl.arange(0, BLOCK_M, layout=rows_of)
    cols = gl.arange(0, D, layout=cols_of)
    o_offs = gl.expand_dims((base + rows).to(gl.int64) * (H * D), 1) + gl.expand_dims(q_col + cols, 0)
    gl.store(out_ptr + o_offs, o.to(dtype), mask=gl.expand_dims(rows < N, 1))


def supports(qkv: torch.Tensor) -> bool:
    """Whether this kernel can run ``qkv``: on an sm_90 GPU, fp16/bf16, contiguous (TMA reads it
    as one [B*N, 3*H*64] matrix)."""
    return is_hopper(qkv.device) and qkv.dtype in (torch.float16, torch.bfloat16) and qkv.is_contiguous()


def kernel_args(qkv: torch.Tensor, out: torch.Tensor, cfg: AttnConfig, sm_scale: Optional[float] = None,
                unroll: int = 2, anchored: bool = False) -> tuple[tuple, dict, tuple]:
    """Positional arguments, compile-time arguments and grid of one launch for ``qkv``
    [B, N, 3, H, 64] (contiguous, fp16/bf16) into ``out`` [B, N, H*64] (contiguous)."""
    B, N, _, H, D = qkv.shape
    if qkv.dtype not in (torch.float16, torch.bfloat16) or not qkv.is_contiguous() or not out.is_contiguous():
        raise ValueError(f"qkv, out: the overlap kernel needs contiguous fp16/bf16 tensors, got {qkv.dtype} with "
                         f"strides {qkv.stride()} and {out.dtype} with strides {out.stride()}")
    if (cfg.block_m not in (64, 128) or cfg.num_warps != cfg.block_m // 16 or cfg.block_n not in (64, 128)
            or cfg.num_stages < 3 or unroll not in (1, 2)):
        raise ValueError(f"cfg: the overlap kernel needs block_m 64 or 128 with num_warps = block_m / 16, block_n "
                         f"64 or 128, num_stages >= 3 (and unroll 1 or 2), got {cfg}, unroll={unroll}")
    mat = qkv.view(B * N, 3 * H * D)
    gdt = gl.bfloat16 if qkv.dtype == torch.bfloat16 else gl.float16
    q_desc = TensorDescriptor(mat, list(mat.shape), list(mat.stride()), [cfg.block_m, D],
                              gl.NVMMASharedLayout.get_default_for([cfg.block_m, D], gdt))
    kv_desc = TensorDescriptor(mat, list(mat.shape), list(mat.stride()), [cfg.block_n, D],
                               gl.NVMMASharedLayout.get_default_for([cfg.block_n, D], gdt))
    qk_scale = (D ** -0.5 if sm_scale is None else sm_scale) * LOG2E
    args = (q_desc, kv_desc, mat, out, qk_scale, N, H)
    meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, STAGES=cfg.num_stages, UNROLL=unroll, ANCHORED=anchored,
                num_warps=cfg.num_warps)
    return args, meta, (triton.cdiv(N, cfg.block_m) * B * H,)


def launch(qkv: torch.Tensor, out: torch.Tensor, cfg: AttnConfig, sm_scale: Optional[float] = None,
           unroll: int = 2, anchored: bool = False) -> None:
    """One launch with the fixed configuration ``cfg`` on the current device (shapes, dtypes and
    devices are checked by the caller, :func:`kernels.flash_attention.flash_attention`)."""
    args, meta, grid = kernel_args(qkv, out, cfg, sm_scale, unroll, anchored)
    _attn_fwd_overlap[grid](*args, **meta)

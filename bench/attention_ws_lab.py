"""Lab: FA3's schedule for the encoder's attention in Gluon (head dim 64, Hopper): correct, not faster.

    python -m bench.attention_ws_lab --compile-only   # any machine: sm_90 compile, registers, waits
    python -m bench.attention_ws_lab [--check-only]   # GPU: check, then time against flash_attention (or not)

Why (bench/NOTES.md, "What is left", item 1): in the package's attention kernels the tensor
cores and the MUFU are each busy ~57% of the time and rarely together (Nsight Compute, session
7): at head dim 64 a key block's products and its exponentials take about as long, and each
program runs them one after the other. FlashAttention-3 runs two consumer warpgroups per program
whose products and softmax are forced out of phase, so one warpgroup's exponentials run under
the other's products.

The kernel (same contract as :func:`kernels.flash_attention.flash_attention`: ``out`` [B, N,
H*64] = softmax(q_h k_h^T * scale) v_h from the packed ``qkv`` [B, N, 3, H, 64], read in place;
the function it must equal is :func:`kernels.flash_attention.attention_reference`). One program
per (batch, head, 128 or 192 query rows), partitions by ``gl.warp_specialize``:

* a producer warp loads the consumers' Q tiles, then streams the head's key blocks (K and V,
  BLOCK_N x 64 each) through a ring of STAGES shared-memory slots, TMA through 3-D descriptors
  over qkv as [B, N, 3*H*64], so that a block past row N of its batch is zero-filled by the TMA
  unit (the ragged last block needs no masked loads; no other batch's values are ever read);
* two or three consumer warpgroups (CONSUMERS; FA3's tile at head dim 64 has three), 64 query
  rows each, share every key block (a slot is released when all have retired their products
  from it: ``empty`` barriers of count CONSUMERS). Step j of a
  consumer (:func:`_step`), FA3's intra-warpgroup order: issue S_j = Q K_j^T and O += P_{j-1}
  V_{j-1}, wait for S_j only (``wait_group 1``), softmax of S_j while the product with V_{j-1}
  runs, P_j into shared memory (two buffers a consumer; the product reads both operands from
  there), wait for the product, release block j - 1's slot;
* PINGPONG: the consumers issue their two products in turn, round robin (``turn`` barriers, as
  in :mod:`kernels.matmul_hopper`), so one's softmax runs while another's products do.

Softmax: online (running max, rescale), or ANCHORED at the first key block's row max (see
:func:`kernels.flash_attention._attend_keys`), with the redo inside the kernel: each consumer
writes which of its rows came out non-finite into shared memory (``verdict``); if any did, the
producer streams the key blocks again and both consumers run the online softmax.

Shared memory at BLOCK_N 128, STAGES 3, two consumers: 16 KB of Q + 96 KB of K/V + 64 KB of P
(181 KB in all); registers by ``setmaxnreg`` as in the matmul: 248 / 232 for the consumers, 24
for the producer (one program per SM). Three consumers: 168 / 160 / 160 / 24; at BLOCK_N 128
ptxas spills 32-40 bytes, at BLOCK_N 64 none (141 KB of shared memory with 4 slots).

What ptxas makes of it (offline sm_90 compiles, ``--compile-only``; session 9, 2026-11-27):
at 128s3ap no spills, no serialized wgmma (144 HGMMA, 24 waits), and in the SASS all 64
exponentials of a step before the wait for P_{j-1} V_{j-1} (``exps_under_pv``). The first
version kept P in registers, as the product's A operand (3314d33): after making P_{j-1} a
dependency of the product's wait (without it ptxas serialized every wgmma, C7513), ptxas still
formed P_j in the registers the loop carries P in, the ones the running product reads, and so
waited for that product after 0-6 of the 64 exponentials; two steps a loop iteration did not
change that. The order of ``kernels/flash_attention_hopper.py`` (issue S_{j+1}, softmax of S_j,
then P_j V_j) inside this warp-specialized kernel had every wgmma serialized (C7512,
"insufficient register resources") at any block size, one or two steps a loop iteration.

Status (session 10, ``bench/results/2026-11-27-s10/``): every configuration passes the checks
(ragged N, NaN in another batch, a key scored past the anchor), none beats the tuned
``flash_attention`` at B=8: on an H100 64s4apc3 437-440 TFLOP/s against 468-469, on an H200
128s3apc3 460-461 against 459-479; B=1 is 12-20% behind. Nsight Compute: tensor pipe 48-51%,
MUFU 51%; 31% of 128s3ap's stall cycles are waits at a barrier (Triton puts one between each
consumer's P stores and the product that reads them; which barrier was not measured).
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Optional

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from brainjepa_kernels.flash_attention import HEAD_DIM, LOG2E

#: Query rows of a consumer warpgroup (a program has two or three).
ROWS = gl.constexpr(64)


@gluon.jit
def _tile(N, H, C: gl.constexpr):
    """(batch, head, first query row) of this program of C consumers (C * ROWS query rows);
    programs numbered head by head."""
    n_m = gl.cdiv(N, C * ROWS)
    pid = gl.program_id(0)
    return pid // n_m // H, pid // n_m % H, pid % n_m * (C * ROWS)


@gluon.jit
def _redo(verdict, C: gl.constexpr, WARPS: gl.constexpr):
    """Whether any of the C consumers found a non-finite row (``verdict`` [C * ROWS] int32 in
    shared memory: consumer r's rows at r * ROWS..), read by a partition of WARPS warps."""
    bad = 0
    for r in gl.static_range(C):
        bad += gl.sum(verdict.slice(r * ROWS, ROWS).load(gl.BlockedLayout([1], [32], [WARPS], [0])), axis=0)
    return bad > 0


@gluon.jit
def _stream(kv_desc, k_smem, v_smem, ready, empty, b, h, H, N, t0):
    """Producer: the key blocks of (b, h) into the ring; block j as ring step t0 + j, into slot
    (t0 + j) % STAGES once every consumer released that slot's previous use."""
    D: gl.constexpr = kv_desc.block_type.shape[2]
    BN: gl.constexpr = kv_desc.block_type.shape[1]
    STAGES: gl.constexpr = k_smem.shape[0]
    for j in range(gl.cdiv(N, BN)):
        t = t0 + j
        slot = t % STAGES
        mbarrier.wait(empty.index(slot), ((t // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1
        mbarrier.expect(ready.index(slot), 2 * kv_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(kv_desc, [b, j * BN, (H + h) * D], ready.index(slot), k_smem.index(slot))
        tma.async_copy_global_to_shared(kv_desc, [b, j * BN, (2 * H + h) * D], ready.index(slot), v_smem.index(slot))


@gluon.jit
def _producer(shared, ANCHORED: gl.constexpr, PINGPONG: gl.constexpr, ROLE: gl.constexpr):
    """One warp (ROLE C; the worker partitions share one signature): the C consumers' Q tiles,
    then the key blocks; again after an anchored pass that overflowed."""
    (q_desc, kv_desc, out_ptr, q_smem, k_smem, v_smem, q_bar, ready, empty, turn, verdict, verdict_bar, p_all,
     qk_scale, N, H) = shared
    D: gl.constexpr = q_desc.block_type.shape[2]
    C: gl.constexpr = q_smem.shape[0]
    b, h, row0 = _tile(N, H, C)
    mbarrier.expect(q_bar, C * q_desc.block_type.nbytes)
    for r in gl.static_range(C):
        tma.async_copy_global_to_shared(q_desc, [b, row0 + r * ROWS, h * D], q_bar, q_smem.index(r))
    _stream(kv_desc, k_smem, v_smem, ready, empty, b, h, H, N, 0)
    if ANCHORED:
        mbarrier.wait(verdict_bar, 0)
        if _redo(verdict, C, 1):
            _stream(kv_desc, k_smem, v_smem, ready, empty, b, h, H, N, gl.cdiv(N, kv_desc.block_type.shape[1]))


@gluon.jit
def _step(j, t0, k0, q, k_smem, v_smem, ready, empty, turn, acc, p_smem, m_i, l_i, qk_scale, N,
          ANCHORED: gl.constexpr, PINGPONG: gl.constexpr, MASKED: gl.constexpr, ROLE: gl.constexpr,
          mma_s: gl.constexpr, rows_of: gl.constexpr):
    """Key block j >= 1 (ring step t0 + j, this pass's turn k0 + j - 1): issue S_j = Q K_j^T and
    O += P_{j-1} V_{j-1} (P_{j-1} from this consumer's shared-memory buffer (j - 1) % 2), wait
    for S_j, its softmax while the second product runs, P_j into buffer j % 2, wait for the
    product, release block j - 1's slot. MASKED: keys past N scored -inf (the last block).
    Returns (acc, m, l)."""
    BN: gl.constexpr = k_smem.shape[2]
    D: gl.constexpr = k_smem.shape[3]
    STAGES: gl.constexpr = k_smem.shape[0]
    C: gl.constexpr = p_smem.shape[0] // 2
    t = t0 + j
    slot = t % STAGES
    prev = (t - 1) % STAGES
    mbarrier.wait(ready.index(slot), (t // STAGES) & 1)
    if PINGPONG:
        k = k0 + j - 1
        if ROLE == 0:
            mbarrier.wait(turn.index(0), (k - 1) & 1, pred=k > 0)
        else:
            mbarrier.wait(turn.index(ROLE), k & 1)
    s = warpgroup_mma(q, k_smem.index(slot).reshape([BN, D]).permute((1, 0)),
                      gl.zeros([ROWS, BN], gl.float32, layout=mma_s), use_acc=False, is_async=True)
    acc = warpgroup_mma(p_smem.index(2 * ROLE + (j - 1) % 2), v_smem.index(prev).reshape([BN, D]), acc,
                        is_async=True)
    if PINGPONG:
        mbarrier.arrive(turn.index((ROLE + 1) % C))
    s = warpgroup_mma_wait(1, deps=(s, ))
    if MASKED:
        key = j * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, mma_s))
        s = gl.where(gl.expand_dims(key < N, 0), s, float("-inf"))
    if ANCHORED:
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_i, 1))
        l_i = l_i + gl.sum(p, axis=1)
    else:
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
        l_i = l_i * alpha + gl.sum(p, axis=1)
        m_i = m_new
    # P through shared memory, not registers: with P_{j-1} as the running product's register
    # operand, ptxas formed P_j in those same registers and so waited for the product after the
    # first few exponentials (module docstring).
    p_smem.index(2 * ROLE + j % 2).store(p.to(q.dtype))
    fence_async_shared()
    acc = warpgroup_mma_wait(0, deps=(acc, ))
    mbarrier.arrive(empty.index(prev))
    if not ANCHORED:
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, rows_of), 1)
    return acc, m_i, l_i


@gluon.jit
def _attend(q, k_smem, v_smem, ready, empty, turn, p_smem, qk_scale, N, t0, k0, ANCHORED: gl.constexpr,
            PINGPONG: gl.constexpr, ROLE: gl.constexpr):
    """(acc [ROWS, 64] fp32, l [ROWS]) of the query tile ``q`` over all N keys of its head, the
    key blocks at ring steps t0.. and this pass's turns from k0; P through ``p_smem`` [2 * C,
    ROWS, BLOCK_N] (buffers 2 * ROLE and 2 * ROLE + 1 are this consumer's). ANCHORED: m is the first
    block's row max, kept."""
    BN: gl.constexpr = k_smem.shape[2]
    D: gl.constexpr = k_smem.shape[3]
    STAGES: gl.constexpr = k_smem.shape[0]
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    rows_of: gl.constexpr = gl.SliceLayout(1, mma)
    n_blocks = gl.cdiv(N, BN)

    slot = t0 % STAGES
    mbarrier.wait(ready.index(slot), (t0 // STAGES) & 1)
    s = warpgroup_mma(q, k_smem.index(slot).reshape([BN, D]).permute((1, 0)),
                      gl.zeros([ROWS, BN], gl.float32, layout=mma_s), use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s, ))
    key = gl.arange(0, BN, layout=gl.SliceLayout(0, mma_s))
    s = gl.where(gl.expand_dims(key < N, 0), s, float("-inf"))
    m_i = gl.max(s, axis=1) * qk_scale
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_i, 1))
    l_i = gl.sum(p, axis=1)
    p_smem.index(2 * ROLE).store(p.to(q.dtype))
    fence_async_shared()
    acc = gl.zeros([ROWS, D], gl.float32, layout=mma)
    for j in range(1, n_blocks - 1):
        acc, m_i, l_i = _step(j, t0, k0, q, k_smem, v_smem, ready, empty, turn, acc, p_smem, m_i, l_i, qk_scale,
                              N, ANCHORED, PINGPONG, False, ROLE, mma_s, rows_of)
    if n_blocks > 1:
        acc, m_i, l_i = _step(n_blocks - 1, t0, k0, q, k_smem, v_smem, ready, empty, turn, acc, p_smem, m_i, l_i,
                              qk_scale, N, ANCHORED, PINGPONG, True, ROLE, mma_s, rows_of)
    last = (t0 + n_blocks - 1) % STAGES
    acc = warpgroup_mma(p_smem.index(2 * ROLE + (n_blocks - 1) % 2), v_smem.index(last).reshape([BN, D]), acc,
                        is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc, ))
    mbarrier.arrive(empty.index(last))
    return acc, l_i


@gluon.jit
def _consumer(shared, ANCHORED: gl.constexpr, PINGPONG: gl.constexpr, ROLE: gl.constexpr):
    """One warpgroup: query rows row0 + ROLE * 64 .. + 64 of this program, written to out_ptr
    [B*N, H*64] (rows < N)."""
    (q_desc, kv_desc, out_ptr, q_smem, k_smem, v_smem, q_bar, ready, empty, turn, verdict, verdict_bar, p_all,
     qk_scale, N, H) = shared
    D: gl.constexpr = q_desc.block_type.shape[2]
    C: gl.constexpr = q_smem.shape[0]
    BN: gl.constexpr = kv_desc.block_type.shape[1]
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    rows_of: gl.constexpr = gl.SliceLayout(1, mma)
    cols_of: gl.constexpr = gl.SliceLayout(0, mma)
    b, h, row0 = _tile(N, H, C)
    q = q_smem.index(ROLE).reshape([ROWS, D])
    mbarrier.wait(q_bar, 0)
    acc, l_i = _attend(q, k_smem, v_smem, ready, empty, turn, p_all, qk_scale, N, 0, 0, ANCHORED, PINGPONG, ROLE)
    if ANCHORED:
        bad = (~(gl.convert_layout(l_i, rows_of) < float("inf"))).to(gl.int32) \
            + gl.sum((~(gl.abs(acc) < float("inf"))).to(gl.int32), axis=1)
        verdict.slice(ROLE * ROWS, ROWS).store(bad)
        gl.thread_barrier()  # every warp's rows are in shared memory before the arrive
        mbarrier.arrive(verdict_bar)
        mbarrier.wait(verdict_bar, 0)
        if _redo(verdict, C, 4):  # a key scored far above the anchor (or NaN inputs): the running max
            n_blocks = gl.cdiv(N, BN)
            acc, l_i = _attend(q, k_smem, v_smem, ready, empty, turn, p_all, qk_scale, N, n_blocks, n_blocks - 1, False,
                               PINGPONG, ROLE)
    o = acc * gl.expand_dims(gl.convert_layout(1.0 / l_i, rows_of), 1)
    rows = row0 + ROLE * ROWS + gl.arange(0, ROWS, layout=rows_of)
    cols = gl.arange(0, D, layout=cols_of)
    offs = gl.expand_dims((b * N + rows).to(gl.int64) * (H * D), 1) + gl.expand_dims(h * D + cols, 0)
    gl.store(out_ptr + offs, o.to(q_desc.dtype), mask=gl.expand_dims(rows < N, 1))


@gluon.jit(do_not_specialize=["N", "H"])
def _attn_fwd_ws(q_desc, kv_desc, out_ptr, qk_scale, N, H, STAGES: gl.constexpr, ANCHORED: gl.constexpr,
                 PINGPONG: gl.constexpr, CONSUMERS: gl.constexpr, P_LAYOUT: gl.constexpr):
    """Program (b, h, CONSUMERS * 64 query rows): see the module docstring. q_desc / kv_desc: TMA
    descriptors over qkv as [B, N, 3*H*64] with boxes [1, 64, 64] / [1, BLOCK_N, 64]; out_ptr
    [B*N, H*64]."""
    C: gl.constexpr = CONSUMERS
    gl.static_assert((C == 2) | (C == 3), "two or three consumer warpgroups")
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [C] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES] + kv_desc.block_type.shape, kv_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES] + kv_desc.block_type.shape, kv_desc.layout)
    # (4 * ROWS entries, of which C * ROWS are used: shared-memory shapes are powers of two.)
    verdict = gl.allocate_shared_memory(gl.int32, [4 * ROWS], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    p_all = gl.allocate_shared_memory(dtype, [2 * C, ROWS, kv_desc.block_type.shape[1]], P_LAYOUT)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    verdict_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [C, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    mbarrier.init(verdict_bar, count=C)
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=C)
    for r in gl.static_range(C):
        mbarrier.init(turn.index(r), count=1)
    # The partitions' arguments: the runtime ones in one tuple (compile-time ones do not stay
    # compile-time inside it), then ANCHORED, PINGPONG and the partition's role.
    shared = (q_desc, kv_desc, out_ptr, q_smem, k_smem, v_smem, q_bar, ready, empty, turn, verdict, verdict_bar, p_all,
              qk_scale, N, H)
    if C == 2:
        gl.warp_specialize([(_consumer, (shared, ANCHORED, PINGPONG, 0)), (_consumer, (shared, ANCHORED, PINGPONG, 1)),
                            (_producer, (shared, ANCHORED, PINGPONG, 2))], [4, 1], [232, 24])
    else:
        gl.warp_specialize([(_consumer, (shared, ANCHORED, PINGPONG, 0)), (_consumer, (shared, ANCHORED, PINGPONG, 1)),
                            (_consumer, (shared, ANCHORED, PINGPONG, 2)), (_producer, (shared, ANCHORED, PINGPONG, 3))],
                           [4, 4, 1], [160, 160, 24])


def kernel_args(qkv: torch.Tensor, out: torch.Tensor, block_n: int = 128, stages: int = 3, anchored: bool = True,
                pingpong: bool = True, consumers: int = 2) -> tuple[tuple, dict, tuple]:
    """Arguments, compile-time arguments and grid of one launch for ``qkv`` [B, N, 3, H, 64]
    (contiguous, fp16/bf16) into ``out`` [B, N, H*64] (contiguous). Tensors may be on the CPU
    (offline compile)."""
    B, N, _, H, D = qkv.shape
    if D != HEAD_DIM or qkv.dtype not in (torch.float16, torch.bfloat16) or not qkv.is_contiguous() \
            or not out.is_contiguous() or out.shape != (B, N, H * D) or out.dtype != qkv.dtype:
        raise ValueError(f"qkv [B, N, 3, H, 64] and out [B, N, H*64]: contiguous fp16/bf16 of one dtype, got "
                         f"{tuple(qkv.shape)} {qkv.dtype} and {tuple(out.shape)} {out.dtype}")
    if block_n not in (64, 128) or stages < 2 or consumers not in (2, 3):
        raise ValueError(f"block_n 64 or 128, stages >= 2 and consumers 2 or 3, got {block_n}, {stages}, {consumers}")
    mat = qkv.view(B, N, 3 * H * D)
    gdt = gl.bfloat16 if qkv.dtype == torch.bfloat16 else gl.float16

    def desc(rows: int) -> TensorDescriptor:
        box = [1, rows, D]
        return TensorDescriptor(mat, list(mat.shape), list(mat.stride()), box,
                                gl.NVMMASharedLayout.get_default_for(box, gdt))

    args = (desc(ROWS.value), desc(block_n), out, D ** -0.5 * LOG2E, N, H)
    # Registers at launch: the whole register file over the warpgroups (the producer warp's
    # warpgroup included), 3 or 4 of them; setmaxnreg moves them between the partitions.
    meta = dict(STAGES=stages, ANCHORED=anchored, PINGPONG=pingpong, CONSUMERS=consumers, num_warps=4,
                maxnreg=168 if consumers == 2 else 128,
                P_LAYOUT=gl.NVMMASharedLayout.get_default_for([ROWS.value, block_n], gdt))
    return args, meta, (triton.cdiv(N, consumers * ROWS.value) * B * H, )


def attention_ws(qkv: torch.Tensor, block_n: int = 128, stages: int = 3, anchored: bool = True,
                 pingpong: bool = True, consumers: int = 2, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """qkv [B, N, 3, H, 64] -> [B, N, H*64] with one lab configuration."""
    B, N, _, H, D = qkv.shape
    if out is None:
        out = torch.empty(B, N, H * D, device=qkv.device, dtype=qkv.dtype)
    args, meta, grid = kernel_args(qkv, out, block_n, stages, anchored, pingpong, consumers)
    _attn_fwd_ws[grid](*args, **meta)
    return out


CONFIG_SPEC = re.compile(r"(64|128)s(\d)(a?)(p?)(c3)?")


def parse_config(spec: str) -> dict:
    """``BLOCK_NsSTAGES[a][p][c3]`` (a: anchored softmax, p: ping-pong turns, c3: three consumer
    warpgroups, 192 query rows a program) -> keyword arguments."""
    found = CONFIG_SPEC.fullmatch(spec)
    if not found:
        raise ValueError(f"config: expected BLOCK_NsSTAGES[a][p][c3] such as 128s3ap, got {spec!r}")
    bn, st, a, p, c3 = found.groups()
    return dict(block_n=int(bn), stages=int(st), anchored=a == "a", pingpong=p == "p", consumers=3 if c3 else 2)


def compile_for_hopper(spec: str, dtype: torch.dtype = torch.bfloat16) -> dict:
    """sm_90 compile without a GPU: shared memory, setmaxnreg values, spills, the PTX's waits
    that leave a product in flight, and the SASS counts of wgmma and of waits for them."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from bench.attention_lab import compile_sm90, cubin_usage
    from bench.gluon_attention_lab import ptx_sequence, sass_text, sass_waits, warp_specialized_ptx

    qkv = torch.empty(8, 4500, 3, 12, HEAD_DIM, dtype=dtype)
    out = torch.empty(8, 4500, 12 * HEAD_DIM, dtype=dtype)
    args, meta, _ = kernel_args(qkv, out, **parse_config(spec))
    kernel = compile_sm90(_attn_fwd_ws, args, meta, GluonASTSource)
    ptx = kernel.asm["ptx"]
    return dict(config=spec, smem=kernel.metadata.shared, **warp_specialized_ptx(ptx), sequence=ptx_sequence(ptx),
                exps_under_pv=exps_under_second_product(sass_text(kernel)), **sass_waits(kernel),
                **cubin_usage(kernel))


def exps_under_second_product(sass: str) -> list[int]:
    """For each main-loop step in the SASS (a ``WARPGROUP.DEPBAR.LE gsb0, 0x1``: S_j retired,
    P_{j-1} V_{j-1} running), the exponentials (``MUFU.EX2``) before the next wait, the one for
    P_{j-1} V_{j-1}: the part of the softmax that overlaps that product in this warpgroup."""
    counts, running = [], None
    for line in sass.splitlines():
        if "WARPGROUP.DEPBAR" in line:
            if running is not None:
                counts.append(running)
            running = 0 if "gsb0, 0x1" in line else None
        elif running is not None and "MUFU.EX2" in line:
            running += 1
    return counts


def check_cases(qkv_of) -> list[tuple[str, torch.Tensor]]:
    """(name, qkv) cases for the GPU check: ragged N, NaN in another batch's keys and values
    (must not reach batch 0), a late key scored past the anchor (must take the redo; the name
    gives by how much, in log2 units, on the fp32 scores: over 128 overflows bf16's range)."""
    cases = [(f"B={B} N={N}", qkv_of(B, N)) for B, N in ((1, 1), (2, 77), (1, 300), (2, 4500), (1, 13500))]
    nan = qkv_of(2, 300)
    nan[1, :, 1:] = float("nan")
    cases.append(("NaN in batch 1 (batch 0 checked)", nan))
    late = qkv_of(1, 300)
    late[:, 260, 1] *= 400.0
    q, k = late.float()[0, :, 0], late.float()[0, :, 1]
    s = torch.einsum("nhd,mhd->hnm", q, k) * HEAD_DIM ** -0.5 * LOG2E
    excess = (s.amax(-1) - s[..., :128].amax(-1)).max().item()
    if excess <= 128:
        raise ValueError(f"the late key must overflow the anchor (scores 128 past it in log2 units), got {excess:.0f}")
    cases.append((f"late key {excess:.0f} past the anchor", late))
    return cases


def run_gpu(specs: list[str], check_only: bool = False) -> int:
    """Check each configuration (poisoned output, bf16 kernel bound), then, unless ``check_only``,
    time it and the package's tuned ``flash_attention`` as replayed CUDA graphs at B=8 and B=1,
    N = 4500."""
    from bench.attention_lab import random_qkv, tflops
    from brainjepa_kernels._runtime import graph_time_ms
    from brainjepa_kernels.flash_attention import attention_reference, flash_attention
    from tests.helpers import KERNEL_TOL, rel_err

    bound = KERNEL_TOL[("cuda", torch.bfloat16)]
    failed = 0
    cases = check_cases(lambda B, N: random_qkv(B, N, torch.bfloat16))
    for spec in specs:
        for name, qkv in cases:
            out = torch.full(qkv.shape[:2] + (qkv.shape[3] * HEAD_DIM, ), float("nan"), device=qkv.device,
                             dtype=qkv.dtype)
            try:
                attention_ws(qkv, **parse_config(spec), out=out)
                torch.cuda.synchronize()
            except Exception as exc:  # a lab: report and go on
                print(f"{spec} {name}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                failed += 1
                continue
            batch = slice(0, 1) if name.startswith("NaN") else slice(None)
            err = rel_err(out[batch], attention_reference(qkv[batch]))
            ok = err <= bound
            failed += not ok
            print(f"{spec} {name}: err {err:.2e} {'ok' if ok else 'WRONG'}", flush=True)
    if check_only:
        return 1 if failed else 0
    for B in (8, 1):
        qkv = random_qkv(B, 4500, torch.bfloat16)
        out = torch.empty(B, 4500, qkv.shape[3] * HEAD_DIM, device=qkv.device, dtype=qkv.dtype)
        flash_attention(qkv, out)  # tunes
        for _ in range(2):  # alternating, twice
            ms = graph_time_ms(lambda: flash_attention(qkv, out))
            print(f"B={B} flash_attention (tuned): {ms:.3f} ms {tflops(B, 4500, ms):.1f} TFLOP/s", flush=True)
            for spec in specs:
                kwargs = parse_config(spec)
                ms = graph_time_ms(lambda: attention_ws(qkv, **kwargs, out=out))
                print(f"B={B} ws {spec}: {ms:.3f} ms {tflops(B, 4500, ms):.1f} TFLOP/s", flush=True)
    return 1 if failed else 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compile-only", action="store_true")
    p.add_argument("--check-only", action="store_true", help="check correctness, time nothing")
    p.add_argument("--configs", nargs="+",
                   default=["128s3ap", "128s3a", "128s3p", "128s2ap", "64s4ap", "64s4apc3", "128s2apc3"],
                   help="BLOCK_NsSTAGES[a][p][c3]: key block 64 or 128, ring slots, a: anchored softmax, "
                        "p: ping-pong, c3: three consumer warpgroups")
    args = p.parse_args(argv)
    for spec in args.configs:
        try:
            parse_config(spec)
        except ValueError as exc:
            p.error(str(exc))
    if args.compile_only:
        from bench.gluon_attention_lab import print_compiles

        return print_compiles(args.configs, compile_for_hopper)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (or --compile-only)")
    return run_gpu(args.configs, args.check_only)


if __name__ == "__main__":
    sys.exit(main())

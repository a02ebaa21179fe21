"""Multi-head self-attention of the encoder, read straight from the packed qkv projection.

The qkv linear layer writes ``[B*N, 3*H*D]``; viewed as ``qkv`` [B, N, 3, H, D], token n of
batch b holds q, k, v of every head side by side: ``qkv[b, n, 0, h]`` is q of head h,
``qkv[b, n, 1, h]`` its k, ``qkv[b, n, 2, h]`` its v. :func:`flash_attention` reads that buffer
in place (no split, permute or contiguous copy) and writes ``out`` [B, N, H*D] with head h in
columns ``h*D:(h+1)*D``, the layout the output projection reads:

    out[b, n, h*D:(h+1)*D] = softmax(q_h k_h^T * scale)[n] @ v_h     (non-causal, all N keys)

Algorithm (FlashAttention-2 forward): a program owns a tile of query rows of one (b, h) and
streams every key/value block of that head through an online softmax in fp32 (running row
max m, row sum l, unnormalised output acc), never materialising N x N. Numerics:

* exp2 with ``scale * log2(e)`` folded into the one FFMA the exponent needs anyway,
  ``p = exp2(s * c - m)`` with ``m`` kept in the log2 domain (folding it into Q instead would
  save no instruction and add a rounding of Q);
* products q k^T and p v on the tensor cores with fp32 accumulation; bf16/fp16 inputs: p is
  rounded to the input dtype for the second product (unchanged by the fp32 setting below).
  fp32 inputs: both products run as 3xTF32 (``input_precision="tf32x3"``: each operand split
  into a tf32 high part and a tf32 remainder, three tf32 products: a relative error of about
  2**-21 per product instead of tf32's 2**-11, which gave 1.5e-3 on the output), so fp32 is
  about as exact as fp32 arithmetic; the price is three tf32 products, each at half bf16's
  tensor-core rate: expect fp32 about 3x slower than bf16 or worse (not yet measured). Under
  the interpreter fp32 is plain fp32;
* the N % BLOCK_N ragged keys are handled by one masked step after the main loop, so the main
  loop has no masks; query rows past N are computed from zeros and never stored. Rows past N
  are never read from another batch: masked pointer loads, or TMA boxes that the descriptor's
  per-batch shape zero-fills;
* anchored softmax (variants ``*_anchored``, :func:`_attend_keys`): the online softmax needs m
  only to keep exp2 in range, not to be the exact running max. Any state with
  ``l = sum exp2(s c - m)`` and ``acc = sum exp2(s c - m) v`` is valid, and the final
  ``acc / l`` does not depend on m. So m is set once, to the row max of the first key block
  (the anchor), and kept: per score there is no max, and per block no rescale of acc and l,
  about a fifth of the loop's instructions. A later key may score above the anchor: p > 1 is
  exact in floating point up to p ~ 2**127 (fp32 arithmetic, bf16 p) or 65504 (fp16 p). A
  program whose rows overflow (non-finite l or acc: a key more than ~88 nats above the
  anchor's best, or ~11 nats in fp16) runs again with the running max, so results are never
  worse than the online softmax's, only slower on such rows. p never drops below the online
  version's relative precision: the row max of p is >= 1 instead of = 1.

Performance model (H100, bf16, D = 64): per (query, key) pair the two products cost as much
tensor-core time as one MUFU ``ex2`` costs, and the ~7 other instructions per score (FFMA, max,
sum, convert, rescale) about as much issue time again, so speed comes from keeping several warp
groups per SM out of phase: Triton waits for each wgmma before its result is used, so the
exponentials of one warp group only overlap the products of *another* program on the SM.

Variants (:data:`VARIANTS`) switch the compile-time options of the one kernel, :func:`_attn_fwd`:

* ``loader``: ``"ptr"`` pointer loads (masked tail, cp.async pipelining); ``"tma"`` host-side
  tensor descriptors, a 3-D view [B, N, 3*H*D] with boxes [1, rows, D], so a box running past N
  is zero-filled per batch.
* ``split=2``: two query sub-tiles per program share each K/V block, each with its own
  softmax chain: 128 rows of K/V reuse at a 64-row register footprint (2-3 programs per SM).
* ``q_in_registers``: Q is the register operand of ``q k^T`` (multiplied once by a power of two
  in registers, see :func:`_attn_fwd`) instead of a shared-memory tile read at every key block.

* ``"overlap"`` (:data:`OVERLAP`): not this kernel but the Gluon kernel of
  :mod:`kernels.flash_attention_hopper`, which keeps the next block's ``q k^T`` on the tensor
  cores during this block's softmax; sm_90 GPUs, fp16/bf16, contiguous ``qkv`` only.

* ``"overlap_anchored"`` (:data:`OVERLAP_ANCHORED`): the Gluon kernel with the anchored softmax.

By default :func:`flash_attention` tunes over the configurations of ``"pingpong"``,
``"tma_anchored"`` and ``"tma_anchored_qreg"`` (:data:`DEFAULT_VARIANTS`), plus both Gluon
variants where they can run, and keeps the fastest per shape, timed on the first call's own
inputs (so inputs that overflow the anchor steer it to the online ``pingpong``). On an H100 (bf16,
2026-11-27) its picks for a batch of 8 scans alternate between ``tma_anchored`` 128x64 and
``tma_anchored_qreg`` 64x64 (within 2% of each other, in the labs and in the encoder); for one
scan it picks ``tma_anchored_qreg`` 64x64 (428-440 TFLOP/s in the labs against 400 for the best
of the others). ``pingpong_anchored`` is left out of the default: the tuner picked it at B=8 now
and then, and the encoder ran 0.9-1.3% slower with it alone than with either of the other two
(session 12).

Head dimension 64 (every Brain-JEPA variant); any H, B, N >= 1.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from triton.compiler import CompiledKernel
from triton.tools.tensor_descriptor import TensorDescriptor

from ._runtime import INTERPRET, check_dtype, check_out, select_config

#: Channels per head (every Brain-JEPA variant); ``_D`` is the same for the kernels.
HEAD_DIM = 64
_D = tl.constexpr(HEAD_DIM)

#: log2(e): exp(x) = exp2(x * LOG2E).
LOG2E = 1.4426950408889634

#: Tensor-core precision of f32 x f32 products (3xTF32, see the module docstring); products of
#: fp16/bf16 operands are unaffected, the interpreter ignores it.
_F32_PRECISION = tl.constexpr("tf32x3")


@triton.jit
def _load_tile(src, b, row, col, n_rows, stride_n,
               ROWS: tl.constexpr, LOADER: tl.constexpr, MASKED: tl.constexpr):
    """Rows [row, row + ROWS) x columns [col, col + D) of batch b of qkv viewed as
    [B, N, 3*H*D]; rows at or past ``n_rows`` read as zero (MASKED; TMA always).

    ``src``: LOADER "ptr": pointer to qkv[b, 0] (row stride ``stride_n``); "tma": the 3-D host
    descriptor.
    """
    if LOADER == "ptr":
        rows = row + tl.arange(0, ROWS)
        ptrs = src + rows[:, None] * stride_n + (col + tl.arange(0, _D))[None, :]
        if MASKED:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            tile = tl.load(ptrs)
    else:
        tile = src.load([b, row, col]).reshape([ROWS, _D])
    return tile


@triton.jit
def _store_tile(dst, b, row, col, n_rows, stride_n, tile, LOADER: tl.constexpr):
    """out[b, row:row + ROWS, col:col + D] = tile, rows past ``n_rows`` dropped; ``dst`` as
    ``src`` of :func:`_load_tile` for ``out`` [B, N, H*D]."""
    ROWS: tl.constexpr = tile.shape[0]
    if LOADER == "ptr":
        rows = row + tl.arange(0, ROWS)
        ptrs = dst + rows[:, None] * stride_n + (col + tl.arange(0, _D))[None, :]
        tl.store(ptrs, tile, mask=rows[:, None] < n_rows)
    else:
        dst.store([b, row, col], tile.reshape([1, ROWS, _D]))


@triton.jit
def _attend(q, k_t, v, m_i, l_i, acc, qk_scale, start, N, MASKED: tl.constexpr, ANCHORED: tl.constexpr = False):
    """One online-softmax step of a query tile over one key block.

    q [BM, D], k_t [D, BN], v [BN, D] (input dtype); m_i [BM] running max of the scaled scores in
    log2 units, l_i [BM] running sum of p, acc [BM, D] running p @ v (all fp32). MASKED: key
    columns ``start + j >= N`` get p = 0. ANCHORED: keep m_i (the anchor) instead of raising it to
    this block's max, so no row max, no rescaling; p may exceed 1 (see :func:`_attend_keys`).
    Returns the updated (m_i, l_i, acc).
    """
    s = tl.dot(q, k_t, input_precision=_F32_PRECISION)
    if MASKED:
        cols = start + tl.arange(0, k_t.shape[1])
        s = tl.where(cols[None, :] < N, s, float("-inf"))
    if ANCHORED:
        m_new = m_i
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.math.exp2(m_i - m_new)
        acc = acc * alpha[:, None]
        l_i = l_i * alpha
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    l_i += tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=_F32_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attend_keys(q0, q1, kv_in, b, k_col, v_col, qk_scale, N, stride_n,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, LOADER: tl.constexpr,
                 ANCHORED: tl.constexpr):
    """(l0, acc0, l1, acc1): the row sums and unnormalised outputs of query tiles q0 and q1 (q1
    only if SPLIT == 2, else unused) over all N keys; out = acc / l.

    Keys [0, n_main) in the pipelined loop, unmasked, then the ragged rest in one masked step.
    ANCHORED: the first full key block runs an ordinary online step from m = -inf, which sets m to
    its row max (the anchor); the other full blocks keep that anchor (:func:`_attend` with
    ANCHORED): per score no max and per block no rescaling of acc and l. Any (m, l, acc) with
    l = sum exp2(s*c - m) and acc = sum exp2(s*c - m) v is a valid state of the online softmax,
    so the result is exact as long as nothing overflows: a later key may score up to ~2**127
    (fp32, bf16 p) or 2**15 (fp16 p) times the anchor's exp. The caller checks for overflow
    (non-finite l or acc) and, where it happened, runs this again with ANCHORED False.
    """
    m0 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l0 = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, _D], tl.float32)
    m1 = m0
    l1 = l0
    acc1 = acc0
    n_main = (N // BLOCK_N) * BLOCK_N
    lo = 0
    if ANCHORED:
        lo = BLOCK_N
        if n_main > 0:
            k = _load_tile(kv_in, b, 0, k_col, N, stride_n, BLOCK_N, LOADER, False)
            v = _load_tile(kv_in, b, 0, v_col, N, stride_n, BLOCK_N, LOADER, False)
            m0, l0, acc0 = _attend(q0, k.T, v, m0, l0, acc0, qk_scale, 0, N, False)
            if SPLIT == 2:
                m1, l1, acc1 = _attend(q1, k.T, v, m1, l1, acc1, qk_scale, 0, N, False)
    for start in tl.range(lo, n_main, BLOCK_N):
        k = _load_tile(kv_in, b, start, k_col, N, stride_n, BLOCK_N, LOADER, False)
        v = _load_tile(kv_in, b, start, v_col, N, stride_n, BLOCK_N, LOADER, False)
        m0, l0, acc0 = _attend(q0, k.T, v, m0, l0, acc0, qk_scale, start, N, False, ANCHORED)
        if SPLIT == 2:
            m1, l1, acc1 = _attend(q1, k.T, v, m1, l1, acc1, qk_scale, start, N, False, ANCHORED)
    if n_main < N:
        k = _load_tile(kv_in, b, n_main, k_col, N, stride_n, BLOCK_N, LOADER, True)
        v = _load_tile(kv_in, b, n_main, v_col, N, stride_n, BLOCK_N, LOADER, True)
        m0, l0, acc0 = _attend(q0, k.T, v, m0, l0, acc0, qk_scale, n_main, N, True)
        if SPLIT == 2:
            m1, l1, acc1 = _attend(q1, k.T, v, m1, l1, acc1, qk_scale, n_main, N, True)
    return l0, acc0, l1, acc1


@triton.jit
def _overflowed(l_i, acc):
    """Number of rows whose sum l or output acc is not finite (inf, or NaN)."""
    finite = (l_i < float("inf")) & (tl.sum((tl.abs(acc) < float("inf")).to(tl.int32), 1) == acc.shape[1])
    return tl.sum((~finite).to(tl.int32), 0)


@triton.jit(do_not_specialize=["N", "H"])
def _attn_fwd(q_src, kv_src, o_dst, qk_scale, N, H,
              stride_b, stride_n, stride_ob, stride_on,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, LOADER: tl.constexpr,
              ANCHORED: tl.constexpr, Q_IN_REGISTERS: tl.constexpr, Q_SCALE: tl.constexpr):
    """Attention of ``qkv`` [B, N, 3, H, D] into ``out`` [B, N, H*D].

    LOADER "ptr": ``q_src`` = ``kv_src`` = qkv (batch stride ``stride_b``, token stride
    ``stride_n``, the (3, H, D) part packed), ``o_dst`` = out (strides ``stride_ob``,
    ``stride_on``). LOADER "tma": ``q_src``, ``kv_src`` host descriptors over qkv as
    [B, N, 3*H*D] with boxes [1, BLOCK_M, D] and [1, BLOCK_N, D], ``o_dst`` one over out as
    [B, N, H*D] with boxes [1, BLOCK_M, D]. ``qk_scale`` = softmax scale * log2(e) / Q_SCALE.
    Q_IN_REGISTERS: the query tiles are multiplied by Q_SCALE (a power of two: exact) once; being
    values computed in registers rather than loaded tiles, they become the register operand of
    the q k^T wgmma instead of being read from shared memory at every key block. (A runtime
    scale instead of the constexpr made ptxas wait after every wgmma of the kernel.)

    Program ``(b * H + h) * n_m + pid_m`` computes out[b, rows, h*D:(h+1)*D] for the
    SPLIT * BLOCK_M query rows from pid_m * SPLIT * BLOCK_M of head h: numbered head by head, so
    programs running together work on few heads and those heads' K and V stay in L2.
    """
    n_m = tl.cdiv(N, SPLIT * BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % n_m
    b = pid // n_m // H
    h = pid // n_m % H
    if LOADER == "ptr":
        q_in = q_src + b.to(tl.int64) * stride_b
        kv_in = q_in
        o_out = o_dst + b.to(tl.int64) * stride_ob
    else:
        q_in = q_src
        kv_in = kv_src
        o_out = o_dst
    q_col = h * _D
    k_col = (H + h) * _D
    v_col = (2 * H + h) * _D
    row0 = pid_m * (SPLIT * BLOCK_M)

    q0 = _load_tile(q_in, b, row0, q_col, N, stride_n, BLOCK_M, LOADER, True)
    if Q_IN_REGISTERS:
        q0 = q0 * Q_SCALE
    q1 = q0
    if SPLIT == 2:
        q1 = _load_tile(q_in, b, row0 + BLOCK_M, q_col, N, stride_n, BLOCK_M, LOADER, True)
        if Q_IN_REGISTERS:
            q1 = q1 * Q_SCALE
    l0, acc0, l1, acc1 = _attend_keys(q0, q1, kv_in, b, k_col, v_col, qk_scale, N, stride_n,
                                      BLOCK_M, BLOCK_N, SPLIT, LOADER, ANCHORED)
    if ANCHORED:
        bad = _overflowed(l0, acc0)
        if SPLIT == 2:
            bad += _overflowed(l1, acc1)
        if bad > 0:  # a key scored far above the anchor (or NaN inputs): redo with the running max
            l0, acc0, l1, acc1 = _attend_keys(q0, q1, kv_in, b, k_col, v_col, qk_scale, N, stride_n,
                                              BLOCK_M, BLOCK_N, SPLIT, LOADER, False)

    out_dtype = q0.dtype
    _store_tile(o_out, b, row0, q_col, N, stride_on, (acc0 * (1.0 / l0)[:, None]).to(out_dtype), LOADER)
    if SPLIT == 2:
        _store_tile(o_out, b, row0 + BLOCK_M, q_col, N, stride_on, (acc1 * (1.0 / l1)[:, None]).to(out_dtype),
                    LOADER)


# ---------------------------------------------------------------------------------------------
# Variants and launcher
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttnConfig:
    """Launch shape: ``block_m`` query rows per sub-tile (a program owns ``split * block_m``),
    ``block_n`` keys per step, ``num_warps``, ``num_stages`` (K/V buffers in flight), and
    ``maxnreg``: a cap on registers per thread (None: the compiler's choice), so that one more
    program fits on an SM (Triton kernels only; ignored by the interpreter)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    maxnreg: Optional[int] = None


@dataclass(frozen=True)
class Variant:
    """Compile-time options of :func:`_attn_fwd` and the configurations tuned over on the GPU
    (``configs`` for fp16/bf16, ``configs_fp32`` for fp32 inputs)."""

    loader: str
    split: int
    configs: tuple[AttnConfig, ...]
    configs_fp32: tuple[AttnConfig, ...]
    anchored: bool = False
    q_in_registers: bool = False

    def meta(self) -> dict:
        """Compile-time arguments of :func:`_attn_fwd` (besides the block sizes)."""
        return dict(SPLIT=self.split, LOADER=self.loader, ANCHORED=self.anchored, Q_IN_REGISTERS=self.q_in_registers)

    def configs_for(self, dtype: torch.dtype) -> tuple[AttnConfig, ...]:
        return self.configs_fp32 if dtype == torch.float32 else self.configs


#: name -> variant. H100, bf16, head dim 64, TFLOP/s at qkv [8, 4500, 3, 12, 64] | [1, 4500, ...]
#: with each variant's best configuration. fp32 (3xTF32) configurations: the ones that compile
#: for sm_90 without spilling registers (the pingpong pair spills in every shape tried: two
#: query sub-tiles, each split into high and low tf32 parts, do not fit; its one fp32
#: configuration is the least bad).
VARIANTS: dict[str, Variant] = {
    # The textbook loop over the packed layout, plus exp2 folding and an unmasked main loop: the
    # baseline (397 | 319 with 128x64 w4 s3).
    "ptr": Variant("ptr", 1, configs=(AttnConfig(128, 64, 4, 3), AttnConfig(128, 128, 8, 3)),
                   configs_fp32=(AttnConfig(128, 32, 8, 2), AttnConfig(64, 32, 4, 3))),
    # TMA loads: no address arithmetic or cp.async bookkeeping in the loop, bulk async copies
    # (427 | 350 with 64x128 w4 s3: 64-row programs, twice as many for the few tiles at B=1).
    # Two lab runs of 2026-11-27 (session 4, `labs/attention_lab_configs_*` of the 497af3d
    # results), B=8 | B=1: 64x128 w4 s3 414-433 | 348-350; 64x64 w4 s3 406-409 | 357-359 (the
    # best at B=1 in both); 64x128 w4 s2 (3 programs per SM) 426-447 | 341-346; 128x64 w8 s3
    # 421-440 | 347-348. 128x64 w4 s3 (399-401 | 326-331) dropped.
    "tma": Variant("tma", 1, configs=(AttnConfig(64, 128, 4, 3), AttnConfig(64, 64, 4, 3), AttnConfig(64, 128, 4, 2),
                                      AttnConfig(128, 64, 8, 3)),
                   configs_fp32=(AttnConfig(128, 64, 8, 2), AttnConfig(64, 64, 4, 2))),
    # Two 64-row sub-tiles per program share each K/V block, each with its own softmax chain:
    # 128 rows of K/V reuse (half the L2 traffic of 64-row programs) with 4 warps and few enough
    # registers for 2-3 programs per SM, whose exponentials and products interleave
    # (432 | 315 with 64x64 w4 s3; 433-441 | 313-320 in the session-4 runs, where 64x128 w4 s2,
    # 391-400 | 311-316, was never best and was dropped; so were s2, s4 and 64x32 tries).
    "pingpong": Variant("tma", 2, configs=(AttnConfig(64, 64, 4, 3),),
                        configs_fp32=(AttnConfig(64, 32, 4, 2),)),
    # The same two with the softmax anchored at the first key block's row max (_attend_keys):
    # no row max and no rescaling per block after the first; redone with the running max where
    # a later key overflowed. H100 labs of 2026-11-27 (session 6, do_bench), B=8 | B=1: tma
    # 128x64 w8 s3 482.6-491.3 | 397.5-399.3, 128x64 w4 s3 494.1 | 388.6, 64x128 w4 s3
    # 455.9-461.5 | 398.7-403.7, 64x128 w4 s2 456.9-459.3 | 362.4-365.9, 64x64 w4 s3 459.4-461.2 |
    # 394.2-398.4 (dropped: never best); 128x64 w8 s4 475.8 | 387.7; 128x128 w8 s2/s3, 128x64 w8 s2,
    # 128x32 w8 s4 and 256x64 w16 s3 282-408, dropped. pingpong 64x64 w4 s3 460.5-463.7 | 373-374
    # at 177 registers (two programs per SM), 493.8 | 364.2 capped at 168 (three per SM, no
    # spills), kept capped (64x128 w4 s2 437.2 and 128x64 w8 s3 377.1 dropped). Plain pingpong:
    # 454.4 | 315.3.
    "tma_anchored": Variant("tma", 1, configs=(AttnConfig(128, 64, 8, 3), AttnConfig(128, 64, 4, 3),
                                               AttnConfig(64, 128, 4, 3), AttnConfig(64, 128, 4, 2)),
                            configs_fp32=(AttnConfig(128, 64, 8, 2), AttnConfig(64, 64, 4, 2)), anchored=True),
    "pingpong_anchored": Variant("tma", 2, configs=(AttnConfig(64, 64, 4, 3, maxnreg=168),),
                                 configs_fp32=(AttnConfig(64, 32, 4, 2),), anchored=True),
    # tma_anchored with Q as the register operand of q k^T (see :func:`_attn_fwd`): Q is not
    # read from shared memory at every key block, and its shared-memory tile is gone, so 64x64
    # w4 s3 (123 registers, 48 KB) runs four programs per SM instead of three. H100 lab of
    # 2026-11-27 (session 11, run 2), B=8 | B=1: 64x64 w4 s3 478.5 | 428.3 against tma_anchored's
    # best 474.9 | 399.8 in the same run; 128x64 w8 s3 464.3 | 380.7, 64x128 w4 s3 441.4 | 398.0
    # and 64x128 w4 s2 374.3 | 296.8, dropped. Capped at 96 registers (five per SM) it spills.
    # Not for pingpong_anchored: its two register-resident sub-tiles spill at 168 registers and
    # ptxas then waits after every wgmma (offline sm_90 compile).
    "tma_anchored_qreg": Variant("tma", 1, configs=(AttnConfig(64, 64, 4, 3),),
                                 configs_fp32=(AttnConfig(128, 64, 8, 2),), anchored=True, q_in_registers=True),
}

#: Variants whose configurations :func:`flash_attention` tunes over unless told one variant.
DEFAULT_VARIANTS = ("pingpong", "tma_anchored", "tma_anchored_qreg")

#: The Gluon kernel of :mod:`kernels.flash_attention_hopper` under its variant names (name ->
#: whether its softmax is anchored, as in :func:`_attend_keys`); not keys of :data:`VARIANTS`.
OVERLAP = "overlap"
OVERLAP_ANCHORED = "overlap_anchored"
GLUON_VARIANTS = {OVERLAP: False, OVERLAP_ANCHORED: True}

#: Gluon variants tuned over beside :data:`DEFAULT_VARIANTS` where they can run
#: (:func:`overlap_supports`).
DEFAULT_GLUON_VARIANTS = (OVERLAP, OVERLAP_ANCHORED)

#: The one configuration under the interpreter: small blocks, every code path still taken.
INTERPRET_CONFIG = AttnConfig(16, 16, 4, 1)


def _variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"variant: expected one of {', '.join((*VARIANTS, *GLUON_VARIANTS))}, got {name!r}")
    return VARIANTS[name]


@functools.lru_cache(maxsize=None)
def _overlap_module():
    """:mod:`kernels.flash_attention_hopper`, or None where this Triton has no Gluon for Hopper
    (imported on first use: it imports this module)."""
    try:
        from . import flash_attention_hopper
    except ImportError:
        return None
    return flash_attention_hopper


def overlap_supports(qkv: torch.Tensor) -> bool:
    """Whether the Gluon kernel (:data:`GLUON_VARIANTS`) can run ``qkv``: sm_90 GPU, fp16/bf16,
    contiguous."""
    module = _overlap_module()
    return module is not None and module.supports(qkv)


def candidates(dtype: torch.dtype, variant: Optional[str] = None, configs: Optional[Sequence[AttnConfig]] = None,
               overlap: bool = False) -> tuple[tuple[str, AttnConfig], ...]:
    """(variant, configuration) pairs :func:`flash_attention` tunes over for inputs of ``dtype``:
    those of ``variant``, or of every one of :data:`DEFAULT_VARIANTS` (their union) followed, with
    ``overlap`` (the caller checked :func:`overlap_supports`), by the Gluon kernel's own
    configurations under each of :data:`DEFAULT_GLUON_VARIANTS`. ``configs`` replaces each
    variant's own list (the default then leaves the Gluon variants out: their block shapes are
    restricted); under the interpreter each variant gets :data:`INTERPRET_CONFIG` and the first
    pair is used untimed."""
    if variant in GLUON_VARIANTS:
        return tuple((variant, cfg) for cfg in (configs or _overlap_module().CONFIGS))
    names = (variant,) if variant is not None else DEFAULT_VARIANTS
    for name in names:
        _variant(name)
    if configs:
        return tuple((name, cfg) for name in names for cfg in configs)
    if INTERPRET:
        return tuple((name, INTERPRET_CONFIG) for name in names)
    pairs = tuple((name, cfg) for name in names for cfg in VARIANTS[name].configs_for(dtype))
    if overlap and variant is None:
        pairs += tuple((name, cfg) for name in DEFAULT_GLUON_VARIANTS for cfg in _overlap_module().CONFIGS)
    return pairs


def _check_qkv(qkv: torch.Tensor) -> tuple[int, int, int]:
    check_dtype(qkv, "qkv")
    if qkv.dim() != 5 or qkv.shape[2] != 3 or qkv.shape[4] != HEAD_DIM:
        raise ValueError(f"qkv: expected [B, N, 3, H, {HEAD_DIM}], got {tuple(qkv.shape)}")
    B, N, _, H, D = qkv.shape
    if qkv.stride()[2:] != (H * D, D, 1):
        raise ValueError(f"qkv: the (3, H, D) part of each token must be packed (strides {(H * D, D, 1)}), "
                         f"got strides {qkv.stride()}")
    return B, N, H


def _check_tma(t: torch.Tensor, name: str) -> None:
    """Tensor descriptors need a 16-byte aligned base and 16-byte multiple strides."""
    if t.data_ptr() % 16 or any(st * t.element_size() % 16 for st in t.stride()[:2]):
        raise ValueError(f"{name}: TMA variants need a 16-byte aligned base and batch/token strides that are "
                         f"multiples of 16 bytes (strides {t.stride()}, {t.dtype}); use variant='ptr'")


def kernel_args(qkv: torch.Tensor, out: torch.Tensor, cfg: AttnConfig, variant: str,
                sm_scale: Optional[float] = None) -> tuple[tuple, dict]:
    """Positional and keyword arguments of :func:`_attn_fwd` for one launch (TMA variants: host
    descriptors over ``qkv`` and ``out``, after the alignment checks)."""
    spec = _variant(variant)
    B, N, _, H, D = qkv.shape
    scale = D ** -0.5 if sm_scale is None else sm_scale
    # Q_IN_REGISTERS: Q is multiplied by the power of two nearest the scale (exact), the rest stays in qk_scale.
    q_scale = 2.0 ** round(math.log2(scale)) if spec.q_in_registers and scale > 0 else 1.0
    qk_scale = scale * LOG2E / q_scale
    if spec.loader == "tma":
        _check_tma(qkv, "qkv")
        _check_tma(out, "out")
        qkv3 = (B, N, 3 * H * D), (qkv.stride(0), qkv.stride(1), 1)
        q_src = TensorDescriptor(qkv, *qkv3, block_shape=[1, cfg.block_m, D])
        kv_src = TensorDescriptor(qkv, *qkv3, block_shape=[1, cfg.block_n, D])
        o_dst = TensorDescriptor(out, (B, N, H * D), (out.stride(0), out.stride(1), 1), block_shape=[1, cfg.block_m, D])
    else:
        q_src, kv_src, o_dst = qkv, qkv, out
    args = (q_src, kv_src, o_dst, qk_scale, N, H, qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1))
    meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **spec.meta(), Q_SCALE=q_scale, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)
    if cfg.maxnreg is not None and not INTERPRET:
        meta["maxnreg"] = cfg.maxnreg
    return args, meta


def launch(qkv: torch.Tensor, out: torch.Tensor, cfg: AttnConfig, variant: str,
           sm_scale: Optional[float] = None) -> Optional[CompiledKernel]:
    """One launch of ``variant`` with the fixed configuration ``cfg`` (no tuning, no checks of
    qkv and out beyond TMA alignment; see :func:`flash_attention`). Returns Triton's compiled
    kernel (``n_regs``, ``n_spills``, ``asm``), or None under the interpreter and for the
    :data:`GLUON_VARIANTS`."""
    if variant in GLUON_VARIANTS:
        _overlap_module().launch(qkv, out, cfg, sm_scale, anchored=GLUON_VARIANTS[variant])
        return None
    args, meta = kernel_args(qkv, out, cfg, variant, sm_scale)
    B, N, _, H, _ = qkv.shape
    grid = (triton.cdiv(N, VARIANTS[variant].split * cfg.block_m) * B * H,)
    return _attn_fwd[grid](*args, **meta)


def flash_attention(qkv: torch.Tensor, out: Optional[torch.Tensor] = None, sm_scale: Optional[float] = None, *,
                    variant: Optional[str] = None, configs: Optional[Sequence[AttnConfig]] = None) -> torch.Tensor:
    """Non-causal softmax attention of the packed projection ``qkv`` [B, N, 3, H, 64].

    qkv: fp32/fp16/bf16, e.g. ``linear_out.view(B, N, 3, H, 64)``; any batch and token strides,
    the (3, H, 64) part of a token packed (TMA variants: 16-byte aligned base and strides).
    out: [B, N, H*64] contiguous, qkv's dtype, not overlapping qkv; allocated when None.
    sm_scale: default 64**-0.5. variant: a key of :data:`VARIANTS` or :data:`GLUON_VARIANTS` to
    force one variant (default: tune over the union of :data:`DEFAULT_VARIANTS`' configurations
    and, where :func:`overlap_supports` holds, those of :data:`DEFAULT_GLUON_VARIANTS`).
    configs: launch shapes to tune over instead of the variants' own (see :func:`candidates`);
    the fastest (variant, configuration) pair is picked on first use of each (B, N, H, dtype).
    Returns ``out``.
    """
    B, N, H = _check_qkv(qkv)
    overlap = overlap_supports(qkv)
    if variant in GLUON_VARIANTS and not overlap:
        raise ValueError(f"variant {variant!r} needs an sm_90 GPU, fp16/bf16 and a contiguous qkv "
                         f"(got {qkv.dtype} on {qkv.device}, strides {qkv.stride()})")
    pairs = candidates(qkv.dtype, variant, configs, overlap)
    if out is None:
        out = torch.empty((B, N, H * HEAD_DIM), device=qkv.device, dtype=qkv.dtype)
    check_out(out, (B, N, H * HEAD_DIM), qkv.dtype, qkv.device)
    if out.numel() == 0:
        return out

    def run(pair: tuple[str, AttnConfig]) -> None:
        launch(qkv, out, pair[1], pair[0], sm_scale)

    run(select_config(("flash_attention", B, N, H, qkv.dtype), pairs, lambda: run))
    return out


def attention_reference(qkv: torch.Tensor, sm_scale: Optional[float] = None) -> torch.Tensor:
    """``softmax(q @ k^T * scale) @ v`` per head in float32 from ``qkv`` [B, N, 3, H, D];
    returns [B, N, H*D] float32 (the function :func:`flash_attention` must equal)."""
    B, N, _, H, D = qkv.shape
    q, k, v = qkv.float().permute(2, 0, 3, 1, 4)  # each [B, H, N, D]
    scale = D ** -0.5 if sm_scale is None else sm_scale
    p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    return (p @ v).transpose(1, 2).reshape(B, N, H * D)

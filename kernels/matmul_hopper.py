"""The encoder's matmuls for Hopper (sm_90) in Gluon, warp-specialized so that the epilogue of
one tile runs while the tensor cores work on the next: the overlap the Triton kernels cannot
express.

One persistent kernel, two epilogues, each the contract of a Triton module that tunes over this
kernel beside its own configurations where :func:`supports` holds (sm_90 GPU, fp16/bf16):

* ``"layernorm"``: :func:`kernels.layernorm_linear.layernorm_linear_folded` (qkv, fc1),
  ``out = act(rstd * (x @ W'^T - mean * c) + b')`` from raw rows x [M, K], the folded weight
  W' [N, K], per-row (mean, rstd), per-column colsum c and bias b' (fp32); the function it must
  equal is :func:`kernels.layernorm_linear.layernorm_linear_reference`;
* ``"residual"``: :func:`kernels.linear_residual.linear_residual` (proj, fc2),
  ``out = residual + x @ w^T + b``, out possibly the residual itself; the function it must equal
  is :func:`kernels.linear_residual.linear_residual_reference`.

Why a second kernel: in the Triton kernels the same warps run the main loop and the epilogue, so
the tensor cores idle while a tile's epilogue runs. For fc1 that is the erf GELU, ~20
instructions an element: the Triton kernel reached 448-455 TFLOP/s on the H100 against ~600 for
the bare product, its tensor pipe active 48% of the time (Nsight Compute, session 7). Here each
persistent program (one per SM) has three partitions (``gl.warp_specialize``):

* a producer warp streams the K steps of the program's tiles through a ring of ``STAGES``
  shared-memory slots (TMA, ``ready`` / ``empty`` barriers per slot);
* two consumer warpgroups take the program's tiles in turn (tile i to consumer i % 2), each
  running the whole BLOCK_M x BLOCK_N tile: wgmma from the ring with one product in flight, the
  slot of the previous K step released as soon as its product retired; then the epilogue,
  through a shared-memory tile of its own and a TMA store. The epilogue's vectors are loaded,
  and the residual tile is requested (TMA, into that shared-memory tile), before the main loop,
  so their latency hides behind it.

The consumers' main loops alternate (``turn`` barriers, CUTLASS's "ping-pong" schedule): a
consumer starts its tile's main loop once the other has issued its last product, so one
consumer's epilogue runs during the other's main loop, and the ring's slots are taken in the
order the producer fills them (a consumer never waits on a slot's barrier more than one phase
ahead, which mbarrier parity could not tell apart).

In-place residual (``out`` is ``residual``): each tile's residual is read into shared memory
before the same program writes that tile, and no other program touches it.

Row statistics in chunks (``chunk_stats``): the residual epilogue can also write, for each row
of its output tile (the values as stored), the mean and M2 (sum of squared deviations, two-pass)
over the tile's 128 columns, [M, cdiv(N, 128), 2] float32; the LayerNorm epilogue of the next
matmul loads a row's chunks in one round before its main loop and merges them after it (Chan's
combination, exact for any spread of chunk means) instead of reading (mean, rstd) from
``row_stats``, whose extra read of x it saves. Formats and the PyTorch functions they must equal:
:func:`kernels.layernorm.chunk_stats_reference`, :func:`kernels.layernorm.merge_chunk_stats`.
The encoder uses them for batches of 32768 tokens or more (B=8: 3.119 against 3.158 ms per scan
with ``row_stats``; smaller batches lose, since proj and fc2 then must run on this kernel).

Measured (H100 80GB HBM3, bf16, CUDA-graph replay, TFLOP/s against the tuned Triton kernel's best
in the same run, 2026-11-27, ``bench/linear_lab``, ``bench/results/2026-11-27-h100-ws/labs/``):
at B=8 (M = 36000) qkv 595.7 against 557.0, fc1 489.3 against 448.6, proj 471.8 against 434.8,
fc2 568.6 against 574.7 (the tuner keeps the Triton kernel); at B=1 qkv 542.4 against 516.6, fc1
434.4 against 417.9, proj and fc2 no gain. (The first version, with the epilogue's vectors
loaded after the main loop and the LayerNorm epilogue only: fc1 501.9 against 454.7, qkv 553.4
against 559.2 at B=8, in the run before.) Encoder bf16 A/B on the same card, two alternating
rounds: B=8 3.126-3.163 ms per scan with it offered against 3.191-3.194 without.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from . import layernorm
from ._runtime import grouped_tile, is_hopper, num_sms
from .layernorm_linear import gelu

EPILOGUES = ("layernorm", "residual")

#: Whether the Triton modules' tuners offer this kernel (``bench.variant_ab`` turns it off for
#: its A/B arms).
OFFERED = True

#: Columns per chunk of the row statistics the residual epilogue writes and the LayerNorm
#: epilogue merges (``[M, cdiv(N, STATS_CHUNK), 2]``: mean and M2 per chunk; the format of
#: :func:`kernels.layernorm.chunk_stats_reference`): the tile width.
STATS_CHUNK = gl.constexpr(layernorm.STATS_CHUNK)

#: Most chunks a LayerNorm epilogue merges (rows of up to 1024 columns, :data:`kernels.layernorm.MAX_K`).
MAX_CHUNKS = gl.constexpr(layernorm.MAX_K // layernorm.STATS_CHUNK)


@gluon.jit
def _producer(x_desc, w_desc, out_desc, res_desc, a_bufs, b_bufs, out_bufs, ready, empty, turn, res_bar, vec0_ptr,
              vec1_ptr, stats_ptr, M, N, K, eps, GROUP_M: gl.constexpr, EPILOGUE: gl.constexpr, GELU: gl.constexpr,
              STATS: gl.constexpr, ROLE: gl.constexpr):
    """One warp (ROLE 2; the worker partitions share one signature): the K steps of this
    program's tiles (tiles pid, pid + P, ...) into the ring, in order; step t into slot
    t % STAGES once the consumer released the slot's previous use."""
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    STAGES: gl.constexpr = a_bufs.shape[0]
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    k_steps = gl.cdiv(K, BLOCK_K)
    step = 0
    for tile in range(gl.program_id(0), num_pid_m * num_pid_n, gl.num_programs(0)):
        pid_m, pid_n = grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        for ki in range(k_steps):
            slot = step % STAGES
            mbarrier.wait(empty.index(slot), ((step // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1
            mbarrier.expect(ready.index(slot), x_desc.block_type.nbytes + w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(x_desc, [pid_m * BLOCK_M, ki * BLOCK_K], ready.index(slot),
                                            a_bufs.index(slot))
            tma.async_copy_global_to_shared(w_desc, [pid_n * BLOCK_N, ki * BLOCK_K], ready.index(slot),
                                            b_bufs.index(slot))
            step += 1


@gluon.jit
def _store_chunk_stats(y, stats_ptr, off_m, pid_n, M, N):
    """Write the statistics of the output tile ``y`` [BLOCK_M, BLOCK_N] (the stored values, zero
    past column N) at rows off_m.. and column chunk ``pid_n`` into ``stats_ptr``
    [M, cdiv(N, BLOCK_N), 2]: (mean, M2 = sum of squared deviations) over the chunk's
    min(BLOCK_N, N - pid_n * BLOCK_N) columns, two-pass."""
    BLOCK_M: gl.constexpr = y.shape[0]
    BLOCK_N: gl.constexpr = y.shape[1]
    gl.static_assert(BLOCK_N == STATS_CHUNK, "chunk statistics need tiles STATS_CHUNK wide")
    n_c = gl.minimum(N - pid_n * BLOCK_N, BLOCK_N).to(gl.float32)
    # In column halves (a register-only split of the wgmma layout), to keep register pressure low.
    lo, hi = gl.split(gl.permute(gl.reshape(y, [BLOCK_M, 2, BLOCK_N // 2]), (0, 2, 1)))
    lo, hi = lo.to(gl.float32), hi.to(gl.float32)
    mean = (gl.sum(lo, axis=1) + gl.sum(hi, axis=1)) / n_c
    d_lo = lo - gl.expand_dims(mean, 1)
    m2 = gl.sum(d_lo * d_lo, axis=1)
    d_hi = hi - gl.expand_dims(mean, 1)
    # Each zero column past N added mean^2 to the sum of squares: taken back out.
    m2 = m2 + gl.sum(d_hi * d_hi, axis=1) - (BLOCK_N - n_c) * mean * mean
    rows = off_m + gl.arange(0, BLOCK_M, layout=mean.type.layout)
    ptr = stats_ptr + (rows.to(gl.int64) * gl.cdiv(N, BLOCK_N) + pid_n) * 2
    gl.store(ptr, mean, mask=rows < M)
    gl.store(ptr + 1, m2, mask=rows < M)


@gluon.jit
def _load_chunk_stats(stats_ptr, off_m, M, K, BLOCK_M: gl.constexpr, layout: gl.constexpr):
    """The chunk statistics (see :func:`_store_chunk_stats`) of the K-wide rows off_m.. from
    ``stats_ptr`` [M, cdiv(K, STATS_CHUNK), 2]: (means, M2s), each [BLOCK_M, MAX_CHUNKS] in
    ``layout``, zero past the last chunk and row M. One round of loads."""
    n_chunks = gl.cdiv(K, STATS_CHUNK)
    rows = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
    chunks = gl.arange(0, MAX_CHUNKS, layout=gl.SliceLayout(0, layout))
    mask = gl.expand_dims(rows < M, 1) & gl.expand_dims(chunks < n_chunks, 0)
    ptr = stats_ptr + (gl.expand_dims(rows.to(gl.int64), 1) * n_chunks + gl.expand_dims(chunks, 0)) * 2
    return gl.load(ptr, mask=mask, other=0.0), gl.load(ptr + 1, mask=mask, other=0.0)


@gluon.jit
def _merge_chunk_stats(means, m2s, K, eps, rows_of: gl.constexpr):
    """(mean, rstd) per row, [BLOCK_M] in ``rows_of``, from :func:`_load_chunk_stats`' values:
    the mean first, then M2 = sum_c (M2_c + n_c (mean_c - mean)^2), exact for any spread of the
    chunk means (absent chunks have n_c = 0)."""
    chunks = gl.arange(0, MAX_CHUNKS, layout=gl.SliceLayout(0, means.type.layout))
    counts = gl.expand_dims(gl.minimum(gl.maximum(K - chunks * STATS_CHUNK, 0), STATS_CHUNK).to(gl.float32), 0)
    mean = gl.sum(means * counts, axis=1) / K
    d = means - gl.expand_dims(mean, 1)
    m2 = gl.sum(m2s + counts * d * d, axis=1)
    rstd = gl.rsqrt(gl.maximum(m2, 0.0) / K + eps)
    return gl.convert_layout(mean, rows_of), gl.convert_layout(rstd, rows_of)


@gluon.jit
def _consumer(x_desc, w_desc, out_desc, res_desc, a_bufs, b_bufs, out_bufs, ready, empty, turn, res_bar, vec0_ptr,
              vec1_ptr, stats_ptr, M, N, K, eps, GROUP_M: gl.constexpr, EPILOGUE: gl.constexpr, GELU: gl.constexpr,
              STATS: gl.constexpr, ROLE: gl.constexpr):
    """One warpgroup: tiles ROLE, ROLE + 2, ... of this program's, each a BLOCK_M x BLOCK_N tile
    from the ring, then its epilogue through ``out_bufs[ROLE]``: "layernorm",
    ``act(rstd * (acc - mean * c) + b')`` with vec0 = c, vec1 = b', stats = (mean, rstd); or
    "residual", ``residual + acc + b`` with vec0 = b (residual tile by TMA through res_desc,
    completing on ``res_bar[ROLE]``). Main loops alternate with the other consumer via ``turn``."""
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    STAGES: gl.constexpr = a_bufs.shape[0]
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    rows_of: gl.constexpr = gl.SliceLayout(1, mma)
    cols_of: gl.constexpr = gl.SliceLayout(0, mma)
    chunk_rows: gl.constexpr = gl.BlockedLayout([1, MAX_CHUNKS], [32, 1], [4, 1], [1, 0])  # a row's chunks a thread
    out_buf = out_bufs.index(ROLE)
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    k_steps = gl.cdiv(K, BLOCK_K)
    pid = gl.program_id(0)
    programs = gl.num_programs(0)
    n_local = gl.cdiv(num_pid_m * num_pid_n - pid, programs)
    for i in range(ROLE, n_local, 2):
        j = i // 2  # this consumer's j-th tile
        pid_m, pid_n = grouped_tile(pid + i * programs, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        # The epilogue's inputs, requested now so that their latency hides behind the main loop.
        cols = off_n + gl.arange(0, BLOCK_N, layout=cols_of)
        vec0 = gl.load(vec0_ptr + cols, mask=cols < N, other=0.0).to(gl.float32)
        tma.store_wait(0)  # this consumer's previous tile has left out_buf
        if EPILOGUE == "layernorm":
            rows = off_m + gl.arange(0, BLOCK_M, layout=rows_of)
            if STATS == "chunks":  # loaded now, merged after the main loop
                means, m2s = _load_chunk_stats(stats_ptr, off_m, M, K, BLOCK_M, chunk_rows)
            else:
                mean = gl.load(stats_ptr + 2 * rows, mask=rows < M, other=0.0)
                rstd = gl.load(stats_ptr + 2 * rows + 1, mask=rows < M, other=0.0)
            vec1 = gl.load(vec1_ptr + cols, mask=cols < N, other=0.0)
        else:
            mbarrier.expect(res_bar.index(ROLE), res_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(res_desc, [off_m, off_n], res_bar.index(ROLE), out_buf)

        if ROLE == 0:
            mbarrier.wait(turn.index(0), (j - 1) & 1, pred=j > 0)
        else:
            mbarrier.wait(turn.index(1), j & 1)
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=mma)
        step = i * k_steps
        for ki in range(k_steps):
            slot = step % STAGES
            mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(slot), b_bufs.index(slot).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(1, deps=(acc, ))
            mbarrier.arrive(empty.index((step + STAGES - 1) % STAGES), pred=ki > 0)  # step - 1 retired
            step += 1
        mbarrier.arrive(turn.index(1 - ROLE))  # the other consumer's main loop may start
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(empty.index((step + STAGES - 1) % STAGES))

        if EPILOGUE == "layernorm":
            if STATS == "chunks":
                mean, rstd = _merge_chunk_stats(means, m2s, K, eps, rows_of)
            y = gl.expand_dims(rstd, 1) * (acc - gl.expand_dims(mean, 1) * gl.expand_dims(vec0, 0)) \
                + gl.expand_dims(vec1, 0)
            if GELU:
                y = gelu(y, True)  # sm_90 only: the approximate reciprocal (inline PTX)
        else:
            mbarrier.wait(res_bar.index(ROLE), j & 1)
            y = out_buf.load(mma).to(gl.float32) + acc + gl.expand_dims(vec0, 0)
        stored = y.to(out_desc.dtype)
        out_buf.store(stored)
        fence_async_shared()
        tma.async_copy_shared_to_global(out_desc, [off_m, off_n], out_buf)
        if STATS == "chunks" and EPILOGUE == "residual":  # of the values as stored, while they are
            _store_chunk_stats(stored, stats_ptr, off_m, pid_n, M, N)
    tma.store_wait(0)


@gluon.jit(do_not_specialize=["M"])
def _matmul_ws_kernel(x_desc, w_desc, out_desc, res_desc, vec0_ptr, vec1_ptr, stats_ptr, M, N, K, eps,
                      STAGES: gl.constexpr, GROUP_M: gl.constexpr, EPILOGUE: gl.constexpr, GELU: gl.constexpr,
                      STATS: gl.constexpr):
    """Persistent program (one per SM): see the module docstring. x_desc [M, K] in BLOCK_M x
    BLOCK_K boxes, w_desc [N, K] in BLOCK_N x BLOCK_K boxes, out_desc and res_desc [M, N] in
    BLOCK_M x BLOCK_N boxes (res_desc: any descriptor of that box for "layernorm"); vec0, vec1
    [N] and stats [M, 2] as :func:`_consumer` reads them for EPILOGUE."""
    dtype: gl.constexpr = x_desc.dtype
    a_bufs = gl.allocate_shared_memory(dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
    b_bufs = gl.allocate_shared_memory(dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    out_bufs = gl.allocate_shared_memory(dtype, [2] + out_desc.block_type.shape, out_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    res_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    for r in gl.static_range(2):
        mbarrier.init(turn.index(r), count=1)
        mbarrier.init(res_bar.index(r), count=1)
    # (Tuples built inline: Gluon 3.6 rejects a tuple variable extended with `+` here.)
    gl.warp_specialize([
        (_consumer, (x_desc, w_desc, out_desc, res_desc, a_bufs, b_bufs, out_bufs, ready, empty, turn, res_bar,
                     vec0_ptr, vec1_ptr, stats_ptr, M, N, K, eps, GROUP_M, EPILOGUE, GELU, STATS, 0)),
        (_consumer, (x_desc, w_desc, out_desc, res_desc, a_bufs, b_bufs, out_bufs, ready, empty, turn, res_bar,
                     vec0_ptr, vec1_ptr, stats_ptr, M, N, K, eps, GROUP_M, EPILOGUE, GELU, STATS, 1)),
        (_producer, (x_desc, w_desc, out_desc, res_desc, a_bufs, b_bufs, out_bufs, ready, empty, turn, res_bar,
                     vec0_ptr, vec1_ptr, stats_ptr, M, N, K, eps, GROUP_M, EPILOGUE, GELU, STATS, 2)),
    ], [4, 1], [240 if STATS == "chunks" and EPILOGUE == "residual" else 232, 24])


@dataclass(frozen=True)
class WsConfig:
    """Tile of each consumer (``block_m`` x ``block_n``, one warpgroup: block_m * block_n / 128
    fp32 accumulators a thread), ``block_k`` per ring slot, ``stages`` ring slots, ``group_m``
    of the grouped tile order."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    stages: int = 4
    group_m: int = 8


#: Configurations the tuners add on Hopper: 128x128 tiles, 4 or 5 slots of 32 KB plus two 32 KB
#: output tiles (193 or 225 KB of shared memory); compiled for sm_90 with 248 / 232 / 24 registers
#: for consumer 0 / consumer 1 / producer, no spills (``bench.linear_lab --compile-ws``). The
#: residual epilogue writing chunk statistics runs at 240 / 240 / 24 and spills one loop-invariant
#: register (8 bytes, reloaded once a tile; at 248 / 232 ptxas spilled 24 bytes).
CONFIGS = (WsConfig(stages=4), WsConfig(stages=5))


def supports(x: torch.Tensor) -> bool:
    """Whether the tuners offer this kernel for ``x``: on an sm_90 GPU, fp16/bf16 (and
    :data:`OFFERED`)."""
    return OFFERED and is_hopper(x.device) and x.dtype in (torch.float16, torch.bfloat16)


def kernel_args(x2: torch.Tensor, w: torch.Tensor, out2: torch.Tensor, cfg: WsConfig, epilogue: str,
                vec0: torch.Tensor, vec1: Optional[torch.Tensor] = None, stats: Optional[torch.Tensor] = None,
                residual: Optional[torch.Tensor] = None, gelu: bool = False,
                chunk_stats: Optional[torch.Tensor] = None, eps: float = 1e-6) -> tuple[tuple, dict, tuple]:
    """Arguments, compile-time arguments and grid of one launch: x2 [M, K] @ w [N, K]^T into out2
    [M, N] (contiguous, TMA-aligned, x's dtype), with ``epilogue``'s vectors (see
    :func:`_consumer`). Row statistics, float32: for "layernorm" either ``stats`` [M, 2] (mean,
    rstd) or ``chunk_stats`` [M, cdiv(K, STATS_CHUNK), 2] (merged with ``eps``); for "residual"
    ``chunk_stats`` [M, cdiv(N, STATS_CHUNK), 2], if given, receives the output's (contiguous,
    as the calling modules check). Tensors may be on the CPU (for an offline sm_90 compile)."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue: expected one of {EPILOGUES}, got {epilogue!r}")
    M, K = x2.shape
    N = w.shape[0]
    if chunk_stats is not None:  # its shape and dtype are checked by the calling module
        if epilogue == "layernorm" and triton.cdiv(K, STATS_CHUNK.value) > MAX_CHUNKS.value:
            raise ValueError(f"chunk_stats: rows of at most {MAX_CHUNKS.value * STATS_CHUNK.value} columns, got {K}")
        if cfg.block_n != STATS_CHUNK.value:
            raise ValueError(f"chunk_stats: needs tiles {STATS_CHUNK.value} wide, got {cfg}")
    if epilogue == "layernorm" and (stats is None) == (chunk_stats is None):
        raise ValueError("layernorm epilogue: pass exactly one of stats and chunk_stats")
    gdt = gl.bfloat16 if x2.dtype == torch.bfloat16 else gl.float16

    def desc(t: torch.Tensor, box: list[int]) -> TensorDescriptor:
        return TensorDescriptor(t, list(t.shape), list(t.stride()), box, gl.NVMMASharedLayout.get_default_for(box, gdt))

    out_box = [cfg.block_m, cfg.block_n]
    out_desc = desc(out2, out_box)
    res_desc = desc(residual, out_box) if epilogue == "residual" else out_desc
    stats_arg = chunk_stats if chunk_stats is not None else stats
    args = (desc(x2, [cfg.block_m, cfg.block_k]), desc(w, [cfg.block_n, cfg.block_k]), out_desc, res_desc,
            vec0, vec0 if vec1 is None else vec1, vec0 if stats_arg is None else stats_arg, M, N, K, eps)
    mode = "chunks" if chunk_stats is not None else ("rows" if epilogue == "layernorm" else "none")
    meta = dict(STAGES=cfg.stages, GROUP_M=cfg.group_m, EPILOGUE=epilogue, GELU=gelu, STATS=mode, num_warps=4,
                maxnreg=168)
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    return args, meta, (min(tiles, num_sms(x2.device)), )


def launch(x2: torch.Tensor, w: torch.Tensor, out2: torch.Tensor, cfg: WsConfig, epilogue: str, vec0: torch.Tensor,
           vec1: Optional[torch.Tensor] = None, stats: Optional[torch.Tensor] = None,
           residual: Optional[torch.Tensor] = None, gelu: bool = False,
           chunk_stats: Optional[torch.Tensor] = None, eps: float = 1e-6) -> None:
    """One launch (arguments as :func:`kernel_args`; shapes, dtypes and alignment of the matrices
    checked by the calling Triton module) on the current device."""
    args, meta, grid = kernel_args(x2, w, out2, cfg, epilogue, vec0, vec1, stats, residual, gelu, chunk_stats, eps)
    _matmul_ws_kernel[grid](*args, **meta)

"""LayerNorm-folded matmul for Hopper (sm_90) in Gluon, with the epilogue of one tile running
while the tensor cores work on the next: the overlap the Triton kernel cannot express.

Same contract as :func:`kernels.layernorm_linear.layernorm_linear_folded`, which tunes over this
kernel beside its Triton configurations where :func:`supports` holds (sm_90 GPU, fp16/bf16):
``out`` [M, N] = act(rstd * (x @ W'^T - mean * c) + b') from the raw rows x [M, K], the folded
weight W' [N, K], per-row (mean, rstd) and per-column colsum c and bias b' (fp32). The function
it must equal is :func:`kernels.layernorm_linear.layernorm_linear_reference`.

Why a second kernel: in the Triton kernel the same warps run the main loop and the epilogue, so
the tensor cores idle while a tile's epilogue runs. For fc1 that is the erf GELU, ~20 instructions
an element: on the H100 the kernel reached 448 TFLOP/s against ~600 for the bare product, with
the tensor pipe active 48% of the time (Nsight Compute, session 7). Here each persistent program
(one per SM) has three partitions (``gl.warp_specialize``):

* a producer warp streams the K steps of the program's tiles through a ring of ``STAGES``
  shared-memory slots (TMA, ``ready`` / ``empty`` barriers per slot);
* two consumer warpgroups take the program's tiles in turn (tile i to consumer i % 2), each
  running the whole BLOCK_M x BLOCK_N tile: wgmma from the ring, one product in flight, the slot
  of the previous K step released as soon as its product retired; then its epilogue, through a
  shared-memory buffer of its own and a TMA store.

The consumers' main loops alternate (``turn`` barriers, CUTLASS's "ping-pong" schedule): a
consumer starts its tile's main loop once the other has issued its last product, so one
consumer's epilogue runs during the other's main loop, and the ring's slots are taken in the
order the producer fills them (a consumer never waits on a slot's barrier more than one phase
ahead, which mbarrier parity could not tell apart).
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

from ._runtime import is_hopper, num_sms
from .layernorm_linear import FoldedLinear, gelu


@gluon.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: gl.constexpr):
    """(pid_m, pid_n) of ``tile`` in grouped order (as :func:`kernels._runtime.grouped_tile`)."""
    tiles_per_group = GROUP_M * num_pid_n
    first_m = (tile // tiles_per_group) * GROUP_M
    group_rows = gl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % tiles_per_group) % group_rows
    pid_n = (tile % tiles_per_group) // group_rows
    return pid_m, pid_n


@gluon.jit
def _producer(x_desc, w_desc, out_desc, a_bufs, b_bufs, out_bufs, ready, empty, turn, stats_ptr, colsum_ptr, bias_ptr,
              M, N, K, GROUP_M: gl.constexpr, GELU: gl.constexpr, ROLE: gl.constexpr):
    """One warp (ROLE 2; the worker partitions share one signature): the K steps of this program's tiles (tiles pid, pid + P, ...) into the ring, in
    order; step t into slot t % STAGES once the consumer released the slot's previous use."""
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    STAGES: gl.constexpr = a_bufs.shape[0]
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    k_steps = gl.cdiv(K, BLOCK_K)
    step = 0
    for tile in range(gl.program_id(0), num_pid_m * num_pid_n, gl.num_programs(0)):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
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
def _consumer(x_desc, w_desc, out_desc, a_bufs, b_bufs, out_bufs, ready, empty, turn, stats_ptr, colsum_ptr, bias_ptr,
              M, N, K, GROUP_M: gl.constexpr, GELU: gl.constexpr, ROLE: gl.constexpr):
    """One warpgroup: tiles ROLE, ROLE + 2, ... of this program's, each a BLOCK_M x BLOCK_N tile
    from the ring, then its epilogue ``act(rstd * (acc - mean * c) + b')`` stored through
    ``out_bufs[ROLE]``. Main loops alternate with the other consumer through ``turn``."""
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    STAGES: gl.constexpr = a_bufs.shape[0]
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    rows_of: gl.constexpr = gl.SliceLayout(1, mma)
    cols_of: gl.constexpr = gl.SliceLayout(0, mma)
    out_buf = out_bufs.index(ROLE)
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    k_steps = gl.cdiv(K, BLOCK_K)
    pid = gl.program_id(0)
    programs = gl.num_programs(0)
    n_local = gl.cdiv(num_pid_m * num_pid_n - pid, programs)
    for i in range(ROLE, n_local, 2):
        j = i // 2  # this consumer's j-th tile
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

        pid_m, pid_n = _tile_coords(pid + i * programs, num_pid_m, num_pid_n, GROUP_M)
        rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=rows_of)
        cols = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=cols_of)
        mean = gl.load(stats_ptr + 2 * rows, mask=rows < M, other=0.0)
        rstd = gl.load(stats_ptr + 2 * rows + 1, mask=rows < M, other=0.0)
        c = gl.load(colsum_ptr + cols, mask=cols < N, other=0.0)
        b = gl.load(bias_ptr + cols, mask=cols < N, other=0.0)
        y = gl.expand_dims(rstd, 1) * (acc - gl.expand_dims(mean, 1) * gl.expand_dims(c, 0)) + gl.expand_dims(b, 0)
        if GELU:
            y = gelu(y)
        tma.store_wait(0)  # this consumer's previous tile has left out_buf
        out_buf.store(y.to(out_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(out_desc, [pid_m * BLOCK_M, pid_n * BLOCK_N], out_buf)
    tma.store_wait(0)


@gluon.jit(do_not_specialize=["M"])
def _ln_linear_ws_kernel(x_desc, w_desc, out_desc, stats_ptr, colsum_ptr, bias_ptr, M, N, K,
                         STAGES: gl.constexpr, GROUP_M: gl.constexpr, GELU: gl.constexpr):
    """Persistent program (one per SM): see the module docstring. x_desc [M, K] in BLOCK_M x
    BLOCK_K boxes, w_desc [N, K] in BLOCK_N x BLOCK_K boxes, out_desc [M, N] in BLOCK_M x BLOCK_N
    boxes; stats [M, 2] (mean, rstd), colsum and bias [N], fp32."""
    dtype: gl.constexpr = x_desc.dtype
    a_bufs = gl.allocate_shared_memory(dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
    b_bufs = gl.allocate_shared_memory(dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    out_bufs = gl.allocate_shared_memory(dtype, [2] + out_desc.block_type.shape, out_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    for r in gl.static_range(2):
        mbarrier.init(turn.index(r), count=1)
    gl.warp_specialize([
        (_consumer, (x_desc, w_desc, out_desc, a_bufs, b_bufs, out_bufs, ready, empty, turn, stats_ptr, colsum_ptr,
                     bias_ptr, M, N, K, GROUP_M, GELU, 0)),
        (_consumer, (x_desc, w_desc, out_desc, a_bufs, b_bufs, out_bufs, ready, empty, turn, stats_ptr, colsum_ptr,
                     bias_ptr, M, N, K, GROUP_M, GELU, 1)),
        (_producer, (x_desc, w_desc, out_desc, a_bufs, b_bufs, out_bufs, ready, empty, turn, stats_ptr, colsum_ptr,
                     bias_ptr, M, N, K, GROUP_M, GELU, 2)),
    ], [4, 1], [232, 24])


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


#: Configurations :func:`kernels.layernorm_linear.layernorm_linear_folded` tunes over on Hopper:
#: 128x128 tiles, 4 or 5 slots of 32 KB plus two 32 KB output buffers (193 or 225 KB of shared
#: memory); compiled for sm_90 with 256 / 232 / 24 registers for consumer 0 / consumer 1 /
#: producer, no spills.
CONFIGS = (WsConfig(stages=4), WsConfig(stages=5))


def supports(x: torch.Tensor) -> bool:
    """Whether this kernel can run ``x``: on an sm_90 GPU, fp16/bf16."""
    return is_hopper(x.device) and x.dtype in (torch.float16, torch.bfloat16)


def launch(x2: torch.Tensor, folded: FoldedLinear, stats: torch.Tensor, out2: torch.Tensor, activation: Optional[str],
           cfg: WsConfig) -> None:
    """One launch for x2 [M, K] -> out2 [M, N] (both contiguous, TMA-aligned, checked by the
    caller, :func:`kernels.layernorm_linear.layernorm_linear_folded`), on the current device."""
    M, K = x2.shape
    N = out2.shape[1]
    gdt = gl.bfloat16 if x2.dtype == torch.bfloat16 else gl.float16

    def desc(t: torch.Tensor, box: list[int]) -> TensorDescriptor:
        return TensorDescriptor(t, list(t.shape), list(t.stride()), box, gl.NVMMASharedLayout.get_default_for(box, gdt))

    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    grid = (min(tiles, num_sms(x2.device)), )
    _ln_linear_ws_kernel[grid](desc(x2, [cfg.block_m, cfg.block_k]), desc(folded.weight, [cfg.block_n, cfg.block_k]),
                               desc(out2, [cfg.block_m, cfg.block_n]), stats, folded.colsum, folded.bias, M, N, K,
                               STAGES=cfg.stages, GROUP_M=cfg.group_m, GELU=activation == "gelu", num_warps=4,
                               maxnreg=168)

"""What every kernel module needs to know about where it runs, plus the pieces the two
persistent TMA matmul modules (``layernorm_linear``, ``linear_residual``) share: the tile
configuration, its candidates, the per-process tuner, the operand descriptors and the grouped
tile order.
"""
from __future__ import annotations

import functools
import os
import statistics
import warnings
from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Sequence, TypeVar

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources, PTXASError
from triton.tools.tensor_descriptor import TensorDescriptor

#: True under Triton's CPU interpreter (``TRITON_INTERPRET=1`` set before Triton is imported).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Programs of a persistent kernel under the interpreter: few, so each one loops over tiles.
INTERPRET_PROGRAMS = 4


def _patch_interpreter_index() -> None:
    """Triton 3.6's interpreter turns a runtime scalar into a Python int (loop bounds:
    ``range(k_tiles)``) with ``int(array_of_shape_1)``, which NumPy >= 2.4 rejects
    (triton-lang/triton#9171, fixed upstream by #9172). Until that fix ships, convert through
    ``.item()``: same value, any NumPy."""
    import numpy as np
    from triton.runtime import interpreter

    try:
        int(np.ones(1, dtype=np.int32))
        return  # NumPy still converts size-1 arrays: nothing to fix
    except TypeError:
        pass
    patch_tensor = interpreter._patch_lang_tensor
    if getattr(patch_tensor, "_index_via_item", False):
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched._index_via_item = True
    interpreter._patch_lang_tensor = patched


if INTERPRET:
    _patch_interpreter_index()


def check_dtype(t: torch.Tensor, name: str) -> None:
    """Kernels run in fp32 (3xTF32 dots), fp16 or bf16; anything else is a caller bug."""
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name}: dtype {t.dtype} not supported (float32, float16, bfloat16)")


def is_hopper(device: torch.device) -> bool:
    """Compute capability 9.x: tensor descriptors (TMA) and wgmma are available."""
    return (not INTERPRET) and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def check_tma_matrix(t: torch.Tensor, name: str) -> None:
    """A 2-D operand a tensor descriptor (TMA) can address: contiguous, 16-byte aligned base and
    rows (``t.shape[1] * itemsize`` a multiple of 16, i.e. a multiple of 8 fp16/bf16 or 4 fp32)."""
    if t.dim() != 2 or not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous 2-D matrix, got shape {tuple(t.shape)}, "
                         f"strides {t.stride()}")
    if t.data_ptr() % 16 or (t.shape[1] * t.element_size()) % 16:
        raise ValueError(f"{name}: TMA needs a 16-byte aligned base and rows of a multiple of 16 bytes "
                         f"(shape {tuple(t.shape)}, {t.dtype}, base {t.data_ptr():#x})")


def as_rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """View of a contiguous [..., K] tensor as [M, K] (no silent copies of a strided input)."""
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got shape {tuple(t.shape)}, strides {t.stride()}")
    return t.view(-1, t.shape[-1])


def check_out(out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
              name: str = "out") -> None:
    """A caller-provided buffer (output, statistics, residual) must match exactly and be contiguous."""
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous {dtype} tensor of shape {tuple(shape)} on {device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device} (contiguous={out.is_contiguous()})")


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (132 on an H100 SXM); ``INTERPRET_PROGRAMS`` off-GPU."""
    if device.type != "cuda":
        return INTERPRET_PROGRAMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# ---------------------------------------------------------------------------------------------
# Persistent TMA matmul: configuration, candidates, tuner
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MatmulConfig:
    """Tile shape and schedule of the persistent TMA matmul kernels.

    ``block_m x block_n`` output tile, ``block_k`` reduction step, ``num_stages`` TMA buffers in
    flight, ``group_m`` M-tiles per group of the grouped (L2-friendly) tile order. ``subtile``
    runs the epilogue on two ``block_m x block_n/2`` halves (half the shared memory for the store,
    fewer live registers). ``persistent``: one program per SM looping over tiles (else one program
    per tile). ``flatten``: let the compiler fuse the tile and K loops so the next tile's loads
    overlap this tile's epilogue. ``device_descriptors``: build the TMA descriptors inside the
    kernel (``tl.make_tensor_descriptor``, one per program, in a global scratch buffer) instead of
    on the host. ``programs_per_sm``: resident programs per SM of the persistent grid; with 2, one
    program's epilogue (the erf GELU of fc1, the residual of proj) overlaps the other's main loop,
    for tiles small enough that two fit an SM's registers and shared memory.

    (Triton 3.6's automatic warp specialization was measured on the H100 and dropped: slower on
    every shape, and wrong results on two of them.)
    """

    block_m: int
    block_n: int
    block_k: int
    num_stages: int
    num_warps: int
    group_m: int = 8
    subtile: bool = False
    persistent: bool = True
    flatten: bool = True
    device_descriptors: bool = False
    programs_per_sm: int = 1

    @property
    def store_n(self) -> int:
        """Columns of one epilogue store (the out / residual descriptor block)."""
        return self.block_n // 2 if self.subtile else self.block_n

    def num_programs(self, m: int, n: int, device: torch.device) -> int:
        tiles = triton.cdiv(m, self.block_m) * triton.cdiv(n, self.block_n)
        return min(tiles, num_sms(device) * self.programs_per_sm) if self.persistent else tiles

    def meta(self) -> dict:
        """Compile-time arguments of the kernels (the ``persistent`` choice is only the grid)."""
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, GROUP_M=self.group_m,
                    SUBTILE=self.subtile, FLATTEN=self.flatten, DEVICE_DESC=self.device_descriptors,
                    num_stages=self.num_stages, num_warps=self.num_warps)


def matmul_candidates(dtype: torch.dtype, device: torch.device) -> tuple[MatmulConfig, ...]:
    """Configurations tuned over on first use of a shape (see :func:`select_config`).

    Chosen from sm_90 compiles of all three epilogues (LayerNorm, LayerNorm + GELU, residual):
    every one fits the 227 KiB of shared memory with its pipelined residual/store buffers and
    none spills registers (the GELU epilogue spills on un-subtiled 128x128/4-warp and 128x256
    tiles). 16-bit: 128x256 and 128x128 tiles with 64-wide K steps (128-byte swizzled TMA
    boxes), 3-4 stages, plus a 64x128 tile for the small B=1 problems (more tiles per wave).
    Measured on the H100 (bf16, B=8): 128x256 wins qkv and fc2 (591, 619 TFLOP/s) but one program
    per SM leaves the GELU and residual epilogues exposed (fc1 402, proj 406); the two-per-SM
    128x128 candidates let those epilogues overlap another program's main loop.
    fp32 (3xTF32 dots) halves ``block_k``. Off-GPU (interpreter): one small tile whose epilogue is
    subtiled, so the CPU tests run every code path the GPU runs.
    """
    if device.type != "cuda":
        return (MatmulConfig(32, 64, 32, num_stages=1, num_warps=4, subtile=True),)
    if dtype == torch.float32:
        return (MatmulConfig(128, 128, 32, 3, 8, subtile=True), MatmulConfig(128, 64, 32, 4, 4),
                MatmulConfig(64, 128, 32, 4, 4))
    return (
        MatmulConfig(128, 256, 64, 3, 8, subtile=True),
        MatmulConfig(128, 256, 64, 4, 8, subtile=True, flatten=False),
        MatmulConfig(128, 128, 64, 4, 8),
        MatmulConfig(128, 128, 64, 4, 4, subtile=True),
        MatmulConfig(64, 128, 64, 4, 4),
        MatmulConfig(128, 128, 64, 3, 4, subtile=True, programs_per_sm=2),
        MatmulConfig(64, 128, 64, 4, 4, programs_per_sm=2),
    )


@functools.lru_cache(maxsize=None)
def hopper_module():
    """:mod:`kernels.matmul_hopper` (the warp-specialized Gluon matmul), or None where this
    Triton has no Gluon for Hopper (imported on first use: it imports the Triton modules)."""
    try:
        from . import matmul_hopper
    except ImportError:
        return None
    return matmul_hopper


def candidates_for(x: torch.Tensor, hopper_ok: bool = True) -> tuple:
    """Configurations the matmul modules tune over for operand ``x``: :func:`matmul_candidates`
    (the Triton kernels' :class:`MatmulConfig`), plus :data:`kernels.matmul_hopper.CONFIGS` where
    that kernel runs (sm_90 GPU, fp16/bf16) and the caller's epilogue allows it (``hopper_ok``)."""
    hopper = hopper_module() if hopper_ok else None
    extra = hopper.CONFIGS if hopper is not None and hopper.supports(x) else ()
    return matmul_candidates(x.dtype, x.device) + extra


_TUNED: dict[tuple, Hashable] = {}


def graph_time_ms(fn: Callable[[], object], rep_ms: float = 30.0) -> float:
    """Median milliseconds of one ``fn()`` (GPU launches only) replayed from a CUDA graph that
    repeats it for about ``rep_ms``: ``triton.testing.do_bench_cudagraph``'s method, on the
    current device. That function (like ``torch.cuda.graph`` without a ``stream``) captures on
    one process-wide stream made on whichever GPU captured first; entering that stream makes
    its GPU current, so on another GPU the launches would go to the wrong device."""
    with torch.cuda.stream(torch.cuda.Stream()):
        fn()  # warm-up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            fn()
        end.record()
        torch.cuda.synchronize()
        n_repeat = max(1, int(rep_ms / max(start.elapsed_time(end) / 5, 1e-3)))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=torch.cuda.Stream()):
            for _ in range(n_repeat):
                fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / n_repeat)
    return statistics.median(times)


def select_config(key: tuple, candidates: Sequence[Config],
                  make_runner: Callable[[], Callable[[Config], object]]) -> Config:
    """The fastest of ``candidates`` (hashable configurations, e.g. :class:`MatmulConfig`) for
    ``key`` (op name first, then shape and dtypes), measured once per process.

    A single candidate (or, under the interpreter, the first) is returned without timing.
    Otherwise ``make_runner()`` is called once and must return a function launching the op with a
    given config into scratch outputs (so tuning never updates a caller's buffer in place
    twice); each candidate is compiled by one eager call, then timed as a replayed CUDA graph
    (:func:`graph_time_ms`, median): the encoder replays graphs, and at small
    shapes eager timings would rank the host-side launch cost instead of the kernel. Ones that
    fail to compile or do not fit are skipped with a warning. Tune before CUDA-graph capture (one
    eager call per shape).

    The timing launches run on a stream of their own (:func:`graph_time_ms`) that does not wait
    for the caller's. The device is therefore synchronised before ``make_runner()`` allocates:
    otherwise a scratch or output buffer can reuse a block the caller freed while its queued
    kernels still write and read it, and the timing launches would corrupt those kernels' inputs
    (seen on the H100: NaN in a test's freshly built residual). Picks are kept per GPU index.
    """
    if len(candidates) == 1 or INTERPRET:
        return candidates[0]  # nothing to choose, or interpreter timings that mean nothing
    full_key = (*key, *candidates, torch.cuda.current_device())
    best = _TUNED.get(full_key)
    if best is None:
        torch.cuda.synchronize()
        run = make_runner()
        times = {}
        for cfg in candidates:
            try:
                run(cfg)
                times[cfg] = graph_time_ms(lambda: run(cfg))
            except (OutOfResources, CompilationError, PTXASError, RuntimeError) as err:
                warnings.warn(f"{key[0]}: skipping {cfg}: {type(err).__name__}: {str(err)[:200]}")
        if not times:
            raise RuntimeError(f"{key[0]}: no candidate configuration compiled for {key}")
        best = _TUNED[full_key] = min(times, key=times.get)
    return best


def matmul_operands(cfg: MatmulConfig, a: torch.Tensor, b: torch.Tensor, *outs: torch.Tensor) -> tuple:
    """The kernels' matrix arguments: host-side tensor descriptors, ``a`` [M, K] in
    ``block_m x block_k`` boxes, ``b`` [N, K] in ``block_n x block_k`` boxes and each of ``outs``
    [M, N] in ``block_m x store_n`` boxes (out-of-range rows/columns of a box load as zero and are
    dropped on store); or, with ``cfg.device_descriptors``, the tensors themselves (the kernel
    builds the same descriptors, see :func:`tma_operand`, in scratch memory from
    :func:`use_torch_allocator`)."""
    if cfg.device_descriptors:
        if a.device.type == "cuda":
            use_torch_allocator()
        return (a, b, *outs)
    return (TensorDescriptor.from_tensor(a, [cfg.block_m, cfg.block_k]),
            TensorDescriptor.from_tensor(b, [cfg.block_n, cfg.block_k]),
            *(TensorDescriptor.from_tensor(o, [cfg.block_m, cfg.store_n]) for o in outs))


@triton.jit
def tma_operand(src, rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ON_DEVICE: tl.constexpr):
    """``src`` itself when it is a host-side descriptor; with ``ON_DEVICE`` a device-side one over
    the contiguous [rows, cols] matrix at pointer ``src``, in [BLOCK_R, BLOCK_C] boxes."""
    if ON_DEVICE:
        return tl.make_tensor_descriptor(src, shape=[rows, cols], strides=[cols, 1], block_shape=[BLOCK_R, BLOCK_C])
    else:
        return src


@triton.jit
def grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of linear ``tile_id`` in grouped order: consecutive tiles sweep GROUP_M
    row-blocks of A down one column of B before moving right, so the A row-blocks and B
    column-blocks that programs running together touch stay in L2."""
    tiles_per_group = GROUP_M * num_pid_n
    first_m = (tile_id // tiles_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile_id % tiles_per_group) % group_rows
    pid_n = (tile_id % tiles_per_group) // group_rows
    return pid_m, pid_n


#: Tensor-core precision of f32 x f32 products in the matmul kernels: 3xTF32 (each operand split
#: into a tf32 high part and remainder, three tf32 products; about fp32's accuracy). Plain TF32
#: rounds the raw, uncentred activations of the LayerNorm-folded matmul to 10 bits, which gave
#: 1.04e-3 (> the 1e-3 fp32 bound) on a row with a large mean. fp16/bf16 products are unaffected.
F32_PRECISION = tl.constexpr("tf32x3")


@triton.jit
def tile_matmul(x_desc, w_desc, tile_id, num_pid_m, num_pid_n, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """fp32 accumulator [BLOCK_M, BLOCK_N] of output tile ``tile_id`` (grouped order) of
    ``x [M, K] @ w [N, K]^T``, both read through TMA descriptors: the main loop the persistent
    matmul kernels share (inlined, so their tile and K loops still flatten into one)."""
    pid_m, pid_n = grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for ki in range(tl.cdiv(K, BLOCK_K)):
        a = x_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
        w = w_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
        acc = tl.dot(a, w.T, acc, input_precision=F32_PRECISION)
    return acc


@triton.jit
def split_columns(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The left and right [BLOCK_M, BLOCK_N / 2] halves of a tile (subtiled epilogues)."""
    return tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))


def _torch_scratch(size: int, alignment: int, stream: Optional[int]) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def use_torch_allocator() -> None:
    """Give Triton a torch-backed allocator for the global scratch of kernels that build tensor
    descriptors on the device (``tl.make_tensor_descriptor``). Idempotent; sets it for the
    current context (``triton.set_allocator``)."""
    triton.set_allocator(_torch_scratch)

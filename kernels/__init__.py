"""Hand-written Triton kernels for the Brain-JEPA encoder (import name ``brainjepa_kernels``).

Each module holds one op: the ``@triton.jit`` kernel, its launcher, and the plain PyTorch
function (``*_reference``) the launcher must equal. ``TRITON_INTERPRET=1`` (set before Triton
is imported) runs them on the CPU in float32 and float16. Launches go to the current CUDA device
(Triton's rule): call the ops under ``torch.cuda.device(t.device)`` for tensors on another GPU.
"""

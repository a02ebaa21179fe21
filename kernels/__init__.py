"""Hand-written Triton kernels for the Brain-JEPA encoder (import name ``brainjepa_kernels``).

Each module holds one op: the ``@triton.jit`` kernel, its launcher, and the plain PyTorch
function (``*_reference``) the launcher must equal. Two Gluon modules for sm_90 are the
exceptions, second kernels that the Triton modules tune over where they can run:
``flash_attention_hopper`` (must equal ``flash_attention.attention_reference``) and
``matmul_hopper``, the warp-specialized matmul behind ``layernorm_linear`` and
``linear_residual`` (must equal their references). ``TRITON_INTERPRET=1`` (set before Triton is
imported) runs the Triton kernels on the CPU in float32 and float16 (Gluon has no interpreter:
the Gluon kernels are compiled for sm_90 on the CPU and run on the GPU). Launches
go to the current CUDA device (Triton's rule): call the ops under ``torch.cuda.device(t.device)``
for tensors on another GPU.
"""

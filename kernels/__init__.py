"""Hand-written Triton kernels for the Brain-JEPA encoder (import name ``brainjepa_kernels``).

Each module holds one op: the ``@triton.jit`` kernel, its launcher, and the plain PyTorch
function (``*_reference``) the launcher must equal. ``flash_attention_hopper`` is the exception:
a second attention kernel, written in Gluon for sm_90, that ``flash_attention`` tunes over where
it can run; it must equal ``flash_attention.attention_reference``. ``TRITON_INTERPRET=1`` (set
before Triton is imported) runs the Triton kernels on the CPU in float32 and float16 (Gluon has
no interpreter: the Gluon kernel is compiled for sm_90 on the CPU and run on the GPU). Launches
go to the current CUDA device (Triton's rule): call the ops under ``torch.cuda.device(t.device)``
for tensors on another GPU.
"""

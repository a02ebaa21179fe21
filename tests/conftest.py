"""Test setup: without CUDA, Triton kernels run under the CPU interpreter.

``TRITON_INTERPRET`` must be set before Triton is first imported, so it is set here, at the
top of the first module pytest loads.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# References run in true fp32: cuDNN would otherwise run the fp32 convolution of
# ``patch_embed_reference`` (and the original model's) in TF32, 2.6e-4 off at B=1 on an H100.
torch.backends.cudnn.allow_tf32 = False

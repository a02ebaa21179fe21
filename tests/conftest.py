"""Test setup: without CUDA, Triton kernels run under the CPU interpreter.

``TRITON_INTERPRET`` must be set before Triton is first imported, so it is set here, at the
top of the first module pytest loads.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

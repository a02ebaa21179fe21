"""brainjepa-fast: the Brain-JEPA fMRI encoder, faithful and fast.

>>> import brainjepa_fast as bj
>>> enc = bj.load("brainjepa.safetensors", dtype=torch.bfloat16)   # doctest: +SKIP
>>> emb = bj.encode(scan_450x160, enc)                              # doctest: +SKIP
"""
from .api import encode, load
from .checkpoint import describe_checkpoint, save_random_checkpoint
from .config import VARIANTS
from .errors import BrainJEPAError, CheckpointError, ConfigError, ScanError
from .model import Encoder

__all__ = [
    "Encoder", "load", "encode", "save_random_checkpoint", "describe_checkpoint", "VARIANTS",
    "BrainJEPAError", "CheckpointError", "ConfigError", "ScanError",
]
__version__ = "0.1.0"

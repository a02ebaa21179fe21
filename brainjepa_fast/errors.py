"""Exceptions raised for bad user input.

Every error names the file (where there is one), what was expected and what was found.
They subclass ``ValueError`` so code that already catches that keeps working; the CLI
turns any :class:`BrainJEPAError` into one line on stderr and a non-zero exit.
"""


class BrainJEPAError(ValueError):
    """Base class of all errors caused by bad input (checkpoints, scans, options)."""


class CheckpointError(BrainJEPAError):
    """A checkpoint file is unreadable, or holds missing, unexpected or misshapen keys."""


class ScanError(BrainJEPAError):
    """An fMRI scan is unreadable, has the wrong shape, or holds NaN/Inf."""


class ConfigError(BrainJEPAError):
    """An unknown variant, a bad option value, or a gradient table of the wrong shape."""

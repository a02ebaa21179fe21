"""``python -m brainjepa_fast``: the ``brainjepa-fast`` command line (see :mod:`brainjepa_fast.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

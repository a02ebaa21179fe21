"""Benchmarks of brainjepa-fast: ``pytest bench/`` (kernels, whole encoder) and ``python -m bench.compare``.

Not collected by the default ``pytest`` run (``testpaths = ["tests"]``).
"""

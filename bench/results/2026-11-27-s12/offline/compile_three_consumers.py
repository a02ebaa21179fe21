"""Offline sm_90 compile of the Gluon matmul with three consumer warpgroups (session 12).

    git apply bench/results/2026-11-27-s12/offline/three_consumers.patch
    PYTHONPATH=. python bench/results/2026-11-27-s12/offline/compile_three_consumers.py

Runs ``bench.linear_lab --compile-ws``'s compile over two-consumer (4 slots) and
three-consumer (3 and 4 slots) configurations; prints one JSON row per matmul and configuration.
"""
import brainjepa_kernels.matmul_hopper as mh
import bench.linear_lab

mh.CONFIGS = tuple(mh.WsConfig(stages=s, consumers=c) for c, s in ((2, 4), (3, 3), (3, 4)))
bench.linear_lab.compile_ws_only()

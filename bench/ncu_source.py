"""Summarise Nsight Compute's per-instruction SASS page (``ncu -i REP --page source --csv
--print-source sass``): the sampled stall reasons summed over the kernel, and the instructions
with the most samples, each with its neighbours' opcodes, so that a stall can be placed in the
code (main loop, epilogue, barrier waits).

    python -m bench.ncu_source ncu_src_fc1.csv [--top 25]
"""
from __future__ import annotations

import argparse
import csv
import sys
from typing import Optional


def read_rows(path: str) -> tuple[list[str], list[dict[str, str]]]:
    """The CSV's header and rows, skipping the lines ncu prints before the header (``==PROF==``)."""
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"') and "Source" in line), None)
    if start is None:
        raise SystemExit(f"{path}: no CSV header with a Source column; first lines: {lines[:3]}")
    reader = csv.DictReader(lines[start:])
    return list(reader.fieldnames or []), list(reader)


def number(text: Optional[str]) -> float:
    try:
        return float((text or "").replace(",", ""))
    except ValueError:
        return 0.0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    header, rows = read_rows(args.csv)
    samples = next((c for c in header if "Sampling (All Samples)" in c), None)
    if samples is None:
        print("columns:", header)
        return 1
    # "(Not Issued)" columns are subsets of their reason's samples: left out so the shares add up.
    reasons = [c for c in header if c.startswith("stall_") and "Not Issued" not in c]
    total = sum(number(r[samples]) for r in rows)
    print(f"{len(rows)} instructions, {total:.0f} samples")
    sums = sorted(((sum(number(r[c]) for r in rows), c) for c in reasons), reverse=True)
    print("by reason:", ", ".join(f"{c} {v / total:.1%}" for v, c in sums[:10] if v > 0))
    order = sorted(range(len(rows)), key=lambda i: -number(rows[i][samples]))
    for i in order[:args.top]:
        r = rows[i]
        top = sorted(((number(r[c]), c) for c in reasons), reverse=True)[:3]
        around = " | ".join(rows[j]["Source"].split()[0] if rows[j]["Source"].split() else "" for j in
                            range(max(0, i - 2), min(len(rows), i + 3)))
        print(f"{i:5d} {number(r[samples]) / total:6.1%}  {r['Source'][:60]:60s}  "
              f"{', '.join(f'{c} {v:.0f}' for v, c in top if v > 0)}  [{around}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())

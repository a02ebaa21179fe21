"""Where each consumer warpgroup of the Gluon matmul spends its stall samples (session 13, the
table in bench/NOTES.md): turn waits, ring-data waits, main loop, epilogue and the rest.

    python bench/results/2026-11-27-s13/run6/consumer_regions.py   (from the repository root)

Input: Nsight Compute's per-instruction SASS page of runs 6 and 8 (``ncu_src_*.csv.gz``). A
partition's code runs from one ``USETMAXREG`` to the next; the ranges below were read off the
listing (instruction indices), as were the barriers' shared-memory offsets (ring ``ready``
barriers and the two ``turn`` barriers). A barrier wait is the samples on its
``SYNCS.PHASECHK`` try-wait up to the branch after it; the main loop is the span of the
partition's ``HGMMA`` instructions (less its waits); the rest is the epilogue and tile set-up.
"""
from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: file -> (ready offset, {consumer: (first, last + 1 instruction index, its turn barrier's offset)})
PROFILES = {
    HERE / "ncu_src_fc1_ws128x128x64s4.csv.gz": ("0x300b0", {0: (24, 2565, "0x300f8"), 1: (2721, 5321, "0x300f0")}),
    HERE / "ncu_src_qkv_ws128x128x64s4.csv.gz": ("0x300b0", {0: (26, 902, "0x300f8"), 1: (1068, 2020, "0x300f0")}),
    HERE.parent / "run8" / "ncu_src_fc1_ws128x128x64s4h.csv.gz": (
        "0x380e0", {0: (25, 2182, "0x38148"), 1: (3410, 5660, "0x38140")}),
}


def rows(path: Path) -> list[tuple[str, float]]:
    """(SASS text, all stall samples) per instruction, in address order."""
    lines = gzip.open(path, "rt").read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('"') and "Source" in line)
    reader = csv.DictReader(io.StringIO("\n".join(lines[start:])))
    samples = next(c for c in reader.fieldnames if "Sampling (All Samples)" in c)
    return [(r["Source"].strip(), float((r[samples] or "0").replace(",", "") or 0)) for r in reader]


def main() -> None:
    for path, (ready, consumers) in PROFILES.items():
        code = rows(path)
        print(path.name)
        for role, (lo, hi, turn) in consumers.items():
            total = sum(s for _, s in code[lo:hi])
            waits = {"turn": 0.0, "ready": 0.0}
            in_wait = set()
            for i in range(lo, hi):
                if "PHASECHK" in code[i][0]:
                    j = i
                    while j < hi and "BRA" not in code[j][0]:
                        j += 1
                    kind = "turn" if turn in code[i][0] else "ready" if ready in code[i][0] else None
                    if kind:
                        waits[kind] += sum(s for _, s in code[i:j + 1])
                        in_wait.update(range(i, j + 1))
            hgmma = [i for i in range(lo, hi) if "HGMMA" in code[i][0]]
            main_loop = sum(code[i][1] for i in range(min(hgmma) - 20, max(hgmma) + 8) if i not in in_wait)
            rest = total - main_loop - waits["turn"] - waits["ready"]
            print(f"  consumer {role}: turn {waits['turn'] / total:.1%}, ring data {waits['ready'] / total:.1%}, "
                  f"main loop {main_loop / total:.1%}, epilogue and rest {rest / total:.1%}")


if __name__ == "__main__":
    main()

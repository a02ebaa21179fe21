"""bench.ncu_source on a small CSV of the layout ``ncu --page source --csv --print-source sass``
writes: the lines before the header skipped, samples summed per stall reason, the instructions
ranked by their samples."""
from __future__ import annotations

from bench.ncu_source import main

CSV = '''==PROF== Connected to process 1
"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)","stall_barrier","stall_long_sb"
"0x10","HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24","10","8","0","10"
"0x20","BAR.SYNC.DEFER_BLOCKING 0x2, 0x80","60","50","60","0"
"0x30","FFMA R1, R2, R3, R4","30","1","0","0"
'''


def test_summary_ranks_instructions_and_reasons(tmp_path, capsys):
    path = tmp_path / "src.csv"
    path.write_text(CSV)
    assert main([str(path), "--top", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "3 instructions, 100 samples"
    assert lines[1] == "by reason: stall_barrier 60.0%, stall_long_sb 10.0%"
    assert "BAR.SYNC" in lines[2] and "60.0%" in lines[2] and "FFMA" in lines[3] and len(lines) == 4


def test_csv_without_samples_column_is_refused(tmp_path, capsys):
    path = tmp_path / "src.csv"
    path.write_text('"Address","Source","Instructions Executed"\n"0x10","NOP","1"\n')
    assert main([str(path)]) == 1
    assert "columns:" in capsys.readouterr().out

"""The README's demo runs end to end (one short epoch here; `make demo` runs it in full)."""

import runpy
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "tools" / "demo_digits.py"


def test_demo_prints_the_table(capsys):
    demo = runpy.run_path(str(DEMO))
    demo["main"](["--epochs", "1", "--seeds", "0", "--batch-size", "32", "--test-size", "1500"])
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("B "))
    assert header.split()[1:5] == ["ema", "en", "rule_of_thumb", "simple"]
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit()]
    assert [row[0] for row in rows] == ["2", "32"]
    errors = [float(v) for v in rows[0][1:12:3]]
    assert all(0.0 <= e <= 100.0 for e in errors)

"""benchmarks.retinanet_head in its smoke preset: every head norm trains and is evaluated in
its rows, the cells and the table are written, a second run resumes, other settings are refused."""

import importlib
import json

import pytest

from benchmarks.retinanet_head.report import VARIANTS

retinanet_head = importlib.import_module("benchmarks.retinanet_head.__main__")


def test_smoke_preset_writes_every_variant_and_resumes(tmp_path, capsys):
    out = tmp_path / "out"
    retinanet_head.main(["--preset", "smoke", "--output-dir", str(out)])
    cells = sorted(p.stem for p in (out / "cells").glob("*.json"))
    assert cells == sorted(f"{v}_seed0" for v in VARIANTS)
    cell = json.loads((out / "cells" / "en_per_level_seed0.json").read_text())
    assert list(cell["results"]) == ["ema", "en"] and "AP" in cell["results"]["en"]
    assert [it for it, _ in cell["curve"]["en"]["points"]] == [2, 4]
    table = (out / "results.md").read_text()
    for _, label in VARIANTS.values():
        assert f"| {label} | EMA |" in table and f"| {label} | EN |" in table
    before = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    retinanet_head.main(["--preset", "smoke", "--output-dir", str(out)])  # resumes: nothing new
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == before
    with pytest.raises(FileExistsError, match="max_iter"):
        retinanet_head.main(["--preset", "short", "--output-dir", str(out)])

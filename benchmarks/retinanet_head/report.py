"""The table of the RetinaNet head benchmark, from its cells: one line per head norm and
evaluation row, AP/AP50/AP75 as mean and sample standard deviation over seeds."""

import json
import math
import statistics
from pathlib import Path

from evalnorm_det.config import TABLE_ROWS
from evalnorm_det.engine.evaluation import METRICS

from ..common import write_results

# The head norms compared: (MODEL.RETINANET.NORM, MODEL.EVALNORM.RETINANET_HEAD_STATS), label.
VARIANTS = {
    "bn_shared": (("BN", "shared"), "BN, shared statistics"),
    "bn_per_level": (("BN", "per_level"), "BN, per-level statistics"),
    "gn": (("GN", "per_level"), "GN"),
    "en_per_level": (("EN", "per_level"), "EN, per-level statistics"),
    "en_shared": (("EN", "shared"), "EN, shared statistics"),
}


def load_cells(path):
    return [json.loads(p.read_text()) for p in sorted(Path(path, "cells").glob("*.json"))]


def _summary(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(cells, settings):
    """The markdown table: one line per (variant, row) that the cells have."""
    seeds = len({c["seed"] for c in cells})
    title = (
        f"RetinaNet head norms, {settings['max_iter']} iterations, {seeds} seed(s), box AP on "
        "the validation split (mean ± sample std over seeds)"
    )
    lines = [
        title,
        "",
        "| head norm | evaluation | seeds | " + " | ".join(METRICS) + " | best AP at iteration |",
        "|---|---|---:|" + "---:|" * len(METRICS) + "---|",
    ]
    for variant, (_, label) in VARIANTS.items():
        runs = [c for c in cells if c["variant"] == variant]
        if not runs:
            continue
        for row in runs[0]["results"]:
            values = [[r["results"][row].get(m) for r in runs] for m in METRICS]
            best = ", ".join(str(r["curve"].get(row, {}).get("best_iter", "n/a")) for r in runs)
            lines.append(
                f"| {label} | {TABLE_ROWS.get(row, row)} | {len(runs)} | "
                + " | ".join(_summary(v) for v in values)
                + f" | {best} |"
            )
    return "\n".join(lines) + "\n"


def write_report(path, settings):
    cells = load_cells(path)
    results = {"settings": settings, "cells": cells}
    write_results(path, results, table(cells, settings))
    return cells

"""The detection regimes' report: means and spread over seeds per regime, N and row, the
tables in the layout of the paper's Table 2 (text and markdown), the headline (the share of
regime (d)'s EMA gap EN recovers at 2 images), and ``results.json`` / ``results.md``."""

import json
import os
import time

import numpy as np

from evalnorm_det.engine.evaluation import METRICS

from ..stats import gap_recovered, markdown_table, mean_std, percent, two_decimals
from .settings import CONFIG, IMS_PER_BATCH, REGIMES, ROOT

# Table 2 (d) of the paper, ResNet-50 on COCO: EMA at 2 and 8 images per GPU, EN at 2 (AP).
PAPER_D = {"ema_2": 24.8, "en_2": 30.2, "ema_8": 31.7}
PAPER_RECOVERED = (PAPER_D["en_2"] - PAPER_D["ema_2"]) / (PAPER_D["ema_8"] - PAPER_D["ema_2"])

# The rows of a regime's block, in order, where measured: the trainer's evaluation rows
# (settings.TABLE_ROWS), EN - EMA, example weighing (chosen by the benchmark on the selection
# split) and test groups of N.
ROW_LABELS = {
    "ema": "EMA",
    "en": "EN",
    "en-ema": "EN - EMA",
    "rule_of_thumb": "1/B^2",
    "prediction_time_bn": "pred.-time BN",
    "example_weighing": "example weigh.",
    "precise_bn": "PreciseBN",
    "precise_bn_en_offline": "PreciseBN+EN off",
    "head_batch_stats": "head batch st.",
    "test_groups": "test groups of N",
}


def _with_difference(results):
    """The cell's results with an "en-ema" row where EN and EMA are both present."""
    rows = dict(results)
    if "ema" in rows and "en" in rows:
        rows["en-ema"] = {
            m: None if None in (rows["en"][m], v) else rows["en"][m] - v
            for m, v in rows["ema"].items()
        }
    return rows


def mean_table(cells):
    """{regime: {n: {row: {metric: {"mean", "std", "n"}}}}} over the cells' seeds: the mean
    (None if a seed has none), the sample standard deviation (None with one seed) and the
    number of seeds; rows are the cells' rows and "en-ema"."""
    values = {}
    for cell in cells:
        per_n = values.setdefault(cell["regime"], {}).setdefault(cell["images_per_gpu"], {})
        for row, metrics in _with_difference(cell["results"]).items():
            for metric, value in metrics.items():
                per_n.setdefault(row, {}).setdefault(metric, []).append(value)
    table = {}
    for regime in [r for r in REGIMES if r in values]:
        table[regime] = {}
        for n in sorted(values[regime]):
            table[regime][n] = {
                row: {m: _stats(v) for m, v in metrics.items()}
                for row, metrics in values[regime][n].items()
            }
    return table


def _stats(values):
    if None in values:
        return {"mean": None, "std": None, "n": len(values)}
    mean, std = mean_std(values, single=None)
    return {"mean": mean, "std": std, "n": len(values)}


def _fmt_stats(stats, signed=False):
    """ "mean" or "mean±std" (with more than one seed)."""
    text = two_decimals(stats["mean"], signed)
    return text if stats["std"] is None else f"{text}±{stats['std']:.2f}"


def _rows(per_regime):
    measured = set().union(*(rows for rows in per_regime.values()))
    return [row for row in ROW_LABELS if row in measured]


def _entries(per_regime, row, images_per_gpu):
    """The row's AP/AP50/AP75 per N as text: "." where the cell was not run."""
    out = []
    for n in images_per_gpu:
        for m in METRICS:
            stats = per_regime.get(n, {}).get(row, {}).get(m)
            out.append("." if stats is None else _fmt_stats(stats, row == "en-ema"))
    return out


def format_text(table, images_per_gpu, title):
    """The table as text, in the layout of the paper's Table 2 (mean±std over seeds)."""
    width = 14
    heads = "".join(f"{f'{n} images/GPU':^{3 * width}}" for n in images_per_gpu)
    lines = [title, f"{'':<17}{heads}"]
    lines.append(f"{'':<17}" + "".join(f"{m:>{width}}" for _ in images_per_gpu for m in METRICS))
    for regime, per_regime in table.items():
        lines.append(REGIMES[regime])
        for row in _rows(per_regime):
            cells = "".join(e.rjust(width) for e in _entries(per_regime, row, images_per_gpu))
            lines.append(f"{ROW_LABELS[row]:<17}{cells}")
    return "\n".join(lines)


def format_markdown(table, images_per_gpu):
    """The table in markdown: one block of rows per regime, AP/AP50/AP75 per N."""
    header = ["regime / row"] + [f"{m} ({n} img)" for n in images_per_gpu for m in METRICS]
    rows = []
    for regime, per_regime in table.items():
        rows.append(f"| **{REGIMES[regime]}** " + "| " * (len(header) - 1) + "|")
        for row in _rows(per_regime):
            rows.append([ROW_LABELS[row], *_entries(per_regime, row, images_per_gpu)])
    return markdown_table(header, rows, align="-" + "r" * (len(header) - 1))


def headline(cells):
    """The share of regime (d)'s EMA gap EN recovers at 2 images (AP): per seed with both N = 2
    and 8, and of the means over those seeds."""
    d = {(c["images_per_gpu"], c["seed"]): c["results"] for c in cells if c["regime"] == "d"}
    seeds = sorted(s for n, s in d if n == 2 and (8, s) in d)
    paper = (
        f"paper: {percent(PAPER_RECOVERED)} ({PAPER_D['ema_2']} -> {PAPER_D['en_2']} against "
        f"{PAPER_D['ema_8']})"
    )
    if not seeds:
        return {
            "recovered": None,
            "per_seed": {},
            "text": "Gap recovered: not measured (needs regime d at 2 and 8)",
        }
    per_seed = {}
    for s in seeds:
        ema_2, en_2, ema_8 = d[2, s]["ema"]["AP"], d[2, s]["en"]["AP"], d[8, s]["ema"]["AP"]
        per_seed[str(s)] = {
            "ema_2": ema_2,
            "en_2": en_2,
            "ema_8": ema_8,
            "recovered": gap_recovered(ema_2, en_2, ema_8, higher_is_better=True),
        }

    def mean(key):
        v = [p[key] for p in per_seed.values()]
        return None if None in v else float(np.mean(v))

    ema_2, en_2, ema_8 = mean("ema_2"), mean("en_2"), mean("ema_8")
    recovered = gap_recovered(ema_2, en_2, ema_8, higher_is_better=True)
    seeds_text = ", ".join(
        f"seed {s}: " + percent(p["recovered"], missing="undefined") for s, p in per_seed.items()
    )
    if None in (ema_2, en_2, ema_8):
        text = f"Regime (d), 2 images: gap recovered undefined (missing values); {paper}"
    elif recovered is None:
        text = (
            f"Regime (d), 2 images: gap recovered undefined: EMA@8 - EMA@2 = "
            f"{two_decimals(ema_8 - ema_2, True)} AP <= 0, EMA at 2 images is not worse than at 8 "
            f"here, so the ratio is meaningless ({seeds_text}); {paper}"
        )
    else:
        text = (
            f"Regime (d), 2 images: EN recovers {percent(recovered)} of the EMA gap "
            f"({two_decimals(ema_2)} -> {two_decimals(en_2)} AP against {two_decimals(ema_8)} at "
            f"8 images, mean of {len(seeds)} seed(s); {seeds_text}); {paper}"
        )
    return {
        "ema_2": ema_2,
        "en_2": en_2,
        "ema_8": ema_8,
        "recovered": recovered,
        "per_seed": per_seed,
        "text": text,
    }


def write_report(args, s, out, cells, where, start, failed=(), final=False):
    """``results.json`` and ``results.md`` of ``cells``, every cell in the output dir, so that
    runs of disjoint selections (``--regimes``, ``--images-per-gpu``, ``--seed``) can share it
    side by side (printed too when ``final``)."""
    table = mean_table(cells)
    images = sorted({c["images_per_gpu"] for c in cells})
    seeds = sorted({c["seed"] for c in cells})
    title = (
        f"{s.num_val} test images ({s.task}): COCO box AP (%), {s.image_size} px, "
        f"{IMS_PER_BATCH} images "
        f"per SGD step normalized in groups of N (one process = {IMS_PER_BATCH}/N GPUs x N "
        f"images), {s.iters} iterations, seeds {seeds} (mean±std where more than one)"
    )
    text = format_text(table, images, title)
    head = headline(cells)
    note = (
        f"Every cell: same SGD batch ({IMS_PER_BATCH} images), LR {s.base_lr}, iterations and "
        "data order per seed; only the normalization batch N changes (paper: 8 GPUs x N "
        "images, LR 0.015 x N / 8). Rows: the same weights evaluated with EMA, EN (alpha/beta "
        "estimated online), 1/B^2, prediction-time BN (alpha = beta = 1), example weighing "
        "(one alpha = beta for the network, chosen among "
        f"{list(s.example_weights)} on {s.num_select} selection images), PreciseBN "
        f"({s.precise_bn_iters} batches of N images; it changes nothing where training "
        "normalizes with frozen statistics), PreciseBN + EN offline, head batch statistics, "
        "and test groups of N (the test "
        "images in batches of N, the backbone normalized by their batch's statistics as in "
        "training, the ROI heads by their EMA). "
        "'.': not run; '-': no finite detection (COCO AP undefined) or a diverged cell."
    )
    standin_path = out / "standin.json"
    report = {
        "benchmark": "detection_regimes",
        "preset": args.preset,
        "argv": args.argv,
        "settings": {
            **s.fingerprint(),
            "ims_per_batch": IMS_PER_BATCH,
            "anchor_sizes": s.anchor_sizes(),
            "config": str(CONFIG.relative_to(ROOT)),
        },
        "protocol": note,
        "machine": {**where, "load_average_now": list(os.getloadavg())},
        "standin": json.loads(standin_path.read_text()) if standin_path.exists() else {},
        "cells": [c["name"] for c in cells],
        "failed_cells": list(failed),
        "table": {
            r: {str(n): rows for n, rows in per_regime.items()} for r, per_regime in table.items()
        },
        "headline": {**head, "metric": "AP", "paper": PAPER_D, "paper_recovered": PAPER_RECOVERED},
        "wall_seconds": {
            "cells": sum(c["seconds"]["total"] for c in cells),
            "this_run": time.perf_counter() - start,
        },
        "complete": final and not failed,
    }
    with open(out / "results.json", "w") as f:
        json.dump(report, f, indent=1)
    markdown = format_markdown(table, images)
    with open(out / "results.md", "w") as f:
        f.write(f"{title}\n\n{markdown}\n\n{head['text']}\n\n{note}\n")
    if final:
        print(f"\n{text}\n\n{head['text']}\n{note}", flush=True)
    return report

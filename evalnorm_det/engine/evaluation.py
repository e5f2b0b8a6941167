"""Evaluate the same weights under several normalization modes; the Table 2 layout."""

import math

from ..layers import EvalNorm2d
from ..modes import evalnorm_mode

__all__ = ["MODE_LABELS", "evaluate_modes", "format_table"]

# Row labels, as in the paper.
MODE_LABELS = {"ema": "EMA", "en": "EN", "rule_of_thumb": "1/B^2", "simple": "1/B"}
METRICS = ("AP", "AP50", "AP75")


def evaluate_modes(model, modes, evaluate):
    """``{mode: evaluate(mode)}``, each call made with every EvalNorm2d of ``model`` in that mode.

    A model without EvalNorm2d layers is evaluated once, as ``"ema"`` (plain BatchNorm).
    """
    if not any(isinstance(m, EvalNorm2d) for m in model.modules()):
        return {"ema": evaluate("ema")}
    results = {}
    for mode in modes:
        with evalnorm_mode(model, mode):
            results[mode] = evaluate(mode)
    return results


def format_table(results, title, task="bbox"):
    """Table 2 of the paper for one run: a row per mode with AP, AP50, AP75 (COCO, in %), and
    ``EN - EMA`` when both modes are present. ``results``: ``{mode: {task: {metric: value}}}``.
    """
    rows = [
        (MODE_LABELS.get(mode, mode), [r.get(task, {}).get(m, math.nan) for m in METRICS])
        for mode, r in results.items()
    ]
    if "en" in results and "ema" in results:
        en, ema = (dict(rows)[MODE_LABELS[k]] for k in ("en", "ema"))
        rows.insert(list(results).index("en") + 1, ("EN - EMA", [a - b for a, b in zip(en, ema)]))
    width = max(len(label) for label, _ in rows)
    lines = [title, f"{'':<{width}}" + "".join(f"{m:>9}" for m in METRICS)]
    for label, values in rows:
        sign = "+" if label == "EN - EMA" else ""
        lines.append(f"{label:<{width}}" + "".join(f"{v:>{sign}9.2f}" for v in values))
    return "\n".join(lines)

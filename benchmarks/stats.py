"""What the benchmarks' reports compute and format alike: the share of a gap recovered, mean and
spread over seeds, Student-t intervals, markdown tables, percentages."""

import math

import numpy as np
from scipy import stats as scipy_stats

__all__ = ["gap_recovered", "interval", "markdown_table", "mean_std", "percent", "two_decimals"]


def gap_recovered(small, x, best, higher_is_better=False):
    """Share of the gap between the baseline at a small batch (``small``, e.g. EMA at B = 2) and
    at its best (``best``, e.g. EMA at the best B) that evaluation X recovers at the small batch
    (``x``): (small - x) / (small - best) for errors, (x - small) / (best - small) for scores
    (``higher_is_better``). None where there is no gap (the baseline at the small batch not
    worse: the ratio would mean nothing) or a value is missing."""
    if None in (small, x, best):
        return None
    if higher_is_better:
        gap = best - small
        return None if gap <= 0 else (x - small) / gap
    gap = small - best
    return None if gap <= 0 else (small - x) / gap


def mean_std(values, single=0.0):
    """Mean and sample standard deviation (ddof=1) of ``values``, as floats; ``single`` for the
    deviation of a single value."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else single


def interval(values, confidence=0.95):
    """Mean of ``values`` and its two-sided Student-t interval over them (None for fewer than 2)."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return {"mean": mean, "low": None, "high": None}
    half = (
        scipy_stats.t.ppf(0.5 + confidence / 2, len(values) - 1)
        * values.std(ddof=1)
        / math.sqrt(len(values))
    )
    return {"mean": mean, "low": mean - half, "high": mean + half}


def percent(share, missing="n/a"):
    """A share as a whole percentage ("78%"); ``missing`` for None."""
    return missing if share is None else f"{100 * share:.0f}%"


def two_decimals(value, signed=False, missing="-"):
    """A number with 2 decimals ("+1.50" where ``signed``); ``missing`` for None."""
    if value is None:
        return missing
    return f"{value:+.2f}" if signed else f"{value:.2f}"


_ALIGN = {"-": "---", "l": ":---", "r": "---:", "c": ":---:"}


def markdown_table(header, rows, align="r"):
    """A markdown table: ``header`` (column names), ``rows`` (sequences of values, each written
    with ``str``; a row given as a string is a line written as it is, e.g. a section's title).
    ``align``: one character per column, or one for them all: "-" (none), "l", "r" or "c"."""
    if len(align) == 1:
        align = align * len(header)
    if len(align) != len(header):
        raise ValueError(f"align {align!r}: expected one character per column ({len(header)})")
    lines = ["| " + " | ".join(header) + " |", "|" + "".join(_ALIGN[a] + "|" for a in align)]
    for row in rows:
        lines.append(row if isinstance(row, str) else "| " + " | ".join(map(str, row)) + " |")
    return "\n".join(lines)

"""Evaluate one set of weights under every normalization choice; the table of the results."""

import contextlib
import csv
import logging
import math

import torch
from detectron2.utils.events import EventStorage
from torch import nn

from evalnorm import EvalNorm2d, evalnorm_mode, keep_running_stats
from evalnorm.diagnosis import fixed_coefficients, restored_coefficients

from ..config import TABLE_ROWS

__all__ = [
    "METRICS",
    "evaluate_rows",
    "format_table",
    "precise_statistics",
    "row_evaluation",
    "table_columns",
    "table_rows",
    "table_tasks",
    "write_tables",
]

logger = logging.getLogger(__name__)

METRICS = ("AP", "AP50", "AP75")
# COCO's tasks as the table's columns name them.
TASK_NAMES = {"bbox": "box", "segm": "mask"}
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
# The EvalNorm2d mode each row evaluates in, where it is not the row's own name.
LAYER_MODES = {
    "en_offline": "en",
    "precise_bn": "ema",
    "head_batch_stats": "ema",
    "prediction_time_bn": "en",
    "precise_bn_en_offline": "en",
    "en_calibrated": "en",
}
NEEDS_EVALNORM = (
    "en",
    "en_offline",
    "rule_of_thumb",
    "simple",
    "head_batch_stats",
    "prediction_time_bn",
    "precise_bn_en_offline",
    "en_calibrated",
)


@contextlib.contextmanager
def row_evaluation(
    model, row, train_batches=None, estimate_offline=None, precise_bn_iters=200, calibrate=None
):
    """Within the block, ``model`` evaluates as row ``row`` (a key of ``TABLE_ROWS``); on exit
    every coefficient, statistic and mode is as before.

    - "ema", "en", "rule_of_thumb", "simple": every EvalNorm2d in that mode (``evalnorm_mode``).
    - "en_offline": alpha/beta fitted now by ``estimate_offline(model, train_batches())``, then "en".
    - "precise_bn": detectron2's PreciseBN: the running statistics of every norm that trains on
      batch statistics recomputed as population statistics over ``precise_bn_iters`` batches of
      ``train_batches()`` (``precise_statistics``), then "ema".
    - "head_batch_stats": "ema" in the backbone, and the ROI heads' norms on the statistics of the
      batch of ROIs they evaluate ("Rethinking Batch in BatchNorm", Wu and Johnson, 2021).
    - "prediction_time_bn": alpha = beta = 1 in every EvalNorm2d (``fixed_coefficients``).
    - "precise_bn_en_offline": as "precise_bn", then alpha/beta fitted offline as "en_offline"
      on fresh batches of ``train_batches()``, then "en".
    - "en_calibrated": ``calibrate(model)`` scales alpha/beta (``calibrate_coefficients`` on a
      validation split), then "en".

    ``train_batches``: a callable returning an iterator of training batches, B images per process.
    """
    if row not in TABLE_ROWS:
        raise ValueError(f"Unknown row {row!r}: expected one of {', '.join(TABLE_ROWS)}")
    has_evalnorm = any(isinstance(m, EvalNorm2d) for m in model.modules())
    if row in NEEDS_EVALNORM and not has_evalnorm:
        raise ValueError(f"Row {row!r} needs EvalNorm2d layers; the model has none")
    with contextlib.ExitStack() as stack:
        if row in ("precise_bn", "precise_bn_en_offline"):
            stack.enter_context(_restored(model, STATISTICS))
            with EventStorage():
                precise_statistics(model, train_batches(), precise_bn_iters)
        if row in ("en_offline", "precise_bn_en_offline"):
            stack.enter_context(restored_coefficients(model))
            estimate_offline(model, train_batches())
        elif row == "en_calibrated":
            stack.enter_context(restored_coefficients(model))
            calibrate(model)
        elif row == "prediction_time_bn":
            stack.enter_context(fixed_coefficients(model, 1.0))
        layer_mode = LAYER_MODES.get(row, row)
        if has_evalnorm:
            stack.enter_context(evalnorm_mode(model, layer_mode))
        if row == "head_batch_stats":
            for name, head in model.named_modules():
                if name.split(".")[-1] == "roi_heads":
                    stack.enter_context(evalnorm_mode(head, "batch"))
        yield model


@torch.no_grad()
def precise_statistics(model, batches, num_iter):
    """detectron2's PreciseBN, correct for microbatch layers: the running statistics of every
    BatchNorm-type layer that normalizes with batch statistics in training (not frozen, or
    frozen with ``frozen_en`` "batch_stats") become the plain average, over every normalization
    group of ``num_iter`` batches (each group of ``norm_batch_size`` samples of a microbatch
    EvalNorm2d, else the whole batch), of the group's mean and unbiased variance, as
    ``momentum=None`` in BatchNorm2d. (fvcore's ``update_bn_stats`` keeps one value per forward:
    the last group's.) The model runs in training mode with its running statistics untouched
    in between and online estimation off; needs an ``EventStorage`` for detectron2 models.
    In place (``row_evaluation`` restores them); returns the number of layers updated."""
    layers = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.track_running_stats
        and (not getattr(m, "frozen", False) or m.frozen_en == "batch_stats")
    ]
    sums = {m: [0.0, 0.0, 0] for m in layers}  # sum of means, sum of variances, groups

    def record(m, inputs):
        x = inputs[0]
        n = x.shape[0]
        if n == 0:
            return
        size = m.training_group_size(n) if isinstance(m, EvalNorm2d) else None
        groups = x.detach().float().unflatten(0, (-1, size or n)).transpose(1, 2).flatten(2)
        sums[m][0] = sums[m][0] + groups.mean(2).sum(0)  # (k, C, size * H * W)
        sums[m][1] = sums[m][1] + groups.var(2, unbiased=True).sum(0)
        sums[m][2] += groups.shape[0]

    handles = [m.register_forward_pre_hook(record) for m in layers]
    online = [(m, m.estimate_online) for m in model.modules() if isinstance(m, EvalNorm2d)]
    try:
        with _training(model), keep_running_stats(model):
            for m, _ in online:
                m.estimate_online = False
            done = 0
            for inputs in batches:
                if done == num_iter:
                    break
                model(inputs)
                done += 1
    finally:
        for h in handles:
            h.remove()
        for m, flag in online:
            m.estimate_online = flag
    if done < num_iter:
        raise ValueError(f"precise_statistics: {num_iter} batches needed, the data gave {done}")
    for m, (mean, var, count) in sums.items():
        if count:
            m.running_mean.copy_(mean / count)
            m.running_var.copy_(var / count)
    return sum(1 for _, _, count in sums.values() if count)


def evaluate_rows(model, rows, evaluate, **kwargs):
    """``{row: evaluate(row)}``, each call made within ``row_evaluation(model, row, **kwargs)``.

    A model without EvalNorm2d layers is evaluated only in the rows that need none ("ema",
    "precise_bn").
    """
    if not any(isinstance(m, EvalNorm2d) for m in model.modules()):
        skipped = [r for r in rows if r in NEEDS_EVALNORM]
        if skipped:
            logger.warning("No EvalNorm2d layer in the model: skipping rows %s", skipped)
        rows = [r for r in rows if r not in NEEDS_EVALNORM] or ["ema"]
    results = {}
    for row in rows:
        with row_evaluation(model, row, **kwargs):
            results[row] = evaluate(row)
    return results


def table_tasks(results):
    """The COCO tasks the table reports for ``{row: {task: {metric: value}}}``: ("bbox",), and
    "segm" after it when a row has mask results (the model predicts masks)."""
    has_masks = any("segm" in r for r in results.values())
    return ("bbox", "segm") if has_masks else ("bbox",)


def table_columns(tasks):
    """Column names: ``METRICS`` for box AP alone, else each metric named after its task
    ("box AP", ..., "mask AP75")."""
    if tuple(tasks) == ("bbox",):
        return list(METRICS)
    return [f"{TASK_NAMES[t]} {m}" for t in tasks for m in METRICS]


def table_rows(results, tasks=None):
    """[(label, values)] for ``{row: {task: {metric: value}}}``: AP, AP50, AP75 of each of
    ``tasks`` (default ``table_tasks(results)``) in turn, with an ``EN - EMA`` row after EN
    when both rows are present."""
    tasks = table_tasks(results) if tasks is None else tasks
    rows = [
        (
            TABLE_ROWS.get(row, row),
            [r.get(task, {}).get(m, math.nan) for task in tasks for m in METRICS],
        )
        for row, r in results.items()
    ]
    if "en" in results and "ema" in results:
        en, ema = (dict(rows)[TABLE_ROWS[k]] for k in ("en", "ema"))
        rows.insert(list(results).index("en") + 1, ("EN - EMA", [a - b for a, b in zip(en, ema)]))
    return rows


def format_table(results, title, tasks=None):
    """The table as text, in the layout of the paper's Table 2: one line per row with AP, AP50,
    AP75 (COCO, in %) of each task (box, then mask when the model predicts masks; see
    ``table_rows``), and ``EN - EMA``."""
    tasks = table_tasks(results) if tasks is None else tasks
    rows = table_rows(results, tasks)
    columns = table_columns(tasks)
    cell = max(9, *(len(c) + 2 for c in columns))
    width = max(len(label) for label, _ in rows)
    lines = [title, f"{'':<{width}}" + "".join(f"{c:>{cell}}" for c in columns)]
    for label, values in rows:
        sign = "+" if label == "EN - EMA" else ""
        lines.append(f"{label:<{width}}" + "".join(f"{v:>{sign}{cell}.2f}" for v in values))
    return "\n".join(lines)


def write_tables(results, title, prefix, tasks=None):
    """The table as ``prefix.txt`` (as printed), ``prefix.csv`` and ``prefix.md``."""
    tasks = table_tasks(results) if tasks is None else tasks
    rows = table_rows(results, tasks)
    columns = table_columns(tasks)
    with open(prefix + ".txt", "w") as f:
        f.write(format_table(results, title, tasks) + "\n")
    with open(prefix + ".csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["mode", *columns])
        writer.writerows([label, *(f"{v:.4f}" for v in values)] for label, values in rows)
    with open(prefix + ".md", "w") as f:
        f.write(f"{title}\n\n| mode | {' | '.join(columns)} |\n|---|" + "---:|" * len(columns))
        for label, values in rows:
            sign = "+" if label == "EN - EMA" else ""
            f.write(f"\n| {label} | " + " | ".join(f"{v:{sign}.2f}" for v in values) + " |")
        f.write("\n")


@contextlib.contextmanager
def _restored(model, names):
    """Puts back, on exit, the tensors ``names`` of every BatchNorm-type layer that has them."""
    saved = [
        (m, name, getattr(m, name).detach().clone())
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for name in names
        if isinstance(getattr(m, name, None), torch.Tensor)
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, name, value in saved:
                getattr(m, name).copy_(value)


@contextlib.contextmanager
def _training(model):
    was_training = model.training
    model.train()
    try:
        yield
    finally:
        model.train(was_training)

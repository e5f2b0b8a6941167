#!/usr/bin/env python
"""BatchNorm over small normalization microbatches, evaluated with EMA, EvalNorm and its peers.

The paper's section 4.1 at its spatial scale: a pre-activation ResNet-20 (the paper's CIFAR
network, 19 BatchNorm layers, feature maps 32x32, 16x16 and 8x8) on 32x32 colour images of
digits on photographs (``digit_scenes.py``), trained with SGD batches of 128 (LR 0.1, cosine)
while every BatchNorm layer normalizes consecutive groups of B samples
(``convert_to_evalnorm(..., microbatch=True)``), B in {2, 4, ..., 128}. For one seed only B
changes between runs: initial weights, data order and rendering are the same.

Each trained model is evaluated, same weights, with:
  EMA            vanilla BatchNorm: the running statistics
  EN online      alpha/beta estimated by ``OnlineEstimator`` while training (the paper's EN)
  EN offline     alpha/beta fitted after training by ``estimate_offline`` (section 3.4)
  1/B^2, 1/B     the rule of thumb and the "simple" choice
  prediction-time BN     alpha = beta = 1: each sample normalized by its own statistics
  inference example weighing   one alpha = beta for every layer (Summers and Dinneen, ICLR
                 2020), chosen from a grid by error on a validation split disjoint from test
  PreciseBN      running statistics recomputed as population averages over training batches
                 (the final model, every group of B: ``precise_statistics``), then EMA
  PreciseBN + EN offline   PreciseBN's statistics, then alpha/beta fitted offline against them
  BN, test groups of B     reference: each group of B test images normalized by its own
                 statistics, exactly as training normalizes (what the auxiliary loss targets)

Reported: test error per B and evaluation (mean and sample standard deviation over seeds), the
estimated alpha/beta, the share of the EMA gap recovered at the smallest B with a 95% interval
over seeds, the test-error curve of the curve runs, and a convergence check (the same seed
trained for ``--check-steps-factor`` times the steps).

    python benchmarks/microbatch.py --mode smoke   # CI: ~20 s, numbers mean nothing
    python benchmarks/microbatch.py                # quick: seed 0, B = 2 and 128
    python benchmarks/microbatch.py --mode full    # 3 seeds x 7 B's + convergence check

Both real modes train 3000 SGD steps per run: at 1500 steps the B = 2 models were still far
from converged (their error halved from 1500 to 3000 steps). Cells run side by side in
``--jobs`` processes (default: one per CPU) of ``--threads`` torch threads (default 1). A cell
took 1137-1300 s on one thread of a 2-core machine whose other core ran another job, so quick
mode (2 cells; it leaves out B = 4..64, seeds 1 and 2 and the convergence check) takes about
22 min on 2 cores (estimated from those cells, not timed end to end), and full mode (21 cells
of 3000 steps plus two of 6000: B = 2 and 128, seed 0) about 4.5 hours on 2 cores, to be run in
the background and resumed as often as needed.

Every run ("cell") is written to ``cells/`` in ``--output-dir`` as soon as it is done; running
the same command again resumes, skipping finished cells (other settings are refused unless
``--overwrite``). ``results.json``, ``results.md`` and the plots are rewritten from all cells
after each one. A cell is deterministic for a given thread count and machine, whichever
process runs it.
"""

import argparse
import copy
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import machine, resumable_output_dir, write_results  # benchmarks/, beside this file
from digit_scenes import SCENES, DigitScenes
from scipy import stats
from torch import nn

from evalnorm_det import (
    EvalNorm2d,
    OnlineEstimator,
    convert_to_evalnorm,
    estimate_offline,
    evalnorm_mode,
    keep_running_stats,
)
from evalnorm_det.engine.evaluation import fixed_coefficients, precise_statistics

# Evaluations: key in results.json -> table label. "batch" is the reference column.
EVALUATIONS = {
    "ema": "EMA",
    "en_online": "EN online",
    "en_offline": "EN offline",
    "rule_of_thumb": "1/B^2",
    "simple": "1/B",
    "prediction_time": "prediction-time BN",
    "example_weighing": "inference example weighing",
    "precise_bn": "PreciseBN",
    "precise_bn_en_offline": "PreciseBN + EN offline",
    "batch": "BN, test groups of B",
}
# Paper, Table 1 (ImageNet Prec@1, 2 samples/GPU): EMA 64.80, EN 70.98, EMA at 32 samples 75.98.
PAPER_RECOVERED = (70.98 - 64.80) / (75.98 - 64.80)
PLOTS = ("error_vs_B.png", "alpha_vs_B.png", "curve.png")
# Settings that do not change what a cell measures: a resumed run may differ in these.
NOT_MEASURED = ("mode", "output_dir", "overwrite", "threads", "jobs", "report_only")

PRESETS = {
    "smoke": {
        "seeds": [0],
        "batch_sizes": [2, 128],
        "steps": 4,
        "widths": [4, 8, 16],
        "train_digits": 256,
        "test_digits": 64,
        "test_copies": 2,
        "val_digits": 64,
        "val_copies": 2,
        "offline_iters": 2,
        "precise_iters": 2,
        "curve_every": 2,
        "curve_batch_sizes": [2, 128],
        "check_steps_factor": 2,
        "check_batch_sizes": [2],
        "jobs": 1,
    },
    "quick": {
        "seeds": [0],
        "batch_sizes": [2, 128],
        "steps": 3000,
        "widths": [8, 16, 32],
        "train_digits": None,
        "test_digits": 288,
        "test_copies": 8,
        "val_digits": 256,
        "val_copies": 4,
        "offline_iters": 100,
        "precise_iters": 100,
        "curve_every": 150,
        "curve_batch_sizes": [2, 128],
        "check_steps_factor": 2,
        "check_batch_sizes": [],
        "jobs": os.cpu_count() or 1,
    },
}
PRESETS["full"] = dict(
    PRESETS["quick"],
    seeds=[0, 1, 2],
    batch_sizes=[2, 4, 8, 16, 32, 64, 128],
    check_batch_sizes=[2, 128],
)
# Inference example weighing: the alpha = beta grid searched on the validation split.
WEIGHING_GRID = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


class PreActBlock(nn.Module):
    """ResNet v2 basic block: BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus the shortcut (a 1x1
    convolution of the pre-activated input where the shape changes)."""

    def __init__(self, in_channels, channels, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Conv2d(in_channels, channels, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class ResNet20(nn.Module):
    """The paper's 20-layer CIFAR ResNet v2 (3 stages x 3 blocks): (N, 3, 32, 32) images ->
    (N, 10) logits, feature maps 32x32, 16x16, 8x8 by stage; 19 BatchNorm layers."""

    def __init__(self, widths=(16, 32, 64), num_classes=10, blocks=3, in_channels=3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        layers, channels = [], widths[0]
        for stage, width in enumerate(widths):
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(PreActBlock(channels, width, stride))
                channels = width
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


def build_model(seed, norm_batch_size, widths):
    """ResNet-20 with every BatchNorm an ``EvalNorm2d`` normalizing groups of
    ``norm_batch_size`` samples in training; its initial weights depend on ``seed`` alone."""
    torch.manual_seed(seed)
    model = ResNet20(tuple(widths))
    return convert_to_evalnorm(model, norm_batch_size, init="rule_of_thumb", microbatch=True)


def evalnorm_layers(model):
    return [m for m in model.modules() if isinstance(m, EvalNorm2d)]


def learning_rate(step, steps, base_lr, warmup):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * base_lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def coefficients(model):
    """{layer name: [alpha, beta]} of every EvalNorm2d."""
    return {
        name: [m.alpha.item(), m.beta.item()]
        for name, m in model.named_modules()
        if isinstance(m, EvalNorm2d)
    }


@torch.no_grad()
def error(model, x, y, mode, chunk=1152):
    """Error (%) of ``model`` on images ``x``, labels ``y``, in EvalNorm ``mode``."""
    model.eval()
    with evalnorm_mode(model, mode):
        wrong = sum(
            (model(a).argmax(1) != b).sum().item() for a, b in zip(x.split(chunk), y.split(chunk))
        )
    return 100.0 * wrong / len(y)


@torch.no_grad()
def grouped_error(model, x, y, chunk=1152):
    """Error (%) with each group of B consecutive images normalized by its own statistics: the
    training forward itself (microbatch layers), running statistics untouched. ``chunk`` and
    ``len(y)`` must be multiples of B."""
    model.train()
    with keep_running_stats(model):
        wrong = sum(
            (model(a).argmax(1) != b).sum().item() for a, b in zip(x.split(chunk), y.split(chunk))
        )
    model.eval()
    return 100.0 * wrong / len(y)


def fixed_coefficient_error(model, x, y, value):
    """Error (%) with alpha = beta = ``value`` in every layer; the model's own are restored."""
    with fixed_coefficients(model, value):
        return error(model, x, y, "en")


def fit_offline(model, batches, iters, lr):
    """EN offline from the rule of thumb: the iterations run and every tenth auxiliary loss."""
    for m in evalnorm_layers(model):
        m.set_coefficients("rule_of_thumb")
    summary = estimate_offline(model, batches, iters, lr=lr, log_period=10**9)
    return {
        "iterations": summary["iterations"],
        "aux_loss": summary["losses"][:: max(1, iters // 10)],
    }


def train(data, b, steps, args, curve=False):
    """Train one model with alpha/beta estimated online; with ``curve``, its test error (EMA and
    EN online) every ``args.curve_every`` steps. Returns (model, curve points)."""
    model = build_model(data.seed, b, args.widths)
    params = [p for p in model.parameters() if p.requires_grad]  # alpha/beta logits never are
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    estimator = OnlineEstimator(model, lr=args.estimator_lr)
    points = []
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, args.lr, args.warmup_steps)
        images, labels = data.batch(step)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        estimator.step()
        if curve and ((step + 1) % args.curve_every == 0 or step + 1 == steps):
            points.append(
                {
                    "step": step + 1,
                    "train_loss": loss.item(),
                    "ema": error(model, data.test_x, data.test_y, "ema"),
                    "en_online": error(model, data.test_x, data.test_y, "en"),
                }
            )
            model.train()
    estimator.enabled = False
    return model, points


def run_cell(data, b, steps, args, curve=False):
    """Train one model and evaluate it every way in ``EVALUATIONS``.

    Returns:
        dict: "errors" {evaluation: test error %}, "coefficients" {estimate: {layer: [alpha,
        beta]}}, "mean_coefficients", the weighing sweep, the curve and bookkeeping.
    """
    start = time.perf_counter()
    model, points = train(data, b, steps, args, curve)
    train_seconds = time.perf_counter() - start
    x, y = data.test_x, data.test_y
    errors = {mode: error(model, x, y, mode) for mode in ("ema", "rule_of_thumb", "simple")}
    errors["en_online"] = error(model, x, y, "en")
    errors["batch"] = grouped_error(model, x, y)
    errors["prediction_time"] = fixed_coefficient_error(model, x, y, 1.0)
    # Chosen on validation images only; ties go to the smaller weight.
    sweep = {w: fixed_coefficient_error(model, data.val_x, data.val_y, w) for w in WEIGHING_GRID}
    chosen = min(WEIGHING_GRID, key=lambda w: (sweep[w], w))
    errors["example_weighing"] = fixed_coefficient_error(model, x, y, chosen)
    found = {"en_online": coefficients(model)}

    # Fresh renderings past the training steps: one set for offline fitting, one for PreciseBN.
    def fit_batches():
        return (data.batch(steps + i)[0] for i in range(args.offline_iters))

    precise = copy.deepcopy(model)
    offline = fit_offline(model, fit_batches(), args.offline_iters, args.offline_lr)
    errors["en_offline"] = error(model, x, y, "en")
    found["en_offline"] = coefficients(model)

    first = steps + args.offline_iters
    precise_batches = (data.batch(first + i)[0] for i in range(args.precise_iters))
    precise_statistics(precise, precise_batches, args.precise_iters)
    precise.eval()
    errors["precise_bn"] = error(precise, x, y, "ema")
    precise_offline = fit_offline(precise, fit_batches(), args.offline_iters, args.offline_lr)
    errors["precise_bn_en_offline"] = error(precise, x, y, "en")
    found["precise_bn_en_offline"] = coefficients(precise)
    return {
        "seed": data.seed,
        "B": b,
        "steps": steps,
        "train_digits": len(data.train_y),
        "errors": errors,
        "coefficients": found,
        "mean_coefficients": {k: np.mean(list(v.values()), 0).tolist() for k, v in found.items()},
        "example_weighing": {"validation_errors": sweep, "chosen": chosen},
        "offline": offline,
        "precise_bn_offline": precise_offline,
        "curve": points,
        "init_checksum": _checksum(build_model(data.seed, b, args.widths)),
        "first_batch_checksum": float(data.batch(0)[0].double().sum()),
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - start,
        "threads": torch.get_num_threads(),
    }


def _checksum(model):
    """Sum of every weight and running statistic, alpha/beta (which depend on B) left out."""
    return float(
        sum(
            v.double().sum()
            for k, v in model.state_dict().items()
            if v.is_floating_point() and not k.endswith(("alpha_logit", "beta_logit"))
        )
    )


def mean_std(values):
    """Mean and sample standard deviation (0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def gap_recovered(ema_small, x_small, ema_best):
    """Share of the EMA gap that evaluation X recovers at a small B: (EMA_small - X_small) /
    (EMA_small - EMA_best); None when there is no gap."""
    gap = ema_small - ema_best
    return None if gap <= 0 else (ema_small - x_small) / gap


def interval(values, confidence=0.95):
    """Mean of ``values`` and its two-sided Student-t interval over them (None for fewer than 2)."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return {"mean": mean, "low": None, "high": None}
    half = (
        stats.t.ppf(0.5 + confidence / 2, len(values) - 1)
        * values.std(ddof=1)
        / math.sqrt(len(values))
    )
    return {"mean": mean, "low": mean - half, "high": mean + half}


def summarize(cells, batch_sizes):
    """{B: {evaluation: {"mean", "std", "values", "seeds"}}} and {B: {estimate: {"alpha", "beta"}}}
    over the cells of each B."""
    errors, coeffs = {}, {}
    for b in batch_sizes:
        rows = sorted((c for c in cells if c["B"] == b), key=lambda c: c["seed"])
        if not rows:
            continue
        errors[b] = {}
        for key in EVALUATIONS:
            values = [r["errors"][key] for r in rows]
            mean, std = mean_std(values)
            errors[b][key] = {
                "mean": mean,
                "std": std,
                "values": values,
                "seeds": [r["seed"] for r in rows],
            }
        coeffs[b] = {
            est: dict(
                zip(
                    ("alpha", "beta"),
                    np.mean([r["mean_coefficients"][est] for r in rows], 0).tolist(),
                )
            )
            for est in rows[0]["mean_coefficients"]
        }
    return errors, coeffs


def gap_report(errors, small):
    """The EMA gap at B = ``small`` and the share each evaluation recovers: from the means over
    seeds, and seed by seed (each seed against its own error at the best B), with a 95% interval
    over seeds. Only seeds present at both B's. The best B is the one with the lowest mean EMA
    error over those seeds among the B's run for the most of ``small``'s seeds, so that a B
    with fewer seeds done cannot set the gap."""

    def by_seed(b, key):
        return dict(zip(errors[b][key]["seeds"], errors[b][key]["values"]))

    def shared(b):
        return sorted(set(errors[small]["ema"]["seeds"]) & set(errors[b]["ema"]["seeds"]))

    def rank(b):
        seeds_b = shared(b)
        return -len(seeds_b), float(np.mean([by_seed(b, "ema")[s] for s in seeds_b]))

    best = min((b for b in errors if b != small), key=rank)
    seeds = shared(best)
    ema_small, ema_best = by_seed(small, "ema"), by_seed(best, "ema")
    mean_small = float(np.mean([ema_small[s] for s in seeds]))
    mean_best = float(np.mean([ema_best[s] for s in seeds]))
    report = {
        "B": small,
        "best_B": best,
        "seeds": seeds,
        "ema_error": mean_small,
        "ema_error_best_B": mean_best,
        "gap": mean_small - mean_best,
        "errors": {},  # at B = small, mean over ``seeds``
        "recovered": {},
        "per_seed": {},
        "interval": {},
        "paper_recovered": PAPER_RECOVERED,
    }
    for key in EVALUATIONS:
        if key == "ema":
            continue
        x = by_seed(small, key)
        report["errors"][key] = float(np.mean([x[s] for s in seeds]))
        report["recovered"][key] = gap_recovered(mean_small, report["errors"][key], mean_best)
        per_seed = [gap_recovered(ema_small[s], x[s], ema_best[s]) for s in seeds]
        report["per_seed"][key] = per_seed
        if seeds and all(v is not None for v in per_seed):
            report["interval"][key] = interval(per_seed)
    return report


def cell(stats_):
    return "n/a" if stats_ is None else f"{stats_['mean']:.2f} +- {stats_['std']:.2f}"


def percent(share):
    return "n/a" if share is None else f"{100 * share:.0f}%"


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def tables(results):
    """The report in markdown: errors, alpha/beta, gap recovered, weighing, curve, convergence."""
    s = results["settings"]
    errors = results["summary"]["errors"]
    seeds = ", ".join(map(str, s["seeds"]))
    out = [
        f"## Test error (%) by normalization microbatch B (mean +- std over seeds {seeds})",
        "",
        (
            f"ResNet-20 v2 (widths {'/'.join(map(str, s['widths']))}, maps 32/16/8) on 32x32 digit "
            f"scenes ({s['train_digits_used']} training digits rendered afresh each step, "
            f"{s['test_images']} test and {s['val_images']} validation images); SGD batch "
            f"{s['sgd_batch_size']}, LR {s['lr']:g} cosine, {s['steps']} steps; EN offline: "
            f"{s['offline_iters']} batches; PreciseBN: {s['precise_iters']} batches. Cells done: "
            f"{results['cells_done']} of {results['cells_planned']}."
        ),
        "",
        markdown_table(
            ["B", "seeds"] + list(EVALUATIONS.values()),
            [
                [b, len(errors[b]["ema"]["values"])] + [cell(errors[b][k]) for k in EVALUATIONS]
                for b in errors
            ],
        ),
        "",
        "## Estimated alpha / beta (mean over layers, then over seeds)",
        "",
        markdown_table(
            ["B", "online alpha", "online beta", "offline alpha", "offline beta", "1/B^2"],
            [
                [b]
                + [
                    f"{c[est][k]:.4f}"
                    for est in ("en_online", "en_offline")
                    for k in ("alpha", "beta")
                ]
                + [f"{1 / b**2:.4f}"]
                for b, c in results["summary"]["coefficients"].items()
            ],
        ),
        "",
        "## Inference example weighing: the alpha = beta chosen on validation, per seed",
        "",
        markdown_table(
            ["B", "chosen (seed order)"],
            [
                [b, ", ".join(f"{w:g}" for w in ws)]
                for b, ws in results["summary"]["weighing_chosen"].items()
            ],
        ),
    ]
    gap = results.get("gap")
    if gap is not None:
        out += ["", f"## Share of the EMA gap at B = {gap['B']} recovered", ""]
        if gap["gap"] <= 0:
            out.append(f"No gap: EMA at B = {gap['B']} is the best B here.")
        else:
            out += [
                (
                    f"EMA error {gap['ema_error']:.2f}% at B = {gap['B']}, {gap['ema_error_best_B']:.2f}% "
                    f"at the best B ({gap['best_B']}), seeds {', '.join(map(str, gap['seeds']))}: a gap of "
                    f"{gap['gap']:.2f} points. Share recovered = (EMA - X) / gap, from the means; per "
                    "seed, each seed against its own errors; 95% t-interval over the per-seed shares."
                ),
                "",
                markdown_table(
                    [
                        "evaluation",
                        f"error at B = {gap['B']} (%)",
                        "share recovered",
                        "per seed",
                        "95% interval",
                    ],
                    [
                        [
                            EVALUATIONS[k],
                            f"{gap['errors'][k]:.2f}",
                            percent(v),
                            ", ".join(map(percent, gap["per_seed"][k])),
                            _interval_text(gap["interval"].get(k)),
                        ]
                        for k, v in gap["recovered"].items()
                    ]
                    + [["paper, ImageNet Table 1 (EN)", "", percent(PAPER_RECOVERED), "", ""]],
                ),
            ]
    check = results["summary"].get("convergence")
    if check:
        out += [
            "",
            f"## Convergence check: {s['steps']} steps against {s['check_steps_factor']}x as many",
            "",
            markdown_table(
                [
                    "B",
                    "seed",
                    "steps",
                    "EMA",
                    "EN online",
                    "BN, test groups of B",
                    "longer: steps",
                    "longer: EMA",
                    "longer: EN online",
                    "longer: BN, test groups of B",
                ],
                [
                    [r["B"], r["seed"], r["steps"]]
                    + [f"{r['errors'][k]:.2f}" for k in ("ema", "en_online", "batch")]
                    + [r["longer_steps"]]
                    + [f"{r['longer_errors'][k]:.2f}" for k in ("ema", "en_online", "batch")]
                    for r in check
                ],
            ),
        ]
    return "\n".join(out) + "\n"


def _interval_text(iv):
    if iv is None or iv["low"] is None:
        return "n/a"
    return f"[{100 * iv['low']:.0f}%, {100 * iv['high']:.0f}%]"


def plot(results, output_dir):
    """error_vs_B.png, alpha_vs_B.png and curve.png."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    errors = results["summary"]["errors"]
    coeffs = results["summary"]["coefficients"]
    bs = list(errors)
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    for i, (key, label) in enumerate(EVALUATIONS.items()):
        mean = np.array([errors[b][key]["mean"] for b in bs])
        std = np.array([errors[b][key]["std"] for b in bs])
        style = ":" if key == "batch" else "-"
        ax.plot(bs, mean, style, marker="o", color=f"C{i}", label=label)
        ax.fill_between(bs, mean - std, mean + std, color=f"C{i}", alpha=0.12)
    ax.set_xscale("log", base=2)
    ax.set_xticks(bs, [str(b) for b in bs])
    ax.set_xlabel("normalization microbatch B (SGD batch 128)")
    ax.set_ylabel("test error (%)")
    ax.set_title("ResNet-20 v2 on 32x32 digit scenes: mean +- std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output_dir / "error_vs_B.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, est in enumerate(("en_online", "en_offline")):
        for key, style in (("alpha", "-"), ("beta", "--")):
            ax.plot(
                bs,
                [coeffs[b][est][key] for b in bs],
                style,
                marker="o",
                color=f"C{i}",
                label=f"{EVALUATIONS[est]} {key}",
            )
    grid = np.array(bs, dtype=float)
    ax.plot(bs, 1 / grid**2, ":", color="gray", label="1/B^2")
    ax.plot(bs, 1 / grid, "-.", color="gray", label="1/B")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(bs, [str(b) for b in bs])
    ax.set_xlabel("normalization microbatch B")
    ax.set_ylabel("coefficient (mean over layers and seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output_dir / "alpha_vs_B.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, c in enumerate(c for c in results["cells"] if c["curve"]):
        steps = [p["step"] for p in c["curve"]]
        label = f"B={c['B']} seed {c['seed']}, {c['steps']} steps"
        ax.plot(steps, [p["ema"] for p in c["curve"]], "-", color=f"C{i}", label=f"{label}: EMA")
        ax.plot(
            steps, [p["en_online"] for p in c["curve"]], "--", color=f"C{i}", label=f"{label}: EN"
        )
    ax.set_xlabel("SGD step")
    ax.set_ylabel("test error (%)")
    ax.set_ylim(0, 60)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output_dir / "curve.png", dpi=120)
    plt.close(fig)


def make_data(seed, args):
    """The seed's ``DigitScenes`` with the sizes ``args`` asks for."""
    return DigitScenes(
        seed,
        args.test_digits,
        args.val_digits,
        args.test_copies,
        args.val_copies,
        args.train_digits,
        args.sgd_batch_size,
    )


def planned_cells(args):
    """(seed, B, steps, curve) in the order they run: the smallest and largest B of each seed in
    turn (the headline, complete seed by seed), the longer convergence-check runs, then each
    other B farthest (in log2) from those already run, for every seed."""
    order = sorted(set(args.batch_sizes))
    order = order[:1] + order[-1:] if len(order) > 1 else order
    rest = [b for b in sorted(set(args.batch_sizes)) if b not in order]
    while rest:
        far = max(rest, key=lambda b: (min(abs(math.log2(b / c)) for c in order), -b))
        order.append(far)
        rest.remove(far)
    headline, rest = order[:2], order[2:]

    def ordered(sizes, seeds_first):
        pairs = [(s, b) for s in args.seeds for b in sizes]
        if not seeds_first:
            pairs.sort(key=lambda p: sizes.index(p[1]))
        return [(s, b, args.steps, b in args.curve_batch_sizes) for s, b in pairs]

    longer = [
        (args.seeds[0], b, args.steps * args.check_steps_factor, True)
        for b in args.check_batch_sizes
    ]
    return ordered(headline, True) + longer + ordered(rest, False)


def cell_name(seed, b, steps):
    return f"seed{seed}_B{b}_steps{steps}.json"


def measured_settings(args):
    return {k: v for k, v in vars(args).items() if k not in NOT_MEASURED}


def prepare(output_dir, args):
    """The cells folder of ``output_dir``, kept when resuming (``resumable_output_dir``)."""
    outputs = ("cells", "results.json", "results.md", *PLOTS)
    resumable_output_dir(output_dir, measured_settings(args), args.overwrite, outputs)
    cells_dir = output_dir / "cells"
    cells_dir.mkdir(exist_ok=True)
    return cells_dir


def report(cells, args, where, output_dir, planned, wall_seconds):
    """Rewrite results.json, results.md and the plots from every cell done so far."""
    main_cells = [c for c in cells if c["steps"] == args.steps]
    batch_sizes = sorted(args.batch_sizes)
    errors, coeffs = summarize(main_cells, batch_sizes)
    settings = dict(vars(args))
    settings.update(
        train_digits_used=cells[0]["train_digits"] if cells else None,
        test_images=args.test_digits * args.test_copies,
        val_images=args.val_digits * args.val_copies,
        sgd_batch_size=args.sgd_batch_size,
        scenes=SCENES,
        weighing_grid=list(WEIGHING_GRID),
        std="sample standard deviation over seeds (ddof=1)",
    )
    results = {
        "benchmark": "microbatch",
        "settings": settings,
        "machine": where,
        "cells_planned": len(planned),
        "cells_done": len(cells),
        "summary": {
            "errors": errors,
            "coefficients": coeffs,
            "weighing_chosen": {
                b: [
                    c["example_weighing"]["chosen"]
                    for c in sorted(main_cells, key=lambda c: c["seed"])
                    if c["B"] == b
                ]
                for b in errors
            },
        },
        "cells": cells,
        "wall_seconds_this_invocation": wall_seconds,
    }
    if len(errors) > 1:
        results["gap"] = gap_report(errors, min(errors))
    check = []
    for c in cells:
        if c["steps"] != args.steps:
            base = next(
                (m for m in main_cells if m["seed"] == c["seed"] and m["B"] == c["B"]), None
            )
            if base is not None:
                check.append(
                    {
                        "B": c["B"],
                        "seed": c["seed"],
                        "steps": base["steps"],
                        "errors": base["errors"],
                        "longer_steps": c["steps"],
                        "longer_errors": c["errors"],
                    }
                )
    results["summary"]["convergence"] = check
    text = tables(results)
    write_results(output_dir, results, "# Microbatch benchmark (EvalNorm section 4.1)\n\n" + text)
    if errors:
        plot(results, output_dir)
    return results, text


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=PRESETS, default="quick", help="preset (default quick)")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="normalization microbatches B")
    parser.add_argument("--steps", type=int, help="SGD steps per run")
    parser.add_argument("--widths", type=int, nargs=3, help="channels of the three stages")
    parser.add_argument("--train-digits", type=int, help="training digits (default: all left)")
    parser.add_argument("--test-digits", type=int)
    parser.add_argument("--test-copies", type=int, help="renderings of each test digit")
    parser.add_argument("--val-digits", type=int)
    parser.add_argument("--val-copies", type=int, help="renderings of each validation digit")
    parser.add_argument("--sgd-batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate")
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--estimator-lr", type=float, default=0.1, help="OnlineEstimator's Adam lr")
    parser.add_argument("--offline-iters", type=int, help="EN offline: batches of the SGD size")
    parser.add_argument("--offline-lr", type=float, default=0.1)
    parser.add_argument("--precise-iters", type=int, help="PreciseBN: batches of the SGD size")
    parser.add_argument("--curve-every", type=int, help="test error every this many steps ...")
    parser.add_argument("--curve-batch-sizes", type=int, nargs="*", help="... for these B's")
    parser.add_argument("--check-steps-factor", type=int, help="convergence check: longer runs ...")
    parser.add_argument(
        "--check-batch-sizes", type=int, nargs="*", help="... for these B's, first seed"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--jobs",
        type=int,
        help="cells trained at once, each in its own process (default: 1 in smoke mode, else "
        "the machine's CPU count)",
    )
    parser.add_argument("--output-dir", help="default output/benchmarks/microbatch/<mode>")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite results.json, results.md and the plots from the cells done; train nothing",
    )
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.output_dir is None:
        args.output_dir = f"output/benchmarks/microbatch/{args.mode}"
    every_b = args.batch_sizes + args.curve_batch_sizes + args.check_batch_sizes
    if any(b < 1 or args.sgd_batch_size % b for b in every_b):
        parser.error(f"every B must divide --sgd-batch-size {args.sgd_batch_size}: got {every_b}")
    for key in ("test", "val"):
        images = getattr(args, f"{key}_digits") * getattr(args, f"{key}_copies")
        if images % args.sgd_batch_size:
            parser.error(
                f"--{key}-digits x --{key}-copies = {images} must be a multiple of "
                f"--sgd-batch-size {args.sgd_batch_size} (test groups of every B)"
            )
    if args.jobs < 1 or args.threads < 1:
        parser.error(f"--jobs and --threads must be at least 1: got {args.jobs}, {args.threads}")
    if args.report_only and args.overwrite:
        parser.error("--report-only reads the cells that --overwrite would delete: pass one")
    if not set(args.check_batch_sizes) <= set(args.batch_sizes):
        parser.error("--check-batch-sizes must be among --batch-sizes")
    return args


def main(argv=None):
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    cells_dir = prepare(output_dir, args)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, output_dir, cells_dir)
    finally:
        torch.set_num_threads(threads)


def _run(args, output_dir, cells_dir):
    wall_start = time.perf_counter()
    where = machine("cpu")
    planned = planned_cells(args)
    cells, todo = [], []
    for seed, b, steps, curve in planned:
        path = cells_dir / cell_name(seed, b, steps)
        if path.exists():
            cells.append(json.loads(path.read_text()))
        elif not args.report_only:
            todo.append((seed, b, steps, curve))
    order = {cell_name(s, b, n): i for i, (s, b, n, _) in enumerate(planned)}
    for result in measure(todo, args):
        result["machine"] = where
        path = cells_dir / cell_name(result["seed"], result["B"], result["steps"])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(path)  # a cell is there whole or not at all
        cells.append(json.loads(path.read_text()))
        cells.sort(key=lambda c: order[cell_name(c["seed"], c["B"], c["steps"])])
        print(
            f"seed {result['seed']}  B={result['B']:<3d} {result['steps']} steps: "
            f"{result['total_seconds']:.0f} s  "
            + "  ".join(f"{k} {v:.2f}" for k, v in result["errors"].items()),
            flush=True,
        )
        report(cells, args, where, output_dir, planned, time.perf_counter() - wall_start)
    results, text = report(
        cells, args, where, output_dir, planned, time.perf_counter() - wall_start
    )
    text += (
        f"\n{len(cells)} of {len(planned)} cells; this invocation: "
        f"{time.perf_counter() - wall_start:.0f} s wall, {args.jobs} job(s) of "
        f"{args.threads} thread(s).\n"
    )
    print("\n" + text, end="")
    print(f"Wrote results.json, results.md and {', '.join(PLOTS)} to {output_dir}")
    return results


_DATA = {}  # seed -> DigitScenes, kept for the next cell of the same seed in this process


def measure_cell(seed, b, steps, curve, args):
    """``run_cell`` for one planned cell, its seed's data made once per process."""
    if seed not in _DATA:
        _DATA[seed] = make_data(seed, args)
    return run_cell(_DATA[seed], b, steps, args, curve)


def measure(todo, args):
    """Yield the result of each (seed, B, steps, curve) in ``todo``: in order in this process
    with ``--jobs 1``, else as they finish in ``--jobs`` worker processes of ``--threads``
    threads each (a cell's numbers do not depend on the process it runs in)."""
    if args.jobs == 1 or len(todo) <= 1:
        for cell_ in todo:
            yield measure_cell(*cell_, args)
        return
    context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools
    with ProcessPoolExecutor(
        min(args.jobs, len(todo)), context, torch.set_num_threads, (args.threads,)
    ) as pool:
        futures = [pool.submit(measure_cell, *cell_, args) for cell_ in todo]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""BatchNorm over small normalization microbatches, evaluated with EMA and EvalNorm statistics.

The paper's section 4.1 in miniature: a ResNet-20 (pre-activation, widths 16/32/64, 19
BatchNorm layers) is trained with SGD batches of 128 while every BatchNorm layer normalizes
consecutive groups of B samples (``convert_to_evalnorm(..., microbatch=True)``), B in {2, 4,
8, 16, 128}. Only B changes between runs of one seed: initial weights, data order and
augmentation are the same. Each trained model is tested with five normalizations: "EMA"
(vanilla BatchNorm), "EN online" (alpha/beta estimated by ``OnlineEstimator`` while training),
"EN offline" (fitted after training by ``estimate_offline`` from the rule of thumb, on training
batches of 128, i.e. groups of B), "1/B^2" and "1/B"; and, for reference, with the statistics
of each group of B test images ("BN, test groups of B": what training normalization does, the
target the auxiliary loss fits alpha/beta to). Reported: test error per B (mean and
sample standard deviation over seeds), the estimated alpha/beta, and at B = 2 the share of the
EMA gap (EMA error at B = 2 minus EMA error at the best B) that each evaluation recovers, next
to the paper's 55% (ImageNet, Table 1). The data is scikit-learn's 8x8 handwritten digits
(nothing is downloaded) with random rotations, scaling, shifts, lighting and pixel noise, in
training and in the held-out test set, so that even large-batch BatchNorm keeps a clearly
non-zero error.

A second part trains again at B = 2 and 128 with BatchNorm momentum 0.01 instead of 0.1. At
B = 128 such an EMA (one update per SGD step) lags far behind the model while it trains; online
estimation fits alpha/beta against that lagging EMA and learns a large alpha that does not fit
the EMA of the trained model, so EN online can end up worse than EMA. (At B = 2 the EMA takes 64
updates per SGD step and does not lag.) Two fixes are shown beside it: online estimation only
in the last 10% of SGD steps (``--study-estimate-from``; alpha/beta restarted from the rule of
thumb on a copy of the run, which trains bit for bit the same; ``--estimate-from 0.9`` makes it
the estimator of every run) and EN offline.

    python benchmarks/microbatch.py               # quick: 10-12 min, see below
    python benchmarks/microbatch.py --mode smoke  # CI: about 8 s (2 SGD steps per run)
    python benchmarks/microbatch.py --mode full   # about 1.5 hours (estimated, 8x quick's work)

Quick: 3 seeds, 162 SGD steps per run (18 epochs of 1200 digits), 21 runs; measured 617 s
wall (603 s CPU) with one thread on a 2-core AMD EPYC, the other core busy with another job.
Full: 5 seeds, B in {2, 4, 8, 16, 32, 64, 128}, 540 steps per run, the momentum study at B = 2,
64 and 128.

Run it with ``OMP_NUM_THREADS=1``: ``--threads`` (default 1) is passed to
``torch.set_num_threads``, and each run is deterministic for a given thread count. Writes
``results.json`` (every per-seed number, settings, machine, wall and CPU time), ``results.md``
(the tables, also printed), ``error_vs_B.png`` and ``alpha_vs_B.png`` to ``--output-dir``
(default ``output/benchmarks/microbatch``); existing results are kept unless ``--overwrite``.
"""

import argparse
import copy
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import machine, prepare_output_dir, write_results  # benchmarks/, beside this file
from sklearn.datasets import load_digits
from torch import nn

warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated")  # from detectron2's imports
from evalnorm_det import (
    EvalNorm2d,
    OnlineEstimator,
    convert_to_evalnorm,
    estimate_offline,
    evalnorm_mode,
)

# Test modes: key in results.json -> table label.
MODES = {
    "ema": "EMA",
    "en_online": "EN online",
    "en_offline": "EN offline",
    "rule_of_thumb": "1/B^2",
    "simple": "1/B",
    "batch": "BN, test groups of B",
}
LATE = "en_online_late"  # EN online estimated only from --study-estimate-from on
# Paper, Table 1 (ImageNet Prec@1, 2 samples/GPU): EMA 64.80, EN 70.98, EMA at 32 samples 75.98.
PAPER_RECOVERED = (70.98 - 64.80) / (75.98 - 64.80)
RESULT_FILES = ("results.json", "results.md", "error_vs_B.png", "alpha_vs_B.png")

# Training and test images get random rotations (degrees), scales (+- fraction), shifts
# (pixels), contrast (gain log-uniform in [1/c, c]), brightness (offset ~ N(0, b)) and Gaussian
# pixel noise; digits are in [0, 1] before lighting.
AUGMENTATION = {
    "rotation": 15.0,
    "scale": 0.1,
    "shift": 1.0,
    "contrast": 1.5,
    "brightness": 0.3,
    "noise": 0.1,
}

PRESETS = {
    "smoke": {
        "seeds": [0],
        "batch_sizes": [2, 128],
        "epochs": 1,
        "train_size": 256,
        "test_size": 100,
        "test_copies": 1,
        "offline_iters": 2,
        "study_batch_sizes": [2, 128],
    },
    "quick": {
        "seeds": [0, 1, 2],
        "batch_sizes": [2, 4, 8, 16, 128],
        "epochs": 18,
        "train_size": None,
        "test_size": 597,
        "test_copies": 2,
        "offline_iters": 40,
        "study_batch_sizes": [2, 128],
    },
    "full": {
        "seeds": [0, 1, 2, 3, 4],
        "batch_sizes": [2, 4, 8, 16, 32, 64, 128],
        "epochs": 60,
        "train_size": None,
        "test_size": 597,
        "test_copies": 4,
        "offline_iters": 100,
        "study_batch_sizes": [2, 64, 128],
    },
}


def seeded_generator(*keys):
    """A ``torch.Generator`` determined by integer ``keys`` alone (seed, purpose, index)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


def augment(images, generator, aug=AUGMENTATION):
    """Random affine warp, lighting and pixel noise: (N, 1, 8, 8) -> (N, 1, 8, 8)."""
    n, _, h, w = images.shape

    def uniform(low, high):
        return low + (high - low) * torch.rand(n, generator=generator)

    angle = uniform(-aug["rotation"], aug["rotation"]) * (math.pi / 180)
    scale = uniform(1 - aug["scale"], 1 + aug["scale"])
    shift = uniform(-aug["shift"], aug["shift"]), uniform(-aug["shift"], aug["shift"])
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # affine_grid maps output to input coordinates in [-1, 1]: a pixel is 2 / size wide.
    theta = torch.stack(
        [
            torch.stack([cos, -sin, shift[0] * 2 / w], dim=1),
            torch.stack([sin, cos, shift[1] * 2 / h], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, align_corners=False)
    gain = torch.exp(uniform(-1, 1) * math.log(aug["contrast"]))
    offset = aug["brightness"] * torch.randn(n, generator=generator)
    out = out * gain[:, None, None, None] + offset[:, None, None, None]
    return out + aug["noise"] * torch.randn(out.shape, generator=generator)


class Digits:
    """One seed's data: a split of scikit-learn's digits, a fixed augmented test set, and
    training batches that depend only on (seed, step), never on the run.

    Attributes:
        train_x (Tensor): (N, 1, 8, 8) training digits in [0, 1]; ``train_y`` (N,) labels.
        test_x (Tensor): (test_size * test_copies, 1, 8, 8) augmented held-out digits;
            ``test_y`` their labels.
    """

    def __init__(self, seed, test_size, test_copies=1, train_size=None, batch_size=128):
        data = load_digits()
        images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(data.target)
        order = torch.randperm(len(labels), generator=seeded_generator(seed, 0))
        test, train = order[:test_size], order[test_size:]
        if train_size is not None:
            train = train[:train_size]
        self.seed, self.batch_size = seed, batch_size
        self.train_x, self.train_y = images[train], labels[train]
        if len(self.train_y) < batch_size:
            raise ValueError(f"{len(self.train_y)} training digits: fewer than one batch")
        test_x = images[test].repeat(test_copies, 1, 1, 1)
        self.test_x = augment(test_x, seeded_generator(seed, 1))
        self.test_y = labels[test].repeat(test_copies)
        self.steps_per_epoch = len(self.train_y) // batch_size

    def batch(self, step):
        """Training batch ``step`` (any step >= 0; past training, it is fresh data for offline
        estimation): (batch_size, 1, 8, 8) images and (batch_size,) labels."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.train_y), generator=seeded_generator(self.seed, 2, epoch))
        chosen = order[index * self.batch_size : (index + 1) * self.batch_size]
        images = augment(self.train_x[chosen], seeded_generator(self.seed, 3, step))
        return images, self.train_y[chosen]


class PreActBlock(nn.Module):
    """ResNet v2 basic block: BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus the shortcut (a 1x1
    convolution of the pre-activated input where the shape changes)."""

    def __init__(self, in_channels, channels, stride, bn_momentum):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, momentum=bn_momentum)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, momentum=bn_momentum)
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
    """The paper's 20-layer CIFAR ResNet v2 (3 stages x 3 blocks, widths 16/32/64) for
    (N, 1, 8, 8) digits -> (N, 10) logits. Spatial size 8, 4, 2 by stage; 19 BatchNorm layers."""

    def __init__(self, num_classes=10, widths=(16, 32, 64), blocks=3, bn_momentum=0.1):
        super().__init__()
        self.stem = nn.Conv2d(1, widths[0], 3, 1, 1, bias=False)
        layers, in_channels = [], widths[0]
        for stage, width in enumerate(widths):
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(PreActBlock(in_channels, width, stride, bn_momentum))
                in_channels = width
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_channels, momentum=bn_momentum)
        self.fc = nn.Linear(in_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


def build_model(seed, norm_batch_size, bn_momentum=0.1):
    """ResNet-20 with every BatchNorm an ``EvalNorm2d`` normalizing groups of
    ``norm_batch_size`` samples in training; its initial weights depend on ``seed`` alone."""
    torch.manual_seed(seed)
    model = ResNet20(bn_momentum=bn_momentum)
    return convert_to_evalnorm(model, norm_batch_size, init="rule_of_thumb", microbatch=True)


def evalnorm_layers(model):
    return [m for m in model.modules() if isinstance(m, EvalNorm2d)]


def learning_rate(step, steps, base_lr, warmup):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * base_lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def start_estimator(model, args):
    """Online estimation from now on, alpha = beta restarted from the rule of thumb 1/B^2."""
    for m in evalnorm_layers(model):
        m.set_coefficients("rule_of_thumb")
    return OnlineEstimator(model, lr=args.estimator_lr)


def sgd_steps(model, optimizer, data, steps, first, last, args, estimator=None, start=None):
    """SGD steps ``first`` .. ``last - 1`` of ``steps``; online estimation from step ``start``."""
    model.train()
    for step in range(first, last):
        if start is not None and step == start:
            estimator = start_estimator(model, args)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, args.lr, args.warmup_steps)
        images, labels = data.batch(step)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if estimator is not None:
            estimator.step()
    return estimator


def make_optimizer(model, args):
    # alpha/beta logits are parameters that never require grad: OnlineEstimator's alone.
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)


def coefficients(model):
    """{layer name: [alpha, beta]} of every EvalNorm2d."""
    return {
        name: [m.alpha.item(), m.beta.item()]
        for name, m in model.named_modules()
        if isinstance(m, EvalNorm2d)
    }


@torch.no_grad()
def test_error(model, data, mode, group=1024):
    """Test error (%) of ``model`` evaluated in EvalNorm ``mode``, ``group`` test images per
    forward (which matters only in mode "batch")."""
    model.eval()
    with evalnorm_mode(model, mode):
        wrong = sum(
            (model(x).argmax(1) != y).sum().item()
            for x, y in zip(data.test_x.split(group), data.test_y.split(group))
        )
    return 100.0 * wrong / len(data.test_y)


def weights_checksum(model):
    """Sum of every weight and running statistic, alpha/beta (which depend on B) left out."""
    return float(
        sum(
            v.double().sum()
            for k, v in model.state_dict().items()
            if v.is_floating_point() and not k.endswith(("alpha_logit", "beta_logit"))
        )
    )


def run(data, norm_batch_size, bn_momentum, args, late_from=None):
    """Train one model and test it in every mode.

    With ``late_from``, training is also resumed from a copy taken at that fraction of the SGD
    steps, with online estimation restarted there (the ``LATE`` mode); the model it ends with
    is checked to be the same, bit for bit.

    Returns:
        dict: "errors" {mode: test error %}, "coefficients" {estimate: {layer: [alpha, beta]}},
        "mean_coefficients" {estimate: [alpha, beta] averaged over layers} and bookkeeping.
    """
    seed = data.seed
    start_time = time.perf_counter()
    steps = args.epochs * data.steps_per_epoch
    model = build_model(seed, norm_batch_size, bn_momentum)
    init_checksum = weights_checksum(model)
    optimizer = make_optimizer(model, args)
    start = min(round(args.estimate_from * steps), steps - 1)
    late_start = None if late_from is None else min(round(late_from * steps), steps - 1)
    estimator = None
    if late_start is not None:
        estimator = sgd_steps(model, optimizer, data, steps, 0, late_start, args, start=start)
        snapshot = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
        first = late_start
    else:
        first = 0
    sgd_steps(model, optimizer, data, steps, first, steps, args, estimator, start=start)
    train_seconds = time.perf_counter() - start_time
    result = {
        "seed": seed,
        "B": norm_batch_size,
        "bn_momentum": bn_momentum,
        "steps": steps,
        "estimate_from_step": start,
        "init_checksum": init_checksum,
        "first_batch_checksum": float(data.batch(0)[0].double().sum()),
        "errors": {},
        "coefficients": {"en_online": coefficients(model)},
    }
    for mode in ("ema", "rule_of_thumb", "simple"):
        result["errors"][mode] = test_error(model, data, mode)
    result["errors"]["en_online"] = test_error(model, data, "en")
    # What training normalization does: each group of B test images normalized by its own
    # statistics. The EMA-to-this difference is the part of the gap that statistics explain.
    result["errors"]["batch"] = test_error(model, data, "batch", group=norm_batch_size)

    if late_start is not None:
        late = build_model(seed, norm_batch_size, bn_momentum)
        late.load_state_dict(snapshot[0])
        late_optimizer = make_optimizer(late, args)
        late_optimizer.load_state_dict(snapshot[1])
        sgd_steps(late, late_optimizer, data, steps, late_start, steps, args, start=late_start)
        late_state = late.state_dict()
        same = all(
            torch.equal(v, late_state[k])
            for k, v in model.state_dict().items()
            if not k.endswith(("alpha_logit", "beta_logit"))
        )
        result["late_start_step"] = late_start
        result["late_model_identical"] = same
        result["coefficients"][LATE] = coefficients(late)
        result["errors"][LATE] = test_error(late, data, "en")

    offline_start = time.perf_counter()
    for m in evalnorm_layers(model):
        m.set_coefficients("rule_of_thumb")
    # Fresh augmentations of the training digits, in SGD batches of 128 as in training, so
    # each layer's groups are B samples.
    batches = (data.batch(steps + i)[0] for i in range(args.offline_iters))
    summary = estimate_offline(
        model, batches, args.offline_iters, lr=args.offline_lr, log_period=10**9
    )
    result["coefficients"]["en_offline"] = coefficients(model)
    result["errors"]["en_offline"] = test_error(model, data, "en")
    result["offline"] = {
        "iterations": summary["iterations"],
        "aux_loss_first": summary["losses"][0],
        "aux_loss_last": summary["losses"][-1],
    }
    result["mean_coefficients"] = {
        k: np.mean(list(v.values()), axis=0).tolist() for k, v in result["coefficients"].items()
    }
    result["offline_seconds"] = time.perf_counter() - offline_start
    result["train_seconds"] = train_seconds  # SGD steps, without the late-estimation rerun
    result["total_seconds"] = time.perf_counter() - start_time
    return result


def mean_std(values):
    """Mean and sample standard deviation (0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def gap_recovered(ema_small, en_small, ema_best):
    """Share of the EMA gap that EN recovers at a small B: (EMA_small - EN_small) /
    (EMA_small - EMA_best), where EMA_best is the lowest EMA error over B; None when there is
    no gap."""
    gap = ema_small - ema_best
    return None if gap <= 0 else (ema_small - en_small) / gap


def summarize(runs, batch_sizes, modes):
    """{B: {mode: {"mean", "std", "values"}}} and {B: {estimate: {"alpha", "beta"}}} over seeds."""
    errors, coeffs = {}, {}
    for b in batch_sizes:
        rows = [r for r in runs if r["B"] == b]
        errors[b] = {}
        for mode in modes:
            values = [r["errors"][mode] for r in rows if mode in r["errors"]]
            if values:
                mean, std = mean_std(values)
                errors[b][mode] = {"mean": mean, "std": std, "values": values}
        coeffs[b] = {
            est: dict(
                zip(("alpha", "beta"), np.mean([r["mean_coefficients"][est] for r in rows], 0))
            )
            for est in rows[0]["mean_coefficients"]
        }
    return errors, coeffs


def cell(stats):
    return "n/a" if stats is None else f"{stats['mean']:.2f} +- {stats['std']:.2f}"


def percent(share):
    return "n/a" if share is None else f"{100 * share:.0f}%"


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def gap_report(errors, small):
    """Share of the EMA gap at B = ``small`` recovered by each evaluation, from the means over
    seeds ("recovered") and, where ``errors`` holds per-seed "values", seed by seed, each seed
    against its own best B ("per_seed")."""
    best = min(errors, key=lambda b: errors[b]["ema"]["mean"])
    ema_small, ema_best = errors[small]["ema"]["mean"], errors[best]["ema"]["mean"]
    modes = [mode for mode in MODES if mode != "ema"]
    shares = {m: gap_recovered(ema_small, errors[small][m]["mean"], ema_best) for m in modes}
    per_seed = None
    if all("values" in errors[b]["ema"] for b in errors):
        ema = {b: errors[b]["ema"]["values"] for b in errors}
        per_seed = {
            m: [
                gap_recovered(ema[small][i], v, min(ema[b][i] for b in ema))
                for i, v in enumerate(errors[small][m]["values"])
            ]
            for m in modes
        }
    return {
        "B": small,
        "best_B": best,
        "ema_error": ema_small,
        "ema_error_best_B": ema_best,
        "gap": ema_small - ema_best,
        "recovered": shares,
        "per_seed": per_seed,
        "paper_recovered": PAPER_RECOVERED,
    }


def tables(results):
    """The report in markdown: main table, alpha/beta, gap recovered, momentum study."""
    s = results["settings"]
    main = results["summary"]["main"]
    seeds = ", ".join(map(str, s["seeds"]))
    out = [
        f"## Test error (%) by normalization microbatch B (mean +- std over seeds {seeds})",
        "",
        (
            f"ResNet-20 on augmented digits ({s['train_digits']} training digits, "
            f"{s['test_images']} test images); SGD batch {s['sgd_batch_size']}, {s['steps']} "
            f"steps ({s['epochs']} epochs); BN momentum {s['bn_momentum']}; EN online estimated "
            f"from step {round(s['estimate_from'] * s['steps'])}; EN offline: "
            f"{s['offline_iters']} batches."
        ),
        "",
        markdown_table(
            ["B"] + list(MODES.values()),
            [[b] + [cell(main["errors"][b].get(m)) for m in MODES] for b in main["errors"]],
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
                for b, c in main["coefficients"].items()
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
                    f"EMA error {gap['ema_error']:.2f}% at B = {gap['B']}, "
                    f"{gap['ema_error_best_B']:.2f}% at the best B ({gap['best_B']}): a gap of "
                    f"{gap['gap']:.2f} points. Share recovered = (EMA - X) / gap at B = "
                    f"{gap['B']}, from the means over seeds; per seed, against that seed's own "
                    "best B."
                ),
                "",
                markdown_table(
                    ["evaluation", f"error at B = {gap['B']} (%)", "share recovered", "per seed"],
                    [
                        [
                            MODES[m],
                            f"{main['errors'][gap['B']][m]['mean']:.2f}",
                            percent(v),
                            ", ".join(map(percent, (gap["per_seed"] or {}).get(m, []))),
                        ]
                        for m, v in gap["recovered"].items()
                    ]
                    + [
                        [
                            "paper, ImageNet Table 1 (EMA 64.80 -> EN 70.98, best 75.98 Prec@1)",
                            "",
                            percent(PAPER_RECOVERED),
                            "",
                        ]
                    ],
                ),
            ]
    study = results["summary"].get("momentum")
    if study:
        late = s["study_estimate_from"]
        late_label = f"EN online from {late:g} of steps"
        out += [
            "",
            (
                "## EMA momentum: estimated alpha/beta and test error (%), BN momentum "
                f"{s['bn_momentum']} vs {s['study_momentum']}"
            ),
            "",
            (
                "Same seeds, data and initial weights. alpha/beta: mean over layers and seeds; "
                f"online from step {round(s['estimate_from'] * s['steps'])}; '{late_label}': "
                f"estimation only in the last {100 * (1 - late):.0f}% of SGD steps, restarted "
                "from 1/B^2."
            ),
            "",
            markdown_table(
                ["B", "BN momentum", "EMA", "EN online", late_label, "EN offline"]
                + ["alpha/beta online", "alpha/beta late", "alpha/beta offline"],
                [
                    [row["B"], row["bn_momentum"]]
                    + [cell(row["errors"].get(m)) for m in ("ema", "en_online", LATE, "en_offline")]
                    + [
                        "{alpha:.4f}/{beta:.4f}".format(**row["coefficients"][est])
                        if est in row["coefficients"]
                        else "n/a"
                        for est in ("en_online", LATE, "en_offline")
                    ]
                    for row in study
                ],
            ),
        ]
    return "\n".join(out) + "\n"


def plot(results, output_dir):
    """error_vs_B.png (test error vs B per mode, mean +- std) and alpha_vs_B.png."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    main = results["summary"]["main"]
    bs = list(main["errors"])
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (mode, label) in enumerate(MODES.items()):
        mean = np.array([main["errors"][b][mode]["mean"] for b in bs])
        std = np.array([main["errors"][b][mode]["std"] for b in bs])
        ax.plot(bs, mean, marker="o", color=f"C{i}", label=label)
        ax.fill_between(bs, mean - std, mean + std, color=f"C{i}", alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xticks(bs, [str(b) for b in bs])
    ax.set_xlabel("normalization microbatch B (SGD batch 128)")
    ax.set_ylabel("test error (%)")
    ax.set_title(f"ResNet-20 on digits, {len(results['settings']['seeds'])} seed(s): mean +- std")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(output_dir / "error_vs_B.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, est in enumerate(("en_online", "en_offline")):
        for key, style in (("alpha", "-"), ("beta", "--")):
            values = [main["coefficients"][b][est][key] for b in bs]
            ax.plot(bs, values, style, marker="o", color=f"C{i}", label=f"{MODES[est]} {key}")
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=PRESETS, default="quick", help="preset (default quick)")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="normalization microbatches B")
    parser.add_argument("--epochs", type=int)
    parser.add_argument(
        "--train-size", type=int, help="training digits (default: all not held out)"
    )
    parser.add_argument("--test-size", type=int, help="held-out digits")
    parser.add_argument("--test-copies", type=int, help="augmented copies of each test digit")
    parser.add_argument("--sgd-batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--bn-momentum", type=float, default=0.1)
    parser.add_argument(
        "--estimator-lr", type=float, default=0.1, help="OnlineEstimator's Adam lr (logits)"
    )
    parser.add_argument(
        "--estimate-from",
        type=float,
        default=0.0,
        help="EN online: estimate alpha/beta only from this fraction of the SGD steps on",
    )
    parser.add_argument("--offline-iters", type=int, help="EN offline: batches of 128")
    parser.add_argument("--offline-lr", type=float, default=0.1)
    parser.add_argument(
        "--study-momentum", type=float, default=0.01, help="BN momentum of the second part"
    )
    parser.add_argument(
        "--study-batch-sizes", type=int, nargs="*", help="B's of the second part (none: skip it)"
    )
    parser.add_argument(
        "--study-estimate-from",
        type=float,
        default=0.9,
        help="the fix shown in the second part: online estimation from this fraction of steps",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--output-dir", default="output/benchmarks/microbatch")
    parser.add_argument("--overwrite", action="store_true", help="replace existing results")
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if any(args.sgd_batch_size % b for b in args.batch_sizes + args.study_batch_sizes):
        parser.error("every B must divide the SGD batch size")
    if not (0 <= args.estimate_from < 1 and 0 <= args.study_estimate_from < 1):
        parser.error("--estimate-from and --study-estimate-from are fractions in [0, 1)")
    return args


def main(argv=None):
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    prepare_output_dir(output_dir, args.overwrite, RESULT_FILES)
    torch.set_num_threads(args.threads)
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    where = machine("cpu")
    batch_sizes = sorted(set(args.batch_sizes))
    study_sizes = sorted(set(args.study_batch_sizes))
    runs, study_runs = [], []
    for seed in args.seeds:
        data = Digits(seed, args.test_size, args.test_copies, args.train_size, args.sgd_batch_size)
        for momentum, sizes, part in (
            (args.bn_momentum, sorted(set(batch_sizes) | set(study_sizes)), runs),
            (args.study_momentum, study_sizes, study_runs),
        ):
            for b in sizes:
                late = args.study_estimate_from if b in study_sizes else None
                r = run(data, b, momentum, args, late_from=late)
                part.append(r)
                print(
                    f"seed {seed}  B={b:<3d} BN momentum {momentum:g}: {r['steps']} steps, "
                    f"{r['total_seconds']:.0f} s  "
                    + "  ".join(f"{k} {v:.2f}" for k, v in r["errors"].items()),
                    flush=True,
                )
    steps = runs[0]["steps"]
    settings = dict(vars(args))
    settings.update(
        steps=steps,
        train_digits=len(data.train_y),
        test_images=len(data.test_y),
        augmentation=AUGMENTATION,
        std="sample standard deviation over seeds (ddof=1)",
    )
    main_errors, main_coeffs = summarize(
        [r for r in runs if r["B"] in batch_sizes], batch_sizes, MODES
    )
    results = {
        "benchmark": "microbatch",
        "settings": settings,
        "machine": where,
        "summary": {"main": {"errors": main_errors, "coefficients": main_coeffs}},
        "runs": runs + study_runs,
    }
    if min(batch_sizes) < max(batch_sizes):
        results["gap"] = gap_report(main_errors, min(batch_sizes))
    if study_sizes:
        modes = ("ema", "en_online", LATE, "en_offline")
        study = []
        for b in study_sizes:
            for momentum, part in ((args.bn_momentum, runs), (args.study_momentum, study_runs)):
                errors, coeffs = summarize([r for r in part if r["B"] == b], [b], modes)
                study.append(
                    {
                        "B": b,
                        "bn_momentum": momentum,
                        "errors": errors[b],
                        "coefficients": coeffs[b],
                    }
                )
        results["summary"]["momentum"] = study
    results["wall_seconds"] = time.perf_counter() - wall_start
    results["cpu_seconds"] = time.process_time() - cpu_start
    text = tables(results)
    text += (
        f"\nWall time {results['wall_seconds']:.0f} s (process CPU time "
        f"{results['cpu_seconds']:.0f} s), {args.threads} thread(s), {where['cpu_count']} CPUs"
    )
    if where["load_average_at_start"] is not None:
        text += f", load average {where['load_average_at_start'][0]:.1f} at start"
    text += ".\n"
    print("\n" + text, end="")
    # B keys become strings in results.json
    write_results(output_dir, results, "# Microbatch benchmark (EvalNorm section 4.1)\n\n" + text)
    plot(results, output_dir)
    print(f"Wrote {', '.join(RESULT_FILES)} to {output_dir}")
    return results


if __name__ == "__main__":
    main()

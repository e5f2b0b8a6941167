"""One cell of the microbatch benchmark: a model trained for one seed and normalization
microbatch B, then evaluated every way in ``EVALUATIONS``, same weights. ``measure_cell`` is
what the worker processes of ``python -m benchmarks.microbatch`` run."""

import contextlib
import copy
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from evalnorm import OnlineEstimator, estimate_offline, evalnorm_mode, keep_running_stats
from evalnorm.diagnosis import fixed_coefficients
from evalnorm_det.engine.evaluation import precise_statistics

from ..digit_scenes import DigitScenes
from .model import build_model, coefficients, evalnorm_layers

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
# Inference example weighing: the alpha = beta grid searched on the validation split.
WEIGHING_GRID = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


def learning_rate(step, steps, base_lr, warmup):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * base_lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@torch.no_grad()
def error(model, x, y, mode=None, chunk=1152):
    """Error (%) of ``model`` on images ``x``, labels ``y``, in EvalNorm ``mode`` (None: the
    modes the layers hold)."""
    model.eval()
    with contextlib.nullcontext() if mode is None else evalnorm_mode(model, mode):
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


_DATA = {}  # seed -> DigitScenes, kept for the next cell of the same seed in this process


def measure_cell(seed, b, steps, curve, args):
    """``run_cell`` for one planned cell, its seed's data made once per process."""
    if seed not in _DATA:
        _DATA[seed] = make_data(seed, args)
    return run_cell(_DATA[seed], b, steps, args, curve)

"""Where EvalNorm helps a trained model and where it hurts: the same weights evaluated with
EMA, the estimated coefficients, the rule of thumb, and sweeps around them.

``evaluate(model)`` is any score of the model in eval() on data kept apart from the test data
(top-1 accuracy, COCO AP, ...); ``coefficient_sweep`` calls it once per setting:

- ``fixed``: one alpha = beta for every layer (Summers and Dinneen's inference example
  weighing, 1 being prediction-time BN);
- ``scaled``: every layer's estimated alpha and beta times one factor (0: EMA, 1: as estimated);
- ``group``: the estimated coefficients in one group of layers (a stage), EMA elsewhere.

``calibrate_coefficients`` keeps the best scaling of the estimated coefficients on such data.
"""

import contextlib
import math
import numbers

import torch

from .context import evalnorm_mode
from .layer import EvalNorm2d

__all__ = [
    "FACTORS",
    "VALUES",
    "calibrate_coefficients",
    "coefficient_sweep",
    "evalnorm_only_in",
    "fixed_coefficients",
    "format_sweep",
    "layer_groups",
    "restored_coefficients",
    "scale_coefficients",
    "scaled_coefficients",
]

VALUES = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
FACTORS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


def _layers(model):
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, EvalNorm2d)]
    if not layers:
        raise ValueError("The model has no EvalNorm2d layer: convert_to_evalnorm(model, B) first")
    return layers


@contextlib.contextmanager
def restored_coefficients(model):
    """Within the block, alpha and beta of every ``EvalNorm2d`` may change; on exit they are
    put back bit for bit."""
    saved = [(m, m.alpha_logit.clone(), m.beta_logit.clone()) for _, m in _layers(model)]
    try:
        yield model
    finally:
        with torch.no_grad():
            for m, alpha_logit, beta_logit in saved:
                m.alpha_logit.copy_(alpha_logit)
                m.beta_logit.copy_(beta_logit)


@contextlib.contextmanager
def fixed_coefficients(model, value):
    """Within the block, every EvalNorm2d of ``model`` has alpha = beta = ``value`` (in [0, 1])
    and evaluates in mode "en": one weight of the sample's own moments for the whole network
    (1: prediction-time BN; a constant chosen on validation data: Summers and Dinneen's
    inference example weighing). Coefficients and modes are restored on exit."""
    with restored_coefficients(model), evalnorm_mode(model, "en"):
        for _, m in _layers(model):
            m.set_coefficients(value)  # 1 -> logit +inf, sigmoid(+inf) = 1 exactly
        yield model


def scale_coefficients(model, factor):
    """Multiply every EvalNorm2d's alpha and beta by ``factor`` (>= 0), capped at 1."""
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not factor >= 0:
        raise ValueError(f"factor must be a number >= 0, got {factor!r}")
    for _, m in _layers(model):
        alpha, beta = (min(1.0, factor * v.item()) for v in (m.alpha, m.beta))
        m.set_coefficients(alpha, beta)


@contextlib.contextmanager
def scaled_coefficients(model, factor):
    """Within the block, every EvalNorm2d evaluates in mode "en" with its own alpha and beta
    multiplied by ``factor`` (>= 0), capped at 1. Restored on exit."""
    with restored_coefficients(model), evalnorm_mode(model, "en"):
        scale_coefficients(model, factor)
        yield model


def calibrate_coefficients(model, evaluate, factors=FACTORS):
    """Scale the estimated alpha and beta by the factor that scores best on validation data.

    ``evaluate(model)`` scores the model in eval() (higher is better: top-1 accuracy, COCO AP)
    on data kept apart from the test data; it is called once per factor, with every layer's
    alpha and beta multiplied by it (``scaled_coefficients``). The best factor is applied for
    good; ties go to the smaller factor. With 0 among ``factors`` (the default), EMA is one of
    the candidates, so the calibrated model is never worse than EMA on that data.

    Returns:
        dict: "factor" (the one applied) and "scores" (a list of [factor, score]).
    """
    factors = sorted(set(factors))
    if not factors:
        raise ValueError("factors is empty: give at least one scaling of alpha and beta")
    scores = []
    for factor in factors:
        with scaled_coefficients(model, factor):
            scores.append([factor, float(evaluate(model))])
    # A score of NaN (COCO AP with no detections at all) ranks last.
    best = max(scores, key=lambda fs: (-math.inf if math.isnan(fs[1]) else fs[1], -fs[0]))[0]
    scale_coefficients(model, best)
    return {"factor": best, "scores": scores}


@contextlib.contextmanager
def evalnorm_only_in(model, modules):
    """Within the block, the EvalNorm2d layers in ``modules`` (qualified module names: a layer
    itself or any module holding it, such as a stage) evaluate in mode "en" (their own alpha
    and beta), all others in "ema". Modes are restored on exit."""
    inside = tuple(f"{m}." for m in modules)
    with contextlib.ExitStack() as stack:
        for name, m in _layers(model):
            mode = "en" if name in modules or name.startswith(inside) else "ema"
            stack.enter_context(evalnorm_mode(m, mode))
        yield model


def layer_groups(model, depth=1):
    """``{group: [group]}``: the modules holding EvalNorm2d layers, by the first ``depth``
    components of the layers' qualified names (a torchvision ResNet at depth 1: bn1, layer1,
    ..., layer4), in network order; the values are what ``evalnorm_only_in`` takes."""
    groups = {}
    for name, _ in _layers(model):
        group = ".".join(name.split(".")[:depth])
        groups.setdefault(group, [group])
    return groups


def coefficient_sweep(model, evaluate, values=VALUES, factors=FACTORS, groups=None):
    """Evaluate ``model`` (in eval()) once per setting; ``evaluate(model)`` returns a score.

    Returns:
        list of dicts ``{"sweep", "setting", "score"}``, in this order: "ema" and "en" (the
        estimated coefficients), "rule_of_thumb" where every layer knows its B, "fixed" for
        each alpha = beta in ``values``, "scaled" for each factor in ``factors``, and
        "group" for each ``{label: module names}`` of ``groups`` (``layer_groups(model)`` by
        default; empty: none).
    """
    layers = _layers(model)
    groups = layer_groups(model) if groups is None else groups
    rows = []

    def record(sweep, setting, context):
        with context:
            rows.append({"sweep": sweep, "setting": setting, "score": evaluate(model)})

    record("ema", "", evalnorm_mode(model, "ema"))
    record("en", "", evalnorm_mode(model, "en"))
    if all(m.norm_batch_size is not None for _, m in layers):
        record("rule_of_thumb", "1/B^2", evalnorm_mode(model, "rule_of_thumb"))
    for value in values:
        record("fixed", value, fixed_coefficients(model, value))
    for factor in factors:
        record("scaled", factor, scaled_coefficients(model, factor))
    for label, modules in groups.items():
        record("group", label, evalnorm_only_in(model, modules))
    return rows


def format_sweep(rows, score="score"):
    """The sweep as a text table: one line per setting, the score and its difference to EMA."""
    ema = next(r["score"] for r in rows if r["sweep"] == "ema")
    width = max(12, len(score) + 2)
    lines = [f"{'sweep':<14}{'setting':>10}{score:>{width}}{'- EMA':>10}"]
    for r in rows:
        setting = f"{r['setting']:g}" if isinstance(r["setting"], float) else str(r["setting"])
        value, change = r["score"], r["score"] - ema
        lines.append(f"{r['sweep']:<14}{setting:>10}{value:>{width}.2f}{change:>+10.2f}")
    return "\n".join(lines)

"""Context managers: evaluate the same weights with other statistics (``evalnorm_mode``), or
run training batches through a model without touching its running statistics."""

import contextlib

from torch import nn

from .layer import EVAL_MODES, EvalNorm2d

__all__ = ["evalnorm_mode", "keep_running_stats"]


@contextlib.contextmanager
def evalnorm_mode(model, mode):
    """Within the block, every ``EvalNorm2d`` of ``model`` evaluates in ``mode``.

    Modes: "ema" (running statistics alone: vanilla BatchNorm), "en" (each layer's alpha,
    beta), "rule_of_thumb" (1/B^2), "simple" (1/B) and "batch" (the evaluated batch's own
    statistics). The previous modes are restored on exit.
    """
    if mode not in EVAL_MODES:
        raise ValueError(f"Unknown EvalNorm mode {mode!r}: expected one of {', '.join(EVAL_MODES)}")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, EvalNorm2d)]
    if not layers:
        raise ValueError("The model has no EvalNorm2d layer: convert_to_evalnorm(model, B) first")
    if mode in ("rule_of_thumb", "simple"):
        unknown = [name for name, m in layers if m.norm_batch_size is None]
        if unknown:
            raise ValueError(
                f"mode {mode!r} needs norm_batch_size, which is None in layer {unknown[0]!r}"
            )
    previous = [m.mode for _, m in layers]
    try:
        for _, m in layers:
            m.mode = mode
        yield model
    finally:
        for (_, m), old in zip(layers, previous):
            m.mode = old


@contextlib.contextmanager
def keep_running_stats(model):
    """Within the block, BatchNorm layers in training mode (EvalNorm2d included) normalize with
    batch statistics, as in training, but leave ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` unchanged: for feeding training batches to a trained model (offline
    estimation, activation plots). Frozen layers normalize with their running statistics as
    always."""
    layers = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    try:
        for m in layers:
            m.track_running_stats = False  # BatchNorm's own switch: no update in training
        yield model
    finally:
        for m in layers:
            m.track_running_stats = True

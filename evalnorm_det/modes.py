"""``evalnorm_mode``: evaluate the same weights with different normalization statistics."""

import contextlib

from .layers import EVAL_MODES, EvalNorm2d

__all__ = ["evalnorm_mode"]


@contextlib.contextmanager
def evalnorm_mode(model, mode):
    """Within the block, every ``EvalNorm2d`` of ``model`` evaluates in ``mode``.

    Modes: "ema" (running statistics alone: vanilla BatchNorm), "en" (each layer's alpha,
    beta), "rule_of_thumb" (1/B^2) and "simple" (1/B). The previous modes are restored on exit.
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

from .evalnorm import EVAL_MODES, FROZEN_EN_CHOICES, EvalNorm2d
from .norm import EVALNORM_NAMES, get_norm

__all__ = ["EVALNORM_NAMES", "EVAL_MODES", "FROZEN_EN_CHOICES", "EvalNorm2d", "get_norm"]

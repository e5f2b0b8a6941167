from .evalnorm import EVAL_MODES, EvalNorm2d
from .norm import EVALNORM_NAMES, get_norm

__all__ = ["EvalNorm2d", "EVAL_MODES", "EVALNORM_NAMES", "get_norm"]

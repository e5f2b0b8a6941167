from .evalnorm import EVAL_MODES, EvalNorm2d
from .norm import EVALNORM_NAMES, get_norm

__all__ = ["EVALNORM_NAMES", "EVAL_MODES", "EvalNorm2d", "get_norm"]

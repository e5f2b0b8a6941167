"""EvalNorm (Singh and Shrivastava, ICCV 2019) for any PyTorch model; needs torch alone.

BatchNorm layers train exactly as before; at evaluation, each sample's own statistics are
mixed into the running (EMA) ones with two coefficients per layer, alpha and beta. The
detectron2 plugin built on it is ``evalnorm_det``.
"""

from .context import evalnorm_mode, keep_running_stats
from .convert import batchnorm_types, convert_to_batchnorm, convert_to_evalnorm, fold_to_batchnorm
from .deploy import deploy, fold_ema_layers, output_change, select_ema_layers
from .estimation import OnlineEstimator, estimate_offline
from .layer import EVAL_MODES, FROZEN_EN_CHOICES, EvalNorm2d

__version__ = "0.1.0"

__all__ = [
    "EVAL_MODES",
    "FROZEN_EN_CHOICES",
    "EvalNorm2d",
    "OnlineEstimator",
    "batchnorm_types",
    "convert_to_batchnorm",
    "convert_to_evalnorm",
    "deploy",
    "estimate_offline",
    "evalnorm_mode",
    "fold_ema_layers",
    "fold_to_batchnorm",
    "keep_running_stats",
    "output_change",
    "select_ema_layers",
]

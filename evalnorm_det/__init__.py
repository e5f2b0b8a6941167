"""EvalNorm (Singh and Shrivastava, ICCV 2019) for detectron2.

BatchNorm layers train exactly as before; at evaluation, each sample's own statistics are
mixed into the running (EMA) ones with two coefficients per layer, alpha and beta.
"""

import sys

try:
    import detectron2  # noqa: F401
except ImportError as e:
    raise ImportError(
        f"evalnorm_det needs detectron2, which this Python ({sys.executable}) cannot import ({e}). "
        "detectron2 is not on PyPI under its own name. In a checkout of evalnorm-det, `make setup` "
        "installs it into .venv. Elsewhere, build it from source: "
        "python -m pip install 'git+https://github.com/facebookresearch/detectron2.git' "
        "(see detectron2's INSTALL.md), or run tools/install_detectron2.sh PYTHON for the "
        "CPU-capable sal-detectron2 snapshot."
    ) from e

from . import data, modeling  # noqa: F401  (registers datasets, backbone and ROI heads)
from .config import add_evalnorm_config, check_evalnorm_config
from .convert import convert_to_batchnorm, convert_to_evalnorm, fold_to_batchnorm
from .engine import EvalNormCheckpointer, MissingStatisticsError, OnlineEstimationHook, Trainer
from .estimation import OnlineEstimator, estimate_offline
from .layers import EvalNorm2d, get_norm
from .modes import evalnorm_mode, keep_running_stats

__version__ = "0.1.0"

__all__ = [
    "EvalNorm2d",
    "EvalNormCheckpointer",
    "MissingStatisticsError",
    "OnlineEstimationHook",
    "OnlineEstimator",
    "Trainer",
    "add_evalnorm_config",
    "check_evalnorm_config",
    "convert_to_batchnorm",
    "convert_to_evalnorm",
    "estimate_offline",
    "evalnorm_mode",
    "fold_to_batchnorm",
    "get_norm",
    "keep_running_stats",
]

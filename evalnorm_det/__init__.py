"""EvalNorm (Singh and Shrivastava, ICCV 2019) for detectron2.

Importing it registers the EvalNorm backbones, ROI heads and the bundled datasets in
detectron2's registries. The layer and its estimation need torch alone: package ``evalnorm``,
whose names are re-exported here.
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
        "CPU-capable sal-detectron2 snapshot. EvalNorm for a plain PyTorch model needs no "
        "detectron2: `from evalnorm import EvalNorm2d, convert_to_evalnorm`."
    ) from e

from evalnorm import (
    EvalNorm2d,
    OnlineEstimator,
    __version__,
    convert_to_batchnorm,
    convert_to_evalnorm,
    estimate_offline,
    evalnorm_mode,
    fold_to_batchnorm,
    keep_running_stats,
)

from . import data, modeling  # noqa: F401  (registers datasets, backbone and ROI heads)
from .config import add_evalnorm_config, check_evalnorm_config
from .engine import EvalNormCheckpointer, MissingStatisticsError, OnlineEstimationHook, Trainer
from .layers import get_norm

__all__ = [
    "EvalNorm2d",
    "EvalNormCheckpointer",
    "MissingStatisticsError",
    "OnlineEstimationHook",
    "OnlineEstimator",
    "Trainer",
    "__version__",
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

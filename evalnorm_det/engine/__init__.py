"""detectron2 training and evaluation with EvalNorm: hook, checkpointer, trainer."""

from .checkpoint import EvalNormCheckpointer, MissingStatisticsError
from .evaluation import evaluate_modes, format_table
from .hooks import OnlineEstimationHook
from .trainer import Trainer, build_augmentation

__all__ = [
    "EvalNormCheckpointer",
    "MissingStatisticsError",
    "OnlineEstimationHook",
    "Trainer",
    "build_augmentation",
    "evaluate_modes",
    "format_table",
]

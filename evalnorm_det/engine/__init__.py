"""detectron2 training and evaluation with EvalNorm: hooks, checkpointer, trainer, resuming,
the per-mode test, the rescue of BN checkpoints, and what the tools share."""

from .checkpoint import (
    CheckpointError,
    CorruptCheckpointError,
    EvalNormCheckpointer,
    MissingStatisticsError,
    UnsafeCheckpointError,
    read_checkpoint,
    save_evalnorm_checkpoint,
)
from .defaults import (
    add_rescue_arguments,
    argument_parser,
    launch_checked,
    parse_args,
    resolve_config_file,
    setup,
    setup_cfg,
)
from .evaluation import evaluate_modes, evaluation_mode, format_table, write_tables
from .hooks import NonFiniteCheckHook, OnlineEstimationHook
from .rescue import (
    build_evalnorm_model,
    estimate_offline_from_config,
    load_evalnorm_model,
    rescue_metadata,
    training_batches,
)
from .resume import ResumeStateHook, SkippingSampler
from .trainer import Trainer, build_augmentation

__all__ = [
    "CheckpointError",
    "CorruptCheckpointError",
    "EvalNormCheckpointer",
    "MissingStatisticsError",
    "NonFiniteCheckHook",
    "OnlineEstimationHook",
    "ResumeStateHook",
    "SkippingSampler",
    "Trainer",
    "UnsafeCheckpointError",
    "add_rescue_arguments",
    "argument_parser",
    "build_augmentation",
    "build_evalnorm_model",
    "estimate_offline_from_config",
    "evaluate_modes",
    "evaluation_mode",
    "format_table",
    "launch_checked",
    "load_evalnorm_model",
    "parse_args",
    "read_checkpoint",
    "rescue_metadata",
    "resolve_config_file",
    "save_evalnorm_checkpoint",
    "setup",
    "setup_cfg",
    "training_batches",
    "write_tables",
]

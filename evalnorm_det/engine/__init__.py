"""detectron2 training and evaluation with EvalNorm: the online-estimation hook, the
checkpointer refusing folded BN, the trainer, the per-row evaluation table, the rescue of BN
checkpoints, and what the tools share. The general machinery they use (safe and atomic
checkpoints, bit-exact resume, CPU training, checks before a run) is in ``evalnorm_det.utils``;
its public names are re-exported here."""

from ..utils import (
    CheckpointError,
    CorruptCheckpointError,
    NonFiniteCheckHook,
    ResumeStateHook,
    SkippingSampler,
    UnsafeCheckpointError,
    read_checkpoint,
)
from .checkpoint import EvalNormCheckpointer, MissingStatisticsError
from .defaults import (
    add_figure_arguments,
    add_rescue_arguments,
    argument_parser,
    check_output,
    launch_checked,
    non_negative_int,
    number_list,
    parse_args,
    positive_int,
    resolve_config_file,
    setup,
    setup_cfg,
    train_or_evaluate,
    unit_interval,
    yacs_run_config,
)
from .deploy import detector_outputs, with_proposals
from .evaluation import evaluate_rows, format_table, row_evaluation, write_tables
from .hooks import OnlineEstimationHook
from .lazy import LazyTrainer, lazy_run_config, setup_lazy
from .rescue import (
    build_evalnorm_model,
    estimate_offline_from_config,
    load_evalnorm_model,
    rescue_metadata,
    save_evalnorm_checkpoint,
    training_batches,
)
from .trainer import Trainer, build_augmentation

__all__ = [
    "CheckpointError",
    "CorruptCheckpointError",
    "EvalNormCheckpointer",
    "LazyTrainer",
    "MissingStatisticsError",
    "NonFiniteCheckHook",
    "OnlineEstimationHook",
    "ResumeStateHook",
    "SkippingSampler",
    "Trainer",
    "UnsafeCheckpointError",
    "add_figure_arguments",
    "add_rescue_arguments",
    "argument_parser",
    "build_augmentation",
    "build_evalnorm_model",
    "check_output",
    "detector_outputs",
    "estimate_offline_from_config",
    "evaluate_rows",
    "format_table",
    "launch_checked",
    "lazy_run_config",
    "load_evalnorm_model",
    "non_negative_int",
    "number_list",
    "parse_args",
    "positive_int",
    "read_checkpoint",
    "rescue_metadata",
    "resolve_config_file",
    "row_evaluation",
    "save_evalnorm_checkpoint",
    "setup",
    "setup_cfg",
    "setup_lazy",
    "train_or_evaluate",
    "training_batches",
    "unit_interval",
    "with_proposals",
    "write_tables",
    "yacs_run_config",
]

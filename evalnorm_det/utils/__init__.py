"""What makes a detectron2 run reliable, EvalNorm aside; nothing here imports
``evalnorm_det.engine`` or EvalNorm itself.

- ``safe_load``: checkpoint files read with no code from them run;
- ``atomic``: the one atomic file writer;
- ``checkpointer``: ``SafeCheckpointer``, detectron2's checkpointer reading and writing so;
- ``resume``: ``--resume`` continuing bit for bit (random states, data order);
- ``cpu``: training on CPU (bfloat16 mixed precision, DDP over GLOO);
- ``preflight``: the files a run reads, checked before it starts;
- ``nonfinite``: stop training at the first layer that goes NaN or Inf;
- ``d2_internals``: every use of a detectron2 internal.
"""

from .atomic import atomic_write
from .checkpointer import SafeCheckpointer, missing_weights_error
from .cpu import CPUAMPTrainer, amp_on_cpu, ddp_on_cpu
from .nonfinite import NonFiniteCheckHook
from .preflight import check_inputs, missing_dataset_error, naming_missing_data
from .resume import ResumeStateHook, SkippingSampler, resumable_train_loader
from .safe_load import (
    CheckpointError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    read_checkpoint,
)

__all__ = [
    "CPUAMPTrainer",
    "CheckpointError",
    "CorruptCheckpointError",
    "NonFiniteCheckHook",
    "ResumeStateHook",
    "SafeCheckpointer",
    "SkippingSampler",
    "UnsafeCheckpointError",
    "amp_on_cpu",
    "atomic_write",
    "check_inputs",
    "ddp_on_cpu",
    "missing_dataset_error",
    "missing_weights_error",
    "naming_missing_data",
    "read_checkpoint",
    "resumable_train_loader",
]

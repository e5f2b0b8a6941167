"""What detectron2's ``DefaultTrainer`` needs to train on CPU: mixed precision in bfloat16
(``SOLVER.AMP.ENABLED``), and DDP over GLOO (``--num-gpus N`` without CUDA)."""

import contextlib

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer

from .d2_internals import wrapping_create_ddp_model

__all__ = ["CPUAMPTrainer", "amp_on_cpu", "autocast_forward", "ddp_on_cpu"]


def amp_on_cpu(cfg, trainer):
    """``trainer`` itself, or with ``SOLVER.AMP.ENABLED`` on a CPU model, a
    :class:`CPUAMPTrainer` for the same model, data and optimizer: detectron2's ``AMPTrainer``
    asserts CUDA."""
    if not isinstance(trainer, AMPTrainer) or torch.device(cfg.MODEL.DEVICE).type != "cpu":
        return trainer
    return CPUAMPTrainer(trainer.model, trainer.data_loader, trainer.optimizer)


class CPUAMPTrainer(AMPTrainer):
    """detectron2's ``AMPTrainer`` on CPU: the model's forward under ``torch.autocast("cpu",
    torch.bfloat16)``. bfloat16 has float32's range, so gradients are not scaled (the
    ``AMPTrainer`` state keeps a disabled grad scaler)."""

    def __init__(self, model, data_loader, optimizer, precision=torch.bfloat16):
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        super().__init__(model, data_loader, optimizer, grad_scaler=scaler, precision=precision)

    def run_step(self):
        # AMPTrainer.run_step asserts CUDA and enters CUDA autocast; with the scaler disabled
        # it is SimpleTrainer.run_step with the forward under autocast.
        with autocast_forward(self.model, "cpu", self.precision):
            SimpleTrainer.run_step(self)


@contextlib.contextmanager
def autocast_forward(module, device_type, dtype):
    """Within the block, every forward of ``module`` runs under ``torch.autocast(device_type,
    dtype)``; the backward pass and whatever else the block runs do not."""
    autocast = torch.autocast(device_type, dtype=dtype)

    def start(module, args):
        autocast.__enter__()  # returns the autocast object, which must not replace args

    def stop(module, args, output):
        autocast.__exit__(None, None, None)

    enter = module.register_forward_pre_hook(start)
    leave = module.register_forward_hook(stop, always_call=True)  # also when forward raises
    try:
        yield module
    finally:
        enter.remove()
        leave.remove()


def _cpu_device_ids(create_ddp_model, model, **kwargs):
    if all(p.device.type == "cpu" for p in model.parameters()):
        kwargs.setdefault("device_ids", None)
    return create_ddp_model(model, **kwargs)


def ddp_on_cpu():
    """Context manager in which ``DefaultTrainer`` can wrap a CPU model in DDP: detectron2's
    ``create_ddp_model`` gives DDP ``device_ids=[local rank]`` whatever the device, which DDP
    refuses for a CPU model; a CPU model gets no ``device_ids``."""
    return wrapping_create_ddp_model(_cpu_device_ids)

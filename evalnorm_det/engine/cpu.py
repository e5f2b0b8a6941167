"""What detectron2's engine needs to train on CPU: mixed precision in bfloat16, and DDP over
GLOO (``--num-gpus N`` without CUDA)."""

import contextlib
import time

import torch
from detectron2.engine import AMPTrainer
from detectron2.engine import defaults as d2_defaults

__all__ = ["CPUAMPTrainer", "amp_on_cpu", "ddp_on_cpu"]


def amp_on_cpu(cfg, trainer):
    """``trainer`` itself, or with ``SOLVER.AMP.ENABLED`` on a CPU model, a
    :class:`CPUAMPTrainer` for the same model, data and optimizer: detectron2's ``AMPTrainer``
    asserts CUDA."""
    if not isinstance(trainer, AMPTrainer) or torch.device(cfg.MODEL.DEVICE).type != "cpu":
        return trainer
    return CPUAMPTrainer(trainer.model, trainer.data_loader, trainer.optimizer)


class CPUAMPTrainer(AMPTrainer):
    """detectron2's ``AMPTrainer`` on CPU: the forward under ``torch.autocast("cpu",
    torch.bfloat16)``. bfloat16 has float32's range, so gradients are not scaled."""

    def __init__(self, model, data_loader, optimizer, precision=torch.bfloat16):
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        super().__init__(model, data_loader, optimizer, grad_scaler=scaler, precision=precision)

    def run_step(self):
        # AMPTrainer.run_step with CPU autocast instead of its CUDA assert and CUDA autocast.
        assert self.model.training, "[CPUAMPTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        with torch.autocast("cpu", dtype=self.precision):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses, loss_dict = loss_dict, {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()


@contextlib.contextmanager
def ddp_on_cpu():
    """detectron2's ``create_ddp_model`` gives DDP ``device_ids=[local rank]`` whatever the
    device, which DDP refuses for a CPU model (``--num-gpus 2`` on CPU, GLOO): no device_ids."""
    create = d2_defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        if all(p.device.type == "cpu" for p in model.parameters()):
            kwargs.setdefault("device_ids", None)
        return create(model, **kwargs)

    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = create

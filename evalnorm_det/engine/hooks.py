"""``OnlineEstimationHook``: estimate alpha/beta while a detectron2 trainer trains;
``NonFiniteCheckHook``: stop training at the first EvalNorm layer that goes NaN or Inf."""

import torch
from detectron2.engine import HookBase

from ..estimation import OnlineEstimator
from ..layers import EvalNorm2d

__all__ = ["NonFiniteCheckHook", "OnlineEstimationHook"]


class OnlineEstimationHook(HookBase):
    """Wraps :class:`OnlineEstimator` for detectron2's training loop.

    Estimation is on while training runs, from iteration ``start_iter`` on. After each such
    iteration's model step, alpha and beta take one step of their own optimizer (the model's optimizer never holds them), their
    gradients averaged over processes. Every ``log_period`` iterations every layer's alpha
    and beta go to the event storage as ``evalnorm_alpha/<layer>`` and ``evalnorm_beta/<layer>``
    (so TensorBoard and metrics.json show them). The estimator's optimizer state is saved
    and restored with the trainer's checkpoints (``state_dict``).

    Place it before the checkpointer and writers, as ``Trainer.build_hooks`` does, so a
    checkpoint or a log line at iteration i includes iteration i's estimation step.
    """

    def __init__(
        self,
        model,
        lr=0.01,
        optimizer="adam",
        momentum=0.9,
        log_period=20,
        max_positions=None,
        start_iter=0,
    ):
        self.estimator = OnlineEstimator(
            model, lr=lr, optimizer=optimizer, momentum=momentum, max_positions=max_positions
        )
        self.estimator.enabled = False
        self.log_period = log_period
        self.start_iter = start_iter

    def after_train(self):
        self.estimator.enabled = False

    def before_step(self):
        self.estimator.enabled = self.trainer.iter >= self.start_iter
        # Only this iteration's forward counts: drop what other training-mode forwards left
        # since the last step (PreciseBN's passes, for example).
        for _, m in self.estimator.layers:
            m.take_aux_grad()

    def after_step(self):
        if self.estimator.enabled:
            self.estimator.step()
        next_iter = self.trainer.iter + 1
        if next_iter % self.log_period == 0 or next_iter == self.trainer.max_iter:
            self._log()

    def _log(self):
        scalars = {}
        for name, (alpha, beta) in self.estimator.coefficients().items():
            scalars[f"evalnorm_alpha/{name}"] = alpha
            scalars[f"evalnorm_beta/{name}"] = beta
        self.trainer.storage.put_scalars(**scalars, smoothing_hint=False)

    def state_dict(self):
        return self.estimator.state_dict()

    def load_state_dict(self, state_dict):
        self.estimator.load_state_dict(state_dict)


_STATE = ("weight", "bias", "running_mean", "running_var", "alpha_logit", "beta_logit")


class NonFiniteCheckHook(HookBase):
    """Stops training with a ``FloatingPointError`` naming the first EvalNorm layer, in network
    order, whose weight, bias, running statistics or alpha/beta hold NaN or Inf, before a
    checkpoint could save them.

    It checks after every step (place it after ``OnlineEstimationHook`` and before the
    ``PeriodicCheckpointer``) and when a step fails (detectron2 stops on a non-finite loss or
    on NaN boxes). A NaN or Inf reaching a training EvalNorm layer enters its running
    statistics in that very forward, so the first layer found is where it appeared: the layer
    itself if its weight or bias is bad, else the first to see it. Only the layers' (C,)
    tensors are read, with one device synchronization per step: the activations are not read
    again. FrozenEN layers' statistics never change, so a NaN passing through them is named at
    the first trainable EvalNorm layer after them, or else only by detectron2's loss check.
    """

    def __init__(self, model):
        self.layers = [(n, m) for n, m in model.named_modules() if isinstance(m, EvalNorm2d)]
        self._raised = False

    def after_step(self):
        self._check("after iteration")

    def after_train(self):
        # A step that raised (not this hook): name the layer, if any is non-finite.
        if self.trainer.iter < self.trainer.max_iter and not self._raised:
            self._check("in iteration")

    def _check(self, stage):
        if not self.layers:
            return
        flags = torch.stack(
            [
                torch.stack([torch.isfinite(getattr(m, k)).all() for k in _STATE])
                for _, m in self.layers
            ]
        )
        if bool(flags.all()):
            return
        for (name, _), ok in zip(self.layers, flags.tolist()):
            if not all(ok):
                self._raised = True
                bad = ", ".join(k for k, good in zip(_STATE, ok) if not good)
                raise FloatingPointError(
                    f"NaN or Inf {stage} {self.trainer.iter}: EvalNorm layer {name!r} has "
                    f"non-finite {bad}. Training stopped before any checkpoint with it was "
                    "written; the NaN or Inf appeared at this layer or in what feeds it (the "
                    "images, the layers before it)."
                )

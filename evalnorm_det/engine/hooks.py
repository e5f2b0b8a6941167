"""``OnlineEstimationHook``: estimate alpha/beta while a detectron2 trainer trains."""

from detectron2.engine import HookBase

from evalnorm import OnlineEstimator

__all__ = ["OnlineEstimationHook"]


class OnlineEstimationHook(HookBase):
    """Wraps :class:`OnlineEstimator` for detectron2's training loop.

    Estimation is on while training runs, from iteration ``start_iter`` on. After each such
    iteration's model step, alpha and beta take one step of their own optimizer (the model's
    optimizer never holds them), their gradients averaged over processes. Every ``log_period`` iterations every layer's alpha
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

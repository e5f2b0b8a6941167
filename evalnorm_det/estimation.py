"""Online estimation of alpha and beta (paper section 3.4) for any PyTorch training loop."""

import torch
import torch.distributed as dist

from .layers import EvalNorm2d

__all__ = ["OnlineEstimator"]


class OnlineEstimator:
    """Estimates every EvalNorm2d's alpha and beta while the model trains, leaving training as is.

    It switches on ``estimate_online`` in each ``EvalNorm2d`` of ``model``: every training
    forward then leaves the gradient of the auxiliary loss (eqs. 7-9) for alpha/beta in the
    layer. ``step()`` applies those gradients with this estimator's own optimizer, which holds
    alpha and beta only: the model's optimizer, outputs, gradients, running statistics and
    random stream are untouched. Usage::

        estimator = OnlineEstimator(model)
        for images, targets in loader:
            loss = criterion(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            estimator.step()

    Args:
        model (nn.Module): has EvalNorm2d layers (see ``convert_to_evalnorm``).
        lr (float): learning rate. alpha and beta are optimized as logits, so with Adam a step
            changes them by about ``lr`` in relative terms, whatever their scale (1/B^2 is
            0.25 for two images per GPU, 6e-5 for a box head's 128 ROIs).
        optimizer (str): "adam" or "sgd".
        momentum (float): SGD's momentum.
        average_across_processes (bool): under ``torch.distributed``, average each gradient
            over the processes that computed one, so every rank keeps identical alpha/beta.
    """

    def __init__(
        self, model, lr=0.01, optimizer="adam", momentum=0.9, average_across_processes=True
    ):
        self.layers = [(name, m) for name, m in model.named_modules() if isinstance(m, EvalNorm2d)]
        if not self.layers:
            raise ValueError(
                "The model has no EvalNorm2d layer: convert_to_evalnorm(model, B) first"
            )
        at_bounds = [
            name
            for name, m in self.layers
            if not (torch.isfinite(m.alpha_logit).item() and torch.isfinite(m.beta_logit).item())
        ]
        if at_bounds:
            raise ValueError(
                f"alpha or beta is exactly 0 or 1 in {len(at_bounds)} EvalNorm2d layer(s), first "
                f"{at_bounds[0]!r}: estimation works on their logits and cannot leave 0 or 1. Start "
                "from the rule of thumb (give the layers norm_batch_size) or set_coefficients(v), 0 < v < 1"
            )
        params = [p for _, m in self.layers for p in (m.alpha_logit, m.beta_logit)]
        if optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=lr)
        elif optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)
        else:
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        self.average_across_processes = average_across_processes
        self.enabled = True

    @property
    def enabled(self):
        """Whether the layers compute the auxiliary loss in their training forwards."""
        return self._enabled

    @enabled.setter
    def enabled(self, value):
        self._enabled = bool(value)
        for _, m in self.layers:
            m.estimate_online = self._enabled

    def step(self):
        """Apply, then clear, the auxiliary-loss gradients accumulated since the last step."""
        device = self.layers[0][1].alpha_logit.device
        none = torch.zeros(3, device=device)
        one = torch.ones(1, device=device)
        # One row per layer: d/d(alpha_logit), d/d(beta_logit), and 1 if the layer has a gradient.
        rows = torch.stack(
            [
                none
                if grad is None
                else torch.cat([grad.to(device=device, dtype=torch.float32), one])
                for grad in (m.take_aux_grad() for _, m in self.layers)
            ]
        )
        if self.average_across_processes and dist.is_available() and dist.is_initialized():
            dist.all_reduce(rows)
        counts = rows[:, 2:]
        grads = rows[:, :2] / counts.clamp(min=1)
        for (_, m), grad, has_grad in zip(self.layers, grads, (counts[:, 0] > 0).tolist()):
            if has_grad:
                m.alpha_logit.grad = grad[0].to(m.alpha_logit)
                m.beta_logit.grad = grad[1].to(m.beta_logit)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def coefficients(self):
        """{layer name: (alpha, beta)} as Python floats, read with one device-to-host copy."""
        values = torch.stack([torch.stack([m.alpha, m.beta]) for _, m in self.layers]).tolist()
        return {name: tuple(ab) for (name, _), ab in zip(self.layers, values)}

    def state_dict(self):
        """The optimizer's state (alpha and beta themselves are in the model's state dict)."""
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict["optimizer"])

"""Estimation of alpha and beta (paper section 3.4): online, in any PyTorch training loop, and
offline, on a trained model."""

import contextlib
import datetime
import itertools
import logging
import math
import time

import torch
import torch.distributed as dist

from . import functional as EF
from .context import evalnorm_mode, keep_running_stats
from .layer import EvalNorm2d

__all__ = ["INPUTS", "OnlineEstimator", "estimate_offline"]

logger = logging.getLogger(__name__)


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

    Every layer's ``alpha_logit`` and ``beta_logit`` are views into one (layers, 2) tensor, so a
    step is a few operations on it whatever the number of layers, with one all-reduce under
    ``torch.distributed`` and no read of a value to the host.

    Args:
        model (nn.Module): has EvalNorm2d layers (see ``convert_to_evalnorm``), their alpha and
            beta all of one dtype and on one device.
        lr (float): learning rate. alpha and beta are optimized as logits, so with Adam a step
            changes them by about ``lr`` in relative terms, whatever their scale (1/B^2 is
            0.25 for two images per GPU, 6e-5 for a box head's 128 ROIs).
        optimizer (str): "adam" or "sgd".
        momentum (float): SGD's momentum.
        average_across_processes (bool): under ``torch.distributed``, average each gradient
            over the processes that computed one, so every rank keeps identical alpha/beta.
        max_positions (int or None): each layer's auxiliary loss uses about this many (sample,
            position) pairs per channel, at a fixed stride; None: all. The statistics are
            always those of the whole batch; only the loss's average is subsampled.
    """

    def __init__(
        self,
        model,
        lr=0.01,
        optimizer="adam",
        momentum=0.9,
        average_across_processes=True,
        max_positions=None,
    ):
        self.layers = [(name, m) for name, m in model.named_modules() if isinstance(m, EvalNorm2d)]
        if not self.layers:
            raise ValueError(
                "The model has no EvalNorm2d layer: convert_to_evalnorm(model, B) first"
            )
        first = self.layers[0][1].alpha_logit
        for name, m in self.layers:
            for p in (m.alpha_logit, m.beta_logit):
                if (p.dtype, p.device) != (first.dtype, first.device):
                    raise ValueError(
                        f"EvalNorm2d {name!r} holds alpha/beta in {p.dtype} on {p.device}, the "
                        f"first layer in {first.dtype} on {first.device}: the estimator needs "
                        "one dtype and one device for all of them"
                    )
        finite = torch.isfinite(self._link()).all(dim=1).tolist()
        at_bounds = [name for (name, _), ok in zip(self.layers, finite) if not ok]
        if at_bounds:
            raise ValueError(
                f"alpha or beta is exactly 0 or 1 in {len(at_bounds)} EvalNorm2d layer(s), first "
                f"{at_bounds[0]!r}: estimation works on their logits and cannot leave 0 or 1. Start "
                "from the rule of thumb (give the layers norm_batch_size) or set_coefficients(v), 0 < v < 1"
            )
        params = self._params()
        # The torch optimizer holds the hyperparameters (read at every step) and, in
        # state_dict(), the state in its usual per-parameter format; step() itself updates the
        # whole (layers, 2) tensor at once.
        if optimizer == "adam":
            self._optimizer = torch.optim.Adam(params, lr=lr)
            self._state = {k: torch.zeros_like(self._flat) for k in ("exp_avg", "exp_avg_sq")}
        elif optimizer == "sgd":
            self._optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)
            self._state = {"momentum_buffer": torch.zeros_like(self._flat)}
        else:
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        self._kind = optimizer
        self._state["step"] = torch.zeros_like(self._flat, dtype=torch.float32)
        if max_positions is not None and (
            isinstance(max_positions, bool)
            or not isinstance(max_positions, int)
            or max_positions < 1
        ):
            raise ValueError(
                f"max_positions must be an integer >= 1 or None, got {max_positions!r}"
            )
        self.max_positions = max_positions
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
            m.aux_max_positions = self.max_positions

    @property
    def optimizer(self):
        """The ``torch.optim`` optimizer (Adam or SGD) over every layer's ``alpha_logit`` and
        ``beta_logit``, with the state ``step()`` has reached; its ``param_groups`` (``lr``,
        ``betas``, ``eps``, ``momentum``) are read at every step. Restore a state with
        ``OnlineEstimator.load_state_dict``."""
        self._export_state()
        return self._optimizer

    def _params(self):
        return [p for _, m in self.layers for p in (m.alpha_logit, m.beta_logit)]

    def _link(self):
        """The (layers, 2) tensor of every (alpha_logit, beta_logit), made (again, if
        ``.to()`` or ``load_state_dict(assign=True)`` replaced one) the storage of the layers'
        parameters, which keep their values."""
        params = self._params()
        flat = getattr(self, "_flat", None)
        if flat is not None and [p.data_ptr() for p in params] == self._pointers:
            return flat
        flat = torch.stack([p.detach() for p in params]).view(len(self.layers), 2)
        for p, view in zip(params, flat.view(-1)):
            p.data = view
        self._pointers = [p.data_ptr() for p in params]
        self._flat = flat
        if hasattr(self, "_optimizer"):  # relinked after construction: follow the parameters
            self._optimizer.param_groups[0]["params"] = params
            for k, v in self._state.items():
                self._state[k] = v.to(
                    device=flat.device, dtype=v.dtype if k == "step" else flat.dtype
                )
        return flat

    def step(self):
        """Apply, then clear, the auxiliary-loss gradients accumulated since the last step."""
        flat = self._link()
        grads = [m.take_aux_grad() for _, m in self.layers]
        present = [i for i, g in enumerate(grads) if g is not None]
        distributed = (
            self.average_across_processes and dist.is_available() and dist.is_initialized()
        )
        if not present and not distributed:
            return
        # One row per layer: d/d(alpha_logit), d/d(beta_logit), and 1 if the layer has a gradient.
        rows = torch.zeros(len(grads), 3, device=flat.device)
        if present:
            known = torch.stack([grads[i] for i in present]).to(rows)
            known = torch.cat([known, torch.ones_like(known[:, :1])], dim=1)
            if len(present) == len(grads):
                rows = known
            else:
                rows[torch.tensor(present, device=flat.device)] = known
        if distributed:
            dist.all_reduce(rows)
        counts = rows[:, 2:]
        grad = (rows[:, :2] / counts.clamp(min=1)).to(flat.dtype)
        has_grad = (counts > 0).expand_as(flat)
        group, state = self._optimizer.param_groups[0], self._state
        step = state["step"] + has_grad
        if self._kind == "adam":
            beta1, beta2 = group["betas"]
            exp_avg = torch.where(
                has_grad, state["exp_avg"].lerp(grad, 1 - beta1), state["exp_avg"]
            )
            exp_avg_sq = torch.where(
                has_grad,
                state["exp_avg_sq"] * beta2 + (1 - beta2) * grad * grad,
                state["exp_avg_sq"],
            )
            # torch.optim.Adam's update, with each entry's own step count; entries without a
            # gradient (step 0 included) are left as they are. Bias corrections in float64, as
            # torch's Python scalars.
            step64 = step.double()
            step_size = (group["lr"] / (1 - torch.pow(beta1, step64))).to(flat.dtype)
            bias2_sqrt = (1 - torch.pow(beta2, step64)).sqrt().to(flat.dtype)
            update = exp_avg / (exp_avg_sq.sqrt() / bias2_sqrt + group["eps"]) * step_size
            state.update(exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
        else:
            buf = state["momentum_buffer"]
            # torch.optim.SGD: the first step's buffer is the gradient itself.
            buf = torch.where(state["step"] > 0, buf * group["momentum"] + grad, grad)
            buf = torch.where(has_grad, buf, state["momentum_buffer"])
            update = group["lr"] * buf
            state["momentum_buffer"] = buf
        flat.sub_(torch.where(has_grad, update, 0.0))
        state["step"] = step

    def _export_state(self):
        """Write the step's state into the torch optimizer, one entry per parameter that has
        taken a step, as ``torch.optim`` keeps it."""
        self._link()
        steps = self._state["step"].view(-1).tolist()
        values = {k: v.view(-1) for k, v in self._state.items() if k != "step"}
        self._optimizer.state.clear()
        for i, (p, n) in enumerate(zip(self._params(), steps)):
            if not n:
                continue
            if self._kind == "adam":
                self._optimizer.state[p] = {
                    "step": torch.tensor(n, dtype=torch.float32),
                    "exp_avg": values["exp_avg"][i].clone(),
                    "exp_avg_sq": values["exp_avg_sq"][i].clone(),
                }
            elif self._optimizer.param_groups[0]["momentum"] != 0:
                self._optimizer.state[p] = {"momentum_buffer": values["momentum_buffer"][i].clone()}

    def _import_state(self):
        flat = self._link()
        zero = torch.zeros((), device=flat.device, dtype=flat.dtype)
        states = [self._optimizer.state.get(p, {}) for p in self._params()]
        for k in self._state:
            if k == "step":
                if self._kind == "adam":
                    steps = [float(s.get("step", 0)) for s in states]
                else:  # SGD keeps no count: a buffer means at least one step
                    steps = [float("momentum_buffer" in s) for s in states]
                values = torch.tensor(steps, dtype=torch.float32, device=flat.device)
            else:
                values = torch.stack([s.get(k, zero).to(zero) for s in states])
            self._state[k] = values.view_as(flat)

    def coefficients(self):
        """{layer name: (alpha, beta)} as Python floats, read with one device-to-host copy."""
        values = torch.sigmoid(self._link().detach()).tolist()
        return {name: tuple(ab) for (name, _), ab in zip(self.layers, values)}

    def state_dict(self):
        """The optimizer's state (alpha and beta themselves are in the model's state dict)."""
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict):
        self._optimizer.load_state_dict(state_dict["optimizer"])
        self._import_state()


INPUTS = ("training", "evaluation")


def estimate_offline(
    model,
    batches,
    max_iter,
    *,
    inputs="training",
    lr=0.01,
    optimizer="adam",
    momentum=0.9,
    patience=0,
    min_delta=1e-3,
    log_period=20,
):
    """Fit the alpha and beta of a trained model's EvalNorm2d layers ("EN offline", section 3.4).

    Each batch goes through ``model`` as in training (``model(batch)``, training mode: every layer
    normalizes with its batch's statistics), with no gradient for the model and running
    statistics untouched (``keep_running_stats``); each layer's loss steps its alpha/beta with an
    :class:`OnlineEstimator`. Only alpha and beta change. Feed batches of the size the model
    trained with: B samples per process. ``inputs`` says what each layer is fitted on:

    - "training" (the paper's auxiliary loss, eqs. 7-9): the layer's inputs in that training
      forward, normalized both ways;
    - "evaluation": the layer's inputs in an evaluation forward of the same batch (``eval()``,
      every EvalNorm2d in mode "en" with its current alpha/beta), normalized by EvalNorm,
      against the training forward's normalization of the same samples (``matching_loss``).
      Each layer is then fitted on the inputs it sees at evaluation, with the layers upstream
      evaluating as EvalNorm; all layers step together, so a layer's fit follows its upstream
      layers' as they converge. Every layer must see the same samples in both forwards: fit a
      detector's backbone (``model.backbone``), not its ROI heads, whose boxes differ between a
      training and an evaluation forward.

    Stops after ``max_iter`` batches, when ``batches`` ends, or, with ``patience`` > 0, when the
    mean loss over the last ``patience`` iterations is not lower than the previous such
    block's by at least ``min_delta`` (relative). Under ``torch.distributed`` the losses and
    gradients are averaged over processes, so every rank stops together with the same alpha and
    beta. Logs progress every ``log_period`` iterations.

    Returns:
        dict: "iterations", "losses" (mean loss over layers, per iteration, before its step) and
        "stopped" ("max_iter", "plateau" or "data").
    """
    if inputs not in INPUTS:
        raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}")
    estimator = OnlineEstimator(model, lr=lr, optimizer=optimizer, momentum=momentum)
    layers = [m for _, m in estimator.layers]
    fit = _fit_on_training_inputs if inputs == "training" else _fit_on_evaluation_inputs
    if inputs == "evaluation":
        estimator.enabled = False  # the layers' own (training-input) loss stays off
    losses, best, stopped = [], math.inf, "max_iter"
    was_training = model.training
    start = time.perf_counter()
    try:
        with keep_running_stats(model), torch.no_grad():
            for it, batch in enumerate(itertools.islice(batches, max_iter), start=1):
                for m in layers:
                    m.last_aux_loss = None
                fit(model, estimator.layers, batch)
                losses.append(_mean_aux_loss(layers))
                estimator.step()
                if it % log_period == 0 or it == max_iter:
                    seconds = (time.perf_counter() - start) / it
                    eta = datetime.timedelta(seconds=round(seconds * (max_iter - it)))
                    logger.info(
                        "EN offline: iter %d/%d  loss %.5f  %.3f s/iter  ETA %s",
                        it,
                        max_iter,
                        losses[-1],
                        seconds,
                        eta,
                    )
                if patience and it % patience == 0:
                    block = sum(losses[-patience:]) / patience
                    if block > best * (1 - min_delta):
                        stopped = "plateau"
                        break
                    best = block
            if stopped == "max_iter" and len(losses) < max_iter:
                stopped = "data"
    finally:
        estimator.enabled = False
        model.train(was_training)
    logger.info(
        "EN offline (%s inputs): stopped (%s) after %d iterations, loss %.5f -> %.5f",
        inputs,
        stopped,
        len(losses),
        losses[0] if losses else math.nan,
        losses[-1] if losses else math.nan,
    )
    return {"iterations": len(losses), "losses": losses, "stopped": stopped}


def _fit_on_training_inputs(model, layers, batch):
    """One training forward; each estimating layer leaves its auxiliary-loss gradient."""
    model.train()
    model(batch)


def _fit_on_evaluation_inputs(model, layers, batch):
    """A training forward records each layer's normalization of its samples (the targets);
    an evaluation forward of the same batch then leaves, in each layer, the gradient of
    ``matching_loss`` between EvalNorm's normalization of its evaluation inputs and them."""
    targets = {m: [] for _, m in layers}

    def record(m, args, output):
        targets[m].append(_training_normalization(m, args[0]))

    def match(m, args, output):
        name = names[m]
        if not targets[m]:
            raise ValueError(
                f"EvalNorm2d {name!r} ran more often in the evaluation forward than in the "
                "training one: its inputs do not correspond sample by sample"
            )
        target = targets[m].pop(0)
        if target.shape != args[0].shape:
            raise ValueError(
                f"EvalNorm2d {name!r} saw inputs of shape {tuple(target.shape)} in the training "
                f"forward and {tuple(args[0].shape)} in the evaluation forward: fitting on "
                "evaluation inputs needs the same samples in both (a backbone, not ROI heads)"
            )
        _add_matching_grad(m, args[0], target)

    names = {m: name for name, m in layers}
    model.train()
    with _hooked(targets, record):
        model(batch)
    model.eval()
    with evalnorm_mode(model, "en"), _hooked(targets, match):
        model(batch)


@contextlib.contextmanager
def _hooked(layers, hook):
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _training_normalization(m, x):
    """``(x - mu_b) / sqrt(var_b + eps)``: how the training forward normalized ``x`` in layer
    ``m`` before its affine transform (for a frozen layer, the target its ``frozen_en`` names)."""
    x = x.detach().to(torch.promote_types(x.dtype, torch.float32))
    mu_i, var_i = EF.sample_statistics(x)
    if m.frozen and m.frozen_en == "frozen_target":
        mu_b = m.running_mean.to(x.dtype).expand_as(mu_i)
        var_b = m.running_var.to(x.dtype).expand_as(var_i)
    else:
        mu_b, var_b = EF.normalization_batch_statistics(
            mu_i, var_i, m.training_group_size(x.shape[0])
        )
    return (x - mu_b[:, :, None, None]) * torch.rsqrt(var_b + m.eps)[:, :, None, None]


def _add_matching_grad(m, x, target):
    x = x.detach().to(target.dtype)
    with torch.enable_grad():
        mu_i, var_i = EF.sample_statistics(x)
        alpha_logit = m.alpha_logit.detach().to(x.dtype).requires_grad_()
        beta_logit = m.beta_logit.detach().to(x.dtype).requires_grad_()
        loss = EF.matching_loss(
            x,
            target,
            mu_i,
            var_i,
            m.running_mean.to(x.dtype),
            m.running_var.to(x.dtype),
            torch.sigmoid(alpha_logit),
            torch.sigmoid(beta_logit),
            m.eps,
        )
        grad = torch.stack(torch.autograd.grad(loss, (alpha_logit, beta_logit)))
    m.add_aux_grad(grad, loss, x[:, 0].numel())


def _mean_aux_loss(layers):
    """This iteration's auxiliary loss averaged over the layers that computed one, and over
    processes."""
    values = [m.last_aux_loss.float() for m in layers if m.last_aux_loss is not None]
    device = layers[0].alpha_logit.device
    total = torch.stack(
        [
            sum(values, torch.zeros((), device=device)),
            torch.tensor(float(len(values)), device=device),
        ]
    )
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()

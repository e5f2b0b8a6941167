"""``EvalNorm2d``: BatchNorm in training, corrected statistics at evaluation."""

import logging
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as EF

__all__ = ["EVAL_MODES", "FROZEN_EN_CHOICES", "EvalNorm2d", "coefficient_value"]

logger = logging.getLogger(__name__)

# How an EvalNorm2d in eval() forms its statistics:
#   "en"             eqs. 5-6 with the layer's own alpha, beta (estimated or set)
#   "ema"            the running (EMA) statistics alone: exactly BatchNorm2d.eval()
#   "rule_of_thumb"  alpha = beta = 1 / B^2, B = norm_batch_size
#   "simple"         alpha = beta = 1 / B
#   "batch"          the statistics of the evaluated batch itself, as in training (without
#                    updating the EMA): "batch statistics at inference" (Wu and Johnson, 2021)
EVAL_MODES = ("en", "ema", "rule_of_thumb", "simple", "batch")

# How a frozen EvalNorm2d (FrozenEN, regime (c)) trains; in all three the running statistics,
# ``weight`` and ``bias`` never change:
#   "batch_target"   normalizes with the running statistics; alpha/beta are estimated against
#                    the batch-normalized target (x - mu_B) / sqrt(var_B + eps)
#   "frozen_target"  normalizes with the running statistics; alpha/beta are estimated against
#                    that frozen normalization (x - mu_E) / sqrt(var_E + eps), what training
#                    produced, for which alpha = beta = 0 (EMA) is optimal
#   "batch_stats"    normalizes with batch statistics, as BatchNorm2d in training (groups of
#                    norm_batch_size with microbatch); alpha/beta estimated as in "batch_target"
FROZEN_EN_CHOICES = ("batch_target", "frozen_target", "batch_stats")

_missing_coefficients_logged = False


def coefficient_value(value, norm_batch_size, name="alpha"):
    """A coefficient in [0, 1] from a number or a rule name ("rule_of_thumb", "simple", "ema").

    ``name`` is used in error messages.
    """
    if isinstance(value, str):
        if value == "ema":
            return 0.0
        if value not in ("rule_of_thumb", "simple"):
            raise ValueError(
                f"{name}={value!r}: expected a number in [0, 1], 'rule_of_thumb', 'simple' or 'ema'"
            )
        if norm_batch_size is None:
            raise ValueError(
                f"{name}={value!r} needs the normalization batch size: norm_batch_size is None"
            )
        return 1.0 / norm_batch_size**2 if value == "rule_of_thumb" else 1.0 / norm_batch_size
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a single number, got a tensor of shape {tuple(value.shape)}"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


class EvalNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose evaluation mixes each sample's own statistics into the EMA ones.

    Training is ``BatchNorm2d``'s, unchanged (outputs and running statistics). Evaluation uses
    eqs. 5-6 of the paper with this layer's ``alpha`` (for the mean) and ``beta`` (for the
    variance), both in [0, 1]; see ``mode`` for the other choices.

    Args:
        num_features, eps, momentum, affine: as in ``BatchNorm2d``. With ``affine`` False the
            layer has no ``weight``/``bias`` (None) and outputs the normalized input, as
            detectron2's ``CycleBatchNormList`` needs of its per-level layers.
        norm_batch_size (int or None): B, the samples whose statistics training pools (images
            per GPU in a backbone, sampled ROIs per GPU in a box head). Needed for the rule of
            thumb and for ``microbatch``.
        microbatch (bool): in training, normalize each consecutive group of ``norm_batch_size``
            samples with its own statistics and update the EMA from each group in turn, as
            ``BatchNorm2d`` run on each group would (the paper's section 4.1 setup; also one
            device reproducing k devices x B samples).
        frozen (bool): regime (c): the running statistics are never updated and ``weight``/
            ``bias`` do not train (like detectron2's ``FrozenBatchNorm2d``); ``frozen_en`` says
            what training normalizes with. alpha/beta can still be estimated online.
        frozen_en (str): one of ``FROZEN_EN_CHOICES``; used only when ``frozen``. Default
            "frozen_target": alpha/beta are fitted to what training produced, so they stay
            near 0 and the layer evaluates as its frozen statistics do (EMA); the paper's
            "batch_target" made EvalNorm collapse in the detection regimes' miniature.
        init: initial alpha = beta: a number in [0, 1], "rule_of_thumb" (1/B^2), "simple"
            (1/B) or "ema" (0). Default: the rule of thumb when ``norm_batch_size`` is known,
            else 0 (evaluation then equals ``BatchNorm2d``'s until coefficients are set).
        inplace (bool): EvalNorm evaluation without autograd writes its output over the input
            and returns it, as ``nn.ReLU(inplace=True)`` does: no output as large as the input
            is allocated (on CPU, allocating it can cost more than the normalization). Only
            where nothing else reads the input afterwards, such as a convolution's output; not
            while the layer has forward hooks, which see the input.

    Attributes:
        mode (str): one of ``EVAL_MODES``; how evaluation forms its statistics.
        estimate_online (bool): when True, every training forward computes the auxiliary loss
            (eqs. 7-9) and accumulates its gradient for alpha/beta; see ``OnlineEstimator``.
        aux_max_positions (int or None): the auxiliary loss averages about this many (sample,
            position) pairs per channel, taken at a fixed stride; None (default): all of them.
        alpha_logit, beta_logit: parameters, ``logit`` of alpha and beta, saved in the state
            dict. ``requires_grad`` is False: no model optimizer or DDP ever sees them; only
            ``OnlineEstimator`` updates them.
    """

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        *,
        norm_batch_size=None,
        microbatch=False,
        frozen=False,
        frozen_en="frozen_target",
        init=None,
        affine=True,
        inplace=False,
        device=None,
        dtype=None,
    ):
        super().__init__(
            num_features, eps=eps, momentum=momentum, affine=affine, device=device, dtype=dtype
        )
        if norm_batch_size is not None and (
            isinstance(norm_batch_size, bool)
            or not isinstance(norm_batch_size, int)
            or norm_batch_size < 1
        ):
            raise ValueError(
                f"norm_batch_size must be an integer >= 1 or None, got {norm_batch_size!r}"
            )
        if microbatch and norm_batch_size is None:
            raise ValueError(
                "microbatch=True needs norm_batch_size (the samples in each group), got None"
            )
        self.norm_batch_size = norm_batch_size
        self.microbatch = bool(microbatch)
        self.frozen = bool(frozen)
        self.frozen_en = frozen_en
        self.inplace = bool(inplace)
        if self.frozen and self.affine:
            self.weight.requires_grad_(False)
            self.bias.requires_grad_(False)
        self.alpha_logit = nn.Parameter(
            torch.zeros((), device=device, dtype=dtype), requires_grad=False
        )
        self.beta_logit = nn.Parameter(
            torch.zeros((), device=device, dtype=dtype), requires_grad=False
        )
        if init is None:
            init = "rule_of_thumb" if norm_batch_size is not None else "ema"
        self.set_coefficients(init)
        self.mode = "en"
        self.estimate_online = False
        self.aux_max_positions = None
        # d(aux loss)/d(alpha_logit, beta_logit) pooled over the estimating forwards since the
        # last take, the (sample, position) pairs they averaged, and the EMA they used.
        self._aux_grad = None
        self._aux_count = 0
        self._aux_ema = None
        self.last_aux_loss = None  # detached 0-d tensor from the latest estimating forward

    @property
    def frozen_en(self):
        """How a frozen layer trains: one of ``FROZEN_EN_CHOICES``."""
        return self._frozen_en

    @frozen_en.setter
    def frozen_en(self, value):
        if value not in FROZEN_EN_CHOICES:
            raise ValueError(f"frozen_en must be one of {FROZEN_EN_CHOICES}, got {value!r}")
        self._frozen_en = value

    @property
    def alpha(self):
        """Coefficient of the sample's own mean (eq. 5): 0-d tensor in [0, 1]."""
        return torch.sigmoid(self.alpha_logit.detach())

    @property
    def beta(self):
        """Coefficient of the sample's own variance (eq. 6): 0-d tensor in [0, 1]."""
        return torch.sigmoid(self.beta_logit.detach())

    @torch.no_grad()
    def set_coefficients(self, alpha, beta=None):
        """Fix alpha and beta (``beta`` defaults to ``alpha``).

        Each is a number in [0, 1], "rule_of_thumb" (1/B^2), "simple" (1/B) or "ema" (0).
        """
        a = coefficient_value(alpha, self.norm_batch_size, "alpha")
        b = coefficient_value(alpha if beta is None else beta, self.norm_batch_size, "beta")
        self.alpha_logit.fill_(torch.logit(torch.tensor(a, dtype=torch.float64)).item())
        self.beta_logit.fill_(torch.logit(torch.tensor(b, dtype=torch.float64)).item())

    def extra_repr(self):
        s = super().extra_repr() + f", norm_batch_size={self.norm_batch_size}"
        if self.microbatch:
            s += ", microbatch=True"
        if self.frozen:
            s += f", frozen=True, frozen_en={self.frozen_en!r}"
        if self.inplace:
            s += ", inplace=True"
        return s

    def forward(self, x):
        self._check_input_dim(x)
        if not self.training:
            return self._evaluate(x)
        n = x.shape[0]
        group_size = self.training_group_size(n)
        # An empty batch (an image with no ROIs) has nothing to estimate from; BatchNorm2d
        # itself leaves the statistics of an empty batch as they are.
        if self.estimate_online and n > 0:
            # Against the EMA that evaluation would use for these samples: before they update
            # it. The estimation reads x alone, so running it first changes nothing below.
            self._accumulate_aux_grad(x, *self._estimation_ema(), group_size)
        if self.frozen and self.frozen_en == "batch_stats":
            if group_size is not None:
                y = self._microbatch_forward(x, group_size, update=False)
            else:
                y = F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        elif self.frozen:
            y = F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        elif group_size is not None:
            y = self._microbatch_forward(x, group_size)
        else:
            y = super().forward(x)
        return y

    def training_group_size(self, n):
        """Samples per normalization group when a batch of ``n`` trains: None for the whole
        batch, ``norm_batch_size`` for microbatch layers (which ``n`` must be a multiple of)."""
        if not self.microbatch or n in (0, self.norm_batch_size):
            return None
        if n % self.norm_batch_size:
            raise ValueError(
                f"microbatch: a batch of {n} samples does not split into groups of "
                f"norm_batch_size={self.norm_batch_size}"
            )
        return self.norm_batch_size

    def _microbatch_forward(self, x, group_size, update=True):
        # Groups become channels: (k*B, C, H, W) -> (B, k*C, H, W), so one batch_norm call
        # normalizes every group with its own statistics. Momentum 1 makes it return each
        # group's mean and unbiased variance in the scratch buffers.
        n, c, h, w = x.shape
        k = n // group_size
        xg = x.view(k, group_size, c, h, w).transpose(0, 1).reshape(group_size, k * c, h, w)
        stats_dtype = self.running_mean.dtype
        means = torch.zeros(k * c, device=x.device, dtype=stats_dtype)
        variances = torch.ones(k * c, device=x.device, dtype=stats_dtype)
        weight = None if self.weight is None else self.weight.repeat(k)  # None: affine=False
        bias = None if self.bias is None else self.bias.repeat(k)
        y = F.batch_norm(xg, means, variances, weight, bias, True, 1.0, self.eps)
        y = y.view(group_size, k, c, h, w).transpose(0, 1).reshape(n, c, h, w)
        if not (update and self.track_running_stats):  # batch statistics, EMA untouched
            return y
        with torch.no_grad():
            for mean, var in zip(means.view(k, c), variances.view(k, c)):
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative moving average, as BatchNorm2d
                    factor = 1.0 / float(self.num_batches_tracked)
                else:
                    factor = self.momentum
                self.running_mean.lerp_(mean, factor)
                self.running_var.lerp_(var, factor)
        return y

    def _evaluate(self, x):
        # Traced, this check would be baked in; the exported path handles empty batches itself.
        if self.mode == "ema" or (not EF.is_exporting() and x.shape[0] == 0):
            return super().forward(x)
        if self.mode == "batch":
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        if self.mode == "en":
            alpha, beta = torch.sigmoid(self.alpha_logit), torch.sigmoid(self.beta_logit)
        elif self.mode in ("rule_of_thumb", "simple"):
            alpha = beta = coefficient_value(self.mode, self.norm_batch_size, f"mode {self.mode!r}")
        else:
            raise ValueError(f"EvalNorm2d.mode must be one of {EVAL_MODES}, got {self.mode!r}")
        dtype = torch.promote_types(x.dtype, torch.float32)  # statistics in float32 at least
        inplace = (
            self.inplace
            and not torch.is_grad_enabled()
            and not EF.is_exporting()
            and not (self._forward_hooks or self._forward_pre_hooks)
        )
        with torch.autocast(x.device.type, enabled=False):
            y = EF.evalnorm(
                x.to(dtype),
                self.running_mean.to(dtype),
                self.running_var.to(dtype),
                None if self.weight is None else self.weight.to(dtype),
                None if self.bias is None else self.bias.to(dtype),
                alpha if isinstance(alpha, float) else alpha.to(dtype),
                beta if isinstance(beta, float) else beta.to(dtype),
                self.eps,
                inplace=inplace,
            )
        if inplace and y is not x:  # a float16 or non-contiguous input: a copy was normalized
            return x.copy_(y)
        return y.to(x.dtype)

    def _estimation_ema(self):
        """(running_mean, running_var) the auxiliary loss compares against: the EMA at the
        first estimating forward since the last ``take_aux_grad``, kept for the later ones.

        A layer applied several times per training step (a head shared across FPN levels)
        updates its EMA at each call, but evaluation only ever sees an EMA as a step leaves it;
        the closest such state to this step's samples is the one the step started from. With
        one call per step this is the current EMA, as before."""
        if self._aux_grad is None or self._aux_ema is None:
            self._aux_ema = (self.running_mean.detach().clone(), self.running_var.detach().clone())
        return self._aux_ema

    def _accumulate_aux_grad(self, x, mu_e, var_e, group_size):
        """Eqs. 7-9 on this forward's samples; the gradient goes to alpha/beta only."""
        if torch.is_inference_mode_enabled():
            return
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            xd = x.detach().to(dtype)
            mu_i, var_i = EF.sample_statistics(xd)
            if self.frozen and self.frozen_en == "frozen_target":  # what training produced
                mu_b, var_b = mu_e.to(dtype).expand_as(mu_i), var_e.to(dtype).expand_as(var_i)
            else:
                mu_b, var_b = EF.normalization_batch_statistics(mu_i, var_i, group_size)
            alpha_logit = self.alpha_logit.detach().to(dtype).requires_grad_()
            beta_logit = self.beta_logit.detach().to(dtype).requires_grad_()
            loss = EF.auxiliary_loss(
                xd,
                mu_i,
                var_i,
                mu_b,
                var_b,
                mu_e.to(dtype),
                var_e.to(dtype),
                torch.sigmoid(alpha_logit),
                torch.sigmoid(beta_logit),
                self.eps,
                self.aux_max_positions,
            )
            grad = torch.stack(torch.autograd.grad(loss, (alpha_logit, beta_logit)))
        self.add_aux_grad(grad, loss, x[:, 0].numel())

    def add_aux_grad(self, grad, loss, count=1):
        """Pool ``grad``, d(loss)/d(alpha_logit, beta_logit) of shape (2,), into the gradient
        ``take_aux_grad`` returns; ``loss`` is the mean over the ``count`` (sample, position)
        pairs per channel of one forward (estimated from a subsample with ``max_positions``).

        Calls since the last take pool as one loss, the mean over all their pairs: the
        gradients and losses are averaged with weights ``count``. One call gives its own
        ``grad`` and ``loss``; a layer run once per FPN level gets the loss of every level's
        activations together, as the paper's loss over all the activations the layer
        normalizes. ``last_aux_loss`` holds the pooled loss."""
        grad, loss = grad.to(self.alpha_logit.dtype), loss.detach()
        if self._aux_grad is None:
            self._aux_grad, self.last_aux_loss, self._aux_count = grad, loss, count
            return
        self._aux_count += count
        share = count / self._aux_count
        self._aux_grad = self._aux_grad.lerp(grad, share)
        previous = self.last_aux_loss
        self.last_aux_loss = loss if previous is None else previous.lerp(loss.to(previous), share)

    def take_aux_grad(self):
        """The pooled auxiliary-loss gradient for (alpha_logit, beta_logit), shape (2,), or
        None if no estimating forward ran since the last call; pooling restarts."""
        grad, self._aux_grad = self._aux_grad, None
        self._aux_count, self._aux_ema = 0, None
        return grad

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # BatchNorm2d, SyncBatchNorm and FrozenBatchNorm2d state dicts have no alpha/beta
        # (FrozenBatchNorm2d has no num_batches_tracked either): keep this layer's values.
        filled = []
        for name in ("alpha_logit", "beta_logit", "num_batches_tracked"):
            if prefix + name not in state_dict and prefix + "running_mean" in state_dict:
                state_dict[prefix + name] = getattr(self, name).detach().clone()
                filled.append(name)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        global _missing_coefficients_logged
        if "alpha_logit" in filled and not _missing_coefficients_logged:
            _missing_coefficients_logged = True
            logger.info(
                "Loaded a BatchNorm state dict into EvalNorm2d layers (first: %r): it has no "
                "alpha/beta, so they keep their initial values (rule of thumb 1/B^2 where "
                "norm_batch_size is known, else 0, i.e. EMA). Logged once.",
                prefix.rstrip("."),
            )

"""EvalNorm's formulas (Singh and Shrivastava, ICCV 2019, eqs. 5-9) as pure functions.

Shapes: ``x`` is (N, C, H, W); per-sample statistics are (N, C); running (EMA) statistics are
(C,); ``alpha`` and ``beta`` are scalars (Python numbers or 0-d tensors) in [0, 1].
Every function computes in the dtype of its inputs; the layer passes float32 (or float64).
"""

import torch

__all__ = [
    "auxiliary_loss",
    "evalnorm",
    "evalnorm_statistics",
    "normalization_batch_statistics",
    "sample_statistics",
]


def sample_statistics(x):
    """Mean and biased variance of each sample over its spatial positions: (N, C) each."""
    n, c, h, w = x.shape
    # BatchNorm's own statistics kernel on a (1, N*C, H, W) view, where each (sample, channel)
    # is a channel: as stable as var_mean and several times faster on CPU.
    mean, var = torch.batch_norm_update_stats(x.reshape(1, n * c, h, w), None, None, 1.0)
    return mean.view(n, c), var.view(n, c)


def normalization_batch_statistics(mu_i, var_i, group_size=None):
    """Statistics each sample was normalized with in training, from per-sample statistics.

    Samples are pooled in consecutive groups of ``group_size`` (all of them when None), as
    ``BatchNorm2d`` pools a batch: mean and biased variance over (samples, H, W). Returns
    (N, C) tensors, each row the statistics of its sample's group. Uses the law of total
    variance, so no second pass over the activations is needed.
    """
    n, c = mu_i.shape
    group_size = n if group_size is None else group_size
    mu_g = mu_i.view(-1, group_size, c)
    mu_b = mu_g.mean(dim=1, keepdim=True)
    var_b = var_i.view(-1, group_size, c).mean(dim=1, keepdim=True) + (mu_g - mu_b).pow(2).mean(
        dim=1, keepdim=True
    )
    return mu_b.expand_as(mu_g).reshape(n, c), var_b.expand_as(mu_g).reshape(n, c)


def evalnorm_statistics(mu_i, var_i, mu_e, var_e, alpha, beta):
    """Eqs. 5-6: each sample's own statistics mixed into the EMA statistics.

    mu_hat  = alpha * mu_i + (1 - alpha) * mu_e
    var_hat = beta * var_i + (1 - beta) * var_e + beta * (1 - beta) * (mu_i - mu_e)^2
    """
    mu_hat = alpha * mu_i + (1 - alpha) * mu_e
    var_hat = beta * var_i + (1 - beta) * var_e + beta * (1 - beta) * (mu_i - mu_e).pow(2)
    return mu_hat, var_hat


def evalnorm(x, running_mean, running_var, weight, bias, alpha, beta, eps):
    """EvalNorm's evaluation output: ``weight * (x - mu_hat) / sqrt(var_hat + eps) + bias``.

    ``x`` must already be in the computation dtype. The mean is subtracted before scaling:
    folding it into a shift would cancel catastrophically where var_hat + eps is tiny.
    """
    mu_i, var_i = sample_statistics(x)
    mu_hat, var_hat = evalnorm_statistics(mu_i, var_i, running_mean, running_var, alpha, beta)
    scale = torch.rsqrt(var_hat + eps) * weight
    return torch.addcmul(bias[:, None, None], x - mu_hat[:, :, None, None], scale[:, :, None, None])


def auxiliary_loss(x, mu_i, var_i, mu_b, var_b, mu_e, var_e, alpha, beta, eps):
    """Eqs. 7-9: mean absolute difference between training and EvalNorm normalization.

    target = (x - mu_b) / sqrt(var_b + eps)         (what training normalization produced)
    pred   = (x - mu_hat) / sqrt(var_hat + eps)     (eqs. 5-6 with alpha, beta)
    loss   = mean |target - pred|

    Gradients reach only what requires them among ``alpha`` and ``beta``: callers pass the
    activations and statistics detached (the paper's stop-gradients). The mean (not the
    paper's sum) keeps the loss's scale independent of the tensor's size. Both normalizations
    are affine in ``x`` per (sample, channel), so the difference is formed in one fused step.
    """
    mu_hat, var_hat = evalnorm_statistics(mu_i, var_i, mu_e, var_e, alpha, beta)
    r_b = torch.rsqrt(var_b + eps)
    r_hat = torch.rsqrt(var_hat + eps)
    slope = (r_b - r_hat)[:, :, None, None]
    offset = (mu_hat * r_hat - mu_b * r_b)[:, :, None, None]
    return torch.addcmul(offset, x, slope).abs().mean()

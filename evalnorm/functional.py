"""EvalNorm's formulas (Singh and Shrivastava, ICCV 2019, eqs. 5-9) as pure functions.

Shapes: ``x`` is (N, C, H, W); per-sample statistics are (N, C); running (EMA) statistics are
(C,); ``alpha`` and ``beta`` are scalars (Python numbers or 0-d tensors) in [0, 1].
Every function computes in the dtype of its inputs; the layer passes float32 (or float64).
"""

import torch
import torch.nn.functional as F

__all__ = [
    "auxiliary_loss",
    "evalnorm",
    "evalnorm_statistics",
    "is_exporting",
    "matching_loss",
    "normalization_batch_statistics",
    "sample_statistics",
]


def is_exporting():
    """True while ``torch.jit.trace``, ``torch.onnx.export`` or ``torch.export`` records a graph.

    The fast inference kernels below run on (1, N*C, H, W) views of ``x``; recorded graphs get
    elementwise ops instead, which every exporter knows and whose shapes follow the input.
    """
    torch_export = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.5
    return (
        torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or (torch_export is not None and torch_export())
    )


def sample_statistics(x):
    """Mean and biased variance of each sample over its spatial positions: (N, C) each."""
    n, c, h, w = x.shape
    if is_exporting():
        # batch_norm_update_stats has no ONNX symbolic, nor torch.export support: two passes.
        mean = x.mean(dim=(2, 3))
        var = (x - mean[:, :, None, None]).pow(2).mean(dim=(2, 3))
        return mean, var
    if x.device.type != "cpu":
        # BatchNorm's own one-pass statistics kernel on a (1, N*C, H, W) view, where each
        # (sample, channel) is a channel.
        mean, var = torch.batch_norm_update_stats(x.reshape(1, n * c, h, w), None, None, 1.0)
        return mean.view(n, c), var.view(n, c)
    # On CPU that kernel runs at a fraction of memory speed; two passes (the mean, then the
    # centered squares) are exact as well and several times faster, over blocks of rows small
    # enough that the second pass reads them from cache.
    rows = x.reshape(n * c, h * w)
    mean, var = rows.new_empty(n * c), rows.new_empty(n * c)
    for block in _row_blocks(rows):
        mean[block] = rows[block].mean(dim=1)
        var[block] = (rows[block] - mean[block, None]).pow_(2).mean(dim=1)
    return mean.view(n, c), var.view(n, c)


# Elements per block of rows on CPU (4 MiB of float32), see _row_blocks.
_CPU_BLOCK_ELEMENTS = 1 << 20


def _row_blocks(rows):
    """Slices covering the rows of ``rows`` (R, P): on CPU, blocks of about
    ``_CPU_BLOCK_ELEMENTS`` elements, so that the passes made over a block read it from cache;
    elsewhere one slice, as many small kernels would cost more than they save."""
    r, p = rows.shape
    step = max(1, r if rows.device.type != "cpu" else _CPU_BLOCK_ELEMENTS // max(1, p))
    return [slice(i, i + step) for i in range(0, r, step)]


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


def evalnorm(x, running_mean, running_var, weight, bias, alpha, beta, eps, inplace=False):
    """EvalNorm's evaluation output: ``weight * (x - mu_hat) / sqrt(var_hat + eps) + bias``
    (``weight``, ``bias``: (C,) tensors, or None for none).

    ``x`` must already be in the computation dtype. Without autograd (inference) the output
    comes from BatchNorm's own evaluation kernel on a (1, N*C, H, W) view, each (sample,
    channel) a channel with its mu_hat, var_hat: one pass over ``x``, as BatchNorm evaluation
    does; with ``inplace`` (and ``x`` contiguous) it is written over ``x``, which is returned.
    With autograd, which does not differentiate that kernel's statistics, it is computed
    elementwise so gradients reach alpha and beta; so too while tracing or exporting to ONNX
    (see ``is_exporting``), where one graph must serve every input shape; these two paths
    never write over ``x``.
    """
    mu_i, var_i = sample_statistics(x)
    mu_hat, var_hat = evalnorm_statistics(mu_i, var_i, running_mean, running_var, alpha, beta)
    if torch.is_grad_enabled() or is_exporting():
        scale = torch.rsqrt(var_hat + eps)[:, :, None, None]
        if weight is not None:
            scale = scale * weight[:, None, None]
        if bias is None:
            return (x - mu_hat[:, :, None, None]) * scale
        return torch.addcmul(bias[:, None, None], x - mu_hat[:, :, None, None], scale)
    n, c, h, w = x.shape
    rows = x.reshape(1, n * c, h, w)  # a view of x when x is contiguous
    weight = None if weight is None else weight.repeat(n)
    bias = None if bias is None else bias.repeat(n)
    mean, var = mu_hat.reshape(-1), var_hat.reshape(-1)
    if inplace and x.is_contiguous():
        # The kernel's out= form, out being its input: elementwise, each element read first.
        unused = x.new_empty(0)
        torch.ops.aten.native_batch_norm.out(
            rows,
            weight,
            bias,
            mean,
            var,
            False,
            0.0,
            eps,
            out=rows,
            save_mean=unused,
            save_invstd=unused,
        )
        return x
    return F.batch_norm(rows, mean, var, weight, bias, False, 0.0, eps).view(n, c, h, w)


def auxiliary_loss(x, mu_i, var_i, mu_b, var_b, mu_e, var_e, alpha, beta, eps, max_positions=None):
    """Eqs. 7-9: mean absolute difference between training and EvalNorm normalization.

    target = (x - mu_b) / sqrt(var_b + eps)         (what training normalization produced)
    pred   = (x - mu_hat) / sqrt(var_hat + eps)     (eqs. 5-6 with alpha, beta)
    loss   = mean |target - pred|

    Both normalizations are affine in ``x`` per (sample, channel), so the difference is
    ``slope * x + offset`` with (N, C) coefficients. Its gradient needs no backward pass over
    the activations: the derivative of ``|slope * x + offset|`` is ``sign * x`` in the slope
    and ``sign`` in the offset, so two sums over positions give the gradient of everything the
    coefficients depend on (alpha, beta, and the statistics if they required it), and the
    loss's value (``sum |d| = sum sign(d) * d``; it carries their float32 rounding, as the
    gradient does). ``x`` itself gets no gradient: callers pass it detached (the paper's
    stop-gradient). The mean (not the paper's sum) keeps the loss's scale independent of the
    tensor's size.

    Args:
        max_positions (int or None): use about this many (sample, position) pairs per channel,
            positions taken with a fixed stride (no random numbers drawn); all when None.
    """
    mu_hat, var_hat = evalnorm_statistics(mu_i, var_i, mu_e, var_e, alpha, beta)
    r_b = torch.rsqrt(var_b + eps)
    r_hat = torch.rsqrt(var_hat + eps)
    slope = r_b - r_hat
    offset = mu_hat * r_hat - mu_b * r_b
    x = x.flatten(2)
    n, _, positions = x.shape
    if max_positions is not None and n * positions > max_positions:
        x = x[:, :, :: -(-n * positions // max_positions)]
    _, sum_sign, sum_sign_x = _sign_sums(x, slope.detach(), offset.detach())
    # With the sums held fixed, this is the loss's value and has its gradient.
    return (slope * sum_sign_x + offset * sum_sign).sum() / x.numel()


def matching_loss(x, target, mu_i, var_i, mu_e, var_e, alpha, beta, eps):
    """Mean ``|target - (x - mu_hat) / sqrt(var_hat + eps)|``: EvalNorm's normalization (eqs.
    5-6) of ``x`` against a ``target`` of the same shape, computed elsewhere.

    ``auxiliary_loss`` is this loss with ``target = (x - mu_b) / sqrt(var_b + eps)``, the same
    ``x`` normalized as in training. Here ``x`` may be another tensor than the one training
    normalized: the layer's input at evaluation, where upstream layers evaluate with EvalNorm,
    against the training forward's normalization of the same samples. As in ``auxiliary_loss``
    the gradient reaches the coefficients (and statistics) through two sums over positions,
    with no backward pass over the activations; ``x`` and ``target`` get none.
    """
    mu_hat, var_hat = evalnorm_statistics(mu_i, var_i, mu_e, var_e, alpha, beta)
    r_hat = torch.rsqrt(var_hat + eps)
    offset = mu_hat * r_hat
    x, target = x.flatten(2), target.flatten(2)
    total, sum_sign, sum_sign_x = _sign_sums(x, -r_hat.detach(), offset.detach(), target)
    # d|target - r_hat * x + offset| = sign * (offset - x * r_hat)' per position.
    surrogate = (offset * sum_sign - r_hat * sum_sign_x).sum()
    return (total + (surrogate - surrogate.detach())) / x.numel()


@torch.no_grad()
def _sign_sums(x, slope, offset, target=None):
    """For ``d = slope * x + offset (+ target)`` (``x``, ``target``: (N, C, P); ``slope``,
    ``offset``: (N, C)): with ``target`` the sum of ``|d|`` (else None), and per (sample,
    channel) the sums over positions of ``sign(d)`` and ``sign(d) * x``, (N, C) each. On CPU
    block by block (``_row_blocks``), in one scratch tensor that every block reuses (on CPU,
    cheaper than a new tensor per block, and a multiply then an add cheaper than ``addcmul``)."""
    n, c, p = x.shape
    rows, slope, offset = x.reshape(n * c, p), slope.reshape(-1, 1), offset.reshape(-1, 1)
    target = None if target is None else target.reshape(n * c, p)
    sum_sign, sum_sign_x = rows.new_empty(n * c), rows.new_empty(n * c)
    total = None if target is None else rows.new_zeros(())
    blocks = _row_blocks(rows)
    scratch = torch.empty_like(rows[blocks[0]]) if blocks else None
    for b in blocks:
        d = torch.mul(rows[b], slope[b], out=scratch[: len(rows[b])]).add_(offset[b])
        if target is not None:
            total += d.add_(target[b]).abs().sum()
        sign = d.sign_()
        sum_sign[b] = sign.sum(1)
        sum_sign_x[b] = sign.mul_(rows[b]).sum(1)
    return total, sum_sign.view(n, c), sum_sign_x.view(n, c)

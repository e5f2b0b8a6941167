"""Swap the BatchNorm layers of any torch model for ``EvalNorm2d``, and back."""

import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from .layers import EvalNorm2d

__all__ = ["BATCHNORM_TYPES", "convert_to_batchnorm", "convert_to_evalnorm", "fold_to_batchnorm"]

BATCHNORM_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)


def convert_to_evalnorm(
    model, norm_batch_size, init="rule_of_thumb", frozen=None, microbatch=False
):
    """Replace every ``BatchNorm2d``, ``SyncBatchNorm`` and ``FrozenBatchNorm2d`` by ``EvalNorm2d``.

    Weights, biases, running statistics, eps, momentum, ``requires_grad`` and train/eval mode
    are kept, so the converted model trains, and in ``"ema"`` mode evaluates, exactly as before.

    Args:
        model (nn.Module): converted in place.
        norm_batch_size (int or None): B the model trains (or was trained) with.
        init: alpha = beta to start from: "rule_of_thumb" (1/B^2), "simple" (1/B), "ema" (0)
            or a number in [0, 1].
        frozen (bool or None): None keeps each layer's nature (``FrozenBatchNorm2d`` becomes a
            frozen EvalNorm2d, the others trainable); True or False forces it for all.
        microbatch (bool): see ``EvalNorm2d``.

    Returns:
        The model; a new module when ``model`` itself is a BatchNorm layer.
    """

    def to_evalnorm(bn, name):
        if isinstance(bn, nn.modules.batchnorm._NormBase) and not (
            bn.affine and bn.track_running_stats
        ):
            raise ValueError(
                f"{name or 'model'}: {type(bn).__name__} with affine={bn.affine}, "
                f"track_running_stats={bn.track_running_stats} cannot become EvalNorm2d, which "
                "needs running statistics and an affine transform"
            )
        is_frozen = isinstance(bn, FrozenBatchNorm2d) if frozen is None else bool(frozen)
        stats = bn.running_mean
        en = EvalNorm2d(
            bn.num_features,
            eps=bn.eps,
            momentum=getattr(bn, "momentum", 0.1),  # FrozenBatchNorm2d has none
            norm_batch_size=norm_batch_size,
            microbatch=microbatch,
            frozen=is_frozen,
            init=init,
            device=stats.device,
            dtype=stats.dtype,
        )
        _copy_batchnorm_state(bn, en)
        if not is_frozen and isinstance(bn.weight, nn.Parameter):
            en.weight.requires_grad_(bn.weight.requires_grad)
            en.bias.requires_grad_(bn.bias.requires_grad)
        return en.train(bn.training)

    return _replace_modules(
        model,
        lambda m: isinstance(m, BATCHNORM_TYPES) and not isinstance(m, EvalNorm2d),
        to_evalnorm,
    )


def convert_to_batchnorm(model):
    """Replace every ``EvalNorm2d`` by ``nn.BatchNorm2d`` (frozen ones by ``FrozenBatchNorm2d``).

    For export and deployment: weights and statistics are kept, alpha and beta are dropped, so
    the result evaluates as the ``"ema"`` mode did, whatever mode the layers were in (see
    ``fold_to_batchnorm``, which checks). Converted in place; returns the model.
    """

    def to_batchnorm(en, name):
        stats = en.running_mean
        if en.frozen:
            bn = FrozenBatchNorm2d(en.num_features, eps=en.eps).to(
                device=stats.device, dtype=stats.dtype
            )
        else:
            bn = nn.BatchNorm2d(
                en.num_features, en.eps, en.momentum, device=stats.device, dtype=stats.dtype
            )
            bn.weight.requires_grad_(en.weight.requires_grad)
            bn.bias.requires_grad_(en.bias.requires_grad)
        _copy_batchnorm_state(en, bn)
        return bn.train(en.training)

    return _replace_modules(model, lambda m: isinstance(m, EvalNorm2d), to_batchnorm)


def fold_to_batchnorm(model):
    """``convert_to_batchnorm`` for deployment, once every ``EvalNorm2d`` evaluates as EMA.

    The result is plain ``BatchNorm2d``/``FrozenBatchNorm2d`` (no evalnorm_det needed to run
    it), evaluating exactly as the model did. That holds only where a layer's evaluation uses
    the running statistics alone: mode "ema", or mode "en" with alpha = beta = 0. Any other
    mode mixes in each sample's own statistics, which no fixed scale and shift can reproduce:
    such a model raises ``ValueError``; export it as it is (``torch.jit.trace``, ONNX) instead,
    or choose EMA explicitly (``evalnorm_mode(model, "ema")`` around the call).
    Converted in place; returns the model.
    """
    for name, m in model.named_modules():
        if isinstance(m, EvalNorm2d) and not _evaluates_as_ema(m):
            raise ValueError(
                f"fold_to_batchnorm: EvalNorm2d {name or 'model'!r} evaluates in mode "
                f"{m.mode!r} (alpha={m.alpha.item():.4g}, beta={m.beta.item():.4g}), which uses "
                "each sample's own statistics: BatchNorm cannot reproduce it. Export the model "
                "with EvalNorm2d as it is (torch.jit.trace or torch.onnx.export), or fold its "
                'EMA evaluation on purpose: with evalnorm_mode(model, "ema"): '
                "fold_to_batchnorm(model)"
            )
    return convert_to_batchnorm(model)


def _evaluates_as_ema(layer):
    if layer.mode == "ema":
        return True
    return layer.mode == "en" and layer.alpha.item() == 0.0 and layer.beta.item() == 0.0


@torch.no_grad()
def _copy_batchnorm_state(src, dst):
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(dst, name).copy_(getattr(src, name))
    src_count, dst_count = (
        getattr(src, "num_batches_tracked", None),
        getattr(dst, "num_batches_tracked", None),
    )
    if src_count is not None and dst_count is not None:
        dst_count.copy_(src_count)


def _replace_modules(module, match, make, name=""):
    """Replace, depth first, each submodule for which ``match(m)`` holds by ``make(m, name)``."""
    if match(module):
        return make(module, name)
    for child_name, child in module.named_children():
        new = _replace_modules(child, match, make, f"{name}.{child_name}" if name else child_name)
        if new is not child:
            setattr(module, child_name, new)
    return module

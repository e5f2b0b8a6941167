"""Swap the BatchNorm layers of any torch model for ``EvalNorm2d``, and back."""

import sys
import warnings

import torch
from torch import nn

from .layer import EvalNorm2d

__all__ = ["batchnorm_types", "convert_to_batchnorm", "convert_to_evalnorm", "replace_modules"]

# Frozen BatchNorm layers of the libraries that define one: (module, class name).
_FROZEN_BATCHNORM = (
    ("detectron2.layers.batch_norm", "FrozenBatchNorm2d"),
    ("torchvision.ops.misc", "FrozenBatchNorm2d"),
)


def _frozen_batchnorm_types():
    """The frozen BatchNorm classes of the libraries already imported: a model holding one of
    these layers has imported its library, so nothing needs importing here."""
    return tuple(
        getattr(sys.modules[module], name)
        for module, name in _FROZEN_BATCHNORM
        if module in sys.modules
    )


def batchnorm_types():
    """Every layer type ``convert_to_evalnorm`` replaces: ``BatchNorm2d``, ``SyncBatchNorm``
    and the ``FrozenBatchNorm2d`` of detectron2 and torchvision (where imported)."""
    return (nn.BatchNorm2d, nn.SyncBatchNorm, *_frozen_batchnorm_types())


def _new_frozen_batchnorm(num_features, eps):
    """detectron2's ``FrozenBatchNorm2d`` where detectron2 is imported, torchvision's otherwise."""
    for module, name in _FROZEN_BATCHNORM:
        if module in sys.modules:
            return getattr(sys.modules[module], name)(num_features, eps=eps)
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d
    except ImportError as e:
        raise ImportError(
            "convert_to_batchnorm: a frozen EvalNorm2d becomes a FrozenBatchNorm2d, which needs "
            f"detectron2 or torchvision; neither can be imported ({e})"
        ) from e
    return FrozenBatchNorm2d(num_features, eps=eps)


def convert_to_evalnorm(
    model, norm_batch_size, init="rule_of_thumb", frozen=None, microbatch=False
):
    """Replace every ``BatchNorm2d``, ``SyncBatchNorm`` and ``FrozenBatchNorm2d`` (detectron2's
    or torchvision's) by ``EvalNorm2d``.

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
        is_frozen = isinstance(bn, frozen_types) if frozen is None else bool(frozen)
        stats = bn.running_mean
        en = EvalNorm2d(
            bn.weight.shape[0],  # torchvision's FrozenBatchNorm2d has no num_features
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

    frozen_types, types = _frozen_batchnorm_types(), batchnorm_types()
    return replace_modules(
        model,
        lambda m: isinstance(m, types) and not isinstance(m, EvalNorm2d),
        to_evalnorm,
    )


def convert_to_batchnorm(model, strict=False):
    """Replace every ``EvalNorm2d`` by ``nn.BatchNorm2d`` (frozen ones by ``FrozenBatchNorm2d``).

    For export and deployment: weights and statistics are kept, alpha and beta are dropped, so
    the result evaluates as the ``"ema"`` mode did, whatever mode the layers were in. It runs
    without evalnorm.

    Args:
        model (nn.Module): converted in place.
        strict (bool): refuse (``ValueError``, naming the layer) unless every ``EvalNorm2d``
            already evaluates as EMA (mode "ema", or "en" with alpha = beta = 0), so that the
            result evaluates exactly as the model did. Other modes mix in each sample's own
            statistics, which no fixed scale and shift reproduces: export such a model as it
            is (``torch.jit.trace``, ONNX), or choose EMA on purpose with
            ``evalnorm_mode(model, "ema")`` around the call.

    Returns:
        The model; a new module when ``model`` itself is an ``EvalNorm2d``.
    """
    if strict:
        for name, m in model.named_modules():
            if isinstance(m, EvalNorm2d) and not _evaluates_as_ema(m):
                raise ValueError(
                    f"convert_to_batchnorm(strict=True): EvalNorm2d {name or 'model'!r} "
                    f"evaluates in mode {m.mode!r} (alpha={m.alpha.item():.4g}, "
                    f"beta={m.beta.item():.4g}), which uses each sample's own statistics: "
                    "BatchNorm cannot reproduce it. Export the model with EvalNorm2d as it is "
                    "(torch.jit.trace or torch.onnx.export), or convert its EMA evaluation on "
                    'purpose: with evalnorm_mode(model, "ema"): convert_to_batchnorm(model)'
                )

    def to_batchnorm(en, name):
        stats = en.running_mean
        if en.frozen and en.affine:
            bn = _new_frozen_batchnorm(en.num_features, en.eps).to(
                device=stats.device, dtype=stats.dtype
            )
        else:  # without affine (a per-level layer), a frozen one becomes a BatchNorm2d too
            bn = nn.BatchNorm2d(
                en.num_features,
                en.eps,
                en.momentum,
                affine=en.affine,
                device=stats.device,
                dtype=stats.dtype,
            )
            if en.affine:
                bn.weight.requires_grad_(en.weight.requires_grad)
                bn.bias.requires_grad_(en.bias.requires_grad)
        _copy_batchnorm_state(en, bn)
        return bn.train(en.training)

    return replace_modules(model, lambda m: isinstance(m, EvalNorm2d), to_batchnorm)


def fold_to_batchnorm(model):
    """Deprecated name of ``convert_to_batchnorm(model, strict=True)`` ("fold" means merging a
    BatchNorm into its convolution)."""
    warnings.warn(
        "fold_to_batchnorm(model) is deprecated: use convert_to_batchnorm(model, strict=True)",
        FutureWarning,
        stacklevel=2,
    )
    return convert_to_batchnorm(model, strict=True)


def _evaluates_as_ema(layer):
    if layer.mode == "ema":
        return True
    return layer.mode == "en" and layer.alpha.item() == 0.0 and layer.beta.item() == 0.0


@torch.no_grad()
def _copy_batchnorm_state(src, dst):
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(src, name) is not None:  # affine=False layers have no weight, bias
            getattr(dst, name).copy_(getattr(src, name))
    src_count, dst_count = (
        getattr(src, "num_batches_tracked", None),
        getattr(dst, "num_batches_tracked", None),
    )
    if src_count is not None and dst_count is not None:
        dst_count.copy_(src_count)


def replace_modules(module, match, make, name=""):
    """Replace, depth first, each submodule for which ``match(m)`` holds by ``make(m, name)``."""
    if match(module):
        return make(module, name)
    for child_name, child in module.named_children():
        new = replace_modules(child, match, make, f"{name}.{child_name}" if name else child_name)
        if new is not child:
            setattr(module, child_name, new)
    return module

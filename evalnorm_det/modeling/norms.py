"""Norm layers from the config, and operations on a model's norms: freeze and reset (the
regimes), conversion of a BN model to EvalNorm (the rescue of BN checkpoints)."""

import torch
from detectron2.layers import CycleBatchNormList, FrozenBatchNorm2d
from torch import nn

from evalnorm import EvalNorm2d, convert_to_evalnorm
from evalnorm.convert import replace_modules

from ..layers import EVALNORM_NAMES, get_norm

__all__ = [
    "convert_norms",
    "evalnorm_norm",
    "freeze_norms",
    "in_mask_head",
    "in_roi_heads",
    "norm_factory",
    "reset_norms",
]


def norm_factory(cfg, norm, norm_batch_size, microbatch=False):
    """:func:`evalnorm_norm` set up from ``MODEL.EVALNORM`` (initial alpha/beta, evaluation
    mode, how frozen layers train) for normalization batch size ``norm_batch_size``."""
    return evalnorm_norm(norm, norm_batch_size, microbatch=microbatch, **layer_settings(cfg))


def layer_settings(cfg):
    """``MODEL.EVALNORM``'s settings of every new EvalNorm layer, as the keyword arguments of
    :func:`evalnorm_norm` (``init``, ``init_alpha``, ``init_beta``, ``eval_mode``,
    ``frozen_en``)."""
    en = cfg.MODEL.EVALNORM
    return {
        "init": en.INIT,
        "init_alpha": en.INIT_ALPHA,
        "init_beta": en.INIT_BETA,
        "eval_mode": en.EVAL_MODE,
        "frozen_en": en.FROZEN_EN,
    }


def evalnorm_norm(
    norm,
    norm_batch_size,
    *,
    samples_per_image=1,
    init="rule_of_thumb",
    init_alpha=0.1,
    init_beta=0.1,
    eval_mode="en",
    frozen_en="frozen_target",
    microbatch=False,
):
    """What detectron2's blocks take as ``norm``: ``norm`` itself for detectron2's names ("BN",
    "FrozenBN", "GN", "" ...), else a callable ``channels -> EvalNorm2d`` ("EN", "FrozenEN").

    Args:
        norm_batch_size (int): images per GPU in training.
        samples_per_image (int): samples each image adds to the layer's normalization batch:
            1 in the backbone, sampled ROIs per image in the ROI heads, the sampler's cap of
            foreground ROIs per image in a mask head (``evalnorm_det.config.fg_rois_per_image``).
            The layer's B is ``norm_batch_size * samples_per_image``.
        init, init_alpha, init_beta: how alpha/beta start ("rule_of_thumb" 1/B^2, "simple"
            1/B, or "value": ``init_alpha``, ``init_beta``).
        eval_mode (str): the layer's evaluation mode ("en", "ema", ...).
        frozen_en (str): how "FrozenEN" layers train (see ``MODEL.EVALNORM.FROZEN_EN``).
        microbatch (bool): normalize each group of B samples on its own in training.
    """
    if norm not in EVALNORM_NAMES:
        return norm
    norm_batch_size = norm_batch_size * samples_per_image
    coefficients = _coefficients(init, init_alpha, init_beta)

    def make(channels):
        layer = get_norm(norm, channels, norm_batch_size=norm_batch_size, microbatch=microbatch)
        return _configure(layer, coefficients, eval_mode, frozen_en)

    return make


def _configure(layer, coefficients, eval_mode, frozen_en):
    """Initial alpha/beta, evaluation mode and, if frozen, how it trains, of a new layer. It
    evaluates in place (``EvalNorm2d.inplace``): detectron2 normalizes only the outputs of
    convolutions, which nothing else reads."""
    layer.set_coefficients(*coefficients)
    layer.mode = eval_mode
    layer.inplace = True
    if layer.frozen:
        layer.frozen_en = frozen_en
    return layer


def _configure_from(cfg, layer):
    """:func:`_configure` with ``MODEL.EVALNORM``'s settings."""
    en = cfg.MODEL.EVALNORM
    coefficients = _coefficients(en.INIT, en.INIT_ALPHA, en.INIT_BETA)
    return _configure(layer, coefficients, en.EVAL_MODE, en.FROZEN_EN)


def _coefficients(init, init_alpha, init_beta):
    """``EvalNorm2d.set_coefficients``'s arguments for an ``INIT`` choice."""
    return (init_alpha, init_beta) if init == "value" else (init,)


def in_roi_heads(name):
    """Whether the module called ``name`` in a GeneralizedRCNN belongs to its ROI heads, whose
    norms pool the sampled ROIs rather than the images."""
    return "roi_heads" in name.split(".")


def in_mask_head(name):
    """Whether the module called ``name`` in a GeneralizedRCNN belongs to a mask head of its ROI
    heads, whose norms pool the foreground ROIs."""
    parts = name.split(".")
    return "roi_heads" in parts and "mask_head" in parts[parts.index("roi_heads") :]


def convert_norms(cfg, model, batch_sizes):
    """Make every BatchNorm-type layer of a built detectron2 model that is not EvalNorm yet an
    ``EvalNorm2d`` (``FrozenBatchNorm2d``: a frozen one), keeping weights and statistics: a BN
    model becomes one that evaluates in every EvalNorm mode, and in "ema" exactly as before.

    B is that of the layer's place in training, from ``batch_sizes`` (``NormBatchSizes``):
    foreground ROIs per GPU in the mask heads, sampled ROIs per GPU in the rest of the ROI
    heads, images per GPU elsewhere. A ``CycleBatchNormList`` (per-level BN of a RetinaNet
    head) becomes a ``CycleEvalNormList``. alpha/beta start from ``MODEL.EVALNORM.INIT``, the
    evaluation mode is ``MODEL.EVALNORM.EVAL_MODE``. In place; returns the number converted.
    """
    from .retinanet import CycleEvalNormList  # it builds on this module

    existing = {id(m) for m in model.modules() if isinstance(m, EvalNorm2d)}
    # Per-level BatchNorm (a RetinaNet head's CycleBatchNormList) becomes per-level EvalNorm.
    replace_modules(
        model,
        lambda m: isinstance(m, CycleBatchNormList) and not isinstance(m[0], EvalNorm2d),
        lambda m, name: CycleEvalNormList.from_batchnorm(m, batch_sizes.images),
    )
    # Innermost places first: each conversion leaves the layers it made to the outer ones.
    places = [(in_mask_head, batch_sizes.fg_rois), (in_roi_heads, batch_sizes.rois)]
    for belongs, b in places:
        for name, m in list(model.named_modules()):
            parent, _, child = name.rpartition(".")
            if child and belongs(name) and not belongs(parent):
                owner = model.get_submodule(parent)
                setattr(owner, child, convert_to_evalnorm(m, b, init="ema"))
    convert_to_evalnorm(model, batch_sizes.images, init="ema")
    converted = [m for m in model.modules() if isinstance(m, EvalNorm2d) and id(m) not in existing]
    for m in converted:
        _configure_from(cfg, m)
    return len(converted)


def freeze_norms(module):
    """detectron2's ``CNNBlockBase.freeze`` that keeps EvalNorm: every parameter stops
    training, EvalNorm2d layers become frozen EvalNorm2d (FrozenEN, alpha/beta kept; normalized with
    their running statistics: "batch_stats" becomes "batch_target") and the
    other BatchNorm layers ``FrozenBatchNorm2d``. In place; returns ``module``."""
    for p in module.parameters():
        p.requires_grad_(False)
    for m in module.modules():
        if isinstance(m, EvalNorm2d):
            m.frozen = True
            if m.frozen_en == "batch_stats":  # a frozen stage normalizes as FrozenBN
                m.frozen_en = "batch_target"
    return replace_modules(
        module,
        lambda m: (
            isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) and not isinstance(m, EvalNorm2d)
        ),
        lambda m, name: FrozenBatchNorm2d.convert_frozen_batchnorm(m),
    )


@torch.no_grad()
def reset_norms(model):
    """Regime (b): every BatchNorm-type layer gets fresh affine (weight 1, bias 0) and
    statistics (mean 0, var 1); EvalNorm's alpha/beta are kept. The shared affine of per-level
    norms (``CycleBatchNormList``) is reset too. Returns the number of layers reset."""
    count = 0
    for m in model.modules():
        if isinstance(m, CycleBatchNormList) and m._affine:
            m.weight.fill_(1.0)
            m.bias.zero_()
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_parameters()
        elif isinstance(m, FrozenBatchNorm2d):
            m.weight.fill_(1.0)
            m.bias.zero_()
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
        else:
            continue
        count += 1
    return count

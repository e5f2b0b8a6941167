"""Norm layers from the config, and operations on a model's norms: freeze and reset (the
regimes), conversion of a BN model to EvalNorm (the rescue of BN checkpoints)."""

import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from evalnorm import EvalNorm2d, convert_to_evalnorm
from evalnorm.convert import replace_modules

from ..layers import EVALNORM_NAMES, get_norm

__all__ = [
    "convert_norms",
    "freeze_norms",
    "in_mask_head",
    "in_roi_heads",
    "norm_factory",
    "reset_norms",
]


def norm_factory(cfg, norm, norm_batch_size, microbatch=False):
    """What detectron2's blocks take as ``norm``: ``norm`` itself for detectron2's names, else
    a callable ``channels -> EvalNorm2d`` set up from ``MODEL.EVALNORM`` (initial alpha/beta,
    evaluation mode) for normalization batch size ``norm_batch_size``, normalizing groups of
    that many samples in training when ``microbatch``."""
    if norm not in EVALNORM_NAMES:
        return norm

    def make(channels):
        layer = get_norm(norm, channels, norm_batch_size=norm_batch_size, microbatch=microbatch)
        return _configure(cfg, layer)

    return make


def _configure(cfg, layer):
    """Initial alpha/beta (``MODEL.EVALNORM.INIT``), evaluation mode and, if frozen, how it
    trains (``MODEL.EVALNORM.FROZEN_EN``) of a new layer."""
    en = cfg.MODEL.EVALNORM
    layer.set_coefficients(*((en.INIT_ALPHA, en.INIT_BETA) if en.INIT == "value" else (en.INIT,)))
    layer.mode = en.EVAL_MODE
    if layer.frozen:
        layer.frozen_en = en.FROZEN_EN
    return layer


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
    heads, images per GPU elsewhere. alpha/beta start from ``MODEL.EVALNORM.INIT``, the
    evaluation mode is ``MODEL.EVALNORM.EVAL_MODE``. In place; returns the number converted.
    """
    existing = {id(m) for m in model.modules() if isinstance(m, EvalNorm2d)}
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
        _configure(cfg, m)
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
    statistics (mean 0, var 1); EvalNorm's alpha/beta are kept. Returns the number reset."""
    count = 0
    for m in model.modules():
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

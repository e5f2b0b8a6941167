"""Norm layers from the config, and the regimes' operations on them (freeze, reset)."""

import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from ..convert import _replace_modules
from ..layers import EVALNORM_NAMES, EvalNorm2d, get_norm

__all__ = ["freeze_norms", "norm_factory", "reset_norms"]


def norm_factory(cfg, norm, norm_batch_size):
    """What detectron2's blocks take as ``norm``: ``norm`` itself for detectron2's names, else
    a callable ``channels -> EvalNorm2d`` set up from ``MODEL.EVALNORM`` (initial alpha/beta,
    evaluation mode) for normalization batch size ``norm_batch_size``."""
    if norm not in EVALNORM_NAMES:
        return norm
    en = cfg.MODEL.EVALNORM
    init = (en.INIT_ALPHA, en.INIT_BETA) if en.INIT == "value" else (en.INIT,)

    def make(channels):
        layer = get_norm(norm, channels, norm_batch_size=norm_batch_size)
        layer.set_coefficients(*init)
        layer.mode = en.EVAL_MODE
        return layer

    return make


def freeze_norms(module):
    """detectron2's ``CNNBlockBase.freeze`` that keeps EvalNorm: every parameter stops
    training, EvalNorm2d layers become frozen EvalNorm2d (FrozenEN, alpha/beta kept) and the
    other BatchNorm layers ``FrozenBatchNorm2d``. In place; returns ``module``."""
    for p in module.parameters():
        p.requires_grad_(False)
    for m in module.modules():
        if isinstance(m, EvalNorm2d):
            m.frozen = True
    return _replace_modules(
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

"""RetinaNet with EvalNorm in its head, registered in META_ARCH_REGISTRY (``EvalNormRetinaNet``).

RetinaNet's head is shared across the FPN levels (p3-p7): each of its norms runs once per
level in every forward. Its norm (``MODEL.RETINANET.NORM``) has either one set of running
statistics for all levels ("shared") or one per level ("per_level", detectron2's
``CycleBatchNormList``), as ``MODEL.EVALNORM.RETINANET_HEAD_STATS`` says.
"""

from detectron2.layers import CycleBatchNormList
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

from evalnorm import EvalNorm2d

from ..config import RETINANET_HEAD_STATS, norm_batch_sizes
from ..layers import EVALNORM_NAMES, get_norm
from .norms import _coefficients, _configure, evalnorm_norm, layer_settings

__all__ = [
    "CycleEvalNormList",
    "EvalNormRetinaNet",
    "EvalNormRetinaNetHead",
    "evalnorm_retinanet_norm",
    "retinanet_head_norm",
]

# Norms with running statistics that training updates: the ones a head can keep per level.
PER_LEVEL_NORMS = ("BN", "SyncBN", *EVALNORM_NAMES)


class CycleEvalNormList(CycleBatchNormList):
    """detectron2's ``CycleBatchNormList`` of ``EvalNorm2d``: ``length`` layers without affine,
    one per FPN level, each with its own running statistics and alpha/beta; the k-th call (mod
    ``length``) normalizes with layer k, then the shared affine (``weight``, ``bias``: (C,))
    applies. Call it a multiple of ``length`` times, levels in order, as ``RetinaNetHead`` does.

    Args:
        length (int): number of levels.
        num_features (int): channels C.
        affine (bool): shared affine after the per-level normalization.
        frozen (bool): FrozenEN: frozen per-level statistics and shared affine.
        kwargs: ``EvalNorm2d``'s (``norm_batch_size``, ``microbatch``, ``eps``, ...).
    """

    def __init__(self, length, *, num_features, affine=True, frozen=False, **kwargs):
        super().__init__(
            length,
            bn_class=EvalNorm2d,
            num_features=num_features,
            affine=affine,
            frozen=frozen,
            **kwargs,
        )
        if frozen and self._affine:
            self.weight.requires_grad_(False)
            self.bias.requires_grad_(False)

    @classmethod
    def from_batchnorm(cls, cycle, norm_batch_size):
        """The EvalNorm counterpart of a ``CycleBatchNormList`` of BatchNorm layers (a BN
        RetinaNet's per-level head norm): same statistics, affine, position and mode; alpha =
        beta = 0, so it evaluates as before until they are set."""
        first = cycle[0]
        stats = first.running_mean
        new = cls(
            len(cycle),
            num_features=first.num_features,
            affine=cycle._affine,
            eps=first.eps,
            momentum=first.momentum,
            norm_batch_size=norm_batch_size,
            init="ema",
        ).to(device=stats.device, dtype=stats.dtype)
        new.load_state_dict(cycle.state_dict())
        if cycle._affine:
            new.weight.requires_grad_(cycle.weight.requires_grad)
            new.bias.requires_grad_(cycle.bias.requires_grad)
        new._pos = cycle._pos
        return new.train(cycle.training)


def retinanet_head_norm(cfg, num_levels):
    """:func:`evalnorm_retinanet_norm` set up from the config: the norm
    ``MODEL.RETINANET.NORM``, statistics ``MODEL.EVALNORM.RETINANET_HEAD_STATS``, B = images per
    GPU, the layers' settings from ``MODEL.EVALNORM``."""
    norm = cfg.MODEL.RETINANET.NORM
    # B only for EvalNorm: a BN head needs none (and SOLVER.IMS_PER_BATCH need not split).
    images_per_gpu = norm_batch_sizes(cfg).images if norm in EVALNORM_NAMES else None
    return evalnorm_retinanet_norm(
        norm,
        num_levels,
        images_per_gpu,
        head_stats=cfg.MODEL.EVALNORM.RETINANET_HEAD_STATS,
        microbatch=cfg.MODEL.EVALNORM.MICROBATCH,
        **layer_settings(cfg),
    )


def evalnorm_retinanet_norm(
    norm,
    num_levels,
    norm_batch_size,
    *,
    head_stats="per_level",
    init="rule_of_thumb",
    init_alpha=0.1,
    init_beta=0.1,
    eval_mode="en",
    frozen_en="frozen_target",
    microbatch=False,
):
    """What ``RetinaNetHead`` takes as ``norm`` for the norm ``norm`` (detectron2's names, "EN",
    "FrozenEN"): with ``head_stats`` "per_level", a ``CycleBatchNormList`` (detectron2's, for BN
    and SyncBN) or a ``CycleEvalNormList`` of ``num_levels`` layers; with "shared", one layer of
    that norm, run at every level. Norms without trained statistics (GN, FrozenBN, "") are
    shared. ``norm_batch_size``: B, images per GPU (each level's batch); the other arguments as
    :func:`evalnorm_norm`'s."""
    if head_stats not in RETINANET_HEAD_STATS:
        choices = ", ".join(map(repr, RETINANET_HEAD_STATS))
        raise ValueError(f"head_stats={head_stats!r}: expected one of {choices}")
    per_level = head_stats == "per_level"
    if norm not in PER_LEVEL_NORMS:
        return norm
    if norm not in EVALNORM_NAMES:
        # detectron2's head makes "BN"/"SyncBN" per level; a callable bypasses it.
        return norm if per_level else (lambda channels: get_norm(norm, channels))
    if not per_level:
        return evalnorm_norm(
            norm,
            norm_batch_size,
            init=init,
            init_alpha=init_alpha,
            init_beta=init_beta,
            eval_mode=eval_mode,
            frozen_en=frozen_en,
            microbatch=microbatch,
        )
    coefficients = _coefficients(init, init_alpha, init_beta)

    def make(channels):
        cycle = CycleEvalNormList(
            num_levels,
            num_features=channels,
            frozen=norm == "FrozenEN",
            norm_batch_size=norm_batch_size,
            microbatch=microbatch,
        )
        for layer in cycle:
            _configure(layer, coefficients, eval_mode, frozen_en)
        return cycle

    return make


class EvalNormRetinaNetHead(RetinaNetHead):
    """detectron2's ``RetinaNetHead``, its norm from :func:`retinanet_head_norm`. Module names
    as detectron2's (``cls_subnet.1``, ...; per level ``cls_subnet.1.0`` ... ``.4``)."""

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["norm"] = retinanet_head_norm(cfg, len(input_shape))
        return ret


@META_ARCH_REGISTRY.register()
class EvalNormRetinaNet(RetinaNet):
    """detectron2's ``RetinaNet`` with :class:`EvalNormRetinaNetHead`; otherwise the same
    model, read from the same keys (the backbone: ``MODEL.BACKBONE.NAME``, for example
    ``build_evalnorm_retinanet_resnet_fpn_backbone``)."""

    @classmethod
    def from_config(cls, cfg):
        # RetinaNet.from_config builds detectron2's head itself, which knows no "EN": let it
        # build one without norm, then replace it.
        plain = cfg.clone()
        plain.defrost()
        plain.MODEL.RETINANET.NORM = ""
        ret = super().from_config(plain)
        shapes = ret["backbone"].output_shape()
        ret["head"] = EvalNormRetinaNetHead(
            cfg, [shapes[f] for f in cfg.MODEL.RETINANET.IN_FEATURES]
        )
        return ret

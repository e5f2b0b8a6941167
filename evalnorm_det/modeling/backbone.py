"""ResNet backbones with EvalNorm, registered in BACKBONE_REGISTRY: C4 (stem, res2-res4) and
FPN (stem, res2-res5 under detectron2's ``FPN``; p2-p6, or RetinaNet's p3-p7)."""

from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, ResNet

from ..config import norm_batch_sizes
from .norms import freeze_norms, norm_factory

__all__ = [
    "BLOCKS_PER_STAGE",
    "build_evalnorm_resnet",
    "build_evalnorm_resnet_c4_backbone",
    "build_evalnorm_resnet_fpn_backbone",
    "build_evalnorm_retinanet_resnet_fpn_backbone",
    "evalnorm_resnet",
    "resnet_stage",
]

# Residual blocks in res2..res5 for each MODEL.RESNETS.DEPTH.
BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def build_evalnorm_resnet(cfg, input_shape, num_stages, norm_batch_size):
    """detectron2's ResNet: the stem and the first ``num_stages`` stages (3: res2-res4, 4:
    res2-res5), returning ``MODEL.RESNETS.OUT_FEATURES``, normalized by
    ``MODEL.EVALNORM.BACKBONE_NORM`` with B = ``norm_batch_size`` (images per GPU). ``MODEL.RESNETS`` sets the
    architecture as for detectron2's ``build_resnet_backbone``, with the same module names (so
    the same checkpoints), except ``NORM``, which is ignored, and deformable convolutions, which
    are not supported. ``MODEL.BACKBONE.FREEZE_AT`` keeps its meaning (1: stem, 2: stem and
    res2, ...); frozen EN layers become FrozenEN, not FrozenBN, so they keep EvalNorm's
    evaluation. With ``MODEL.EVALNORM.MICROBATCH``, EN layers normalize each group of B images
    on its own in training."""
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in BLOCKS_PER_STAGE:
        raise ValueError(
            f"MODEL.RESNETS.DEPTH={r.DEPTH}: expected one of {sorted(BLOCKS_PER_STAGE)}"
        )
    if any(r.DEFORM_ON_PER_STAGE):
        raise ValueError(
            "MODEL.RESNETS.DEFORM_ON_PER_STAGE: deformable convolutions are unsupported"
        )
    norm = norm_factory(
        cfg, cfg.MODEL.EVALNORM.BACKBONE_NORM, norm_batch_size, cfg.MODEL.EVALNORM.MICROBATCH
    )
    return evalnorm_resnet(
        depth=r.DEPTH,
        norm=norm,
        in_channels=input_shape.channels,
        stem_out_channels=r.STEM_OUT_CHANNELS,
        res2_out_channels=r.RES2_OUT_CHANNELS,
        num_groups=r.NUM_GROUPS,
        width_per_group=r.WIDTH_PER_GROUP,
        stride_in_1x1=r.STRIDE_IN_1X1,
        num_stages=num_stages,
        out_features=r.OUT_FEATURES,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
    )


def evalnorm_resnet(
    *,
    depth,
    norm,
    num_stages,
    out_features,
    in_channels=3,
    stem_out_channels=64,
    res2_out_channels=256,
    num_groups=1,
    width_per_group=64,
    stride_in_1x1=True,
    freeze_at=0,
):
    """detectron2's ``ResNet`` of ``depth`` (a key of ``BLOCKS_PER_STAGE``): stem and
    ``num_stages`` stages (3: res2-res4, 4: res2-res5), every norm made by ``norm`` (for EvalNorm,
    :func:`evalnorm_norm`). Arguments as ``MODEL.RESNETS``'s keys; ``freeze_at`` as
    ``MODEL.BACKBONE.FREEZE_AT`` (1: stem, 2: stem and res2, ...), frozen EN layers becoming
    FrozenEN (:func:`freeze_norms`)."""
    stem = BasicStem(in_channels, stem_out_channels, norm=norm)
    widths = {
        "stem_out_channels": stem_out_channels,
        "res2_out_channels": res2_out_channels,
        "num_groups": num_groups,
        "width_per_group": width_per_group,
        "stride_in_1x1": stride_in_1x1,
    }
    stages = [
        resnet_stage(idx, num_blocks, norm=norm, bottleneck=depth >= 50, **widths)
        for idx, num_blocks in enumerate(BLOCKS_PER_STAGE[depth][:num_stages])
    ]
    resnet = ResNet(stem, stages, out_features=out_features)
    for idx, module in enumerate([resnet.stem] + list(resnet.stages), start=1):
        if freeze_at >= idx:
            freeze_norms(module)
    return resnet


def resnet_stage(
    index,
    num_blocks,
    *,
    norm,
    bottleneck=True,
    stem_out_channels=64,
    res2_out_channels=256,
    num_groups=1,
    width_per_group=64,
    stride_in_1x1=True,
):
    """The blocks of ResNet stage res{index + 2} (index 0: res2, 3: res5), with detectron2's
    channel widths for these ``MODEL.RESNETS`` settings and strides (1 in res2, else 2 in its
    first block)."""
    in_channels = stem_out_channels if index == 0 else res2_out_channels * 2 ** (index - 1)
    kwargs = {}
    if bottleneck:
        kwargs = {
            "bottleneck_channels": num_groups * width_per_group * 2**index,
            "num_groups": num_groups,
            "stride_in_1x1": stride_in_1x1,
        }
    return ResNet.make_stage(
        BottleneckBlock if bottleneck else BasicBlock,
        num_blocks,
        stride_per_block=[1 if index == 0 else 2] + [1] * (num_blocks - 1),
        in_channels=in_channels,
        out_channels=res2_out_channels * 2**index,
        norm=norm,
        **kwargs,
    )


@BACKBONE_REGISTRY.register()
def build_evalnorm_resnet_c4_backbone(cfg, input_shape):
    """The C4 backbone: :func:`build_evalnorm_resnet`'s stem and res2-res4 (res5 is in
    ``EvalNormRes5ROIHeads``)."""
    out_features = list(cfg.MODEL.RESNETS.OUT_FEATURES)
    if not set(out_features) <= {"stem", "res2", "res3", "res4"}:
        raise ValueError(
            f"MODEL.RESNETS.OUT_FEATURES={out_features}: the C4 backbone ends at res4 "
            "(res5 belongs to EvalNormRes5ROIHeads); use ['res4']"
        )
    images_per_gpu = norm_batch_sizes(cfg).images
    return build_evalnorm_resnet(cfg, input_shape, num_stages=3, norm_batch_size=images_per_gpu)


@BACKBONE_REGISTRY.register()
def build_evalnorm_resnet_fpn_backbone(cfg, input_shape):
    """detectron2's ``build_resnet_fpn_backbone`` with EvalNorm: :func:`build_evalnorm_resnet`'s
    stem and res2-res5 as ``bottom_up`` of an ``FPN`` with ``LastLevelMaxPool`` (p2-p6 from
    ``MODEL.FPN.IN_FEATURES`` res2-res5); same module names (``bottom_up.res2``,
    ``fpn_lateral2``, ...), so the same checkpoints. ``MODEL.FPN.NORM`` keeps detectron2's
    meaning ("": none) and also takes "EN"/"FrozenEN", with B = images per GPU."""
    return _evalnorm_fpn(cfg, input_shape, lambda bottom_up: LastLevelMaxPool())


def _evalnorm_fpn(cfg, input_shape, top_block):
    """detectron2's ``FPN`` over :func:`build_evalnorm_resnet`'s res2-res5, its extra levels
    ``top_block(bottom_up)``."""
    r, fpn = cfg.MODEL.RESNETS, cfg.MODEL.FPN
    if not set(fpn.IN_FEATURES) <= set(r.OUT_FEATURES):
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES={list(fpn.IN_FEATURES)}: FPN takes only ResNet outputs, "
            f"MODEL.RESNETS.OUT_FEATURES={list(r.OUT_FEATURES)}"
        )
    if r.RES5_DILATION != 1:
        raise ValueError(
            f"MODEL.RESNETS.RES5_DILATION={r.RES5_DILATION}: FPN needs res5 at stride 32; use 1"
        )
    images_per_gpu = norm_batch_sizes(cfg).images
    bottom_up = build_evalnorm_resnet(
        cfg, input_shape, num_stages=4, norm_batch_size=images_per_gpu
    )
    return FPN(
        bottom_up=bottom_up,
        in_features=fpn.IN_FEATURES,
        out_channels=fpn.OUT_CHANNELS,
        norm=norm_factory(cfg, fpn.NORM, images_per_gpu, cfg.MODEL.EVALNORM.MICROBATCH),
        top_block=top_block(bottom_up),
        fuse_type=fpn.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_evalnorm_retinanet_resnet_fpn_backbone(cfg, input_shape):
    """detectron2's ``build_retinanet_resnet_fpn_backbone`` with EvalNorm: as
    :func:`build_evalnorm_resnet_fpn_backbone`, with ``LastLevelP6P7`` on res5 for the extra
    levels (p3-p7 from ``MODEL.FPN.IN_FEATURES`` res3-res5); same module names (``fpn_lateral3``,
    ``top_block.p6``, ...) as detectron2's, so the same checkpoints."""
    r, fpn = cfg.MODEL.RESNETS, cfg.MODEL.FPN
    if "res5" not in r.OUT_FEATURES:
        raise ValueError(
            f"MODEL.RESNETS.OUT_FEATURES={list(r.OUT_FEATURES)}: RetinaNet's p6 and p7 are "
            "computed from res5, which must be among them"
        )
    return _evalnorm_fpn(
        cfg,
        input_shape,
        lambda bottom_up: LastLevelP6P7(
            bottom_up.output_shape()["res5"].channels, fpn.OUT_CHANNELS
        ),
    )

"""detectron2 components, registered on import: the C4 and FPN backbones, the Res5 ROI heads
and the conv+fc box head."""

from .backbone import (
    build_evalnorm_resnet,
    build_evalnorm_resnet_c4_backbone,
    build_evalnorm_resnet_fpn_backbone,
    evalnorm_resnet,
    resnet_stage,
)
from .box_head import EvalNormConvFCHead
from .norms import (
    convert_norms,
    evalnorm_norm,
    freeze_norms,
    in_roi_heads,
    norm_factory,
    reset_norms,
)
from .roi_heads import EvalNormRes5ROIHeads, evalnorm_res5

__all__ = [
    "EvalNormConvFCHead",
    "EvalNormRes5ROIHeads",
    "build_evalnorm_resnet",
    "build_evalnorm_resnet_c4_backbone",
    "build_evalnorm_resnet_fpn_backbone",
    "convert_norms",
    "evalnorm_norm",
    "evalnorm_res5",
    "evalnorm_resnet",
    "freeze_norms",
    "in_roi_heads",
    "norm_factory",
    "reset_norms",
    "resnet_stage",
]

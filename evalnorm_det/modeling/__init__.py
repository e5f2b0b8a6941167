"""detectron2 components, registered on import: the C4 and FPN backbones, the Res5 ROI heads
the conv+fc box head and the mask head."""

from .backbone import (
    build_evalnorm_resnet,
    build_evalnorm_resnet_c4_backbone,
    build_evalnorm_resnet_fpn_backbone,
)
from .box_head import EvalNormConvFCHead
from .mask_head import EvalNormConvUpsampleHead
from .norms import (
    convert_norms,
    freeze_norms,
    in_mask_head,
    in_roi_heads,
    norm_factory,
    reset_norms,
)
from .roi_heads import EvalNormRes5ROIHeads

__all__ = [
    "EvalNormConvFCHead",
    "EvalNormConvUpsampleHead",
    "EvalNormRes5ROIHeads",
    "build_evalnorm_resnet",
    "build_evalnorm_resnet_c4_backbone",
    "build_evalnorm_resnet_fpn_backbone",
    "convert_norms",
    "freeze_norms",
    "in_mask_head",
    "in_roi_heads",
    "norm_factory",
    "reset_norms",
]

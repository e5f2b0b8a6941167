"""detectron2 components, registered on import: the C4 and FPN backbones, the Res5 ROI heads,
the conv+fc box head, the mask head, and RetinaNet with EvalNorm in its head."""

from .backbone import (
    build_evalnorm_resnet,
    build_evalnorm_resnet_c4_backbone,
    build_evalnorm_resnet_fpn_backbone,
    build_evalnorm_retinanet_resnet_fpn_backbone,
    evalnorm_resnet,
    resnet_stage,
)
from .box_head import EvalNormConvFCHead
from .mask_head import EvalNormConvUpsampleHead
from .norms import (
    convert_norms,
    evalnorm_norm,
    freeze_norms,
    in_mask_head,
    in_roi_heads,
    norm_factory,
    reset_norms,
)
from .retinanet import (
    CycleEvalNormList,
    EvalNormRetinaNet,
    EvalNormRetinaNetHead,
    evalnorm_retinanet_norm,
)
from .roi_heads import EvalNormRes5ROIHeads, evalnorm_res5

__all__ = [
    "CycleEvalNormList",
    "EvalNormConvFCHead",
    "EvalNormConvUpsampleHead",
    "EvalNormRes5ROIHeads",
    "EvalNormRetinaNet",
    "EvalNormRetinaNetHead",
    "build_evalnorm_resnet",
    "build_evalnorm_resnet_c4_backbone",
    "build_evalnorm_resnet_fpn_backbone",
    "build_evalnorm_retinanet_resnet_fpn_backbone",
    "convert_norms",
    "evalnorm_norm",
    "evalnorm_res5",
    "evalnorm_resnet",
    "evalnorm_retinanet_norm",
    "freeze_norms",
    "in_mask_head",
    "in_roi_heads",
    "norm_factory",
    "reset_norms",
    "resnet_stage",
]

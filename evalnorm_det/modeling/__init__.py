"""detectron2 components, registered on import: the C4 backbone and the Res5 ROI heads."""

from .backbone import build_evalnorm_resnet_c4_backbone
from .norms import freeze_norms, norm_factory, reset_norms
from .roi_heads import EvalNormRes5ROIHeads

__all__ = [
    "EvalNormRes5ROIHeads",
    "build_evalnorm_resnet_c4_backbone",
    "freeze_norms",
    "norm_factory",
    "reset_norms",
]

"""``FastRCNNConvFCHead`` whose convolutions use the ROI head's own norm, registered in
ROI_BOX_HEAD_REGISTRY (the box head of ``StandardROIHeads``, e.g. in FPN models)."""

from detectron2.modeling.roi_heads import ROI_BOX_HEAD_REGISTRY, FastRCNNConvFCHead

from ..config import norm_batch_sizes
from .norms import norm_factory

__all__ = ["EvalNormConvFCHead"]


@ROI_BOX_HEAD_REGISTRY.register()
class EvalNormConvFCHead(FastRCNNConvFCHead):
    """detectron2's conv+fc box head (``MODEL.ROI_BOX_HEAD.NUM_CONV`` 3x3 convolutions, each
    followed by its norm and ReLU, then ``NUM_FC`` fully connected layers), mapping pooled
    features (R, C, P, P) to (R, FC_DIM). Its convolutions are normalized by
    ``MODEL.EVALNORM.ROI_HEAD_NORM`` with B = sampled ROIs per GPU
    (``MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE`` x images per GPU), the batch its BatchNorm pools
    in training; ``MODEL.ROI_BOX_HEAD.NORM`` is ignored. Module names as detectron2's."""

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        rois_per_gpu = norm_batch_sizes(cfg).rois
        ret["conv_norm"] = norm_factory(cfg, cfg.MODEL.EVALNORM.ROI_HEAD_NORM, rois_per_gpu)
        return ret

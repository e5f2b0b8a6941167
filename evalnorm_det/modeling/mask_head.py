"""``MaskRCNNConvUpsampleHead`` whose convolutions use the ROI head's norm with the mask head's
own B, registered in ROI_MASK_HEAD_REGISTRY (the mask head of Mask R-CNN, e.g. in FPN models)."""

from detectron2.modeling.roi_heads import ROI_MASK_HEAD_REGISTRY, MaskRCNNConvUpsampleHead

from ..config import norm_batch_sizes
from .norms import norm_factory

__all__ = ["EvalNormConvUpsampleHead"]


@ROI_MASK_HEAD_REGISTRY.register()
class EvalNormConvUpsampleHead(MaskRCNNConvUpsampleHead):
    """detectron2's mask head (``MODEL.ROI_MASK_HEAD.NUM_CONV`` 3x3 convolutions, each followed
    by its norm and ReLU, a 2x deconvolution, a 1x1 predictor), mapping the pooled features of
    the foreground ROIs (R, C, P, P) to mask logits (R, K, 2P, 2P). Its convolutions are
    normalized by ``MODEL.EVALNORM.ROI_HEAD_NORM`` with B = foreground ROIs per GPU
    (``NormBatchSizes.fg_rois``: the sampler's cap, images per GPU x
    int(``BATCH_SIZE_PER_IMAGE`` x ``POSITIVE_FRACTION``)), the batch its BatchNorm pools in
    training, which varies per iteration; ``MODEL.ROI_MASK_HEAD.NORM`` is ignored. Module
    names as detectron2's."""

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        fg_rois_per_gpu = norm_batch_sizes(cfg).fg_rois
        ret["conv_norm"] = norm_factory(cfg, cfg.MODEL.EVALNORM.ROI_HEAD_NORM, fg_rois_per_gpu)
        return ret

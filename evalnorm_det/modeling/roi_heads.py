"""``Res5ROIHeads`` whose res5 uses the ROI head's own norm, registered in ROI_HEADS_REGISTRY."""

from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.backbone.resnet import BottleneckBlock, ResNet
from detectron2.modeling.roi_heads import Res5ROIHeads
from torch import nn

from ..config import norm_batch_sizes
from .norms import norm_factory

__all__ = ["EvalNormRes5ROIHeads"]


@ROI_HEADS_REGISTRY.register()
class EvalNormRes5ROIHeads(Res5ROIHeads):
    """detectron2's C4 box head; res5 is normalized by ``MODEL.EVALNORM.ROI_HEAD_NORM`` with
    B = sampled ROIs per GPU (``MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE`` x images per GPU), the
    batch its BatchNorm pools in training. Architecture and module names as detectron2's."""

    @classmethod
    def _build_res5_block(cls, cfg):
        r = cfg.MODEL.RESNETS
        _, rois_per_gpu = norm_batch_sizes(cfg)
        out_channels = r.RES2_OUT_CHANNELS * 8  # res5 has 8x res2's channels
        blocks = ResNet.make_stage(
            BottleneckBlock,
            3,
            stride_per_block=[2, 1, 1],
            in_channels=out_channels // 2,
            bottleneck_channels=r.NUM_GROUPS * r.WIDTH_PER_GROUP * 8,
            out_channels=out_channels,
            num_groups=r.NUM_GROUPS,
            norm=norm_factory(cfg, cfg.MODEL.EVALNORM.ROI_HEAD_NORM, rois_per_gpu),
            stride_in_1x1=r.STRIDE_IN_1X1,
        )
        return nn.Sequential(*blocks), out_channels

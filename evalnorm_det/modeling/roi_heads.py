"""``Res5ROIHeads`` whose res5 uses the ROI head's own norm, registered in ROI_HEADS_REGISTRY."""

import torch
from detectron2.config import configurable
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads import Res5ROIHeads
from torch import nn

from ..config import norm_batch_sizes
from .backbone import resnet_stage
from .norms import norm_factory

__all__ = ["EvalNormRes5ROIHeads", "evalnorm_res5"]


def evalnorm_res5(
    *, norm, res2_out_channels=256, num_groups=1, width_per_group=64, stride_in_1x1=True
):
    """The C4 box head's res5, as detectron2's ``Res5ROIHeads`` makes it: 3 bottleneck blocks
    (stride 2 in the first), widths from the ``MODEL.RESNETS`` settings, every norm made by
    ``norm`` (for EvalNorm, :func:`evalnorm_norm` with B = sampled ROIs per GPU)."""
    blocks = resnet_stage(
        3,
        3,
        norm=norm,
        res2_out_channels=res2_out_channels,
        num_groups=num_groups,
        width_per_group=width_per_group,
        stride_in_1x1=stride_in_1x1,
    )
    return nn.Sequential(*blocks)


@ROI_HEADS_REGISTRY.register()
class EvalNormRes5ROIHeads(Res5ROIHeads):
    """detectron2's C4 box head; res5 is normalized by ``MODEL.EVALNORM.ROI_HEAD_NORM`` with
    B = sampled ROIs per GPU (``MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE`` x images per GPU), the
    batch its BatchNorm pools in training. Architecture and module names as detectron2's."""

    @configurable
    def __init__(self, *, microbatch_images=0, **kwargs):
        """
        Args:
            microbatch_images (int): when > 0, in training, res5 runs once per group of this
                many consecutive images, so its norms pool the ROIs of each group on their own
                (``MODEL.EVALNORM.MICROBATCH``: one process reproducing several GPUs).
            kwargs: as ``Res5ROIHeads``.
        """
        super().__init__(**kwargs)
        self.microbatch_images = microbatch_images

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        en = cfg.MODEL.EVALNORM
        ret["microbatch_images"] = en.NORM_BATCH_SIZE if en.MICROBATCH else 0
        return ret

    @classmethod
    def _build_res5_block(cls, cfg):
        r = cfg.MODEL.RESNETS
        rois_per_gpu = norm_batch_sizes(cfg).rois
        res5 = evalnorm_res5(
            norm=norm_factory(cfg, cfg.MODEL.EVALNORM.ROI_HEAD_NORM, rois_per_gpu),
            res2_out_channels=r.RES2_OUT_CHANNELS,
            num_groups=r.NUM_GROUPS,
            width_per_group=r.WIDTH_PER_GROUP,
            stride_in_1x1=r.STRIDE_IN_1X1,
        )
        return res5, r.RES2_OUT_CHANNELS * 8  # res5 has 8x res2's channels

    def _shared_roi_transform(self, features, boxes):
        if not (self.training and self.microbatch_images):
            return super()._shared_roi_transform(features, boxes)
        x = self.pooler(features, boxes)
        counts = [len(b) for b in boxes]
        g = self.microbatch_images
        groups = [sum(counts[i : i + g]) for i in range(0, len(counts), g)]
        return torch.cat([self.res5(rois) for rois in x.split(groups)])

# Mask R-CNN R50-C4 with EvalNorm, as configs/Base-EvalNorm-MaskRCNN-C4.yaml builds it: the
# Faster R-CNN of evalnorm_frcnn_c4.py with detectron2's C4 mask head, a 2x deconvolution and a
# 1x1 predictor on res5's features of the foreground ROIs. The head has no norm of its own
# (MODEL.ROI_MASK_HEAD.NUM_CONV 0): res5, in the ROI heads, carries the norm masks depend on.
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import MaskRCNNConvUpsampleHead

from .evalnorm_frcnn_c4 import model

model.roi_heads.mask_head = L(MaskRCNNConvUpsampleHead)(
    input_shape=L(ShapeSpec)(
        channels="${...box_predictor.input_shape.channels}",  # res5's
        width="${...pooler.output_size}",
        height="${...pooler.output_size}",
    ),
    num_classes="${..num_classes}",
    conv_dims=[256],  # the deconvolution's (MODEL.ROI_MASK_HEAD.CONV_DIM)
)

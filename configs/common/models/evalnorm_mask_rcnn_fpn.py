# Mask R-CNN R50-FPN with EvalNorm, as configs/Base-EvalNorm-MaskRCNN-FPN.yaml builds it: the
# Faster R-CNN of evalnorm_frcnn_fpn.py with detectron2's FPN mask head (4 3x3 convolutions on
# 14x14 ROIAlignV2 features, a 2x deconvolution, a 1x1 predictor), its convolutions normalized by
# ROI_HEAD_NORM with the mask head's own B: NORM_BATCH_SIZE x the sampler's cap of foreground
# ROIs per image, int(batch_size_per_image x positive_fraction) of the ROI heads (16).
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.poolers import ROIPooler

from evalnorm_det.lazy import evalnorm_norm_node, fg_rois_per_image_node
from evalnorm_det.modeling import EvalNormConvUpsampleHead

from .evalnorm_frcnn_fpn import model

model.roi_heads.mask_in_features = ["p2", "p3", "p4", "p5"]
model.roi_heads.mask_pooler = L(ROIPooler)(
    output_size=14,
    scales=(1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32),
    sampling_ratio=0,
    pooler_type="ROIAlignV2",
)
model.roi_heads.mask_head = L(EvalNormConvUpsampleHead)(
    input_shape=ShapeSpec(channels=256, height=14, width=14),
    num_classes="${..num_classes}",
    conv_dims=[256, 256, 256, 256, 256],  # 4 convolutions, then the deconvolution
    conv_norm=evalnorm_norm_node("ROI_HEAD_NORM", fg_rois_per_image_node()),
)

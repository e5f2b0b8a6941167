# Faster R-CNN R50-C4 with EvalNorm, as configs/Base-EvalNorm-RCNN-C4.yaml builds it: stem and
# res2-res4 in the backbone (norm: evalnorm.MODEL.EVALNORM.BACKBONE_NORM, B = NORM_BATCH_SIZE
# images), res5 in the box head (ROI_HEAD_NORM, B = NORM_BATCH_SIZE x 64 sampled ROIs), RPN
# minibatch of 300 anchors, torchvision's input conventions (RGB, its mean/std, stride in 3x3).
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch import GeneralizedRCNN
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator import RPN, StandardRPNHead
from detectron2.modeling.roi_heads import FastRCNNOutputLayers

from evalnorm_det.lazy import evalnorm_norm_node
from evalnorm_det.modeling import EvalNormRes5ROIHeads, evalnorm_res5, evalnorm_resnet

model = L(GeneralizedRCNN)(
    backbone=L(evalnorm_resnet)(
        depth=50,
        norm=evalnorm_norm_node("BACKBONE_NORM"),
        num_stages=3,
        out_features=["res4"],
        stem_out_channels=64,
        res2_out_channels=256,
        num_groups=1,
        width_per_group=64,
        stride_in_1x1=False,  # torchvision's ResNet-50 strides in the 3x3 conv
        freeze_at=0,  # the paper trains every convolution
    ),
    proposal_generator=L(RPN)(
        in_features=["res4"],
        head=L(StandardRPNHead)(in_channels=1024, num_anchors=15),
        anchor_generator=L(DefaultAnchorGenerator)(
            sizes=[[32, 64, 128, 256, 512]],
            aspect_ratios=[0.5, 1.0, 2.0],
            strides=[16],
            offset=0.0,
        ),
        anchor_matcher=L(Matcher)(
            thresholds=[0.3, 0.7], labels=[0, -1, 1], allow_low_quality_matches=True
        ),
        box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
        batch_size_per_image=300,
        positive_fraction=0.5,
        pre_nms_topk=(12000, 6000),
        post_nms_topk=(2000, 1000),
        nms_thresh=0.7,
    ),
    roi_heads=L(EvalNormRes5ROIHeads)(
        num_classes=80,
        batch_size_per_image=64,
        positive_fraction=0.25,
        proposal_matcher=L(Matcher)(
            thresholds=[0.5], labels=[0, 1], allow_low_quality_matches=False
        ),
        in_features=["res4"],
        pooler=L(ROIPooler)(
            output_size=14, scales=(1.0 / 16,), sampling_ratio=0, pooler_type="ROIAlignV2"
        ),
        res5=L(evalnorm_res5)(
            norm=evalnorm_norm_node("ROI_HEAD_NORM", "${model.roi_heads.batch_size_per_image}"),
            res2_out_channels=256,
            num_groups=1,
            width_per_group=64,
            stride_in_1x1=False,
        ),
        box_predictor=L(FastRCNNOutputLayers)(
            input_shape=L(ShapeSpec)(channels=2048, height=1, width=1),
            box2box_transform=L(Box2BoxTransform)(weights=(10, 10, 5, 5)),
            num_classes="${..num_classes}",
            test_score_thresh=0.05,
            test_topk_per_image=100,
        ),
    ),
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    input_format="RGB",
)

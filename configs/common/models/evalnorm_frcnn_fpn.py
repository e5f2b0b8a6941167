# Faster R-CNN R50-FPN with EvalNorm, as configs/Base-EvalNorm-RCNN-FPN.yaml builds it: stem and
# res2-res5 under detectron2's FPN (p2-p6; norm: evalnorm.MODEL.EVALNORM.BACKBONE_NORM, B =
# NORM_BATCH_SIZE images; no norm in FPN's own convolutions), the 4conv1fc box head (its
# convolutions: ROI_HEAD_NORM, B = NORM_BATCH_SIZE x 64 sampled ROIs), torchvision's input
# conventions.
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch import GeneralizedRCNN
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator import RPN, StandardRPNHead
from detectron2.modeling.roi_heads import FastRCNNOutputLayers, StandardROIHeads

from evalnorm_det.lazy import evalnorm_norm_node
from evalnorm_det.modeling import EvalNormConvFCHead, evalnorm_resnet

model = L(GeneralizedRCNN)(
    backbone=L(FPN)(
        bottom_up=L(evalnorm_resnet)(
            depth=50,
            norm=evalnorm_norm_node("BACKBONE_NORM"),
            num_stages=4,
            out_features=["res2", "res3", "res4", "res5"],
            stride_in_1x1=False,  # torchvision's ResNet-50 strides in the 3x3 conv
            freeze_at=0,  # the paper trains every convolution
        ),
        in_features=["res2", "res3", "res4", "res5"],
        out_channels=256,
        norm="",  # MODEL.FPN.NORM; evalnorm_norm_node("BACKBONE_NORM") puts EvalNorm there
        top_block=L(LastLevelMaxPool)(),
        fuse_type="sum",
    ),
    proposal_generator=L(RPN)(
        in_features=["p2", "p3", "p4", "p5", "p6"],
        head=L(StandardRPNHead)(in_channels=256, num_anchors=3),
        anchor_generator=L(DefaultAnchorGenerator)(
            sizes=[[32], [64], [128], [256], [512]],
            aspect_ratios=[0.5, 1.0, 2.0],
            strides=[4, 8, 16, 32, 64],
            offset=0.0,
        ),
        anchor_matcher=L(Matcher)(
            thresholds=[0.3, 0.7], labels=[0, -1, 1], allow_low_quality_matches=True
        ),
        box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
        batch_size_per_image=300,
        positive_fraction=0.5,
        pre_nms_topk=(2000, 1000),  # per FPN level
        post_nms_topk=(1000, 1000),
        nms_thresh=0.7,
    ),
    roi_heads=L(StandardROIHeads)(
        num_classes=80,
        batch_size_per_image=64,
        positive_fraction=0.25,
        proposal_matcher=L(Matcher)(
            thresholds=[0.5], labels=[0, 1], allow_low_quality_matches=False
        ),
        box_in_features=["p2", "p3", "p4", "p5"],
        box_pooler=L(ROIPooler)(
            output_size=7,
            scales=(1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32),
            sampling_ratio=0,
            pooler_type="ROIAlignV2",
        ),
        box_head=L(EvalNormConvFCHead)(
            input_shape=ShapeSpec(channels=256, height=7, width=7),
            conv_dims=[256, 256, 256, 256],
            fc_dims=[1024],
            conv_norm=evalnorm_norm_node(
                "ROI_HEAD_NORM", "${model.roi_heads.batch_size_per_image}"
            ),
        ),
        box_predictor=L(FastRCNNOutputLayers)(
            input_shape=ShapeSpec(channels=1024),
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

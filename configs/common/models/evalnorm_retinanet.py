# RetinaNet R50-FPN with EvalNorm, as configs/Base-EvalNorm-RetinaNet.yaml builds it: stem and
# res2-res5 under detectron2's FPN on res3-res5 with P6/P7 from res5 (p3-p7; norm:
# evalnorm.MODEL.EVALNORM.BACKBONE_NORM, B = NORM_BATCH_SIZE images), the head's 4 convolutions
# per subnet normalized by EN (MODEL.RETINANET.NORM) with per-level or shared statistics as
# evalnorm.MODEL.EVALNORM.RETINANET_HEAD_STATS says (B = NORM_BATCH_SIZE images at each level),
# torchvision's input conventions.
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone.fpn import FPN, LastLevelP6P7
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher

from evalnorm_det.lazy import evalnorm_norm_node, evalnorm_retinanet_norm_node
from evalnorm_det.modeling import EvalNormRetinaNet, EvalNormRetinaNetHead, evalnorm_resnet

model = L(EvalNormRetinaNet)(
    backbone=L(FPN)(
        bottom_up=L(evalnorm_resnet)(
            depth=50,
            norm=evalnorm_norm_node("BACKBONE_NORM"),
            num_stages=4,
            out_features=["res3", "res4", "res5"],
            stride_in_1x1=False,  # torchvision's ResNet-50 strides in the 3x3 conv
            freeze_at=0,  # the paper trains every convolution
        ),
        in_features=["res3", "res4", "res5"],
        out_channels=256,
        norm="",  # MODEL.FPN.NORM
        top_block=L(LastLevelP6P7)(in_channels=2048, out_channels="${..out_channels}"),  # res5
        fuse_type="sum",
    ),
    head=L(EvalNormRetinaNetHead)(
        input_shape=[ShapeSpec(channels=256)] * 5,  # p3-p7
        num_classes="${..num_classes}",
        num_anchors=9,
        conv_dims=[256, 256, 256, 256],
        norm=evalnorm_retinanet_norm_node("EN", num_levels=5),  # MODEL.RETINANET.NORM "EN"
        prior_prob=0.01,
    ),
    head_in_features=["p3", "p4", "p5", "p6", "p7"],
    anchor_generator=L(DefaultAnchorGenerator)(
        # detectron2's: three scales per octave, one octave per level, p3-p7.
        sizes=[
            [32, 40.32, 50.80],
            [64, 80.63, 101.59],
            [128, 161.27, 203.19],
            [256, 322.54, 406.37],
            [512, 645.08, 812.75],
        ],
        aspect_ratios=[0.5, 1.0, 2.0],
        strides=[8, 16, 32, 64, 128],
        offset=0.0,
    ),
    box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
    anchor_matcher=L(Matcher)(
        thresholds=[0.4, 0.5], labels=[0, -1, 1], allow_low_quality_matches=True
    ),
    num_classes=80,
    focal_loss_alpha=0.25,
    focal_loss_gamma=2.0,
    smooth_l1_beta=0.0,
    test_score_thresh=0.05,
    test_topk_candidates=1000,
    test_nms_thresh=0.5,
    max_detections_per_image=100,
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    input_format="RGB",
)

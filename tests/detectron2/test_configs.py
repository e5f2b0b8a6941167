"""Every shipped config builds on CPU and does what its regime promises."""

from pathlib import Path

import detectron2
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.modeling.backbone import FPN
from helpers import ROOT

from evalnorm_det import EvalNorm2d, add_evalnorm_config, check_evalnorm_config
from evalnorm_det.config import norm_batch_sizes
from evalnorm_det.engine import build_evalnorm_model
from evalnorm_det.modeling import EvalNormConvFCHead

CONFIGS = ROOT / "configs"
D2_CONFIGS = Path(detectron2.__file__).parent / "model_zoo" / "configs"
ALL = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml"))
TABLE2 = [p for p in ALL if p.startswith(("regimes/", "evalnorm_frcnn_"))]


def load(name):
    cfg = get_cfg()
    add_evalnorm_config(cfg)
    cfg.merge_from_file(name if Path(name).is_absolute() else str(CONFIGS / name))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def images_per_gpu(name):
    return int(name.rsplit("_", 1)[1].removesuffix("img.yaml"))


def test_the_expected_configs_exist():
    assert len([p for p in ALL if p.startswith("regimes/")]) == 12
    for n in (2, 4, 8):
        assert f"evalnorm_frcnn_{n}img.yaml" in ALL
        for regime in ("a_scratch", "b_imagenet_bn_reset", "c_imagenet_frozen_bn"):
            assert f"regimes/{regime}_{n}img.yaml" in ALL
        assert f"regimes/d_imagenet_bn_finetuned_{n}img.yaml" in ALL
    assert "evalnorm_frcnn_fpn_2img.yaml" in TABLE2


@pytest.mark.parametrize("name", ALL)
def test_config_builds(name):
    cfg = load(name)
    # Each config names its images per GPU; training checks them against the GPUs it runs on.
    gpus = cfg.SOLVER.IMS_PER_BATCH // (
        cfg.MODEL.EVALNORM.NORM_BATCH_SIZE or cfg.SOLVER.IMS_PER_BATCH
    )
    check_evalnorm_config(cfg, world_size=gpus)
    if cfg.MODEL.EVALNORM.MICROBATCH:  # one process emulates the GPUs (the benchmark's config)
        check_evalnorm_config(cfg, world_size=1)
    elif gpus > 1:
        with pytest.raises(ValueError, match="MODEL.EVALNORM.NORM_BATCH_SIZE"):
            check_evalnorm_config(cfg, world_size=1)
        check_evalnorm_config(cfg, world_size=1, training=False)  # evaluation: any GPU count
    model = build_model(cfg)
    layers = [m for m in model.modules() if isinstance(m, EvalNorm2d)]
    if name == "demo/bn_digits_2img.yaml":  # a plain BN model, made EvalNorm for evaluation
        assert not layers and any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        model = build_evalnorm_model(cfg, norm_batch_sizes(cfg))
        layers = [m for m in model.modules() if isinstance(m, EvalNorm2d)]
        assert not any(type(m) is torch.nn.BatchNorm2d for m in model.modules())
    assert layers, name
    assert all(m.mode == cfg.MODEL.EVALNORM.EVAL_MODE for m in layers)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert not any(id(m.alpha_logit) in trainable or id(m.beta_logit) in trainable for m in layers)


@pytest.mark.parametrize("name", TABLE2)
def test_regime_promises(name):
    cfg = load(name)
    n = images_per_gpu(name)
    regime = Path(name).name[0] if name.startswith("regimes/") else "d"
    # The paper's protocol: N images per GPU on 8 GPUs, 64 ROIs per image.
    assert norm_batch_sizes(cfg, world_size=8) == (n, 64 * n, 16 * n)
    assert cfg.SOLVER.BASE_LR == pytest.approx(0.015 * n / 8)
    assert cfg.SOLVER.MAX_ITER == 64 * 117266 // (8 * n)
    assert cfg.DATASETS.TEST == ("coco_2014_minival",)
    assert set(cfg.DATASETS.TRAIN) == {"coco_2014_train", "coco_2014_valminusminival"}
    assert cfg.INPUT.SQUARE_SIZE == 600 and cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE == 300
    assert (cfg.MODEL.WEIGHTS == "") == (regime == "a")
    assert cfg.MODEL.EVALNORM.RESET_NORM == (regime == "b")
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0  # every convolution trains
    model = build_model(cfg)
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert norms and all(isinstance(m, EvalNorm2d) for m in norms)
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.requires_grad for w in convs)
    for m in norms:
        assert m.frozen == (regime == "c")
        assert m.weight.requires_grad == (regime != "c")
        # (c) fits alpha/beta to the frozen normalization it trains with (docs/BENCHMARKS.md)
        assert regime != "c" or m.frozen_en == "frozen_target"
    backbone_b = {m.norm_batch_size for m in model.backbone.modules() if isinstance(m, EvalNorm2d)}
    head_b = {m.norm_batch_size for m in model.roi_heads.modules() if isinstance(m, EvalNorm2d)}
    # Built in one process, B is still the configured images per GPU.
    assert backbone_b == {n} and head_b == {64 * n}


# The keys of detectron2's FPN architecture, taken from its Base-RCNN-FPN.yaml, and the paper's
# protocol, taken from the C4 config.
D2_FPN_KEYS = (
    "MODEL.RESNETS.OUT_FEATURES",
    "MODEL.FPN.IN_FEATURES",
    "MODEL.FPN.NORM",
    "MODEL.ANCHOR_GENERATOR.SIZES",
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS",
    "MODEL.RPN.IN_FEATURES",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN",
    "MODEL.RPN.PRE_NMS_TOPK_TEST",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "MODEL.ROI_HEADS.NAME",
    "MODEL.ROI_HEADS.IN_FEATURES",
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION",
)
PROTOCOL_KEYS = (
    "MODEL.PIXEL_MEAN",
    "MODEL.PIXEL_STD",
    "MODEL.BACKBONE.FREEZE_AT",
    "MODEL.RESNETS.DEPTH",
    "MODEL.RESNETS.STRIDE_IN_1X1",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "MODEL.ROI_HEADS.NUM_CLASSES",
    "MODEL.EVALNORM",
    "INPUT",
    "DATASETS",
    "SOLVER",
    "TEST",
)


def value(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def test_fpn_config_is_detectron2s_fpn_under_the_protocol():
    """R50-FPN as detectron2's model zoo builds it, with the 4conv1fc box head, and everything
    else as the C4 config of the same regime and batch."""
    fpn, c4 = load("evalnorm_frcnn_fpn_2img.yaml"), load("evalnorm_frcnn_2img.yaml")
    d2 = load(str(D2_CONFIGS / "Base-RCNN-FPN.yaml"))
    for key in D2_FPN_KEYS:
        assert value(fpn, key) == value(d2, key), key
    for key in PROTOCOL_KEYS:
        assert value(fpn, key) == value(c4, key), key
    assert fpn.OUTPUT_DIR == "output/evalnorm_frcnn_fpn_2img"
    box_head = fpn.MODEL.ROI_BOX_HEAD
    assert (box_head.NAME, box_head.NUM_CONV, box_head.NUM_FC) == ("EvalNormConvFCHead", 4, 1)
    assert (box_head.POOLER_TYPE, box_head.POOLER_SAMPLING_RATIO) == ("ROIAlignV2", 0)
    # Its own weights file, named in the comment with the command that writes it: the C4
    # file's names (backbone.res2, ...) are not the FPN model's (backbone.bottom_up.res2, ...).
    assert fpn.MODEL.WEIGHTS == "checkpoints/R-50-torchvision-fpn.pth" != c4.MODEL.WEIGHTS
    base = (CONFIGS / "Base-EvalNorm-RCNN-FPN.yaml").read_text()
    command = "python tools/convert_imagenet_checkpoint.py --layout fpn"
    assert command in base and f"resnet50-0676ba61.pth {fpn.MODEL.WEIGHTS}" in base

    fpn.SOLVER.IMS_PER_BATCH = 2  # one process's share of the 8 GPUs
    model = build_model(fpn)
    assert isinstance(model.backbone, FPN)
    assert type(model.roi_heads.box_head) is EvalNormConvFCHead
    layers = {n: m for n, m in model.named_modules() if isinstance(m, EvalNorm2d)}
    backbone = {m.norm_batch_size for n, m in layers.items() if n.startswith("backbone.bottom_up.")}
    head = [m.norm_batch_size for n, m in layers.items() if n.startswith("roi_heads.box_head.")]
    assert len(layers) == 53 + 4 and backbone == {2} and head == [64 * 2] * 4

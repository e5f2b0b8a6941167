"""Every shipped config builds on CPU and does what its regime promises."""

from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model

from evalnorm_det import EvalNorm2d, add_evalnorm_config, check_evalnorm_config
from evalnorm_det.config import norm_batch_sizes

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml"))
TABLE2 = [p for p in ALL if p.startswith(("regimes/", "evalnorm_frcnn_"))]


def load(name):
    cfg = get_cfg()
    add_evalnorm_config(cfg)
    cfg.merge_from_file(str(CONFIGS / name))
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


@pytest.mark.parametrize("name", ALL)
def test_config_builds(name):
    cfg = load(name)
    check_evalnorm_config(cfg, world_size=1)
    model = build_model(cfg)
    layers = [m for m in model.modules() if isinstance(m, EvalNorm2d)]
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
    assert norm_batch_sizes(cfg, world_size=8) == (n, 64 * n)
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
    backbone_b = {m.norm_batch_size for m in model.backbone.modules() if isinstance(m, EvalNorm2d)}
    head_b = {m.norm_batch_size for m in model.roi_heads.modules() if isinstance(m, EvalNorm2d)}
    assert backbone_b == {cfg.SOLVER.IMS_PER_BATCH} and head_b == {64 * cfg.SOLVER.IMS_PER_BATCH}

"""Faster R-CNN R50-FPN with EvalNorm: the FPN backbone, the conv+fc box head, online estimation
and evaluation in every mode, from configs/evalnorm_frcnn_fpn_2img.yaml on tiny digits.

``tiny_fpn_cfg`` trains 2 images per GPU with 8 ROIs each: B = 2 in the backbone, 16 in the head.
"""

import json
from pathlib import Path

import pytest
import torch
from detection_helpers import D2_BN_FPN, en_layers, norm_types, tiny_fpn_cfg, train
from detectron2.evaluation.evaluator import inference_context
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.modeling.backbone import FPN
from detectron2.modeling.roi_heads import FastRCNNConvFCHead
from torch import nn

from evalnorm_det import EvalNorm2d, Trainer, evalnorm_mode
from evalnorm_det.modeling import EvalNormConvFCHead

BACKBONE_B, HEAD_B = 2, 16
STAGES = ("stem", "res2", "res3", "res4", "res5")


def fpn_convs(backbone):
    return [m for n, m in backbone.named_children() if n.startswith(("fpn_lateral", "fpn_output"))]


@pytest.mark.parametrize(
    "backbone, head, expected_backbone, expected_head",
    [
        ("EN", "EN", EvalNorm2d, EvalNorm2d),
        ("EN", "BN", EvalNorm2d, nn.BatchNorm2d),
        ("BN", "EN", nn.BatchNorm2d, EvalNorm2d),
        ("FrozenEN", "FrozenEN", EvalNorm2d, EvalNorm2d),
        ("EN", "FrozenBN", EvalNorm2d, FrozenBatchNorm2d),
    ],
)
def test_backbone_and_head_norms_are_chosen_separately(
    tmp_path, backbone, head, expected_backbone, expected_head
):
    cfg = tiny_fpn_cfg(
        tmp_path, "MODEL.EVALNORM.BACKBONE_NORM", backbone, "MODEL.EVALNORM.ROI_HEAD_NORM", head
    )
    model = build_model(cfg)
    fpn, box_head = model.backbone, model.roi_heads.box_head
    assert isinstance(fpn, FPN) and fpn.output_shape().keys() == {"p2", "p3", "p4", "p5", "p6"}
    assert tuple(n for n, _ in fpn.bottom_up.named_children()) == STAGES
    assert type(box_head) is EvalNormConvFCHead and isinstance(box_head, FastRCNNConvFCHead)
    assert norm_types(fpn.bottom_up) == {expected_backbone}
    assert norm_types(box_head) == {expected_head}
    assert len(box_head.conv_norm_relus) == 4 and len(box_head.fcs) == 1
    assert all(c.norm is not None and c.bias is None for c in box_head.conv_norm_relus)
    # MODEL.FPN.NORM "": detectron2's FPN convolutions, without norm, with bias.
    assert all(c.norm is None and c.bias is not None for c in fpn_convs(fpn))
    for part, norm, b in ((fpn.bottom_up, backbone, BACKBONE_B), (box_head, head, HEAD_B)):
        layers = [m for m in part.modules() if isinstance(m, EvalNorm2d)]
        assert all(m.norm_batch_size == b and m.frozen == (norm == "FrozenEN") for m in layers)
        assert all(m.alpha.item() == pytest.approx(1 / b**2) for m in layers)


def test_same_names_and_shapes_as_detectron2_fpn(tmp_path):
    """A checkpoint of detectron2's own R50-FPN with BN (4conv1fc head) loads, and back."""
    ours = build_model(tiny_fpn_cfg(tmp_path))
    theirs = build_model(tiny_fpn_cfg(tmp_path, *D2_BN_FPN))
    assert not any(isinstance(m, EvalNorm2d) for m in theirs.modules())
    shapes = {k: v.shape for k, v in ours.state_dict().items() if not k.endswith("_logit")}
    assert shapes == {k: v.shape for k, v in theirs.state_dict().items()}
    assert "backbone.bottom_up.res5.2.conv3.norm.running_var" in shapes
    assert "roi_heads.box_head.conv4.norm.running_mean" in shapes
    assert "backbone.fpn_lateral2.weight" in shapes and "backbone.fpn_output5.bias" in shapes


@pytest.mark.parametrize("norm", ["EN", "FrozenEN", "GN"])
def test_fpn_norm_keeps_detectron2_meaning_and_takes_evalnorm(tmp_path, norm):
    fpn = build_model(tiny_fpn_cfg(tmp_path, "MODEL.FPN.NORM", norm)).backbone
    convs = fpn_convs(fpn)
    assert len(convs) == 8 and all(c.bias is None for c in convs)
    if norm == "GN":
        assert all(isinstance(c.norm, nn.GroupNorm) for c in convs)
    else:
        assert all(type(c.norm) is EvalNorm2d for c in convs)
        assert all(c.norm.norm_batch_size == BACKBONE_B for c in convs)
        assert all(c.norm.frozen == (norm == "FrozenEN") for c in convs)


def test_freeze_at_keeps_detectron2_meaning_and_evalnorm(tmp_path):
    model = build_model(tiny_fpn_cfg(tmp_path, "MODEL.BACKBONE.FREEZE_AT", "2"))
    bottom_up = model.backbone.bottom_up
    for frozen_part in (bottom_up.stem, bottom_up.res2):
        assert not any(p.requires_grad for p in frozen_part.parameters())
        assert norm_types(frozen_part) == {EvalNorm2d}
        assert all(m.frozen for m in frozen_part.modules() if isinstance(m, EvalNorm2d))
    for part in (bottom_up.res3, bottom_up.res5, *fpn_convs(model.backbone)):
        assert all(p.requires_grad for n, p in part.named_parameters() if "_logit" not in n)
        assert not any(m.frozen for m in part.modules() if isinstance(m, EvalNorm2d))
    bn = build_model(
        tiny_fpn_cfg(
            tmp_path, "MODEL.BACKBONE.FREEZE_AT", "2", "MODEL.EVALNORM.BACKBONE_NORM", "BN"
        )
    )
    assert norm_types(bn.backbone.bottom_up.res2) == {FrozenBatchNorm2d}
    assert norm_types(bn.backbone.bottom_up.res3) == {nn.BatchNorm2d}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("MODEL.RESNETS.OUT_FEATURES", "['res3', 'res4', 'res5']"), r"MODEL\.FPN\.IN_FEATURES"),
        (("MODEL.RESNETS.RES5_DILATION", "2"), r"RES5_DILATION=2: FPN needs res5 at stride 32"),
        (("MODEL.RESNETS.DEPTH", "152"), r"MODEL\.RESNETS\.DEPTH=152"),
    ],
)
def test_bad_architecture_names_the_key(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        build_model(tiny_fpn_cfg(tmp_path, *overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(cfg, trainer) after 3 iterations with alpha/beta logged at every one."""
    tmp_path = tmp_path_factory.mktemp("fpn")
    cfg = tiny_fpn_cfg(tmp_path, "MODEL.EVALNORM.ONLINE.LOG_PERIOD", "1")
    return cfg, train(cfg)


def test_training_estimates_backbone_and_head_coefficients(trained):
    cfg, trainer = trained
    layers = dict(en_layers(trainer.model))
    backbone = [n for n in layers if n.startswith("backbone.bottom_up.")]
    head = [n for n in layers if n.startswith("roi_heads.box_head.")]
    assert len(backbone) == 53 and len(head) == 4 and len(layers) == 57
    last = json.loads((Path(cfg.OUTPUT_DIR) / "metrics.json").read_text().splitlines()[-1])
    for name in backbone + head:
        for c in ("alpha", "beta"):
            history = trainer.storage.history(f"evalnorm_{c}/{name}").values()
            assert [it for _, it in history] == [0, 1, 2]
            assert history[-1][0] == pytest.approx(getattr(layers[name], c).item())
            assert last[f"evalnorm_{c}/{name}"] == pytest.approx(history[-1][0])
    # Estimation moved alpha away from the rule of thumb in the backbone and in the head.
    for names, b in ((backbone, BACKBONE_B), (head, HEAD_B)):
        assert any(layers[n].alpha.item() != pytest.approx(1 / b**2, rel=1e-3) for n in names)
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(m.alpha_logit) in in_optimizer for m in layers.values())


def test_every_mode_evaluates(trained):
    cfg, trainer = trained
    cfg = cfg.clone()
    cfg.merge_from_list(["DATASETS.TEST", "('tiny_digits_val',)"])
    results = Trainer.test(cfg, trainer.model)
    assert list(results) == ["ema", "en", "rule_of_thumb"]
    assert all({"AP", "AP50", "AP75"} <= set(r["bbox"]) for r in results.values())
    table = (Path(cfg.OUTPUT_DIR) / "evalnorm_table.txt").read_text().splitlines()
    assert [line[:8].strip() for line in table[2:]] == ["EMA", "EN", "EN - EMA", "1/B^2"]
    assert {m.mode for _, m in en_layers(trainer.model)} == {"en"}


@torch.no_grad()
def test_modes_reach_backbone_and_head_and_keep_rois_independent(trained):
    """Each mode changes both parts' outputs; the head's output for an ROI does not depend on
    the other ROIs evaluated with it (each ROI brings its own statistics)."""
    _, trainer = trained
    model = trainer.model
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, 64, 64, generator=g)
    head = model.roi_heads.box_head
    rois = torch.randn(5, head.conv1.in_channels, 4, 4, generator=g)
    outputs = {}
    for mode in ("ema", "en", "rule_of_thumb"):
        with inference_context(model), evalnorm_mode(model, mode):
            outputs[mode] = (model.backbone(image)["p2"], head(rois))
            one_by_one = torch.cat([head(rois[i : i + 1]) for i in range(len(rois))])
            torch.testing.assert_close(one_by_one, outputs[mode][1], rtol=1e-5, atol=1e-5)
    for a, b in (("ema", "en"), ("ema", "rule_of_thumb")):
        for part in (0, 1):
            assert not torch.allclose(outputs[a][part], outputs[b][part], atol=1e-4), (a, b, part)

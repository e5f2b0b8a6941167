"""The detectron2 integration: builders, FREEZE_AT, regimes, the online hook, the trainer."""

import json
import types

import pytest
import torch
from detection_helpers import en_layers, norm_types, tiny_cfg, tiny_fpn_cfg, train
from detectron2.data import transforms as T
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng
from helpers import randomize_batchnorm, small_cnn
from torch import nn

from evalnorm_det import (
    EvalNorm2d,
    OnlineEstimationHook,
    Trainer,
    check_evalnorm_config,
    convert_to_evalnorm,
)
from evalnorm_det.config import configured_rows
from evalnorm_det.engine import build_augmentation
from evalnorm_det.modeling import reset_norms


@pytest.mark.parametrize(
    "backbone, head, expected_backbone, expected_head",
    [
        ("EN", "EN", EvalNorm2d, EvalNorm2d),
        ("EN", "FrozenBN", EvalNorm2d, FrozenBatchNorm2d),
        ("BN", "EN", nn.BatchNorm2d, EvalNorm2d),
        ("FrozenEN", "SyncBN", EvalNorm2d, nn.SyncBatchNorm),
        ("GN", "FrozenEN", None, EvalNorm2d),
    ],
)
def test_backbone_and_head_norms_are_chosen_separately(
    tmp_path, backbone, head, expected_backbone, expected_head
):
    # GN's 32 groups need channel counts that 32 divides.
    width = ["MODEL.RESNETS.STEM_OUT_CHANNELS", "32", "MODEL.RESNETS.WIDTH_PER_GROUP", "32"]
    cfg = tiny_cfg(
        tmp_path,
        "MODEL.EVALNORM.BACKBONE_NORM",
        backbone,
        "MODEL.EVALNORM.ROI_HEAD_NORM",
        head,
        *(width if backbone == "GN" else []),
    )
    model = build_model(cfg)
    assert norm_types(model.backbone) == ({expected_backbone} if expected_backbone else set())
    if backbone == "GN":
        assert any(isinstance(m, nn.GroupNorm) for m in model.backbone.modules())
    assert norm_types(model.roi_heads) == {expected_head}
    for m in model.modules():
        if isinstance(m, EvalNorm2d):
            assert m.frozen == (m in set(model.backbone.modules()) and backbone == "FrozenEN") or (
                m in set(model.roi_heads.modules()) and head == "FrozenEN"
            )


@pytest.mark.parametrize("fpn", [False, True], ids=["C4", "FPN"])
def test_evalnorm_layers_evaluate_in_place_with_the_same_detections(tmp_path, fpn):
    cfg = (tiny_fpn_cfg if fpn else tiny_cfg)(tmp_path)
    model = randomize_batchnorm(build_model(cfg)).eval()
    layers = [m for _, m in en_layers(model)]
    assert layers and all(m.inplace for m in layers)
    images = [{"image": torch.rand(3, 64, 64) * 255, "height": 64, "width": 64}]
    with torch.no_grad():
        inplace = model(images)[0]["instances"]
        for m in layers:
            m.inplace = False
        expected = model(images)[0]["instances"]
    assert len(expected) > 0
    assert torch.equal(inplace.pred_boxes.tensor, expected.pred_boxes.tensor)
    assert torch.equal(inplace.scores, expected.scores)


def test_normalization_batch_sizes_are_derived(tmp_path):
    cfg = tiny_cfg(
        tmp_path, "SOLVER.IMS_PER_BATCH", "4", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "8"
    )
    model = build_model(cfg)
    assert {m.norm_batch_size for m in model.backbone.modules() if isinstance(m, EvalNorm2d)} == {4}
    head = [m for m in model.roi_heads.modules() if isinstance(m, EvalNorm2d)]
    assert {m.norm_batch_size for m in head} == {32}
    assert head[0].alpha.item() == pytest.approx(1 / 32**2)  # rule of thumb by default


def test_freeze_at_keeps_detectron2_meaning_and_evalnorm(tmp_path):
    model = build_model(tiny_cfg(tmp_path, "MODEL.BACKBONE.FREEZE_AT", "2"))
    backbone = model.backbone
    for frozen_part in (backbone.stem, backbone.res2):
        assert not any(p.requires_grad for p in frozen_part.parameters())
        assert all(m.frozen for m in frozen_part.modules() if isinstance(m, EvalNorm2d))
        assert norm_types(frozen_part) == {EvalNorm2d}
    for part in (backbone.res3, backbone.res4):
        assert all(p.requires_grad for n, p in part.named_parameters() if "_logit" not in n)
        assert not any(m.frozen for m in part.modules() if isinstance(m, EvalNorm2d))
    bn = build_model(
        tiny_cfg(tmp_path, "MODEL.BACKBONE.FREEZE_AT", "2", "MODEL.EVALNORM.BACKBONE_NORM", "BN")
    )
    assert norm_types(bn.backbone.res2) == {FrozenBatchNorm2d}
    assert norm_types(bn.backbone.res3) == {nn.BatchNorm2d}


@pytest.mark.parametrize(
    "overrides, key",
    [
        (("SOLVER.IMS_PER_BATCH", "3"), "SOLVER.IMS_PER_BATCH=3"),
        (("MODEL.EVALNORM.BACKBONE_NORM", "EvalNorm"), "MODEL.EVALNORM.BACKBONE_NORM"),
        (("MODEL.EVALNORM.ROI_HEAD_NORM", "bn"), "MODEL.EVALNORM.ROI_HEAD_NORM"),
        (("MODEL.EVALNORM.INIT", "zero"), "MODEL.EVALNORM.INIT"),
        (("MODEL.EVALNORM.INIT", "value", "MODEL.EVALNORM.INIT_BETA", "0.0"), "INIT_BETA"),
        (("MODEL.EVALNORM.EVAL_MODE", "precise_bn"), "MODEL.EVALNORM.EVAL_MODE"),
        (("MODEL.EVALNORM.ONLINE.OPTIMIZER", "rmsprop"), "ONLINE.OPTIMIZER"),
        (("MODEL.EVALNORM.ONLINE.LR", "0.0"), "ONLINE.LR"),
        (("MODEL.EVALNORM.ONLINE.MAX_POSITIONS", "-1"), "ONLINE.MAX_POSITIONS"),
        (("MODEL.EVALNORM.ONLINE.START_ITER", "-1"), "ONLINE.START_ITER"),
        (("MODEL.EVALNORM.ONLINE.START_ITER", "3"), "ONLINE.START_ITER=3 is not before SOLVER"),
        (("TEST.EVALNORM_ROWS", "['ema', 'offline']"), "TEST.EVALNORM_ROWS"),
        (("TEST.EVALNORM_ROWS", "[]"), "TEST.EVALNORM_ROWS"),
        (("INPUT.SQUARE_SIZE", "-1"), "INPUT.SQUARE_SIZE"),
    ],
)
def test_bad_config_names_the_key(tmp_path, overrides, key):
    cfg = tiny_cfg(tmp_path, *overrides)
    with pytest.raises(ValueError, match=key.replace(".", r"\.").replace("[", r"\[")):
        check_evalnorm_config(cfg, world_size=2)


def test_deprecated_rows_key_is_read_with_a_warning(tmp_path):
    cfg = tiny_cfg(tmp_path, "TEST.EVALNORM_MODES", "['ema', 'precise_bn']")
    with pytest.warns(FutureWarning, match="TEST.EVALNORM_MODES is deprecated"):
        assert configured_rows(cfg) == ["ema", "precise_bn"]
    bad = tiny_cfg(tmp_path, "TEST.EVALNORM_MODES", "['offline']")
    with (
        pytest.warns(FutureWarning),
        pytest.raises(ValueError, match=r"TEST\.EVALNORM_MODES entry"),
    ):
        check_evalnorm_config(bad, world_size=2)


def test_init_value_may_be_exact_without_online_estimation(tmp_path):
    cfg = tiny_cfg(
        tmp_path,
        "MODEL.EVALNORM.INIT",
        "value",
        "MODEL.EVALNORM.INIT_ALPHA",
        "0.0",
        "MODEL.EVALNORM.INIT_BETA",
        "0.3",
        "MODEL.EVALNORM.ONLINE.ENABLED",
        "False",
    )
    check_evalnorm_config(cfg, world_size=1)
    (_, layer), *_ = en_layers(build_model(cfg))
    assert layer.alpha.item() == 0.0 and layer.beta.item() == pytest.approx(0.3)


def model_state(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items() if "_logit" not in k}


def test_online_estimation_does_not_change_training(tmp_path):
    with_hook = train(tiny_cfg(tmp_path / "on"))
    without = train(tiny_cfg(tmp_path / "off", "MODEL.EVALNORM.ONLINE.ENABLED", "False"))
    assert [type(h) for h in with_hook._hooks].count(OnlineEstimationHook) == 1
    assert OnlineEstimationHook not in [type(h) for h in without._hooks]
    a, b = model_state(with_hook), model_state(without)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # alpha/beta moved in the run with the hook, stayed at the rule of thumb without it.
    moved = [n for n, m in en_layers(with_hook.model) if m.alpha.item() != pytest.approx(0.25)]
    assert next(n for n, _ in en_layers(with_hook.model) if n.startswith("backbone")) in moved
    assert all(
        m.alpha.item() == pytest.approx(0.25)
        for n, m in en_layers(without.model)
        if n.startswith("backbone")
    )
    # The model's optimizer never holds alpha/beta.
    in_optimizer = {id(p) for g in with_hook.optimizer.param_groups for p in g["params"]}
    for _, m in en_layers(with_hook.model):
        assert id(m.alpha_logit) not in in_optimizer and id(m.beta_logit) not in in_optimizer


def test_hook_logs_every_layer_and_resumes_its_optimizer(tmp_path):
    cfg = tiny_cfg(
        tmp_path,
        "SOLVER.MAX_ITER",
        "4",
        "SOLVER.CHECKPOINT_PERIOD",
        "2",
        "MODEL.EVALNORM.ONLINE.LOG_PERIOD",
        "2",
    )
    first = train(cfg)
    layers = [n for n, _ in en_layers(first.model)]
    history = first.storage.history(f"evalnorm_alpha/{layers[0]}").values()
    assert [it for _, it in history] == [1, 3]
    final = dict(en_layers(first.model))
    assert history[-1][0] == pytest.approx(final[layers[0]].alpha.item())
    lines = (tmp_path / "output" / "metrics.json").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert all(f"evalnorm_{c}/{n}" in records[-1] for n in layers for c in ("alpha", "beta"))

    # Resume from the checkpoint after iteration 1 (model_0000001.pth).
    saved = torch.load(tmp_path / "output" / "model_0000001.pth", weights_only=False)
    hook_state = saved["trainer"]["hooks"]["OnlineEstimationHook"]
    (tmp_path / "output" / "last_checkpoint").write_text("model_0000001.pth")
    seed_all_rng(1)
    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    hook = next(h for h in resumed._hooks if isinstance(h, OnlineEstimationHook))
    state = hook.estimator.optimizer.state_dict()
    assert state["state"] and state["state"][0]["step"] == 2
    for i, s in hook_state["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(state["state"][i][k], v)
    for k, v in saved["model"].items():
        if "_logit" in k:
            assert torch.equal(resumed.model.state_dict()[k], v)


def test_reset_norms_is_regime_b_and_skipped_on_resume(tmp_path):
    source = build_model(tiny_cfg(tmp_path))
    torch.manual_seed(0)
    for m in source.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize_batchnorm(m)
    weights = tmp_path / "imagenet.pth"
    torch.save({"model": source.state_dict()}, weights)
    cfg = tiny_cfg(tmp_path, "MODEL.WEIGHTS", str(weights), "MODEL.EVALNORM.RESET_NORM", "True")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    model, src = trainer.model, source.state_dict()
    for name, m in en_layers(model):
        assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean)), name
        assert torch.equal(m.running_var, torch.ones_like(m.running_var)), name
        assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any(), name
    conv = "backbone.res3.0.conv2.weight"
    assert torch.equal(model.state_dict()[conv], src[conv])

    trainer.checkpointer.save("model_0000")  # a run of our own: resuming must not reset
    with torch.no_grad():
        for _, m in en_layers(trainer.model):
            m.running_var.fill_(2.0)
    trainer.checkpointer.save("model_0001")
    again = Trainer(cfg)
    again.resume_or_load(resume=True)
    assert all(torch.all(m.running_var == 2.0) for _, m in en_layers(again.model))
    assert reset_norms(again.model) == len(en_layers(again.model))


def test_trainer_test_evaluates_every_mode_and_writes_the_table(tmp_path):
    cfg = tiny_cfg(tmp_path, "SOLVER.MAX_ITER", "2")
    trainer = train(cfg)
    cfg.merge_from_list(["DATASETS.TEST", "('tiny_digits_val',)"])
    results = Trainer.test(cfg, trainer.model)
    assert list(results) == ["ema", "en", "rule_of_thumb"]
    table = (tmp_path / "output" / "evalnorm_table.txt").read_text()
    saved = json.loads((tmp_path / "output" / "evalnorm_results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    lines = table.splitlines()
    assert lines[1].split() == ["AP", "AP50", "AP75"]
    assert [line[:8].strip() for line in lines[2:]] == ["EMA", "EN", "EN - EMA", "1/B^2"]
    for line, mode in zip((lines[2], lines[3], lines[5]), ("ema", "en", "rule_of_thumb")):
        got = [float(v) for v in line[8:].split()]
        want = [results[mode]["bbox"][k] for k in ("AP", "AP50", "AP75")]
        assert got == pytest.approx(want, abs=0.006, nan_ok=True)
    # Modes are restored after the test.
    assert {m.mode for _, m in en_layers(trainer.model)} == {"en"}


def test_online_estimation_starts_at_start_iter(tmp_path):
    cfg = tiny_cfg(
        tmp_path,
        "SOLVER.MAX_ITER",
        "4",
        "MODEL.EVALNORM.ONLINE.START_ITER",
        "2",
        "MODEL.EVALNORM.ONLINE.LOG_PERIOD",
        "1",
    )
    trainer = train(cfg)
    layer = next(n for n, _ in en_layers(trainer.model) if n.startswith("backbone"))
    history = trainer.storage.history(f"evalnorm_alpha/{layer}").values()
    assert [it for _, it in history] == [0, 1, 2, 3]
    alphas = [v for v, _ in history]
    assert alphas[0] == alphas[1] == pytest.approx(0.25)  # the rule of thumb, untouched
    assert alphas[2] != pytest.approx(0.25) and alphas[3] != alphas[2]
    hook = next(h for h in trainer._hooks if isinstance(h, OnlineEstimationHook))
    assert hook.estimator.optimizer.state_dict()["state"][0]["step"] == 2  # iterations 2 and 3


def test_hook_drops_gradients_from_forwards_outside_an_iteration():
    model = convert_to_evalnorm(small_cnn(nn.BatchNorm2d), norm_batch_size=2).train()
    hook = OnlineEstimationHook(model)
    hook.trainer = types.SimpleNamespace(iter=0)
    hook.before_train()
    hook.before_step()
    model(torch.randn(2, 1, 8, 8))  # e.g. PreciseBN's passes after the previous step
    layers = [m for _, m in en_layers(model)]
    assert all(m._aux_grad is not None for m in layers)
    hook.before_step()
    assert all(m.take_aux_grad() is None for m in layers)
    hook.after_train()
    assert not any(m.estimate_online for m in layers)


def test_trainer_checks_the_config_and_a_missing_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match=r"MODEL\.EVALNORM\.ROI_HEAD_NORM"):
        Trainer(tiny_cfg(tmp_path, "MODEL.EVALNORM.ROI_HEAD_NORM", "EvalNorm"))
    cfg = tiny_cfg(tmp_path, "MODEL.WEIGHTS", str(tmp_path / "missing.pth"))
    trainer = Trainer(cfg)
    with pytest.raises(FileNotFoundError, match="missing.pth.*convert_imagenet_checkpoint"):
        trainer.resume_or_load(resume=False)


def test_square_size_replaces_only_the_resize(tmp_path):
    cfg = tiny_cfg(tmp_path, "INPUT.SQUARE_SIZE", "96", "INPUT.RANDOM_FLIP", "vertical")
    train_augs, test_augs = build_augmentation(cfg, True), build_augmentation(cfg, False)
    assert isinstance(train_augs[0], T.Resize) and train_augs[0].shape == (96, 96)
    assert isinstance(train_augs[1], T.RandomFlip) and train_augs[1].vertical
    assert len(test_augs) == 1 and test_augs[0].shape == (96, 96)
    cfg = tiny_cfg(tmp_path, "INPUT.SQUARE_SIZE", "0")
    assert isinstance(build_augmentation(cfg, False)[0], T.ResizeShortestEdge)

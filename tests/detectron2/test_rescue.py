"""Rescuing BN models: conversion, offline estimation, the rule-of-thumb tool, every row of the evaluation table."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detection_helpers import en_layers, rescue_overrides, tiny_cfg, train
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from helpers import ROOT, class_images, import_tool, randomize_batchnorm, small_cnn
from torch import nn

from evalnorm_det import (
    EvalNorm2d,
    MissingStatisticsError,
    Trainer,
    check_evalnorm_config,
    convert_to_evalnorm,
    estimate_offline,
    evalnorm_mode,
    keep_running_stats,
)
from evalnorm_det.config import TABLE_ROWS, norm_batch_sizes
from evalnorm_det.engine import (
    add_rescue_arguments,
    argument_parser,
    load_evalnorm_model,
    parse_args,
    row_evaluation,
    setup_cfg,
)
from evalnorm_det.modeling import convert_norms

TOOLS = ROOT / "tools"
DEMO = str(ROOT / "configs" / "demo" / "evalnorm_digits_2img.yaml")
BN_NORMS = ("MODEL.EVALNORM.BACKBONE_NORM", "BN", "MODEL.EVALNORM.ROI_HEAD_NORM", "BN")


def model_dict(path):
    return torch.load(path, weights_only=True)["model"]


def assert_only_coefficients_added(source, rescued, layer_names):
    """``rescued`` has every entry of ``source``, bit for bit, plus alpha/beta of each layer."""
    added = set(rescued) - set(source)
    assert added == {f"{n}.{k}" for n in layer_names for k in ("alpha_logit", "beta_logit")}
    for key, value in source.items():
        assert torch.equal(rescued[key], value), key


@pytest.fixture(scope="module")
def bn_checkpoint(tmp_path_factory):
    """A detectron2 Faster R-CNN trained 3 iterations with plain BN (B = 2 images, 16 ROIs)."""
    tmp = tmp_path_factory.mktemp("bn")
    cfg = tiny_cfg(tmp, *BN_NORMS)
    train(cfg)
    return tmp, Path(cfg.OUTPUT_DIR) / "model_final.pth"


def rescue_opts(tmp, checkpoint, *extra):
    """KEY VALUE overrides of the demo config for the BN model: tiny, its checkpoint, the tiny
    digits registered under ``tmp``, B given explicitly."""
    return rescue_overrides(tmp, checkpoint, BN_NORMS, extra)


def rescue_cfg(tmp, checkpoint, *extra):
    return setup_cfg(DEMO, rescue_opts(tmp, checkpoint, *extra), training=False)


def test_convert_norms_keeps_the_model_and_gives_each_place_its_b(tmp_path):
    cfg = tiny_cfg(tmp_path, *BN_NORMS, "MODEL.EVALNORM.NORM_BATCH_SIZE", "2")
    model = randomize_batchnorm(build_model(cfg)).eval()
    images = [{"image": torch.rand(3, 64, 64) * 255, "height": 64, "width": 64}]
    with torch.no_grad():
        before = model(images)[0]["instances"]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert convert_norms(cfg, model, norm_batch_sizes(cfg)) == len(names) > 0
    layers = dict(en_layers(model))
    assert sorted(layers) == sorted(names)
    for name, m in layers.items():
        b = 2 * 8 if name.startswith("roi_heads.") else 2
        assert m.norm_batch_size == b and m.alpha.item() == pytest.approx(1 / b**2)
        assert m.inplace  # each normalizes a convolution's output
    with torch.no_grad(), evalnorm_mode(model, "ema"):
        after = model(images)[0]["instances"]
    assert torch.equal(before.pred_boxes.tensor, after.pred_boxes.tensor)
    assert torch.equal(before.scores, after.scores)
    assert convert_norms(cfg, model, norm_batch_sizes(cfg)) == 0  # nothing left to convert


def test_frozen_bn_becomes_frozen_evalnorm(tmp_path):
    cfg = tiny_cfg(tmp_path, "MODEL.EVALNORM.BACKBONE_NORM", "FrozenBN")
    model = build_model(cfg)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules())
    convert_norms(cfg, model, norm_batch_sizes(cfg))
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert all(m.frozen for m in model.backbone.modules() if isinstance(m, EvalNorm2d))


@pytest.mark.parametrize(
    "argv,alpha_backbone,alpha_head",
    [
        ([], 1 / 4, 1 / 16**2),
        (["--coefficients", "simple"], 1 / 2, 1 / 16),
        (["--coefficients", "0.3", "--beta", "0.05"], 0.3, 0.3),
    ],
)
def test_convert_tool_adds_only_the_coefficients(bn_checkpoint, argv, alpha_backbone, alpha_head):
    tmp, checkpoint = bn_checkpoint
    output = tmp / f"rule{len(argv)}.pth"
    overrides = rescue_opts(tmp, checkpoint)
    import_tool("convert_to_evalnorm").main(
        ["--config", DEMO, "--output", str(output), *argv, *overrides]
    )
    source, rescued = model_dict(checkpoint), model_dict(output)
    layers = sorted({k.rsplit(".", 1)[0] for k in source if k.endswith("running_mean")})
    assert_only_coefficients_added(source, rescued, layers)
    for name in layers:
        alpha = torch.sigmoid(rescued[f"{name}.alpha_logit"]).item()
        beta = torch.sigmoid(rescued[f"{name}.beta_logit"]).item()
        expected = alpha_head if name.startswith("roi_heads.") else alpha_backbone
        assert alpha == pytest.approx(expected, rel=1e-6)
        assert beta == pytest.approx(0.05 if "--beta" in argv else expected, rel=1e-6)
    metadata = torch.load(output, weights_only=True)["evalnorm"]
    assert metadata["norm_batch_size"] == {"images_per_gpu": 2, "rois_per_gpu": 16}
    # Never overwritten without --overwrite.
    before = output.read_bytes()
    with pytest.raises(SystemExit, match="exists"):
        import_tool("convert_to_evalnorm").main(
            ["--config", DEMO, "--output", str(output), *overrides]
        )
    assert output.read_bytes() == before


def test_convert_tool_derives_b_over_its_num_gpus(bn_checkpoint):
    """MODEL.EVALNORM.NORM_BATCH_SIZE 0: B = SOLVER.IMS_PER_BATCH / --num-gpus (8 / 4 = 2)."""
    tmp, checkpoint = bn_checkpoint
    output = tmp / "four_gpus.pth"
    derived = ["MODEL.EVALNORM.NORM_BATCH_SIZE", "0", "SOLVER.IMS_PER_BATCH", "8"]
    argv = ["--config", DEMO, "--output", str(output), "--num-gpus", "4"]
    import_tool("convert_to_evalnorm").main([*argv, *rescue_opts(tmp, checkpoint, *derived)])
    metadata = torch.load(output, weights_only=True)["evalnorm"]
    assert metadata["norm_batch_size"] == {"images_per_gpu": 2, "rois_per_gpu": 16}
    rescued = model_dict(output)
    alpha = torch.sigmoid(rescued["backbone.stem.conv1.norm.alpha_logit"]).item()
    assert alpha == pytest.approx(1 / 2**2, rel=1e-6)


def test_folded_statistics_are_refused(tmp_path, bn_checkpoint):
    _, checkpoint = bn_checkpoint
    state = model_dict(checkpoint)
    for key in state:  # what FrozenBN saves after loading the MSRA R-50.pkl
        if key.startswith("backbone.") and key.endswith("running_mean"):
            state[key] = torch.zeros_like(state[key])
        if key.startswith("backbone.") and key.endswith("running_var"):
            state[key] = torch.ones_like(state[key])
    folded = tmp_path / "folded.pth"
    torch.save({"model": state}, folded)
    cfg = rescue_cfg(tmp_path, folded)
    with pytest.raises(MissingStatisticsError, match="exactly mean 0 and var 1.*backbone.stem"):
        load_evalnorm_model(cfg, norm_batch_sizes(cfg))


def test_estimate_offline_tool_changes_only_alpha_and_beta(tmp_path, bn_checkpoint):
    _, checkpoint = bn_checkpoint
    output = tmp_path / "offline.pth"
    offline = ["MODEL.EVALNORM.OFFLINE.MAX_ITER", "4", "MODEL.EVALNORM.OFFLINE.LOG_PERIOD", "2"]
    argv = ["--config-file", DEMO, "--output", str(output)]
    estimate_tool = import_tool("estimate_offline")
    parser = add_rescue_arguments(argument_parser(training=False), "x.pth")
    args = parse_args(parser, [*argv, *rescue_opts(tmp_path, checkpoint, *offline)])
    summary = estimate_tool.main(args)  # in this process: launch would start a new one
    assert summary["iterations"] == 4 and summary["stopped"] == "max_iter"
    assert all(math.isfinite(v) for v in summary["losses"])
    source, rescued = model_dict(checkpoint), model_dict(output)
    layers = sorted({k.rsplit(".", 1)[0] for k in source if k.endswith("running_mean")})
    assert_only_coefficients_added(source, rescued, layers)
    for name in layers:  # every layer's alpha and beta moved from the rule of thumb
        b = 16 if name.startswith("roi_heads.") else 2
        for key in ("alpha_logit", "beta_logit"):
            assert rescued[f"{name}.{key}"].item() != pytest.approx(-math.log(b**2 - 1), abs=1e-4)
    metadata = torch.load(output, weights_only=True)["evalnorm"]
    assert metadata["coefficients"] == "en_offline" and metadata["offline"]["iterations"] == 4
    before = output.read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        estimate_tool.main(args)
    assert output.read_bytes() == before


def test_estimate_offline_tool_on_evaluation_inputs_fits_the_backbone(tmp_path, bn_checkpoint):
    _, checkpoint = bn_checkpoint
    output = tmp_path / "offline.pth"
    offline = [
        "MODEL.EVALNORM.OFFLINE.MAX_ITER",
        "3",
        "MODEL.EVALNORM.OFFLINE.INPUTS",
        "evaluation",
    ]
    argv = ["--config-file", DEMO, "--output", str(output)]
    parser = add_rescue_arguments(argument_parser(training=False), "x.pth")
    args = parse_args(parser, [*argv, *rescue_opts(tmp_path, checkpoint, *offline)])
    summary = import_tool("estimate_offline").main(args)
    assert summary["iterations"] == 3 and all(math.isfinite(v) for v in summary["losses"])
    source, rescued = model_dict(checkpoint), model_dict(output)
    layers = sorted({k.rsplit(".", 1)[0] for k in source if k.endswith("running_mean")})
    assert_only_coefficients_added(source, rescued, layers)
    for name in layers:  # the backbone's moved from the rule of thumb; res5 (ROI head) kept it
        b = 16 if name.startswith("roi_heads.") else 2
        moved = rescued[f"{name}.alpha_logit"].item() != pytest.approx(
            -math.log(b**2 - 1), abs=1e-6
        )
        assert moved == name.startswith("backbone."), name


def test_calibrate_tool_keeps_the_best_factor_on_the_validation_split(tmp_path, bn_checkpoint):
    _, checkpoint = bn_checkpoint
    output = tmp_path / "calibrated.pth"
    calibration = ["TEST.EVALNORM_CALIBRATION.DATASET", "tiny_digits_train"]
    calibration += ["TEST.EVALNORM_CALIBRATION.FACTORS", "[1.0, 0.0, 0.5]"]
    argv = ["--config-file", DEMO, "--output", str(output)]
    tool = import_tool("calibrate_coefficients")
    parser = add_rescue_arguments(argument_parser(training=False), "x.pth")
    args = parse_args(parser, [*argv, *rescue_opts(tmp_path, checkpoint, *calibration)])
    result = tool.main(args)
    assert [f for f, _ in result["scores"]] == [0.0, 0.5, 1.0]
    finite = [(ap, -f) for f, ap in result["scores"] if math.isfinite(ap)]
    assert result["factor"] == (-max(finite)[1] if finite else 0.0)
    source, rescued = model_dict(checkpoint), model_dict(output)
    layers = sorted({k.rsplit(".", 1)[0] for k in source if k.endswith("running_mean")})
    assert_only_coefficients_added(source, rescued, layers)
    for name in layers:  # the rule of thumb times the factor
        b = 16 if name.startswith("roi_heads.") else 2
        alpha = torch.sigmoid(rescued[f"{name}.alpha_logit"]).item()
        assert alpha == pytest.approx(result["factor"] / b**2, rel=1e-5, abs=1e-12)
    metadata = torch.load(output, weights_only=True)["evalnorm"]
    assert metadata["coefficients"] == "calibrated"
    assert metadata["calibration"]["dataset"] == "tiny_digits_train"
    assert metadata["calibration"]["factor"] == result["factor"]
    args = parse_args(parser, [*argv, *rescue_opts(tmp_path, checkpoint)])
    with pytest.raises(ValueError, match="TEST.EVALNORM_CALIBRATION.DATASET is empty"):
        tool.main(args)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["TEST.EVALNORM_ROWS", "['ema', 'en_calibrated']"], "'en_calibrated', which needs"),
        (["TEST.EVALNORM_CALIBRATION.DATASET", "tiny_digits_val"], "is also in DATASETS.TEST"),
        (["TEST.EVALNORM_CALIBRATION.FACTORS", "[0.0, -1.0]"], r"FACTORS entry=-1.0"),
        (["TEST.EVALNORM_CALIBRATION.FACTORS", "[]"], "FACTORS is empty"),
        (["MODEL.EVALNORM.OFFLINE.INPUTS", "eval"], r"OFFLINE.INPUTS.*'eval'"),
    ],
)
def test_calibration_and_offline_settings_are_checked_before_launch(tmp_path, overrides, message):
    cfg = tiny_cfg(tmp_path, "DATASETS.TEST", "('tiny_digits_val',)", *overrides)
    with pytest.raises(ValueError, match=message):
        check_evalnorm_config(cfg, 1)


def offline_batches(n, batch_size=2, seed=0):
    images, _ = class_images(n * batch_size, seed=seed)
    return list(images.split(batch_size))


def mean_aux_loss(model, batches):
    """The auxiliary loss of every EvalNorm2d, averaged over layers and ``batches``, no step."""
    layers = [m for _, m in en_layers(model)]
    total = 0.0
    model.train()
    with torch.no_grad(), keep_running_stats(model):
        for m in layers:
            m.estimate_online = True
        for batch in batches:
            model(batch)
            total += sum(m.last_aux_loss.item() for m in layers) / len(layers)
            for m in layers:
                m.take_aux_grad()
        for m in layers:
            m.estimate_online = False
    model.eval()
    return total / len(batches)


def trained_bn_cnn():
    """small_cnn with BN, its statistics from microbatches of 2 (as if trained on 2 per GPU)."""
    torch.manual_seed(0)
    model = randomize_batchnorm(small_cnn(nn.BatchNorm2d)).train()
    with torch.no_grad():
        for batch in offline_batches(30, seed=1):
            model(batch)
    return convert_to_evalnorm(model, norm_batch_size=2)


def test_estimate_offline_lowers_the_auxiliary_loss_and_changes_nothing_else():
    model = trained_bn_cnn().eval()
    held_out = offline_batches(10, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_before = mean_aux_loss(model, held_out)
    summary = estimate_offline(model, iter(offline_batches(60, seed=3)), 60, lr=0.05)
    assert summary["iterations"] == 60 and summary["stopped"] == "max_iter"
    assert not model.training  # mode restored
    assert mean_aux_loss(model, held_out) < 0.9 * loss_before
    for key, value in model.state_dict().items():
        changed = not torch.equal(value, before[key])
        assert changed == key.endswith(("alpha_logit", "beta_logit")), key


def test_estimate_offline_finds_per_sample_statistics_at_b_1():
    # Trained with one sample per batch, each sample was normalized with its own statistics:
    # the auxiliary loss is zero at alpha = beta = 1, whatever the running statistics.
    layer = randomize_batchnorm(EvalNorm2d(4, norm_batch_size=1, init=0.3))
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(1, 4, 6, 6, generator=g) * 3 + 1 for _ in range(200)]
    estimate_offline(nn.Sequential(layer), iter(batches), 200, lr=0.1)
    assert layer.alpha.item() > 0.95 and layer.beta.item() > 0.95  # from 0.3


def test_estimate_offline_stops_on_a_plateau_or_when_data_ends():
    model = trained_bn_cnn()
    # A learning rate too small to change the loss: the second block of 5 does not improve.
    summary = estimate_offline(model, iter(offline_batches(40)), 40, lr=1e-12, patience=5)
    assert summary["stopped"] == "plateau" and summary["iterations"] == 10
    summary = estimate_offline(model, iter(offline_batches(3)), 40)
    assert summary["stopped"] == "data" and summary["iterations"] == 3


def test_precise_bn_mode_uses_population_statistics_and_restores_them():
    model = trained_bn_cnn().eval()
    batches = offline_batches(4, seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    conv = model[0].weight.detach().double()
    # fvcore's PreciseBN: the first BN's mean becomes the mean of the 4 batch means.
    expected = torch.stack(
        [nn.functional.conv2d(b.double(), conv, padding=1).mean((0, 2, 3)) for b in batches]
    ).mean(0)
    with row_evaluation(
        model, "precise_bn", train_batches=lambda: iter(batches), precise_bn_iters=4
    ):
        torch.testing.assert_close(model[1].running_mean.double(), expected, rtol=1e-5, atol=1e-6)
        assert all(m.mode == "ema" for _, m in en_layers(model))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_head_batch_stats_mode_normalizes_only_the_roi_heads_with_batch_statistics(tmp_path):
    cfg = tiny_cfg(tmp_path)
    model = build_model(cfg).eval()
    with row_evaluation(model, "head_batch_stats"):
        modes = {name: m.mode for name, m in en_layers(model)}
    assert {modes[n] for n in modes if n.startswith("roi_heads.")} == {"batch"}
    assert {modes[n] for n in modes if n.startswith("backbone.")} == {"ema"}
    assert {m.mode for _, m in en_layers(model)} == {"en"}  # restored


def test_eval_only_evaluates_a_bn_checkpoint_in_every_mode(tmp_path, bn_checkpoint):
    _, checkpoint = bn_checkpoint
    extra = ["TEST.EVALNORM_ROWS", "['all']", "TEST.PRECISE_BN.NUM_ITER", "2"]
    extra += ["MODEL.EVALNORM.OFFLINE.MAX_ITER", "2"]
    extra += ["TEST.EVALNORM_CALIBRATION.DATASET", "tiny_digits_train"]
    extra += ["TEST.EVALNORM_CALIBRATION.FACTORS", "[0.0, 1.0]"]
    cfg = rescue_cfg(tmp_path, checkpoint, *extra)
    model = load_evalnorm_model(cfg, norm_batch_sizes(cfg))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    results = Trainer.test(cfg, model)
    assert list(results) == list(TABLE_ROWS)
    for key, value in model.state_dict().items():  # every procedure put the model back
        assert torch.equal(value, before[key]), key
    with open(Path(cfg.OUTPUT_DIR) / "evalnorm_table.csv") as f:
        rows = list(csv.reader(f))
    labels = [TABLE_ROWS[m] for m in TABLE_ROWS]
    assert [r[0] for r in rows] == ["mode", *labels[:2], "EN - EMA", *labels[2:]]
    assert rows[0] == ["mode", "AP", "AP50", "AP75"]
    markdown = (Path(cfg.OUTPUT_DIR) / "evalnorm_table.md").read_text()
    assert "| mode | AP | AP50 | AP75 |" in markdown and "| EN offline |" in markdown
    assert "EN offline" in (Path(cfg.OUTPUT_DIR) / "evalnorm_table.txt").read_text()


@pytest.mark.parametrize(
    "name", ["estimate_offline", "convert_to_evalnorm", "calibrate_coefficients"]
)
def test_tools_have_help(name):
    proc = subprocess.run(
        [sys.executable, str(TOOLS / f"{name}.py"), "--help"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--norm-batch-size" in proc.stdout and "--overwrite" in proc.stdout
    assert "[--eval-only]" not in proc.stdout  # train_net's flags are not offered


def test_norm_batch_size_is_checked_in_training_and_used_in_evaluation(tmp_path):
    cfg = tiny_cfg(tmp_path, "MODEL.EVALNORM.NORM_BATCH_SIZE", "2", "SOLVER.IMS_PER_BATCH", "8")
    with pytest.raises(ValueError, match=r"NORM_BATCH_SIZE=2.*8 / 1 processes = 8 images"):
        check_evalnorm_config(cfg, world_size=1)
    check_evalnorm_config(cfg, world_size=4)  # 8 images on 4 GPUs: 2 each
    check_evalnorm_config(cfg, world_size=3, training=False)  # B is given: any GPU count
    assert norm_batch_sizes(cfg, world_size=3) == (2, 16, 4)
    with pytest.raises(ValueError, match="MODEL.EVALNORM.OFFLINE.PATIENCE=-1"):
        check_evalnorm_config(tiny_cfg(tmp_path, "MODEL.EVALNORM.OFFLINE.PATIENCE", "-1"), 1)
    with pytest.raises(ValueError, match="TEST.EVALNORM_ROWS entry='precise'"):
        check_evalnorm_config(tiny_cfg(tmp_path, "TEST.EVALNORM_ROWS", "['precise']"), 1)


def test_diagnose_tool_sweeps_the_coefficients(tmp_path, bn_checkpoint):
    _, checkpoint = bn_checkpoint
    tool = import_tool("diagnose_coefficients")
    argv = ["--config-file", DEMO, "--values", "0,1", "--factors", "0,1"]
    args = parse_args(tool.build_parser(), [*argv, *rescue_opts(tmp_path, checkpoint)])
    rows = tool.main(args)
    settings = [(r["sweep"], r["setting"]) for r in rows]
    head = [("ema", ""), ("en", ""), ("rule_of_thumb", "1/B^2")]
    assert settings[:7] == head + [(sweep, v) for sweep in ("fixed", "scaled") for v in (0.0, 1.0)]
    assert [s for kind, s in settings[7:]] == ["stem", "res2", "res3", "res4", "res5"]
    score = dict(zip(settings, (r["score"] for r in rows)))
    same = (("ema", ""), ("fixed", 0.0), ("scaled", 0.0)), (("en", ""), ("rule_of_thumb", "1/B^2"))
    for group in same:  # EMA three ways; a BN checkpoint's EN is the rule of thumb
        assert len({repr(score[s]) for s in group}) == 1, [score[s] for s in group]
    out = tmp_path / "output"
    assert "scaled" in (out / "coefficient_sweep.txt").read_text()
    assert len(json.loads((out / "coefficient_sweep.json").read_text())["rows"]) == len(rows)
    assert (out / "coefficient_sweep.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileExistsError, match="--overwrite"):
        tool.main(args)

"""RetinaNet with EvalNorm in its head, per-level or shared, from
configs/demo/evalnorm_retinanet_digits_2img.yaml on tiny digits (2 images per GPU: B = 2)."""

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detection_helpers import SMALL_RESNET, en_layers, tiny_cfg, tiny_overrides, train
from detectron2.layers import CycleBatchNormList
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from helpers import ROOT, randomize_batchnorm, reference_evalnorm
from torch import nn

from evalnorm_det import EvalNorm2d, check_evalnorm_config, evalnorm_mode
from evalnorm_det.config import norm_batch_sizes
from evalnorm_det.data import write_coco2014_layout
from evalnorm_det.modeling import CycleEvalNormList, EvalNormRetinaNet, convert_norms

DEMO = "demo/evalnorm_retinanet_digits_2img.yaml"
LEVELS = 5
SHAPES = [(2, 32, s, s) for s in (16, 8, 4, 2, 1)]  # p3-p7 of 128 px images, 32 channels


# detectron2's own RetinaNet with BN: per-level statistics in the head (CycleBatchNormList).
D2_BN_RETINANET = (
    "MODEL.META_ARCHITECTURE",
    "RetinaNet",
    "MODEL.BACKBONE.NAME",
    "build_retinanet_resnet_fpn_backbone",
    "MODEL.RESNETS.NORM",
    "BN",
    "MODEL.RETINANET.NORM",
    "BN",
)


def rn_cfg(tmp_path, *overrides):
    return tiny_cfg(tmp_path, *overrides, config=DEMO)


def head_norms(model):
    """The norm of every convolution of the head's two subnets (8)."""
    subnets = (model.head.cls_subnet, model.head.bbox_subnet)
    return [m for s in subnets for m in s if not isinstance(m, (nn.Conv2d, nn.ReLU))]


@pytest.mark.parametrize(
    "norm, stats, expected",
    [
        ("EN", "per_level", CycleEvalNormList),
        ("FrozenEN", "per_level", CycleEvalNormList),
        ("EN", "shared", EvalNorm2d),
        ("BN", "per_level", CycleBatchNormList),
        ("BN", "shared", nn.BatchNorm2d),
        ("GN", "per_level", nn.GroupNorm),
    ],
)
def test_head_norm_follows_the_keys(tmp_path, norm, stats, expected):
    cfg = rn_cfg(
        tmp_path, "MODEL.RETINANET.NORM", norm, "MODEL.EVALNORM.RETINANET_HEAD_STATS", stats
    )
    model = build_model(cfg)
    assert isinstance(model, EvalNormRetinaNet)
    assert model.backbone.output_shape().keys() == {"p3", "p4", "p5", "p6", "p7"}
    norms = head_norms(model)
    assert len(norms) == 8 and all(type(m) is expected for m in norms)
    if expected in (CycleEvalNormList, CycleBatchNormList):
        assert all(len(m) == LEVELS and m._affine and not m[0].affine for m in norms)
    if expected is CycleEvalNormList:
        frozen = norm == "FrozenEN"
        for m in norms:
            assert all(en.norm_batch_size == 2 and en.frozen == frozen for en in m)
            assert all(en.alpha.item() == pytest.approx(1 / 4) for en in m)
            assert m.weight.requires_grad == (not frozen)
    if expected is EvalNorm2d:
        assert all(m.affine and m.norm_batch_size == 2 for m in norms)


def test_same_names_as_detectron2_retinanet(tmp_path):
    """A detectron2 RetinaNet with BN (per-level head) has our model's names, less alpha/beta."""
    ours = build_model(rn_cfg(tmp_path))
    theirs = build_model(rn_cfg(tmp_path, *D2_BN_RETINANET))
    ours_keys = {k for k in ours.state_dict() if not k.endswith(("alpha_logit", "beta_logit"))}
    assert ours_keys == set(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        assert v.shape == ours.state_dict()[k].shape, k


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["MODEL.EVALNORM.RETINANET_HEAD_STATS", "per_image"], "RETINANET_HEAD_STATS"),
        (["MODEL.RETINANET.NORM", "XN"], "MODEL.RETINANET.NORM='XN'"),
        (["TEST.EVALNORM_ROWS", "['ema', 'head_batch_stats']"], "no ROI heads"),
        (["MODEL.META_ARCHITECTURE", "RetinaNet"], "EvalNormRetinaNet"),
        (
            ["MODEL.EVALNORM.MICROBATCH", "True", "MODEL.RETINANET.NORM", "BN"]
            + ["SOLVER.IMS_PER_BATCH", "4", "MODEL.EVALNORM.NORM_BATCH_SIZE", "2"],
            "MODEL.RETINANET.NORM='BN'",
        ),
    ],
)
def test_bad_keys_are_refused_before_launch(tmp_path, overrides, message):
    cfg = rn_cfg(tmp_path, *overrides)
    with pytest.raises(ValueError, match=message):
        check_evalnorm_config(cfg, world_size=1)


def test_all_rows_leave_out_the_roi_head_rows(tmp_path):
    from evalnorm_det.config import configured_rows

    cfg = rn_cfg(tmp_path, "TEST.EVALNORM_ROWS", "['all']")
    check_evalnorm_config(cfg, world_size=1)
    assert "head_batch_stats" not in configured_rows(cfg) and "en" in configured_rows(cfg)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{head stats: (cfg, trainer)} after 3 iterations with online estimation."""
    runs = {}
    for stats in ("per_level", "shared"):
        tmp_path = tmp_path_factory.mktemp(stats)
        cfg = rn_cfg(tmp_path, "MODEL.EVALNORM.RETINANET_HEAD_STATS", stats)
        runs[stats] = cfg, train(cfg)
    return runs


def test_per_level_statistics_and_coefficients_are_per_level(trained):
    _, trainer = trained["per_level"]
    for cycle in head_norms(trainer.model):
        # One update per iteration for each level's layer; levels learn other statistics.
        assert [m.num_batches_tracked.item() for m in cycle] == [3] * LEVELS
        means = torch.stack([m.running_mean for m in cycle])
        assert torch.cdist(means, means).triu(1)[np.triu_indices(LEVELS, 1)].min() > 1e-6
        alphas = [m.alpha.item() for m in cycle]
        assert len(set(alphas)) == LEVELS  # estimated per level, from the same 1/B^2
    layers = dict(en_layers(trainer.model))
    assert "head.cls_subnet.1.4" in layers and "head.cls_subnet.1.5" not in layers


@torch.no_grad()
def test_evaluation_at_level_k_uses_the_statistics_of_level_k(trained):
    _, trainer = trained["per_level"]
    cycle = head_norms(trainer.model)[0]
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(s, generator=g) * 2 + 1 for s in SHAPES]
    cycle.eval()
    try:
        for mode, coefficient in (("en", None), ("ema", 0.0)):
            with evalnorm_mode(cycle, mode):
                for k, x in enumerate(xs):
                    layer = cycle[k]
                    a = layer.alpha.item() if coefficient is None else coefficient
                    b = layer.beta.item() if coefficient is None else coefficient
                    expected = reference_evalnorm(
                        x.numpy(),
                        layer.running_mean.numpy(),
                        layer.running_var.numpy(),
                        cycle.weight.numpy(),
                        cycle.bias.numpy(),
                        a,
                        b,
                        layer.eps,
                    )
                    np.testing.assert_allclose(cycle(x).numpy(), expected, rtol=1e-4, atol=1e-4)
    finally:
        cycle.train()


def test_shared_en_is_one_evalnorm2d_called_at_every_level(trained):
    _, trainer = trained["shared"]
    model = trainer.model
    norm = head_norms(model)[0]
    assert type(norm) is EvalNorm2d and norm.num_batches_tracked.item() == 3 * LEVELS
    single = copy.deepcopy(norm)
    inputs = []
    handle = norm.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    norm.take_aux_grad()
    norm.estimate_online = single.estimate_online = True
    try:
        batch = next(iter(trainer.data_loader))
        model.train()
        with EventStorage():
            model(batch)
    finally:
        handle.remove()
        norm.estimate_online = False
    assert [x.shape[-1] for x in inputs] == [8, 4, 2, 1, 1]  # 64 px images: p3-p7
    for x in inputs:
        single(x)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(norm, name), getattr(single, name), rtol=0, atol=0)
    torch.testing.assert_close(norm.take_aux_grad(), single.take_aux_grad(), rtol=0, atol=0)


def test_trained_variants_evaluate_in_every_row(trained, tmp_path):
    from evalnorm_det import Trainer

    for stats, (cfg, trainer) in trained.items():
        cfg = cfg.clone()
        cfg.merge_from_list(["DATASETS.TEST", "('tiny_digits_val',)", "OUTPUT_DIR", str(tmp_path)])
        cfg.merge_from_list(["TEST.EVALNORM_ROWS", "['ema', 'en', 'rule_of_thumb', 'precise_bn']"])
        cfg.merge_from_list(["TEST.PRECISE_BN.NUM_ITER", "2"])
        results = Trainer.test(cfg, trainer.model)
        assert list(results) == ["ema", "en", "rule_of_thumb", "precise_bn"], stats
        assert all("AP" in r["bbox"] for r in results.values())


@torch.no_grad()
def test_bn_retinanet_is_rescued_with_per_level_statistics(tmp_path):
    """detectron2's BN RetinaNet (per-level head) becomes per-level EN keeping its statistics:
    in "ema" it evaluates as before."""
    cfg = rn_cfg(tmp_path, *D2_BN_RETINANET)
    bn = randomize_batchnorm(build_model(cfg))
    for m in bn.modules():
        if isinstance(m, CycleBatchNormList):
            m.weight.uniform_(0.5, 1.5)
    bn.eval()
    before = copy.deepcopy(bn.state_dict())
    images = [{"image": torch.rand(3, 64, 64) * 255, "height": 64, "width": 64}]
    features = [bn.backbone(bn.preprocess_image(images).tensor)[f] for f in bn.head_in_features]
    reference = bn.head(features)
    count = convert_norms(cfg, bn, norm_batch_sizes(cfg))
    cycles = [m for m in bn.modules() if isinstance(m, CycleBatchNormList)]
    assert cycles and all(type(m) is CycleEvalNormList for m in cycles)
    assert count == len(en_layers(bn))
    assert all(m.alpha.item() == pytest.approx(1 / 4) for c in cycles for m in c)
    state = bn.state_dict()
    for k, v in before.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)
    with evalnorm_mode(bn, "ema"):
        features = [bn.backbone(bn.preprocess_image(images).tensor)[f] for f in bn.head_in_features]
        torch.testing.assert_close(bn.head(features), reference, rtol=1e-5, atol=1e-6)
    with evalnorm_mode(bn, "rule_of_thumb"):
        assert not torch.allclose(bn.head(features)[0][0], reference[0][0], atol=1e-4)


def test_deploy_folds_the_shared_head_and_keeps_per_level_lists(trained):
    from evalnorm import fold_ema_layers

    for stats, (_, trainer) in trained.items():
        model = copy.deepcopy(trainer.model).eval()
        images = [{"image": torch.rand(3, 64, 64) * 255, "height": 64, "width": 64}]
        with torch.no_grad(), evalnorm_mode(model, "ema"):
            reference = model.head(
                [
                    model.backbone(model.preprocess_image(images).tensor)[f]
                    for f in model.head_in_features
                ]
            )
            model = fold_ema_layers(model)
            assert not en_layers(model), stats
            out = model.head(
                [
                    model.backbone(model.preprocess_image(images).tensor)[f]
                    for f in model.head_in_features
                ]
            )
        torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)


SMALL = [*SMALL_RESNET, "MODEL.FPN.OUT_CHANNELS", "32", *tiny_overrides()]


def train_net(tmp_path, *args):
    # This checkout's code, wherever the environment installed the package from.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"), PYTHONPATH=path)
    cmd = [sys.executable, str(ROOT / "tools" / "train_net.py"), *args]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("stats", ["per_level", "shared"])
def test_train_net_trains_and_evaluates(tmp_path, stats):
    write_coco2014_layout(str(tmp_path / "datasets"), num_train=4, num_val=3, image_size=64)
    out = tmp_path / "output"
    args = ["--config", "evalnorm_retinanet_2img.yaml", *SMALL, "OUTPUT_DIR", str(out)]
    args += ["MODEL.EVALNORM.RETINANET_HEAD_STATS", stats]
    train_net(tmp_path, *args, "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()")
    assert (out / "model_final.pth").is_file()
    log = train_net(tmp_path, "--eval-only", *args, "MODEL.WEIGHTS", str(out / "model_final.pth"))
    table = (out / "evalnorm_table.txt").read_text()
    assert [line[:8].strip() for line in table.splitlines()[2:]] == [
        "EMA",
        "EN",
        "EN - EMA",
        "1/B^2",
    ]
    assert "Starting training" not in log

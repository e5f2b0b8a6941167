"""The LazyConfig twins build what their yacs configs build, and
tools/lazyconfig_train_net.py trains, evaluates and refuses bad keys before launching."""

import importlib.util
import json
import math
import os

import pytest
import torch
from detection_helpers import register_tiny_digits
from detectron2.config import LazyConfig, instantiate
from detectron2.layers import CycleBatchNormList, FrozenBatchNorm2d
from detectron2.modeling import build_model
from helpers import ROOT
from torch import nn

from evalnorm_det import EvalNorm2d, add_evalnorm_config
from evalnorm_det.config import configured_rows
from evalnorm_det.engine import launch_checked, lazy_run_config, setup_cfg
from evalnorm_det.lazy import lazy_to_cfg, load_lazy_config
from evalnorm_det.modeling import CycleEvalNormList

CONFIGS = ROOT / "configs"
# (lazy config, yacs twin, the B of its EvalNorm layers: images, sampled ROIs and foreground ROIs
# per GPU where it has them).
TWINS = [
    ("demo/evalnorm_digits_2img.py", "demo/evalnorm_digits_2img.yaml", {2, 64}),
    ("demo/evalnorm_digits_mask_2img.py", "demo/evalnorm_digits_mask_2img.yaml", {2, 64}),
    ("demo/evalnorm_retinanet_digits_2img.py", "demo/evalnorm_retinanet_digits_2img.yaml", {2}),
    ("evalnorm_frcnn_2img.py", "evalnorm_frcnn_2img.yaml", {2, 128}),
    ("evalnorm_frcnn_fpn_2img.py", "evalnorm_frcnn_fpn_2img.yaml", {2, 128}),
    ("evalnorm_mask_rcnn_2img.py", "evalnorm_mask_rcnn_2img.yaml", {2, 128}),
    ("evalnorm_mask_rcnn_fpn_2img.py", "evalnorm_mask_rcnn_fpn_2img.yaml", {2, 128, 32}),
    ("evalnorm_retinanet_2img.py", "evalnorm_retinanet_2img.yaml", {2}),
]
LAZY = sorted(
    p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.py") if "common" not in p.parts
)
MASK_DEMO = "demo/evalnorm_digits_mask_2img"
RETINANET_DEMO = "demo/evalnorm_retinanet_digits_2img"


def world_size(name):
    """The GPUs a config is for: the demos run on one process, the paper's configs on 8."""
    return 1 if name.startswith("demo/") else 8


def yacs_cfg(name, *overrides):
    cfg = setup_cfg(str(CONFIGS / name), list(overrides), world_size=world_size(name)).clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def key_value(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def norm_summary(model):
    """Per norm layer: type, frozen or not, B and evaluation mode (EvalNorm)."""
    rows = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)):
            frozen = isinstance(m, FrozenBatchNorm2d) or getattr(m, "frozen", False)
            en = (m.norm_batch_size, m.mode) if isinstance(m, EvalNorm2d) else None
            rows[name] = (type(m).__name__, frozen, en)
    return rows


def test_every_lazy_config_has_a_tested_twin_and_instantiates():
    assert LAZY == sorted(py for py, _, _ in TWINS)
    for name in LAZY:
        cfg = LazyConfig.load(str(CONFIGS / name))
        assert {"model", "dataloader", "optimizer", "lr_multiplier", "train", "evalnorm"} <= set(
            cfg
        )
        instantiate(cfg.lr_multiplier)


def assert_same_model(ours, theirs):
    """Same module tree, norms (type, frozen, B, mode), parameters and buffers."""
    assert [(n, type(m)) for n, m in ours.named_modules()] == [
        (n, type(m)) for n, m in theirs.named_modules()
    ]
    summary = norm_summary(ours)
    assert summary == norm_summary(theirs)
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in theirs.state_dict().items()}
    assert [(n, p.requires_grad) for n, p in ours.named_parameters()] == [
        (n, p.requires_grad) for n, p in theirs.named_parameters()
    ]
    return {en[0] for _, _, en in summary.values() if en}


@pytest.mark.parametrize("lazy_name, yacs_name, bs", TWINS)
def test_twins_build_the_same_model_and_settings(lazy_name, yacs_name, bs):
    yacs = yacs_cfg(yacs_name)
    lazy = LazyConfig.load(str(CONFIGS / lazy_name))
    torch.manual_seed(0)
    assert assert_same_model(instantiate(lazy.model), build_model(yacs)) == bs
    # The settings the trainer, hooks and table read.
    derived = lazy_to_cfg(lazy, world_size=world_size(yacs_name))
    for key in ("MODEL.EVALNORM", "TEST.EVALNORM_ROWS", "TEST.EVALNORM_CALIBRATION"):
        first, rest = key.split(".")
        assert derived[first][rest] == yacs[first][rest], key
    for key in (
        "SOLVER.IMS_PER_BATCH",
        "SOLVER.MAX_ITER",
        "DATASETS.TRAIN",
        "DATASETS.TEST",
        "MODEL.META_ARCHITECTURE",
        "MODEL.MASK_ON",
        "INPUT.MASK_FORMAT",
        "MODEL.RETINANET.NORM",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
        "MODEL.ROI_HEADS.POSITIVE_FRACTION",
    ):
        assert key_value(derived, key) == key_value(yacs, key), key
    assert derived.MODEL.WEIGHTS == yacs.MODEL.WEIGHTS and derived.SEED == yacs.SEED
    assert derived.SOLVER.CHECKPOINT_PERIOD == yacs.SOLVER.CHECKPOINT_PERIOD
    # The same learning rate at every step of the schedule.
    ours_sched = instantiate(lazy.lr_multiplier)
    from detectron2.solver import build_lr_scheduler

    theirs_sched = build_lr_scheduler(yacs, torch.optim.SGD([nn.Parameter(torch.zeros(1))], 1.0))
    for where in (0.0, 0.001, 0.5, 0.99):
        step = int(where * yacs.SOLVER.MAX_ITER)
        assert ours_sched(step / yacs.SOLVER.MAX_ITER) == pytest.approx(
            theirs_sched._multiplier(step / yacs.SOLVER.MAX_ITER)
        )
    assert lazy.optimizer.lr == yacs.SOLVER.BASE_LR


@pytest.mark.parametrize("demo", ["demo/evalnorm_digits_2img", MASK_DEMO, RETINANET_DEMO])
def test_demo_twins_give_the_same_detections(demo):
    yacs = yacs_cfg(f"{demo}.yaml")
    lazy = LazyConfig.load(str(CONFIGS / f"{demo}.py"))
    ours, theirs = instantiate(lazy.model), build_model(yacs)
    with torch.no_grad():
        for p in theirs.state_dict().values():
            if p.is_floating_point():
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))  # weights of no initial value
    ours.load_state_dict(theirs.state_dict())
    for model in (ours, theirs):
        model.eval()  # detections from random weights:
        scorer = model.roi_heads.box_predictor if hasattr(model, "roi_heads") else model
        scorer.test_score_thresh = 0.0
    torch.manual_seed(0)
    images = [{"image": torch.rand(3, 128, 128) * 255, "height": 128, "width": 128}]
    with torch.no_grad():
        a, b = ours(images)[0]["instances"], theirs(images)[0]["instances"]
    assert len(a) == len(b) > 0
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.scores, b.scores)
    assert a.has("pred_masks") == (demo == MASK_DEMO)
    if a.has("pred_masks"):
        assert torch.equal(a.pred_masks, b.pred_masks)


def test_mask_heads_b_follows_the_roi_heads_sampler_as_in_yacs():
    """int(48 x 0.5) = 24 foreground ROIs per image: B = 2 x 24 in the mask head, by
    interpolation of the ROI heads' keys, as the yacs builder derives it."""
    lazy = load_lazy_config(
        str(CONFIGS / "evalnorm_mask_rcnn_fpn_2img.py"),
        ["model.roi_heads.batch_size_per_image=48", "model.roi_heads.positive_fraction=0.5"],
    )
    yacs = yacs_cfg(
        "evalnorm_mask_rcnn_fpn_2img.yaml",
        *["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "48", "MODEL.ROI_HEADS.POSITIVE_FRACTION", "0.5"],
    )
    ours = instantiate(lazy.model)
    assert assert_same_model(ours, build_model(yacs)) == {2, 96, 48}
    mask_bs = {m.norm_batch_size for m in ours.roi_heads.mask_head.modules() if hasattr(m, "mode")}
    assert mask_bs == {48}


@pytest.mark.parametrize(
    "norm, stats", [("EN", "shared"), ("FrozenEN", "per_level"), ("BN", "per_level")]
)
def test_retinanet_head_norm_follows_the_evalnorm_key_as_in_yacs(norm, stats):
    overrides = [
        f"model.head.norm.norm={norm}",
        f"evalnorm.MODEL.EVALNORM.RETINANET_HEAD_STATS={stats}",
    ]
    lazy = load_lazy_config(str(CONFIGS / f"{RETINANET_DEMO}.py"), overrides)
    yacs = yacs_cfg(
        f"{RETINANET_DEMO}.yaml",
        *["MODEL.RETINANET.NORM", norm, "MODEL.EVALNORM.RETINANET_HEAD_STATS", stats],
    )
    ours = instantiate(lazy.model)
    assert assert_same_model(ours, build_model(yacs)) == {2}
    expected = {"shared": EvalNorm2d, "per_level": CycleEvalNormList}[stats]
    assert isinstance(ours.head.cls_subnet[1], CycleBatchNormList if norm == "BN" else expected)
    derived = lazy_to_cfg(lazy, world_size=1)
    assert derived.MODEL.RETINANET.NORM == norm
    assert derived.MODEL.EVALNORM.RETINANET_HEAD_STATS == stats
    lazy.model.head.norm.head_stats = "per_image"
    with pytest.raises(ValueError, match="head_stats='per_image'"):
        instantiate(lazy.model.head.norm)


@pytest.mark.parametrize(
    "demo, override, message",
    [
        (
            RETINANET_DEMO,
            "evalnorm.TEST.EVALNORM_ROWS=[ema,head_batch_stats]",
            r"model\._target_='EvalNormRetinaNet' has no ROI heads",
        ),
        (
            RETINANET_DEMO,
            "evalnorm.MODEL.EVALNORM.RETINANET_HEAD_STATS=per_image",
            r"evalnorm\.MODEL\.EVALNORM\.RETINANET_HEAD_STATS='per_image'",
        ),
        (RETINANET_DEMO, "model.head.norm.norm=XN", r"model\.head\.norm='XN'"),
        (
            RETINANET_DEMO,
            "model._target_=detectron2.modeling.RetinaNet",
            r"needs model\._target_ 'EvalNormRetinaNet'",
        ),
        (
            MASK_DEMO,
            "model.roi_heads.positive_fraction=0.01",
            r"model\.roi_heads\.positive_fraction=0\.01",
        ),
        (
            MASK_DEMO,
            "dataloader.train.mapper.instance_mask_format=polygon",
            r"dataloader\.train\.mapper\.instance_mask_format='polygon'",
        ),
    ],
)
def test_retinanet_and_mask_checks_apply_as_for_yacs(demo, override, message):
    with pytest.raises(ValueError, match=message):
        lazy_to_cfg(load_lazy_config(str(CONFIGS / f"{demo}.py"), [override]))


def test_retinanet_and_mask_checks_apply_only_to_those_models():
    box_demo = str(CONFIGS / "demo/evalnorm_digits_2img.py")
    for override in (
        "model.roi_heads.positive_fraction=0.01",
        "evalnorm.TEST.EVALNORM_ROWS=[head_batch_stats]",
    ):
        cfg = lazy_to_cfg(load_lazy_config(box_demo, [override]))
        assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" and not cfg.MODEL.MASK_ON
    rows = lazy_to_cfg(
        load_lazy_config(
            str(CONFIGS / f"{RETINANET_DEMO}.py"), ["evalnorm.TEST.EVALNORM_ROWS=[all]"]
        )
    )
    assert "head_batch_stats" not in configured_rows(rows) and "en" in configured_rows(rows)


def test_bad_keys_and_values_are_refused_naming_the_key():
    demo = str(CONFIGS / "demo/evalnorm_digits_2img.py")
    with pytest.raises(ValueError, match=r"evalnorm\.MODEL\.EVALNORM\.INIT='bogus'"):
        lazy_to_cfg(load_lazy_config(demo, ["evalnorm.MODEL.EVALNORM.INIT=bogus"]))
    with pytest.raises(KeyError, match=r"evalnorm\.MODEL\.EVALNORM\.NO_SUCH"):
        lazy_to_cfg(load_lazy_config(demo, ["evalnorm.MODEL.EVALNORM.NO_SUCH=1"]))
    with pytest.raises(KeyError, match=r"train\.max_itr"):
        load_lazy_config(demo, ["train.max_itr=5"])
    with pytest.raises(KeyError, match="takes no argument 'no_such'"):
        load_lazy_config(demo, ["model.proposal_generator.head.no_such=1"])
    load_lazy_config(demo, ["model.roi_heads.proposal_append_gt=False"])  # an argument: fine
    with pytest.raises(ValueError, match=r"dataloader\.train\.total_batch_size=2 / 1 processes"):
        lazy_to_cfg(load_lazy_config(demo, ["evalnorm.MODEL.EVALNORM.NORM_BATCH_SIZE=4"]))
    with pytest.raises(ValueError, match="lazyconfig_train_net"):
        setup_cfg(demo)


def load_tool():
    path = ROOT / "tools" / "lazyconfig_train_net.py"
    spec = importlib.util.spec_from_file_location("lazyconfig_train_net", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def tool_args(tool, *argv, config="demo/evalnorm_digits_2img.py"):
    from evalnorm_det.engine import argument_parser, parse_args

    return parse_args(argument_parser(), ["--config", config, *argv])


def test_entry_point_refuses_before_launch(monkeypatch):
    tool = load_tool()
    launched = []
    monkeypatch.setattr("evalnorm_det.engine.defaults.launch", lambda *a, **k: launched.append(a))
    for demo, bad, error in (
        ("demo/evalnorm_digits_2img", "evalnorm.MODEL.EVALNORM.ONLINE.LR=-1", ValueError),
        ("demo/evalnorm_digits_2img", "evalnorm.MODEL.EVALNORM.ONLNE.LR=1", KeyError),
        ("demo/evalnorm_digits_2img", "train.max_itr=2", KeyError),
        (MASK_DEMO, "model.roi_heads.mask_head.input_shape.chanels=8", KeyError),
        (RETINANET_DEMO, "evalnorm.MODEL.EVALNORM.RETINANET_HEAD_STATS=per_image", ValueError),
    ):
        with pytest.raises(error, match=bad.split("=")[0].replace(".", r"\.")):
            launch_checked(tool.main, tool_args(tool, bad, config=f"{demo}.py"), lazy_run_config)
    assert not launched
    for demo in ("demo/evalnorm_digits_2img", MASK_DEMO, RETINANET_DEMO):
        launch_checked(tool.main, tool_args(tool, config=f"{demo}.py"), lazy_run_config)
    assert len(launched) == 3


# Overrides that keep every detection of a demo's model (none is above 0.05 after 2 iterations).
KEEP_ALL = {
    MASK_DEMO: "model.roi_heads.box_predictor.test_score_thresh=0.0",
    RETINANET_DEMO: "model.test_score_thresh=0.0",
}


@pytest.mark.parametrize(
    "demo, first_norm, mask",
    [
        ("demo/evalnorm_digits_2img", "backbone.stem.conv1.norm", False),
        (MASK_DEMO, "backbone.stem.conv1.norm", True),
        (RETINANET_DEMO, "backbone.bottom_up.stem.conv1.norm", False),
    ],
)
def test_train_two_iterations_then_eval_only(tmp_path, demo, first_norm, mask):
    register_tiny_digits(tmp_path / "datasets")
    tool = load_tool()
    out = tmp_path / "output"
    small = [
        "dataloader.train.dataset.names=[tiny_digits_train]",
        "dataloader.test.dataset.names=tiny_digits_val",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "train.max_iter=2",
        "train.checkpointer.period=1",
        "evalnorm.MODEL.EVALNORM.ONLINE.LOG_PERIOD=1",
        f"train.output_dir={out}",
    ]
    if demo in KEEP_ALL:  # every detection kept: boxes and masks to score after 2 iterations
        small.append(KEEP_ALL[demo])
    config = f"{demo}.py"
    tool.main(tool_args(tool, *small, config=config))
    assert (out / "model_final.pth").is_file() and (out / "model_0000000.pth").is_file()
    assert (out / "config.yaml").is_file()
    table = (out / "evalnorm_table.txt").read_text()
    rows = [line[:8].strip() for line in table.splitlines()]
    assert rows[2:] == ["EMA", "EN", "EN - EMA", "1/B^2"]
    assert ("mask AP75" in table) == mask
    checkpoint = torch.load(out / "model_final.pth", weights_only=False)
    assert "OnlineEstimationHook" in str(checkpoint["trainer"]["hooks"])
    # alpha/beta moved from their initial 1/B^2 in training: the online estimation ran.
    logits = [v for k, v in checkpoint["model"].items() if k.endswith("alpha_logit")]
    start = torch.logit(torch.tensor(1 / 4.0))
    assert logits and any(not torch.allclose(v, start) for v in logits)
    metrics = (out / "metrics.json").read_text()
    assert f"evalnorm_alpha/{first_norm}" in metrics

    os.remove(out / "evalnorm_table.txt")
    rows_override = "evalnorm.TEST.EVALNORM_ROWS=[ema,simple]"
    weights = f"train.init_checkpoint={out / 'model_final.pth'}"
    tool.main(tool_args(tool, "--eval-only", *small, weights, rows_override, config=config))
    table = (out / "evalnorm_table.txt").read_text()
    assert [line[:8].strip() for line in table.splitlines()][2:] == ["EMA", "1/B"]
    assert ("mask AP75" in table) == mask
    results = json.loads((out / "evalnorm_results.json").read_text())
    tasks = {"bbox", "segm"} if mask else {"bbox"}
    assert all(set(r) == tasks for r in results.values())
    if demo in KEEP_ALL:
        aps = [t[m] for r in results.values() for t in r.values() for m in ("AP", "AP50", "AP75")]
        assert aps and all(math.isfinite(v) for v in aps)


def test_yacs_settings_round_trip():
    """Every key of the evalnorm node is a yacs key, with the yacs default."""
    from detectron2.config import get_cfg

    from evalnorm_det.lazy import evalnorm_defaults

    cfg = get_cfg()
    add_evalnorm_config(cfg)
    node = evalnorm_defaults()
    assert dict(node.MODEL.EVALNORM.ONLINE) == dict(cfg.MODEL.EVALNORM.ONLINE)
    assert list(node.TEST.EVALNORM_ROWS) == list(cfg.TEST.EVALNORM_ROWS)
    assert set(node.MODEL.EVALNORM) == set(cfg.MODEL.EVALNORM)

"""The LazyConfig twins build what their yacs configs build, and
tools/lazyconfig_train_net.py trains, evaluates and refuses bad keys before launching."""

import importlib.util
import os

import pytest
import torch
from detection_helpers import register_tiny_digits
from detectron2.config import LazyConfig, instantiate
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from helpers import ROOT
from torch import nn

from evalnorm_det import EvalNorm2d, add_evalnorm_config
from evalnorm_det.engine import launch_checked, lazy_run_config, setup_cfg
from evalnorm_det.lazy import lazy_to_cfg, load_lazy_config

CONFIGS = ROOT / "configs"
TWINS = [
    ("demo/evalnorm_digits_2img.py", "demo/evalnorm_digits_2img.yaml"),
    ("evalnorm_frcnn_2img.py", "evalnorm_frcnn_2img.yaml"),
    ("evalnorm_frcnn_fpn_2img.py", "evalnorm_frcnn_fpn_2img.yaml"),
]
LAZY = sorted(
    p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.py") if "common" not in p.parts
)


def yacs_cfg(name):
    cfg = setup_cfg(str(CONFIGS / name), world_size=8 if "frcnn" in name else 1).clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
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
    assert LAZY == sorted(py for py, _ in TWINS)
    for name in LAZY:
        cfg = LazyConfig.load(str(CONFIGS / name))
        assert {"model", "dataloader", "optimizer", "lr_multiplier", "train", "evalnorm"} <= set(
            cfg
        )
        instantiate(cfg.lr_multiplier)


@pytest.mark.parametrize("lazy_name, yacs_name", TWINS)
def test_twins_build_the_same_model_and_settings(lazy_name, yacs_name):
    yacs = yacs_cfg(yacs_name)
    lazy = LazyConfig.load(str(CONFIGS / lazy_name))
    torch.manual_seed(0)
    ours, theirs = instantiate(lazy.model), build_model(yacs)
    assert [(n, type(m)) for n, m in ours.named_modules()] == [
        (n, type(m)) for n, m in theirs.named_modules()
    ]
    summary = norm_summary(ours)
    assert summary == norm_summary(theirs)
    bs = {b for _, _, en in summary.values() if en for b in [en[0]]}
    assert bs == {2, 2 * yacs.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE}
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in theirs.state_dict().items()}
    assert [(n, p.requires_grad) for n, p in ours.named_parameters()] == [
        (n, p.requires_grad) for n, p in theirs.named_parameters()
    ]
    # The settings the trainer, hooks and table read.
    derived = lazy_to_cfg(lazy, world_size=8 if "frcnn" in yacs_name else 1)
    for key in ("MODEL.EVALNORM", "TEST.EVALNORM_ROWS", "TEST.EVALNORM_CALIBRATION"):
        first, rest = key.split(".")
        assert derived[first][rest] == yacs[first][rest], key
    for key in ("SOLVER.IMS_PER_BATCH", "SOLVER.MAX_ITER", "DATASETS.TRAIN", "DATASETS.TEST"):
        first, rest = key.split(".")
        assert derived[first][rest] == yacs[first][rest], key
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


def test_demo_twins_give_the_same_detections():
    yacs = yacs_cfg("demo/evalnorm_digits_2img.yaml")
    lazy = LazyConfig.load(str(CONFIGS / "demo/evalnorm_digits_2img.py"))
    ours, theirs = instantiate(lazy.model), build_model(yacs)
    with torch.no_grad():
        for p in theirs.state_dict().values():
            if p.is_floating_point():
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))  # weights of no initial value
    ours.load_state_dict(theirs.state_dict())
    for model in (ours, theirs):
        model.eval()
        model.roi_heads.box_predictor.test_score_thresh = 0.0  # detections from random weights
    torch.manual_seed(0)
    images = [{"image": torch.rand(3, 128, 128) * 255, "height": 128, "width": 128}]
    with torch.no_grad():
        a, b = ours(images)[0]["instances"], theirs(images)[0]["instances"]
    assert len(a) == len(b) > 0
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.scores, b.scores)


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


def tool_args(tool, *argv):
    from evalnorm_det.engine import argument_parser, parse_args

    return parse_args(argument_parser(), ["--config", "demo/evalnorm_digits_2img.py", *argv])


def test_entry_point_refuses_before_launch(monkeypatch):
    tool = load_tool()
    launched = []
    monkeypatch.setattr("evalnorm_det.engine.defaults.launch", lambda *a, **k: launched.append(a))
    for bad, error in (
        ("evalnorm.MODEL.EVALNORM.ONLINE.LR=-1", ValueError),
        ("evalnorm.MODEL.EVALNORM.ONLNE.LR=1", KeyError),
        ("train.max_itr=2", KeyError),
    ):
        with pytest.raises(error, match=bad.split("=")[0].replace(".", r"\.")):
            launch_checked(tool.main, tool_args(tool, bad), lazy_run_config)
    assert not launched
    launch_checked(tool.main, tool_args(tool), lazy_run_config)
    assert len(launched) == 1


def test_train_two_iterations_then_eval_only(tmp_path):
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
    tool.main(tool_args(tool, *small))
    assert (out / "model_final.pth").is_file() and (out / "model_0000000.pth").is_file()
    assert (out / "config.yaml").is_file()
    rows = [line[:8].strip() for line in (out / "evalnorm_table.txt").read_text().splitlines()]
    assert rows[2:] == ["EMA", "EN", "EN - EMA", "1/B^2"]
    checkpoint = torch.load(out / "model_final.pth", weights_only=False)
    assert "OnlineEstimationHook" in str(checkpoint["trainer"]["hooks"])
    # alpha/beta moved from their initial 1/B^2 in training: the online estimation ran.
    logits = [v for k, v in checkpoint["model"].items() if k.endswith("alpha_logit")]
    start = torch.logit(torch.tensor(1 / 4.0))
    assert logits and any(not torch.allclose(v, start) for v in logits)
    metrics = (out / "metrics.json").read_text()
    assert "evalnorm_alpha/backbone.stem.conv1.norm" in metrics

    os.remove(out / "evalnorm_table.txt")
    rows_override = "evalnorm.TEST.EVALNORM_ROWS=[ema,simple]"
    weights = f"train.init_checkpoint={out / 'model_final.pth'}"
    tool.main(tool_args(tool, "--eval-only", *small, weights, rows_override))
    rows = [line[:8].strip() for line in (out / "evalnorm_table.txt").read_text().splitlines()]
    assert rows[2:] == ["EMA", "1/B"]


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

"""Bad input stops early, with an error naming what is wrong, before any output is overwritten:
a misspelled config key, a checkpoint for another architecture, a missing dataset folder, NaN
in training. (The other rows of the bad-input table are tested beside their features.)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detection_helpers import CONFIGS, SMALL_RESNET, en_layers, tiny_cfg, tiny_fpn_cfg, train
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.modeling import build_model
from helpers import ROOT

from evalnorm_det import Trainer
from evalnorm_det.engine import setup_cfg
from evalnorm_det.utils import CheckpointError

DEMO = str(CONFIGS / "demo" / "evalnorm_digits_2img.yaml")


def files(folder):
    """{relative path: bytes} of every file under ``folder``."""
    return {
        os.path.relpath(os.path.join(d, f), folder): Path(d, f).read_bytes()
        for d, _, names in os.walk(folder)
        for f in names
    }


@pytest.mark.parametrize(
    "opts", [["SOLVER.MAX_ITERS", "10"], ["MODEL.EVALNORM.ONLINE.LEARNING_RATE", "0.1"]]
)
def test_misspelled_key_is_named(opts):
    # yacs's merge_from_list asserts: AssertionError("Non-existent key: ...").
    with pytest.raises(AssertionError, match="Non-existent key: " + opts[0].replace(".", r"\.")):
        setup_cfg(DEMO, opts, world_size=1)


def test_misspelled_key_stops_train_net_before_output_dir_is_touched(tmp_path):
    out = tmp_path / "output"
    out.mkdir()
    (out / "last_checkpoint").write_text("model_0000009.pth")
    (out / "model_0000009.pth").write_bytes(b"previous run")
    before = files(out)
    cmd = [sys.executable, str(ROOT / "tools" / "train_net.py"), "--config-file", DEMO]
    proc = subprocess.run(
        [*cmd, "SOLVER.BASE_LRR", "0.1", "OUTPUT_DIR", str(out)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "Non-existent key: SOLVER.BASE_LRR" in proc.stderr
    assert files(out) == before  # no config.yaml, log.txt or checkpoint written or replaced


@pytest.mark.parametrize(
    "case",
    ["truncated weights", "missing weights", "other architecture", "missing dataset", "resume"],
)
def test_bad_files_stop_train_net_before_output_dir_is_touched(tmp_path, case):
    """The checkpoint to load and the datasets' files are checked before any worker starts:
    detectron2's set-up would otherwise write config.yaml and log.txt to OUTPUT_DIR first."""
    out = tmp_path / "output"
    out.mkdir()
    (out / "config.yaml").write_text("the previous run's config")
    opts, expected = [], ""
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "no_datasets"))
    if case == "truncated weights":
        weights = tmp_path / "weights.pth"
        torch.save({"model": {"w": torch.zeros(1000)}}, weights)
        weights.write_bytes(weights.read_bytes()[:500])
        opts, expected = ["MODEL.WEIGHTS", str(weights)], f"{weights}: cannot be read"
    elif case == "missing weights":
        opts, expected = ["MODEL.WEIGHTS", str(tmp_path / "nope.pth")], "does not exist"
    elif case == "other architecture":
        weights = save_model(tiny_fpn_cfg(tmp_path / "fpn"), tmp_path / "fpn.pth")
        opts, expected = ["MODEL.WEIGHTS", weights], "a checkpoint for another architecture"
    elif case == "missing dataset":
        opts = ["DATASETS.TRAIN", "('coco_2014_train',)"]
        expected = "not found while loading DATASETS.TRAIN coco_2014_train"
    else:
        (out / "model_0000001.pth").write_bytes(b"")
        (out / "last_checkpoint").write_text("model_0000001.pth")
        opts, expected = ["--resume"], f"{out / 'model_0000001.pth'}: empty file"
    before = files(out)
    cmd = [sys.executable, str(ROOT / "tools" / "train_net.py"), "--config-file", DEMO]
    flags = [o for o in opts if o.startswith("--")]
    overrides = [o for o in opts if not o.startswith("--")]
    proc = subprocess.run(
        [*cmd, *flags, *overrides, "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(out)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-2000:]
    assert files(out) == before  # config.yaml not replaced, no log.txt, nothing else


def test_coefficients_outside_0_1_in_the_config_are_named(tmp_path):
    cfg = tiny_cfg(tmp_path, "MODEL.EVALNORM.INIT", "value", "MODEL.EVALNORM.INIT_ALPHA", "1.5")
    with pytest.raises(ValueError, match=r"MODEL\.EVALNORM\.INIT_ALPHA"):
        Trainer(cfg)


def save_model(cfg, path):
    torch.save({"model": build_model(cfg).state_dict()}, path)
    return str(path)


def load_into_c4(tmp_path, weights):
    cfg = tiny_cfg(tmp_path, *SMALL_RESNET, "MODEL.WEIGHTS", weights)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    return trainer


def test_fpn_checkpoint_into_the_c4_model_lists_the_keys(tmp_path):
    weights = save_model(tiny_fpn_cfg(tmp_path / "fpn"), tmp_path / "fpn.pth")
    with pytest.raises(CheckpointError) as info:
        load_into_c4(tmp_path, weights)
    message = str(info.value)
    assert message.startswith(f"{weights}: a checkpoint for another architecture")
    # What the model lacks and what the checkpoint has instead, by name.
    assert "rpn_head.conv.weight (32, 32, 3, 3) vs (128, 128, 3, 3)" in message
    assert "parameters not in it: backbone.stem.conv1.weight" in message
    assert "the model does not have: backbone.fpn_lateral2.weight" in message


def test_checkpoint_of_other_widths_lists_the_mismatched_shapes(tmp_path):
    wide = tiny_cfg(tmp_path / "wide", *SMALL_RESNET, "MODEL.RESNETS.WIDTH_PER_GROUP", "16")
    weights = save_model(wide, tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match=r"entries of other shapes") as info:
        load_into_c4(tmp_path, weights)
    assert "backbone.res2.0.conv1.weight (16, 16, 1, 1) vs (8, 16, 1, 1)" in str(info.value)


def test_checkpoint_with_names_of_another_model_is_refused(tmp_path):
    # torchvision's names, not converted: nothing in it would be loaded.
    weights = tmp_path / "raw.pth"
    torch.save(
        {"conv1.weight": torch.zeros(16, 3, 7, 7), "fc.weight": torch.zeros(10, 64)}, weights
    )
    with pytest.raises(CheckpointError, match=r"parameters not in it.*conv1\.weight, fc\.weight"):
        load_into_c4(tmp_path, str(weights))


def test_fine_tuning_to_other_classes_still_loads(tmp_path):
    other = tiny_cfg(tmp_path / "other", *SMALL_RESNET, "MODEL.ROI_HEADS.NUM_CLASSES", "3")
    source = build_model(other).state_dict()
    for key, value in source.items():  # statistics as after training (not folded-looking)
        if key.endswith("running_var"):
            value.fill_(2.0)
    weights = tmp_path / "three_classes.pth"
    torch.save({"model": source}, weights)
    trainer = load_into_c4(tmp_path, str(weights))  # only the box predictor differs: loads
    state = trainer.model.state_dict()
    key = "backbone.res2.0.conv1.weight"
    assert torch.equal(state[key], source[key])
    assert state["roi_heads.box_predictor.cls_score.weight"].shape[0] == 11  # 10 classes + bg


def test_missing_dataset_folder_names_the_path_and_the_variable(tmp_path, monkeypatch):
    missing = tmp_path / "datasets" / "coco" / "annotations" / "instances_val2014.json"
    name = "bad_input_missing_coco"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(missing), str(tmp_path / "datasets" / "coco"))
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    cfg = tiny_cfg(tmp_path, "DATASETS.TRAIN", f"('{name}',)")
    with pytest.raises(FileNotFoundError) as info:
        Trainer(cfg)
    message = str(info.value)
    assert message.startswith(f"{missing}: not found while loading DATASETS.TRAIN {name}")
    assert f"$DETECTRON2_DATASETS, here '{tmp_path / 'datasets'}'" in message
    assert not (tmp_path / "output").exists()  # failed before anything was written
    with pytest.raises(FileNotFoundError, match=r"DATASETS\.TEST bad_input_missing_coco"):
        Trainer.build_test_loader(cfg, name)


def poisoned_run(tmp_path, *overrides, poison=None):
    """Trains 2 iterations (checkpoints at each), then resumes to iteration 4 after ``poison``
    (called with the trainer); returns (the error, the files before, the files after)."""
    out = tmp_path / "output"
    train(tiny_cfg(tmp_path, "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1"))
    before = files(out)
    cfg = tiny_cfg(tmp_path, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "1", *overrides)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    if poison:
        poison(trainer)
    with pytest.raises(FloatingPointError) as info:
        trainer.train()
    after = {k: v for k, v in files(out).items() if k.endswith((".pth", "last_checkpoint"))}
    return str(info.value), before, after


def assert_nothing_written(before, after):
    pth = {k: v for k, v in before.items() if k.endswith((".pth", "last_checkpoint"))}
    assert after == pth  # no new checkpoint, last_checkpoint and old ones unchanged


def test_nan_weight_stops_training_with_the_layer_name(tmp_path):
    name = "backbone.res2.0.conv2.norm"

    def poison(trainer):
        layer = dict(en_layers(trainer.model))[name]
        with torch.no_grad():
            layer.weight[0] = float("nan")

    message, before, after = poisoned_run(tmp_path, poison=poison)
    assert message.startswith(f"NaN or Inf in iteration 2: EvalNorm layer '{name}' has ")
    assert "non-finite weight" in message
    assert_nothing_written(before, after)


def test_infinite_input_is_traced_to_the_first_layer_that_sees_it(tmp_path):
    # PIXEL_STD 0: every normalized pixel is +-inf or NaN.
    message, before, after = poisoned_run(tmp_path, "MODEL.PIXEL_STD", "[0.0, 0.0, 0.0]")
    assert "EvalNorm layer 'backbone.stem.conv1.norm' has non-finite running_mean" in message
    assert_nothing_written(before, after)


def test_nan_from_the_optimizer_step_is_caught_before_the_checkpoint(tmp_path):
    name = "roi_heads.res5.0.conv1.norm"

    def poison(trainer):
        step = trainer.optimizer.step

        def poisoned_step(*args, **kwargs):
            step(*args, **kwargs)
            with torch.no_grad():
                dict(en_layers(trainer.model))[name].bias.fill_(float("inf"))

        trainer.optimizer.step = poisoned_step

    message, before, after = poisoned_run(tmp_path, poison=poison)
    assert message.startswith(
        f"NaN or Inf after iteration 2: EvalNorm layer '{name}' has non-finite bias."
    )
    assert_nothing_written(before, after)

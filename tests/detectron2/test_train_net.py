"""tools/train_net.py end to end on a tiny COCO 2014 layout under DETECTRON2_DATASETS.

detectron2 registers coco_2014_* from DETECTRON2_DATASETS when it is first imported, so the
runs are subprocesses with that variable set: the real registration path is exercised.
"""

import os
import subprocess
import sys

import pytest
from detection_helpers import SMALL_RESNET, tiny_overrides
from helpers import ROOT

from evalnorm_det.data import write_coco2014_layout

# The headline config, shrunk: from scratch, a narrow ResNet, on CPU.
SMALL = [
    *SMALL_RESNET,
    "SOLVER.CHECKPOINT_PERIOD",
    "1",
    "TEST.DETECTIONS_PER_IMAGE",
    "10",
] + tiny_overrides()


def train_net(tmp_path, *args):
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"))
    out = tmp_path / "output"
    cmd = [sys.executable, str(ROOT / "tools" / "train_net.py"), *args, "OUTPUT_DIR", str(out)]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("train_net")
    write_coco2014_layout(str(tmp_path / "datasets"), num_train=4, num_val=3, image_size=64)
    return tmp_path


def test_train_checkpoint_resume_and_evaluate(run):
    config = ["--config", "evalnorm_frcnn_2img.yaml"]
    log = train_net(run, *config, *SMALL, "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()")
    out = run / "output"
    assert (out / "model_final.pth").is_file() and (out / "model_0000001.pth").is_file()
    assert "coco_2014_valminusminival" in log  # both training sets were loaded

    log = train_net(run, *config, "--resume", *SMALL, "SOLVER.MAX_ITER", "3")
    assert "Resuming from" in log or "Loading from" in log
    assert "Starting training from iteration 2" in log
    assert (out / "model_0000002.pth").is_file()

    (out / "evalnorm_table.txt").unlink()
    log = train_net(
        run, *config, "--eval-only", *SMALL, "MODEL.WEIGHTS", str(out / "model_final.pth")
    )
    table = (out / "evalnorm_table.txt").read_text()
    assert table.splitlines()[0].startswith("coco_2014_minival")
    assert [line[:8].strip() for line in table.splitlines()[2:]] == [
        "EMA",
        "EN",
        "EN - EMA",
        "1/B^2",
    ]
    assert table in log
    assert "Starting training" not in log


def test_bare_config_name_is_looked_up_and_bad_input_stops_early(run, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train_net.py"), "--config", "no_such.yaml"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "no_such.yaml" in proc.stderr and "evalnorm_frcnn_2img.yaml" in proc.stderr
    # 3 images cannot split over 2 GPUs: stops before launching any worker.
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "train_net.py"),
            "--config",
            "evalnorm_frcnn_2img.yaml",
            "--num-gpus",
            "2",
            "SOLVER.IMS_PER_BATCH",
            "3",
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "SOLVER.IMS_PER_BATCH=3 does not split evenly over 2" in proc.stderr

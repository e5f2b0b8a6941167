"""benchmarks.gpu_check without a GPU: it refuses to run, and its checks catch what they
check for (a skipped CUDA test, a non-finite loss or weight)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from detection_helpers import tiny_cfg, train
from helpers import ROOT

from benchmarks import gpu_check


def test_without_cuda_says_so_and_exits_non_zero(tmp_path):
    out = tmp_path / "gpu_check"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--output-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 2
    assert "CUDA is not available" in done.stderr and "Nothing was run" in done.stderr
    assert not out.exists()


def test_skipped_cuda_tests_do_not_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    result = gpu_check.check_tests(tmp_path, timeout=300)
    counts = result["counts"]
    assert counts["tests"] >= 10 and counts["skipped"] == counts["tests"]
    assert not result["passed"]
    assert "skipped" in (tmp_path / "tests.log").read_text()


def test_training_check_reads_losses_checkpoint_and_aps(tmp_path):
    cfg = tiny_cfg(tmp_path, "DATASETS.TEST", "('tiny_digits_val',)")
    train(cfg)
    out = Path(cfg.OUTPUT_DIR)
    result = gpu_check.check_training_output(out)
    assert result["passed"] and result["nonfinite"] == [] and result["iterations"] == 3
    assert math.isfinite(result["final_total_loss"])
    assert set(result["AP"]) == {f"{m}/bbox/AP" for m in cfg.TEST.EVALNORM_ROWS}
    # A NaN loss in the log and an infinite statistic in the checkpoint are both named.
    with open(out / "metrics.json", "a") as f:
        f.write(json.dumps({"iteration": 3, "loss_cls": float("nan")}) + "\n")
    checkpoint = torch.load(out / "model_final.pth", weights_only=True)
    checkpoint["model"]["backbone.stem.conv1.norm.running_var"][0] = float("inf")
    torch.save(checkpoint, out / "model_final.pth")
    result = gpu_check.check_training_output(out)
    assert not result["passed"]
    assert result["nonfinite"] == ["loss_cls", "backbone.stem.conv1.norm.running_var"]
    table = gpu_check.markdown(
        {
            "machine": {"device": "GPU", "torch": "2", "cuda": "13"},
            "wall_seconds": 1.0,
            "steps": {
                "overhead_none": {"passed": True, "seconds": 1.0, "ratios": {"inference": 1.5}},
                "amp_training": {**result, "seconds": 2.0},
            },
        }
    )
    assert "| amp_training | NO | 2 |" in table and "| inference | 1.500 | - |" in table

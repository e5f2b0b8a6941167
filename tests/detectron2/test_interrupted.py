"""A training run killed (SIGKILL) between checkpoints and resumed with ``--resume`` ends bit for
bit as the run that was never interrupted."""

import os
import signal
import subprocess
import sys
import time
import types

import torch
from detection_helpers import tiny_cfg
from helpers import ROOT

from evalnorm_det.engine import ResumeStateHook

HELPER = ROOT / "tests" / "interrupted_train.py"


def start(tmp_path, output, *extra, stop_at=None):
    cmd = [sys.executable, str(HELPER), str(tmp_path / "datasets")]
    if stop_at is not None:
        cmd += ["--stop-at", str(stop_at), str(tmp_path / f"{output}.ready")]
    cmd += ["--config-file", str(tmp_path / "cfg.yaml"), *extra]
    cmd += ["OUTPUT_DIR", str(tmp_path / output)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log = open(tmp_path / f"{output}.log", "ab")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(proc, tmp_path, output):
    assert proc.wait(timeout=300) == 0, (tmp_path / f"{output}.log").read_text()[-3000:]


def assert_same(a, b, where="checkpoint"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def test_killed_run_resumes_bitwise_equal(tmp_path):
    """5 iterations, a checkpoint every 2 (after iterations 1 and 3). The interrupted run is
    SIGKILLed while it waits before iteration 3 (iteration 2 done, not checkpointed), then
    resumed from model_0000001.pth. Its model_final.pth equals the uninterrupted run's in every
    entry: weights, alpha/beta logits, running statistics, the model's and alpha/beta's optimizer
    states, the scheduler, the saved random states. The tiny data has 6 images and 2 per batch,
    so the resumed run must also continue the data order, not start it over."""
    cfg = tiny_cfg(tmp_path, "SOLVER.MAX_ITER", "5", "SOLVER.CHECKPOINT_PERIOD", "2", "SEED", "0")
    (tmp_path / "cfg.yaml").write_text(cfg.dump())

    full = start(tmp_path, "full")
    killed = start(tmp_path, "killed", stop_at=3)
    ready = tmp_path / "killed.ready"
    deadline = time.monotonic() + 300
    while not ready.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ready.exists(), (tmp_path / "killed.log").read_text()[-3000:]
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    out = tmp_path / "killed"
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (out / "model_final.pth").exists()
    finish(full, tmp_path, "full")

    finish(start(tmp_path, "killed", "--resume"), tmp_path, "killed")
    log = (tmp_path / "killed.log").read_text()
    assert "Starting training from iteration 2" in log

    a = torch.load(tmp_path / "full" / "model_final.pth", weights_only=True)
    b = torch.load(out / "model_final.pth", weights_only=True)
    assert a["iteration"] == b["iteration"] == 4
    hooks = a["trainer"]["hooks"]
    assert hooks["OnlineEstimationHook"]["optimizer"]["state"][0]["step"] == 5
    assert "ResumeStateHook" in hooks
    assert any(k.endswith("alpha_logit") for k in a["model"])
    assert_same(a, b)


def test_checkpoint_without_random_states_resumes_with_a_warning(caplog):
    """A checkpoint saved outside the checkpoint iterations (``checkpointer.save`` called by
    hand) holds the hook's empty state: resuming from it still works, random numbers restart."""
    hook = ResumeStateHook()
    hook.trainer = types.SimpleNamespace(data_loader=None)
    hook.load_state_dict(hook.state_dict())  # {}: nothing gathered yet
    state = torch.get_rng_state()
    hook.before_train()
    assert "no random states" in caplog.text
    assert torch.equal(torch.get_rng_state(), state)

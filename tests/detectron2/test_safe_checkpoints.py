"""Checkpoints run no code when loaded, and a crash while one is written never leaves a broken
file where a good one is expected.

The malicious files' payload creates a marker file when unpickled without restrictions (the
first test checks that it does); every refusal then checks that the marker is still absent.
"""

import io
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from detection_helpers import tiny_cfg, train
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from helpers import ROOT
from torch import nn

from evalnorm_det import EvalNormCheckpointer, Trainer
from evalnorm_det.utils.safe_load import (
    CorruptCheckpointError,
    UnsafeCheckpointError,
    read_checkpoint,
)


class RunsCode:
    """Unpickling this calls ``open(marker, "w")``: the file appears if any code ran."""

    def __init__(self, marker):
        self.marker = os.fspath(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def write_malicious(path, marker):
    """A checkpoint in ``path``'s format (.pkl: detectron2's pickle; else torch.save) with legit
    weights beside a payload that creates ``marker``."""
    weights = {"weight": np.ones((2, 2), np.float32), "bias": np.zeros(2, np.float32)}
    if path.suffix == ".pkl":
        with open(path, "wb") as f:
            pickle.dump({"model": weights, "__author__": "x", "extra": RunsCode(marker)}, f)
    else:
        model = {k: torch.from_numpy(v) for k, v in weights.items()}
        torch.save({"model": model, "extra": RunsCode(marker)}, path)
    return path


def files(folder):
    """{name: bytes} of every file in ``folder``."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)] if keep < 1 else data[:-10])


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "code_ran"
    yield path
    assert not path.exists(), "the checkpoint's payload ran"


# ---------------------------------------------------------------------------------------------
# Loading runs no code


def test_the_payloads_run_code_when_loaded_without_restrictions(tmp_path):
    pkl, pth = tmp_path / "evil.pkl", tmp_path / "evil.pth"
    write_malicious(pkl, tmp_path / "from_pkl")
    write_malicious(pth, tmp_path / "from_pth")
    # detectron2's own checkpointer unpickles .pkl files with pickle.load.
    DetectionCheckpointer(nn.Linear(2, 2)).load(str(pkl))
    torch.load(pth, weights_only=False)
    assert (tmp_path / "from_pkl").exists() and (tmp_path / "from_pth").exists()


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_read_checkpoint_refuses_code(tmp_path, marker, suffix):
    path = write_malicious(tmp_path / f"evil{suffix}", marker)
    with pytest.raises(UnsafeCheckpointError, match=rf"^{re.escape(str(path))}: refused: .*open"):
        read_checkpoint(str(path))


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_model_weights_with_code_are_refused(tmp_path, marker, suffix):
    path = write_malicious(tmp_path / f"evil{suffix}", marker)
    model = nn.Linear(2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsafeCheckpointError, match=re.escape(f"{path}: refused")):
        EvalNormCheckpointer(model).load(str(path))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_resuming_from_a_checkpoint_with_code_is_refused(tmp_path, marker, suffix):
    out = tmp_path / "output"
    out.mkdir()
    write_malicious(out / f"model_0000009{suffix}", marker)
    (out / "last_checkpoint").write_text(f"model_0000009{suffix}")
    checkpointer = EvalNormCheckpointer(nn.Linear(2, 2), save_dir=str(out))
    with pytest.raises(UnsafeCheckpointError) as info:
        checkpointer.resume_or_load("", resume=True)
    message = str(info.value)
    assert message.startswith(f"{out / f'model_0000009{suffix}'}: refused")
    assert f"{out / 'last_checkpoint'} names" in message


def test_the_trainer_refuses_to_resume_from_a_checkpoint_with_code(tmp_path, marker):
    cfg = tiny_cfg(tmp_path)
    out = Path(cfg.OUTPUT_DIR)
    out.mkdir(parents=True)
    evil = write_malicious(out / "model_0000002.pth", marker)
    (out / "last_checkpoint").write_text(evil.name)
    with pytest.raises(UnsafeCheckpointError, match=re.escape(f"{evil}: refused")):
        Trainer(cfg).resume_or_load(resume=True)


def detectron2_zoo_pkl(model):
    return {
        "model": {k: v.numpy() for k, v in model.state_dict().items()},
        "__author__": "someone",
    }


def caffe2_pkl(model):
    blobs = {k: v.numpy() for k, v in model.state_dict().items()}
    blobs["weight_momentum"] = np.zeros(1, np.float32)  # detectron2 drops these
    return {"blobs": blobs}


def bare_pkl(model):
    """A Caffe2 ImageNet model: the arrays alone."""
    return {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "make, suffix, protocol",
    [
        *[(detectron2_zoo_pkl, ".pkl", p) for p in (2, 4, 5)],
        (caffe2_pkl, ".pkl", 2),
        (bare_pkl, ".pkl", 2),
        (lambda m: {"model": m.state_dict(), "iteration": 3}, ".pth", None),
        (lambda m: m.state_dict(), ".pth", None),
    ],
    ids=[*(f"detectron2-pkl-protocol{p}" for p in (2, 4, 5)), "caffe2-blobs-pkl", "bare-pkl"]
    + ["checkpoint-pth", "state-dict-pth"],
)
def test_legit_checkpoints_read_as_detectron2_reads_them(tmp_path, make, suffix, protocol):
    torch.manual_seed(0)
    source = nn.Linear(3, 2)
    path = str(tmp_path / f"weights{suffix}")
    if suffix == ".pkl":
        with open(path, "wb") as f:
            pickle.dump(make(source), f, protocol=protocol)
    else:
        torch.save(make(source), path)

    def read(checkpointer):
        checkpointer._parsed_url_during_load = urlparse(path)  # as load() sets it
        return checkpointer._load_file(path)

    ours, theirs = read(EvalNormCheckpointer(nn.Linear(3, 2))), read(DetectionCheckpointer(None))
    assert ours.keys() == theirs.keys() and ours["model"].keys() == theirs["model"].keys()
    for k, v in theirs["model"].items():
        assert type(ours["model"][k]) is type(v) and np.array_equal(ours["model"][k], v), k
    assert {k: v for k, v in ours.items() if k != "model"} == {
        k: v for k, v in theirs.items() if k != "model"
    }

    if "matching_heuristics" in ours:  # Caffe2 names: renamed by heuristics, not for nn.Linear
        return
    loaded = nn.Linear(3, 2)
    EvalNormCheckpointer(loaded).load(path)
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


# ---------------------------------------------------------------------------------------------
# Saving is atomic


class Crash(Exception):
    """The process dying in the middle of a write."""


def crash_half_way(obj, f, *args, **kwargs):
    """``torch.save`` that writes half the bytes, then dies."""
    buffer = io.BytesIO()
    REAL_SAVE(obj, buffer)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    f.flush()
    raise Crash


REAL_SAVE = torch.save


@pytest.mark.parametrize("name", ["model_0000001", "model_0000000"], ids=["new", "overwrite"])
def test_a_crash_while_saving_leaves_the_previous_files(tmp_path, monkeypatch, name):
    out = tmp_path / "output"
    out.mkdir()
    checkpointer = EvalNormCheckpointer(nn.Linear(3, 2), save_dir=str(out))
    checkpointer.save("model_0000000", iteration=0)
    before = files(out)
    assert before.keys() == {"model_0000000.pth", "last_checkpoint"}
    assert (out / "model_0000000.pth").stat().st_mode & 0o777 == 0o666 & ~current_umask()

    with torch.no_grad():
        checkpointer.model.weight.add_(1.0)
    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(Crash):
        checkpointer.save(name, iteration=1)
    assert files(out) == before  # no partial file, under its name or a temporary one

    monkeypatch.setattr(torch, "save", REAL_SAVE)
    checkpointer.save(name, iteration=1)  # and the next save goes through
    assert (out / "last_checkpoint").read_text() == f"{name}.pth"
    assert read_checkpoint(str(out / f"{name}.pth"))["iteration"] == 1
    assert sorted(os.listdir(out)) == sorted(
        {"model_0000000.pth", f"{name}.pth", "last_checkpoint"}
    )


def current_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_a_crash_while_tagging_keeps_the_previous_tag(tmp_path, monkeypatch):
    out = tmp_path / "output"
    out.mkdir()
    checkpointer = EvalNormCheckpointer(nn.Linear(3, 2), save_dir=str(out))
    checkpointer.save("model_0000000")
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == "last_checkpoint":
            raise Crash
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Crash):
        checkpointer.save("model_0000001")
    # The new checkpoint is whole, and last_checkpoint still names the previous one.
    assert (out / "last_checkpoint").read_text() == "model_0000000.pth"
    assert sorted(os.listdir(out)) == ["last_checkpoint", "model_0000000.pth", "model_0000001.pth"]
    read_checkpoint(str(out / "model_0000001.pth"))


KILLED_WHILE_SAVING = """
import io, os, sys, torch
from torch import nn
from evalnorm_det import EvalNormCheckpointer

checkpointer = EvalNormCheckpointer(nn.Linear(3, 2), save_dir=sys.argv[1])
checkpointer.save("model_0000000", iteration=0)
real_save = torch.save

def die_half_way(obj, f, *args, **kwargs):
    buffer = io.BytesIO()
    real_save(obj, buffer)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    f.flush()
    os._exit(9)  # no cleanup, no exception handlers: as a kill -9

torch.save = die_half_way
checkpointer.save("model_0000001", iteration=1)
"""


def test_a_process_killed_while_saving_resumes_from_the_previous_checkpoint(tmp_path):
    out = tmp_path / "output"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", KILLED_WHILE_SAVING, str(out)], env=env, check=False
    )
    assert run.returncode == 9
    names = os.listdir(out)
    leftovers = [n for n in names if n not in ("model_0000000.pth", "last_checkpoint")]
    # Only the temporary file is left half-written, under a name detectron2 never loads.
    assert len(leftovers) == 1 and re.fullmatch(r"\.model_0000001\.pth\..*\.partial", leftovers[0])
    assert (out / "last_checkpoint").read_text() == "model_0000000.pth"
    checkpointer = EvalNormCheckpointer(nn.Linear(3, 2), save_dir=str(out))
    assert checkpointer.get_all_checkpoint_files() == [str(out / "model_0000000.pth")]
    assert checkpointer.resume_or_load("", resume=True)["iteration"] == 0


# ---------------------------------------------------------------------------------------------
# Empty and truncated files


@pytest.mark.parametrize(
    "name, keep",
    [("empty.pth", 0.0), ("half.pth", 0.5), ("tail-cut.pth", 1), ("half.pkl", 0.5)],
)
def test_broken_model_weights_give_an_error_naming_the_file(tmp_path, name, keep):
    cfg = tiny_cfg(tmp_path)
    path = tmp_path / name
    if name.endswith(".pkl"):
        path.write_bytes(pickle.dumps(detectron2_zoo_pkl(build_model(cfg))))
    else:
        torch.save({"model": build_model(cfg).state_dict()}, path)
    truncate(path, keep)
    cfg.merge_from_list(["MODEL.WEIGHTS", str(path)])
    expected = "empty file (0 bytes)" if keep == 0 else "cannot be read as a"
    with pytest.raises(CorruptCheckpointError) as info:
        Trainer(cfg).resume_or_load(resume=False)
    message = str(info.value)
    assert message.startswith(f"{path}: {expected}") and "cut short" in message, message


def test_resuming_from_a_truncated_checkpoint_fails_and_changes_nothing(tmp_path):
    cfg = tiny_cfg(tmp_path, "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1")
    train(cfg)
    out = Path(cfg.OUTPUT_DIR)
    names = {p.name for p in out.glob("*.pth")}
    assert names == {"model_0000000.pth", "model_0000001.pth", "model_final.pth"}
    assert not list(out.glob("*.partial"))
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    truncate(out / "model_final.pth", 0.5)  # as a non-atomic writer would leave it
    before = files(out)

    with pytest.raises(CorruptCheckpointError) as info:
        train(cfg, resume=True)
    message = str(info.value)
    assert message.startswith(f"{out / 'model_final.pth'}: cannot be read as a PyTorch checkpoint")
    assert f"the checkpoint {out / 'last_checkpoint'} names" in message
    assert "model_0000000.pth" in message  # the other checkpoint to resume from
    assert files(out) == before

    # Doing what the message says resumes from the earlier checkpoint.
    (out / "last_checkpoint").write_text("model_0000000.pth")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 1


def test_an_empty_last_checkpoint_gives_an_error_naming_it(tmp_path):
    out = tmp_path / "output"
    out.mkdir()
    (out / "last_checkpoint").write_text("")
    checkpointer = EvalNormCheckpointer(nn.Linear(3, 2), save_dir=str(out))
    with pytest.raises(
        CorruptCheckpointError, match=re.escape(f"{out / 'last_checkpoint'} is empty")
    ):
        checkpointer.resume_or_load("", resume=True)


def test_a_missing_checkpoint_named_by_last_checkpoint_gives_an_error_naming_both(tmp_path):
    out = tmp_path / "output"
    out.mkdir()
    (out / "last_checkpoint").write_text("model_0000004.pth")
    checkpointer = EvalNormCheckpointer(nn.Linear(3, 2), save_dir=str(out))
    with pytest.raises(FileNotFoundError) as info:
        checkpointer.resume_or_load("", resume=True)
    message = str(info.value)
    assert str(out / "model_0000004.pth") in message and str(out / "last_checkpoint") in message

"""Each detectron2 internal the project relies on (``evalnorm_det.utils.d2_internals``) still
behaves as relied on. A failure names the internal: detectron2 changed it, and the function
wrapping it (or the override using it) must follow."""

import contextlib
import itertools
import types

import pytest
import torch
from detection_helpers import tiny_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import build_detection_train_loader
from detectron2.data.common import AspectRatioGroupedDataset
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import DefaultTrainer, SimpleTrainer, hooks
from detectron2.engine import defaults as d2_defaults
from detectron2.modeling.roi_heads import Res5ROIHeads
from detectron2.utils.events import EventWriter
from torch import nn

from evalnorm_det.utils import d2_internals


@contextlib.contextmanager
def relied_on(internal):
    """Turns any failure in the block into one naming ``internal``."""
    try:
        yield
    except Exception as e:  # AssertionError included
        raise AssertionError(
            f"detectron2 changed {internal}, which evalnorm_det relies on "
            f"(evalnorm_det/utils/d2_internals.py): {type(e).__name__}: {e}"
        ) from e


class LossModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))

    def forward(self, data):
        return {"loss": self.weight.sum() * sum(data)}


class Counting:
    """An iterable of ``make(0), make(1), ...`` counting how often an iterator is made."""

    def __init__(self, make=lambda i: [float(i)]):
        self.make = make
        self.iterators = 0

    def __iter__(self):
        self.iterators += 1
        return (self.make(i) for i in itertools.count())


class TinyTrainer(DefaultTrainer):
    """``DefaultTrainer`` building almost nothing: a two-parameter model, SGD, counting data."""

    @classmethod
    def build_model(cls, cfg):
        return LossModel()

    @classmethod
    def build_optimizer(cls, cfg, model):
        return torch.optim.SGD(model.parameters(), lr=0.1)

    @classmethod
    def build_train_loader(cls, cfg):
        return Counting()


def tiny_trainer(tmp_path, trainer_class=TinyTrainer):
    cfg = get_cfg()
    cfg.OUTPUT_DIR = str(tmp_path / "output")
    cfg.SOLVER.MAX_ITER = 3
    return trainer_class(cfg)


def test_train_loader_arguments(tmp_path):
    cfg = tiny_cfg(tmp_path)
    with relied_on(
        "build_detection_train_loader.from_config (data.build._train_loader_from_config)"
    ):
        kwargs = d2_internals.train_loader_arguments(cfg, mapper=lambda d: d)
        assert {"dataset", "sampler", "mapper", "total_batch_size"} <= set(kwargs)
        assert isinstance(kwargs["sampler"], TrainingSampler)
        kwargs["total_batch_size"] = 1
        assert len(next(iter(build_detection_train_loader(**kwargs)))) == 1


def test_sampler_seed():
    def order(sampler):
        return list(itertools.islice(iter(sampler), 20))

    with relied_on("TrainingSampler._seed"):
        sampler = TrainingSampler(20, seed=3)
        assert d2_internals.sampler_seed(sampler) == 3
        d2_internals.set_sampler_seed(sampler, 5)
        assert (
            order(sampler)
            == order(TrainingSampler(20, seed=5))
            != order(TrainingSampler(20, seed=3))
        )
        assert TrainingSampler(20)._seed is not None  # drawn when none is given


def test_inner_trainer(tmp_path):
    trainer = tiny_trainer(tmp_path)
    with relied_on("DefaultTrainer._trainer"):
        inner = d2_internals.inner_trainer(trainer)
        assert isinstance(inner, SimpleTrainer)
        assert trainer.model is inner.model and trainer.data_loader is inner.data_loader
        replacement = SimpleTrainer(inner.model, inner.data_loader, inner.optimizer)
        steps = []
        replacement.run_step = lambda: steps.append(replacement.iter)
        d2_internals.set_inner_trainer(trainer, replacement)
        assert trainer.optimizer is replacement.optimizer
        trainer.iter = 7
        trainer.run_step()
        assert steps == [7]
        assert "_trainer" in trainer.state_dict()


@pytest.mark.parametrize("grouped", [False, True], ids=["loader", "aspect_ratio_grouped"])
def test_start_data_iterator(tmp_path, grouped):
    trainer = tiny_trainer(tmp_path)
    inner = d2_internals.inner_trainer(trainer)
    if grouped:  # batches of one image dict, grouped by orientation
        data = Counting(lambda i: {"width": 2, "height": 1, "i": i})
        inner.data_loader = AspectRatioGroupedDataset(data, batch_size=1)
    else:
        data = inner.data_loader = Counting()
    with relied_on("SimpleTrainer._data_loader_iter_obj / AspectRatioGroupedDataset.dataset"):
        d2_internals.start_data_iterator(trainer)
        assert data.iterators == 1  # made now, not at the first step
        first = next(inner._data_loader_iter)
        assert data.iterators == 1
        assert first == ([{"width": 2, "height": 1, "i": 0}] if grouped else [0.0])


def test_write_at_least_every():
    writes = []

    class Recording(EventWriter):
        def write(self):
            writes.append(hook.trainer.iter)

    writer = Recording()
    with relied_on("PeriodicWriter._period"):
        hook = hooks.PeriodicWriter([writer], period=20)
        d2_internals.write_at_least_every(hook, 5)
        d2_internals.write_at_least_every(hook, 50)  # never less often than before
        hook.trainer = types.SimpleNamespace(iter=0, max_iter=100)
        for it in range(30):
            hook.trainer.iter = it
            hook.after_step()
        assert writes == [4, 9, 14, 19, 24, 29]


def test_wrapping_create_ddp_model(tmp_path):
    calls = []

    def wrap(create, model, **kwargs):
        calls.append((create, kwargs))
        return create(model, **kwargs)

    with relied_on("detectron2.engine.defaults.create_ddp_model, called by DefaultTrainer"):
        original = d2_defaults.create_ddp_model
        with d2_internals.wrapping_create_ddp_model(wrap):
            trainer = tiny_trainer(tmp_path)
        assert d2_defaults.create_ddp_model is original
        assert len(calls) == 1 and calls[0][0] is original
        assert isinstance(trainer.model, LossModel)  # one process: not wrapped


class SwappingTrainer(TinyTrainer):
    def build_hooks(self):
        d2_internals.use_checkpointer(self, MarkedCheckpointer)
        return super().build_hooks()


class MarkedCheckpointer(DetectionCheckpointer):
    pass


def test_use_checkpointer_and_the_default_hooks(tmp_path):
    with relied_on("DefaultTrainer.__init__ making checkpointer before build_hooks"):
        trainer = tiny_trainer(tmp_path, SwappingTrainer)
        assert type(trainer.checkpointer) is MarkedCheckpointer
        assert trainer.checkpointer.save_dir == str(tmp_path / "output")
        assert trainer.checkpointer.checkpointables["trainer"].iter == trainer.iter
        periodic = [h for h in trainer._hooks if isinstance(h, hooks.PeriodicCheckpointer)]
        assert len(periodic) == 1 and periodic[0].checkpointer is trainer.checkpointer
    with relied_on("the hooks of DefaultTrainer.build_hooks and their order"):
        kinds = [type(h) for h in TinyTrainer.build_hooks(trainer) if h is not None]
        assert kinds == [
            hooks.IterationTimer,
            hooks.LRScheduler,
            hooks.PeriodicCheckpointer,
            hooks.EvalHook,
            hooks.PeriodicWriter,
        ]
        listed = TinyTrainer.build_hooks(trainer)
        marker = hooks.CallbackHook()
        d2_internals.insert_hook(listed, marker, after=hooks.LRScheduler)
        assert listed.index(marker) == 2
        other = hooks.CallbackHook()
        d2_internals.insert_hook(listed, other, before=hooks.PeriodicCheckpointer)
        assert isinstance(listed[listed.index(other) + 1], hooks.PeriodicCheckpointer)
    with pytest.raises(RuntimeError, match="no PreciseBN hook"):
        d2_internals.insert_hook([hooks.IterationTimer()], marker, after=hooks.PreciseBN)


def calls(function, name):
    """Whether ``function``'s code refers to attribute ``name``."""
    return name in getattr(function, "__func__", function).__code__.co_names


def test_overridden_private_methods(tmp_path):
    """The private methods overridden in utils/checkpointer.py and modeling/roi_heads.py still
    exist and are still called where the overrides expect."""
    with relied_on("DetectionCheckpointer._torch_load, called by _load_file for .pth files"):
        loaded = []

        class Recording(DetectionCheckpointer):
            def _torch_load(self, f):
                loaded.append(f)
                return super()._torch_load(f)

        path = tmp_path / "model.pth"
        torch.save({"model": nn.Linear(2, 1).state_dict()}, path)
        Recording(nn.Linear(2, 1)).load(str(path))
        assert loaded == [str(path)]
    with relied_on("DetectionCheckpointer._load_file's .pkl and .pyth branches"):
        assert calls(DetectionCheckpointer._load_file, "endswith")
        assert calls(DetectionCheckpointer._load_file, "_torch_load")
    with relied_on("Res5ROIHeads._build_res5_block, called by Res5ROIHeads.from_config"):
        assert isinstance(Res5ROIHeads.__dict__["_build_res5_block"], classmethod)
        assert calls(Res5ROIHeads.from_config, "_build_res5_block")
    with relied_on("Res5ROIHeads._shared_roi_transform, called by Res5ROIHeads.forward"):
        assert callable(Res5ROIHeads.__dict__["_shared_roi_transform"])
        assert calls(Res5ROIHeads.forward, "_shared_roi_transform")

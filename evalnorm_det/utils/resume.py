"""``--resume`` as if never interrupted: the data order and every random state continue
(``ResumeStateHook``, and a training loader built by ``resumable_train_loader``)."""

import itertools
import logging
import random

import numpy as np
import torch
from detectron2.data import build_detection_train_loader
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch.utils.data import IterableDataset, Sampler

from .d2_internals import (
    sampler_seed,
    set_sampler_seed,
    start_data_iterator,
    train_loader_arguments,
)

__all__ = [
    "ResumeStateHook",
    "SkippingSampler",
    "resumable_train_loader",
    "skipping_train_loader",
]

logger = logging.getLogger(__name__)


class SkippingSampler(Sampler):
    """An infinite per-process training sampler (detectron2's ``TrainingSampler`` and its kin)
    that leaves out its first ``skip`` indices: the images of the iterations a resumed run
    already did."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.skip = 0

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)


def resumable_train_loader(cfg, mapper):
    """``build_detection_train_loader(cfg, mapper=mapper)`` made by
    :func:`skipping_train_loader`."""
    return skipping_train_loader(**train_loader_arguments(cfg, mapper))


def skipping_train_loader(**kwargs):
    """``build_detection_train_loader(**kwargs)``, its sampler (detectron2's ``TrainingSampler``
    when none is given, as it would make) wrapped in a :class:`SkippingSampler`, which
    ``ResumeStateHook`` finds again as the loader's ``skipping_sampler``."""
    sampler, dataset = kwargs.get("sampler"), kwargs["dataset"]
    if sampler is None and not isinstance(dataset, IterableDataset):
        sampler = TrainingSampler(len(dataset))
    if sampler is not None:
        kwargs["sampler"] = SkippingSampler(sampler)
    loader = build_detection_train_loader(**kwargs)
    loader.skipping_sampler = kwargs.get("sampler")
    return loader


class ResumeStateHook(HookBase):
    """Makes ``--resume`` continue bit for bit where the checkpoint left off.

    At each checkpoint iteration (placed just before ``PeriodicCheckpointer``) it gathers every
    rank's torch (CPU and CUDA), NumPy and Python random states; they and the training
    sampler's seed are saved with the trainer's state (rank 0 writes the checkpoint). On resume,
    ``before_train`` sets the sampler to skip the ``start_iter`` batches already used, creates
    the data iterator (detectron2 draws its worker seed from torch's random state) and then
    restores this rank's states, as they were right after the checkpointed iteration.

    Needs a training loader from :func:`resumable_train_loader`. Exact when each process keeps
    its rank and the process count is the same, data loading draws no random numbers in worker
    processes (``DATALOADER.NUM_WORKERS 0``, or no random augmentation), and aspect-ratio
    grouping holds no image back across the checkpoint (all images of one orientation, or
    ``DATALOADER.ASPECT_RATIO_GROUPING False``).
    """

    def __init__(self):
        self._saved = None  # gathered at the last checkpoint iteration
        self._loaded = None  # from the checkpoint resumed from, applied in before_train

    def after_step(self):
        it, period = self.trainer.iter, self.trainer.cfg.SOLVER.CHECKPOINT_PERIOD
        if (it + 1) % period == 0 or it >= self.trainer.max_iter - 1:  # PeriodicCheckpointer's
            self._saved = comm.all_gather(_random_states())

    def state_dict(self):
        if self._saved is None:
            return {}
        sampler = self._sampler()
        seed = sampler_seed(getattr(sampler, "sampler", None))
        return {"ranks": self._saved, "sampler_seed": seed}

    def load_state_dict(self, state_dict):
        self._loaded = state_dict

    def before_train(self):
        if self._loaded is None:
            return
        state, self._loaded = self._loaded, None
        sampler = self._sampler()
        if sampler is not None:
            set_sampler_seed(sampler.sampler, state.get("sampler_seed"))
            cfg = self.trainer.cfg
            sampler.skip = self.trainer.start_iter * (
                cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
            )
        else:
            logger.warning("Resuming with a data loader of its own: its order starts over")
        ranks = state.get("ranks")
        if ranks is None:  # saved by a save outside the checkpoint iterations
            logger.warning("The checkpoint has no random states: random numbers start over")
            return
        if len(ranks) != comm.get_world_size():
            logger.warning(
                "The checkpoint has the random states of %d processes, this run has %d: "
                "random numbers start over (sampling, augmentation)",
                len(ranks),
                comm.get_world_size(),
            )
            return
        # Its draw from torch's random state comes before the restore, as in the run resumed
        # from, where it came at iteration 0.
        start_data_iterator(self.trainer)
        _set_random_states(ranks[comm.get_rank()])

    def _sampler(self):
        return getattr(self.trainer.data_loader, "skipping_sampler", None)


def _random_states():
    """This process's random states, as tensors and plain containers (safe checkpoints)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": _listify(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_random_states(state):
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(_tuplify(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _listify(x):
    return [_listify(v) for v in x] if isinstance(x, tuple) else x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x

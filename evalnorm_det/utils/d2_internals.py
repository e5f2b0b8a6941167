"""Every use of a detectron2 internal in the project: a private name, or behaviour that
detectron2 does not document. Each sits behind a small function whose docstring says what it
relies on; tests/detectron2/test_d2_internals.py checks each against the installed detectron2 and fails
naming the internal when it changes.

Private methods the project overrides must stay in their subclasses; they are listed here so
that one place names them all, and are tested likewise:

- ``DetectionCheckpointer._load_file`` and ``._torch_load`` (``utils/checkpointer.py``);
- ``Res5ROIHeads._build_res5_block`` and ``._shared_roi_transform``
  (``modeling/roi_heads.py``; ``engine/deploy.py`` also calls the latter).

(fvcore's ``Checkpointer._load_file``/``_load_model`` are documented for overriding.)
"""

import contextlib
import copy

from detectron2.data import build_detection_train_loader
from detectron2.data.common import AspectRatioGroupedDataset
from detectron2.engine import defaults as d2_defaults

__all__ = [
    "inner_trainer",
    "insert_hook",
    "sampler_seed",
    "set_inner_trainer",
    "set_sampler_seed",
    "start_data_iterator",
    "train_loader_arguments",
    "use_checkpointer",
    "wrapping_create_ddp_model",
    "write_at_least_every",
]


def train_loader_arguments(cfg, mapper):
    """The keyword arguments (dataset, sampler, mapper, total_batch_size, ...) that
    ``build_detection_train_loader(cfg, mapper=mapper)`` passes on, so that one of them (the
    sampler) can be changed before ``build_detection_train_loader(**kwargs)``.

    Relies on ``build_detection_train_loader.from_config``, which ``@configurable`` sets on the
    function (detectron2's private ``data.build._train_loader_from_config``)."""
    return build_detection_train_loader.from_config(cfg, mapper=mapper)


def sampler_seed(sampler):
    """The seed that sets the order of a detectron2 training sampler (``TrainingSampler`` and
    its kin: the same on every process, drawn at random when none is given), or None for a
    sampler without one.

    Relies on the private ``TrainingSampler._seed``."""
    return getattr(sampler, "_seed", None)


def set_sampler_seed(sampler, seed):
    """Give ``sampler`` the seed ``seed`` (from :func:`sampler_seed`) before it is iterated, so
    that it gives the order it gave with that seed; nothing for a sampler without one.

    Relies on the private ``TrainingSampler._seed``, read when iteration starts."""
    if seed is not None and hasattr(sampler, "_seed"):
        sampler._seed = seed


def inner_trainer(trainer):
    """The ``SimpleTrainer`` (or ``AMPTrainer``) that runs ``DefaultTrainer`` ``trainer``'s
    steps and holds its model, data loader and optimizer.

    Relies on the private ``DefaultTrainer._trainer``."""
    return trainer._trainer


def set_inner_trainer(trainer, inner):
    """Make ``inner`` run ``DefaultTrainer`` ``trainer``'s steps (see :func:`inner_trainer`).

    Relies on ``DefaultTrainer`` reaching its model, data loader, optimizer, ``run_step`` and
    ``state_dict`` through the private ``_trainer``."""
    trainer._trainer = inner


def start_data_iterator(trainer):
    """Create ``DefaultTrainer`` ``trainer``'s training data iterator now (detectron2 creates it
    at the first step), and with it the loader's draw from torch's random state (its workers'
    seed); an ``AspectRatioGroupedDataset`` starts its inner iterator now too.

    Relies on the private ``SimpleTrainer._data_loader_iter_obj`` (the iterator it creates from
    ``data_loader`` when it is None), and on ``AspectRatioGroupedDataset`` iterating its
    ``dataset`` attribute only when its first batch is asked for."""
    simple = inner_trainer(trainer)
    loader = simple.data_loader
    if isinstance(loader, AspectRatioGroupedDataset):
        inner = iter(loader.dataset)
        loader = copy.copy(loader)
        loader.dataset = _Iterated(inner)
    simple._data_loader_iter_obj = iter(loader)


class _Iterated:
    """An iterable over an iterator that already exists."""

    def __init__(self, iterator):
        self.iterator = iterator

    def __iter__(self):
        return self.iterator


def write_at_least_every(writer_hook, period):
    """Make the ``PeriodicWriter`` hook ``writer_hook`` write every ``period`` iterations, or
    as often as it did if that is more often.

    Relies on the private ``PeriodicWriter._period``: ``DefaultTrainer.build_hooks`` makes the
    hook with a period of 20 and no way to choose another."""
    writer_hook._period = min(writer_hook._period, period)


@contextlib.contextmanager
def wrapping_create_ddp_model(wrap):
    """Within the block, ``DefaultTrainer.__init__`` wraps its model with
    ``wrap(create_ddp_model, model, **kwargs)`` instead of ``create_ddp_model(model,
    **kwargs)``.

    Relies on ``DefaultTrainer.__init__`` looking ``create_ddp_model`` up in the module
    ``detectron2.engine.defaults`` when it runs: that module's attribute is replaced for the
    duration of the block (for every thread)."""
    create = d2_defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        return wrap(create, model, **kwargs)

    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = create


def use_checkpointer(trainer, checkpointer_class):
    """Replace ``DefaultTrainer`` ``trainer``'s checkpointer with a ``checkpointer_class`` for
    the same model, folder and trainer state. Call it first thing in ``build_hooks``.

    Relies on ``DefaultTrainer.__init__`` making ``trainer.checkpointer`` before it calls
    ``build_hooks``, which hands ``trainer.checkpointer`` to the ``PeriodicCheckpointer`` hook
    (detectron2 has no ``build_checkpointer`` to override)."""
    old = trainer.checkpointer
    trainer.checkpointer = checkpointer_class(
        old.model, old.save_dir, trainer=old.checkpointables["trainer"]
    )
    return trainer.checkpointer


def insert_hook(hooks, hook, *, after=None, before=None):
    """Insert ``hook`` into the list ``DefaultTrainer.build_hooks`` returned: just after the first
    hook of type ``after`` (an error if there is none), or just before the first of type
    ``before`` (at the end if there is none: some are made on the main process only).

    Relies on the hooks ``DefaultTrainer.build_hooks`` makes and their order: IterationTimer,
    LRScheduler, PreciseBN (or None), PeriodicCheckpointer (main process), EvalHook,
    PeriodicWriter (main process)."""
    kind = after or before
    at = next((i for i, h in enumerate(hooks) if isinstance(h, kind)), None)
    if after is not None:
        if at is None:
            raise RuntimeError(
                f"DefaultTrainer.build_hooks returned no {kind.__name__} hook to place "
                f"{type(hook).__name__} after: detectron2 changed its default hooks"
            )
        at += 1
    hooks.insert(len(hooks) if at is None else at, hook)
    return hooks

"""EvalNorm's trainer for a LazyConfig: ``Trainer`` (its hooks, checks, resume and evaluation
table) with the model, optimizer, LR schedule, data and evaluator of a lazy config."""

import copy
import logging
import os

import torch
from detectron2.config import instantiate
from detectron2.data import build_detection_train_loader
from detectron2.engine import default_setup
from detectron2.solver import LRMultiplier
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from detectron2.utils.registry import locate
from omegaconf import OmegaConf

from ..lazy import lazy_to_cfg, load_lazy_config
from ..utils.preflight import naming_missing_data
from ..utils.resume import skipping_train_loader
from .trainer import Trainer

__all__ = ["LazyTrainer", "lazy_run_config", "setup_lazy"]

logger = logging.getLogger(__name__)


class LazyTrainer(Trainer):
    """:class:`Trainer` whose builders read a LazyConfig: ``model``, ``optimizer`` (its
    ``params.model`` set to the model), ``lr_multiplier`` (over ``train.max_iter``),
    ``dataloader.train`` (``total_batch_size`` from ``SOLVER.IMS_PER_BATCH``; a
    ``build_detection_train_loader`` made resumable), ``dataloader.test`` and
    ``dataloader.evaluator`` (their dataset set per evaluated dataset). Everything else (the
    online-estimation, NaN-check and resume hooks, the checkpointer refusing folded BN, the
    evaluation table) is ``Trainer``'s, driven by the yacs config ``lazy_to_cfg`` makes.

    Its builders are classmethods, as ``DefaultTrainer``'s: take a class bound to one lazy config
    with :meth:`for_config`, then use it as ``Trainer`` with that yacs config.
    """

    lazy = None  # the LazyConfig, interpolations resolved (set by for_config)

    @classmethod
    def for_config(cls, lazy):
        """A subclass whose builders read ``lazy`` (copied, interpolations resolved)."""
        lazy = copy.deepcopy(lazy)
        OmegaConf.resolve(lazy)
        return type(cls.__name__, (cls,), {"lazy": lazy})

    @classmethod
    def _node(cls, key):
        if cls.lazy is None:
            raise RuntimeError("LazyTrainer has no LazyConfig: use LazyTrainer.for_config(cfg)")
        return copy.deepcopy(OmegaConf.select(cls.lazy, key))

    @classmethod
    def build_model(cls, cfg):
        model = instantiate(cls._node("model")).to(torch.device(cfg.MODEL.DEVICE))
        logger.info("Model:\n%s", model)
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        optimizer = cls._node("optimizer")
        optimizer.params.model = model
        return instantiate(optimizer)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        multiplier = instantiate(cls._node("lr_multiplier"))
        return LRMultiplier(optimizer, multiplier=multiplier, max_iter=cfg.SOLVER.MAX_ITER)

    @classmethod
    def build_train_loader(cls, cfg):
        loader = cls._node("dataloader.train")
        loader.total_batch_size = cfg.SOLVER.IMS_PER_BATCH
        target = loader._target_
        if (locate(target) if isinstance(target, str) else target) is build_detection_train_loader:
            loader._target_ = skipping_train_loader  # so that --resume skips the used images
        with naming_missing_data(cfg.DATASETS.TRAIN, "dataloader.train.dataset.names"):
            return instantiate(loader)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name, batch_size=1):
        loader = cls._node("dataloader.test")
        loader.dataset.names = dataset_name
        loader.batch_size = batch_size
        with naming_missing_data((dataset_name,), "dataloader.test.dataset.names"):
            return instantiate(loader)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        evaluator = cls._node("dataloader.evaluator")
        evaluator.dataset_name = dataset_name
        evaluator.output_dir = output_folder or os.path.join(
            cfg.OUTPUT_DIR, "inference", dataset_name
        )
        return instantiate(evaluator)


def lazy_run_config(args, world_size=None, training=True):
    """(the checked yacs config, the ``LazyTrainer`` class) of the lazy config
    ``args.config_file`` with the overrides ``args.opts`` ("key=value"). A bad override key or
    EvalNorm value raises, naming the key."""
    lazy = load_lazy_config(args.config_file, args.opts)
    cfg = lazy_to_cfg(lazy, world_size, training=training)
    return cfg, LazyTrainer.for_config(lazy)


def setup_lazy(args):
    """In each worker: :func:`lazy_run_config`, then detectron2's ``default_setup`` of the lazy
    config (logging, the config saved to ``train.output_dir`` as config.yaml, seeds) and the
    ``evalnorm_det`` logger. Returns (yacs config, trainer class)."""
    training = args.training and not args.eval_only
    cfg, trainer_class = lazy_run_config(args, training=training)
    default_setup(trainer_class.lazy, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="evalnorm_det")
    return cfg, trainer_class

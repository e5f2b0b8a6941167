"""From a config and a checkpoint to an EvalNorm model, and the training batches that fit its
alpha/beta offline: the pieces the rescue tools and the per-mode test share."""

import logging

from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.events import EventStorage

from ..config import norm_batch_sizes
from ..estimation import estimate_offline
from ..modeling import convert_norms
from .checkpoint import EvalNormCheckpointer

__all__ = [
    "build_evalnorm_model",
    "estimate_offline_from_config",
    "load_evalnorm_model",
    "rescue_metadata",
    "training_batches",
]

logger = logging.getLogger(__name__)


def build_evalnorm_model(cfg):
    """``build_model(cfg)`` with every BatchNorm-type layer that the config did not already make
    EvalNorm converted to it (``convert_norms``): a detectron2 BN or FrozenBN model evaluates in
    every EvalNorm mode, and in "ema" exactly as before."""
    model = build_model(cfg)
    count = convert_norms(cfg, model)
    if count:
        images, rois = norm_batch_sizes(cfg)
        logger.info(
            "Converted %d BatchNorm layers to EvalNorm2d (B = %d images per GPU, %d ROIs per GPU "
            "in the ROI heads)",
            count,
            images,
            rois,
        )
    return model


def load_evalnorm_model(cfg):
    """``build_evalnorm_model(cfg)`` with the checkpoint ``MODEL.WEIGHTS`` (required) loaded by
    :class:`EvalNormCheckpointer`, which refuses folded BN."""
    if not cfg.MODEL.WEIGHTS:
        raise ValueError(
            "MODEL.WEIGHTS is empty: give the checkpoint to work on (MODEL.WEIGHTS path.pth)"
        )
    if not cfg.MODEL.EVALNORM.NORM_BATCH_SIZE:
        logger.warning(
            "MODEL.EVALNORM.NORM_BATCH_SIZE is not set: taking B = SOLVER.IMS_PER_BATCH / "
            "processes = %d images per GPU. If the model trained with another number of images "
            "per GPU, pass --norm-batch-size (MODEL.EVALNORM.NORM_BATCH_SIZE).",
            norm_batch_sizes(cfg)[0],
        )
    model = build_evalnorm_model(cfg)
    EvalNormCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model


def rescue_metadata(cfg, coefficients, **extra):
    """What a rescued checkpoint records under "evalnorm": where alpha/beta come from and the
    B they are for."""
    images, rois = norm_batch_sizes(cfg)
    return {
        "coefficients": coefficients,
        "source": cfg.MODEL.WEIGHTS,
        "norm_batch_size": {"images_per_gpu": images, "rois_per_gpu": rois},
        **extra,
    }


def training_batches(cfg, build_train_loader):
    """An iterator over training batches of B images per process, B the model's training
    images per GPU (``MODEL.EVALNORM.NORM_BATCH_SIZE`` or derived), from
    ``build_train_loader(cfg)`` (for example ``Trainer.build_train_loader``)."""
    images, _ = norm_batch_sizes(cfg)
    cfg = cfg.clone()
    cfg.defrost()
    cfg.SOLVER.IMS_PER_BATCH = images * comm.get_world_size()
    cfg.MODEL.EVALNORM.NORM_BATCH_SIZE = images
    return iter(build_train_loader(cfg))


def estimate_offline_from_config(cfg, model, batches):
    """:func:`estimate_offline` with ``MODEL.EVALNORM.OFFLINE``'s settings, in an event storage
    (detectron2's models log to one in training mode)."""
    offline = cfg.MODEL.EVALNORM.OFFLINE
    with EventStorage():
        return estimate_offline(
            model,
            batches,
            offline.MAX_ITER,
            lr=offline.LR,
            optimizer=offline.OPTIMIZER,
            momentum=offline.MOMENTUM,
            patience=offline.PATIENCE,
            min_delta=offline.MIN_DELTA,
            log_period=offline.LOG_PERIOD,
        )

"""The rescue of BatchNorm checkpoints: from a config and a checkpoint to an EvalNorm model, the
training batches that fit its alpha/beta offline, and the rescued checkpoint written back (what
the rescue tools and the trainer's test share).

B is resolved once by the caller (``evalnorm_det.config.norm_batch_sizes``) and passed in."""

import logging
import os

import numpy as np
import torch
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.events import EventStorage

from evalnorm import EvalNorm2d, estimate_offline

from ..modeling import convert_norms
from ..utils.atomic import atomic_write
from ..utils.safe_load import read_checkpoint
from .checkpoint import EvalNormCheckpointer

__all__ = [
    "build_evalnorm_model",
    "estimate_offline_from_config",
    "load_evalnorm_model",
    "rescue_metadata",
    "save_evalnorm_checkpoint",
    "training_batches",
]

logger = logging.getLogger(__name__)


def build_evalnorm_model(cfg, batch_sizes, model=None):
    """``model`` (default: ``build_model(cfg)``) with every BatchNorm-type layer that the config did not already make
    EvalNorm converted to it (``convert_norms``, B from ``batch_sizes``, a ``NormBatchSizes``):
    a detectron2 BN or FrozenBN model evaluates in every EvalNorm mode, and in "ema" exactly as
    before."""
    model = build_model(cfg) if model is None else model
    count = convert_norms(cfg, model, batch_sizes)
    if count:
        logger.info(
            "Converted %d BatchNorm layers to EvalNorm2d (B = %d images per GPU, %d ROIs per GPU "
            "in the ROI heads, %d foreground ROIs per GPU in the mask head)",
            count,
            *batch_sizes,
        )
    return model


def load_evalnorm_model(cfg, batch_sizes):
    """``build_evalnorm_model(cfg, batch_sizes)`` with the checkpoint ``MODEL.WEIGHTS``
    (required) loaded by :class:`EvalNormCheckpointer`, which refuses folded BN."""
    if not cfg.MODEL.WEIGHTS:
        raise ValueError(
            "MODEL.WEIGHTS is empty: give the checkpoint to work on (MODEL.WEIGHTS path.pth)"
        )
    if not cfg.MODEL.EVALNORM.NORM_BATCH_SIZE:
        logger.warning(
            "MODEL.EVALNORM.NORM_BATCH_SIZE is not set: taking B = SOLVER.IMS_PER_BATCH / "
            "processes = %d images per GPU. If the model trained with another number of images "
            "per GPU, pass --norm-batch-size (MODEL.EVALNORM.NORM_BATCH_SIZE).",
            batch_sizes.images,
        )
    model = build_evalnorm_model(cfg, batch_sizes)
    EvalNormCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model


def rescue_metadata(cfg, batch_sizes, coefficients, **extra):
    """What a rescued checkpoint records under "evalnorm": where alpha/beta come from and the
    B (``batch_sizes``) they are for (the mask head's with ``MODEL.MASK_ON``)."""
    norm_batch_size = {"images_per_gpu": batch_sizes.images, "rois_per_gpu": batch_sizes.rois}
    if cfg.MODEL.MASK_ON:
        norm_batch_size["fg_rois_per_gpu"] = batch_sizes.fg_rois
    return {
        "coefficients": coefficients,
        "source": cfg.MODEL.WEIGHTS,
        "norm_batch_size": norm_batch_size,
        **extra,
    }


def training_batches(cfg, build_train_loader, images_per_gpu):
    """An iterator over training batches of ``images_per_gpu`` images per process (the model's
    training images per GPU, ``norm_batch_sizes(cfg).images``), from
    ``build_train_loader(cfg)`` (for example ``Trainer.build_train_loader``)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.SOLVER.IMS_PER_BATCH = images_per_gpu * comm.get_world_size()
    cfg.MODEL.EVALNORM.NORM_BATCH_SIZE = images_per_gpu
    return iter(build_train_loader(cfg))


def estimate_offline_from_config(cfg, model, batches):
    """:func:`estimate_offline` with ``MODEL.EVALNORM.OFFLINE``'s settings, in an event storage
    (detectron2's models log to one in training mode). With ``INPUTS`` "evaluation" it fits
    ``model.backbone`` on the batches' preprocessed images; the other layers keep theirs."""
    offline = cfg.MODEL.EVALNORM.OFFLINE
    if offline.INPUTS == "evaluation":
        detector, model = model, model.backbone
        batches = (detector.preprocess_image(batch).tensor for batch in batches)
    with EventStorage():
        return estimate_offline(
            model,
            batches,
            offline.MAX_ITER,
            inputs=offline.INPUTS,
            lr=offline.LR,
            optimizer=offline.OPTIMIZER,
            momentum=offline.MOMENTUM,
            patience=offline.PATIENCE,
            min_delta=offline.MIN_DELTA,
            log_period=offline.LOG_PERIOD,
        )


def save_evalnorm_checkpoint(model, source, path, metadata=None, overwrite=False):
    """Write ``source`` (the checkpoint ``model`` was loaded from) to ``path`` with the alpha and
    beta of ``model``'s EvalNorm2d layers added or replaced, and nothing else changed: every other
    entry keeps its value bit for bit (arrays of a .pkl become tensors). ``metadata`` is stored
    under the top-level key "evalnorm". The file is written whole, then renamed into place.
    """
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    checkpoint = read_checkpoint(source)
    if "model" not in checkpoint:
        checkpoint = {"model": checkpoint}
    state = {
        k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
        for k, v in checkpoint["model"].items()
    }
    for name, m in model.named_modules():
        if not isinstance(m, EvalNorm2d):
            continue
        if f"{name}.running_mean" not in state:
            raise KeyError(
                f"{source} has no {name}.running_mean: its names are not the model's (a Caffe2 "
                "checkpoint?), so alpha/beta cannot be written beside its weights"
            )
        state[f"{name}.alpha_logit"] = m.alpha_logit.detach().cpu().clone()
        state[f"{name}.beta_logit"] = m.beta_logit.detach().cpu().clone()
    checkpoint["model"] = state
    checkpoint.pop("matching_heuristics", None)
    if metadata is not None:
        checkpoint["evalnorm"] = metadata
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as f:
        torch.save(checkpoint, f)

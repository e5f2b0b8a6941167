"""EvalNorm's config keys, their checks, and the normalization batch sizes they imply."""

from detectron2.config import CfgNode as CN
from detectron2.utils import comm

from .layers import EVAL_MODES, EVALNORM_NAMES

__all__ = ["add_evalnorm_config", "check_evalnorm_config", "norm_batch_sizes"]

# Norm names the builders accept besides EvalNorm's: detectron2's.
DETECTRON2_NORMS = ("BN", "FrozenBN", "SyncBN", "GN", "")
INIT_CHOICES = ("rule_of_thumb", "simple", "value")
OPTIMIZERS = ("adam", "sgd")


def add_evalnorm_config(cfg):
    """Add EvalNorm's keys, with their defaults, to a detectron2 config (in place)."""
    _C = cfg
    _C.MODEL.EVALNORM = CN()
    # Norm of the C4 backbone (stem, res2-res4) and of the ROI head's res5, chosen separately:
    # "EN" (trains as BN, evaluates with EvalNorm), "FrozenEN" (frozen statistics and affine,
    # as FrozenBN, evaluates with EvalNorm), or a detectron2 norm: "BN", "FrozenBN", "SyncBN",
    # "GN", "" (none). These replace MODEL.RESNETS.NORM, which the EvalNorm builders ignore.
    _C.MODEL.EVALNORM.BACKBONE_NORM = "EN"
    _C.MODEL.EVALNORM.ROI_HEAD_NORM = "EN"
    # How alpha and beta start in every EN/FrozenEN layer: "rule_of_thumb" (1/B^2), "simple"
    # (1/B), or "value" (INIT_ALPHA and INIT_BETA). B is derived, never typed: images per GPU
    # (SOLVER.IMS_PER_BATCH / world size) in the backbone, sampled ROIs per GPU
    # (MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE * images per GPU) in the ROI head.
    # A checkpoint that has alpha/beta overrides these.
    _C.MODEL.EVALNORM.INIT = "rule_of_thumb"
    _C.MODEL.EVALNORM.INIT_ALPHA = 0.1
    _C.MODEL.EVALNORM.INIT_BETA = 0.1
    # Regime (b): after loading MODEL.WEIGHTS for a new training run (not on --resume), reset
    # every norm layer's affine (1, 0) and statistics (mean 0, var 1).
    _C.MODEL.EVALNORM.RESET_NORM = False
    # How an EN layer evaluates outside the trainer's multi-mode test (DefaultPredictor,
    # deployment): one of "en", "ema", "rule_of_thumb", "simple".
    _C.MODEL.EVALNORM.EVAL_MODE = "en"

    # Online estimation of alpha/beta while training (paper section 3.4), with their own
    # optimizer: the model's optimizer never sees them.
    _C.MODEL.EVALNORM.ONLINE = CN()
    _C.MODEL.EVALNORM.ONLINE.ENABLED = True
    _C.MODEL.EVALNORM.ONLINE.OPTIMIZER = "adam"  # "adam" or "sgd"
    _C.MODEL.EVALNORM.ONLINE.LR = 0.01
    _C.MODEL.EVALNORM.ONLINE.MOMENTUM = 0.9  # SGD only
    # Iterations between writes of every layer's alpha and beta to the event storage.
    _C.MODEL.EVALNORM.ONLINE.LOG_PERIOD = 20

    # The evaluation modes the trainer tests the same weights with, one after another; the
    # table reports EN minus EMA when both are listed.
    _C.TEST.EVALNORM_MODES = ["ema", "en", "rule_of_thumb"]

    # When > 0, every image is resized to SQUARE_SIZE x SQUARE_SIZE, in training and test
    # (the paper's 600x600), instead of INPUT.MIN_SIZE_* / MAX_SIZE_*.
    _C.INPUT.SQUARE_SIZE = 0


def norm_batch_sizes(cfg, world_size=None):
    """(backbone B, ROI head B): images per GPU and sampled ROIs per GPU.

    ``world_size`` defaults to the current process group's size; ``SOLVER.IMS_PER_BATCH``
    must split evenly over it.
    """
    world_size = comm.get_world_size() if world_size is None else world_size
    total = cfg.SOLVER.IMS_PER_BATCH
    if total < 1 or total % world_size:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH={total} does not split evenly over {world_size} processes "
            "(GPUs): EvalNorm needs the same number of images on every GPU, its normalization "
            "batch size B. Make SOLVER.IMS_PER_BATCH a multiple of the number of GPUs."
        )
    images = total // world_size
    return images, images * cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE


def _check_choice(value, choices, key):
    if value not in choices:
        raise ValueError(f"{key}={value!r}: expected one of {', '.join(map(repr, choices))}")


def check_evalnorm_config(cfg, world_size=None):
    """Raise ValueError, naming the key, for any EvalNorm setting that cannot work.

    Call it before building anything, so a bad config stops before training starts.
    """
    en = cfg.MODEL.EVALNORM
    norms = EVALNORM_NAMES + DETECTRON2_NORMS
    _check_choice(en.BACKBONE_NORM, norms, "MODEL.EVALNORM.BACKBONE_NORM")
    _check_choice(en.ROI_HEAD_NORM, norms, "MODEL.EVALNORM.ROI_HEAD_NORM")
    _check_choice(en.INIT, INIT_CHOICES, "MODEL.EVALNORM.INIT")
    _check_choice(en.EVAL_MODE, EVAL_MODES, "MODEL.EVALNORM.EVAL_MODE")
    _check_choice(en.ONLINE.OPTIMIZER, OPTIMIZERS, "MODEL.EVALNORM.ONLINE.OPTIMIZER")
    if en.INIT == "value":
        # Estimation works on logits: it can neither start nor move from exactly 0 or 1.
        bounds_ok = not en.ONLINE.ENABLED
        for key in ("INIT_ALPHA", "INIT_BETA"):
            v = en[key]
            if not (0.0 < v < 1.0 or (bounds_ok and 0.0 <= v <= 1.0)):
                expected = "[0, 1]" if bounds_ok else "(0, 1) while ONLINE.ENABLED is True"
                raise ValueError(f"MODEL.EVALNORM.{key}={v!r}: expected a number in {expected}")
    if not en.ONLINE.LR > 0:
        raise ValueError(f"MODEL.EVALNORM.ONLINE.LR={en.ONLINE.LR!r}: expected a number > 0")
    if not en.ONLINE.LOG_PERIOD >= 1:
        raise ValueError(
            f"MODEL.EVALNORM.ONLINE.LOG_PERIOD={en.ONLINE.LOG_PERIOD!r}: expected an integer >= 1"
        )
    modes = list(cfg.TEST.EVALNORM_MODES)
    if not modes:
        raise ValueError("TEST.EVALNORM_MODES is empty: list at least one of " + str(EVAL_MODES))
    for mode in modes:
        _check_choice(mode, EVAL_MODES, "TEST.EVALNORM_MODES entry")
    if cfg.INPUT.SQUARE_SIZE < 0:
        raise ValueError(f"INPUT.SQUARE_SIZE={cfg.INPUT.SQUARE_SIZE!r}: expected 0 (off) or > 0")
    norm_batch_sizes(cfg, world_size)

"""EvalNorm's config keys, their checks, and the normalization batch sizes they imply."""

import warnings
from typing import NamedTuple

from detectron2.config import CfgNode as CN
from detectron2.utils import comm

from evalnorm import EVAL_MODES, FROZEN_EN_CHOICES
from evalnorm.diagnosis import FACTORS
from evalnorm.estimation import INPUTS

from .layers import EVALNORM_NAMES

__all__ = [
    "TABLE_ROWS",
    "NormBatchSizes",
    "add_evalnorm_config",
    "check_evalnorm_config",
    "configured_rows",
    "fg_rois_per_image",
    "images_per_process",
    "norm_batch_sizes",
    "positives_per_image",
]

# Norm names the builders accept besides EvalNorm's: detectron2's.
DETECTRON2_NORMS = ("BN", "FrozenBN", "SyncBN", "GN", "")
INIT_CHOICES = ("rule_of_thumb", "simple", "value")
OPTIMIZERS = ("adam", "sgd")

# Every normalization choice the trainer's test can evaluate one set of weights with: one row of
# its table each, labelled as here. The first four and "batch" are EvalNorm2d modes; the others
# are procedures (``evalnorm_det.engine.evaluation.row_evaluation``).
TABLE_ROWS = {
    "ema": "EMA",  # vanilla BatchNorm: the running statistics
    "en": "EN",  # the checkpoint's alpha/beta (estimated online in training, or by the tools)
    "en_offline": "EN offline",  # alpha/beta fitted now on training images (section 3.4)
    "rule_of_thumb": "1/B^2",
    "simple": "1/B",
    "precise_bn": "PreciseBN",  # population statistics recomputed over training batches
    "head_batch_stats": "head batch stats",  # ROI head on its test batch's statistics
    # alpha = beta = 1: each sample normalized by its own statistics (prediction-time BN,
    # Nado et al. 2020, with a test batch of one sample)
    "prediction_time_bn": "prediction-time BN",
    "precise_bn_en_offline": "PreciseBN + EN offline",  # "precise_bn", then "en_offline"
    # alpha/beta scaled by the factor best on TEST.EVALNORM_CALIBRATION.DATASET (0: EMA)
    "en_calibrated": "EN calibrated",
}


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
    # How "FrozenEN" layers train (regime (c); their statistics and affine never change):
    # "frozen_target" (default): they normalize with the frozen statistics, and alpha/beta are
    # estimated against that frozen normalization (x - mu_E) / sqrt(var_E + eps), what training
    # produced: alpha = beta = 0 (EMA) is then optimal, so EN cannot do worse than EMA there;
    # "batch_target": they normalize with the frozen statistics, and alpha/beta are estimated
    # against the batch-normalized target (x - mu_B) / sqrt(var_B + eps), which training never
    # produced (the first reading of the paper; EN collapsed with it in the miniature);
    # "batch_stats": Table 2's header read literally ("BN EMA stats: ImageNet, not trained"):
    # they normalize with batch statistics, as BN in training (groups of NORM_BATCH_SIZE with
    # MICROBATCH), the EMA statistics and affine frozen; alpha/beta estimated as in
    # "batch_target". Stages frozen by MODEL.BACKBONE.FREEZE_AT always normalize with the
    # frozen statistics ("batch_stats" becomes "batch_target" there).
    _C.MODEL.EVALNORM.FROZEN_EN = "frozen_target"
    # Images per GPU the model trains with (or was trained with): B of the backbone's norms,
    # and with MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE that of the ROI head's. 0 derives it as
    # SOLVER.IMS_PER_BATCH / number of processes. Set it so that evaluation, offline
    # estimation and the rule of thumb use the training's B on any number of GPUs; a training
    # run checks that it equals its images per GPU.
    _C.MODEL.EVALNORM.NORM_BATCH_SIZE = 0
    # One process reproducing k GPUs x B images (the paper's section 4.1 setup): when True, the
    # SOLVER.IMS_PER_BATCH / processes images of each process are normalized in groups of
    # NORM_BATCH_SIZE (B) consecutive images, each group with its own statistics, in the
    # backbone's EN layers, and the C4 box head's res5 normalizes the ROIs of each group of
    # images together. The running statistics are updated from each group in turn. Needs
    # NORM_BATCH_SIZE > 0 dividing the images per process, and norms that do not pool the
    # batch otherwise (EN, FrozenEN, FrozenBN, GN or none).
    _C.MODEL.EVALNORM.MICROBATCH = False
    # How alpha and beta start in every EN/FrozenEN layer: "rule_of_thumb" (1/B^2), "simple"
    # (1/B), or "value" (INIT_ALPHA and INIT_BETA). B: images per GPU (NORM_BATCH_SIZE) in the
    # backbone, sampled ROIs per GPU (MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE * images per GPU)
    # in the ROI head.
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
    # Each layer's auxiliary loss averages about this many (sample, position) pairs per
    # channel, at a fixed stride (0: all). Statistics are always the whole batch's; this only
    # bounds the cost of the loss on large feature maps (see benchmarks/overhead.py).
    _C.MODEL.EVALNORM.ONLINE.MAX_POSITIONS = 0
    # The first iteration whose batch steps alpha/beta (before it they keep their INIT value).
    # Fitting only the last iterations (e.g. 0.9 x SOLVER.MAX_ITER) avoids fitting them to an
    # EMA that lags behind a fast-changing model (slow BN momentum, large B); see
    # docs/BENCHMARKS.md, section 1.
    _C.MODEL.EVALNORM.ONLINE.START_ITER = 0

    # Offline estimation of alpha/beta on a trained model (section 3.4, "EN offline"):
    # tools/estimate_offline.py and the table's "en_offline" row. Training images go through
    # the model in batches of its B, running statistics untouched, for at most MAX_ITER
    # iterations; with PATIENCE > 0 it stops sooner when the mean auxiliary loss over the
    # last PATIENCE iterations improved by less than MIN_DELTA (relative) on the previous one.
    _C.MODEL.EVALNORM.OFFLINE = CN()
    _C.MODEL.EVALNORM.OFFLINE.MAX_ITER = 500
    _C.MODEL.EVALNORM.OFFLINE.PATIENCE = 100
    _C.MODEL.EVALNORM.OFFLINE.MIN_DELTA = 0.001
    _C.MODEL.EVALNORM.OFFLINE.OPTIMIZER = "adam"  # "adam" or "sgd"
    _C.MODEL.EVALNORM.OFFLINE.LR = 0.01
    _C.MODEL.EVALNORM.OFFLINE.MOMENTUM = 0.9  # SGD only
    _C.MODEL.EVALNORM.OFFLINE.LOG_PERIOD = 20
    # What each layer is fitted on (evalnorm.estimate_offline's ``inputs``): "training" (the
    # paper's: its inputs in the training forward) or "evaluation" (its inputs in an evaluation
    # forward, the layers upstream evaluating as EvalNorm). "evaluation" fits the backbone's
    # layers only: the ROI heads see other boxes in the two forwards and keep their alpha/beta.
    _C.MODEL.EVALNORM.OFFLINE.INPUTS = "training"

    # The rows of the evaluation table, each a normalization the trainer tests the same weights
    # with (see TABLE_ROWS above): "ema", "en", "en_offline",
    # "rule_of_thumb", "simple", "precise_bn" (TEST.PRECISE_BN.NUM_ITER batches),
    # "head_batch_stats", "prediction_time_bn" (alpha = beta = 1), "precise_bn_en_offline"
    # (PreciseBN statistics, then EN offline); "all" stands for all of them. The table reports
    # EN minus EMA when both are listed.
    _C.TEST.EVALNORM_ROWS = ["ema", "en", "rule_of_thumb"]
    # Deprecated name of TEST.EVALNORM_ROWS, read (with a FutureWarning) when not empty.
    _C.TEST.EVALNORM_MODES = []
    # Calibration ("en_calibrated" row, tools/calibrate_coefficients.py): every alpha and beta
    # times the factor of FACTORS with the best box AP on DATASET, a registered dataset kept
    # apart from DATASETS.TEST (a validation split); ties go to the smaller factor. With 0 among
    # FACTORS, EMA is a candidate: the calibrated model is never worse than EMA on DATASET.
    _C.TEST.EVALNORM_CALIBRATION = CN()
    _C.TEST.EVALNORM_CALIBRATION.DATASET = ""
    _C.TEST.EVALNORM_CALIBRATION.FACTORS = list(FACTORS)

    # RetinaNet (MODEL.META_ARCHITECTURE "EvalNormRetinaNet"): its head runs at every FPN
    # level, and MODEL.RETINANET.NORM (detectron2's names, "EN", "FrozenEN"; B = images per
    # GPU) keeps "per_level" running statistics (and alpha/beta), one set per level with a
    # shared affine (detectron2's CycleBatchNormList for BN/SyncBN), or one "shared" set for
    # all levels, updated at every level (for BN: the baseline detectron2 warns against).
    # GN, FrozenBN and "" have no trained statistics: always shared.
    _C.MODEL.EVALNORM.RETINANET_HEAD_STATS = "per_level"

    # When > 0, every image is resized to SQUARE_SIZE x SQUARE_SIZE, in training and test
    # (the paper's 600x600), instead of INPUT.MIN_SIZE_* / MAX_SIZE_*.
    _C.INPUT.SQUARE_SIZE = 0


class NormBatchSizes(NamedTuple):
    """The normalization batch size B of each place in the model, as in training."""

    images: int  # images per GPU: B of the backbone's (and FPN's) norms
    rois: int  # sampled ROIs per GPU: B of the ROI heads' norms (box head, C4's res5)
    # Foreground ROIs per GPU: B of the mask head's norms. Their number varies per iteration;
    # B is the sampler's cap, images x int(BATCH_SIZE_PER_IMAGE x POSITIVE_FRACTION).
    fg_rois: int


def norm_batch_sizes(cfg, world_size=None):
    """The config's :class:`NormBatchSizes` (images per GPU, sampled ROIs per GPU): the one
    place B is derived from the config. Resolve it once and pass it on.

    Images per GPU is ``MODEL.EVALNORM.NORM_BATCH_SIZE`` when set, else
    ``SOLVER.IMS_PER_BATCH`` / ``world_size`` (the current process group's size by default),
    which it must divide; ROIs per GPU are that times ``MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE``;
    foreground ROIs per GPU (the mask head's batch) that times the sampler's cap of positives
    per image, ``int(BATCH_SIZE_PER_IMAGE * POSITIVE_FRACTION)`` (at least 1).
    """
    images = cfg.MODEL.EVALNORM.NORM_BATCH_SIZE or images_per_process(cfg, world_size)
    heads = cfg.MODEL.ROI_HEADS
    fg_rois = fg_rois_per_image(heads.BATCH_SIZE_PER_IMAGE, heads.POSITIVE_FRACTION)
    return NormBatchSizes(images, images * heads.BATCH_SIZE_PER_IMAGE, images * fg_rois)


def fg_rois_per_image(batch_size_per_image, positive_fraction):
    """Samples each image adds to the mask head's normalization batch: the ROI heads' sampler's
    cap of foreground ROIs per image (:func:`positives_per_image`), at least 1. The mask head's
    B is images per GPU times this, in yacs configs (:func:`norm_batch_sizes`) and LazyConfigs
    (``evalnorm_det.lazy.fg_rois_per_image_node``) alike."""
    return max(1, int(batch_size_per_image * positive_fraction))


def positives_per_image(cfg):
    """The most foreground ROIs the ROI heads' sampler takes from one image: detectron2's
    ``subsample_labels`` cap, ``int(BATCH_SIZE_PER_IMAGE * POSITIVE_FRACTION)``."""
    heads = cfg.MODEL.ROI_HEADS
    return int(heads.BATCH_SIZE_PER_IMAGE * heads.POSITIVE_FRACTION)


def images_per_process(cfg, world_size=None):
    """``SOLVER.IMS_PER_BATCH`` / ``world_size``, which it must divide."""
    world_size = comm.get_world_size() if world_size is None else world_size
    total = cfg.SOLVER.IMS_PER_BATCH
    if total < 1 or total % world_size:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH={total} does not split evenly over {world_size} processes "
            "(GPUs): EvalNorm needs the same number of images on every GPU, its normalization "
            "batch size B. Make SOLVER.IMS_PER_BATCH a multiple of the number of GPUs."
        )
    return total // world_size


def _check_choice(value, choices, key):
    if value not in choices:
        raise ValueError(f"{key}={value!r}: expected one of {', '.join(map(repr, choices))}")


def _rows_key(cfg):
    """(key, rows): ``TEST.EVALNORM_ROWS``, or its deprecated name where that one is set."""
    if not cfg.TEST.EVALNORM_MODES:
        return "TEST.EVALNORM_ROWS", list(cfg.TEST.EVALNORM_ROWS)
    warnings.warn(
        "TEST.EVALNORM_MODES is deprecated: name the table's rows with TEST.EVALNORM_ROWS",
        FutureWarning,
        stacklevel=3,
    )
    return "TEST.EVALNORM_MODES", list(cfg.TEST.EVALNORM_MODES)


def configured_rows(cfg):
    """The rows of the evaluation table: ``TEST.EVALNORM_ROWS`` with "all" expanded, in
    ``TABLE_ROWS`` order ("en_calibrated" only where a calibration dataset is set, the ROI
    heads' rows only for models that have them)."""
    rows = _rows_key(cfg)[1]
    if "all" not in rows:
        return rows
    calibrated = bool(cfg.TEST.EVALNORM_CALIBRATION.DATASET)
    rows = [r for r in TABLE_ROWS if r != "en_calibrated" or calibrated]
    return [r for r in rows if not (_is_retinanet(cfg) and r in ROI_HEAD_ROWS)]


def check_evalnorm_config(cfg, world_size=None, training=True):
    """Raise ValueError, naming the key, for any EvalNorm setting that cannot work.

    Call it before building anything, so a bad config stops before training starts. With
    ``training`` False (evaluation, offline estimation), ``SOLVER.IMS_PER_BATCH`` need not
    split over ``world_size`` when ``MODEL.EVALNORM.NORM_BATCH_SIZE`` gives B.
    """
    en = cfg.MODEL.EVALNORM
    norms = EVALNORM_NAMES + DETECTRON2_NORMS
    _check_choice(en.BACKBONE_NORM, norms, "MODEL.EVALNORM.BACKBONE_NORM")
    _check_choice(en.ROI_HEAD_NORM, norms, "MODEL.EVALNORM.ROI_HEAD_NORM")
    _check_choice(en.FROZEN_EN, FROZEN_EN_CHOICES, "MODEL.EVALNORM.FROZEN_EN")
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
    _check_choice(en.OFFLINE.OPTIMIZER, OPTIMIZERS, "MODEL.EVALNORM.OFFLINE.OPTIMIZER")
    _check_choice(en.OFFLINE.INPUTS, INPUTS, "MODEL.EVALNORM.OFFLINE.INPUTS")
    _check_number("MODEL.EVALNORM.ONLINE.LR", en.ONLINE.LR, "> 0")
    _check_number("MODEL.EVALNORM.OFFLINE.LR", en.OFFLINE.LR, "> 0")
    _check_number("MODEL.EVALNORM.OFFLINE.MIN_DELTA", en.OFFLINE.MIN_DELTA, ">= 0")
    _check_number("MODEL.EVALNORM.ONLINE.LOG_PERIOD", en.ONLINE.LOG_PERIOD, ">= 1", integer=True)
    _check_number("MODEL.EVALNORM.OFFLINE.LOG_PERIOD", en.OFFLINE.LOG_PERIOD, ">= 1", integer=True)
    _check_number(
        "MODEL.EVALNORM.ONLINE.MAX_POSITIONS", en.ONLINE.MAX_POSITIONS, ">= 0", integer=True
    )
    _check_number("MODEL.EVALNORM.ONLINE.START_ITER", en.ONLINE.START_ITER, ">= 0", integer=True)
    if training and en.ONLINE.ENABLED and en.ONLINE.START_ITER >= cfg.SOLVER.MAX_ITER:
        raise ValueError(
            f"MODEL.EVALNORM.ONLINE.START_ITER={en.ONLINE.START_ITER} is not before "
            f"SOLVER.MAX_ITER={cfg.SOLVER.MAX_ITER}: alpha/beta would never be estimated (set "
            "ONLINE.ENABLED False to train without estimation)"
        )
    _check_number("MODEL.EVALNORM.OFFLINE.MAX_ITER", en.OFFLINE.MAX_ITER, ">= 1", integer=True)
    _check_number("MODEL.EVALNORM.OFFLINE.PATIENCE", en.OFFLINE.PATIENCE, ">= 0", integer=True)
    _check_number("MODEL.EVALNORM.NORM_BATCH_SIZE", en.NORM_BATCH_SIZE, ">= 0", integer=True)
    rows_key, rows = _rows_key(cfg)
    if not rows:
        raise ValueError(f"{rows_key} is empty: list at least one of " + ", ".join(TABLE_ROWS))
    for row in rows:
        _check_choice(row, (*TABLE_ROWS, "all"), f"{rows_key} entry")
    _check_retinanet(cfg, rows_key, rows)
    _check_calibration(cfg, rows_key, rows)
    if cfg.INPUT.SQUARE_SIZE < 0:
        raise ValueError(f"INPUT.SQUARE_SIZE={cfg.INPUT.SQUARE_SIZE!r}: expected 0 (off) or > 0")
    if cfg.MODEL.MASK_ON:
        _check_mask_head(cfg)
    if en.MICROBATCH:
        _check_microbatch(cfg)
    if training or not en.NORM_BATCH_SIZE:
        images = images_per_process(cfg, world_size)
        if en.MICROBATCH and images % en.NORM_BATCH_SIZE:
            raise ValueError(
                f"MODEL.EVALNORM.MICROBATCH: SOLVER.IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH} / "
                f"{cfg.SOLVER.IMS_PER_BATCH // images} processes = {images} images per process "
                f"do not split into groups of MODEL.EVALNORM.NORM_BATCH_SIZE="
                f"{en.NORM_BATCH_SIZE}"
            )
        if en.NORM_BATCH_SIZE and en.NORM_BATCH_SIZE != images and not en.MICROBATCH:
            raise ValueError(
                f"MODEL.EVALNORM.NORM_BATCH_SIZE={en.NORM_BATCH_SIZE}, but training puts "
                f"SOLVER.IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH} / "
                f"{cfg.SOLVER.IMS_PER_BATCH // images} processes = {images} images on each GPU. "
                f"Set SOLVER.IMS_PER_BATCH to {en.NORM_BATCH_SIZE} x the number of GPUs."
            )


def _check_calibration(cfg, rows_key, rows):
    calibration = cfg.TEST.EVALNORM_CALIBRATION
    factors = list(calibration.FACTORS)
    if not factors:
        raise ValueError("TEST.EVALNORM_CALIBRATION.FACTORS is empty: give factors >= 0")
    for factor in factors:
        _check_number("TEST.EVALNORM_CALIBRATION.FACTORS entry", factor, ">= 0")
    if "en_calibrated" in rows and not calibration.DATASET:
        raise ValueError(
            f"{rows_key} has 'en_calibrated', which needs TEST.EVALNORM_CALIBRATION.DATASET: "
            "a registered validation dataset kept apart from DATASETS.TEST"
        )
    if calibration.DATASET and calibration.DATASET in cfg.DATASETS.TEST:
        raise ValueError(
            f"TEST.EVALNORM_CALIBRATION.DATASET={calibration.DATASET!r} is also in DATASETS.TEST: "
            "calibrating on the test data would report a choice made on it; give a validation "
            "split kept apart from the test split"
        )


RETINANET_HEAD_STATS = ("per_level", "shared")
# Table rows that need ROI heads, which RetinaNet has none of.
ROI_HEAD_ROWS = ("head_batch_stats",)


def _is_retinanet(cfg):
    return cfg.MODEL.META_ARCHITECTURE in ("RetinaNet", "EvalNormRetinaNet")


def _check_retinanet(cfg, rows_key, rows):
    _check_choice(
        cfg.MODEL.EVALNORM.RETINANET_HEAD_STATS,
        RETINANET_HEAD_STATS,
        "MODEL.EVALNORM.RETINANET_HEAD_STATS",
    )
    if not _is_retinanet(cfg):
        return
    norm, arch = cfg.MODEL.RETINANET.NORM, cfg.MODEL.META_ARCHITECTURE
    _check_choice(norm, EVALNORM_NAMES + DETECTRON2_NORMS, "MODEL.RETINANET.NORM")
    if arch == "RetinaNet" and (
        norm in EVALNORM_NAMES or cfg.MODEL.EVALNORM.RETINANET_HEAD_STATS != "per_level"
    ):
        raise ValueError(
            f"MODEL.RETINANET.NORM={norm!r} with MODEL.EVALNORM.RETINANET_HEAD_STATS="
            f"{cfg.MODEL.EVALNORM.RETINANET_HEAD_STATS!r} needs MODEL.META_ARCHITECTURE "
            "'EvalNormRetinaNet' (detectron2's 'RetinaNet' knows neither)"
        )
    if "all" not in rows:
        for row in rows:
            if row in ROI_HEAD_ROWS:
                raise ValueError(
                    f"{rows_key} has {row!r}, which evaluates the ROI heads' norms on batch "
                    f"statistics: MODEL.META_ARCHITECTURE={arch!r} has no ROI heads"
                )


# The registered name of evalnorm_det.modeling.EvalNormConvUpsampleHead.
EVALNORM_MASK_HEAD = "EvalNormConvUpsampleHead"


def _check_mask_head(cfg):
    """The keys a Mask R-CNN (``MODEL.MASK_ON``) reads beyond a box detector's."""
    heads, mask = cfg.MODEL.ROI_HEADS, cfg.MODEL.ROI_MASK_HEAD
    if positives_per_image(cfg) < 1:
        raise ValueError(
            f"MODEL.ROI_HEADS.POSITIVE_FRACTION={heads.POSITIVE_FRACTION} x "
            f"BATCH_SIZE_PER_IMAGE={heads.BATCH_SIZE_PER_IMAGE} is below 1: the sampler takes "
            "no foreground ROI, so the mask head (MODEL.MASK_ON) would never train"
        )
    if mask.NAME == EVALNORM_MASK_HEAD and mask.NUM_CONV < 1:
        raise ValueError(
            f"MODEL.ROI_MASK_HEAD.NAME={mask.NAME!r} with MODEL.ROI_MASK_HEAD.NUM_CONV="
            f"{mask.NUM_CONV}: the head has no convolution to normalize (in C4, res5 in the ROI "
            "heads carries the norm and the mask head is the deconvolution alone); use "
            "'MaskRCNNConvUpsampleHead', or NUM_CONV >= 1"
        )
    if mask.NAME != EVALNORM_MASK_HEAD and mask.NORM in EVALNORM_NAMES:
        raise ValueError(
            f"MODEL.ROI_MASK_HEAD.NORM={mask.NORM!r}: {mask.NAME!r} takes detectron2's norms "
            f"only; for EvalNorm in the mask head use MODEL.ROI_MASK_HEAD.NAME "
            f"{EVALNORM_MASK_HEAD!r}, normalized by MODEL.EVALNORM.ROI_HEAD_NORM"
        )
    # evalnorm_det.data.digits stores masks as RLE, which detectron2 reads as bitmasks only.
    rle = [name for name in cfg.DATASETS.TRAIN if name.startswith("evalnorm_digits")]
    if rle and cfg.INPUT.MASK_FORMAT != "bitmask":
        raise ValueError(
            f"INPUT.MASK_FORMAT={cfg.INPUT.MASK_FORMAT!r}: the masks of {rle[0]!r} are COCO RLE, "
            "which detectron2 reads only as 'bitmask'"
        )


def _check_microbatch(cfg):
    en = cfg.MODEL.EVALNORM
    if not en.NORM_BATCH_SIZE:
        raise ValueError(
            "MODEL.EVALNORM.MICROBATCH needs MODEL.EVALNORM.NORM_BATCH_SIZE, the images in each "
            "group (the images per GPU being reproduced); it is 0"
        )
    # BN and SyncBN would pool all the images of the process, not each group.
    pooling = ("BN", "SyncBN")
    keys = {
        "MODEL.EVALNORM.BACKBONE_NORM": en.BACKBONE_NORM,
        "MODEL.EVALNORM.ROI_HEAD_NORM": en.ROI_HEAD_NORM,
        "MODEL.FPN.NORM": cfg.MODEL.FPN.NORM,
    }
    if _is_retinanet(cfg):  # no ROI heads; its head's norms pool the images of each level
        del keys["MODEL.EVALNORM.ROI_HEAD_NORM"]
        keys["MODEL.RETINANET.NORM"] = cfg.MODEL.RETINANET.NORM
    for key, norm in keys.items():
        if norm in pooling:
            raise ValueError(
                f"{key}={norm!r} normalizes over all images of a process: "
                "MODEL.EVALNORM.MICROBATCH needs EN, FrozenEN, FrozenBN, GN or ''"
            )
    if _is_retinanet(cfg):
        return
    if en.ROI_HEAD_NORM in EVALNORM_NAMES and cfg.MODEL.ROI_HEADS.NAME != "EvalNormRes5ROIHeads":
        raise ValueError(
            f"MODEL.EVALNORM.MICROBATCH with MODEL.EVALNORM.ROI_HEAD_NORM={en.ROI_HEAD_NORM!r} "
            "groups the ROIs of each group of images only in the C4 box head "
            f"(MODEL.ROI_HEADS.NAME 'EvalNormRes5ROIHeads'), not {cfg.MODEL.ROI_HEADS.NAME!r}"
        )


def _check_number(key, value, expected, integer=False):
    """``expected``: "> 0", ">= 0" or ">= 1"."""
    op, bound = expected.split()
    kind = (int,) if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    ok = ok and (value > float(bound) if op == ">" else value >= float(bound))
    if not ok:
        noun = "an integer" if integer else "a number"
        raise ValueError(f"{key}={value!r}: expected {noun} {expected}")

"""EvalNorm's settings in a LazyConfig (detectron2's Python configs).

A lazy config holds them in its top-level node ``evalnorm``, a mirror of the yacs keys that
``add_evalnorm_config`` adds: ``evalnorm.MODEL.EVALNORM.*`` and ``evalnorm.TEST.EVALNORM_*``,
same names, same defaults (made from ``add_evalnorm_config`` itself by
:func:`evalnorm_defaults`). The model's norms read them by interpolation
(:func:`evalnorm_norm_node`); the entry point turns the node, with the lazy config's own values
for the few detectron2 keys EvalNorm's machinery reads (``LAZY_KEYS``), into the yacs config that
``check_evalnorm_config``, the hooks and the evaluation table take (:func:`lazy_to_cfg`).
"""

import inspect
import re

from detectron2.config import CfgNode as CN
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, get_cfg
from detectron2.solver import WarmupParamScheduler
from detectron2.utils.registry import locate
from fvcore.common.param_scheduler import CosineParamScheduler
from omegaconf import DictConfig, OmegaConf

from .config import add_evalnorm_config, check_evalnorm_config, fg_rois_per_image
from .modeling import evalnorm_norm, evalnorm_retinanet_norm

__all__ = [
    "LAZY_KEYS",
    "check_override_keys",
    "evalnorm_defaults",
    "evalnorm_norm_node",
    "evalnorm_retinanet_norm_node",
    "fg_rois_per_image_node",
    "lazy_to_cfg",
    "load_lazy_config",
    "warmup_cosine",
]

# The detectron2 keys EvalNorm's machinery (checks, trainer, table) reads, and where a lazy
# config in detectron2's layout holds them. Those absent from a lazy config keep detectron2's
# default.
LAZY_KEYS = {
    "MODEL.DEVICE": "train.device",
    "MODEL.WEIGHTS": "train.init_checkpoint",
    "OUTPUT_DIR": "train.output_dir",
    "SEED": "train.seed",
    "SOLVER.MAX_ITER": "train.max_iter",
    "SOLVER.AMP.ENABLED": "train.amp.enabled",
    "SOLVER.CHECKPOINT_PERIOD": "train.checkpointer.period",
    "TEST.EVAL_PERIOD": "train.eval_period",
    "SOLVER.IMS_PER_BATCH": "dataloader.train.total_batch_size",
    "DATASETS.TRAIN": "dataloader.train.dataset.names",
    "DATASETS.TEST": "dataloader.test.dataset.names",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": "model.roi_heads.batch_size_per_image",
    "MODEL.ROI_HEADS.POSITIVE_FRACTION": "model.roi_heads.positive_fraction",
    "INPUT.MASK_FORMAT": "dataloader.train.mapper.instance_mask_format",
    # Read from the model's nodes as _FROM_NODE says.
    "MODEL.META_ARCHITECTURE": "model._target_",
    "MODEL.MASK_ON": "model.roi_heads.mask_head",
    "MODEL.RETINANET.NORM": "model.head.norm",
}


def _target_name(target):
    """A node's ``_target_`` (a callable or its dotted name) as the registries name it."""
    return (locate(target) if isinstance(target, str) else target).__name__


def _norm_name(norm):
    """The name of a norm argument: the name itself, or the ``norm`` of the node making it."""
    return norm.get("norm", "") if isinstance(norm, DictConfig) else norm


# The yacs value of the LAZY_KEYS read from a model's nodes: the model's class (as the registry
# names it), whether its ROI heads have a mask head, the name of RetinaNet's head norm.
_FROM_NODE = {
    "MODEL.META_ARCHITECTURE": _target_name,
    "MODEL.MASK_ON": lambda mask_head: mask_head is not None,
    "MODEL.RETINANET.NORM": _norm_name,
}

# The parts of add_evalnorm_config's keys that the ``evalnorm`` node mirrors (INPUT.SQUARE_SIZE
# is the data pipeline's resize in a lazy config; TEST.EVALNORM_MODES is deprecated).
_MIRRORED = ("MODEL.EVALNORM", "TEST.EVALNORM_ROWS", "TEST.EVALNORM_CALIBRATION")
_MISSING = object()


def evalnorm_defaults():
    """The ``evalnorm`` node of a lazy config: EvalNorm's yacs keys under ``MODEL.EVALNORM`` and
    ``TEST.EVALNORM_*`` with their defaults, as an OmegaConf DictConfig."""
    cfg = CN({"MODEL": CN(), "TEST": CN(), "INPUT": CN()})
    add_evalnorm_config(cfg)
    node = {}
    for key in _MIRRORED:
        first, rest = key.split(".")
        node.setdefault(first, {})[rest] = _plain(cfg[first][rest])
    return OmegaConf.create(node)


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return list(value) if isinstance(value, tuple) else value


_EN = "evalnorm.MODEL.EVALNORM"


def _layer_settings():
    """The layer settings of ``evalnorm_norm``'s keyword arguments, and B of the images, as
    interpolations of the ``evalnorm`` node."""
    keys = ("NORM_BATCH_SIZE", "INIT", "INIT_ALPHA", "INIT_BETA", "EVAL_MODE", "FROZEN_EN")
    return {key.lower(): f"${{{_EN}.{key}}}" for key in keys}


def evalnorm_norm_node(place, samples_per_image=1):
    """``LazyCall(evalnorm_norm)`` for the norm ``evalnorm.MODEL.EVALNORM.<place>``
    ("BACKBONE_NORM" or "ROI_HEAD_NORM"), every argument read from the ``evalnorm`` node by
    interpolation: B = ``NORM_BATCH_SIZE`` x ``samples_per_image`` (1 in the backbone; in the
    ROI heads, ``"${model.roi_heads.batch_size_per_image}"``; in a mask head,
    :func:`fg_rois_per_image_node`)."""
    return L(evalnorm_norm)(
        norm=f"${{{_EN}.{place}}}", samples_per_image=samples_per_image, **_layer_settings()
    )


def fg_rois_per_image_node(roi_heads="model.roi_heads"):
    """``LazyCall(fg_rois_per_image)`` of the ROI heads at ``roi_heads``: the mask head's
    samples per image (the sampler's cap of foreground ROIs, ``int(batch_size_per_image x
    positive_fraction)``), read from them by interpolation, for
    ``evalnorm_norm_node("ROI_HEAD_NORM", fg_rois_per_image_node())``: B as the yacs configs'
    (``NormBatchSizes.fg_rois``)."""
    return L(fg_rois_per_image)(
        batch_size_per_image=f"${{{roi_heads}.batch_size_per_image}}",
        positive_fraction=f"${{{roi_heads}.positive_fraction}}",
    )


def evalnorm_retinanet_norm_node(norm, num_levels):
    """``LazyCall(evalnorm_retinanet_norm)``: RetinaNet's head norm ``norm`` (the yacs key
    ``MODEL.RETINANET.NORM``: "EN", "FrozenEN" or detectron2's names) over ``num_levels`` FPN
    levels, per-level or shared statistics as ``evalnorm.MODEL.EVALNORM.RETINANET_HEAD_STATS``
    says, B = ``NORM_BATCH_SIZE`` images, the layers' settings from the ``evalnorm`` node."""
    return L(evalnorm_retinanet_norm)(
        norm=norm,
        num_levels=num_levels,
        head_stats=f"${{{_EN}.RETINANET_HEAD_STATS}}",
        **_layer_settings(),
    )


def load_lazy_config(path, overrides=()):
    """``LazyConfig.load(path)`` with ``overrides`` ("key=value") applied, each key checked
    first (:func:`check_override_keys`)."""
    if not path.endswith(".py"):
        raise ValueError(f"{path}: a LazyConfig is a .py file (yacs configs: tools/train_net.py)")
    cfg = LazyConfig.load(path)
    check_override_keys(cfg, overrides)
    return LazyConfig.apply_overrides(cfg, list(overrides))


def check_override_keys(cfg, overrides):
    """Raise KeyError naming the key for an override ("key=value") of a key the config does not
    have, unless it is an argument of the callable its parent node calls (``_target_``):
    detectron2's ``apply_overrides`` would add it silently."""
    for override in overrides:
        key, sep, _ = override.partition("=")
        if not sep:
            raise ValueError(f"override {override!r}: expected key=value")
        if OmegaConf.select(cfg, key, default=_MISSING) is not _MISSING:
            continue
        parent_key, _, name = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key, default=None) if parent_key else cfg
        if isinstance(parent, DictConfig) and "_target_" in parent:
            target = parent._target_
            target = locate(target) if isinstance(target, str) else target
            if _takes_argument(target, name):
                continue
            raise KeyError(
                f"override {key}: {parent_key} calls {getattr(target, '__qualname__', target)}, "
                f"which takes no argument {name!r}"
            )
        raise KeyError(f"override {key}: the config has no key {key}")


def _takes_argument(target, name):
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return True  # cannot tell
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def lazy_to_cfg(lazy, world_size=None, training=True):
    """The frozen, checked yacs config that EvalNorm's trainer, hooks and evaluation take for
    the lazy config ``lazy``: its ``evalnorm`` node merged into detectron2's and EvalNorm's
    defaults, and the keys of ``LAZY_KEYS`` taken from where ``lazy`` holds them. A bad value
    raises, as ``check_evalnorm_config`` does, naming the key as the lazy config spells it."""
    cfg = get_cfg()
    add_evalnorm_config(cfg)
    try:
        node = lazy.get("evalnorm")
        if node is not None:
            node = OmegaConf.to_container(node, resolve=True)
            _check_mirrored(node, OmegaConf.to_container(evalnorm_defaults()))
            cfg.merge_from_other_cfg(CN(node))
        for key, lazy_key in LAZY_KEYS.items():
            value = OmegaConf.select(lazy, lazy_key, default=_MISSING)
            if value is _MISSING:
                continue
            if key in _FROM_NODE:
                value = _FROM_NODE[key](value)
            elif OmegaConf.is_config(value):
                value = OmegaConf.to_container(value, resolve=True)
            if key.startswith("DATASETS."):
                value = (value,) if isinstance(value, str) else tuple(value)
            cfg.merge_from_list([key, value])
        en = cfg.MODEL.EVALNORM
        if en.MICROBATCH:
            raise ValueError(
                "MODEL.EVALNORM.MICROBATCH=True: not available with a LazyConfig (the yacs "
                "configs and tools/train_net.py have it)"
            )
        if not (isinstance(en.NORM_BATCH_SIZE, int) and en.NORM_BATCH_SIZE > 0):
            raise ValueError(
                f"MODEL.EVALNORM.NORM_BATCH_SIZE={en.NORM_BATCH_SIZE!r}: a LazyConfig gives B, the "
                "images per GPU in training, as an integer >= 1 (the model's norms read it)"
            )
        check_evalnorm_config(cfg, world_size, training=training)
    except (KeyError, ValueError) as e:
        raise type(e)(_lazy_names(e.args[0] if e.args else str(e))) from e
    cfg.freeze()
    return cfg


def _check_mirrored(node, defaults, prefix="evalnorm"):
    for key, value in node.items():
        if key not in defaults:
            raise KeyError(
                f"{prefix}.{key}: no such EvalNorm setting (the evalnorm node mirrors "
                f"{', '.join(_MIRRORED)}; see docs/CONFIG.md)"
            )
        if isinstance(defaults[key], dict) and isinstance(value, dict):
            _check_mirrored(value, defaults[key], f"{prefix}.{key}")


_YACS_KEY = re.compile(
    r"(?<![\w.])(MODEL\.EVALNORM\.[A-Z_.]*[A-Z_]|TEST\.EVALNORM_[A-Z_.]*[A-Z_]|"
    + "|".join(re.escape(k) for k in sorted(LAZY_KEYS, key=len, reverse=True))
    + r")(?![\w])"
)


def _lazy_names(message):
    """``message`` with every yacs key spelled as in a lazy config."""

    def lazy_name(match):
        key = match.group(1)
        return LAZY_KEYS.get(key, f"evalnorm.{key}")

    return _YACS_KEY.sub(lazy_name, str(message))


def warmup_cosine(max_iter, warmup_iters, warmup_factor=0.001):
    """The multiplier of ``SOLVER.LR_SCHEDULER_NAME`` "WarmupCosineLR" (cosine from 1 to 0 over
    ``max_iter`` iterations, linear warmup from ``warmup_factor`` over the first
    ``warmup_iters``), for a lazy config's ``lr_multiplier``; give ``max_iter`` as
    ``"${train.max_iter}"`` so that it follows that key."""
    return WarmupParamScheduler(
        CosineParamScheduler(1.0, 0.0), warmup_factor, min(warmup_iters / max_iter, 1.0)
    )

"""The files a run reads (datasets, weights, the checkpoint to resume from), checked before it
starts, so that a missing or broken one stops it before anything is written to OUTPUT_DIR."""

import contextlib
import os

from detectron2.data import MetadataCatalog

from .checkpointer import missing_weights_error
from .safe_load import read_checkpoint

__all__ = ["check_inputs", "missing_dataset_error", "naming_missing_data"]


def missing_dataset_error(path, names, key):
    """FileNotFoundError naming the missing ``path``, the datasets ``names`` of config ``key``
    and ``$DETECTRON2_DATASETS``, under which detectron2 registers its builtin datasets."""
    root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    return FileNotFoundError(
        f"{path}: not found while loading {key} {', '.join(names)}. detectron2's builtin "
        f"datasets (coco_2014_*, ...) are read from $DETECTRON2_DATASETS, here "
        f"{os.path.abspath(root)!r} (default ./datasets), as registered when detectron2 was "
        "first imported: put the data there in detectron2's layout (see its datasets/README.md) "
        "or set DETECTRON2_DATASETS before starting."
    )


@contextlib.contextmanager
def naming_missing_data(names, key):
    """Within the block, a missing file becomes :func:`missing_dataset_error`."""
    try:
        yield
    except FileNotFoundError as e:
        raise missing_dataset_error(e.filename or e, names, key) from e


def check_inputs(cfg, training=True, resume=False, load_weights=None):
    """Raise, naming the file, if a dataset file registered for the run is missing, or if the
    checkpoint it will load (the one ``OUTPUT_DIR/last_checkpoint`` names when resuming, else
    ``MODEL.WEIGHTS``) is missing, empty, truncated or unsafe. ``load_weights(cfg, path)``, if
    given, then loads ``MODEL.WEIGHTS`` as the run will (into its model), so that what only
    loading finds (another architecture, missing statistics) stops the run here too. Datasets
    whose files are made at first use (metadata ``generated_at_first_use``, as the bundled
    digits) are checked when they are loaded instead."""
    keys = (("DATASETS.TRAIN", cfg.DATASETS.TRAIN),) if training else ()
    keys += (("DATASETS.TEST", cfg.DATASETS.TEST),)
    calibration = cfg.TEST.EVALNORM_CALIBRATION.DATASET
    if calibration:
        keys += (("TEST.EVALNORM_CALIBRATION.DATASET", [calibration]),)
    for key, names in keys:
        for name in names:
            metadata = MetadataCatalog.get(name)
            if metadata.get("generated_at_first_use"):
                continue
            for path in (metadata.get("json_file"), metadata.get("image_root")):
                if path and not os.path.exists(path):
                    raise missing_dataset_error(path, names, key)
    last = os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")
    if resume and os.path.isfile(last):
        with open(last) as f:
            weights = os.path.join(cfg.OUTPUT_DIR, f.read().strip())
        if os.path.isfile(weights):
            read_checkpoint(weights)
        return  # a missing one: the checkpointer's error says what to do
    weights = cfg.MODEL.WEIGHTS
    if not weights or "://" in weights:
        return
    if not os.path.isfile(weights):
        raise missing_weights_error(weights)
    if load_weights is None:
        read_checkpoint(weights)
    else:
        load_weights(cfg, weights)

"""``SafeCheckpointer``: detectron2's checkpointer that runs no code from checkpoint files,
writes them atomically, refuses a checkpoint of another architecture, and names the file (and,
when resuming, what to do) in every error."""

import os

from detectron2.checkpoint import DetectionCheckpointer

from .atomic import atomic_write
from .safe_load import WRITE_AGAIN, CheckpointError, CorruptCheckpointError, read_checkpoint

__all__ = ["SafeCheckpointer", "missing_weights_error"]


class SafeCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that

    - reads files with :func:`read_checkpoint` (no code from them runs, .pkl files included);
    - writes checkpoints and ``last_checkpoint`` with :func:`atomic_write`: a crash leaves the
      previous files as they were, and ``last_checkpoint`` names a file only once it is whole;
    - raises ``CheckpointError`` listing the mismatched keys when a checkpoint is for another
      architecture (detectron2 would only warn);
    - when resuming, fails with an error naming ``last_checkpoint`` if the file it names is
      missing or broken, instead of falling back to another file.

    ``optional_parameters``: suffixes of parameter names that a checkpoint may lack without
    counting as another architecture's.
    """

    optional_parameters = ()
    _resuming = None  # the last_checkpoint file while resume_or_load loads the file it names

    def __init__(self, model, save_dir="", **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.path_manager = _AtomicWrites(self.path_manager)

    def load(self, path, *args, **kwargs):
        if path and "://" not in path and not os.path.isfile(path):
            if self._resuming:
                raise FileNotFoundError(
                    f"Checkpoint {path!r} does not exist, but {self._resuming} names it as the "
                    f"one to resume from. {self._resume_advice()}"
                )
            raise missing_weights_error(path)
        self._loading = path
        return super().load(path, *args, **kwargs)

    def resume_or_load(self, path, *, resume=True):
        """detectron2's, with errors naming ``last_checkpoint`` when the file it names is
        missing or cannot be loaded: resuming never falls back to another file."""
        if not (resume and "://" not in self.save_dir and self.has_checkpoint()):
            return super().resume_or_load(path, resume=resume)
        self._resuming = os.path.join(self.save_dir, "last_checkpoint")
        try:
            last = self.get_checkpoint_file()
            if not os.path.basename(last):
                raise CorruptCheckpointError(
                    f"{self._resuming} is empty: it should name the checkpoint to resume from. "
                    f"{self._resume_advice()}"
                )
            return self.load(last)
        finally:
            self._resuming = None

    def _resume_advice(self, but=None):
        names = sorted(
            f
            for f in os.listdir(self.save_dir)
            if f.endswith(".pth") and (not but or f != os.path.basename(but))
        )
        there = f" (checkpoints there: {', '.join(names[-3:])})" if names else ""
        return (
            f"Nothing was loaded or changed. To resume from another checkpoint, write its file "
            f"name into {self._resuming}{there}; to start over from MODEL.WEIGHTS, delete "
            f"{self._resuming}, or train without --resume."
        )

    def _load_file(self, filename):
        # detectron2's .pkl and .pyth branches, copied because they unpickle the file with
        # pickle.load / torch.load (code from the file runs); here read_checkpoint reads it.
        # .pth files go through detectron2's own branch and its _torch_load hook below.
        if filename.endswith(".pkl"):
            data = self._read(filename)
            if not isinstance(data, dict):
                raise CorruptCheckpointError(
                    f"{filename}: holds a {type(data).__name__}, not the dict of arrays of a "
                    "detectron2/Caffe2 .pkl checkpoint"
                )
            if "model" in data and "__author__" in data:
                self.logger.info(f"Reading a file from '{data['__author__']}'")
                return data
            # Caffe2 / Detectron1 model zoo: detection models have "blobs", ImageNet ones not.
            if "blobs" in data:
                data = data["blobs"]
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        if filename.endswith(".pyth"):  # pycls
            data = self._read(filename)
            if not isinstance(data, dict) or "model_state" not in data:
                raise CorruptCheckpointError(
                    f"Cannot load .pyth file {filename}; pycls checkpoints must contain "
                    "'model_state'."
                )
            model_state = {
                k: v
                for k, v in data["model_state"].items()
                if not k.endswith("num_batches_tracked")
            }
            return {"model": model_state, "__author__": "pycls", "matching_heuristics": True}
        return super()._load_file(filename)

    def _torch_load(self, f):
        return self._read(f)

    def _read(self, filename):
        try:
            return read_checkpoint(filename)
        except CheckpointError as e:
            if not self._resuming:
                raise
            message = str(e).replace(f" {WRITE_AGAIN}", "")  # advice for MODEL.WEIGHTS
            advice = (
                f"It is the checkpoint {self._resuming} names, so training cannot resume from "
                f"it. {self._resume_advice(but=filename)}"
            )
            raise type(e)(f"{message} {advice}") from e.__cause__

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        _check_architecture(
            self.model, incompatible, getattr(self, "_loading", None), self.optional_parameters
        )
        return incompatible


class _AtomicWrites:
    """A path manager that writes local files with :func:`atomic_write` and leaves everything
    else (reading, listing, other file systems) to ``path_manager``."""

    def __init__(self, path_manager):
        self._path_manager = path_manager

    def open(self, path, mode="r", **kwargs):
        if mode in ("w", "wb") and "://" not in path:
            return atomic_write(path, mode)
        return self._path_manager.open(path, mode, **kwargs)

    def __getattr__(self, name):
        if name == "_path_manager":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._path_manager, name)


# Fine-tuning to other classes changes only these shapes; detectron2 skips them with a warning.
_CLASS_SPECIFIC = ("roi_heads.box_predictor.", "roi_heads.mask_head.predictor.")


def _check_architecture(model, incompatible, path, optional=()):
    """``CheckpointError`` listing the mismatched keys when the checkpoint just loaded (``path``)
    is for another architecture: shapes that differ outside the class-specific predictors, or
    fewer than half of the model's parameters (those ending in ``optional`` aside) in it."""
    shapes = [s for s in incompatible.incorrect_shapes if not s[0].startswith(_CLASS_SPECIFIC)]
    params = [n for n, _ in model.named_parameters() if not (optional and n.endswith(optional))]
    missing = set(incompatible.missing_keys) | {k for k, *_ in incompatible.incorrect_shapes}
    absent = [n for n in params if n in missing]
    if not shapes and len(absent) <= len(params) / 2:
        return

    def first(names, n=8):
        more = f", ... ({len(names) - n} more)" if len(names) > n else ""
        return ", ".join(names[:n]) + more

    problems = []
    if shapes:
        listed = [f"{k} {tuple(c)} vs {tuple(m)}" for k, c, m in shapes]
        problems.append(
            f"{len(shapes)} entries of other shapes (checkpoint vs model): {first(listed)}"
        )
    if len(absent) > len(params) / 2:
        problems.append(
            f"{len(absent)} of the model's {len(params)} parameters not in it: {first(absent)}"
        )
        if incompatible.unexpected_keys:
            unexpected = list(incompatible.unexpected_keys)
            problems.append(
                f"{len(unexpected)} entries the model does not have: {first(unexpected)}"
            )
    raise CheckpointError(
        f"{path}: a checkpoint for another architecture: {'; '.join(problems)}. Use a checkpoint "
        "of this config's model (only the class-specific roi_heads.box_predictor may differ, "
        "as when fine-tuning to other classes), or convert ImageNet weights with "
        "tools/convert_imagenet_checkpoint.py; MODEL.WEIGHTS '' trains from scratch."
    )


def missing_weights_error(path):
    """FileNotFoundError for a ``MODEL.WEIGHTS`` file that does not exist, saying what to use."""
    return FileNotFoundError(
        f"Checkpoint {path!r} (MODEL.WEIGHTS) does not exist. For the ImageNet weights the "
        "configs expect, convert torchvision's ResNet-50 with "
        "tools/convert_imagenet_checkpoint.py (see the README); MODEL.WEIGHTS '' trains "
        "from scratch."
    )

"""``EvalNormCheckpointer``: detectron2's checkpointer, refusing BN checkpoints without statistics,
loading no code from checkpoint files and writing them atomically."""

import contextlib
import os
import pickle
import tempfile

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..layers import EvalNorm2d

__all__ = [
    "CheckpointError",
    "CorruptCheckpointError",
    "EvalNormCheckpointer",
    "MissingStatisticsError",
    "UnsafeCheckpointError",
    "has_identity_statistics",
    "missing_weights_error",
    "read_checkpoint",
    "save_evalnorm_checkpoint",
]


class MissingStatisticsError(RuntimeError):
    """A checkpoint gives EvalNorm layers a scale and shift but no running statistics."""


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be loaded; the message names the file."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is empty, truncated or not a checkpoint at all."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A checkpoint file holds objects other than tensors, arrays and plain containers: loading
    it could run code from it, so it is refused before anything in it runs."""


class EvalNormCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that stops when a checkpoint has a norm layer's weight but
    not its ``running_mean``/``running_var`` for an EvalNorm2d layer: BN folded into a scale
    and shift, as in the MSRA/Caffe2 ``R-50.pkl`` detectron2's configs use. EvalNorm corrects
    running statistics, so it must not run with the defaults (mean 0, var 1) instead.

    Set ``require_statistics = False`` when the statistics are reset after loading anyway
    (regime (b)).

    Files are read by :func:`read_checkpoint` (no code from them runs, .pkl files included),
    saves are atomic, and resuming from a broken file fails with an error naming it.
    """

    require_statistics = True
    _resuming = None  # the last_checkpoint file while resume_or_load loads the file it names

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

    def save(self, name, **kwargs):
        """detectron2's ``save``, atomic: the file is written under a temporary name in the same
        folder, flushed to disk and renamed to ``{name}.pth``; ``last_checkpoint`` is updated
        (atomically too) only after that. A crash leaves the previous files as they were."""
        if not self.save_dir or not self.save_to_disk:
            return
        if "://" in self.save_dir:  # not a local folder: leave the writing to its path manager
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        assert os.path.basename(save_file) == basename, basename
        self.logger.info(f"Saving checkpoint to {save_file}")
        _write_atomically(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        if "://" in self.save_dir:
            return super().tag_last_checkpoint(last_filename_basename)
        path = os.path.join(self.save_dir, "last_checkpoint")
        _write_atomically(path, lambda f: f.write(last_filename_basename.encode()))

    def _load_file(self, filename):
        # detectron2's, reading through read_checkpoint: its .pkl branch uses pickle.load.
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
        return super()._load_file(filename)  # .pth: through _torch_load below

    def _torch_load(self, f):
        return self._read(f)

    def _read(self, filename):
        try:
            return read_checkpoint(filename)
        except CheckpointError as e:
            if not self._resuming:
                raise
            message = str(e).replace(f" {_WRITE_AGAIN}", "")  # advice for MODEL.WEIGHTS
            advice = (
                f"It is the checkpoint {self._resuming} names, so training cannot resume from "
                f"it. {self._resume_advice(but=filename)}"
            )
            raise type(e)(f"{message} {advice}") from e.__cause__

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        _check_architecture(self.model, incompatible, getattr(self, "_loading", None))
        if not self.require_statistics:
            return incompatible
        missing = set(incompatible.missing_keys)
        folded, identity = [], []
        for name, m in self.model.named_modules():
            if not isinstance(m, EvalNorm2d) or f"{name}.weight" in missing:
                continue
            if {f"{name}.running_mean", f"{name}.running_var"} & missing:
                folded.append(name)
            elif has_identity_statistics(m):
                identity.append(name)
        if folded:
            how = "no BatchNorm running statistics"
        elif identity:
            # FrozenBatchNorm2d fills mean 0 / var 1 for a folded checkpoint, so a detectron2
            # model fine-tuned from R-50.pkl with FrozenBN saves them: no real statistics either.
            folded, how = identity, "running statistics of exactly mean 0 and var 1"
        if folded:
            raise MissingStatisticsError(
                f"{self._loading}: {how} for {len(folded)} EvalNorm layer(s) (first: "
                f"{folded[0]}.running_mean/running_var), only their scale and shift: its "
                "BatchNorm is folded, as in the MSRA/Caffe2 R-50.pkl. EvalNorm corrects "
                "the running statistics and cannot work without them. Use a torchvision ImageNet "
                "ResNet-50 converted by tools/convert_imagenet_checkpoint.py (with the configs' "
                "torchvision conventions: RGB input, its pixel mean/std, STRIDE_IN_1X1 False), or "
                "keep this file with MODEL.EVALNORM.BACKBONE_NORM/ROI_HEAD_NORM 'FrozenBN', or "
                "reset the norms after loading (regime (b), MODEL.EVALNORM.RESET_NORM True)."
            )
        return incompatible


# Fine-tuning to other classes changes only these shapes; detectron2 skips them with a warning.
_CLASS_SPECIFIC = ("roi_heads.box_predictor.", "roi_heads.mask_head.predictor.")


def _check_architecture(model, incompatible, path):
    """``CheckpointError`` listing the mismatched keys when the checkpoint just loaded (``path``)
    is for another architecture: shapes that differ outside the class-specific predictors, or
    fewer than half of the model's parameters found in it (detectron2 would only warn)."""
    shapes = [s for s in incompatible.incorrect_shapes if not s[0].startswith(_CLASS_SPECIFIC)]
    # alpha/beta are filled in where a BN checkpoint lacks them: not counted.
    params = [n for n, _ in model.named_parameters() if not n.endswith("_logit")]
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


def has_identity_statistics(layer):
    """Whether every channel's running mean is 0 and variance 1: a BatchNorm that never saw
    data, or whose statistics were folded into its scale and shift."""
    return bool((layer.running_mean == 0).all() and (layer.running_var == 1).all())


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
    _write_atomically(path, lambda f: torch.save(checkpoint, f))


def _write_atomically(path, write):
    """Calls ``write(f)`` on a temporary file beside ``path``, flushes it to disk and renames it
    to ``path``: ``path`` is the old file or the whole new one, never a part. The temporary name
    ends in ``.partial``, so detectron2 never lists it among the ``.pth`` checkpoints."""
    directory = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private (0600); the result should not be
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The rename itself must reach the disk before anything (last_checkpoint) refers to it.
    with contextlib.suppress(OSError):  # folders cannot be opened on every system (Windows)
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts of NumPy arrays (detectron2/Caffe2 .pkl files) and nothing else."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5
            ("numpy._core.numeric", "_frombuffer"),
            ("_codecs", "encode"),  # bytes in protocol 2 from Python 3
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("collections", "OrderedDict"),
        }
    )

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


class _Refused(pickle.UnpicklingError):
    """A global that ``_ArraysOnly`` does not build."""


def read_checkpoint(path):
    """The object in checkpoint file ``path``, running no code from it: ``torch.load`` with
    ``weights_only=True``, or for a ``.pkl`` (detectron2/Caffe2 format) a pickle restricted to
    NumPy arrays and plain containers. ``UnsafeCheckpointError`` if the file holds anything else,
    ``CorruptCheckpointError`` if it is empty or cannot be read; both name the file."""
    path = os.fspath(path)
    with open(path, "rb") as f:  # a missing or unreadable file fails here, as itself
        if os.fstat(f.fileno()).st_size == 0:
            raise CorruptCheckpointError(f"{path}: empty file (0 bytes). {_CUT_SHORT}")
        if path.endswith(".pkl"):
            return _read_pickle(f, path)
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"{path}: refused: it is not made only of tensors and plain containers, or not "
                f"a PyTorch checkpoint at all ({_weights_only_reason(e)}). "
                + _UNSAFE.format(how="torch.load(..., weights_only=False)")
            ) from None
        except MemoryError:
            raise
        except Exception as e:  # a zip archive or pickle cut short: RuntimeError, EOFError...
            raise CorruptCheckpointError(
                f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: "
                f"{_first_line(e)}). {_CUT_SHORT}"
            ) from e


def _read_pickle(f, path):
    try:
        return _ArraysOnly(f, encoding="latin1").load()
    except _Refused as e:
        raise UnsafeCheckpointError(
            f"{path}: refused: loading it would call {e}, and a detectron2/Caffe2 .pkl "
            "checkpoint holds only NumPy arrays and plain containers. "
            + _UNSAFE.format(how="pickle.load")
        ) from None
    except MemoryError:
        raise
    except Exception as e:  # a pickle cut short or not a pickle: EOFError, ValueError...
        raise CorruptCheckpointError(
            f"{path}: cannot be read as a pickle ({type(e).__name__}: {e}). {_CUT_SHORT}"
        ) from e


_WRITE_AGAIN = "Write, copy or download it again."
_CUT_SHORT = (
    "It is probably cut short (a crash or a full disk while it was written, or an interrupted "
    f"copy or download). {_WRITE_AGAIN}"
)
_UNSAFE = (
    "Loading it could run code from it, so nothing in it was loaded or run. If you trust where "
    "it comes from, load it with {how} in a separate process and save only its tensors or "
    "arrays again."
)


def _first_line(error):
    """The first sentence of ``error``'s message (torch's go on with generic advice)."""
    return str(error).strip().split("\n")[0].split(". ")[0].rstrip(".")


def _weights_only_reason(error):
    """What torch's weights-only unpickler objected to, without its advice to turn it off."""
    message = str(error)
    marker = "WeightsUnpickler error:"
    if marker not in message:
        return _first_line(error)
    reason = message.split(marker, 1)[1].split("Check the documentation")[0].strip()
    return reason.split(". Please use")[0].split("\n")[0].strip() or _first_line(error)

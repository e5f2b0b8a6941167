"""``EvalNormCheckpointer``: detectron2's checkpointer, refusing BN checkpoints without statistics."""

import os
import pickle

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..layers import EvalNorm2d

__all__ = [
    "EvalNormCheckpointer",
    "MissingStatisticsError",
    "has_identity_statistics",
    "read_checkpoint",
    "save_evalnorm_checkpoint",
]


class MissingStatisticsError(RuntimeError):
    """A checkpoint gives EvalNorm layers a scale and shift but no running statistics."""


class EvalNormCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that stops when a checkpoint has a norm layer's weight but
    not its ``running_mean``/``running_var`` for an EvalNorm2d layer: BN folded into a scale
    and shift, as in the MSRA/Caffe2 ``R-50.pkl`` detectron2's configs use. EvalNorm corrects
    running statistics, so it must not run with the defaults (mean 0, var 1) instead.

    Set ``require_statistics = False`` when the statistics are reset after loading anyway
    (regime (b)).
    """

    require_statistics = True

    def load(self, path, *args, **kwargs):
        if path and "://" not in path and not os.path.isfile(path):
            raise FileNotFoundError(
                f"Checkpoint {path!r} (MODEL.WEIGHTS) does not exist. For the ImageNet weights the "
                "configs expect, convert torchvision's ResNet-50 with "
                "tools/convert_imagenet_checkpoint.py (see the README); MODEL.WEIGHTS '' trains "
                "from scratch."
            )
        self._loading = path
        return super().load(path, *args, **kwargs)

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
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
    partial = f"{path}.partial"
    torch.save(checkpoint, partial)
    os.replace(partial, path)


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
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def read_checkpoint(path):
    """The object in checkpoint file ``path``, running no code from it: ``torch.load`` with
    ``weights_only=True``, or for a ``.pkl`` (detectron2/Caffe2 format) a pickle restricted to
    NumPy arrays and plain containers."""
    if path.endswith(".pkl"):
        with open(path, "rb") as f:
            return _ArraysOnly(f, encoding="latin1").load()
    return torch.load(path, map_location="cpu", weights_only=True)

"""``EvalNormCheckpointer``: detectron2's checkpointer, refusing BN checkpoints without statistics."""

import os

from detectron2.checkpoint import DetectionCheckpointer

from ..layers import EvalNorm2d

__all__ = ["EvalNormCheckpointer", "MissingStatisticsError"]


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
        folded = [
            name
            for name, m in self.model.named_modules()
            if isinstance(m, EvalNorm2d)
            and f"{name}.weight" not in missing
            and {f"{name}.running_mean", f"{name}.running_var"} & missing
        ]
        if folded:
            raise MissingStatisticsError(
                f"{self._loading}: no BatchNorm running statistics for {len(folded)} EvalNorm "
                f"layer(s) (first: {folded[0]}.running_mean/running_var), only their scale and "
                "shift: its BatchNorm is folded, as in the MSRA/Caffe2 R-50.pkl. EvalNorm corrects "
                "the running statistics and cannot work without them. Use a torchvision ImageNet "
                "ResNet-50 converted by tools/convert_imagenet_checkpoint.py (with the configs' "
                "torchvision conventions: RGB input, its pixel mean/std, STRIDE_IN_1X1 False), or "
                "keep this file with MODEL.EVALNORM.BACKBONE_NORM/ROI_HEAD_NORM 'FrozenBN', or "
                "reset the norms after loading (regime (b), MODEL.EVALNORM.RESET_NORM True)."
            )
        return incompatible

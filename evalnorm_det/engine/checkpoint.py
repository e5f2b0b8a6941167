"""``EvalNormCheckpointer``: the project's checkpointer, which refuses to load BatchNorm folded
into a scale and shift (no running statistics) into EvalNorm layers."""

from evalnorm import EvalNorm2d

from ..utils.checkpointer import SafeCheckpointer

__all__ = ["EvalNormCheckpointer", "MissingStatisticsError", "has_identity_statistics"]


class MissingStatisticsError(RuntimeError):
    """A checkpoint gives EvalNorm layers a scale and shift but no running statistics."""


class EvalNormCheckpointer(SafeCheckpointer):
    """:class:`SafeCheckpointer` (no code from checkpoint files runs, atomic saves, errors
    naming the file) that stops when a checkpoint has an EvalNorm2d layer's weight but not its
    ``running_mean``/``running_var``: BN folded into a scale and shift, as in the MSRA/Caffe2
    ``R-50.pkl`` detectron2's configs use. EvalNorm corrects running statistics, so it must not
    run with the defaults (mean 0, var 1) instead.

    Set ``require_statistics = False`` when the statistics are reset after loading anyway
    (regime (b)).
    """

    require_statistics = True
    # A BN checkpoint has no alpha/beta; the layers keep their initial ones.
    optional_parameters = ("alpha_logit", "beta_logit")

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

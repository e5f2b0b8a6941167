"""``get_norm``: detectron2's norm names plus EvalNorm's."""

import functools

from detectron2.layers import get_norm as d2_get_norm

from evalnorm import EvalNorm2d

__all__ = ["EVALNORM_NAMES", "get_norm"]

# "EN": trainable BatchNorm in training, EvalNorm at evaluation (regimes a, b, d).
# "FrozenEN": statistics and affine frozen as FrozenBN, EvalNorm at evaluation (regime c).
EVALNORM_NAMES = ("EN", "FrozenEN")


def get_norm(norm, out_channels, *, norm_batch_size=None, microbatch=False):
    """The normalization layer for ``out_channels`` channels.

    Args:
        norm (str or callable or None): "EN", "FrozenEN", any name detectron2's ``get_norm``
            knows ("BN", "SyncBN", "FrozenBN", "GN", ...), "" or None (no layer), or a
            callable taking the channel count and returning a module.
        norm_batch_size (int or None): B for EvalNorm layers (rule of thumb, microbatch).
        microbatch (bool): EvalNorm layers normalize each group of ``norm_batch_size``
            samples on its own in training (see ``EvalNorm2d``).

    Returns:
        nn.Module or None.
    """
    if norm in EVALNORM_NAMES:
        norm = functools.partial(
            EvalNorm2d,
            norm_batch_size=norm_batch_size,
            microbatch=microbatch,
            frozen=norm == "FrozenEN",
        )
    elif isinstance(norm, str) and norm:
        try:
            return d2_get_norm(norm, out_channels)
        except KeyError:
            raise ValueError(
                f"Unknown norm {norm!r}: expected one of {', '.join(EVALNORM_NAMES)}, BN, SyncBN, "
                "FrozenBN, GN (or another name detectron2's get_norm knows), '' or a callable"
            ) from None
    return d2_get_norm(norm, out_channels)

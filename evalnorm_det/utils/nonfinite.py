"""``NonFiniteCheckHook``: stop training at the first layer whose state goes NaN or Inf, naming
it, before a checkpoint can save it."""

import torch
from detectron2.engine import HookBase

__all__ = ["NonFiniteCheckHook"]


class NonFiniteCheckHook(HookBase):
    """Stops training with a ``FloatingPointError`` naming the first of ``layers``, in their
    order, with NaN or Inf in one of its ``tensors``, and which.

    It checks after every step (place it before the ``PeriodicCheckpointer``, so nothing
    non-finite is saved) and when a step fails (detectron2 stops on a non-finite loss or on
    NaN boxes). Only the listed tensors are read, with one device synchronization per step.
    Give the layers in network order: for norm layers whose running statistics take in every
    training forward, the first one found is then where a NaN or Inf appeared (itself, or the
    first to see it).

    Args:
        layers (list[(str, nn.Module)]): the layers to watch, with their names.
        tensors (tuple[str]): the tensor attributes of each layer to check.
        kind (str): what the message calls the layers ("EvalNorm": "EvalNorm layer 'name'").
    """

    def __init__(self, layers, tensors, kind=""):
        self.layers = list(layers)
        self.tensors = tuple(tensors)
        self.kind = kind
        self._raised = False

    def after_step(self):
        self._check("after iteration")

    def after_train(self):
        # A step that raised (not this hook): name the layer, if any is non-finite.
        if self.trainer.iter < self.trainer.max_iter and not self._raised:
            self._check("in iteration")

    def _check(self, stage):
        if not self.layers:
            return
        # A layer may lack some (affine=False EvalNorm2d: no weight; a per-level list: only
        # its shared affine).
        tensors = [t for _, m in self.layers for k in self.tensors if (t := _get(m, k)) is not None]
        # All of them in one tensor: a few operators and one read per step, whatever their number.
        vectors = [t for t in tensors if t.dim() == 1]
        others = [t for t in tensors if t.dim() != 1]
        scalars = [t for t in others if t.dim() == 0]
        rest = [t.reshape(-1) for t in others if t.dim() != 0]
        flat = torch.cat(vectors + rest + ([torch.stack(scalars)] if scalars else []))
        if bool(torch.isfinite(flat).all()):
            return
        ok = torch.ones((), dtype=torch.bool, device=flat.device)
        flags = torch.stack(
            [
                torch.stack(
                    [
                        torch.isfinite(t).all() if (t := _get(m, k)) is not None else ok
                        for k in self.tensors
                    ]
                )
                for _, m in self.layers
            ]
        )
        for (name, _), ok in zip(self.layers, flags.tolist()):
            if not all(ok):
                self._raised = True
                bad = ", ".join(k for k, good in zip(self.tensors, ok) if not good)
                layer = f"{self.kind} layer" if self.kind else "layer"
                raise FloatingPointError(
                    f"NaN or Inf {stage} {self.trainer.iter}: {layer} {name!r} has "
                    f"non-finite {bad}. Training stopped before any checkpoint with it was "
                    "written; the NaN or Inf appeared at this layer or in what feeds it (the "
                    "images, the layers before it)."
                )


def _get(module, name):
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None

"""Deployment: the EvalNorm2d layers whose correction does not change a model's outputs beyond a
tolerance, measured on calibration data, evaluate as EMA and fold into their convolutions.

A layer normalizing many samples in training (a box head's B = 64 x N ROIs: 1/B^2 of order
1e-4) barely corrects its statistics; as EMA it costs nothing once folded, while EvalNorm needs
one more pass over its input. The decision is measured, not read off alpha and beta.
"""

import math
import numbers
import sys

import torch
import torch.nn.functional as F
from torch import nn

from .convert import _evaluates_as_ema, convert_to_batchnorm, replace_modules
from .layer import EvalNorm2d

__all__ = ["deploy", "fold_ema_layers", "output_change", "select_ema_layers"]


def output_change(reference, outputs):
    """Relative change of a model's outputs: the largest ``||out - ref||_2 / ||ref||_2`` over the
    tensors of ``outputs`` against those of ``reference`` (a tensor, or lists, tuples and dicts
    of tensors, the same structure and shapes in both; computed in float64). 0 when both are
    equal, inf when a reference tensor is zero and its output is not."""
    refs, outs = _tensors(reference), _tensors(outputs)
    if len(refs) != len(outs):
        raise ValueError(f"outputs hold {len(outs)} tensors, the reference {len(refs)}")
    change = 0.0
    for i, (ref, out) in enumerate(zip(refs, outs)):
        if ref.shape != out.shape:
            raise ValueError(
                f"output tensor {i} has shape {tuple(out.shape)}, the reference "
                f"{tuple(ref.shape)}: compare outputs whose shape does not depend on the "
                "normalization (raw scores on fixed proposals, not detections after NMS)"
            )
        diff = torch.linalg.vector_norm((out.double() - ref.double()).flatten()).item()
        norm = torch.linalg.vector_norm(ref.double().flatten()).item()
        if diff:
            change = max(change, diff / norm if norm else math.inf)
    return change


def _tensors(x):
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, dict):
        return [t for k in x for t in _tensors(x[k])]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    raise TypeError(
        f"outputs must be tensors, or lists, tuples and dicts of them; got {type(x).__name__}: "
        "pass run(model, batch) returning the tensors to compare"
    )


def _run_model(model, batch):
    return model(batch)


@torch.no_grad()
def select_ema_layers(model, batches, tolerance, run=None):
    """Which EvalNorm2d layers of ``model`` can evaluate as EMA, measured on ``batches``.

    Two measures, both relative L2 changes on the calibration batches:

    - each layer's own change: ``||y_ema - y||_2 / ||y - bias||_2``, ``y`` the layer's output as
      it evaluates (its mode) and ``y_ema`` the EMA output of the same input, in the forward of
      the model as it is (largest over batches);
    - the model's change (``output_change``): its outputs with the chosen layers as EMA against
      its outputs as it is (largest over batches).

    The layers whose own change is at most ``tolerance`` are chosen; if together they change
    the model's outputs by more than ``tolerance``, the ones with the largest own changes are
    dropped, by bisection, until they do not. So the chosen set changes the outputs on the
    calibration batches by at most ``tolerance``, as measured, and the report says by how much.

    Args:
        model (nn.Module): evaluated in ``eval()``; its layers' modes and coefficients are left
            as they were.
        batches (iterable): calibration inputs, each passed to ``run``; keep them apart from the
            data the deployed model is tested on.
        tolerance (float): >= 0, the relative change allowed.
        run (callable or None): ``run(model, batch)`` returns the outputs to compare (a tensor,
            or lists, tuples and dicts of tensors); default ``model(batch)``.

    Returns:
        dict: "tolerance"; "change", the model's measured change with the chosen layers as
        EMA; "layers", one row per EvalNorm2d in network order: "name", "alpha", "beta",
        "layer_change", "ema" (chosen); "checks": each set tried, "layers" (how many) and
        "change".
    """
    if (
        isinstance(tolerance, bool)
        or not isinstance(tolerance, numbers.Real)
        or not 0 <= tolerance < math.inf
    ):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    run = run or _run_model
    batches = list(batches)
    if not batches:
        raise ValueError("select_ema_layers needs at least one calibration batch, got none")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, EvalNorm2d)]
    if not layers:
        raise ValueError("The model has no EvalNorm2d layer: convert_to_evalnorm(model, B) first")
    was_training, modes = model.training, [m.mode for _, m in layers]
    model.eval()
    try:
        changes = torch.zeros(len(layers), dtype=torch.float64)
        references = []
        handles = [
            m.register_forward_hook(_layer_change_hook(changes, i))
            for i, (_, m) in enumerate(layers)
        ]
        try:
            for batch in batches:
                references.append(run(model, batch))
        finally:
            for h in handles:
                h.remove()
        changes = changes.tolist()
        order = sorted(range(len(layers)), key=lambda i: (changes[i], i))
        checks = []

        def check(k):  # the model's change with the first k layers of `order` as EMA
            for i, (_, m) in enumerate(layers):
                m.mode = modes[i]
            for i in order[:k]:
                layers[i][1].mode = "ema"
            change = max(output_change(ref, run(model, b)) for ref, b in zip(references, batches))
            checks.append({"layers": k, "change": change})
            return change

        k = sum(c <= tolerance for c in changes)
        change = check(k) if k else 0.0
        if change > tolerance:  # bisect: lo passes, hi fails
            lo, hi, change = 0, k, 0.0
            while hi - lo > 1:
                mid = (lo + hi) // 2
                c = check(mid)
                if c <= tolerance:
                    lo, change = mid, c
                else:
                    hi = mid
            k = lo
    finally:
        for (_, m), mode in zip(layers, modes):
            m.mode = mode
        model.train(was_training)
    chosen = set(order[:k])
    coefficients = torch.stack([torch.stack([m.alpha, m.beta]) for _, m in layers]).tolist()
    rows = [
        {
            "name": name,
            "alpha": ab[0],
            "beta": ab[1],
            "layer_change": changes[i],
            "ema": i in chosen,
        }
        for i, ((name, _), ab) in enumerate(zip(layers, coefficients))
    ]
    return {"tolerance": float(tolerance), "change": change, "layers": rows, "checks": checks}


def _layer_change_hook(changes, i):
    def hook(m, args, y):
        x = args[0]
        if x.shape[0] == 0:
            return
        dtype = torch.promote_types(y.dtype, torch.float32)
        x, y = x.to(dtype), y.to(dtype)
        w, b = _affine(m, dtype)
        rm, rv = m.running_mean.to(dtype), m.running_var.to(dtype)
        y_ema = F.batch_norm(x, rm, rv, w, b, False, 0.0, m.eps)
        diff = torch.linalg.vector_norm(y_ema - y)
        norm = torch.linalg.vector_norm(y - b[:, None, None])
        change = torch.where(diff == 0, 0.0, diff.double() / norm.double())
        changes[i] = torch.maximum(changes[i], change)

    return hook


def deploy(model, batches, tolerance, run=None, fold=True):
    """Measure (``select_ema_layers``), then make the chosen layers evaluate as EMA: their alpha
    and beta become exactly 0, so the model's state dict records the choice (any
    ``EvalNorm2d`` with alpha = beta = 0 evaluates as EMA), and with ``fold`` they are folded
    into their convolutions (``fold_ema_layers``). Only the other layers stay EvalNorm2d.

    In place; returns ``(model, report)``, the report as ``select_ema_layers`` gives it.
    """
    report = select_ema_layers(model, batches, tolerance, run)
    layers = dict(model.named_modules())
    for row in report["layers"]:
        if row["ema"]:
            layers[row["name"]].set_coefficients(0.0)
            layers[row["name"]].mode = "ema"
    if fold:
        model = fold_ema_layers(model.eval())
    return model, report


def _convs_with_own_norm():
    """detectron2's ``Conv2d`` (where detectron2 is imported), which applies ``self.norm`` to
    its output."""
    module = sys.modules.get("detectron2.layers.wrappers")
    return (module.Conv2d,) if module is not None else ()


@torch.no_grad()
def fold_ema_layers(model):
    """Remove every ``EvalNorm2d`` of ``model`` that evaluates as EMA (mode "ema", or alpha =
    beta = 0) for inference.

    A layer applied right after a convolution is folded into its weight and bias (the EMA
    scale and shift, computed in float64): the ``norm`` of a detectron2 ``Conv2d`` (set to
    None), or a layer after an ``nn.Conv2d`` in an ``nn.Sequential`` (replaced by
    ``nn.Identity``). Others, whose place in the computation a module tree does not show
    (torchvision's ``conv1``/``bn1`` attributes, for example), become ``BatchNorm2d`` (frozen
    ones ``FrozenBatchNorm2d``) as ``convert_to_batchnorm`` makes them. Layers that do not
    evaluate as EMA stay ``EvalNorm2d``. The model must be in ``eval()``: a folded convolution
    no longer normalizes with batch statistics in training.

    In place; returns the model (a new module when ``model`` itself is such a layer).
    """
    if model.training:
        raise ValueError("fold_ema_layers folds for inference: call model.eval() first")
    own_norm = _convs_with_own_norm()
    for m in model.modules():
        if own_norm and isinstance(m, own_norm) and _foldable(getattr(m, "norm", None)):
            _fold_into(m, m.norm)
            m.norm = None
        elif isinstance(m, nn.Sequential):
            children = list(m.named_children())
            for (_, conv), (name, norm) in zip(children, children[1:]):
                plain = type(conv) is nn.Conv2d or (
                    isinstance(conv, own_norm)
                    and getattr(conv, "norm", None) is None
                    and getattr(conv, "activation", None) is None
                )
                if plain and _foldable(norm):
                    _fold_into(conv, norm)
                    setattr(m, name, nn.Identity())
    return replace_modules(
        model,
        lambda m: isinstance(m, EvalNorm2d) and _evaluates_as_ema(m),
        lambda m, name: convert_to_batchnorm(m),
    )


def _foldable(norm):
    return isinstance(norm, EvalNorm2d) and _evaluates_as_ema(norm)


def _fold_into(conv, norm):
    """conv's output normalized by ``norm``'s EMA statistics, as one convolution."""
    if conv.out_channels != norm.num_features:
        raise ValueError(
            f"cannot fold an EvalNorm2d of {norm.num_features} channels into a convolution "
            f"with {conv.out_channels} outputs"
        )
    weight, bias = _affine(norm, torch.float64)
    scale = weight * torch.rsqrt(norm.running_var.double() + norm.eps)
    shift = bias - norm.running_mean.double() * scale
    if conv.bias is not None:
        shift = shift + conv.bias.double() * scale
    dtype = conv.weight.dtype
    conv.weight.copy_(conv.weight.double() * scale.view(-1, *[1] * (conv.weight.dim() - 1)))
    conv.bias = nn.Parameter(shift.to(dtype), requires_grad=conv.weight.requires_grad)


def _affine(norm, dtype):
    """``norm``'s weight and bias in ``dtype``; 1 and 0 for a layer without affine."""
    if norm.affine:
        return norm.weight.to(dtype), norm.bias.to(dtype)
    ones = torch.ones_like(norm.running_var, dtype=dtype)
    return ones, torch.zeros_like(ones)

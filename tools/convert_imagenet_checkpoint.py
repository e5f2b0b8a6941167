#!/usr/bin/env python
"""Convert torchvision's ImageNet ResNet-50 weights into a detectron2 checkpoint for EvalNorm.

EvalNorm corrects BatchNorm's running statistics, so it needs weights that still have them:
torchvision's ResNet-50 has them, the MSRA/Caffe2 ``R-50.pkl`` that detectron2's configs use
has its BatchNorm folded into a scale and shift and cannot be used. This tool renames
torchvision's keys for a GeneralizedRCNN, keeps every BatchNorm statistic and drops the
ImageNet classifier (``fc``). ``--layout c4`` (default): stem and layer1-3 -> ``backbone.stem``
and ``backbone.res2``-``res4``, layer4 -> ``roi_heads.res5``; ``--layout fpn``: stem and
layer1-4 -> ``backbone.bottom_up.stem`` and ``backbone.bottom_up.res2``-``res5``. The weights
expect torchvision's conventions: RGB input, pixel mean [123.675, 116.28, 103.53], std
[58.395, 57.12, 57.375], MODEL.RESNETS.STRIDE_IN_1X1 False.

Any width of the torchvision layout is accepted (``torchvision.models.resnet.Bottleneck``
blocks [3, 4, 6, 3], expansion 4, widths doubling per stage, e.g. a ResNet-50 at 1/8 of its
width): the stem and bottleneck widths are read from the checkpoint's own shapes, every other
shape is checked against them, and the tool prints the MODEL.RESNETS keys that build the
matching detectron2 model (STEM_OUT_CHANNELS, RES2_OUT_CHANNELS, WIDTH_PER_GROUP).

    python tools/convert_imagenet_checkpoint.py \\
        ~/.cache/torch/hub/checkpoints/resnet50-0676ba61.pth checkpoints/R-50-torchvision.pth
    python tools/convert_imagenet_checkpoint.py --layout fpn \\
        ~/.cache/torch/hub/checkpoints/resnet50-0676ba61.pth checkpoints/R-50-torchvision-fpn.pth

Then set MODEL.WEIGHTS to the output. IN may also be ``{"state_dict": ...}`` or
``{"model": ...}`` around the state dict; OUT is never overwritten without --overwrite.
"""

import argparse
import os
import pickle
import re
import sys

import torch

from evalnorm_det.utils import atomic_write, read_checkpoint

__all__ = ["FoldedBatchNormError", "convert_torchvision_resnet", "infer_widths", "load_state_dict"]

# Residual blocks in torchvision's ResNet-50 layer1..layer4, and the convention its weights need.
BLOCKS = (3, 4, 6, 3)
PIXEL_MEAN = [123.675, 116.28, 103.53]
PIXEL_STD = [58.395, 57.12, 57.375]
BN_STATISTICS = ("running_mean", "running_var")
OPTIONAL_KEYS = ("fc.weight", "fc.bias")  # the ImageNet classifier, dropped
# Per model layout: (prefix of the stem and res2-res4, prefix of res5) in the GeneralizedRCNN.
LAYOUTS = {
    "c4": ("backbone.", "roi_heads."),  # build_evalnorm_resnet_c4_backbone, res5 in the box head
    "fpn": ("backbone.bottom_up.", "backbone.bottom_up."),  # build_evalnorm_resnet_fpn_backbone
}


class FoldedBatchNormError(ValueError):
    """The state dict has BatchNorm scales and shifts but no running statistics."""


def _expected_shapes(stem=64, width=64):
    """{key: shape} of a torchvision ResNet-50 state dict with ``stem`` output channels and
    bottleneck width ``width`` in layer1 (doubling per stage, outputs 4x), without ``fc`` and
    the optional ``num_batches_tracked`` entries. torchvision's ResNet-50: 64, 64."""
    shapes = {"conv1.weight": (stem, 3, 7, 7)}

    def bn(prefix, channels):
        for name in ("weight", "bias") + BN_STATISTICS:
            shapes[f"{prefix}.{name}"] = (channels,)

    bn("bn1", stem)
    in_channels = stem
    for k, blocks in enumerate(BLOCKS, start=1):
        planes = width * 2 ** (k - 1)
        out_channels = 4 * planes
        for i in range(blocks):
            p = f"layer{k}.{i}"
            shapes[f"{p}.conv1.weight"] = (planes, in_channels, 1, 1)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            shapes[f"{p}.conv3.weight"] = (out_channels, planes, 1, 1)
            for j, channels in ((1, planes), (2, planes), (3, out_channels)):
                bn(f"{p}.bn{j}", channels)
            # torchvision projects the shortcut where the stride or the channels change
            if i == 0 and (k > 1 or in_channels != out_channels):
                shapes[f"{p}.downsample.0.weight"] = (out_channels, in_channels, 1, 1)
                bn(f"{p}.downsample.1", out_channels)
            in_channels = out_channels
    return shapes


def infer_widths(state_dict):
    """(stem channels, layer1's bottleneck width) of a torchvision ResNet-50 state dict, read
    from ``conv1.weight`` and ``layer1.0.conv3.weight`` (whose outputs are 4x the width); the
    ResNet-50's (64, 64) where these are missing or not 4-d tensors. Other shapes unchecked."""

    def shape(key):
        v = state_dict.get(key)
        return tuple(v.shape) if isinstance(v, torch.Tensor) and v.dim() == 4 else None

    stem, conv3 = shape("conv1.weight"), shape("layer1.0.conv3.weight")
    if stem is None or conv3 is None or conv3[0] % 4:
        return 64, 64
    return stem[0], conv3[0] // 4


def _detectron2_name(key, layout):
    """detectron2's name in the full GeneralizedRCNN of ``layout`` for a (validated)
    torchvision key."""
    backbone, res5 = LAYOUTS[layout]
    parts = key.split(".")
    if parts[0] == "conv1":
        return f"{backbone}stem.conv1.{parts[1]}"
    if parts[0] == "bn1":
        return f"{backbone}stem.conv1.norm.{parts[1]}"
    k = int(parts[0][len("layer") :])
    stage = f"{backbone if k <= 3 else res5}res{k + 1}"
    block, module, rest = parts[1], parts[2], parts[3:]
    if module.startswith("conv"):
        return f"{stage}.{block}.{module}.{rest[0]}"
    if module.startswith("bn"):
        return f"{stage}.{block}.conv{module[2:]}.norm.{rest[0]}"
    # downsample.0 is the projection's convolution, downsample.1 its BatchNorm
    return f"{stage}.{block}.shortcut{'.norm' if rest[0] == '1' else ''}.{rest[1]}"


def _unwrap(obj):
    """The state dict inside ``{"state_dict": ...}`` or ``{"model": ...}`` (a checkpoint)."""
    while isinstance(obj, dict):
        inner = obj.get("state_dict", obj.get("model"))
        if not isinstance(inner, dict):
            break
        obj = inner
    return obj


def _unwrap_prefixed(obj):
    """``_unwrap(obj)`` without DataParallel's ``module.`` prefixes."""
    return {k.removeprefix("module."): v for k, v in _unwrap(obj).items()}


def _first(keys, n=5):
    keys = sorted(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _check_not_folded(state_dict):
    caffe2 = [k for k in state_dict if k.endswith(("_bn_s", "_bn_b"))]
    norms = {
        k.rsplit(".", 1)[0]
        for k in state_dict
        if re.search(r"(^|\.)(bn\d*|norm|downsample\.1)\.weight$", k)
    }
    folded = [p for p in norms if any(f"{p}.{s}" not in state_dict for s in BN_STATISTICS)]
    if not caffe2 and not folded:
        return
    layers = caffe2 or [f"{p}.running_mean/running_var" for p in folded]
    raise FoldedBatchNormError(
        f"BatchNorm folded into a scale and shift, with no running statistics ({len(layers)} "
        f"layer(s) without them, e.g. {_first(layers, 3)}), as in the MSRA/Caffe2 R-50.pkl "
        "detectron2's configs use. EvalNorm corrects the running statistics and cannot use "
        "folded BatchNorm. Convert torchvision's ImageNet ResNet-50 instead "
        "(torchvision.models.resnet50(weights='IMAGENET1K_V1'), saved as "
        "~/.cache/torch/hub/checkpoints/resnet50-0676ba61.pth)."
    )


def convert_torchvision_resnet(state_dict, layout="c4"):
    """torchvision ResNet-50 state dict (any width, see ``infer_widths``) -> state dict of
    detectron2's GeneralizedRCNN.

    conv1/bn1 -> ``stem.conv1``/``.norm``; ``layerK.i.convJ``/``bnJ`` ->
    ``res(K+1).i.convJ``/``.convJ.norm``; ``downsample.0``/``.1`` -> ``shortcut``/``.norm``;
    ``layout`` "c4": stem and res2-res4 under ``backbone.``, res5 under ``roi_heads.``; "fpn":
    stem and res2-res5 under ``backbone.bottom_up.``. Every BatchNorm weight, bias,
    running_mean, running_var and num_batches_tracked is kept (the same tensors); ``fc`` is
    dropped. ``{"state_dict": ...}``/``{"model": ...}`` wrappers are unwrapped.

    Raises ``FoldedBatchNormError`` if BatchNorm has no running statistics (R-50.pkl) and
    ``ValueError``, naming the keys or shapes, for anything else that is not a ResNet-50
    (``TypeError`` if it is not a dict of tensors at all).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {', '.join(LAYOUTS)}")
    state_dict = _unwrap(state_dict)
    if not isinstance(state_dict, dict):
        raise TypeError(f"holds a {type(state_dict).__name__}, not a state dict")
    if not all(isinstance(k, str) for k in state_dict):
        raise TypeError("not a state dict: its keys are not all strings")
    state_dict = _unwrap_prefixed(state_dict)
    _check_not_folded(state_dict)
    stem, width = infer_widths(state_dict)
    expected = _expected_shapes(stem, width)
    batches = {
        k.rsplit(".", 1)[0] + ".num_batches_tracked" for k in expected if "running_mean" in k
    }
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected) - batches - set(OPTIONAL_KEYS)
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s): {_first(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s): {_first(unexpected)}")
        hint = ""
        if "layer1.0.conv3.weight" in missing and "layer1.0.conv2.weight" in state_dict:
            hint = " (it looks like a basic-block ResNet-18/34)"
        elif any(k.startswith(("backbone.", "stem.", "res2.")) for k in state_dict):
            hint = " (it looks like a detectron2 checkpoint already)"
        raise ValueError(f"not a torchvision ResNet-50 state dict{hint}: {'; '.join(problems)}")
    name = "ResNet-50" if (stem, width) == (64, 64) else f"ResNet-50 of widths {stem}/{width}"
    wrong = [
        f"{k} {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__} "
        f"({name}: {expected.get(k, ())})"
        for k, v in state_dict.items()
        if not isinstance(v, torch.Tensor)
        or (k in expected and tuple(v.shape) != expected[k])
        or (k in batches and v.numel() != 1)
    ]
    if wrong:
        raise ValueError(
            "not a torchvision ResNet-50 state dict (a ResNeXt or wide ResNet has the same keys; "
            "the stem and bottleneck widths are read from conv1 and layer1.0.conv3): "
            f"{len(wrong)} tensor(s) of the wrong shape or type: {', '.join(wrong[:3])}"
        )
    return {_detectron2_name(k, layout): v for k, v in state_dict.items() if k not in OPTIONAL_KEYS}


def load_state_dict(path):
    """The object in ``path``, read without running code from it (``read_checkpoint``); for a
    ``.pkl`` (the detectron2/Caffe2 format) its arrays become tensors."""
    obj = read_checkpoint(path)
    if path.endswith(".pkl"):
        if isinstance(obj, dict) and isinstance(obj.get("blobs"), dict):
            obj = obj["blobs"]
        inner = _unwrap(obj)
        if isinstance(inner, dict):
            obj = {k: torch.tensor(v) if hasattr(v, "__array__") else v for k, v in inner.items()}
    return obj


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Convert a torchvision ImageNet ResNet-50 state dict (of any width) into a "
        "detectron2 checkpoint for EvalNorm's models: C4 (backbone.* and roi_heads.res5.*) or FPN "
        "(backbone.bottom_up.*)."
    )
    parser.add_argument("input", metavar="IN", help="torchvision ResNet-50 state dict (.pth)")
    parser.add_argument("output", metavar="OUT", help="detectron2 checkpoint to write (.pth)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument(
        "--layout",
        choices=sorted(LAYOUTS),
        default="c4",
        help="the model the names are for: c4 (res5 in the box head, the default) or fpn",
    )
    args = parser.parse_args(argv)
    src, dst = args.input, args.output
    if dst.endswith((".pkl", ".pyth")):
        sys.exit(f"error: {dst}: detectron2 reads .pkl/.pyth files as other formats; name it .pth")
    if os.path.exists(dst) and not args.overwrite:
        sys.exit(f"error: {dst} exists; pass --overwrite to replace it")
    if os.path.exists(src) and os.path.exists(dst) and os.path.samefile(src, dst):
        sys.exit(f"error: IN and OUT are the same file: {src}")
    try:
        state_dict = load_state_dict(src)
    except (OSError, pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        sys.exit(f"error: {src}: cannot be read as a PyTorch state dict: {e}")
    try:
        model = convert_torchvision_resnet(state_dict, args.layout)
    except (TypeError, ValueError) as e:
        sys.exit(f"error: {src}: {e}")

    checkpoint = {"model": model, "__author__": "torchvision", "matching_heuristics": False}
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    with atomic_write(dst) as f:  # OUT is never left half-written
        torch.save(checkpoint, f)

    norms = sum(k.endswith(".running_mean") for k in model)
    source = _unwrap_prefixed(state_dict)
    dropped = [k for k in OPTIONAL_KEYS if k in source]
    stem, width = infer_widths(source)
    widths = "/".join(str(width * 2**k) for k in range(4))
    print(f"Converted {len(model)} tensors from {src} (torchvision ResNet-50) into {dst}:")
    print(f"  stem {stem} channels, bottleneck widths {widths} (outputs 4x)")
    backbone, res5 = LAYOUTS[args.layout]
    print(f"  conv1/bn1, layer1-3 -> {backbone}stem, {backbone}res2-res4; layer4 -> {res5}res5")
    print(f"  {norms} BatchNorm layers with their running statistics (EvalNorm needs them)")
    if dropped:
        print(f"  dropped {', '.join(dropped)}: the ImageNet classifier, unused in detection")
    print("The weights expect torchvision's conventions; in the config:")
    print('  INPUT.FORMAT: "RGB"')
    print(f"  MODEL.PIXEL_MEAN: {PIXEL_MEAN}")
    print(f"  MODEL.PIXEL_STD: {PIXEL_STD}")
    print("  MODEL.RESNETS.STRIDE_IN_1X1: False")
    print(f"  MODEL.RESNETS.STEM_OUT_CHANNELS: {stem}")
    print(f"  MODEL.RESNETS.RES2_OUT_CHANNELS: {4 * width}")
    print(f"  MODEL.RESNETS.WIDTH_PER_GROUP: {width}  (NUM_GROUPS: 1)")
    print(f"  MODEL.WEIGHTS: {dst}")


if __name__ == "__main__":
    main()

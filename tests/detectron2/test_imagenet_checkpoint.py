"""tools/convert_imagenet_checkpoint.py: torchvision ResNet-50 -> detectron2 C4 (or FPN)
checkpoint.

A ResNet-50 with random weights and random BatchNorm affine and statistics stands in for
torchvision's ImageNet weights. The converted checkpoint, loaded through EvalNormCheckpointer,
must reproduce torchvision's layer1-3 in the backbone's res4 and layer4 in the ROI head's res5
(in FPN models, in the bottom-up ResNet's res4 and res5; EvalNorm in "ema" mode is exactly
BatchNorm's evaluation).

Outputs are compared in float64 with rtol = 1e-10 and atol = 1e-10 * max |reference|. Both
sides run the same convolutions and batch_norm calls, so on CPU they agree bit for bit today;
the tolerance leaves room for another kernel or summation order (float64 rounding, ~1e-16 per
operation over ~50 layers of sums of at most 4608 terms, stays below 1e-12 of the output's
scale), while one wrong tensor (a BN's running_var permuted in a single layer) already moves
res4 by ~3e-2 of its scale, and EvalNorm's "en" mode instead of "ema" by ~3e-1.
"""

import os
import pickle
import re
import subprocess
import sys

import pytest
import torch
import torchvision
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from helpers import ROOT, load_script
from torch import nn

from benchmarks.detection_regimes.standin import StandinResNet50 as NarrowResNet50
from evalnorm_det import EvalNorm2d, EvalNormCheckpointer, add_evalnorm_config
from evalnorm_det.engine import MissingStatisticsError

TOOL = ROOT / "tools" / "convert_imagenet_checkpoint.py"
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
# NarrowResNet50: the benchmarks' "ImageNet" stand-in, torchvision's ResNet-50 layout at another
# width.


tool = load_script(TOOL)


@torch.no_grad()
def randomize_batchnorm(model):
    """Random BN affine, running statistics and counts (convolutions keep their random init)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0.0, 0.2)
            m.running_mean.normal_(0.0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(int(torch.randint(1, 10**6, ())))
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """ResNet-50's small convolutions run faster on one thread, and much faster than on several
    when other processes share the CPU cores (OpenMP's threads wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def torchvision_resnet50():
    """(float32 state dict as torchvision saves it, float64 model in eval())."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = randomize_batchnorm(torchvision.models.resnet50(weights=None)).eval()
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    return state_dict, model.double()


@pytest.fixture(scope="module")
def torchvision_file(torchvision_resnet50, tmp_path_factory):
    path = tmp_path_factory.mktemp("tv") / "resnet50-random.pth"
    torch.save(torchvision_resnet50[0], path)
    return path


@pytest.fixture(scope="module")
def converted(torchvision_resnet50):
    return tool.convert_torchvision_resnet(torchvision_resnet50[0])


def save_detectron2(state_dict, path):
    torch.save({"model": state_dict, "__author__": "test", "matching_heuristics": False}, path)
    return str(path)


@pytest.fixture(scope="module")
def converted_file(converted, tmp_path_factory):
    return save_detectron2(converted, tmp_path_factory.mktemp("d2") / "r50-converted.pth")


def torchvision_outputs(tv, size=64):
    """Inputs and ``tv``'s outputs: (x, layer3 output, res5 input features, layer4 output)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, size, size, generator=g, dtype=torch.float64)
    channels = tv.layer4[0].conv1.in_channels
    features = torch.randn(2, channels, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        res4 = tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x)))))))
        res5 = tv.layer4(features)
    return x, res4, features, res5


@pytest.fixture(scope="module")
def reference(torchvision_resnet50):
    """Inputs and torchvision's outputs: (x, layer3 output, res5 features, layer4 output)."""
    x, res4, features, res5 = torchvision_outputs(torchvision_resnet50[1])
    assert res4.shape == (1, 1024, 4, 4) and res5.shape == (2, 2048, 4, 4)
    return x, res4, features, res5


def detectron2_model(backbone_norm, head_norm, layout="c4", widths=(64, 64)):
    """The C4 model, or with ``layout="fpn"`` that of configs/Base-EvalNorm-RCNN-FPN.yaml;
    ``widths``: (stem channels, res2's bottleneck width), ResNet-50's by default."""
    cfg = get_cfg()
    add_evalnorm_config(cfg)
    if layout == "fpn":
        cfg.merge_from_file(str(ROOT / "configs" / "Base-EvalNorm-RCNN-FPN.yaml"))
    else:
        cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
        cfg.MODEL.BACKBONE.NAME = "build_evalnorm_resnet_c4_backbone"
        cfg.MODEL.ROI_HEADS.NAME = "EvalNormRes5ROIHeads"
    cfg.MODEL.DEVICE = "cpu"
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.EVALNORM.BACKBONE_NORM = backbone_norm
    cfg.MODEL.EVALNORM.ROI_HEAD_NORM = head_norm
    stem, width = widths
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = stem
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 4 * width
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = width
    return build_model(cfg)


def assert_close(actual, expected):
    scale = expected.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10 * scale)


def resnet_parts(model):
    """(the ResNet with the stem and res2-res4, res5): C4's backbone and ROI heads' res5, or
    FPN's bottom-up ResNet and its res5."""
    resnet = getattr(model.backbone, "bottom_up", model.backbone)
    return resnet, model.roi_heads.res5 if hasattr(model.roi_heads, "res5") else resnet.res5


@torch.no_grad()
def assert_reproduces_torchvision(model, reference):
    x, res4, features, res5 = reference
    model.eval().double()
    for m in model.modules():
        if isinstance(m, EvalNorm2d):
            m.mode = "ema"
    resnet, res5_stage = resnet_parts(model)
    assert_close(resnet(x)["res4"], res4)
    assert_close(res5_stage(features), res5)


def torchvision_layers(tv):
    """(torchvision name, conv, BN) for every conv-BN pair of the ResNet-50."""
    pairs = [("conv1", tv.conv1, tv.bn1)]
    for k in range(1, 5):
        for i, block in enumerate(getattr(tv, f"layer{k}")):
            for j in (1, 2, 3):
                conv, bn = getattr(block, f"conv{j}"), getattr(block, f"bn{j}")
                pairs.append((f"layer{k}.{i}.conv{j}", conv, bn))
            if block.downsample is not None:
                pairs.append((f"layer{k}.{i}.downsample", *block.downsample))
    return pairs


def detectron2_conv(model, tv_name):
    """detectron2's conv (with its ``norm``) for a torchvision name, written out by hand."""
    resnet, res5 = resnet_parts(model)
    if tv_name == "conv1":
        return resnet.stem.conv1
    layer, block, conv = tv_name.split(".")
    k = int(layer[len("layer") :])
    stage = res5 if k == 4 else getattr(resnet, f"res{k + 1}")
    return getattr(stage[int(block)], "shortcut" if conv == "downsample" else conv)


def assert_every_tensor_landed(model, tv):
    pairs = torchvision_layers(tv)
    assert len(pairs) == 53
    for name, tv_conv, tv_bn in pairs:
        conv = detectron2_conv(model, name)
        assert torch.equal(conv.weight.double(), tv_conv.weight), name
        for attr in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(conv.norm, attr).double(), getattr(tv_bn, attr)), (
                f"{name}: {attr}"
            )
        if not isinstance(conv.norm, FrozenBatchNorm2d):  # which has no count
            assert torch.equal(conv.norm.num_batches_tracked, tv_bn.num_batches_tracked), name


def test_names(converted, torchvision_resnet50):
    """Spot checks of each renaming rule; fc is dropped."""
    state_dict = torchvision_resnet50[0]
    assert len(converted) == len(state_dict) - 2 == 318
    for d2, tv in [
        ("backbone.stem.conv1.weight", "conv1.weight"),
        ("backbone.stem.conv1.norm.running_var", "bn1.running_var"),
        ("backbone.res2.0.shortcut.norm.running_mean", "layer1.0.downsample.1.running_mean"),
        ("backbone.res3.1.conv2.norm.num_batches_tracked", "layer2.1.bn2.num_batches_tracked"),
        ("backbone.res4.5.conv3.weight", "layer3.5.conv3.weight"),
        ("roi_heads.res5.0.shortcut.weight", "layer4.0.downsample.0.weight"),
        ("roi_heads.res5.2.conv1.norm.bias", "layer4.2.bn1.bias"),
    ]:
        assert torch.equal(converted[d2], state_dict[tv]), d2


NORM_TYPES = {
    "EN": EvalNorm2d,
    "FrozenEN": EvalNorm2d,
    "BN": nn.BatchNorm2d,
    "FrozenBN": FrozenBatchNorm2d,
}


def assert_norms(model, backbone_norm, head_norm):
    """The norm layers are the configured ones; EvalNorm layers all got their statistics."""
    for part, norm in zip(resnet_parts(model), (backbone_norm, head_norm)):
        norms = [m for m in part.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
        assert norms and all(type(m) is NORM_TYPES[norm] for m in norms)
        if NORM_TYPES[norm] is EvalNorm2d:
            assert all(m.frozen == (norm == "FrozenEN") for m in norms)
            for m in norms:  # no EvalNorm layer kept its default statistics or affine
                assert not torch.all(m.running_mean == 0) and not torch.all(m.running_var == 1)
                assert not torch.all(m.weight == 1) and m.num_batches_tracked > 0


@pytest.mark.parametrize(
    "backbone_norm, head_norm", [("FrozenEN", "FrozenEN"), ("BN", "BN"), ("FrozenBN", "FrozenBN")]
)
def test_loaded_model_reproduces_torchvision(
    backbone_norm, head_norm, converted_file, torchvision_resnet50, reference
):
    """FrozenEN, and detectron2's own norms, take the same weights (EN: test_command_line)."""
    model = detectron2_model(backbone_norm, head_norm)
    EvalNormCheckpointer(model).load(converted_file)
    assert_norms(model, backbone_norm, head_norm)
    assert_every_tensor_landed(model, torchvision_resnet50[1])
    assert_reproduces_torchvision(model, reference)


def test_command_line(torchvision_file, converted, torchvision_resnet50, reference, tmp_path):
    """The tool writes the function's tensors; an EN model loads them and reproduces torchvision."""
    out = tmp_path / "weights" / "R-50-torchvision.pth"
    result = subprocess.run(
        [sys.executable, str(TOOL), str(torchvision_file), str(out)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for text in (
        "318 tensors",
        "53 BatchNorm layers",
        "dropped fc.weight, fc.bias",
        "RGB",
        "[123.675, 116.28, 103.53]",
        "[58.395, 57.12, 57.375]",
        "STRIDE_IN_1X1: False",
    ):
        assert text in result.stdout, text
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["__author__"] == "torchvision" and checkpoint["matching_heuristics"] is False
    assert list(checkpoint["model"]) == list(converted)
    assert all(torch.equal(checkpoint["model"][k], v) for k, v in converted.items())
    assert not list(out.parent.glob(".convert-*"))  # no temporary file left behind
    assert not list(out.parent.glob(".*.partial"))  # (atomic_write's name for it)

    model = detectron2_model("EN", "EN")
    # Exactly the backbone's and res5's tensors (EvalNorm's alpha/beta aside), nothing extra.
    own = {
        k
        for k in model.state_dict()
        if k.startswith(("backbone.", "roi_heads.res5."))
        and not k.endswith(("alpha_logit", "beta_logit"))
    }
    assert set(checkpoint["model"]) == own
    EvalNormCheckpointer(model).load(str(out))
    assert_norms(model, "EN", "EN")
    assert_every_tensor_landed(model, torchvision_resnet50[1])
    assert_reproduces_torchvision(model, reference)
    incompatible = model.load_state_dict(checkpoint["model"], strict=False)
    assert incompatible.unexpected_keys == []
    assert incompatible.missing_keys and all(
        k.startswith(("proposal_generator.", "roi_heads.box_predictor."))
        for k in incompatible.missing_keys
    )


def test_wrappers_and_module_prefix(torchvision_resnet50, converted):
    state_dict = torchvision_resnet50[0]
    for wrapped in (
        {"state_dict": state_dict},
        {"model": state_dict, "__author__": "someone"},
        {f"module.{k}": v for k, v in state_dict.items()},
    ):
        out = tool.convert_torchvision_resnet(wrapped)
        assert list(out) == list(converted) and all(out[k] is converted[k] for k in out)


def without_statistics(state_dict):
    return {k: v for k, v in state_dict.items() if not k.endswith(STATISTICS)}


def caffe2_name(d2_name):
    """Caffe2 (MSRA R-50.pkl) name of a detectron2 weight or BN scale/shift."""
    name = d2_name.removeprefix("backbone.").removeprefix("roi_heads.")
    if name == "stem.conv1.weight":
        return "conv1_w"
    if name.startswith("stem.conv1.norm."):
        prefix = "res_conv1"
    else:
        stage, block, conv = name.split(".")[:3]
        branch = "branch1" if conv == "shortcut" else "branch2" + "abc"[int(conv[-1]) - 1]
        prefix = f"{stage}_{block}_{branch}"
    if ".norm." not in name:
        return prefix + "_w"
    return prefix + {"weight": "_bn_s", "bias": "_bn_b"}[name.rsplit(".", 1)[1]]


def test_folded_checkpoint_is_refused_by_the_checkpointer(converted, tmp_path):
    """BN without statistics (MSRA R-50.pkl) cannot load into EN layers, in detectron2's
    format or in Caffe2's .pkl itself; FrozenBN still takes it, as in detectron2."""
    folded = save_detectron2(without_statistics(converted), tmp_path / "folded.pth")
    caffe2 = {caffe2_name(k): v.numpy() for k, v in without_statistics(converted).items()}
    assert len(caffe2) == len(without_statistics(converted)) and "res5_2_branch2c_bn_s" in caffe2
    msra = tmp_path / "R-50.pkl"
    with open(msra, "wb") as f:
        pickle.dump(caffe2, f, protocol=4)
    few = {k: caffe2[k] for k in ("conv1_w", "res_conv1_bn_s", "res_conv1_bn_b")}
    small = []  # the tool reads the other pickle protocols too (2: as Python 2 wrote them)
    for protocol in (2, 5):
        small.append(tmp_path / f"R-50-protocol{protocol}.pkl")
        with open(small[-1], "wb") as f:
            pickle.dump(few, f, protocol=protocol)
    for path, norms in ((folded, ("EN", "EN")), (str(msra), ("FrozenEN", "FrozenBN"))):
        model = detectron2_model(*norms)
        with pytest.raises(MissingStatisticsError) as info:
            EvalNormCheckpointer(model).load(path)
        message = str(info.value)
        assert path in message and "R-50.pkl" in message
        assert "tools/convert_imagenet_checkpoint.py" in message
    EvalNormCheckpointer(detectron2_model("FrozenBN", "FrozenBN")).load(folded)

    # The tool says the same of both, without writing anything.
    for path in (folded, msra, *small):
        with pytest.raises(SystemExit) as info:
            tool.main([str(path), str(tmp_path / "out.pth")])
        assert re.search(r"folded.*R-50\.pkl.*torchvision", str(info.value.code)), info.value.code
        assert str(path) in str(info.value.code)
    assert not (tmp_path / "out.pth").exists()


def test_tool_refuses_torchvision_weights_without_statistics(torchvision_resnet50, tmp_path):
    path = tmp_path / "resnet50-folded.pth"
    torch.save(without_statistics(torchvision_resnet50[0]), path)
    with pytest.raises(tool.FoldedBatchNormError, match="bn1.running_mean"):
        tool.convert_torchvision_resnet(without_statistics(torchvision_resnet50[0]))
    out = tmp_path / "out.pth"
    with pytest.raises(SystemExit) as info:
        tool.main([str(path), str(out)])
    message = str(info.value.code)
    assert message.startswith(f"error: {path}: BatchNorm folded") and not out.exists()
    assert "R-50.pkl" in message and "EvalNorm" in message


@pytest.mark.parametrize(
    "make, expected",
    [
        (
            lambda: torchvision.models.resnet18(weights=None).state_dict(),
            r"not a torchvision ResNet-50 state dict \(it looks like a basic-block ResNet-18/34\): "
            + r"165 missing key\(s\): layer1\.0\.bn3\.bias",
        ),
        (
            lambda: torchvision.models.resnext50_32x4d(weights=None).state_dict(),
            r"ResNeXt.*wrong shape.*layer1\.0\.conv1\.weight \(128, 64, 1, 1\)",
        ),
        (
            lambda: {"weight": torch.ones(3), "step": 7},
            r"265 missing key\(s\): bn1\.bias.*2 unexpected key\(s\): step, weight",
        ),
        (lambda: torch.ones(3), r"holds a Tensor, not a state dict"),
        (lambda: b"not a checkpoint", r"cannot be read as a PyTorch state dict"),
    ],
    ids=["resnet18", "resnext50", "random-dict", "tensor", "not-torch"],
)
def test_tool_names_what_is_wrong(make, expected, tmp_path):
    path = tmp_path / "input.pth"
    obj = make()
    if isinstance(obj, bytes):
        path.write_bytes(obj)
    else:
        torch.save(obj, path)
    out = tmp_path / "out.pth"
    with pytest.raises(SystemExit) as info:
        tool.main([str(path), str(out)])
    message = str(info.value.code)
    assert message.startswith(f"error: {path}: ") and re.search(expected, message), message
    assert not out.exists()


def test_detectron2_checkpoint_is_not_converted_again(converted_file, tmp_path):
    with pytest.raises(SystemExit, match="looks like a detectron2 checkpoint already"):
        tool.main([converted_file, str(tmp_path / "again.pth")])


def test_output_is_never_overwritten_silently(torchvision_file, tmp_path):
    out = tmp_path / "out.pth"
    out.write_bytes(b"keep me")
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        tool.main([str(torchvision_file), str(out)])
    assert out.read_bytes() == b"keep me"
    with pytest.raises(SystemExit, match=r"\.pkl.*name it \.pth"):
        tool.main([str(torchvision_file), str(tmp_path / "out.pkl")])
    with pytest.raises(SystemExit, match="same file"):
        tool.main([str(torchvision_file), str(torchvision_file), "--overwrite"])
    tool.main([str(torchvision_file), str(out), "--overwrite"])
    assert len(torch.load(out, weights_only=True)["model"]) == 318


def test_fpn_layout(torchvision_file, torchvision_resnet50, converted, reference, tmp_path, capsys):
    """--layout fpn: the C4 names moved under backbone.bottom_up (res5 too), the same tensors;
    the FPN model's bottom-up ResNet takes every one of them and reproduces torchvision."""
    out = tmp_path / "R-50-torchvision-fpn.pth"
    tool.main([str(torchvision_file), str(out), "--layout", "fpn"])
    printed = capsys.readouterr().out
    assert "layer1-3 -> backbone.bottom_up.stem, backbone.bottom_up.res2-res4" in printed
    assert "layer4 -> backbone.bottom_up.res5" in printed
    checkpoint = torch.load(out, weights_only=True)["model"]
    renamed = {
        re.sub(r"^(backbone|roi_heads)\.", "backbone.bottom_up.", k): v
        for k, v in converted.items()
    }
    assert list(checkpoint) == list(renamed)
    assert all(torch.equal(checkpoint[k], v) for k, v in renamed.items())
    with pytest.raises(ValueError, match="layout='C4'"):
        tool.convert_torchvision_resnet(torchvision_resnet50[0], layout="C4")

    model = detectron2_model("EN", "EN", layout="fpn")
    own = {
        k
        for k in model.state_dict()
        if k.startswith("backbone.bottom_up.") and not k.endswith(("alpha_logit", "beta_logit"))
    }
    assert set(checkpoint) == own and not own & set(converted)  # the C4 file would not load
    EvalNormCheckpointer(model).load(str(out))
    assert_norms(model, "EN", "EN")
    assert_every_tensor_landed(model, torchvision_resnet50[1])
    assert_reproduces_torchvision(model, reference)


@pytest.mark.parametrize("widths", [(16, 8), (32, 8)], ids=["1/8-width", "stem-equals-res2"])
def test_narrow_resnet(widths, tmp_path, capsys):
    """A ResNet-50 of another width in torchvision's layout (the benchmarks' ImageNet stand-in:
    stem 16, widths 8/16/32/64) converts; the detectron2 model of the widths the tool prints
    takes every tensor and reproduces its layer3 and layer4. With stem = 4 x width, layer1.0 has
    no projection shortcut, in torchvision as in detectron2."""
    stem, width = widths
    with torch.random.fork_rng():
        torch.manual_seed(2)
        tv = randomize_batchnorm(NarrowResNet50(stem, width)).eval()
    state_dict = {k: v.clone() for k, v in tv.state_dict().items()}
    assert ("layer1.0.downsample.0.weight" in state_dict) == (stem != 4 * width)
    assert tool.infer_widths(state_dict) == widths
    src, out = tmp_path / "narrow.pth", tmp_path / "narrow-d2.pth"
    torch.save(state_dict, src)
    tool.main([str(src), str(out)])
    printed = capsys.readouterr().out
    channels = "/".join(str(width * 2**k) for k in range(4))
    for text in (
        f"{len(state_dict) - 2} tensors",
        "53 BatchNorm layers" if stem != 4 * width else "52 BatchNorm layers",
        f"stem {stem} channels, bottleneck widths {channels}",
        f"STEM_OUT_CHANNELS: {stem}",
        f"RES2_OUT_CHANNELS: {4 * width}",
        f"WIDTH_PER_GROUP: {width}",
    ):
        assert text in printed, text

    model = detectron2_model("EN", "EN", widths=widths)
    EvalNormCheckpointer(model).load(str(out))
    assert_norms(model, "EN", "EN")
    tv.double()
    pairs = torchvision_layers(tv)
    for name, tv_conv, tv_bn in pairs:
        conv = detectron2_conv(model, name)
        assert torch.equal(conv.weight.double(), tv_conv.weight), name
        for attr in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(conv.norm, attr).double(), getattr(tv_bn, attr)), name
    assert len(pairs) == sum(k.endswith(".running_mean") for k in state_dict)
    x, res4, features, res5 = torchvision_outputs(tv)
    assert res4.shape == (1, 16 * width, 4, 4) and res5.shape == (2, 32 * width, 4, 4)
    assert_reproduces_torchvision(model, (x, res4, features, res5))


def test_narrow_resnet_with_one_wrong_width_is_refused(tmp_path):
    """Widths come from conv1 and layer1.0.conv3; every other shape is checked against them."""
    state_dict = NarrowResNet50(16, 8).state_dict()
    state_dict["layer3.2.conv2.weight"] = torch.zeros(32, 16, 3, 3)  # a grouped conv, say
    with pytest.raises(
        ValueError,
        match=r"layer3\.2\.conv2\.weight \(32, 16, 3, 3\) "
        r"\(ResNet-50 of widths 16/8: \(32, 32, 3, 3\)\)",
    ):
        tool.convert_torchvision_resnet(state_dict)
    state_dict = NarrowResNet50(16, 8).state_dict()
    state_dict["layer2.0.bn3.running_var"] = torch.ones(128)  # 4 x 16 = 64 channels
    with pytest.raises(ValueError, match=r"layer2\.0\.bn3\.running_var \(128,\)"):
        tool.convert_torchvision_resnet(state_dict)
    folded = {k: v for k, v in state_dict.items() if not k.endswith(STATISTICS)}
    with pytest.raises(tool.FoldedBatchNormError, match="R-50.pkl"):
        tool.convert_torchvision_resnet(folded)

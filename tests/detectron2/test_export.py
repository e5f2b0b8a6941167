"""Export: EvalNorm2d and an EN Faster R-CNN via torch.jit.trace, torch.export, ONNX; folding.

Traced graphs are checked on inputs of other shapes than they were traced with (batch size,
height, width, an empty ROI batch): detectron2's inference varies all of them.

Tolerances: a traced or exported EvalNorm2d computes the same formula as the eager layer, but
with elementwise ops (two-pass mean and variance, rsqrt, addcmul) instead of BatchNorm's fused
kernels, so only rounding differs: a few float32 ulps (2^-24 ~ 6e-8) per step on values of
order 1, hence 1e-5 in float32 and 1e-12 in float64 (observed: about 5e-7 and 2e-15).
"""

import copy
import importlib.util
import inspect
import io
import warnings

import pytest
import torch
from detection_helpers import en_layers, norm_types, tiny_cfg
from detectron2.export import TracingAdapter
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from helpers import randomize_batchnorm
from torch import nn

from evalnorm import EvalNorm2d, convert_to_batchnorm, evalnorm_mode, fold_to_batchnorm

EXPORT_MODES = ("ema", "en", "rule_of_thumb", "simple")
HAS_ONNX = importlib.util.find_spec("onnx") is not None
HAS_ORT = HAS_ONNX and importlib.util.find_spec("onnxruntime") is not None
needs_onnx = pytest.mark.skipif(
    not HAS_ONNX,
    reason="onnx is not installed (not a dependency of evalnorm-det; torch.onnx.export needs it)",
)
needs_ort = pytest.mark.skipif(
    not HAS_ORT, reason="onnx and onnxruntime are needed to run the exported graph"
)
TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float64: {"rtol": 0, "atol": 1e-12}}
# detection outputs: box coordinates up to ~100 px and scores in [0, 1], in float32, after
# ~50 EvalNorm layers each differing by rounding only
BOX_TOL, SCORE_TOL = {"rtol": 0, "atol": 1e-3}, {"rtol": 0, "atol": 1e-5}


def trace(module, *inputs):
    """``torch.jit.trace`` under no_grad (as ``TracingAdapter`` runs), and the warnings it
    raised from evalnorm_det's own code (a TracerWarning there means a baked-in value)."""
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(module, inputs)
    ours = [w for w in caught if "evalnorm_det" in w.filename]
    return traced, ours


def onnx_export(module, inputs, **kwargs):
    """The serialized ONNX model, from the TorchScript-based exporter (the one detectron2's
    ``TracingAdapter`` is made for; torch >= 2.5 defaults to the dynamo one)."""
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    f = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, inputs, f, opset_version=17, **kwargs)
    import onnx

    onnx.checker.check_model(onnx.load_from_string(f.getvalue()))
    return f.getvalue()


def onnx_run(model_bytes, *inputs):
    import onnxruntime

    session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    outputs = session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})
    return tuple(torch.from_numpy(o) for o in outputs)


# ---- EvalNorm2d alone ----


def make_layer(mode, dtype=torch.float32):
    layer = randomize_batchnorm(EvalNorm2d(5, norm_batch_size=4)).to(dtype).eval()
    layer.set_coefficients(0.3, 0.2)
    layer.mode = mode
    return layer


def layer_inputs(dtype=torch.float32):
    """An input to trace with, then inputs of other N, H, W (an empty ROI batch too)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 5, 6, 7), (3, 5, 9, 4), (1, 5, 1, 2), (0, 5, 4, 4)]
    return [torch.randn(s, generator=g, dtype=dtype) * 3 + 1 for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("mode", EXPORT_MODES)
def test_layer_trace_matches_eager_on_other_shapes(mode, dtype):
    layer = make_layer(mode, dtype)
    first, *others = layer_inputs(dtype)
    traced, ours = trace(layer, first)
    assert not ours, [str(w.message) for w in ours]
    # the fast eager kernels work on an (1, N*C, H, W) view and have no ONNX symbolic
    assert "batch_norm_update_stats" not in str(traced.inlined_graph)
    with torch.no_grad():
        for x in others:
            torch.testing.assert_close(traced(x), layer(x), **TOLERANCE[dtype])


@pytest.mark.parametrize("mode", EXPORT_MODES)
def test_layer_torch_export_matches_eager_on_other_shapes(mode):
    layer = make_layer(mode)
    first, *others = layer_inputs()
    dims = {0: torch.export.Dim("n"), 2: torch.export.Dim("h"), 3: torch.export.Dim("w")}
    with torch.no_grad():
        exported = torch.export.export(layer, (first,), dynamic_shapes={"x": dims}).module()
        for x in others:
            torch.testing.assert_close(exported(x), layer(x), **TOLERANCE[torch.float32])


def test_layer_trace_keeps_alpha_beta_as_parameters():
    layer = make_layer("en")
    first, x, *_ = layer_inputs()
    traced, _ = trace(layer, first)
    layer.set_coefficients(0.7, 0.9)  # shares its parameters with the traced module
    with torch.no_grad():
        torch.testing.assert_close(traced(x), layer(x), **TOLERANCE[torch.float32])


@needs_onnx
@pytest.mark.parametrize("mode", EXPORT_MODES)
def test_layer_exports_to_onnx_with_dynamic_shapes(mode):
    import onnx

    first = layer_inputs()[0]
    model = onnx.load_from_string(
        onnx_export(
            make_layer(mode),
            (first,),
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}, "y": {0: "n", 2: "h", 3: "w"}},
        )
    )
    ops = {node.op_type for node in model.graph.node}
    assert ops, "empty graph"
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["n", 5, "h", "w"]


@needs_ort
@pytest.mark.parametrize("mode", EXPORT_MODES)
def test_layer_onnxruntime_matches_eager_on_other_shapes(mode):
    layer = make_layer(mode)
    first, *others = layer_inputs()
    model = onnx_export(
        layer, (first,), input_names=["x"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}}
    )
    with torch.no_grad():
        for x in others:
            (y,) = onnx_run(model, x)
            torch.testing.assert_close(y, layer(x), **TOLERANCE[torch.float32])


# ---- a tiny EN Faster R-CNN (C4): FrozenEN backbone (regime c), EN box head ----


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """Random weights and statistics, alpha = 0.3, beta = 0.2 in every layer, eval mode."""
    cfg = tiny_cfg(
        tmp_path_factory.mktemp("export"),
        "MODEL.EVALNORM.BACKBONE_NORM",
        "FrozenEN",
        "MODEL.EVALNORM.ROI_HEAD_NORM",
        "EN",
    )
    torch.manual_seed(0)
    model = randomize_batchnorm(build_model(cfg)).eval()
    for _, layer in en_layers(model):
        layer.set_coefficients(0.3, 0.2)
    assert {m.frozen for _, m in en_layers(model.backbone)} == {True}
    assert {m.frozen for _, m in en_layers(model.roi_heads)} == {False}
    return model


def images(dtype=torch.float32):
    """(an image to trace with, a test image of another size), CHW in [0, 255]."""
    g = torch.Generator().manual_seed(0)
    return tuple(
        torch.rand(3, h, w, generator=g, dtype=dtype) * 255 for h, w in [(64, 64), (80, 96)]
    )


def inference(model, image):
    """detectron2's traceable entry point (as in its export tests): Instances, no resizing."""
    return model.inference([{"image": image}], do_postprocess=False)[0]


def assert_same_detections(out, ref, box_tol=BOX_TOL, score_tol=SCORE_TOL):
    assert len(ref) > 0 and len(out) == len(ref)
    torch.testing.assert_close(out.pred_boxes.tensor, ref.pred_boxes.tensor, **box_tol)
    torch.testing.assert_close(out.scores, ref.scores, **score_tol)
    assert torch.equal(out.pred_classes.long(), ref.pred_classes)


def test_detector_trace_matches_eager(detector):
    trace_image, test_image = images()
    adapter = TracingAdapter(detector, trace_image, inference).eval()
    traced, ours = trace(adapter, *adapter.flattened_inputs)
    assert not ours, [str(w.message) for w in ours]
    with torch.no_grad():
        for image in (test_image, trace_image):
            assert_same_detections(
                adapter.outputs_schema(traced(image)), inference(detector, image)
            )


@pytest.fixture(scope="module")
def detector_onnx(detector):
    """(the ``TracingAdapter``, its ONNX model with a dynamic image size)."""
    adapter = TracingAdapter(detector, images()[0], inference).eval()
    model = onnx_export(
        adapter,
        adapter.flattened_inputs,
        input_names=["image"],
        dynamic_axes={"image": {1: "height", 2: "width"}},
    )
    return adapter, model


@needs_onnx
def test_detector_exports_to_onnx(detector_onnx):
    import onnx

    _, model = detector_onnx
    ops = {node.op_type for node in onnx.load_from_string(model).graph.node}
    assert {"ReduceMean", "Sqrt"} <= ops or {"ReduceMean", "Reciprocal"} <= ops, ops


@needs_ort
def test_detector_onnxruntime_matches_eager(detector, detector_onnx):
    adapter, model = detector_onnx
    with torch.no_grad():
        for image in images():
            out = adapter.outputs_schema(onnx_run(model, image))
            assert_same_detections(out, inference(detector, image))


# ---- EMA evaluation converted back to BatchNorm2d / FrozenBatchNorm2d, checked ----


def test_strict_conversion_refuses_modes_that_use_sample_statistics():
    for mode in ("en", "rule_of_thumb", "simple", "batch"):
        model = nn.Sequential(nn.Conv2d(3, 5, 1), make_layer(mode))
        with pytest.raises(ValueError, match=f"'1' evaluates in mode '{mode}'.*cannot reproduce"):
            convert_to_batchnorm(model, strict=True)
        assert type(model[1]) is EvalNorm2d  # left as it was
    ema_coefficients = make_layer("en")
    ema_coefficients.set_coefficients("ema")
    assert type(convert_to_batchnorm(ema_coefficients, strict=True)) is nn.BatchNorm2d


def test_fold_to_batchnorm_is_a_deprecated_name_of_strict_conversion():
    model = nn.Sequential(nn.Conv2d(3, 5, 1), make_layer("en"))
    with (
        pytest.warns(FutureWarning, match="convert_to_batchnorm"),
        pytest.raises(ValueError, match="'1' evaluates in mode 'en'"),
    ):
        fold_to_batchnorm(model)


def test_folded_detector_matches_ema_and_traces(detector):
    model = copy.deepcopy(detector)
    trace_image, test_image = images()
    with torch.no_grad(), evalnorm_mode(model, "ema"):
        refs = [inference(model, image) for image in (trace_image, test_image)]
        folded = convert_to_batchnorm(copy.deepcopy(model), strict=True)
        # Every norm in float64 (detectron2's RPN does not run in float64: its anchors stay
        # float32): only FrozenBatchNorm2d's x * scale + shift rounds differently.
        model64, folded64 = copy.deepcopy(model).double(), copy.deepcopy(folded).double()
        x = torch.stack(images(torch.float64)[:1] * 2) / 64 - 2
        features, folded_features = model64.backbone(x), folded64.backbone(x)
        res5, folded_res5 = (m.roi_heads.res5(features["res4"]) for m in (model64, folded64))
    assert norm_types(folded.backbone) == {FrozenBatchNorm2d}
    assert norm_types(folded.roi_heads) == {nn.BatchNorm2d}
    unchecked = convert_to_batchnorm(copy.deepcopy(model))
    assert folded.state_dict().keys() == unchecked.state_dict().keys()
    float64_tol = {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(folded_features, features, **float64_tol)
    torch.testing.assert_close(folded_res5, res5, **float64_tol)
    with torch.no_grad():
        for image, ref in zip((trace_image, test_image), refs):
            assert_same_detections(inference(folded, image), ref)
    adapter = TracingAdapter(folded, trace_image, inference).eval()
    traced, _ = trace(adapter, *adapter.flattened_inputs)
    with torch.no_grad():
        assert_same_detections(adapter.outputs_schema(traced(test_image)), refs[1])

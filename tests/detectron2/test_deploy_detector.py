"""Deployment on a detector: detectron2 convolutions fold their EMA layers, and
tools/deploy_evalnorm.py writes a checkpoint with only alpha/beta changed."""

import copy
import math

import pytest
import torch
from detection_helpers import en_layers, register_tiny_digits, tiny_cfg, tiny_overrides, train
from detectron2.export import TracingAdapter
from detectron2.modeling import build_model
from helpers import import_tool, randomize_batchnorm

from evalnorm import EvalNorm2d, evalnorm_mode, fold_ema_layers, output_change
from evalnorm_det.config import norm_batch_sizes
from evalnorm_det.engine import load_evalnorm_model, parse_args
from evalnorm_det.engine.deploy import detector_outputs, with_proposals


def test_detectron2_convolutions_fold_their_ema_layers_in_float64(tmp_path):
    torch.manual_seed(0)
    model = randomize_batchnorm(build_model(tiny_cfg(tmp_path))).double().eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad(), evalnorm_mode(model, "ema"):
        expected = model.backbone(x)["res4"]
        folded = fold_ema_layers(copy.deepcopy(model))
    assert not any(isinstance(m, (EvalNorm2d, torch.nn.BatchNorm2d)) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded.backbone(x)["res4"], expected, rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module")
def en_checkpoint(tmp_path_factory):
    """The tiny demo detector, EvalNorm everywhere, trained 3 iterations."""
    tmp = tmp_path_factory.mktemp("en")
    train(tiny_cfg(tmp))
    return tmp, tmp / "output" / "model_final.pth"


def test_deploy_tool_writes_alpha_beta_and_a_bounded_report(tmp_path, en_checkpoint):
    tmp, checkpoint = en_checkpoint
    register_tiny_digits(tmp / "datasets")
    output = tmp_path / "deployed.pth"
    tool = import_tool("deploy_evalnorm")
    argv = ["--config", "demo/evalnorm_digits_2img.yaml", "--output", str(output)]
    argv += ["--dataset", "tiny_digits_train", "--num-images", "2", "--held-out", "1"]
    argv += ["--tolerance", "1e-3"]
    opts = [*tiny_overrides(), "MODEL.WEIGHTS", str(checkpoint), "OUTPUT_DIR", str(tmp_path)]
    args = parse_args(tool.build_parser(), [*argv, *opts])
    report = tool.main(args)  # in this process
    assert report["change"] <= 1e-3 and report["calibration_images"] == 2
    assert report["held_out"] == 1 and math.isfinite(report["held_out_change"])
    source = torch.load(checkpoint, weights_only=True)["model"]
    saved = torch.load(output, weights_only=True)
    assert saved["evalnorm"]["deployment"]["layers"] == report["layers"]
    for key, value in source.items():  # only alpha/beta of the EMA layers changed
        layer = key.rsplit(".", 1)[0]
        row = next((r for r in report["layers"] if r["name"] == layer), None)
        if key.endswith("_logit") and row["ema"]:
            assert saved["model"][key].item() == -math.inf, key
        else:
            assert torch.equal(saved["model"][key], value), key

    # A model built from the config with it, folded, computes what the deployed one measured.
    cfg = tiny_cfg(tmp, "MODEL.WEIGHTS", str(output))
    model = load_evalnorm_model(cfg, norm_batch_sizes(cfg)).eval()
    source_cfg = tiny_cfg(tmp, "MODEL.WEIGHTS", str(checkpoint))
    reference = load_evalnorm_model(source_cfg, norm_batch_sizes(cfg)).eval()
    kept = [n for n, m in en_layers(model) if not (m.alpha.item() == m.beta.item() == 0)]
    assert kept == [r["name"] for r in report["layers"] if not r["ema"]]
    folded = fold_ema_layers(model)
    assert len(en_layers(folded)) == len(kept)
    image = [{"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)}]
    (batch,) = with_proposals(reference, [image])
    with torch.no_grad():
        change = output_change(detector_outputs(reference, batch), detector_outputs(folded, batch))
    assert change < 1.0  # random pixels are far from the calibration images; finite and close


def test_deploy_tool_writes_an_onnx_graph_that_runs(tmp_path, en_checkpoint):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    tmp, checkpoint = en_checkpoint
    register_tiny_digits(tmp / "datasets")
    tool = import_tool("deploy_evalnorm")
    argv = ["--config", "demo/evalnorm_digits_2img.yaml", "--output", str(tmp_path / "d.pth")]
    argv += [
        "--dataset",
        "tiny_digits_train",
        "--num-images",
        "1",
        "--onnx",
        str(tmp_path / "d.onnx"),
    ]
    opts = [*tiny_overrides(), "MODEL.WEIGHTS", str(checkpoint), "OUTPUT_DIR", str(tmp_path)]
    tool.main(parse_args(tool.build_parser(), [*argv, *opts]))
    onnx.checker.check_model(onnx.load(str(tmp_path / "d.onnx")))
    # The graph computes what the deployed checkpoint, folded, computes in torch.
    cfg = tiny_cfg(tmp, "MODEL.WEIGHTS", str(tmp_path / "d.pth"))
    folded = fold_ema_layers(load_evalnorm_model(cfg, norm_batch_sizes(cfg)).eval())
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    adapter = TracingAdapter(
        folded, image, lambda m, x: m.inference([{"image": x}], do_postprocess=False)[0]
    )
    with torch.no_grad():
        expected = adapter(image)
    session = onnxruntime.InferenceSession(str(tmp_path / "d.onnx"))
    outputs = session.run(None, {session.get_inputs()[0].name: image.numpy()})
    assert len(outputs) == len(expected)
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)

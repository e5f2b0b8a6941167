"""tools/plot_alpha_beta.py (the paper's Figure 3) and tools/plot_activations.py (Figure 1) on
tiny data: the PNGs they write, the values behind them, and their refusals."""

import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch
from detection_helpers import en_layers, tiny_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from helpers import ROOT, load_script, randomize_batchnorm
from matplotlib import colors
from matplotlib import image as mpimg

from evalnorm_det import Trainer
from evalnorm_det.config import norm_batch_sizes
from evalnorm_det.engine import training_batches
from evalnorm_det.visualize import (
    checkpoint_labels,
    layer_group,
    normalized_activations,
    read_coefficients,
)

TOOLS = ROOT / "tools"


plot_alpha_beta = load_script(TOOLS / "plot_alpha_beta.py")
plot_activations = load_script(TOOLS / "plot_activations.py")


def check_png(path, width, height, colours):
    """The PNG opens, is ``width`` x ``height`` pixels, is not blank, and shows each of
    ``colours`` (matplotlib's "C0", "C1", ...) in more than 20 pixels."""
    image = mpimg.imread(path)
    assert image.shape[:2] == (height, width)
    rgb = np.round(image[..., :3].reshape(-1, 3) * 255).astype(np.int64)
    assert rgb.std() > 0.05 * 255
    assert len(np.unique(rgb @ [65536, 256, 1])) > 10  # more than a few colours
    for colour in colours:
        target = np.round(np.array(colors.to_rgb(colour)) * 255)
        close = np.abs(rgb - target).max(axis=1) <= 2
        assert close.sum() > 20, f"{colour} is (almost) absent from {path}"


def exit_message(excinfo):
    return str(excinfo.value.code)


def test_help_shows_the_usage():
    expected = {
        "plot_alpha_beta": ["Figure 3", "--label"],
        "plot_activations": ["Figure 1", "--layer", "--channel", "--num-batches", "--dataset"],
    }
    # Both at once: most of each run is importing detectron2.
    procs = {
        tool: subprocess.Popen(
            [sys.executable, str(TOOLS / f"{tool}.py"), "--help"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tool in expected
    }
    for tool, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        assert stdout.startswith("usage:")
        common = [f"python tools/{tool}.py", "--output", "--overwrite", "--width", "--dpi"]
        for text in expected[tool] + common:
            assert text in stdout, (tool, text)


def test_layers_are_grouped_by_stage_and_block():
    assert layer_group("backbone.stem.conv1.norm") == ("backbone.stem", None)
    assert layer_group("backbone.res2.0.shortcut.norm") == ("backbone.res2", "0")
    assert layer_group("backbone.res4.5.conv3.norm") == ("backbone.res4", "5")
    assert layer_group("roi_heads.res5.2.conv1.norm") == ("roi_heads.res5", "2")
    assert layer_group("backbone.bottom_up.stem.conv1.norm") == ("backbone.bottom_up.stem", None)
    assert layer_group("backbone.bottom_up.res3.1.conv2.norm") == ("backbone.bottom_up.res3", "1")
    assert layer_group("roi_heads.box_head.conv4.norm") == ("roi_heads.box_head", "conv4")
    assert layer_group("backbone.fpn_lateral2.norm") == ("backbone", None)
    assert layer_group("module.res2.bn") == ("module.res2", None)  # no block between
    assert checkpoint_labels(["out/b2/model_final.pth", "out/b8/model_final.pth"]) == ["b2", "b8"]
    assert checkpoint_labels(["x/model_0000099.pth", "a.pth"]) == ["x/model_0000099", "a"]
    assert checkpoint_labels(["x/a.pth", "y/a.pth"]) == ["x/a.pth", "y/a.pth"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny config and a checkpoint of its model: random affine, running statistics
    averaged over 4 training batches (as PreciseBN), alpha/beta from 6e-5 to 0.9 in network
    order. (cfg, path, {layer: (alpha, beta)})."""
    tmp_path = tmp_path_factory.mktemp("plots")
    cfg = tiny_cfg(tmp_path)
    model = randomize_batchnorm(build_model(cfg))
    layers = en_layers(model)
    momentum = layers[0][1].momentum
    for _, layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average
    model.train()
    with torch.no_grad(), EventStorage():
        for batch in itertools.islice(
            training_batches(cfg, Trainer.build_train_loader, norm_batch_sizes(cfg).images), 4
        ):
            model(batch)
    alphas = np.geomspace(6e-5, 0.9, len(layers))
    for (_, layer), alpha in zip(layers, alphas):
        layer.momentum = momentum
        layer.set_coefficients(float(alpha), float(alpha) / 2)
    path = tmp_path / "tiny_en.pth"
    torch.save({"model": model.state_dict(), "iteration": 2}, path)
    expected = {name: (layer.alpha.item(), layer.beta.item()) for name, layer in layers}
    return cfg, path, expected


def test_plot_alpha_beta_draws_every_checkpoint(tiny, tmp_path, capsys):
    _, path, expected = tiny
    coefficients = read_coefficients(str(path))
    assert list(coefficients) == list(expected)  # every layer, in network order
    for name, (alpha, beta) in coefficients.items():
        assert (alpha, beta) == pytest.approx(expected[name], rel=1e-6)
    # A second checkpoint, a bare state dict with other values.
    state_dict = torch.load(path, weights_only=True)["model"]
    for key in state_dict:
        if key.endswith("_logit"):
            state_dict[key] = state_dict[key] - 1.0
    other = tmp_path / "other.pth"
    torch.save(state_dict, other)
    assert read_coefficients(str(other)) != coefficients

    out = tmp_path / "figures" / "alpha_beta.png"
    argv = [str(path), str(other), "--output", str(out), "--width", "900", "--height", "500"]
    plot_alpha_beta.main([*argv, "--dpi", "80"])
    check_png(out, 900, 500, ["C0", "C1"])
    printed = capsys.readouterr().out
    assert f"tiny_en: {len(expected)} EvalNorm layers" in printed
    assert f"other: {len(expected)} EvalNorm layers" in printed

    plot_alpha_beta.main([str(path), "--label", "B = 2", "-o", str(out), "--overwrite"])
    check_png(out, 1400, 800, ["C0"])
    assert "B = 2: " in capsys.readouterr().out


def test_plot_alpha_beta_refuses_what_it_cannot_draw(tiny, tmp_path):
    _, path, _ = tiny
    plain = tmp_path / "plain_bn.pth"
    state_dict = torch.load(path, weights_only=True)["model"]
    torch.save({"model": {k: v for k, v in state_dict.items() if "_logit" not in k}}, plain)
    out = tmp_path / "figure.png"
    with pytest.raises(SystemExit) as excinfo:
        plot_alpha_beta.main([str(path), str(plain), "-o", str(out)])
    assert str(plain) in exit_message(excinfo) and "no EvalNorm alpha/beta" in exit_message(excinfo)
    assert not out.exists()

    out.write_bytes(b"keep me")
    with pytest.raises(SystemExit) as excinfo:
        plot_alpha_beta.main([str(path), "-o", str(out)])
    assert "exists; pass --overwrite" in exit_message(excinfo)
    assert out.read_bytes() == b"keep me"
    with pytest.raises(SystemExit) as excinfo:
        plot_alpha_beta.main([str(path), str(path), "-o", str(tmp_path / "f.png")])
    assert "distinct --label" in exit_message(excinfo)  # two checkpoints, one label
    with pytest.raises(SystemExit) as excinfo:
        plot_alpha_beta.main([str(path), "-o", str(tmp_path / "figure.jpg")])
    assert "*.png" in exit_message(excinfo)


def test_activations_are_normalized_three_ways_and_the_model_is_unchanged(tiny):
    cfg, path, _ = tiny
    model = Trainer.build_model(cfg)
    model.load_state_dict(torch.load(path, weights_only=True)["model"])
    model.eval()
    name, layer = en_layers(model)[10]
    channel = 3
    batches = list(
        itertools.islice(
            training_batches(cfg, Trainer.build_train_loader, norm_batch_sizes(cfg).images), 2
        )
    )
    inputs = []  # the layer's input channel, every forward: 2 training, 2 EMA, 2 EvalNorm
    layer.register_forward_hook(lambda m, x, y: inputs.append(x[0][:, channel].double()))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    values = normalized_activations(model, name, channel, batches)

    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats included
    assert not model.training and all(m.mode == "en" for _, m in en_layers(model))
    assert all(m.track_running_stats for _, m in en_layers(model))
    assert list(values) == ["train", "ema", "en"] and len(inputs) == 6
    # Independent float64 references from the layer's input, one per way of normalizing.
    eps, mean, var = layer.eps, layer.running_mean[channel].item(), layer.running_var[channel]
    alpha, beta = layer.alpha.item(), layer.beta.item()
    train = [(x - x.mean()) / (x.var(unbiased=False) + eps).sqrt() for x in inputs[:2]]
    ema = [(x - mean) / (var.item() + eps) ** 0.5 for x in inputs[2:4]]
    en = []
    for x in inputs[4:]:
        var_i, mu_i = torch.var_mean(x, dim=(1, 2), unbiased=False, keepdim=True)
        mu = alpha * mu_i + (1 - alpha) * mean
        v = beta * var_i + (1 - beta) * var.item() + beta * (1 - beta) * (mu_i - mean) ** 2
        en.append((x - mu) / (v + eps).sqrt())
    for mode, reference in (("train", train), ("ema", ema), ("en", en)):
        reference = torch.cat([r.flatten() for r in reference]).numpy()
        np.testing.assert_allclose(values[mode], reference, atol=2e-4, err_msg=mode)
    # The same images: as many values each way; EMA and EvalNorm differ.
    assert values["train"].size == values["ema"].size == values["en"].size > 0
    assert np.abs(values["en"] - values["ema"]).max() > 1e-3


def test_plot_activations_tool(tiny, tmp_path, capsys):
    cfg, path, _ = tiny
    config = tmp_path / "tiny.yaml"
    config.write_text(cfg.dump())
    out = tmp_path / "activations.png"
    common = ["--config-file", str(config), "-o", str(out)]
    weights = ["MODEL.WEIGHTS", str(path)]

    with pytest.raises(SystemExit) as excinfo:
        plot_activations.main([*common, "--layer", "backbone.nope", *weights])
    assert "backbone.nope" in exit_message(excinfo)
    assert "backbone.res2.0.conv1.norm, " in exit_message(excinfo)  # the valid names
    assert not out.exists()
    with pytest.raises(SystemExit) as excinfo:
        plot_activations.main([*common, "--channel", "100000", *weights])
    assert "channel 100000" in exit_message(excinfo)

    argv = [*common, "--num-batches", "2", "--width", "700", "--height", "400", "--dpi", "70"]
    plot_activations.main([*argv, *weights])
    check_png(out, 700, 400, ["C0", "C1", "C2"])
    printed = capsys.readouterr().out
    last_backbone = [n for n, _ in en_layers(build_model(cfg)) if n.startswith("backbone.")][-1]
    assert printed.startswith(f"{last_backbone}, channel 0: B = 2, 2 batches of 2 images")
    for label in ("training: batch statistics", "evaluation: EMA", "evaluation: EvalNorm"):
        assert label in printed
    assert "mean" in printed and "std" in printed

    out.write_bytes(b"keep me")
    with pytest.raises(SystemExit) as excinfo:
        plot_activations.main([*argv, *weights])
    assert "exists; pass --overwrite" in exit_message(excinfo)
    assert out.read_bytes() == b"keep me"
    # A box-head layer, random weights (MODEL.WEIGHTS ""), replacing the file.
    layer = ["--layer", "roi_heads.res5.0.conv1.norm", "--overwrite"]
    plot_activations.main([*argv, *layer, "MODEL.WEIGHTS", ""])
    check_png(out, 700, 400, ["C0", "C1", "C2"])
    assert "roi_heads.res5.0.conv1.norm, channel 0: B = 16" in capsys.readouterr().out

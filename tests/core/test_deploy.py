"""evalnorm.deploy: layers chosen as EMA from measured output changes, and folded."""

import copy
import math

import pytest
import torch
from helpers import randomize_batchnorm
from torch import nn

from evalnorm import EvalNorm2d, deploy, fold_ema_layers, output_change, select_ema_layers


def cnn(coefficients, dtype=torch.float32):
    """conv-EN-relu x len(coefficients) in an nn.Sequential, randomized statistics; layer i has
    alpha = beta = coefficients[i]."""
    torch.manual_seed(0)
    layers, c_in = [], 3
    for i, value in enumerate(coefficients):
        c = 4 + 2 * i
        layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=i % 2 == 1), EvalNorm2d(c), nn.ReLU()]
        c_in = c
    model = randomize_batchnorm(nn.Sequential(*layers)).to(dtype).eval()
    for m, value in zip([m for m in model if isinstance(m, EvalNorm2d)], coefficients):
        m.set_coefficients(value)
    return model


def batches(n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # Each image its own brightness and contrast, so per-sample statistics differ from the EMA.
    return [
        (torch.randn(2, 3, 10, 10, generator=g) * (1 + torch.rand(2, 1, 1, 1, generator=g)))
        .add(torch.randn(2, 1, 1, 1, generator=g))
        .to(dtype)
        for _ in range(n)
    ]


def en_layers(model):
    return [m for m in model.modules() if isinstance(m, EvalNorm2d)]


def test_output_change_is_the_largest_relative_l2_change():
    ref = {"a": torch.tensor([3.0, 4.0]), "b": [torch.ones(2)]}
    assert output_change(ref, copy.deepcopy(ref)) == 0.0
    out = {"a": torch.tensor([3.0, 4.5]), "b": [torch.ones(2)]}
    assert output_change(ref, out) == pytest.approx(0.5 / 5)
    assert output_change(torch.zeros(2), torch.tensor([0.0, 1.0])) == math.inf
    with pytest.raises(ValueError, match=r"shape \(3,\).*\(2,\).*fixed proposals"):
        output_change(torch.zeros(2), torch.zeros(3))
    with pytest.raises(TypeError, match="got str"):
        output_change(torch.zeros(2), "boxes")


def test_fold_ema_layers_matches_ema_evaluation_in_float64():
    model = cnn([0.3, 1e-4, 0.0], dtype=torch.float64)
    layers = en_layers(model)
    layers[1].mode = "ema"  # mode "ema"; layers[2] has alpha = beta = 0; layers[0] stays EN
    x = batches(1, seed=0, dtype=torch.float64)[0]
    with torch.no_grad():
        expected = model(x)
        folded = fold_ema_layers(copy.deepcopy(model))
        assert [type(m) for m in folded] == [
            nn.Conv2d, EvalNorm2d, nn.ReLU, nn.Conv2d, nn.Identity, nn.ReLU,
            nn.Conv2d, nn.Identity, nn.ReLU,
        ]  # fmt: skip
        torch.testing.assert_close(folded(x), expected, rtol=1e-12, atol=1e-12)
    assert folded[3].bias is not None and folded[6].bias is not None  # the EMA shift


def test_fold_ema_layers_converts_what_it_cannot_fold_and_refuses_training():
    class Block(nn.Module):  # torchvision's style: the order lives in forward(), not the tree
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), EvalNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x))

    block = randomize_batchnorm(Block()).eval()
    x = torch.randn(2, 3, 5, 5)
    expected = block(x)
    folded = fold_ema_layers(block)
    assert type(folded.bn) is nn.BatchNorm2d
    torch.testing.assert_close(folded(x), expected)
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        fold_ema_layers(Block().train())


def test_deploy_keeps_large_corrections_and_bounds_held_out_outputs():
    # Layer 0 corrects a lot (B = 2: 1/B^2 = 0.25); the others as a box head (1/B^2 ~ 1e-4).
    model = cnn([0.25, 1e-4, 6e-5, 1e-4])
    tolerance = 1e-3
    deployed, report = deploy(copy.deepcopy(model), batches(3, seed=0), tolerance)
    assert [row["ema"] for row in report["layers"]] == [False, True, True, True]
    assert report["layers"][0]["layer_change"] > 100 * tolerance
    assert 0 < report["change"] <= tolerance
    assert [type(m) for m in deployed].count(EvalNorm2d) == 1
    assert [type(m) for m in deployed].count(nn.Identity) == 3
    with torch.no_grad():
        for x in batches(4, seed=1):  # held out
            assert output_change(model(x), deployed(x)) <= tolerance
        all_ema = copy.deepcopy(model)
        for m in en_layers(all_ema):
            m.mode = "ema"
        assert output_change(model(x), all_ema(x)) > 5 * tolerance  # EMA everywhere is not


def test_layers_fine_alone_but_not_together_are_bisected():
    model = cnn([0.02, 0.02, 0.02, 0.02])
    data = batches(2, seed=0)

    def run(m, x):  # the last layer's output about its bias: the changes add up there
        return m[:-1](x) - m[-2].bias[:, None, None]

    changes = [row["layer_change"] for row in select_ema_layers(model, data, 1e9, run)["layers"]]
    tolerance = max(changes) * 1.001  # every layer alone is within it
    report = select_ema_layers(model, data, tolerance, run)
    assert report["checks"][0]["layers"] == 4
    assert report["checks"][0]["change"] > tolerance  # together they are not
    assert len(report["checks"]) > 1 and report["change"] <= tolerance
    kept = [row["layer_change"] for row in report["layers"] if not row["ema"]]
    folded = [row["layer_change"] for row in report["layers"] if row["ema"]]
    assert kept and folded and min(kept) >= max(folded)  # the largest changes are kept
    unfolded, _ = deploy(copy.deepcopy(model), data, tolerance, run, fold=False)
    with torch.no_grad():
        assert max(output_change(run(model, x), run(unfolded, x)) for x in data) <= tolerance


def test_selection_leaves_the_model_as_it_was_and_deploy_records_the_choice():
    model = cnn([0.25, 1e-4]).train()
    en_layers(model)[1].mode = "rule_of_thumb"
    en_layers(model)[1].norm_batch_size = 128
    state = copy.deepcopy(model.state_dict())
    select_ema_layers(model, batches(1, seed=0), 1e-3)
    assert model.training and [m.mode for m in en_layers(model)] == ["en", "rule_of_thumb"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())

    model.eval()
    unfolded, report = deploy(copy.deepcopy(model), batches(1, seed=0), 1e-3, fold=False)
    assert [row["ema"] for row in report["layers"]] == [False, True]
    layer = en_layers(unfolded)[1]
    assert layer.alpha.item() == layer.beta.item() == 0.0  # saved in the state dict
    reloaded = copy.deepcopy(model)
    reloaded.load_state_dict(unfolded.state_dict())
    en_layers(reloaded)[1].mode = "en"  # as a freshly built model evaluates: alpha = beta = 0
    folded = fold_ema_layers(reloaded)
    x = batches(1, seed=2)[0]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), unfolded(x))


def test_bad_arguments_are_named():
    model = cnn([0.1])
    for bad in (-1e-3, math.inf, math.nan, True, "1e-3"):
        with pytest.raises(ValueError, match="tolerance"):
            select_ema_layers(model, batches(1, seed=0), bad)
    with pytest.raises(ValueError, match="at least one calibration batch"):
        select_ema_layers(model, [], 1e-3)
    with pytest.raises(ValueError, match="no EvalNorm2d"):
        select_ema_layers(nn.Sequential(nn.Conv2d(3, 3, 1)), batches(1, seed=0), 1e-3)

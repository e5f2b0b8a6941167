"""The coefficient sweeps of ``evalnorm.diagnosis`` on a converted torchvision ResNet-18."""

import copy

import pytest
import torch
import torchvision
from helpers import randomize_batchnorm

from evalnorm import EvalNorm2d, convert_to_evalnorm, evalnorm_mode
from evalnorm.diagnosis import (
    calibrate_coefficients,
    coefficient_sweep,
    evalnorm_only_in,
    fixed_coefficients,
    format_sweep,
    layer_groups,
    scaled_coefficients,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = randomize_batchnorm(torchvision.models.resnet18(num_classes=10))
    net = convert_to_evalnorm(net, norm_batch_size=2).eval()
    for i, m in enumerate(m for m in net.modules() if isinstance(m, EvalNorm2d)):
        m.set_coefficients(0.02 + 0.01 * i, 0.5 - 0.02 * i)  # every layer its own
    return net


def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [
        m.mode for m in model.modules() if isinstance(m, EvalNorm2d)
    ]


def assert_unchanged(model, before):
    after = state(model)
    assert after[1] == before[1]
    for k, v in before[0].items():
        assert torch.equal(after[0][k], v), k


@torch.no_grad()
def test_scaling_by_0_is_ema_and_by_1_is_en(model):
    before, x = state(model), images()
    with evalnorm_mode(model, "ema"):
        ema = model(x)
    with evalnorm_mode(model, "en"):
        en = model(x)
    with scaled_coefficients(model, 0.0):
        torch.testing.assert_close(model(x), ema, rtol=0, atol=0)
    with scaled_coefficients(model, 1.0):
        torch.testing.assert_close(model(x), en, rtol=1e-6, atol=1e-6)
    with scaled_coefficients(model, 2.0):
        layers = [m for m in model.modules() if isinstance(m, EvalNorm2d)]
        assert layers[3].alpha.item() == pytest.approx(2 * 0.05, rel=1e-6)
        assert layers[0].beta.item() == pytest.approx(1.0)  # 2 x 0.5, capped at 1
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="factor must be"):
        scaled_coefficients(model, -1).__enter__()


@torch.no_grad()
def test_evalnorm_only_in_one_stage(model):
    before, x = state(model), images()
    with evalnorm_only_in(model, ["layer3"]):
        modes = {n: m.mode for n, m in model.named_modules() if isinstance(m, EvalNorm2d)}
        mixed = model(x)
    assert {n for n, mode in modes.items() if mode == "en"} == {
        n for n in modes if n.startswith("layer3.")
    }
    assert set(modes.values()) == {"en", "ema"}
    # Up to layer3 the network is the EMA one: layer2's output is unchanged.
    with evalnorm_mode(model, "ema"):
        ema = model(x)
    assert not torch.allclose(mixed, ema)
    with evalnorm_only_in(model, []):
        torch.testing.assert_close(model(x), ema, rtol=0, atol=0)
    with evalnorm_only_in(model, ["bn1"]):  # a layer by its own name; not bn1 inside blocks
        assert sum(m.mode == "en" for m in model.modules() if isinstance(m, EvalNorm2d)) == 1
    assert_unchanged(model, before)


def test_layer_groups_follow_the_network(model):
    assert list(layer_groups(model)) == ["bn1", "layer1", "layer2", "layer3", "layer4"]
    assert layer_groups(model)["layer2"] == ["layer2"]
    assert list(layer_groups(model, depth=2))[:3] == ["bn1", "layer1.0", "layer1.1"]


@torch.no_grad()
def test_sweep_calls_evaluate_once_per_setting_and_restores(model):
    before, x = state(model), images()
    with evalnorm_mode(model, "ema"):
        ema = model(x)

    def evaluate(m):  # a score: how far the logits move from EMA's
        return (m(x) - ema).abs().mean().item()

    rows = coefficient_sweep(model, evaluate, values=(0.0, 1.0), factors=(0.0, 1.0))
    assert [(r["sweep"], r["setting"]) for r in rows] == [
        ("ema", ""),
        ("en", ""),
        ("rule_of_thumb", "1/B^2"),
        ("fixed", 0.0),
        ("fixed", 1.0),
        ("scaled", 0.0),
        ("scaled", 1.0),
        ("group", "bn1"),
        ("group", "layer1"),
        ("group", "layer2"),
        ("group", "layer3"),
        ("group", "layer4"),
    ]
    score = {(r["sweep"], r["setting"]): r["score"] for r in rows}
    assert score["ema", ""] == score["fixed", 0.0] == score["scaled", 0.0] == 0.0
    assert score["scaled", 1.0] == pytest.approx(score["en", ""], abs=1e-6)
    assert score["fixed", 1.0] > score["en", ""] > 0
    assert_unchanged(model, before)
    text = format_sweep(rows, "logit change")
    assert text.splitlines()[0].split() == ["sweep", "setting", "logit", "change", "-", "EMA"]
    assert len(text.splitlines()) == len(rows) + 1


def test_fixed_coefficients_refuse_a_model_without_evalnorm():
    with pytest.raises(ValueError, match="no EvalNorm2d layer"):
        fixed_coefficients(torch.nn.BatchNorm2d(3), 0.5).__enter__()


def test_sweep_leaves_no_trace_on_a_copy(model):
    copied = copy.deepcopy(model)
    coefficient_sweep(copied, lambda m: 0.0, values=(), factors=(0.5,), groups={})
    for a, b in zip(model.state_dict().values(), copied.state_dict().values()):
        assert torch.equal(a, b)


@torch.no_grad()
def test_calibration_keeps_the_best_scaling_on_validation(model):
    net, x = copy.deepcopy(model), images()
    with evalnorm_mode(net, "en"):
        en = net(x)
    target = 0.5  # the score peaks where the logits sit halfway between EMA and EN

    def evaluate(m):
        with evalnorm_mode(m, "ema"):
            ema = m(x)
        return -((m(x) - ema) - target * (en - ema)).abs().mean().item()

    layers = [m for m in net.modules() if isinstance(m, EvalNorm2d)]
    estimated = [(m.alpha.item(), m.beta.item()) for m in layers]
    result = calibrate_coefficients(net, evaluate, factors=(1.0, 0.0, 0.5, 0.75))
    assert result["factor"] == 0.5
    assert [f for f, _ in result["scores"]] == [0.0, 0.5, 0.75, 1.0]
    assert max(result["scores"], key=lambda fs: fs[1])[0] == 0.5
    for m, (alpha, beta) in zip(layers, estimated):  # applied for good
        assert m.alpha.item() == pytest.approx(0.5 * alpha, rel=1e-6)
        assert m.beta.item() == pytest.approx(0.5 * beta, rel=1e-6)


def test_calibration_ties_go_towards_ema_and_nan_ranks_last(model):
    net = copy.deepcopy(model)
    scores = iter([float("nan"), 3.0, 3.0])  # factors 0, 0.5, 1 in turn
    result = calibrate_coefficients(net, lambda m: next(scores), factors=(1.0, 0.5, 0.0))
    assert result["factor"] == 0.5
    flat = iter([1.0, 1.0])
    result = calibrate_coefficients(net, lambda m: next(flat), factors=(0.0, 1.0))
    assert result["factor"] == 0.0
    assert all(
        m.alpha.item() == 0 and m.beta.item() == 0
        for m in net.modules()
        if isinstance(m, EvalNorm2d)
    )
    with pytest.raises(ValueError, match="factors is empty"):
        calibrate_coefficients(net, lambda m: 0.0, factors=())

"""Regime (c)'s readings (MODEL.EVALNORM.FROZEN_EN) and the evaluation-side peer rows
(prediction-time BN, example weighing, PreciseBN over microbatch groups, PreciseBN + EN
offline), each against a float64 or torch.nn.BatchNorm2d reference on tiny models."""

import numpy as np
import pytest
import torch
from detection_helpers import tiny_cfg
from detectron2.modeling import build_model
from helpers import class_images, randomize_batchnorm, reference_evalnorm, reference_statistics
from torch import nn

from evalnorm import OnlineEstimator
from evalnorm_det import EvalNorm2d
from evalnorm_det.config import TABLE_ROWS, check_evalnorm_config
from evalnorm_det.engine.evaluation import (
    fixed_coefficients,
    precise_statistics,
    row_evaluation,
)
from evalnorm_det.modeling import freeze_norms

EPS = 1e-5


def frozen_layer(frozen_en, channels=3, seed=0, **kwargs):
    layer = EvalNorm2d(channels, frozen=True, frozen_en=frozen_en, init=0.5, **kwargs)
    return randomize_batchnorm(layer, seed)


def maps(n=4, c=3, size=8, seed=0):
    """Maps whose samples differ in mean and scale, so batch and frozen statistics differ."""
    g = torch.Generator().manual_seed(seed)
    gain = torch.rand(n, c, 1, 1, generator=g) * 2 + 0.5
    return torch.randn(n, c, size, size, generator=g) * gain + torch.randn(n, c, 1, 1, generator=g)


def reference_loss(x, mu_t, var_t, mu_e, var_e, alpha, beta):
    """mean |(x - mu_t) / sqrt(var_t + eps) - EvalNorm's normalization| in float64, the target
    statistics (mu_t, var_t) per channel."""
    x = x.double().numpy()
    total, count = 0.0, 0
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            mu, var = reference_statistics(x[i, c], mu_e[c], var_e[c], alpha, beta)
            target = (x[i, c] - float(mu_t[c])) / np.sqrt(float(var_t[c]) + EPS)
            total += np.abs(target - (x[i, c] - mu) / np.sqrt(var + EPS)).sum()
            count += x[i, c].size
    return total / count


def test_frozen_target_is_the_frozen_normalization_and_alpha_beta_go_to_zero():
    """(i): training normalizes with the frozen statistics, the auxiliary loss's target is that
    normalization (float64 reference), so estimation drives alpha and beta to ~0 (EMA), where
    the loss vanishes. "batch_target" fits against the batch statistics instead."""
    layer = frozen_layer("frozen_target").train()
    mu_e, var_e = layer.running_mean.clone(), layer.running_var.clone()
    x = maps()
    layer.estimate_online = True
    y = layer(x)
    expected = (x.double() - mu_e.double()[:, None, None]) / (var_e.double() + EPS).sqrt()[
        :, None, None
    ]
    expected = expected * layer.weight.double()[:, None, None] + layer.bias.double()[:, None, None]
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    a, b = layer.alpha.item(), layer.beta.item()
    want = reference_loss(x, mu_e, var_e, mu_e, var_e, a, b)
    assert layer.last_aux_loss.item() == pytest.approx(want, rel=1e-4)
    batch = frozen_layer("batch_target").train()
    batch.estimate_online = True
    batch(x)
    mu_b, var_b = x.double().mean((0, 2, 3)), x.double().var((0, 2, 3), unbiased=False)
    want_batch = reference_loss(x, mu_b, var_b, mu_e, var_e, a, b)
    assert batch.last_aux_loss.item() == pytest.approx(want_batch, rel=1e-4)
    assert abs(want_batch - want) > 1e-3

    estimator = OnlineEstimator(layer, lr=0.5)
    for step in range(40):
        layer(maps(seed=step))
        estimator.step()
    assert layer.alpha.item() < 1e-3 and layer.beta.item() < 1e-3  # from 0.5
    layer(x)
    assert layer.last_aux_loss.item() < 0.01 * want  # 0 at alpha = beta = 0
    assert torch.equal(layer.running_mean, mu_e) and torch.equal(layer.running_var, var_e)


@pytest.mark.parametrize("microbatch", [False, True])
def test_batch_stats_trains_as_batchnorm_with_frozen_ema_and_affine(microbatch):
    """(ii): the training output is BatchNorm2d's in train mode (on each group of 2 with
    microbatch), while the running statistics and the affine never change and get no grad."""
    torch.manual_seed(0)
    kwargs = {"norm_batch_size": 2, "microbatch": True} if microbatch else {}
    conv = nn.Conv2d(3, 3, 3, padding=1)
    layer = frozen_layer("batch_stats", **kwargs).train()
    reference = nn.BatchNorm2d(3).train()
    reference.load_state_dict(layer.state_dict(), strict=False)
    frozen = {k: v.clone() for k, v in layer.state_dict().items()}
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    layer.estimate_online = True
    estimator = OnlineEstimator(layer, lr=0.05)
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.1)
    for step in range(3):
        h = conv(maps(seed=step))
        y = layer(h)
        groups = h.detach().split(2) if microbatch else [h.detach()]
        expected = torch.cat([reference(g) for g in groups])
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
        y.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        estimator.step()
        assert layer.weight.grad is None and layer.bias.grad is None
    for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(layer.state_dict()[key], frozen[key]), key
    assert not torch.equal(layer.alpha_logit, frozen["alpha_logit"])  # estimated meanwhile
    layer.eval()
    with torch.no_grad():
        x = maps(seed=9)
        layer.mode = "ema"  # evaluation: the frozen (ImageNet) statistics
        expected = nn.functional.batch_norm(
            x, frozen["running_mean"], frozen["running_var"], frozen["weight"], frozen["bias"]
        )
        torch.testing.assert_close(layer(x), expected)


def test_frozen_en_config_key(tmp_path):
    cfg = tiny_cfg(tmp_path, "MODEL.EVALNORM.FROZEN_EN", "batch_statistics")
    with pytest.raises(ValueError, match="MODEL.EVALNORM.FROZEN_EN='batch_statistics'"):
        check_evalnorm_config(cfg, 1)
    with pytest.raises(ValueError, match="frozen_en must be one of"):
        EvalNorm2d(3, frozen=True, frozen_en="frozen")
    for value in ("batch_target", "frozen_target", "batch_stats"):
        opts = ["MODEL.EVALNORM.FROZEN_EN", value, "MODEL.EVALNORM.BACKBONE_NORM", "FrozenEN"]
        model = build_model(tiny_cfg(tmp_path, *opts))
        layers = [m for m in model.backbone.modules() if isinstance(m, EvalNorm2d)]
        assert layers and all(m.frozen and m.frozen_en == value for m in layers)
        head = [m for m in model.roi_heads.modules() if isinstance(m, EvalNorm2d)]
        assert head and not any(m.frozen for m in head)  # ROI_HEAD_NORM is EN
    # a stage frozen by FREEZE_AT normalizes with its frozen statistics
    freeze_norms(layers[0])
    assert layers[0].frozen_en == "batch_target"


def en_cnn(microbatch=False, seed=0):
    torch.manual_seed(seed)
    norm = lambda c: EvalNorm2d(c, norm_batch_size=2, microbatch=microbatch)
    return randomize_batchnorm(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), norm(4)), seed)


def test_precise_statistics_averages_every_microbatch_group():
    """Population statistics over every group of 2 of every batch of 8 (float64 reference):
    the mean of the group means and of the groups' unbiased variances. A frozen layer that
    normalizes with its frozen statistics is left as it is; one on batch statistics is not."""
    model = en_cnn(microbatch=True)
    batches = [class_images(8, seed=s)[0] for s in range(3)]
    conv = model[0]
    with torch.no_grad():
        groups = [conv(b).double() for batch in batches for b in batch.split(2)]
    mean = torch.stack([g.mean((0, 2, 3)) for g in groups]).mean(0)
    var = torch.stack([g.var((0, 2, 3), unbiased=True) for g in groups]).mean(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert precise_statistics(model, iter(batches), 3) == 1
    torch.testing.assert_close(model[1].running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])
    with pytest.raises(ValueError, match="3 batches needed, the data gave 2"):
        precise_statistics(model, iter(batches[:2]), 3)

    for frozen_en, changed in (("batch_target", False), ("batch_stats", True)):
        model = en_cnn(microbatch=True)
        model[1].frozen, model[1].frozen_en = True, frozen_en
        stats = model[1].running_mean.clone()
        precise_statistics(model, iter(batches), 3)
        assert torch.equal(model[1].running_mean, stats) != changed, frozen_en


def test_prediction_time_bn_and_example_weighing_use_one_coefficient():
    """prediction-time BN: alpha = beta = 1, each sample normalized by its own statistics
    (instance norm with the layer's affine); example weighing: alpha = beta = w everywhere
    (float64 reference). Coefficients and modes restored on exit."""
    model = en_cnn().eval()
    layer = model[1]
    layer.set_coefficients(0.3, 0.7)
    x = class_images(3, seed=4)[0]
    with torch.no_grad():
        h = model[0](x)
        with row_evaluation(model, "prediction_time_bn"):
            assert layer.alpha.item() == 1.0 and layer.beta.item() == 1.0
            y = model(x)
        expected = nn.functional.instance_norm(
            h.double(), weight=layer.weight.double(), bias=layer.bias.double(), eps=EPS
        )
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
        with fixed_coefficients(model, 0.1):
            y = model(x)
        args = (layer.running_mean, layer.running_var, layer.weight, layer.bias, 0.1, 0.1, EPS)
        expected = reference_evalnorm(h.numpy(), *(torch.as_tensor(a).numpy() for a in args))
        np.testing.assert_allclose(y.double().numpy(), expected, rtol=1e-5, atol=1e-5)
    assert layer.alpha.item() == pytest.approx(0.3) and layer.beta.item() == pytest.approx(0.7)
    assert layer.mode == "en"
    assert "prediction_time_bn" in TABLE_ROWS and "precise_bn_en_offline" in TABLE_ROWS


def test_precise_bn_then_en_offline():
    """The mode recomputes the statistics as "precise_bn", then fits alpha/beta offline on those
    statistics; everything is restored on exit."""
    model = en_cnn(microbatch=True).eval()
    batches = [class_images(2, seed=s)[0] for s in range(6)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = {}
    with row_evaluation(
        model, "precise_bn", train_batches=lambda: iter(batches), precise_bn_iters=3
    ):
        expected["mean"] = model[1].running_mean.clone()
    calls = []

    def offline(m, data):
        calls.append((m[1].running_mean.clone(), len(list(data))))
        m[1].set_coefficients(0.42)

    with row_evaluation(
        model,
        "precise_bn_en_offline",
        train_batches=lambda: iter(batches),
        estimate_offline=offline,
        precise_bn_iters=3,
    ):
        torch.testing.assert_close(model[1].running_mean, expected["mean"])
        assert model[1].alpha.item() == pytest.approx(0.42) and model[1].mode == "en"
    assert torch.equal(calls[0][0], expected["mean"]) and calls[0][1] == 6
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key

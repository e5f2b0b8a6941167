"""Evaluation: eqs. 5-6 against float64 references, and their limits (BN eval, per-sample)."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_batchnorm, reference_evalnorm
from torch import nn

from evalnorm import EvalNorm2d, evalnorm_mode


def make_layer(c=5, dtype=torch.float32, seed=0, **kwargs):
    return randomize_batchnorm(EvalNorm2d(c, **kwargs), seed).to(dtype).eval()


def random_input(shape=(3, 5, 6, 7), seed=1, dtype=torch.float32, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    # Per-sample offsets and scales make the samples' statistics differ from the EMA's.
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = x * (torch.rand(shape[0], shape[1], 1, 1, generator=g, dtype=torch.float64) * 2 + 0.3)
    x = x + torch.randn(shape[0], shape[1], 1, 1, generator=g, dtype=torch.float64)
    return (x * scale + shift).to(dtype)


def layer_reference(layer, x, alpha, beta):
    return reference_evalnorm(
        x.double().numpy(),
        layer.running_mean.double().numpy(),
        layer.running_var.double().numpy(),
        layer.weight.detach().double().numpy(),
        layer.bias.detach().double().numpy(),
        alpha,
        beta,
        layer.eps,
    )


# Evaluation has two paths: elementwise under autograd (so gradients reach alpha/beta), and
# BatchNorm's evaluation kernel on per-sample statistics without it (inference).
GRAD = pytest.mark.parametrize("grad", [True, False], ids=["autograd", "inference"])


@GRAD
@pytest.mark.parametrize(
    "alpha,beta", [(0.0, 0.0), (0.25, 0.25), (0.7, 0.1), (0.05, 0.9), (1.0, 1.0), (1.0, 0.0)]
)
def test_float64_matches_reference(alpha, beta, grad):
    layer = make_layer(dtype=torch.float64)
    layer.set_coefficients(alpha, beta)
    x = random_input(dtype=torch.float64)
    expected = layer_reference(layer, x, layer.alpha.item(), layer.beta.item())
    with torch.set_grad_enabled(grad):
        y = layer(x)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-12, atol=1e-12)


@GRAD
@pytest.mark.parametrize("alpha,beta", [(0.25, 0.25), (0.7, 0.1)])
def test_float32_matches_float64_reference(alpha, beta, grad):
    # Outputs are O(1); a handful of float32 operations per element keeps errors near 1e-6.
    layer = make_layer()
    layer.set_coefficients(alpha, beta)
    x = random_input()
    expected = layer_reference(layer, x, alpha, beta)
    with torch.set_grad_enabled(grad):
        y = layer(x)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-5, atol=1e-5)


@GRAD
def test_float32_far_from_zero_with_tiny_variances(grad):
    # Activations near 50 that vary by ~0.01 within a sample, normalized by their own
    # statistics: float32 stores x to ~3e-6, which 1/sqrt(var_hat + eps) (~100) scales to
    # ~3e-4 on O(1) outputs, whether the mean is subtracted first or folded into a shift.
    layer = make_layer()
    layer.set_coefficients(0.9, 0.9)
    x = random_input(scale=0.01, shift=50.0)
    expected = layer_reference(layer, x, layer.alpha.item(), layer.beta.item())
    with torch.set_grad_enabled(grad):
        y = layer(x)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=0, atol=2e-3)


def test_coefficients_zero_is_batchnorm_eval():
    layer = make_layer()
    bn = nn.BatchNorm2d(5).eval()
    bn.load_state_dict({k: v for k, v in layer.state_dict().items() if "logit" not in k})
    layer.set_coefficients(0.0, 0.0)
    x = random_input()
    torch.testing.assert_close(layer(x), bn(x), rtol=1e-6, atol=1e-6)
    with evalnorm_mode(layer, "ema"):
        assert torch.equal(layer(x), bn(x))  # the same computation, bit for bit


def test_coefficients_one_is_per_sample_normalization():
    layer = make_layer()
    layer.set_coefficients(1.0, 1.0)
    x = random_input()
    expected = F.instance_norm(x, weight=layer.weight, bias=layer.bias, eps=layer.eps)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_modes_use_rules_of_batch_size():
    layer = make_layer(norm_batch_size=4)
    layer.set_coefficients(0.6, 0.3)
    x = random_input()
    outputs = {}
    for mode in ("en", "ema", "rule_of_thumb", "simple"):
        with evalnorm_mode(layer, mode):
            outputs[mode] = layer(x)
    assert layer.mode == "en"
    for mode, value in (("rule_of_thumb", 1 / 16), ("simple", 1 / 4)):
        expected = layer_reference(layer, x, value, value)
        np.testing.assert_allclose(outputs[mode].detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        outputs["en"].detach().numpy(), layer_reference(layer, x, 0.6, 0.3), rtol=1e-5, atol=1e-5
    )
    assert not torch.allclose(outputs["en"], outputs["ema"])


def test_set_coefficients_rules_and_readouts():
    layer = EvalNorm2d(3, norm_batch_size=4)
    assert layer.alpha.item() == pytest.approx(1 / 16) and layer.beta.item() == pytest.approx(
        1 / 16
    )
    layer.set_coefficients("simple")
    assert layer.alpha.item() == pytest.approx(1 / 4)
    layer.set_coefficients(0.3, "rule_of_thumb")
    assert layer.alpha.item() == pytest.approx(0.3) and layer.beta.item() == pytest.approx(1 / 16)
    layer.set_coefficients("ema")
    assert layer.alpha.item() == 0.0 and layer.beta.item() == 0.0
    layer.set_coefficients(torch.tensor(1.0))
    assert layer.alpha.item() == 1.0
    assert EvalNorm2d(3).alpha.item() == 0.0  # B unknown: evaluation is BatchNorm2d's
    assert EvalNorm2d(3, init=0.5).beta.item() == pytest.approx(0.5)


def test_half_precision_inputs_use_float32_statistics():
    layer = make_layer()
    layer.set_coefficients(0.25)
    x = random_input(scale=300.0, shift=1000.0)  # beyond float16's precision for the variance
    expected = layer_reference(layer, x.half().float(), 0.25, 0.25)
    for dtype, tol in ((torch.float16, 2e-2), (torch.bfloat16, 1e-1)):
        y = layer(x.to(dtype))
        assert y.dtype == dtype and torch.isfinite(y).all()
        np.testing.assert_allclose(y.detach().float().numpy(), expected, rtol=tol, atol=tol)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.to(torch.bfloat16))
    assert torch.isfinite(y).all()
    np.testing.assert_allclose(y.detach().float().numpy(), expected, rtol=1e-1, atol=1e-1)


def test_batch_mode_is_batchnorm_training_without_updating_statistics():
    layer = make_layer()
    layer.mode = "batch"
    bn = nn.BatchNorm2d(5).train()
    bn.load_state_dict({k: v for k, v in layer.state_dict().items() if "logit" not in k})
    before = layer.state_dict()
    x = random_input()
    assert torch.equal(layer(x), bn(x))
    after = layer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "shape,block",
    [((3, 5, 6, 7), 1 << 20), ((3, 5, 6, 7), 64), ((3, 5, 6, 7), 1), ((2, 3, 1, 1), 4)],
    ids=["one-block", "blocks", "row-per-block", "1x1"],
)
def test_cpu_sample_statistics_match_float64_and_batchnorm_kernel(monkeypatch, shape, block):
    """The CPU path (two passes over blocks of rows) against float64 and against BatchNorm's
    own statistics kernel, which other devices use, far from zero (where one-pass sums of
    squares in float32 would lose the variance)."""
    from evalnorm import functional as EF

    monkeypatch.setattr(EF, "_CPU_BLOCK_ELEMENTS", block)
    x = random_input(shape, scale=0.01, shift=100.0)
    mean, var = EF.sample_statistics(x)
    x64 = x.double().flatten(2)
    torch.testing.assert_close(mean.double(), x64.mean(2), rtol=1e-6, atol=0)
    # The float32 mean of values ~ 100 is off by ~1e-5, 1e-3 of a std of 0.01: the centered
    # squares' mean stays within ~1e-5 of the variance (measured: 6.5e-6; the kernel: 7e-7).
    torch.testing.assert_close(var.double(), x64.var(2, correction=0), rtol=3e-5, atol=0)
    n, c, h, w = shape
    kernel = torch.batch_norm_update_stats(x.reshape(1, n * c, h, w), None, None, 1.0)
    torch.testing.assert_close(mean, kernel[0].view(n, c))
    torch.testing.assert_close(var, kernel[1].view(n, c), rtol=3e-5, atol=0)


@pytest.mark.parametrize(
    "dtype,layout",
    [
        (torch.float32, "contiguous"),
        (torch.float64, "contiguous"),
        (torch.float16, "contiguous"),
        (torch.float32, "strided"),
    ],
)
def test_inplace_inference_writes_the_same_output_over_the_input(dtype, layout):
    layer = make_layer(dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    layer.set_coefficients(0.3, 0.6)
    base = random_input((3, 5, 6, 14), dtype=dtype)
    x = base if layout == "contiguous" else base[..., ::2]  # (3, 5, 6, 7), not contiguous
    with torch.no_grad():
        expected = layer(x)
        layer.inplace = True
        y = layer(x)
    assert y is x
    assert y.dtype == dtype and torch.equal(y, expected)
    if layout == "strided":  # only the view's elements were written
        torch.testing.assert_close(base[..., 1::2], random_input((3, 5, 6, 14))[..., 1::2])


def test_inplace_leaves_the_input_alone_with_autograd_hooks_ema_and_tracing():
    layer = make_layer(inplace=True)
    layer.set_coefficients(0.3, 0.6)
    x = random_input()
    original = x.clone()
    with torch.no_grad():
        expected = layer(x.clone())
    assert layer(x) is not x  # autograd on: alpha/beta may need the input
    seen = []
    handle = layer.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].clone()))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    handle.remove()
    torch.testing.assert_close(seen[0], original, rtol=0, atol=0)  # the hook saw the input
    with torch.no_grad(), evalnorm_mode(layer, "ema"):
        layer(x)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace's deprecation
        traced = torch.jit.trace(layer, x)
    torch.testing.assert_close(x, original, rtol=0, atol=0)
    torch.testing.assert_close(traced(x.clone()), expected, rtol=1e-6, atol=1e-6)
    assert "inplace=True" in repr(layer)

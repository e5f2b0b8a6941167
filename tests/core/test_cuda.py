"""The layer on CUDA: evaluation (eqs. 5-6) and online estimation (eqs. 7-9) against the
float64 references, training against ``torch.nn.BatchNorm2d`` on the same device. Skipped
without CUDA; ``pytest -m cuda`` (and ``make gpu-check``) runs every CUDA test."""

import numpy as np
import pytest
import torch
from helpers import assert_reference_gradient, randomize_batchnorm, reference_evalnorm
from torch import nn

from evalnorm import EvalNorm2d

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def varied_input(shape, seed, dtype=torch.float64):
    """Samples with offsets and scales of their own, so EN's statistics differ from the EMA's."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = x * (torch.rand(*shape[:2], 1, 1, generator=g, dtype=torch.float64) * 2 + 0.3)
    return (x + torch.randn(*shape[:2], 1, 1, generator=g, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "inference"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_evaluation_matches_float64_reference(grad, dtype, tol):
    # float32: outputs are O(1) after a handful of operations per element (as on CPU).
    layer = randomize_batchnorm(EvalNorm2d(5), seed=0).to("cuda", dtype).eval()
    layer.set_coefficients(0.7, 0.1)
    x = varied_input((3, 5, 6, 7), seed=1)
    expected = reference_evalnorm(
        x.numpy(),
        *(t.detach().double().cpu().numpy() for t in (layer.running_mean, layer.running_var)),
        *(t.detach().double().cpu().numpy() for t in (layer.weight, layer.bias)),
        layer.alpha.item(),
        layer.beta.item(),
        layer.eps,
    )
    with torch.set_grad_enabled(grad):
        y = layer(x.to("cuda", dtype))
    np.testing.assert_allclose(y.detach().double().cpu().numpy(), expected, rtol=tol, atol=tol)


def test_inplace_inference_writes_the_same_output_over_the_input():
    layer = randomize_batchnorm(EvalNorm2d(5), seed=0).cuda().eval()
    layer.set_coefficients(0.7, 0.1)
    x = varied_input((3, 5, 6, 7), seed=1, dtype=torch.float32).cuda()
    with torch.no_grad():
        expected = layer(x)
        layer.inplace = True
        y = layer(x)
    assert y is x and torch.equal(y, expected)


@pytest.mark.parametrize("norm_batch_size,microbatch", [(None, False), (2, True)])
def test_online_gradient_matches_finite_differences(norm_batch_size, microbatch):
    layer = EvalNorm2d(3, norm_batch_size=norm_batch_size or 4, microbatch=microbatch)
    layer = randomize_batchnorm(layer).double().cuda()
    layer.set_coefficients(0.3, 0.6)
    layer.estimate_online = True
    x = varied_input((4, 3, 5, 6), seed=3)
    mean, var = (t.cpu().numpy().copy() for t in (layer.running_mean, layer.running_var))
    layer(x.cuda())
    grad = layer.take_aux_grad().cpu().numpy()
    assert_reference_gradient(layer, grad, x, mean, var, group_size=norm_batch_size)
    assert np.abs(grad).min() > 1e-4


@pytest.mark.parametrize("estimate_online", [False, True])
def test_training_is_batchnorm_bitwise(estimate_online):
    en = randomize_batchnorm(EvalNorm2d(6)).cuda()
    bn = nn.BatchNorm2d(6).cuda()
    bn.load_state_dict({k: v for k, v in en.state_dict().items() if "logit" not in k})
    en.estimate_online = estimate_online
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = (torch.randn(2, 6, 9, 7, generator=g) * 3 + 1).cuda()
        upstream = torch.randn(2, 6, 9, 7, generator=g).cuda()
        outputs = []
        for layer in (en, bn):
            xi = x.clone().requires_grad_()
            y = layer(xi)
            y.backward(upstream)
            outputs.append((y.detach(), xi.grad, layer.weight.grad.clone(), layer.bias.grad))
            layer.zero_grad()
        for a, b in zip(*outputs):
            assert torch.equal(a, b)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(en, name), getattr(bn, name)), name

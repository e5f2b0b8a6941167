"""A layer applied several times per training step (a head shared across FPN levels), and
layers without affine (the per-level layers of a ``CycleBatchNormList``)."""

import numpy as np
import pytest
import torch
from helpers import randomize_batchnorm, reference_auxiliary_loss, reference_evalnorm
from torch import nn

from evalnorm import EvalNorm2d, OnlineEstimator, convert_to_batchnorm, estimate_offline

# Three "levels": other sizes, other statistics, as FPN levels give a shared head.
SHAPES = [(2, 3, 8, 10), (2, 3, 4, 5), (2, 3, 2, 3)]


def levels(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(s, generator=g, dtype=dtype) * (1 + k) + 2 * k - 1 for k, s in enumerate(SHAPES)
    ]


def pooled_reference_loss(xs, mean, var, alpha, beta, eps):
    """Eqs. 7-9 over every (sample, channel, position) the calls normalized, float64."""
    counts = [x[:, 0].numel() for x in xs]
    losses = [reference_auxiliary_loss(x.numpy(), mean, var, alpha, beta, eps) for x in xs]
    return float(np.dot(losses, counts) / sum(counts))


@pytest.mark.parametrize("affine", [True, False])
def test_several_calls_train_as_batchnorm_and_pool_the_auxiliary_gradient(affine):
    en = EvalNorm2d(3, norm_batch_size=2, affine=affine).double()
    bn = nn.BatchNorm2d(3, affine=affine).double()
    randomize_batchnorm(en)
    bn.load_state_dict(en.state_dict(), strict=False)
    en.set_coefficients(0.3, 0.6)
    en.estimate_online = True
    mean, var = en.running_mean.numpy().copy(), en.running_var.numpy().copy()
    xs = levels()
    for x in xs:  # one training step: the layer runs once per level
        torch.testing.assert_close(en(x), bn(x), rtol=0, atol=0)
    # The running statistics moved once per call, as BatchNorm2d's.
    torch.testing.assert_close(en.running_mean, bn.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(en.running_var, bn.running_var, rtol=0, atol=0)
    assert en.num_batches_tracked.item() == len(xs)
    grad = en.take_aux_grad().numpy()

    # The pooled loss, every level against the EMA the step started from, by central finite
    # differences at the layer's logits.
    def loss(a, b):
        sig = lambda v: 1 / (1 + np.exp(-v))
        return pooled_reference_loss(xs, mean, var, sig(a), sig(b), en.eps)

    a, b, h = en.alpha_logit.item(), en.beta_logit.item(), 1e-6
    numeric = [
        (loss(a + h, b) - loss(a - h, b)) / (2 * h),
        (loss(a, b + h) - loss(a, b - h)) / (2 * h),
    ]
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-9)
    assert en.last_aux_loss.item() == pytest.approx(loss(a, b), rel=1e-10)
    assert np.abs(grad).min() > 1e-4
    # A single call: its own loss and gradient, against the EMA as it is now.
    en(xs[0])
    mean_now, var_now = en.running_mean.numpy(), en.running_var.numpy()
    assert en.take_aux_grad() is not None
    expected = reference_auxiliary_loss(xs[0].numpy(), mean_now, var_now, 0.3, 0.6, en.eps)
    assert en.last_aux_loss.item() != pytest.approx(expected, rel=1e-10)  # EMA before the call
    assert en._aux_ema is None


def test_the_estimation_ema_restarts_at_each_take():
    en = randomize_batchnorm(EvalNorm2d(3, norm_batch_size=2)).double()
    en.estimate_online = True
    xs = levels()
    en(xs[0])
    en.take_aux_grad()
    mean, var = en.running_mean.numpy().copy(), en.running_var.numpy().copy()
    en(xs[1])
    expected = reference_auxiliary_loss(
        xs[1].numpy(), mean, var, en.alpha.item(), en.beta.item(), en.eps
    )
    assert en.last_aux_loss.item() == pytest.approx(expected, rel=1e-10)


def test_without_affine_evaluation_is_the_normalized_input():
    en = EvalNorm2d(3, norm_batch_size=2, affine=False).double()
    assert en.weight is None and en.bias is None
    randomize_batchnorm(en)
    en.set_coefficients(0.2, 0.7)
    en.eval()
    x = levels()[0]
    ones, zeros = np.ones(3), np.zeros(3)
    mean, var = en.running_mean.numpy(), en.running_var.numpy()
    expected = reference_evalnorm(x.numpy(), mean, var, ones, zeros, 0.2, 0.7, en.eps)
    with torch.no_grad():  # BatchNorm's kernel on a view
        np.testing.assert_allclose(en(x).numpy(), expected, rtol=1e-10, atol=1e-12)
    with torch.enable_grad():  # the elementwise path
        np.testing.assert_allclose(en(x).detach().numpy(), expected, rtol=1e-10, atol=1e-12)
    en.mode = "ema"
    ref = nn.BatchNorm2d(3, affine=False).double().eval()
    ref.load_state_dict(en.state_dict(), strict=False)
    torch.testing.assert_close(en(x), ref(x), rtol=0, atol=0)


def test_without_affine_frozen_and_microbatch():
    frozen = randomize_batchnorm(EvalNorm2d(3, norm_batch_size=2, affine=False, frozen=True))
    x = torch.randn(4, 3, 5, 5)
    ref = nn.BatchNorm2d(3, affine=False).eval()
    ref.load_state_dict(frozen.state_dict(), strict=False)
    torch.testing.assert_close(frozen(x), ref(x))
    micro = EvalNorm2d(3, norm_batch_size=2, affine=False, microbatch=True)
    y = micro(x)
    groups = torch.cat([nn.BatchNorm2d(3, affine=False)(g) for g in x.split(2)])
    torch.testing.assert_close(y, groups)


def test_without_affine_online_estimation_and_conversion_back():
    en = randomize_batchnorm(EvalNorm2d(3, norm_batch_size=2, affine=False))
    estimator = OnlineEstimator(en, lr=0.05)
    before = en.alpha.item()
    for x in levels(torch.float32):
        en(x)
    estimator.step()
    assert en.alpha.item() != before
    bn = convert_to_batchnorm(en.eval(), strict=False)
    assert type(bn) is nn.BatchNorm2d and not bn.affine
    x = levels(torch.float32)[0]
    with torch.no_grad():
        en.mode = "ema"
        torch.testing.assert_close(bn(x), en(x))


class Shared(nn.Module):
    """One layer applied to each of three levels."""

    def __init__(self):
        super().__init__()
        self.norm = EvalNorm2d(3, norm_batch_size=2)

    def forward(self, xs):
        return [self.norm(x) for x in xs]


@pytest.mark.parametrize("inputs", ["training", "evaluation"])
def test_offline_estimation_pools_the_calls(inputs):
    model = Shared().double()
    randomize_batchnorm(model)
    xs = levels()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    alpha, beta = model.norm.alpha.item(), model.norm.beta.item()
    mean, var = model.norm.running_mean.numpy().copy(), model.norm.running_var.numpy().copy()
    result = estimate_offline(model, iter([xs]), 1, inputs=inputs)
    # The first (and only) iteration's loss: every level pooled, the coefficients at the start
    # (in the evaluation inputs the layer's input is the same tensor in both forwards).
    expected = pooled_reference_loss(xs, mean, var, alpha, beta, model.norm.eps)
    assert result["losses"][0] == pytest.approx(expected, rel=1e-6)  # reported in float32
    for k in ("norm.running_mean", "norm.running_var", "norm.num_batches_tracked"):
        torch.testing.assert_close(model.state_dict()[k], state[k], rtol=0, atol=0)
    assert model.norm.alpha.item() != alpha

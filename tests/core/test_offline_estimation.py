"""``estimate_offline`` on training inputs (the paper's) and on evaluation inputs, and the
``matching_loss`` of the latter, against float64 references."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_batchnorm
from torch import nn

from evalnorm import EvalNorm2d, estimate_offline
from evalnorm import functional as EF


def batches(n, count, seed=0, size=6):
    g = torch.Generator().manual_seed(seed)
    gain = torch.rand(count, n, 1, 1, 1, generator=g, dtype=torch.float64) + 0.5
    shift = torch.randn(count, n, 1, 1, 1, generator=g, dtype=torch.float64)
    return list(
        torch.randn(count, n, 3, size, size, generator=g, dtype=torch.float64) * gain + shift
    )


def two_layer_net(norm_batch_size=2, seed=0):
    """conv - EvalNorm - ReLU - conv - EvalNorm, in float64 with random statistics."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        EvalNorm2d(4, norm_batch_size=norm_batch_size),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1, bias=False),
        EvalNorm2d(5, norm_batch_size=norm_batch_size),
    ).double()
    randomize_batchnorm(net, seed)
    net[1].set_coefficients(0.2, 0.4)
    net[4].set_coefficients(0.1, 0.3)
    return net


def naive_matching_loss(x, target, mu_e, var_e, alpha, beta, eps):
    """The loss written out in float64 autograd: per-sample moments, eqs. 5-6, mean |diff|."""
    mu_i = x.mean(dim=(2, 3))
    var_i = x.var(dim=(2, 3), unbiased=False)
    mu = alpha * mu_i + (1 - alpha) * mu_e
    var = beta * var_i + (1 - beta) * var_e + beta * (1 - beta) * (mu_i - mu_e) ** 2
    pred = (x - mu[:, :, None, None]) / torch.sqrt(var[:, :, None, None] + eps)
    return (target - pred).abs().mean()


@pytest.mark.parametrize("block", [None, 40, 1], ids=["one-block", "blocks", "row-per-block"])
def test_matching_loss_value_and_gradient_match_float64_autograd(monkeypatch, block):
    if block is not None:  # on CPU the loss's sums run over blocks of (sample, channel) rows
        monkeypatch.setattr(EF, "_CPU_BLOCK_ELEMENTS", block)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64) * 2 + 1
    target = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    mu_e = torch.randn(4, generator=g, dtype=torch.float64)
    var_e = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    ab = torch.tensor([0.3, 0.6], dtype=torch.float64, requires_grad=True)
    mu_i, var_i = EF.sample_statistics(x)
    loss = EF.matching_loss(x, target, mu_i, var_i, mu_e, var_e, ab[0], ab[1], 1e-5)
    (grad,) = torch.autograd.grad(loss, ab)
    ref_ab = ab.detach().clone().requires_grad_()
    ref = naive_matching_loss(x, target, mu_e, var_e, ref_ab[0], ref_ab[1], 1e-5)
    (ref_grad,) = torch.autograd.grad(ref, ref_ab)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_matching_loss_against_the_training_normalization_is_the_auxiliary_loss():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64) * 1.5 - 0.5
    mu_e = torch.randn(3, generator=g, dtype=torch.float64)
    var_e = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    mu_i, var_i = EF.sample_statistics(x)
    mu_b, var_b = EF.normalization_batch_statistics(mu_i, var_i, 2)
    target = (x - mu_b[:, :, None, None]) / torch.sqrt(var_b[:, :, None, None] + 1e-5)
    grads = []
    for loss_fn in (
        lambda a, b: EF.matching_loss(x, target, mu_i, var_i, mu_e, var_e, a, b, 1e-5),
        lambda a, b: EF.auxiliary_loss(x, mu_i, var_i, mu_b, var_b, mu_e, var_e, a, b, 1e-5),
    ):
        ab = torch.tensor([0.25, 0.5], dtype=torch.float64, requires_grad=True)
        loss = loss_fn(ab[0], ab[1])
        grads.append((loss.detach(), *torch.autograd.grad(loss, ab)))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-12, atol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("microbatch", [False, True])
def test_one_layer_fits_the_same_on_training_and_evaluation_inputs(microbatch):
    """With a single EvalNorm layer right after the input, its evaluation inputs are its
    training inputs, so both objectives are the same function: same coefficients."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        EvalNorm2d(4, norm_batch_size=2, microbatch=microbatch),
        nn.ReLU(),
    ).double()
    randomize_batchnorm(net)
    data = batches(4, 5)
    fitted = {}
    for inputs in ("training", "evaluation"):
        model = copy.deepcopy(net)
        summary = estimate_offline(model, iter(data), 5, inputs=inputs, lr=0.1)
        fitted[inputs] = (model[1].alpha.item(), model[1].beta.item(), summary["losses"])
    a, b = fitted["training"], fitted["evaluation"]
    assert a[0] == pytest.approx(b[0], rel=1e-9) and a[1] == pytest.approx(b[1], rel=1e-9)
    np.testing.assert_allclose(a[2], b[2], rtol=1e-9)
    assert a[0] != pytest.approx(net[1].alpha.item())  # the fit moved them


def test_second_layer_is_fitted_on_the_outputs_of_the_evaluating_first():
    """One SGD step of lr 1 moves each logit by minus its gradient: the second layer's must be
    the float64 gradient of |training normalization - EvalNorm of its evaluation input|, where
    its evaluation input comes from the first layer evaluating with its alpha, beta."""
    net = two_layer_net()
    x = batches(2, 1)[0]
    conv1, en1, conv2, en2 = net[0], net[1], net[3], net[4]
    # Independent reference: both forwards written with torch.nn.functional.
    with torch.no_grad():
        h_train = F.relu(
            F.batch_norm(conv1(x), None, None, en1.weight, en1.bias, True, 0.0, en1.eps)
        )
        z_train = conv2(h_train)
        mu_b = z_train.mean(dim=(0, 2, 3), keepdim=True)
        var_b = z_train.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        target = (z_train - mu_b) / torch.sqrt(var_b + en2.eps)
        z1 = conv1(x)
        mu_i, var_i = z1.mean(dim=(2, 3)), z1.var(dim=(2, 3), unbiased=False)
        a1, b1 = en1.alpha.item(), en1.beta.item()
        mu = a1 * mu_i + (1 - a1) * en1.running_mean
        var = (
            b1 * var_i + (1 - b1) * en1.running_var + b1 * (1 - b1) * (mu_i - en1.running_mean) ** 2
        )
        h_eval = F.relu(
            (z1 - mu[:, :, None, None])
            / torch.sqrt(var[:, :, None, None] + en1.eps)
            * en1.weight[:, None, None]
            + en1.bias[:, None, None]
        )
        z_eval = conv2(h_eval)
    logits = torch.stack([en2.alpha_logit, en2.beta_logit]).detach().clone().requires_grad_()
    ref = naive_matching_loss(
        z_eval, target, en2.running_mean, en2.running_var, *torch.sigmoid(logits), en2.eps
    )
    (ref_grad,) = torch.autograd.grad(ref, logits)
    before = logits.detach().clone()
    summary = estimate_offline(
        net, [x], 1, inputs="evaluation", optimizer="sgd", lr=1.0, momentum=0
    )
    after = torch.stack([en2.alpha_logit, en2.beta_logit]).detach()
    # OnlineEstimator.step carries gradients in float32 (one stacked tensor for all layers).
    torch.testing.assert_close(before - after, ref_grad, rtol=1e-6, atol=1e-9)
    assert summary["iterations"] == 1
    # The paper's objective, on the training forward's input, gives another gradient.
    paper = two_layer_net()
    estimate_offline(paper, [x], 1, inputs="training", optimizer="sgd", lr=1.0, momentum=0)
    moved = before - torch.stack([paper[4].alpha_logit, paper[4].beta_logit]).detach()
    assert not torch.allclose(moved, ref_grad, rtol=1e-3)


def test_evaluation_inputs_fit_lowers_its_loss_and_changes_nothing_else():
    net = two_layer_net()
    before = {k: v.clone() for k, v in net.state_dict().items() if "logit" not in k}
    net[1].mode = "ema"
    net.train()
    summary = estimate_offline(net, iter(batches(2, 40, seed=3)), 40, inputs="evaluation", lr=0.05)
    losses = summary["losses"]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    for k, v in net.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k]), k
    assert net.training and net[1].mode == "ema" and net[4].mode == "en"
    assert not net[1].estimate_online and not net[4].estimate_online


class _DropsSamplesInTraining(nn.Module):
    """A stand-in for ROI sampling: training sees other samples than evaluation."""

    def forward(self, x):
        return x[:2] if self.training else x


def test_layers_whose_samples_differ_between_the_forwards_are_refused():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), _DropsSamplesInTraining(), EvalNorm2d(4, norm_batch_size=2)
    ).double()
    with pytest.raises(ValueError, match=r"'2'.*shape \(2, 4, 4, 4\).*\(4, 4, 4, 4\)"):
        estimate_offline(net, batches(4, 1), 1, inputs="evaluation")


def test_inputs_must_be_named():
    with pytest.raises(ValueError, match="inputs must be one of"):
        estimate_offline(two_layer_net(), batches(2, 1), 1, inputs="eval")

"""Training: EvalNorm2d is BatchNorm2d, bit for bit; microbatch is BatchNorm2d on each group;
frozen is FrozenBatchNorm2d."""

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d
from helpers import randomize_batchnorm
from torch import nn

from evalnorm_det import EvalNorm2d


def twins(momentum=0.1, **kwargs):
    """An EvalNorm2d and a BatchNorm2d with the same, randomized, state."""
    en = randomize_batchnorm(EvalNorm2d(6, momentum=momentum, **kwargs))
    bn = nn.BatchNorm2d(6, momentum=momentum)
    bn.load_state_dict({k: v for k, v in en.state_dict().items() if "logit" not in k})
    return en, bn


def forward_backward(layer, x, upstream):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(upstream)
    return y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()


def assert_same_state(a, b, exact=True):
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if exact:
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        else:
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("momentum", [0.1, 0.01, None])
@pytest.mark.parametrize("estimate_online", [False, True])
def test_training_is_batchnorm_bitwise(momentum, estimate_online):
    en, bn = twins(momentum)
    en.estimate_online = estimate_online
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(2, 6, 9, 7, generator=g) * 3 + 1
        upstream = torch.randn(2, 6, 9, 7, generator=g)
        for a, b in zip(forward_backward(en, x, upstream), forward_backward(bn, x, upstream)):
            assert torch.equal(a, b)
        en.zero_grad(), bn.zero_grad()
        assert_same_state(en, bn)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_microbatch_is_batchnorm_on_each_group(momentum):
    en, bn = twins(momentum, norm_batch_size=2, microbatch=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, 5, 4, generator=g) * 2 + torch.randn(8, 6, 1, 1, generator=g)
    upstream = torch.randn(8, 6, 5, 4, generator=g)
    y, dx, dw, db = forward_backward(en, x, upstream)
    # Reference: BatchNorm2d run on groups 0-1, 2-3, ... in order, with one backward.
    xr = x.clone().requires_grad_()
    yr = torch.cat([bn(group) for group in xr.split(2)])
    yr.backward(upstream)
    torch.testing.assert_close(y, yr.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, bn.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, bn.bias.grad, rtol=1e-5, atol=1e-5)
    assert_same_state(en, bn, exact=False)
    assert en.num_batches_tracked.item() == bn.num_batches_tracked.item() == 4


def test_microbatch_of_one_group_is_batchnorm_bitwise():
    en, bn = twins(norm_batch_size=4, microbatch=True)
    x, upstream = torch.randn(4, 6, 3, 3), torch.randn(4, 6, 3, 3)
    for a, b in zip(forward_backward(en, x, upstream), forward_backward(bn, x, upstream)):
        assert torch.equal(a, b)
    assert_same_state(en, bn)


def test_frozen_trains_like_frozen_batchnorm():
    en = randomize_batchnorm(EvalNorm2d(6, frozen=True))
    frozen_bn = FrozenBatchNorm2d(6)
    frozen_bn.load_state_dict(
        {k: v for k, v in en.state_dict().items() if "logit" not in k and "tracked" not in k}
    )
    before = {k: v.clone() for k, v in en.state_dict().items()}
    en.train(), frozen_bn.train()
    en.estimate_online = True
    x = (torch.randn(2, 6, 5, 5) * 2).requires_grad_()
    y = en(x)
    torch.testing.assert_close(y, frozen_bn(x), rtol=1e-6, atol=1e-6)
    y.sum().backward()
    assert en.weight.grad is None and en.bias.grad is None and x.grad is not None
    assert not en.weight.requires_grad and not en.bias.requires_grad
    for k, v in en.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert en.take_aux_grad() is not None  # alpha/beta are still estimated in regime (c)


def test_microbatch_that_does_not_divide_the_batch():
    en = EvalNorm2d(3, norm_batch_size=4, microbatch=True)
    with pytest.raises(ValueError, match="batch of 6 samples.*norm_batch_size=4"):
        en(torch.randn(6, 3, 2, 2))

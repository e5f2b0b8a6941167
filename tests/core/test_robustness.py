"""Where detection is harsh: empty batches, 1x1 maps, half precision, constant channels; and
arguments that must be refused with a message naming the value."""

import math

import pytest
import torch
from helpers import randomize_batchnorm
from torch import nn

from evalnorm import EvalNorm2d, evalnorm_mode


@pytest.mark.parametrize(
    "kwargs", [{}, {"frozen": True}, {"norm_batch_size": 2, "microbatch": True}]
)
def test_zero_samples(kwargs):
    en = randomize_batchnorm(EvalNorm2d(4, **kwargs))
    state = {k: v.clone() for k, v in en.state_dict().items() if k != "num_batches_tracked"}
    en.estimate_online = True
    x = torch.zeros(0, 4, 7, 7, requires_grad=True)
    y = en(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert en.take_aux_grad() is None
    en.eval()
    assert en(x).shape == x.shape
    for k, v in state.items():
        assert torch.equal(en.state_dict()[k], v), k


def test_zero_samples_match_batchnorm_counter():
    en, bn = EvalNorm2d(4), nn.BatchNorm2d(4)
    en(torch.zeros(0, 4, 3, 3)), bn(torch.zeros(0, 4, 3, 3))
    assert en.num_batches_tracked.item() == bn.num_batches_tracked.item()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_varying_batch_sizes_train_as_batchnorm(momentum):
    """A mask head's batch: the foreground ROIs, a different number each iteration, 0 and 1
    included. Outputs, gradients and running statistics are BatchNorm2d's; an empty batch leaves
    no auxiliary gradient, the others a finite one."""
    en = randomize_batchnorm(EvalNorm2d(4, momentum=momentum, norm_batch_size=16))
    bn = randomize_batchnorm(nn.BatchNorm2d(4, momentum=momentum))
    en.estimate_online = True
    g = torch.Generator().manual_seed(0)
    for n in (3, 0, 1, 0, 5, 1):
        x = (torch.randn(n, 4, 6, 6, generator=g) * 2 + 1).requires_grad_()
        x_bn = x.detach().clone().requires_grad_()
        y, y_bn = en(x), bn(x_bn)
        torch.testing.assert_close(y, y_bn, rtol=0, atol=0)
        (y * torch.arange(1.0, 5.0)[:, None, None]).sum().backward()
        (y_bn * torch.arange(1.0, 5.0)[:, None, None]).sum().backward()
        torch.testing.assert_close(x.grad, x_bn.grad, rtol=0, atol=0)
        for k in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(en, k), getattr(bn, k)), (n, k)
        assert torch.isfinite(en.running_var).all() and torch.isfinite(en.running_mean).all()
        grad = en.take_aux_grad()
        assert (grad is None) == (n == 0), n
        assert grad is None or torch.isfinite(grad).all()


def test_one_by_one_maps():
    en = randomize_batchnorm(EvalNorm2d(4, norm_batch_size=2))
    en.estimate_online = True
    x = torch.randn(2, 4, 1, 1)
    assert torch.isfinite(en(x)).all()
    assert torch.isfinite(en.take_aux_grad()).all()
    en.eval()
    en.set_coefficients(1.0)  # each sample's own statistics: a constant map normalizes to bias
    torch.testing.assert_close(en(x), en.bias.detach().expand(2, 4).reshape(2, 4, 1, 1))
    en.set_coefficients(0.5)
    assert torch.isfinite(en(x)).all()


def test_constant_channels():
    en = randomize_batchnorm(EvalNorm2d(3, norm_batch_size=2))
    en.estimate_online = True
    x = torch.randn(4, 3, 5, 5)
    x[:, 1] = 7.0
    y = en(x)
    assert torch.isfinite(y).all() and torch.isfinite(en.take_aux_grad()).all()
    en.eval()
    for alpha in (0.0, 0.3, 1.0):
        en.set_coefficients(alpha)
        assert torch.isfinite(en(x)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_training_with_estimation(dtype):
    en = randomize_batchnorm(EvalNorm2d(4, norm_batch_size=2))
    en.estimate_online = True
    x = (torch.randn(2, 4, 6, 6) * 500 + 2000).to(dtype)  # large activations
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        y = en(x)
    assert torch.isfinite(y.float()).all()
    assert en.take_aux_grad().dtype == torch.float32 and torch.isfinite(en.last_aux_loss)


@pytest.mark.parametrize("value", [1.5, -0.1, float("nan"), "often", True])
def test_bad_coefficients(value):
    en = EvalNorm2d(3, norm_batch_size=2)
    with pytest.raises(ValueError, match="alpha"):
        en.set_coefficients(value)
    with pytest.raises(ValueError, match="beta"):
        en.set_coefficients(0.5, value)
    with pytest.raises(ValueError, match=re_value(value)):
        en.set_coefficients(value)


def re_value(value):
    import re

    return re.escape(repr(value)) if not (isinstance(value, float) and math.isnan(value)) else "nan"


def test_rule_needs_batch_size():
    with pytest.raises(ValueError, match="norm_batch_size is None"):
        EvalNorm2d(3).set_coefficients("rule_of_thumb")
    with pytest.raises(ValueError, match="norm_batch_size is None"):
        EvalNorm2d(3, init="simple")
    en = EvalNorm2d(3).eval()
    en.mode = "rule_of_thumb"
    with pytest.raises(ValueError, match="norm_batch_size is None"):
        en(torch.randn(1, 3, 2, 2))


@pytest.mark.parametrize("value", [0, -2, 2.5, True, "2"])
def test_bad_norm_batch_size(value):
    with pytest.raises(ValueError, match=f"norm_batch_size.*{re_value(value)}"):
        EvalNorm2d(3, norm_batch_size=value)


def test_microbatch_needs_batch_size():
    with pytest.raises(ValueError, match="microbatch=True needs norm_batch_size"):
        EvalNorm2d(3, microbatch=True)


def test_bad_mode():
    en = EvalNorm2d(3).eval()
    with pytest.raises(ValueError, match="'fast'"), evalnorm_mode(en, "fast"):
        pass
    en.mode = "fast"
    with pytest.raises(ValueError, match="'fast'"):
        en(torch.randn(1, 3, 2, 2))

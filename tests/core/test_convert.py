"""convert_to_evalnorm / convert_to_batchnorm on real models, and evalnorm_mode."""

import copy

import pytest
import torch
import torchvision
from detectron2.layers import FrozenBatchNorm2d
from helpers import randomize_batchnorm
from torch import nn

from evalnorm import EvalNorm2d, convert_to_batchnorm, convert_to_evalnorm, evalnorm_mode


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return randomize_batchnorm(torchvision.models.resnet18(weights=None, num_classes=10)).eval()


def images(n=2, seed=0):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_resnet18_unchanged_in_ema_mode(resnet18):
    converted = convert_to_evalnorm(copy.deepcopy(resnet18), norm_batch_size=2)
    en_layers = [m for m in converted.modules() if isinstance(m, EvalNorm2d)]
    assert len(en_layers) == 20 and not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert all(m.alpha.item() == pytest.approx(0.25) for m in en_layers)
    x = images()
    with torch.no_grad(), evalnorm_mode(converted, "ema"):
        assert torch.equal(converted(x), resnet18(x))
    with torch.no_grad():
        assert not torch.allclose(converted(x), resnet18(x), atol=1e-3)  # EvalNorm does correct


def test_resnet18_trains_identically(resnet18):
    original = copy.deepcopy(resnet18).train()
    converted = convert_to_evalnorm(copy.deepcopy(resnet18), norm_batch_size=2).train()
    x = images(seed=1)
    original(x).sum().backward()
    converted(x).sum().backward()
    for (name, a), (_, b) in zip(
        original.named_parameters(),
        [(n, p) for n, p in converted.named_parameters() if "logit" not in n],
    ):
        assert torch.equal(a.grad, b.grad), name
    for (name, a), b in zip(
        original.state_dict().items(),
        [v for k, v in converted.state_dict().items() if "logit" not in k],
    ):
        assert torch.equal(a, b), name


def test_round_trip_to_batchnorm(resnet18):
    converted = convert_to_evalnorm(copy.deepcopy(resnet18), norm_batch_size=2)
    back = convert_to_batchnorm(converted)
    assert not any(isinstance(m, EvalNorm2d) for m in back.modules())
    assert back.state_dict().keys() == resnet18.state_dict().keys()
    x = images()
    with torch.no_grad():
        assert torch.equal(back(x), resnet18(x))


def frozen_model():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
    )
    return randomize_batchnorm(model)


def test_frozen_batchnorm_becomes_frozen_evalnorm():
    model = frozen_model()
    reference = copy.deepcopy(model)
    converted = convert_to_evalnorm(model, norm_batch_size=4, init="simple")
    assert converted[1].frozen and not converted[4].frozen
    assert not converted[1].weight.requires_grad and converted[4].weight.requires_grad
    assert converted[1].alpha.item() == pytest.approx(0.25)
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(converted(x), reference(x))  # training forward: frozen + BN
    back = convert_to_batchnorm(converted)
    assert type(back[1]) is FrozenBatchNorm2d and type(back[4]) is nn.BatchNorm2d


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_forced(frozen):
    converted = convert_to_evalnorm(frozen_model(), norm_batch_size=2, frozen=frozen)
    assert converted[1].frozen == frozen and converted[4].frozen == frozen


def test_syncbatchnorm_and_bare_layer():
    sync = randomize_batchnorm(nn.SyncBatchNorm(4, momentum=0.3)).eval()
    en = convert_to_evalnorm(sync, norm_batch_size=8, init=0.0)
    assert isinstance(en, EvalNorm2d) and en.momentum == 0.3 and not en.training
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(en(x), sync(x))


def test_microbatch_and_dtype_kept():
    model = convert_to_evalnorm(
        nn.Sequential(nn.BatchNorm2d(3)).double(), norm_batch_size=2, microbatch=True
    )
    assert model[0].microbatch and model[0].running_mean.dtype == torch.float64
    assert model[0].alpha_logit.dtype == torch.float64


def test_layers_without_statistics_are_refused():
    with pytest.raises(
        ValueError, match="0: BatchNorm2d with affine=True, track_running_stats=False"
    ):
        convert_to_evalnorm(
            nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)), norm_batch_size=2
        )
    with pytest.raises(ValueError, match="affine=False"):
        convert_to_evalnorm(nn.BatchNorm2d(3, affine=False), norm_batch_size=2)


def test_mode_context_restores_and_checks():
    model = convert_to_evalnorm(
        nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3)), norm_batch_size=None, init=0.5
    )
    model[1].mode = "ema"
    with evalnorm_mode(model, "en"):
        assert [m.mode for m in model] == ["en", "en"]
    assert [m.mode for m in model] == ["en", "ema"]
    with (
        pytest.raises(ValueError, match="needs norm_batch_size.*'0'"),
        evalnorm_mode(model, "rule_of_thumb"),
    ):
        pass
    with (
        pytest.raises(ValueError, match="no EvalNorm2d"),
        evalnorm_mode(nn.Sequential(nn.BatchNorm2d(3)), "ema"),
    ):
        pass

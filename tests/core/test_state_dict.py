"""State dicts: round trips, and BatchNorm/SyncBatchNorm/FrozenBatchNorm2d checkpoints loaded strictly."""

import logging

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d
from helpers import randomize_batchnorm
from torch import nn

import evalnorm.layer as evalnorm_module
from evalnorm import EvalNorm2d


def test_round_trip():
    en = randomize_batchnorm(EvalNorm2d(4, norm_batch_size=2))
    en.set_coefficients(0.3, 0.7)
    state = en.state_dict()
    assert {"alpha_logit", "beta_logit", "running_mean", "num_batches_tracked"} <= state.keys()
    loaded = EvalNorm2d(4, norm_batch_size=2)
    loaded.load_state_dict(state, strict=True)
    for k, v in state.items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(2, 4, 3, 3)
    en.eval(), loaded.eval()
    assert torch.equal(en(x), loaded(x))
    buffer = __import__("io").BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=True)["alpha_logit"], state["alpha_logit"])


@pytest.mark.parametrize(
    "source",
    [lambda: nn.BatchNorm2d(4), lambda: nn.SyncBatchNorm(4), lambda: FrozenBatchNorm2d(4)],
    ids=["BatchNorm2d", "SyncBatchNorm", "FrozenBatchNorm2d"],
)
def test_batchnorm_checkpoints_load_strictly(source, monkeypatch, caplog):
    monkeypatch.setattr(evalnorm_module, "_missing_coefficients_logged", False)
    model = nn.Sequential(source(), source())
    randomize_batchnorm(model)
    target = nn.Sequential(EvalNorm2d(4, norm_batch_size=2), EvalNorm2d(4, norm_batch_size=4))
    with caplog.at_level(logging.INFO, logger=evalnorm_module.__name__):
        target.load_state_dict(model.state_dict(), strict=True)
    for src, dst in zip(model, target):
        for name in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(src, name), getattr(dst, name)), name
    assert target[0].alpha.item() == pytest.approx(1 / 4) and target[
        1
    ].beta.item() == pytest.approx(1 / 16)
    messages = [r.getMessage() for r in caplog.records if "no alpha/beta" in r.getMessage()]
    assert len(messages) == 1 and "'0'" in messages[0]


def test_folded_batchnorm_is_not_silently_accepted():
    # A Caffe2-style checkpoint: scale and shift only, no running statistics.
    with pytest.raises(RuntimeError, match="running_mean"):
        EvalNorm2d(4).load_state_dict(
            {"weight": torch.ones(4), "bias": torch.zeros(4)}, strict=True
        )

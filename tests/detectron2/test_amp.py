"""Mixed precision: EvalNorm2d under autocast (statistics and the auxiliary loss in float32) and
``SOLVER.AMP.ENABLED`` training, on CPU with bfloat16 and on CUDA with float16.

Reference: the same layer in float32 on the same inputs upcast to float32, so only the
precision of the computation differs, not the data."""

import copy

import pytest
import torch
import torch.nn.functional as F
from detection_helpers import en_layers, tiny_cfg, train
from detectron2.utils.env import seed_all_rng

from evalnorm_det import EvalNorm2d, Trainer
from evalnorm_det.utils.cpu import CPUAMPTrainer


def make_layer(device="cpu"):
    torch.manual_seed(0)
    layer = EvalNorm2d(4, norm_batch_size=2).to(device)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1.0, 1.0)
    layer.estimate_online = True
    return layer


def large_inputs(dtype, device="cpu"):
    """Inputs as ``dtype`` with large activations, and the same values in float32."""
    torch.manual_seed(1)
    if dtype == torch.float16:  # near float16's largest value (65504): x^2 sums overflow it
        x = torch.empty(2, 4, 8, 8).uniform_(3e4, 6.5e4)
    else:  # ~1e4 with a small spread: bfloat16 resolves steps of 64 there
        x = 1e4 + 200 * torch.randn(2, 4, 8, 8)
        x[:, 1] = 1e4 + 0.01 * torch.randn(2, 8, 8)  # a channel of tiny variance: one value
    low = x.to(device=device, dtype=dtype)
    return low, low.float()


CASES = [
    # (autocast dtype, input dtype). Output tolerance: one rounding of |y| <~ 6 to the
    # output dtype (bfloat16: 2^-8 relative, float16: 2^-11) and then some.
    (torch.bfloat16, torch.bfloat16, 5e-2),
    (torch.bfloat16, torch.float16, 1e-2),
    (torch.float16, torch.float16, 1e-2),
]


@pytest.mark.parametrize("autocast_dtype, dtype, tol", CASES)
def test_training_and_evaluation_under_cpu_autocast(autocast_dtype, dtype, tol):
    check_layer_under_autocast("cpu", autocast_dtype, dtype, tol)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_training_and_evaluation_under_cuda_autocast(dtype):
    check_layer_under_autocast("cuda", dtype, dtype, 5e-2 if dtype == torch.bfloat16 else 1e-2)


def check_layer_under_autocast(device, autocast_dtype, dtype, tol):
    low = make_layer(device)
    ref = copy.deepcopy(low)
    bn = torch.nn.BatchNorm2d(4).to(device)
    bn.load_state_dict({k: v for k, v in low.state_dict().items() if "logit" not in k})
    x, x32 = large_inputs(dtype, device)
    with torch.autocast(device, dtype=autocast_dtype):
        y, y_bn = low(x), bn(x)
    y_ref = ref(x32)
    # Training is BatchNorm's, in any precision: the same kernel, the same output and EMA.
    # Against float32, that kernel's own rounding shows on the constant channel of the bfloat16
    # case on CUDA, so only the other channels are compared there.
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert torch.equal(y, y_bn)
    kept = [0, 2, 3] if (device, dtype) == ("cuda", torch.bfloat16) else slice(None)
    torch.testing.assert_close(y.float()[:, kept], y_ref[:, kept], rtol=tol, atol=tol)
    for name in ("running_mean", "running_var"):
        stat, stat_ref = getattr(low, name), getattr(ref, name)
        assert stat.dtype == torch.float32 and torch.isfinite(stat).all()
        assert torch.equal(stat, getattr(bn, name)), name
        torch.testing.assert_close(stat[kept], stat_ref[kept], rtol=1e-5, atol=1e-6)
    # The auxiliary loss and its gradient for alpha/beta: EvalNorm's own per-sample statistics,
    # float32 on the upcast inputs, every channel.
    assert low.last_aux_loss.dtype == torch.float32 and torch.isfinite(low.last_aux_loss)
    torch.testing.assert_close(low.last_aux_loss, ref.last_aux_loss, rtol=1e-5, atol=1e-6)
    grad, grad_ref = low.take_aux_grad(), ref.take_aux_grad()
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-6)
    # Evaluation from the same (float32) EMA: statistics in float32, output rounded once to the
    # input dtype, every channel. "batch" normalizes with BatchNorm's training kernel, as above.
    low.eval(), ref.eval()
    ref.load_state_dict(low.state_dict())
    for mode in ("en", "rule_of_thumb", "ema", "batch"):
        low.mode = ref.mode = mode
        with torch.autocast(device, dtype=autocast_dtype), torch.no_grad():
            y = low(x)
            y_bn = F.batch_norm(x, None, None, low.weight, low.bias, True, 0.0, low.eps)
        assert y.dtype == dtype and torch.isfinite(y).all(), mode
        channels = kept if mode == "batch" else slice(None)
        y_ref = ref(x32).detach()[:, channels]
        torch.testing.assert_close(y.float()[:, channels], y_ref, rtol=tol, atol=tol)
        if mode == "batch":
            assert torch.equal(y, y_bn)


def test_backward_through_the_layer_under_bf16_autocast_is_finite():
    layer = make_layer()
    conv = torch.nn.Conv2d(4, 4, 1)
    x = (1e4 + 200 * torch.randn(2, 4, 8, 8)).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        assert h.dtype == torch.bfloat16  # the layer sees what autocast gives it
        loss = layer(h).float().pow(2).mean()
    loss.backward()
    for t in (x.grad, conv.weight.grad, layer.weight.grad, layer.bias.grad):
        assert torch.isfinite(t).all()
    assert torch.isfinite(layer.take_aux_grad()).all()


def test_amp_training_on_cpu_uses_bf16_and_keeps_everything_finite(tmp_path):
    cfg = tiny_cfg(tmp_path, "SOLVER.AMP.ENABLED", "True", "SOLVER.MAX_ITER", "2")
    seed_all_rng(0)
    trainer = Trainer(cfg)
    seen = []  # input dtypes of the first EvalNorm layer in training
    first = en_layers(trainer.model)[0][1]
    first.register_forward_hook(lambda m, i, o: seen.append(i[0].dtype) if m.training else None)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert isinstance(trainer._trainer, CPUAMPTrainer)
    assert seen and set(seen) == {torch.bfloat16}  # the convolutions ran in bfloat16
    losses = trainer.storage.history("total_loss").values()
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(v)) for v, _ in losses)
    for name, layer in en_layers(trainer.model):
        for t in (layer.alpha, layer.beta, layer.running_mean, layer.running_var):
            assert t.dtype == torch.float32 and torch.isfinite(t).all(), name
        assert layer.num_batches_tracked.item() == 2, name
    assert (tmp_path / "output" / "model_final.pth").is_file()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_amp_training_on_cuda_uses_fp16(tmp_path):
    cfg = tiny_cfg(
        tmp_path, "SOLVER.AMP.ENABLED", "True", "SOLVER.MAX_ITER", "2", "MODEL.DEVICE", "cuda"
    )
    trainer = train(cfg)
    assert type(trainer._trainer).__name__ == "AMPTrainer"  # detectron2's, float16 by default
    assert trainer._trainer.precision == torch.float16
    losses = trainer.storage.history("total_loss").values()
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(v)) for v, _ in losses)
    for name, layer in en_layers(trainer.model):
        for t in (layer.alpha, layer.beta, layer.running_mean, layer.running_var):
            assert t.dtype == torch.float32 and torch.isfinite(t).all(), name

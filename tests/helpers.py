"""Test helpers: independent float64 references, small models, and the scripts under test."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]  # the repository


def reference_statistics(xi, mu_e, var_e, alpha, beta):
    """Eqs. 5-6 for one (sample, channel) map ``xi`` in float64."""
    mu_i, var_i = xi.mean(), xi.var()
    mu = alpha * mu_i + (1 - alpha) * float(mu_e)
    var = beta * var_i + (1 - beta) * float(var_e) + beta * (1 - beta) * (mu_i - float(mu_e)) ** 2
    return mu, var


def reference_evalnorm(x, running_mean, running_var, weight, bias, alpha, beta, eps):
    """EvalNorm's evaluation output in float64 NumPy, one (sample, channel) at a time."""
    x = np.asarray(x, dtype=np.float64)
    y = np.empty_like(x)
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            mu, var = reference_statistics(x[n, c], running_mean[c], running_var[c], alpha, beta)
            y[n, c] = float(weight[c]) * (x[n, c] - mu) / np.sqrt(var + eps) + float(bias[c])
    return y


def reference_auxiliary_loss(
    x, running_mean, running_var, alpha, beta, eps, group_size=None, positions=None
):
    """Eqs. 7-9 in float64 NumPy: mean |batch-normalized x - EvalNorm-normalized x|, over the
    flattened spatial ``positions`` of each map (all by default); statistics from whole maps."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    group_size = group_size or n
    total, count = 0.0, 0
    for g in range(0, n, group_size):
        xg = x[g : g + group_size]
        mu_b = xg.mean(axis=(0, 2, 3))
        var_b = xg.var(axis=(0, 2, 3))
        for i in range(xg.shape[0]):
            for c in range(x.shape[1]):
                xi = xg[i, c]
                mu, var = reference_statistics(xi, running_mean[c], running_var[c], alpha, beta)
                kept = xi.reshape(-1) if positions is None else xi.reshape(-1)[positions]
                target = (kept - mu_b[c]) / np.sqrt(var_b[c] + eps)
                pred = (kept - mu) / np.sqrt(var + eps)
                total += np.abs(target - pred).sum()
                count += kept.size
    return total / count


@torch.no_grad()
def randomize_batchnorm(model, seed=0):
    """Give every BatchNorm-like layer non-trivial affine and running statistics."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "running_mean") and m.running_mean is not None:
            c = m.running_mean.numel()
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
            if getattr(m, "weight", None) is not None:  # affine=False layers have none
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model


def small_cnn(norm, num_classes=4, width=8, dropout=0.0):
    """conv-norm-relu x2, pooling, linear; ``norm(channels)`` builds each norm layer."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False),
        norm(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1, stride=2, bias=False),
        norm(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(2 * width, num_classes),
    )


def class_images(n, size=12, num_classes=4, seed=0):
    """Images whose class decides where a bright square sits, with per-image brightness and
    contrast jitter so that per-sample statistics vary: (images (n,1,size,size), labels (n,))."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (n,), generator=g)
    images = torch.randn(n, 1, size, size, generator=g) * 0.5
    half = size // 2
    for i, label in enumerate(labels.tolist()):
        r, c = divmod(label, 2)
        images[i, 0, r * half : (r + 1) * half, c * half : (c + 1) * half] += 2.0
    gain = torch.rand(n, 1, 1, 1, generator=g) * 1.5 + 0.5
    offset = torch.randn(n, 1, 1, 1, generator=g)
    return images * gain + offset, labels


def import_tool(name):
    """The module of ``tools/<name>.py`` (imported once, as ``name``)."""
    tools = str(ROOT / "tools")
    sys.path.insert(0, tools)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(tools)


def load_script(path):
    """Imports the script at ``path`` (a tool: the benchmarks are the package ``benchmarks``, on
    pytest's pythonpath) as a module named after its file, registered in ``sys.modules`` (so
    that its functions pickle, for worker processes); its folder goes on ``sys.path`` first,
    for the modules it imports from beside it."""
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def assert_reference_gradient(en, grad, x, mean, var, group_size=None, positions=None):
    """``grad`` and the layer's last loss against central finite differences of the float64
    reference of eqs. 7-9 at the layer's alpha/beta logits."""

    def loss(alpha_logit, beta_logit):
        sigmoid = lambda v: 1 / (1 + np.exp(-v))
        alpha, beta = sigmoid(alpha_logit), sigmoid(beta_logit)
        return reference_auxiliary_loss(
            x.numpy(), mean, var, alpha, beta, en.eps, group_size, positions
        )

    a, b = en.alpha_logit.item(), en.beta_logit.item()
    h = 1e-6
    numeric = [
        (loss(a + h, b) - loss(a - h, b)) / (2 * h),
        (loss(a, b + h) - loss(a, b - h)) / (2 * h),
    ]
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-9)
    assert en.last_aux_loss.item() == pytest.approx(loss(a, b), rel=1e-10)

#!/usr/bin/env python
"""EvalNorm on real bundled data: scikit-learn's handwritten digits, BatchNorm at 2 samples.

Trains the same small ResNet twice per seed, with the same SGD batch, once normalizing over
microbatches of ``--small-batch`` samples and once over the whole SGD batch, estimating
alpha/beta online in both (the paper's section 4.1 setup, in miniature). Images get random
lighting (contrast, brightness) in training and in the held-out set, as photographs do. Each
trained model is evaluated under every normalization mode on the held-out digits; one table
of test errors (mean and spread over seeds) is printed.

    python tools/demo_digits.py              # about 1.5 minutes on 2 CPU cores
"""

import argparse
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated")  # from detectron2's imports
from evalnorm_det import OnlineEstimator, convert_to_evalnorm, evalnorm_mode

MODES = ("ema", "en", "rule_of_thumb", "simple")


def digits(test_size, seed):
    """(train images, train labels, test images, test labels): 1x8x8 float images."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test, train = order[:test_size], order[test_size:]
    return images[train], labels[train], images[test], labels[test]


def lighting(images, generator, strength):
    """Per-image contrast and brightness, as lighting varies between photographs."""
    n = len(images)
    gain = 1 + strength * (2 * torch.rand(n, 1, 1, 1, generator=generator) - 1) * 0.75
    return images * gain + strength * torch.randn(n, 1, 1, 1, generator=generator) * 0.5


def augment(images, generator, strength):
    """Random shifts of up to 1 pixel, then lighting."""
    padded = F.pad(images, (1, 1, 1, 1))
    n = len(images)
    dy, dx = torch.randint(3, (2, n), generator=generator)
    out = torch.stack([padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8] for i in range(n)])
    return lighting(out, generator, strength)


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def small_resnet(num_classes=10):
    """A ResNet with widths 16/32/64 (one block each) for 8x8 inputs; 9 BatchNorm layers."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, 1, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        Block(16, 16, 1),
        Block(16, 32, 2),
        Block(32, 64, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


def train(norm_batch_size, data, seed, args):
    train_x, train_y = data[0], data[1]
    torch.manual_seed(seed)
    model = convert_to_evalnorm(small_resnet(), norm_batch_size, microbatch=True)
    steps = args.epochs * (len(train_y) // args.batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, args.lr, total_steps=steps, pct_start=0.15
    )
    estimator = OnlineEstimator(model, lr=args.estimator_lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(args.epochs):
        order = torch.randperm(len(train_y), generator=generator)
        for batch in order[: len(order) // args.batch_size * args.batch_size].split(
            args.batch_size
        ):
            loss = F.cross_entropy(
                model(augment(train_x[batch], generator, args.lighting)), train_y[batch]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            estimator.step()
    return model.eval(), estimator


@torch.no_grad()
def test_errors(model, test_x, test_y):
    errors = {}
    for mode in MODES:
        with evalnorm_mode(model, mode):
            errors[mode] = 100.0 * (model(test_x).argmax(1) != test_y).float().mean().item()
    return errors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--small-batch", type=int, default=2, help="normalization microbatch B (default 2)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="SGD batch, also the large B (default 64)"
    )
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument(
        "--estimator-lr", type=float, default=0.02, help="OnlineEstimator's Adam lr"
    )
    parser.add_argument("--test-size", type=int, default=597)
    parser.add_argument(
        "--lighting", type=float, default=2.0, help="lighting variation, train and test"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    print(
        f"scikit-learn digits ({args.test_size} held out), lighting {args.lighting}; SGD batch "
        f"{args.batch_size}, {args.epochs} epochs; BatchNorm over microbatches of B samples"
    )
    errors = {b: {m: [] for m in MODES} for b in (args.small_batch, args.batch_size)}
    coefficients = {b: [] for b in errors}
    for seed in args.seeds:
        data = seeded_data(seed, args)
        for b in errors:
            start = time.time()
            model, estimator = train(b, data, seed, args)
            for mode, error in test_errors(model, data[2], data[3]).items():
                errors[b][mode].append(error)
            coefficients[b].append(np.array(list(estimator.coefficients().values())).mean(axis=0))
            print(f"  seed {seed}, B={b}: trained in {time.time() - start:.0f} s")
    print(f"\ntest error (%), mean +- std over seeds {', '.join(map(str, args.seeds))}")
    print("B     " + "".join(f"{m:>16}" for m in MODES) + "   estimated alpha, beta")
    for b, by_mode in errors.items():
        alpha, beta = np.mean(coefficients[b], axis=0)
        cells = "".join(f"{np.mean(v):9.2f} +- {np.std(v):4.2f}" for v in by_mode.values())
        print(f"{b:<6d}{cells}   {alpha:.3f}, {beta:.3f}")
    small, large = errors[args.small_batch], errors[args.batch_size]
    gap = np.mean(small["ema"]) - np.mean(large["ema"])
    if gap > 0:
        recovered = 100.0 * (np.mean(small["ema"]) - np.mean(small["en"])) / gap
        print(
            f"\nAt B = {args.small_batch}, EvalNorm (en) recovers {recovered:.0f}% of the {gap:.2f}-point "
            f"gap between EMA evaluation at B = {args.small_batch} and at B = {args.batch_size}."
        )
    else:
        print(
            f"\nEMA evaluation at B = {args.small_batch} lost nothing against B = {args.batch_size} here."
        )


def seeded_data(seed, args):
    """One seed's split; the held-out digits get lighting from the training distribution."""
    train_x, train_y, test_x, test_y = digits(args.test_size, seed)
    test_x = lighting(test_x, torch.Generator().manual_seed(seed + 1000), args.lighting)
    return train_x, train_y, test_x, test_y


if __name__ == "__main__":
    main()

"""The network of the microbatch benchmark: the paper's 20-layer CIFAR ResNet v2, with every
BatchNorm an ``EvalNorm2d`` normalizing consecutive microbatches of B samples in training."""

import torch
import torch.nn.functional as F
from torch import nn

from evalnorm import EvalNorm2d, convert_to_evalnorm


class PreActBlock(nn.Module):
    """ResNet v2 basic block: BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus the shortcut (a 1x1
    convolution of the pre-activated input where the shape changes)."""

    def __init__(self, in_channels, channels, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Conv2d(in_channels, channels, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class ResNet20(nn.Module):
    """The paper's 20-layer CIFAR ResNet v2 (3 stages x 3 blocks): (N, 3, 32, 32) images ->
    (N, 10) logits, feature maps 32x32, 16x16, 8x8 by stage; 19 BatchNorm layers."""

    def __init__(self, widths=(16, 32, 64), num_classes=10, blocks=3, in_channels=3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        layers, channels = [], widths[0]
        for stage, width in enumerate(widths):
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(PreActBlock(channels, width, stride))
                channels = width
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


def build_model(seed, norm_batch_size, widths):
    """ResNet-20 with every BatchNorm an ``EvalNorm2d`` normalizing groups of
    ``norm_batch_size`` samples in training; its initial weights depend on ``seed`` alone."""
    torch.manual_seed(seed)
    model = ResNet20(tuple(widths))
    return convert_to_evalnorm(model, norm_batch_size, init="rule_of_thumb", microbatch=True)


def evalnorm_layers(model):
    return [m for m in model.modules() if isinstance(m, EvalNorm2d)]


def coefficients(model):
    """{layer name: [alpha, beta]} of every EvalNorm2d."""
    return {
        name: [m.alpha.item(), m.beta.item()]
        for name, m in model.named_modules()
        if isinstance(m, EvalNorm2d)
    }

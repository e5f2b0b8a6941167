"""The detection regimes' "ImageNet": a ResNet-50 at the detector's width (1/8; stem 16) in
torchvision's layout, pre-trained by the benchmark itself to classify windows around a digit cut
from scenes of the detection data's renderer (or whole scenes), then converted to a detectron2
checkpoint by ``tools/convert_imagenet_checkpoint.py``."""

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from evalnorm_det.data.digits import render_split
from evalnorm_det.engine.defaults import setup_cfg

from .settings import CONFIG, ROOT

TOOL = ROOT / "tools" / "convert_imagenet_checkpoint.py"
NUM_CLASSES = 10
# Seeds of the stand-in's generated scenes: the detection data's train and test splits use 0
# and 1 (generate_digits), the example-weighing selection split cells.SELECTION_SEED.
STANDIN_SEEDS = {"train": 100, "val": 101}


class StandinResNet50(torchvision.models.ResNet):
    """torchvision's ResNet-50 (its ``Bottleneck`` blocks [3, 4, 6, 3] via ``_make_layer``, the
    same key names) with ``stem`` channels out of conv1 and bottleneck width ``width`` in layer1,
    doubling per stage (outputs 4x): (16, 8) is the detector's ResNet-50 at 1/8 width."""

    def __init__(self, stem=16, width=8, num_classes=NUM_CLASSES):
        nn.Module.__init__(self)
        self._norm_layer, self.dilation, self.groups, self.base_width = nn.BatchNorm2d, 1, 1, 64
        self.inplanes = stem
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        block = torchvision.models.resnet.Bottleneck
        self.layer1 = self._make_layer(block, width, 3)
        self.layer2 = self._make_layer(block, 2 * width, 4, stride=2)
        self.layer3 = self._make_layer(block, 4 * width, 6, stride=2)
        self.layer4 = self._make_layer(block, 8 * width, 3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32 * width, num_classes)
        # torchvision's initialization with zero_init_residual=True: each block starts as the
        # identity, without which SGD did not get this deep, narrow net going in minutes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, block):
                nn.init.zeros_(m.bn3.weight)


def render_scenes(split, num_images, image_size, seed, task="digits"):
    """``num_images`` whole scenes rendered as the detection data (digit samples of ``split``,
    ``default_rng(seed)``, style ``task``): (P, S, S, 3) uint8 RGB and (P, 10) float32
    multi-hot labels (the digits present)."""
    images, targets = [], np.zeros((num_images, NUM_CLASSES), np.float32)
    for i, r in enumerate(render_split(split, num_images, image_size, seed, task)):
        images.append(r.image)
        targets[i, r.labels] = 1.0
    return np.stack(images), targets


def render_crops(split, num_images, image_size, crop, seed, task="digits"):
    """Windows of ``crop`` px at native scale (no resizing) around each digit of
    ``num_images`` scenes rendered as the detection data (style ``task``): the digit's box
    inside the window at a random place (centred when larger). (P, crop, crop, 3) uint8 RGB
    and (P,) int64 labels, one window per digit."""
    rng = np.random.default_rng(seed + 1000)
    windows, labels = [], []
    for r in render_split(split, num_images, image_size, seed, task):
        for (x, y, w, h), label in zip(r.boxes.tolist(), r.labels.tolist()):
            x0 = rng.integers(x + w - crop, x + 1) if w <= crop else x + (w - crop) // 2
            y0 = rng.integers(y + h - crop, y + 1) if h <= crop else y + (h - crop) // 2
            x0 = int(np.clip(x0, 0, image_size - crop))
            y0 = int(np.clip(y0, 0, image_size - crop))
            windows.append(r.image[y0 : y0 + crop, x0 : x0 + crop])
            labels.append(label)
    return np.stack(windows), np.array(labels, np.int64)


def _pixel_normalizer(device):
    """uint8 (P, S, S, 3) RGB -> float32 (P, 3, S, S), normalized as the detector's input."""
    cfg = setup_cfg(str(CONFIG), world_size=1)
    # what tools/convert_imagenet_checkpoint.py's output expects: torchvision's conventions
    assert cfg.INPUT.FORMAT == "RGB" and not cfg.MODEL.RESNETS.STRIDE_IN_1X1, CONFIG
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD, device=device).view(1, 3, 1, 1)
    return lambda x: (x.to(device).permute(0, 3, 1, 2).float() - mean) / std


@torch.no_grad()
def _accuracy(model, x, y, normalize, batch=64):
    """Accuracy in %: top-1 for class labels (P,); for multi-hot labels (P, 10), of the 10
    present/absent decisions at logit 0."""
    model.eval()
    logits = torch.cat([model(normalize(x[i : i + batch])) for i in range(0, len(x), batch)])
    right = logits.argmax(1).cpu() == y if y.dim() == 1 else (logits > 0).cpu() == (y > 0.5)
    return 100.0 * right.float().mean().item()


def _standin_data(s, split, num_images):
    """The stand-in's inputs and labels for ``split`` (torch tensors, uint8 images)."""
    if s.standin_task not in ("crops", "scenes"):
        raise ValueError(f"standin_task={s.standin_task!r}: expected 'crops' or 'scenes'")
    if s.standin_task == "crops" and not 0 < s.standin_crop <= s.image_size:
        raise ValueError(f"standin_crop={s.standin_crop}: expected 1 to {s.image_size} px")
    seed = STANDIN_SEEDS[split]
    if s.standin_task == "scenes":
        x, y = render_scenes(split, num_images, s.image_size, seed, s.task)
    else:
        x, y = render_crops(split, num_images, s.image_size, s.standin_crop, seed, s.task)
    return torch.from_numpy(x), torch.from_numpy(y)


@torch.no_grad()
def population_statistics(model, x, normalize, batch, generator, num_batches=50):
    """Replaces every BN layer's running statistics by their average over ``num_batches``
    training batches of the final weights (PreciseBN), so that they match the weights."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    order = torch.randperm(len(x), generator=generator)
    for i in range(min(num_batches, max(len(x) // batch, 1))):
        model(normalize(x[order[i * batch : (i + 1) * batch]]))
    for m in norms:
        m.momentum = 0.1


def train_standin(s, seed, path):
    """Trains the stand-in on ``s.device`` for ``s.standin_task`` ("scenes": which of the 10
    digits are in a whole scene, binary cross-entropy; "crops": the digit of a native-scale
    window, cross-entropy), SGD with Nesterov momentum 0.9, cosine from ``s.standin_lr``, BN
    over batches of ``s.standin_batch``; recomputes its BN statistics, saves its torchvision
    ``state_dict`` to ``path``; returns a summary dict (accuracies in %, seconds)."""
    start = time.perf_counter()
    train_x, train_y = _standin_data(s, "train", s.standin_images)
    val_x, val_y = _standin_data(s, "val", max(s.standin_images // 10, 8))
    normalize = _pixel_normalizer(s.device)
    multilabel = s.standin_task == "scenes"
    criterion = F.binary_cross_entropy_with_logits if multilabel else F.cross_entropy
    torch.manual_seed(seed)
    model = StandinResNet50().to(s.device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=s.standin_lr, momentum=0.9, weight_decay=1e-4, nesterov=True
    )
    warmup = max(s.standin_iters // 20, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda i: min((i + 1) / warmup, 0.5 * (1 + math.cos(math.pi * i / s.standin_iters))),
    )
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    model.train()
    for _ in range(s.standin_iters):
        if len(order) < s.standin_batch:
            order = torch.randperm(len(train_x), generator=generator)
        idx, order = order[: s.standin_batch], order[s.standin_batch :]
        loss = criterion(model(normalize(train_x[idx])), train_y[idx].to(s.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    population_statistics(model, train_x, normalize, s.standin_batch, generator)
    if multilabel:  # "every digit absent", per label
        baseline = 100.0 * (1 - val_y.mean().item())
    else:  # the most common class
        baseline = 100.0 * torch.bincount(val_y).max().item() / len(val_y)
    summary = {
        "architecture": "torchvision ResNet-50 layout, stem 16, bottleneck widths 8/16/32/64",
        "task": {
            "scenes": "multi-label 10-class classification of whole scenes (digits present); "
            "accuracy: of the present/absent decisions",
            "crops": f"10-class classification of {s.standin_crop} px windows around a digit, "
            "at native scale (not resized); accuracy: top-1",
        }[s.standin_task],
        "train_inputs": len(train_x),
        "val_inputs": len(val_x),
        "input_size": train_x.shape[1],
        "image_size": s.image_size,
        "iterations": s.standin_iters,
        "batch": s.standin_batch,
        "final_loss": loss.item(),
        "train_accuracy": _accuracy(model, train_x[:1000], train_y[:1000], normalize),
        "val_accuracy": _accuracy(model, val_x, val_y, normalize),
        "val_accuracy_constant_baseline": baseline,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, path)
    summary["seconds"] = time.perf_counter() - start
    return summary


def convert_standin(src, dst, threads):
    """``tools/convert_imagenet_checkpoint.py SRC DST`` in a subprocess; returns its output,
    raises if it failed."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, str(TOOL), str(src), str(dst)]
    proc = subprocess.run(
        cmd, check=False, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}")
    return proc.stdout


def prepare_standin(s, out, work, threads):
    """The stand-in's detectron2 checkpoint: reused from ``work``/standin when it was made with
    these settings, else trained and converted. Writes its summary to ``out``/standin.json;
    returns (checkpoint path, summary)."""
    folder = work / "standin"
    weights = folder / "R-50-standin-detectron2.pth"
    summary_path = folder / "summary.json"
    key = {k: v for k, v in s.fingerprint().items() if k.startswith("standin") or k == "device"}
    key["image_size"] = s.image_size
    if s.task != "digits":
        key["task"] = s.task
    if summary_path.exists() and weights.exists():
        summary = json.loads(summary_path.read_text())
        if summary.get("settings") == key:
            print(f"stand-in: reusing {weights}", flush=True)
            (out / "standin.json").write_text(json.dumps(summary, indent=1))
            return weights, summary
    tv_path = folder / "resnet50-standin-torchvision.pth"
    summary = train_standin(s, 0, tv_path)
    summary["conversion"] = convert_standin(tv_path, weights, threads)
    summary.update(settings=key, torchvision_checkpoint=str(tv_path))
    summary["detectron2_checkpoint"] = str(weights)
    summary_path.write_text(json.dumps(summary, indent=1))
    (out / "standin.json").write_text(json.dumps(summary, indent=1))
    print(
        f"stand-in ({summary['task']}): {summary['train_inputs']} inputs of "
        f"{summary['input_size']} px, {s.standin_iters} steps of {s.standin_batch}: val "
        f"accuracy {summary['val_accuracy']:.1f}% (constant baseline "
        f"{summary['val_accuracy_constant_baseline']:.1f}%) on {summary['val_inputs']} val-split "
        f"inputs; {summary['seconds']:.0f} s",
        flush=True,
    )
    return weights, summary

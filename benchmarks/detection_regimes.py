#!/usr/bin/env python
"""Table 2 of the paper in miniature: the detection transfer regimes x {2, 4, 8} images per GPU
on the bundled digits at 128 px (res4 8x8), each model evaluated with EMA, EN and peer rows.

Regimes (configs/regimes, the README's Configs table): (a) scratch; (b) "ImageNet"
convolutions, BN reset (MODEL.EVALNORM.RESET_NORM) and trained; (c) "ImageNet" convolutions
trained, BN frozen (FrozenEN), in the three readings of MODEL.EVALNORM.FROZEN_EN: "c" =
batch_target (frozen statistics in training, EN estimated against the batch-normalized
target), "c_frozen_target"
= (i) (EN estimated against the frozen normalization training produced), "c_batch_stats" =
(ii) (batch statistics in training, EMA and affine frozen); (d) "ImageNet" convolutions and BN
fine-tuned. "ImageNet" is a stand-in the benchmark pre-trains itself: a ResNet-50 at the
detector's width (1/8; stem 16) in torchvision's layout, trained for 10-class classification of
64 px windows around a digit cut from 128 px scenes of the detection data's renderer at native
scale, not resized (train-split digits, another seed than the detection data), so its BN
statistics come from inputs of the detector's scale; saved as a torchvision ``state_dict`` and
converted by ``tools/convert_imagenet_checkpoint.py``. (Multi-label classification of whole
scenes, ``standin_task`` "scenes", did not learn in minutes.)

Each cell is the Faster R-CNN R50-C4 of configs/benchmarks/detection_regimes.yaml trained with
alpha/beta estimated online; every cell takes 8 images per SGD step, the same learning rate,
iterations and data order (its seed); MODEL.EVALNORM.MICROBATCH normalizes the 8 images in
groups of N (one process = 8/N GPUs x N images), so only the normalization batch changes. The
same weights are then evaluated on the test split (digit samples never trained on) as: EMA, EN,
1/B^2, prediction-time BN (alpha = beta = 1), Summers and Dinneen's inference example weighing
(one alpha = beta for the whole network, the best AP of ``example_weights`` on a selection split
of train-split digits rendered with a seed of its own: neither training nor test images),
PreciseBN (population statistics over every normalization group), PreciseBN + EN offline, head
batch statistics (Wu and Johnson), and as a reference "test groups of N": the test images in
batches of N, the backbone normalized by each batch's own statistics as in training (what EN
approximates one image at a time), the ROI heads by their EMA. Cells recorded before that row
existed get it on a rerun, from their saved checkpoint.

Headline: regime (d) at 2 images, the share of the EMA gap that EN recovers,
(EN@2 - EMA@2) / (EMA@8 - EMA@2) in AP, per seed and of the means; the paper's is 78%.

    python benchmarks/detection_regimes.py [--mode smoke|quick|full] [--threads 1]
    python benchmarks/detection_regimes.py --task photo ...   # the harder data

``--task`` chooses the data: "digits" (default: 1-3 digits of 32-58 px on smooth backgrounds,
the demo's) or "photo" (1-6 digits of 15-32 px on crops of photographs: where "digits"
saturates, AP50 about 97 in regime (d), this one leaves room for the batch size to matter).
Each task has its own data, stand-in, folders and settings; the "photo" stand-in classifies
32 px windows, for 3000 steps (``task_settings``).

Each cell's result is written to ``--output-dir``/cells/<cell>.json as soon as it is done,
with ``results.json`` and ``results.md`` (means and spread over seeds) rewritten after each
cell; a rerun with the same settings skips the finished cells, other settings are refused
unless ``--overwrite``; ``--report-only`` rewrites both from every cell in the output dir.
Checkpoints, logs and the stand-in go to ``--work-dir`` (default
output/benchmarks/detection_regimes/<mode>/work), never to the output dir. Modes:

- smoke (CI): 32 px, 2 iterations per cell, every regime at N = 2 and 8: its numbers mean
  nothing.
- quick: the full mode's scale with 400 iterations (3200 images, as the 128 px demo), 1000
  training, 200 test and 100 selection images, and only the five cells that carry the
  conclusions: (d) at 2 and 8, (c) at 2 in its three readings, seed 0. Leaves out (a), (b),
  N = 4, (c) at 8 and the extra seeds. About 25 min with ``--threads 1`` (estimated from the
  full mode's measured times, not run end to end).
- full: 1000 iterations (8000 images), 2000 training, 300 test and 200 selection images, 26
  cells: the four regimes x {2, 4, 8} seed 0, (d) seeds 1 and 2, (c) and (c) (i) seed 1 at 2
  and 8, (c) (i) and (ii) at 2 and 8; ordered (d) 2 and 8, then every (c) at 2 and 8, then (a)
  2 and 8, then the rest. Measured with ``--threads 1`` on a 2-core machine whose other core ran
  another job: the stand-in 73 s, then 0.40 s per iteration; cell (d) N = 2: 436 s training +
  154 s evaluation (every row) = 9.8 min; N = 8: 456 + 208 s = 11.1 min; about 4.5 h in all
  (see each cell's "seconds").
"""

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from common import machine, resumable_output_dir  # benchmarks/, beside this file
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.utils.env import seed_all_rng
from torch import nn
from torch.nn import functional as F

from evalnorm_det import EvalNorm2d, EvalNormCheckpointer, Trainer, evalnorm_mode
from evalnorm_det.data.digits import (
    STYLES,
    datasets_root,
    generate_digits,
    generate_extra_split,
    render_split,
    split_paths,
)
from evalnorm_det.engine.defaults import setup_cfg
from evalnorm_det.engine.evaluation import fixed_coefficients

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "benchmarks" / "detection_regimes.yaml"
TOOL = ROOT / "tools" / "convert_imagenet_checkpoint.py"
IMS_PER_BATCH = 8  # images per SGD step in every cell; N of them per normalization group
METRICS = ("AP", "AP50", "AP75")
NUM_CLASSES = 10
# Seeds of the generated images: the detection data's train and test splits use 0 and 1
# (generate_digits), the stand-in's scenes and the example-weighing selection split these.
STANDIN_SEEDS = {"train": 100, "val": 101}
SELECTION_SEED = 200
# Table 2 (d) of the paper, ResNet-50 on COCO: EMA at 2 and 8 images per GPU, EN at 2 (AP).
PAPER_D = {"ema_2": 24.8, "en_2": 30.2, "ema_8": 31.7}
PAPER_RECOVERED = (PAPER_D["en_2"] - PAPER_D["ema_2"]) / (PAPER_D["ema_8"] - PAPER_D["ema_2"])

REGIMES = {
    "a": "(a) scratch: convolutions and BN trained",
    "b": "(b) stand-in weights, BN reset and trained",
    "c": "(c) stand-in weights, BN frozen; EN target: batch-normalized",
    "c_frozen_target": "(c, i) BN frozen; EN target: the frozen normalization",
    "c_batch_stats": "(c, ii) BN on batch statistics, EMA and affine frozen",
    "d": "(d) stand-in weights, BN fine-tuned",
}
# MODEL.EVALNORM.FROZEN_EN of the (c) regimes.
FROZEN_EN = {
    "c": "batch_target",
    "c_frozen_target": "frozen_target",
    "c_batch_stats": "batch_stats",
}

# The rows of a regime's block, in order, where measured: the trainer's test modes, EN - EMA
# and example weighing (chosen by the benchmark on the selection split).
ROW_LABELS = {
    "ema": "EMA",
    "en": "EN",
    "en-ema": "EN - EMA",
    "rule_of_thumb": "1/B^2",
    "prediction_time_bn": "pred.-time BN",
    "example_weighing": "example weigh.",
    "precise_bn": "PreciseBN",
    "precise_bn_en_offline": "PreciseBN+EN off",
    "head_batch_stats": "head batch st.",
    "test_groups": "test groups of N",
}
TEST_MODES = ("ema", "en", "rule_of_thumb", "prediction_time_bn", "precise_bn")
TEST_MODES += ("precise_bn_en_offline", "head_batch_stats")

logger = logging.getLogger("evalnorm_det.benchmarks.detection_regimes")


def _cells(regimes, images, seeds):
    return tuple((r, n, s) for s in seeds for r in regimes for n in images)


FULL_CELLS = (
    _cells("d", (2, 8), (0,))
    + _cells(FROZEN_EN, (2, 8), (0,))
    + _cells("a", (2, 8), (0,))
    + _cells("b", (2, 8), (0,))
    + _cells("abcd", (4,), (0,))
    + _cells("d", (2, 8, 4), (1, 2))
    + _cells("c", (2, 8), (1,))
    + _cells(("c_frozen_target",), (2, 8), (1,))
)


@dataclasses.dataclass
class Settings:
    """One mode's settings; ``--device``, ``--iters`` override theirs, ``--regimes``,
    ``--images-per-gpu`` and ``--seed`` select among its cells."""

    device: str
    cells: tuple  # (regime, N, seed) in the order they run
    # The detection data's style (evalnorm_det.data.digits.STYLES): "digits" (1-3 digits of
    # 32-58 px on smooth backgrounds) or "photo" (1-6 of 15-32 px on photographs, harder).
    task: str = "digits"
    image_size: int = 128
    num_train: int = 1000
    num_val: int = 200  # the test split
    num_select: int = 100  # the selection split of example weighing
    iters: int = 400
    warmup_iters: int = 50
    # The demo's 0.01 per image (0.02 at 2 images), scaled linearly to the 8 images of a step.
    base_lr: float = 0.08
    pooler_resolution: int = 8
    rois_per_image: int = 32
    rpn_batch_per_image: int = 128
    rpn_topk_train: tuple = (600, 100)  # PRE_NMS_TOPK_TRAIN, POST_NMS_TOPK_TRAIN
    rpn_topk_test: tuple = (600, 100)
    test_modes: tuple = TEST_MODES
    precise_bn_iters: int = 100  # batches of N images (TEST.PRECISE_BN.NUM_ITER)
    offline_iters: int = 200  # MODEL.EVALNORM.OFFLINE.MAX_ITER
    example_weights: tuple = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
    score_thresh_test: float = 0.05
    num_workers: int = 0  # data-loading processes (DATALOADER.NUM_WORKERS)
    # The stand-in: "crops" (the digit of a standin_crop px window of standin_images rendered
    # scenes, at native scale: 93% top-1 on val-split windows in 160 s on one thread) or
    # "scenes" (multi-label classification of whole scenes: stayed at its constant baseline,
    # 80.8% of the present/absent decisions right, with LR 0.1 x 1500 or 0.02 x 2000 steps).
    standin_task: str = "crops"
    standin_crop: int = 64
    standin_images: int = 3000
    standin_iters: int = 1500
    standin_batch: int = 32
    standin_lr: float = 0.1

    def anchor_sizes(self):
        return [[round(s * self.image_size / 128) for s in (16, 32, 64)]]

    def fingerprint(self):
        """What a cell's numbers depend on (everything but the choice of cells), as JSON."""
        d = dataclasses.asdict(self)
        del d["cells"]
        if d["task"] == "digits":  # as recorded before there was a choice: still resumable
            del d["task"]
        return json.loads(json.dumps(d))


def task_settings(s):
    """What the task changes in a mode's settings. "photo": its 64 px windows hold clutter and
    other digits, and the stand-in stayed near chance on them (16.5% top-1 after 1500 steps;
    15% on 48 px windows); on windows of a quarter of the image (32 px at 128), where the digit
    fills most of the window, it reached 73% in 1500 steps and 82% in 3000."""
    if s.task == "photo":
        return dataclasses.replace(
            s, standin_crop=s.image_size // 4, standin_iters=2 * s.standin_iters
        )
    return s


MODES = {
    # CI: exercises the whole path in seconds; its numbers mean nothing.
    "smoke": Settings(
        device="cpu",
        cells=_cells(REGIMES, (2, 8), (0,)),
        image_size=32,
        num_train=8,
        num_val=4,
        num_select=4,
        iters=2,
        warmup_iters=1,
        base_lr=0.005,
        score_thresh_test=0.0,  # some detections, so that every AP is a number
        pooler_resolution=2,
        rois_per_image=8,
        rpn_batch_per_image=16,
        rpn_topk_train=(50, 16),
        rpn_topk_test=(50, 16),
        precise_bn_iters=2,
        offline_iters=2,
        example_weights=(0.0, 0.1),
        standin_crop=16,
        standin_images=16,
        standin_iters=4,
        standin_batch=8,
    ),
    "quick": Settings(
        device="cpu",
        cells=_cells("d", (2, 8), (0,)) + _cells(FROZEN_EN, (2,), (0,)),
    ),
    "full": Settings(
        device="cpu",
        cells=FULL_CELLS,
        num_train=2000,
        num_val=300,
        num_select=200,
        iters=1000,
        warmup_iters=100,
    ),
}


# ----------------------------------------------------------------------------------------------
# The "ImageNet" stand-in
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# The cells
# ----------------------------------------------------------------------------------------------
def register_datasets(mode, s):
    """Generates the mode's data under ``$DETECTRON2_DATASETS/detection_regimes_<mode>`` (with
    ``_<task>`` after it but for "digits") and registers it as
    ``regimes_<task>_<mode>_{train,val,selection}``: train (even digit samples, seed 0), val
    (the test split: odd digit samples, seed 1) and selection (train-split digit samples, seed
    SELECTION_SEED: images in neither); returns the three names."""
    root = os.path.join(datasets_root(), f"detection_regimes_{mode}{task_suffix(s)}")
    dataset_dir = generate_digits(root, s.num_train, s.num_val, s.image_size, 0, s.task)
    paths = {split: split_paths(dataset_dir, split) for split in ("train", "val")}
    paths["selection"] = generate_extra_split(
        os.path.join(root, "selection"), "train", s.num_select, s.image_size, SELECTION_SEED, s.task
    )
    names = []
    for split, (json_file, image_root) in paths.items():
        name = f"regimes_{s.task}_{mode}_{split}"
        if name in DatasetCatalog:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {}, json_file, image_root)
        names.append(name)
    return names


def regime_opts(regime, weights):
    """The KEY VALUE overrides that make ``regime`` of the base config (as configs/regimes)."""
    if regime == "a":
        return ["MODEL.WEIGHTS", ""]
    opts = ["MODEL.WEIGHTS", str(weights)]
    if regime == "b":
        opts += ["MODEL.EVALNORM.RESET_NORM", "True"]
    elif regime in FROZEN_EN:
        opts += ["MODEL.EVALNORM.BACKBONE_NORM", "FrozenEN", "MODEL.EVALNORM.ROI_HEAD_NORM"]
        opts += ["FrozenEN", "MODEL.EVALNORM.FROZEN_EN", FROZEN_EN[regime]]
    return opts


def cell_name(regime, n, seed):
    return f"{regime}_{n}img_seed{seed}"


def cell_config(s, datasets, regime, n, seed, weights, output_dir):
    """The frozen, checked config of one cell: ``regime`` at N = ``n`` images per emulated GPU
    (IMS_PER_BATCH 8 normalized in groups of n), seed ``seed``, writing to ``output_dir``."""
    opts = [
        "MODEL.DEVICE", s.device,
        "MODEL.EVALNORM.NORM_BATCH_SIZE", n,
        "MODEL.EVALNORM.MICROBATCH", True,
        "MODEL.EVALNORM.OFFLINE.MAX_ITER", s.offline_iters,
        "MODEL.ANCHOR_GENERATOR.SIZES", str(s.anchor_sizes()),
        "MODEL.RPN.BATCH_SIZE_PER_IMAGE", s.rpn_batch_per_image,
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN", s.rpn_topk_train[0],
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", s.rpn_topk_train[1],
        "MODEL.RPN.PRE_NMS_TOPK_TEST", s.rpn_topk_test[0],
        "MODEL.RPN.POST_NMS_TOPK_TEST", s.rpn_topk_test[1],
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", s.rois_per_image,
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", s.pooler_resolution,
        "INPUT.SQUARE_SIZE", s.image_size,
        "DATASETS.TRAIN", f"('{datasets[0]}',)",
        "DATASETS.TEST", f"('{datasets[1]}',)",
        "SOLVER.IMS_PER_BATCH", IMS_PER_BATCH,
        "SOLVER.BASE_LR", s.base_lr,
        "SOLVER.MAX_ITER", s.iters,
        "SOLVER.WARMUP_ITERS", min(s.warmup_iters, s.iters // 5),
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", s.score_thresh_test,
        "DATALOADER.NUM_WORKERS", s.num_workers,
        "TEST.EVALNORM_MODES", str(list(s.test_modes)),
        "TEST.PRECISE_BN.NUM_ITER", s.precise_bn_iters,
        "SEED", seed,
        "OUTPUT_DIR", str(output_dir),
    ]  # fmt: skip
    return setup_cfg(str(CONFIG), [str(v) for v in opts] + regime_opts(regime, weights), 1)


def example_weighing(cfg, model, selection, weights):
    """Summers and Dinneen's inference example weighing: alpha = beta = w in every layer, w the
    first of ``weights`` with the best AP on the ``selection`` dataset; returns (w, {w: AP}) and
    the COCO results of w on the test dataset."""
    loader = Trainer.build_test_loader(cfg, selection)
    selection_ap = {}
    for w in weights:
        with fixed_coefficients(model, w):
            res = Trainer._evaluate_mode(cfg, model, selection, loader, f"example_weight_{w:g}")
        selection_ap[w] = _finite(res["bbox"].get("AP"))
    chosen = max(weights, key=lambda w: -1.0 if selection_ap[w] is None else selection_ap[w])
    test = cfg.DATASETS.TEST[0]
    with fixed_coefficients(model, chosen):
        res = Trainer._evaluate_mode(
            cfg, model, test, Trainer.build_test_loader(cfg, test), "example_weighing"
        )
    return chosen, {f"{w:g}": ap for w, ap in selection_ap.items()}, res


def test_groups(cfg, model):
    """COCO results on the test dataset with every backbone norm on the statistics of its test
    batch, batches of N = ``MODEL.EVALNORM.NORM_BATCH_SIZE`` images in dataset order (the last
    one smaller where N does not divide the test set), and the ROI heads on their EMA: the
    backbone normalization training computes, which EN approximates one image at a time. (The
    heads trained on sampled ROIs, which a test batch does not reproduce: "head batch
    statistics" measures that.) A reference, not a way to deploy."""
    test = cfg.DATASETS.TEST[0]
    loader = Trainer.build_test_loader(cfg, test, batch_size=cfg.MODEL.EVALNORM.NORM_BATCH_SIZE)
    with evalnorm_mode(model, "ema"), evalnorm_mode(model.backbone, "batch"):
        return Trainer._evaluate_mode(cfg, model, test, loader, "test_groups")


def add_test_groups(s, datasets, cell, work):
    """Adds the "test_groups" row to a cell finished before that row was measured, from its
    saved final checkpoint; True if it did (nothing to do, or no checkpoint: False)."""
    name = cell["name"]
    checkpoint = work / "cells" / name / "model_final.pth"
    if "test_groups" in cell["results"] or "error" in cell or not checkpoint.is_file():
        return False
    cfg = cell_config(s, datasets, cell["regime"], cell["images_per_gpu"], cell["seed"],
                      checkpoint, work / "cells" / name)  # fmt: skip
    model = Trainer.build_model(cfg)
    EvalNormCheckpointer(model).load(str(checkpoint))
    began = time.perf_counter()
    stdout = work / "cells" / name / "stdout_test_groups.txt"  # pycocotools' prints
    with open(stdout, "w") as f, contextlib.redirect_stdout(f):
        res = test_groups(cfg, model)
    cell["results"]["test_groups"] = {m: _finite(res["bbox"].get(m)) for m in METRICS}
    cell["seconds"]["test_groups_added"] = time.perf_counter() - began
    print(f"  {name}: test groups of N added from {checkpoint}", flush=True)
    return True


def coefficient_summary(model):
    """Mean, min and max of alpha and beta over the EvalNorm layers of the backbone and of the
    ROI heads."""
    summary = {}
    for part in ("backbone", "roi_heads"):
        layers = [m for m in getattr(model, part).modules() if isinstance(m, EvalNorm2d)]
        for name in ("alpha", "beta"):
            values = [getattr(m, name).item() for m in layers]
            if values:
                summary[f"{part}_{name}"] = {
                    "mean": float(np.mean(values)),
                    "min": min(values),
                    "max": max(values),
                }
    return summary


def run_cell(cfg, selection, weights):
    """Trains ``cfg`` (without its test set) from seed ``cfg.SEED``, evaluates the final weights
    in every mode through ``Trainer.test`` (which writes ``evalnorm_results.json`` to
    OUTPUT_DIR) and with example weighing. Returns ({mode: {metric: value or None}}, extra
    record fields, {"train", "eval": seconds})."""
    train_cfg = cfg.clone()
    train_cfg.defrost()
    train_cfg.DATASETS.TEST = ()
    train_cfg.freeze()
    start = time.perf_counter()
    seed_all_rng(cfg.SEED)  # the model's initialization and the data order
    trainer = Trainer(train_cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    trained = time.perf_counter()
    model = trainer.model
    Trainer.test(cfg, model)
    with open(os.path.join(cfg.OUTPUT_DIR, "evalnorm_results.json")) as f:
        per_mode = json.load(f)
    chosen, selection_ap, res = example_weighing(cfg, model, selection, weights)
    per_mode["example_weighing"] = res
    per_mode["test_groups"] = test_groups(cfg, model)
    results = {
        mode: {m: _finite(r["bbox"].get(m)) for m in METRICS} for mode, r in per_mode.items()
    }
    extra = {
        "example_weighing": {"chosen": chosen, "selection_ap": selection_ap},
        "coefficients": coefficient_summary(model),
    }
    seconds = {"train": trained - start, "eval": time.perf_counter() - trained}
    return results, extra, seconds


def measure_cell(s, datasets, regime, n, seed, weights, work):
    """Runs one cell in ``work``/cells/<name> (its config.yaml, logs, metrics, checkpoint,
    evalnorm_results.json there), prints a line; returns its record. A cell that diverges is
    recorded with its error and no numbers."""
    name = cell_name(regime, n, seed)
    cfg = cell_config(s, datasets, regime, n, seed, weights, work / "cells" / name)
    shutil.rmtree(cfg.OUTPUT_DIR, ignore_errors=True)  # nothing left from an interrupted try
    os.makedirs(cfg.OUTPUT_DIR)
    with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    logger.info("Cell %s", name)
    stdout = os.path.join(cfg.OUTPUT_DIR, "stdout.txt")  # pycocotools' prints
    cell = {"name": name, "regime": regime, "images_per_gpu": n, "seed": seed}
    began = time.perf_counter()
    try:
        with open(stdout, "w") as f, contextlib.redirect_stdout(f):
            cell["results"], extra, cell["seconds"] = run_cell(cfg, datasets[2], s.example_weights)
        cell.update(extra)
    except FloatingPointError as e:  # diverged: a "-" in the table, not a lost run
        logger.exception("Cell %s diverged", name)
        modes = (*s.test_modes, "example_weighing")
        cell["results"] = {m: dict.fromkeys(METRICS) for m in modes}
        cell["seconds"] = {"train": time.perf_counter() - began, "eval": 0.0}
        cell["error"] = f"{type(e).__name__}: {e}"
    seconds, results = cell["seconds"], cell["results"]
    seconds["total"] = seconds["train"] + seconds["eval"]
    cell["work_dir"] = cfg.OUTPUT_DIR
    cell["torch_threads"] = torch.get_num_threads()
    print(
        f"  {name}: AP EMA {_fmt(results['ema']['AP'])}, EN {_fmt(results['en']['AP'])}; train "
        f"{seconds['train']:.0f} s ({s.iters} it), eval {seconds['eval']:.0f} s"
        + (f"; {cell['error']}" if "error" in cell else ""),
        flush=True,
    )
    return cell


def _finite(value):
    return None if value is None or not math.isfinite(value) else float(value)


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------
def gap_recovered(ema_small, en_small, ema_large):
    """(EN@small - EMA@small) / (EMA@large - EMA@small): the share of the EMA gap between the
    small and the large normalization batch that EN recovers at the small one; None when the
    gap is <= 0 (EMA not worse at the small batch: the ratio means nothing) or a value is
    missing."""
    if None in (ema_small, en_small, ema_large) or ema_large - ema_small <= 0:
        return None
    return (en_small - ema_small) / (ema_large - ema_small)


def _with_difference(results):
    """The cell's results with an "en-ema" row where EN and EMA are both present."""
    rows = dict(results)
    if "ema" in rows and "en" in rows:
        rows["en-ema"] = {
            m: None if None in (rows["en"][m], v) else rows["en"][m] - v
            for m, v in rows["ema"].items()
        }
    return rows


def mean_table(cells):
    """{regime: {n: {row: {metric: {"mean", "std", "n"}}}}} over the cells' seeds: the mean
    (None if a seed has none), the sample standard deviation (None with one seed) and the
    number of seeds; rows are the modes and "en-ema"."""
    values = {}
    for cell in cells:
        per_n = values.setdefault(cell["regime"], {}).setdefault(cell["images_per_gpu"], {})
        for row, metrics in _with_difference(cell["results"]).items():
            for metric, value in metrics.items():
                per_n.setdefault(row, {}).setdefault(metric, []).append(value)
    table = {}
    for regime in [r for r in REGIMES if r in values]:
        table[regime] = {}
        for n in sorted(values[regime]):
            table[regime][n] = {
                row: {m: _stats(v) for m, v in metrics.items()}
                for row, metrics in values[regime][n].items()
            }
    return table


def _stats(values):
    if None in values:
        return {"mean": None, "std": None, "n": len(values)}
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"mean": float(np.mean(values)), "std": std, "n": len(values)}


def _fmt(value, signed=False):
    if value is None:
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _fmt_stats(stats, signed=False):
    """ "mean" or "mean±std" (with more than one seed)."""
    text = _fmt(stats["mean"], signed)
    return text if stats["std"] is None else f"{text}±{stats['std']:.2f}"


def _rows(per_regime):
    measured = set().union(*(rows for rows in per_regime.values()))
    return [row for row in ROW_LABELS if row in measured]


def _entries(per_regime, row, images_per_gpu):
    """The row's AP/AP50/AP75 per N as text: "." where the cell was not run."""
    out = []
    for n in images_per_gpu:
        for m in METRICS:
            stats = per_regime.get(n, {}).get(row, {}).get(m)
            out.append("." if stats is None else _fmt_stats(stats, row == "en-ema"))
    return out


def format_text(table, images_per_gpu, title):
    """The table as text, in the layout of the paper's Table 2 (mean±std over seeds)."""
    width = 14
    heads = "".join(f"{f'{n} images/GPU':^{3 * width}}" for n in images_per_gpu)
    lines = [title, f"{'':<17}{heads}"]
    lines.append(f"{'':<17}" + "".join(f"{m:>{width}}" for _ in images_per_gpu for m in METRICS))
    for regime, per_regime in table.items():
        lines.append(REGIMES[regime])
        for row in _rows(per_regime):
            cells = "".join(e.rjust(width) for e in _entries(per_regime, row, images_per_gpu))
            lines.append(f"{ROW_LABELS[row]:<17}{cells}")
    return "\n".join(lines)


def format_markdown(table, images_per_gpu):
    """The table in markdown: one block of rows per regime, AP/AP50/AP75 per N."""
    header = ["regime / row"] + [f"{m} ({n} img)" for n in images_per_gpu for m in METRICS]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for regime, per_regime in table.items():
        lines.append(f"| **{REGIMES[regime]}** " + "| " * (len(header) - 1) + "|")
        for row in _rows(per_regime):
            entries = _entries(per_regime, row, images_per_gpu)
            lines.append(f"| {ROW_LABELS[row]} | " + " | ".join(entries) + " |")
    return "\n".join(lines)


def headline(cells):
    """The share of regime (d)'s EMA gap EN recovers at 2 images (AP): per seed with both N = 2
    and 8, and of the means over those seeds."""
    d = {(c["images_per_gpu"], c["seed"]): c["results"] for c in cells if c["regime"] == "d"}
    seeds = sorted(s for n, s in d if n == 2 and (8, s) in d)
    paper = (
        f"paper: {PAPER_RECOVERED:.0%} ({PAPER_D['ema_2']} -> {PAPER_D['en_2']} against "
        f"{PAPER_D['ema_8']})"
    )
    if not seeds:
        return {
            "recovered": None,
            "per_seed": {},
            "text": "Gap recovered: not measured (needs regime d at 2 and 8)",
        }
    per_seed = {}
    for s in seeds:
        ema_2, en_2, ema_8 = d[2, s]["ema"]["AP"], d[2, s]["en"]["AP"], d[8, s]["ema"]["AP"]
        per_seed[str(s)] = {
            "ema_2": ema_2,
            "en_2": en_2,
            "ema_8": ema_8,
            "recovered": gap_recovered(ema_2, en_2, ema_8),
        }

    def mean(key):
        v = [p[key] for p in per_seed.values()]
        return None if None in v else float(np.mean(v))

    ema_2, en_2, ema_8 = mean("ema_2"), mean("en_2"), mean("ema_8")
    recovered = gap_recovered(ema_2, en_2, ema_8)
    seeds_text = ", ".join(
        f"seed {s}: " + ("undefined" if p["recovered"] is None else f"{p['recovered']:.0%}")
        for s, p in per_seed.items()
    )
    if None in (ema_2, en_2, ema_8):
        text = f"Regime (d), 2 images: gap recovered undefined (missing values); {paper}"
    elif recovered is None:
        text = (
            f"Regime (d), 2 images: gap recovered undefined: EMA@8 - EMA@2 = "
            f"{_fmt(ema_8 - ema_2, True)} AP <= 0, EMA at 2 images is not worse than at 8 here, "
            f"so the ratio is meaningless ({seeds_text}); {paper}"
        )
    else:
        text = (
            f"Regime (d), 2 images: EN recovers {recovered:.0%} of the EMA gap ({_fmt(ema_2)} -> "
            f"{_fmt(en_2)} AP against {_fmt(ema_8)} at 8 images, mean of {len(seeds)} seed(s); "
            f"{seeds_text}); {paper}"
        )
    return {
        "ema_2": ema_2,
        "en_2": en_2,
        "ema_8": ema_8,
        "recovered": recovered,
        "per_seed": per_seed,
        "text": text,
    }


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _logging_to(path):
    """Within the block, detectron2's and EvalNorm's logs (training, evaluation) go to ``path``
    only: the Trainer would otherwise set up a logger on stdout. Restored on exit."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s]: %(message)s", "%m/%d %H:%M:%S"))
    loggers = [logging.getLogger(name) for name in ("detectron2", "evalnorm_det", "fvcore")]
    saved = [(log, log.level, log.propagate) for log in loggers]
    for log in loggers:
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    try:
        yield
    finally:
        for log, level, propagate in saved:
            log.removeHandler(handler)
            log.setLevel(level)
            log.propagate = propagate
        handler.close()


def argument_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument(
        "--task",
        choices=sorted(STYLES),
        default="digits",
        help="the detection data: 'digits' (default) or 'photo' (smaller digits on photographs)",
    )
    parser.add_argument(
        "--output-dir", help="small results (JSON, markdown); default: --work-dir's parent"
    )
    parser.add_argument(
        "--work-dir",
        help="checkpoints, logs, stand-in (default: "
        "output/benchmarks/detection_regimes/MODE[_TASK]/work)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="discard earlier results, even of other settings"
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the mode's)")
    parser.add_argument("--iters", type=int, help="training iterations per cell")
    parser.add_argument(
        "--regimes", nargs="+", choices=list(REGIMES), help="only the mode's cells of these"
    )
    parser.add_argument(
        "--images-per-gpu",
        type=int,
        nargs="+",
        help=f"only the mode's cells of these N (each dividing {IMS_PER_BATCH})",
    )
    parser.add_argument(
        "--seed", type=int, nargs="+", help="these seeds for every selected (regime, N)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: unchanged)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite results.json and results.md from every cell in the output dir; no training",
    )
    return parser


def settings_from_args(args):
    s = task_settings(dataclasses.replace(MODES[args.mode], task=args.task))
    if args.device:
        s.device = args.device
    if args.iters:
        s.iters = args.iters
    cells = s.cells
    if args.regimes:
        cells = tuple(c for c in cells if c[0] in args.regimes)
    if args.images_per_gpu:
        bad = [n for n in args.images_per_gpu if n < 1 or IMS_PER_BATCH % n]
        if bad:
            raise SystemExit(f"error: --images-per-gpu {bad}: each must divide {IMS_PER_BATCH}")
        cells = tuple(c for c in cells if c[1] in args.images_per_gpu)
    if args.seed:
        pairs = list(dict.fromkeys((r, n) for r, n, _ in cells))
        cells = tuple((r, n, seed) for seed in args.seed for r, n in pairs)
    if not cells:
        raise SystemExit(f"error: no cell of mode {args.mode!r} matches the selection")
    s.cells = cells
    return s


def task_suffix(s):
    """ "" for the "digits" task, else "_<task>": folder names of one task apart from another's."""
    return "" if s.task == "digits" else f"_{s.task}"


def prepare_dirs(out, work, s, args):
    """Creates ``out`` and ``work``. Results of other settings (``out``/settings.json) are
    refused unless ``--overwrite``, which discards every earlier result and cell; with the same
    settings the finished cells are kept (resumed)."""
    settings = {"mode": args.mode, "settings": s.fingerprint()}
    outputs = ("cells", "results.json", "results.md", "standin.json")
    if args.overwrite:
        shutil.rmtree(work / "cells", ignore_errors=True)
    resumable_output_dir(out, settings, args.overwrite, outputs)
    (out / "cells").mkdir(exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)


def main(argv=None):
    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.report_only and args.overwrite:
        parser.error("--report-only reads the cells that --overwrite would delete: pass one")
    args.argv = sys.argv[1:] if argv is None else list(argv)
    s = settings_from_args(args)
    default = Path(f"output/benchmarks/detection_regimes/{args.mode}{task_suffix(s)}")
    out = Path(args.output_dir) if args.output_dir else default
    work = Path(args.work_dir) if args.work_dir else default / "work"
    prepare_dirs(out, work, s, args)
    if args.report_only:
        return report_only(args, s, out)
    if args.threads:
        torch.set_num_threads(args.threads)
    with _logging_to(work / "log.txt"):
        return run(args, s, out, work)


def run(args, s, out, work):
    """Trains the stand-in (or reuses it) and every cell not done yet, writing each cell's JSON
    when it is done and the tables after each; returns the report (``results.json``)."""
    start = time.perf_counter()
    where = machine(s.device)
    print(
        f"detection_regimes --mode {args.mode}: {len(s.cells)} cells; {s.device}, "
        f"{where['torch_threads']} thread(s); results in {out}, work files in {work}",
        flush=True,
    )
    datasets = register_datasets(args.mode, s)
    weights = None
    failed = []
    for regime, n, seed in s.cells:
        path = out / "cells" / f"{cell_name(regime, n, seed)}.json"
        if path.exists():
            cell = json.loads(path.read_text())
            if cell.get("settings") != s.fingerprint():
                raise FileExistsError(f"{path} was measured with other settings: --overwrite")
            print(f"  {cell['name']}: done earlier, skipped", flush=True)
            if add_test_groups(s, datasets, cell, work):
                path.write_text(json.dumps(cell, indent=1))
                write_report(args, s, out, cells_done(s, out), where, start, failed)
            continue
        if regime != "a" and weights is None:
            weights, _ = prepare_standin(s, out, work, args.threads)
        try:
            cell = measure_cell(s, datasets, regime, n, seed, weights, work)
        except Exception as e:
            name = cell_name(regime, n, seed)
            logger.exception("Cell %s failed", name)
            print(f"  {name}: FAILED ({type(e).__name__}: {e}); a rerun retries it", flush=True)
            failed.append(name)
            continue
        cell["settings"] = s.fingerprint()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cell, indent=1))
        tmp.replace(path)  # a cell is there whole or not at all
        write_report(args, s, out, cells_done(s, out), where, start, failed)
    return write_report(args, s, out, cells_done(s, out), where, start, failed, final=True)


def cells_done(s, out):
    """Every cell in ``out``/cells, whichever run measured it, in the full mode's order."""
    order = {cell: i for i, cell in enumerate(FULL_CELLS)}
    cells = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    for cell in cells:
        if cell.get("settings") != s.fingerprint():
            raise FileExistsError(f"{out}/cells/{cell['name']}.json: other settings")
    cells.sort(key=lambda c: order.get((c["regime"], c["images_per_gpu"], c["seed"]), len(order)))
    return cells


def report_only(args, s, out):
    """``results.json`` and ``results.md`` of every cell in ``out``/cells, as a run that
    finished them would write."""
    cells = cells_done(s, out)
    if not cells:
        raise SystemExit(f"error: no cell in {out / 'cells'} to report")
    return write_report(args, s, out, cells, machine(s.device), time.perf_counter(), final=True)


def write_report(args, s, out, cells, where, start, failed=(), final=False):
    """``results.json`` and ``results.md`` of ``cells``, every cell in the output dir, so that
    runs of disjoint selections (``--regimes``, ``--images-per-gpu``, ``--seed``) can share it
    side by side (printed too when ``final``)."""
    table = mean_table(cells)
    images = sorted({c["images_per_gpu"] for c in cells})
    seeds = sorted({c["seed"] for c in cells})
    title = (
        f"{s.num_val} test images ({s.task}): COCO box AP (%), {s.image_size} px, "
        f"{IMS_PER_BATCH} images "
        f"per SGD step normalized in groups of N (one process = {IMS_PER_BATCH}/N GPUs x N "
        f"images), {s.iters} iterations, seeds {seeds} (mean±std where more than one)"
    )
    text = format_text(table, images, title)
    head = headline(cells)
    note = (
        f"Every cell: same SGD batch ({IMS_PER_BATCH} images), LR {s.base_lr}, iterations and "
        "data order per seed; only the normalization batch N changes (paper: 8 GPUs x N "
        "images, LR 0.015 x N / 8). Rows: the same weights evaluated with EMA, EN (alpha/beta "
        "estimated online), 1/B^2, prediction-time BN (alpha = beta = 1), example weighing "
        "(one alpha = beta for the network, chosen among "
        f"{list(s.example_weights)} on {s.num_select} selection images), PreciseBN "
        f"({s.precise_bn_iters} batches of N images; it changes nothing where training "
        "normalizes with frozen statistics), PreciseBN + EN offline, head batch statistics, "
        "and test groups of N (the test "
        "images in batches of N, the backbone normalized by their batch's statistics as in "
        "training, the ROI heads by their EMA). "
        "'.': not run; '-': no finite detection (COCO AP undefined) or a diverged cell."
    )
    standin_path = out / "standin.json"
    report = {
        "benchmark": "detection_regimes",
        "mode": args.mode,
        "argv": args.argv,
        "settings": {
            **s.fingerprint(),
            "ims_per_batch": IMS_PER_BATCH,
            "anchor_sizes": s.anchor_sizes(),
            "config": str(CONFIG.relative_to(ROOT)),
        },
        "protocol": note,
        "machine": {**where, "load_average_now": list(os.getloadavg())},
        "standin": json.loads(standin_path.read_text()) if standin_path.exists() else {},
        "cells": [c["name"] for c in cells],
        "failed_cells": list(failed),
        "table": {
            r: {str(n): rows for n, rows in per_regime.items()} for r, per_regime in table.items()
        },
        "headline": {**head, "metric": "AP", "paper": PAPER_D, "paper_recovered": PAPER_RECOVERED},
        "wall_seconds": {
            "cells": sum(c["seconds"]["total"] for c in cells),
            "this_run": time.perf_counter() - start,
        },
        "complete": final and not failed,
    }
    with open(out / "results.json", "w") as f:
        json.dump(report, f, indent=1)
    markdown = format_markdown(table, images)
    with open(out / "results.md", "w") as f:
        f.write(f"{title}\n\n{markdown}\n\n{head['text']}\n\n{note}\n")
    if final:
        print(f"\n{text}\n\n{head['text']}\n{note}", flush=True)
    return report


if __name__ == "__main__":
    main()

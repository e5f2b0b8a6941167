#!/usr/bin/env python
"""Table 2 of the paper in miniature: the four detection transfer regimes x {2, 4, 8} images
per GPU on the bundled digits, each model evaluated with EMA (vanilla BatchNorm) and EN.

Regimes (configs/regimes, DESIGN-NOTES.md): (a) scratch, convolutions and BN trained; (b)
"ImageNet" convolutions, BN reset (MODEL.EVALNORM.RESET_NORM) and trained; (c) "ImageNet"
convolutions trained, BN frozen (FrozenEN); (d) "ImageNet" convolutions and BN fine-tuned.
"ImageNet" is a stand-in the benchmark pre-trains itself: a ResNet-50 at the detector's width
(1/8; stem 16, bottleneck widths 8/16/32/64) in torchvision's layout, trained for 10-way digit
classification on crops of images rendered as the detection data (train-split digits on its
backgrounds, various scales, RGB, torchvision's pixel mean/std), saved as a torchvision
``state_dict`` and converted by ``tools/convert_imagenet_checkpoint.py``, run as a subprocess.

Each cell is the Faster R-CNN R50-C4 of configs/benchmarks/detection_regimes.yaml trained with
alpha/beta estimated online, then evaluated by ``Trainer.test`` in the modes EMA and EN (same
weights). Unlike the paper, which ran 8 GPUs x N images with the learning rate scaled by N,
every cell here takes the same SGD batch of 8 images per iteration, the same learning rate,
iterations, data order and seed; MODEL.EVALNORM.MICROBATCH normalizes the 8 images in groups of
N (the backbone's EN layers, and res5 on the ROIs of each group), i.e. one process reproduces
8/N GPUs x N images, so only the normalization batch changes, as in the paper's section 4.1.

Headline: regime (d) at 2 images, the share of the EMA gap that EN recovers,
(EN@2 - EMA@2) / (EMA@8 - EMA@2) in AP; the paper's is 78% (24.8 -> 30.2 against 31.7).

    python benchmarks/detection_regimes.py [--mode quick|full|smoke] [--threads 2]

Prints the table and writes ``results.json`` (every cell's AP/AP50/AP75 per mode, settings,
machine, wall times) and ``results.md`` to ``--output-dir`` (default
output/benchmarks/detection_regimes/<mode>; earlier results are kept unless ``--overwrite``),
with each cell's config, log, metrics, checkpoint and ``evalnorm_results.json`` in ``cells/``.
Modes, timed on the project's 2-core CPU machine:

- smoke (CI): 32 px, 2 iterations per cell, a stand-in of 4 steps: ~20 s. Its numbers mean
  nothing ("-" where a model made no finite detection).
- quick (default): 64 px, 1000/200 images, 400 iterations per cell at LR 0.08, a stand-in of
  1000 steps (~85% top-1 on held-out digits): 30 min with ``--threads 2`` on an idle machine,
  38 min with one thread beside other jobs; ``--iters 200`` halves the cells' time, but the
  detectors then barely start to learn. The APs move by several points from run to run (one
  thread or two changes them), so read one quick table as an example, not a measurement.
- full: a GPU (``--device cuda``), 128 px, 4000/500 images, 3000 iterations, 3 seeds (the
  table shows their means; one stand-in, from the first), 1/B^2 as an extra row; not timed
  yet (no GPU machine so far).
"""

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision
from common import machine, prepare_output_dir, write_results  # benchmarks/, beside this file
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.utils.env import seed_all_rng
from torch import nn
from torch.nn import functional as F

from evalnorm_det import Trainer
from evalnorm_det.data.digits import (
    datasets_root,
    generate_digits,
    load_digit_samples,
    render_image,
    split_paths,
)
from evalnorm_det.engine.defaults import setup_cfg

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "benchmarks" / "detection_regimes.yaml"
TOOL = ROOT / "tools" / "convert_imagenet_checkpoint.py"
IMS_PER_BATCH = 8  # images per SGD step in every cell; N of them per normalization group
METRICS = ("AP", "AP50", "AP75")
# Table 2 (d) of the paper, ResNet-50 on COCO: EMA at 2 and 8 images per GPU, EN at 2 (AP).
PAPER_D = {"ema_2": 24.8, "en_2": 30.2, "ema_8": 31.7}
PAPER_RECOVERED = (PAPER_D["en_2"] - PAPER_D["ema_2"]) / (PAPER_D["ema_8"] - PAPER_D["ema_2"])

REGIMES = {
    "a": "(a) scratch: convolutions and BN trained",
    "b": "(b) stand-in weights, BN reset and trained",
    "c": "(c) stand-in weights, BN frozen (FrozenEN)",
    "d": "(d) stand-in weights, BN fine-tuned",
}

logger = logging.getLogger("evalnorm_det.benchmarks.detection_regimes")


@dataclasses.dataclass
class Settings:
    """One mode's settings; ``--device``, ``--iters``, ``--regimes``, ``--images-per-gpu`` and
    ``--seed`` override theirs."""

    device: str
    seeds: tuple
    regimes: tuple = tuple(REGIMES)
    images_per_gpu: tuple = (2, 4, 8)
    # The defaults are quick mode's. Detection data and model (the demo's sizes are for 128 px;
    # the anchors scale with the image).
    image_size: int = 64
    num_train: int = 1000
    num_val: int = 200
    iters: int = 400
    warmup_iters: int = 50
    # The demo's 0.01 per image (0.02 at 2 images), scaled linearly to the 8 images of a step.
    base_lr: float = 0.08
    pooler_resolution: int = 4
    rois_per_image: int = 32
    rpn_batch_per_image: int = 128
    rpn_topk_train: tuple = (600, 100)  # PRE_NMS_TOPK_TRAIN, POST_NMS_TOPK_TRAIN
    rpn_topk_test: tuple = (300, 50)
    test_modes: tuple = ("ema", "en", "rule_of_thumb")
    score_thresh_test: float = 0.05
    num_workers: int = 0  # data-loading processes (DATALOADER.NUM_WORKERS)
    # The stand-in: crops of standin_images rendered images, resized to standin_patch px.
    standin_images: int = 5000
    standin_patch: int = 48
    standin_iters: int = 1000
    standin_batch: int = 32
    standin_lr: float = 0.1

    def anchor_sizes(self):
        return [[round(s * self.image_size / 128) for s in (16, 32, 64)]]


MODES = {
    # CI: exercises the whole path in seconds; its numbers mean nothing.
    "smoke": Settings(
        device="cpu",
        seeds=(0,),
        image_size=32,
        num_train=8,
        num_val=4,
        iters=2,
        warmup_iters=1,
        base_lr=0.005,
        score_thresh_test=0.0,  # some detections, so that every AP is a number
        pooler_resolution=2,
        rois_per_image=8,
        rpn_batch_per_image=16,
        rpn_topk_train=(50, 16),
        rpn_topk_test=(50, 16),
        standin_images=16,
        standin_patch=32,
        standin_iters=4,
        standin_batch=16,
    ),
    # CPU: about 30 min on 2 cores (the 15 is not reached).
    "quick": Settings(device="cpu", seeds=(0,)),
    # A GPU: the demo's 128 px images and pooler, 4x its data, 7.5x quick's iterations, 3 seeds.
    "full": Settings(
        device="cuda",
        seeds=(0, 1, 2),
        image_size=128,
        num_train=4000,
        num_val=500,
        iters=3000,
        warmup_iters=200,
        pooler_resolution=8,
        rpn_topk_test=(600, 100),
        num_workers=4,
        standin_images=20000,
        standin_patch=64,
        standin_iters=8000,
        standin_batch=64,
    ),
}


# ----------------------------------------------------------------------------------------------
# The "ImageNet" stand-in
# ----------------------------------------------------------------------------------------------
class StandinResNet50(torchvision.models.ResNet):
    """torchvision's ResNet-50 (its ``Bottleneck`` blocks [3, 4, 6, 3] via ``_make_layer``, the
    same key names) with ``stem`` channels out of conv1 and bottleneck width ``width`` in layer1,
    doubling per stage (outputs 4x): (16, 8) is the detector's ResNet-50 at 1/8 width."""

    def __init__(self, stem=16, width=8, num_classes=10):
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


def render_patches(split, num_images, image_size, patch_size, seed):
    """Digit-centred crops of ``num_images`` images rendered as the detection data (digit
    samples of ``split``): a square of 1.2-2x the digit's longer side, shifted by up to 15%,
    resized to ``patch_size``. Returns (P, patch_size, patch_size, 3) uint8 RGB and (P,) int64
    labels, about 2 patches per image."""
    rng = np.random.default_rng(seed)
    samples, labels = load_digit_samples(split)
    patches, classes = [], []
    for _ in range(num_images):
        r = render_image(rng, samples, labels, image_size)
        for (x, y, w, h), label in zip(r.boxes.tolist(), r.labels.tolist()):
            side = min(image_size, round(max(w, h) * rng.uniform(1.2, 2.0)))
            cx, cy = x + w / 2 + rng.uniform(-0.15, 0.15) * side, y + h / 2
            cy += rng.uniform(-0.15, 0.15) * side
            x0 = int(np.clip(round(cx - side / 2), 0, image_size - side))
            y0 = int(np.clip(round(cy - side / 2), 0, image_size - side))
            crop = r.image[y0 : y0 + side, x0 : x0 + side]
            interp = cv2.INTER_AREA if side > patch_size else cv2.INTER_LINEAR
            patches.append(cv2.resize(crop, (patch_size, patch_size), interpolation=interp))
            classes.append(label)
    return np.stack(patches), np.array(classes, np.int64)


def _normalize(patches, device):
    """(P, S, S, 3) uint8 RGB -> (P, 3, S, S) float32, normalized as the detector's input."""
    cfg = setup_cfg(str(CONFIG), world_size=1)
    # what tools/convert_imagenet_checkpoint.py's output expects: torchvision's conventions
    assert cfg.INPUT.FORMAT == "RGB" and not cfg.MODEL.RESNETS.STRIDE_IN_1X1, CONFIG
    x = torch.from_numpy(patches).to(device).permute(0, 3, 1, 2).float()
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def _accuracy(model, x, y, batch=256):
    model.eval()
    correct = sum(
        (model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item()
        for i in range(0, len(x), batch)
    )
    return 100.0 * correct / max(len(x), 1)


@torch.no_grad()
def population_statistics(model, x, batch, generator, num_batches=50):
    """Replaces every BN layer's running statistics by their average over ``num_batches``
    training batches of the final weights (detectron2's PreciseBN), so that they match the
    weights even after a handful of steps (smoke mode)."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    order = torch.randperm(len(x), generator=generator)
    for i in range(min(num_batches, max(len(x) // batch, 1))):
        model(x[order[i * batch : (i + 1) * batch].to(x.device)])
    for m in norms:
        m.momentum = 0.1


def train_standin(s, seed, path):
    """Trains the stand-in on ``s.device`` (SGD, Nesterov momentum 0.9, cosine from
    ``s.standin_lr``, BN over batches of ``s.standin_batch``), recomputes its BN statistics
    (``population_statistics``), saves its torchvision ``state_dict`` to ``path``; returns a
    summary dict (accuracies in %, seconds)."""
    start = time.perf_counter()
    train_x, train_y = render_patches("train", s.standin_images, s.image_size, s.standin_patch, 0)
    val_x, val_y = render_patches(
        "val", max(s.standin_images // 10, 8), s.image_size, s.standin_patch, 1
    )
    device = s.device
    train_x, val_x = _normalize(train_x, device), _normalize(val_x, device)
    train_y, val_y = torch.from_numpy(train_y).to(device), torch.from_numpy(val_y).to(device)
    torch.manual_seed(seed)
    model = StandinResNet50().to(device)
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
        idx, order = order[: s.standin_batch].to(device), order[s.standin_batch :]
        loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    population_statistics(model, train_x, s.standin_batch, generator)
    summary = {
        "architecture": "torchvision ResNet-50 layout, stem 16, bottleneck widths 8/16/32/64",
        "train_patches": len(train_x),
        "val_patches": len(val_x),
        "patch_size": s.standin_patch,
        "iterations": s.standin_iters,
        "batch": s.standin_batch,
        "final_loss": loss.item(),
        "train_accuracy": _accuracy(model, train_x[:2000], train_y[:2000]),
        "val_accuracy": _accuracy(model, val_x, val_y),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, path)
    summary["seconds"] = time.perf_counter() - start
    return summary


def start_conversion(src, dst, threads):
    """Starts ``tools/convert_imagenet_checkpoint.py SRC DST`` in a subprocess (it runs while
    regime (a), which needs no weights, trains); returns the ``Popen``."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, str(TOOL), str(src), str(dst)]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish_conversion(process):
    """Waits for ``start_conversion``'s subprocess; returns its output, raises if it failed."""
    output, _ = process.communicate()
    if process.returncode:
        raise RuntimeError(f"{' '.join(process.args)} failed:\n{output}")
    return output


# ----------------------------------------------------------------------------------------------
# The cells
# ----------------------------------------------------------------------------------------------
def register_datasets(mode, s):
    """Generates the mode's digits under ``$DETECTRON2_DATASETS/detection_regimes_<mode>``
    and registers them as ``regimes_digits_<mode>_{train,val}``; returns the names."""
    root = os.path.join(datasets_root(), f"detection_regimes_{mode}")
    dataset_dir = generate_digits(root, s.num_train, s.num_val, s.image_size, seed=0)
    names = []
    for split in ("train", "val"):
        name = f"regimes_digits_{mode}_{split}"
        if name in DatasetCatalog:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {}, *split_paths(dataset_dir, split))
        names.append(name)
    return names


def regime_opts(regime, weights):
    """The KEY VALUE overrides that make ``regime`` of the base config (as configs/regimes)."""
    if regime == "a":
        return ["MODEL.WEIGHTS", ""]
    opts = ["MODEL.WEIGHTS", str(weights)]
    if regime == "b":
        opts += ["MODEL.EVALNORM.RESET_NORM", "True"]
    elif regime == "c":
        opts += ["MODEL.EVALNORM.BACKBONE_NORM", "FrozenEN", "MODEL.EVALNORM.ROI_HEAD_NORM"]
        opts += ["FrozenEN"]
    return opts


def cell_config(s, datasets, regime, n, seed, weights, output_dir):
    """The frozen, checked config of one cell: ``regime`` at N = ``n`` images per emulated GPU
    (IMS_PER_BATCH 8 normalized in groups of n), seed ``seed``, writing to ``output_dir``."""
    opts = [
        "MODEL.DEVICE", s.device,
        "MODEL.EVALNORM.NORM_BATCH_SIZE", n,
        "MODEL.EVALNORM.MICROBATCH", True,
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
        "SEED", seed,
        "OUTPUT_DIR", str(output_dir),
    ]  # fmt: skip
    return setup_cfg(str(CONFIG), [str(v) for v in opts] + regime_opts(regime, weights), 1)


def run_cell(cfg):
    """Trains ``cfg`` (without its test set) from seed ``cfg.SEED``, then evaluates the final
    weights in every mode through ``Trainer.test``, which writes ``evalnorm_results.json`` to
    OUTPUT_DIR. Returns ({mode: {metric: value or None}}, {"train", "eval": seconds})."""
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
    Trainer.test(cfg, trainer.model)
    seconds = {"train": trained - start, "eval": time.perf_counter() - trained}
    with open(os.path.join(cfg.OUTPUT_DIR, "evalnorm_results.json")) as f:
        per_mode = json.load(f)
    results = {
        mode: {m: _finite(res["bbox"].get(m)) for m in METRICS} for mode, res in per_mode.items()
    }
    return results, seconds


def measure_cell(s, datasets, regime, n, seed, weights, cells_dir):
    """Runs one cell in ``cells_dir/<regime>_<n>img_seed<seed>`` (its config.yaml, logs,
    metrics, checkpoint, evalnorm_results.json there), prints a line; returns its record. A
    cell that diverges is recorded with its error and no numbers."""
    name = f"{regime}_{n}img_seed{seed}"
    cfg = cell_config(s, datasets, regime, n, seed, weights, cells_dir / name)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    logger.info("Cell %s", name)
    stdout = os.path.join(cfg.OUTPUT_DIR, "stdout.txt")  # pycocotools' prints
    cell = {"regime": regime, "images_per_gpu": n, "seed": seed}
    began = time.perf_counter()
    try:
        with open(stdout, "w") as f, contextlib.redirect_stdout(f):
            cell["results"], cell["seconds"] = run_cell(cfg)
    except FloatingPointError as e:  # diverged: a "-" in the table, not a lost run
        logger.exception("Cell %s diverged", name)
        cell["results"] = {m: dict.fromkeys(METRICS) for m in s.test_modes}
        cell["seconds"] = {"train": time.perf_counter() - began, "eval": 0.0}
        cell["error"] = f"{type(e).__name__}: {e}"
    seconds, results = cell["seconds"], cell["results"]
    seconds["total"] = seconds["train"] + seconds["eval"]
    cell["output_dir"] = cfg.OUTPUT_DIR
    print(
        f"  ({regime}) N={n} seed {seed}: AP EMA {_fmt(results['ema']['AP'])}, EN "
        f"{_fmt(results['en']['AP'])}; train {seconds['train']:.0f} s ({s.iters} it), eval "
        f"{seconds['eval']:.0f} s" + (f"; {cell['error']}" if "error" in cell else ""),
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


def mean_table(cells):
    """{regime: {n: {mode: {metric: mean over seeds or None}}}} of the cells' results, with a
    row "en-ema" (EN minus EMA of the means) where both are present."""
    table = {}
    for cell in cells:
        per_n = table.setdefault(cell["regime"], {}).setdefault(cell["images_per_gpu"], {})
        for mode, values in cell["results"].items():
            for metric, value in values.items():
                per_n.setdefault(mode, {}).setdefault(metric, []).append(value)
    for per_regime in table.values():
        for rows in per_regime.values():
            for mode, values in rows.items():
                rows[mode] = {
                    m: None if None in v else float(np.mean(v)) for m, v in values.items()
                }
            if "ema" in rows and "en" in rows:
                rows["en-ema"] = {
                    m: None if None in (rows["en"][m], rows["ema"][m]) else rows["en"][m] - v
                    for m, v in rows["ema"].items()
                }
    return table


# The rows of a regime's block, in order, where measured.
ROW_LABELS = {"ema": "EMA", "en": "EN", "en-ema": "EN - EMA", "rule_of_thumb": "1/B^2"}


def _rows(per_regime):
    measured = next(iter(per_regime.values()))
    return [mode for mode in ROW_LABELS if mode in measured]


def _fmt(value, signed=False):
    if value is None:
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def format_text(table, images_per_gpu, title):
    """The table as text, in the layout of the paper's Table 2."""
    lines = [title, f"{'':<12}" + "".join(f"{f'{n} images/GPU':^24}" for n in images_per_gpu)]
    lines.append(f"{'':<12}" + "".join(f"{'AP':>8}{'AP50':>8}{'AP75':>8}" for _ in images_per_gpu))
    for regime, per_regime in table.items():
        lines.append(REGIMES[regime])
        for mode in _rows(per_regime):
            cells = "".join(
                _fmt(per_regime[n][mode][m], mode == "en-ema").rjust(8)
                for n in images_per_gpu
                for m in METRICS
            )
            lines.append(f"{ROW_LABELS[mode]:<12}{cells}")
    return "\n".join(lines)


def format_markdown(table, images_per_gpu):
    """The table in markdown: one block of rows per regime, AP/AP50/AP75 per N."""
    header = ["regime / row"] + [f"{m} ({n} img)" for n in images_per_gpu for m in METRICS]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for regime, per_regime in table.items():
        lines.append(f"| **{REGIMES[regime]}** " + "| " * (len(header) - 1) + "|")
        for mode in _rows(per_regime):
            values = [
                _fmt(per_regime[n][mode][m], mode == "en-ema")
                for n in images_per_gpu
                for m in METRICS
            ]
            lines.append(f"| {ROW_LABELS[mode]} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def headline(table):
    """The share of regime (d)'s EMA gap EN recovers at 2 images (AP), with its inputs."""
    rows = table.get("d", {})
    if 2 not in rows or 8 not in rows or "en" not in rows[2]:
        return {
            "recovered": None,
            "text": "Gap recovered: not measured (needs regime d at 2 and 8)",
        }
    ema_2, en_2, ema_8 = rows[2]["ema"]["AP"], rows[2]["en"]["AP"], rows[8]["ema"]["AP"]
    recovered = gap_recovered(ema_2, en_2, ema_8)
    paper = (
        f"paper: {PAPER_RECOVERED:.0%} ({PAPER_D['ema_2']} -> {PAPER_D['en_2']} against "
        f"{PAPER_D['ema_8']})"
    )
    if None in (ema_2, en_2, ema_8):
        text = f"Regime (d), 2 images: gap recovered undefined (missing values); {paper}"
    elif recovered is None:
        text = (
            f"Regime (d), 2 images: gap recovered undefined: EMA@8 - EMA@2 = "
            f"{_fmt(ema_8 - ema_2, True)} AP <= 0, EMA at 2 images is not worse than at 8 here, "
            f"so the ratio is meaningless; {paper}"
        )
    else:
        text = (
            f"Regime (d), 2 images: EN recovers {recovered:.0%} of the EMA gap "
            f"({_fmt(ema_2)} -> {_fmt(en_2)} AP against {_fmt(ema_8)} at 8 images); {paper}"
        )
    return {"ema_2": ema_2, "en_2": en_2, "ema_8": ema_8, "recovered": recovered, "text": text}


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
    parser.add_argument("--output-dir", help="default: output/benchmarks/detection_regimes/MODE")
    parser.add_argument("--overwrite", action="store_true", help="replace existing results")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the mode's)")
    parser.add_argument("--iters", type=int, help="training iterations per cell")
    parser.add_argument("--regimes", nargs="+", choices=sorted(REGIMES), help="default: all")
    parser.add_argument(
        "--images-per-gpu",
        type=int,
        nargs="+",
        help=f"N, images per emulated GPU, each dividing {IMS_PER_BATCH} (default: 2 4 8)",
    )
    parser.add_argument("--seed", type=int, nargs="+", help="seed(s) of every cell")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: unchanged)")
    return parser


def settings_from_args(args):
    s = dataclasses.replace(MODES[args.mode])
    if args.device:
        s.device = args.device
    if args.iters:
        s.iters = args.iters
    if args.regimes:
        s.regimes = tuple(r for r in REGIMES if r in args.regimes)
    if args.images_per_gpu:
        bad = [n for n in args.images_per_gpu if n < 1 or IMS_PER_BATCH % n]
        if bad:
            raise SystemExit(f"error: --images-per-gpu {bad}: each must divide {IMS_PER_BATCH}")
        s.images_per_gpu = tuple(sorted(set(args.images_per_gpu)))
    if args.seed:
        s.seeds = tuple(args.seed)
    return s


# What a run writes to its output directory (replaced as a whole with --overwrite).
OUTPUTS = ("results.json", "results.md", "log.txt", "standin", "cells")


def main(argv=None):
    args = argument_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    s = settings_from_args(args)
    out = Path(args.output_dir or f"output/benchmarks/detection_regimes/{args.mode}")
    prepare_output_dir(out, args.overwrite, OUTPUTS)
    if args.threads:
        torch.set_num_threads(args.threads)
    with _logging_to(out / "log.txt"):
        return run(args, s, out)


def run(args, s, out):
    """Trains the stand-in and every cell, prints and writes the results; returns the report
    (the content of ``results.json``)."""
    start = time.perf_counter()
    where = machine(s.device)
    print(
        f"detection_regimes --mode {args.mode}: regimes {' '.join(s.regimes)} x N = "
        f"{', '.join(map(str, s.images_per_gpu))} images per emulated GPU, seeds "
        f"{', '.join(map(str, s.seeds))}; {s.device}, {where['torch_threads']} thread(s); "
        f"writing to {out}",
        flush=True,
    )
    datasets = register_datasets(args.mode, s)

    standin = {}
    weights = out / "standin" / "R-50-standin-detectron2.pth"
    if set(s.regimes) - {"a"}:
        tv_path = out / "standin" / "resnet50-standin-torchvision.pth"
        standin = train_standin(s, s.seeds[0], tv_path)
        conversion = start_conversion(tv_path, weights, args.threads)
        standin.update(torchvision_checkpoint=str(tv_path), detectron2_checkpoint=str(weights))
        print(
            f"stand-in: {standin['train_patches']} patches of {s.standin_patch} px, "
            f"{s.standin_iters} steps of {s.standin_batch}: top-1 {standin['val_accuracy']:.1f}% "
            f"on {standin['val_patches']} val-split patches (train "
            f"{standin['train_accuracy']:.1f}%); {standin['seconds']:.0f} s; converting it with "
            f"{TOOL.relative_to(ROOT)}",
            flush=True,
        )

    cells = []
    for seed in s.seeds:
        for regime in s.regimes:
            for n in s.images_per_gpu:
                if regime != "a" and "conversion" not in standin:
                    waited = time.perf_counter()
                    standin["conversion"] = finish_conversion(conversion)
                    standin["conversion_wait_seconds"] = time.perf_counter() - waited
                cells.append(measure_cell(s, datasets, regime, n, seed, weights, out / "cells"))

    table = mean_table(cells)
    val = datasets[1]
    seeds = f"seed {s.seeds[0]}" if len(s.seeds) == 1 else f"mean of seeds {s.seeds}"
    title = (
        f"{val}: COCO box AP (%), {s.image_size} px, {IMS_PER_BATCH} images per SGD step "
        f"normalized in groups of N (one process = {IMS_PER_BATCH}/N GPUs x N images), "
        f"{s.iters} iterations, {seeds}"
    )
    text = format_text(table, s.images_per_gpu, title)
    head = headline(table)
    total = time.perf_counter() - start
    note = (
        f"Every cell: same SGD batch ({IMS_PER_BATCH} images), LR {s.base_lr}, iterations, data "
        "order and seed; only the normalization batch N changes (paper: 8 GPUs x N images, LR "
        "0.015 x N / 8). In (c) training never normalizes with batch statistics: its cells are "
        "one model up to floating-point effects (the spread of its EMA row is run-to-run noise) "
        "and differ in alpha/beta, estimated against each N's batch statistics. '-': no finite "
        "detection (COCO AP undefined) or a diverged cell."
    )
    print(f"\n{text}\n\n{head['text']}\n{note}\nTotal wall time {total / 60:.1f} min", flush=True)

    where["load_average_at_end"] = list(os.getloadavg())
    report = {
        "benchmark": "detection_regimes",
        "mode": args.mode,
        "argv": args.argv,
        "settings": {
            **dataclasses.asdict(s),
            "ims_per_batch": IMS_PER_BATCH,
            "anchor_sizes": s.anchor_sizes(),
            "config": str(CONFIG.relative_to(ROOT)),
            "datasets": datasets,
        },
        "protocol": note,
        "machine": where,
        "standin": standin,
        "cells": cells,
        "table": {r: {str(n): v for n, v in rows.items()} for r, rows in table.items()},
        "headline": {**head, "metric": "AP", "paper": PAPER_D, "paper_recovered": PAPER_RECOVERED},
        "wall_seconds": {
            "standin": standin.get("seconds", 0.0),
            "cells": sum(c["seconds"]["total"] for c in cells),
            "total": total,
        },
    }
    markdown = format_markdown(table, s.images_per_gpu)
    write_results(out, report, f"{title}\n\n{markdown}\n\n{head['text']}\n\n{note}\n")
    return report


if __name__ == "__main__":
    main()

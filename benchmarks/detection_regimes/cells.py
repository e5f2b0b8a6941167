"""The cells of the detection regimes benchmark: the data, one cell's config (a regime at N
images per emulated GPU and a seed), its training and every evaluation row of the same weights,
example weighing and test groups of N among them."""

import contextlib
import json
import logging
import math
import os
import shutil
import time

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.utils.env import seed_all_rng

from evalnorm import EvalNorm2d, evalnorm_mode
from evalnorm.diagnosis import fixed_coefficients
from evalnorm_det import EvalNormCheckpointer, Trainer
from evalnorm_det.data.digits import (
    datasets_root,
    generate_digits,
    generate_extra_split,
    split_paths,
)
from evalnorm_det.engine.defaults import setup_cfg
from evalnorm_det.engine.evaluation import METRICS

from ..stats import two_decimals
from .settings import CONFIG, FROZEN_EN, IMS_PER_BATCH, task_suffix

# Seed of the example-weighing selection split (the detection data's train and test splits use
# 0 and 1, the stand-in's scenes standin.STANDIN_SEEDS).
SELECTION_SEED = 200

logger = logging.getLogger("evalnorm_det.benchmarks.detection_regimes")


def register_datasets(preset, s):
    """Generates the preset's data under ``$DETECTRON2_DATASETS/detection_regimes_<preset>``
    (with ``_<task>`` after it but for "digits") and registers it as
    ``regimes_<task>_<preset>_{train,val,selection}``: train (even digit samples, seed 0), val
    (the test split: odd digit samples, seed 1) and selection (train-split digit samples, seed
    SELECTION_SEED: images in neither); returns the three names."""
    root = os.path.join(datasets_root(), f"detection_regimes_{preset}{task_suffix(s)}")
    dataset_dir = generate_digits(root, s.num_train, s.num_val, s.image_size, 0, s.task)
    paths = {split: split_paths(dataset_dir, split) for split in ("train", "val")}
    paths["selection"] = generate_extra_split(
        os.path.join(root, "selection"), "train", s.num_select, s.image_size, SELECTION_SEED, s.task
    )
    names = []
    for split, (json_file, image_root) in paths.items():
        name = f"regimes_{s.task}_{preset}_{split}"
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
        "TEST.EVALNORM_ROWS", str(list(s.test_modes)),
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
            res = Trainer.evaluate_row(cfg, model, selection, loader, f"example_weight_{w:g}")
        selection_ap[w] = _finite(res["bbox"].get("AP"))
    chosen = max(weights, key=lambda w: -1.0 if selection_ap[w] is None else selection_ap[w])
    test = cfg.DATASETS.TEST[0]
    with fixed_coefficients(model, chosen):
        res = Trainer.evaluate_row(
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
        return Trainer.evaluate_row(cfg, model, test, loader, "test_groups")


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
    in every row through ``Trainer.test`` (which writes ``evalnorm_results.json`` to
    OUTPUT_DIR) and with example weighing. Returns ({row: {metric: value or None}}, extra
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
        per_row = json.load(f)
    chosen, selection_ap, res = example_weighing(cfg, model, selection, weights)
    per_row["example_weighing"] = res
    per_row["test_groups"] = test_groups(cfg, model)
    results = {row: {m: _finite(r["bbox"].get(m)) for m in METRICS} for row, r in per_row.items()}
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
        rows = (*s.test_modes, "example_weighing")
        cell["results"] = {row: dict.fromkeys(METRICS) for row in rows}
        cell["seconds"] = {"train": time.perf_counter() - began, "eval": 0.0}
        cell["error"] = f"{type(e).__name__}: {e}"
    seconds, results = cell["seconds"], cell["results"]
    seconds["total"] = seconds["train"] + seconds["eval"]
    cell["work_dir"] = cfg.OUTPUT_DIR
    cell["torch_threads"] = torch.get_num_threads()
    ema, en = (two_decimals(results[row]["AP"]) for row in ("ema", "en"))
    print(
        f"  {name}: AP EMA {ema}, EN {en}; train "
        f"{seconds['train']:.0f} s ({s.iters} it), eval {seconds['eval']:.0f} s"
        + (f"; {cell['error']}" if "error" in cell else ""),
        flush=True,
    )
    return cell


def _finite(value):
    return None if value is None or not math.isfinite(value) else float(value)

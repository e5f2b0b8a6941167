"""RetinaNet's shared head at 2 images per GPU: BN with shared statistics (one set for the five
levels p3-p7, the baseline detectron2 warns against), BN with per-level statistics
(detectron2's ``CycleBatchNormList``), GN (8 channels per group, as detectron2's 32 groups of
256 channels), EvalNorm with per-level statistics and alpha/beta,
and EvalNorm shared across levels.

Every run ("cell") trains ``configs/demo/evalnorm_retinanet_digits_2img.yaml`` (regime (a):
from scratch, EN in the backbone, a ResNet-50 and FPN at 1/8 of their width, 128x128 digits,
2 images per batch) with the head norm of its variant, from the same seed for every variant
(same initial backbone, same data order), and evaluates the final weights with the trainer's
rows (``TEST.EVALNORM_ROWS``): "ema" (every EvalNorm layer as BN) and "en" (EvalNorm wherever
the model has it: the backbone in every variant, the head in the EN ones). The validation AP
is also measured every ``eval_period`` iterations, so the table says at which iteration each
row was best: a best at the last evaluation means the run had not stopped improving.

    python -m benchmarks.retinanet_head --preset smoke   # tests: seconds, numbers mean nothing
    python -m benchmarks.retinanet_head --preset short   # one seed, 300 iterations: timing
    python -m benchmarks.retinanet_head --preset full    # 3 seeds x 5 head norms

(from the repository root, with ``OMP_NUM_THREADS=1``). Cells are written to ``cells/`` in
``--output-dir`` as they finish; running the same command again resumes, skipping finished
cells (other settings are refused unless ``--overwrite``); ``results.md`` is rewritten after
each cell.
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from detectron2.utils.env import seed_all_rng
from torch import nn

from evalnorm_det import Trainer
from evalnorm_det.engine.defaults import setup_cfg

from ..common import machine, resumable_output_dir, torch_threads, write_cell
from .report import VARIANTS, write_report

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "demo" / "evalnorm_retinanet_digits_2img.yaml"
OUTPUTS = ("cells", "results.json", "results.md")
NOT_MEASURED = ("preset", "output_dir", "overwrite", "threads", "report_only")

PRESETS = {
    "smoke": {
        "seeds": [0],
        "variants": list(VARIANTS),
        "max_iter": 4,
        "eval_period": 2,
        "image_size": 64,
        "rows": ["ema", "en"],
        "datasets": "tiny",
    },
    "short": {
        "seeds": [0],
        "variants": ["en_per_level"],
        "max_iter": 300,
        "eval_period": 150,
        "image_size": 128,
        "rows": ["ema", "en"],
        "datasets": "digits",
    },
    "full": {
        "seeds": [0, 1, 2],
        "variants": list(VARIANTS),
        "max_iter": 3000,
        "eval_period": 500,
        "image_size": 128,
        "rows": ["ema", "en"],
        "datasets": "digits",
    },
}


def datasets(kind, work):
    """(train, val) dataset names: the bundled digits, or for "tiny" a few 64 px images
    generated under ``work``."""
    if kind == "digits":
        return "evalnorm_digits_train", "evalnorm_digits_val"
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    from evalnorm_det.data.digits import generate_digits, split_paths

    root = generate_digits(str(work / "datasets"), 6, 3, 64, seed=0)
    names = []
    for split in ("train", "val"):
        name = f"retinanet_head_tiny_{split}"
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {}, *split_paths(root, split))
        names.append(name)
    return tuple(names)


def cell_config(settings, variant, seed, names, output_dir):
    norm, stats = VARIANTS[variant][0]
    opts = [
        "MODEL.RETINANET.NORM", norm,
        "MODEL.EVALNORM.RETINANET_HEAD_STATS", stats,
        "INPUT.SQUARE_SIZE", settings["image_size"],
        "DATASETS.TRAIN", f"('{names[0]}',)",
        "DATASETS.TEST", f"('{names[1]}',)",
        "SOLVER.MAX_ITER", settings["max_iter"],
        "SOLVER.WARMUP_ITERS", min(100, settings["max_iter"] // 5),
        "TEST.EVAL_PERIOD", settings["eval_period"],
        "TEST.EVALNORM_ROWS", str(settings["rows"]),
        "DATALOADER.NUM_WORKERS", 0 if settings["datasets"] == "tiny" else 1,
        "SEED", seed,
        "OUTPUT_DIR", str(output_dir),
    ]  # fmt: skip
    return setup_cfg(str(CONFIG), [str(v) for v in opts], 1)


class HeadTrainer(Trainer):
    """``Trainer`` whose RetinaNet head GroupNorm keeps detectron2's 8 channels per group (its
    32 groups of 256 channels) at the benchmark's width: 32 groups of 32 channels would be
    single-channel groups, undefined on p7's 1x1 maps."""

    @classmethod
    def build_model(cls, cfg):
        model = super().build_model(cfg)
        for subnet in (model.head.cls_subnet, model.head.bbox_subnet):
            for i, m in enumerate(subnet):
                if isinstance(m, nn.GroupNorm):
                    gn = nn.GroupNorm(max(1, m.num_channels // 8), m.num_channels)
                    subnet[i] = gn.to(m.weight.device)
        return model


def run_cell(cfg):
    """Train from seed ``cfg.SEED`` with the validation AP every ``TEST.EVAL_PERIOD``
    iterations (and at the end); returns the final per-row AP, the curve and seconds."""
    start = time.perf_counter()
    seed_all_rng(cfg.SEED)
    trainer = HeadTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    seconds = time.perf_counter() - start
    with open(os.path.join(cfg.OUTPUT_DIR, "evalnorm_results.json")) as f:
        final = json.load(f)
    results = {row: r["bbox"] for row, r in final.items()}
    curve = {}
    for row in results:
        history = trainer.storage.history(f"{row}/bbox/AP").values()
        # Iterations done: a periodic evaluation is stored at iteration i (after i + 1 done);
        # the final one, after training, at MAX_ITER.
        points = [(min(it + 1, cfg.SOLVER.MAX_ITER), value) for value, it in history]
        best = max(points, key=lambda p: p[1]) if points else (None, None)
        curve[row] = {"points": points, "best_iter": best[0], "best_ap": best[1]}
    return results, curve, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    settings = dict(PRESETS[args.preset])
    suffix = "" if args.preset == "full" else f"_{args.preset}"
    output_dir = Path(
        args.output_dir or ROOT / "benchmarks" / "results" / f"retinanet_head{suffix}"
    )
    work = resumable_output_dir(output_dir, settings, args.overwrite, OUTPUTS)
    if args.report_only:
        write_report(work, settings)
        print((work / "results.md").read_text())
        return
    (work / "cells").mkdir(exist_ok=True)
    names = datasets(settings["datasets"], work)
    with torch_threads(args.threads):
        for seed in settings["seeds"]:
            for variant in settings["variants"]:
                name = f"{variant}_seed{seed}"
                path = work / "cells" / f"{name}.json"
                if path.exists():
                    continue
                run_dir = work / "runs" / name
                shutil.rmtree(run_dir, ignore_errors=True)
                cfg = cell_config(settings, variant, seed, names, run_dir)
                results, curve, seconds = run_cell(cfg)
                write_cell(
                    path,
                    {
                        "variant": variant,
                        "seed": seed,
                        "results": results,
                        "curve": curve,
                        "seconds": seconds,
                        "machine": machine(cfg.MODEL.DEVICE),
                    },
                )
                write_report(work, settings)
                print(f"{name}: {seconds:.0f} s", file=sys.stderr)
    write_report(work, settings)
    print((work / "results.md").read_text())


if __name__ == "__main__":
    main()

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

    python -m benchmarks.detection_regimes [--preset smoke|quick|full] [--threads 1]
    python -m benchmarks.detection_regimes --task photo ...   # the harder data

(from the repository root).

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
output/benchmarks/detection_regimes/<preset>/work), never to the output dir. Presets:

- smoke (CI): 32 px, 2 iterations per cell, every regime at N = 2 and 8: its numbers mean
  nothing.
- quick: the full preset's scale with 400 iterations (3200 images, as the 128 px demo), 1000
  training, 200 test and 100 selection images, and only the five cells that carry the
  conclusions: (d) at 2 and 8, (c) at 2 in its three readings, seed 0. Leaves out (a), (b),
  N = 4, (c) at 8 and the extra seeds. About 25 min with ``--threads 1`` (estimated from the
  full preset's measured times, not run end to end).
- full: 1000 iterations (8000 images), 2000 training, 300 test and 200 selection images, 30
  cells: the four regimes x {2, 4, 8} seed 0, (d) seeds 1 and 2, (c) and (c) (i) seed 1 at 2
  and 8, (c) (i) and (ii) at 2 and 8, (a) seeds 1 and 2 and (c), (c) (i) seed 2 at 2; ordered (d) 2 and 8, then every (c) at 2 and 8, then (a)
  2 and 8, then the rest. Measured with ``--threads 1`` on a 2-core machine whose other core ran
  another job: the stand-in 73 s, then 0.40 s per iteration; cell (d) N = 2: 436 s training +
  154 s evaluation (every row) = 9.8 min; N = 8: 456 + 208 s = 11.1 min; about 5 h in all
  (see each cell's "seconds").
"""

import argparse
import contextlib
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from evalnorm_det.data.digits import STYLES

from ..common import machine, resumable_output_dir, torch_threads, write_cell
from .cells import add_test_groups, cell_name, logger, measure_cell, register_datasets
from .report import write_report
from .settings import FULL_CELLS, IMS_PER_BATCH, PRESETS, REGIMES, task_settings, task_suffix
from .standin import prepare_standin


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
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
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
        "output/benchmarks/detection_regimes/PRESET[_TASK]/work)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="discard earlier results, even of other settings"
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the preset's)")
    parser.add_argument("--iters", type=int, help="training iterations per cell")
    parser.add_argument(
        "--regimes", nargs="+", choices=list(REGIMES), help="only the preset's cells of these"
    )
    parser.add_argument(
        "--images-per-gpu",
        type=int,
        nargs="+",
        help=f"only the preset's cells of these N (each dividing {IMS_PER_BATCH})",
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
    s = task_settings(dataclasses.replace(PRESETS[args.preset], task=args.task))
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
        raise SystemExit(f"error: no cell of preset {args.preset!r} matches the selection")
    s.cells = cells
    return s


def prepare_dirs(out, work, s, args):
    """Creates ``out`` and ``work``. Results of other settings (``out``/settings.json) are
    refused unless ``--overwrite``, which discards every earlier result and cell; with the same
    settings the finished cells are kept (resumed)."""
    # "mode": the key of the preset in the settings.json files recorded before it was renamed
    settings = {"mode": args.preset, "settings": s.fingerprint()}
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
    default = Path(f"output/benchmarks/detection_regimes/{args.preset}{task_suffix(s)}")
    out = Path(args.output_dir) if args.output_dir else default
    work = Path(args.work_dir) if args.work_dir else default / "work"
    prepare_dirs(out, work, s, args)
    if args.report_only:
        return report_only(args, s, out)
    with torch_threads(args.threads), _logging_to(work / "log.txt"):
        return run(args, s, out, work)


def run(args, s, out, work):
    """Trains the stand-in (or reuses it) and every cell not done yet, writing each cell's JSON
    when it is done and the tables after each; returns the report (``results.json``)."""
    start = time.perf_counter()
    where = machine(s.device)
    print(
        f"detection_regimes --preset {args.preset}: {len(s.cells)} cells; {s.device}, "
        f"{where['torch_threads']} thread(s); results in {out}, work files in {work}",
        flush=True,
    )
    datasets = register_datasets(args.preset, s)
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
        except Exception as e:  # noqa: BLE001 - one failed cell must not stop the others
            name = cell_name(regime, n, seed)
            logger.exception("Cell %s failed", name)
            print(f"  {name}: FAILED ({type(e).__name__}: {e}); a rerun retries it", flush=True)
            failed.append(name)
            continue
        cell["settings"] = s.fingerprint()
        write_cell(path, cell)
        write_report(args, s, out, cells_done(s, out), where, start, failed)
    return write_report(args, s, out, cells_done(s, out), where, start, failed, final=True)


def cells_done(s, out):
    """Every cell in ``out``/cells, whichever run measured it, in the full preset's order."""
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


if __name__ == "__main__":
    main()

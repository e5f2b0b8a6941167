"""BatchNorm over small normalization microbatches, evaluated with EMA, EvalNorm and its peers.

The paper's section 4.1 at its spatial scale: a pre-activation ResNet-20 (the paper's CIFAR
network, 19 BatchNorm layers, feature maps 32x32, 16x16 and 8x8) on 32x32 colour images of
digits on photographs (``benchmarks/digit_scenes.py``), trained with SGD batches of 128 (LR
0.1, cosine) while every BatchNorm layer normalizes consecutive groups of B samples
(``convert_to_evalnorm(..., microbatch=True)``), B in {2, 4, ..., 128}. For one seed only B
changes between runs: initial weights, data order and rendering are the same.

Each trained model is evaluated, same weights, with:
  EMA            vanilla BatchNorm: the running statistics
  EN online      alpha/beta estimated by ``OnlineEstimator`` while training (the paper's EN)
  EN offline     alpha/beta fitted after training by ``estimate_offline`` (section 3.4)
  1/B^2, 1/B     the rule of thumb and the "simple" choice
  prediction-time BN     alpha = beta = 1: each sample normalized by its own statistics
  inference example weighing   one alpha = beta for every layer (Summers and Dinneen, ICLR
                 2020), chosen from a grid by error on a validation split disjoint from test
  PreciseBN      running statistics recomputed as population averages over training batches
                 (the final model, every group of B: ``precise_statistics``), then EMA
  PreciseBN + EN offline   PreciseBN's statistics, then alpha/beta fitted offline against them
  BN, test groups of B     reference: each group of B test images normalized by its own
                 statistics, exactly as training normalizes (what the auxiliary loss targets)

Reported: test error per B and evaluation (mean and sample standard deviation over seeds), the
estimated alpha/beta, the share of the EMA gap recovered at the smallest B with a 95% interval
over seeds, the test-error curve of the curve runs, and a convergence check (the same seed
trained for ``--check-steps-factor`` times the steps).

    python -m benchmarks.microbatch --preset smoke   # CI: ~20 s, numbers mean nothing
    python -m benchmarks.microbatch                  # quick: seed 0, B = 2 and 128
    python -m benchmarks.microbatch --preset full    # 3 seeds x 7 B's + convergence check

(from the repository root). Both real presets train 3000 SGD steps per run: at 1500 steps the
B = 2 models were still far from converged (their error halved from 1500 to 3000 steps). Cells
run side by side in ``--jobs`` processes (default: one per CPU) of ``--threads`` torch threads
(default 1). A cell took 1137-1300 s on one thread of a 2-core machine whose other core ran
another job, so the quick preset (2 cells; it leaves out B = 4..64, seeds 1 and 2 and the
convergence check) takes about 22 min on 2 cores (estimated from those cells, not timed end to
end), and the full preset (21 cells of 3000 steps plus two of 6000: B = 2 and 128, seed 0)
about 4.5 hours on 2 cores, to be run in the background and resumed as often as needed.

Every run ("cell") is written to ``cells/`` in ``--output-dir`` as soon as it is done; running
the same command again resumes, skipping finished cells (other settings are refused unless
``--overwrite``). ``results.json``, ``results.md`` and the plots are rewritten from all cells
after each one. A cell is deterministic for a given thread count and machine, whichever
process runs it.
"""

import argparse
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from ..common import machine, resumable_output_dir, torch_threads, write_cell
from .cell import measure_cell
from .report import PLOTS, write_report

# Settings that do not change what a cell measures: a resumed run may differ in these.
NOT_MEASURED = ("preset", "output_dir", "overwrite", "threads", "jobs", "report_only")

PRESETS = {
    "smoke": {
        "seeds": [0],
        "batch_sizes": [2, 128],
        "steps": 4,
        "widths": [4, 8, 16],
        "train_digits": 256,
        "test_digits": 64,
        "test_copies": 2,
        "val_digits": 64,
        "val_copies": 2,
        "offline_iters": 2,
        "precise_iters": 2,
        "curve_every": 2,
        "curve_batch_sizes": [2, 128],
        "check_steps_factor": 2,
        "check_batch_sizes": [2],
        "jobs": 1,
    },
    "quick": {
        "seeds": [0],
        "batch_sizes": [2, 128],
        "steps": 3000,
        "widths": [8, 16, 32],
        "train_digits": None,
        "test_digits": 288,
        "test_copies": 8,
        "val_digits": 256,
        "val_copies": 4,
        "offline_iters": 100,
        "precise_iters": 100,
        "curve_every": 150,
        "curve_batch_sizes": [2, 128],
        "check_steps_factor": 2,
        "check_batch_sizes": [],
        "jobs": os.cpu_count() or 1,
    },
}
PRESETS["full"] = dict(
    PRESETS["quick"],
    seeds=[0, 1, 2],
    batch_sizes=[2, 4, 8, 16, 32, 64, 128],
    check_batch_sizes=[2, 128],
)


def planned_cells(args):
    """(seed, B, steps, curve) in the order they run: the smallest and largest B of each seed in
    turn (the headline, complete seed by seed), the longer convergence-check runs, then each
    other B farthest (in log2) from those already run, for every seed."""
    order = sorted(set(args.batch_sizes))
    order = order[:1] + order[-1:] if len(order) > 1 else order
    rest = [b for b in sorted(set(args.batch_sizes)) if b not in order]
    while rest:
        far = max(rest, key=lambda b: (min(abs(math.log2(b / c)) for c in order), -b))
        order.append(far)
        rest.remove(far)
    headline, rest = order[:2], order[2:]

    def ordered(sizes, seeds_first):
        pairs = [(s, b) for s in args.seeds for b in sizes]
        if not seeds_first:
            pairs.sort(key=lambda p: sizes.index(p[1]))
        return [(s, b, args.steps, b in args.curve_batch_sizes) for s, b in pairs]

    longer = [
        (args.seeds[0], b, args.steps * args.check_steps_factor, True)
        for b in args.check_batch_sizes
    ]
    return ordered(headline, True) + longer + ordered(rest, False)


def cell_name(seed, b, steps):
    return f"seed{seed}_B{b}_steps{steps}.json"


def measured_settings(args):
    return {k: v for k, v in vars(args).items() if k not in NOT_MEASURED}


def prepare(output_dir, args):
    """The cells folder of ``output_dir``, kept when resuming (``resumable_output_dir``)."""
    outputs = ("cells", "results.json", "results.md", *PLOTS)
    resumable_output_dir(output_dir, measured_settings(args), args.overwrite, outputs)
    cells_dir = output_dir / "cells"
    cells_dir.mkdir(exist_ok=True)
    return cells_dir


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=PRESETS, default="quick", help="(default quick)")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="normalization microbatches B")
    parser.add_argument("--steps", type=int, help="SGD steps per run")
    parser.add_argument("--widths", type=int, nargs=3, help="channels of the three stages")
    parser.add_argument("--train-digits", type=int, help="training digits (default: all left)")
    parser.add_argument("--test-digits", type=int)
    parser.add_argument("--test-copies", type=int, help="renderings of each test digit")
    parser.add_argument("--val-digits", type=int)
    parser.add_argument("--val-copies", type=int, help="renderings of each validation digit")
    parser.add_argument("--sgd-batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate")
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--estimator-lr", type=float, default=0.1, help="OnlineEstimator's Adam lr")
    parser.add_argument("--offline-iters", type=int, help="EN offline: batches of the SGD size")
    parser.add_argument("--offline-lr", type=float, default=0.1)
    parser.add_argument("--precise-iters", type=int, help="PreciseBN: batches of the SGD size")
    parser.add_argument("--curve-every", type=int, help="test error every this many steps ...")
    parser.add_argument("--curve-batch-sizes", type=int, nargs="*", help="... for these B's")
    parser.add_argument("--check-steps-factor", type=int, help="convergence check: longer runs ...")
    parser.add_argument(
        "--check-batch-sizes", type=int, nargs="*", help="... for these B's, first seed"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--jobs",
        type=int,
        help="cells trained at once, each in its own process (default: 1 in the smoke preset, "
        "else the machine's CPU count)",
    )
    parser.add_argument("--output-dir", help="default output/benchmarks/microbatch/<preset>")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite results.json, results.md and the plots from the cells done; train nothing",
    )
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.output_dir is None:
        args.output_dir = f"output/benchmarks/microbatch/{args.preset}"
    every_b = args.batch_sizes + args.curve_batch_sizes + args.check_batch_sizes
    if any(b < 1 or args.sgd_batch_size % b for b in every_b):
        parser.error(f"every B must divide --sgd-batch-size {args.sgd_batch_size}: got {every_b}")
    for key in ("test", "val"):
        images = getattr(args, f"{key}_digits") * getattr(args, f"{key}_copies")
        if images % args.sgd_batch_size:
            parser.error(
                f"--{key}-digits x --{key}-copies = {images} must be a multiple of "
                f"--sgd-batch-size {args.sgd_batch_size} (test groups of every B)"
            )
    if args.jobs < 1 or args.threads < 1:
        parser.error(f"--jobs and --threads must be at least 1: got {args.jobs}, {args.threads}")
    if args.report_only and args.overwrite:
        parser.error("--report-only reads the cells that --overwrite would delete: pass one")
    if not set(args.check_batch_sizes) <= set(args.batch_sizes):
        parser.error("--check-batch-sizes must be among --batch-sizes")
    return args


def main(argv=None):
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    cells_dir = prepare(output_dir, args)
    with torch_threads(args.threads):
        return _run(args, output_dir, cells_dir)


def _run(args, output_dir, cells_dir):
    wall_start = time.perf_counter()
    where = machine("cpu")
    planned = planned_cells(args)
    cells, todo = [], []
    for seed, b, steps, curve in planned:
        path = cells_dir / cell_name(seed, b, steps)
        if path.exists():
            cells.append(json.loads(path.read_text()))
        elif not args.report_only:
            todo.append((seed, b, steps, curve))
    order = {cell_name(s, b, n): i for i, (s, b, n, _) in enumerate(planned)}
    for result in measure(todo, args):
        result["machine"] = where
        path = cells_dir / cell_name(result["seed"], result["B"], result["steps"])
        write_cell(path, result)
        cells.append(json.loads(path.read_text()))
        cells.sort(key=lambda c: order[cell_name(c["seed"], c["B"], c["steps"])])
        print(
            f"seed {result['seed']}  B={result['B']:<3d} {result['steps']} steps: "
            f"{result['total_seconds']:.0f} s  "
            + "  ".join(f"{k} {v:.2f}" for k, v in result["errors"].items()),
            flush=True,
        )
        write_report(cells, args, where, output_dir, planned, time.perf_counter() - wall_start)
    results, text = write_report(
        cells, args, where, output_dir, planned, time.perf_counter() - wall_start
    )
    text += (
        f"\n{len(cells)} of {len(planned)} cells; this invocation: "
        f"{time.perf_counter() - wall_start:.0f} s wall, {args.jobs} job(s) of "
        f"{args.threads} thread(s).\n"
    )
    print("\n" + text, end="")
    print(f"Wrote results.json, results.md and {', '.join(PLOTS)} to {output_dir}")
    return results


def measure(todo, args):
    """Yield the result of each (seed, B, steps, curve) in ``todo``: in order in this process
    with ``--jobs 1``, else as they finish in ``--jobs`` worker processes of ``--threads``
    threads each (a cell's numbers do not depend on the process it runs in)."""
    if args.jobs == 1 or len(todo) <= 1:
        for cell_ in todo:
            yield measure_cell(*cell_, args)
        return
    context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools
    with ProcessPoolExecutor(
        min(args.jobs, len(todo)), context, torch.set_num_threads, (args.threads,)
    ) as pool:
        futures = [pool.submit(measure_cell, *cell_, args) for cell_ in todo]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


if __name__ == "__main__":
    main()

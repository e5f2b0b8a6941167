"""The estimation choices of ``benchmarks.estimation`` on the microbatch benchmark's models:
EN online as trained, calibrated on the validation split, fitted offline on evaluation inputs,
and the best fixed alpha = beta, all on the test split.

    python -m benchmarks.microbatch.estimation --preset full --seeds 0 1 2 --batch-sizes 2 \\
        --output-dir benchmarks/results/microbatch/estimation

(from the repository root). Each (seed, B) model is trained exactly as the benchmark's cell of
the same preset (same data, steps and estimator; a cell is deterministic for a machine and
thread count) and saved in ``--work-dir``, so a rerun evaluates without training; where the
cell is recorded in ``--cells-dir``, its EMA and EN online test errors are printed beside the
new ones as a check. Validation: the cell's validation split (digits kept apart from the test
digits, as for inference example weighing); the fit on evaluation inputs uses fresh training
renderings, the batches EN offline uses. Writes ``seed<s>_B<b>.json`` per model and
``results.md``; a model already there is not measured again. One B = 2 model, trained and
evaluated, took 25-36 min of wall time on one thread of a 2-core machine shared with one to
three other benchmark processes (the recorded files' write times).
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from evalnorm import estimate_offline

from ..common import machine, torch_threads, write_cell
from ..estimation import LABELS, ROWS, compare_estimations
from ..stats import gap_recovered, markdown_table, mean_std, percent
from . import __main__ as benchmark
from .cell import error, make_data, train
from .model import build_model, coefficients


def accuracy(x, y):
    """``f(model)``: top-1 accuracy (%) on ``x``, ``y`` with the modes the layers hold."""
    return lambda model: 100.0 - error(model, x, y)


def trained_model(data, b, args, work_dir):
    """The (seed, B) model of the benchmark's cell: loaded from ``work_dir`` or trained."""
    path = work_dir / f"seed{data.seed}_B{b}_steps{args.steps}.pt"
    model = build_model(data.seed, b, args.widths)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model
    model, _ = train(data, b, args.steps, args)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def measure(seed, b, args, work_dir):
    data = make_data(seed, args)
    model = trained_model(data, b, args, work_dir)

    def fit(m):
        batches = (data.batch(args.steps + i)[0] for i in range(args.offline_iters))
        return estimate_offline(
            m,
            batches,
            args.offline_iters,
            inputs="evaluation",
            lr=args.offline_lr,
            log_period=10**9,
        )

    result = compare_estimations(
        model, accuracy(data.val_x, data.val_y), accuracy(data.test_x, data.test_y), fit
    )
    result["fit"]["losses"] = result["fit"]["losses"][:: max(1, args.offline_iters // 10)]
    result.update(seed=seed, B=b, steps=args.steps, coefficients=coefficients(model))
    return result


def report(results, reference):
    """Markdown: test error (%) per row, mean ± sd over seeds, each seed, and the share of the
    EMA gap recovered against ``reference`` (the EMA error at the best B, mean over seeds)."""
    rows = []
    for row in ROWS:
        errors = [100.0 - r["test"][row] for r in results if r["test"][row] is not None]
        if not errors:
            continue
        mean, sd = mean_std(errors)
        ema = np.mean([100.0 - r["test"]["ema"] for r in results])
        share = gap_recovered(ema, mean, reference) if reference is not None else None
        rows.append(
            [
                LABELS[row],
                f"{mean:.2f} ± {sd:.2f}",
                " / ".join(f"{e:.2f}" for e in errors),
                percent(share),
            ]
        )
    chosen = [
        f"seed {r['seed']}: factor {r['chosen']['en_calibrated']:g} (online), "
        f"{r['chosen']['en_eval_inputs_calibrated']:g} (evaluation inputs), fixed "
        f"{r['chosen']['fixed_selected']:g}"
        for r in results
    ]
    return (
        markdown_table(["evaluation", "test error (%)", "per seed", "EMA gap recovered"], rows)
        + "\n\nChosen on validation: "
        + "; ".join(chosen)
        + "\n"
    )


def best_b_reference(cells_dir, seeds, steps):
    """The mean EMA test error at the best B over ``seeds`` in the benchmark's recorded cells
    (None when a seed is missing): the gap's far end, as in the benchmark's own report."""
    by_b = {}
    for path in Path(cells_dir).glob(f"seed*_B*_steps{steps}.json"):
        cell = json.loads(path.read_text())
        if cell["seed"] in seeds:
            by_b.setdefault(cell["B"], []).append(cell["errors"]["ema"])
    means = [np.mean(v) for v in by_b.values() if len(v) == len(seeds)]
    return min(means) if means else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=benchmark.PRESETS, default="full")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--work-dir", help="trained models (default: output/benchmarks/...)")
    parser.add_argument(
        "--cells-dir",
        default="benchmarks/results/microbatch/cells",
        help="the benchmark's recorded cells, for the check and the gap's far end",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    settings = benchmark.parse_args(["--preset", args.preset])
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir or f"output/benchmarks/microbatch/{args.preset}/models")
    text = []
    with torch_threads(args.threads):
        for b in args.batch_sizes:
            results = []
            for seed in args.seeds:
                path = out / f"seed{seed}_B{b}.json"
                if not path.exists():
                    result = measure(seed, b, settings, work)
                    result["machine"] = machine()
                    write_cell(path, result)
                result = json.loads(path.read_text())
                results.append(result)
                recorded = Path(args.cells_dir) / benchmark.cell_name(seed, b, settings.steps)
                if recorded.is_file():
                    errors = json.loads(recorded.read_text())["errors"]
                    print(
                        f"seed {seed} B={b}: EMA {100 - result['test']['ema']:.2f} "
                        f"(recorded {errors['ema']:.2f}), EN online {100 - result['test']['en']:.2f} "
                        f"(recorded {errors['en_online']:.2f})",
                        flush=True,
                    )
            reference = best_b_reference(args.cells_dir, args.seeds, settings.steps)
            text.append(f"## B = {b}, seeds {args.seeds}\n\n" + report(results, reference))
    body = "# Estimation choices, microbatch benchmark: test error (%)\n\n" + "\n".join(text)
    (out / "results.md").write_text(body)
    print(body)


if __name__ == "__main__":
    main()

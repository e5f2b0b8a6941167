"""The estimation choices of ``benchmarks.estimation`` on the detection regimes' trained cells:
EN online as trained, calibrated on the selection split, the backbone fitted offline on
evaluation inputs (``MODEL.EVALNORM.OFFLINE.INPUTS`` "evaluation"), and the best fixed
alpha = beta; COCO box AP on the test split.

    python -m benchmarks.detection_regimes.estimation --preset full d_2img_seed0 ... \\
        --output-dir benchmarks/results/detection_regimes/estimation

The selection split (train-split digits rendered with a seed of their own) chooses; the test
split (digit samples never trained on) measures: the two share no image. The fit on evaluation
inputs takes the cell's ``MODEL.EVALNORM.OFFLINE`` settings and training images in batches of
its N; the C4 model's res5 runs in the ROI head and keeps its online alpha/beta. Writes
``<cell>.json`` per cell and ``results.md``; a cell already there is not measured again. One
cell took 10-13 min of wall time on one thread of a 2-core machine shared with two or three
other benchmark processes, 5.5 min with one (the recorded files' write times).
"""

from pathlib import Path

from evalnorm_det import Trainer
from evalnorm_det.config import norm_batch_sizes
from evalnorm_det.engine import estimate_offline_from_config, training_batches

from ..estimation import LABELS, ROWS, compare_estimations
from ..stats import markdown_table, mean_std
from .diagnose import argument_parser, box_ap, load_cell, measure_cells


def measure(cell_dir, datasets):
    _, test, selection = datasets
    cfg, model = load_cell(cell_dir, ["MODEL.EVALNORM.OFFLINE.INPUTS", "evaluation"])
    images = norm_batch_sizes(cfg).images

    def fit(m):
        batches = training_batches(cfg, Trainer.build_train_loader, images)
        return estimate_offline_from_config(cfg, m, batches)

    result = compare_estimations(
        model, box_ap(cfg, selection, "selection"), box_ap(cfg, test, "test"), fit, test_sweep=False
    )
    result["fit"]["losses"] = result["fit"]["losses"][::10]
    return {"validation": selection, "test_dataset": test, **result}


def regime_of(cell):
    """ "d_2img_seed1" -> "d_2img"."""
    return cell.rsplit("_seed", 1)[0]


def report(results):
    """Markdown: test AP per row and regime, mean ± sd over its seeds, its difference to EMA
    (mean ± sd of the per-seed differences), and each seed."""
    regimes = list(dict.fromkeys(regime_of(c) for c in results))
    rows = []
    for regime in regimes:
        cells = [r for c, r in results.items() if regime_of(c) == regime]
        rows.append(f"| **{regime}** (seeds: {len(cells)}) | | | |")
        for row in ROWS:
            measured = [r for r in cells if r["test"][row] is not None]
            if measured:
                aps = [r["test"][row] for r in measured]
                mean, sd = mean_std(aps)
                gain, gain_sd = mean_std([r["test"][row] - r["test"]["ema"] for r in measured])
                rows.append(
                    [
                        LABELS[row],
                        f"{mean:.2f} ± {sd:.2f}",
                        f"{gain:+.2f} ± {gain_sd:.2f}",
                        " / ".join(f"{a:.2f}" for a in aps),
                    ]
                )
        rows.append(
            [
                "chosen (factor online / evaluation inputs / fixed)",
                "",
                "",
                " ; ".join(
                    f"{r['chosen']['en_calibrated']:g} / {r['chosen']['en_eval_inputs_calibrated']:g}"
                    f" / {r['chosen']['fixed_selected']:g}"
                    for r in cells
                ),
            ]
        )
    return markdown_table(["evaluation", "test AP (%)", "- EMA", "per seed"], rows)


def main(argv=None):
    args = argument_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    results = measure_cells(args, measure)
    text = "# Estimation choices, detection regimes: COCO box AP (%) on the test split\n\n"
    text += report(results) + "\n"
    (Path(args.output_dir) / "results.md").write_text(text)
    print(text)
    return results


if __name__ == "__main__":
    main()

"""Where EvalNorm helps the detection regimes' trained models and where it hurts:
``evalnorm.diagnosis.coefficient_sweep`` on cells kept in the work folder, scored by COCO AP on
the selection split (images in neither the training nor the test split).

    python -m benchmarks.detection_regimes.diagnose --preset full d_2img_seed0 c_2img_seed0 \\
        --output-dir benchmarks/results/detection_regimes/diagnosis

Writes ``<cell>.json`` per cell and ``results.md`` (one table: a column per cell) to
``--output-dir``; a cell already there is not measured again.
"""

import argparse
import dataclasses
import json
from pathlib import Path

from evalnorm.diagnosis import FACTORS, VALUES, coefficient_sweep
from evalnorm_det import Trainer, visualize
from evalnorm_det.config import norm_batch_sizes
from evalnorm_det.data.digits import STYLES
from evalnorm_det.engine import load_evalnorm_model, setup_cfg

from ..common import machine, torch_threads, write_cell
from ..stats import markdown_table
from .cells import register_datasets
from .settings import PRESETS, task_settings, task_suffix


def load_cell(cell_dir, opts=()):
    """(cfg, model in eval()) of the cell's ``model_final.pth``, its config with ``opts``."""
    weights = ["MODEL.WEIGHTS", str(cell_dir / "model_final.pth"), "OUTPUT_DIR", str(cell_dir)]
    cfg = setup_cfg(str(cell_dir / "config.yaml"), weights + list(opts), training=False)
    return cfg, load_evalnorm_model(cfg, norm_batch_sizes(cfg)).eval()


def box_ap(cfg, dataset, row):
    """``f(model)``: COCO box AP on ``dataset`` with the modes the layers hold."""
    loader = Trainer.build_test_loader(cfg, dataset)
    return lambda m: Trainer.box_ap(cfg, m, dataset, loader, row)


def diagnose_cell(cell_dir, selection):
    """The sweep rows of the cell's ``model_final.pth``, AP on dataset ``selection``."""
    cfg, model = load_cell(cell_dir)
    evaluate = box_ap(cfg, selection, "diagnosis")
    return coefficient_sweep(model, evaluate, VALUES, FACTORS, visualize.stage_groups(model))


def table(results):
    """Markdown: a line per setting, a column per cell (AP on the selection split)."""
    cells = list(results)
    settings = [(r["sweep"], r["setting"]) for r in results[cells[0]]["rows"]]
    scores = {
        c: {(r["sweep"], r["setting"]): r["score"] for r in results[c]["rows"]} for c in cells
    }
    rows = [
        [sweep, f"{setting:g}" if isinstance(setting, float) else setting]
        + [f"{scores[c].get((sweep, setting), float('nan')):.2f}" for c in cells]
        for sweep, setting in settings
    ]
    return markdown_table(["sweep", "setting", *cells], rows)


def argument_parser(description):
    """The options of this module and of ``estimation``: cells, preset, task, folders."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("cells", nargs="+", help="cell names, as in the work folder's cells/")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--task", choices=sorted(STYLES), default="digits")
    parser.add_argument("--work-dir", help="default output/benchmarks/detection_regimes/<preset>")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    return parser


def measure_cells(args, measure):
    """``{cell: result}``: ``measure(cell_dir, datasets)`` (train, test, selection names) for
    each cell not yet in ``--output-dir`` (written there as ``<cell>.json``), read back for all."""
    s = task_settings(dataclasses.replace(PRESETS[args.preset], task=args.task))
    default = Path(f"output/benchmarks/detection_regimes/{args.preset}{task_suffix(s)}/work")
    work = Path(args.work_dir) if args.work_dir else default
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    datasets = register_datasets(args.preset, s)
    results = {}
    with torch_threads(args.threads):
        for name in args.cells:
            path = out / f"{name}.json"
            if not path.exists():
                cell_dir = work / "cells" / name
                if not (cell_dir / "model_final.pth").is_file():
                    raise FileNotFoundError(f"{cell_dir}/model_final.pth: no trained cell {name!r}")
                result = measure(cell_dir, datasets)
                write_cell(path, {"cell": name, **result, "machine": machine()})
            results[name] = json.loads(path.read_text())
    return results


def main(argv=None):
    args = argument_parser(__doc__.split("\n\n")[0]).parse_args(argv)

    def measure(cell_dir, datasets):
        return {"dataset": datasets[2], "rows": diagnose_cell(cell_dir, datasets[2])}

    results = measure_cells(args, measure)
    selection = next(iter(results.values()))["dataset"]
    text = (
        f"# Coefficient sweep of trained cells: COCO AP (%) on {selection}\n\n"
        + table(results)
        + "\n"
    )
    (Path(args.output_dir) / "results.md").write_text(text)
    print(text)
    return results


if __name__ == "__main__":
    main()

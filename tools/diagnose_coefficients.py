#!/usr/bin/env python
"""Where EvalNorm helps a trained detector and where it hurts: COCO AP of the same weights
evaluated with EMA, the checkpoint's alpha/beta (EN), the rule of thumb 1/B^2, one alpha = beta
for every layer (--values), the checkpoint's alpha/beta scaled by a factor (--factors), and
EvalNorm in one stage at a time with EMA elsewhere.

    python tools/diagnose_coefficients.py --config demo/evalnorm_digits_2img.yaml \\
        --dataset evalnorm_digits_val MODEL.WEIGHTS output/demo_digits_2img/model_final.pth

A BN checkpoint is converted as by tools/convert_to_evalnorm.py (--norm-batch-size B: the images
per GPU it trained with), so its EN row is the rule of thumb. Each setting is one COCO
evaluation of --dataset (default: the config's first DATASETS.TEST); when the sweep is used to
choose coefficients, give it a validation split kept apart from the test split. Prints the
table and writes OUTPUT_DIR/coefficient_sweep.{txt,json,png}.
"""

import itertools
import json
import os

from detectron2.utils import comm

from evalnorm.diagnosis import FACTORS, VALUES, coefficient_sweep, format_sweep
from evalnorm_det import Trainer, visualize
from evalnorm_det.config import norm_batch_sizes
from evalnorm_det.engine import (
    argument_parser,
    launch_checked,
    load_evalnorm_model,
    number_list,
    parse_args,
    positive_int,
    setup,
)

OUTPUTS = ("coefficient_sweep.txt", "coefficient_sweep.json", "coefficient_sweep.png")


def build_parser():
    parser = argument_parser(__doc__, training=False)
    parser.add_argument("--dataset", help="a registered dataset (default: DATASETS.TEST[0])")
    parser.add_argument(
        "--values",
        type=number_list(0, 1),
        default=list(VALUES),
        help="alpha = beta for every layer, comma-separated ('' for none; default: %(default)s)",
    )
    parser.add_argument(
        "--factors",
        type=number_list(0),
        default=list(FACTORS),
        help="scalings of the estimated alpha, beta ('' for none; default: %(default)s)",
    )
    parser.add_argument(
        "--norm-batch-size",
        type=positive_int,
        metavar="B",
        help="images per GPU the model was trained with (sets MODEL.EVALNORM.NORM_BATCH_SIZE)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace earlier outputs")
    return parser


def main(args):
    cfg = setup(args)
    paths = [os.path.join(cfg.OUTPUT_DIR, name) for name in OUTPUTS]
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not args.overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace it")
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    model = load_evalnorm_model(cfg, norm_batch_sizes(cfg)).eval()
    loader = Trainer.build_test_loader(cfg, dataset)

    settings = itertools.count()

    def evaluate(m):  # each setting's COCO files in OUTPUT_DIR/inference/sweep_<n>
        return Trainer.box_ap(cfg, m, dataset, loader, f"sweep_{next(settings)}")

    groups = visualize.stage_groups(model)
    rows = coefficient_sweep(model, evaluate, args.values, args.factors, groups)
    if comm.is_main_process():
        text = f"{dataset}: COCO box AP (%), {cfg.MODEL.WEIGHTS}\n" + format_sweep(rows, "AP")
        print(text)
        with open(paths[0], "w") as f:
            f.write(text + "\n")
        with open(paths[1], "w") as f:
            json.dump({"dataset": dataset, "weights": cfg.MODEL.WEIGHTS, "rows": rows}, f, indent=1)
        visualize.save_png(visualize.plot_sweep(rows, "AP"), paths[2])
        print("Wrote " + ", ".join(paths))
    comm.synchronize()
    return rows


if __name__ == "__main__":
    args = parse_args(build_parser())
    print("Command Line Args:", args)
    launch_checked(main, args)

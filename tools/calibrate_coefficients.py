#!/usr/bin/env python
"""Calibrate a trained model's alpha and beta on a validation split ("EN calibrated").

    python tools/calibrate_coefficients.py --config-file evalnorm_frcnn_2img.yaml \\
        TEST.EVALNORM_CALIBRATION.DATASET my_val_split MODEL.WEIGHTS model_final.pth

Every layer's alpha and beta are multiplied by the factor of TEST.EVALNORM_CALIBRATION.FACTORS
(default 0, 0.25, ..., 2) with the best COCO box AP on TEST.EVALNORM_CALIBRATION.DATASET, a
registered dataset that must not be in DATASETS.TEST; ties go to the smaller factor. Factor 0 is
EMA, so on that split the calibrated model is never worse than EMA. A BN checkpoint is converted
as by tools/convert_to_evalnorm.py (--norm-batch-size B) and calibrated from the rule of thumb.
Writes --output (default OUTPUT_DIR/model_calibrated.pth): the input checkpoint with only alpha
and beta changed, the factor and every factor's AP recorded under "evalnorm". Then:
tools/train_net.py --eval-only ... MODEL.WEIGHTS <output>.
"""

import os

from detectron2.utils import comm

from evalnorm_det import Trainer
from evalnorm_det.config import norm_batch_sizes
from evalnorm_det.engine import (
    add_rescue_arguments,
    argument_parser,
    launch_checked,
    load_evalnorm_model,
    parse_args,
    rescue_metadata,
    save_evalnorm_checkpoint,
    setup,
)


def main(args):
    cfg = setup(args)
    if not cfg.TEST.EVALNORM_CALIBRATION.DATASET:
        raise ValueError(
            "TEST.EVALNORM_CALIBRATION.DATASET is empty: name a registered validation dataset "
            "kept apart from DATASETS.TEST"
        )
    output = args.output or os.path.join(cfg.OUTPUT_DIR, "model_calibrated.pth")
    if os.path.exists(output) and not args.overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
    batch_sizes = norm_batch_sizes(cfg)
    model = load_evalnorm_model(cfg, batch_sizes).eval()
    result = Trainer.calibrate(cfg, model)
    if comm.is_main_process():
        dataset = cfg.TEST.EVALNORM_CALIBRATION.DATASET
        metadata = rescue_metadata(
            cfg, batch_sizes, "calibrated", calibration=dict(result, dataset=dataset)
        )
        save_evalnorm_checkpoint(model, cfg.MODEL.WEIGHTS, output, metadata, args.overwrite)
        print(f"Wrote {output}: alpha/beta x {result['factor']:g} (box AP on {dataset})")
    comm.synchronize()
    return result


if __name__ == "__main__":
    parser = argument_parser(__doc__, training=False)
    args = parse_args(add_rescue_arguments(parser, "model_calibrated.pth"))
    print("Command Line Args:", args)
    launch_checked(main, args)

#!/usr/bin/env python
"""Fit alpha and beta of a trained model offline ("EN offline", EvalNorm section 3.4).

    python tools/estimate_offline.py --config evalnorm_frcnn_2img.yaml --num-gpus 8 \\
        MODEL.WEIGHTS output/evalnorm_frcnn_2img/model_final.pth
    python tools/estimate_offline.py --config-file my_bn_faster_rcnn.yaml --norm-batch-size 2 \\
        --output model_en_offline.pth MODEL.WEIGHTS model_final.pth

The model's BatchNorm, SyncBN and FrozenBN layers become EvalNorm2d with every weight and
statistic kept. Training images (DATASETS.TRAIN) go through it as in training, in batches of
the B it trained with (images per GPU: MODEL.EVALNORM.NORM_BATCH_SIZE or --norm-batch-size,
else SOLVER.IMS_PER_BATCH / processes; the ROI heads see B x ROI_HEADS.BATCH_SIZE_PER_IMAGE
ROIs), with no gradient for the model and running statistics untouched; the auxiliary loss
fits alpha and beta. MODEL.EVALNORM.OFFLINE sets the budget (MAX_ITER), the early stop
(PATIENCE, MIN_DELTA), the optimizer and the progress log. Writes --output (default
OUTPUT_DIR/model_en_offline.pth): the input checkpoint with only alpha and beta added or
changed. Then: tools/train_net.py --eval-only ... MODEL.WEIGHTS <output>.
"""

import os

from detectron2.utils import comm

from evalnorm_det import Trainer
from evalnorm_det.config import norm_batch_sizes
from evalnorm_det.engine import (
    add_rescue_arguments,
    argument_parser,
    estimate_offline_from_config,
    launch_checked,
    load_evalnorm_model,
    parse_args,
    rescue_metadata,
    save_evalnorm_checkpoint,
    setup,
    training_batches,
)


def main(args):
    cfg = setup(args)
    output = args.output or os.path.join(cfg.OUTPUT_DIR, "model_en_offline.pth")
    if os.path.exists(output) and not args.overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
    batch_sizes = norm_batch_sizes(cfg)
    model = load_evalnorm_model(cfg, batch_sizes)
    batches = training_batches(cfg, Trainer.build_train_loader, batch_sizes.images)
    summary = estimate_offline_from_config(cfg, model, batches)
    if comm.is_main_process():
        metadata = rescue_metadata(cfg, batch_sizes, "en_offline", offline=summary)
        save_evalnorm_checkpoint(model, cfg.MODEL.WEIGHTS, output, metadata, args.overwrite)
        print(f"Wrote {output}: alpha/beta fitted in {summary['iterations']} iterations")
    comm.synchronize()
    return summary


if __name__ == "__main__":
    parser = add_rescue_arguments(argument_parser(__doc__, training=False), "model_en_offline.pth")
    args = parse_args(parser)
    print("Command Line Args:", args)
    launch_checked(main, args)

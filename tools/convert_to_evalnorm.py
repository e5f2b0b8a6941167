#!/usr/bin/env python
"""Make any detectron2 BatchNorm checkpoint an EvalNorm one with the rule of thumb: no data.

    python tools/convert_to_evalnorm.py --config-file my_bn_faster_rcnn.yaml \\
        --norm-batch-size 2 MODEL.WEIGHTS model_final.pth
    python tools/convert_to_evalnorm.py --config evalnorm_frcnn_2img.yaml --coefficients simple \\
        --output model_simple.pth MODEL.WEIGHTS output/evalnorm_frcnn_2img/model_final.pth

Every BatchNorm, SyncBN and FrozenBN layer of the config's model gets alpha = beta =
1/B^2 (--coefficients rule_of_thumb, the default), 1/B (simple) or a number in [0, 1]
(--beta for a different beta), B being that layer's normalization batch in training: images
per GPU (MODEL.EVALNORM.NORM_BATCH_SIZE or --norm-batch-size, else SOLVER.IMS_PER_BATCH /
--num-gpus) in the backbone, that x ROI_HEADS.BATCH_SIZE_PER_IMAGE in the ROI heads. Writes
--output (default OUTPUT_DIR/model_<coefficients>.pth): the input checkpoint with only alpha
and beta added or changed. Runs on CPU in seconds.
"""

import argparse
import logging
import os

from detectron2.utils.logger import setup_logger

from evalnorm_det import EvalNorm2d
from evalnorm_det.config import norm_batch_sizes
from evalnorm_det.engine import (
    add_rescue_arguments,
    load_evalnorm_model,
    parse_args,
    positive_int,
    rescue_metadata,
    save_evalnorm_checkpoint,
    setup_cfg,
    unit_interval,
)


def coefficient(text):
    """ "rule_of_thumb", "simple" or a number in [0, 1]."""
    if text in ("rule_of_thumb", "simple"):
        return text
    try:
        return unit_interval(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected rule_of_thumb, simple or a number in [0, 1]"
        ) from None


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config-file",
        "--config",
        dest="config_file",
        metavar="FILE",
        help="the config the model was trained with (a name in configs/ works)",
    )
    parser.add_argument(
        "--coefficients",
        type=coefficient,
        default="rule_of_thumb",
        help="alpha (and beta): rule_of_thumb (1/B^2), simple (1/B) or a number",
    )
    parser.add_argument("--beta", type=coefficient, help="beta, if not --coefficients")
    parser.add_argument(
        "--num-gpus",
        type=positive_int,
        default=1,
        help="GPUs of the training run, to derive B from SOLVER.IMS_PER_BATCH",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    parser.set_defaults(training=False, resume=False, eval_only=False)
    return add_rescue_arguments(parser, "model_<coefficients>.pth")


def main(argv=None):
    args = parse_args(build_parser(), argv)
    opts = [*args.opts, "MODEL.DEVICE", "cpu"]
    cfg = setup_cfg(args.config_file, opts, world_size=args.num_gpus, training=False)
    setup_logger(name="evalnorm_det")
    setup_logger(name="detectron2", abbrev_name="d2").setLevel(logging.WARNING)
    output = args.output or os.path.join(cfg.OUTPUT_DIR, f"model_{args.coefficients}.pth")
    if os.path.exists(output) and not args.overwrite:
        raise SystemExit(f"error: {output} exists; pass --overwrite to replace it")
    batch_sizes = norm_batch_sizes(cfg, world_size=args.num_gpus)
    model = load_evalnorm_model(cfg, batch_sizes)
    layers = [m for m in model.modules() if isinstance(m, EvalNorm2d)]
    for m in layers:
        m.set_coefficients(args.coefficients, args.beta)
    beta = args.coefficients if args.beta is None else args.beta
    metadata = rescue_metadata(cfg, batch_sizes, {"alpha": args.coefficients, "beta": beta})
    save_evalnorm_checkpoint(model, cfg.MODEL.WEIGHTS, output, metadata, args.overwrite)
    print(f"Wrote {output}: {len(layers)} EvalNorm layers, alpha {args.coefficients}, beta {beta}")
    return output


if __name__ == "__main__":
    main()

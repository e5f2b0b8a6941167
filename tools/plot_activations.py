#!/usr/bin/env python
"""Draw one channel's normalized activations in training and at evaluation (the paper's Figure 1).

    python tools/plot_activations.py --config demo/evalnorm_digits_2img.yaml \\
        --layer backbone.res4.5.conv3.norm --channel 3 --output activations.png \\
        MODEL.WEIGHTS output/demo_digits_2img/model_final.pth

The same batches of B training images go through the model three times: in training mode
(batch statistics, as BN trained; the running statistics are left as they are), and in
evaluation with the EMA statistics and with EvalNorm. The chosen EvalNorm layer's output
channel, its affine undone, is drawn as three overlaid densities; their means and standard
deviations are printed. With small B, EMA's distribution departs from training's and
EvalNorm's comes back towards it. B is the model's training images per GPU:
MODEL.EVALNORM.NORM_BATCH_SIZE when set (--norm-batch-size), else SOLVER.IMS_PER_BATCH. For
box-head layers the samples are ROIs (B x ROI_HEADS.BATCH_SIZE_PER_IMAGE in training):
training samples them, evaluation keeps the test proposals. A BN or FrozenBN model is
converted to EvalNorm first (alpha/beta: the rule of thumb). --config and --config-file are
as in tools/train_net.py; KEY VALUE pairs at the end override the config. MODEL.WEIGHTS ""
plots a randomly initialized model. PNG is never overwritten without --overwrite.
"""

import argparse
import itertools
import sys

from detectron2.utils.env import seed_all_rng

from evalnorm_det import EvalNormCheckpointer, MissingStatisticsError, Trainer, visualize
from evalnorm_det.config import norm_batch_sizes
from evalnorm_det.engine import (
    add_figure_arguments,
    build_evalnorm_model,
    check_output,
    non_negative_int,
    positive_int,
    resolve_config_file,
    setup_cfg,
    training_batches,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config-file", "--config", dest="config_file", metavar="FILE", help="or a configs/ name"
    )
    parser.add_argument(
        "--layer", help="an EvalNorm2d module name (default: the backbone's last EvalNorm layer)"
    )
    parser.add_argument("--channel", type=non_negative_int, default=0, help="default 0")
    parser.add_argument("--num-batches", type=positive_int, default=20, help="default 20")
    parser.add_argument(
        "--dataset", help="a registered dataset with annotations (default: DATASETS.TRAIN[0])"
    )
    parser.add_argument(
        "--norm-batch-size",
        type=positive_int,
        metavar="B",
        help="images per GPU the model trained with",
    )
    add_figure_arguments(parser, width=1000, height=600)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    if not args.config_file:
        parser.error("give a config: --config NAME (looked up in configs/) or --config-file FILE")
    return args


def setup(args):
    """The config, checked for one process, with --dataset and --norm-batch-size applied."""
    opts = list(args.opts)
    if args.dataset:
        opts += ["DATASETS.TRAIN", repr((args.dataset,))]
    if args.norm_batch_size is not None:
        opts += ["MODEL.EVALNORM.NORM_BATCH_SIZE", str(args.norm_batch_size)]
    return setup_cfg(resolve_config_file(args.config_file), opts, world_size=1, training=False)


def main(argv=None):
    args = parse_args(argv)
    try:
        check_output(args.output, args.overwrite)
        cfg = setup(args)
        seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)
        batch_sizes = norm_batch_sizes(cfg, world_size=1)
        model = build_evalnorm_model(cfg, batch_sizes)
        if cfg.MODEL.WEIGHTS:
            EvalNormCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        layer = args.layer or visualize.default_layer(model)
        module = visualize.find_layer(model, layer, args.channel)
    except (ValueError, OSError, MissingStatisticsError) as e:
        sys.exit(f"error: {e}")
    loader = training_batches(cfg, Trainer.build_train_loader, batch_sizes.images)
    batches = list(itertools.islice(loader, args.num_batches))
    values = visualize.normalized_activations(model, layer, args.channel, batches)

    labels = dict(visualize.ACTIVATION_MODES)
    labels["en"] += f" (alpha {module.alpha.item():.3g}, beta {module.beta.item():.3g})"
    title = (
        f"{layer}, channel {args.channel}: B = {module.norm_batch_size}, "
        f"{len(batches)} batches of {len(batches[0])} images"
    )
    fig = visualize.plot_activations(values, title, labels, args.width, args.height, args.dpi)
    visualize.save_png(fig, args.output)
    print(title)
    for mode, (count, mean, std) in visualize.summarize(values).items():
        print(f"  {labels[mode]:<52} n {count:>8}  mean {mean:+.4f}  std {std:.4f}")
    print(f"Wrote {args.output} ({args.width}x{args.height} pixels)")


if __name__ == "__main__":
    main()

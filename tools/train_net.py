#!/usr/bin/env python
"""Train and evaluate Faster R-CNN with EvalNorm: detectron2's train_net with EvalNorm's Trainer.

    python tools/train_net.py --config evalnorm_frcnn_2img.yaml --num-gpus 8
    python tools/train_net.py --config-file configs/evalnorm_frcnn_2img.yaml --eval-only \\
        MODEL.WEIGHTS output/evalnorm_frcnn_2img/model_final.pth

A --config that is not a file is looked up in the project's configs/. --eval-only evaluates
the weights in every row of TEST.EVALNORM_ROWS ("['all']" for every row: EMA, EN, EN offline,
1/B^2, 1/B, PreciseBN, head batch stats, prediction-time BN, PreciseBN + EN offline); a BN or FrozenBN model is converted to EvalNorm first.
"""

from evalnorm_det.engine import (
    argument_parser,
    launch_checked,
    parse_args,
    setup,
    train_or_evaluate,
)


def main(args):
    return train_or_evaluate(setup(args), args)


if __name__ == "__main__":
    args = parse_args(argument_parser(epilog=__doc__))
    print("Command Line Args:", args)
    launch_checked(main, args)

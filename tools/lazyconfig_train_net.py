#!/usr/bin/env python
"""Train and evaluate a detector with EvalNorm from a LazyConfig (a Python config in
detectron2's layout: model, dataloader, optimizer, lr_multiplier, train, and EvalNorm's own
settings in evalnorm):

    python tools/lazyconfig_train_net.py --config evalnorm_frcnn_2img.py --num-gpus 8
    python tools/lazyconfig_train_net.py --config evalnorm_frcnn_2img.py --eval-only \\
        train.init_checkpoint=output/evalnorm_frcnn_2img/model_final.pth

Overrides are key=value ("evalnorm.TEST.EVALNORM_ROWS=[all]", "train.max_iter=1000"). Training
estimates alpha/beta online and ends with the EvalNorm table, as tools/train_net.py does;
--eval-only writes the table of train.init_checkpoint. A --config that is not a file is looked
up in the project's configs/.
"""

from evalnorm_det.engine import (
    argument_parser,
    launch_checked,
    lazy_run_config,
    parse_args,
    setup_lazy,
    train_or_evaluate,
)


def main(args):
    cfg, trainer_class = setup_lazy(args)
    return train_or_evaluate(cfg, args, trainer_class)


if __name__ == "__main__":
    args = parse_args(argument_parser(epilog=__doc__))
    print("Command Line Args:", args)
    launch_checked(main, args, lazy_run_config)

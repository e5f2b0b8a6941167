#!/usr/bin/env python
"""Train and evaluate Faster R-CNN with EvalNorm: detectron2's train_net with EvalNorm's Trainer.

    python tools/train_net.py --config evalnorm_frcnn_2img.yaml --num-gpus 8
    python tools/train_net.py --config-file configs/evalnorm_frcnn_2img.yaml --eval-only \\
        MODEL.WEIGHTS output/evalnorm_frcnn_2img/model_final.pth

A --config that is not a file is looked up in the project's configs/.
"""

import os
from pathlib import Path

from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch

from evalnorm_det import EvalNormCheckpointer, Trainer, add_evalnorm_config, check_evalnorm_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def resolve_config_file(name):
    """``name`` if it is a file, else ``configs/<name>`` of this project."""
    if os.path.isfile(name):
        return name
    candidate = CONFIGS / name
    if candidate.is_file():
        return str(candidate)
    raise FileNotFoundError(
        f"--config {name!r}: no such file, nor {candidate}. Configs: "
        + ", ".join(sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")))
    )


def build_cfg(args, world_size):
    cfg = get_cfg()
    add_evalnorm_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    check_evalnorm_config(cfg, world_size)
    cfg.freeze()
    return cfg


def main(args):
    cfg = build_cfg(args, world_size=None)
    default_setup(cfg, args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        EvalNormCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def parse_args(argv=None):
    parser = default_argument_parser(epilog=__doc__)
    parser.add_argument("--config", dest="config_file", metavar="FILE", help="as --config-file")
    args = parser.parse_args(argv)
    if not args.config_file:
        parser.error("give a config: --config NAME (looked up in configs/) or --config-file FILE")
    args.config_file = resolve_config_file(args.config_file)
    return args


if __name__ == "__main__":
    args = parse_args()
    print("Command Line Args:", args)
    # Check the config in this process, so a bad one stops before any worker starts.
    build_cfg(args, world_size=args.num_gpus * args.num_machines)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )

"""What the command-line tools share: the argument parser, the config, the checked launch."""

import argparse
import os
from pathlib import Path

from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import add_evalnorm_config, check_evalnorm_config
from .inputs import check_inputs

__all__ = [
    "CONFIGS",
    "add_rescue_arguments",
    "argument_parser",
    "launch_checked",
    "parse_args",
    "resolve_config_file",
    "setup",
    "setup_cfg",
]

# The project's configs/, beside the package in a checkout.
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def resolve_config_file(name):
    """``name`` if it is a file, else ``configs/<name>`` of this project."""
    if os.path.isfile(name):
        return name
    candidate = CONFIGS / name
    if candidate.is_file():
        return str(candidate)
    listing = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml"))
    raise FileNotFoundError(
        f"--config {name!r}: no such file, nor {candidate}. Configs: " + ", ".join(listing)
    )


def argument_parser(epilog=None, training=True):
    """detectron2's ``default_argument_parser`` plus ``--config`` (as ``--config-file``; a name
    that is not a file is looked up in configs/). With ``training`` False, ``--resume`` and
    ``--eval-only`` are hidden and refused by ``parse_args``."""
    parser = default_argument_parser(epilog=epilog)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", dest="config_file", metavar="FILE", help="as --config-file")
    parser.set_defaults(training=training)
    if not training:
        for action in parser._actions:
            if action.dest in ("resume", "eval_only"):
                action.help = argparse.SUPPRESS
    return parser


def add_rescue_arguments(parser, default_output):
    """The rescue tools' options: --output, --overwrite, --norm-batch-size."""
    parser.add_argument(
        "--output",
        metavar="FILE",
        help=f"checkpoint to write (default: OUTPUT_DIR/{default_output}); never overwritten "
        "without --overwrite",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument(
        "--norm-batch-size",
        type=int,
        metavar="B",
        help="images per GPU the model was trained with (sets MODEL.EVALNORM.NORM_BATCH_SIZE; "
        "default: the config's, else SOLVER.IMS_PER_BATCH / processes)",
    )
    return parser


def parse_args(parser, argv=None):
    """``parser``'s arguments, the config file resolved; ``--norm-batch-size B`` becomes the
    override ``MODEL.EVALNORM.NORM_BATCH_SIZE B``."""
    args = parser.parse_args(argv)
    if getattr(args, "norm_batch_size", None) is not None:
        args.opts = [*args.opts, "MODEL.EVALNORM.NORM_BATCH_SIZE", str(args.norm_batch_size)]
    if not args.config_file:
        parser.error("give a config: --config NAME (looked up in configs/) or --config-file FILE")
    if not args.training and (args.resume or args.eval_only):
        parser.error("--resume and --eval-only belong to tools/train_net.py")
    args.config_file = resolve_config_file(args.config_file)
    return args


def setup_cfg(config_file, opts=(), world_size=None, training=True):
    """The frozen config of ``config_file`` with ``opts`` (KEY VALUE ...) merged, checked: a bad
    EvalNorm value raises ValueError naming its key. ``world_size`` defaults to the process
    group's; ``training`` as in ``check_evalnorm_config``."""
    cfg = get_cfg()
    add_evalnorm_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    check_evalnorm_config(cfg, world_size, training=training)
    cfg.freeze()
    return cfg


def setup(args):
    """In each worker: ``setup_cfg`` from ``args``, then detectron2's ``default_setup`` (logging,
    the config and environment saved to OUTPUT_DIR, seeds) and the ``evalnorm_det`` logger."""
    cfg = setup_cfg(args.config_file, args.opts, training=_training(args))
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="evalnorm_det")
    return cfg


def launch_checked(main, args):
    """``detectron2.engine.launch(main, ..., args=(args,))`` after checking, in this process,
    the config and the files the run reads (:func:`check_inputs`): a bad one stops before any
    worker starts or writes to OUTPUT_DIR."""
    world_size = args.num_gpus * args.num_machines
    cfg = setup_cfg(args.config_file, args.opts, world_size, training=_training(args))
    check_inputs(cfg, training=_training(args), resume=getattr(args, "resume", False))
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


def _training(args):
    return args.training and not args.eval_only

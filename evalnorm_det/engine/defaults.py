"""What the command-line tools share: the argument parser and its checked numeric types, the
config, the checked launch."""

import argparse
import logging
import math
import os
from pathlib import Path

from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import add_evalnorm_config, check_evalnorm_config, norm_batch_sizes
from ..utils.preflight import check_inputs
from .checkpoint import EvalNormCheckpointer
from .rescue import build_evalnorm_model
from .trainer import Trainer

__all__ = [
    "CONFIGS",
    "add_figure_arguments",
    "add_rescue_arguments",
    "argument_parser",
    "check_output",
    "launch_checked",
    "non_negative_int",
    "number_list",
    "parse_args",
    "positive_int",
    "resolve_config_file",
    "setup",
    "setup_cfg",
    "train_or_evaluate",
    "unit_interval",
    "yacs_run_config",
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
    listing = sorted(
        str(p.relative_to(CONFIGS))
        for p in CONFIGS.rglob("*.*")
        if p.suffix in (".yaml", ".py") and "common" not in p.parts
    )
    raise FileNotFoundError(
        f"--config {name!r}: no such file, nor {candidate}. Configs: " + ", ".join(listing)
    )


def argument_parser(epilog=None, training=True):
    """detectron2's ``default_argument_parser`` plus ``--config`` (as ``--config-file``; a name
    that is not a file is looked up in configs/). With ``training`` False, ``--resume`` and
    ``--eval-only`` are hidden and refused by ``parse_args``."""
    parser = default_argument_parser(epilog=epilog)
    if not training:
        # The same parser, its --resume and --eval-only flags replaced by hidden ones.
        parser = argparse.ArgumentParser(
            epilog=parser.epilog, parents=[parser], add_help=False, conflict_handler="resolve"
        )
        for flag in ("--resume", "--eval-only"):
            parser.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", dest="config_file", metavar="FILE", help="as --config-file")
    parser.set_defaults(training=training)
    return parser


def positive_int(text):
    """argparse type: an integer >= 1 (argparse's error names the flag)."""
    return _int_at_least(text, 1)


def non_negative_int(text):
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def unit_interval(text):
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def number_list(low, high=math.inf):
    """argparse type: comma-separated finite numbers in [low, high] ('' gives none)."""
    expected = f"numbers in [{low:g}, {high:g}]" if high < math.inf else f"numbers >= {low:g}"

    def parse(text):
        try:
            values = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            values = None
        if values is None or not all(math.isfinite(v) and low <= v <= high for v in values):
            raise argparse.ArgumentTypeError(f"expected comma-separated {expected}, got {text!r}")
        return values

    return parse


def _int_at_least(text, low):
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
    return value


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
        type=positive_int,
        metavar="B",
        help="images per GPU the model was trained with (sets MODEL.EVALNORM.NORM_BATCH_SIZE; "
        "default: the config's, else SOLVER.IMS_PER_BATCH / processes)",
    )
    return parser


def add_figure_arguments(parser, width, height):
    """The tools' output options: --output, --overwrite, --width/--height (pixels), --dpi."""
    parser.add_argument("--output", "-o", required=True, metavar="PNG", help="the figure to write")
    parser.add_argument("--overwrite", action="store_true", help="replace PNG if it exists")
    for name, default in (("--width", width), ("--height", height)):
        parser.add_argument(name, type=positive_int, default=default, help=f"pixels ({default})")
    parser.add_argument(
        "--dpi", type=positive_int, default=100, help="scales text and lines, not the size (100)"
    )


def check_output(path, overwrite):
    """Raise ``ValueError`` unless ``path`` can take a PNG: it must end in ``.png`` and, unless
    ``overwrite``, not exist yet (as tools/convert_imagenet_checkpoint.py, never silently)."""
    if not path.lower().endswith(".png"):
        raise ValueError(f"{path}: the figure is a PNG, name it *.png")
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{path} exists; pass --overwrite to replace it")


def parse_args(parser, argv=None):
    """``parser``'s arguments, the config file resolved; ``--norm-batch-size B`` becomes the
    override ``MODEL.EVALNORM.NORM_BATCH_SIZE B``."""
    args = parser.parse_args(argv)
    _check_launch_flags(parser, args)
    if getattr(args, "norm_batch_size", None) is not None:
        args.opts = [*args.opts, "MODEL.EVALNORM.NORM_BATCH_SIZE", str(args.norm_batch_size)]
    if not args.config_file:
        parser.error("give a config: --config NAME (looked up in configs/) or --config-file FILE")
    if not args.training and (args.resume or args.eval_only):
        parser.error("--resume and --eval-only belong to tools/train_net.py")
    args.config_file = resolve_config_file(args.config_file)
    return args


def _check_launch_flags(parser, args):
    """Refuse detectron2's --num-gpus/--num-machines below 1 and a --machine-rank outside
    [0, --num-machines) (its parser takes any integer)."""
    for flag in ("num_gpus", "num_machines"):
        value = getattr(args, flag, 1)
        if value < 1:
            parser.error(
                f"argument --{flag.replace('_', '-')}: expected an integer >= 1, got {value}"
            )
    rank, machines = getattr(args, "machine_rank", 0), getattr(args, "num_machines", 1)
    if not 0 <= rank < machines:
        parser.error(
            f"argument --machine-rank: expected an integer from 0 to --num-machines - 1 "
            f"({machines - 1}), got {rank}"
        )


def setup_cfg(config_file, opts=(), world_size=None, training=True):
    """The frozen config of ``config_file`` with ``opts`` (KEY VALUE ...) merged, checked: a bad
    EvalNorm value raises ValueError naming its key. ``world_size`` defaults to the process
    group's; ``training`` as in ``check_evalnorm_config``."""
    if config_file.endswith(".py"):
        raise ValueError(
            f"{config_file} is a LazyConfig: run it with tools/lazyconfig_train_net.py"
        )
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


def launch_checked(main, args, run_config=None):
    """``detectron2.engine.launch(main, ..., args=(args,))`` after checking, in this process,
    the config and the files the run reads (``check_inputs``; ``MODEL.WEIGHTS`` is loaded into
    the run's model, so folded BN or another architecture stops the run here too): a bad one
    stops before any worker starts or writes to OUTPUT_DIR. ``run_config(args, world_size,
    training)`` gives the run's checked config and trainer class (default:
    :func:`yacs_run_config`)."""
    world_size = args.num_gpus * args.num_machines
    training = _training(args)
    cfg, trainer_class = (run_config or yacs_run_config)(args, world_size, training)

    def load_weights(cfg, weights):
        _load_into_model(cfg, weights, training, world_size, trainer_class)

    check_inputs(cfg, training, getattr(args, "resume", False), load_weights)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


def yacs_run_config(args, world_size, training):
    """(``setup_cfg`` of ``args``' config file and overrides, ``Trainer``)."""
    cfg = setup_cfg(args.config_file, args.opts, world_size, training=training)
    return cfg, Trainer


def train_or_evaluate(cfg, args, trainer_class=Trainer):
    """What tools/train_net.py's workers run: with ``--eval-only``, the EvalNorm table of
    ``MODEL.WEIGHTS`` (a BN model converted to EvalNorm first); else training (``--resume``:
    from the last checkpoint), evaluated at the end."""
    if args.eval_only:
        model = build_evalnorm_model(
            cfg, norm_batch_sizes(cfg), model=trainer_class.build_model(cfg)
        )
        EvalNormCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return trainer_class.test(cfg, model)
    trainer = trainer_class(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def _load_into_model(cfg, weights, training, world_size, trainer_class):
    """Loads ``weights`` into the run's model, built on CPU and then dropped, so that every
    checkpoint check (corrupt or unsafe file, folded BN, another architecture) runs now."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    logging.disable(logging.WARNING)  # the run logs the model and the loading itself, once set up
    try:
        model = trainer_class.build_model(cfg)
        if not training:
            model = build_evalnorm_model(cfg, norm_batch_sizes(cfg, world_size), model=model)
        checkpointer = EvalNormCheckpointer(model)
        checkpointer.require_statistics = not (training and cfg.MODEL.EVALNORM.RESET_NORM)
        checkpointer.load(weights)
    finally:
        logging.disable(logging.NOTSET)


def _training(args):
    return args.training and not args.eval_only

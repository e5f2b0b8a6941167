"""``tools/train_net.py`` on the tiny digits of ``detection_helpers``, for test_interrupted.py.

    python tests/interrupted_train.py DATASETS_ROOT [--stop-at N READY_FILE] TRAIN_NET_ARGS...

With ``--stop-at``, the run writes READY_FILE before iteration N and waits to be killed.
"""

import importlib.util
import os
import sys
import time
from pathlib import Path

from detectron2.engine import HookBase

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from detection_helpers import register_tiny_digits

from evalnorm_det import Trainer
from evalnorm_det.engine import argument_parser, launch_checked, parse_args


class WaitToBeKilled(HookBase):
    def __init__(self, iteration, ready):
        self.iteration, self.ready = iteration, ready

    def before_step(self):
        if self.trainer.iter == self.iteration:
            Path(self.ready).write_text(str(os.getpid()))
            time.sleep(600)


def main(argv):
    register_tiny_digits(Path(argv.pop(0)))
    if argv[0] == "--stop-at":
        hook = WaitToBeKilled(int(argv[1]), argv[2])
        del argv[:3]
        build_hooks = Trainer.build_hooks
        Trainer.build_hooks = lambda self: [*build_hooks(self), hook]
    spec = importlib.util.spec_from_file_location("train_net", HERE.parent / "tools/train_net.py")
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    launch_checked(train_net.main, parse_args(argument_parser(), argv))


if __name__ == "__main__":
    main(sys.argv[1:])

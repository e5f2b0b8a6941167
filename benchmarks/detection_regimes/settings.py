"""What the detection regimes benchmark measures: the regimes, the cells of each preset, and the
settings a cell's numbers depend on (``Settings``, its ``fingerprint`` stored with every cell
and in the output dir's settings.json)."""

import dataclasses
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "benchmarks" / "detection_regimes.yaml"
IMS_PER_BATCH = 8  # images per SGD step in every cell; N of them per normalization group

REGIMES = {
    "a": "(a) scratch: convolutions and BN trained",
    "b": "(b) stand-in weights, BN reset and trained",
    "c": "(c) stand-in weights, BN frozen; EN target: batch-normalized",
    "c_frozen_target": "(c, i) BN frozen; EN target: the frozen normalization",
    "c_batch_stats": "(c, ii) BN on batch statistics, EMA and affine frozen",
    "d": "(d) stand-in weights, BN fine-tuned",
}
# MODEL.EVALNORM.FROZEN_EN of the (c) regimes.
FROZEN_EN = {
    "c": "batch_target",
    "c_frozen_target": "frozen_target",
    "c_batch_stats": "batch_stats",
}

# The evaluation rows of the trainer (TEST.EVALNORM_ROWS) that every cell measures.
TABLE_ROWS = ("ema", "en", "rule_of_thumb", "prediction_time_bn", "precise_bn")
TABLE_ROWS += ("precise_bn_en_offline", "head_batch_stats")


def _cells(regimes, images, seeds):
    return tuple((r, n, s) for s in seeds for r in regimes for n in images)


FULL_CELLS = (
    _cells("d", (2, 8), (0,))
    + _cells(FROZEN_EN, (2, 8), (0,))
    + _cells("a", (2, 8), (0,))
    + _cells("b", (2, 8), (0,))
    + _cells("abcd", (4,), (0,))
    + _cells("d", (2, 8, 4), (1, 2))
    + _cells("c", (2, 8), (1,))
    + _cells(("c_frozen_target",), (2, 8), (1,))
    + _cells("a", (2,), (1, 2))
    + _cells(("c", "c_frozen_target"), (2,), (2,))
)


@dataclasses.dataclass
class Settings:
    """One preset's settings; ``--device``, ``--iters`` override theirs, ``--regimes``,
    ``--images-per-gpu`` and ``--seed`` select among its cells."""

    device: str
    cells: tuple  # (regime, N, seed) in the order they run
    # The detection data's style (evalnorm_det.data.digits.STYLES): "digits" (1-3 digits of
    # 32-58 px on smooth backgrounds) or "photo" (1-6 of 15-32 px on photographs, harder).
    task: str = "digits"
    image_size: int = 128
    num_train: int = 1000
    num_val: int = 200  # the test split
    num_select: int = 100  # the selection split of example weighing
    iters: int = 400
    warmup_iters: int = 50
    # The demo's 0.01 per image (0.02 at 2 images), scaled linearly to the 8 images of a step.
    base_lr: float = 0.08
    pooler_resolution: int = 8
    rois_per_image: int = 32
    rpn_batch_per_image: int = 128
    rpn_topk_train: tuple = (600, 100)  # PRE_NMS_TOPK_TRAIN, POST_NMS_TOPK_TRAIN
    rpn_topk_test: tuple = (600, 100)
    test_modes: tuple = TABLE_ROWS  # the rows; name kept: recorded settings.json files use it
    precise_bn_iters: int = 100  # batches of N images (TEST.PRECISE_BN.NUM_ITER)
    offline_iters: int = 200  # MODEL.EVALNORM.OFFLINE.MAX_ITER
    example_weights: tuple = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
    score_thresh_test: float = 0.05
    num_workers: int = 0  # data-loading processes (DATALOADER.NUM_WORKERS)
    # The stand-in: "crops" (the digit of a standin_crop px window of standin_images rendered
    # scenes, at native scale: 93% top-1 on val-split windows in 160 s on one thread) or
    # "scenes" (multi-label classification of whole scenes: stayed at its constant baseline,
    # 80.8% of the present/absent decisions right, with LR 0.1 x 1500 or 0.02 x 2000 steps).
    standin_task: str = "crops"
    standin_crop: int = 64
    standin_images: int = 3000
    standin_iters: int = 1500
    standin_batch: int = 32
    standin_lr: float = 0.1

    def anchor_sizes(self):
        return [[round(s * self.image_size / 128) for s in (16, 32, 64)]]

    def fingerprint(self):
        """What a cell's numbers depend on (everything but the choice of cells), as JSON."""
        d = dataclasses.asdict(self)
        del d["cells"]
        if d["task"] == "digits":  # as recorded before there was a choice: still resumable
            del d["task"]
        return json.loads(json.dumps(d))


def task_settings(s):
    """What the task changes in a preset's settings. "photo": its 64 px windows hold clutter and
    other digits, and the stand-in stayed near chance on them (16.5% top-1 after 1500 steps;
    15% on 48 px windows); on windows of a quarter of the image (32 px at 128), where the digit
    fills most of the window, it reached 73% in 1500 steps and 82% in 3000."""
    if s.task == "photo":
        return dataclasses.replace(
            s, standin_crop=s.image_size // 4, standin_iters=2 * s.standin_iters
        )
    return s


PRESETS = {
    # CI: exercises the whole path in seconds; its numbers mean nothing.
    "smoke": Settings(
        device="cpu",
        cells=_cells(REGIMES, (2, 8), (0,)),
        image_size=32,
        num_train=8,
        num_val=4,
        num_select=4,
        iters=2,
        warmup_iters=1,
        base_lr=0.005,
        score_thresh_test=0.0,  # some detections, so that every AP is a number
        pooler_resolution=2,
        rois_per_image=8,
        rpn_batch_per_image=16,
        rpn_topk_train=(50, 16),
        rpn_topk_test=(50, 16),
        precise_bn_iters=2,
        offline_iters=2,
        example_weights=(0.0, 0.1),
        standin_crop=16,
        standin_images=16,
        standin_iters=4,
        standin_batch=8,
    ),
    "quick": Settings(
        device="cpu",
        cells=_cells("d", (2, 8), (0,)) + _cells(FROZEN_EN, (2,), (0,)),
    ),
    "full": Settings(
        device="cpu",
        cells=FULL_CELLS,
        num_train=2000,
        num_val=300,
        num_select=200,
        iters=1000,
        warmup_iters=100,
    ),
}


def task_suffix(s):
    """ "" for the "digits" task, else "_<task>": folder names of one task apart from another's."""
    return "" if s.task == "digits" else f"_{s.task}"

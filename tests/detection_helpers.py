"""A tiny EvalNorm Faster R-CNN config on a tiny digits dataset, for fast CPU tests."""

import os
from pathlib import Path

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from evalnorm_det import add_evalnorm_config
from evalnorm_det.data.digits import generate_digits, split_paths

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def register_tiny_digits(root, num_train=6, num_val=3, image_size=64):
    """Registers ``tiny_digits_{train,val}`` (replacing earlier ones) under ``root``."""
    dataset_dir = generate_digits(str(root), num_train, num_val, image_size, seed=0)
    for split in ("train", "val"):
        name = f"tiny_digits_{split}"
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {}, *split_paths(dataset_dir, split))
    return dataset_dir


def tiny_overrides(image_size=64):
    """KEY VALUE overrides that shrink the demo config to a few seconds of CPU work."""
    return [
        "INPUT.SQUARE_SIZE",
        str(image_size),
        "MODEL.ANCHOR_GENERATOR.SIZES",
        "[[8, 16, 32]]",
        "MODEL.RPN.BATCH_SIZE_PER_IMAGE",
        "32",
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN",
        "100",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN",
        "16",
        "MODEL.RPN.PRE_NMS_TOPK_TEST",
        "100",
        "MODEL.RPN.POST_NMS_TOPK_TEST",
        "16",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
        "8",
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION",
        "4",
        "SOLVER.WARMUP_ITERS",
        "1",
        "DATALOADER.NUM_WORKERS",
        "0",
    ]


def tiny_cfg(tmp_path, *overrides):
    """The demo config, shrunk, training on ``tiny_digits_train`` (no test set: add
    ``DATASETS.TEST`` to evaluate), writing under ``tmp_path``."""
    register_tiny_digits(tmp_path / "datasets")
    cfg = get_cfg()
    add_evalnorm_config(cfg)
    cfg.merge_from_file(str(CONFIGS / "demo" / "evalnorm_digits_2img.yaml"))
    cfg.merge_from_list(tiny_overrides())
    cfg.merge_from_list(
        [
            "DATASETS.TRAIN",
            "('tiny_digits_train',)",
            "DATASETS.TEST",
            "()",  # no evaluation at the end of training
            "SOLVER.MAX_ITER",
            "3",
            "OUTPUT_DIR",
            os.fspath(tmp_path / "output"),
        ]
    )
    cfg.merge_from_list(list(overrides))
    return cfg

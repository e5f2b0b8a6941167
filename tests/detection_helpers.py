"""A tiny EvalNorm Faster R-CNN config on a tiny digits dataset, for fast CPU tests."""

import os
from pathlib import Path

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.layers import FrozenBatchNorm2d
from detectron2.utils.env import seed_all_rng
from torch import nn

from evalnorm_det import EvalNorm2d, Trainer, add_evalnorm_config
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


def norm_types(module):
    """The types of ``module``'s BatchNorm-like layers (EvalNorm2d and FrozenBatchNorm2d too)."""
    return {
        type(m)
        for m in module.modules()
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d))
    }


def en_layers(model):
    """[(name, layer)] of every EvalNorm2d in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, EvalNorm2d)]


def train(cfg, seed=0, resume=False):
    """A ``Trainer`` for ``cfg``, after training from seed ``seed``."""
    seed_all_rng(seed)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


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
        "MODEL.EVALNORM.NORM_BATCH_SIZE",
        "0",  # B from SOLVER.IMS_PER_BATCH, which tests vary
    ]


def tiny_cfg(tmp_path, *overrides, config="demo/evalnorm_digits_2img.yaml"):
    """``config`` (the demo's by default), shrunk, training on ``tiny_digits_train`` (no test
    set: add ``DATASETS.TEST`` to evaluate), writing under ``tmp_path``."""
    register_tiny_digits(tmp_path / "datasets")
    cfg = get_cfg()
    add_evalnorm_config(cfg)
    cfg.merge_from_file(str(CONFIGS / config))
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


def rescue_overrides(tmp, checkpoint, model=(), extra=()):
    """KEY VALUE overrides to evaluate or rescue ``checkpoint`` with a config shrunk by
    ``tiny_overrides`` and ``model`` (overrides of the architecture): the tiny digits registered
    under ``tmp`` for training and test, output under ``tmp``, B = 2 images given explicitly;
    then ``extra``."""
    register_tiny_digits(tmp / "datasets")
    return [
        *tiny_overrides(),
        *model,
        "MODEL.WEIGHTS",
        str(checkpoint),
        "DATASETS.TRAIN",
        "('tiny_digits_train',)",
        "DATASETS.TEST",
        "('tiny_digits_val',)",
        "OUTPUT_DIR",
        str(tmp / "output"),
        "MODEL.EVALNORM.NORM_BATCH_SIZE",
        "2",
        *extra,
    ]


# The paper's configs at the demo's scale: from scratch, on CPU, 2 images per GPU, a ResNet-50
# at 1/8 of its width (1/4 in the stem).
SMALL_RESNET = [
    "MODEL.DEVICE",
    "cpu",
    "MODEL.WEIGHTS",
    "",
    "MODEL.RESNETS.STEM_OUT_CHANNELS",
    "16",
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    "32",
    "MODEL.RESNETS.WIDTH_PER_GROUP",
    "8",
    "SOLVER.IMS_PER_BATCH",
    "2",
]

# The FPN config as the demo config is the C4 one: SMALL_RESNET, FPN and box head at 1/8 of
# their width, the 10 digit classes.
FPN_AS_DEMO = [
    *SMALL_RESNET,
    "MODEL.FPN.OUT_CHANNELS",
    "32",
    "MODEL.ROI_BOX_HEAD.CONV_DIM",
    "32",
    "MODEL.ROI_BOX_HEAD.FC_DIM",
    "128",
    "MODEL.ROI_HEADS.NUM_CLASSES",
    "10",
    "INPUT.RANDOM_FLIP",
    "none",
]


# detectron2's own R50-FPN with plain BN in its ResNet and its 4conv1fc box head.
D2_BN_FPN = [
    "MODEL.BACKBONE.NAME",
    "build_resnet_fpn_backbone",
    "MODEL.RESNETS.NORM",
    "BN",
    "MODEL.ROI_BOX_HEAD.NAME",
    "FastRCNNConvFCHead",
    "MODEL.ROI_BOX_HEAD.NORM",
    "BN",
]


def tiny_fpn_cfg(tmp_path, *overrides):
    """``configs/evalnorm_frcnn_fpn_2img.yaml`` shrunk as ``tiny_cfg`` shrinks the demo."""
    return tiny_cfg(tmp_path, *FPN_AS_DEMO, *overrides, config="evalnorm_frcnn_fpn_2img.yaml")

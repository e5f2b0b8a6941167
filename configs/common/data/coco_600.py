# The paper's data (section 4.3): trainval35k for training, minival for evaluation, every image
# resized to 600x600 (INPUT.SQUARE_SIZE 600), RGB, horizontal flips in training.
from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data import transforms as T
from detectron2.evaluation import COCOEvaluator
from omegaconf import OmegaConf

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names=["coco_2014_train", "coco_2014_valminusminival"]),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[L(T.Resize)(shape=(600, 600)), L(T.RandomFlip)(horizontal=True)],
        image_format="RGB",
    ),
    total_batch_size=16,
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2014_minival", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[L(T.Resize)(shape=(600, 600))],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=4,
)

# The dataset of each row's evaluation is set by the trainer, one per evaluated dataset.
dataloader.evaluator = L(COCOEvaluator)(dataset_name="${..test.dataset.names}")

# LazyConfig twin of evalnorm_digits_2img.yaml, the demo: EvalNorm Faster R-CNN C4 from scratch
# (regime (a)) at 2 images per batch on the bundled digits, on CPU; a ResNet-50 at 1/8 of its
# width on 128x128 images.
#   python tools/lazyconfig_train_net.py --config demo/evalnorm_digits_2img.py
from detectron2.config import LazyCall as L
from detectron2.data import transforms as T

from evalnorm_det.lazy import warmup_cosine

from ..common.data.coco_600 import dataloader
from ..common.evalnorm import evalnorm
from ..common.models.evalnorm_frcnn_c4 import model
from ..common.optim import SGD as optimizer
from ..common.train import train

evalnorm.MODEL.EVALNORM.NORM_BATCH_SIZE = 2  # images per GPU (here, per process on CPU)

model.pixel_mean = [127.5, 127.5, 127.5]
model.pixel_std = [64.0, 64.0, 64.0]
for resnet in (model.backbone, model.roi_heads.res5):
    resnet.res2_out_channels = 32
    resnet.width_per_group = 8
model.backbone.stem_out_channels = 16
rpn = model.proposal_generator
rpn.head.in_channels = 128  # res4: 4 x res2's channels
rpn.head.num_anchors = 9
rpn.anchor_generator.sizes = [[16, 32, 64]]
rpn.batch_size_per_image = 128
rpn.pre_nms_topk = (600, 600)
rpn.post_nms_topk = (100, 100)
model.roi_heads.batch_size_per_image = 32
model.roi_heads.num_classes = 10
model.roi_heads.pooler.output_size = 8
model.roi_heads.box_predictor.input_shape.channels = 256  # res5: 8 x res2's channels
model.roi_heads.box_predictor.test_topk_per_image = 20

dataloader.train.dataset.names = ["evalnorm_digits_train"]
dataloader.train.mapper.augmentations = [L(T.Resize)(shape=(128, 128))]  # no flip: digits
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = 1
dataloader.test.dataset.names = "evalnorm_digits_val"
dataloader.test.mapper.augmentations = [L(T.Resize)(shape=(128, 128))]
dataloader.test.num_workers = 1

optimizer.lr = 0.02
train.max_iter = 1600
train.checkpointer.period = 100000
train.device = "cpu"
train.seed = 0
train.output_dir = "output/demo_digits_2img"
lr_multiplier = L(warmup_cosine)(max_iter="${train.max_iter}", warmup_iters=100)

# LazyConfig twin of evalnorm_frcnn_2img.yaml: the paper's headline setting, regime (d),
# Faster R-CNN R50-C4 with EvalNorm in the backbone and the box head, 2 images per GPU on 8 GPUs.
#   python tools/lazyconfig_train_net.py --config evalnorm_frcnn_2img.py --num-gpus 8
# On another number of GPUs keep 2 images per GPU: dataloader.train.total_batch_size = 2 x GPUs.
from detectron2.config import LazyCall as L

from evalnorm_det.lazy import warmup_cosine

from .common.data.coco_600 import dataloader
from .common.evalnorm import evalnorm
from .common.models.evalnorm_frcnn_c4 import model  # noqa: F401
from .common.optim import SGD as optimizer
from .common.train import train

# B: 2 images per GPU (MODEL.EVALNORM.NORM_BATCH_SIZE): the norms' B, checked against
# total_batch_size / GPUs in training; evaluation uses it on any number of GPUs.
evalnorm.MODEL.EVALNORM.NORM_BATCH_SIZE = 2
dataloader.train.total_batch_size = 16
optimizer.lr = 0.00375  # 0.015 x N / 8, N = 2 images per GPU
train.max_iter = 469064  # 64 epochs of 117266 images
train.init_checkpoint = "checkpoints/R-50-torchvision.pth"  # tools/convert_imagenet_checkpoint.py
train.output_dir = "output/evalnorm_frcnn_2img"
lr_multiplier = L(warmup_cosine)(max_iter="${train.max_iter}", warmup_iters=1000)

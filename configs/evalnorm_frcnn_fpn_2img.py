# LazyConfig twin of evalnorm_frcnn_fpn_2img.yaml: regime (d) with FPN, EvalNorm in the backbone
# (stem, res2-res5) and the 4conv1fc box head, 2 images per GPU on 8 GPUs.
#   python tools/lazyconfig_train_net.py --config evalnorm_frcnn_fpn_2img.py --num-gpus 8
from detectron2.config import LazyCall as L

from evalnorm_det.lazy import warmup_cosine

from .common.data.coco_600 import dataloader
from .common.evalnorm import evalnorm
from .common.models.evalnorm_frcnn_fpn import model  # noqa: F401
from .common.optim import SGD as optimizer
from .common.train import train

evalnorm.MODEL.EVALNORM.NORM_BATCH_SIZE = 2  # B: images per GPU
dataloader.train.total_batch_size = 16
optimizer.lr = 0.00375  # 0.015 x N / 8, N = 2 images per GPU
train.max_iter = 469064  # 64 epochs of 117266 images
# tools/convert_imagenet_checkpoint.py --layout fpn
train.init_checkpoint = "checkpoints/R-50-torchvision-fpn.pth"
train.output_dir = "output/evalnorm_frcnn_fpn_2img"
lr_multiplier = L(warmup_cosine)(max_iter="${train.max_iter}", warmup_iters=1000)

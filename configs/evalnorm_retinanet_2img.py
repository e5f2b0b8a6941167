# LazyConfig twin of evalnorm_retinanet_2img.yaml: RetinaNet R50-FPN, regime (d), EvalNorm in
# the backbone and in the head (per-level statistics and alpha/beta: RETINANET_HEAD_STATS),
# B = 2 images in the backbone and at each level of the head; the data, schedule and ImageNet
# weights (FPN layout) of evalnorm_frcnn_fpn_2img.py.
#   python tools/lazyconfig_train_net.py --config evalnorm_retinanet_2img.py --num-gpus 8
#   ... evalnorm.MODEL.EVALNORM.RETINANET_HEAD_STATS=shared   # one EN for the five levels
from .common.models.evalnorm_retinanet import model  # noqa: F401
from .evalnorm_frcnn_fpn_2img import dataloader, evalnorm, lr_multiplier, optimizer, train  # noqa: F401

train.output_dir = "output/evalnorm_retinanet_2img"

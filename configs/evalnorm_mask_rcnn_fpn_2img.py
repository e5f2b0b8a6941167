# LazyConfig twin of evalnorm_mask_rcnn_fpn_2img.yaml: the training of evalnorm_frcnn_fpn_2img.py
# with masks, Mask R-CNN R50-FPN with EvalNorm in the backbone (B = 2 images), the box head
# (B = 2 x 64 ROIs) and the mask head (B = 2 x 16 foreground ROIs, the sampler's cap); box and
# mask AP.
#   python tools/lazyconfig_train_net.py --config evalnorm_mask_rcnn_fpn_2img.py --num-gpus 8
from .common.models.evalnorm_mask_rcnn_fpn import model  # noqa: F401
from .evalnorm_frcnn_fpn_2img import dataloader, evalnorm, lr_multiplier, optimizer, train  # noqa: F401

dataloader.train.mapper.use_instance_mask = True
dataloader.evaluator.tasks = ["bbox", "segm"]  # box and mask AP, even with no detections
train.output_dir = "output/evalnorm_mask_rcnn_fpn_2img"

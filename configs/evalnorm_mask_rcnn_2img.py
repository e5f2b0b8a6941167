# LazyConfig twin of evalnorm_mask_rcnn_2img.yaml: the training of evalnorm_frcnn_2img.py with
# masks, Mask R-CNN R50-C4 with EvalNorm in the backbone (B = 2 images) and in res5 (B = 2 x 64
# ROIs, which also computes the mask head's features); box and mask AP.
#   python tools/lazyconfig_train_net.py --config evalnorm_mask_rcnn_2img.py --num-gpus 8
from .common.models.evalnorm_mask_rcnn_c4 import model  # noqa: F401
from .evalnorm_frcnn_2img import dataloader, evalnorm, lr_multiplier, optimizer, train  # noqa: F401

dataloader.train.mapper.use_instance_mask = True
dataloader.evaluator.tasks = ["bbox", "segm"]  # box and mask AP, even with no detections
train.output_dir = "output/evalnorm_mask_rcnn_2img"

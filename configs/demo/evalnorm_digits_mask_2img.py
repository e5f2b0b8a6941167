# LazyConfig twin of evalnorm_digits_mask_2img.yaml, the mask demo: the demo's EvalNorm R50-C4
# (evalnorm_digits_2img.py) as a Mask R-CNN, detectron2's C4 mask head (no norm of its own) at
# 1/8 of its width predicting each digit's pixels, stored as COCO RLE (read as bitmasks).
#   python tools/lazyconfig_train_net.py --config demo/evalnorm_digits_mask_2img.py
from ..common.models.evalnorm_mask_rcnn_c4 import model as _mask_rcnn
from .evalnorm_digits_2img import dataloader, evalnorm, lr_multiplier, model, optimizer, train  # noqa: F401

model.roi_heads.mask_head = _mask_rcnn.roi_heads.mask_head
model.roi_heads.mask_head.conv_dims = [32]  # the deconvolution, at 1/8 of its width
dataloader.train.mapper.use_instance_mask = True
dataloader.evaluator.tasks = ["bbox", "segm"]  # box and mask AP, even with no detections
dataloader.train.mapper.instance_mask_format = "bitmask"  # INPUT.MASK_FORMAT
train.output_dir = "output/demo_digits_mask_2img"

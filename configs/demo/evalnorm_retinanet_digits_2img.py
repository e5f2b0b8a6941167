# LazyConfig twin of evalnorm_retinanet_digits_2img.yaml: RetinaNet with EvalNorm from scratch
# (regime (a)) on the bundled digits with the demo's data and schedule (evalnorm_digits_2img.py),
# EN in the backbone (B = 2) and in the head, per-level statistics and alpha/beta (B = 2 images
# at each level); a ResNet-50 and FPN at 1/8 of their width on 128x128 images, anchors halved.
#   python tools/lazyconfig_train_net.py --config demo/evalnorm_retinanet_digits_2img.py
from detectron2.layers import ShapeSpec

from ..common.models.evalnorm_retinanet import model
from .evalnorm_digits_2img import dataloader, evalnorm, lr_multiplier, optimizer, train  # noqa: F401

model.pixel_mean = [127.5, 127.5, 127.5]
model.pixel_std = [64.0, 64.0, 64.0]
_resnet = model.backbone.bottom_up
_resnet.stem_out_channels = 16
_resnet.res2_out_channels = 32
_resnet.width_per_group = 8
model.backbone.out_channels = 32
model.backbone.top_block.in_channels = 256  # res5: 8 x res2's channels
model.head.input_shape = [ShapeSpec(channels=32)] * 5
model.head.conv_dims = [32, 32, 32, 32]
model.anchor_generator.sizes = [
    [16, 20.16, 25.40],
    [32, 40.32, 50.80],
    [64, 80.63, 101.59],
    [128, 161.27, 203.19],
    [256, 322.54, 406.37],
]
model.num_classes = 10
model.max_detections_per_image = 20

optimizer.lr = 0.01
train.output_dir = "output/demo_retinanet_digits_2img"

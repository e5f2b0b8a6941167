"""MODEL.EVALNORM.MICROBATCH: one process reproduces k GPUs x B images, in the backbone and in
the C4 box head, checked against the same model run on each group of B images on its own."""

import pytest
import torch
from detection_helpers import en_layers, tiny_cfg, tiny_fpn_cfg, train
from detectron2.modeling import build_model
from detectron2.structures import Boxes

from evalnorm_det import check_evalnorm_config

# 4 images per process in groups of 2: two GPUs x 2 images.
GROUPED = ("SOLVER.IMS_PER_BATCH", "4", "MODEL.EVALNORM.NORM_BATCH_SIZE", "2")


def models(tmp_path):
    """(grouped, reference): the same weights in float64, one with MICROBATCH over 4 images,
    one plain at 2 images per process, both in training mode."""
    grouped = build_model(tiny_cfg(tmp_path, *GROUPED, "MODEL.EVALNORM.MICROBATCH", "True"))
    reference = build_model(tiny_cfg(tmp_path, "MODEL.EVALNORM.NORM_BATCH_SIZE", "2"))
    with torch.no_grad():  # not the initial statistics: a layer must not get them by accident
        for _, m in en_layers(grouped):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    reference.load_state_dict(grouped.state_dict())
    return grouped.double().train(), reference.double().train()


def statistics(model):
    return {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in en_layers(model)}


def assert_same_statistics(a, b):
    assert a.keys() == b.keys()
    for name in a:
        for x, y in zip(a[name], b[name]):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12, msg=name)


def test_backbone_normalizes_each_group_of_images_on_its_own(tmp_path):
    grouped, reference = models(tmp_path)
    layers = [m for n, m in en_layers(grouped) if not n.startswith("roi_heads")]
    assert layers and all(m.microbatch and m.norm_batch_size == 2 for m in layers)
    images = torch.randn(
        4, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    out = grouped.backbone(images)["res4"]
    expected = torch.cat(
        [reference.backbone(images[:2])["res4"], reference.backbone(images[2:])["res4"]]
    )
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    # The running statistics saw group 1, then group 2, as one GPU's would see two iterations.
    assert_same_statistics(statistics(grouped), statistics(reference))
    # A single image differs from its group: the groups really pool 2 images.
    alone = reference.backbone(images[:1])["res4"]
    assert (alone - out[:1]).abs().max() > 1e-3


def test_box_head_pools_the_rois_of_each_group_of_images(tmp_path):
    grouped, reference = models(tmp_path)
    heads = [m for n, m in en_layers(grouped) if n.startswith("roi_heads")]
    assert heads and all(not m.microbatch and m.norm_batch_size == 2 * 8 for m in heads)
    g = torch.Generator().manual_seed(1)
    features = [torch.randn(4, 128, 4, 4, dtype=torch.float64, generator=g)]
    counts = (3, 5, 2, 6)  # groups of 8 ROIs each, split unevenly between images
    boxes = []
    for n in counts:
        xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 40
        boxes.append(Boxes(torch.cat([xy, xy + 8 + 16 * torch.rand(n, 2, generator=g)], dim=1)))
    out = grouped.roi_heads._shared_roi_transform(features, boxes)
    expected = torch.cat(
        [
            reference.roi_heads._shared_roi_transform([f[:2] for f in features], boxes[:2]),
            reference.roi_heads._shared_roi_transform([f[2:] for f in features], boxes[2:]),
        ]
    )
    assert out.shape[0] == sum(counts)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert_same_statistics(statistics(grouped), statistics(reference))
    # In evaluation every ROI is on its own (EvalNorm), grouping or not.
    grouped.eval(), reference.eval()
    torch.testing.assert_close(
        grouped.roi_heads._shared_roi_transform(features, boxes),
        reference.roi_heads._shared_roi_transform(features, boxes),
        rtol=1e-12,
        atol=1e-12,
    )


def test_trains_through_the_trainer(tmp_path):
    trainer = train(tiny_cfg(tmp_path, *GROUPED, "MODEL.EVALNORM.MICROBATCH", "True"))
    layers = dict(en_layers(trainer.model))
    assert layers["backbone.stem.conv1.norm"].num_batches_tracked.item() == 3 * 2
    assert layers["roi_heads.res5.0.conv1.norm"].num_batches_tracked.item() == 3 * 2
    assert all(torch.isfinite(m.alpha) and m.alpha != 0.25 for m in layers.values())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("MODEL.EVALNORM.NORM_BATCH_SIZE", "0"), "needs MODEL.EVALNORM.NORM_BATCH_SIZE"),
        (("MODEL.EVALNORM.NORM_BATCH_SIZE", "3"), "do not split into groups"),
        (("MODEL.EVALNORM.BACKBONE_NORM", "BN"), "MODEL.EVALNORM.BACKBONE_NORM='BN'"),
        (("MODEL.EVALNORM.ROI_HEAD_NORM", "SyncBN"), "MODEL.EVALNORM.ROI_HEAD_NORM='SyncBN'"),
    ],
)
def test_bad_microbatch_config_names_the_key(tmp_path, overrides, message):
    cfg = tiny_cfg(tmp_path, *GROUPED, "MODEL.EVALNORM.MICROBATCH", "True", *overrides)
    with pytest.raises(ValueError, match=message):
        check_evalnorm_config(cfg, world_size=1)


def test_microbatch_config_checks(tmp_path):
    ok = tiny_cfg(tmp_path, *GROUPED, "MODEL.EVALNORM.MICROBATCH", "True")
    check_evalnorm_config(ok, world_size=1)  # 4 images in groups of 2
    check_evalnorm_config(ok, world_size=2)  # 2 images per process: one group
    with pytest.raises(ValueError, match="do not split"):
        check_evalnorm_config(ok, world_size=4)  # 1 image per process
    check_evalnorm_config(ok, world_size=4, training=False)  # evaluation: any process count
    frozen = tiny_cfg(
        tmp_path,
        *GROUPED,
        "MODEL.EVALNORM.MICROBATCH",
        "True",
        "MODEL.EVALNORM.ROI_HEAD_NORM",
        "FrozenBN",
    )
    check_evalnorm_config(frozen, world_size=1)
    fpn = tiny_fpn_cfg(tmp_path, *GROUPED, "MODEL.EVALNORM.MICROBATCH", "True")
    with pytest.raises(ValueError, match="only in the C4 box head"):
        check_evalnorm_config(fpn, world_size=1)
    check_evalnorm_config(
        tiny_fpn_cfg(
            tmp_path,
            *GROUPED,
            "MODEL.EVALNORM.MICROBATCH",
            "True",
            "MODEL.EVALNORM.ROI_HEAD_NORM",
            "GN",
        ),
        world_size=1,
    )

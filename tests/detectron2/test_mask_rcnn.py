"""Mask R-CNN with EvalNorm: the mask head and its B, iterations with no or one foreground ROI,
the digits' masks, mask AP beside box AP in the table, the rescue of a BN Mask R-CNN."""

import copy
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detection_helpers import (
    D2_BN_FPN,
    FPN_AS_DEMO,
    en_layers,
    register_tiny_digits,
    rescue_overrides,
    tiny_cfg,
    tiny_overrides,
    train,
)
from detectron2.data import DatasetMapper, get_detection_dataset_dicts
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import MaskRCNNConvUpsampleHead
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from helpers import ROOT, import_tool, randomize_batchnorm
from test_configs import D2_CONFIGS, load, value
from torch import nn

from evalnorm import deploy, output_change
from evalnorm_det import OnlineEstimator, Trainer, check_evalnorm_config, evalnorm_mode
from evalnorm_det.config import TABLE_ROWS, norm_batch_sizes
from evalnorm_det.data import write_coco2014_layout
from evalnorm_det.data.digits import render_split
from evalnorm_det.engine import (
    add_rescue_arguments,
    argument_parser,
    load_evalnorm_model,
    parse_args,
    setup_cfg,
)
from evalnorm_det.engine.deploy import detector_outputs, with_proposals
from evalnorm_det.engine.evaluation import METRICS, format_table
from evalnorm_det.engine.trainer import _CHECKED
from evalnorm_det.modeling import EvalNormConvUpsampleHead, convert_norms
from evalnorm_det.utils.nonfinite import NonFiniteCheckHook

FPN_MASK = "evalnorm_mask_rcnn_fpn_2img.yaml"
# Masks from the digits' RLE; a narrow mask head; every detection kept, so that a model trained
# for a few iterations still predicts masks to score.
MASK_TINY = [
    "INPUT.MASK_FORMAT",
    "bitmask",
    "MODEL.ROI_MASK_HEAD.CONV_DIM",
    "16",
    "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION",
    "7",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
    "0.0",
]
# tiny_overrides samples 8 ROIs per image: int(8 x 0.25) = 2 foreground ROIs at most.
FG_PER_IMAGE = 2


def mask_cfg(tmp_path, *overrides, fpn=True):
    """The FPN Mask R-CNN config (or the mask demo, C4) shrunk as ``tiny_cfg`` shrinks the demo."""
    if fpn:
        return tiny_cfg(tmp_path, *FPN_AS_DEMO, *MASK_TINY, *overrides, config=FPN_MASK)
    return tiny_cfg(tmp_path, *MASK_TINY, *overrides, config="demo/evalnorm_digits_mask_2img.yaml")


def head_b(model):
    """{place: {B}} of the EvalNorm2d layers of ``model``'s ROI heads, by child of roi_heads."""
    places = {}
    for name, m in en_layers(model):
        if name.startswith("roi_heads."):
            places.setdefault(name.split(".")[1], set()).add(m.norm_batch_size)
    return places


MASK_CONFIGS = [f"evalnorm_mask_rcnn_{k}{n}img.yaml" for k in ("", "fpn_") for n in (2, 4, 8)]


@pytest.mark.parametrize("name", MASK_CONFIGS)
def test_mask_configs_are_the_box_configs_with_a_mask_head(name):
    n = int(name.rsplit("_", 1)[1].removesuffix("img.yaml"))
    fpn = "_fpn_" in name
    cfg = load(name)
    # The box detector of the same batch: the C4 config of n images, or the FPN base with its
    # batch settings.
    box = load(f"evalnorm_frcnn_{n}img.yaml")
    if fpn:
        box_fpn = load("Base-EvalNorm-RCNN-FPN.yaml")
        box_fpn.SOLVER, box_fpn.MODEL.EVALNORM = box.SOLVER, box.MODEL.EVALNORM
        box = box_fpn
    box.MODEL.MASK_ON, box.MODEL.ROI_MASK_HEAD = True, cfg.MODEL.ROI_MASK_HEAD
    box.OUTPUT_DIR = f"output/evalnorm_mask_rcnn_{'fpn_' if fpn else ''}{n}img"
    assert cfg.dump() == box.dump()
    assert norm_batch_sizes(cfg, world_size=8) == (n, 64 * n, 16 * n)
    mask_head = cfg.MODEL.ROI_MASK_HEAD
    expected = ("EvalNormConvUpsampleHead", 4) if fpn else ("MaskRCNNConvUpsampleHead", 0)
    assert (mask_head.NAME, mask_head.NUM_CONV) == expected
    # detectron2's mask heads: its Base-RCNN-FPN.yaml's (with the ROI heads' norm), or C4's.
    d2 = load(str(D2_CONFIGS / ("Base-RCNN-FPN.yaml" if fpn else "Base-RCNN-C4.yaml")))
    for key in [
        "NUM_CONV",
        "CONV_DIM",
        "POOLER_RESOLUTION",
        "POOLER_TYPE",
        "POOLER_SAMPLING_RATIO",
    ]:
        assert value(cfg, f"MODEL.ROI_MASK_HEAD.{key}") == value(d2, f"MODEL.ROI_MASK_HEAD.{key}")
    cfg.SOLVER.IMS_PER_BATCH = n  # one process's share of the 8 GPUs
    check_evalnorm_config(cfg, world_size=1)
    model = build_model(cfg)
    if fpn:
        assert type(model.roi_heads.mask_head) is EvalNormConvUpsampleHead
        assert head_b(model) == {"box_head": {64 * n}, "mask_head": {16 * n}}
        assert len([1 for name, _ in en_layers(model) if ".mask_head." in name]) == 4
    else:  # detectron2's C4 mask head: no norm; res5 (ROI heads) computes its features
        assert type(model.roi_heads.mask_head) is MaskRCNNConvUpsampleHead
        assert head_b(model) == {"res5": {64 * n}}


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["MODEL.ROI_MASK_HEAD.NUM_CONV", "0"],
            r"ROI_MASK_HEAD.NAME='EvalNormConvUpsampleHead' with MODEL.ROI_MASK_HEAD.NUM_CONV=0",
        ),
        (
            [
                "MODEL.ROI_MASK_HEAD.NAME",
                "MaskRCNNConvUpsampleHead",
                "MODEL.ROI_MASK_HEAD.NORM",
                "EN",
            ],
            r"MODEL.ROI_MASK_HEAD.NORM='EN'",
        ),
        (["MODEL.ROI_HEADS.POSITIVE_FRACTION", "0.1"], r"POSITIVE_FRACTION=0.1 x .*=8"),
        (
            ["INPUT.MASK_FORMAT", "polygon", "DATASETS.TRAIN", "('evalnorm_digits_train',)"],
            r"INPUT.MASK_FORMAT='polygon'.*'evalnorm_digits_train'",
        ),
    ],
)
def test_bad_mask_settings_are_refused_naming_the_key(tmp_path, overrides, message):
    cfg = mask_cfg(tmp_path, *overrides)
    with pytest.raises(ValueError, match=message):
        check_evalnorm_config(cfg, 1)
    cfg.MODEL.MASK_ON = False  # a box detector does not read them
    check_evalnorm_config(cfg, 1)


def test_the_digits_masks_are_each_digits_pixels(tmp_path):
    dataset_dir = register_tiny_digits(tmp_path / "datasets")
    with open(os.path.join(dataset_dir, "annotations", "train.json")) as f:
        coco = json.load(f)
    renders = list(render_split("train", 6, 64, seed=0))
    annotations = iter(coco["annotations"])
    for r in renders:
        for box, mask in zip(r.boxes.tolist(), r.masks):
            a = next(annotations)
            decoded = mask_util.decode(a["segmentation"]).astype(bool)
            assert np.array_equal(decoded, mask) and mask.any()
            assert a["bbox"] == box and a["area"] == box[2] * box[3]  # the box's, as before
            ys, xs = np.nonzero(decoded)
            assert [xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1] == box
    # A box detector's mapper drops the masks; a Mask R-CNN's gets them as bitmasks.
    dicts = get_detection_dataset_dicts(["tiny_digits_train"])
    box_only = DatasetMapper(mask_cfg(tmp_path, "MODEL.MASK_ON", "False"), is_train=True)
    assert not box_only(dicts[0])["instances"].has("gt_masks")
    instances = DatasetMapper(mask_cfg(tmp_path), is_train=True)(dicts[0])["instances"]
    assert isinstance(instances.gt_masks, BitMasks)
    assert instances.gt_masks.tensor.shape[0] == len(instances) > 0


@pytest.mark.parametrize("fpn", [True, False], ids=["FPN", "C4"])
def test_deployment_compares_the_mask_logits(tmp_path, fpn):
    """``detector_outputs`` ends with the mask head's logits on the fixed proposals, so
    deployment measures what the mask head's layers (FPN) change: box outputs do not show it."""
    cfg = mask_cfg(tmp_path, fpn=fpn)
    model = randomize_batchnorm(build_model(cfg)).eval()
    image = [{"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)}]
    (batch,) = with_proposals(model, [image])
    with torch.no_grad():
        outputs = detector_outputs(model, batch)
    # Upsampled 2x from the mask pooler (FPN) or from res5, half the box pooler's side (C4).
    side = (
        2 * cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION
        if fpn
        else cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
    )
    classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    assert outputs[-1].shape == (len(batch[1][0]), classes, side, side)
    _, report = deploy(copy.deepcopy(model), [batch], 1e-3, detector_outputs)
    assert report["change"] <= 1e-3
    if not fpn:  # C4's mask head is a deconvolution: res5, shared with the boxes, normalizes
        return
    assert any(n.startswith("roi_heads.mask_head.") for n, _ in en_layers(model))
    with torch.no_grad(), evalnorm_mode(model.roi_heads.mask_head, "ema"):
        changed = detector_outputs(model, batch)
    assert output_change(outputs[:-1], changed[:-1]) == 0
    assert output_change(outputs, changed) > 1e-3


def test_convert_norms_gives_a_detectron2_mask_heads_norms_their_own_b(tmp_path):
    """A Mask R-CNN as detectron2 builds it with plain BN (its FPN backbone, box and mask
    heads): the mask head's B is the foreground ROIs per GPU, not the sampled ROIs."""
    cfg = d2_bn_mask_cfg(tmp_path, "MODEL.EVALNORM.NORM_BATCH_SIZE", "2")
    model = randomize_batchnorm(build_model(cfg)).eval()
    assert type(model.roi_heads.mask_head) is MaskRCNNConvUpsampleHead
    images = [{"image": torch.rand(3, 64, 64) * 255, "height": 64, "width": 64}]
    with torch.no_grad():
        before = model(images)[0]["instances"]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert convert_norms(cfg, model, norm_batch_sizes(cfg)) == len(names)
    assert sorted(n for n, _ in en_layers(model)) == sorted(names)
    assert head_b(model) == {"box_head": {2 * 8}, "mask_head": {2 * FG_PER_IMAGE}}
    assert {m.norm_batch_size for n, m in en_layers(model) if n.startswith("backbone.")} == {2}
    with torch.no_grad(), evalnorm_mode(model, "ema"):
        after = model(images)[0]["instances"]
    assert len(before) > 0
    assert torch.equal(before.pred_masks, after.pred_masks)
    assert torch.equal(before.scores, after.scores)


def gt_batch(n_images, boxes_per_image, size=64):
    """Training inputs: ``n_images`` random images, each with ``boxes_per_image`` objects."""
    g = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(n_images):
        inst = Instances((size, size))
        boxes = torch.tensor([[8.0, 8.0, 40.0, 44.0], [30.0, 4.0, 60.0, 30.0]])[:boxes_per_image]
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.arange(boxes_per_image)
        masks = torch.zeros(boxes_per_image, size, size, dtype=torch.bool)
        for k, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[k, y0:y1, x0:x1] = True
        inst.gt_masks = BitMasks(masks)
        image = torch.rand(3, size, size, generator=g) * 255
        batch.append({"image": image, "instances": inst})
    return batch


def test_iterations_with_no_or_one_foreground_roi_train_as_batchnorm(tmp_path):
    """The mask head's batch is the foreground ROIs: none when no image has an object, one with
    one object and a cap of one per image. Nothing becomes NaN: losses, running statistics,
    alpha/beta (the NaN check hook stays quiet); an empty batch leaves the mask head's
    statistics and coefficients as they were, as BatchNorm2d leaves its statistics."""
    cfg = mask_cfg(tmp_path, "MODEL.ROI_HEADS.POSITIVE_FRACTION", "0.125")  # 1 of 8 ROIs
    model = build_model(cfg).train()
    estimator = OnlineEstimator(model)
    mask_layers = [m for n, m in en_layers(model) if ".mask_head." in n]
    assert mask_layers and {m.norm_batch_size for m in mask_layers} == {2}
    seen = []
    hook = mask_layers[0].register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    nan_check = NonFiniteCheckHook(en_layers(model), _CHECKED, kind="EvalNorm")
    nan_check.trainer = SimpleNamespace(iter=0)

    def state(layers):  # all but num_batches_tracked, which counts empty batches as BN does
        return [t.clone() for m in layers for k, t in m.state_dict().items() if "tracked" not in k]

    for n_images, objects, foreground in ((2, 0, 0), (1, 1, 1), (2, 1, 2)):
        before = state(mask_layers)
        with EventStorage():
            losses = model(gt_batch(n_images, objects))
        assert all(torch.isfinite(v) for v in losses.values()), losses
        sum(losses.values()).backward()
        estimator.step()
        nan_check.after_step()  # raises FloatingPointError on any NaN or Inf
        assert seen[-1] == foreground
        unchanged = all(torch.equal(a, b) for a, b in zip(before, state(mask_layers)))
        if foreground == 0:
            assert losses["loss_mask"].item() == 0.0 and unchanged
        else:  # trained as BatchNorm on its one or two ROIs, and alpha/beta took a step
            assert not unchanged and all(m.last_aux_loss is not None for m in mask_layers)
            assert all(torch.isfinite(m.last_aux_loss) for m in mask_layers)
        model.zero_grad()
    hook.remove()


def test_training_estimates_the_mask_heads_coefficients_and_tables_mask_ap(tmp_path):
    """2 iterations of an FPN Mask R-CNN with online estimation on the tiny digits, evaluated at
    the end: the mask head's alpha/beta moved from 1/B^2, and every row has box and mask AP."""
    cfg = mask_cfg(tmp_path, "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "('tiny_digits_val',)")
    trainer = train(cfg)
    layers = [(n, m) for n, m in en_layers(trainer.model) if ".mask_head." in n]
    b = 2 * FG_PER_IMAGE
    for name, m in layers:
        assert m.alpha.item() != pytest.approx(1 / b**2, rel=1e-4), name
        assert math.isfinite(m.alpha.item()) and math.isfinite(m.beta.item())
    assert_mask_table(Path(cfg.OUTPUT_DIR), ["EMA", "EN", "EN - EMA", "1/B^2"])


def test_c4_mask_rcnn_trains_and_evaluates(tmp_path):
    """The mask demo (C4) shrunk: detectron2's C4 mask head on res5's features trains and is
    evaluated with box and mask AP."""
    cfg = mask_cfg(
        tmp_path, "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "('tiny_digits_val',)", fpn=False
    )
    trainer = train(cfg)
    assert type(trainer.model.roi_heads.mask_head) is MaskRCNNConvUpsampleHead
    assert head_b(trainer.model) == {"res5": {2 * 8}}
    assert_mask_table(Path(cfg.OUTPUT_DIR), ["EMA", "EN", "EN - EMA", "1/B^2"])


def test_c4_mask_rcnn_with_microbatches(tmp_path):
    """One process reproducing 2 GPUs x 2 images: res5 normalizes each group's ROIs on its own,
    and the mask branch takes its foreground ROIs' features from those groups, in order."""
    cfg = mask_cfg(
        tmp_path,
        *["SOLVER.IMS_PER_BATCH", "4", "MODEL.EVALNORM.NORM_BATCH_SIZE", "2"],
        *["MODEL.EVALNORM.MICROBATCH", "True"],
        fpn=False,
    )
    check_evalnorm_config(cfg, 1)
    model = build_model(cfg).train()
    calls = []
    hook = model.roi_heads.res5.register_forward_hook(lambda m, args, out: calls.append(len(out)))
    with EventStorage():
        losses = model(gt_batch(4, 2))
    hook.remove()
    assert len(calls) == 2 and all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"].item() > 0


def assert_mask_table(out, labels, table="evalnorm_table"):
    with open(out / f"{table}.csv") as f:
        rows = list(csv.reader(f))
    metrics = ["AP", "AP50", "AP75"]
    assert rows[0] == ["mode", *(f"{t} {m}" for t in ("box", "mask") for m in metrics)]
    assert [r[0] for r in rows[1:]] == labels
    assert all(len(r) == 7 and all(math.isfinite(float(v)) for v in r[1:]) for r in rows[1:])
    text = (out / f"{table}.txt").read_text()
    assert "COCO box and mask AP" in text.splitlines()[0] and "mask AP75" in text
    results = json.loads((out / "evalnorm_results.json").read_text())
    assert all({"bbox", "segm"} <= set(r) for r in results.values())


def test_box_only_tables_keep_their_layout():
    results = {"ema": {"bbox": {"AP": 1.0, "AP50": 2.0, "AP75": 3.0}}}
    assert format_table(results, "t").splitlines()[1] == " " * 3 + "       AP     AP50     AP75"
    results["ema"]["segm"] = {"AP": 0.5, "AP50": 1.5, "AP75": 2.5}
    header = format_table(results, "t").splitlines()[1].split()
    assert header == [word for t in ("box", "mask") for m in METRICS for word in (t, m)]


# A Mask R-CNN R50-FPN exactly as detectron2 builds it, with plain BN in its ResNet, box head and
# mask head, shrunk as the other tests' models.
D2_BN_MASK = [
    *D2_BN_FPN,
    "MODEL.ROI_MASK_HEAD.NAME",
    "MaskRCNNConvUpsampleHead",
    "MODEL.ROI_MASK_HEAD.NORM",
    "BN",
    "MODEL.EVALNORM.BACKBONE_NORM",
    "BN",
    "MODEL.EVALNORM.ROI_HEAD_NORM",
    "BN",
]


def d2_bn_mask_cfg(tmp_path, *overrides):
    return mask_cfg(tmp_path, *D2_BN_MASK, *overrides)


@pytest.fixture(scope="module")
def bn_mask_checkpoint(tmp_path_factory):
    """detectron2's BN Mask R-CNN trained 3 iterations (B = 2 images, 16 ROIs, 4 fg ROIs)."""
    tmp = tmp_path_factory.mktemp("bn_mask")
    cfg = d2_bn_mask_cfg(tmp)
    trainer = train(cfg)
    assert not en_layers(trainer.model)
    return tmp, Path(cfg.OUTPUT_DIR) / "model_final.pth"


def rescue_opts(tmp, checkpoint, *extra):
    return rescue_overrides(tmp, checkpoint, [*FPN_AS_DEMO, *MASK_TINY, *D2_BN_MASK], extra)


CONFIG = str(ROOT / "configs" / FPN_MASK)


def b_of(name):
    """B of the layer ``name`` in the tiny BN Mask R-CNN."""
    if name.startswith("roi_heads.mask_head."):
        return 2 * FG_PER_IMAGE
    return 2 * 8 if name.startswith("roi_heads.") else 2


def test_rescue_tools_give_the_mask_head_its_b_and_fit_it(bn_mask_checkpoint, tmp_path):
    tmp, checkpoint = bn_mask_checkpoint
    source = torch.load(checkpoint, weights_only=True)["model"]
    layers = sorted({k.rsplit(".", 1)[0] for k in source if k.endswith("running_mean")})
    assert any(n.startswith("roi_heads.mask_head.") for n in layers)

    rule = tmp_path / "rule.pth"
    import_tool("convert_to_evalnorm").main(
        ["--config", CONFIG, "--output", str(rule), *rescue_opts(tmp, checkpoint)]
    )
    rescued = torch.load(rule, weights_only=True)
    for name in layers:
        alpha = torch.sigmoid(rescued["model"][f"{name}.alpha_logit"]).item()
        assert alpha == pytest.approx(1 / b_of(name) ** 2, rel=1e-6), name
    assert rescued["evalnorm"]["norm_batch_size"] == {
        "images_per_gpu": 2,
        "rois_per_gpu": 16,
        "fg_rois_per_gpu": 4,
    }

    # Offline: the mask head sees as many foreground ROIs as each batch gives, and is fitted too.
    offline = tmp_path / "offline.pth"
    opts = rescue_opts(tmp, checkpoint, "MODEL.EVALNORM.OFFLINE.MAX_ITER", "3")
    parser = add_rescue_arguments(argument_parser(training=False), "x.pth")
    args = parse_args(parser, ["--config-file", CONFIG, "--output", str(offline), *opts])
    summary = import_tool("estimate_offline").main(args)
    assert summary["iterations"] == 3 and all(math.isfinite(v) for v in summary["losses"])
    fitted = torch.load(offline, weights_only=True)["model"]
    for name in layers:
        for key in ("alpha_logit", "beta_logit"):
            value = fitted[f"{name}.{key}"].item()
            assert math.isfinite(value), name
            assert value != pytest.approx(-math.log(b_of(name) ** 2 - 1), abs=1e-4), name


def test_every_row_of_the_table_has_mask_ap_for_a_bn_mask_rcnn(bn_mask_checkpoint, tmp_path):
    _, checkpoint = bn_mask_checkpoint
    extra = ["TEST.EVALNORM_ROWS", "['all']", "TEST.PRECISE_BN.NUM_ITER", "2"]
    extra += ["MODEL.EVALNORM.OFFLINE.MAX_ITER", "2"]
    cfg = setup_cfg(CONFIG, rescue_opts(tmp_path, checkpoint, *extra), training=False)
    model = load_evalnorm_model(cfg, norm_batch_sizes(cfg))
    assert head_b(model) == {"box_head": {16}, "mask_head": {4}}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    results = Trainer.test(cfg, model)
    rows = [r for r in TABLE_ROWS if r != "en_calibrated"]
    assert list(results) == rows
    for key, tensor in model.state_dict().items():  # every procedure put the model back
        assert torch.equal(tensor, before[key]), key
    labels = [TABLE_ROWS[r] for r in rows]
    assert_mask_table(Path(cfg.OUTPUT_DIR), [*labels[:2], "EN - EMA", *labels[2:]])


def test_train_net_trains_and_evaluates_a_mask_rcnn(tmp_path):
    """tools/train_net.py with the FPN Mask R-CNN config on a tiny COCO 2014 layout of digits:
    2 iterations, then --eval-only with box and mask AP; a bad mask key stops it before launch."""
    write_coco2014_layout(str(tmp_path / "datasets"), num_train=4, num_val=3, image_size=64)
    # PYTHONPATH: the tool imports this checkout's package, wherever it is installed from.
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"), PYTHONPATH=path)
    out = tmp_path / "output"
    small = [*tiny_overrides(), *FPN_AS_DEMO, *MASK_TINY, "OUTPUT_DIR", str(out)]
    small += ["MODEL.ROI_HEADS.NUM_CLASSES", "80", "TEST.DETECTIONS_PER_IMAGE", "10"]

    def train_net(*opts, flags=()):
        cmd = [sys.executable, str(ROOT / "tools" / "train_net.py"), "--config", FPN_MASK, *flags]
        return subprocess.run(
            [*cmd, *small, *opts], check=False, env=env, capture_output=True, text=True
        )

    proc = train_net("SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()")
    assert proc.returncode == 0, proc.stderr[-5000:]
    proc = train_net("MODEL.WEIGHTS", str(out / "model_final.pth"), flags=["--eval-only"])
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "Starting training" not in proc.stdout + proc.stderr
    assert_mask_table(out, ["EMA", "EN", "EN - EMA", "1/B^2"])

    proc = train_net("MODEL.ROI_MASK_HEAD.NUM_CONV", "0", "OUTPUT_DIR", str(tmp_path / "bad"))
    assert proc.returncode != 0
    assert "MODEL.ROI_MASK_HEAD.NUM_CONV=0" in proc.stderr
    assert not (tmp_path / "bad").exists()  # stopped before any worker wrote there

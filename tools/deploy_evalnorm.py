#!/usr/bin/env python
"""Deploy an EvalNorm detector: the layers whose correction changes its outputs by at most a
tolerance on calibration images evaluate as EMA (folded into their convolutions); the others
stay EvalNorm.

    python tools/deploy_evalnorm.py --config evalnorm_frcnn_2img.yaml --dataset coco_2014_valminusminival \\
        --num-images 16 --tolerance 1e-3 --onnx model.onnx \\
        MODEL.WEIGHTS output/evalnorm_frcnn_2img/model_final.pth

--num-images images of --dataset (default: the config's first DATASETS.TEST; give a split kept
apart from the test split) calibrate: evalnorm.select_ema_layers compares the detector's raw
outputs (backbone features, RPN outputs, box scores and deltas on the EN model's proposals)
with each choice of layers as EMA against EvalNorm everywhere (relative L2 change, the largest
over tensors and images). --held-out images after them are then only measured, and reported.
Writes --output (default OUTPUT_DIR/model_deployed.pth): the input checkpoint with alpha = beta
= 0 in the chosen layers (alpha/beta of the others and every other entry unchanged) and the
report under "evalnorm". A model built from the config with it evaluates as the deployed one;
evalnorm.fold_ema_layers(model.eval()) then folds those layers into their convolutions, as
the --onnx graph has them.
"""

import os

import torch
from detectron2.utils import comm

from evalnorm import deploy, fold_ema_layers, output_change
from evalnorm_det import Trainer
from evalnorm_det.config import norm_batch_sizes
from evalnorm_det.engine import (
    add_rescue_arguments,
    argument_parser,
    load_evalnorm_model,
    non_negative_int,
    parse_args,
    positive_int,
    rescue_metadata,
    save_evalnorm_checkpoint,
    setup,
)
from evalnorm_det.engine.deploy import detector_outputs, with_proposals


def build_parser():
    parser = add_rescue_arguments(argument_parser(__doc__, training=False), "model_deployed.pth")
    parser.add_argument("--dataset", help="calibration images (default: DATASETS.TEST[0])")
    parser.add_argument("--num-images", type=positive_int, default=8, help="calibration images")
    parser.add_argument(
        "--held-out", type=non_negative_int, default=0, help="further images only measured"
    )
    parser.add_argument(
        "--tolerance", type=float, default=1e-3, help="relative output change allowed (1e-3)"
    )
    parser.add_argument("--onnx", metavar="FILE", help="also write the deployed model's ONNX graph")
    return parser


def main(args):
    cfg = setup(args)
    output = args.output or os.path.join(cfg.OUTPUT_DIR, "model_deployed.pth")
    for path in (output, args.onnx):
        if path and os.path.exists(path) and not args.overwrite:
            raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    batch_sizes = norm_batch_sizes(cfg)
    model = load_evalnorm_model(cfg, batch_sizes).eval()
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    images = []
    for inputs in Trainer.build_test_loader(cfg, dataset):
        images.append(inputs)
        if len(images) == args.num_images + args.held_out:
            break
    if len(images) < args.num_images:
        raise ValueError(f"{dataset} has {len(images)} images, fewer than --num-images")
    calibration = with_proposals(model, images[: args.num_images])
    held_out = with_proposals(model, images[args.num_images :])
    with torch.no_grad():
        references = [detector_outputs(model, b) for b in held_out]
    model, report = deploy(model, calibration, args.tolerance, detector_outputs, fold=False)
    with torch.no_grad():
        report["held_out_change"] = max(
            (output_change(r, detector_outputs(model, b)) for r, b in zip(references, held_out)),
            default=None,
        )
    report.update(dataset=dataset, calibration_images=len(calibration), held_out=len(held_out))
    kept = [row["name"] for row in report["layers"] if not row["ema"]]
    metadata = rescue_metadata(cfg, batch_sizes, "deployed", deployment=report)
    save_evalnorm_checkpoint(model, cfg.MODEL.WEIGHTS, output, metadata, args.overwrite)
    print(
        f"Wrote {output}: {len(report['layers']) - len(kept)} of {len(report['layers'])} "
        f"EvalNorm layers evaluate as EMA; output change {report['change']:.3g} on "
        f"{len(calibration)} calibration images (tolerance {args.tolerance:g})"
        + (f", {report['held_out_change']:.3g} on {len(held_out)} held out" if held_out else "")
        + f". Kept as EvalNorm: {', '.join(kept) or 'none'}"
    )
    if args.onnx:
        export_onnx(fold_ema_layers(model), images[0][0]["image"], args.onnx)
        print(f"Wrote {args.onnx}")
    return report


def export_onnx(model, image, path):
    """The ONNX graph of ``model`` on images like ``image`` (3, H, W), as docs/EXPORT.md does."""
    from detectron2.export import TracingAdapter

    def inference(model, image):
        return model.inference([{"image": image}], do_postprocess=False)[0]

    with torch.no_grad():
        adapter = TracingAdapter(model, image, inference)
        torch.onnx.export(
            adapter,
            adapter.flattened_inputs,
            path,
            dynamo=False,
            opset_version=17,
            input_names=["image"],
            dynamic_axes={"image": {1: "height", 2: "width"}},
        )


if __name__ == "__main__":
    args = parse_args(build_parser())
    print("Command Line Args:", args)
    if args.num_gpus * args.num_machines != 1:
        raise SystemExit("deploy_evalnorm.py runs in one process: leave --num-gpus at 1")
    if comm.is_main_process():
        main(args)

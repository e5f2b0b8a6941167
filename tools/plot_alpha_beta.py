#!/usr/bin/env python
"""Draw the estimated EvalNorm alpha and beta of every layer, per checkpoint (the paper's Figure 3).

    python tools/plot_alpha_beta.py output/a_scratch_2img/model_final.pth \\
        output/a_scratch_8img/model_final.pth --label "B = 2" --label "B = 8" \\
        --output alpha_beta.png

Two panels, alpha (the weight of a sample's own mean, eq. 5) above beta (of its variance,
eq. 6), on a log scale: a bar per checkpoint (one colour each) for every EvalNorm layer, the
layers in network order and separated by stage and block (backbone.stem, backbone.res2.0, ...,
roi_heads.res5.2). A CHECKPOINT is detectron2's (``{"model": state_dict, ...}``) or a bare
state dict; each must have EvalNorm layers (``<layer>.alpha_logit``/``beta_logit``). Labels
default to the file name (the folder's name for ``model_final.pth``). PNG is never
overwritten without --overwrite.
"""

import argparse
import sys

from evalnorm_det import visualize
from evalnorm_det.engine import add_figure_arguments, check_output


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="a .pth checkpoint")
    parser.add_argument(
        "--label", action="append", help="legend label, once per CHECKPOINT, in their order"
    )
    add_figure_arguments(parser, width=1400, height=800)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    labels = args.label or visualize.checkpoint_labels(args.checkpoints)
    if len(labels) != len(args.checkpoints) or len(set(labels)) != len(labels):
        sys.exit(f"error: give one distinct --label per checkpoint ({len(args.checkpoints)})")
    try:
        check_output(args.output, args.overwrite)
        coefficients = {
            label: visualize.read_coefficients(path)
            for label, path in zip(labels, args.checkpoints)
        }
        fig = visualize.plot_coefficients(coefficients, args.width, args.height, args.dpi)
    except (ValueError, TypeError) as e:
        sys.exit(f"error: {e}")
    visualize.save_png(fig, args.output)
    for label, per_layer in coefficients.items():
        alphas, betas = zip(*per_layer.values())
        print(
            f"{label}: {len(per_layer)} EvalNorm layers, alpha {min(alphas):.3g} to "
            f"{max(alphas):.3g}, beta {min(betas):.3g} to {max(betas):.3g}"
        )
    print(f"Wrote {args.output} ({args.width}x{args.height} pixels)")


if __name__ == "__main__":
    main()

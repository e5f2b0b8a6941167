"""Per layer, how far EvalNorm's evaluation moves a trained detector from its EMA normalization.

For a cell of ``python -m benchmarks.detection_regimes`` (its work folder: ``config.yaml`` and
``model_final.pth``), every EvalNorm2d's alpha, beta and the mean absolute difference, over
the test images, between EN's normalization of the layer's input and the EMA normalization of
the same input, before the affine:

    gap = mean | (x - mu_hat) / sqrt(var_hat + eps) - (x - mu_E) / sqrt(var_E + eps) |

in units of the normalized activation (1 = one standard deviation), with the network evaluated
on EMA statistics: in regime (c) read as ``batch_target`` or ``frozen_target``, that is the
normalization the network trained with, so the gap is how far EN takes each layer from what
training produced. Writes ``<cell>.json`` and ``layer_gaps.png`` (one bar per layer and cell).

    python -m benchmarks.layer_gaps --preset full \\
        output/benchmarks/detection_regimes/full/work/cells/c_2img_seed0 \\
        output/benchmarks/detection_regimes/full/work/cells/d_2img_seed0 \\
        --output-dir benchmarks/results/detection_regimes/layer_gaps
"""

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from evalnorm import functional as EF
from evalnorm_det import EvalNorm2d, EvalNormCheckpointer, Trainer, evalnorm_mode
from evalnorm_det.engine.defaults import setup_cfg

from .common import torch_threads
from .detection_regimes.cells import register_datasets
from .detection_regimes.settings import PRESETS


@torch.no_grad()
def normalization_gaps(model, batches):
    """{layer name: {"alpha", "beta", "gap"}} for every EvalNorm2d of ``model`` over the
    evaluation forwards of ``batches`` (each ``model(batch)``), run on EMA statistics; "gap" is
    the mean over every (sample, channel, position) of |EN-normalized - EMA-normalized input|."""
    layers = {m: name for name, m in model.named_modules() if isinstance(m, EvalNorm2d)}
    sums = {m: [0.0, 0] for m in layers}

    def record(m, inputs):
        x = inputs[0].float()
        if x.shape[0] == 0:
            return
        mu_e, var_e = m.running_mean.float(), m.running_var.float()
        ones, zeros = torch.ones_like(mu_e), torch.zeros_like(mu_e)  # no affine
        en = EF.evalnorm(x, mu_e, var_e, ones, zeros, m.alpha.float(), m.beta.float(), m.eps)
        ema = F.batch_norm(x, mu_e, var_e, None, None, False, 0.0, m.eps)
        sums[m][0] += (en - ema).abs().double().sum().item()
        sums[m][1] += x.numel()

    handles = [m.register_forward_pre_hook(record) for m in layers]
    was_training = model.training
    model.eval()
    try:
        with evalnorm_mode(model, "ema"):
            for batch in batches:
                model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {
        name: {"alpha": m.alpha.item(), "beta": m.beta.item(), "gap": s / max(n, 1)}
        for m, name in layers.items()
        for s, n in [sums[m]]
    }


def cell_gaps(cell_dir, preset, num_images):
    """``normalization_gaps`` of a detection_regimes cell (run with ``preset``) on
    ``num_images`` test images."""
    register_datasets(preset, PRESETS[preset])
    cfg = setup_cfg(str(Path(cell_dir) / "config.yaml"), training=False, world_size=1)
    model = Trainer.build_model(cfg)
    EvalNormCheckpointer(model).load(str(Path(cell_dir) / "model_final.pth"))
    loader = Trainer.build_test_loader(cfg, cfg.DATASETS.TEST[0])
    return normalization_gaps(model, itertools.islice(loader, num_images))


def plot(gaps, path):
    """One bar per layer (network order) and cell: the gap, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = list(next(iter(gaps.values())))
    fig, ax = plt.subplots(figsize=(14, 4.5))
    width = 0.8 / len(gaps)
    for i, (label, layers) in enumerate(gaps.items()):
        x = np.arange(len(names)) + i * width
        ax.bar(x, [layers[n]["gap"] for n in names], width, label=label)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=90, fontsize=5)
    ax.set_yscale("log")
    ax.set_ylabel("mean |EN - EMA normalization| (std units)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("cells", nargs="+", help="cell work folders (config.yaml, model_final.pth)")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="full",
        help="the detection_regimes preset the cells were run with (default full)",
    )
    parser.add_argument("--images", type=int, default=50, help="test images")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args(argv)
    for cell in args.cells:
        for name in ("config.yaml", "model_final.pth"):
            if not (Path(cell) / name).is_file():
                parser.error(f"{Path(cell) / name} does not exist: a cell's work folder holds it")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch_threads(args.threads):
        gaps = {}
        for cell in args.cells:
            label = Path(cell).name
            gaps[label] = cell_gaps(cell, args.preset, args.images)
            (out / f"{label}.json").write_text(json.dumps(gaps[label], indent=1))
            values = [v["gap"] for v in gaps[label].values()]
            print(
                f"{label}: {len(values)} layers, gap mean {np.mean(values):.3f}, "
                f"max {max(values):.3f}",
                flush=True,
            )
        plot(gaps, out / "layer_gaps.png")
    return gaps


if __name__ == "__main__":
    main()

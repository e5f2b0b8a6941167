"""The paper's figures: estimated alpha/beta per layer (Figure 3) and the normalized activations
of one channel in training and at evaluation (Figure 1).

Used by ``tools/plot_alpha_beta.py`` and ``tools/plot_activations.py`` (their command-line
options: ``evalnorm_det.engine.defaults.add_figure_arguments``). Figures are
``matplotlib.figure.Figure`` objects drawn by the Agg renderer (no pyplot, no display), of an
exact pixel size.
"""

import contextlib
import os
import pickle
import re
from pathlib import Path

import numpy as np
import torch
from detectron2.utils.events import EventStorage
from matplotlib.figure import Figure

from evalnorm import EvalNorm2d, evalnorm_mode, keep_running_stats

from .utils.safe_load import read_checkpoint

__all__ = [
    "ACTIVATION_MODES",
    "checkpoint_labels",
    "coefficients_from_state_dict",
    "default_layer",
    "evalnorm_layers",
    "find_layer",
    "layer_group",
    "load_model_state_dict",
    "new_figure",
    "normalized_activations",
    "plot_activations",
    "plot_coefficients",
    "plot_sweep",
    "read_coefficients",
    "save_png",
    "smoothed_density",
    "stage_groups",
    "summarize",
]

# The three ways of normalizing in Figure 1, in drawing order: {mode: legend label}.
ACTIVATION_MODES = {
    "train": "training: batch statistics",
    "ema": "evaluation: EMA",
    "en": "evaluation: EvalNorm",
}

# A stage of a detectron2 ResNet (stem, res2, ...) or a box head; see layer_group.
_STAGE = re.compile(r"stem|res\d+|box_head")
_BLOCK = re.compile(r"[a-z_]*\d+")


# ---------------------------------------------------------------------------------------------
# Figures of an exact pixel size


def new_figure(width, height, dpi, rows=1):
    """A figure of exactly ``width`` x ``height`` pixels and ``rows`` axes sharing x: (fig,
    [axes]). ``dpi`` scales text and lines only."""
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, layout="constrained")
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, list(axes)


def save_png(fig, path):
    """Write ``fig`` to ``path`` (a PNG of the figure's pixel size), creating its folder."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, format="png", dpi=fig.dpi)


# ---------------------------------------------------------------------------------------------
# Figure 3: alpha and beta per layer


def load_model_state_dict(path):
    """The model's state dict in checkpoint ``path`` (read by ``read_checkpoint``, so .pkl too):
    detectron2's ``{"model": state_dict, ...}`` or a bare state dict. ``ValueError`` (unreadable) or ``TypeError`` (not a state dict) naming
    the file otherwise."""
    try:
        obj = read_checkpoint(path)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path}: cannot be read as a PyTorch checkpoint: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise TypeError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return obj


def coefficients_from_state_dict(state_dict, source="the state dict"):
    """``{layer: (alpha, beta)}`` from every ``<layer>.alpha_logit``/``beta_logit`` pair, in
    the state dict's order (the network's); alpha = sigmoid(alpha_logit), as floats.

    ``source`` names the state dict in errors: ``ValueError`` if it has no EvalNorm layer (a
    plain BatchNorm checkpoint) or a layer has one logit without the other.
    """
    coefficients = {}
    for key, value in state_dict.items():
        if not key.endswith(".alpha_logit"):
            continue
        layer = key[: -len(".alpha_logit")]
        beta = state_dict.get(layer + ".beta_logit")
        if beta is None:
            raise ValueError(f"{source}: {key} has no {layer}.beta_logit beside it")
        alpha, beta = (torch.sigmoid(torch.as_tensor(v).double()).item() for v in (value, beta))
        coefficients[layer.removeprefix("module.")] = (alpha, beta)
    if not coefficients:
        raise ValueError(
            f"{source}: no EvalNorm alpha/beta (none of its {len(state_dict)} keys ends in "
            "'.alpha_logit'): a plain BatchNorm checkpoint? Only models with EvalNorm2d layers "
            "(MODEL.EVALNORM.BACKBONE_NORM/ROI_HEAD_NORM 'EN' or 'FrozenEN') save them."
        )
    return coefficients


def read_coefficients(path):
    """``{layer: (alpha, beta)}`` of every EvalNorm layer in checkpoint ``path``, in network
    order; ``ValueError`` or ``TypeError`` naming the file if it has none or is no checkpoint."""
    return coefficients_from_state_dict(load_model_state_dict(path), source=path)


def checkpoint_labels(paths):
    """A legend label per checkpoint: its file name without extension, or for detectron2's
    ``model_final.pth`` its folder's name (``model_NNNNNNN.pth``: ``folder/model_NNNNNNN``);
    the paths themselves where those repeat."""
    labels = []
    for path in paths:
        p = Path(path).absolute()
        generic = re.fullmatch(r"model_(final|\d+)", p.stem)
        if not generic:
            labels.append(p.stem)
        else:
            labels.append(p.parent.name + ("" if generic[1] == "final" else f"/{p.stem}"))
    return labels if len(set(labels)) == len(labels) else [str(path) for path in paths]


def layer_group(name):
    """``(stage, block)`` of an EvalNorm layer's name, to group the x axis of Figure 3.

    stage: the name up to its first component ``stem``, ``resN`` or ``box_head`` (else its
    first component); block: the next component when it ends in a number and is not the
    layer's own (a residual block's index, a box head's ``convK``), else None. The stem is one
    block::

        backbone.res2.0.conv1.norm           -> ("backbone.res2", "0")
        backbone.bottom_up.res2.0.conv1.norm -> ("backbone.bottom_up.res2", "0")
        roi_heads.res5.2.conv3.norm          -> ("roi_heads.res5", "2")
        roi_heads.box_head.conv1.norm        -> ("roi_heads.box_head", "conv1")
        backbone.stem.conv1.norm             -> ("backbone.stem", None)
        backbone.fpn_lateral2.norm           -> ("backbone", None)
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if _STAGE.fullmatch(part):
            following = parts[i + 1] if i + 2 < len(parts) else ""
            block = following if part != "stem" and _BLOCK.fullmatch(following) else None
            return ".".join(parts[: i + 1]), block
    return parts[0], None


def _short(stage, block):
    """Tick label of a block: ``res2.0``, ``stem``, ``box_head.conv1``."""
    last = stage.rsplit(".", 1)[-1]
    label = last if _STAGE.fullmatch(last) else stage
    return label if block is None else f"{label}.{block}"


def _draw_groups(ax, layers, label_ticks):
    """Separators between blocks (dotted) and stages (solid) of ``layers`` (x = 0, 1, ...), and
    one tick per block at its centre."""
    groups = [layer_group(name) for name in layers]
    starts = [i for i in range(len(groups)) if i == 0 or groups[i] != groups[i - 1]]
    for i in starts[1:]:
        new_stage = groups[i][0] != groups[i - 1][0]
        ax.axvline(
            i - 0.5, color="0.3" if new_stage else "0.7", lw=1.0, ls="-" if new_stage else ":"
        )
    ends = starts[1:] + [len(groups)]
    ax.set_xticks([(s + e - 1) / 2 for s, e in zip(starts, ends)])
    ax.set_xticklabels([_short(*groups[s]) for s in starts] if label_ticks else [])
    ax.tick_params(axis="x", labelrotation=90, labelsize="small", length=0)


def plot_coefficients(coefficients, width=1400, height=800, dpi=100):
    """Figure 3: alpha (top) and beta (bottom) of every EvalNorm layer as grouped bars.

    ``coefficients``: ``{label: {layer: (alpha, beta)}}``, one colour per label (a checkpoint,
    a batch size). x: the layers in network order (the first entry's, then those only later
    ones have), separated by stage and block; y: log scale, bars rising from a power of ten
    below the smallest value (0, i.e. EMA, draws no bar). Returns the figure.
    """
    layers = list(dict.fromkeys(name for per_layer in coefficients.values() for name in per_layer))
    positive = [v for c in coefficients.values() for pair in c.values() for v in pair if v > 0]
    bottom = 10.0 ** np.floor(np.log10(min(positive))) if positive else 1e-5
    fig, axes = new_figure(width, height, dpi, rows=2)
    x = np.arange(len(layers))
    bar = 0.8 / len(coefficients)
    panels = ((r"$\hat\alpha$ (mean)", 0), (r"$\hat\beta$ (variance)", 1))
    for ax, (ylabel, index) in zip(axes, panels):
        for j, (label, per_layer) in enumerate(coefficients.items()):
            values = np.array([per_layer.get(name, (np.nan, np.nan))[index] for name in layers])
            values[values <= 0] = np.nan
            offset = -0.4 + bar * (j + 0.5)
            ax.bar(x + offset, values - bottom, bar, bottom=bottom, color=f"C{j}", label=label)
        ax.set_yscale("log")
        ax.set_ylim(bottom, 1.5)
        ax.set_xlim(-0.6, len(layers) - 0.4)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", which="major", color="0.9")
        ax.set_axisbelow(True)
        _draw_groups(ax, layers, label_ticks=index == 1)
    axes[0].legend(ncol=min(len(coefficients), 4), fontsize="small", loc="upper right")
    fig.suptitle(f"EvalNorm coefficients of {len(layers)} layers, by stage and block")
    return fig


def stage_groups(model):
    """``{stage: [stage module]}`` of a detectron2 model's EvalNorm layers (``layer_group``'s
    stages: stem, res2, ..., the ROI heads' res5, the box head), in network order: the groups
    ``evalnorm.diagnosis.coefficient_sweep`` evaluates one at a time."""
    groups = {}
    for name in evalnorm_layers(model):
        stage = layer_group(name)[0]
        groups.setdefault(stage.split(".")[-1], [stage])
    return groups


def plot_sweep(rows, metric="AP", width=1400, height=500, dpi=100):
    """The coefficient sweep (``evalnorm.diagnosis.coefficient_sweep``'s rows) in three panels:
    one alpha = beta for every layer, the estimated coefficients scaled, and EvalNorm in one
    stage at a time; EMA and the estimated coefficients as horizontal lines. Returns the
    figure."""
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    by_sweep = {}
    for r in rows:
        by_sweep.setdefault(r["sweep"], []).append(r)
    panels = (
        ("fixed", "one alpha = beta for every layer"),
        ("scaled", "estimated alpha, beta x factor"),
        ("group", "EvalNorm in one stage, EMA elsewhere"),
    )
    for ax, (sweep, xlabel) in zip(axes, panels):
        points = by_sweep.get(sweep, [])
        if sweep == "group":
            ax.bar(range(len(points)), [r["score"] for r in points], color="C2")
            ax.set_xticks(range(len(points)), [r["setting"] for r in points], rotation=30)
        else:
            ax.plot([r["setting"] for r in points], [r["score"] for r in points], "o-", color="C2")
            if sweep == "fixed":
                ax.set_xscale("symlog", linthresh=0.01)
        for key, style, colour in (("ema", "--", "C0"), ("en", "-", "C1")):
            for r in by_sweep.get(key, []):
                ax.axhline(r["score"], linestyle=style, color=colour, label=key.upper())
        ax.set_xlabel(xlabel)
        ax.grid(color="0.9")
        ax.set_axisbelow(True)
    axes[0].set_ylabel(metric)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"{metric} of the same weights, evaluation statistics swept")
    return fig


# ---------------------------------------------------------------------------------------------
# Figure 1: normalized activations in training and at evaluation


def evalnorm_layers(model):
    """``{name: EvalNorm2d}`` of ``model``, in network order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, EvalNorm2d)}


def default_layer(model):
    """The last EvalNorm layer of the backbone (the last one if none is under ``backbone.``)."""
    names = list(evalnorm_layers(model))
    if not names:
        raise ValueError("the model has no EvalNorm2d layer: nothing to plot")
    return ([n for n in names if n.startswith("backbone.")] or names)[-1]


def find_layer(model, name, channel=0):
    """The EvalNorm2d named ``name`` in ``model``; ``ValueError`` listing the valid names if
    there is none, or if ``channel`` is not one of its channels or has a weight of about 0
    (its normalized activations cannot be recovered from the output)."""
    layers = evalnorm_layers(model)
    if name not in layers:
        raise ValueError(
            f"no EvalNorm2d layer named {name!r}; the model's {len(layers)} EvalNorm layers: "
            + ", ".join(layers)
        )
    layer = layers[name]
    if not 0 <= channel < layer.num_features:
        raise ValueError(
            f"channel {channel}: layer {name} has {layer.num_features} channels "
            f"(0 to {layer.num_features - 1})"
        )
    weight = layer.weight[channel].item()
    if abs(weight) < 1e-6:
        raise ValueError(
            f"{name} channel {channel} has weight {weight:g}: its output is (almost) the "
            "constant bias and the normalized activations cannot be recovered; choose another"
        )
    return layer


@torch.no_grad()
def normalized_activations(model, layer_name, channel, batches):
    """Channel ``channel`` of EvalNorm layer ``layer_name`` normalized three ways on the same
    ``batches`` (a list of model inputs, each the list of dicts of B training images: the
    training forward needs their annotations).

    Returns ``{mode: values}`` for the modes of ``ACTIVATION_MODES``: 1-D float64 arrays of
    ``(y[:, channel] - bias) / weight`` over every sample and position of every batch, ``y``
    the layer's output and ``weight``/``bias`` its affine:

    - "train": ``model.train()`` within ``keep_running_stats``: batch statistics, as in
      training, with the running statistics left as they are;
    - "ema", "en": ``model.eval()`` within ``evalnorm_mode`` of that name.

    Every forward runs without gradients; the model's parameters, buffers, training flag and
    layer modes are as before afterwards. For box-head layers the samples are ROIs, which
    differ: training samples them, evaluation keeps the test proposals.
    """
    layer = find_layer(model, layer_name, channel)
    weight, bias = layer.weight[channel].item(), layer.bias[channel].item()
    captured = []

    def capture(module, inputs, output):
        captured.append(output[:, channel].detach().flatten().double().cpu())

    was_training = model.training
    handle = layer.register_forward_hook(capture)
    results = {}
    try:
        for mode in ACTIVATION_MODES:
            captured.clear()
            with contextlib.ExitStack() as stack:
                model.train(mode == "train")
                if mode == "train":
                    stack.enter_context(keep_running_stats(model))
                    stack.enter_context(EventStorage())  # the heads log their sampling there
                else:
                    stack.enter_context(evalnorm_mode(model, mode))
                for batch in batches:
                    model(batch)
            results[mode] = ((torch.cat(captured) - bias) / weight).numpy()
    finally:
        handle.remove()
        model.train(was_training)
    return results


def summarize(values):
    """``{mode: (count, mean, std)}`` of ``normalized_activations``' result."""
    return {mode: (v.size, float(v.mean()), float(v.std())) for mode, v in values.items()}


def smoothed_density(values, edges, sigma=1.5):
    """The density of ``values`` on the bins ``edges``, smoothed by a Gaussian of ``sigma`` bins
    (the paper's "smoothed histograms"): shape (len(edges) - 1,). Values outside the bins
    count in the normalization, so each curve's area is the fraction of values inside."""
    counts = np.histogram(values, edges)[0].astype(np.float64)
    radius = max(int(np.ceil(3 * sigma)), 1)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    smoothed = np.convolve(counts, kernel / kernel.sum(), mode="same")
    return smoothed / (max(values.size, 1) * (edges[1] - edges[0]))


def plot_activations(values, title, labels=None, width=1000, height=600, dpi=100, bins=120):
    """Figure 1: the distributions of ``values`` (``{mode: 1-D array}``) as overlaid smoothed
    densities on ``bins`` shared bins over the 0.1 to 99.9 percentile range of all values,
    training's ("train") dashed on top. ``labels``: ``{mode: legend text}`` (default
    ``ACTIVATION_MODES``); the legend adds each one's mean and standard deviation. Returns the
    figure."""
    labels = labels or ACTIVATION_MODES
    pooled = np.concatenate([v for v in values.values() if v.size] or [np.zeros(0)])
    if not pooled.size:
        raise ValueError("no activations to plot: the layer saw no samples")
    lo, hi = np.percentile(pooled, [0.1, 99.9])
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    fig, (ax,) = new_figure(width, height, dpi)
    for j, (mode, v) in enumerate(values.items()):
        if not v.size:
            continue
        density = smoothed_density(v, edges)
        label = f"{labels.get(mode, mode)}: mean {v.mean():.2f}, std {v.std():.2f}"
        # Training's, the target, dashed on top: visible where another curve matches it.
        style = {"ls": "--", "zorder": 3} if mode == "train" else {}
        ax.plot(centers, density, color=f"C{j}", lw=2.0, label=label, **style)
        ax.fill_between(centers, density, color=f"C{j}", alpha=0.1, lw=0)
    ax.set_xlim(lo, hi)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("normalized activation (the layer's output, its affine undone)")
    ax.set_ylabel("density")
    ax.legend(fontsize="small")
    ax.set_title(title)
    return fig

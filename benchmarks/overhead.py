"""What EvalNorm costs: BN against EN measured side by side, in one process, on the same
weights and inputs.

1. Training step of Faster R-CNN R50-C4 (detectron2, ``configs/Base-EvalNorm-RCNN-C4.yaml``,
   random weights, 2 images of 600x600 with a few boxes each): forward, backward, SGD step,
   with ``torch.nn.BatchNorm2d`` against ``EvalNorm2d`` with online estimation (plus its
   ``OnlineEstimator.step``). Steps alternate between the two models, round after round, with
   the same seed, so both do the same work (EvalNorm trains bit for bit as BatchNorm) under the
   same machine load. Reported: median step time and its ratio, and peak memory of a step
   (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the allocator's peak of live tensors,
   replayed from ``torch.profiler``'s memory events, on top of the model's parameters,
   gradients, buffers and optimizer state).
2. Inference latency per image (detectron2 tests one image at a time): BN with its EMA
   statistics folded into the convolutions (what deployment runs) against EN evaluation (each
   image's own statistics mixed in: one more pass over every normalized tensor), and EN
   deployed (``evalnorm.deploy``: the layers whose EMA evaluation changes the detector's raw
   outputs on a calibration image, another than the timed ones, by at most ``--tolerance``
   folded into their convolutions, the others EN); also EN with ``inplace`` off (each layer's
   output a new tensor, as a plain ``EvalNorm2d`` makes). Timed: the network's forward
   (backbone, RPN head, ROI heads up to the box predictor: ``detector_outputs``) on the same
   proposals for every model, the EN model's for each image; with random weights the models
   would otherwise propose different boxes, and different numbers of them (proposal selection
   and the final per-class NMS, which the norms do not change, are not timed).
3. One layer: ``EvalNorm2d`` against ``BatchNorm2d`` on the tensor shapes of R50-C4 at 600x600
   (evaluation forward; training forward and backward, EN estimating online); at evaluation
   also EN writing over its input (``inplace``, as in detectron2's models) and one read of the
   input (``x.sum()``), the floor of what EN adds to BN's pass.
4. Launches: per training step and per inference image, the ATen operators called (nested
   calls included) and the scalar reads (``.item()``, a tensor used as a Python bool), each a
   host-device synchronization on a GPU; on CUDA also the kernels launched and the stream
   synchronizations (``.tolist()`` and copies to the host among them). Counted by
   ``torch.profiler``; on a GPU, many small kernels and syncs cost more than the arithmetic.
   Also counted alone: ``OnlineEstimator.step`` and the trainer's NaN check
   (``NonFiniteCheckHook``) over every EvalNorm layer.

Goals: training step <= 1.03x BN, peak memory <= 1.03x, inference <= 1.10x (folded BN).

    python -m benchmarks.overhead                  # quick, CPU: 20-25 minutes on one thread
    python -m benchmarks.overhead --device cuda    # on a GPU
    python -m benchmarks.overhead --device cuda --amp fp16   # under float16 autocast
    python -m benchmarks.overhead --preset full    # more rounds
    python -m benchmarks.overhead --preset smoke   # a tiny model, seconds (CI)

(from the repository root). Prints the tables and writes ``results.json`` and ``results.md`` to ``--output-dir``.
"""

import argparse
import copy
import functools
import statistics
import time

import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn

from evalnorm import deploy
from evalnorm import functional as EF
from evalnorm_det import EvalNorm2d, OnlineEstimator, convert_to_batchnorm
from evalnorm_det.engine.defaults import resolve_config_file, setup_cfg
from evalnorm_det.engine.deploy import detector_outputs, with_proposals
from evalnorm_det.engine.trainer import _CHECKED
from evalnorm_det.utils.nonfinite import NonFiniteCheckHook

from .common import machine, prepare_output_dir, torch_threads, write_results
from .stats import markdown_table

GOALS = {"training step": 1.03, "peak memory": 1.03, "inference": 1.10}
PRESETS = {
    # rounds: timed training steps per model; images: inference images per model.
    "smoke": {"size": 64, "small": True, "warmup": 1, "rounds": 2, "images": 2, "repeats": 2},
    "quick": {"size": 600, "small": False, "warmup": 1, "rounds": 5, "images": 5, "repeats": 10},
    "full": {"size": 600, "small": False, "warmup": 3, "rounds": 20, "images": 30, "repeats": 50},
}
# The demo's ResNet-50 at 1/8 width, for the smoke preset.
SMALL = [
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "16", "MODEL.RESNETS.RES2_OUT_CHANNELS", "32",
    "MODEL.RESNETS.WIDTH_PER_GROUP", "8", "MODEL.RPN.PRE_NMS_TOPK_TEST", "200",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "50", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
]  # fmt: skip


def detector_cfg(args):
    """``Base-EvalNorm-RCNN-C4.yaml`` with random weights, ``args.images`` per GPU."""
    opts = [
        "MODEL.WEIGHTS", "", "MODEL.DEVICE", args.device, "INPUT.SQUARE_SIZE", str(args.size),
        "SOLVER.IMS_PER_BATCH", str(args.batch), "MODEL.EVALNORM.NORM_BATCH_SIZE", str(args.batch),
    ]  # fmt: skip
    if args.small:
        opts += SMALL
    return setup_cfg(resolve_config_file("Base-EvalNorm-RCNN-C4.yaml"), opts, world_size=1)


def synthetic_batch(size, images, seed):
    """detectron2 inputs: ``images`` random RGB images of size x size with 3 boxes each."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(images):
        xy = torch.rand(3, 2, generator=g) * size * 0.6
        wh = (0.1 + 0.3 * torch.rand(3, 2, generator=g)) * size
        instances = Instances((size, size))
        instances.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        instances.gt_classes = torch.randint(0, 80, (3,), generator=g)
        image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
        batch.append({"image": image, "height": size, "width": size, "instances": instances})
    return batch


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autograd_auxiliary_loss(x, mu_i, var_i, mu_b, var_b, mu_e, var_e, alpha, beta, eps, _=None):
    """The auxiliary loss as first written (before this benchmark): autograd through the
    activations. Same value and gradient as ``functional.auxiliary_loss``; kept to measure it."""
    mu_hat, var_hat = EF.evalnorm_statistics(mu_i, var_i, mu_e, var_e, alpha, beta)
    r_b, r_hat = torch.rsqrt(var_b + eps), torch.rsqrt(var_hat + eps)
    slope = (r_b - r_hat)[:, :, None, None]
    offset = (mu_hat * r_hat - mu_b * r_b)[:, :, None, None]
    return torch.addcmul(offset, x, slope).abs().mean()


AMP_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(device, amp):
    """The autocast context of ``--amp`` (a no-op for "none")."""
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None)


class Trained:
    """A detector with its SGD optimizer and, for EN, its ``OnlineEstimator`` (``estimate``:
    None for none, else the estimator's keyword arguments); ``aux_loss`` replaces the layers'
    auxiliary loss while it steps. Under ``amp`` the forward runs in autocast, with a gradient
    scaler for float16, as detectron2's ``AMPTrainer`` does."""

    def __init__(self, model, estimate=None, aux_loss=None, device="cpu", amp="none"):
        self.model = model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
        self.estimator = None if estimate is None else OnlineEstimator(model, **estimate)
        self.aux_loss = aux_loss
        self.device, self.amp = device, amp
        self.scaler = torch.amp.GradScaler(device.split(":")[0], enabled=amp == "fp16")

    def step(self, batch, seed):
        if self.aux_loss is None:
            return self._step(batch, seed)
        shipped, EF.auxiliary_loss = EF.auxiliary_loss, self.aux_loss
        try:
            return self._step(batch, seed)
        finally:
            EF.auxiliary_loss = shipped

    def _step(self, batch, seed):
        torch.manual_seed(seed)  # the same proposals and samples for every model
        with autocast(self.device, self.amp):
            losses = self.model(batch)
        self.optimizer.zero_grad(set_to_none=False)
        self.scaler.scale(sum(losses.values())).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.estimator is not None:
            self.estimator.step()

    def state_bytes(self):
        """Bytes of parameters, gradients, buffers and optimizer state."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in tensors)


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved(fns, rounds, warmup, device):
    """{name: [seconds]}: each round runs every fn once, in alternating order."""
    for _ in range(warmup):
        for fn in fns.values():
            fn(-1)
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(timed(functools.partial(fns[name], r), device))
    return times


def step_peak_bytes(trained, batch, device):
    """Peak bytes of live tensors while one training step runs, above what was live before."""
    if device.startswith("cuda"):
        synchronize(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        trained.step(batch, 0)
        synchronize(device)
        return torch.cuda.max_memory_allocated() - before
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        trained.step(batch, 0)
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
KERNEL_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx")


def count_launches(fn, device):
    """What one call of ``fn`` launches: {"operators", "scalar reads"} and on CUDA also
    {"kernels", "syncs"} (see the module docstring, 4.)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
    names = [e.name for e in prof.events()]
    counts = {
        "operators": sum(n.startswith("aten::") for n in names),
        "scalar reads": names.count("aten::_local_scalar_dense"),
    }
    if device.startswith("cuda"):
        counts["kernels"] = sum(n in KERNEL_LAUNCHES for n in names)
        counts["syncs"] = sum(n in SYNCS for n in names)
    return counts


def compare_training(cfg, args):
    torch.manual_seed(args.seed)
    en = build_model(cfg)
    run = {"device": args.device, "amp": args.amp}
    models = {
        "BN": Trained(convert_to_batchnorm(copy.deepcopy(en)), **run),
        "EN": Trained(copy.deepcopy(en), {}, **run),
        f"EN, MAX_POSITIONS {args.max_positions}": Trained(
            copy.deepcopy(en), {"max_positions": args.max_positions}, **run
        ),
        "EN, autograd loss (before)": Trained(en, {}, autograd_auxiliary_loss, **run),
    }
    batch = synthetic_batch(args.size, args.batch, args.seed)
    fns = {name: (lambda r, t=t: t.step(batch, r)) for name, t in models.items()}
    times = interleaved(fns, args.rounds, args.warmup, args.device)
    memory = {}
    for name, t in models.items():
        memory[name] = {
            "state": t.state_bytes(),
            "step_peak": step_peak_bytes(t, batch, args.device),
        }
        memory[name]["peak"] = memory[name]["state"] + memory[name]["step_peak"]
    launches = {
        name: count_launches(lambda t=t: t.step(batch, 0), args.device)
        for name, t in models.items()
    }
    en = models["EN"]
    en.model(batch)  # gradients for alpha/beta to step
    launches["EN, OnlineEstimator.step alone"] = count_launches(en.estimator.step, args.device)
    layers = [(n, m) for n, m in en.model.named_modules() if isinstance(m, EvalNorm2d)]
    check = NonFiniteCheckHook(layers, _CHECKED, kind="EvalNorm")
    launches["EN, NaN check alone"] = count_launches(lambda: check._check("after"), args.device)
    return times, memory, launches


@torch.no_grad()
def fold_batchnorm(model):
    """Fold every eval-mode BatchNorm2d that follows a detectron2 ``Conv2d`` into its weights
    and bias (EMA statistics): BN costs nothing at inference. In place; returns ``model``."""
    for m in model.modules():
        if isinstance(m, Conv2d) and isinstance(m.norm, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            bn = m.norm
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            bias = bn.bias - bn.running_mean * scale
            if m.bias is not None:
                bias = bias + m.bias * scale
            m.weight.mul_(scale[:, None, None, None])
            m.bias = nn.Parameter(bias)
            m.norm = None
    return model


def compare_inference(cfg, args):
    torch.manual_seed(args.seed)
    en = build_model(cfg).eval()
    _randomize_statistics(en)
    folded = fold_batchnorm(convert_to_batchnorm(copy.deepcopy(en))).eval()
    images = synthetic_batch(args.size, args.images, args.seed + 1)
    calibration = with_proposals(en, [synthetic_batch(args.size, 1, args.seed + 2)])
    deployed, report = deploy(copy.deepcopy(en), calibration, args.tolerance, detector_outputs)
    not_in_place = copy.deepcopy(en)
    for m in not_in_place.modules():
        if isinstance(m, EvalNorm2d):
            m.inplace = False
    models = {
        "BN folded": folded,
        "EN": en,
        "EN, not in place": not_in_place,
        "EN deployed": deployed.eval(),
    }
    # Random weights make each model propose other boxes, and another number of them: the
    # box head's work would differ. Every model evaluates the EN model's proposals.
    with torch.no_grad(), autocast(args.device, args.amp):
        batches = with_proposals(en, [[image] for image in images])
        own = {
            name: with_proposals(models[name], [[image] for image in images])
            for name in ("BN folded", "EN deployed")
        }

    @torch.no_grad()
    def run(model, r):
        with autocast(args.device, args.amp):
            detector_outputs(model, batches[max(r, 0) % len(batches)])

    fns = {name: (lambda r, m=m: run(m, r)) for name, m in models.items()}
    times = interleaved(fns, args.images, args.warmup, args.device)
    launches = {
        name: count_launches(lambda m=m: run(m, 0), args.device) for name, m in models.items()
    }
    deployment = {
        "proposals": [len(proposals[0]) for _, proposals in batches],
        # what the other models would have proposed themselves
        "own proposals": {
            name: [len(proposals[0]) for _, proposals in batches] for name, batches in own.items()
        },
        "tolerance": report["tolerance"],
        "change": report["change"],
        "kept": [row["name"] for row in report["layers"] if not row["ema"]],
        "layers": len(report["layers"]),
    }
    return times, launches, deployment


@torch.no_grad()
def _randomize_statistics(model):
    # Random-init running statistics are mean 0 / var 1; make EN's correction do real work.
    for m in model.modules():
        if isinstance(m, EvalNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)


def layer_shapes(cfg, args):
    """(name, training shape, evaluation shape) of normalized tensors in R50-C4."""
    r, s = cfg.MODEL.RESNETS, args.size
    stem, res2 = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    rois_train = args.batch * cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE
    rois_test = cfg.MODEL.RPN.POST_NMS_TOPK_TEST
    p = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION // 2
    shapes = [
        ("stem", stem, s // 2),
        ("res2", res2, s // 4),
        ("res3", res2 * 2, s // 8),
        ("res4", res2 * 4, -(-s // 16)),
    ]
    rows = [(n, (args.batch, c, h, h), (1, c, h, h)) for n, c, h in shapes]
    rows.append(("res5 (ROIs)", (rois_train, res2 * 8, p, p), (rois_test, res2 * 8, p, p)))
    return rows


def compare_layers(cfg, args):
    """Per normalized tensor shape: median seconds of BN and EN, evaluation and training."""
    results = []
    for name, train_shape, eval_shape in layer_shapes(cfg, args):
        channels = train_shape[1]
        bn = nn.BatchNorm2d(channels).to(args.device)
        en = EvalNorm2d(channels, norm_batch_size=train_shape[0]).to(args.device)
        en.load_state_dict(bn.state_dict(), strict=False)
        en.estimate_online = True
        row = {"layer": name, "train_shape": list(train_shape), "eval_shape": list(eval_shape)}
        row.update(_layer_times(bn, en, train_shape, eval_shape, args))
        results.append(row)
    return results


def _layer_times(bn, en, train_shape, eval_shape, args):
    # Under autocast a normalization layer receives its convolution's low-precision output.
    dtype = AMP_DTYPES[args.amp] or torch.float32
    x_eval = torch.randn(eval_shape, device=args.device, dtype=dtype)
    x_train = torch.randn(train_shape, device=args.device, dtype=dtype, requires_grad=True)
    grad = torch.randn(train_shape, device=args.device, dtype=dtype)

    @torch.no_grad()
    def evaluate(layer, r):
        with autocast(args.device, args.amp):
            layer.eval()(x_eval)

    def train(layer, r):
        with autocast(args.device, args.amp):
            y = layer.train()(x_train)
        y.backward(grad.to(y.dtype))
        if isinstance(layer, EvalNorm2d):
            layer.take_aux_grad()

    @torch.no_grad()
    def evaluate_in_place(r):  # each call normalizes the last one's output: the same work
        en.inplace = True
        try:
            evaluate(en, r)
        finally:
            en.inplace = False

    @torch.no_grad()
    def read(r):  # one pass over the input: what EN's statistics add to BN's pass at least
        x_eval.sum()

    times = {}
    for kind, fn in (("eval", evaluate), ("train", train)):
        fns = {"BN": functools.partial(fn, bn), "EN": functools.partial(fn, en)}
        if kind == "eval":
            fns["EN in place"] = evaluate_in_place
            fns["one read"] = read
        measured = interleaved(fns, args.repeats, 1, args.device)
        times[kind] = {k: statistics.median(v) for k, v in measured.items()}
    return times


def ratio(times, base, other):
    return statistics.median(times[other]) / statistics.median(times[base])


def markdown(results):
    t, m, i = results["training"]["times"], results["training"]["memory"], results["inference"]
    settings, ms, mib = results["settings"], 1000.0, 2.0**20
    size = f"{settings['size']}x{settings['size']}"
    precision = {"none": "float32", "fp16": "float16 autocast", "bf16": "bfloat16 autocast"}
    training = []
    for name in t:
        step, peak = statistics.median(t[name]), m[name]["peak"]
        training.append(
            [name, f"{step * ms:.0f}", f"{step / statistics.median(t['BN']):.3f}"]
            + [f"{peak / mib:.0f}", f"{peak / m['BN']['peak']:.3f}"]
        )
    bn, en = statistics.median(i["BN folded"]), statistics.median(i["EN"])
    deployed, deployment = statistics.median(i["EN deployed"]), results["deployment"]
    copied = statistics.median(i["EN, not in place"])
    inference = [
        ["BN, EMA statistics folded into the convolutions", f"{bn * ms:.0f}", "1.000"],
        ["EN", f"{en * ms:.0f}", f"{en / bn:.3f}"],
        ["EN, not in place (each output a new tensor)", f"{copied * ms:.0f}", f"{copied / bn:.3f}"],
        [
            (
                f"EN deployed ({deployment['layers'] - len(deployment['kept'])} of "
                f"{deployment['layers']} layers folded as EMA, output change "
                f"{deployment['change']:.2g} <= {deployment['tolerance']:g})"
            ),
            f"{deployed * ms:.0f}",
            f"{deployed / bn:.3f}",
        ],
    ]
    goals = [
        [key, f"{value:.3f}", f"<= {GOALS[key.split(' (')[0]]}"]
        for key, value in results["ratios"].items()
    ]
    layers = []
    for row in results["layers"]:
        tr, ev = row["train"], row["eval"]
        layers.append(
            [row["layer"], tuple(row["train_shape"])]
            + [f"{tr['BN'] * ms:.2f}", f"{tr['EN'] * ms:.2f}", f"{tr['EN'] / tr['BN']:.2f}"]
            + [tuple(row["eval_shape"])]
            + [f"{ev['BN'] * ms:.2f}", f"{ev['EN'] * ms:.2f}", f"{ev['EN'] / ev['BN']:.2f}"]
            + [f"{ev['EN in place'] * ms:.2f}", f"{ev['one read'] * ms:.2f}"]
            + [f"{(ev['EN'] - ev['BN']) / ev['one read']:.1f}"]
            + [f"{ev['EN in place'] / ev['one read']:.1f}"]
        )
    proposals = ", ".join(map(str, deployment["proposals"]))
    own = {k: ", ".join(map(str, v)) for k, v in deployment["own proposals"].items()}
    kinds = list(next(iter(results["launches"]["inference"].values())))
    launches = [
        [f"{what}, {name}"] + [counts[k] for k in kinds]
        for what, rows in results["launches"].items()
        for name, counts in rows.items()
    ]
    lines = [
        f"Device: {results['machine']['device']}, {precision[settings['amp']]}. Faster R-CNN "
        + f"R50-C4, training steps of {settings['batch']} images of {size}, inference on one "
        + f"image at a time, on the same proposals for every model ({proposals}; on its "
        + f"own, BN folded would have proposed {own['BN folded']}, EN deployed "
        + f"{own['EN deployed']}).",
        "",
        markdown_table(
            ["training", "step, median (ms)", "/ BN", "peak memory (MiB)", "/ BN"], training, "-"
        ),
        "",
        markdown_table(["inference", "per image, median (ms)", "/ BN folded"], inference, "-"),
        "",
        markdown_table(["goal", "EN / BN", "target"], goals, "-"),
        "",
        "Peak memory: parameters, gradients, buffers and optimizer state, plus the peak of "
        + "live tensors during a step. One read: x.sum() on the evaluation input, the floor "
        + "of what EN's per-sample statistics add to BatchNorm's pass.",
        "",
        markdown_table(
            ["layer", "train shape", "BN train (ms)", "EN train (ms)", "ratio"]
            + ["eval shape", "BN eval (ms)", "EN eval (ms)", "ratio", "EN in place (ms)"]
            + ["one read (ms)", "(EN - BN) / one read", "EN in place / one read"],
            layers,
            "-",
        ),
        "",
        markdown_table(["launches", *kinds], launches, "-"),
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--size", type=int, help="image side (default: the preset's)")
    parser.add_argument("--batch", type=int, default=2, help="images per training step")
    parser.add_argument("--rounds", type=int, help="timed training steps per model")
    parser.add_argument("--images", type=int, help="timed inference images per model")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--amp",
        choices=sorted(AMP_DTYPES),
        default="none",
        help="autocast precision of training steps, inference and layers (default none)",
    )
    parser.add_argument(
        "--max-positions",
        type=int,
        default=4096,
        help="MODEL.EVALNORM.ONLINE.MAX_POSITIONS of the subsampled EN variant (default 4096)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-3,
        help="relative output change allowed to the deployed EN model's EMA layers (1e-3)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="output/benchmarks/overhead")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def main(argv=None):
    args = parse_args(argv)
    prepare_output_dir(args.output_dir, args.overwrite)
    with torch_threads(args.threads):
        results = measure(args)
    table = markdown(results)
    print(table)
    write_results(args.output_dir, results, table)
    return results


def measure(args):
    """Every measure of the module docstring, with the settings and the machine: results.json."""
    start = time.time()
    cfg = detector_cfg(args)
    with EventStorage():  # detectron2's losses log to it
        times, memory, training_launches = compare_training(cfg, args)
    subsampled = f"EN, MAX_POSITIONS {args.max_positions}"
    inference, inference_launches, deployment = compare_inference(cfg, args)
    results = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("output_dir", "overwrite")},
        "machine": machine(args.device),
        "training": {"times": times, "memory": memory},
        "inference": inference,
        "deployment": deployment,
        "layers": compare_layers(cfg, args),
        "launches": {"training step": training_launches, "inference": inference_launches},
        "ratios": {
            "training step": ratio(times, "BN", "EN"),
            f"training step ({subsampled})": ratio(times, "BN", subsampled),
            "peak memory": memory["EN"]["peak"] / memory["BN"]["peak"],
            f"peak memory ({subsampled})": memory[subsampled]["peak"] / memory["BN"]["peak"],
            "inference": ratio(inference, "BN folded", "EN"),
            "inference (EN, not in place)": ratio(inference, "BN folded", "EN, not in place"),
            "inference (EN deployed)": ratio(inference, "BN folded", "EN deployed"),
        },
        "goals": GOALS,
    }
    results["wall_seconds"] = time.time() - start
    return results


if __name__ == "__main__":
    main()

"""benchmarks.detection_regimes in its smoke preset: the whole path (stand-in pre-training, the
conversion tool, the regimes trained with microbatches, every evaluation row through
Trainer.test and example weighing, per-cell JSONs, resuming, the table and its files), and what
its numbers rest on: the gap formula, the stand-in's tensors in the detectors, regime (b)'s
reset, regime (c)'s frozen norms in its three readings.

One smoke run (6 regimes x N = 2, 8, 2 iterations of 8 images of 32 px each) serves every test.
Its APs mean nothing; the tests check where they come from, not what they are.
"""

import contextlib
import copy
import dataclasses
import functools
import importlib
import io
import json
import math
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.layers import FrozenBatchNorm2d
from helpers import ROOT, reference_evalnorm
from torch import nn

from benchmarks import layer_gaps
from benchmarks.detection_regimes import cells as regime_cells
from benchmarks.detection_regimes import report as reporting
from benchmarks.detection_regimes import settings as presets
from benchmarks.detection_regimes import standin as imagenet_standin
from benchmarks.stats import gap_recovered
from evalnorm_det import EvalNorm2d, EvalNormCheckpointer, Trainer
from evalnorm_det.engine.defaults import setup_cfg
from evalnorm_det.engine.evaluation import METRICS

IMAGES = (2, 8)
ROWS = {"EMA", "EN", "EN - EMA", "1/B^2", "pred.-time BN", "example weigh.", "PreciseBN"}
ROWS |= {"PreciseBN+EN off", "head batch st.", "test groups of N"}


bench = importlib.import_module("benchmarks.detection_regimes.__main__")  # the command line
# The share of the EMA gap recovered, in AP (higher is better).
ap_gap_recovered = functools.partial(gap_recovered, higher_is_better=True)


@contextlib.contextmanager
def _datasets(path):
    previous = os.environ.get("DETECTRON2_DATASETS")
    os.environ["DETECTRON2_DATASETS"] = str(path)
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if previous is None:
            del os.environ["DETECTRON2_DATASETS"]
        else:
            os.environ["DETECTRON2_DATASETS"] = previous


def _run(tmp, *extra):
    """(report, printed text) of a smoke run writing to tmp/out and tmp/work."""
    printed = io.StringIO()
    argv = ["--preset", "smoke", "--output-dir", str(tmp / "out"), "--work-dir", str(tmp / "work")]
    argv += ["--threads", "1", "--images-per-gpu", *map(str, IMAGES), *extra]
    with _datasets(tmp / "datasets"), contextlib.redirect_stdout(printed):
        report = bench.main(argv)
    return report, printed.getvalue()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """(report, output dir, printed text, cell records by name) of one smoke run, datasets under
    a temporary $DETECTRON2_DATASETS, one thread."""
    tmp = tmp_path_factory.mktemp("regimes")
    report, printed = _run(tmp)
    out = tmp / "out"
    cells = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    return report, out, printed, cells


def _cell(smoke, regime, n=2):
    return smoke[3][regime_cells.cell_name(regime, n, 0)]


def test_every_cell_with_every_row(smoke):
    report, out, _, cells = smoke
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(report))
    assert report["complete"] and sorted(report["cells"]) == sorted(cells)
    keys = {(c["regime"], c["images_per_gpu"], c["seed"]) for c in cells.values()}
    assert keys == {(r, n, 0) for r in presets.REGIMES for n in IMAGES}
    values = []
    for cell in cells.values():
        assert set(cell["results"]) == {*presets.TABLE_ROWS, "example_weighing", "test_groups"}
        # the numbers are the Trainer's own file's
        with open(Path(cell["work_dir"]) / "evalnorm_results.json") as f:
            written = json.load(f)
        for row, metrics in cell["results"].items():
            assert set(metrics) == {"AP", "AP50", "AP75"}
            if row in ("example_weighing", "test_groups"):
                continue
            for metric, value in metrics.items():
                coco = written[row]["bbox"][metric]
                # None: no finite detection at all (COCO's NaN), e.g. an EMA still mostly the
                # reset statistics after 2 iterations
                assert value == coco if value is not None else math.isnan(coco)
                assert value is None or 0 <= value <= 100
                values.append(value)
        assert cell["seconds"]["train"] > 0 and cell["seconds"]["eval"] > 0
        assert cell["settings"] == {k: report["settings"][k] for k in cell["settings"]}
        assert cell["torch_threads"] == 1
        # small: the output dir is meant to be committed
        assert len(json.dumps(cell)) < 20000
    assert sum(v is not None for v in values) >= len(values) // 2
    assert report["standin"]["val_accuracy"] >= 0 and report["wall_seconds"]["cells"] > 0
    for key in ("platform", "cpu_count", "torch", "detectron2", "torch_threads", "device"):
        assert key in report["machine"], key
    assert report["machine"]["torch_threads"] == 1 and report["settings"]["ims_per_batch"] == 8
    # nothing big in the output dir: checkpoints and logs are in the work dir
    assert not list(out.rglob("*.pth")) and not list(out.rglob("log.txt"))
    assert all(p.stat().st_size < 100_000 for p in out.rglob("*") if p.is_file())


def test_example_weighing_chooses_on_the_selection_split(smoke):
    """The chosen weight is the first best of the grid on the selection split, whose images are
    neither training nor test images, and its test AP is the one evaluated with it."""
    cell = _cell(smoke, "d")
    weighing = cell["example_weighing"]
    grid = presets.PRESETS["smoke"].example_weights
    assert set(weighing["selection_ap"]) == {f"{w:g}" for w in grid}
    aps = [-1.0 if v is None else v for v in weighing["selection_ap"].values()]
    assert weighing["chosen"] == grid[aps.index(max(aps))]
    work = Path(cell["work_dir"])
    assert (work / "inference" / "example_weighing").is_dir()
    pixels = {
        split: {
            cv2.imread(d["file_name"]).tobytes()
            for d in DatasetCatalog.get(f"regimes_digits_smoke_{split}")
        }
        for split in ("train", "val", "selection")
    }
    assert len(pixels["selection"]) == presets.PRESETS["smoke"].num_select
    assert not pixels["selection"] & (pixels["train"] | pixels["val"])


def _markdown_blocks(text):
    """{regime key: {row label: [9 cells as str]}} of results.md's table."""
    labels = {v: k for k, v in presets.REGIMES.items()}
    blocks, regime = {}, None
    for line in text.splitlines():
        if not line.startswith("| ") or line.startswith("| regime"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0].startswith("**("):
            regime = labels[cells[0].strip("*")]
            blocks[regime] = {}
        else:
            blocks[regime][cells[0]] = cells[1:]
    return blocks


def _text_blocks(text):
    """The same from the printed table."""
    labels = {v: k for k, v in presets.REGIMES.items()}
    blocks, regime = {}, None
    for line in text.splitlines():
        if line in labels:
            regime = labels[line]
            blocks[regime] = {}
        elif regime and line[:17].strip() in ROWS:
            blocks[regime][line[:17].strip()] = line[17:].split()
        elif regime and not line.strip():
            regime = None
    return blocks


def test_table_matches_the_json(smoke):
    """Both tables show every cell's rows and EN - EMA = their difference (2 decimals)."""
    _, out, printed, cells = smoke
    results = {(c["regime"], c["images_per_gpu"]): c["results"] for c in cells.values()}
    keys = {v: k for k, v in reporting.ROW_LABELS.items()}
    for blocks in (_markdown_blocks((out / "results.md").read_text()), _text_blocks(printed)):
        assert set(blocks) == set(presets.REGIMES)
        for regime, rows in blocks.items():
            assert set(rows) == ROWS
            for i, (n, metric) in enumerate((n, m) for n in IMAGES for m in METRICS):
                for label, shown in rows.items():
                    if label == "EN - EMA":
                        continue
                    value = results[regime, n][keys[label]][metric]
                    assert shown[i] == ("-" if value is None else f"{value:.2f}"), label
                ema, en = (results[regime, n][row][metric] for row in ("ema", "en"))
                shown = rows["EN - EMA"][i]
                if None in (ema, en):
                    assert shown == "-"
                else:
                    assert abs(float(shown) - (en - ema)) <= 0.005 + 1e-9, (regime, n, metric)


def _result(n, ema, en, seed=0, regime="d"):
    results = {"ema": {"AP": ema, "AP50": 0.0, "AP75": 0.0}}
    results["en"] = {"AP": en, "AP50": 0.0, "AP75": 0.0}
    return {"regime": regime, "images_per_gpu": n, "seed": seed, "results": results}


def test_gap_recovered_formula():
    """(EN@2 - EMA@2) / (EMA@8 - EMA@2); undefined where EMA@8 <= EMA@2."""
    assert ap_gap_recovered(24.8, 30.2, 31.7) == pytest.approx(5.4 / 6.9)
    assert reporting.PAPER_RECOVERED == pytest.approx(0.7826, abs=1e-4)
    assert ap_gap_recovered(10.0, 12.0, 14.0) == pytest.approx(0.5)
    assert ap_gap_recovered(10.0, 9.0, 14.0) == pytest.approx(-0.25)
    assert ap_gap_recovered(10.0, 12.0, 10.0) is None
    assert ap_gap_recovered(10.0, 12.0, 9.0) is None
    assert ap_gap_recovered(None, 12.0, 14.0) is None

    head = reporting.headline([_result(2, 10.0, 13.0), _result(8, 14.0, 14.5)])
    assert head["recovered"] == pytest.approx(0.75) and "75%" in head["text"]
    assert "78%" in head["text"]
    head = reporting.headline([_result(2, 14.0, 15.0), _result(8, 13.0, 13.0)])
    assert head["recovered"] is None and "meaningless" in head["text"]
    # two seeds: the ratio of the means, and each seed's own
    cells = [_result(2, 10.0, 12.0, 0), _result(2, 12.0, 14.0, 1)]
    cells += [_result(8, 15.0, 15.0, 0), _result(8, 17.0, 17.0, 1), _result(2, 1.0, 9.0, 2)]
    head = reporting.headline(cells)  # seed 2 has no N = 8 cell: left out
    assert head["recovered"] == pytest.approx(2.0 / 5.0)
    assert head["per_seed"]["0"]["recovered"] == pytest.approx(0.4)
    assert head["per_seed"]["1"]["recovered"] == pytest.approx(0.4) and "2" not in head["per_seed"]
    assert "seed 0: 40%, seed 1: 40%" in head["text"]


def test_mean_and_spread_over_seeds():
    cells = [_result(2, 10.0, 12.0, 0), _result(2, 12.0, 13.0, 1), _result(8, 15.0, 15.0, 0)]
    cells.append(_result(2, 3.0, 3.0, 0, regime="c_batch_stats"))
    table = reporting.mean_table(cells)
    assert list(table) == ["c_batch_stats", "d"]  # the REGIMES order
    ema = table["d"][2]["ema"]["AP"]
    assert ema["mean"] == pytest.approx(11.0) and ema["n"] == 2
    assert ema["std"] == pytest.approx(2**0.5)  # sample standard deviation
    assert table["d"][2]["en-ema"]["AP"]["mean"] == pytest.approx(1.5)
    assert table["d"][8]["ema"]["AP"] == {"mean": 15.0, "std": None, "n": 1}
    text = reporting.format_markdown(table, [2, 8])
    assert "| EMA | 11.00±1.41 | 0.00±0.00 | 0.00±0.00 | 15.00 |" in text
    assert "| EMA | 3.00 | 0.00 | 0.00 | . | . | . |" in text  # N = 8 not run


def test_smoke_headline(smoke):
    report = smoke[0]
    head = report["headline"]
    table = report["table"]["d"]
    assert head["ema_2"] == table["2"]["ema"]["AP"]["mean"]
    assert head["ema_8"] == table["8"]["ema"]["AP"]["mean"]
    assert head["recovered"] == ap_gap_recovered(head["ema_2"], head["en_2"], head["ema_8"])
    assert set(head["per_seed"]) == {"0"}
    assert head["text"] in smoke[2] and head["text"] in (smoke[1] / "results.md").read_text()


def _loaded_model(smoke, regime, n=2):
    """The cell's model as its Trainer loaded it, before training."""
    cell = _cell(smoke, regime, n)
    cfg = setup_cfg(
        str(Path(cell["work_dir"]) / "config.yaml"),
        ["DATASETS.TEST", "()", "OUTPUT_DIR", str(Path(cell["work_dir"]) / "reload")],
        world_size=1,
    )
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    return trainer.model, cell


def _pairs(model):
    """(torchvision name, detectron2 conv with its norm) of every conv of the C4 model."""
    pairs = [("conv1", model.backbone.stem.conv1)]
    for k in range(1, 5):
        stage = model.roi_heads.res5 if k == 4 else getattr(model.backbone, f"res{k + 1}")
        for i, block in enumerate(stage):
            for j in (1, 2, 3):
                pairs.append((f"layer{k}.{i}.conv{j}", getattr(block, f"conv{j}")))
            if block.shortcut is not None:
                pairs.append((f"layer{k}.{i}.downsample.0", block.shortcut))
    return pairs


def _bn_name(conv_name):
    if conv_name == "conv1":
        return "bn1"
    if conv_name.endswith("downsample.0"):
        return conv_name[:-1] + "1"
    return conv_name[:-5] + "bn" + conv_name[-1]


def _standin(report):
    return torch.load(report["standin"]["torchvision_checkpoint"], weights_only=True)


def _norms(model):
    return [
        m
        for m in model.modules()
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d))
    ]


def test_standin_went_through_the_conversion_tool(smoke):
    """Regime (d): every conv and BN tensor of the stand-in's torchvision state dict is in the
    detector, loaded from the tool's output; EN layers with microbatches of N. The stand-in saw
    whole scenes of the detector's size."""
    report = smoke[0]
    assert report["standin"]["input_size"] == report["settings"]["standin_crop"] == 16
    assert "native scale" in report["standin"]["task"]
    checkpoint = torch.load(report["standin"]["detectron2_checkpoint"], weights_only=True)
    assert checkpoint["__author__"] == "torchvision"  # written by the tool
    assert "stem 16 channels, bottleneck widths 8/16/32/64" in report["standin"]["conversion"]
    standin = _standin(report)
    assert standin["fc.weight"].shape == (10, 256)
    model, _ = _loaded_model(smoke, "d")
    pairs = _pairs(model)
    assert len(pairs) == 53
    for name, conv in pairs:
        assert torch.equal(conv.weight, standin[f"{name}.weight"]), name
        bn = _bn_name(name)
        for attr in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(conv.norm, attr), standin[f"{bn}.{attr}"]), (name, attr)
        assert isinstance(conv.norm, EvalNorm2d) and not conv.norm.frozen
    rois = report["settings"]["rois_per_image"]
    backbone = [m for m in model.backbone.modules() if isinstance(m, EvalNorm2d)]
    assert backbone and all(m.microbatch and m.norm_batch_size == 2 for m in backbone)
    head = [m for m in model.roi_heads.res5.modules() if isinstance(m, EvalNorm2d)]
    assert head and all(m.norm_batch_size == 2 * rois for m in head)
    assert model.roi_heads.microbatch_images == 2

    scratch, _ = _loaded_model(smoke, "a")
    assert not torch.equal(scratch.backbone.stem.conv1.weight, standin["conv1.weight"])
    assert all(torch.all(m.running_var == 1) for m in _norms(scratch))


def test_regime_b_resets_the_norms(smoke):
    report = smoke[0]
    standin = _standin(report)
    model, _ = _loaded_model(smoke, "b")
    assert torch.equal(model.backbone.stem.conv1.weight, standin["conv1.weight"])
    assert torch.equal(model.roi_heads.res5[2].conv3.weight, standin["layer4.2.conv3.weight"])
    norms = _norms(model)
    assert len(norms) == 53 and all(isinstance(m, EvalNorm2d) for m in norms)
    for m in norms:
        assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        assert torch.all(m.running_mean == 0) and torch.all(m.running_var == 1)


@pytest.mark.parametrize("regime", list(presets.FROZEN_EN))
def test_regime_c_keeps_the_standin_norms_frozen(smoke, regime):
    """FrozenEN everywhere in the regime's reading, no norm parameter trains; after training,
    the final checkpoint still holds the stand-in's statistics and affine, while the
    convolutions moved. In (d) the statistics were fine-tuned."""
    report = smoke[0]
    standin = _standin(report)
    model, cell = _loaded_model(smoke, regime)
    norms = _norms(model)
    assert len(norms) == 53 and all(isinstance(m, EvalNorm2d) and m.frozen for m in norms)
    assert {m.frozen_en for m in norms} == {presets.FROZEN_EN[regime]}
    assert not any(p.requires_grad for m in norms for p in (m.weight, m.bias))
    final = torch.load(Path(cell["work_dir"]) / "model_final.pth", weights_only=False)["model"]
    d2 = {"conv1": "backbone.stem.conv1", "layer1.0.conv2": "backbone.res2.0.conv2"}
    d2["layer4.1.conv1"] = "roi_heads.res5.1.conv1"
    for tv, name in d2.items():
        bn = _bn_name(tv)
        for attr in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(final[f"{name}.norm.{attr}"], standin[f"{bn}.{attr}"]), (tv, attr)
        assert not torch.equal(final[f"{name}.weight"], standin[f"{tv}.weight"]), tv

    tuned = _cell(smoke, "d")
    final = torch.load(Path(tuned["work_dir"]) / "model_final.pth", weights_only=False)["model"]
    stats = final["backbone.stem.conv1.norm.running_mean"]
    assert not torch.equal(stats, standin["bn1.running_mean"])


def test_resumes_and_refuses_other_settings(smoke, tmp_path):
    """A rerun with the same settings skips every finished cell (their files untouched); other
    settings are refused naming what differs, before anything is written; --overwrite
    discards the earlier cells. Bad selections are refused."""
    _, out, _, cells = smoke
    tmp = out.parent
    before = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    report, printed = _run(tmp)
    assert printed.count("done earlier, skipped") == len(cells)
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == before
    assert sorted(report["cells"]) == sorted(cells)
    settings = (out / "settings.json").read_bytes()
    with pytest.raises(FileExistsError, match="differing: settings.iters.*pass --overwrite"):
        _run(tmp, "--iters", "3")
    assert (out / "settings.json").read_bytes() == settings
    with pytest.raises(SystemExit, match="divide 8"):
        bench.main(["--preset", "smoke", "--output-dir", str(tmp_path), "--images-per-gpu", "3"])
    with pytest.raises(SystemExit, match="no cell"):
        bench.main(["--preset", "quick", "--output-dir", str(tmp_path), "--images-per-gpu", "4"])
    assert not (tmp_path / "results.json").exists()

    # --overwrite: a new run of one cell, the others discarded (on a copy: other tests read
    # the smoke run's cells)
    copy = tmp_path / "copy"
    shutil.copytree(tmp, copy)
    report, printed = _run(copy, "--iters", "1", "--regimes", "a", "--overwrite")
    names = sorted(p.stem for p in (copy / "out" / "cells").glob("*.json"))
    assert names == ["a_2img_seed0", "a_8img_seed0"]
    assert "skipped" not in printed and report["settings"]["iters"] == 1


def test_a_selection_reports_every_cell_in_the_output_dir(smoke, tmp_path):
    """Runs of disjoint selections share one output dir: each writes the tables of every cell
    there, not only of those it measured."""
    _, out, _, cells = smoke
    copy = tmp_path / "copy"
    shutil.copytree(out.parent, copy)
    (copy / "out" / "cells" / "a_2img_seed0.json").unlink()
    report, printed = _run(copy, "--regimes", "a", "--images-per-gpu", "2")
    assert "skipped" not in printed  # the selection is one cell, measured anew
    assert sorted(report["cells"]) == sorted(cells)
    assert json.loads((copy / "out" / "results.json").read_text())["cells"] == report["cells"]
    assert not list((copy / "out" / "cells").glob("*.tmp"))


def test_cell_order_and_presets():
    """The full preset runs the cells that matter first; quick is a subset of full's settings
    but for iterations, data and stand-in; every cell's name is unique."""
    full = presets.PRESETS["full"].cells
    assert full[:2] == (("d", 2, 0), ("d", 8, 0))
    assert {c[0] for c in full[2:8]} == set(presets.FROZEN_EN) and full[8:10] == (
        ("a", 2, 0),
        ("a", 8, 0),
    )
    assert len(full) == len(set(full)) == 30
    assert {(r, n) for r, n, s in full if s == 0} >= {(r, n) for r in "abcd" for n in (2, 4, 8)}
    assert {s for r, _, s in full if r == "d"} == {0, 1, 2}
    assert {(n, s) for r, n, s in full if r == "c"} >= {(2, 1), (8, 1), (2, 2)}
    assert {s for r, n, s in full if (r, n) == ("a", 2)} == {0, 1, 2}
    assert {(n, s) for r, n, s in full if r == "c_frozen_target"} >= {(2, 1), (8, 1)}
    assert set(presets.PRESETS["quick"].cells) < set(full)
    assert presets.PRESETS["full"].image_size == presets.PRESETS["quick"].image_size == 128
    assert presets.PRESETS["quick"].iters * presets.IMS_PER_BATCH >= 1600 * 2  # the demo's images


def test_task_is_part_of_the_settings_but_for_the_recorded_digits():
    """--task photo is other settings (its own folders and fingerprint); the "digits" task
    keeps the fingerprint of the runs recorded before the choice existed, so they resume."""
    recorded = json.loads((ROOT / "benchmarks/results/detection_regimes/settings.json").read_text())
    assert recorded == {"mode": "full", "settings": presets.PRESETS["full"].fingerprint()}
    args = bench.argument_parser().parse_args(["--preset", "full", "--task", "photo"])
    photo = bench.settings_from_args(args)
    assert photo.fingerprint() == {
        **recorded["settings"],
        "task": "photo",
        "standin_crop": 32,
        "standin_iters": 3000,
    }
    assert presets.task_suffix(photo) == "_photo"
    with pytest.raises(SystemExit):
        bench.argument_parser().parse_args(["--task", "sketch"])


def test_standin_inputs_at_native_scale(tmp_path):
    """Crops are windows of the rendered scene itself (no resizing) holding the digit's box;
    the whole-scene task trains on multi-hot labels of the digits present."""
    with _datasets(tmp_path):
        scenes, labels = imagenet_standin.render_scenes("train", 3, 64, seed=5)
        crops, classes = imagenet_standin.render_crops("train", 3, 64, 32, seed=5)
    assert scenes.shape == (3, 64, 64, 3) and labels.shape == (3, 10)
    assert set(labels.sum(1).tolist()) <= {1.0, 2.0, 3.0}
    assert crops.shape[1:] == (32, 32, 3) and len(crops) == len(classes) == labels.sum()
    for crop in crops[:3]:  # each window is found verbatim in one of the scenes
        found = any(
            (scene[y : y + 32, x : x + 32] == crop).all()
            for scene in scenes
            for y in range(33)
            for x in range(33)
        )
        assert found
    s = dataclasses.replace(presets.PRESETS["smoke"], standin_task="scenes")
    summary = imagenet_standin.train_standin(s, 0, tmp_path / "scenes.pth")
    assert "multi-label" in summary["task"] and summary["input_size"] == s.image_size
    with pytest.raises(ValueError, match="standin_crop=64"):
        imagenet_standin.train_standin(
            dataclasses.replace(s, standin_task="crops", standin_crop=64), 0, None
        )


def test_normalization_gaps_against_float64():
    """The per-layer gap is mean |EN - EMA normalization| of the layer's input, before the
    affine, with the network on EMA statistics (float64 reference on a two-layer model)."""
    torch.manual_seed(0)
    first, second = EvalNorm2d(3, norm_batch_size=2), EvalNorm2d(4, norm_batch_size=2)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    model = nn.Sequential(first, conv, second).double()
    for m, (a, b) in ((first, (0.3, 0.6)), (second, (0.0, 0.0))):
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
        m.weight.data.uniform_(0.5, 2)  # the gap is before the affine: these must not matter
        m.bias.data.uniform_(-1, 1)
        m.set_coefficients(a, b)
    batches = [3 * torch.randn(2, 3, 6, 6, dtype=torch.float64) + 1 for _ in range(2)]
    gaps = layer_gaps.normalization_gaps(model, batches)
    assert list(gaps) == ["0", "2"]
    x = torch.cat(batches).numpy()
    rm, rv = first.running_mean.numpy(), first.running_var.numpy()
    ones, zeros = np.ones(3), np.zeros(3)
    en = reference_evalnorm(x, rm, rv, ones, zeros, 0.3, 0.6, first.eps)
    ema = (x - rm[:, None, None]) / np.sqrt(rv[:, None, None] + first.eps)
    assert gaps["0"]["gap"] == pytest.approx(np.abs(en - ema).mean(), rel=1e-5)
    assert gaps["0"]["alpha"] == pytest.approx(0.3) and gaps["0"]["beta"] == pytest.approx(0.6)
    assert gaps["2"]["gap"] == pytest.approx(0.0, abs=1e-6)  # alpha = beta = 0: EN is EMA
    assert first.mode == "en" and model.training  # left as it was


def test_layer_gaps_of_a_smoke_cell(smoke, tmp_path):
    _, out, _, _ = smoke
    cell = out.parent / "work" / "cells" / regime_cells.cell_name("c", 2, 0)  # _run's --work-dir
    with _datasets(out.parent / "datasets"):
        gaps = layer_gaps.main(
            [str(cell), "--preset", "smoke", "--images", "2", "--output-dir", str(tmp_path)]
        )
    layers = gaps[cell.name]
    assert len(layers) > 10 and all(
        v["gap"] >= 0 and math.isfinite(v["gap"]) for v in layers.values()
    )
    assert json.loads((tmp_path / f"{cell.name}.json").read_text()) == layers
    assert (tmp_path / "layer_gaps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        layer_gaps.main([str(tmp_path), "--output-dir", str(tmp_path)])  # no model_final.pth


def test_test_groups_normalize_each_test_batch_and_complete_older_cells(smoke):
    """The "test groups of N" row: the backbone's norms on their test batch of N images, the
    heads' on their EMA, the EMA untouched;
    a cell recorded without the row gets the same numbers from its saved checkpoint."""
    _, out, _, cells = smoke
    name = regime_cells.cell_name("d", 2, 0)
    work = out.parent / "work"
    s = presets.PRESETS["smoke"]
    with _datasets(out.parent / "datasets"):
        datasets = regime_cells.register_datasets("smoke", s)
        older = copy.deepcopy(cells[name])
        del older["results"]["test_groups"]
        assert regime_cells.add_test_groups(s, datasets, older, work)
        assert older["results"]["test_groups"] == cells[name]["results"]["test_groups"]
        assert not regime_cells.add_test_groups(s, datasets, older, work)  # nothing left to add

        checkpoint = work / "cells" / name / "model_final.pth"
        cfg = regime_cells.cell_config(s, datasets, "d", 2, 0, checkpoint, work / "cells" / name)
        model = Trainer.build_model(cfg)
        EvalNormCheckpointer(model).load(str(checkpoint))
        stem, head = model.backbone.stem.conv1.norm, model.roi_heads.res5[0].conv1.norm
        ema = stem.running_mean.clone()
        seen, head_modes = [], set()
        stem.register_forward_hook(lambda m, i, o: seen.append((i[0].shape[0], m.mode)))
        head.register_forward_hook(lambda m, i, o: head_modes.add(m.mode))
        regime_cells.test_groups(cfg, model)
    num_test = len(DatasetCatalog.get(datasets[1]))
    assert [n for n, _ in seen] == [2] * (num_test // 2) and {m for _, m in seen} == {"batch"}
    assert head_modes == {"ema"}
    assert stem.mode == head.mode == "en" and torch.equal(stem.running_mean, ema)


def test_report_only_rewrites_the_tables_from_every_cell(smoke, tmp_path):
    """--report-only reports every cell in the output dir, whatever selection produced them,
    and trains nothing."""
    report, out, _, cells = smoke
    copy_dir = tmp_path / "copy"
    shutil.copytree(out.parent, copy_dir)
    (copy_dir / "out" / "results.md").unlink()
    argv = ["--preset", "smoke", "--output-dir", str(copy_dir / "out"), "--report-only"]
    argv += ["--work-dir", str(tmp_path / "no_work"), "--regimes", "a"]
    with _datasets(copy_dir / "datasets"):
        again = bench.main(argv)
    assert again["table"] == json.loads(json.dumps(report["table"]))
    assert sorted(again["cells"]) == sorted(cells) and again["complete"]
    assert (copy_dir / "out" / "results.md").is_file()
    assert not (tmp_path / "no_work" / "cells").exists()  # nothing trained
    with pytest.raises(SystemExit):
        bench.main(argv + ["--overwrite"])


def test_estimation_choices_of_a_trained_cell(smoke, tmp_path):
    estimation = importlib.import_module("benchmarks.detection_regimes.estimation")
    tmp = smoke[1].parent
    name = regime_cells.cell_name("d", 2, 0)
    argv = ["--preset", "smoke", name, "--work-dir", str(tmp / "work")]
    argv += ["--output-dir", str(tmp_path)]
    with _datasets(tmp / "datasets"), contextlib.redirect_stdout(io.StringIO()):
        results = estimation.main(argv)
    result = results[name]
    assert result["validation"] == "regimes_digits_smoke_selection"
    assert result["test_dataset"] == "regimes_digits_smoke_val"
    assert set(result["test"]) == set(estimation.ROWS)
    assert result["test"]["fixed_best_on_test"] is None  # no sweep on the test split here
    assert result["fit"]["iterations"] == 2  # the smoke cell's MODEL.EVALNORM.OFFLINE.MAX_ITER
    assert set(result["calibrations"]) == {"en", "en_eval_inputs"}
    text = (tmp_path / "results.md").read_text()
    assert "| **d_2img** (seeds: 1) | | | |" in text and "| EN online, calibrated |" in text


def test_diagnose_sweeps_a_trained_cell(smoke, tmp_path):
    diagnose = importlib.import_module("benchmarks.detection_regimes.diagnose")
    tmp = smoke[1].parent  # the smoke run's folder: out/, work/, datasets/
    name = regime_cells.cell_name("d", 2, 0)
    argv = ["--preset", "smoke", name, "--work-dir", str(tmp / "work")]
    argv += ["--output-dir", str(tmp_path)]
    with _datasets(tmp / "datasets"), contextlib.redirect_stdout(io.StringIO()):
        results = diagnose.main(argv)
        again = diagnose.main(argv)  # read back, not measured again
    rows = results[name]["rows"]
    assert results[name]["dataset"] == "regimes_digits_smoke_selection"
    sweeps = [r["sweep"] for r in rows]
    assert sweeps[:3] == ["ema", "en", "rule_of_thumb"] and "group" in sweeps
    assert again == results
    assert f"| sweep | setting | {name} |" in (tmp_path / "results.md").read_text()
    with pytest.raises(FileNotFoundError, match="no trained cell 'x'"):
        diagnose.main(
            [
                "--preset",
                "smoke",
                "x",
                "--work-dir",
                str(tmp / "work"),
                "--output-dir",
                str(tmp_path),
            ]
        )

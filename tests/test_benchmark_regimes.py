"""benchmarks/detection_regimes.py in smoke mode: the whole path (stand-in pre-training, the
conversion tool, the four regimes trained with microbatches, EMA and EN through Trainer.test,
the table and its files), and what its numbers rest on: the gap formula, the stand-in's tensors
in the detectors, regime (b)'s reset, regime (c)'s frozen norms.

One smoke run (4 regimes x N = 2, 8, 2 iterations of 8 images of 32 px each) serves every test.
Its APs mean nothing; the tests check where they come from, not what they are.
"""

import contextlib
import io
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d
from helpers import load_script
from torch import nn

from evalnorm_det import EvalNorm2d, Trainer
from evalnorm_det.engine.defaults import setup_cfg

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "detection_regimes.py"
IMAGES = (2, 8)


bench = load_script(SCRIPT)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """(report, output dir, printed text) of one smoke run, datasets under a temporary
    $DETECTRON2_DATASETS, one thread."""
    tmp = tmp_path_factory.mktemp("regimes")
    out = tmp / "out"
    previous = os.environ.get("DETECTRON2_DATASETS")
    os.environ["DETECTRON2_DATASETS"] = str(tmp / "datasets")
    threads = torch.get_num_threads()
    printed = io.StringIO()
    argv = ["--mode", "smoke", "--output-dir", str(out), "--threads", "1"]
    argv += ["--images-per-gpu", *map(str, IMAGES)]
    try:
        with contextlib.redirect_stdout(printed):
            report = bench.main(argv)
    finally:
        torch.set_num_threads(threads)
        if previous is None:
            del os.environ["DETECTRON2_DATASETS"]
        else:
            os.environ["DETECTRON2_DATASETS"] = previous
    return report, out, printed.getvalue()


def test_every_cell_with_ema_en_and_rule_of_thumb(smoke):
    report, out, _ = smoke
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(report))
    cells = {(c["regime"], c["images_per_gpu"], c["seed"]): c for c in report["cells"]}
    assert set(cells) == {(r, n, 0) for r in "abcd" for n in IMAGES}
    values = []
    for cell in cells.values():
        assert set(cell["results"]) == {"ema", "en", "rule_of_thumb"}
        # the numbers are the Trainer's own file's
        with open(Path(cell["output_dir"]) / "evalnorm_results.json") as f:
            written = json.load(f)
        for mode, metrics in cell["results"].items():
            assert set(metrics) == {"AP", "AP50", "AP75"}
            for metric, value in metrics.items():
                coco = written[mode]["bbox"][metric]
                # None: no finite detection at all (COCO's NaN), e.g. an EMA still mostly the
                # reset statistics after 2 iterations
                assert value == coco if value is not None else math.isnan(coco)
                assert value is None or 0 <= value <= 100
                values.append(value)
        assert cell["seconds"]["train"] > 0 and cell["seconds"]["eval"] > 0
    assert sum(v is not None for v in values) >= len(values) // 2
    assert report["standin"]["val_accuracy"] >= 0 and report["wall_seconds"]["total"] > 0
    for key in ("platform", "cpu_count", "torch", "detectron2", "torch_threads", "device"):
        assert key in report["machine"], key
    assert report["machine"]["torch_threads"] == 1 and report["settings"]["ims_per_batch"] == 8


def _markdown_blocks(text):
    """{regime letter: {row label: [9 cells as str]}} of results.md's table."""
    blocks, regime = {}, None
    for line in text.splitlines():
        if not line.startswith("| ") or line.startswith("| regime"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0].startswith("**("):
            regime = cells[0][3]
            blocks[regime] = {}
        else:
            blocks[regime][cells[0]] = cells[1:]
    return blocks


def _text_blocks(text):
    """The same from the printed table."""
    blocks, regime = {}, None
    for line in text.splitlines():
        if re.match(r"^\([abcd]\) ", line):
            regime = line[1]
            blocks[regime] = {}
        elif regime and re.match(r"^(EMA|EN|EN - EMA|1/B\^2) ", line):
            label = line[:12].strip()
            blocks[regime][label] = line[12:].split()
        elif regime and not line.strip():
            regime = None
    return blocks


def test_table_matches_the_json(smoke):
    """Both tables show every cell's EMA, EN, 1/B^2 and EN - EMA = their difference (2
    decimals)."""
    report, out, printed = smoke
    cells = {(c["regime"], c["images_per_gpu"]): c["results"] for c in report["cells"]}
    for blocks in (_markdown_blocks((out / "results.md").read_text()), _text_blocks(printed)):
        assert set(blocks) == set("abcd")
        for regime, rows in blocks.items():
            assert set(rows) == {"EMA", "EN", "EN - EMA", "1/B^2"}
            for i, (n, metric) in enumerate((n, m) for n in IMAGES for m in bench.METRICS):
                ema, en, rule = (
                    cells[regime, n][mode][metric] for mode in ("ema", "en", "rule_of_thumb")
                )
                for label, value in (("EMA", ema), ("EN", en), ("1/B^2", rule)):
                    assert rows[label][i] == ("-" if value is None else f"{value:.2f}")
                shown = rows["EN - EMA"][i]
                if None in (ema, en):
                    assert shown == "-"
                else:
                    assert abs(float(shown) - (en - ema)) <= 0.005 + 1e-9, (regime, n, metric)


def test_gap_recovered_formula():
    """(EN@2 - EMA@2) / (EMA@8 - EMA@2); undefined where EMA@8 <= EMA@2."""
    assert bench.gap_recovered(24.8, 30.2, 31.7) == pytest.approx(5.4 / 6.9)
    assert bench.PAPER_RECOVERED == pytest.approx(0.7826, abs=1e-4)
    assert bench.gap_recovered(10.0, 12.0, 14.0) == pytest.approx(0.5)
    assert bench.gap_recovered(10.0, 9.0, 14.0) == pytest.approx(-0.25)
    assert bench.gap_recovered(10.0, 12.0, 10.0) is None
    assert bench.gap_recovered(10.0, 12.0, 9.0) is None
    assert bench.gap_recovered(None, 12.0, 14.0) is None

    def cell(n, ema, en):
        results = {"ema": {"AP": ema, "AP50": 0.0, "AP75": 0.0}}
        results["en"] = {"AP": en, "AP50": 0.0, "AP75": 0.0}
        return {"regime": "d", "images_per_gpu": n, "seed": 0, "results": results}

    head = bench.headline(bench.mean_table([cell(2, 10.0, 13.0), cell(8, 14.0, 14.5)]))
    assert head["recovered"] == pytest.approx(0.75) and "75%" in head["text"]
    assert "78%" in head["text"]
    head = bench.headline(bench.mean_table([cell(2, 14.0, 15.0), cell(8, 13.0, 13.0)]))
    assert head["recovered"] is None and "meaningless" in head["text"]
    # two seeds: the means
    cells = [cell(2, 10.0, 12.0), cell(2, 12.0, 14.0), cell(8, 15.0, 15.0), cell(8, 17.0, 17.0)]
    table = bench.mean_table(cells)
    assert table["d"][2]["en-ema"]["AP"] == pytest.approx(2.0)
    assert bench.headline(table)["recovered"] == pytest.approx(2.0 / 5.0)


def test_smoke_headline(smoke):
    report = smoke[0]
    head = report["headline"]
    table = report["table"]["d"]
    assert head["ema_2"] == table["2"]["ema"]["AP"] and head["ema_8"] == table["8"]["ema"]["AP"]
    assert head["recovered"] == bench.gap_recovered(head["ema_2"], head["en_2"], head["ema_8"])
    assert head["text"] in smoke[2] and head["text"] in (smoke[1] / "results.md").read_text()


def _loaded_model(report, regime, n=2):
    """The cell's model as its Trainer loaded it, before training."""
    cell = next(c for c in report["cells"] if c["regime"] == regime and c["images_per_gpu"] == n)
    cfg = setup_cfg(
        str(Path(cell["output_dir"]) / "config.yaml"),
        ["DATASETS.TEST", "()", "OUTPUT_DIR", str(Path(cell["output_dir"]) / "reload")],
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
    detector, loaded from the tool's output; EN layers with microbatches of N."""
    report = smoke[0]
    checkpoint = torch.load(report["standin"]["detectron2_checkpoint"], weights_only=True)
    assert checkpoint["__author__"] == "torchvision"  # written by the tool
    assert "stem 16 channels, bottleneck widths 8/16/32/64" in report["standin"]["conversion"]
    standin = _standin(report)
    model, _ = _loaded_model(report, "d")
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

    scratch, _ = _loaded_model(report, "a")
    assert not torch.equal(scratch.backbone.stem.conv1.weight, standin["conv1.weight"])
    assert all(torch.all(m.running_var == 1) for m in _norms(scratch))


def test_regime_b_resets_the_norms(smoke):
    report = smoke[0]
    standin = _standin(report)
    model, _ = _loaded_model(report, "b")
    assert torch.equal(model.backbone.stem.conv1.weight, standin["conv1.weight"])
    assert torch.equal(model.roi_heads.res5[2].conv3.weight, standin["layer4.2.conv3.weight"])
    norms = _norms(model)
    assert len(norms) == 53 and all(isinstance(m, EvalNorm2d) for m in norms)
    for m in norms:
        assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        assert torch.all(m.running_mean == 0) and torch.all(m.running_var == 1)


def test_regime_c_keeps_the_standin_norms_frozen(smoke):
    """FrozenEN everywhere, no norm parameter trains; after training, the final checkpoint still
    holds the stand-in's statistics and affine, while the convolutions moved. In (d) the
    statistics were fine-tuned."""
    report = smoke[0]
    standin = _standin(report)
    model, cell = _loaded_model(report, "c")
    norms = _norms(model)
    assert len(norms) == 53 and all(isinstance(m, EvalNorm2d) and m.frozen for m in norms)
    assert not any(p.requires_grad for m in norms for p in (m.weight, m.bias))
    final = torch.load(Path(cell["output_dir"]) / "model_final.pth", weights_only=False)["model"]
    d2 = {"conv1": "backbone.stem.conv1", "layer1.0.conv2": "backbone.res2.0.conv2"}
    d2["layer4.1.conv1"] = "roi_heads.res5.1.conv1"
    for tv, name in d2.items():
        bn = _bn_name(tv)
        for attr in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(final[f"{name}.norm.{attr}"], standin[f"{bn}.{attr}"]), (tv, attr)
        assert not torch.equal(final[f"{name}.weight"], standin[f"{tv}.weight"]), tv

    tuned = next(c for c in report["cells"] if c["regime"] == "d" and c["images_per_gpu"] == 2)
    final = torch.load(Path(tuned["output_dir"]) / "model_final.pth", weights_only=False)["model"]
    stats = final["backbone.stem.conv1.norm.running_mean"]
    assert not torch.equal(stats, standin["bn1.running_mean"])


def test_refuses_to_overwrite(smoke, tmp_path):
    _, out, _ = smoke
    before = (out / "results.json").read_bytes()
    with pytest.raises(FileExistsError, match="results.json exists: pass --overwrite"):
        bench.main(["--mode", "smoke", "--output-dir", str(out)])
    assert (out / "results.json").read_bytes() == before
    with pytest.raises(SystemExit, match="divide 8"):
        bench.main(["--mode", "smoke", "--output-dir", str(tmp_path), "--images-per-gpu", "3"])
    assert not (tmp_path / "results.json").exists()

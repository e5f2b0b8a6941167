"""benchmarks/microbatch.py in its smoke mode (what CI runs), and the pieces its numbers rest on:
the model, identical starts for every B, the gap formula and the refusal to overwrite."""

import contextlib
import copy
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_script
from torch import nn

from evalnorm_det import EvalNorm2d

microbatch = load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "microbatch.py")

HEADER = ["B", "EMA", "EN online", "EN offline", "1/B^2", "1/B", "BN, test groups of B"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """(stdout, results.json, output dir) of one smoke run."""
    output_dir = tmp_path_factory.mktemp("microbatch") / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        microbatch.main(["--mode", "smoke", "--output-dir", str(output_dir)])
    results = json.loads((output_dir / "results.json").read_text())
    return stdout.getvalue(), results, output_dir


def table(text, header_start):
    """The markdown table whose header row starts with ``header_start``: (header, rows)."""
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    header = [c.strip() for c in lines[i].strip("|").split("|")]
    rows = []
    for line in lines[i + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return header, rows


def mean_and_std(text):
    m = re.fullmatch(r"(\d+\.\d\d) \+- (\d+\.\d\d)", text)
    assert m, text
    return float(m.group(1)), float(m.group(2))


def test_smoke_table_has_every_mode_and_b(smoke):
    stdout, _, output_dir = smoke
    header, rows = table(stdout, "| B | EMA")
    assert header == HEADER
    assert [int(row[0]) for row in rows] == microbatch.PRESETS["smoke"]["batch_sizes"]
    for row in rows:
        for text in row[1:]:
            mean, std = mean_and_std(text)
            assert 0.0 <= mean <= 100.0 and std >= 0.0
    # The printed tables are the ones saved in results.md.
    saved = (output_dir / "results.md").read_text()
    assert table(saved, "| B | EMA") == (header, rows)


def test_printed_means_are_the_per_seed_values(smoke):
    stdout, results, _ = smoke
    _, rows = table(stdout, "| B | EMA")
    main_runs = [
        r for r in results["runs"] if r["bn_momentum"] == results["settings"]["bn_momentum"]
    ]
    assert sorted({r["seed"] for r in main_runs}) == results["settings"]["seeds"]
    for row in rows:
        b = int(row[0])
        for label, text in zip(HEADER[1:], row[1:]):
            mode = next(k for k, v in microbatch.MODES.items() if v == label)
            values = [r["errors"][mode] for r in main_runs if r["B"] == b]
            assert len(values) == len(results["settings"]["seeds"])
            assert all(0.0 <= v <= 100.0 for v in values)
            assert mean_and_std(text)[0] == pytest.approx(np.mean(values), abs=0.006)
            # Every error is a whole number of misclassified test images.
            n = results["settings"]["test_images"]
            assert all(v * n / 100 == pytest.approx(round(v * n / 100), abs=1e-6) for v in values)


def test_momentum_study_rows(smoke):
    stdout, results, _ = smoke
    _, rows = table(stdout, "| B | BN momentum")
    s = results["settings"]
    expected = [
        (b, m) for b in s["study_batch_sizes"] for m in (s["bn_momentum"], s["study_momentum"])
    ]
    assert [(int(r[0]), float(r[1])) for r in rows] == expected
    for row in rows:
        b, momentum = int(row[0]), float(row[1])
        runs = [r for r in results["runs"] if r["B"] == b and r["bn_momentum"] == momentum]
        late = [r["errors"][microbatch.LATE] for r in runs]
        assert mean_and_std(row[4])[0] == pytest.approx(np.mean(late), abs=0.006)
        for r in runs:
            # Late estimation started at the fraction asked for, and the model it ran on
            # trained exactly as the one estimated from the start.
            assert r["late_start_step"] == min(
                round(s["study_estimate_from"] * r["steps"]), r["steps"] - 1
            )
            assert r["late_model_identical"]
            assert all(0.0 < a < 1.0 for a, _ in r["coefficients"][microbatch.LATE].values())


def test_only_normalization_differs_between_runs(smoke):
    _, results, _ = smoke
    for seed in results["settings"]["seeds"]:
        runs = [r for r in results["runs"] if r["seed"] == seed]
        assert len({r["B"] for r in runs}) > 1 and len({r["bn_momentum"] for r in runs}) > 1
        assert len({r["init_checksum"] for r in runs}) == 1
        assert len({r["first_batch_checksum"] for r in runs}) == 1
        assert len({r["steps"] for r in runs}) == 1
    small, large = build(2), build(128)
    for (k1, v1), (k2, v2) in zip(small.state_dict().items(), large.state_dict().items()):
        assert k1 == k2
        if not k1.endswith(("alpha_logit", "beta_logit")):
            assert torch.equal(v1, v2), k1
    data = microbatch.Digits(0, test_size=100, train_size=256)
    again = microbatch.Digits(0, test_size=100, train_size=256)
    for step in (0, 1, 5):
        for a, b in zip(data.batch(step), again.batch(step)):
            assert torch.equal(a, b)
    assert torch.equal(data.test_x, again.test_x)
    assert not torch.equal(data.batch(0)[0], microbatch.Digits(1, 100, train_size=256).batch(0)[0])


def build(b, momentum=0.1):
    return microbatch.build_model(0, b, momentum)


@pytest.mark.parametrize("b", [2, 16, 128])
def test_model_is_resnet20_with_microbatch_layers(b):
    model = build(b, momentum=0.01)
    layers = [m for m in model.modules() if isinstance(m, EvalNorm2d)]
    assert len(layers) == 19
    assert not any(
        isinstance(m, nn.BatchNorm2d) and not isinstance(m, EvalNorm2d) for m in model.modules()
    )
    assert all(m.microbatch and m.norm_batch_size == b and m.momentum == 0.01 for m in layers)
    assert all(m.alpha.item() == pytest.approx(1 / b**2) for m in layers)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # 20 weighted layers: the stem, 18 3x3 convolutions in 9 blocks, the classifier; plus the
    # two 1x1 projection shortcuts.
    assert sum(m.kernel_size == (3, 3) for m in convs) == 19
    assert sum(m.kernel_size == (1, 1) for m in convs) == 2
    assert [m.out_channels for m in convs if m.kernel_size == (3, 3)] == [16] * 7 + [32] * 6 + [
        64
    ] * 6
    assert len([m for m in model.modules() if isinstance(m, nn.Linear)]) == 1
    model.train()
    x = torch.randn(128, 1, 8, 8)
    assert model(x).shape == (128, 10)
    # Training normalizes groups of B: the first layer's EMA took 128 / B updates.
    assert layers[0].num_batches_tracked.item() == 128 // b


@pytest.mark.parametrize("b", [2, 16])
def test_test_groups_of_b_normalize_as_training_does(b):
    """The "BN, test groups of B" column: each group of B test images normalized with its own
    statistics, as the microbatch layers do in training (in float64, to compare closely)."""
    torch.manual_seed(0)
    model = build(b).double()
    for m in model.modules():
        if isinstance(m, EvalNorm2d):  # statistics that differ from any batch's
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)

    class Data:
        test_x = torch.randn(6 * b, 1, 8, 8, dtype=torch.float64)
        test_y = torch.randint(10, (6 * b,))

    trained = copy.deepcopy(model).train()
    with torch.no_grad():
        expected = (trained(Data.test_x).argmax(1) != Data.test_y).double().mean().item() * 100
        logits = trained(Data.test_x)
    assert microbatch.test_error(model, Data, "batch", group=b) == pytest.approx(expected)
    assert microbatch.test_error(model, Data, "ema") != pytest.approx(expected)
    # and the logits themselves, not only the count of errors
    model.eval()
    with microbatch.evalnorm_mode(model, "batch"), torch.no_grad():
        grouped = torch.cat([model(x) for x in Data.test_x.split(b)])
    torch.testing.assert_close(grouped, logits, rtol=1e-10, atol=1e-10)


def test_gap_formula():
    # The paper's ImageNet numbers as errors: EMA 35.20 at 2 samples, EN 29.02, best EMA 24.02.
    share = microbatch.gap_recovered(100 - 64.80, 100 - 70.98, 100 - 75.98)
    assert share == pytest.approx(6.18 / 11.18)
    assert microbatch.PAPER_RECOVERED == pytest.approx(share)
    assert microbatch.gap_recovered(10.0, 10.0, 4.0) == 0.0
    assert microbatch.gap_recovered(10.0, 12.0, 4.0) == pytest.approx(-2 / 6)
    assert microbatch.gap_recovered(4.0, 3.0, 4.0) is None  # no gap to recover
    # Means over two seeds, whose best B differ (8 and 128).
    ema = {2: [19.0, 21.0], 4: [12.0, 12.0], 8: [8.0, 10.0], 128: [12.0, 9.0]}
    errors = {b: {m: {"values": v} for m in microbatch.MODES} for b, v in ema.items()}
    errors[2]["en_online"]["values"] = [12.0, 14.0]
    for by_mode in errors.values():
        for stats in by_mode.values():
            stats["mean"] = np.mean(stats["values"])
    report = microbatch.gap_report(errors, 2)
    assert report["best_B"] == 8 and report["gap"] == pytest.approx(11.0)
    assert report["recovered"]["en_online"] == pytest.approx(7 / 11)
    assert report["recovered"]["simple"] == pytest.approx(0.0)
    assert report["per_seed"]["en_online"] == pytest.approx([7 / 11, 7 / 12])
    assert report["per_seed"]["simple"] == pytest.approx([0.0, 0.0])


def test_results_files_and_refusal_to_overwrite(smoke):
    _, results, output_dir = smoke
    for name in microbatch.RESULT_FILES:
        assert (output_dir / name).stat().st_size > 0, name
    assert (output_dir / "error_vs_B.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    machine = results["machine"]
    assert machine["torch_threads"] == 1 and machine["cpu_count"] >= 1 and machine["torch"]
    assert results["wall_seconds"] > 0
    before = (output_dir / "results.json").read_bytes()
    with pytest.raises(FileExistsError, match="results.json exists: pass --overwrite"):
        microbatch.main(["--mode", "smoke", "--output-dir", str(output_dir)])
    assert (output_dir / "results.json").read_bytes() == before


def test_b_must_divide_the_sgd_batch():
    with pytest.raises(SystemExit):
        microbatch.parse_args(["--batch-sizes", "3", "128"])

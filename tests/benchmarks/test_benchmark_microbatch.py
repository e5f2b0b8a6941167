"""benchmarks.microbatch in its smoke preset (what CI runs), and the pieces its numbers rest on:
the data and its disjoint splits, the model at 32/16/8, identical starts for every B, each
peer evaluation against an independent reference, the gap formula, resuming and refusing."""

import contextlib
import importlib
import io
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import digit_scenes, stats
from benchmarks.microbatch import cell
from benchmarks.microbatch import model as resnet
from benchmarks.microbatch import report as reporting
from evalnorm import evalnorm_mode
from evalnorm_det import EvalNorm2d

microbatch = importlib.import_module("benchmarks.microbatch.__main__")  # the command line

HEADER = ["B", "seeds"] + list(cell.EVALUATIONS.values())


def run_smoke(output_dir, *extra):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        microbatch.main(["--preset", "smoke", "--output-dir", str(output_dir), *extra])
    return stdout.getvalue(), json.loads((output_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """(stdout, results.json, output dir) of one smoke run."""
    output_dir = tmp_path_factory.mktemp("microbatch") / "out"
    stdout, results = run_smoke(output_dir)
    return stdout, results, output_dir


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


def test_smoke_table_has_every_evaluation_and_b(smoke):
    stdout, _, output_dir = smoke
    header, rows = table(stdout, "| B | seeds")
    assert header == HEADER
    assert [int(row[0]) for row in rows] == microbatch.PRESETS["smoke"]["batch_sizes"]
    for row in rows:
        for text in row[2:]:
            mean, std = mean_and_std(text)
            assert 0.0 <= mean <= 100.0 and std >= 0.0
    # The printed tables are the ones saved in results.md.
    saved = (output_dir / "results.md").read_text()
    assert table(saved, "| B | seeds") == (header, rows)


def test_printed_means_are_the_per_seed_values(smoke):
    stdout, results, _ = smoke
    _, rows = table(stdout, "| B | seeds")
    s = results["settings"]
    main_cells = [c for c in results["cells"] if c["steps"] == s["steps"]]
    for row in rows:
        b = int(row[0])
        for label, text in zip(HEADER[2:], row[2:]):
            key = next(k for k, v in cell.EVALUATIONS.items() if v == label)
            values = [c["errors"][key] for c in main_cells if c["B"] == b]
            assert len(values) == len(s["seeds"]) == int(row[1])
            assert mean_and_std(text)[0] == pytest.approx(np.mean(values), abs=0.006)
            # Every error is a whole number of misclassified test images.
            n = s["test_images"]
            assert all(v * n / 100 == pytest.approx(round(v * n / 100), abs=1e-6) for v in values)


def test_curve_and_convergence_check(smoke):
    stdout, results, output_dir = smoke
    s = results["settings"]
    curves = [c for c in results["cells"] if c["curve"]]
    assert {(c["B"], c["steps"]) for c in curves} >= {
        (b, s["steps"]) for b in s["curve_batch_sizes"]
    }
    for c in curves:
        steps = [p["step"] for p in c["curve"]]
        assert steps[-1] == c["steps"] and steps == sorted(steps)
        # The last point is the trained model: the same errors as its evaluation.
        assert c["curve"][-1]["ema"] == c["errors"]["ema"]
        assert c["curve"][-1]["en_online"] == c["errors"]["en_online"]
    _, rows = table(stdout, "| B | seed | steps")
    longer = s["steps"] * s["check_steps_factor"]
    assert [(int(r[0]), int(r[2]), int(r[6])) for r in rows] == [
        (b, s["steps"], longer) for b in s["check_batch_sizes"]
    ]
    assert (output_dir / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_example_weighing_is_chosen_on_validation(smoke):
    _, results, _ = smoke
    for c in results["cells"]:
        sweep = {float(k): v for k, v in c["example_weighing"]["validation_errors"].items()}
        assert sorted(sweep) == sorted(cell.WEIGHING_GRID)
        best = min(sweep.values())
        assert c["example_weighing"]["chosen"] == min(w for w, e in sweep.items() if e == best)


def test_only_normalization_differs_between_runs(smoke):
    _, results, _ = smoke
    cells = [c for c in results["cells"] if c["steps"] == results["settings"]["steps"]]
    assert len({c["B"] for c in cells}) > 1
    assert len({c["init_checksum"] for c in cells}) == 1
    assert len({c["first_batch_checksum"] for c in cells}) == 1
    small, large = build(2), build(128)
    for (k1, v1), (k2, v2) in zip(small.state_dict().items(), large.state_dict().items()):
        assert k1 == k2
        if not k1.endswith(("alpha_logit", "beta_logit")):
            assert torch.equal(v1, v2), k1


def scenes(seed=0):
    return digit_scenes.DigitScenes(seed, 32, 32, 2, 2, train_digits=256, bank=64)


def test_digit_scenes_are_deterministic_32px_and_split_disjoint():
    data, again = scenes(), scenes()
    for step in (0, 1, 5):
        for a, b in zip(data.batch(step), again.batch(step)):
            assert torch.equal(a, b)
    assert torch.equal(data.test_x, again.test_x) and torch.equal(data.val_x, again.val_x)
    assert not torch.equal(data.batch(0)[0], scenes(1).batch(0)[0])
    x, y = data.batch(0)
    assert x.shape == (128, 3, 32, 32) and y.shape == (128,) and torch.isfinite(x).all()
    assert data.test_x.shape == (64, 3, 32, 32) and data.val_x.shape == (64, 3, 32, 32)
    # Test, validation and training digits are different instances.
    splits = {k: set(v.tolist()) for k, v in data.splits.items()}
    assert not splits["test"] & splits["val"]
    assert not (splits["test"] | splits["val"]) & splits["train"]
    # Every image has statistics of its own: per-image means spread, not one shared level.
    assert x.mean(dim=(1, 2, 3)).std() > 0.2


def build(b, widths=(16, 32, 64)):
    return resnet.build_model(0, b, widths)


@pytest.mark.parametrize("b", [2, 16, 128])
def test_model_is_resnet20_v2_at_32_16_8(b):
    model = build(b)
    layers = [m for m in model.modules() if isinstance(m, EvalNorm2d)]
    assert len(layers) == 19
    assert not any(
        isinstance(m, nn.BatchNorm2d) and not isinstance(m, EvalNorm2d) for m in model.modules()
    )
    assert all(m.microbatch and m.norm_batch_size == b for m in layers)
    assert all(m.alpha.item() == pytest.approx(1 / b**2) for m in layers)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # 20 weighted layers: the stem, 18 3x3 convolutions in 9 blocks, the classifier; plus the
    # two 1x1 projection shortcuts.
    assert sum(m.kernel_size == (3, 3) for m in convs) == 19
    assert sum(m.kernel_size == (1, 1) for m in convs) == 2
    widths = [m.out_channels for m in convs if m.kernel_size == (3, 3)]
    assert widths == [16] * 7 + [32] * 6 + [64] * 6
    # Every BatchNorm layer sees maps of 8x8 or more: 32x32, 16x16, 8x8 by stage.
    sizes = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[-1])) for m in layers]
    model.train()
    assert model(torch.randn(128, 3, 32, 32)).shape == (128, 10)
    for h in hooks:
        h.remove()
    assert sorted(set(sizes)) == [8, 16, 32] and min(sizes) >= 8
    # Training normalizes groups of B: the first layer's EMA took 128 / B updates.
    assert layers[0].num_batches_tracked.item() == 128 // b


def randomized(model):
    for m in model.modules():
        if isinstance(m, EvalNorm2d):  # statistics that differ from any batch's
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("b", [2, 16])
def test_test_groups_of_b_normalize_each_group_by_itself(b):
    """The "BN, test groups of B" column against an independent path: each group of B images
    run on its own through the evaluation-mode "batch" statistics (float64)."""
    torch.manual_seed(0)
    model = randomized(build(b, (4, 8, 16)).double())
    x = torch.randn(6 * b, 3, 32, 32, dtype=torch.float64)
    model.eval()
    with evalnorm_mode(model, "batch"), torch.no_grad():
        logits = torch.cat([model(g) for g in x.split(b)])
    y = logits.argmax(1)
    y[::3] = (y[::3] + 1) % 10  # a third wrong
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert cell.grouped_error(model, x, y, chunk=2 * b) == pytest.approx(100 / 3)
    assert cell.error(model, x, y, "ema") != pytest.approx(100 / 3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # running statistics untouched
    assert not model.training


def test_prediction_time_bn_normalizes_each_sample_by_itself():
    torch.manual_seed(0)
    layer = randomized(EvalNorm2d(5, norm_batch_size=2)).double().eval()
    x = 3 + 2 * torch.randn(4, 5, 8, 8, dtype=torch.float64)
    layer.set_coefficients(1.0)
    expected = F.instance_norm(x, weight=layer.weight, bias=layer.bias, eps=layer.eps)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


def test_fixed_coefficients_are_restored():
    model = randomized(build(2, (4, 8, 16)))
    before = resnet.coefficients(model)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(10, (8,))
    with_one = cell.fixed_coefficient_error(model, x, y, 1.0)
    assert resnet.coefficients(model) == before
    model.eval()
    for m in model.modules():
        if isinstance(m, EvalNorm2d):
            m.set_coefficients(1.0)
    assert cell.error(model, x, y, "en") == with_one


def test_gap_formula_and_interval():
    # The paper's ImageNet numbers as errors: EMA 35.20 at 2 samples, EN 29.02, best EMA 24.02.
    share = stats.gap_recovered(100 - 64.80, 100 - 70.98, 100 - 75.98)
    assert share == pytest.approx(6.18 / 11.18)
    assert reporting.PAPER_RECOVERED == pytest.approx(share)
    assert stats.gap_recovered(10.0, 10.0, 4.0) == 0.0
    assert stats.gap_recovered(10.0, 12.0, 4.0) == pytest.approx(-2 / 6)
    assert stats.gap_recovered(4.0, 3.0, 4.0) is None  # no gap to recover
    # Two seeds; the best B is the one with the lowest mean EMA error (8), for both seeds.
    ema = {2: [19.0, 21.0], 4: [12.0, 12.0], 8: [8.0, 10.0], 128: [12.0, 9.0]}
    errors = {
        b: {k: {"values": list(v), "seeds": [0, 1]} for k in cell.EVALUATIONS}
        for b, v in ema.items()
    }
    errors[2]["en_online"]["values"] = [12.0, 14.0]
    for by_key in errors.values():
        for s in by_key.values():
            s["mean"] = np.mean(s["values"])
    report = reporting.gap_report(errors, 2)
    assert report["best_B"] == 8 and report["gap"] == pytest.approx(11.0)
    assert report["recovered"]["en_online"] == pytest.approx(7 / 11)
    assert report["recovered"]["simple"] == pytest.approx(0.0)
    assert report["per_seed"]["en_online"] == pytest.approx([7 / 11, 7 / 11])
    assert report["per_seed"]["simple"] == pytest.approx([0.0, 0.0])
    # A B run for fewer seeds cannot set the gap, however low its error.
    errors[16] = {k: {"values": [1.0], "seeds": [0], "mean": 1.0} for k in cell.EVALUATIONS}
    assert reporting.gap_report(errors, 2)["best_B"] == 8
    # Among B's with the most seeds in common with B = 2, the mean over those seeds decides.
    del errors[8], errors[4], errors[128]
    report = reporting.gap_report(errors, 2)
    assert report["best_B"] == 16 and report["seeds"] == [0]
    assert report["gap"] == pytest.approx(18.0)
    # Student-t interval: mean +- t(0.975, n-1) * s / sqrt(n).
    iv = stats.interval([0.5, 0.7, 0.9])
    half = 4.302652729911275 * 0.2 / np.sqrt(3)
    assert iv["mean"] == pytest.approx(0.7)
    assert (iv["low"], iv["high"]) == pytest.approx((0.7 - half, 0.7 + half))
    assert stats.interval([0.5])["low"] is None


def test_results_files_resume_and_refusal(smoke, tmp_path):
    _, results, output_dir = smoke
    for name in ("results.json", "results.md", *reporting.PLOTS):
        assert (output_dir / name).stat().st_size > 0, name
    machine = results["machine"]
    assert machine["torch_threads"] == 1 and machine["cpu_count"] >= 1 and machine["torch"]
    assert (
        results["cells_done"]
        == results["cells_planned"]
        == len(list((output_dir / "cells").glob("*.json")))
    )
    # The same command again resumes: every cell is read back, none is recomputed.
    cells = {p.name: p.read_bytes() for p in (output_dir / "cells").glob("*.json")}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _, again = run_smoke(output_dir)  # with --threads 1
        assert torch.get_num_threads() == 2  # torch's thread count is restored after a run
    finally:
        torch.set_num_threads(threads)
    assert {p.name: p.read_bytes() for p in (output_dir / "cells").glob("*.json")} == cells
    assert again["summary"]["errors"] == results["summary"]["errors"]
    # Other settings are refused before anything is measured, and nothing is lost.
    with pytest.raises(
        FileExistsError, match=r"other settings \(differing: steps\): pass --overwrite"
    ):
        run_smoke(output_dir, "--steps", "3")
    assert {p.name: p.read_bytes() for p in (output_dir / "cells").glob("*.json")} == cells


def test_cells_run_in_worker_processes_give_the_same_numbers(smoke, tmp_path):
    _, results, _ = smoke
    stdout, parallel = run_smoke(tmp_path / "out", "--jobs", "2")
    assert "2 job(s) of 1 thread(s)" in stdout

    def measured(cells):
        drop = ("train_seconds", "total_seconds", "machine")
        return sorted(
            ({k: v for k, v in c.items() if k not in drop} for c in cells),
            key=lambda c: (c["seed"], c["B"], c["steps"]),
        )

    assert measured(parallel["cells"]) == measured(results["cells"])
    assert [(c["B"], c["steps"]) for c in parallel["cells"]] == [
        (c["B"], c["steps"]) for c in results["cells"]
    ]  # in the planned order, whichever finished first


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls = []
    real = cell.run_cell

    def stop_after_first(data, b, steps, args, curve=False):
        if calls:
            raise KeyboardInterrupt
        calls.append((b, steps))
        return real(data, b, steps, args, curve)

    args = ["--batch-sizes", "2", "4", "--check-batch-sizes", "--curve-batch-sizes"]
    monkeypatch.setattr(cell, "run_cell", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        run_smoke(out, *args)
    assert [p.name for p in (out / "cells").glob("*.json")] == ["seed0_B2_steps4.json"]
    assert not list((out / "cells").glob("*.tmp"))
    monkeypatch.setattr(cell, "run_cell", lambda *a, **k: (calls.append(a[1:3]), real(*a, **k))[1])
    _, results = run_smoke(out, *args)
    assert calls == [(2, 4), (4, 4)]  # the first cell was not run again
    assert results["cells_done"] == 2


def test_report_only_rewrites_the_results_from_the_cells(smoke, monkeypatch):
    _, results, output_dir = smoke
    (output_dir / "results.md").unlink()
    monkeypatch.setattr(cell, "run_cell", lambda *a, **k: pytest.fail("trained a cell"))
    _, again = run_smoke(output_dir, "--report-only")
    assert again["summary"] == results["summary"] and again["gap"] == results["gap"]
    assert (output_dir / "results.md").stat().st_size > 0


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        microbatch.parse_args(["--batch-sizes", "3", "128"])
    with pytest.raises(SystemExit):
        microbatch.parse_args(["--preset", "smoke", "--test-copies", "3"])  # 64 x 3: not x128
    with pytest.raises(SystemExit):
        microbatch.parse_args(["--preset", "smoke", "--check-batch-sizes", "64"])
    with pytest.raises(SystemExit):
        microbatch.parse_args(["--report-only", "--overwrite"])


def test_estimation_choices_retrain_the_cell_and_choose_on_validation(smoke, tmp_path):
    """The estimation module trains the cell's model again (same EMA and EN errors as the
    recorded cell), keeps it, and chooses every calibrated or fixed row on validation."""
    estimation = importlib.import_module("benchmarks.microbatch.estimation")
    _, _, output_dir = smoke
    argv = ["--preset", "smoke", "--seeds", "0", "--batch-sizes", "2"]
    argv += ["--output-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "models")]
    argv += ["--cells-dir", str(output_dir / "cells")]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        estimation.main(argv)
    result = json.loads((tmp_path / "out" / "seed0_B2.json").read_text())
    recorded = json.loads((output_dir / "cells" / "seed0_B2_steps4.json").read_text())["errors"]
    assert 100 - result["test"]["ema"] == pytest.approx(recorded["ema"], abs=1e-9)
    assert 100 - result["test"]["en"] == pytest.approx(recorded["en_online"], abs=1e-9)
    assert (tmp_path / "models" / "seed0_B2_steps4.pt").is_file()
    factors = [f for f, _ in result["calibrations"]["en"]]
    assert 0.0 in factors and result["chosen"]["en_calibrated"] in factors
    validation = {(r["sweep"], r["setting"]): r["score"] for r in result["validation_sweep"]}
    best = max(validation[k] for k in validation if k[0] == "fixed")
    assert validation["fixed", result["chosen"]["fixed_selected"]] == best
    assert result["test"]["fixed_best_on_test"] >= result["test"]["fixed_selected"]
    assert result["fit"]["iterations"] == 2  # the smoke preset's offline_iters
    assert (
        "| EN on evaluation inputs, calibrated |" in (tmp_path / "out" / "results.md").read_text()
    )
    assert "recorded" in stdout.getvalue()

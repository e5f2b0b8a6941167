"""benchmarks.overhead: its smallest preset runs end to end, and what it measures is right."""

import copy
import json
import statistics

import pytest
import torch
from detectron2.modeling import build_model

from benchmarks import overhead
from evalnorm_det import convert_to_batchnorm


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("overhead")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = overhead.main(["--preset", "smoke", "--output-dir", str(out), "--threads", "1"])
        assert torch.get_num_threads() == 2  # torch's thread count is restored after a run
    finally:
        torch.set_num_threads(threads)
    return out, results


def test_smoke_preset_writes_every_measure(smoke):
    out, results = smoke
    saved = json.loads((out / "results.json").read_text())
    assert saved["ratios"] == pytest.approx(results["ratios"])
    times = saved["training"]["times"]
    assert {len(t) for t in times.values()} == {overhead.PRESETS["smoke"]["rounds"]}
    assert saved["ratios"]["training step"] == pytest.approx(
        statistics.median(times["EN"]) / statistics.median(times["BN"])
    )
    memory = saved["training"]["memory"]
    for name in times:
        assert memory[name]["peak"] == memory[name]["state"] + memory[name]["step_peak"]
        assert memory[name]["step_peak"] > 0
    # BN and EN models have the same parameters (EN's alpha/beta are 2 scalars per layer).
    assert abs(memory["EN"]["state"] - memory["BN"]["state"]) < 0.01 * memory["BN"]["state"]
    assert [row["layer"] for row in saved["layers"]] == [
        "stem",
        "res2",
        "res3",
        "res4",
        "res5 (ROIs)",
    ]
    table = (out / "results.md").read_text()
    assert "| EN, autograd loss (before) |" in table and "| res5 (ROIs) |" in table
    assert set(times) == {"BN", "EN", "EN, MAX_POSITIONS 4096", "EN, autograd loss (before)"}
    assert saved["machine"]["torch"] == torch.__version__
    launches = saved["launches"]
    alone = {"EN, OnlineEstimator.step alone", "EN, NaN check alone"}
    assert set(launches["training step"]) == set(times) | alone
    # One flat tensor for every layer's alpha/beta: no value read to the host in a step.
    assert launches["training step"]["EN, OnlineEstimator.step alone"]["scalar reads"] == 0
    assert launches["training step"]["EN, NaN check alone"]["scalar reads"] == 1
    assert set(launches["inference"]) == {"BN folded", "EN", "EN, not in place", "EN deployed"}
    deployment = saved["deployment"]
    assert deployment["change"] <= deployment["tolerance"] == 1e-3
    assert saved["ratios"]["inference (EN deployed)"] == pytest.approx(
        statistics.median(saved["inference"]["EN deployed"])
        / statistics.median(saved["inference"]["BN folded"])
    )
    assert "| EN deployed (" in table
    assert all(row["eval"]["one read"] > 0 for row in saved["layers"])
    assert all(row["eval"]["EN in place"] > 0 for row in saved["layers"])
    # Every model evaluates the same proposals, one set per timed image.
    assert len(deployment["proposals"]) == overhead.PRESETS["smoke"]["images"]
    assert all(n > 0 for n in deployment["proposals"])
    assert {len(v) for v in deployment["own proposals"].values()} == {len(deployment["proposals"])}
    assert "| EN, not in place (each output a new tensor) |" in table
    for rows in launches.values():  # EN computes per-sample statistics on top of BN's work
        en, bn = rows["EN"], rows.get("BN", rows.get("BN folded"))
        assert en["operators"] > bn["operators"] > 0 and en["scalar reads"] >= bn["scalar reads"]
    assert "| training step, EN |" in table and "| inference, BN folded |" in table


def test_launch_counts_name_operators_and_scalar_reads():
    x = torch.arange(6.0)
    counts = overhead.count_launches(lambda: [x.sum().item(), bool((x * 2).max() > 3)], "cpu")
    # sum, mul, max, gt, and two reads of a Python number, each a sync on a GPU.
    assert counts["scalar reads"] == 2 and counts["operators"] >= 6
    assert "kernels" not in counts and "syncs" not in counts


def test_refuses_to_overwrite_results(smoke):
    out, _ = smoke
    with pytest.raises(FileExistsError, match="results.json exists"):
        overhead.main(["--preset", "smoke", "--output-dir", str(out)])


def test_folded_batchnorm_computes_what_batchnorm_evaluation_does():
    args = overhead.parse_args(["--preset", "smoke"])
    cfg = overhead.detector_cfg(args)
    torch.manual_seed(0)
    bn = convert_to_batchnorm(build_model(cfg)).double().eval()
    for m in bn.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    folded = overhead.fold_batchnorm(copy.deepcopy(bn))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = bn.backbone(x)["res4"]
        torch.testing.assert_close(folded.backbone(x)["res4"], expected, rtol=1e-10, atol=1e-10)


def test_cpu_peak_memory_counts_live_tensors():
    class Step:
        def step(self, batch, seed):
            a = torch.ones(2**20)  # 4 MiB
            b = torch.ones(2**20)  # 4 MiB, both alive
            del a
            c = b * 2  # 4 MiB while b is alive
            return c.sum()

    peak = overhead.step_peak_bytes(Step(), None, "cpu")
    assert 8 * 2**20 <= peak < 9 * 2**20

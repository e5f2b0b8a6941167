"""What the benchmarks share (benchmarks.common, benchmarks.stats): torch's thread count restored
however a run ends, the gap formula in both directions, the tables' and numbers' text."""

import pytest
import torch
from helpers import small_cnn

from benchmarks.common import torch_threads
from benchmarks.estimation import ROWS, compare_estimations
from benchmarks.stats import gap_recovered, markdown_table, mean_std, percent, two_decimals
from evalnorm import EvalNorm2d, convert_to_evalnorm


def test_torch_threads_are_restored_on_exit_and_on_error():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(KeyboardInterrupt), torch_threads(1):
            raise KeyboardInterrupt
        assert torch.get_num_threads() == 2
        with torch_threads(None):  # unchanged
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_gap_recovered_for_errors_and_for_scores():
    # errors (lower is better): EMA 35.20 at the small batch, X 29.02, EMA 24.02 at the best
    assert gap_recovered(35.20, 29.02, 24.02) == pytest.approx(6.18 / 11.18)
    # the same numbers as scores (higher is better): the same share
    assert gap_recovered(64.80, 70.98, 75.98, higher_is_better=True) == pytest.approx(6.18 / 11.18)
    assert gap_recovered(4.0, 3.0, 4.0) is None and gap_recovered(4.0, 5.0, 3.0, True) is None
    assert gap_recovered(None, 1.0, 2.0) is None


def test_formatting():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))
    assert mean_std([1.0]) == (1.0, 0.0) and mean_std([1.0], single=None) == (1.0, None)
    assert percent(0.7826) == "78%" and percent(None) == "n/a"
    assert percent(None, missing="undefined") == "undefined"
    assert two_decimals(1.5, signed=True) == "+1.50" and two_decimals(None) == "-"
    table = markdown_table(["a", "b"], [[1, "x"], "| **section** | |"], align="-r")
    assert table == "| a | b |\n|---|---:|\n| 1 | x |\n| **section** | |"
    with pytest.raises(ValueError):
        markdown_table(["a", "b"], [], align="rrr")


def test_estimation_choices_are_made_on_validation_and_measured_on_test():
    """Scores that depend only on the first layer's alpha: validation peaks at alpha = 0.1,
    test at 0.2. Every choice must follow validation; the model given is left as it was."""
    model = convert_to_evalnorm(small_cnn(torch.nn.BatchNorm2d), norm_batch_size=2).eval()
    layers = [m for m in model.modules() if isinstance(m, EvalNorm2d)]
    for m in layers:
        m.set_coefficients(0.2)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def score(peak):
        def evaluate(m):
            first = next(x for x in m.modules() if isinstance(x, EvalNorm2d))
            alpha = 0.0 if first.mode == "ema" else first.alpha.item()
            return -abs(alpha - peak)

        return evaluate

    def fit(m):  # a stand-in fit: triples every coefficient
        for x in m.modules():
            if isinstance(x, EvalNorm2d):
                x.set_coefficients(3 * x.alpha.item())
        return {"iterations": 1}

    result = compare_estimations(
        model, score(0.1), score(0.2), fit, values=(0.0, 0.1, 0.3), factors=(0.0, 0.5, 1.0)
    )
    assert list(result["test"]) == list(ROWS)
    assert result["chosen"] == {
        "fixed_selected": 0.1,
        "en_calibrated": 0.5,  # 0.2 x 0.5 = 0.1
        "en_eval_inputs_calibrated": 0.0,  # 0.6 x (0, 0.5, 1) = 0, 0.3, 0.6
    }
    # alpha and beta are stored as float32 logits: scores to 1e-6
    expected = {
        "ema": -0.2,
        "en": 0.0,  # alpha 0.2: the test peak
        "en_calibrated": -0.1,
        "en_eval_inputs": -0.4,  # alpha 0.6
        "en_eval_inputs_calibrated": -0.2,  # alpha 0
        "fixed_selected": -0.1,
        "fixed_best_on_test": -0.1,  # 0.1 or 0.3
    }
    for row, value in expected.items():
        assert result["test"][row] == pytest.approx(value, abs=1e-6), row
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

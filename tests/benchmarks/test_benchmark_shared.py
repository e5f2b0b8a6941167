"""What the benchmarks share (benchmarks.common, benchmarks.stats): torch's thread count restored
however a run ends, the gap formula in both directions, the tables' and numbers' text."""

import pytest
import torch

from benchmarks.common import torch_threads
from benchmarks.stats import gap_recovered, markdown_table, mean_std, percent, two_decimals


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

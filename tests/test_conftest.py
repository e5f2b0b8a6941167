"""The isolation in conftest.py: a test that changes torch's global state leaves none behind."""

import torch

CHANGED = {}


def test_a_changes_global_torch_state():
    CHANGED["threads"] = torch.get_num_threads()
    CHANGED["rng"] = torch.get_rng_state()
    torch.set_num_threads(1 if CHANGED["threads"] > 1 else 2)
    torch.set_default_dtype(torch.float64)
    torch.set_grad_enabled(False)
    torch.rand(3)


def test_b_sees_it_restored():
    assert torch.get_num_threads() == CHANGED["threads"]
    assert torch.get_default_dtype() is torch.float32 and torch.is_grad_enabled()
    assert torch.equal(torch.get_rng_state(), CHANGED["rng"])

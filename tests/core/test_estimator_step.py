"""OnlineEstimator.step on one flat tensor: torch.optim's updates, its state format, and a
number of operators that does not grow with the layers."""

import copy

import pytest
import torch
from torch import nn

from evalnorm import EvalNorm2d, OnlineEstimator


def norms(n):
    return nn.Sequential(*[EvalNorm2d(3, norm_batch_size=2) for _ in range(n)])


def give_gradients(model, seed, skip=()):
    g = torch.Generator().manual_seed(seed)
    for i, m in enumerate(model):
        if i not in skip:
            m.add_aux_grad(torch.randn(2, generator=g), torch.zeros(()))


def reference_step(model, optimizer):
    """torch.optim over the same parameters, as the estimator stepped before: a layer without
    a gradient takes no step."""
    for m in model:
        grad = m.take_aux_grad()
        m.alpha_logit.grad = None if grad is None else grad[0].clone()
        m.beta_logit.grad = None if grad is None else grad[1].clone()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_step_is_torch_optim_with_layers_left_out(kind):
    model = norms(3)
    reference = copy.deepcopy(model)
    estimator = OnlineEstimator(model, lr=0.1, optimizer=kind)
    params = [p for m in reference for p in (m.alpha_logit, m.beta_logit)]
    torch_opt = (
        torch.optim.Adam(params, lr=0.1)
        if kind == "adam"
        else torch.optim.SGD(params, lr=0.1, momentum=0.9)
    )
    for seed, skip in enumerate([(1,), (), (0, 2), ()]):  # layer 1 has no gradient at first
        give_gradients(model, seed, skip)
        give_gradients(reference, seed, skip)
        estimator.step()
        reference_step(reference, torch_opt)
        for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    ours, theirs = estimator.state_dict()["optimizer"], torch_opt.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys()
    for i, state in theirs["state"].items():
        for k, v in state.items():
            torch.testing.assert_close(ours["state"][i][k], v, rtol=1e-6, atol=1e-7)


def test_torch_optim_state_loads_and_resumes():
    model = norms(2)
    reference = copy.deepcopy(model)
    params = [p for m in reference for p in (m.alpha_logit, m.beta_logit)]
    torch_opt = torch.optim.Adam(params, lr=0.05)
    give_gradients(reference, 0, skip=(1,))
    reference_step(reference, torch_opt)  # a state in torch.optim's own format
    model.load_state_dict(reference.state_dict())
    estimator = OnlineEstimator(model, lr=0.05)
    estimator.load_state_dict({"optimizer": torch_opt.state_dict()})
    give_gradients(model, 1)
    give_gradients(reference, 1)
    estimator.step()
    reference_step(reference, torch_opt)
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_layers_follow_the_estimator_after_to_and_load_state_dict():
    model = norms(2)
    estimator = OnlineEstimator(model, lr=0.1)
    give_gradients(model, 0)
    estimator.step()
    model.double()  # replaces every parameter's data: the estimator relinks
    model.load_state_dict(copy.deepcopy(model.state_dict()))
    before = [m.alpha.item() for m in model]
    give_gradients(model, 1)
    estimator.step()
    assert all(m.alpha_logit.dtype == torch.float64 for m in model)
    assert [m.alpha.item() for m in model] != before
    assert estimator.optimizer.state_dict()["state"][0]["step"] == 2
    assert next(iter(estimator.coefficients().values()))[0] == pytest.approx(model[0].alpha.item())


def test_refuses_layers_of_several_dtypes():
    model = norms(2)
    model[1].double()
    with pytest.raises(ValueError, match=r"'1' holds alpha/beta in torch.float64"):
        OnlineEstimator(model)


def count(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events()]
    return sum(n.startswith("aten::") for n in names), names.count("aten::_local_scalar_dense")


def test_step_launches_as_many_operators_for_any_number_of_layers_and_reads_nothing():
    counts = []
    for n in (2, 12):
        model = norms(n)
        estimator = OnlineEstimator(model)
        give_gradients(model, 0)
        estimator.step()  # the first step, as the later ones
        give_gradients(model, 1)
        counts.append(count(estimator.step))
    assert counts[0] == counts[1]
    assert counts[0][1] == 0  # no value read to the host

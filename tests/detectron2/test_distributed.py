"""Estimation under torch.distributed (2 CPU processes, GLOO): ranks stay identical."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, 5, 5, generator=g) * (1 + r) + r for r in range(2)]


def make_layer():
    from helpers import randomize_batchnorm

    from evalnorm_det import EvalNorm2d

    return randomize_batchnorm(EvalNorm2d(3, norm_batch_size=2))


def worker(rank, port, out_dir):
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from evalnorm_det import OnlineEstimator

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        layer = make_layer()
        # SGD: a step proportional to the gradient (Adam's first step is lr * sign(gradient)).
        estimator = OnlineEstimator(
            torch.nn.Sequential(layer), lr=1.0, optimizer="sgd", momentum=0.0
        )
        layer(batches()[rank])  # each rank its own samples and its own statistics
        estimator.step()
        torch.save(layer.state_dict(), os.path.join(out_dir, f"rank{rank}.pth"))
    finally:
        dist.destroy_process_group()


def offline_worker(rank, port, out_dir):
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from evalnorm_det import estimate_offline

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        layer = make_layer()
        g = torch.Generator().manual_seed(rank)  # each rank its own training images
        data = [torch.randn(2, 3, 5, 5, generator=g) * (1 + rank) for _ in range(40)]
        summary = estimate_offline(torch.nn.Sequential(layer), iter(data), 40, patience=4)
        torch.save({"state": layer.state_dict(), **summary}, os.path.join(out_dir, f"r{rank}.pth"))
    finally:
        dist.destroy_process_group()


def box_ap_worker(rank, port, out_dir):
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from detectron2.utils import comm

    from evalnorm_det import Trainer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # As inference_on_dataset: the main process gets the COCO results, the others {}.
        results = {"bbox": {"AP": 40.0 + rank}} if rank == 0 else {}
        Trainer.evaluate_row = classmethod(lambda cls, *args: results)
        ap = Trainer.box_ap(None, None, "d", None, "row")
        torch.save(ap, os.path.join(out_dir, f"ap{rank}.pth"))
    finally:
        # detectron2 caches the group it gathers over; left cached, the group outlives
        # destroy_process_group and gloo's threads abort the process at interpreter exit.
        comm._get_global_gloo_group.cache_clear()
        dist.destroy_process_group()


def test_box_ap_is_the_main_process_number_on_every_rank(tmp_path):
    """Calibration and the coefficient sweep choose from it: every rank must choose alike."""
    mp.spawn(box_ap_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [torch.load(tmp_path / f"ap{r}.pth") for r in range(2)] == [40.0, 40.0]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_average_gradients(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pth", weights_only=True) for r in range(2)]
    assert torch.equal(ranks[0]["alpha_logit"], ranks[1]["alpha_logit"])
    assert torch.equal(ranks[0]["beta_logit"], ranks[1]["beta_logit"])
    # Statistics stay per process, as in the paper: each rank normalized its own batch.
    assert not torch.equal(ranks[0]["running_mean"], ranks[1]["running_mean"])

    # One process, the two gradients averaged by hand, the same optimizer step.
    layer = make_layer()
    layer.estimate_online = True
    grads = []
    for x in batches():
        replica = make_layer()
        replica.estimate_online = True
        replica(x)
        grads.append(replica.take_aux_grad())
    mean = (grads[0] + grads[1]) / 2
    layer.alpha_logit.grad, layer.beta_logit.grad = mean[0].clone(), mean[1].clone()
    torch.optim.SGD([layer.alpha_logit, layer.beta_logit], lr=1.0).step()
    torch.testing.assert_close(
        ranks[0]["alpha_logit"], layer.alpha_logit.detach(), rtol=1e-6, atol=1e-7
    )
    torch.testing.assert_close(
        ranks[0]["beta_logit"], layer.beta_logit.detach(), rtol=1e-6, atol=1e-7
    )


def test_offline_estimation_stops_together_with_the_same_coefficients(tmp_path):
    mp.spawn(offline_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"r{r}.pth", weights_only=True) for r in range(2)]
    assert ranks[0]["iterations"] == ranks[1]["iterations"] >= 8
    assert ranks[0]["losses"] == ranks[1]["losses"]  # averaged over ranks: one stopping rule
    for key in ("alpha_logit", "beta_logit"):
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key])
        assert not torch.equal(ranks[0]["state"][key], make_layer().state_dict()[key])
    for key in ("running_mean", "running_var"):  # untouched on both ranks
        assert torch.equal(ranks[0]["state"][key], make_layer().state_dict()[key])

"""The real Trainer under ``detectron2.engine.launch`` with 2 CPU processes (GLOO).

detectron2's ``launch`` picks GLOO when CUDA is absent, so this runs the same code path as
``tools/train_net.py --num-gpus 2``. Each rank trains 3 iterations at 2 images per process
(``SOLVER.IMS_PER_BATCH 4``) with a fixed seed, alpha/beta stepped by SGD with momentum (its
step scales with the gradient, so a sum instead of a mean would show; Adam's would not).

What one process computes with the averaged gradient is checked where it is defined: each
rank records, at every alpha/beta step, the gradient its own images gave each layer before the
all-reduce and the logits before and after the step. One process then replays the 3 steps with
a fresh SGD on the mean of the two ranks' gradients and must land on the ranks' logits. (Redoing
each rank's forward in one process would also need the DDP-averaged model weights at every
iteration; the per-rank gradients are what those forwards produced.)
"""

import os
import socket
import sys
from pathlib import Path

import torch
from detection_helpers import tiny_cfg
from detectron2.engine import launch

TESTS = Path(__file__).resolve().parents[1]  # detection_helpers.py, for spawned processes
ONLINE = ["MODEL.EVALNORM.ONLINE.OPTIMIZER", "sgd", "MODEL.EVALNORM.ONLINE.LR", "0.5"]


def main(tmp_path):
    sys.path.insert(0, str(TESTS))
    from detection_helpers import register_tiny_digits
    from detectron2.utils import comm

    from evalnorm_det import OnlineEstimator, Trainer
    from evalnorm_det.engine import argument_parser, parse_args, setup

    register_tiny_digits(Path(tmp_path) / "datasets")  # spawned: nothing registered yet
    rank = comm.get_rank()
    out = os.path.join(tmp_path, f"out_rank{rank}")  # what each rank writes, apart
    args = parse_args(
        argument_parser(), ["--config-file", os.path.join(tmp_path, "cfg.yaml"), "OUTPUT_DIR", out]
    )
    cfg = setup(args)  # detectron2's default_setup: rank-0-only files, seed SEED + rank
    steps = []
    step = OnlineEstimator.step

    def recording_step(self):
        before = {n: (m.alpha_logit.clone(), m.beta_logit.clone()) for n, m in self.layers}
        local = {n: m._aux_grad for n, m in self.layers}
        local = {n: None if g is None else g.detach().clone() for n, g in local.items()}
        step(self)
        after = {
            n: (m.alpha_logit.detach().clone(), m.beta_logit.detach().clone())
            for n, m in self.layers
        }
        steps.append({"before": before, "grad": local, "after": after})

    OnlineEstimator.step = recording_step
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    model = trainer.checkpointer.model
    state = {k: v for k, v in model.state_dict().items() if k.endswith(("_logit", "running_mean"))}
    torch.save({"state": state, "steps": steps}, os.path.join(tmp_path, f"rank{rank}.pth"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_through_launch(tmp_path):
    cfg = tiny_cfg(
        tmp_path, "SOLVER.IMS_PER_BATCH", "4", "SOLVER.CHECKPOINT_PERIOD", "2", "SEED", "0", *ONLINE
    )
    (tmp_path / "cfg.yaml").write_text(cfg.dump())  # and the digits generated, once
    launch(main, 2, dist_url=f"tcp://127.0.0.1:{free_port()}", args=(str(tmp_path),))
    ranks = [torch.load(tmp_path / f"rank{r}.pth", weights_only=True) for r in range(2)]

    # alpha/beta identical on both ranks; statistics per process (each rank its own images).
    state0, state1 = ranks[0]["state"], ranks[1]["state"]
    logits = [k for k in state0 if k.endswith("_logit")]
    assert logits and all(torch.equal(state0[k], state1[k]) for k in logits)
    means = [k for k in state0 if k.endswith("running_mean")]
    assert all(not torch.equal(state0[k], state1[k]) for k in means)

    # One process, the mean of the two ranks' gradients, the same optimizer: the same logits.
    steps0, steps1 = ranks[0]["steps"], ranks[1]["steps"]
    assert len(steps0) == len(steps1) == 3
    params = {
        n: [a.clone().requires_grad_(), b.clone().requires_grad_()]
        for n, (a, b) in steps0[0]["before"].items()
    }
    sgd = torch.optim.SGD([p for ab in params.values() for p in ab], lr=0.5, momentum=0.9)
    differs = 0
    for s0, s1 in zip(steps0, steps1):
        for n, (a, b) in params.items():
            grads = [g for g in (s0["grad"][n], s1["grad"][n]) if g is not None]
            if grads:
                mean = torch.stack(grads).sum(0) / len(grads)
                a.grad, b.grad = mean[0].clone(), mean[1].clone()
                differs += len(grads) == 2 and not torch.equal(grads[0], grads[1])
        sgd.step()
        sgd.zero_grad(set_to_none=True)
        for n, (a, b) in params.items():
            for i, p in enumerate((a, b)):
                torch.testing.assert_close(p.detach(), s0["after"][n][i], rtol=1e-6, atol=1e-7)
                assert torch.equal(s0["after"][n][i], s1["after"][n][i])
    assert differs > 0  # the ranks' own gradients differ: the mean is not one rank's

    # Only rank 0 writes checkpoints, metrics and the config; rank 1 only its own log file.
    files0 = set(os.listdir(tmp_path / "out_rank0"))
    assert {"model_0000001.pth", "model_final.pth", "last_checkpoint", "metrics.json"} <= files0
    assert {"config.yaml", "log.txt"} <= files0
    assert set(os.listdir(tmp_path / "out_rank1")) == {"log.txt.rank1"}

"""alpha/beta curves in TensorBoard: what the online hook logs reaches the events file that
detectron2's TensorboardXWriter writes to OUTPUT_DIR."""

import pytest
from detection_helpers import en_layers, tiny_cfg, train
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """4 iterations, alpha/beta logged every 2: (trainer, the events' scalars by tag)."""
    tmp_path = tmp_path_factory.mktemp("tensorboard")
    cfg = tiny_cfg(tmp_path, "SOLVER.MAX_ITER", "4", "MODEL.EVALNORM.ONLINE.LOG_PERIOD", "2")
    trainer = train(cfg)
    events = EventAccumulator(cfg.OUTPUT_DIR, size_guidance={SCALARS: 0}).Reload()
    scalars = {tag: events.Scalars(tag) for tag in events.Tags()[SCALARS]}
    return trainer, scalars


def curves(trainer, scalars):
    """Per EvalNorm layer and coefficient: (tag, layer, [(step, value)] in TensorBoard,
    {step: value} the hook put in the event storage)."""
    for name, layer in en_layers(trainer.model):
        for coefficient in ("alpha", "beta"):
            tag = f"evalnorm_{coefficient}/{name}"
            assert tag in scalars, f"{tag} is not in the events file"
            logged = {it: v for v, it in trainer.storage.history(tag).values()}
            yield tag, getattr(layer, coefficient).item(), scalars[tag], logged


def test_every_layer_has_alpha_and_beta_curves_with_the_hooks_values(run):
    trainer, scalars = run
    count = 0
    for tag, final, events, logged in curves(trainer, scalars):
        assert sorted(logged) == [1, 3], tag  # the hook: every 2 iterations
        steps = [e.step for e in events]
        assert steps == sorted(set(steps)) and set(steps) <= set(logged), (tag, steps)
        for e in events:
            assert e.value == pytest.approx(logged[e.step], rel=1e-6, abs=1e-12), tag
        assert steps[-1] == trainer.max_iter - 1, tag
        assert events[-1].value == pytest.approx(final, rel=1e-6, abs=1e-12), tag
        count += 1
    assert count == 2 * len(en_layers(trainer.model)) > 0
    assert "total_loss" in scalars  # the usual curves are there too


def test_tensorboard_has_every_point_the_hook_logged(run):
    trainer, scalars = run
    for tag, _, events, logged in curves(trainer, scalars):
        assert [e.step for e in events] == sorted(logged), tag

"""The public surface: names, isinstance compatibility, get_norm, and the detectron2 message."""

import ast
import subprocess
import sys
import textwrap

import pytest
from detectron2.layers import FrozenBatchNorm2d
from fvcore.nn.precise_bn import get_bn_modules
from helpers import ROOT
from torch import nn

import evalnorm_det
from evalnorm_det import EvalNorm2d
from evalnorm_det.layers import get_norm


def test_public_names():
    for name in (
        "EvalNorm2d",
        "OnlineEstimator",
        "convert_to_evalnorm",
        "convert_to_batchnorm",
        "evalnorm_mode",
    ):
        assert hasattr(evalnorm_det, name), name
    assert evalnorm_det.get_norm is get_norm


def test_is_a_batchnorm_for_torch_and_fvcore():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), EvalNorm2d(4)).train()
    assert isinstance(model[1], nn.BatchNorm2d)
    assert get_bn_modules(model) == [model[1]]  # PreciseBN would recompute its statistics


def test_get_norm():
    en = get_norm("EN", 8, norm_batch_size=2)
    assert (
        type(en) is EvalNorm2d
        and not en.frozen
        and en.num_features == 8
        and en.norm_batch_size == 2
    )
    assert get_norm("FrozenEN", 8).frozen
    assert type(get_norm("BN", 8)) is nn.BatchNorm2d
    assert type(get_norm("FrozenBN", 8)) is FrozenBatchNorm2d
    assert isinstance(get_norm("SyncBN", 8), nn.SyncBatchNorm)
    assert isinstance(get_norm("GN", 64), nn.GroupNorm)
    assert get_norm("", 8) is None and get_norm(None, 8) is None
    assert get_norm(lambda c: EvalNorm2d(c, microbatch=True, norm_batch_size=2), 8).microbatch
    with pytest.raises(ValueError, match="Unknown norm 'ENN'"):
        get_norm("ENN", 8)


def test_missing_detectron2_says_how_to_install():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["detectron2"] = None  # as if it were not installed
        try:
            import evalnorm_det
        except ImportError as e:
            print(e)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert (
        "needs detectron2" in out and "make setup" in out and "facebookresearch/detectron2" in out
    )


@pytest.mark.parametrize(
    "target", ["setup", "test", "test-fast", "lint", "demo", "rescue-demo", "gpu-check", "clean"]
)
def test_make_targets_parse(target):
    # `make -n` prints the recipe without running it: a broken Makefile fails here, not in CI.
    root = ROOT
    done = subprocess.run(
        ["make", "-n", "-C", str(root), target], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


def imported_modules(path):
    """Absolute names of what the module at ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = node.module or ""
            names.add(f"{base}.{module}".strip(".") if node.level else module)
    return names


@pytest.mark.parametrize(
    "layer, forbidden",
    [
        ("evalnorm", ("evalnorm_det", "detectron2", "fvcore", "benchmarks", "tools")),
        ("evalnorm_det", ("benchmarks", "tools")),
        ("evalnorm_det/utils", ("evalnorm_det.engine", "evalnorm_det.modeling")),
    ],
)
def test_imports_point_down(layer, forbidden):
    for path in sorted((ROOT / layer).rglob("*.py")):
        for name in imported_modules(path):
            assert not name.startswith(forbidden), f"{path.relative_to(ROOT)} imports {name}"

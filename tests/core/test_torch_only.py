"""The torch-only core: the wheel asks for torch alone, and package ``evalnorm`` (the README's
plain-PyTorch example included) works in a process that cannot import detectron2."""

import re
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest
from helpers import ROOT

pytestmark = pytest.mark.slow  # builds and installs a wheel: about 30 s

MARKER = "<!-- plain-pytorch-example"

# Every import the detectron2 plugin needs besides torch and torchvision, refused.
BLOCKER = textwrap.dedent(
    """
    import sys

    BLOCKED = ("detectron2", "fvcore", "pycocotools", "cv2", "sklearn", "matplotlib", "iopath")
    for name in BLOCKED:
        sys.modules[name] = None  # as if not installed: importing it raises ImportError
    """
)

CHECKS = textwrap.dedent(
    """
    import evalnorm, torchvision
    assert evalnorm.__file__.startswith(SITE), evalnorm.__file__
    assert all(sys.modules[name] is None for name in BLOCKED)
    assert torch.isfinite(scores).all() and not torch.equal(scores, baseline)
    from evalnorm import EvalNorm2d, convert_to_batchnorm
    assert sum(isinstance(m, EvalNorm2d) for m in model.modules()) == 20

    # torchvision's FrozenBatchNorm2d converts to a frozen EvalNorm2d and back.
    frozen = torchvision.models.resnet18(norm_layer=torchvision.ops.FrozenBatchNorm2d).eval()
    with torch.no_grad():
        reference = frozen(images)
        converted = convert_to_evalnorm(frozen, norm_batch_size=2)
        assert all(m.frozen for m in converted.modules() if isinstance(m, EvalNorm2d))
        with evalnorm_mode(converted, "ema"):
            assert torch.equal(converted(images), reference)
        back = convert_to_batchnorm(converted, strict=False)
        assert type(back.bn1) is torchvision.ops.FrozenBatchNorm2d
        assert torch.equal(back(images), reference)

    try:
        import evalnorm_det
    except ImportError as e:
        assert "needs detectron2" in str(e) and "from evalnorm import" in str(e), e
    else:
        raise AssertionError("evalnorm_det imported without detectron2")
    print("torch-only OK")
    """
)


def readme_example():
    """The python block that follows the README's plain-PyTorch marker."""
    text = (ROOT / "README.md").read_text()
    assert MARKER in text, f"README.md has no {MARKER!r} block"
    block = re.search(r"```python\n(.*?)```", text[text.index(MARKER) :], re.DOTALL)
    return block.group(1)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # Built from a copy of what the wheel ships, so that setuptools' build/ and egg-info
    # neither land in the checkout nor carry stale files into the wheel.
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("evalnorm", "evalnorm_det"):
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["-w", str(out), str(source)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("evalnorm_det-*.whl")
    return path


def test_wheel_requires_torch_alone(wheel):
    with zipfile.ZipFile(wheel) as z:
        (metadata,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        requires = [
            line.split(":", 1)[1].strip()
            for line in z.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist:")
        ]
        packages = {n.split("/")[0] for n in z.namelist() if n.endswith(".py")}
    assert [r for r in requires if "extra ==" not in r] == ["torch>=2.1"]
    assert packages == {"evalnorm", "evalnorm_det"}


def test_readme_example_runs_without_detectron2(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site)]
        + [str(wheel)],
        check=True,
        capture_output=True,
    )
    script = f"SITE = {str(site)!r}\n" + BLOCKER + readme_example() + CHECKS
    done = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        cwd=tmp_path,  # not the checkout: the installed wheel is what runs
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch-only OK" in done.stdout

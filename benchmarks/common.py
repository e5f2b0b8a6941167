"""What the benchmarks share: where they were measured, how their results are written, and
torch's thread count while they run."""

import contextlib
import json
import os
import platform
import shutil
from pathlib import Path

import torch

from evalnorm_det.utils.atomic import atomic_write

__all__ = [
    "machine",
    "prepare_output_dir",
    "resumable_output_dir",
    "torch_threads",
    "write_cell",
    "write_results",
]

RESULTS = ("results.json", "results.md")


def machine(device="cpu"):
    """The machine and software a measurement was taken with, as a JSON-able dict: platform,
    CPU, cores available, load average, threads, versions, device."""
    import detectron2
    import torchvision

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else None,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "detectron2": detectron2.__version__,
    }
    if str(device).startswith("cuda"):
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = f"CPU ({cpu}, {torch.get_num_threads()} threads)"
    return info


def prepare_output_dir(path, overwrite, outputs=RESULTS):
    """Create ``path`` for a benchmark that writes ``outputs`` (file or folder names) there.
    Before anything is measured, refuse (FileExistsError naming the first one) to replace
    earlier outputs unless ``overwrite``; with it, remove them, so no stale file survives."""
    path = Path(path)
    existing = [path / name for name in outputs if (path / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{existing[0]} exists: pass --overwrite to replace it, or choose another --output-dir"
        )
    for target in existing:
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    path.mkdir(parents=True, exist_ok=True)


def resumable_output_dir(path, settings, overwrite, outputs):
    """Create ``path`` for a benchmark that resumes: what it measures depends on ``settings``
    (a JSON-able dict), stored in ``path``/settings.json. A folder holding other settings is
    refused before anything is measured (FileExistsError naming the keys that differ) unless
    ``overwrite``, which first removes ``outputs`` (file or folder names in ``path``); with the
    same settings, everything there is kept for the run to resume from."""
    path = Path(path)
    settings = json.loads(json.dumps(settings))  # as it reads back: tuples become lists
    stored = path / "settings.json"
    if stored.exists() and not overwrite:
        earlier = json.loads(stored.read_text())
        if earlier != settings:
            differing = ", ".join(_differing(earlier, settings))
            raise FileExistsError(
                f"{path} holds results of other settings (differing: {differing}): pass "
                "--overwrite to discard them, or choose another --output-dir"
            )
    if overwrite:
        for target in (path / name for name in (*outputs, "settings.json")):
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    path.mkdir(parents=True, exist_ok=True)
    stored.write_text(json.dumps(settings, indent=1))
    return path


def _differing(a, b, prefix=""):
    """The keys (dotted for nested dicts) whose values differ between dicts ``a`` and ``b``."""
    keys = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            keys += _differing(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            keys.append(prefix + k)
    return keys


def write_results(path, results, table):
    """``results.json`` (every measured number, settings, machine) and ``results.md`` (the
    tables) in ``path``."""
    with open(os.path.join(path, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(path, "results.md"), "w") as f:
        f.write(table)


@contextlib.contextmanager
def torch_threads(threads):
    """Within the block, torch runs on ``threads`` CPU threads (None or 0: unchanged); the count
    it had before is restored on exit, however the block ends."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads:
            torch.set_num_threads(before)


def write_cell(path, cell):
    """Write one cell's JSON to ``path`` atomically: a cell is there whole or not at all."""
    with atomic_write(path, "w") as f:
        json.dump(cell, f, indent=1)

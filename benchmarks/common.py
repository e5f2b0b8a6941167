"""What the benchmarks share: where they were measured, and how their results are written."""

import json
import os
import platform

import torch

__all__ = ["machine", "prepare_output_dir", "write_results"]

RESULTS = ("results.json", "results.md")


def machine(device="cpu"):
    """The machine and software a measurement was taken with, as a JSON-able dict."""
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
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "detectron2": detectron2.__version__,
        "device": device,
    }
    if str(device).startswith("cuda"):
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = f"CPU ({cpu}, {torch.get_num_threads()} threads)"
    return info


def prepare_output_dir(path, overwrite):
    """Create ``path``; refuse (FileExistsError naming the file) to replace earlier results
    unless ``overwrite``, before anything is measured."""
    existing = [name for name in RESULTS if os.path.exists(os.path.join(path, name))]
    if existing and not overwrite:
        raise FileExistsError(
            f"{os.path.join(path, existing[0])} exists: pass --overwrite to replace it, or "
            "choose another --output-dir"
        )
    os.makedirs(path, exist_ok=True)


def write_results(path, results, table):
    """``results.json`` (every measured number, settings, machine) and ``results.md`` (the
    tables) in ``path``."""
    with open(os.path.join(path, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(path, "results.md"), "w") as f:
        f.write(table)

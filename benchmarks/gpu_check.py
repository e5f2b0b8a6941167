"""The GPU check: everything that needs CUDA, in one command, on a machine with a GPU.

1. The CUDA tests (``pytest -m cuda``): the layer against float64 references and
   ``torch.nn.BatchNorm2d`` on CUDA, and training under float16 autocast. A CUDA test that is
   skipped here counts as failed.
2. ``python -m benchmarks.overhead --device cuda``, in float32 and under float16 autocast:
   training step, peak memory and inference, BN against EN, side by side.
3. ``--iters`` iterations (default 50) of the demo config with ``SOLVER.AMP.ENABLED`` on CUDA,
   then its evaluation: every logged loss and every tensor of the final checkpoint must be
   finite, and the evaluation must report an AP for each row (NaN is detectron2's AP of a
   model with no detections yet, which 50 iterations from scratch can be).

    make gpu-check                               # or: python -m benchmarks.gpu_check
    python -m benchmarks.gpu_check --overhead-preset quick --output-dir /tmp/gpu_check

(from the repository root). Writes each step's log, ``results.json`` and ``results.md`` to ``--output-dir``. Exits 0 when
every step passed, 1 when one failed, 2 without CUDA (nothing is run).
"""

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from .common import machine, write_results
from .stats import markdown_table

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = "demo/evalnorm_digits_2img.yaml"
# Seconds each step may take; together well under 8 minutes on an H100/H200.
TIMEOUTS = {"tests": 180, "overhead": 120, "training": 180}


def run_step(name, command, output_dir, timeout):
    """Run ``command`` from the project root, its output in ``<output_dir>/<name>.log``.
    Returns (return code or None on timeout, seconds)."""
    start = time.time()
    with open(output_dir / f"{name}.log", "w") as log:
        print(f"[gpu-check] {name}: {' '.join(command)}", flush=True)
        try:
            rc = subprocess.run(
                command,
                check=False,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            ).returncode
        except subprocess.TimeoutExpired:
            rc = None
            log.write(f"\n[gpu-check] stopped after {timeout} s\n")
    return rc, time.time() - start


def junit_counts(junit_xml):
    """{tests, failures, errors, skipped} of a pytest JUnit XML report."""
    suite = ET.parse(junit_xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def check_tests(output_dir, timeout):
    report = output_dir / "tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider"]
    rc, seconds = run_step("tests", command + [f"--junitxml={report}"], output_dir, timeout)
    counts = junit_counts(report) if report.is_file() else {}
    passed = rc == 0 and counts.get("tests", 0) > 0 and counts.get("skipped", 1) == 0
    return {"passed": passed, "seconds": seconds, "counts": counts}


def check_overhead(output_dir, preset, amp, timeout):
    out = output_dir / f"overhead_{amp}"
    command = [sys.executable, "-m", "benchmarks.overhead", "--device", "cuda", "--preset", preset]
    command += ["--amp", amp, "--output-dir", str(out), "--overwrite"]
    rc, seconds = run_step(f"overhead_{amp}", command, output_dir, timeout)
    results = out / "results.json"
    if rc != 0 or not results.is_file():
        return {"passed": False, "seconds": seconds}
    saved = json.loads(results.read_text())
    return {
        "passed": True,
        "seconds": seconds,
        "ratios": saved["ratios"],
        "machine": saved["machine"],
    }


def nonfinite_losses(rows):
    """Names of losses that are not finite in rows of a detectron2 ``metrics.json``."""
    bad = {k for row in rows for k, v in row.items() if "loss" in k and not math.isfinite(v)}
    return sorted(bad)


def nonfinite_tensors(checkpoint):
    """Names of floating-point tensors of a saved checkpoint's model that are not finite."""
    model = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    return sorted(k for k, t in model.items() if t.is_floating_point() and not t.isfinite().all())


def check_training_output(train_dir):
    """Finite losses and checkpoint, and the APs, of a finished training run in ``train_dir``."""
    metrics, checkpoint = train_dir / "metrics.json", train_dir / "model_final.pth"
    if not (metrics.is_file() and checkpoint.is_file()):
        return {
            "passed": False,
            "missing": [str(p) for p in (metrics, checkpoint) if not p.exists()],
        }
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    bad = nonfinite_losses(rows) + nonfinite_tensors(checkpoint)
    losses = [row for row in rows if "total_loss" in row]
    aps = {k: v for row in rows for k, v in row.items() if k.split("/")[-1] == "AP"}
    return {
        "passed": not bad and bool(losses) and bool(aps),
        "nonfinite": bad,
        "iterations": losses[-1]["iteration"] + 1 if losses else 0,
        "final_total_loss": losses[-1]["total_loss"] if losses else None,
        "AP": aps,
    }


def check_training(output_dir, iters, timeout):
    train_dir = output_dir / "amp_training"
    shutil.rmtree(train_dir, ignore_errors=True)  # detectron2 appends to an old metrics.json
    command = [sys.executable, "tools/train_net.py", "--config", DEMO_CONFIG]
    command += ["SOLVER.AMP.ENABLED", "True", "MODEL.DEVICE", "cuda"]
    command += ["SOLVER.MAX_ITER", str(iters), "OUTPUT_DIR", str(train_dir)]
    rc, seconds = run_step("amp_training", command, output_dir, timeout)
    result = check_training_output(train_dir)
    result.update(passed=rc == 0 and result["passed"], seconds=seconds)
    return result


def markdown(results):
    machine = results["machine"]
    steps = [
        [name, "yes" if step["passed"] else "NO", f"{step['seconds']:.0f}"]
        for name, step in results["steps"].items()
    ]
    fp32, fp16 = (
        results["steps"].get(f"overhead_{a}", {}).get("ratios", {}) for a in ("none", "fp16")
    )
    overhead = [
        [key] + [f"{r[key]:.3f}" if key in r else "-" for r in (fp32, fp16)] for key in fp32 or fp16
    ]
    training = results["steps"]["amp_training"]
    lines = [
        f"GPU check on {machine['device']} (torch {machine['torch']}, CUDA {machine['cuda']}), "
        + f"{results['wall_seconds']:.0f} s in all.",
        "",
        markdown_table(["step", "passed", "seconds"], steps, "-"),
        "",
        markdown_table(["overhead, EN / BN", "float32", "float16 autocast"], overhead, "-"),
        "",
        f"AMP training: {training.get('iterations', 0)} iterations, last total loss "
        + f"{training.get('final_total_loss')}, non-finite: {training.get('nonfinite') or 'none'}.",
        "",
        markdown_table(
            ["evaluation", "AP"], [[k, f"{v:.2f}"] for k, v in training.get("AP", {}).items()], "-"
        ),
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="output/benchmarks/gpu_check")
    parser.add_argument("--overhead-preset", choices=("smoke", "quick", "full"), default="full")
    parser.add_argument("--iters", type=int, default=50, help="AMP training iterations (50)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            f"CUDA is not available (torch {torch.__version__}, built for CUDA "
            + f"{torch.version.cuda}): the GPU check needs a CUDA device. Nothing was run.",
            file=sys.stderr,
        )
        return 2
    output_dir = Path(args.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    steps = {"tests": check_tests(output_dir, TIMEOUTS["tests"])}
    for amp in ("none", "fp16"):
        steps[f"overhead_{amp}"] = check_overhead(
            output_dir, args.overhead_preset, amp, TIMEOUTS["overhead"]
        )
    steps["amp_training"] = check_training(output_dir, args.iters, TIMEOUTS["training"])
    results = {
        "machine": machine("cuda"),
        "settings": vars(args),
        "steps": steps,
        "wall_seconds": time.time() - start,
    }
    table = markdown(results)
    print(table)
    write_results(output_dir, results, table)
    return 0 if all(step["passed"] for step in steps.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The benchmarks of EvalNorm, each run from the repository root as ``python -m benchmarks.NAME``:

- ``microbatch``: classification at CIFAR's spatial scale, BN over microbatches of B samples
  evaluated with EMA, EN and its peers (package: model, cell, report, CLI);
- ``detection_regimes``: the paper's Table 2 in miniature, detection transfer regimes x 2/4/8
  images per GPU (package: settings, stand-in pre-training, cells, report, CLI);
- ``layer_gaps``: per layer, how far EN moves a detection_regimes cell from its EMA;
- ``overhead``: what EN costs against BN (time, memory, launches);
- ``gpu_check``: everything that needs CUDA, in one command.

Shared: ``common`` (machine description, output folders, resuming, results files, torch's
thread count) and ``stats`` (gaps recovered, means over seeds, intervals, markdown tables).
"""

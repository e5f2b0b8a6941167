"""The microbatch benchmark: BatchNorm over small normalization microbatches of a ResNet-20 v2
on 32x32 digit scenes, evaluated with EMA, EvalNorm and its peers (the paper's section 4.1 at
CIFAR's spatial scale). Run it as ``python -m benchmarks.microbatch`` (``__main__``, where the
protocol and the presets are described).

- ``model``: the pre-activation ResNet-20 with every BatchNorm an ``EvalNorm2d`` over
  microbatches of B samples;
- ``cell``: one run ("cell"): training one model for a seed and B, evaluating it every way;
  what worker processes run;
- ``report``: the summaries over seeds, the share of the EMA gap recovered, the tables, plots
  and results files;
- ``__main__``: the command line: presets, arguments, the planned cells, resuming, worker
  processes.
"""

"""The detection regimes benchmark: the paper's Table 2 in miniature, the detection transfer
regimes x {2, 4, 8} images per GPU on the bundled digits at 128 px, each model evaluated with
EMA, EN and peer rows. Run it as ``python -m benchmarks.detection_regimes`` (``__main__``, where
the protocol and the presets are described).

- ``settings``: the regimes, the cells of each preset and the settings their numbers depend on;
- ``standin``: the "ImageNet" stand-in, pre-trained by the benchmark and converted by
  ``tools/convert_imagenet_checkpoint.py``;
- ``cells``: the data, one cell's config, training and every evaluation row of its weights;
- ``report``: means over seeds, the tables, the headline (gap recovered), results files;
- ``__main__``: the command line: arguments, output and work folders, resuming, the run;
- ``diagnose``: the coefficient sweeps (``evalnorm.diagnosis``) of trained cells, on the
  selection split (``python -m benchmarks.detection_regimes.diagnose``).
"""

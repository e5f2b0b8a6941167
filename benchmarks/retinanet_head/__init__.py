"""The RetinaNet head benchmark: which norm its shared head can use at 2 images per GPU (BN
with shared or per-level statistics, GN, EvalNorm per level or shared), on the bundled digits
at the demo's scale. Run it as ``python -m benchmarks.retinanet_head`` (``__main__``, where
the protocol and the presets are described); ``report`` builds the table from the cells."""

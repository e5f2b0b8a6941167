# detectron2's `train` node; EvalNorm's trainer reads these keys (docs/CONFIG.md, LazyConfig).
train = {
    "output_dir": "./output",
    "init_checkpoint": "",  # MODEL.WEIGHTS
    "max_iter": 90000,
    "amp": {"enabled": False},
    "checkpointer": {"period": 20000},
    "eval_period": 0,  # 0: evaluate at the end only
    "log_period": 20,
    "device": "cuda",
    "seed": -1,
}

# EvalNorm's settings: the yacs keys MODEL.EVALNORM.* and TEST.EVALNORM_* with their defaults,
# same names under `evalnorm` (evalnorm.MODEL.EVALNORM.ONLINE.LR is MODEL.EVALNORM.ONLINE.LR).
# The model's norms read them by interpolation; tools/lazyconfig_train_net.py checks them as
# tools/train_net.py does and hands them to the online estimation and the evaluation table.
from evalnorm_det.lazy import evalnorm_defaults

evalnorm = evalnorm_defaults()

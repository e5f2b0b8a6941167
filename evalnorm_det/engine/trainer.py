"""``Trainer``: detectron2's ``DefaultTrainer`` with EvalNorm's hook, checks and evaluation."""

import functools
import itertools
import json
import logging
import os

from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    detection_utils,
)
from detectron2.data import transforms as T
from detectron2.engine import DefaultTrainer
from detectron2.engine.hooks import LRScheduler, PeriodicCheckpointer, PeriodicWriter
from detectron2.evaluation import COCOEvaluator, inference_on_dataset, print_csv_format
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from evalnorm import EvalNorm2d
from evalnorm.diagnosis import calibrate_coefficients

from ..config import check_evalnorm_config, configured_rows, norm_batch_sizes
from ..modeling import CycleEvalNormList, reset_norms
from ..utils.cpu import amp_on_cpu, ddp_on_cpu
from ..utils.d2_internals import (
    inner_trainer,
    insert_hook,
    set_inner_trainer,
    use_checkpointer,
    write_at_least_every,
)
from ..utils.nonfinite import NonFiniteCheckHook
from ..utils.preflight import naming_missing_data
from ..utils.resume import ResumeStateHook, resumable_train_loader
from .checkpoint import EvalNormCheckpointer
from .evaluation import evaluate_rows, format_table, table_tasks, write_tables
from .hooks import OnlineEstimationHook
from .rescue import estimate_offline_from_config, training_batches

__all__ = ["Trainer", "build_augmentation"]

logger = logging.getLogger(__name__)

# What NonFiniteCheckHook watches in every EvalNorm layer.
_CHECKED = ("weight", "bias", "running_mean", "running_var", "alpha_logit", "beta_logit")


def build_augmentation(cfg, is_train):
    """detectron2's augmentation, its resize replaced by a fixed ``INPUT.SQUARE_SIZE`` square
    (the paper's 600x600) when that is > 0."""
    augs = detection_utils.build_augmentation(cfg, is_train)
    if cfg.INPUT.SQUARE_SIZE > 0:
        assert isinstance(augs[0], T.ResizeShortestEdge), augs[0]
        augs[0] = T.Resize((cfg.INPUT.SQUARE_SIZE, cfg.INPUT.SQUARE_SIZE))
    return augs


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` for EvalNorm models.

    - estimates alpha/beta online with :class:`OnlineEstimationHook` when
      ``MODEL.EVALNORM.ONLINE.ENABLED`` and the model has EvalNorm layers (alpha/beta have
      ``requires_grad=False``, so ``build_optimizer`` leaves them out);
    - loads checkpoints with :class:`EvalNormCheckpointer` (no folded BN into EvalNorm);
    - regime (b): resets the norms after loading ``MODEL.WEIGHTS`` when
      ``MODEL.EVALNORM.RESET_NORM``;
    - ``--resume`` continues as if never interrupted (:class:`ResumeStateHook`): checkpoints
      hold every rank's torch/NumPy/Python random state and the sampler's seed, and the
      training sampler skips the images the checkpointed iterations used;
    - ``test`` evaluates every row of ``TEST.EVALNORM_ROWS`` with COCO AP (box, and mask when
      the model predicts masks) and writes the table to ``OUTPUT_DIR/evalnorm_table.{txt,csv,md}`` and ``evalnorm_results.json``.
    """

    def __init__(self, cfg):
        check_evalnorm_config(cfg)  # before anything is built
        with ddp_on_cpu():
            super().__init__(cfg)
        set_inner_trainer(self, amp_on_cpu(cfg, inner_trainer(self)))

    def build_hooks(self):
        use_checkpointer(self, EvalNormCheckpointer)  # before the PeriodicCheckpointer takes it
        hooks = super().build_hooks()
        # Just before the checkpointer (rank 0 only has one): every rank gathers its random state.
        insert_hook(hooks, ResumeStateHook(), before=PeriodicCheckpointer)
        model = self.checkpointer.model  # not DDP-wrapped: layer names as in the checkpoints
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, EvalNorm2d)]
        online = self.cfg.MODEL.EVALNORM.ONLINE
        if online.ENABLED and layers:
            hook = OnlineEstimationHook(
                model,
                lr=online.LR,
                optimizer=online.OPTIMIZER,
                momentum=online.MOMENTUM,
                log_period=online.LOG_PERIOD,
                max_positions=online.MAX_POSITIONS or None,
                start_iter=online.START_ITER,
            )
            # After the model's step and the LR schedule's, before anything is saved or written.
            insert_hook(hooks, hook, after=LRScheduler)
            # The writers keep only each scalar's latest value: write at least as often as the
            # hook logs, so TensorBoard and metrics.json get every alpha/beta point.
            for h in hooks:
                if isinstance(h, PeriodicWriter):
                    write_at_least_every(h, online.LOG_PERIOD)
        if layers:
            # After the estimation step, before anything is saved: NaN stops with the layer name.
            # Training EvalNorm layers take a NaN into their running statistics in the very
            # forward that meets it, so the first layer found is where it appeared.
            # Per-level lists (RetinaNet's head) hold the shared affine of their EvalNorm2d.
            cycles = [(n, m) for n, m in model.named_modules() if isinstance(m, CycleEvalNormList)]
            nonfinite = NonFiniteCheckHook(layers + cycles, _CHECKED, kind="EvalNorm")
            insert_hook(hooks, nonfinite, before=PeriodicCheckpointer)
        return hooks

    def resume_or_load(self, resume=True):
        fresh_start = not (resume and self.checkpointer.has_checkpoint())
        reset = fresh_start and self.cfg.MODEL.EVALNORM.RESET_NORM
        self.checkpointer.require_statistics = not reset
        try:
            super().resume_or_load(resume=resume)
        finally:
            self.checkpointer.require_statistics = True
        if reset:
            count = reset_norms(self.model)
            logger.info("Regime (b): reset the affine and statistics of %d norm layers", count)

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's loader with the project's resizing, its sampler able to skip what a
        resumed run already used (``resumable_train_loader``)."""
        mapper = DatasetMapper(cfg, is_train=True, augmentations=build_augmentation(cfg, True))
        with naming_missing_data(cfg.DATASETS.TRAIN, "DATASETS.TRAIN"):
            return resumable_train_loader(cfg, mapper)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name, batch_size=1):
        """detectron2's test loader with the project's test-time resizing; ``batch_size``
        images per batch (detectron2 tests one at a time)."""
        mapper = DatasetMapper(cfg, is_train=False, augmentations=build_augmentation(cfg, False))
        with naming_missing_data((dataset_name,), "DATASETS.TEST"):
            return build_detection_test_loader(
                cfg, dataset_name, mapper=mapper, batch_size=batch_size
            )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """``{row: {dataset: results}}`` (``{row: results}`` for one test dataset) for every
        row of ``TEST.EVALNORM_ROWS``; prints and saves one table per dataset (see
        ``write_tables``). Rows that need training batches ("en_offline", "precise_bn") take
        them from ``build_train_loader``, B images per process."""
        if evaluators is not None:
            raise ValueError("Trainer.test builds one evaluator per row: pass evaluators=None")
        if isinstance(model, DistributedDataParallel):
            model = model.module
        images_per_gpu = norm_batch_sizes(cfg).images
        batches = []  # built at most once, and only if a mode needs them

        def train_batches():
            if not batches:
                batches.append(training_batches(cfg, cls.build_train_loader, images_per_gpu))
            return batches[0]

        kwargs = {
            "train_batches": train_batches,
            "estimate_offline": functools.partial(estimate_offline_from_config, cfg),
            "precise_bn_iters": cfg.TEST.PRECISE_BN.NUM_ITER,
            "calibrate": functools.partial(cls.calibrate, cfg),
        }
        results = {}
        for dataset_name in cfg.DATASETS.TEST:
            loader = cls.build_test_loader(cfg, dataset_name)
            evaluate = functools.partial(cls.evaluate_row, cfg, model, dataset_name, loader)
            per_row = evaluate_rows(model, configured_rows(cfg), evaluate, **kwargs)
            for row, res in per_row.items():
                results.setdefault(row, {})[dataset_name] = res
            if comm.is_main_process():
                what = " and mask" if "segm" in table_tasks(per_row) else ""
                title = (
                    f"{dataset_name}: COCO box{what} AP (%), {images_per_gpu} images per GPU in "
                    "training"
                )
                cls._save_table(cfg, dataset_name, title, per_row)
        if len(cfg.DATASETS.TEST) == 1:
            results = {row: r[cfg.DATASETS.TEST[0]] for row, r in results.items()}
        return results

    @classmethod
    def calibrate(cls, cfg, model):
        """``calibrate_coefficients`` of ``model`` by box AP on
        ``TEST.EVALNORM_CALIBRATION.DATASET`` over its ``FACTORS``; logs and returns its
        result (the factor applied and every factor's AP)."""
        dataset = cfg.TEST.EVALNORM_CALIBRATION.DATASET
        loader = cls.build_test_loader(cfg, dataset)
        settings = itertools.count()

        def box_ap(m):
            return cls.box_ap(cfg, m, dataset, loader, f"calibration_{next(settings)}")

        result = calibrate_coefficients(model, box_ap, cfg.TEST.EVALNORM_CALIBRATION.FACTORS)
        logger.info(
            "EN calibrated on %s: factor %g (box AP by factor: %s)",
            dataset,
            result["factor"],
            ", ".join(f"{f:g}: {ap:.2f}" for f, ap in result["scores"]),
        )
        return result

    @classmethod
    def box_ap(cls, cfg, model, dataset_name, loader, row):
        """COCO box AP of ``model`` on ``dataset_name`` (``evaluate_row``), the main process's
        number returned on every process, so that choices made from it agree across ranks."""
        results = cls.evaluate_row(cfg, model, dataset_name, loader, row)
        return comm.all_gather(results["bbox"]["AP"] if comm.is_main_process() else None)[0]

    @classmethod
    def evaluate_row(cls, cfg, model, dataset_name, loader, row):
        """COCO results of ``model`` (already evaluating as row ``row``) on ``dataset_name``."""
        folder = os.path.join(cfg.OUTPUT_DIR, "inference", row, dataset_name)
        res = inference_on_dataset(model, loader, cls.build_evaluator(cfg, dataset_name, folder))
        if comm.is_main_process():
            logger.info("%s, row %s:", dataset_name, row)
            print_csv_format(res)
        return res

    @staticmethod
    def _save_table(cfg, dataset_name, title, per_row):
        print(format_table(per_row, title), flush=True)
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        suffix = "" if len(cfg.DATASETS.TEST) == 1 else f"_{dataset_name}"
        prefix = os.path.join(cfg.OUTPUT_DIR, f"evalnorm_table{suffix}")
        write_tables(per_row, title, prefix)
        logger.info("EvalNorm table written to %s.{txt,csv,md}", prefix)
        with open(os.path.join(cfg.OUTPUT_DIR, f"evalnorm_results{suffix}.json"), "w") as f:
            json.dump(per_row, f, indent=2)

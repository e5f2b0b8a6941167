"""The estimation choices compared on a trained model, each chosen on a validation split and
measured on a test split kept apart from it (shared by the microbatch and detection benchmarks).

Rows, all scores on the test split (higher is better: top-1 accuracy or COCO AP):
  ema                    the running statistics (vanilla BatchNorm)
  en                     alpha/beta as the model holds them (estimated online in training)
  en_calibrated          ``en`` times the factor of ``FACTORS`` best on validation (0: EMA)
  en_eval_inputs         ``en``, then fitted offline on evaluation inputs
                         (``estimate_offline(..., inputs="evaluation")``)
  en_eval_inputs_calibrated   the same, times the factor best on validation
  fixed_selected         one alpha = beta for every layer, the value of ``VALUES`` best on
                         validation (Summers and Dinneen's inference example weighing)
  fixed_best_on_test     the best fixed value chosen on the test split itself: an upper bound
                         no method may claim, reported to show how much room there is
"""

import copy
import math

from evalnorm import evalnorm_mode
from evalnorm.diagnosis import (
    FACTORS,
    VALUES,
    calibrate_coefficients,
    coefficient_sweep,
    fixed_coefficients,
)

ROWS = (
    "ema",
    "en",
    "en_calibrated",
    "en_eval_inputs",
    "en_eval_inputs_calibrated",
    "fixed_selected",
    "fixed_best_on_test",
)
LABELS = {
    "ema": "EMA",
    "en": "EN online",
    "en_calibrated": "EN online, calibrated",
    "en_eval_inputs": "EN on evaluation inputs",
    "en_eval_inputs_calibrated": "EN on evaluation inputs, calibrated",
    "fixed_selected": "best fixed alpha = beta (validation)",
    "fixed_best_on_test": "best fixed alpha = beta on test (bound)",
}


def compare_estimations(
    model, validate, test, fit, values=VALUES, factors=FACTORS, groups=None, test_sweep=True
):
    """Score every row of ``ROWS`` on ``model`` (left unchanged; it works on copies).

    Args:
        validate, test: ``f(model) -> score`` on the validation and the test split, with the
            EvalNorm modes and coefficients the model holds (``coefficient_sweep``'s
            ``evaluate``).
        fit: ``fit(model)`` fits a copy's alpha/beta on evaluation inputs in place and returns
            ``estimate_offline``'s summary.
        groups: ``{label: module names}`` for the sweeps' one-stage rows (default: none).
        test_sweep: also sweep on the test split (for "fixed_best_on_test"); without it that
            row is None.

    Returns:
        dict: "test" {row: score}, "chosen" {"en_calibrated": factor,
        "en_eval_inputs_calibrated": factor, "fixed_selected": value}, "validation_sweep"
        (``coefficient_sweep`` rows of the model as given, without scalings), "calibrations"
        ({"en", "en_eval_inputs"}: [factor, validation score] each), "test_sweep" (every
        sweep on the test split; None without ``test_sweep``), "fit" (the summary).
    """
    groups = {} if groups is None else groups
    scores, chosen, calibrations = {}, {}, {}
    # The scalings are scored on validation by the calibrations below, not twice.
    validation_sweep = coefficient_sweep(model, validate, values, (), groups)
    on_validation = {(r["sweep"], r["setting"]): r["score"] for r in validation_sweep}
    with evalnorm_mode(model, "ema"):
        scores["ema"] = test(model)
    with evalnorm_mode(model, "en"):
        scores["en"] = test(model)
    # Ties go to the smaller value; a NaN score (no detection at all) ranks last.
    chosen["fixed_selected"] = max(values, key=lambda v: (_rank(on_validation["fixed", v]), -v))
    with fixed_coefficients(model, chosen["fixed_selected"]):
        scores["fixed_selected"] = test(model)
    for row, prepare in (("en", None), ("en_eval_inputs", fit)):
        candidate = copy.deepcopy(model)
        with evalnorm_mode(candidate, "en"):
            if prepare is not None:
                summary = prepare(candidate)
                scores[row] = test(candidate)
            calibration = calibrate_coefficients(candidate, validate, factors)
            calibrations[row] = calibration["scores"]
            chosen[f"{row}_calibrated"] = calibration["factor"]
            scores[f"{row}_calibrated"] = test(candidate)
    swept = coefficient_sweep(model, test, values, factors, groups) if test_sweep else None
    scores["fixed_best_on_test"] = (
        max(_rank(r["score"]) for r in swept if r["sweep"] == "fixed") if swept else None
    )
    return {
        "test": {row: scores[row] for row in ROWS},
        "chosen": chosen,
        "validation_sweep": validation_sweep,
        "calibrations": calibrations,
        "test_sweep": swept,
        "fit": summary,
    }


def _rank(score):
    return -math.inf if math.isnan(score) else score

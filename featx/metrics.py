"""Metrics the MSA and low-resource classification literature reports.

`msa_regression` follows the definitions of the MMSA framework (Yu et al.): MAE, Pearson correlation,
binary accuracy / weighted F1 with and without items whose true label is 0, and 5- / 7-class accuracy after
clipping to [-2, 2] / [-3, 3] and rounding.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, mean_absolute_error

__all__ = ["msa_regression", "classification", "compute", "PRIMARY", "higher_is_better", "chance",
           "chance_prediction"]

# The metric each task is selected on, and whether larger is better for every metric.
PRIMARY = {"regression": "mae", "classification": "f1_macro"}
_LOWER_IS_BETTER = {"mae", "mse", "rmse", "loss"}  # errors; every other metric is a score


def higher_is_better(metric: str) -> bool:
    return metric not in _LOWER_IS_BETTER


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    # NaN, not a warning, when either side is constant (e.g. the mean predictor).
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def msa_regression(y_true, y_pred) -> dict:
    """MSA regression metrics for sentiment scores in [-3, 3].

    y_true, y_pred: (N,) floats. Returns mae, corr (Pearson), acc2_has0 / f1_has0 (negative < 0 vs
    non-negative >= 0, all items), acc2_non0 / f1_non0 (items with y_true == 0 dropped, then > 0 vs <= 0 for
    both), acc5 / acc7 (both clipped to [-2, 2] / [-3, 3] and rounded). F1 is the weighted F1.
    """
    y_true = np.asarray(y_true, dtype=np.float64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.float64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    out = {"mae": float(mean_absolute_error(y_true, y_pred)), "corr": _pearson(y_pred, y_true)}
    t, p = y_true >= 0, y_pred >= 0
    out["acc2_has0"] = float(accuracy_score(t, p))
    out["f1_has0"] = float(f1_score(t, p, average="weighted", zero_division=0))
    keep = y_true != 0
    t, p = y_true[keep] > 0, y_pred[keep] > 0
    out["acc2_non0"] = float(accuracy_score(t, p)) if keep.any() else float("nan")
    out["f1_non0"] = float(f1_score(t, p, average="weighted", zero_division=0)) if keep.any() else float("nan")
    for name, bound in (("acc5", 2.0), ("acc7", 3.0)):
        # np.round rounds half to even, as MMSA's np.round does.
        out[name] = float(np.mean(np.round(np.clip(y_pred, -bound, bound)) ==
                                  np.round(np.clip(y_true, -bound, bound))))
    return out


def classification(y_true, y_pred) -> dict:
    """acc, balanced_acc, f1_macro, f1_weighted for (N,) label arrays of any hashable type."""
    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    return {"acc": float(accuracy_score(y_true, y_pred)),
            "balanced_acc": float(balanced_accuracy_score(y_true, y_pred)),
            "f1_macro": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
            "f1_weighted": float(f1_score(y_true, y_pred, average="weighted", zero_division=0))}


def compute(task: str, y_true, y_pred) -> dict:
    """The metric dict of `task` ("regression" or "classification")."""
    if task == "regression":
        return msa_regression(y_true, y_pred)
    if task == "classification":
        import warnings

        with warnings.catch_warnings():  # balanced_acc warns when a class is absent from a small test part
            warnings.simplefilter("ignore", UserWarning)
            return classification(y_true, y_pred)
    raise ValueError(f"unknown task {task!r}")


def chance_prediction(task: str, y_train, n: int) -> np.ndarray:
    """(n,) predictions of the trivial predictor fitted on y_train: the mean (regression) or the majority
    class (ties: the smallest)."""
    y_train = np.asarray(y_train)
    if task == "regression":
        return np.full(n, float(np.mean(y_train.astype(np.float64))))
    values, counts = np.unique(y_train, return_counts=True)
    # the labels' own dtype: an object array of floats is an "unknown" target to sklearn beside numeric labels
    return np.full(n, values[np.argmax(counts)], dtype=y_train.dtype)


def chance(task: str, y_train, y_test) -> dict:
    """Metrics of the trivial predictor fitted on y_train: the mean (regression) or the majority class."""
    y_test = np.asarray(y_test, dtype=object) if task == "classification" else y_test
    return compute(task, y_test, chance_prediction(task, y_train, len(y_test)))


def selection_score(task, y_true, y_pred):
    """The task's primary metric signed so that larger is better (only that metric is computed: it runs
    once per layer x regularisation value)."""
    name = PRIMARY[task]
    if name == "mae":
        return -float(np.mean(np.abs(np.asarray(y_true, np.float64) - np.asarray(y_pred, np.float64))))
    if name == "f1_macro":
        from sklearn.metrics import f1_score

        return float(f1_score(y_true, y_pred, average="macro", zero_division=0))
    value = compute(task, y_true, y_pred)[name]
    return value if higher_is_better(name) else -value

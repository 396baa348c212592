"""Regression against targets: MAE and RMSE with bootstrap intervals."""
from __future__ import annotations

import math

import numpy as np

from edgeq.errors import DataError
from edgeq.evaluate.stats import Estimate, bootstrap_ci, contain, finite, mean_estimate


def regress(y: np.ndarray, labels: np.ndarray, failed: np.ndarray) -> dict[str, np.ndarray]:
    n = len(y)
    pred, target = y.reshape(n, -1).astype(np.float64), labels.reshape(n, -1).astype(np.float64)
    if pred.shape != target.shape:
        raise DataError(f"the labels hold {target.shape[1]} value(s) per sample but the model output holds {pred.shape[1]}",
                        "give class ids (integers) for a classifier, or one target per output value for regression")
    err = pred - target
    bad = failed | ~np.isfinite(target).all(axis=1)
    return {"abs_error": np.where(bad, np.nan, np.abs(err).mean(axis=1)),
            "sq_error": np.where(bad, np.nan, (err ** 2).mean(axis=1))}


def regress_metrics(cols: dict[str, np.ndarray]) -> dict[str, Estimate]:
    sq = finite(cols["sq_error"])
    rmse = Estimate(math.sqrt(sq.mean()) if len(sq) else math.nan, bootstrap_ci(lambda s: np.sqrt(s.mean(axis=1)), sq))
    return {"mae": mean_estimate(cols["abs_error"]), "rmse": contain(rmse)}

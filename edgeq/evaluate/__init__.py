"""Validate a model on data (a metric with a 95% interval, per sample) and compare two validations (paired).

A validation streams the data once through ONNX Runtime and keeps one number per sample per metric, so a comparison
can pair the two models sample by sample: the paired interval of a drop is far narrower than the two intervals side
by side, because both models find the same samples hard.

>>> import edgeq
>>> val = edgeq.Dataset.from_npz("val.npz")                                    # doctest: +SKIP
>>> base, cand = validate("model.onnx", val), validate("model_int8.onnx", val)  # doctest: +SKIP
>>> compare(base, cand).verdict                                                 # doctest: +SKIP
'ship'
"""
from edgeq.evaluate.comparison import Comparison, compare, read_validation
from edgeq.evaluate.metrics import METRICS, MetricInfo
from edgeq.evaluate.record import ValidationRecord
from edgeq.evaluate.render import print_comparison, print_validation
from edgeq.evaluate.stats import Estimate, bootstrap_ci, mean_estimate, proportion, sqnr_estimate
from edgeq.evaluate.tasks.lm import window_nll
from edgeq.evaluate.validation import validate

__all__ = ["METRICS", "Comparison", "Estimate", "MetricInfo", "ValidationRecord", "bootstrap_ci", "compare",
           "mean_estimate", "print_comparison", "print_validation", "proportion", "read_validation", "sqnr_estimate",
           "validate", "window_nll"]

"""The automatic mode: meet an accuracy budget by itself, and explain every step.

INT8 static with the calibration method whose outputs stay closest to FP32 on calibration samples (no validation
run is spent on that choice; `select="validation"` spends one per method); if its drop exceeds the budget, layers
ranked by sensitivity go back to float — the fewest that meet the budget (at most `max_float_layers`), found by a
guess from the sensitivity analysis refined by bisection on the count (a handful of evaluations, never one per
combination). The model found is then refined: each calibration method, with and without cross-layer equalization,
then bias correction, scored by output fidelity on calibration samples; the best recipe costs one more evaluation,
and of candidates with the same layers in float (the same kernels) the more accurate is kept. When no INT8 or mixed
model meets the budget, quantization-aware training runs if the PyTorch model was given (`qat=QatSource(...)`), and
FP16 is evaluated if nothing meets after that; otherwise the verdict gives the QAT command to run. Every candidate is
evaluated through an executor (a local process pool by default); every candidate's latency is measured and the
fastest one that meets the budget wins, FP32 and FP16 included (both are evaluated first, before calibration): when
nothing beats FP32 the verdict says so and FP32 is the model written. Validation data without labels makes the metric
fidelity to the FP32 model (top-1 agreement, or cosine), stated in the report's `metric_note`.

By job: `run` (the whole run, in a staged output folder), `search` (the evaluations and the search steps, the
choice), `candidates` (`Recipe`, `Candidate`, evaluation in a worker, latency), `qat` (`QatSource`, QAT as a
candidate), `verdict` (verdict, report.json, the printed summary).

>>> result = edgeq.auto("model.onnx", calib="calib.npz", val="val.npz", budget=1.0, output="auto-out")   # doctest: +SKIP
>>> result["verdict"]["status"], result["evaluations"]                                                  # doctest: +SKIP
('met', 4)
"""
from __future__ import annotations

from edgeq.auto.candidates import Candidate, Recipe
from edgeq.auto.qat import QatSource
from edgeq.auto.run import METHODS, auto
from edgeq.auto.verdict import print_auto

__all__ = ["METHODS", "Candidate", "QatSource", "Recipe", "auto", "print_auto"]

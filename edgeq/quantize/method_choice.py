"""`--method auto`, the default: which observer's ranges to quantize with, judged by the quantized model's outputs.

Every method's QDQ model runs on held-back calibration batches (or, when too few could be held back, on the
calibration samples themselves); mse, the most robust single method, stays unless another method's output SQNR vs
FP32 beats it by `MARGIN_DB`. Measured (output SQNR in dB → the task metric, bench/ocr_rec.py, bench/detect.py,
bench/calibration.py):

- PP-OCRv4 rec: percentile 13.1 vs mse 9.7 → per-step agreement 97.2 % vs 93.1 %: percentile.
- PP-PicoDet: percentile 10.0 vs mse 7.5 → mAP@0.5 0.81 vs 0.70: percentile (box F1 vs FP32 at score > 0.25: 0.77).
- YOLOv8n: percentile 27.59 vs mse 27.52 → box F1 0.92 vs 0.98: a 0.07 dB lead is noise, mse stays.
- PP-OCRv4 det, 8 pages: mse 9.6 vs at most 5.4 (IoU 0.91), or percentile 9.8 vs mse 4.6 (IoU 0.85 vs 0.70), by seed.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from edgeq.calibrate import HOLDOUT_MAX, METHODS, Observed
from edgeq.data import Batch, Dataset, batches
from edgeq.model import Model
from edgeq.progress import track
from edgeq.quantize.config import Int8Static
from edgeq.runtimes import ONNX_RUNTIME
from edgeq.sqnr import sqnr_db

# A method other than mse must lead by this much output SQNR to be chosen (see the measurements above: real leads
# were 2.5–5.2 dB, the noise lead that lost box F1 0.07 dB).
MARGIN_DB = 1.0
BASELINE = "mse"


def choose_method(prepared: Model, calib: Dataset, config: Int8Static, seen: Observed,
                  build: Callable[[dict[str, tuple]], Model], first: list[Batch] | None = None
                  ) -> tuple[str, dict[str, float], str, Model | None]:
    """(chosen method, output SQNR per method, a note saying what the scores were measured on, the chosen method's
    scored QDQ model when none were held back, else None). `build` turns ranges into the QDQ model that would ship;
    `first`, the first HOLDOUT_MAX calibration samples when the caller kept them (else they are read again), are
    scored on when none were held back. With nothing held back the ranges that ship are the scored ones, so the
    scored model of the baseline and of the best method so far are kept (at most two: one of them is chosen)."""
    held, keep = seen.holdout, not seen.holdout
    note = f"--method auto: output fidelity measured on {sum(b.size for b in held)} held-back calibration samples"
    if not held:
        held = first if first is not None else list(batches(calib, prepared.inputs, config.batch_size, max_samples=HOLDOUT_MAX))
        note = (f"--method auto: the calibration data is too small to hold some back; output fidelity measured on "
                f"{sum(b.size for b in held)} calibration samples")
    reference = ONNX_RUNTIME.open_graph(prepared.proto, threads=0)
    names = [o.name for o in prepared.proto.graph.output]
    expected = [reference.run(names, b.inputs) for b in held]
    scores: dict[str, float] = {}
    kept: dict[str, Model] = {}
    for method in track(METHODS, "--method auto: scoring each method", total=len(METHODS)):
        ranges = seen.ranges(method, percentile=config.percentile, symmetric=config.activation_type == "int8")
        built = build(ranges)
        session = ONNX_RUNTIME.open_graph(built.proto, threads=0)
        scores[method] = round(output_sqnr(expected, [session.run(names, b.inputs) for b in held]), 2)
        if keep:
            rival = next((m for m in kept if m != BASELINE), None)   # the best other method so far (earlier wins ties)
            if method == BASELINE:
                kept[method] = built
            elif rival is None or scores[method] > scores[rival]:
                kept.pop(rival, None)
                kept[method] = built
    chosen = pick(scores)
    return chosen, scores, note, kept.get(chosen)


def pick(scores: dict[str, float]) -> str:
    """mse unless another method leads it by MARGIN_DB; among those that do, the best (the earlier on a tie).

    >>> pick({"minmax": 38.6, "percentile": 36.9, "entropy": 27.1, "mse": 38.1})
    'mse'
    >>> pick({"minmax": 11.1, "percentile": 13.1, "entropy": 1.6, "mse": 9.7})
    'percentile'
    """
    best = max(scores, key=lambda m: (scores[m], -METHODS.index(m)))
    if BASELINE in scores and scores[best] < scores[BASELINE] + MARGIN_DB:
        return BASELINE
    return best


def output_sqnr(expected: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> float:
    """Mean over float outputs of their SQNR, 10·log10(Σ ref² / Σ (ref − q)²) in dB (`edgeq.sqnr`)."""
    values = []
    for k in range(len(expected[0])):
        if expected[0][k].dtype.kind != "f":
            continue
        signal = sum(float(np.sum(np.square(e[k], dtype=np.float64))) for e in expected)
        noise = sum(float(np.sum(np.square(e[k].astype(np.float64) - g[k]))) for e, g in zip(expected, got))
        values.append(sqnr_db(signal, noise))
    return float(np.mean(values)) if values else 0.0

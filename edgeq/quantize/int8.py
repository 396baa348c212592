"""INT8 dynamic and static (QDQ) quantization. ONNX Runtime's quantizer is the graph-rewriting backend; what to
quantize, the preparation of the graph and the activation ranges are edgeq's."""
from __future__ import annotations

import time

import numpy as np
import onnx

from edgeq.calibrate import Calibration, check_method, observe, to_calibration
from edgeq.data import Dataset
from edgeq.errors import ConfigError, DataError
from edgeq.model import Model
from edgeq.quantize.config import Int8Dynamic, Int8Static
from edgeq.quantize.coverage import annotate, choose_for
from edgeq.quantize.detection_head import explain_head, protect_head
from edgeq.quantize.method_choice import MARGIN_DB, choose_method
from edgeq.quantize.prepare import PER_CHANNEL_OPSET, prepare
from edgeq.quantize.qdq import build_qdq, prepare_static, quantized_tensors, quiet_ort_logging
from edgeq.quantize.repair import correct_bias
from edgeq.quantize.repair.adaround import adaround, describe
from edgeq.quantize.subgraph_static import quantize_static_bodies
from edgeq.quantize.subgraphs import merge, quantize_bodies, toposort
from edgeq.quantize.summary import QuantSummary, summarize



def quantize_dynamic(model: Model, config: Int8Dynamic) -> tuple[Model, QuantSummary]:
    from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
    from onnxruntime.quantization.quant_utils import QuantizationMode, QuantType

    quiet_ort_logging()
    prepared, notes = prepare(model, per_channel=config.per_channel)
    quantizer = ONNXQuantizer(prepared.proto, config.per_channel, False, QuantizationMode.IntegerOps, False,
                              QuantType.QInt8, QuantType.QUInt8, None, [], list(config.exclude_nodes),
                              list(config.op_types), {"MatMulConstBOnly": True})
    quantizer.quantize_model()
    toposort(quantizer.model.model.graph)
    result = Model(quantizer.model.model, model.path)
    summary = summarize(prepared.proto, result.proto, config.op_types, notes, precision="int8", mode="dynamic")
    summary = merge(summary, quantize_bodies(prepared.proto, result.proto, lambda body, standalone: _dynamic_body(standalone, config)))
    if not summary.quantized:
        summary.warnings.append(f"dynamic INT8 found no {'/'.join(config.op_types)} nodes with constant weights: the model stays FP32; "
                                "use static INT8 (--mode static --calib DATA) for convolutional models")
    if "ConvInteger" in summary.quantized:
        summary.warnings.append(f"Conv was quantized dynamically (ConvInteger), which has no fast x86 kernel: {_measured_slowdown(prepared, result)}; "
                                "static INT8 (--mode static --calib DATA) is the fast path for convolutions")
    return result, summary


def _dynamic_body(standalone: onnx.ModelProto, config: Int8Dynamic) -> tuple[onnx.ModelProto, QuantSummary]:
    """A subgraph quantized as a model of its own; the whole-model warnings are the enclosing model's to give."""
    body, summary = quantize_dynamic(Model(standalone, None), config)
    summary.warnings = [w for w in summary.warnings if not w.startswith(("dynamic INT8 found no", "Conv was quantized dynamically"))]
    return body.proto, summary


def _measured_slowdown(before: Model, after: Model, runs: int = 10) -> str:
    """Median latency of both models on the same random batch of one, at 1 thread: the ratio users must see."""
    from edgeq.timing import BatchShape, median_ms, random_feed
    from edgeq.errors import UserError

    try:
        feed = random_feed(before.inputs, BatchShape(batch=1))
    except UserError:
        return "not measured here (dynamic input dims); `edgeq bench --shape ...` measures the ratio"
    fp32, dynamic = (median_ms(model.proto, feed, runs) for model in (before, after))
    return f"measured {dynamic / fp32:.1f}× the FP32 latency ({dynamic:.2f} ms vs {fp32:.2f} ms, batch 1, 1 thread)"


def quantize_static(model: Model, config: Int8Static, calib: Dataset) -> tuple[Model, QuantSummary, Calibration]:
    if calib is None:
        raise DataError("static INT8 needs calibration data", "pass --calib DATA (a few hundred representative samples)")
    quiet_ort_logging()
    prepared, notes = prepare_static(model, config)
    config, head = protect_head(prepared.proto, config)  # a detector's box decoding and mixed outputs stay float
    per_channel = config.per_channel and prepared.opset >= PER_CHANNEL_OPSET
    if config.method != "auto":
        check_method(config.method, config.percentile)
    repairs = _float_repairs(prepared, config, calib, per_channel)
    symmetric = config.activation_type == "int8"
    auto = config.method == "auto"
    started = time.perf_counter()
    # Measured coverage may keep any node float, and a Reshape after a float node then needs a range of its own:
    # observe every tensor then (PP-OCRv4 rec crashed with "Quantization parameters are not specified"), only what
    # the quantizer reads otherwise.
    wanted = quantized_tensors(prepared.proto, config.op_types, tuple(config.exclude_nodes)) if config.coverage == "all" else None
    seen = observe(prepared, calib, wanted, histogram=config.method != "minmax",
                   batch_size=config.batch_size,
                   max_samples=config.max_samples, holdout=auto)

    def qdq(ranges: dict[str, tuple], float_nodes: tuple[str, ...] = ()) -> Model:
        return build_qdq(prepared, config, ranges, exclude=float_nodes)

    method, scores, held_samples = config.method, None, sum(b.size for b in seen.holdout)
    if auto:
        method, scores, held_note = choose_method(prepared, calib, config, seen, qdq)
        notes.append(held_note)
        seen.include_holdout()
    cal = to_calibration(seen, method, percentile=config.percentile, symmetric=symmetric)
    calibration_seconds = time.perf_counter() - started
    result = qdq(cal.ranges)
    if config.coverage == "measured":  # which nodes stay float for speed, by measured kernel time (quantize/coverage.py)
        result, coverage = choose_for(prepared, calib, config, lambda float_nodes: qdq(cal.ranges, float_nodes))
    if config.rounding == "adaround":
        repairs["adaround"] = adaround(prepared, result, calib, batch_size=config.batch_size, max_samples=min(config.max_samples or 512, 512))
    if config.bias_correction:
        repairs["bias_correction"] = correct_bias(prepared, result, calib, batch_size=config.batch_size,
                                                  max_samples=min(config.max_samples or 512, 512))
    summary = merge(summarize(prepared.proto, result.proto, config.op_types, notes, precision="int8", mode="static"),
                    quantize_static_bodies(prepared, result, config, calib, method))
    summary.calibration = {"method": method, "samples": cal.samples, "seconds": round(calibration_seconds, 3),
                           "percentile": config.percentile if method == "percentile" else None}
    if auto:
        summary.calibration.update(requested="auto", chosen=method, output_sqnr_db=scores,
                                   holdout_samples=held_samples or None)
        summary.notes.append(f"--method auto chose {method} (mse unless another leads by {MARGIN_DB:g} dB): output SQNR vs FP32 "
                             + ", ".join(f"{m} {v:.1f} dB" for m, v in scores.items()))
    if repairs:
        summary.calibration["repairs"] = repairs
        summary.notes.extend(_repair_notes(repairs))
    summary.warnings.extend(cal.warnings)
    if config.coverage == "measured":
        annotate(summary, coverage)
    if head is not None:
        explain_head(summary, head)
    return result, summary, cal


def _float_repairs(prepared: Model, config: Int8Static, calib: Dataset, per_channel: bool) -> dict:
    """Repairs on the FP32 graph before calibration (each leaves FP32 outputs unchanged, or only clips weights to
    the range the quantizer would use): equalization, SmoothQuant, weight range setting. In place."""
    from edgeq.quantize.repair import clip_weights, equalize

    done: dict = {}
    if config.equalize:
        done["equalize_pairs"] = equalize(prepared.proto)
    if config.smoothquant is not None:
        done["smoothquant"] = _smoothquant(prepared, calib, config, per_channel)
    if config.weight_range == "mse":
        qmax = 7 if config.weight_bits == 4 else 127
        done["weight_range"] = {"method": "mse", "weights_clipped": clip_weights(prepared.proto, tuple(config.op_types), per_channel=per_channel,
                                                                                 exclude=tuple(config.exclude_nodes), qmax=qmax)}
    return done


def _smoothquant(prepared: Model, calib: Dataset, config: Int8Static, per_channel: bool) -> dict:
    """SmoothQuant in place with one alpha, or ("auto") the alpha per activation that minimises its group's
    simulated INT8 output error on a sample of calibration rows."""
    from edgeq.quantize.repair.smoothquant import choose_alphas, sample_rows, smooth, smoothable

    alpha = config.smoothquant
    groups = list(smoothable(prepared.proto, tuple(config.exclude_nodes)))
    if not groups:
        return {"alpha": alpha, "activations": 0}
    seen = observe(prepared, calib, groups, histogram=False, channel_axis=-1, batch_size=config.batch_size,
                   max_samples=config.max_samples)
    ranges = seen.ranges("minmax")
    absmax = {name: np.maximum(np.abs(lo), np.abs(hi)) for name, (lo, hi) in ranges.items()}
    if alpha == "auto":
        rows = sample_rows(prepared, calib, groups, batch_size=config.batch_size, max_samples=config.max_samples)
        alpha = choose_alphas(prepared.proto, rows, ranges, symmetric_activations=config.activation_type == "int8",
                              per_channel=per_channel)
        return {"alpha": "auto", "alphas": alpha, "activations": smooth(prepared.proto, absmax, alpha)}
    return {"alpha": alpha, "activations": smooth(prepared.proto, absmax, alpha)}


def _repair_notes(repairs: dict) -> list[str]:
    notes = []
    if "equalize_pairs" in repairs:
        notes.append(f"cross-layer equalization rescaled {repairs['equalize_pairs']} layer pairs (FP32 outputs unchanged)")
    if "smoothquant" in repairs:
        sq = repairs["smoothquant"]
        how = (f"alpha per activation, {min(sq['alphas'].values()):.1f}–{max(sq['alphas'].values()):.1f}"
               if sq["alpha"] == "auto" and sq["alphas"] else f"alpha {sq['alpha']}")
        notes.append(f"SmoothQuant ({how}) moved activation outliers into the weights of {sq['activations']} MatMul/Gemm inputs")
    if "weight_range" in repairs:
        notes.append(f"weight range setting (mse) clipped {repairs['weight_range']['weights_clipped']} weights to their error-minimising range")
    if "adaround" in repairs:
        notes.append(describe(repairs["adaround"]))
    if "bias_correction" in repairs:
        notes.append(f"bias correction shifted the biases of {repairs['bias_correction']} layers by their mean output error on calibration data")
    return notes

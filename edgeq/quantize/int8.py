"""INT8 dynamic and static (QDQ) quantization. ONNX Runtime's quantizer is the graph-rewriting backend; what to
quantize, the preparation of the graph and the activation ranges are edgeq's."""
from __future__ import annotations

import onnx

from edgeq.calibrate import Calibration, check_method
from edgeq.data import Dataset
from edgeq.errors import DataError
from edgeq.graph import toposort
from edgeq.model import Model
from edgeq.quantize.config import Int8Dynamic, Int8Static
from edgeq.quantize.coverage import annotate
from edgeq.quantize.detection_head import explain_head, protect_head
from edgeq.quantize.method_choice import MARGIN_DB, output_sqnr
from edgeq.quantize.passes import static_passes
from edgeq.quantize.pipeline import StaticState, run_passes
from edgeq.quantize.prepare import PER_CHANNEL_OPSET, prepare
from edgeq.quantize.qdq import prepare_static, quiet_ort_logging
from edgeq.quantize.repair.adaround import describe
from edgeq.quantize.subgraph_static import quantize_static_bodies
from edgeq.quantize.subgraphs import merge, quantize_bodies
from edgeq.quantize.summary import QuantSummary, summarize

__all__ = ["output_sqnr", "quantize_dynamic", "quantize_static"]


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
    """Static INT8: the recipe's passes (`passes.static_passes`: float repairs, ranges, QDQ build, measured coverage,
    AdaRound, bias correction) over the prepared graph (`pipeline.run_passes`), then If branches and the summary."""
    if calib is None:
        raise DataError("static INT8 needs calibration data", "pass --calib DATA (a few hundred representative samples)")
    quiet_ort_logging()
    prepared, notes = prepare_static(model, config)
    config, head = protect_head(prepared.proto, config)  # a detector's box decoding and mixed outputs stay float
    if config.method != "auto":
        check_method(config.method, config.percentile)
    state = run_passes(static_passes(config), StaticState(prepared, config, calib, config.per_channel and prepared.opset >= PER_CHANNEL_OPSET, notes))
    result, cal, method = state.result, state.calibration, state.method
    summary = merge(summarize(prepared.proto, result.proto, config.op_types, notes, precision="int8", mode="static"),
                    quantize_static_bodies(prepared, result, config, calib, method))
    summary.calibration = {"method": method, "samples": cal.samples, "seconds": round(state.calibration_seconds, 3),
                           "percentile": config.percentile if method == "percentile" else None}
    if config.method == "auto":
        summary.calibration.update(requested="auto", chosen=method, output_sqnr_db=state.scores,
                                   holdout_samples=state.held_samples or None)
        summary.notes.append(f"--method auto chose {method} (mse unless another leads by {MARGIN_DB:g} dB): output SQNR vs FP32 "
                             + ", ".join(f"{m} {v:.1f} dB" for m, v in state.scores.items()))
    if state.repairs:
        summary.calibration["repairs"] = state.repairs
        summary.notes.extend(_repair_notes(state.repairs))
    summary.warnings.extend(cal.warnings)
    if config.coverage == "measured":
        annotate(summary, state.coverage)
    if head is not None:
        explain_head(summary, head)
    return result, summary, cal


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

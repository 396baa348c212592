"""INT8 dynamic and static (QDQ) quantization. ONNX Runtime's quantizer is the graph-rewriting backend; what to
quantize, the preparation of the graph and the activation ranges are edgeq's."""
from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx

from edgeq.calibrate import Calibration, calibrate
from edgeq.data import Dataset
from edgeq.errors import ConfigError, DataError
from edgeq.model import Model
from edgeq.quantize.config import Int8Dynamic, Int8Static
from edgeq.quantize.prepare import PER_CHANNEL_OPSET, prepare
from edgeq.quantize.summary import QuantSummary, summarize

ACTIVATION_TYPES = ("uint8", "int8")


def _quiet_ort_logging() -> None:
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))


def quantize_dynamic(model: Model, config: Int8Dynamic) -> tuple[Model, QuantSummary]:
    from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
    from onnxruntime.quantization.quant_utils import QuantizationMode, QuantType

    _quiet_ort_logging()
    prepared, notes = prepare(model, per_channel=config.per_channel)
    quantizer = ONNXQuantizer(prepared.proto, config.per_channel, False, QuantizationMode.IntegerOps, False,
                              QuantType.QInt8, QuantType.QUInt8, None, [], list(config.exclude_nodes),
                              list(config.op_types), {"MatMulConstBOnly": True})
    quantizer.quantize_model()
    quantizer.model.topological_sort()
    result = Model(quantizer.model.model, model.path)
    summary = summarize(prepared.proto, result.proto, config.op_types, notes, precision="int8", mode="dynamic")
    if not summary.quantized:
        summary.warnings.append(f"dynamic INT8 found no {'/'.join(config.op_types)} nodes with constant weights: the model stays FP32; "
                                "use static INT8 (--mode static --calib DATA) for convolutional models")
    if "ConvInteger" in summary.quantized:
        summary.warnings.append(f"Conv was quantized dynamically (ConvInteger), which has no fast x86 kernel: {_measured_slowdown(prepared, result)}; "
                                "static INT8 (--mode static --calib DATA) is the fast path for convolutions")
    return result, summary


def _measured_slowdown(before: Model, after: Model, runs: int = 10) -> str:
    """Median latency of both models on the same random batch of one, at 1 thread: the ratio users must see."""
    import time

    from edgeq.bench import BenchConfig, random_feed
    from edgeq.errors import UserError
    from edgeq.model import make_session

    try:
        feed = random_feed(before.inputs, BenchConfig(batch=1))
    except UserError:
        return "not measured here (dynamic input dims); `edgeq bench --shape ...` measures the ratio"

    def median_ms(model: Model) -> float:
        session = make_session(model.proto, threads=1)
        session.run(None, feed)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - start)
        return float(np.median(times)) * 1000

    fp32, dynamic = median_ms(before), median_ms(after)
    return f"measured {dynamic / fp32:.1f}× the FP32 latency ({dynamic:.2f} ms vs {fp32:.2f} ms, batch 1, 1 thread)"


def quantize_static(model: Model, config: Int8Static, calib: Dataset) -> tuple[Model, QuantSummary, Calibration]:
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import QuantType

    if config.activation_type not in ACTIVATION_TYPES:
        raise ConfigError(f"unknown activation type {config.activation_type!r}", f"use one of: {', '.join(ACTIVATION_TYPES)}")
    if calib is None:
        raise DataError("static INT8 needs calibration data", "pass --calib DATA (a few hundred representative samples)")
    _quiet_ort_logging()
    prepared, notes = prepare(model, per_channel=config.per_channel)
    per_channel = config.per_channel and prepared.opset >= PER_CHANNEL_OPSET
    cal = calibrate(prepared, calib, method=config.method, percentile=config.percentile,
                    batch_size=config.batch_size, max_samples=config.max_samples, symmetric=config.activation_type == "int8")
    ranges = TensorsData(CalibrationMethod.MinMax, {
        name: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for name, (lo, hi) in cal.ranges.items()
    })
    activation = QuantType.QUInt8 if config.activation_type == "uint8" else QuantType.QInt8
    options = {"ActivationSymmetric": config.activation_type == "int8", "WeightSymmetric": True,
               "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}}
    quantizer = QDQQuantizer(prepared.proto, per_channel, False, QuantType.QInt8, activation, ranges, [],
                             list(config.exclude_nodes), list(config.op_types), options)
    quantizer.quantize_model()
    quantizer.model.topological_sort()
    result = Model(quantizer.model.model, model.path)
    summary = summarize(prepared.proto, result.proto, config.op_types, notes, precision="int8", mode="static")
    summary.calibration = {"method": cal.method, "samples": cal.samples,
                           "percentile": config.percentile if cal.method == "percentile" else None}
    summary.warnings.extend(cal.warnings)
    return result, summary, cal

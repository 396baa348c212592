"""Static QDQ with ranges computed once: the analyses and `auto` quantize the same prepared graph many times (one
layer in, one layer out, the top-k layers out), so they calibrate once and hand the ranges to ONNX Runtime's
QDQQuantizer each time — the same backend and options as `edgeq.quantize` with `Int8Static`."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx

from edgeq.calibrate import check_method, observe, to_calibration
from edgeq.data import Dataset
from edgeq.model import Model
from edgeq.quantize.config import COMPUTE_OP_TYPES, STATIC_OP_TYPES, Int8Static
from edgeq.quantize.prepare import PER_CHANNEL_OPSET, prepare


@dataclass
class Prepared:
    """The prepared (BatchNorm-folded, opset ≥ 13) graph, its quantizable layers and the calibrated ranges."""

    model: Model
    layers: list[dict]                     # {name, op_type, weight} for Conv/ConvTranspose/MatMul/Gemm with constant weights
    ranges: dict[str, tuple[float, float]]
    method: str
    samples: int
    notes: list[str]
    config: Int8Static


def quantizable_layers(proto: onnx.ModelProto) -> list[dict]:
    """Compute-heavy nodes whose weight is a constant initializer, in graph order."""
    inits = {t.name for t in proto.graph.initializer}
    return [{"name": n.name, "op_type": n.op_type, "weight": n.input[1]} for n in proto.graph.node
            if n.op_type in COMPUTE_OP_TYPES and len(n.input) > 1 and n.input[1] in inits]


def prepare_model(model: Model, config: Int8Static | None = None) -> tuple[Model, list[str]]:
    config = config or Int8Static()
    prepared, notes = prepare(model, per_channel=config.per_channel)
    _name_nodes(prepared.proto)
    return prepared, notes


def prepare_and_calibrate(model: Model, calib: Dataset, config: Int8Static | None = None, *, method: str | None = None) -> Prepared:
    config = config or Int8Static()
    method = method or config.method
    return prepare_and_calibrate_each(model, calib, config, (method,))[method]


def prepare_and_calibrate_each(model: Model, calib: Dataset, config: Int8Static, methods: tuple[str, ...]) -> dict[str, Prepared]:
    """One prepared graph and one pass over the calibration data (histograms answer every method), ranges by each
    method: what calibrating once per method gives, without preparing and streaming the data once per method."""
    for method in methods:
        check_method(method, config.percentile)
    prepared, notes = prepare_model(model, config)
    seen = observe(prepared, calib, histogram=methods != ("minmax",), batch_size=config.batch_size,
                   max_samples=config.max_samples)
    out = {}
    for method in methods:
        cal = to_calibration(seen, method, percentile=config.percentile, symmetric=config.activation_type == "int8")
        out[method] = Prepared(prepared, quantizable_layers(prepared.proto), dict(cal.ranges), method, cal.samples,
                               notes + list(cal.warnings), config)
    return out


def quantize_qdq(prep: Prepared, *, only: list[str] | None = None, exclude: list[str] | tuple[str, ...] = ()) -> onnx.ModelProto:
    """QDQ-quantize the prepared graph with the stored ranges. `only`: quantize just these nodes (and what they
    need); `exclude`: keep these nodes in float."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import QuantType

    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    config = prep.config
    proto = onnx.ModelProto()
    proto.CopyFrom(prep.model.proto)
    per_channel = config.per_channel and prep.model.opset >= PER_CHANNEL_OPSET
    ranges = TensorsData(CalibrationMethod.MinMax, {
        name: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for name, (lo, hi) in prep.ranges.items()})
    activation = QuantType.QUInt8 if config.activation_type == "uint8" else QuantType.QInt8
    options = {"ActivationSymmetric": config.activation_type == "int8", "WeightSymmetric": True,
               "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}}
    op_types = list(config.op_types or STATIC_OP_TYPES)
    quantizer = QDQQuantizer(proto, per_channel, False, QuantType.QInt8, activation, ranges, list(only or []),
                             list(exclude) + list(config.exclude_nodes), op_types, options)
    quantizer.quantize_model()
    quantizer.model.topological_sort()
    return quantizer.model.model


def _name_nodes(proto: onnx.ModelProto) -> None:
    """Exclusion and reports work by node name: give unnamed nodes a stable one."""
    seen = set()
    for i, node in enumerate(proto.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)

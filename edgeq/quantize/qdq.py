"""The one static QDQ builder: `edgeq.quantize` (Int8Static), the analyses and `auto` prepare a model and turn
activation ranges into a QDQ graph here, so the same config gives the same graph on every path (int4 weights at
opset 21 for `weight_bits=4` too). ONNX Runtime's QDQQuantizer rewrites the graph; which tensors it needs ranges for
is replayed here (`quantized_tensors`), so calibration observes only those.

The analyses and `auto` quantize one prepared graph many times (one layer in, one layer out, the top-k layers out):
`prepare_and_calibrate_each` prepares and streams the calibration data once, `quantize_qdq` builds each graph.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx

from edgeq.calibrate import check_method, float_tensors, observe, to_calibration
from edgeq.quantize.method_choice import choose_method
from edgeq.data import Dataset
from edgeq.graph import toposort
from edgeq.model import Model
from edgeq.quantize.config import COMPUTE_OP_TYPES, Int8Static
from edgeq.quantize.detection_head import protect_head
from edgeq.quantize.prepare import INT4_OPSET, PER_CHANNEL_OPSET, prepare, upgrade_opset

# Ops whose output ONNX Runtime's QDQ quantizer gives the input's scale when that input is quantized (and which
# quantize nothing otherwise), ops that always quantize their activation inputs and outputs, and activations it folds
# into the producer's output (whose own output then needs no range of its own) and quantizes only after a quantized
# input.
SAME_AS_INPUT = ("MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze")
ALWAYS_QUANTIZED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FOLDED = ("Relu", "Clip")


@dataclass
class Prepared:
    """The prepared (BatchNorm-folded, opset ≥ 13, nodes named) graph, its quantizable layers and the ranges."""

    model: Model
    layers: list[dict]                     # {name, op_type, weight} for Conv/ConvTranspose/MatMul/Gemm with constant weights
    ranges: dict[str, tuple[float, float]]
    method: str
    samples: int
    notes: list[str]
    config: Int8Static


def quiet_ort_logging() -> None:
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))


def prepare_static(model: Model, config: Int8Static) -> tuple[Model, list[str]]:
    """The graph static QDQ quantizes: `prepare` (Constant weights out, opset 13, BatchNorm folded), every node
    named (exclusion and reports work by node name), opset 21 for int4 weights."""
    prepared, notes = prepare(model, per_channel=config.per_channel)
    _name_nodes(prepared.proto)
    if config.weight_bits == 4:
        prepared = _int4_opset(prepared, notes)
    return prepared, notes


def build_qdq(prepared: Model, config: Int8Static, ranges: dict[str, tuple], *, only: Iterable[str] = (),
              exclude: Iterable[str] = ()) -> Model:
    """QDQ-quantize a `prepare_static` graph with these activation ranges. `only`: quantize just these nodes (and
    what they need); `exclude`: keep these nodes in float besides the config's own `exclude_nodes`."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import QuantType

    quiet_ort_logging()
    ranges = dict(ranges)
    for pre, post in folded_activations(prepared.proto, config.op_types, tuple(config.exclude_nodes)).items():
        if pre not in ranges and post in ranges:  # never observed: the quantizer folds it into the activation's output
            ranges[pre] = ranges[post]
    data = TensorsData(CalibrationMethod.MinMax, {
        name: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for name, (lo, hi) in ranges.items()})
    per_channel = config.per_channel and prepared.opset >= PER_CHANNEL_OPSET
    activation = QuantType.QUInt8 if config.activation_type == "uint8" else QuantType.QInt8
    weight = QuantType.QInt4 if config.weight_bits == 4 else QuantType.QInt8
    options = {"ActivationSymmetric": config.activation_type == "int8", "WeightSymmetric": True,
               "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}}
    source = onnx.ModelProto()
    source.CopyFrom(prepared.proto)  # the quantizer rewrites the graph it is given; callers build several
    quantizer = QDQQuantizer(source, per_channel, False, weight, activation, data, list(only),
                             list(config.exclude_nodes) + list(exclude), list(config.op_types), options)
    quantizer.quantize_model()
    toposort(quantizer.model.model.graph)
    return Model(quantizer.model.model, prepared.path)


def quantizable_layers(proto: onnx.ModelProto) -> list[dict]:
    """Compute-heavy nodes whose weight is a constant initializer, in graph order."""
    inits = {t.name for t in proto.graph.initializer}
    return [{"name": n.name, "op_type": n.op_type, "weight": n.input[1]} for n in proto.graph.node
            if n.op_type in COMPUTE_OP_TYPES and len(n.input) > 1 and n.input[1] in inits]


def prepare_and_calibrate(model: Model, calib: Dataset, config: Int8Static | None = None, *, method: str | None = None) -> Prepared:
    config = config or Int8Static()
    method = method or config.method
    return prepare_and_calibrate_each(model, calib, config, (method,))[method]


def prepare_and_calibrate_each(model: Model, calib: Dataset, config: Int8Static, methods: tuple[str, ...]) -> dict[str, Prepared]:
    """One prepared graph and one pass over the calibration data (histograms answer every method), ranges by each
    method: what calibrating once per method gives, without preparing and streaming the data once per method.
    Every float tensor is observed: the analyses read ranges of tensors the quantizer does not, and a layer kept in
    float can make a reshape after it need a range of its own."""
    for method in methods:
        if method != "auto":
            check_method(method, config.percentile)
    prepared, notes = prepare_static(model, config)
    config, head = protect_head(prepared.proto, config)  # analyze and auto build what `quantize` builds: head float
    if head is not None:
        notes.append(head.describe())
    seen = observe(prepared, calib, histogram=methods != ("minmax",), batch_size=config.batch_size,
                   max_samples=config.max_samples, holdout="auto" in methods)
    auto = None
    if "auto" in methods:  # what `quantize` ships by default, chosen the same way (then every method's ranges see all data)
        chosen, _, held_note, _ = choose_method(prepared, calib, config, seen, lambda ranges: build_qdq(prepared, config, ranges))
        auto = (chosen, [held_note, f"--method auto chose {chosen}"])
        seen.include_holdout()
    out = {}
    for method in methods:
        chosen, why = auto if method == "auto" else (method, [])
        cal = to_calibration(seen, chosen, percentile=config.percentile, symmetric=config.activation_type == "int8")
        out[method] = Prepared(prepared, quantizable_layers(prepared.proto), dict(cal.ranges), chosen, cal.samples,
                               notes + why + list(cal.warnings), config)
    return out


def quantize_qdq(prep: Prepared, *, only: list[str] | None = None, exclude: list[str] | tuple[str, ...] = ()) -> onnx.ModelProto:
    """The QDQ graph of a prepared model with its stored ranges (see `build_qdq`)."""
    return build_qdq(prep.model, prep.config, prep.ranges, only=only or (), exclude=exclude).proto


def quantized_tensors(proto: onnx.ModelProto, op_types: tuple[str, ...] | list[str], exclude: tuple[str, ...] = ()) -> list[str]:
    """The tensors a static QDQ quantizer needs ranges for: non-constant inputs and outputs of the nodes it may
    quantize, less the pre-activation outputs folded into a Relu/Clip and the outputs of MaxPool/Reshape/Transpose/...
    nodes whose input is certainly quantized (replaying ONNX Runtime's pass in graph order: they share that input's
    scale). Unsure cases keep their range. Calibrating only these skips about a sixth of the binning on the digits
    CNN and many reshapes of a transformer; the quantized model is byte-identical (tested)."""
    constants = {t.name for t in proto.graph.initializer}
    floats = set(float_tensors(proto)) | {i.name for i in proto.graph.input}
    typed = {v.name for v in list(proto.graph.value_info) + list(proto.graph.input) + list(proto.graph.output)
             if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}  # what the quantizer can see is float
    graph_outputs = {o.name for o in proto.graph.output}
    folded = set(folded_activations(proto, op_types, exclude))
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    marked: set[str] = set()    # tensors the quantizer certainly quantizes
    shared: set[str] = set()    # ... of which those that take their input's scale
    names: dict[str, None] = {}
    for node in proto.graph.node:
        if node.op_type not in op_types or node.name in exclude:
            continue
        activations = [n for n in list(node.input) + list(node.output) if n and n not in constants and n in floats]
        if node.op_type in SAME_AS_INPUT:
            if node.input[0] in marked and node.output[0] in typed and (node.op_type != "MaxPool" or opset >= 12):
                marked.add(node.output[0])
                shared.add(node.output[0])
            elif node.output[0] in graph_outputs:
                names[node.output[0]] = None
            continue
        if node.op_type in ALWAYS_QUANTIZED or (node.op_type in FOLDED and node.input[0] in marked):
            marked.update(n for n in activations if n in typed)
        for name in activations:
            if name not in shared and name not in folded:
                names[name] = None
    return list(names)


def folded_activations(proto: onnx.ModelProto, op_types: tuple[str, ...] | list[str], exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """Pre-activation tensor → the Relu/Clip output it is folded into (ONNX Runtime looks the former up, then uses
    the latter's range)."""
    graph_outputs = {o.name for o in proto.graph.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return {name: readers[0].output[0] for name, readers in users.items()
            if name not in graph_outputs and len(readers) == 1 and readers[0].op_type in FOLDED
            and readers[0].op_type in op_types and readers[0].name not in exclude}


def _int4_opset(prepared: Model, notes: list[str]) -> Model:
    """W4A8 needs opset 21 for standard int4 DequantizeLinear; when the upgrade fails ONNX Runtime falls back to its
    com.microsoft Q/DQ, which its CPU provider also runs."""
    proto, note = upgrade_opset(prepared.proto, INT4_OPSET)
    if note:
        notes.append(note.replace("per-channel quantization", "int4 weights").replace("weights per tensor", "com.microsoft Q/DQ"))
    return Model(proto, prepared.path)


def _name_nodes(proto: onnx.ModelProto) -> None:
    """Exclusion and reports work by node name: give unnamed (or doubly named) nodes a stable one."""
    seen = set()
    for i, node in enumerate(proto.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)

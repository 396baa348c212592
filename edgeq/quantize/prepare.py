"""Make exported models quantizable: weights out of Constant nodes, an opset with per-channel QDQ, BatchNorm folded.

Many exporters (Paddle, old TF converters) store weights in Constant nodes; a quantizer that only looks at
initializers then quantizes activations alone and the model grows. Per-channel DequantizeLinear needs opset 13.
"""
from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, version_converter

from edgeq.graph import Names, all_graphs
from edgeq.model import Model, opset_of, ort_session

PER_CHANNEL_OPSET = 13
INT4_OPSET = 21  # int4 QuantizeLinear/DequantizeLinear are standard ONNX from opset 21


def working_copy(model: Model) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of MODEL's graph to rewrite, its Constant-node tensors moved to initializers, and the note saying so."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    moved = constants_to_initializers(proto)
    return proto, [f"moved {moved} Constant-node tensors to initializers"] if moved else []


def constants_to_initializers(proto: onnx.ModelProto) -> int:
    """Move tensors held by Constant nodes of the main graph into initializers; returns how many moved."""
    graph = proto.graph
    kept, moved = [], 0
    for node in graph.node:
        tensor = _constant_value(node) if node.op_type == "Constant" and node.domain in ("", "ai.onnx") else None
        if tensor is None:
            kept.append(node)
            continue
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        moved += 1
    if moved:
        del graph.node[:]
        graph.node.extend(kept)
    return moved


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    attr = node.attribute[0] if len(node.attribute) == 1 else None
    if attr is None:
        return None
    if attr.name == "value":
        tensor = onnx.TensorProto()
        tensor.CopyFrom(attr.t)
        return tensor
    values = {"value_float": (attr.f, np.float32), "value_floats": (list(attr.floats), np.float32),
              "value_int": (attr.i, np.int64), "value_ints": (list(attr.ints), np.int64)}
    if attr.name not in values:
        return None  # sparse tensors and strings stay as nodes
    value, dtype = values[attr.name]
    return numpy_helper.from_array(np.asarray(value, dtype=dtype))


def upgrade_opset(proto: onnx.ModelProto, target: int = PER_CHANNEL_OPSET) -> tuple[onnx.ModelProto, str | None]:
    """Convert to `target` when older; returns the model and a note when conversion was needed or failed."""
    current = opset_of(proto)
    if current >= target:
        return proto, None
    try:
        upgraded = version_converter.convert_version(proto, target)
        onnx.checker.check_model(upgraded)
    except Exception as exc:
        return proto, f"opset {current} could not be upgraded to {target} ({str(exc).splitlines()[0][:120]}): weights per tensor"
    return upgraded, f"upgraded opset {current} → {target} for per-channel quantization"


def optimize_basic(proto: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime's hardware-independent rewrites (constant folding, Conv+BatchNorm/Add/Mul fusion), with only
    standard ONNX ops in the result, so the quantizer sees the graph that will run."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "basic.onnx"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(out)
        opts.log_severity_level = 3
        large = proto.ByteSize() > 2**31 - 2**24
        if large:
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "basic.onnx.data")
            opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            src = Path(tmp) / "src.onnx"
            onnx.save_model(proto, str(src), save_as_external_data=True, location="src.onnx.data")
            ort_session(str(src), opts)
        else:
            ort_session(proto.SerializeToString(), opts)
        return onnx.load(str(out))


def gemm_biases_to_vectors(proto: onnx.ModelProto) -> int:
    """Give every constant Gemm bias the 1-D shape (N,) of the output channels; returns how many changed.

    Gemm's C may be any shape that broadcasts to (M, N), and ONNX Runtime's MatMul+Add fusion writes (1, N). Its
    quantizer reads C as one int32 bias per output channel (scale = input scale × weight scale of that channel):
    a (1, N) bias crashes its per-channel scale adjustment, a scalar one would be quantized with the first channel's
    scale. A bias that varies along M is not a bias per channel: it moves to an Add after the Gemm."""
    graph = proto.graph
    tensors = {t.name: t for t in graph.initializer}
    readers = Counter(name for g in all_graphs(graph) for node in g.node for name in node.input)
    added, changed, names = [], 0, Names(proto)
    for index, node in enumerate(list(graph.node)):
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in tensors or node.input[1] not in tensors:
            continue
        bias, weight = tensors[node.input[2]], tensors[node.input[1]]
        channels = weight.dims[0] if _attr_int(node, "transB") else weight.dims[-1]
        if list(bias.dims) == [channels]:
            continue
        values = numpy_helper.to_array(bias)
        beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0)
        vector = _as_channel_vector(values, channels)
        scaled = ((values if vector is None else vector) * beta).astype(values.dtype)
        name = node.input[2] if readers[node.input[2]] == 1 else names.fresh(f"{node.input[2]}_scaled")
        if name == node.input[2]:
            bias.CopyFrom(numpy_helper.from_array(scaled, name))
        else:
            graph.initializer.append(numpy_helper.from_array(scaled, name))
        for attribute in node.attribute:
            if attribute.name == "beta":
                attribute.f = 1.0
        changed += 1
        if vector is None:  # varies along the rows: an elementwise Add after a bias-free Gemm
            product = names.fresh(node.output[0] + "_without_bias")
            added.append((index, onnx.helper.make_node("Add", [product, name], [node.output[0]],
                                                       name=(node.name or node.output[0]) + "_bias")))
            del node.input[2]
            node.output[0] = product
        else:
            node.input[2] = name
    for offset, (index, add) in enumerate(added):
        graph.node.insert(index + 1 + offset, add)
    return changed


def _attr_int(node: onnx.NodeProto, name: str) -> int:
    return next((a.i for a in node.attribute if a.name == name), 0)


def _as_channel_vector(values: np.ndarray, channels: int) -> np.ndarray | None:
    """The (N,) vector a bias broadcasts to when it is constant along the rows, else None."""
    if values.ndim > 2 or (values.ndim == 2 and values.shape[0] != 1) or values.size not in (1, channels):
        return None
    return np.broadcast_to(values.reshape(-1), (channels,)).copy()


def prepare(model: Model, *, per_channel: bool) -> tuple[Model, list[str]]:
    """Return a quantizable copy of the model and notes on what was changed."""
    proto, notes = working_copy(model)
    if per_channel:
        proto, note = upgrade_opset(proto)
        if note:
            notes.append(note)
    proto = optimize_basic(proto)
    reshaped = gemm_biases_to_vectors(proto)
    if reshaped:
        notes.append(f"gave {reshaped} Gemm biases the per-channel shape (N,) the quantizer's int32 bias expects")
    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except Exception:
        notes.append("shape inference failed; quantizing without full type information")
    return Model(proto, model.path), notes

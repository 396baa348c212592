"""Small graph helpers shared by the repairs, AWQ and the FP16 converter: initializers as numpy, consumers, weight
layouts, subgraphs, fresh names."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


class Weights:
    """Read and write float initializers of a model in place."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        self.proto = proto
        self.tensors = {t.name: t for t in proto.graph.initializer}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.tensors[name]).astype(np.float64)

    def set(self, name: str, value: np.ndarray) -> None:
        old = self.tensors[name]
        new = numpy_helper.from_array(np.asarray(value).astype(onnx.helper.tensor_dtype_to_np_dtype(old.data_type)), name)
        old.CopyFrom(new)

    def add(self, name: str, value: np.ndarray) -> None:
        tensor = numpy_helper.from_array(np.asarray(value, np.float32), name)
        self.proto.graph.initializer.append(tensor)
        self.tensors[name] = self.proto.graph.initializer[-1]


def consumers(proto: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def is_float_weight(weights: Weights, name: str) -> bool:
    return name in weights and weights.tensors[name].data_type == onnx.TensorProto.FLOAT


def output_channel_axis(node: onnx.NodeProto, rank: int) -> int | None:
    """The axis of a weight that indexes the layer's output channels (where per-channel scales live)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if attr(node, "transB", 0) else 1
    if node.op_type == "MatMul" and rank == 2:
        return 1
    return None


class Names:
    """Fresh tensor and node names that collide with nothing in the model, subgraphs included."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        self.used: set[str] = set()
        for graph in all_graphs(proto.graph):
            self.used.update(v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info))
            self.used.update(t.name for t in graph.initializer)
            for node in graph.node:
                self.used.update(node.output)
                self.used.update(node.input)
                self.used.add(node.name)

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name


def attr_graphs(attribute: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if attribute.type == onnx.AttributeProto.GRAPH:
        return [attribute.g]
    return list(attribute.graphs) if attribute.type == onnx.AttributeProto.GRAPHS else []


def all_graphs(graph: onnx.GraphProto):
    """The graph and, recursively, every subgraph of its nodes (If/Loop/Scan bodies)."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            for subgraph in attr_graphs(attribute):
                yield from all_graphs(subgraph)

"""The one module of ONNX graph helpers (repairs, passes, AWQ, subgraphs, the FP16 converter): initializers as numpy,
producers and consumers, attributes, weight layouts, subgraphs and the names they read from outside, fresh names,
renaming, a stable topological sort.

>>> from onnx import helper
>>> graph = helper.make_graph([helper.make_node("Relu", ["y"], ["z"], name="b"), helper.make_node("Relu", ["x"], ["y"], name="a")],
...                           "g", [helper.make_tensor_value_info("x", 1, [1])], [helper.make_tensor_value_info("z", 1, [1])])
>>> toposort(graph)
>>> [node.name for node in graph.node]
['a', 'b']
"""
from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Callable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from edgeq.errors import ModelError


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
    """Tensor name → the main-graph nodes that read it, in graph order."""
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def producers(proto: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Tensor name → the main-graph node that writes it."""
    return {out: node for node in proto.graph.node for out in node.output}


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


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and, recursively, every subgraph of its nodes (If/Loop/Scan bodies)."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            for subgraph in attr_graphs(attribute):
                yield from all_graphs(subgraph)


def outer_names(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing scope (read inside, defined nowhere inside)."""
    read, defined = set(), set()
    for attribute in node.attribute:
        for subgraph in attr_graphs(attribute):
            for graph in all_graphs(subgraph):
                defined.update(v.name for v in graph.input)
                defined.update(t.name for t in graph.initializer)
                for inner in graph.node:
                    read.update(name for name in inner.input if name)
                    defined.update(inner.output)
                read.update(v.name for v in graph.output)
    return read - defined


def rename(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    """Rename tensors everywhere in the graph and its subgraphs: initializers, node inputs and outputs, value infos
    and graph outputs."""
    for g in all_graphs(graph):
        for tensor in g.initializer:
            tensor.name = renames.get(tensor.name, tensor.name)
        for node in g.node:
            node.input[:] = [renames.get(n, n) for n in node.input]
            node.output[:] = [renames.get(n, n) for n in node.output]
        for value in list(g.value_info) + list(g.output):
            value.name = renames.get(value.name, value.name)


def rename_reads(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every read of `old` in the graph and its subgraphs (node inputs, graph outputs) reads `new` instead."""
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name == old:
                node.input[slot] = new
        for attribute in node.attribute:
            for subgraph in attr_graphs(attribute):
                rename_reads(subgraph, old, new)
    for value in graph.output:
        if value.name == old:
            value.name = new


def toposort_nodes(nodes: list[onnx.NodeProto], key: Callable[[int, dict[str, int]], tuple] | None = None) -> list[onnx.NodeProto]:
    """Kahn's algorithm over node inputs and the outer-scope reads of subgraphs (ONNX Runtime's quantizer sorts on
    node inputs only and can move an If before what its branches read). Stable: among ready nodes the smallest
    `key(index, producer index by tensor)` goes first (default: the original order). A cycle is a ModelError."""
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    keys = [key(i, producer) if key else (i,) for i in range(len(nodes))]
    deps = [{producer[n] for n in list(node.input) + sorted(outer_names(node)) if n in producer and producer[n] != i}
            for i, node in enumerate(nodes)]
    readers: dict[int, list[int]] = defaultdict(list)
    for i, dep in enumerate(deps):
        for d in dep:
            readers[d].append(i)
    pending = [len(d) for d in deps]
    ready = [(keys[i], i) for i, count in enumerate(pending) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)[1]
        order.append(nodes[i])
        for r in readers[i]:
            pending[r] -= 1
            if pending[r] == 0:
                heapq.heappush(ready, (keys[r], r))
    if len(order) != len(nodes):
        raise ModelError("the model's graph has a cycle", "check the model with onnx.checker")
    return order


def toposort(graph: onnx.GraphProto) -> None:
    """Sort the graph's nodes in place (`toposort_nodes`, original order where it can)."""
    order = toposort_nodes(list(graph.node))
    del graph.node[:]
    graph.node.extend(order)

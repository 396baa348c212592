"""Quantization inside control-flow subgraphs (If branches, Loop and Scan bodies).

Exporters put whole networks in subgraphs: Silero VAD keeps every weight in the two branches of an `If` on the
sample rate, and its LSTM in a nested `If`. ONNX Runtime's QDQ quantizer never looks inside, so edgeq does: each body
of a main-graph node becomes a model of its own (its formal inputs, plus the outer-scope values it reads as typed
graph inputs), is quantized by the same recipe (which recurses into the bodies it holds), and is put back with the
outer-scope values read by their original names again. Static INT8 calibrates a branch on the values the branch
reads, captured on the calibration data where the branch is taken.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeq.graph import Names, all_graphs, outer_names, rename
from edgeq.quantize.summary import QuantSummary


@dataclass
class Body:
    """One subgraph attribute of a main-graph node and the outer-scope values it reads."""

    node: onnx.NodeProto
    attribute: onnx.AttributeProto
    captured: list[str]

    @property
    def label(self) -> str:
        return f"{self.node.name or self.node.op_type}/{self.attribute.name}"

    @property
    def graph(self) -> onnx.GraphProto:
        return self.attribute.g


def bodies(proto: onnx.ModelProto) -> list[Body]:
    """The single-graph subgraph attributes (If branches, Loop/Scan bodies) of the main graph's nodes."""
    found = []
    for node in proto.graph.node:
        captured = sorted(outer_names(node))
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                found.append(Body(node, attribute, [n for n in captured if _reads(attribute.g, n)]))
    return found


def _reads(graph: onnx.GraphProto, name: str) -> bool:
    return any(name in node.input for g in all_graphs(graph) for node in g.node) or any(v.name == name for v in graph.output)


def value_types(proto: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Types of the main graph's values (inputs, initializers, inferred intermediates)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference bugs on exotic models: the declared types are used
        inferred = proto
    graph = inferred.graph
    types = {t.name: helper.make_tensor_type_proto(t.data_type, list(t.dims)) for t in graph.initializer}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types.setdefault(value.name, value.type)
    return types


def as_model(body: Body, parent: onnx.ModelProto, types: dict[str, onnx.TypeProto],
             owned: dict[str, onnx.TensorProto]) -> onnx.ModelProto | None:
    """The body as a standalone model, with the outer initializers only it reads (`owned`) as its own; None when an
    outer-scope value it reads has no known type."""
    if any(name not in types for name in body.captured if name not in owned):
        return None
    graph = onnx.GraphProto()
    graph.CopyFrom(body.graph)
    formal = list(graph.input)
    del graph.input[:]
    graph.input.extend(formal + [helper.make_value_info(name, types[name]) for name in body.captured if name not in owned])
    graph.initializer.extend(owned[name] for name in body.captured if name in owned)
    model = helper.make_model(graph, opset_imports=list(parent.opset_import), ir_version=parent.ir_version)
    model.functions.extend(parent.functions)
    return model


def put_back(body: Body, converted: onnx.ModelProto, reserved: set[str]) -> None:
    """Replace the body by the converted model's graph: outer-scope values become outer reads again, and names the
    conversion created that the enclosing scopes already use are renamed."""
    graph = onnx.GraphProto()
    graph.CopyFrom(converted.graph)
    captured = set(body.captured)
    formal = [v for v in graph.input if v.name not in captured]
    del graph.input[:]
    graph.input.extend(formal)
    original = _defined(body.graph)
    clashes = {name for name in _defined(graph) - original if name in reserved}
    if clashes:
        names = Names(onnx.ModelProto(graph=graph))
        names.used |= reserved
        rename(graph, {name: names.fresh(name) for name in sorted(clashes)})
    body.attribute.g.CopyFrom(graph)
    reserved |= _defined(graph)


def _defined(graph: onnx.GraphProto) -> set[str]:
    names = set()
    for g in all_graphs(graph):
        names.update(t.name for t in g.initializer)
        names.update(out for node in g.node for out in node.output if out)
    return names


Quantizer = Callable[[Body, onnx.ModelProto], "tuple[onnx.ModelProto, QuantSummary] | str"]


def quantize_bodies(source: onnx.ModelProto, target: onnx.ModelProto, quantize: Quantizer) -> list[tuple[str, QuantSummary | str]]:
    """Quantize every body of `source`'s main graph with `quantize(body, standalone model)` (a model and its
    summary, or why it was left as it is) and put the results into `target`, the quantized main graph (which holds
    the same subgraph-owning nodes, by name and output). Returns (body label, summary or reason)."""
    types = value_types(source)
    reserved = Names(target).used
    owners = {node.output[0]: node for node in target.graph.node if node.output}
    done: list[tuple[str, QuantSummary | str]] = []
    found = bodies(source)
    owned = _owned_initializers(source, found)
    for body in found:
        mine = {name: owned[name] for name in body.captured if name in owned and owned[name] is not None}
        standalone = as_model(body, source, types, mine)
        if standalone is None:
            done.append((body.label, "an outer-scope value it reads has no known type: left as it is"))
            continue
        outcome = quantize(body, standalone)
        if isinstance(outcome, str):
            done.append((body.label, outcome))
            continue
        converted, summary = outcome
        owner = owners.get(body.node.output[0])
        slot = next(a for a in owner.attribute if a.name == body.attribute.name)
        put_back(Body(owner, slot, [n for n in body.captured if n not in mine]), converted, reserved)
        done.append((body.label, summary))
    _drop_unread_initializers(target)
    return done


def _owned_initializers(proto: onnx.ModelProto, found: list[Body]) -> dict[str, onnx.TensorProto | None]:
    """Main-graph initializers that exactly one body reads and nothing else does (the body quantizes them as its
    own weights); None for those that several bodies share (both branches of an If), which stay outside."""
    tensors = {t.name: t for t in proto.graph.initializer}
    declared = {v.name for v in list(proto.graph.input) + list(proto.graph.output)}
    read_outside = {name for node in proto.graph.node for name in node.input} | declared
    readers: dict[str, int] = defaultdict(int)
    for body in found:
        for name in body.captured:
            readers[name] += 1
    return {name: (tensors[name] if count == 1 else None) for name, count in readers.items()
            if name in tensors and name not in read_outside}


def _drop_unread_initializers(proto: onnx.ModelProto) -> None:
    read = {name for graph in all_graphs(proto.graph) for node in graph.node for name in node.input}
    read |= {v.name for v in proto.graph.output}
    kept = [t for t in proto.graph.initializer if t.name in read]
    if len(kept) != len(proto.graph.initializer):
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(kept)


def merge(summary: QuantSummary, done: list[tuple[str, QuantSummary | str]]) -> QuantSummary:
    """Add what was done inside each body to the main graph's summary, body by body."""
    quantized = dict(summary.quantized)
    for label, inner in done:
        if isinstance(inner, str):
            summary.warnings.append(f"subgraph {label}: {inner}")
            continue
        for op_type, count in inner.quantized.items():
            quantized[op_type] = quantized.get(op_type, 0) + count
        summary.left_float.extend({**entry, "node": f"{label}/{entry['node']}"} for entry in inner.left_float)
        summary.warnings.extend(f"subgraph {label}: {w}" for w in inner.warnings)
        if inner.quantized:
            summary.notes.append(f"subgraph {label}: quantized " + ", ".join(f"{op} ×{n}" for op, n in sorted(inner.quantized.items())))
        summary.notes.extend(f"subgraph {label}: {note}" for note in inner.notes)
    summary.quantized = dict(sorted(quantized.items()))
    return summary


def initializer_values(proto: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    tensors = {t.name: t for t in proto.graph.initializer}
    return {name: numpy_helper.to_array(tensors[name]) for name in names if name in tensors}

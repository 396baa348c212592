"""The FP16 converter's rewrite: applies a plan to a copy of the model: float16 node outputs, float16 storage of the
initializers float16 nodes read, one Cast per (tensor, type) at every precision boundary (graph outputs keep their
names), lossless Cast pairs collapsed, a stable topological order, and the element types written back."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.graph import Names, attr_graphs, outer_names, rename_reads, toposort_nodes
from edgeq.quantize.fp16_plan import Plan, constant_problem
from edgeq.quantize.fp16_types import FLOAT, FLOAT16, elem_of, node_domain


@dataclass
class Stats:
    casts: int
    fp16_initializers: int
    bytes_before: int
    bytes_after: int


def rewrite(source: onnx.ModelProto, types: dict[str, onnx.TypeProto], plan: Plan, keep_io_types: bool) -> tuple[onnx.ModelProto, Stats]:
    """Apply the plan to a copy: float16 node outputs, initializer storage, Casts at every boundary, value_info."""
    proto = onnx.ModelProto()
    proto.CopyFrom(source)
    graph = proto.graph
    nodes = list(graph.node)
    have = {name: elem_of(types, name) for name in types}     # element type each tensor will hold
    for index, slots in plan.slots.items():
        for slot in slots.outputs:
            have[nodes[index].output[slot]] = FLOAT16
    inputs = {v.name for v in graph.input} - {t.name for t in graph.initializer}
    io_type = FLOAT if keep_io_types else FLOAT16
    for name in inputs:
        if have.get(name) == FLOAT:
            have[name] = io_type
    wants = _wants(nodes, plan, types, graph.output, io_type)
    stats = _store_initializers(graph, wants, have, {v.name for v in graph.input})
    names = Names(proto)
    final = {name: _with_elem(t, have.get(name, 0)) for name, t in types.items()}
    casts = _retype_outputs(graph, nodes, wants, have, final, names)
    casts += _insert_casts(nodes, wants, have, final, names)
    nodes = _toposort(_collapse_casts(nodes + casts, have, {o.name for o in graph.output}))
    del graph.node[:]
    graph.node.extend(nodes)
    described = {v.name for v in source.graph.value_info} | (set(final) - set(types))  # and the tensors created here
    _write_types(graph, final, have, inputs, described)
    stats.casts = sum(1 for n in nodes if n.name.startswith("edgeq_cast_"))
    return proto, stats


def _wants(nodes: list[onnx.NodeProto], plan: Plan, types: dict[str, onnx.TypeProto], outputs, io_type: int) -> dict[str, list[tuple[tuple, int]]]:
    """For every float32 tensor: who reads it and in which type. A use is (node index, input slot),
    ("subgraph", node index) for names a subgraph reads from the outer scope, or ("output", k)."""
    wants: dict[str, list[tuple[tuple, int]]] = defaultdict(list)
    for index, node in enumerate(nodes):
        slots = plan.slots.get(index)
        for slot, name in enumerate(node.input):
            converted = slots is not None and slot in slots.inputs
            # a slot sharing the type variable of a float32 output holds float32 even where inference lost its type
            if name and (converted or elem_of(types, name) == FLOAT):
                wants[name].append(((index, slot), FLOAT16 if converted else FLOAT))
        for name in outer_names(node):
            if elem_of(types, name) == FLOAT:
                wants[name].append((("subgraph", index), FLOAT))
    for k, value in enumerate(outputs):
        if elem_of(types, value.name) == FLOAT:
            wants[value.name].append((("output", k), io_type))
    return wants


def _store_initializers(graph: onnx.GraphProto, wants: dict, have: dict[str, int], declared: set[str]) -> Stats:
    """Float16 storage for initializers that float16 nodes read. Shared with float32 readers: float16 (plus a Cast
    back) when float16 holds the values exactly, else float32 (plus a Cast to float16)."""
    stats = Stats(0, 0, 0, 0)
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type != FLOAT or tensor.name in declared or tensor.name not in wants:
            continue
        values = numpy_helper.to_array(tensor)
        stats.bytes_before += values.nbytes
        kinds = {want for _, want in wants[tensor.name]}
        # weights only subgraphs read (Silero's LSTM, read by both branches of an If) are stored in float16 and
        # cast back once in the main graph, which ONNX Runtime folds at load: the file halves, the values round
        captured_only = all(use[0] == "subgraph" for use, _ in wants[tensor.name]) and not constant_problem(tensor.name, values)
        # float16 readers passed the range check, so the cast below cannot overflow
        half = values.astype(np.float16) if FLOAT16 in kinds or captured_only else None
        if half is not None and (kinds == {FLOAT16} or captured_only or np.array_equal(half.astype(np.float32), values, equal_nan=True)):
            graph.initializer[index].CopyFrom(numpy_helper.from_array(half, tensor.name))
            have[tensor.name] = FLOAT16
            stats.fp16_initializers += 1
            stats.bytes_after += half.nbytes
        else:
            stats.bytes_after += values.nbytes
    return stats


def _cast(source: str, to: int, names: Names, output: str | None = None) -> onnx.NodeProto:
    suffix = "fp16" if to == FLOAT16 else "fp32"
    output = output or names.fresh(f"{source}_{suffix}")
    return helper.make_node("Cast", [source], [output], name=names.fresh(f"edgeq_cast_{suffix}_{source}"), to=to)


def _retype_outputs(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], wants: dict, have: dict[str, int],
                    final: dict[str, onnx.TypeProto], names: Names) -> list[onnx.NodeProto]:
    """A graph output keeps its name and gets its wanted type: its producer writes a renamed tensor and a Cast
    writes the output name."""
    casts = []
    for value in graph.output:
        uses = wants.get(value.name, [])
        wanted = next((want for use, want in uses if use[0] == "output"), None)
        if wanted is None or have[value.name] == wanted:
            continue
        inner = names.fresh(f"{value.name}_{'fp16' if have[value.name] == FLOAT16 else 'fp32'}")
        _rename_source(graph, nodes, value.name, inner)
        for use, _ in uses:
            if use[0] != "output":
                _rewire(nodes, use, value.name, inner)
        wants[inner] = [(use, want) for use, want in uses if use[0] != "output"]
        wants[value.name] = [(use, want) for use, want in uses if use[0] == "output"]
        have[inner], final[inner] = have[value.name], final.get(value.name)
        casts.append(_cast(inner, wanted, names, output=value.name))
        have[value.name] = wanted
        final[value.name] = _with_elem(final.get(value.name), wanted)
    return casts


def _rename_source(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], old: str, new: str) -> None:
    for node in nodes:
        for slot, name in enumerate(node.output):
            if name == old:
                node.output[slot] = new
    for tensor in graph.initializer:
        if tensor.name == old:
            tensor.name = new


def _insert_casts(nodes: list[onnx.NodeProto], wants: dict, have: dict[str, int], final: dict[str, onnx.TypeProto],
                  names: Names) -> list[onnx.NodeProto]:
    """One Cast per (tensor, type) where a reader wants another type than the tensor holds."""
    casts: dict[tuple[str, int], onnx.NodeProto] = {}
    for name, uses in wants.items():
        for use, want in uses:
            if use[0] == "output" or have.get(name) == want:
                continue
            if (name, want) not in casts:
                casts[(name, want)] = cast = _cast(name, want, names)
                have[cast.output[0]] = want
                final[cast.output[0]] = _with_elem(final.get(name), want)
            _rewire(nodes, use, name, casts[(name, want)].output[0])
    return list(casts.values())


def _rewire(nodes: list[onnx.NodeProto], use: tuple, old: str, new: str) -> None:
    if use[0] == "subgraph":
        for attr in nodes[use[1]].attribute:
            for subgraph in attr_graphs(attr):
                rename_reads(subgraph, old, new)
    else:
        node_index, slot = use
        nodes[node_index].input[slot] = new


def _collapse_casts(nodes: list[onnx.NodeProto], have: dict[str, int], graph_outputs: set[str]) -> list[onnx.NodeProto]:
    """A Cast reading a lossless widening Cast (float16 -> float32) reads the narrow tensor directly; Casts left
    without readers go. Lossy pairs (float32 -> float16 -> float32) round values and stay."""
    producers = {out: node for node in nodes for out in node.output}
    for node in nodes:
        first = producers.get(node.input[0]) if _plain_cast(node) else None
        if first is not None and _plain_cast(first) and _widens(have.get(first.input[0], 0), have.get(node.input[0], 0)):
            node.input[0] = first.input[0]
    read = {name for node in nodes for name in list(node.input) + sorted(outer_names(node))} | graph_outputs
    return [n for n in nodes if not (n.name.startswith("edgeq_cast_") and n.output[0] not in read)]


def _plain_cast(node: onnx.NodeProto) -> bool:
    return node.op_type == "Cast" and node_domain(node) == "" and [a.name for a in node.attribute] == ["to"]


def _widens(narrow: int, wide: int) -> bool:
    return (narrow, wide) in {(FLOAT16, FLOAT), (FLOAT16, TensorProto.DOUBLE), (FLOAT, TensorProto.DOUBLE)}


def _toposort(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Stable: nodes keep their order, an inserted Cast goes right after what it reads."""
    def key(i: int, producer: dict[str, int]) -> tuple:
        node = nodes[i]
        return (producer.get(node.input[0], -1), 1, i) if node.name.startswith("edgeq_cast_") else (i, 0, i)

    return toposort_nodes(nodes, key)


def _write_types(graph: onnx.GraphProto, final: dict[str, onnx.TypeProto], have: dict[str, int], inputs: set[str],
                 described: set[str]) -> None:
    """Element types of graph inputs and outputs; value_info for the tensors the model described (retyped) and for
    the tensors conversion created. Describing every tensor would cost more bytes than small models' weights."""
    for value in [v for v in graph.input if v.name in inputs] + list(graph.output):
        if have.get(value.name) and value.type.HasField("tensor_type"):
            value.type.tensor_type.elem_type = have[value.name]
    declared = {v.name for v in list(graph.input) + list(graph.output)}
    produced = [out for node in graph.node for out in node.output if out and out not in declared]
    del graph.value_info[:]
    for name in produced:
        if name in described and final.get(name) is not None:
            graph.value_info.append(helper.make_value_info(name, final[name]))


def _with_elem(value: onnx.TypeProto | None, elem: int) -> onnx.TypeProto | None:
    if value is None or not value.HasField("tensor_type"):
        return value
    copy = onnx.TypeProto()
    copy.CopyFrom(value)
    if elem:
        copy.tensor_type.elem_type = elem
    return copy

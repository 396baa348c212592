"""The FP16 converter's plan: for every node, the inputs and outputs that become float16, or the reason it stays
float32 (blocked by the config, rejected by ONNX Runtime, holds subgraphs, no float16 schema or kernel, or a constant
float16 would change beyond rounding)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from edgeq.quantize.config import Fp16
from edgeq.quantize.fp16_types import FLOAT, Signature, elem_of, node_domain, node_signature, opset_versions, ort_has_fp16_kernel

FP16_MAX = 65504.0
# Float16 rounding changes a normal value by at most 2**-11 (4.9e-4) relative; a larger relative change of a whole
# constant means its small values fall into float16's subnormal range or flush to zero (an epsilon of 1e-12 -> 0).
UNDERFLOW_TOLERANCE = 1e-3
# Ops whose output type is set by an attribute or that exist to change types: converting them changes meaning.
TYPE_SETTING_OPS = {"Cast", "CastLike"}


@dataclass(frozen=True)
class _Slots:
    """Which inputs and outputs of a node become float16."""

    inputs: frozenset[int]
    outputs: frozenset[int]


@dataclass
class Plan:
    slots: dict[int, _Slots]               # node index -> float16 slots, for nodes computing in float16
    kept: dict[int, str]                   # node index -> why a float32 node stays float32
    unknown_block_nodes: list[str]


def make_plan(proto: onnx.ModelProto, types: dict[str, onnx.TypeProto], config: Fp16, rejected: dict[str, str]) -> Plan:
    opsets = opset_versions(proto)
    constants = _ConstantCheck(proto)
    plan = Plan({}, {}, sorted(set(config.block_nodes) - {n.name for n in proto.graph.node}))
    for index, node in enumerate(proto.graph.node):
        decision = _decide(node, node_signature(node, opsets), types, opsets, config, rejected, constants)
        if isinstance(decision, str):
            plan.kept[index] = decision
        elif decision is not None:
            plan.slots[index] = decision
    return plan


def _decide(node: onnx.NodeProto, sig: Signature | None, types: dict[str, onnx.TypeProto], opsets: dict[str, int],
            config: Fp16, rejected: dict[str, str], constants: "_ConstantCheck") -> _Slots | str | None:
    """None: not float32 math (shapes, ints, Cast): left as it is. A string: why a float32 node stays float32."""
    float_outputs = [slot for slot, name in enumerate(node.output) if name and elem_of(types, name) == FLOAT]
    if not float_outputs or node.op_type in TYPE_SETTING_OPS:
        return None
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
        return "holds subgraphs (If/Loop/Scan): converted inside, float32 at its boundary"
    if sig is None:
        return f"no schema known for {node.domain or 'ai.onnx'}.{node.op_type}: its types cannot be checked"
    variable = sig.output_type(float_outputs[0])
    inputs = frozenset(i for i, name in enumerate(node.input) if name and sig.input_type(i) == variable)
    if not sig.is_variable(variable) or not inputs:
        return None  # output type fixed by the schema or set by an attribute (ConstantOfShape, EyeLike)
    reason = _blocked(node, sig, variable, opsets, config, rejected) or constants.reason(node, inputs)
    if reason:
        return reason
    return _Slots(inputs, frozenset(i for i, name in enumerate(node.output) if name and sig.output_type(i) == variable))


def _blocked(node: onnx.NodeProto, sig: Signature, variable: str, opsets: dict[str, int], config: Fp16,
             rejected: dict[str, str]) -> str | None:
    domain = node_domain(node)
    if node.name in rejected:
        return rejected[node.name]
    if node.name in config.block_nodes:
        return "listed in block_nodes"
    if node.op_type in config.block_ops:
        return "op type in block_ops (float16 overflow or precision risk)"
    if not sig.allows(variable, "tensor(float16)"):
        return f"the {node.op_type} schema of opset {opsets.get(domain, 1)} has no float16 variant"
    if domain and not ort_has_fp16_kernel(domain, node.op_type, opsets.get(domain, 1)):
        return f"{domain}.{node.op_type} has no float16 kernel in ONNX Runtime CPU"
    return None


class _ConstantCheck:
    """Whether float16 would change a float32 constant beyond rounding; computed once per initializer."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        declared = {v.name for v in proto.graph.input}
        # an initializer listed as a graph input is only a default: the caller may feed another value
        self.tensors = {t.name: t for t in proto.graph.initializer if t.data_type == FLOAT and t.name not in declared}
        self.cache: dict[str, str | None] = {}

    def reason(self, node: onnx.NodeProto, inputs: frozenset[int]) -> str | None:
        for slot in sorted(inputs):
            name = node.input[slot]
            if name in self.tensors:
                if name not in self.cache:
                    self.cache[name] = constant_problem(name, numpy_helper.to_array(self.tensors[name]))
                if self.cache[name]:
                    return self.cache[name]
        return None


def constant_problem(name: str, values: np.ndarray) -> str | None:
    finite = values[np.isfinite(values)].astype(np.float64)
    if finite.size == 0:
        return None
    peak = float(np.abs(finite).max())
    if peak > FP16_MAX:
        return f"constant '{name}' holds {peak:.3g}, beyond float16's range (±65504): it would become inf or be clamped"
    norm = float(np.linalg.norm(finite))
    change = float(np.linalg.norm(finite - finite.astype(np.float16).astype(np.float64))) / norm if norm else 0.0
    if change > UNDERFLOW_TOLERANCE:
        return (f"constant '{name}' would change by {change:.1%} in float16: its values below 6.1e-05 lose precision "
                "or flush to zero")
    return None

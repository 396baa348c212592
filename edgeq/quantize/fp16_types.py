"""Op schemas and tensor types for the FP16 converter: which inputs and outputs of a node share the type variable
of its first float output (onnx's schemas, ONNX Runtime's for its contrib domains), which ops ONNX Runtime's CPU
provider runs in float16, and the element type of every tensor (shape inference on a weightless skeleton of the
model, then the schemas for what inference left out)."""
from __future__ import annotations

import functools
import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
# Initializers with more values than this reach shape inference as typed graph inputs: no copy of the weights.
_SKELETON_MAX_VALUES = 64


@dataclass(frozen=True)
class Signature:
    """An op schema reduced to what conversion needs: the type string (a type variable or a fixed type such as
    'tensor(float)') of each formal input and output, and the types each variable allows."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    variadic_input: bool
    variadic_output: bool
    allowed: dict[str, frozenset[str]]

    def input_type(self, slot: int) -> str | None:
        return _formal(self.inputs, self.variadic_input, slot)

    def output_type(self, slot: int) -> str | None:
        return _formal(self.outputs, self.variadic_output, slot)

    def allows(self, variable: str, type_str: str) -> bool:
        return type_str in self.allowed.get(variable, ())

    def is_variable(self, type_str: str | None) -> bool:
        return type_str in self.allowed


def _formal(params: tuple[str, ...], variadic: bool, slot: int) -> str | None:
    if slot < len(params):
        return params[slot]
    return params[-1] if params and variadic else None


@functools.lru_cache(maxsize=None)
def _signature(op_type: str, domain: str, version: int) -> Signature | None:
    """The schema from onnx, or from ONNX Runtime for its contrib domains (com.microsoft)."""
    try:
        schema = onnx.defs.get_schema(op_type, version, domain)
    except onnx.defs.SchemaError:
        schema = _ort_schema(op_type, domain, version)
        if schema is None:
            return None
    return Signature(tuple(_type_str(p) for p in schema.inputs), tuple(_type_str(p) for p in schema.outputs),
                      bool(schema.inputs) and str(schema.inputs[-1].option).endswith("Variadic"),
                      bool(schema.outputs) and str(schema.outputs[-1].option).endswith("Variadic"),
                      {c.type_param_str: frozenset(c.allowed_type_strs) for c in schema.type_constraints})


def _type_str(param) -> str:
    return param.type_str if hasattr(param, "type_str") else param.typeStr  # onnx and ONNX Runtime spell it apart


def _ort_schema(op_type: str, domain: str, version: int):
    """The newest ONNX Runtime schema (contrib domains) with since_version <= the model's opset, or None."""
    fitting = [s for s in _ort_schemas().get((domain, op_type), []) if s.since_version <= version]
    return max(fitting, key=lambda s: s.since_version) if fitting else None


@functools.lru_cache(maxsize=1)
def _ort_schemas() -> dict[tuple[str, str], list]:
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    schemas: dict[tuple[str, str], list] = defaultdict(list)
    for schema in ort_c.get_all_operator_schema():
        schemas[(schema.domain, schema.name)].append(schema)
    return dict(schemas)


@functools.lru_cache(maxsize=1)
def _ort_cpu_fp16_kernels() -> dict[tuple[str, str], list[tuple[int, int]]]:
    """(domain, op) -> opset ranges for which ONNX Runtime's CPU provider registers a float16 kernel.

    ONNX Runtime's own registry is the table: it is exact for the installed build (ARM builds have many more).
    """
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    kernels: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
    for kernel in ort_c.get_all_opkernel_def():
        if kernel.provider == "CPUExecutionProvider" and any("tensor(float16)" in t for t in kernel.type_constraints.values()):
            kernels[(kernel.domain, kernel.op_name)].append(tuple(kernel.version_range))
    return dict(kernels)


def ort_has_fp16_kernel(domain: str, op_type: str, version: int) -> bool:
    return any(lo <= version <= hi for lo, hi in _ort_cpu_fp16_kernels().get((domain, op_type), []))


def node_domain(node: onnx.NodeProto) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def opset_versions(proto: onnx.ModelProto) -> dict[str, int]:
    return {("" if o.domain == "ai.onnx" else o.domain): o.version for o in proto.opset_import}


def node_signature(node: onnx.NodeProto, opsets: dict[str, int]) -> Signature | None:
    domain = node_domain(node)
    return _signature(node.op_type, domain, opsets.get(domain, 1))



def tensor_types(proto: onnx.ModelProto) -> tuple[dict[str, onnx.TypeProto], list[str]]:
    """Type (element type and shape) of every tensor of the main graph: onnx shape inference on a skeleton of the
    model, then the op schemas for what inference left out (custom ops)."""
    warnings: list[str] = []
    types: dict[str, onnx.TypeProto] = {}
    for tensor in proto.graph.initializer:
        types[tensor.name] = helper.make_tensor_type_proto(tensor.data_type, list(tensor.dims))
    try:
        inferred = onnx.shape_inference.infer_shapes(_skeleton(proto), strict_mode=False, data_prop=True)
        values = list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)
    except Exception as exc:  # inference bugs on exotic models must not stop conversion: schemas take over
        warnings.append(f"ONNX shape inference failed ({str(exc).splitlines()[0][:120]}); types come from op schemas")
        values = list(proto.graph.input) + list(proto.graph.value_info) + list(proto.graph.output)
    for value in values:
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types.setdefault(value.name, value.type)
    _propagate_types(proto, types)
    return types, warnings


def _skeleton(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its initializers turned into typed graph inputs: inference needs their types and shapes,
    not their values, and a copy without them is small (and never hits protobuf's 2 GB limit). Tiny tensors keep
    their values: data propagation reads shapes and axes from them."""
    skeleton = onnx.ModelProto()
    skeleton.ir_version = proto.ir_version
    skeleton.opset_import.extend(proto.opset_import)
    skeleton.functions.extend(proto.functions)
    graph = skeleton.graph
    for field in ("node", "input", "output", "value_info"):
        getattr(graph, field).extend(getattr(proto.graph, field))
    declared = {v.name for v in graph.input}
    for tensor in proto.graph.initializer:
        if int(np.prod(tensor.dims)) <= _SKELETON_MAX_VALUES:
            graph.initializer.append(tensor)
        elif tensor.name not in declared:
            graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return skeleton


def _propagate_types(proto: onnx.ModelProto, types: dict[str, onnx.TypeProto]) -> None:
    """Fill element types inference could not give, in graph order: Cast's `to`, a fixed type in the schema, or the
    type of an input bound to the same type variable."""
    opsets = opset_versions(proto)
    for node in proto.graph.node:
        sig = node_signature(node, opsets)
        for slot, name in enumerate(node.output):
            if not name or name in types:
                continue
            elem = _output_elem_type(node, slot, sig, types)
            if elem:
                types[name] = helper.make_tensor_type_proto(elem, None)


def _output_elem_type(node: onnx.NodeProto, slot: int, sig: Signature | None, types: dict[str, onnx.TypeProto]) -> int:
    if node.op_type == "Cast" and node_domain(node) == "":
        return next((a.i for a in node.attribute if a.name == "to"), 0)
    if sig is None:
        return 0
    formal = sig.output_type(slot)
    if formal and not sig.is_variable(formal):
        return _elem_type(formal)
    for i, name in enumerate(node.input):
        if name and sig.input_type(i) == formal and name in types:
            return types[name].tensor_type.elem_type
    return 0


def _elem_type(type_str: str) -> int:
    match = re.fullmatch(r"tensor\((\w+)\)", type_str)
    try:
        return TensorProto.DataType.Value(match.group(1).upper()) if match else 0
    except ValueError:
        return 0


def elem_of(types: dict[str, onnx.TypeProto], name: str) -> int:
    value = types.get(name)
    return value.tensor_type.elem_type if value is not None and value.HasField("tensor_type") else 0

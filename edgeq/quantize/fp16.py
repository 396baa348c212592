"""Float16 conversion that never changes a value silently and always yields a model ONNX Runtime loads.

Why our own converter: onnxconverter-common and onnxruntime.transformers.float16 clamp constants beyond the
float16 range (PP-OCR det's BatchNormalization variance of 9.8e7 becomes 65504 and the model breaks) and give
float16 to inputs that the op schema fixes to float32, so MiniLM fails to load.

How it decides, node by node (subgraphs are converted as models of their own, float32 at their boundary):
- the ONNX op schema says which inputs and outputs share the type variable of the node's first float32 output;
  exactly those become float16 (Resize scales, Pow exponents and the like keep their own types);
- a node stays float32, listed with its reason, when its op type or name is blocked by the config, it holds a
  subgraph, it is a custom-domain op without a float16 kernel in ONNX Runtime CPU, or a constant it reads would
  change beyond float16 rounding (values past ±65504, or small values that flush to zero);
- Cast, ConstantOfShape and other ops whose output type comes from an attribute keep their types;
- Cast nodes go in at every precision boundary; float initializers are stored in float16 where float16 nodes
  read them, which is where the 2x size reduction comes from.

ONNX Runtime's x86 CPU provider has float16 kernels for data movement (Transpose, Concat, Gather...) and a few
others only; for Conv, MatMul, Add and most math it casts to float32 around the node at load time (measured with
onnxruntime 1.32). The model still loads and runs, with float16 storage and float32 arithmetic on that CPU; the
summary's notes name the op types concerned. A final ONNX Runtime load check moves any node it rejects back to
float32 and converts again.
"""
from __future__ import annotations

import functools
import heapq
import re
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.errors import ModelError
from edgeq.model import Model, make_session
from edgeq.quantize.config import Fp16
from edgeq.quantize.prepare import constants_to_initializers
from edgeq.quantize.repair.graph import Names, attr_graphs
from edgeq.quantize.subgraphs import merge, outer_names, quantize_bodies
from edgeq.quantize.summary import QuantSummary

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = 65504.0
# Float16 rounding changes a normal value by at most 2**-11 (4.9e-4) relative; a larger relative change of a whole
# constant means its small values fall into float16's subnormal range or flush to zero (an epsilon of 1e-12 -> 0).
UNDERFLOW_TOLERANCE = 1e-3
# Ops whose output type is set by an attribute or that exist to change types: converting them changes meaning.
TYPE_SETTING_OPS = {"Cast", "CastLike"}
# ORT's load check rejects one node per attempt; more failures than this means something else is wrong.
MAX_LOAD_ATTEMPTS = 20
# Initializers with more values than this reach shape inference as typed graph inputs: no copy of the weights.
_SKELETON_MAX_VALUES = 64
_PROTOBUF_LIMIT = 2**31 - 2**24


def convert_fp16(model: Model, config: Fp16) -> tuple[Model, QuantSummary]:
    """Convert a float32 model to float16 as far as is safe; the summary lists every float node kept float32.

    >>> import edgeq
    >>> from edgeq.testing import zoo
    >>> from edgeq.quantize.fp16 import convert_fp16
    >>> fp16, summary = convert_fp16(edgeq.load(zoo.ppocr_det_path()), edgeq.Fp16())   # doctest: +SKIP
    >>> summary.quantized["Conv"], summary.left_float[-1]["reason"]                      # doctest: +SKIP
    (62, "constant 'batch_norm_0.w_2' holds 9.79e+07, beyond float16's range (±65504): it would become inf or be clamped")
    >>> fp16.save("ppocr_det_fp16.onnx")                                                 # doctest: +SKIP
    """
    source = onnx.ModelProto()
    source.CopyFrom(model.proto)
    notes: list[str] = []
    moved = constants_to_initializers(source)
    if moved:
        notes.append(f"moved {moved} Constant-node tensors to initializers")
    types, warnings = _tensor_types(source)
    inside = quantize_bodies(source, source, functools.partial(_convert_body, config=config))
    rejected: dict[str, str] = {}
    for _ in range(MAX_LOAD_ATTEMPTS):
        plan = _plan(source, types, config, rejected)
        result, stats = _rewrite(source, types, plan, config.keep_io_types)
        failure = _load_failure(result)
        if failure is None:
            break
        node = _rejected_node(failure, plan, source)
        if node is None:
            warnings.append(f"ONNX Runtime cannot load the original model either ({failure[:160]}): "
                            "the float16 model was checked with onnx.checker only")
            break
        rejected[node] = f"ONNX Runtime CPU cannot load it in float16: {failure[:160]}"
    else:
        raise ModelError(f"the float16 model still fails to load in ONNX Runtime after {MAX_LOAD_ATTEMPTS} fixes",
                         "block the failing op types with Fp16(block_ops=...) and report the model")
    summary = merge(_summary(source, plan, stats, notes, warnings, config), inside)
    if not summary.quantized:
        summary.warnings.append("no node could be converted to float16: the model stays float32")
    return Model(result, model.path, notes=list(summary.notes)), summary


def _convert_body(body, standalone: onnx.ModelProto, config: Fp16) -> tuple[onnx.ModelProto, QuantSummary] | str:
    """A subgraph converted as a model of its own, float32 at its boundary (the enclosing node's types stay)."""
    from dataclasses import replace

    from edgeq.errors import UserError

    try:
        converted, summary = convert_fp16(Model(standalone, None), replace(config, keep_io_types=True))
    except UserError as exc:
        return f"left float32 ({exc.what})"
    summary.warnings = [w for w in summary.warnings if not w.startswith("no node could be converted")]  # the model's to say
    return converted.proto, summary


# ---------------------------------------------------------------------------------------------------- schemas

@dataclass(frozen=True)
class _Signature:
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
def _signature(op_type: str, domain: str, version: int) -> _Signature | None:
    """The schema from onnx, or from ONNX Runtime for its contrib domains (com.microsoft)."""
    try:
        schema = onnx.defs.get_schema(op_type, version, domain)
    except onnx.defs.SchemaError:
        schema = _ort_schema(op_type, domain, version)
        if schema is None:
            return None
    return _Signature(tuple(_type_str(p) for p in schema.inputs), tuple(_type_str(p) for p in schema.outputs),
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


def _ort_has_fp16_kernel(domain: str, op_type: str, version: int) -> bool:
    return any(lo <= version <= hi for lo, hi in _ort_cpu_fp16_kernels().get((domain, op_type), []))


def _domain(node: onnx.NodeProto) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def _opsets(proto: onnx.ModelProto) -> dict[str, int]:
    return {("" if o.domain == "ai.onnx" else o.domain): o.version for o in proto.opset_import}


def _node_signature(node: onnx.NodeProto, opsets: dict[str, int]) -> _Signature | None:
    domain = _domain(node)
    return _signature(node.op_type, domain, opsets.get(domain, 1))


# ---------------------------------------------------------------------------------------------------- types

def _tensor_types(proto: onnx.ModelProto) -> tuple[dict[str, onnx.TypeProto], list[str]]:
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
    opsets = _opsets(proto)
    for node in proto.graph.node:
        sig = _node_signature(node, opsets)
        for slot, name in enumerate(node.output):
            if not name or name in types:
                continue
            elem = _output_elem_type(node, slot, sig, types)
            if elem:
                types[name] = helper.make_tensor_type_proto(elem, None)


def _output_elem_type(node: onnx.NodeProto, slot: int, sig: _Signature | None, types: dict[str, onnx.TypeProto]) -> int:
    if node.op_type == "Cast" and _domain(node) == "":
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


def _elem(types: dict[str, onnx.TypeProto], name: str) -> int:
    value = types.get(name)
    return value.tensor_type.elem_type if value is not None and value.HasField("tensor_type") else 0


# ---------------------------------------------------------------------------------------------------- plan

@dataclass(frozen=True)
class _Slots:
    """Which inputs and outputs of a node become float16."""

    inputs: frozenset[int]
    outputs: frozenset[int]


@dataclass
class _Plan:
    slots: dict[int, _Slots]               # node index -> float16 slots, for nodes computing in float16
    kept: dict[int, str]                   # node index -> why a float32 node stays float32
    unknown_block_nodes: list[str]


def _plan(proto: onnx.ModelProto, types: dict[str, onnx.TypeProto], config: Fp16, rejected: dict[str, str]) -> _Plan:
    opsets = _opsets(proto)
    constants = _ConstantCheck(proto)
    plan = _Plan({}, {}, sorted(set(config.block_nodes) - {n.name for n in proto.graph.node}))
    for index, node in enumerate(proto.graph.node):
        decision = _decide(node, _node_signature(node, opsets), types, opsets, config, rejected, constants)
        if isinstance(decision, str):
            plan.kept[index] = decision
        elif decision is not None:
            plan.slots[index] = decision
    return plan


def _decide(node: onnx.NodeProto, sig: _Signature | None, types: dict[str, onnx.TypeProto], opsets: dict[str, int],
            config: Fp16, rejected: dict[str, str], constants: "_ConstantCheck") -> _Slots | str | None:
    """None: not float32 math (shapes, ints, Cast): left as it is. A string: why a float32 node stays float32."""
    float_outputs = [slot for slot, name in enumerate(node.output) if name and _elem(types, name) == FLOAT]
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


def _blocked(node: onnx.NodeProto, sig: _Signature, variable: str, opsets: dict[str, int], config: Fp16,
             rejected: dict[str, str]) -> str | None:
    domain = _domain(node)
    if node.name in rejected:
        return rejected[node.name]
    if node.name in config.block_nodes:
        return "listed in block_nodes"
    if node.op_type in config.block_ops:
        return "op type in block_ops (float16 overflow or precision risk)"
    if not sig.allows(variable, "tensor(float16)"):
        return f"the {node.op_type} schema of opset {opsets.get(domain, 1)} has no float16 variant"
    if domain and not _ort_has_fp16_kernel(domain, node.op_type, opsets.get(domain, 1)):
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
                    self.cache[name] = _constant_problem(name, numpy_helper.to_array(self.tensors[name]))
                if self.cache[name]:
                    return self.cache[name]
        return None


def _constant_problem(name: str, values: np.ndarray) -> str | None:
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


# ---------------------------------------------------------------------------------------------------- rewrite

@dataclass
class _Stats:
    casts: int
    fp16_initializers: int
    bytes_before: int
    bytes_after: int


def _rewrite(source: onnx.ModelProto, types: dict[str, onnx.TypeProto], plan: _Plan, keep_io_types: bool) -> tuple[onnx.ModelProto, _Stats]:
    """Apply the plan to a copy: float16 node outputs, initializer storage, Casts at every boundary, value_info."""
    proto = onnx.ModelProto()
    proto.CopyFrom(source)
    graph = proto.graph
    nodes = list(graph.node)
    have = {name: _elem(types, name) for name in types}     # element type each tensor will hold
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


def _wants(nodes: list[onnx.NodeProto], plan: _Plan, types: dict[str, onnx.TypeProto], outputs, io_type: int) -> dict[str, list[tuple[tuple, int]]]:
    """For every float32 tensor: who reads it and in which type. A use is (node index, input slot),
    ("subgraph", node index) for names a subgraph reads from the outer scope, or ("output", k)."""
    wants: dict[str, list[tuple[tuple, int]]] = defaultdict(list)
    for index, node in enumerate(nodes):
        slots = plan.slots.get(index)
        for slot, name in enumerate(node.input):
            converted = slots is not None and slot in slots.inputs
            # a slot sharing the type variable of a float32 output holds float32 even where inference lost its type
            if name and (converted or _elem(types, name) == FLOAT):
                wants[name].append(((index, slot), FLOAT16 if converted else FLOAT))
        for name in outer_names(node):
            if _elem(types, name) == FLOAT:
                wants[name].append((("subgraph", index), FLOAT))
    for k, value in enumerate(outputs):
        if _elem(types, value.name) == FLOAT:
            wants[value.name].append((("output", k), io_type))
    return wants


def _store_initializers(graph: onnx.GraphProto, wants: dict, have: dict[str, int], declared: set[str]) -> _Stats:
    """Float16 storage for initializers that float16 nodes read. Shared with float32 readers: float16 (plus a Cast
    back) when float16 holds the values exactly, else float32 (plus a Cast to float16)."""
    stats = _Stats(0, 0, 0, 0)
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type != FLOAT or tensor.name in declared or tensor.name not in wants:
            continue
        values = numpy_helper.to_array(tensor)
        stats.bytes_before += values.nbytes
        kinds = {want for _, want in wants[tensor.name]}
        # weights only subgraphs read (Silero's LSTM, read by both branches of an If) are stored in float16 and
        # cast back once in the main graph, which ONNX Runtime folds at load: the file halves, the values round
        captured_only = all(use[0] == "subgraph" for use, _ in wants[tensor.name]) and not _constant_problem(tensor.name, values)
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
                _rename_reads(subgraph, old, new)
    else:
        node_index, slot = use
        nodes[node_index].input[slot] = new


def _rename_reads(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name == old:
                node.input[slot] = new
        for attr in node.attribute:
            for subgraph in attr_graphs(attr):
                _rename_reads(subgraph, old, new)
    for value in graph.output:
        if value.name == old:
            value.name = new


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
    return node.op_type == "Cast" and _domain(node) == "" and [a.name for a in node.attribute] == ["to"]


def _widens(narrow: int, wide: int) -> bool:
    return (narrow, wide) in {(FLOAT16, FLOAT), (FLOAT16, TensorProto.DOUBLE), (FLOAT, TensorProto.DOUBLE)}


def _toposort(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Kahn's algorithm, stable: nodes keep their order, an inserted Cast goes right after what it reads."""
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    key = [(producer.get(node.input[0], -1), 1, i) if node.name.startswith("edgeq_cast_") else (i, 0, i)
           for i, node in enumerate(nodes)]
    deps = [{producer[name] for name in list(node.input) + sorted(outer_names(node)) if name in producer} for node in nodes]
    readers: dict[int, list[int]] = defaultdict(list)
    for i, dep in enumerate(deps):
        for d in dep:
            readers[d].append(i)
    pending = [len(d) for d in deps]
    ready = [key[i] for i, count in enumerate(pending) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)[2]
        order.append(nodes[i])
        for r in readers[i]:
            pending[r] -= 1
            if pending[r] == 0:
                heapq.heappush(ready, key[r])
    if len(order) != len(nodes):
        raise ModelError("the model's graph has a cycle", "check the model with onnx.checker")
    return order


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


# ---------------------------------------------------------------------------------------------------- checks

def _load_failure(proto: onnx.ModelProto) -> str | None:
    """ONNX Runtime's error when the CPU provider cannot create a session for the model, else None."""
    if proto.ByteSize() >= _PROTOBUF_LIMIT:
        return None  # too large to hand over in memory; edgeq's save() verifies the written file
    try:
        make_session(proto)
    except Exception as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def _rejected_node(failure: str, plan: _Plan, source: onnx.ModelProto) -> str | None:
    """The float16 node ONNX Runtime names in its error; None when the original model fails to load as well.
    Any other failure is edgeq's bug: reported, not guessed around."""
    match = re.search(r"node with name '([^']*)'", failure)
    if match is not None and match.group(1) in {source.graph.node[i].name for i in plan.slots}:
        return match.group(1)
    if _load_failure(source) is not None:
        return None
    raise ModelError(f"the float16 model fails to load in ONNX Runtime: {failure[:300]}",
                     "report this with the model; Fp16(block_ops=...) can keep the failing op types in float32")


def _summary(proto: onnx.ModelProto, plan: _Plan, stats: _Stats, notes: list[str], warnings: list[str],
             config: Fp16) -> QuantSummary:
    nodes = proto.graph.node
    opsets = _opsets(proto)
    converted = Counter(nodes[i].op_type for i in plan.slots)
    left = [{"node": nodes[i].name, "op_type": nodes[i].op_type, "reason": reason} for i, reason in sorted(plan.kept.items())]
    notes = list(notes)
    if stats.fp16_initializers:
        notes.append(f"stored {stats.fp16_initializers} initializers in float16 "
                     f"({_size(stats.bytes_before)} -> {_size(stats.bytes_after)} of float weights)")
    notes.append(f"inserted {stats.casts} Cast nodes at float16/float32 boundaries"
                 + ("" if config.keep_io_types else "; graph inputs and outputs are float16"))
    upcast = sorted({nodes[i].op_type for i in plan.slots
                     if not _ort_has_fp16_kernel(_domain(nodes[i]), nodes[i].op_type, opsets.get(_domain(nodes[i]), 1))})
    if upcast:
        notes.append(f"ONNX Runtime's CPU provider has no float16 kernel for {', '.join(upcast)}: it casts them to "
                     "float32 at load time (float16 storage, float32 arithmetic: smaller, not faster, on this CPU)")
    warnings = list(warnings)
    if plan.unknown_block_nodes:
        warnings.append(f"block_nodes names no node of the model: {', '.join(plan.unknown_block_nodes)}")
    return QuantSummary("fp16", None, dict(sorted(converted.items())), left, notes, warnings)


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"

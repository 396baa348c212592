"""Find a detector's head in an ONNX graph and say what static INT8 must leave float for the boxes to survive.

A detector's outputs carry box coordinates and class scores side by side: YOLOv5/v8/v11-style `(N, 4+C[+1],
anchors)` tensors, or per-level score and box(-distribution) maps as in PP-PicoDet, NanoDet, SSD and RetinaNet.
Quantized like any other graph they lose their boxes: one 8-bit range for a tensor that holds pixel coordinates
(0-640) and scores (0-1) leaves the scores a handful of steps, and the decoding arithmetic (anchor offsets, strides,
DFL softmax) compounds the rounding. So, without node names from the user:

1. outputs of rank 3 whose static feature axis is small are candidate detector outputs;
2. from each, the graph is walked back through decoding ops (Concat, Sigmoid, Softmax, Mul, Add, Split, Reshape,
   Transpose, ...; a Conv or MatMul that reads a Softmax is the DFL expectation and counts as decoding) to the
   convolutions that end each branch. Any other op on the way (a Resize, a graph input) means it is not a
   detector head and nothing is changed;
3. each of those last convolutions is classed by its output: "shared" when that one tensor is split into box
   coordinates and class scores (PicoDet's), "separate" when coordinates and scores come from branches of their
   own that a Concat joins (YOLOv8's).

The plan (`HeadPlan.float_nodes`) keeps the decoding float (cheap: element-wise work on a few thousand anchors) and
the last convolutions whose single output holds both coordinates and scores, where no 8-bit range fits both. The
last convolutions of separate coordinate and score branches stay int8 with per-channel weights: each output has
its own activation range. bench/detect.py measures the policy against FP32 (box F1) and ONNX Runtime's recipe.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import onnx

from edgeq.errors import ConfigError
from edgeq.quantize.config import STATIC_OP_TYPES

# Ops that rearrange or decode head outputs; they never end a branch of learned features.
DECODE_OPS = frozenset({"Concat", "Sigmoid", "Softmax", "Mul", "Div", "Add", "Sub", "Split", "Slice", "Reshape", "Transpose",
                        "Unsqueeze", "Squeeze", "Gather", "Flatten", "Exp", "Identity", "Cast", "Expand", "Tile", "ReduceSum",
                        "ReduceMax", "ArgMax", "Range", "ConstantOfShape", "Clip", "Log", "Pow", "Sqrt"})
SHAPE_OPS = frozenset({"Shape", "Size", "Constant"})  # walked into, never through: they read no values
LAST_LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
SCORE_OPS = frozenset({"Sigmoid", "Softmax"})
# On YOLOv8n (nudenet, 320x320, 1 thread) quantizing these with the convolutions took static INT8 from 0.70x to
# 0.51x the FP32 latency at the same box F1 (bench/detect.py): SiLU as float ops broke every int8 chain.
DETECTOR_BACKBONE_OPS = ("Sigmoid", "Mul", "Add", "Concat", "Split", "Resize")
MAX_FEATURES = 4 + 1 + 1000  # the widest (4 + objectness + classes) or box-distribution axis taken as a head's
MAX_DISTRIBUTION_HOPS = 3    # a DFL Conv/MatMul reads its Softmax through at most this many reshapes/transposes


@dataclass
class HeadPlan:
    """A detector head: the output tensors, the decoding nodes, and each branch's last layer with what it carries."""

    outputs: list[str]
    decode_nodes: list[str]
    last_layers: dict[str, str] = field(default_factory=dict)  # node -> "shared" (coordinates and scores) or "separate"
    layout: str = ""  # "single" (one (N, 4+C, anchors)-style tensor) or "per-level" (score and box maps)

    @property
    def shared_layers(self) -> list[str]:
        return [n for n, carries in self.last_layers.items() if carries == "shared"]

    @property
    def float_nodes(self) -> tuple[str, ...]:
        return tuple(self.decode_nodes) + tuple(self.shared_layers)

    def describe(self) -> str:
        kept = f"{len(self.decode_nodes)} decoding nodes"
        if self.shared_layers:
            kept += (f" and the {len(self.shared_layers)} last convolutions whose one output holds both box coordinates and "
                     "class scores (no single 8-bit range holds both)")
        separate = len(self.last_layers) - len(self.shared_layers)
        tail = (f"; the {separate} last convolutions of separate coordinate/score branches stay int8 with per-channel weights "
                "and a range of their own") if separate else ""
        return (f"detector head recognised ({self.layout} layout, outputs {', '.join(self.outputs)}): kept float {kept}{tail}")


def find_head(proto: onnx.ModelProto) -> HeadPlan | None:
    """The detector head of `proto`, or None when its outputs do not look like one (see the module docstring)."""
    graph = proto.graph
    candidates = [o for o in graph.output if _head_shaped(o)]
    if not candidates:
        return None
    producers = {out: node for node in graph.node for out in node.output}
    constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    inputs = {i.name for i in graph.input} - constants
    decode: dict[str, onnx.NodeProto] = {}
    last: dict[str, onnx.NodeProto] = {}
    pending = [o.name for o in candidates]
    seen: set[str] = set()
    while pending:
        tensor = pending.pop()
        if tensor in seen or tensor in constants:
            continue
        seen.add(tensor)
        if tensor in inputs:
            return None  # a path from an output to the input without a learned last layer: not a detector head
        node = producers.get(tensor)
        if node is None:
            return None
        if node.op_type in SHAPE_OPS:
            decode[node.name] = node
            continue
        if node.op_type in LAST_LAYER_OPS and not _reads_softmax(node, producers):
            if not any(i in constants for i in node.input[1:2]):
                return None  # a MatMul of two activations (attention), not a head's last layer
            last[node.name] = node
            continue
        if node.op_type not in DECODE_OPS and node.op_type not in LAST_LAYER_OPS:
            return None
        decode[node.name] = node
        pending.extend(i for i in node.input if i)
    if not last or not any(n.op_type in SCORE_OPS for n in decode.values()):
        return None
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    output_names = [o.name for o in candidates]
    carries = {name: _carries(node, consumers) for name, node in last.items()}
    layout = "single" if len(candidates) == 1 else "per-level"
    order = {n.name: k for k, n in enumerate(graph.node)}
    return HeadPlan(output_names, sorted(decode, key=order.__getitem__), dict(sorted(carries.items(), key=lambda kv: order[kv[0]])), layout)


def _head_shaped(value: onnx.ValueInfoProto) -> bool:
    """Rank 3 float with a static feature axis (dim 1 or 2) of at most MAX_FEATURES: (N, 4+C, A) or (N, A, C/4/4·R)."""
    tensor = value.type.tensor_type
    if tensor.elem_type != onnx.TensorProto.FLOAT or len(tensor.shape.dim) != 3:
        return False
    static = [d.dim_value for d in tensor.shape.dim[1:] if d.HasField("dim_value")]
    return any(1 <= s <= MAX_FEATURES for s in static)


def _reads_softmax(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto]) -> bool:
    """A Conv/MatMul over a Softmax output (through reshapes): the DFL expectation, part of decoding."""
    tensor = node.input[0]
    for _ in range(MAX_DISTRIBUTION_HOPS + 1):
        source = producers.get(tensor)
        if source is None:
            return False
        if source.op_type == "Softmax":
            return True
        if source.op_type not in ("Transpose", "Reshape", "Unsqueeze", "Squeeze"):
            return False
        tensor = source.input[0]
    return False


def _carries(layer: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]]) -> str:
    """"shared" when the layer's one output is split (Split/Slice, through reshapes) into parts, i.e. carries
    coordinates and scores side by side; "separate" when it is a branch of its own (joined later by a Concat)."""
    pending = [layer.output[0]]
    while pending:
        tensor = pending.pop()
        for node in consumers.get(tensor, []):
            if node.op_type in ("Split", "Slice"):
                return "shared"
            if node.op_type in ("Reshape", "Transpose", "Unsqueeze", "Squeeze", "Flatten", "Identity"):
                pending.extend(node.output)
    return "separate"


def protect_head(proto: onnx.ModelProto, config):
    """`config` with the head's float nodes excluded and, on recognised detectors left at the default op types,
    the backbone's element-wise activations (SiLU's Sigmoid·Mul, residual Add, Concat, Split, Resize) quantized
    too, so int8 chains are not broken by float round trips; and the plan, or (config, None) when no head is found
    or `config.detection_head` is "off"."""
    plan = find_head(proto) if config.detection_head == "auto" else None
    if plan is None:
        return config, None
    op_types = config.op_types
    if tuple(op_types) == STATIC_OP_TYPES:
        op_types = STATIC_OP_TYPES + tuple(t for t in DETECTOR_BACKBONE_OPS if t not in STATIC_OP_TYPES)
    exclude = tuple(config.exclude_nodes) + tuple(n for n in plan.float_nodes if n not in config.exclude_nodes)
    return dataclasses.replace(config, exclude_nodes=exclude, op_types=op_types), plan


def explain_head(summary, plan: HeadPlan) -> None:
    """Say in the summary what the head policy kept float and why."""
    shared = set(plan.shared_layers)
    for entry in summary.left_float:
        if entry["node"] in shared:
            entry["reason"] = "detection head: its one output carries box coordinates and class scores, which no single 8-bit range holds"
        elif entry["node"] in plan.decode_nodes:
            entry["reason"] = "detection head: box decoding (DFL expectation) stays float"
    summary.notes.append(plan.describe())

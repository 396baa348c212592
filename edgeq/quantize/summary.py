"""What a quantization did: which nodes run quantized, which stayed float and why."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import onnx

from edgeq.graph import producers
from edgeq.quantize.config import COMPUTE_OP_TYPES

QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
INTEGER_OPS = {"ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QAttention", "MatMulNBits",
               "QLinearConv", "QLinearMatMul"}


@dataclass
class QuantSummary:
    precision: str
    mode: str | None
    quantized: dict[str, int] = field(default_factory=dict)       # op type -> count of nodes running quantized
    left_float: list[dict[str, str]] = field(default_factory=list)  # {node, op_type, reason}
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    calibration: dict | None = None
    recipe: dict | None = None  # the config that made the model (its `to_dict()`): Recipe.from_dict makes it again

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(before: onnx.ModelProto, after: onnx.ModelProto, op_types: tuple[str, ...] | list[str], notes: list[str],
              *, precision: str, mode: str | None) -> QuantSummary:
    """Compare the prepared and the quantized graph: a target node is quantized when it reads dequantized weights
    (static QDQ) or was replaced by an integer op (dynamic)."""
    made_by = producers(after)

    def reads_dequantized(node: onnx.NodeProto) -> bool:
        # Both the activation and the weight must come through DequantizeLinear for an int8 kernel to run.
        return all(i in made_by and made_by[i].op_type == "DequantizeLinear" for i in node.input[:2])

    quantized: Counter[str] = Counter()
    quantized_names = set()
    for node in after.graph.node:
        if node.op_type in INTEGER_OPS:
            quantized[node.op_type] += 1
        elif node.op_type in op_types and node.op_type in COMPUTE_OP_TYPES and reads_dequantized(node):
            quantized[node.op_type] += 1
            quantized_names.add(node.name)
    after_names = {n.name for n in after.graph.node}
    left = []
    initializers = {t.name for t in before.graph.initializer}
    for node in before.graph.node:
        if node.op_type not in op_types or node.op_type not in COMPUTE_OP_TYPES:
            continue
        if node.name in quantized_names or node.name not in after_names:
            continue  # quantized in place, or replaced by an integer op
        left.append({"node": node.name, "op_type": node.op_type, "reason": _reason(node, initializers)})
    return QuantSummary(precision, mode, dict(sorted(quantized.items())), left, list(notes))


def _reason(node: onnx.NodeProto, initializers: set[str]) -> str:
    if node.op_type in ("MatMul", "Gemm", "Conv", "ConvTranspose") and not any(i in initializers for i in node.input[1:2]):
        return "weight is computed at run time (not a constant)"
    return "excluded, or its input type is not float32"

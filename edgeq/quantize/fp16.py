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
import re
from collections import Counter

import onnx

from edgeq.errors import ModelError
from edgeq.model import Model
from edgeq.quantize.config import Fp16
from edgeq.quantize.fp16_plan import Plan, make_plan
from edgeq.quantize.fp16_rewrite import Stats, rewrite
from edgeq.quantize.fp16_types import node_domain, opset_versions, ort_has_fp16_kernel, tensor_types
from edgeq.quantize.prepare import working_copy
from edgeq.quantize.subgraphs import merge, quantize_bodies
from edgeq.quantize.summary import QuantSummary
from edgeq.runtimes import ONNX_RUNTIME

# ORT's load check rejects one node per attempt; more failures than this means something else is wrong.
MAX_LOAD_ATTEMPTS = 20
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
    source, notes = working_copy(model)
    types, warnings = tensor_types(source)
    inside = quantize_bodies(source, source, functools.partial(_convert_body, config=config))
    rejected: dict[str, str] = {}
    for _ in range(MAX_LOAD_ATTEMPTS):
        plan = make_plan(source, types, config, rejected)
        result, stats = rewrite(source, types, plan, config.keep_io_types)
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


def _load_failure(proto: onnx.ModelProto) -> str | None:
    """ONNX Runtime's error when the CPU provider cannot create a session for the model, else None."""
    if proto.ByteSize() >= _PROTOBUF_LIMIT:
        return None  # too large to hand over in memory; edgeq's save() verifies the written file
    try:
        ONNX_RUNTIME.open_graph(proto)
    except Exception as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def _rejected_node(failure: str, plan: Plan, source: onnx.ModelProto) -> str | None:
    """The float16 node ONNX Runtime names in its error; None when the original model fails to load as well.
    Any other failure is edgeq's bug: reported, not guessed around."""
    match = re.search(r"node with name '([^']*)'", failure)
    if match is not None and match.group(1) in {source.graph.node[i].name for i in plan.slots}:
        return match.group(1)
    if _load_failure(source) is not None:
        return None
    raise ModelError(f"the float16 model fails to load in ONNX Runtime: {failure[:300]}",
                     "report this with the model; Fp16(block_ops=...) can keep the failing op types in float32")


def _summary(proto: onnx.ModelProto, plan: Plan, stats: Stats, notes: list[str], warnings: list[str],
             config: Fp16) -> QuantSummary:
    nodes = proto.graph.node
    opsets = opset_versions(proto)
    converted = Counter(nodes[i].op_type for i in plan.slots)
    left = [{"node": nodes[i].name, "op_type": nodes[i].op_type, "reason": reason} for i, reason in sorted(plan.kept.items())]
    notes = list(notes)
    if stats.fp16_initializers:
        notes.append(f"stored {stats.fp16_initializers} initializers in float16 "
                     f"({_size(stats.bytes_before)} -> {_size(stats.bytes_after)} of float weights)")
    notes.append(f"inserted {stats.casts} Cast nodes at float16/float32 boundaries"
                 + ("" if config.keep_io_types else "; graph inputs and outputs are float16"))
    upcast = sorted({nodes[i].op_type for i in plan.slots
                     if not ort_has_fp16_kernel(node_domain(nodes[i]), nodes[i].op_type, opsets.get(node_domain(nodes[i]), 1))})
    if upcast:
        notes.append(f"ONNX Runtime's CPU provider has no float16 kernel for {', '.join(upcast)}: it casts them to "
                     "float32 at load time (float16 storage, float32 arithmetic: smaller, not faster, on this CPU)")
    warnings = list(warnings)
    if plan.unknown_block_nodes:
        warnings.append(f"block_nodes names no node of the model: {', '.join(plan.unknown_block_nodes)}")
    return QuantSummary("fp16", None, dict(sorted(converted.items())), left, notes, warnings)


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"

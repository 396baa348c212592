"""INT4 weight-only quantization: block-wise along the reduction axis, activations stay float.

MatMul/Gemm weights become ONNX Runtime's `MatMulNBits` (com.microsoft), the format its CPU provider runs fastest
(measured in bench/int4.py against standard blocked DequantizeLinear → MatMul at opset 21); embeddings (Gather) can
become `GatherBlockQuantized`. Algorithms: `rtn` (round to nearest), `gptq` (second-order error compensation with
the Hessian of calibration inputs), `adaround` (learned rounding on RTN's grid, int4_adaround.py) and `awq` (activation-aware per-channel scales and clipping, see awq.py). Layers
can stay at INT8 (MatMulNBits with bits=8): named ones, the first and last, or the most sensitive by the relative
output error that INT4 gives them on the calibration data.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.data import Dataset, batches
from edgeq.errors import ConfigError, DataError
from edgeq.model import Model
from edgeq.progress import track
from edgeq.quantize.awq import quantize_awq
from edgeq.quantize.config import Int4WeightOnly
from edgeq.quantize.gptq import hessian, quantize_gptq
from edgeq.quantize.int4_adaround import quantize_adaround
from edgeq.quantize.packing import BlockQuant, dq_tensors, nbits_tensors, pack_int4, quantize_rtn
from edgeq.quantize.prepare import INT4_OPSET
from edgeq.quantize.summary import QuantSummary
from edgeq.runtimes import ONNX_RUNTIME

# "auto" is GPTQ when calibration data is given, RTN without: on the docstring LM (bench/int4.py, bench/RESULTS.md)
# GPTQ costs +0.05% perplexity against RTN's +0.27%, for 4 s instead of 0.3 s of quantization time.
DATA_AWARE_DEFAULT = "gptq"
DATA_ALGORITHMS = ("gptq", "awq", "adaround")
MS_DOMAIN = "com.microsoft"


@dataclass
class Target:
    """A MatMul/Gemm whose weight W[K, N] is a constant; `bias` is Gemm's C when there is one."""

    node: onnx.NodeProto
    weight: np.ndarray
    activation: str
    bias: str | None = None


@dataclass
class ActStats:
    """Calibration statistics of one activation x[..., K]: H = XᵀX / rows (float64) and mean |x| per channel."""

    h: np.ndarray
    absmean: np.ndarray
    rows: int


def quantize_int4(model: Model, config: Int4WeightOnly, calib: Dataset | None = None) -> tuple[Model, QuantSummary]:
    _check(config, calib)
    chosen = config.algorithm == "auto"
    if chosen:
        config = dataclasses.replace(config, algorithm=DATA_AWARE_DEFAULT if calib is not None else "rtn")
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    notes: list[str] = []
    inits = {t.name: t for t in proto.graph.initializer}
    targets, skipped = find_targets(proto, config)
    needs_data = calib is not None and (config.algorithm in DATA_ALGORITHMS or config.int8_auto > 0)
    stats, samples = collect_stats(model, targets, calib, config) if needs_data else ({}, 0)
    if config.algorithm == "awq":
        quants, awq_notes = quantize_awq(proto, targets, stats, config)
        notes.extend(awq_notes)
    else:
        layers = track(targets, f"int4 {config.algorithm}: layers", total=len(targets))
        quants = {t.node.name: _quantize(t, config, stats.get(t.activation)) for t in layers}
    int8 = choose_int8(targets, quants, stats, config)
    if int8:
        notes.append(f"kept at INT8: {', '.join(sorted(int8))}")
    for t in targets:
        if t.node.name in int8:
            quants[t.node.name] = quantize_rtn(t.weight, config.block_size, bits=8, symmetric=config.symmetric)
    new_nodes, used = [], set()
    replace = {id(t.node): t for t in targets}
    for node in proto.graph.node:
        t = replace.get(id(node))
        if t is None:
            new_nodes.append(node)
            continue
        used.update(i for i in node.input[1:])
        nodes, tensors = _emit(t, quants[t.node.name], config)
        new_nodes.extend(nodes)
        proto.graph.initializer.extend(tensors)
    embedded = 0
    if config.embeddings:
        new_nodes, embedded = _quantize_embeddings(new_nodes, proto, inits, config, used, skipped)
    del proto.graph.node[:]
    proto.graph.node.extend(new_nodes)
    _drop_unused(proto)
    _set_opsets(proto, config)
    quantized = {}
    for t in targets:
        kind = "MatMulNBits" if config.format == "nbits" else t.node.op_type
        quantized[kind] = quantized.get(kind, 0) + 1
    if embedded:
        quantized["GatherBlockQuantized"] = embedded
    if chosen:
        notes.append(f"algorithm {config.algorithm}: " + ("data-aware, because calibration data was given" if calib is not None
                                                          else "round to nearest, because no calibration data was given"))
    notes.append(f"INT4 {config.algorithm}, block {config.block_size} along K, {'symmetric' if config.symmetric else 'asymmetric'}, "
                 f"{'MatMulNBits' if config.format == 'nbits' else 'DequantizeLinear (opset 21)'}")
    summary = QuantSummary("int4", config.algorithm, dict(sorted(quantized.items())), skipped, notes)
    if stats:
        summary.calibration = {"method": config.algorithm, "samples": samples}
    if not targets:
        summary.warnings.append("no MatMul/Gemm with a constant 2-D weight was found: the model stays FP32")
    return Model(proto, model.path), summary


def _check(config: Int4WeightOnly, calib: Dataset | None) -> None:
    if config.algorithm in DATA_ALGORITHMS and calib is None:
        raise DataError(f"{config.algorithm.upper()} needs calibration data",
                        "pass --calib DATA (a few hundred sequences), or use --algorithm rtn")


def find_targets(proto: onnx.ModelProto, config: Int4WeightOnly) -> tuple[list[Target], list[dict[str, str]]]:
    """MatMul/Gemm nodes with a constant float 2-D weight whose K allows a block; the others, with a reason."""
    inits = {t.name: t for t in proto.graph.initializer}
    targets, skipped = [], []
    for i, node in enumerate(proto.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
        if node.op_type not in config.op_types or node.op_type not in ("MatMul", "Gemm"):
            continue
        if node.name in config.exclude_nodes:
            skipped.append({"node": node.name, "op_type": node.op_type, "reason": "excluded"})
            continue
        init = inits.get(node.input[1]) if len(node.input) > 1 else None
        if init is None or init.data_type != TensorProto.FLOAT:
            reason = "weight is computed at run time (not a constant)" if init is None else "weight is not float32"
            skipped.append({"node": node.name, "op_type": node.op_type, "reason": reason})
            continue
        w = numpy_helper.to_array(init)
        bias = None
        if node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                skipped.append({"node": node.name, "op_type": "Gemm", "reason": "transA, alpha or beta is not the default"})
                continue
            w = w.T if attrs.get("transB", 0) else w
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            if bias is not None and (bias not in inits or numpy_helper.to_array(inits[bias]).ndim != 1):
                skipped.append({"node": node.name, "op_type": "Gemm", "reason": "bias is not a constant vector"})
                continue
        if w.ndim != 2 or w.shape[0] < 16:
            skipped.append({"node": node.name, "op_type": node.op_type, "reason": f"weight shape {list(w.shape)} is not 2-D with K ≥ 16"})
            continue
        targets.append(Target(node, np.ascontiguousarray(w, np.float32), node.input[0], bias))
    return targets, skipped


def collect_stats(model: Model, targets: list[Target], calib: Dataset, config: Int4WeightOnly) -> tuple[dict[str, ActStats], int]:
    """ActStats of every distinct activation feeding a target, from one streaming pass over `calib` (memory K² per
    activation, whatever the number of samples); and the number of samples used."""
    names = sorted({t.activation for t in targets})
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    outputs = {o.name for o in proto.graph.output}
    for name in names:
        if name not in outputs:
            proto.graph.output.append(helper.make_empty_tensor_value_info(name))
    session = ONNX_RUNTIME.open_graph(proto, threads=config.threads)
    sums: dict[str, np.ndarray] = {}
    abs_sums: dict[str, np.ndarray] = {}
    rows: dict[str, int] = dict.fromkeys(names, 0)
    seen = 0
    for batch in track(batches(calib, model.inputs, config.batch_size), "int4: activation statistics"):
        if config.max_samples is not None and seen >= config.max_samples:
            break
        feed = batch.inputs
        if config.max_samples is not None:
            feed = {k: v[:config.max_samples - seen] for k, v in feed.items()}
        seen += len(next(iter(feed.values())))
        for name, x in zip(names, session.run(names, feed)):
            x = np.asarray(x, np.float32)
            sums[name] = sums.get(name, 0) + hessian(x)
            abs_sums[name] = abs_sums.get(name, 0) + np.abs(x.reshape(-1, x.shape[-1])).sum(axis=0, dtype=np.float64)
            rows[name] += int(x.size // x.shape[-1])
    if not seen:
        raise DataError("the calibration data is empty", "give a few hundred representative samples")
    return {name: ActStats(sums[name] / max(rows[name], 1), abs_sums[name] / max(rows[name], 1), rows[name])
            for name in names if name in sums}, seen


def _quantize(t: Target, config: Int4WeightOnly, stats: ActStats | None) -> BlockQuant:
    if config.algorithm == "gptq" and stats is not None:
        return quantize_gptq(t.weight, stats.h, config.block_size, 4, config.symmetric, damp=config.damp)
    if config.algorithm == "adaround" and stats is not None:
        return quantize_adaround(t.weight, stats.h, stats.rows, config.block_size, 4, config.symmetric)
    return quantize_rtn(t.weight, config.block_size, 4, config.symmetric)


def sensitivity(t: Target, q: BlockQuant, stats: ActStats | None) -> float:
    """Relative output error of a layer: ‖X(Ŵ − W)‖² / ‖XW‖² with the calibration Hessian, ‖Ŵ − W‖² / ‖W‖² without."""
    d = q.dequantize().astype(np.float64) - t.weight
    w = t.weight.astype(np.float64)
    if stats is None:
        return float((d ** 2).sum() / max((w ** 2).sum(), 1e-30))
    hh = stats.h
    return float(np.einsum("kn,kj,jn->", d, hh, d) / max(np.einsum("kn,kj,jn->", w, hh, w), 1e-30))


def choose_int8(targets: list[Target], quants: dict[str, BlockQuant], stats: dict[str, ActStats], config: Int4WeightOnly) -> set[str]:
    """Node names kept at INT8: the named ones, first and last (when asked), and the `int8_auto` most sensitive."""
    names = {t.node.name for t in targets}
    unknown = [n for n in config.int8_layers if n not in names]
    if unknown:
        raise ConfigError(f"--int8-layers names nodes that are not quantizable MatMul/Gemm: {', '.join(unknown[:5])}",
                          f"use node names such as {', '.join(sorted(names)[:3])}")
    chosen = set(config.int8_layers)
    if config.int8_first_last and targets:
        chosen |= {targets[0].node.name, targets[-1].node.name}
    if config.int8_auto:
        scores = {t.node.name: sensitivity(t, quants[t.node.name], stats.get(t.activation)) for t in targets}
        ranked = sorted((n for n in scores if n not in chosen), key=lambda n: -scores[n])
        chosen |= set(ranked[:config.int8_auto])
    return chosen


def _emit(t: Target, q: BlockQuant, config: Int4WeightOnly) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    base = t.node.input[1]
    k, n = t.weight.shape
    out = t.node.output[0]
    if config.format == "nbits" or q.bits == 8:
        b, scales, zp = nbits_tensors(q)
        tensors = [numpy_helper.from_array(b, f"{base}_q{q.bits}"), numpy_helper.from_array(scales, f"{base}_scales")]
        inputs = [t.activation, tensors[0].name, tensors[1].name]
        inputs.append("")
        if zp is not None:
            tensors.append(numpy_helper.from_array(zp, f"{base}_zp"))
            inputs[3] = tensors[-1].name
        if t.bias:
            inputs += ["", t.bias]
        while inputs and not inputs[-1]:
            inputs.pop()
        attrs = {"K": k, "N": n, "bits": q.bits, "block_size": q.block}
        if config.accuracy_level:
            attrs["accuracy_level"] = config.accuracy_level
        return [helper.make_node("MatMulNBits", inputs, [out], name=t.node.name + "_Q4", domain=MS_DOMAIN, **attrs)], tensors
    codes, scales, zp = dq_tensors(q)
    kind = TensorProto.INT4 if q.symmetric else TensorProto.UINT4
    qw = helper.make_tensor(f"{base}_q4", kind, [k, n], pack_int4(codes).tobytes(), raw=True)
    tensors = [qw, numpy_helper.from_array(scales, f"{base}_scales")]
    dq_in = [qw.name, tensors[1].name]
    if zp is not None:
        tensors.append(helper.make_tensor(f"{base}_zp", kind, list(zp.shape), pack_int4(zp).tobytes(), raw=True))
        dq_in.append(tensors[-1].name)
    w_name = f"{base}_dq"
    nodes = [helper.make_node("DequantizeLinear", dq_in, [w_name], name=t.node.name + "_DQ", axis=0, block_size=q.block)]
    if t.bias:
        mm = f"{out}_mm"
        nodes += [helper.make_node("MatMul", [t.activation, w_name], [mm], name=t.node.name),
                  helper.make_node("Add", [mm, t.bias], [out], name=t.node.name + "_bias")]
    else:
        nodes.append(helper.make_node("MatMul", [t.activation, w_name], [out], name=t.node.name))
    return nodes, tensors


def _quantize_embeddings(nodes: list[onnx.NodeProto], proto: onnx.ModelProto, inits: dict, config: Int4WeightOnly,
                         used: set[str], skipped: list[dict]) -> tuple[list[onnx.NodeProto], int]:
    """Gather over a constant table [V, D] → GatherBlockQuantized, int4 symmetric blocks along D."""
    out, count = [], 0
    readers: dict[str, int] = {}
    for node in nodes:
        for i in node.input:
            readers[i] = readers.get(i, 0) + 1
    for node in nodes:
        table = inits.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        if table is None or table.data_type != TensorProto.FLOAT or axis != 0 or len(table.dims) != 2 \
                or table.dims[1] % config.block_size or readers.get(node.input[0], 0) > 1 or node.input[0] in used:
            if table is not None and node.op_type == "Gather":
                skipped.append({"node": node.name, "op_type": "Gather", "reason": "table shared, not 2-D, or D not a multiple of the block"})
            out.append(node)
            continue
        w = numpy_helper.to_array(table).astype(np.float32)
        q = quantize_rtn(w.T, config.block_size, 4, symmetric=True)  # blocks along D for every row
        codes, scales, _ = dq_tensors(q)  # codes[D, V] → transpose back
        data = helper.make_tensor(f"{table.name}_q4", TensorProto.INT4, list(w.shape), pack_int4(codes.T).tobytes(), raw=True)
        sc = numpy_helper.from_array(np.ascontiguousarray(scales.T), f"{table.name}_scales")
        proto.graph.initializer.extend([data, sc])
        out.append(helper.make_node("GatherBlockQuantized", [data.name, node.input[1], sc.name], list(node.output),
                                    name=node.name + "_Q4", domain=MS_DOMAIN, gather_axis=0, quantize_axis=1,
                                    block_size=config.block_size))
        count += 1
    return out, count


def _drop_unused(proto: onnx.ModelProto) -> None:
    needed = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
    for a in proto.graph.node:
        for attr in a.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                needed |= {i for n in attr.g.node for i in n.input}
    removed = {t.name for t in proto.graph.initializer if t.name not in needed}
    kept = [t for t in proto.graph.initializer if t.name in needed]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    inputs = [v for v in proto.graph.input if v.name not in removed]
    del proto.graph.input[:]
    proto.graph.input.extend(inputs)


def _set_opsets(proto: onnx.ModelProto, config: Int4WeightOnly) -> None:
    domains = {o.domain for o in proto.opset_import}
    if MS_DOMAIN not in domains and any(n.domain == MS_DOMAIN for n in proto.graph.node):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    if config.format == "qdq":
        for o in proto.opset_import:
            if o.domain in ("", "ai.onnx") and o.version < INT4_OPSET:
                o.version = INT4_OPSET
        proto.ir_version = max(proto.ir_version, 10)

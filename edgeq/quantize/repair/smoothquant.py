"""SmoothQuant (Xiao et al. 2023; as in Intel Neural Compressor and NNCF): a MatMul/Gemm input X with a few huge
channels is hard to quantize per tensor, its weight is easy. With per-input-channel s_j = max|X_j|^a / max|W_j|^(1-a),
X/s and s·W give the same product: a Mul by 1/s is inserted before each group of layers reading the same
activation, and the weights absorb s. FP32 outputs are unchanged up to float rounding.
"""
from __future__ import annotations

import numpy as np
import onnx

from edgeq.quantize.repair.graph import Weights, attr, consumers, is_float_weight


def smoothable(proto: onnx.ModelProto, exclude: tuple[str, ...] = ()) -> dict[str, list[onnx.NodeProto]]:
    """Activation name → the MatMul/Gemm nodes that read it as input A with a constant 2-D weight B."""
    weights = Weights(proto)
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        if node.name in exclude or node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        if not is_float_weight(weights, node.input[1]) or len(weights.tensors[node.input[1]].dims) != 2:
            continue
        if node.op_type == "Gemm" and attr(node, "transA", 0):
            continue
        if node.input[0] in weights:
            continue
        groups.setdefault(node.input[0], []).append(node)
    # a weight shared with another reader cannot absorb a scale that only this activation carries
    users = consumers(proto)
    return {x: nodes for x, nodes in groups.items()
            if all(len(users[n.input[1]]) == 1 for n in nodes)}


def _weight_in_axis(node: onnx.NodeProto) -> int:
    """Axis of B that runs over X's channels (K)."""
    return 1 if node.op_type == "Gemm" and attr(node, "transB", 0) else 0


def smooth(proto: onnx.ModelProto, absmax: dict[str, np.ndarray], alpha: float = 0.5) -> int:
    """Apply SmoothQuant in place given per-channel max |X| of each activation (last axis); returns how many
    activations were smoothed.

    >>> smooth(prepared.proto, {"ln_out": np.array([0.5, 40.0, 0.7])}, alpha=0.5)   # doctest: +SKIP
    1
    """
    weights = Weights(proto)
    groups = smoothable(proto)
    done = 0
    for x, nodes in groups.items():
        a = absmax.get(x)
        if a is None:
            continue
        w_max = None
        for node in nodes:
            w = weights.get(node.input[1])
            per_k = np.abs(w).max(axis=1 - _weight_in_axis(node))
            if len(per_k) != len(a):
                w_max = None
                break
            w_max = per_k if w_max is None else np.maximum(w_max, per_k)
        if w_max is None:
            continue
        s = np.where((a > 0) & (w_max > 0), a ** alpha / np.maximum(w_max, 1e-12) ** (1 - alpha), 1.0)
        s = np.clip(s, 1e-5, 1e5)
        inv_name, smoothed = f"{x}_smooth_inv_scale", f"{x}_smoothed"
        weights.add(inv_name, (1.0 / s).astype(np.float32))
        mul = onnx.helper.make_node("Mul", [x, inv_name], [smoothed], name=f"{x}_SmoothQuant")
        first = min(list(proto.graph.node).index(n) for n in nodes)
        proto.graph.node.insert(first, mul)
        for node in nodes:
            node.input[0] = smoothed
            w = weights.get(node.input[1])
            weights.set(node.input[1], w * (s[:, None] if _weight_in_axis(node) == 0 else s[None, :]))
        done += 1
    return done

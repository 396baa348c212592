"""Cross-layer equalization (Nagel et al., "Data-Free Quantization", 2019; as in AIMET and NNCF).

For a layer A feeding a layer B through ops that commute with positive per-channel scaling (ReLU, max/average
pooling), output channel i of A is divided by s_i and input channel i of B multiplied by s_i, with
s_i = sqrt(r1_i / r2_i) (r1: range of A's weights for channel i, r2: range of B's weights reading channel i), so both
become sqrt(r1_i r2_i). FP32 outputs are unchanged up to float rounding. Depthwise convolutions (the layers whose
per-channel ranges differ most after BatchNorm folding) are handled as grouped convolutions.
"""
from __future__ import annotations

import numpy as np
import onnx

from edgeq.graph import Weights, attr, consumers, is_float_weight

# ops between A and B that commute with a positive per-channel scale
PASS_THROUGH = ("Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")
LAYERS = ("Conv", "Gemm")


def _pairs(proto: onnx.ModelProto, weights: Weights) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    users = consumers(proto)
    outputs = {o.name for o in proto.graph.output}
    weight_uses = {}
    for node in proto.graph.node:
        for name in node.input[1:]:
            weight_uses[name] = weight_uses.get(name, 0) + 1
    pairs = []
    for a in proto.graph.node:
        if not _equalizable(a, weights, weight_uses):
            continue
        tensor = a.output[0]
        while True:
            if tensor in outputs or len(users.get(tensor, [])) != 1:
                break
            nxt = users[tensor][0]
            if nxt.op_type in PASS_THROUGH and nxt.input[0] == tensor:
                tensor = nxt.output[0]
                continue
            if _equalizable(nxt, weights, weight_uses) and nxt.input[0] == tensor:
                pairs.append((a, nxt))
            break
    return pairs


def _equalizable(node: onnx.NodeProto, weights: Weights, weight_uses: dict[str, int]) -> bool:
    if node.op_type not in LAYERS or len(node.input) < 2 or not is_float_weight(weights, node.input[1]):
        return False
    if weight_uses.get(node.input[1], 0) != 1 or (len(node.input) > 2 and node.input[2] and weight_uses.get(node.input[2], 0) != 1):
        return False
    if node.op_type == "Gemm" and (attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1.0):
        return False
    return len(node.input) < 3 or not node.input[2] or is_float_weight(weights, node.input[2])


def _out_view(node: onnx.NodeProto, w: np.ndarray) -> np.ndarray:
    """Weights as (output channels, everything else)."""
    if node.op_type == "Gemm" and not attr(node, "transB", 0):
        return w.T
    return w.reshape(w.shape[0], -1)


def _in_scale(node: onnx.NodeProto, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """B's weights with input channel i multiplied by s_i (grouped convolutions: channel i lives in group i // Ig)."""
    if node.op_type == "Gemm":
        return w * (s[None, :] if attr(node, "transB", 0) else s[:, None])
    groups = attr(node, "group", 1)
    out_ch, in_per_group = w.shape[0], w.shape[1]
    group_of_out = np.arange(out_ch) // (out_ch // groups)
    index = group_of_out[:, None] * in_per_group + np.arange(in_per_group)[None, :]
    return w * s[index].reshape(out_ch, in_per_group, *([1] * (w.ndim - 2)))


def _in_ranges(node: onnx.NodeProto, w: np.ndarray, channels: int) -> np.ndarray | None:
    if node.op_type == "Gemm":
        r = np.abs(w).max(axis=0 if attr(node, "transB", 0) else 1)
        return r if len(r) == channels else None
    groups = attr(node, "group", 1)
    out_ch, in_per_group = w.shape[0], w.shape[1]
    if in_per_group * groups != channels:
        return None
    per = np.abs(w).reshape(groups, out_ch // groups, in_per_group, -1).max(axis=(1, 3))  # (groups, in_per_group)
    return per.reshape(-1)


def equalize(proto: onnx.ModelProto, sweeps: int = 20, tolerance: float = 1e-3) -> int:
    """Equalize every A→B pair in place, sweeping until the scales settle; returns the number of pairs.

    >>> pairs = equalize(prepared.proto)          # doctest: +SKIP
    """
    weights = Weights(proto)
    pairs = _pairs(proto, weights)
    for _ in range(sweeps):
        largest = 0.0
        for a, b in pairs:
            w1, w2 = weights.get(a.input[1]), weights.get(b.input[1])
            out1 = _out_view(a, w1)
            r1 = np.abs(out1).max(axis=1)
            r2 = _in_ranges(b, w2, len(r1))
            if r2 is None:
                continue
            if len(a.input) > 2 and a.input[2] and weights.tensors[a.input[2]].dims and np.prod(weights.tensors[a.input[2]].dims) != len(r1):
                continue
            s = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.where(r2 > 0, r2, 1.0)), 1.0)
            largest = max(largest, float(np.abs(np.log(s)).max()))
            scaled = out1 / s[:, None]
            weights.set(a.input[1], scaled.T if a.op_type == "Gemm" and not attr(a, "transB", 0) else scaled.reshape(w1.shape))
            if len(a.input) > 2 and a.input[2]:
                bias = weights.get(a.input[2])
                weights.set(a.input[2], (bias.reshape(-1) / s).reshape(bias.shape))
            weights.set(b.input[1], _in_scale(b, w2, s))
        if largest < tolerance:
            break
    return len(pairs)

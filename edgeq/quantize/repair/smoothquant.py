"""SmoothQuant (Xiao et al. 2023; as in Intel Neural Compressor and NNCF): a MatMul/Gemm input X with a few huge
channels is hard to quantize per tensor, its weight is easy. With per-input-channel s_j = max|X_j|^a / max|W_j|^(1-a),
X/s and s·W give the same product: a Mul by 1/s is inserted before each group of layers reading the same
activation, and the weights absorb s. FP32 outputs are unchanged up to float rounding.

One alpha rarely suits every layer (Intel Neural Compressor's "auto" alpha): `choose_alphas` simulates each group's
INT8 product Q(X/s)·Q(s·W) on a sample of calibration rows for a grid of alphas, and keeps, per activation, the alpha
with the least output error, or no smoothing when that is best.
"""
from __future__ import annotations

import numpy as np
import onnx

from edgeq.graph import Weights, attr, consumers, is_float_weight


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


def smoothing_scales(x_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), 1 where a channel is all zero, bounded to keep float32 exact-ish."""
    s = np.where((x_absmax > 0) & (w_absmax > 0), x_absmax ** alpha / np.maximum(w_absmax, 1e-12) ** (1 - alpha), 1.0)
    return np.clip(s, 1e-5, 1e5)


def _weight_absmax(weights: Weights, nodes: list[onnx.NodeProto], x_absmax: np.ndarray | None) -> np.ndarray | None:
    """Per input channel max |W| over the group's weights; None when a weight's K does not match X's channels."""
    if x_absmax is None:
        return None
    w_max = None
    for node in nodes:
        per_k = np.abs(weights.get(node.input[1])).max(axis=1 - _weight_in_axis(node))
        if len(per_k) != len(x_absmax):
            return None
        w_max = per_k if w_max is None else np.maximum(w_max, per_k)
    return w_max


def _weight_in_axis(node: onnx.NodeProto) -> int:
    """Axis of B that runs over X's channels (K)."""
    return 1 if node.op_type == "Gemm" and attr(node, "transB", 0) else 0


def smooth(proto: onnx.ModelProto, absmax: dict[str, np.ndarray], alpha: float | dict[str, float] = 0.5) -> int:
    """Apply SmoothQuant in place given per-channel max |X| of each activation (last axis), with one alpha or one
    per activation (an activation missing from the dict is left alone); returns how many activations were smoothed.

    >>> smooth(prepared.proto, {"ln_out": np.array([0.5, 40.0, 0.7])}, alpha=0.5)   # doctest: +SKIP
    1
    """
    weights = Weights(proto)
    groups = smoothable(proto)
    done = 0
    for x, nodes in groups.items():
        a = absmax.get(x)
        strength = alpha.get(x) if isinstance(alpha, dict) else alpha
        w_max = _weight_absmax(weights, nodes, a)
        if a is None or strength is None or w_max is None:
            continue
        s = smoothing_scales(a, w_max, strength)
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


ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def choose_alphas(proto: onnx.ModelProto, samples: dict[str, np.ndarray], ranges: dict[str, tuple[np.ndarray, np.ndarray]],
                  *, symmetric_activations: bool, per_channel: bool, grid: tuple[float, ...] = ALPHA_GRID) -> dict[str, float]:
    """Per activation, the alpha whose simulated INT8 group output Q(X/s)·Q(s·W) is closest to X·W on `samples`
    (rows of X, channels last), or no entry when not smoothing is closer. `ranges` are X's per-channel (low, high)
    over all the calibration data, so the activation range simulated is the one the quantizer will calibrate."""
    weights = Weights(proto)
    chosen = {}
    for x, nodes in smoothable(proto).items():
        rows, bounds = samples.get(x), ranges.get(x)
        if rows is None or bounds is None:
            continue
        low, high = (np.asarray(b, np.float64) for b in bounds)
        absmax = np.maximum(np.abs(low), np.abs(high))
        w_max = _weight_absmax(weights, nodes, absmax)
        if w_max is None:
            continue
        mats = [_as_k_by_n(weights.get(n.input[1]), n) for n in nodes]
        exact = [rows @ w for w in mats]

        def error(s: np.ndarray) -> float:
            xq = _fake_quant_activation(rows / s, low / s, high / s, symmetric_activations)
            return sum(float(np.sum((xq @ _fake_quant_weight(w * s[:, None], per_channel) - y) ** 2)) for w, y in zip(mats, exact))

        errors = {alpha: error(smoothing_scales(absmax, w_max, alpha)) for alpha in grid}
        best = min(errors, key=errors.get)
        if errors[best] < error(np.ones_like(absmax)):
            chosen[x] = best
    return chosen


def _as_k_by_n(w: np.ndarray, node: onnx.NodeProto) -> np.ndarray:
    return w if _weight_in_axis(node) == 0 else w.T


def _fake_quant_activation(x: np.ndarray, low: np.ndarray, high: np.ndarray, symmetric: bool) -> np.ndarray:
    """Per-tensor int8 (symmetric) or uint8 (asymmetric, zero exactly representable) quantize-dequantize."""
    lo, hi = min(float(low.min()), 0.0), max(float(high.max()), 0.0)
    if symmetric:
        step = max(abs(lo), abs(hi)) / 127 or 1.0
        return np.clip(np.rint(x / step), -127, 127) * step
    step = (hi - lo) / 255 or 1.0
    zero = np.rint(-lo / step)
    return (np.clip(np.rint(x / step) + zero, 0, 255) - zero) * step


def _fake_quant_weight(w: np.ndarray, per_channel: bool) -> np.ndarray:
    """Symmetric int8 weights, one scale per output column (per channel) or for the whole matrix."""
    absmax = np.abs(w).max(axis=0, keepdims=True) if per_channel else np.abs(w).max()
    step = np.where(absmax > 0, absmax / 127, 1.0)
    return np.clip(np.rint(w / step), -127, 127) * step


def sample_rows(model, data, names: list[str], *, rows: int = 2048, batch_size: int = 16, max_samples: int | None = None,
                seed: int = 0) -> dict[str, np.ndarray]:
    """A uniform sample (reservoir: constant memory) of `rows` rows of each named activation, flattened to
    [rows, channels] along the last axis, from one pass over `data` (its first `max_samples` samples)."""
    from edgeq.calibrate import collect
    from edgeq.calibrate.collectors import Reservoir

    reservoir = Reservoir(list(names), rows=rows, seed=seed, max_samples=max_samples)
    collect(model, data, [reservoir], batch_size=batch_size, label="smoothquant: sampling activations")
    return reservoir.kept

"""Weight range setting: per channel (or per tensor), the symmetric int8 clipping range that minimises the weight's
squared quantization error, found by a grid search over clipping ratios (exact, on the weights themselves)."""
from __future__ import annotations

import numpy as np
import onnx

from edgeq.graph import Weights, is_float_weight, output_channel_axis

RATIOS = np.linspace(0.3, 1.0, 71)


def best_clip(w: np.ndarray, axis: int | None, qmax: int = 127, ratios: np.ndarray = RATIOS) -> np.ndarray:
    """Per-channel absolute clipping thresholds (one per slice along `axis`, or a single one when None) minimising
    sum((dequant(quant(clip(w))) - w)^2) over the candidate ratios of each channel's max |w|.

    >>> w = np.array([[0.1, -0.2, 0.15, 5.0], [0.1, 0.2, -0.3, 0.25]])
    >>> best_clip(w, axis=0).tolist()          # a lone large weight costs more clipped than rounded: min/max stays
    [5.0, 0.3]
    >>> x = np.linspace(-1, 1, 1001)
    >>> x[0] = -1.5                            # 4 bits: the rounding error of 1000 weights outweighs clipping one
    >>> round(float(best_clip(x, axis=None, qmax=7)[0]), 3)
    0.945
    """
    flat = np.abs(w).reshape(1, -1) if axis is None else np.moveaxis(np.abs(w), axis, 0).reshape(w.shape[axis], -1)
    signed = w.reshape(1, -1) if axis is None else np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    absmax = flat.max(axis=1)
    best_err = np.full(len(absmax), np.inf)
    best = absmax.copy()
    for r in ratios[::-1]:  # ratio 1.0 first: ties keep plain min/max
        t = absmax * r
        scale = np.where(t > 0, t / qmax, 1.0)[:, None]
        deq = np.clip(np.rint(signed / scale), -qmax, qmax) * scale
        err = ((deq - signed) ** 2).sum(axis=1)
        better = err < best_err * (1 - 1e-9)
        best_err = np.where(better, err, best_err)
        best = np.where(better, t, best)
    return best


def clip_weights(proto: onnx.ModelProto, op_types: tuple[str, ...], *, per_channel: bool, exclude: tuple[str, ...] = (),
                 qmax: int = 127) -> int:
    """Clip, in place, the constant weights of the quantized op types to their error-minimising symmetric range, so
    that the quantizer's min/max weight scales become those ranges. Returns how many weights changed."""
    weights = Weights(proto)
    changed = 0
    seen = set()
    for node in proto.graph.node:
        if node.op_type not in op_types or node.name in exclude or len(node.input) < 2:
            continue
        name = node.input[1]
        if name in seen or not is_float_weight(weights, name):
            continue
        seen.add(name)
        w = weights.get(name)
        axis = output_channel_axis(node, w.ndim)
        if axis is None:
            continue
        t = best_clip(w, axis if per_channel else None, qmax=qmax)
        if np.all(t >= np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis) if per_channel else None) - 1e-12):
            continue
        shape = [1] * w.ndim
        if per_channel:
            shape[axis] = -1
        bound = t.reshape(shape) if per_channel else t[0]
        weights.set(name, np.clip(w, -bound, bound))
        changed += 1
    return changed

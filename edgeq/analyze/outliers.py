"""Weight outliers per layer and output channel: how far max|w| sits from a robust spread of the weights, what step
a per-tensor and a per-channel int8 range would give, and how many weights those steps round to zero."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from edgeq.quantize.qdq import quantizable_layers

# A Gaussian's max over a few thousand weights sits ~4 robust sigmas out; 12 means a handful of weights own the range.
OUTLIER_RATIO = 12.0
# Per-tensor scales are set by the widest channel: past 4× the median channel's range, narrow channels lose most bits.
CHANNEL_SPREAD = 4.0
# When this share of a channel's weights rounds to zero even per channel, the layer needs clipping or float.
ZEROED_LIMIT = 0.25
QMAX = 127


@dataclass
class LayerOutliers:
    node: str
    op_type: str
    weights: int
    max_abs: float
    outlier_ratio: float              # max over channels of max|w| / robust sigma (1.4826 × MAD)
    worst_channel: int
    channel_spread: float             # widest channel's max|w| / median channel's max|w|
    per_tensor_step: float            # max|w| / 127
    per_channel_step_median: float
    zeroed_per_tensor: float          # share of weights that round to 0 with a per-tensor range
    zeroed_per_channel: float         # the same, per channel
    flags: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def weight_outliers(proto: onnx.ModelProto) -> list[LayerOutliers]:
    """Every Conv/Gemm/MatMul with a constant weight, flagged layers first (then by share of weights lost to zero).

    >>> [l.node for l in weight_outliers(model.proto) if l.flags]      # doctest: +SKIP
    ['/head/head.2/Gemm']
    """
    inits = {t.name: t for t in proto.graph.initializer}
    nodes = {n.name: n for n in proto.graph.node}
    result = [_layer(nodes[l["name"]], numpy_helper.to_array(inits[l["weight"]])) for l in quantizable_layers(proto)]
    result.sort(key=lambda r: (not r.flags, -r.zeroed_per_channel, -r.outlier_ratio))
    return result


def _channels(node: onnx.NodeProto, w: np.ndarray) -> np.ndarray:
    """Weights as (output channel, everything else)."""
    w = w.astype(np.float64)
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], -1)
    if node.op_type == "ConvTranspose":
        return np.moveaxis(w, 1, 0).reshape(w.shape[1], -1)
    trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
    if w.ndim == 2:
        return w if (node.op_type == "Gemm" and trans_b) else w.T
    return w.reshape(-1, w.shape[-1]).T


def _layer(node: onnx.NodeProto, w: np.ndarray) -> LayerOutliers:
    ch = _channels(node, w)
    absmax = np.abs(ch).max(axis=1)
    med = np.median(ch, axis=1, keepdims=True)
    sigma = 1.4826 * np.median(np.abs(ch - med), axis=1)
    sigma = np.where(sigma > 0, sigma, ch.std(axis=1))
    ratio = np.where(sigma > 0, absmax / np.maximum(sigma, 1e-30), 0.0)
    worst = int(np.argmax(ratio))
    tensor_step = float(absmax.max()) / QMAX
    channel_step = absmax / QMAX
    nonzero = ch != 0
    total = max(int(nonzero.sum()), 1)
    zeroed_tensor = float(((np.abs(ch) < tensor_step / 2) & nonzero).sum()) / total
    zeroed_channel = float(((np.abs(ch) < channel_step[:, None] / 2) & nonzero).sum()) / total
    median_absmax = float(np.median(absmax)) or 1e-30
    spread = float(absmax.max()) / median_absmax
    out = LayerOutliers(node.name, node.op_type, int(ch.size), float(absmax.max()), round(float(ratio[worst]), 2), worst,
                        round(spread, 2), tensor_step, float(np.median(channel_step)), round(zeroed_tensor, 4), round(zeroed_channel, 4))
    if ratio[worst] > OUTLIER_RATIO and zeroed_channel > ZEROED_LIMIT:
        out.flags.append("clip-or-float")
        out.reasons.append(f"channel {worst}: max|w| is {ratio[worst]:.0f}× the robust spread of its weights; even per channel "
                           f"{zeroed_channel:.0%} of the layer's weights round to zero (step {np.median(channel_step):.3g}): "
                           "clip the weight range or keep the layer in float")
    elif ratio[worst] > OUTLIER_RATIO:
        out.flags.append("outliers")
        out.reasons.append(f"channel {worst}: max|w| is {ratio[worst]:.0f}× the robust spread; per channel only "
                           f"{zeroed_channel:.0%} of the weights round to zero — watch it")
    if spread > CHANNEL_SPREAD and zeroed_tensor > zeroed_channel + 0.05:
        out.flags.append("per-channel")
        out.reasons.append(f"the widest channel's range is {spread:.1f}× the median channel's: a per-tensor step of "
                           f"{tensor_step:.3g} rounds {zeroed_tensor:.0%} of the weights to zero (per channel: {zeroed_channel:.0%}); "
                           "quantize this layer per channel")
    return out

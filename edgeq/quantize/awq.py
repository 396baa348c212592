"""AWQ, activation-aware weight quantization (Lin et al., 2023; as in llm-awq, AutoAWQ and Intel Neural Compressor).

A few input channels carry much larger activations than the rest, so the rounding error of their weight rows
dominates the output error. Multiplying those rows by s > 1 and the activation by 1/s leaves the FP32 product
unchanged but rounds the important weights more finely relative to their size.

Per group of MatMul/Gemm reading the same activation x (q, k and v share a LayerNorm output): s = mean|x|^alpha,
normalised by sqrt(max(s)·min(s)); alpha on a grid in [0, 1] minimises the group's output error
‖xW − (x/s)·Q(diag(s)W)‖² with Q the RTN block quantizer. The error is exact over all calibration tokens, from
H = XᵀX / rows (the statistics GPTQ uses) rather than from a token subsample. alpha 0 is RTN itself and wins ties,
so AWQ never does worse than RTN on that objective. Then, per output column and block, a range shrink ratio
(llm-awq's clipping search) is picked by the block's output error, and kept only when it lowers the layer's error.

1/s is folded into x's producer where that is exact: the scale and bias of a normalisation (LayerNormalization,
RMSNormalization, SimplifiedLayerNormalization, Skip(Simplified)LayerNormalization), the output channels of a
MatMul/Gemm or the constant of a Mul, through Add-a-constant and Relu, when the chain feeds only this group.
Otherwise a Mul by 1/s goes before the group: one elementwise op, a little latency (in edgeq.testing.lm's GPT: the
attention output projection and fc2, behind Gelu).
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgeq.graph import Names, Weights, attr, consumers, producers
from edgeq.quantize.config import Int4WeightOnly
from edgeq.quantize.packing import BlockQuant, blocked, quantize_rtn

if TYPE_CHECKING:
    from edgeq.quantize.int4 import ActStats, Target

ALPHAS = np.linspace(0.0, 1.0, 21)
CLIP_RATIOS = 1.0 - np.arange(10) / 20  # llm-awq: a 20-step grid, at most half the range cut
MIN_MEAN = 1e-4  # floor of mean|x| relative to its largest channel: a dead channel must not get s → 0
# normalisation → (scale input, bias input or None); output 0 is the normalised tensor
NORMS = {"LayerNormalization": (1, 2), "RMSNormalization": (1, None), "SimplifiedLayerNormalization": (1, None),
         "SkipLayerNormalization": (2, 3), "SkipSimplifiedLayerNormalization": (2, None)}
Edit = tuple[onnx.NodeProto, int, int]  # divide the constant at node.input[index] by s along this axis


def quantize_awq(proto: onnx.ModelProto, targets: list[Target], stats: dict[str, ActStats],
                 config: Int4WeightOnly) -> tuple[dict[str, BlockQuant], list[str]]:
    """Search every group's scale and every layer's clipping, fold the scales into `proto` and quantize. Updates the
    targets (scaled weights, the activation they now read) and adds `stats` for rescaled activations (x/s), so
    that sensitivities stay right. Returns the quantized weights by node name, and notes for the summary."""
    groups: dict[str, list[Target]] = {}
    for t in targets:
        groups.setdefault(t.activation, []).append(t)
    scales: dict[str, np.ndarray] = {}
    clips: dict[str, np.ndarray | None] = {}
    for act, group in groups.items():
        st = stats[act]
        s, alpha = search_scale([t.weight for t in group], st, config.block_size, config.symmetric)
        if alpha > 0:
            scales[act] = s
        h = (st.h / np.outer(s, s)).astype(np.float32)  # the input the scaled weights see: x/s
        for t in group:
            clips[t.node.name] = search_clip(t.weight * s[:, None], h, config.block_size, config.symmetric)
    where = fold_scales(proto, targets, scales)
    for act, s in scales.items():
        stats[groups[act][0].activation] = dataclasses.replace(stats[act], h=stats[act].h / np.outer(s, s),
                                                               absmean=stats[act].absmean / s)
    quants = {t.node.name: quantize_rtn(t.weight, config.block_size, 4, config.symmetric, clip=clips[t.node.name])
              for t in targets}
    inserted = where.pop("inserted Mul", 0)
    notes = [f"AWQ scaled the inputs of {len(scales)} of {len(groups)} layer groups"
             + (f"; 1/s folded into {', '.join(f'{n} {kind}' for kind, n in sorted(where.items()))}" if where else "")]
    if inserted:
        notes.append(f"AWQ inserted a Mul by 1/s before {inserted} groups whose producer cannot absorb it exactly "
                     "(one elementwise op each per run)")
    notes.append(f"AWQ clipping narrowed the blocks of {sum(c is not None for c in clips.values())} of {len(targets)} layers")
    return quants, notes


def output_error(w: np.ndarray, wq: np.ndarray, h: np.ndarray) -> float:
    """Σ over calibration rows of ‖x(W − Ŵ)‖², divided by the row count: tr(Dᵀ H D), in H's precision."""
    d = (np.asarray(w, np.float64) - wq).astype(h.dtype)
    return float(np.sum(d * (h @ d), dtype=np.float64))


def awq_scale(absmean: np.ndarray, alpha: float) -> np.ndarray:
    """s = mean|x|^alpha over its geometric mid-range (llm-awq's normalisation): s·W and x/s stay near their range."""
    s = np.maximum(absmean, MIN_MEAN * absmean.max()) ** alpha
    return s / np.sqrt(s.max() * s.min())


def search_scale(weights: list[np.ndarray], stats: ActStats, block: int, symmetric: bool) -> tuple[np.ndarray, float]:
    """The alpha in ALPHAS, and its s, with the least summed output error of the group's weights W[K, N]."""
    if not stats.absmean.max() > 0:
        return np.ones_like(stats.absmean), 0.0  # an all-zero input: nothing to weigh
    h = stats.h.astype(np.float32)  # twice as fast as float64, and precise enough to rank the alphas
    best = (np.inf, 0.0, np.ones_like(stats.absmean))
    for alpha in ALPHAS:
        s = awq_scale(stats.absmean, alpha)
        err = sum(output_error(w, quantize_rtn(w * s[:, None], block, 4, symmetric).dequantize() / s[:, None], h)
                  for w in weights)
        if err < best[0]:
            best = (err, float(alpha), s)
    return best[2], best[1]


def search_clip(w: np.ndarray, h: np.ndarray, block: int, symmetric: bool) -> np.ndarray | None:
    """Per output column and block of W[K, N], the ratio in CLIP_RATIOS with the least output error of that block
    (from H's diagonal block, as llm-awq measures per group); None when it does not lower the whole layer's error."""
    k, n = w.shape
    nb = -(-k // block)
    hp = np.zeros((nb * block, nb * block), h.dtype)
    hp[:k, :k] = h
    hb = np.stack([hp[i * block:(i + 1) * block, i * block:(i + 1) * block] for i in range(nb)])  # [blocks, b, b]
    best_err, best = np.full((n, nb), np.inf), np.ones((n, nb))
    for r in CLIP_RATIOS:
        ratio = np.full((n, nb), r)
        d = blocked(w - quantize_rtn(w, block, 4, symmetric, clip=ratio).dequantize(), block).astype(h.dtype)
        d = d.transpose(1, 0, 2)  # [blocks, N, b]
        err = np.sum((d @ hb) * d, axis=-1).T
        better = err < best_err
        best_err[better], best[better] = err[better], r
    if best.min() == 1.0:
        return None
    clipped = output_error(w, quantize_rtn(w, block, 4, symmetric, clip=best).dequantize(), h)
    return best if clipped < output_error(w, quantize_rtn(w, block, 4, symmetric).dequantize(), h) else None


def fold_scales(proto: onnx.ModelProto, targets: list[Target], scales: dict[str, np.ndarray]) -> Counter[str]:
    """Rescale the FP32 graph in place, exactly: each target reading x in `scales` gets weight diag(s)·W, and x
    becomes x/s, folded into its producer or by an inserted Mul. Updates the targets' weights and activations;
    counts where each 1/s went."""
    graph = FoldGraph(proto)
    by_node = {id(t.node): t for t in targets}
    changed: dict[int, Target] = {}
    where: Counter[str] = Counter()
    for act, s in scales.items():
        group = [t for t in targets if t.activation == act]
        for t in group:
            t.weight = (t.weight * s[:, None]).astype(np.float32)
            changed[id(t)] = t
        found = graph.producer_edits(act, {id(t.node) for t in group}, len(s))
        if found is None:
            graph.insert_mul(act, s, group)
            where["inserted Mul"] += 1
            continue
        kind, edits = found
        where[kind] += 1
        for node, index, axis in edits:
            t = by_node.get(id(node))
            if t is not None and index == 1:  # a quantized producer: its weight is written below, with its own scale
                t.weight = (t.weight / s).astype(np.float32)
                changed[id(t)] = t
            else:
                graph.divide(node, index, axis, s)
                if t is not None and index == 2:
                    t.bias = node.input[2]
    for t in changed.values():
        w = t.weight.T if t.node.op_type == "Gemm" and attr(t.node, "transB", 0) else t.weight
        graph.write(t.node, 1, w)
    return where


class FoldGraph:
    """What folding needs to know about a graph, and writes that never touch a constant another node reads."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        self.proto = proto
        self.weights = Weights(proto)
        self.users = consumers(proto)
        self.producers = producers(proto)
        self.fixed = {o.name for o in proto.graph.output}
        self.names = Names(proto)

    def producer_edits(self, act: str, group: set[int], k: int) -> tuple[str, list[Edit]] | None:
        """How to fold 1/s into what computes `act`: (kind, edits), or None when that would not be exact."""
        if act in self.fixed or {id(n) for n in self.users.get(act, [])} != group or len(self.users[act]) != len(group):
            return None  # another reader (or the graph's output) would see x/s
        edits: list[Edit] = []
        name = act
        node = self.producers.get(name)
        while node is not None and node.output[0] == name:  # not, e.g., SkipLayerNormalization's residual sum
            if node.op_type in NORMS:
                idx = [i for i in NORMS[node.op_type] if i is not None and i < len(node.input) and node.input[i]]
                exact = all(self._vector(node.input[i], k) for i in idx)
                return (node.op_type, edits + [(node, i, -1) for i in idx]) if exact else None
            if node.op_type in ("MatMul", "Gemm"):
                own = self._matmul_edits(node, k)
                return (node.op_type, edits + own) if own else None
            if node.op_type in ("Add", "Mul"):
                const = [i for i in (0, 1) if self._vector(node.input[i], k) and node.input[1 - i] not in self.weights]
                if not const:
                    return None
                edits.append((node, const[0], -1))
                if node.op_type == "Mul":
                    return node.op_type, edits
                upstream = node.input[1 - const[0]]
            elif node.op_type == "Relu":  # positive scales commute with it
                upstream = node.input[0]
            else:
                return None
            if upstream in self.fixed or len(self.users.get(upstream, [])) != 1:
                return None
            name, node = upstream, self.producers.get(upstream)
        return None

    def _matmul_edits(self, node: onnx.NodeProto, k: int) -> list[Edit]:
        """A MatMul/Gemm whose constant 2-D weight (and Gemm bias) can absorb 1/s on its k output channels."""
        w = self.weights.tensors.get(node.input[1])
        if w is None or w.data_type != TensorProto.FLOAT or len(w.dims) != 2 or (node.op_type == "Gemm" and attr(node, "transA", 0)):
            return []
        axis = 0 if node.op_type == "Gemm" and attr(node, "transB", 0) else 1
        if w.dims[axis] != k:
            return []
        edits: list[Edit] = [(node, 1, axis)]
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            if not self._vector(node.input[2], k):
                return []
            edits.append((node, 2, -1))
        return edits

    def _vector(self, name: str, k: int) -> bool:
        """A float constant whose last axis runs over the k channels (so dividing along it is exact)."""
        t = self.weights.tensors.get(name)
        return t is not None and t.data_type == TensorProto.FLOAT and len(t.dims) >= 1 and t.dims[-1] == k

    def divide(self, node: onnx.NodeProto, index: int, axis: int, s: np.ndarray) -> None:
        value = self.weights.get(node.input[index])
        shape = [1] * value.ndim
        shape[axis] = len(s)
        self.write(node, index, value / s.reshape(shape))

    def write(self, node: onnx.NodeProto, index: int, value: np.ndarray) -> None:
        """Set the constant node.input[index]: in place when only this input reads it, else as a new constant."""
        name = node.input[index]
        if len(self.users.get(name, [])) == 1 and name not in self.fixed:
            self.weights.set(name, value)
            return
        new = self.names.fresh(f"{name}_awq")
        self.weights.add(new, value)
        node.input[index] = new
        self.users[new] = [node]

    def insert_mul(self, act: str, s: np.ndarray, group: list[Target]) -> None:
        """x/s by a Mul right before the group's first node; the group reads its output."""
        inv, out = self.names.fresh(f"{act}_awq_inv_scale"), self.names.fresh(f"{act}_awq")
        self.weights.add(inv, 1.0 / s)
        ids = {id(t.node) for t in group}
        first = next(i for i, n in enumerate(self.proto.graph.node) if id(n) in ids)
        self.proto.graph.node.insert(first, helper.make_node("Mul", [act, inv], [out], name=self.names.fresh(f"{act}_AWQ")))
        for t in group:
            t.node.input[0] = out
            t.activation = out


"""AdaRound (Nagel et al. 2020, as in Qualcomm's AIMET): learned rounding of Conv/Gemm/MatMul weights in a static
QDQ model. Rounding to nearest minimises each weight's own error, not the layer's output error; AdaRound chooses,
per weight, floor or ceil on the quantizer's grid so that ||W x - W~ x||² on calibration inputs is smallest.

Per layer, W~ = s · clip(floor(W/s) + h(V), qmin, qmax) with the rectified sigmoid h(V) = clip(σ(V)(ζ-γ) + γ, 0, 1)
(ζ 1.1, γ -0.1) and V initialised so that h(V) equals the fractional part of W/s (W~ = W inside the grid). Adam
minimises the mean over input rows of the squared output error plus λ Σ (1 - |2h - 1|^β), the regulariser that pushes
every h to 0 or 1, off for the first 20% of the iterations and with β annealed (cosine) from 20 to 2. The rounding
is then fixed (h ≥ 0.5 rounds up) and written into the QDQ graph's quantized weight; the scale stays the one the
quantizer chose (min/max, or the weight range repair's), so the graph's structure is unchanged.

Inputs are streamed: the objective of a linear layer depends on its inputs only through their second moments, so
each layer keeps the Gram matrix Σ x xᵀ of its input rows (im2col patches for a Conv, per group) and Σ t xᵀ with
the FP32 outputs t, accumulated exactly over all calibration rows, in memory groups·d² whatever the data size;
while a layer has seen fewer rows than its input width it keeps the rows themselves, which is smaller and cheaper.
`sequential` takes each layer's inputs from the QDQ model with the layers before it already rounded (AIMET's way),
against FP32 outputs on FP32 inputs, so a layer also compensates what upstream quantization did to its input.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import numpy_helper

from edgeq.calibrate import collect, with_outputs
from edgeq.calibrate.collectors import KeptBatches
from edgeq.data import Batch, Dataset
from edgeq.graph import attr, producers
from edgeq.model import Model, run_session
from edgeq.progress import track
from edgeq.runtimes import ONNX_RUNTIME, GraphRuntime

ZETA, GAMMA = 1.1, -0.1
LAYER_TYPES = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class AdaRoundSettings:
    """Optimisation settings (AIMET's defaults, except fewer iterations at a higher learning rate)."""

    iterations: int = 2000
    learning_rate: float = 1e-2
    regularisation: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warm_start: float = 0.2
    sequential: bool = False


@dataclass
class Moments:
    """Streaming second moments of one layer's input rows x (g, n, d) and FP32 outputs t (g, n, o): raw rows while
    there are fewer than d of them, then Σ xᵀx (g, d, d), Σ tᵀx (g, o, d) and Σ t² (float64)."""

    width: int
    rows: int = 0
    x: list[np.ndarray] = field(default_factory=list)
    t: list[np.ndarray] = field(default_factory=list)
    gram: np.ndarray | None = None
    cross: np.ndarray | None = None
    target: float = 0.0

    def add(self, x: np.ndarray, t: np.ndarray) -> None:
        self.rows += x.shape[1]
        if self.gram is None and self.rows < self.width:
            self.x.append(x.astype(np.float32))
            self.t.append(t.astype(np.float32))
            return
        if self.gram is None:
            self.gram = np.zeros((x.shape[0], self.width, self.width))
            self.cross = np.zeros((t.shape[0], t.shape[2], self.width))
            pending = list(zip(self.x, self.t))
            self.x, self.t = [], []
        else:
            pending = []
        for xs, ts in pending + [(x, t)]:
            xs, ts = xs.astype(np.float64), ts.astype(np.float64)
            self.gram += np.matmul(xs.transpose(0, 2, 1), xs)
            self.cross += np.matmul(ts.transpose(0, 2, 1), xs)
            self.target += float(np.sum(ts * ts))

    def error(self, w: np.ndarray) -> float:
        """Mean over rows of the squared output error Σ_o (t - w x)² of weights w (g, o, d), in float64."""
        w = w.astype(np.float64)
        if self.gram is None:
            x, t = np.concatenate(self.x, axis=1).astype(np.float64), np.concatenate(self.t, axis=1).astype(np.float64)
            return float(np.sum((np.matmul(x, w.transpose(0, 2, 1)) - t) ** 2)) / self.rows
        value = np.sum(np.matmul(w, self.gram) * w) - 2 * np.sum(w * self.cross) + self.target
        return max(float(value), 0.0) / self.rows


class Objective:
    """The output error as a function of the weight change Δ = W~ - W (g, o, d), float32 for speed: Gram form
    Δ H Δᵀ - 2 Δ·R + c with R = Σ (t - W x) xᵀ (no cancellation: R is 0 unless the inputs differ from FP32's), or
    rows form when there are fewer rows than input channels."""

    def __init__(self, moments: Moments, w: np.ndarray) -> None:
        self.rows = moments.rows
        if moments.gram is None:
            self.x = np.concatenate(moments.x, axis=1)
            residual = np.concatenate(moments.t, axis=1) - np.matmul(self.x, w.transpose(0, 2, 1).astype(np.float32))
            self.residual, self.gram = residual.astype(np.float32), None
        else:
            self.gram = moments.gram.astype(np.float32)
            self.residual = (moments.cross - np.matmul(w, moments.gram)).astype(np.float32)

    def gradient(self, delta: np.ndarray) -> np.ndarray:
        if self.gram is None:
            error = np.matmul(self.x, delta.transpose(0, 2, 1)) - self.residual
            return 2 * np.matmul(error.transpose(0, 2, 1), self.x) / self.rows
        return 2 * (np.matmul(delta, self.gram) - self.residual) / self.rows


def rectified_sigmoid(v: np.ndarray) -> np.ndarray:
    return np.clip(1.0 / (1.0 + np.exp(-v)) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def initial_v(fraction: np.ndarray) -> np.ndarray:
    """V with h(V) = fraction (in [0, 1)): the inverse of the rectified sigmoid."""
    p = np.clip((fraction - GAMMA) / (ZETA - GAMMA), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def anneal_beta(step: int, settings: AdaRoundSettings) -> float | None:
    """The regulariser's β at `step`, or None during the warm start (regulariser off)."""
    start = settings.warm_start * settings.iterations
    if step < start:
        return None
    progress = (step - start) / max(settings.iterations - start, 1)
    high, low = settings.beta
    return low + 0.5 * (high - low) * (1 + np.cos(progress * np.pi))


def learn_rounding(w: np.ndarray, scale: np.ndarray, qmin: int | np.ndarray, qmax: int | np.ndarray, moments: Moments,
                   settings: AdaRoundSettings = AdaRoundSettings()) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes (g, o, d) for weights w (g, o, d) on the grid `scale` (broadcasting to w, as the code bounds
    do: per weight for zero-pointed INT4 blocks) chosen by AdaRound,
    and the soft rounding h it ended with (for tests: every value is 0 or 1 when the regulariser did its job)."""
    w = w.astype(np.float32)
    scale = np.broadcast_to(np.asarray(scale, np.float32), w.shape)
    grid = w / scale
    floor = np.floor(grid)
    objective = Objective(moments, w)
    v = initial_v(grid - floor).astype(np.float32)
    m, s = np.zeros_like(v), np.zeros_like(v)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step in range(settings.iterations):
        sig = 1.0 / (1.0 + np.exp(-v))
        raw = sig * (ZETA - GAMMA) + GAMMA
        h = np.clip(raw, 0.0, 1.0)
        codes = floor + h
        inside = (codes >= qmin) & (codes <= qmax)
        delta = scale * np.clip(codes, qmin, qmax) - w
        grad_h = objective.gradient(delta) * scale * inside
        beta = anneal_beta(step, settings)
        if beta is not None:
            centred = 2 * h - 1
            grad_h -= settings.regularisation * beta * 2 * np.abs(centred) ** (beta - 1) * np.sign(centred)
        grad = grad_h * ((raw > 0) & (raw < 1)) * (ZETA - GAMMA) * sig * (1 - sig)
        m = beta1 * m + (1 - beta1) * grad
        s = beta2 * s + (1 - beta2) * grad * grad
        corrected = settings.learning_rate * np.sqrt(1 - beta2 ** (step + 1)) / (1 - beta1 ** (step + 1))
        v -= corrected * m / (np.sqrt(s) + eps)
    h = rectified_sigmoid(v)
    return np.clip(floor + (h >= 0.5), qmin, qmax).astype(np.int64), h


@dataclass
class WeightLayer:
    """A float Conv/Gemm/MatMul node and its FP32 weight: what the input moments are collected for."""

    node: onnx.NodeProto
    weight: np.ndarray

    @property
    def groups(self) -> int:
        return attr(self.node, "group", 1) if self.node.op_type == "Conv" else 1

    def canonical(self, w: np.ndarray) -> np.ndarray:
        """The weight as (groups, outputs per group, inputs per output): Conv (O, I/g, *k), Gemm's B, MatMul's B."""
        if self.node.op_type == "Conv":
            return w.reshape(self.groups, w.shape[0] // self.groups, -1)
        if self.node.op_type == "Gemm" and attr(self.node, "transB", 0):
            return w[None]
        return w.T[None]

    def original(self, canonical: np.ndarray) -> np.ndarray:
        if self.node.op_type == "Conv":
            return canonical.reshape(self.weight.shape)
        return canonical[0] if self.node.op_type == "Gemm" and attr(self.node, "transB", 0) else canonical[0].T

    def rows(self, x: np.ndarray) -> np.ndarray:
        """Input rows (groups, rows, inputs per output) of a batch of this layer's input activation."""
        if self.node.op_type != "Conv":
            return x.reshape(-1, x.shape[-1])[None]
        return conv_patches(x, self.node, self.weight.shape[2:], self.groups)


@dataclass
class Layer(WeightLayer):
    """One quantized weight: the float layer, the quantized node's input, and the quantized initializer behind the
    weight's DequantizeLinear with its scale and zero point."""

    q_input: str = ""
    codes: onnx.TensorProto = None  # type: ignore[assignment]
    scale: np.ndarray = None  # type: ignore[assignment]
    zero_point: np.ndarray = None  # type: ignore[assignment]

    def grid(self) -> np.ndarray:
        """The scale broadcast to the canonical weight: a scalar, or one per output channel."""
        if self.scale.size == 1:
            return self.scale.reshape(1, 1, 1)
        return self.scale.reshape(self.groups, -1, 1)


def conv_patches(x: np.ndarray, node: onnx.NodeProto, kernel: tuple[int, ...], groups: int) -> np.ndarray:
    """im2col of a 1-D or 2-D Conv's input (N, C, *spatial) as (groups, N·positions, C/groups·prod(kernel)), in the
    order of the weight's (C/groups, *kernel) axes."""
    spatial = len(kernel)
    pads = attr(node, "pads", [0] * 2 * spatial)
    strides, dilations = attr(node, "strides", [1] * spatial), attr(node, "dilations", [1] * spatial)
    x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + spatial]) for i in range(spatial)])
    window = [d * (k - 1) + 1 for k, d in zip(kernel, dilations)]
    view = sliding_window_view(x, window, axis=tuple(range(2, 2 + spatial)))
    view = view[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) + tuple(slice(None, None, d) for d in dilations)]
    n, channels, positions = view.shape[0], view.shape[1], int(np.prod(view.shape[2:2 + spatial]))
    patches = view.reshape(n, groups, channels // groups, positions, int(np.prod(kernel)))
    return patches.transpose(1, 0, 3, 2, 4).reshape(groups, n * positions, -1)


def _skip_reason(node: onnx.NodeProto, weight: np.ndarray) -> str | None:
    if node.op_type == "Conv" and (weight.ndim not in (3, 4) or attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID")):
        return "Conv other than 1-D/2-D with explicit pads"
    if node.op_type == "Gemm" and attr(node, "transA", 0):
        return "Gemm with transA"
    if node.op_type in ("Gemm", "MatMul") and weight.ndim != 2:
        return "weight is not 2-D"
    return None


def float_layers(float_proto: onnx.ModelProto, op_types: tuple[str, ...], exclude: tuple[str, ...] = ()) -> list[WeightLayer]:
    """The named Conv/Gemm/MatMul nodes of the recipe with a constant float weight AdaRound can round: a superset
    of the layers `find_layers` finds once the QDQ model exists, so their input moments can be collected before."""
    inits = {t.name: t for t in float_proto.graph.initializer}
    found = []
    for node in float_proto.graph.node:
        if (node.op_type not in LAYER_TYPES or node.op_type not in op_types or not node.name or node.name in exclude
                or len(node.input) < 2 or node.input[1] not in inits):
            continue
        weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        if _skip_reason(node, weight) is None:
            found.append(WeightLayer(node, weight))
    return found


class InputMoments:
    """The collector of each layer's input moments (`Moments`) against its FP32 outputs, on the float model, fed
    in data order one sample at a time (a Conv's patches are kernel-size times its input)."""

    ordered, skips_holdout = True, False

    def __init__(self, layers: list[WeightLayer], max_samples: int | None) -> None:
        self.layers, self.max_samples = layers, max_samples
        self.tensors = list(dict.fromkeys(layer.node.input[0] for layer in layers))
        self.moments = {layer.node.name: Moments(width=layer.canonical(layer.weight).shape[2]) for layer in layers}

    def update(self, index: int, values: dict[str, np.ndarray], batch: Batch) -> None:
        for layer in self.layers:
            w, x = layer.canonical(layer.weight), values[layer.node.input[0]]
            for k in range(len(x)):
                rows = layer.rows(x[k:k + 1])
                self.moments[layer.node.name].add(rows, np.matmul(rows, w.transpose(0, 2, 1)))


def find_layers(float_proto: onnx.ModelProto, q_proto: onnx.ModelProto) -> tuple[list[Layer], dict[str, str]]:
    """The quantized Conv/Gemm/MatMul nodes whose constant weight goes through its own DequantizeLinear of an
    integer initializer (per-tensor or per-channel), in the QDQ graph's order; and the others, with why."""
    float_nodes = {n.name: n for n in float_proto.graph.node if n.name}
    float_inits = {t.name: t for t in float_proto.graph.initializer}
    inits = {t.name: t for t in q_proto.graph.initializer}
    made_by = producers(q_proto)
    readers: dict[str, int] = {}
    for node in q_proto.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    layers, skipped = [], {}
    for node in q_proto.graph.node:
        source = float_nodes.get(node.name)
        if node.op_type not in LAYER_TYPES or source is None or len(node.input) < 2 or source.input[1] not in float_inits:
            continue
        dq = made_by.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or attr(dq, "block_size", 0):
            continue
        if readers.get(dq.input[0], 0) != 1 or readers.get(node.input[1], 0) != 1:
            skipped[node.name] = "weight shared with another node"
            continue
        weight = numpy_helper.to_array(float_inits[source.input[1]]).astype(np.float32)
        reason = _skip_reason(source, weight)
        if reason:
            skipped[node.name] = reason
            continue
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
        zero = numpy_helper.to_array(inits[dq.input[2]]).astype(np.int64) if len(dq.input) > 2 and dq.input[2] else np.zeros(1, np.int64)
        layers.append(Layer(source, weight, node.input[0], inits[dq.input[0]], scale, zero))
    return layers, skipped


def _sequential_moments(layer: Layer, float_model: Model, feeds: list[Batch], q_proto: onnx.ModelProto,
                        runtime: GraphRuntime) -> Moments:
    """One layer's moments with its inputs from the QDQ model (the layers before it already rounded) against the
    FP32 outputs on FP32 inputs: a new model state, so a pass over the kept batches."""
    inputs = {i.name for i in float_model.proto.graph.input}
    moment = Moments(width=layer.canonical(layer.weight).shape[2])

    def fetch(proto: onnx.ModelProto, name: str):
        if name in inputs:
            yield from (batch.inputs[name] for batch in feeds)
            return
        session = runtime.open_graph(with_outputs(proto, [name]), threads=0)
        for batch in feeds:
            yield run_session(session, [name], batch.inputs, "the model", "the calibration data")[0]

    w = layer.canonical(layer.weight)
    for x_fp, x_q in zip(fetch(float_model.proto, layer.node.input[0]), fetch(q_proto, layer.q_input)):
        for k in range(len(x_fp)):
            rows_fp, rows_q = layer.rows(x_fp[k:k + 1]), layer.rows(x_q[k:k + 1])
            moment.add(rows_q, np.matmul(rows_fp, w.transpose(0, 2, 1)))
    return moment


def _round_layer(layer: Layer, moment: Moments, settings: AdaRoundSettings) -> tuple[float, float]:
    """Learn the rounding of one layer; write it when it lowers the output error on the calibration rows (it keeps
    round-to-nearest otherwise). Returns the errors of nearest and of the rounding kept."""
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    stored = numpy_helper.to_array(layer.codes)
    qmin, qmax = (int(v) for v in get_qmin_qmax_for_qType(layer.codes.data_type, symmetric=True))
    zero = layer.zero_point.reshape(layer.grid().shape) if layer.zero_point.size > 1 else int(layer.zero_point.reshape(-1)[0])
    grid = layer.grid()
    nearest = layer.canonical(stored.astype(np.int64))
    before = moment.error(grid * (nearest - zero))
    codes, _ = learn_rounding(layer.canonical(layer.weight), grid, qmin - zero, qmax - zero, moment, settings)
    after = moment.error(grid * codes)
    if after >= before:
        return before, before
    layer.codes.CopyFrom(numpy_helper.from_array(layer.original(codes + zero).astype(stored.dtype), layer.codes.name))
    return before, after


def adaround(float_model: Model, quantized: Model, data: Dataset, *, batch_size: int = 16, max_samples: int = 512,
             settings: AdaRoundSettings = AdaRoundSettings(), runtime: GraphRuntime = ONNX_RUNTIME) -> dict:
    """Replace, in place, the round-to-nearest weights of `quantized` (a static QDQ model of `float_model`) with
    learned roundings on the grid of the same scales, from one pass over `data`. Returns what ran: layers rounded,
    and per layer the output error (mean squared, on the calibration rows) of nearest and of AdaRound.

    >>> adaround(prepared, qdq_model, calib)["layers"]          # doctest: +SKIP
    12
    """
    moments = InputMoments(float_layers(float_model.proto, LAYER_TYPES), max_samples)
    feeds = KeptBatches(max_samples)
    collect(float_model, data, [feeds] + ([] if settings.sequential else [moments]), batch_size=batch_size,
            label="AdaRound: collecting layer inputs", runtime=runtime)
    return round_layers(float_model, quantized, moments.moments, feeds.batches, settings, runtime)


def round_layers(float_model: Model, quantized: Model, moments: dict[str, Moments], feeds: list[Batch],
                 settings: AdaRoundSettings = AdaRoundSettings(), runtime: GraphRuntime = ONNX_RUNTIME) -> dict:
    """AdaRound on the layers of `quantized`, from the FP32 input `moments` collected by `InputMoments` (or, with
    `settings.sequential`, inputs from the QDQ model on `feeds`)."""
    import time

    started = time.perf_counter()
    layers, skipped = find_layers(float_model.proto, quantized.proto)
    errors: dict[str, list[float]] = {}
    label = "AdaRound (sequential)" if settings.sequential else "AdaRound"
    for layer in track(layers, label, total=len(layers)):
        moment = (_sequential_moments(layer, float_model, feeds, quantized.proto, runtime) if settings.sequential
                  else moments[layer.node.name])
        errors[layer.node.name] = list(_round_layer(layer, moment, settings))
    reductions = [1 - after / before for before, after in errors.values() if before > 0]
    return {"layers": sum(after < before for before, after in errors.values()), "candidates": len(layers),
            "skipped": skipped, "sequential": settings.sequential, "iterations": settings.iterations,
            "samples": sum(b.size for b in feeds), "seconds": round(time.perf_counter() - started, 2),
            "median_error_reduction": round(float(np.median(reductions)), 4) if reductions else 0.0,
            "output_error": {name: [float(f"{v:.6g}") for v in pair] for name, pair in errors.items()}}


def describe(result: dict) -> str:
    """The summary's line for what AdaRound did."""
    how = "sequential inputs, " if result["sequential"] else ""
    kept = result["candidates"] - result["layers"]
    return (f"AdaRound learned the weight rounding of {result['layers']} of {result['candidates']} layers "
            f"({how}{result['iterations']} iterations each, {result['samples']} calibration samples, {result['seconds']:.1f} s): "
            f"per-layer output error {result['median_error_reduction'] * 100:.0f}% lower than round-to-nearest (median)"
            + (f"; {kept} kept round-to-nearest (no lower error)" if kept else ""))

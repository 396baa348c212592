"""Empirical bias correction (Nagel et al. 2019; AIMET's empirical variant): quantization shifts the mean of a layer's
output; measure the shift on calibration data and move the bias to cancel it, layer by layer in graph order, so that
each correction sees the already corrected layers upstream.

Works on the QDQ model: the int32 bias behind each DequantizeLinear is shifted by round(delta / bias_scale); a
transformer's MatMul followed by an Add of a float bias vector gets that vector shifted by delta.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from edgeq.calibrate import collect, with_outputs
from edgeq.calibrate.collectors import ChannelMeans, KeptBatches
from edgeq.data import Batch, Dataset
from edgeq.graph import consumers, producers
from edgeq.model import Model
from edgeq.progress import track
from edgeq.runtimes import ONNX_RUNTIME, GraphRuntime

LAYERS = ("Conv", "Gemm", "ConvTranspose")


@dataclass
class Target:
    """One layer to correct: its output in the FP32 and the quantized graph, the channel axis of that output, and
    the bias tensor to shift (int32 behind a DequantizeLinear with `scale`, or a float constant added after a MatMul)."""

    fp_out: str
    q_out: str
    axis: int
    bias: onnx.TensorProto
    scale: np.ndarray | None

    def shift(self, delta: np.ndarray) -> bool:
        bias = numpy_helper.to_array(self.bias)
        if delta.shape != bias.shape:
            return False
        if self.scale is None:
            shifted = (bias.astype(np.float64) + delta).astype(bias.dtype)
        else:
            stepped = bias.astype(np.int64) + np.rint(delta / self.scale.astype(np.float64))
            shifted = np.clip(stepped, -(2**31), 2**31 - 1).astype(np.int32)
        self.bias.CopyFrom(numpy_helper.from_array(shifted, self.bias.name))
        return True


def _channel_means(model_proto: onnx.ModelProto, targets: list[tuple[str, int]], feeds: list[Batch],
                   runtime: GraphRuntime) -> dict[str, np.ndarray]:
    """Mean of each (output, channel axis) over every other axis, on `feeds`."""
    outputs = [name for name, _ in targets]
    session = runtime.open_graph(with_outputs(model_proto, outputs), threads=0)
    means = ChannelMeans(targets)
    for index, batch in enumerate(feeds):
        means.update(index, dict(zip(outputs, session.run(outputs, batch.inputs))), batch)
    return means.means()


def reference_outputs(float_proto: onnx.ModelProto) -> list[tuple[str, int]]:
    """(output, channel axis) of every float layer bias correction may correct: a Conv/Gemm/ConvTranspose with a
    bias, an Add of a constant float vector; a superset of the targets `_targets` finds in the QDQ model, so their
    FP32 means can be collected before it exists."""
    inits = {t.name: t for t in float_proto.graph.initializer}
    found = []
    for node in float_proto.graph.node:
        if node.op_type in LAYERS and len(node.input) >= 3 and node.input[2]:
            found.append((node.output[0], 1))
        elif node.op_type == "Add" and any(i in inits and inits[i].data_type == onnx.TensorProto.FLOAT
                                           and len(inits[i].dims) == 1 for i in node.input):
            found.append((node.output[0], -1))
    return found


def _targets(float_proto: onnx.ModelProto, q_proto: onnx.ModelProto) -> list[Target]:
    """Each quantized Conv/Gemm with an int32 bias, and each quantized MatMul whose output only feeds an Add of a
    float constant vector (the transformer linear layer), in graph order."""
    float_nodes = {n.name: n for n in float_proto.graph.node if n.name}
    made_by, readers = producers(q_proto), consumers(q_proto)
    inits = {t.name: t for t in q_proto.graph.initializer}
    found = []
    for node in q_proto.graph.node:
        if node.name not in float_nodes:
            continue
        if node.op_type in LAYERS and len(node.input) >= 3 and node.input[2]:
            dq = made_by.get(node.input[2])
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or dq.input[1] not in inits:
                continue
            if inits[dq.input[0]].data_type == onnx.TensorProto.INT32:
                found.append(Target(float_nodes[node.name].output[0], node.output[0], 1, inits[dq.input[0]],
                                    numpy_helper.to_array(inits[dq.input[1]])))
        elif node.op_type == "MatMul" and _is_quantized(node, made_by):
            add = _bias_add(node, readers, inits, float_nodes)
            if add is not None:
                bias = next(inits[i] for i in add.input if i in inits)
                found.append(Target(float_nodes[add.name].output[0], add.output[0], -1, bias, None))
    return found


def _is_quantized(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto]) -> bool:
    return all(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in node.input[:2])


def _bias_add(matmul: onnx.NodeProto, readers: dict, inits: dict, float_nodes: dict) -> onnx.NodeProto | None:
    """The Add that adds a constant float vector (used by nothing else) to the MatMul's output, if that is all
    the output feeds, through at most one Quantize/DequantizeLinear pair."""
    users = readers.get(matmul.output[0], [])
    while len(users) == 1 and users[0].op_type in ("QuantizeLinear", "DequantizeLinear"):
        users = readers.get(users[0].output[0], [])
    if len(users) != 1 or users[0].op_type != "Add" or users[0].name not in float_nodes:
        return None
    constants = [i for i in users[0].input if i in inits]
    if len(constants) != 1 or len(readers.get(constants[0], [])) != 1:
        return None
    tensor = inits[constants[0]]
    return users[0] if tensor.data_type == onnx.TensorProto.FLOAT and len(tensor.dims) == 1 else None


def correct_bias(float_model: Model, quantized: Model, data: Dataset, *, batch_size: int = 16, max_samples: int = 256,
                 runtime: GraphRuntime = ONNX_RUNTIME) -> int:
    """Shift, in place, the biases of `quantized` (Conv/Gemm int32 biases, MatMul+Add float biases) so that each
    layer's per-channel output mean on `data` matches the FP32 model's. Returns the number of layers corrected.

    >>> correct_bias(prepared, qdq_model, calib)          # doctest: +SKIP
    12
    """
    feeds, reference = KeptBatches(max_samples), ChannelMeans(reference_outputs(float_model.proto), max_samples)
    collect(float_model, data, [feeds, reference], batch_size=batch_size, label="bias correction: FP32 means", runtime=runtime)
    return shift_biases(float_model, quantized, reference.means(), feeds.batches, runtime)


def shift_biases(float_model: Model, quantized: Model, reference: dict[str, np.ndarray], feeds: list[Batch],
                 runtime: GraphRuntime = ONNX_RUNTIME) -> int:
    """Bias correction from the FP32 per-channel means (`reference_outputs`, collected on the float model): each
    target's quantized mean is measured on `feeds` with the layers before it already corrected (a new model state
    per layer: a run over the kept batches each)."""
    targets = _targets(float_model.proto, quantized.proto)
    corrected = 0
    for target in track(targets, "bias correction", total=len(targets)):
        measured = _channel_means(quantized.proto, [(target.q_out, target.axis)], feeds, runtime)[target.q_out]
        corrected += target.shift(reference[target.fp_out] - measured)
    return corrected

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

from edgeq.calibrate import with_outputs
from edgeq.data import Batch, Dataset, batches
from edgeq.model import Model, make_session
from edgeq.progress import track

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


def _channel_means(model_proto: onnx.ModelProto, targets: list[tuple[str, int]], feeds: list[Batch]) -> dict[str, np.ndarray]:
    """Mean of each (output, channel axis) over every other axis, on `feeds`."""
    outputs = [name for name, _ in targets]
    axes = dict(targets)
    session = make_session(with_outputs(model_proto, outputs), threads=0)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for batch in feeds:
        for name, value in zip(outputs, session.run(outputs, batch.inputs)):
            channels = np.moveaxis(value, axes[name], -1).reshape(-1, value.shape[axes[name]])
            sums[name] = sums.get(name, 0.0) + channels.sum(axis=0, dtype=np.float64)
            counts[name] = counts.get(name, 0) + channels.shape[0]
    return {name: sums[name] / counts[name] for name in outputs}


def _targets(float_proto: onnx.ModelProto, q_proto: onnx.ModelProto) -> list[Target]:
    """Each quantized Conv/Gemm with an int32 bias, and each quantized MatMul whose output only feeds an Add of a
    float constant vector (the transformer linear layer), in graph order."""
    float_nodes = {n.name: n for n in float_proto.graph.node if n.name}
    producers = {o: n for n in q_proto.graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in q_proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    inits = {t.name: t for t in q_proto.graph.initializer}
    found = []
    for node in q_proto.graph.node:
        if node.name not in float_nodes:
            continue
        if node.op_type in LAYERS and len(node.input) >= 3 and node.input[2]:
            dq = producers.get(node.input[2])
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or dq.input[1] not in inits:
                continue
            if inits[dq.input[0]].data_type == onnx.TensorProto.INT32:
                found.append(Target(float_nodes[node.name].output[0], node.output[0], 1, inits[dq.input[0]],
                                    numpy_helper.to_array(inits[dq.input[1]])))
        elif node.op_type == "MatMul" and _is_quantized(node, producers):
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


def correct_bias(float_model: Model, quantized: Model, data: Dataset, *, batch_size: int = 16, max_samples: int = 256) -> int:
    """Shift, in place, the biases of `quantized` (Conv/Gemm int32 biases, MatMul+Add float biases) so that each
    layer's per-channel output mean on `data` matches the FP32 model's. Returns the number of layers corrected.

    >>> correct_bias(prepared, qdq_model, calib)          # doctest: +SKIP
    12
    """
    feeds = list(batches(data, float_model.inputs, batch_size, max_samples=max_samples))
    targets = _targets(float_model.proto, quantized.proto)
    if not targets:
        return 0
    reference = _channel_means(float_model.proto, [(t.fp_out, t.axis) for t in targets], feeds)
    corrected = 0
    for target in track(targets, "bias correction", total=len(targets)):
        measured = _channel_means(quantized.proto, [(target.q_out, target.axis)], feeds)[target.q_out]
        corrected += target.shift(reference[target.fp_out] - measured)
    return corrected

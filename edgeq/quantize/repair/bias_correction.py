"""Empirical bias correction (Nagel et al. 2019; AIMET's empirical variant): quantization shifts the mean of a layer's
output; measure the shift on calibration data and move the bias to cancel it, layer by layer in graph order, so that
each correction sees the already corrected layers upstream.

Works on the QDQ model: the int32 bias behind each DequantizeLinear is shifted by round(delta / bias_scale).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from edgeq.calibrate import with_outputs
from edgeq.data import Batch, Dataset, batches
from edgeq.model import Model, make_session
from edgeq.progress import track

LAYERS = ("Conv", "Gemm", "ConvTranspose")


def _channel_means(model_proto: onnx.ModelProto, outputs: list[str], feeds: list[Batch]) -> dict[str, np.ndarray]:
    session = make_session(with_outputs(model_proto, outputs), threads=0)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for batch in feeds:
        for name, value in zip(outputs, session.run(outputs, batch.inputs)):
            axes = tuple(i for i in range(value.ndim) if i != 1)
            sums[name] = sums.get(name, 0.0) + value.sum(axis=axes, dtype=np.float64)
            counts[name] = counts.get(name, 0) + value.size // value.shape[1]
    return {name: sums[name] / counts[name] for name in outputs}


def _targets(float_proto: onnx.ModelProto, q_proto: onnx.ModelProto) -> list[tuple[str, str, str, onnx.TensorProto, np.ndarray]]:
    """(node name, FP32 output, quantized output, int32 bias tensor, bias scale) for each quantized layer with a bias."""
    float_nodes = {n.name: n for n in float_proto.graph.node if n.name}
    producers = {o: n for n in q_proto.graph.node for o in n.output}
    inits = {t.name: t for t in q_proto.graph.initializer}
    found = []
    for node in q_proto.graph.node:
        if node.op_type not in LAYERS or len(node.input) < 3 or not node.input[2] or node.name not in float_nodes:
            continue
        dq = producers.get(node.input[2])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or dq.input[1] not in inits:
            continue
        tensor = inits[dq.input[0]]
        if tensor.data_type != onnx.TensorProto.INT32:
            continue
        found.append((node.name, float_nodes[node.name].output[0], node.output[0], tensor, numpy_helper.to_array(inits[dq.input[1]])))
    return found


def correct_bias(float_model: Model, quantized: Model, data: Dataset, *, batch_size: int = 16, max_samples: int = 256) -> int:
    """Shift, in place, the int32 biases of `quantized` so that each Conv/Gemm output's per-channel mean on `data`
    matches the FP32 model's. Returns the number of layers corrected.

    >>> correct_bias(prepared, qdq_model, calib)          # doctest: +SKIP
    12
    """
    feeds = list(batches(data, float_model.inputs, batch_size, max_samples=max_samples))
    targets = _targets(float_model.proto, quantized.proto)
    if not targets:
        return 0
    reference = _channel_means(float_model.proto, [t[1] for t in targets], feeds)
    for name, fp_out, q_out, tensor, scale in track(targets, "bias correction", total=len(targets)):
        measured = _channel_means(quantized.proto, [q_out], feeds)[q_out]
        delta = reference[fp_out] - measured
        bias = numpy_helper.to_array(tensor).astype(np.int64)
        if delta.shape != bias.shape:
            continue
        shifted = np.clip(bias + np.rint(delta / scale.astype(np.float64)), -(2**31), 2**31 - 1).astype(np.int32)
        tensor.CopyFrom(numpy_helper.from_array(shifted, tensor.name))
    return len(targets)

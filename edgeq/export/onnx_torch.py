"""An ONNX graph as a `torch.nn.Module`, for `litert-torch` (which converts what `torch.export` captures).

The module interprets the graph node by node with torch functions; torch.export traces that loop into a static
program. Values known before any input arrives (initializers, Constant nodes, shapes of fixed-shape tensors and
what is computed from them only) are folded with ONNX's own reference implementation, so `Shape → Gather → Concat →
Reshape` chains become plain shapes. An operator outside the table is a ModelError naming it. torch is imported by
the caller (`edgeq.export.tflite`): this module is only loaded on the export path.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from edgeq.errors import ModelError

Value = Any  # a torch.Tensor (depends on the inputs) or a numpy array (known before them)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _t(value: Value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value))


def _ints(value: Value, what: str) -> list[int]:
    if isinstance(value, torch.Tensor):
        raise ModelError(f"{what} is computed from the model's inputs at run time", "export the model with static shapes")
    return [int(v) for v in np.asarray(value).reshape(-1)]


def _spatial_pads(a: dict, rank: int) -> tuple[list[int], bool]:
    """ONNX pads (begin..., end...) as F.pad's (last axis first) and whether they are symmetric."""
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise ModelError(f"auto_pad={a['auto_pad']!r} is not supported by the TFLite export", "re-export the model with explicit pads")
    pads = list(a.get("pads", [0] * (2 * rank)))
    begin, end = pads[:rank], pads[rank:]
    flat: list[int] = []
    for b, e in zip(reversed(begin), reversed(end)):
        flat += [b, e]
    return flat, begin == end


def _conv(x, w, b=None, **a):
    rank = w.dim() - 2
    pads, symmetric = _spatial_pads(a, rank)
    padding = pads[::2][::-1] if symmetric else 0
    if not symmetric:
        x = F.pad(x, pads)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[rank]
    return conv(x, _t(w), None if b is None else _t(b), stride=a.get("strides", 1), padding=padding,
                dilation=a.get("dilations", 1), groups=a.get("group", 1))


def _pool(kind: str):
    def pool(x, **a):
        rank = x.dim() - 2
        pads, symmetric = _spatial_pads(a, rank)
        kernel, stride = a["kernel_shape"], a.get("strides", [1] * rank)
        if kind == "max":
            if not symmetric:
                x = F.pad(x, pads, value=float("-inf"))
            return {1: F.max_pool1d, 2: F.max_pool2d}[rank](x, kernel, stride, pads[::2][::-1] if symmetric else 0,
                                                          dilation=a.get("dilations", 1), ceil_mode=bool(a.get("ceil_mode", 0)))
        if not symmetric:
            x = F.pad(x, pads)
        return {1: F.avg_pool1d, 2: F.avg_pool2d}[rank](x, kernel, stride, pads[::2][::-1] if symmetric else 0,
                                                      ceil_mode=bool(a.get("ceil_mode", 0)),
                                                      count_include_pad=bool(a.get("count_include_pad", 0)))
    return pool


def _gemm(a_, b_, c=None, **a):
    a_, b_ = _t(a_), _t(b_)
    if a.get("transA", 0):
        a_ = a_.t()
    if a.get("transB", 0):
        b_ = b_.t()
    y = a.get("alpha", 1.0) * (a_ @ b_)
    return y if c is None else y + a.get("beta", 1.0) * _t(c)


def _batchnorm(x, scale, bias, mean, var, **a):
    return F.batch_norm(x, _t(mean), _t(var), _t(scale), _t(bias), training=False, eps=a.get("epsilon", 1e-5))


def _reshape(x, shape, **a):
    dims = _ints(shape, "a Reshape's shape")
    if not a.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _flatten(x, **a):
    axis = a.get("axis", 1) % max(x.dim(), 1)
    return x.reshape(math.prod(x.shape[:axis]), -1)


def _clip(x, lo=None, hi=None, **a):
    lo = a.get("min", None) if lo is None else float(np.asarray(lo))
    hi = a.get("max", None) if hi is None else float(np.asarray(hi))
    return torch.clamp(x, lo, hi)


def _softmax(fn):
    def soft(x, **a):
        return fn(x, dim=a.get("axis", -1))
    return soft


def _axes(a: dict, axes: Value | None, what: str) -> list[int] | None:
    if axes is not None:
        return _ints(axes, what)
    return list(a["axes"]) if "axes" in a else None


def _reduce(fn):
    def reduce(x, axes=None, **a):
        dims = _axes(a, axes, "a reduction's axes")
        keep = bool(a.get("keepdims", 1))
        return fn(x, dim=dims, keepdim=keep) if dims else fn(x.reshape(-1), dim=0, keepdim=False).reshape([1] * x.dim() if keep else [])
    return reduce


def _unsqueeze(x, axes=None, **a):
    for axis in sorted(d % (x.dim() + len(_axes(a, axes, "Unsqueeze's axes"))) for d in _axes(a, axes, "Unsqueeze's axes")):
        x = x.unsqueeze(axis)
    return x


def _squeeze(x, axes=None, **a):
    dims = _axes(a, axes, "Squeeze's axes")
    return x.squeeze() if dims is None else x.squeeze(tuple(dims))


def _concat(*xs, **a):
    return torch.cat([_t(x) for x in xs], dim=a["axis"])


def _pad(x, pads, value=None, axes=None, **a):
    if a.get("mode", b"constant") not in (b"constant", "constant"):
        raise ModelError(f"Pad mode {a['mode']!r} is not supported by the TFLite export", "use constant padding")
    flat = _ints(pads, "Pad's pads")
    rank = len(flat) // 2
    torch_pads: list[int] = []
    for b, e in zip(reversed(flat[:rank]), reversed(flat[rank:])):
        torch_pads += [b, e]
    return F.pad(x, torch_pads, value=0.0 if value is None else float(np.asarray(value)))


def _resize(x, roi=None, scales=None, sizes=None, **a):
    mode = a.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if sizes is not None and np.asarray(sizes).size:
        size = _ints(sizes, "Resize's sizes")[2:]
        return F.interpolate(x, size=size, mode={"nearest": "nearest", "linear": "bilinear"}[mode])
    factors = [float(v) for v in np.asarray(scales).reshape(-1)][2:]
    return F.interpolate(x, scale_factor=factors, mode={"nearest": "nearest", "linear": "bilinear"}[mode])


def _binary(fn):
    def binary(x, y, **a):
        return fn(_t(x), _t(y))
    return binary


OPS: dict[str, Callable[..., torch.Tensor]] = {
    "Conv": _conv, "Gemm": _gemm, "MatMul": _binary(torch.matmul), "BatchNormalization": _batchnorm,
    "Relu": lambda x, **a: F.relu(x), "LeakyRelu": lambda x, **a: F.leaky_relu(x, a.get("alpha", 0.01)),
    "Sigmoid": lambda x, **a: torch.sigmoid(x), "Tanh": lambda x, **a: torch.tanh(x),
    "HardSigmoid": lambda x, **a: torch.clamp(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0, 1),
    "HardSwish": lambda x, **a: F.hardswish(x), "Clip": _clip, "Erf": lambda x, **a: torch.erf(x),
    "Exp": lambda x, **a: torch.exp(x), "Sqrt": lambda x, **a: torch.sqrt(x), "Neg": lambda x, **a: -x,
    "Abs": lambda x, **a: torch.abs(x), "Identity": lambda x, **a: x, "Dropout": lambda x, *rest, **a: x,
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _binary(torch.div),
    "Pow": _binary(torch.pow), "Max": _binary(torch.maximum), "Min": _binary(torch.minimum),
    "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda x, **a: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "GlobalMaxPool": lambda x, **a: x.amax(dim=tuple(range(2, x.dim())), keepdim=True),
    "Flatten": _flatten, "Reshape": _reshape, "Transpose": lambda x, **a: x.permute(a.get("perm", list(range(x.dim()))[::-1])),
    "Squeeze": _squeeze, "Unsqueeze": _unsqueeze, "Concat": _concat, "Pad": _pad, "Resize": _resize,
    "Softmax": _softmax(torch.softmax), "LogSoftmax": _softmax(torch.log_softmax),
    "ReduceMean": _reduce(torch.mean), "ReduceSum": _reduce(torch.sum), "ReduceMax": _reduce(torch.amax),
}


def _fold(node: onnx.NodeProto, values: list[Value], opset: int) -> list[np.ndarray]:
    """Run one node whose inputs are all known (numpy) with ONNX's reference implementation."""
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" for i in range(len(values))]
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype), np.shape(v))
              for n, v in zip(names, values)]
    outputs = [helper.make_value_info(f"out{i}", onnx.TypeProto()) for i in range(len(node.output))]
    copy = helper.make_node(node.op_type, [n if real else "" for n, real in zip(names, node.input)], [o.name for o in outputs],
                            domain=node.domain)
    copy.attribute.extend(node.attribute)
    graph = helper.make_graph([copy], "fold", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return [np.asarray(v) for v in ReferenceEvaluator(model).run(None, dict(zip(names, values)))]


class OnnxModule(torch.nn.Module):
    """`forward(*inputs)` in the ONNX graph's input order returns its outputs (a tuple when there are several)."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        super().__init__()
        graph = proto.graph
        self.opset = next((i.version for i in proto.opset_import if i.domain in ("", "ai.onnx")), 13)
        self.constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        # Float weights become buffers (torch.export lifts them as the program's constants); integer initializers,
        # shapes and axes, stay numpy and are folded.
        self.weights: dict[str, str] = {}
        for index, (name, array) in enumerate(self.constants.items()):
            if array.dtype.kind == "f":
                self.register_buffer(f"w{index}", torch.from_numpy(array.copy()))
                self.weights[name] = f"w{index}"
        self.input_names = [i.name for i in graph.input if i.name not in self.constants]
        self.output_names = [o.name for o in graph.output]
        self.nodes = list(graph.node)
        unknown = sorted({n.op_type for n in self.nodes if n.domain not in ("", "ai.onnx")
                          or (n.op_type not in OPS and n.op_type not in _FOLD_ONLY)})
        if unknown:
            raise ModelError(f"the TFLite export does not convert the ONNX operator(s) {', '.join(unknown)}",
                             "export the model from PyTorch with `edgeq export` from its module, or replace those operators")

    def forward(self, *inputs: torch.Tensor):
        env: dict[str, Value] = {"": None, **self.constants, **dict(zip(self.input_names, inputs))}
        env.update({name: getattr(self, buffer) for name, buffer in self.weights.items()})
        for node in self.nodes:
            values = [env[name] for name in node.input]
            if node.op_type == "Constant":
                outs = [numpy_helper.to_array(node.attribute[0].t) if node.attribute[0].type == onnx.AttributeProto.TENSOR
                        else np.asarray(helper.get_attribute_value(node.attribute[0]))]
            elif node.op_type == "Shape" and isinstance(values[0], torch.Tensor):
                outs = [np.asarray(values[0].shape, dtype=np.int64)[slice(*[_attrs(node).get(k) for k in ("start", "end")])]]
            elif all(not isinstance(v, torch.Tensor) for v in values if v is not None):
                outs = _fold(node, values, self.opset)
            elif node.op_type in _FOLD_ONLY:
                raise ModelError(f"ONNX {node.op_type} ({node.name or node.output[0]}) works on values computed from the "
                                 "inputs at run time", "export the model with static shapes")
            else:
                args = list(values)
                while args and args[-1] is None:
                    args.pop()
                outs = OPS[node.op_type](*args, **_attrs(node))
                outs = list(outs) if isinstance(outs, tuple) else [outs]
            env.update(zip(node.output, outs))
        results = tuple(_t(env[name]) for name in self.output_names)
        return results if len(results) > 1 else results[0]


# Operators that only ever compute shapes and indices here: folded, never traced.
_FOLD_ONLY = {"Constant", "Shape", "Gather", "Cast", "Slice", "ConstantOfShape", "Range", "Equal", "Where", "Expand"}

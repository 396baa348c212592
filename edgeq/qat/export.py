"""export: the trained fake-quant module → the QDQ ONNX model that static PTQ would write for the same network, with
the module's weights, scales and zero points.

The float network (Conv+BN folded, the trained weights) is exported and run through edgeq's static path, so the QDQ
placement, op selection and ONNX Runtime fusions are exactly PTQ's; then every activation scale/zero point, every
weight (int8 or int4) and scale, and every int32 bias is replaced by what the fake-quant module computes with.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import fx

from edgeq.errors import ConfigError, ModelError
from edgeq.qat.fake_quant import ActQuant
from edgeq.qat.prepare import ComputeNode, Plan, export_float, float_config, float_state, link, read_plan, state_of


WEIGHT_STORAGE = ("int4", "int8")


def export(model: fx.GraphModule, path: str | Path, example_inputs: Any = None, *, force: bool = False,
           weight_storage: str = "int4") -> Path:
    """Write the prepared (and trained) module as a QDQ ONNX model that runs on ONNX Runtime CPU.

    `example_inputs` (an array or tensor, sample axis first) fixes the input shape traced; by default the first
    calibration sample. Returns the path written (atomically). For 4-bit weights, `weight_storage` "int8" stores the
    same 4-bit values in int8 initializers (as PyTorch's converted QAT models do): the file is int8-sized but ONNX
    Runtime's CPU provider then fuses the int8 Conv/Gemm kernels, where int4 DequantizeLinear runs the float op.

    >>> edgeq.qat.export(qat, "model_qat.onnx", train_x[:1])     # doctest: +SKIP
    PosixPath('model_qat.onnx')
    """
    return to_onnx(model, example_inputs, weight_storage=weight_storage).save(path, force=force)


def to_onnx(model: fx.GraphModule, example_inputs: Any = None, *, weight_storage: str = "int4"):
    """The QDQ edgeq.Model of a prepared module (what `export` saves)."""
    if weight_storage not in WEIGHT_STORAGE:
        raise ConfigError(f"unknown weight storage {weight_storage!r}", f"use one of: {', '.join(WEIGHT_STORAGE)}")
    from edgeq.data import Dataset
    from edgeq.model import Model
    from edgeq.quantize.int8 import quantize_static

    state = state_of(model)
    template = state.template
    template.load_state_dict(float_state(model, template), strict=True)
    example = state.sample[:1] if example_inputs is None else _array(example_inputs)
    fp32 = export_float(template, state.input_name, state.output_names, example)
    qdq, _, _ = quantize_static(fp32, float_config(state.config), Dataset.from_arrays({state.input_name: state.sample}))
    plan = read_plan(qdq.proto)
    links = link(template, fp32, plan, state)
    proto = onnx.ModelProto()
    proto.CopyFrom(qdq.proto)
    _patch(proto, plan, links, model)
    if weight_storage == "int8":
        _widen_int4(proto)
    return Model(proto, None)


def _widen_int4(proto: onnx.ModelProto) -> None:
    """int4 initializers (weights and their zero points) → int8 with the same values."""
    for init in proto.graph.initializer:
        if init.data_type == onnx.TensorProto.INT4:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.int8), init.name))


def _array(x: Any) -> np.ndarray:
    if isinstance(x, (tuple, list)):
        x = x[0]
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, np.float32)


def _patch(proto: onnx.ModelProto, plan: Plan, links: Any, model: fx.GraphModule) -> None:
    inits = {i.name: i for i in proto.graph.initializer}
    acts = _acts_by_fx_node(model)
    act_scales: dict[str, np.ndarray] = {}
    for pair in plan.acts:
        module = acts.get(links.act_nodes[pair.tensor])
        if module is None:
            raise ModelError(f"the exported graph quantizes {pair.tensor!r}, which the QAT module does not",
                             "export the module prepare() returned, without changing its graph")
        scale = module.effective_scale().detach().numpy().astype(np.float32)
        _set(inits[pair.scale_name], scale)
        zero = numpy_helper.to_array(inits[pair.zero_name])
        _set(inits[pair.zero_name], np.asarray(int(module.zero), zero.dtype))
        act_scales[pair.scale_name] = scale
    for comp in plan.computes:
        qmodule = model.get_submodule(links.weight_modules[comp.weight])
        if not hasattr(qmodule, "qtype"):
            raise ModelError(f"the exported graph quantizes the weights {comp.weight!r}, which the QAT module keeps float",
                             "export the module prepare() returned, without changing its graph")
        _patch_weight(inits, comp, qmodule, act_scales)


def _acts_by_fx_node(model: fx.GraphModule) -> dict[str, ActQuant]:
    """fx node name (in the float template) → the ActQuant inserted after it."""
    out = {}
    for node in model.graph.nodes:
        if node.op == "call_module" and isinstance(model.get_submodule(node.target), ActQuant):
            out[node.args[0].name] = model.get_submodule(node.target)
    return out


def _patch_weight(inits: dict, comp: ComputeNode, qmodule: Any, act_scales: dict[str, np.ndarray]) -> None:
    w = qmodule.float_weight().detach().numpy().astype(np.float32)
    scale = qmodule.weight_scales().detach().numpy().astype(np.float32)
    qt = qmodule.qtype
    q = np.clip(np.rint(w / scale.reshape(-1, *([1] * (w.ndim - 1)))), qt.qmin, qt.qmax)
    stored = inits[comp.weight_q]
    transposed = list(stored.dims) != list(w.shape)
    if transposed:
        q = q.T
    _set_ints(stored, q)
    _set(inits[comp.weight_scale], scale.reshape(tuple(inits[comp.weight_scale].dims)))
    if comp.bias_q is None or qmodule.float_bias() is None:
        return
    in_scale = act_scales.get(comp.input_scale)
    if in_scale is None:
        in_scale = numpy_helper.to_array(inits[comp.input_scale]).astype(np.float32)
    bias_scale = (np.float32(in_scale) * scale).astype(np.float32)
    b = qmodule.float_bias().detach().numpy().astype(np.float32)
    qb = np.clip(np.rint(b / bias_scale), np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32)
    _set(inits[comp.bias_q], qb.reshape(tuple(inits[comp.bias_q].dims)))
    _set(inits[comp.bias_scale], bias_scale.reshape(tuple(inits[comp.bias_scale].dims)))


def _set(init: onnx.TensorProto, value: np.ndarray) -> None:
    new = numpy_helper.from_array(np.asarray(value, dtype=numpy_helper.to_array(init).dtype).reshape(tuple(init.dims)), init.name)
    init.CopyFrom(new)


def _set_ints(init: onnx.TensorProto, q: np.ndarray) -> None:
    """Weights as the initializer's own integer type (int8, or int4 packed two to a byte)."""
    if init.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        import ml_dtypes  # onnx's own dependency for its 4-bit types

        dtype = ml_dtypes.int4 if init.data_type == onnx.TensorProto.INT4 else ml_dtypes.uint4
        new = numpy_helper.from_array(q.astype(np.int8).reshape(tuple(init.dims)).astype(dtype), init.name)  # packed raw bytes
    else:
        new = numpy_helper.from_array(q.astype(numpy_helper.to_array(init).dtype).reshape(tuple(init.dims)), init.name)
    init.CopyFrom(new)

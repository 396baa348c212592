"""prepare: a torch module → a fake-quant module that computes what the static QDQ model of the same network computes.

How the placement is made to match PTQ exactly: the module is traced (torch.fx), Conv+BatchNorm pairs are folded as
the deployed graph has them, the folded float network is exported to ONNX and quantized by edgeq's own static path
(the same calibration, recipe and QDQ placement as `edgeq quantize --mode static`). Each activation QuantizeLinear of
that PTQ model is then located in the torch graph by value (the tensor it quantizes, computed by both on the same
calibration samples) and a fake-quant pair with the PTQ scale and zero point is inserted there; each quantized
Conv/Gemm is located by its weights and gets weight (and int32 bias) fake quantization. Pairs that re-use an
upstream scale (after MaxPool, Flatten, Reshape…) are identities on quantized data and need nothing in torch.

A folded Conv+BN becomes a QConvBn, trained unfolded: on a MobileNetV3-style net, QAT of the pre-folded weights
recovered 75% of the W4A8 PTQ loss (torch.ao's eager QAT of the folded net: the same), re-estimating the BatchNorm
statistics on the quantized network 93% (bench/qat.py); eval mode computes the folded op that is deployed.
"""
from __future__ import annotations

import copy
import tempfile
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import fx, nn

from edgeq.errors import ConfigError, DataError, ModelError
from edgeq.qat.fake_quant import CONV_BN_MODULES, QUANT_MODULES, ActQuant
from edgeq.quantize.config import Int8Static

MATCH_SAMPLES = 32
COMPUTE_OPS = ("Conv", "Gemm", "MatMul")
ACT_RANGES = {onnx.TensorProto.UINT8: (0, 255), onnx.TensorProto.INT8: (-128, 127)}


@dataclass
class QATState:
    """What export needs besides the trained module: the float template it was built from and the recipe."""

    config: Int8Static
    template: fx.GraphModule
    input_name: str
    output_names: list[str]
    sample: np.ndarray
    learn_scales: bool
    conv_bn: dict[str, tuple[nn.Module, nn.Module]] = field(default_factory=dict)  # folded conv path → (conv, BN) before folding
    ptq: Any = None  # the PTQ model (edgeq.Model) of the same network, for comparison
    notes: list[str] = field(default_factory=list)


def prepare(model: nn.Module, config: Int8Static | None = None, calib: Any = None, *, learn_scales: bool = False,
            input_name: str | None = None, output_names: list[str] | None = None) -> fx.GraphModule:
    """Wrap `model` with fake quantization that matches edgeq's static recipe `config`, initialised from a PTQ
    calibration on `calib` (an edgeq.Dataset, an array, or a dict with one array; sample axis first).

    `learn_scales` makes activation and weight scales trainable (LSQ). The result is a torch.fx.GraphModule: train it
    with your own loop or `edgeq.qat.finetune`, then `edgeq.qat.export` it.

    >>> qat = edgeq.qat.prepare(model, edgeq.Int8Static(per_channel=False, weight_bits=4), calib=train_x[:512])  # doctest: +SKIP
    >>> edgeq.qat.finetune(qat, (train_x, train_y), (val_x, val_y), epochs=3)                               # doctest: +SKIP
    >>> edgeq.qat.export(qat, "model_qat.onnx")                                                             # doctest: +SKIP
    """
    from edgeq.data import Dataset
    from edgeq.quantize.int8 import quantize_static

    config = config or Int8Static()
    if not isinstance(config, Int8Static):
        raise ConfigError(f"QAT follows the static recipe; got {type(config).__name__}", "pass edgeq.Int8Static(...)")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"prepare needs a torch.nn.Module, got {type(model).__name__}", "pass the model object")
    name, x = calib_arrays(calib, input_name)
    if config.max_samples:
        x = x[:config.max_samples]
    template, conv_bn = fold_conv_bn(trace(model))
    outputs = output_names or ["output"]
    state = QATState(config, template, name, outputs, x[:MATCH_SAMPLES], learn_scales, conv_bn)
    fp32 = export_float(template, name, outputs, x[:1])
    ptq, _, _ = quantize_static(fp32, ptq_config(config), Dataset.from_arrays({name: x}, description="QAT calibration"))
    state.ptq = ptq
    plan = read_plan(ptq.proto)
    links = link(template, fp32, plan, state)
    return build(template, plan, links, state)


def calib_arrays(calib: Any, input_name: str | None) -> tuple[str, np.ndarray]:
    """One float32 input array (sample axis first) and its name from a Dataset, a dict or an array/tensor."""
    from edgeq.data import Dataset

    if calib is None:
        raise DataError("QAT needs calibration data to initialise its scales as PTQ would", "pass calib=... (a few hundred training samples)")
    if isinstance(calib, Dataset):
        chunks = list(calib.chunks())
        if not chunks:
            raise DataError(f"{calib.description} is empty", "give a few hundred samples")
        keys = list(chunks[0].inputs)
        calib = {k: np.concatenate([np.asarray(c.inputs[k]) for c in chunks]) for k in keys}
    if isinstance(calib, torch.Tensor):
        calib = calib.detach().cpu().numpy()
    if isinstance(calib, dict):
        arrays = {k: v for k, v in calib.items() if k != "labels"}
        if len(arrays) != 1:
            raise ConfigError(f"QAT supports models with one input; the data has {len(arrays)} arrays ({', '.join(arrays)})",
                              "give one input array (plus optional labels)")
        (name, x), = arrays.items()
        name = input_name or name
    else:
        name, x = input_name or "input", calib
    x = np.asarray(x)
    if x.ndim < 1 or len(x) == 0 or not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"calibration data for QAT must be a non-empty float array, got dtype {x.dtype} shape {x.shape}",
                        "give float32 samples with the sample axis first")
    return name, x.astype(np.float32, copy=False)


def trace(model: nn.Module) -> fx.GraphModule:
    model = copy.deepcopy(model).eval()
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # data-dependent control flow and the like
        raise ConfigError(f"QAT could not trace the model with torch.fx ({type(exc).__name__}: {str(exc).splitlines()[0][:150]})",
                          "make forward() free of data-dependent Python control flow, or quantize the exported ONNX with PTQ") from None


def fold_conv_bn(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, tuple[nn.Module, nn.Module]]]:
    """Fold every BatchNorm that directly follows a Conv (whose output nothing else reads) into the Conv, with the
    running statistics, as the deployed graph has it (ONNX Runtime folds it before quantization too). Returns the
    folded module and, per folded Conv, copies of the Conv and BatchNorm before folding (QAT trains them unfolded)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    modules = dict(gm.named_modules())
    originals: dict[str, tuple[nn.Module, nn.Module]] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        prev = node.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module" and isinstance(modules.get(prev.target), (nn.Conv1d, nn.Conv2d))
                and len(prev.users) == 1):
            continue
        originals[prev.target] = (copy.deepcopy(modules[prev.target]), copy.deepcopy(modules[node.target]))
        fused = fuse_conv_bn_eval(modules[prev.target].eval(), modules[node.target].eval())
        _set_module(gm, prev.target, fused)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        _set_module(gm, node.target, nn.Identity())
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, originals


def _set_module(gm: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, leaf = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)


def export_float(template: fx.GraphModule, input_name: str, output_names: list[str], example: np.ndarray):
    """The float template as an ONNX edgeq.Model (TorchScript exporter, dynamic batch)."""
    from edgeq.model import Model

    template.eval()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "float.onnx"
        dynamic = {input_name: {0: "batch"}, **{o: {0: "batch"} for o in output_names}}
        try:
            torch.onnx.export(template, (torch.from_numpy(np.ascontiguousarray(example[:1])),), str(path), dynamo=False,
                              opset_version=17, input_names=[input_name], output_names=output_names, dynamic_axes=dynamic)
        except Exception as exc:
            raise ModelError(f"the model could not be exported to ONNX ({type(exc).__name__}: {str(exc).splitlines()[0][:150]})",
                             "check that the calibration samples have the shape the model expects") from None
        return Model(onnx.load(str(path)), None)


# ----- the PTQ model's plan --------------------------------------------------------------------------------------

@dataclass
class ActPair:
    tensor: str          # the float tensor quantized (a graph output's original name)
    scale_name: str
    zero_name: str
    scale: float
    zero: int
    qmin: int
    qmax: int


@dataclass
class ComputeNode:
    op: str
    weight: str                  # float weight initializer name in the prepared FP32 graph
    weight_scale: str            # initializer names in the QDQ graph
    weight_q: str
    input_scale: str | None
    bias_q: str | None
    bias_scale: str | None


@dataclass
class Plan:
    acts: list[ActPair]
    computes: list[ComputeNode]


def read_plan(proto: onnx.ModelProto) -> Plan:
    """Activation pairs (one per distinct scale, in graph order) and quantized compute nodes of a QDQ model."""
    inits = {i.name: i for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    outputs = {o.name for o in proto.graph.output}
    acts, seen = [], set()
    for node in proto.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits or node.input[1] in seen:
            continue
        seen.add(node.input[1])
        tensor = node.input[0]
        suffix = "_QuantizeLinear_Input"
        if tensor.endswith(suffix) and tensor[:-len(suffix)] in outputs:
            tensor = tensor[:-len(suffix)]
        zero = inits[node.input[2]]
        qmin, qmax = ACT_RANGES[zero.data_type]
        acts.append(ActPair(tensor, node.input[1], node.input[2], float(numpy_helper.to_array(inits[node.input[1]])),
                            int(numpy_helper.to_array(zero)), qmin, qmax))
    computes = []
    for node in proto.graph.node:
        if node.op_type not in COMPUTE_OPS or len(node.input) < 2:
            continue
        wdq = producer.get(node.input[1])
        if wdq is None or wdq.op_type != "DequantizeLinear" or wdq.input[0] not in inits:
            continue
        xdq = producer.get(node.input[0])
        bdq = producer.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        bias_ok = bdq is not None and bdq.op_type == "DequantizeLinear" and bdq.input[0] in inits
        computes.append(ComputeNode(node.op_type, wdq.input[0].removesuffix("_quantized"), wdq.input[1], wdq.input[0],
                                    xdq.input[1] if xdq is not None and xdq.op_type == "DequantizeLinear" else None,
                                    bdq.input[0] if bias_ok else None, bdq.input[1] if bias_ok else None))
    return Plan(acts, computes)


# ----- linking ONNX tensors and weights to the torch graph ---------------------------------------------------------

@dataclass
class Links:
    act_nodes: dict[str, str]        # ONNX tensor → fx node name
    weight_modules: dict[str, str]   # ONNX weight initializer → module path


def link(template: fx.GraphModule, fp32, plan: Plan, state: QATState) -> Links:
    """Locate the PTQ model's quantized tensors and weights in the torch graph."""
    from edgeq.quantize.prepare import prepare as onnx_prepare

    prepared, _ = onnx_prepare(fp32, per_channel=state.config.per_channel)
    onnx_values = _onnx_values(prepared, [a.tensor for a in plan.acts], state)
    fx_values = _fx_values(template, state.sample)
    act_nodes = {}
    for act in plan.acts:
        target = onnx_values[act.tensor]
        best = None
        for node_name, value in fx_values:
            if value.shape != target.shape:
                continue
            err = float(np.max(np.abs(value - target))) / (float(np.max(np.abs(target))) + 1e-12) if target.size else 0.0
            if err < 1e-4:
                best = node_name  # the latest node with this value: a ReLU after its Conv, as the QDQ model has it
        if best is None:
            raise ModelError(f"QAT could not find the tensor {act.tensor!r} of the quantized ONNX graph in the torch module",
                             "report this model to the edgeq maintainers; PTQ (edgeq quantize) still works")
        act_nodes[act.tensor] = best
    weights = {i.name: numpy_helper.to_array(i) for i in prepared.proto.graph.initializer}
    modules = {path: m for path, m in template.named_modules() if type(m) in QUANT_MODULES}
    weight_modules = {}
    for comp in plan.computes:
        w = weights.get(comp.weight)
        found = None
        for path, m in modules.items():
            mw = m.weight.detach().numpy()
            if (w is not None and w.shape == mw.shape and np.array_equal(w, mw)) or (w is not None and w.ndim == 2 and w.T.shape == mw.shape and np.array_equal(w.T, mw)):
                found = path
                break
        if found is None:
            raise ModelError(f"QAT could not find the weights {comp.weight!r} of a quantized {comp.op} in the torch module",
                             "QAT covers nn.Conv1d/Conv2d/Linear layers; report this model to the edgeq maintainers")
        weight_modules[comp.weight] = found
    return Links(act_nodes, weight_modules)


def _onnx_values(model, names: list[str], state: QATState) -> dict[str, np.ndarray]:
    from edgeq.calibrate import with_outputs
    from edgeq.model import make_session

    graph_inputs = {i.name for i in model.proto.graph.input}
    wanted = [n for n in names if n not in graph_inputs]
    session = make_session(with_outputs(model.proto, wanted), threads=0)
    feed = {state.input_name: state.sample}
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    return {n: feed[n] if n in graph_inputs else values[n] for n in names}


def _fx_values(gm: fx.GraphModule, sample: np.ndarray) -> list[tuple[str, np.ndarray]]:
    recorded: list[tuple[str, np.ndarray]] = []

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if isinstance(out, torch.Tensor) and out.is_floating_point() and n.op != "output":
                recorded.append((n.name, out.detach().numpy().copy()))
            return out

    with torch.no_grad():
        Recorder(gm.eval()).run(torch.from_numpy(sample))
    return recorded


# ----- building the fake-quant module -------------------------------------------------------------------------------

def build(template: fx.GraphModule, plan: Plan, links: Links, state: QATState) -> fx.GraphModule:
    config = state.config
    qat = copy.deepcopy(template)
    acts_by_scale: dict[str, ActQuant] = {}
    nodes = {n.name: n for n in qat.graph.nodes}
    for i, act in enumerate(plan.acts):
        module = ActQuant(act.scale, act.zero, act.qmin, act.qmax, act.tensor, learn=state.learn_scales)
        module_name = f"edgeq_act_{i}"
        qat.add_module(module_name, module)
        target = nodes[links.act_nodes[act.tensor]]
        with qat.graph.inserting_after(target):
            q = qat.graph.call_module(module_name, (target,))
        target.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)
        acts_by_scale[act.scale_name] = module
    for comp in plan.computes:
        path = links.weight_modules[comp.weight]
        float_module = qat.get_submodule(path)
        if type(float_module) not in QUANT_MODULES:
            raise ConfigError(f"layer {path!r} is called more than once in forward(); its two uses would need different "
                              "bias scales", "give each use its own layer (weights may be copied), or use PTQ")
        if path in state.conv_bn and type(float_module) in CONV_BN_MODULES:
            conv, bn = state.conv_bn[path]
            qmodule = CONV_BN_MODULES[type(float_module)].from_conv_bn(conv, bn, config.weight_bits, config.per_channel, state.learn_scales)
        else:
            qmodule = QUANT_MODULES[type(float_module)].from_float(float_module, config.weight_bits, config.per_channel, state.learn_scales)
        qmodule.onnx_weight = comp.weight
        qmodule.quantize_bias = comp.bias_q is not None
        if comp.input_scale in acts_by_scale:
            qmodule.input_quant = [acts_by_scale[comp.input_scale]]
        _set_module(qat, path, qmodule)
    qat.graph.lint()
    qat.recompile()
    qat.edgeq_qat = state
    return qat.eval()


def fake_quant_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every fake-quant pair and weight quantizer of a prepared module on or off (off = the float network)."""
    for m in model.modules():
        if hasattr(m, "enabled") and (isinstance(m, ActQuant) or hasattr(m, "qtype")):
            m.enabled = enabled


def float_state(model: nn.Module, template: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The template's state dict with the prepared module's trained values: every quantized layer's float (folded)
    weight and bias, everything else as it is."""
    keys = set(template.state_dict())
    state = {k: v for k, v in model.state_dict().items() if k in keys}
    with torch.no_grad():
        for path, m in model.named_modules():
            if hasattr(m, "float_weight") and f"{path}.weight" in keys:
                state[f"{path}.weight"] = m.float_weight().detach().clone()
                if m.float_bias() is not None and f"{path}.bias" in keys:
                    state[f"{path}.bias"] = m.float_bias().detach().clone()
    return state


def state_of(model: nn.Module) -> QATState:
    state = getattr(model, "edgeq_qat", None)
    if state is None:
        raise ConfigError("this module was not prepared for QAT", "call edgeq.qat.prepare(model, config, calib=...) first")
    return state


# PTQ accuracy repairs (edgeq.quantize.repair) rewrite weights and biases before quantization; QAT trains them
# instead, so its PTQ initialisation and its export use the plain recipe.
REPAIR_DEFAULTS = {"weight_range": "minmax", "bias_correction": False, "equalize": False, "smoothquant": None}


def ptq_config(config: Int8Static) -> Int8Static:
    """The recipe without repairs: the PTQ model QAT starts from (and its zero-epoch export reproduces)."""
    names = {f.name for f in fields(config)}
    return replace(config, **{k: v for k, v in REPAIR_DEFAULTS.items() if k in names})


def float_config(config: Int8Static) -> Int8Static:
    """The recipe export re-runs for the graph structure (its ranges are replaced by the module's)."""
    return replace(ptq_config(config), method="minmax", max_samples=None)

"""PyTorch in: a `torch.nn.Module` with example inputs, an importable MODULE:FACTORY with a weights-only state dict, or
a `torch.export` program (`.pt2`) becomes an edgeq `Model`, and the rest of the pipeline runs on it unchanged.

The export: `torch.export` captures the module (non-strict), the dynamo exporter (`torch.onnx.export(...,
dynamo=True)`) translates the program to ONNX; when either step fails, the TorchScript exporter (`dynamo=False`)
traces the module instead and the model's notes say why. A trace that would freeze a data-dependent branch or value
(a `TracerWarning`) counts as a failure, not a model: it would compute something else on other inputs. When both fail
the `ModelError` names the operator (or the line) each exporter stopped at. The ONNX file is written to a temporary
folder, loaded and checked like any ONNX model (`model.load`), and the folder removed. torch is imported here only,
inside the functions: ONNX paths never import it.

>>> import edgeq
>>> model = edgeq.from_torch(net, torch.zeros(1, 3, 32, 32))        # doctest: +SKIP
>>> model.notes                                                      # doctest: +SKIP
['exported from Net with the dynamo exporter (torch.export, opset 18)']
>>> is_torch_model("mynets.cnn:build"), is_torch_model("model.pt2"), is_torch_model("model.onnx")
(True, True, False)
>>> parse_shape("1,3,32,32")
(1, 3, 32, 32)
"""
from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.errors import ConfigError, ModelError
from edgeq.model import Model, load

_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
# The operator an exporter's message names: torch.export's OpOverload, an FX target, or TorchScript's 'aten::op'.
_OPERATOR = re.compile(r"OpOverload\(op='([\w.]+)'|target=torch\.ops\.([\w.]+)|'(\w+::\w+)'")
# The user's line a torch.export error points at ("The following call raised this error: File ..., line N, in f").
_USER_LINE = re.compile(r'File "([^"]+)", line (\d+), in \w+\s*\n\s*(\S[^\n]*)')
CHECK_RTOL = 1e-3   # the ONNX export must reproduce the module's outputs to this share of their largest magnitude
_EXPORT_FIX = ("make the failing part exportable (torch.where or torch.cond for a data-dependent branch, a supported "
               "operator) or export the model to ONNX yourself and pass the .onnx file")


def is_torch_model(spec: str | Path) -> bool:
    """Whether a model argument names a PyTorch model: a `.pt2` program, or MODULE:FACTORY that is not a file."""
    text = str(spec)
    return Path(text).suffix == ".pt2" or (bool(_FACTORY.match(text)) and not Path(text).exists())


def parse_shape(text: str) -> tuple[int, ...]:
    """--input-shape: positive whole dims, comma-separated."""
    parts = [p.strip() for p in text.split(",")]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"--input-shape {text!r} is not a shape", "give positive dims, comma-separated, e.g. --input-shape 1,3,32,32")
    return tuple(int(p) for p in parts)


def load_factory(spec: str):
    """Import MODULE and return FACTORY from 'MODULE:FACTORY' (the current folder is importable, as with `python -m`)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"model {spec!r} is not MODULE:FACTORY", "e.g. mypackage.models:build_net (a function returning the nn.Module)")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import module {module_name!r}: {exc}", "check the name and that it is on PYTHONPATH (or in the current folder)") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ConfigError(f"module {module_name!r} has no callable {attr!r}", "name a function or class that builds the model with no arguments")
    return factory


def load_module(spec: str, weights: str | Path):
    """The module FACTORY builds, with the state dict in `weights` (read `torch.load(weights_only=True)`), in eval mode."""
    torch = _torch()
    from torch import nn

    factory = load_factory(spec)
    try:
        module = factory()
    except Exception as exc:
        raise ConfigError(f"{spec}() failed: {type(exc).__name__}: {exc}", "the factory must build the model with no arguments") from None
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{spec}() returned {type(module).__name__}, not a torch.nn.Module", "return the model object")
    weights = Path(weights)
    if not weights.is_file():
        raise ModelError(f"weights file not found: {weights}", "pass the state dict saved with torch.save(model.state_dict(), PATH)")
    try:
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot read weights {weights} as a weights-only state dict ({first})",
                         "save it with torch.save(model.state_dict(), PATH); pickled modules are refused") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{weights} is not a state dict of tensors", "save it with torch.save(model.state_dict(), PATH)")
    try:
        module.load_state_dict(state)
    except Exception as exc:
        raise ModelError(f"the weights in {weights} do not fit {spec}(): {' '.join(str(exc).split())[:200]}",
                         "use the factory the weights were trained with") from None
    return module.eval()


def load_torch(spec: str | Path, weights: str | Path | None = None, input_shapes: list[tuple[int, ...]] | None = None,
               dtype: str = "float32") -> Model:
    """The command line's PyTorch model: MODULE:FACTORY with `weights` and one shape per input (example inputs of
    zeros in `dtype`), or a `.pt2` program (its saved example inputs, or zeros of `input_shapes`)."""
    if Path(str(spec)).suffix == ".pt2":
        if weights is not None:
            raise ConfigError("--weights is for MODULE:FACTORY; a .pt2 program holds its weights", "leave out --weights")
        program = load_program(Path(spec))
        examples = _zeros(input_shapes, dtype) if input_shapes else None
        return from_torch(program, examples, name=Path(spec).stem)
    if weights is None or not input_shapes:
        raise ConfigError(f"the PyTorch model {spec} needs --weights and --input-shape",
                          "pass --weights STATE_DICT.pt and --input-shape 1,3,32,32 (one per input, in forward's order)")
    return from_torch(load_module(str(spec), weights), _zeros(input_shapes, dtype), name=str(spec).partition(":")[2])


def load_program(path: Path):
    """A `torch.export.save` archive, refused when it holds pickled payloads (tensor subclasses, script or opaque
    objects): only raw tensors and the JSON program are read."""
    torch = _torch()
    if not path.is_file():
        raise ModelError(f"model file not found: {path}", "check the path")
    pickled = _pickled_entries(path)
    if pickled:
        raise ModelError(f"{path} holds pickled objects ({', '.join(pickled[:3])}); edgeq does not unpickle model files",
                         "export the module again with plain tensors only, or give MODULE:FACTORY with --weights")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001 - a damaged archive raises anything; all mean "not a readable program"
        raise ModelError(f"{path} is not a readable torch.export program ({type(exc).__name__}: {_one_line(exc)[:160]})",
                         "save it with torch.export.save(torch.export.export(model, example_inputs), PATH)") from None


def _pickled_entries(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            configs = [n for n in names if n.endswith("_config.json") and "/data/" in f"/{n}"]
            pickled = [n for n in names if Path(n).name.startswith(("custom_obj_", "opaque_obj_"))]
            for name in configs:
                entries = json.loads(archive.read(name)).get("config", {})
                pickled += [f"{name}:{key}" for key, meta in entries.items() if isinstance(meta, dict) and meta.get("use_pickle")]
    except (zipfile.BadZipFile, OSError, ValueError):
        raise ModelError(f"{path} is not a torch.export archive (.pt2)", "save it with torch.export.save(program, PATH)") from None
    return pickled


def from_torch(module: Any, example_inputs: Any = None, *, name: str | None = None) -> Model:
    """Export a `torch.nn.Module` (or a `torch.export.ExportedProgram`) to ONNX and return it as a `Model`.

    `example_inputs`: one tensor or array, or a tuple of them (forward's positional arguments); a program may leave
    it out and use the inputs it was exported with. The ONNX inputs are named after forward's arguments (the data's
    array names), the outputs `output` (or `output_0`, `output_1`, ...). The notes say which exporter wrote it."""
    torch = _torch()
    program = module if isinstance(module, torch.export.ExportedProgram) else None
    if program is None and not isinstance(module, torch.nn.Module):
        raise ConfigError(f"from_torch takes a torch.nn.Module or an ExportedProgram, not {type(module).__name__}",
                          "pass the model object (or load an .onnx file with edgeq.load)")
    args = _example_args(example_inputs, program)
    label = name or type(module.module() if program is not None else module).__name__
    if program is None:
        module = module.eval()
    input_names = _input_names(module, program, len(args))
    with tempfile.TemporaryDirectory(prefix="edgeq-torch-") as tmp:
        path = Path(tmp) / f"{label}.onnx"
        notes = _export(module, program, args, input_names, path, label)
        exported = load(path)
    exported.proto.graph.name = label
    _name_batch_dim(exported.proto)
    return Model(exported.proto, None, notes)


def _name_batch_dim(proto) -> None:
    """The dynamo exporter names the dynamic batch after its symbol (s0, s31, ...): call it `batch`, as TorchScript's."""
    graph = proto.graph
    symbols = {v.type.tensor_type.shape.dim[0].dim_param for v in graph.input if v.type.tensor_type.shape.dim}
    for value in (*graph.input, *graph.output, *graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param and dim.dim_param in symbols:
                dim.dim_param = "batch"


def _torch():
    try:
        import torch
    except ImportError:
        raise ConfigError("a PyTorch model needs PyTorch, which is not installed", "pip install 'edgeq[torch]', or give an .onnx model") from None
    return torch


def _zeros(shapes: list[tuple[int, ...]], dtype: str) -> tuple:
    torch = _torch()
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ConfigError(f"--input-dtype {dtype} is not a torch dtype", "use e.g. float32, float16, int64")
    return tuple(torch.zeros(shape, dtype=getattr(torch, dtype)) for shape in shapes)


def _example_args(example_inputs: Any, program: Any) -> tuple:
    torch = _torch()
    if example_inputs is None:
        saved = getattr(program, "example_inputs", None) if program is not None else None
        if not saved or saved[1]:
            raise ConfigError("example inputs are needed to export the model", "pass example_inputs= (or --input-shape)")
        example_inputs = saved[0]
    items = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    args = tuple(torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x for x in items)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise ConfigError("example inputs must be tensors or numpy arrays", "pass one tensor, or a tuple with one per forward argument")
    return args


def _input_names(module: Any, program: Any, count: int) -> list[str]:
    if program is not None:
        from torch.export.graph_signature import InputKind

        names = [s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    else:
        names = [p.name for p in inspect.signature(module.forward).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(names) < count:
        names = [f"input_{i}" for i in range(count)]
    return names[:count]


def _output_names(outputs: Any) -> list[str]:
    count = len(outputs) if isinstance(outputs, (tuple, list)) else 1
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def _export(module: Any, program: Any, args: tuple, input_names: list[str], path: Path, label: str) -> list[str]:
    """Write `path` with the dynamo exporter, or with TorchScript's when it fails, checked against the module on the
    example's shapes; the notes say which exporter, and why the batch dim is fixed when it is."""
    from edgeq.runtimes.litert import quiet

    torch = _torch()
    batched = _batched(args)
    with quiet(path.with_suffix(".log")), warnings.catch_warnings(), torch.no_grad():  # the exporters print progress on fd 1 and 2
        warnings.simplefilter("ignore")
        try:
            captured, notes = (program, []) if program is not None else _capture(module, args, batched)
            output_names = _output_names(captured.module()(*args))
            onnx_program = torch.onnx.export(captured, args, dynamo=True, input_names=input_names, output_names=output_names)
            onnx_program.save(str(path))
            _check(path, captured.module(), args, input_names, label)
            return [f"exported from {label} with the dynamo exporter (torch.export, opset {_opset(onnx_program)})", *notes]
        except Exception as exc:  # noqa: BLE001 - torch.export and the translation raise many types; all mean "cannot export"
            dynamo_reason = _reason(exc)
        traced = program.module() if program is not None else module
        note = f"exported from {label} with the TorchScript exporter: the dynamo exporter stopped at {dynamo_reason}"
        try:
            _torchscript(traced, args, input_names, path, dynamic=True)
            _check(path, traced, batched, input_names, label)
            return [note]
        except _FrozenTrace as exc:
            script_reason = str(exc)
        except Exception:  # noqa: BLE001 - a trace that fixes its batch: the example's batch, below
            script_reason = ""
        try:
            if not script_reason:
                _torchscript(traced, args, input_names, path, dynamic=False)
                _check(path, traced, args, input_names, label)
                return [note, f"the batch dim is fixed at {len(args[0])}: the traced module does not run at another batch"]
        except Exception as exc:  # noqa: BLE001 - as above, for the TorchScript exporter
            script_reason = _reason(exc)
    raise ModelError(f"cannot export {label} to ONNX: the dynamo exporter stopped at {dynamo_reason}; "
                     f"the TorchScript exporter at {script_reason}", _EXPORT_FIX)


def _batched(args: tuple) -> tuple:
    """The example inputs at batch 2 where they have batch 1 (torch.export specialises a dim of size 1)."""
    return tuple(a.repeat(2, *[1] * (a.ndim - 1)) if a.ndim and a.shape[0] == 1 else a for a in args)


def _capture(module: Any, args: tuple, batched: tuple) -> tuple[Any, list[str]]:
    """torch.export of the module with a dynamic batch (dim 0 of every input), or the example's batch when the
    module fixes it (the note says why)."""
    import torch

    batch = torch.export.Dim("batch")
    try:
        dynamic = tuple({0: batch} if a.ndim else None for a in args)
        return torch.export.export(module, batched, dynamic_shapes=dynamic, strict=False), []
    except Exception as exc:  # noqa: BLE001 - any failure: try the example's own shapes, whose failure is the one reported
        reason = _reason(exc)
    return torch.export.export(module, args, strict=False), [f"the batch dim is fixed at {len(args[0])}: a dynamic batch stopped at {reason}"]


def _check(path: Path, module: Any, args: tuple, input_names: list[str], label: str) -> None:
    """The ONNX file computes what the module computes on random inputs of the given shapes."""
    import torch

    from edgeq.model import make_session

    generator = torch.Generator().manual_seed(0)
    probe = tuple(torch.rand(a.shape, generator=generator, dtype=a.dtype) if a.is_floating_point() else a for a in args)
    outputs = module(*probe)
    want = [o.numpy() for o in (outputs if isinstance(outputs, (tuple, list)) else (outputs,))]
    got = make_session(str(path)).run(None, {name: a.numpy() for name, a in zip(input_names, probe)})
    for w, g in zip(want, got):
        scale = max(float(np.max(np.abs(w), initial=0.0)), 1.0)
        if np.shape(w) != np.shape(g) or float(np.max(np.abs(w - g), initial=0.0)) > CHECK_RTOL * scale:
            raise ModelError(f"the ONNX export of {label} does not compute what the module computes", _EXPORT_FIX)


class _FrozenTrace(Exception):
    """A TorchScript trace recorded a data-dependent branch or value as a constant."""


def _torchscript(module: Any, args: tuple, input_names: list[str], path: Path, *, dynamic: bool) -> None:
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        output_names = _output_names(module(*args))
        axes = {name: {0: "batch"} for name in (*input_names, *output_names)} if dynamic and all(a.ndim for a in args) else None
        torch.onnx.export(module, args, str(path), dynamo=False, input_names=input_names, output_names=output_names, dynamic_axes=axes)
    frozen = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    if frozen:
        first = frozen[0]
        raise _FrozenTrace(f"a data-dependent value at {Path(first.filename).name}:{first.lineno} frozen into the trace "
                           f"({_first_sentence(_one_line(first.message))[:120]})")


def _reason(exc: BaseException) -> str:
    """What an exporter stopped at, on one line: the operator, or the user's line and the error's first words."""
    if isinstance(exc, _FrozenTrace):
        return str(exc)
    text = str(exc)
    summary = text.split("## Exception summary", 1)[-1].strip()
    first = re.sub(r"^<class '(?:[\w.]+\.)?(\w+)'>: ", r"\1: ", summary.splitlines()[0] if summary else type(exc).__name__)
    first = _first_sentence(first)
    operator = _OPERATOR.search(text)
    if operator:
        return f"operator {next(g for g in operator.groups() if g)} ({_one_line(first)[:140]})"
    line = _USER_LINE.search(text)
    where = f"{Path(line.group(1)).name}:{line.group(2)} '{line.group(3).strip()[:80]}' " if line else ""
    return f"{where}({_one_line(first)[:160]})"


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0]


def _opset(onnx_program: Any) -> int:
    return next((i.version for i in onnx_program.model_proto.opset_import if i.domain in ("", "ai.onnx")), 0)


def _one_line(message: object) -> str:
    return " ".join(str(message).split())

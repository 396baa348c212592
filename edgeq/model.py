"""Load and save ONNX models: external data, input/output specs, verification before anything is written."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, helper

from edgeq import atomic, formats, interrupts
from edgeq.errors import ConfigError, ModelError

# Protobuf cannot serialise messages of 2 GB or more; above this size weights go to an external data file.
# The environment variable lets tests exercise the large-model path with small models.
_DEFAULT_EXTERNAL_THRESHOLD = 2**31 - 2**24
MIN_OPSET = 11


def external_data_threshold() -> int:
    value = os.environ.get("EDGEQ_EXTERNAL_DATA_THRESHOLD", "")
    if not value:
        return _DEFAULT_EXTERNAL_THRESHOLD
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"EDGEQ_EXTERNAL_DATA_THRESHOLD={value!r} is not a number of bytes", "unset it or give an integer") from None


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type and shape of a graph input or output; a dim is an int, a symbolic name, or None (unknown:
    no value, or a negative one such as the -1 that Paddle's exporter writes for a dynamic dim)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)

    def describe(self) -> str:
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


@dataclass
class Model:
    """An ONNX model in memory, with the path it came from (if any).

    >>> import edgeq
    >>> m = edgeq.load("model.onnx")            # doctest: +SKIP
    >>> [s.describe() for s in m.inputs]          # doctest: +SKIP
    ['input: float32[batch,1,32,32]']
    """

    proto: onnx.ModelProto
    path: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def inputs(self) -> list[TensorSpec]:
        initializers = {t.name for t in self.proto.graph.initializer}
        return [_spec(v) for v in self.proto.graph.input if v.name not in initializers]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [_spec(v) for v in self.proto.graph.output]

    @property
    def opset(self) -> int:
        return opset_of(self.proto)

    @property
    def name(self) -> str:
        return self.path.stem if self.path else (self.proto.graph.name or "model")

    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """Verify (checker + ONNX Runtime load) and write atomically; never over the model it was loaded from."""
        return save(self.proto, path, force=force, protect=model_files(self.path))

    def session(self, threads: int = 1, optimize: bool = True):
        return make_session(self.proto, threads=threads, optimize=optimize)

    def softmax_outputs(self) -> set[str]:
        """The outputs a Softmax or LogSoftmax node writes (probabilities: scored as such)."""
        return {o for node in self.proto.graph.node if node.op_type in ("Softmax", "LogSoftmax") for o in node.output}


def opset_of(proto: onnx.ModelProto) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)) if tensor_type.elem_type else np.dtype("float32")
    dims: list[int | str | None] = []
    for d in tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value >= 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return TensorSpec(value.name, dtype, tuple(dims))


def load(path: str | Path) -> Model:
    """Load an ONNX model (external data too) and check it; every failure is a ModelError with a fix.

    >>> edgeq.load("missing.onnx")      # doctest: +SKIP
    ModelError: model file not found: missing.onnx — check the path
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file not found: {path}", "check the path")
    if path.is_dir():
        formats.refuse_foreign(path)
        raise ModelError(f"{path} is a folder, not an ONNX model file", "give the path of the .onnx file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        formats.refuse_foreign(path)
        raise ModelError(f"{path} is not a readable ONNX model (corrupt or truncated protobuf)", "re-export the model or check the file") from None
    if not proto.graph.node:
        formats.refuse_foreign(path)
        raise ModelError(f"{path} is not an ONNX model (it holds no graph nodes)", "give the path of an exported .onnx model")
    _refuse_outside_locations(proto, path)
    missing = sorted({name for name in data_locations(proto) if not (path.parent / name).is_file()})
    if missing:
        raise ModelError(f"{path} refers to external data that is missing beside it: {', '.join(missing)}",
                         "copy the data file next to the model under that name")
    _load_external_data(proto, path)
    opset = opset_of(proto)
    if opset < MIN_OPSET:
        raise ModelError(f"{path} uses opset {opset}; edgeq supports opset {MIN_OPSET} and newer", "re-export with a newer opset")
    _check(proto, path)
    return Model(proto, path)


def _check(proto: onnx.ModelProto, path: Path | None) -> None:
    label = str(path) if path else "the model"
    try:
        if proto.ByteSize() < external_data_threshold() and path is None:
            onnx.checker.check_model(proto)
        elif path is not None:
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise ModelError(f"{label} fails the ONNX checker: {_one_line(exc)}", "fix the exporter output or re-export the model") from None


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (the CLI prints exactly one), cut to a readable length."""
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__


def make_session(proto_or_path: onnx.ModelProto | str | Path, threads: int = 1, optimize: bool = True, spinning: bool = True,
                 profile_prefix: str | None = None):
    """An ONNX Runtime CPU session with a fixed thread count (imported lazily: onnxruntime is heavy). Without
    `spinning`, idle intra-op threads sleep instead of polling (the benchmark's workers take turns); with a
    `profile_prefix`, it records each kernel's time to a file starting so (`session.end_profiling()` names it)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4  # its errors reach the user as exceptions, turned into one line
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    source = proto_or_path.SerializeToString() if isinstance(proto_or_path, onnx.ModelProto) else str(proto_or_path)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def run_session(session, outputs: list[str] | None, feed: dict[str, np.ndarray], label: str, where: str) -> list:
    """`session.run`, with ONNX Runtime's failure on the user's data (a reshape to a size the data does not have, an
    index out of range) as a ModelError naming the model and the data."""
    try:
        return session.run(outputs, feed)
    except ModelError:  # another runtime's session (LiteRT) says itself what failed
        raise
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own untyped errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : |/onnxruntime_src/\S+:\d+ [^(]*\([^)]*\) ?", "", first)[:300]
        raise ModelError(f"ONNX Runtime failed to run {label} on {where}: {first}",
                         "check that the data matches the model's inputs (shapes, dtypes, value ranges)") from None


def ort_session(source: bytes | str, options):
    """A CPU session on a model the user gave: ONNX Runtime's refusal (a custom-domain or unimplemented operator,
    an unsupported type) is a ModelError, not a crash."""
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    refusals = (ort_state.Fail, ort_state.InvalidGraph, ort_state.InvalidArgument, ort_state.NotImplemented,
                ort_state.InvalidProtobuf, ort_state.RuntimeException)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except refusals as exc:
        message = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", _one_line(exc))
        raise ModelError(f"ONNX Runtime cannot run the model: {message}",
                         "replace custom or unsupported operators, or register their library with ONNX Runtime") from None


def save(proto: onnx.ModelProto, path: str | Path, *, force: bool = False, protect: tuple[Path, ...] = ()) -> Path:
    """Write a model atomically after it passes onnx.checker and loads in ONNX Runtime.

    Large models get their weights in `<name>.<hash>.data` beside the model; the name depends on the content, so a
    replaced model's old data file stays valid until the new model file is renamed into place.
    """
    path = atomic.check_writable(Path(path), force=force, protect=protect)
    staging = atomic.temp_beside(path, folder=True)
    folder = staging.parent
    try:
        staged_model = staging / path.name
        with atomic.disk_full_is_user_error(path):
            data_name = _write_staged(proto, staged_model)
        verify_file(staged_model)
        old_data = _own_data_files(path) if path.exists() else set()
        with interrupts.deferred():  # the data file is published first: the model never refers to a missing one
            if data_name:
                atomic.publish(staging / data_name, folder / data_name)
            atomic.publish(staged_model, path)
            for stale in old_data - {data_name}:
                (folder / stale).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _write_staged(proto: onnx.ModelProto, staged_model: Path) -> str | None:
    if proto.ByteSize() < external_data_threshold():
        staged_model.write_bytes(proto.SerializeToString())
        return None
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    digest = hashlib.sha256()
    for tensor in copy.graph.initializer:
        # The whole tensor, not just raw_data: two models whose data files share a name must share the content.
        digest.update(tensor.SerializeToString())
    data_name = f"{staged_model.name}.{digest.hexdigest()[:12]}.data"
    external_data_helper.convert_model_to_external_data(copy, all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
    onnx.save_model(copy, str(staged_model))
    return data_name


def _own_data_files(model_path: Path) -> set[str]:
    """The data files an earlier edgeq save of `model_path` wrote. Others are never deleted: a model being replaced
    may share its data file with another model, the input among them."""
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # noqa: BLE001 - whatever the old file is, it owns no data file of ours
        return set()
    own = re.compile(rf"{re.escape(model_path.name)}\.[0-9a-f]{{12}}\.data")
    return {name for name in data_locations(proto) if own.fullmatch(name)}


def model_files(path: str | Path | None) -> tuple[Path, ...]:
    """Every file a model on disk consists of: the model and the external data files it refers to (the paths an
    output must never land on)."""
    if path is None:
        return ()
    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - a file onnx cannot read refers to no data files; load() says what is wrong
        return (path,)
    return (path, *sorted(path.parent / name for name in data_locations(proto)))


def data_locations(proto: onnx.ModelProto) -> set[str]:
    """The external data files a model refers to, as written in it (relative to the model's folder)."""
    locations = {_external_entries(tensor).get("location", "") for tensor in _external_tensors(proto)}
    return locations - {""}


def _external_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored outside the model file: initializers, tensor attributes and sparse initializers (their
    values and indices), in the main graph and every subgraph."""
    for graph in _graphs(proto.graph):
        sparse = [t for s in graph.sparse_initializer for t in (s.values, s.indices)]
        attributes = [t for node in graph.node for a in node.attribute
                      for t in (*([a.t] if a.HasField("t") else []), *a.tensors,
                                *([a.sparse_tensor.values, a.sparse_tensor.indices] if a.HasField("sparse_tensor") else []))]
        for tensor in (*graph.initializer, *sparse, *attributes):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                yield tensor


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            for sub in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                yield from _graphs(sub)


def _external_entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


_EXTERNAL_FIX = "keep the data file beside the model, under the name the model records, or re-export the model"


def _refuse_outside_locations(proto: onnx.ModelProto, path: Path) -> None:
    """Every external location, resolved against the model's folder (links followed), must stay inside it."""
    folder = path.resolve().parent
    for tensor in _external_tensors(proto):
        location = _external_entries(tensor).get("location", "")
        if not location or Path(location).is_absolute() or folder not in (folder / location).resolve().parents:
            raise ModelError(f"the external data of {path} cannot be read: tensor {tensor.name!r} refers to {location!r}, "
                             "outside the model's folder", _EXTERNAL_FIX)


def _load_external_data(proto: onnx.ModelProto, path: Path) -> None:
    """Read every external tensor into the model, from the model's folder (never the current directory); offset and
    length must lie within the file, checked before reading."""
    folder = path.resolve().parent
    for tensor in _external_tensors(proto):
        entries = _external_entries(tensor)
        location = entries["location"]
        target = (folder / location).resolve()
        try:
            offset, length = int(entries.get("offset", 0)), entries.get("length")
            size = target.stat().st_size
            length = size - offset if length is None else int(length)
        except (ValueError, OSError) as exc:
            raise ModelError(f"the external data of {path} cannot be read: tensor {tensor.name!r}: {_one_line(exc)}", _EXTERNAL_FIX) from None
        if offset < 0 or length < 0 or offset + length > size:
            raise ModelError(f"the external data of {path} cannot be read: tensor {tensor.name!r} asks for {length} bytes at "
                             f"offset {offset} of {location!r}, which holds {size} bytes", _EXTERNAL_FIX)
        with open(target, "rb") as fh:
            fh.seek(offset)
            tensor.raw_data = fh.read(length)
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def verify_file(path: Path) -> None:
    """A written model must pass the checker and open in ONNX Runtime, or it is not written at all."""
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ModelError(f"edgeq produced a model that fails the ONNX checker: {_one_line(exc)}", "report this with the input model; nothing was written") from None
    try:
        make_session(path)
    except Exception as exc:
        raise ModelError(f"edgeq produced a model that ONNX Runtime cannot load: {_one_line(exc)}", "report this with the input model; nothing was written") from None

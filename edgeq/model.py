"""Load and save ONNX models: external data, input/output specs, verification before anything is written."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, helper

from edgeq import atomic
from edgeq.errors import ModelError

# Protobuf cannot serialise messages of 2 GB or more; above this size weights go to an external data file.
# The environment variable lets tests exercise the large-model path with small models.
_DEFAULT_EXTERNAL_THRESHOLD = 2**31 - 2**24
MIN_OPSET = 11


def external_data_threshold() -> int:
    return int(os.environ.get("EDGEQ_EXTERNAL_DATA_THRESHOLD", _DEFAULT_EXTERNAL_THRESHOLD))


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type and shape of a graph input or output; a dim is an int, a symbolic name, or None."""

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
        return save(self.proto, path, force=force, protect=(self.path,) if self.path else ())

    def session(self, threads: int = 1, optimize: bool = True):
        return make_session(self.proto, threads=threads, optimize=optimize)


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
        if d.HasField("dim_value"):
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
        raise ModelError(f"{path} is a folder, not an ONNX model file", "give the path of the .onnx file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        raise ModelError(f"{path} is not a readable ONNX model (corrupt or truncated protobuf)", "re-export the model or check the file") from None
    if not proto.graph.node:
        raise ModelError(f"{path} is not an ONNX model (it holds no graph nodes)", "give the path of an exported .onnx model")
    try:
        external_data_helper.load_external_data_for_model(proto, str(path.resolve().parent))
    except (FileNotFoundError, OSError) as exc:
        raise ModelError(f"external data of {path} is missing: {exc.filename or exc}", "keep the model's .data file beside it") from None
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
        first = str(exc).strip().splitlines()[0][:300]
        raise ModelError(f"{label} fails the ONNX checker: {first}", "fix the exporter output or re-export the model") from None


def make_session(proto_or_path: onnx.ModelProto | str | Path, threads: int = 1, optimize: bool = True):
    """An ONNX Runtime CPU session with a fixed thread count (imported lazily: onnxruntime is heavy)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = proto_or_path.SerializeToString() if isinstance(proto_or_path, onnx.ModelProto) else str(proto_or_path)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def save(proto: onnx.ModelProto, path: str | Path, *, force: bool = False, protect: tuple[Path, ...] = ()) -> Path:
    """Write a model atomically after it passes onnx.checker and loads in ONNX Runtime.

    Large models get their weights in `<name>.<hash>.data` beside the model; the name depends on the content, so a
    replaced model's old data file stays valid until the new model file is renamed into place.
    """
    path = atomic.check_writable(Path(path), force=force, protect=protect)
    folder = path.resolve().parent
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder))
    try:
        staged_model = staging / path.name
        data_name = _write_staged(proto, staged_model)
        verify_file(staged_model)
        old_data = _external_files(path) if path.exists() else set()
        if data_name:
            os.replace(staging / data_name, folder / data_name)
        os.replace(staged_model, path)
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
        digest.update(tensor.name.encode())
        digest.update(tensor.raw_data)
    data_name = f"{staged_model.name}.{digest.hexdigest()[:12]}.data"
    external_data_helper.convert_model_to_external_data(copy, all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
    onnx.save_model(copy, str(staged_model))
    return data_name


def _external_files(model_path: Path) -> set[str]:
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception:
        return set()
    return {
        entry.value
        for tensor in external_data_helper._get_all_tensors(proto)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }


def verify_file(path: Path) -> None:
    """A written model must pass the checker and open in ONNX Runtime, or it is not written at all."""
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ModelError(f"edgeq produced a model that fails the ONNX checker: {str(exc).splitlines()[0][:300]}", "report this with the input model; nothing was written") from None
    try:
        make_session(path)
    except Exception as exc:
        raise ModelError(f"edgeq produced a model that ONNX Runtime cannot load: {str(exc).splitlines()[0][:300]}", "report this with the input model; nothing was written") from None

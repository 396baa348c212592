"""LiteRT (TensorFlow Lite) behind the runtime seam: `.tflite` flatbuffers run in `ai_edge_litert`'s interpreter.

The session speaks the data's terms, not the flatbuffer's: float data goes into int8/uint8 model inputs through the
input's own scale and zero point (and int8 outputs come back dequantized), and an NHWC input is fed NCHW data (the
layout of the ONNX model it was converted from) transposed, once `follow` has been told the data's layout. Each
adaptation is said once, in `notes`. `ai_edge_litert` is imported lazily: it is the optional extra `edgeq[tflite]`.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.errors import ModelError
from edgeq.model import TensorSpec

MAGIC = b"TFL3"
INSTALL = "install the extra: pip install 'edgeq[tflite]'"
_NHWC_TO_NCHW = (0, 3, 1, 2)
_NCHW_TO_NHWC = (0, 2, 3, 1)


def is_tflite(path: Path) -> bool:
    """A TFLite flatbuffer carries its identifier at bytes 4-8."""
    try:
        with open(path, "rb") as fh:
            return fh.read(8)[4:8] == MAGIC
    except OSError:
        return False


@contextlib.contextmanager
def quiet(log: Path) -> Iterator[None]:
    """What LiteRT and its converters print on fd 1 and 2 (C++ logging, progress) goes to `log`: edgeq's stderr is
    one line per error."""
    saved = [os.dup(1), os.dup(2)]
    with open(log, "w") as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):  # where sys.stdout is not fd 1
                yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def last_error(log: Path) -> str:
    """The last line of a quiet log that names an error, on one line."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if "rror" in line]
    return " ".join((lines[-1] if lines else "").split())[:300]


def interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise ModelError("running a .tflite model needs the LiteRT interpreter (ai-edge-litert), which is not installed",
                         INSTALL) from None
    return Interpreter


@dataclass
class _Port:
    """One model input or output: the flatbuffer's tensor and the view the caller sees."""

    index: int
    native: TensorSpec            # as in the flatbuffer
    scale: float = 0.0            # quantized I/O: real = scale * (q - zero_point)
    zero_point: int = 0
    transpose: bool = False       # the caller's NCHW against the model's NHWC

    @property
    def quantized(self) -> bool:
        return self.scale > 0 and self.native.dtype.kind in "iu"

    @property
    def view(self) -> TensorSpec:
        """The spec the caller sees: float for quantized I/O, NCHW when transposed, and a fixed batch dim open (the
        session pads a shorter batch to it and splits a longer one)."""
        shape = self.native.shape
        if shape and isinstance(shape[0], int):
            shape = (None, *shape[1:])
        if self.transpose:
            shape = tuple(shape[i] for i in _NHWC_TO_NCHW)
        return TensorSpec(self.native.name, np.dtype("float32") if self.quantized else self.native.dtype, shape)


def _ports(details: list[dict]) -> list[_Port]:
    ports = []
    for d in details:
        signature = d.get("shape_signature", d["shape"])
        dims = tuple(None if int(v) < 0 else int(v) for v in signature)
        scale, zero_point = d.get("quantization", (0.0, 0))
        ports.append(_Port(int(d["index"]), TensorSpec(d["name"], np.dtype(d["dtype"]), dims), float(scale), int(zero_point)))
    return ports


@dataclass
class TfliteModel:
    """A `.tflite` file opened in the interpreter once (checked), with its input/output views and op names."""

    path: Path
    ins: list[_Port]
    outs: list[_Port]
    ops: list[dict]                    # the interpreter's op details: op_name, inputs, outputs (tensor indices)
    types: dict[int, str] = field(default_factory=dict)  # tensor index -> element type, as the flatbuffer stores it
    notes: list[str] = field(default_factory=list)

    @property
    def inputs(self) -> list[TensorSpec]:
        return [p.view for p in self.ins]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [p.view for p in self.outs]

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def fixed_batch(self) -> int | None:
        """The batch dim the file fixes (litert-torch's files all fix one), if its inputs share one."""
        fixed = {p.native.shape[0] for p in self.ins if p.native.rank and isinstance(p.native.shape[0], int)}
        return fixed.pop() if len(fixed) == 1 else None

    def op_types(self) -> list[str]:
        """The builtin operator of every node, in execution order (`CONV_2D`, `FULLY_CONNECTED`, ...)."""
        return [str(op["op_name"]) for op in self.ops]

    def softmax_outputs(self) -> set[str]:
        names = {p.native.name: p.index for p in self.outs}
        written = {i for op in self.ops if op["op_name"] in ("SOFTMAX", "LOG_SOFTMAX") for i in op["outputs"]}
        return {name for name, index in names.items() if index in written}

    def follow(self, inputs: dict[str, tuple], outputs: dict[str, tuple] | None = None) -> None:
        """Take the caller's layout: `inputs` (and `outputs`) name → shape, sample axis first, in the caller's order
        (by position when the names differ). An NHWC port whose dims the caller gives as NCHW is transposed."""
        for ports, given in ((self.ins, inputs), (self.outs, outputs or {})):
            shapes = [given.get(p.native.name) for p in ports]
            if len(given) == len(ports) and not any(shapes):
                shapes = list(given.values())
            for port, shape in zip(ports, shapes):
                if shape is not None and _nchw_of_nhwc(port.native.shape, tuple(shape)):
                    port.transpose = True
                    self.notes.append(f"{port.native.name}: the model is NHWC {_dims(port.native.shape)}, the data NCHW "
                                      f"{_dims(port.view.shape)}: transposed for LiteRT")

    def session(self, threads: int = 1, optimize: bool = True) -> "TfliteSession":
        return TfliteSession(self, threads)


def _same(a: Any, b: Any) -> bool:
    return not isinstance(a, int) or not isinstance(b, int) or a == b


def _nchw_of_nhwc(native: tuple, given: tuple) -> bool:
    """`given` matches `native` read as NHWC → NCHW, and not `native` itself."""
    if len(native) != 4 or len(given) != 4:
        return False
    permuted = tuple(native[i] for i in _NHWC_TO_NCHW)
    fits = all(_same(a, b) for a, b in zip(permuted[1:], given[1:]))
    return fits and not all(_same(a, b) for a, b in zip(native[1:], given[1:]))


def _dims(shape: tuple) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def load(path: Path) -> TfliteModel:
    """Open the flatbuffer in the interpreter (a file it refuses is a ModelError) and read its ports and ops."""
    # Without the default delegate, so that the op list is the file's (XNNPACK would stand in for most ops).
    interpreter_class()  # a missing extra is a ModelError saying how to install it
    from ai_edge_litert.interpreter import OpResolverType

    interpreter = _interpreter(path, 1, experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    ops = interpreter._get_ops_details()  # noqa: SLF001 - the interpreter's only view of the op list
    types = {int(d["index"]): np.dtype(d["dtype"]).name for d in interpreter.get_tensor_details()}
    model = TfliteModel(path, _ports(interpreter.get_input_details()), _ports(interpreter.get_output_details()), ops, types)
    for port in model.ins:
        if port.quantized:
            model.notes.append(f"{port.native.name}: float data quantized to the model's {port.native.dtype} input "
                               f"(scale {port.scale:.6g}, zero point {port.zero_point})")
    return model


def _interpreter(path: Path, threads: int, **options: Any):
    cls = interpreter_class()
    with tempfile.TemporaryDirectory(prefix="edgeq-litert-") as tmp:
        log = Path(tmp) / "log.txt"
        try:
            with quiet(log):
                interpreter = cls(model_path=str(path), num_threads=threads, **options)
                interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            text = last_error(log) or " ".join(str(exc).split())[:300] or type(exc).__name__
            raise ModelError(f"LiteRT cannot load {path}: {text}", "check that the file is a complete .tflite model") from None
    return interpreter


class TfliteSession:
    """An interpreter on one model; inputs are resized when a batch's shape differs from the last one."""

    def __init__(self, model: TfliteModel, threads: int) -> None:
        self.model = model
        self.interpreter = _interpreter(model.path, threads)
        self._shapes = {p.index: tuple(int(v) for v in d["shape"])
                        for p, d in zip(model.ins, self.interpreter.get_input_details())}

    def run(self, outputs: Sequence[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        batch, rows = self.model.fixed_batch, {np.shape(v)[0] for v in feed.values() if np.ndim(v)}
        if batch and len(rows) == 1 and rows.pop() > batch:  # longer than the fixed batch: run in slices of it
            parts = [self._run(outputs, {k: v[i:i + batch] for k, v in feed.items()})
                     for i in range(0, len(next(iter(feed.values()))), batch)]
            return [np.concatenate(chunks) for chunks in zip(*parts)]
        return self._run(outputs, feed)

    def _run(self, outputs: Sequence[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        model = self.model
        values = _by_port(model.ins, feed)
        native = [_to_native(port, value) for port, value in zip(model.ins, values)]
        native, rows = _padded(model.ins, native)
        resized = False
        for port, value in zip(model.ins, native):
            if self._shapes[port.index] != value.shape:
                self.interpreter.resize_tensor_input(port.index, list(value.shape), strict=False)
                self._shapes[port.index] = value.shape
                resized = True
        try:
            if resized:
                self.interpreter.allocate_tensors()
            for port, value in zip(model.ins, native):
                self.interpreter.set_tensor(port.index, value)
            self.interpreter.invoke()
        except (ValueError, RuntimeError) as exc:
            shapes = ", ".join(f"{k}{list(np.shape(v))}" for k, v in feed.items())
            raise ModelError(f"LiteRT failed to run {model.path} on inputs {shapes}: {' '.join(str(exc).split())[:300]}",
                             "check that the data matches the model's inputs (shapes, dtypes)") from None
        wanted = model.outs if outputs is None else [_port_named(model.outs, n) for n in outputs]
        results = [_from_native(port, self.interpreter.get_tensor(port.index)) for port in wanted]
        return results if rows is None else [r[:rows] for r in results]


def _padded(ports: list[_Port], values: list[np.ndarray]) -> tuple[list[np.ndarray], int | None]:
    """A batch shorter than a fixed batch dim (the last batch of a data set) padded with zeros to it, and the rows
    that are data (None when nothing was padded): a fixed batch cannot be resized when the graph reshapes by it."""
    fixed = {p.native.shape[0] for p in ports if p.native.rank and isinstance(p.native.shape[0], int)}
    rows = {v.shape[0] for v in values if v.ndim}
    if len(fixed) != 1 or len(rows) != 1 or len(ports) != len(values):
        return values, None
    batch, n = fixed.pop(), rows.pop()
    if n >= batch:
        return values, None
    return [np.concatenate([v, np.zeros((batch - n, *v.shape[1:]), v.dtype)]) if v.ndim else v for v in values], n


def _by_port(ports: list[_Port], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    if all(p.native.name in feed for p in ports):
        return [feed[p.native.name] for p in ports]
    if len(feed) == len(ports):
        return list(feed.values())
    raise ModelError(f"the feed ({', '.join(feed)}) does not give the model's inputs ({', '.join(p.native.name for p in ports)})",
                     "key the data by the model's input names")


def _port_named(ports: list[_Port], name: str) -> _Port:
    for port in ports:
        if port.native.name == name:
            return port
    raise ModelError(f"the model has no output {name!r}", f"name one of: {', '.join(p.native.name for p in ports)}")


def _to_native(port: _Port, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    if port.transpose:
        value = value.transpose(_NCHW_TO_NHWC)
    if port.quantized and value.dtype.kind == "f":
        info = np.iinfo(port.native.dtype)
        value = np.clip(np.round(value / port.scale) + port.zero_point, info.min, info.max)
    return np.ascontiguousarray(value, dtype=port.native.dtype)


def _from_native(port: _Port, value: np.ndarray) -> np.ndarray:
    if port.quantized:
        value = (value.astype(np.float32) - port.zero_point) * np.float32(port.scale)
    if port.transpose:
        value = value.transpose(_NHWC_TO_NCHW)
    return np.array(value, copy=True)


class LiteRT:
    """The LiteRT interpreter for `.tflite` files (recognised by their identifier, whatever the suffix)."""

    name = "litert"
    label = "LiteRT"
    file_format = "TFLite"

    def recognises(self, path: Path) -> bool:
        return is_tflite(path)

    def version(self) -> str:
        from importlib.metadata import version

        return version("ai-edge-litert")

    def load(self, path: Path) -> TfliteModel:
        return load(path)

    def open(self, path: Path, threads: int = 1, *, spinning: bool = True, model: TfliteModel | None = None) -> TfliteSession:
        return (model or load(path)).session(threads)

    def files(self, path: Path) -> list[Path]:
        return [path]

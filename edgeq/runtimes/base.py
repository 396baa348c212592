"""The runtime seam: what edgeq needs from an inference engine, whatever the model file format.

A `Runtime` recognises its files, loads one (checked: the usual ModelErrors) into a `Runnable` — input/output specs,
a name, its files on disk — and opens `Session`s on it that run a feed dict. ONNX Runtime (`onnxruntime.py`) and
LiteRT (`litert.py`) implement it; `edgeq.runtimes` picks one by file format. A new runtime is one module here and
one entry in `RUNTIMES` (`edgeq/runtimes/__init__.py`). A `GraphRuntime` also runs ONNX graphs held in memory:
calibration, the static INT8 passes and `--method auto` open their sessions through one (ONNX Runtime's).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx

from edgeq.model import TensorSpec


class Session(Protocol):
    """A model ready to run: `run(None, feed)` returns every output, `run(names, feed)` those named, in order."""

    def run(self, outputs: Sequence[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class Runnable(Protocol):
    """A loaded model: what validation and the benchmark read before they run it."""

    path: Path | None

    @property
    def inputs(self) -> list[TensorSpec]: ...

    @property
    def outputs(self) -> list[TensorSpec]: ...

    @property
    def name(self) -> str: ...

    def session(self, threads: int = 1, optimize: bool = True) -> Session: ...

    def softmax_outputs(self) -> set[str]: ...


class Runtime(Protocol):
    """An inference engine for one model file format."""

    name: str          # as records store it: "onnxruntime", "litert"
    label: str         # as tables print it: "ONNX Runtime", "LiteRT"
    file_format: str   # "ONNX", "TFLite"

    def recognises(self, path: Path) -> bool: ...

    def version(self) -> str: ...

    def load(self, path: Path) -> Runnable: ...

    def open(self, path: Path, threads: int = 1, *, spinning: bool = True, model: Runnable | None = None) -> Session:
        """A session on the file: `model`, when given, is its loaded form with the caller's adaptations (LiteRT's
        layout); without `spinning`, idle threads sleep (the benchmark's workers take turns)."""
        ...

    def files(self, path: Path) -> list[Path]: ...


class GraphRuntime(Protocol):
    """A runtime that runs in-memory ONNX graphs: what calibration and the passes measure models with."""

    name: str

    def open_graph(self, proto: onnx.ModelProto, threads: int = 1, *, optimize: bool = True, spinning: bool = True) -> Session:
        """A session on the graph (`threads` 0: the runtime's default), failing as the runtime fails to load it;
        without `spinning`, idle threads sleep (in-process timing of several models in turn)."""
        ...

"""Runtimes by file format: `runtime_for(path)` is the runtime that runs the file, `load(path)` the loaded model.

>>> from edgeq.runtimes import RUNTIMES
>>> [r.name for r in RUNTIMES]
['litert', 'onnxruntime']
"""
from __future__ import annotations

from pathlib import Path

from edgeq.runtimes.base import GraphRuntime, Runnable, Runtime, Session
from edgeq.runtimes.litert import LiteRT
from edgeq.runtimes.onnxruntime import OnnxRuntime

# The first that recognises a file runs it; ONNX Runtime, last, takes every other file (its load says what is wrong).
ONNX_RUNTIME = OnnxRuntime()   # also the GraphRuntime calibration and the passes run graphs in
RUNTIMES: list[Runtime] = [LiteRT(), ONNX_RUNTIME]


def runtime_for(path: str | Path) -> Runtime:
    path = Path(path)
    return next(r for r in RUNTIMES if r.recognises(path))


def load(path: str | Path) -> Runnable:
    """The model at `path`, loaded (and checked) by the runtime that runs its format."""
    return runtime_for(path).load(Path(path))


__all__ = ["ONNX_RUNTIME", "RUNTIMES", "GraphRuntime", "Runnable", "Runtime", "Session", "load", "runtime_for"]

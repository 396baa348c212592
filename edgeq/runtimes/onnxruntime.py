"""ONNX Runtime behind the runtime seam: `edgeq.model` loads and checks the model, its sessions run on the CPU."""
from __future__ import annotations

from pathlib import Path

import onnx

from edgeq.errors import ModelError
from edgeq.model import Model, load, make_session, model_files


class OnnxRuntime:
    """The default runtime: every file that is not another runtime's is read as ONNX (load says what is wrong)."""

    name = "onnxruntime"
    label = "ONNX Runtime"
    file_format = "ONNX"

    def recognises(self, path: Path) -> bool:
        return True

    def version(self) -> str:
        import onnxruntime as ort

        return ort.__version__

    def load(self, path: Path) -> Model:
        return load(path)

    def open(self, path: Path, threads: int = 1, *, spinning: bool = True, model: Model | None = None):
        """A CPU session from the file (a large model's external data is read where it lies)."""
        try:
            return make_session(path, threads=threads, spinning=spinning)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types; all mean "cannot load"
            text = str(exc).strip()
            first = (text.splitlines()[0] if text else type(exc).__name__)[:300]
            raise ModelError(f"ONNX Runtime cannot load {path}: {first}",
                             "check that the model runs in ONNX Runtime (operators, opset, types)") from None

    def open_graph(self, proto: onnx.ModelProto, threads: int = 1, *, optimize: bool = True, spinning: bool = True):
        """A CPU session on an in-memory graph (calibration and the passes); `threads` 0 is ONNX Runtime's default."""
        return make_session(proto, threads=threads, optimize=optimize, spinning=spinning)

    def open_profiled(self, proto: onnx.ModelProto, threads: int, profile_prefix: str):
        """A CPU session on an in-memory graph that records each kernel's time (ONNX Runtime's profiler: its JSON
        file, named by `session.end_profiling()`, starts with `profile_prefix`); the coverage search reads it."""
        return make_session(proto, threads=threads, profile_prefix=profile_prefix)

    def files(self, path: Path) -> list[Path]:
        return list(model_files(path))

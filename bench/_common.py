"""Shared helpers for the bench scripts: quantize in a child process (wall time, peak memory), markdown tables."""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def run_child(args: list[str]) -> dict:
    """Run `python <script> _child ...` and return its JSON line plus wall time and the child's peak RSS."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"child {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    # the JSON the child emitted last; libraries print to stdout too (ONNX Runtime's GPTQ port ends its progress bar
    # without a newline, so the JSON can share that line)
    lines = [line[line.index('{"'):] for line in proc.stdout.splitlines() if '{"' in line]
    if not lines:
        raise RuntimeError(f"child {' '.join(args)} printed no result:\n{proc.stdout[-1000:]}{proc.stderr[-2000:]}")
    payload = json.loads(lines[-1])
    payload.setdefault("seconds", seconds)
    return payload


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM): ru_maxrss of a child starts from its parent's peak on Linux."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(payload: dict) -> None:
    print(json.dumps(payload))


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ort_preprocess(model: str | Path, out: str | Path) -> str:
    """ONNX Runtime's documented pre-processing before its quantizers, written to OUT.pre.onnx (its symbolic shape
    inference fails on PP-OCR and the detectors, so it is skipped, as ANCHORS.md found); it also folds Constant-node
    weights into initializers, without which quantize_dynamic raises on PP-OCR."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = str(out) + ".pre.onnx"
    quant_pre_process(str(model), pre, skip_symbolic_shape=True)
    return pre


def npz_reader(path: Path, batch: int = 1):
    """An ONNX Runtime CalibrationDataReader over an .npz keyed by input name."""
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            with np.load(path, allow_pickle=False) as npz:
                self.arrays = {k: npz[k] for k in npz.files if k != "labels"}
            n = len(next(iter(self.arrays.values())))
            self.batches = iter([{k: v[i:i + batch] for k, v in self.arrays.items()} for i in range(0, n, batch)])

        def get_next(self):
            return next(self.batches, None)

    return Reader()

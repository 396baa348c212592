"""Shared helpers for the bench scripts: quantize in a child process (wall time, peak memory), markdown tables."""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable


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


def quantize_and_time(script: str, fp32: Path, calib: str | Path, variants: list[str] | tuple[str, ...], work: Path,
                      runs: int, batch: int, shapes: dict) -> dict[str, dict]:
    """Each variant quantized by `script _child VARIANT FP32 CALIB OUT` in a process of its own (wall time, peak
    memory), then all models, FP32 first, timed interleaved at 1 and 2 threads. Per model: its path and costs."""
    from edgeq.bench import BenchConfig, benchmark

    paths, quant = {"fp32": Path(fp32)}, {}
    for variant in variants:
        out = work / f"{Path(fp32).stem}_{variant}.onnx"
        quant[variant] = run_child([script, "_child", variant, str(fp32), str(calib), str(out)])
        paths[variant] = out
    latency = {}
    for threads in (1, 2):
        config = BenchConfig(threads=threads, runs=runs, warmup=3, batch=batch, shapes=shapes)
        latency[threads] = dict(zip(paths, benchmark(list(paths.values()), config)))
    return {name: {"path": path, "size_mb": latency[1][name].size_bytes / 1e6,
                   "p50_1t": latency[1][name].latency_ms.p50, "p50_2t": latency[2][name].latency_ms.p50,
                   "quant_s": quant.get(name, {}).get("seconds"), "quant_peak_mb": quant.get(name, {}).get("peak_rss_mb")}
            for name, path in paths.items()}


def cost_cells(row: dict, fp32: dict, *, speed_up: bool) -> list[str]:
    """Size, p50 at 1 and 2 threads (as a ratio to FP32's, or FP32's to it with `speed_up`), quantize s and peak MB."""
    def latency(key: str) -> str:
        ratio = fp32[key] / row[key] if speed_up else row[key] / fp32[key]
        return f"{row[key]:.2f} ({ratio:.2f}×)"

    return [f"{row['size_mb']:.2f} ({row['size_mb'] / fp32['size_mb']:.2f}×)", latency("p50_1t"), latency("p50_2t"),
            "—" if row["quant_s"] is None else f"{row['quant_s']:.1f}",
            "—" if row["quant_peak_mb"] is None else f"{row['quant_peak_mb']:.0f}"]


def child_or_parse(child: Callable[..., None], description: str) -> argparse.Namespace | None:
    """`script _child ...` runs `child` with the arguments and gives None; else the bench's `--runs` arguments."""
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child(*sys.argv[2:])
        return None
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=int, default=30)
    return parser.parse_args()

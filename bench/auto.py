"""edgeq `auto` next to NNCF's `quantize_with_accuracy_control` on the same model, data and budget.

Model: the planted-outlier residual digits CNN (edgeq/testing/planted.py: a stem conv, ten residual blocks of two
32-channel convolutions, two Linear layers, 23 quantizable layers; outliers planted function-preservingly into two
of them), trained once per machine and cached like the tests' copy. Budget: 1 point of top-1. Both tools get the
same calibration set (512 training images) and validation set (718 held-out images).

Measured: final drop, layers left in float, validation evaluations, wall time, latency of the result (edgeq's
benchmark worker, 1 thread, batch 64, same run).

    pip install -e '.[torch,test,bench]'
    python bench/auto.py [--workdir bench-auto-out] [--epochs 4]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import markdown_table  # noqa: E402
from edgeq.testing.planted import TRAIN_EPOCHS, cached_planted_model  # noqa: E402


INT8_KERNELS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul")
FLOAT_KERNELS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "ConvTranspose")


def float_layers(path: Path) -> tuple[list[str], dict[str, int]]:
    """(layers whose weight stays float in the file, kernels ONNX Runtime's CPU provider actually runs): the second
    is read from the graph ONNX Runtime optimises (QDQ groups fused into int8 kernels, DequantizeLinear propagated
    through MaxPool), so it counts what runs, for both tools alike."""
    import collections
    import tempfile

    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    producers = {o: n for n in proto.graph.node for o in n.output}
    weights_float = [n.name for n in proto.graph.node if n.op_type in FLOAT_KERNELS
                     and (producers.get(n.input[1]) is None or producers[n.input[1]].op_type != "DequantizeLinear")]
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        ops = collections.Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
    return weights_float, {"int8": sum(ops[k] for k in INT8_KERNELS), "float": sum(ops[k] for k in FLOAT_KERNELS)}


def run_nncf(model_path: Path, calib: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, budget: float, out: Path) -> dict:
    import nncf
    import onnx

    from edgeq.model import make_session

    calls = {"full": 0, "subset": 0}

    def validation_fn(model, data) -> tuple[float, list[float]]:
        session = make_session(model, threads=1)
        name = session.get_inputs()[0].name
        correct = []
        for x, y in data:   # one sample per item: NNCF ranks on a subset picked by item index
            correct.append(float(session.run(None, {name: x})[0].argmax(1)[0] == y))
        calls["full" if len(correct) == len(val_y) else "subset"] += 1
        return 100.0 * float(np.mean(correct)), correct

    items = [(val_x[i:i + 1], int(val_y[i])) for i in range(len(val_x))]
    calib_ds = nncf.Dataset([calib[i:i + 1] for i in range(len(calib))], lambda x: {"input": x})
    val_ds = nncf.Dataset(items, lambda item: {"input": item[0]})
    model = onnx.load(str(model_path))
    start = time.perf_counter()
    result = nncf.quantize_with_accuracy_control(model, calib_ds, val_ds, validation_fn, max_drop=budget, subset_size=len(calib))
    seconds = time.perf_counter() - start
    path = out / "nncf.onnx"
    onnx.save(result, str(path))
    return {"path": path, "seconds": seconds, "evaluations": calls["full"], "subset_evaluations": calls["subset"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="bench-auto-out")
    parser.add_argument("--epochs", type=int, default=TRAIN_EPOCHS)
    parser.add_argument("--budget", type=float, default=1.0)
    args = parser.parse_args()
    import edgeq
    from edgeq.auto import auto
    from edgeq.bench import BenchConfig, benchmark
    from edgeq.evaluate import compare

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    planted = cached_planted_model(epochs=args.epochs)
    folder = planted.planted.parent
    with np.load(folder / "calib.npz") as z:
        calib = z["input"]
    with np.load(folder / "val.npz") as z:
        val_x, val_y = z["input"], z["labels"]

    start = time.perf_counter()
    report = auto(planted.planted, folder / "calib.npz", folder / "val.npz", args.budget, work / "edgeq", force=True)
    edgeq_s = time.perf_counter() - start
    nncf_run = run_nncf(planted.planted, calib, val_x, val_y, args.budget, work)

    val = edgeq.Dataset.from_npz(folder / "val.npz")
    paths = {"fp32": planted.planted, "edgeq auto": work / "edgeq" / "model.onnx", "NNCF accuracy control": nncf_run["path"]}
    records = {k: edgeq.validate(p, val) for k, p in paths.items()}
    bench = dict(zip(paths, benchmark(list(paths.values()), BenchConfig(threads=1, runs=200, warmup=20, batch=64))))
    rows = []
    for name, path in paths.items():
        weights_float, kernels = float_layers(path)
        drop = compare(records["fp32"], records[name]).drop if name != "fp32" else 0.0
        evals = {"edgeq auto": f"{report['evaluations']}", "NNCF accuracy control":
                 f"{nncf_run['evaluations']} (+{nncf_run['subset_evaluations']} on ranking subsets)"}.get(name, "—")
        wall = {"edgeq auto": f"{edgeq_s:.1f}", "NNCF accuracy control": f"{nncf_run['seconds']:.1f}"}.get(name, "—")
        b = bench[name].to_dict()
        layers = kernels["int8"] + kernels["float"]
        rows.append([name, f"{records[name].value:.2f}", f"{drop:+.2f}", "—" if name == "fp32" else str(len(weights_float)),
                     f"{kernels['int8']} int8 / {kernels['float']} float", evals, wall, f"{b['latency_ms']['p50']:.2f}", f"{b['size_bytes'] / 1e6:.3f}"])
        if name != "fp32":
            print(f"{name}: weights left float {weights_float}; ORT CPU kernels over {layers} layers: {kernels}")
    print(f"planted (broken) layers: {planted.broken}")
    print(markdown_table(["model", "top-1 %", "drop (points)", "layers left float (weights)", "layers as ORT CPU runs them",
                          "validation evaluations", "wall s", "p50 ms (1 thread, batch 64)", "size MB"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

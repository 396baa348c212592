"""Where plain PTQ breaks, and what each repair recovers: per-tensor min/max static INT8 on nets trained here on
scikit-learn's digits, then each calibration method and each repair of the static recipe; and SmoothQuant on
all-MiniLM-L6-v2 (sentence-embedding cosine to FP32 with and without it).

Models (trained here, seeded; FP32 ONNX exported with BatchNorm, folded by edgeq's preparation):
- the demo's digits CNN (4 convolutions);
- a MobileNet-style net (stem conv, four depthwise-separable blocks: depthwise 3×3 + pointwise 1×1, BatchNorm, ReLU);
- the same MobileNet-style net with outlier channels injected: in each of its first three blocks, 2 output channels
  of the pointwise layer get BatchNorm γ, β × 32 and the next depthwise layer's weights for those channels ÷ 32. The
  FP32 function is unchanged (ReLU commutes with positive scales; checked below), but those layers' folded weights
  and activations now carry channels 32× larger than the rest: the outliers of real networks, made on purpose.

    PYTHONPATH=. .venv/bin/python bench/repair.py            # prints markdown for bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table  # noqa: E402

OUTLIER_SCALE = 32.0
RECIPES = [  # name, Int8Static fields (on top of per-tensor min/max)
    ("per-tensor min/max (plain PTQ)", {}),
    ("method percentile 99.99", {"method": "percentile"}),
    ("method entropy", {"method": "entropy"}),
    ("method mse", {"method": "mse"}),
    ("method auto", {"method": "auto"}),
    ("+ weight range mse", {"weight_range": "mse"}),
    ("+ bias correction", {"bias_correction": True}),
    ("+ cross-layer equalization", {"equalize": True}),
    ("+ equalization + bias correction", {"equalize": True, "bias_correction": True}),
    ("per-channel weights", {"per_channel": True}),
    ("per-channel + weight range mse + bias correction", {"per_channel": True, "weight_range": "mse", "bias_correction": True}),
    ("equalization + bias correction + method auto", {"equalize": True, "bias_correction": True, "method": "auto"}),
    ("all: per-channel, equalization, weight range mse, bias correction, auto",
     {"per_channel": True, "equalize": True, "weight_range": "mse", "bias_correction": True, "method": "auto"}),
]


def build_mobilenet():
    from torch import nn

    def conv_bn(cin, cout, k, stride=1, groups=1):
        return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    def separable(cin, cout, stride):
        return conv_bn(cin, cin, 3, stride, groups=cin) + conv_bn(cin, cout, 1)

    return nn.Sequential(*conv_bn(1, 16, 3), *separable(16, 32, 2), *separable(32, 64, 2), *separable(64, 64, 1),
                         *separable(64, 128, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def train(model, split, epochs: int = 15, seed: int = 0, lr: float = 3e-3):
    from edgeq.demo import train_classifier

    return train_classifier(model, split, epochs=epochs, seed=seed, lr=lr, cosine=True)


def inject_outlier_channels(model, scale: float = OUTLIER_SCALE, per_layer: int = 2, blocks: int = 3):
    """Pointwise BN γ, β × scale on `per_layer` channels, the next depthwise conv's weights for them ÷ scale."""
    import torch
    from torch import nn

    layers = list(model)
    convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
    done = 0
    with torch.no_grad():
        for a, b in zip(convs, convs[1:]):
            pointwise, depthwise = layers[a], layers[b]
            if pointwise.kernel_size != (1, 1) or depthwise.groups != depthwise.in_channels or done >= blocks:
                continue
            bn = layers[a + 1]
            channels = torch.arange(per_layer) * 7 % pointwise.out_channels
            bn.weight[channels] *= scale
            bn.bias[channels] *= scale
            depthwise.weight[channels] /= scale
            done += 1
    return model


def digits_models(work: Path) -> list[tuple[str, Path]]:
    import copy

    from edgeq.demo import export_onnx, load_digits_split, train_cnn

    split = load_digits_split()
    cnn = export_onnx(train_cnn(split), work / "cnn.onnx")
    mobilenet = train(build_mobilenet(), split)
    mobile = export_onnx(mobilenet, work / "mobilenet.onnx")
    outliers = export_onnx(inject_outlier_channels(copy.deepcopy(mobilenet)), work / "mobilenet_outliers.onnx")
    return [("digits CNN", cnn), ("MobileNet-style", mobile), (f"MobileNet-style + outlier channels ×{OUTLIER_SCALE:g}", outliers)]


def repair_table(work: Path) -> str:
    import edgeq
    from edgeq.demo import load_digits_split
    from edgeq.quantize.int8 import output_sqnr

    split = load_digits_split()
    calib = edgeq.Dataset.from_arrays({"input": split.train_x[:512]})
    lines = []
    for name, path in digits_models(work):
        fp32 = edgeq.load(path).session(threads=2).run(None, {"input": split.val_x})[0]
        fp32_top1 = float((fp32.argmax(1) == split.val_y).mean() * 100)
        rows, base_drop = [], None
        for label, fields in RECIPES:
            config = edgeq.Int8Static(**({"method": "minmax", "per_channel": False} | fields))
            q = edgeq.quantize(edgeq.load(path), config, calib=calib)
            logits = q.session(threads=2).run(None, {"input": split.val_x})[0]
            top1 = float((logits.argmax(1) == split.val_y).mean() * 100)
            drop = fp32_top1 - top1
            base_drop = drop if base_drop is None else base_drop
            recovered = "—" if label.startswith("per-tensor min/max") or base_drop <= 0 else f"{(base_drop - drop) / base_drop * 100:.0f}%"
            chosen = f" (chose {q.summary.calibration['chosen']})" if q.summary.calibration.get("chosen") else ""
            rows.append([label + chosen, f"{top1:.2f}", f"{drop:+.2f}", recovered, f"{output_sqnr([[fp32]], [[logits]]):.1f}"])
            print(name, rows[-1], file=sys.stderr, flush=True)
        lines += [f"**{name}** — FP32 top-1 {fp32_top1:.2f}% on {len(split.val_y)} held-out digits; calibration 512 training "
                  "images; every row is static QDQ INT8 (uint8 activations), per-tensor min/max unless the row says otherwise", "",
                  markdown_table(["recipe", "top-1 %", "drop (points)", "lost accuracy recovered", "logit SQNR vs FP32 dB"], rows), ""]
    return "\n".join(lines)


def outlier_check(work: Path) -> str:
    """The injected model computes the same function as the trained one (FP32)."""
    import edgeq
    from edgeq.demo import load_digits_split

    split = load_digits_split()
    a = edgeq.load(work / "mobilenet.onnx").session().run(None, {"input": split.val_x})[0]
    b = edgeq.load(work / "mobilenet_outliers.onnx").session().run(None, {"input": split.val_x})[0]
    return f"FP32 outputs of the outlier model vs the trained one: max |difference| {np.abs(a - b).max():.2e} (logits up to {np.abs(a).max():.1f})"


def minilm_table(work: Path, calib_n: int = 64, val_n: int = 128) -> str:
    import edgeq
    from edgeq.testing import zoo
    from edgeq.timing import median_ms

    path = zoo.export_minilm(work / "minilm.onnx")
    sentences = zoo.sample_sentences(calib_n + val_n, seed=0)
    calib_feed = zoo.minilm_inputs(sentences[:calib_n])
    calib = edgeq.Dataset.from_arrays(calib_feed)
    val_batches = [zoo.minilm_inputs(sentences[calib_n + i:calib_n + i + 16]) for i in range(0, val_n, 16)]
    fp32 = edgeq.load(path)
    reference = np.concatenate([fp32.session(threads=2).run(["sentence_embedding"], b)[0] for b in val_batches])
    rows = [["FP32", "1.0000", "1.0000", f"{median_ms(fp32.proto, val_batches[0], 20):.1f}"]]
    recipes = [("static INT8, uint8 activations, mse (edgeq default)", {}),
               ("static INT8, int8 activations, min/max", {"activation_type": "int8", "method": "minmax"}),
               ("static INT8, uint8 activations, min/max", {"method": "minmax"})]
    variants = [("", {}), ("  + SmoothQuant α 0.5", {"smoothquant": 0.5}), ("  + SmoothQuant α 0.75", {"smoothquant": 0.75}),
                ("  + SmoothQuant auto (α per layer)", {"smoothquant": "auto"})]
    runs = [(label or recipe, base | extra) for recipe, base in recipes for label, extra in variants]
    runs.insert(len(variants), ("  + bias correction (MatMul+Add biases)", {"bias_correction": True}))  # on the default
    for label, fields in runs:
        q = edgeq.quantize(fp32, edgeq.Int8Static(batch_size=16, **fields), calib=calib)
        got = np.concatenate([q.session(threads=2).run(["sentence_embedding"], b)[0] for b in val_batches])
        cos = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
        rows.append([label, f"{cos.mean():.4f}", f"{cos.min():.4f}", f"{median_ms(q.proto, val_batches[0], 20):.1f}"])
        print("minilm", rows[-1], file=sys.stderr, flush=True)
    return "\n".join([f"**all-MiniLM-L6-v2** — static INT8 (MatMul/Gemm, per-channel weights); calibration {calib_n} sentences, "
                      f"evaluation {val_n} other sentences (Python standard-library docstrings)", "",
                      markdown_table(["recipe", "mean cosine to FP32", "min cosine", "p50 ms (16 sentences, 1 thread)"], rows), ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--only-minilm", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        parts = []
        if not args.only_minilm:
            parts += [repair_table(work), outlier_check(work), ""]
        if not args.skip_minilm:
            parts.append(minilm_table(work))
    print("\n".join(parts))


if __name__ == "__main__":
    main()

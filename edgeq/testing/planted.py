"""The honest test model for diagnosis and `auto`: a small residual digits CNN (23 quantizable layers, 32 channels,
wide enough that ONNX Runtime's int8 kernels beat FP32 on a CPU), trained, with outlier weights planted into chosen
layers so that exactly those layers break INT8.

How the outliers are planted, without changing the FP32 function: ReLU commutes with positive scaling, so scaling
one output channel of a producer layer down by `s` and the consumer's weights for that channel up by `s` leaves the
FP32 outputs unchanged (the reverse of cross-layer equalization). The consumer now holds one column of weights `s`
times larger than the rest; its int8 step (per output channel) is set by them, and nearly every real weight rounds
to zero. The consumer is the broken layer. In a residual block the second convolution reads only the first (through
its ReLU), so it can be planted; the first reads the block input, which the skip connection shares, so it cannot.

torch is imported inside the training functions only (the ONNX paths never import it).
"""
from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgeq.testing.cache import cached_folder

WIDTH = 32      # channels of every residual block: thinner convolutions run no faster in int8 than in float
BLOCKS = 10     # residual blocks of two convolutions: 1 stem + 10×2 + 2 fully connected = 23 quantizable layers
PASS_THROUGH = ("Relu", "MaxPool", "Flatten", "Clip")


def build_resnet():
    """A stem conv at 16×16, ten residual blocks of two 3×3 convolutions at 8×8, pooling, two Linear layers.

    Trains in seconds on the digits; deep enough that "≥ 90 % of the layers stay INT8" is a meaningful bar when two
    of them break, and wide enough that INT8 is the faster model.
    """
    import torch
    from torch import nn

    def conv(cin: int, cout: int) -> list:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout)]

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(*conv(WIDTH, WIDTH), nn.ReLU(), *conv(WIDTH, WIDTH))

        def forward(self, x):
            return torch.relu(x + self.body(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.MaxPool2d(2), *conv(1, WIDTH), nn.ReLU(), nn.MaxPool2d(2))
            self.blocks = nn.Sequential(*(Block() for _ in range(BLOCKS)))
            self.head = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(WIDTH * 16, 64), nn.ReLU(), nn.Linear(64, 10))

        def forward(self, x):
            return self.head(self.blocks(self.stem(x)))

    return Net()


@dataclass
class PlantedModel:
    fp32: Path                      # the trained model, no outliers
    planted: Path                   # the same FP32 function with outliers in `broken`
    broken: list[str]               # ONNX node names of the layers with planted outliers
    quantizable: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


DEFAULT_BROKEN = ("/blocks/blocks.4/body/body.3/Conv", "/head/head.4/Gemm")
PLANT_SCALE = 300.0
TRAIN_EPOCHS = 4


def make_planted_model(folder: Path, *, epochs: int = TRAIN_EPOCHS, seed: int = 0, broken: tuple[str, ...] = DEFAULT_BROKEN,
                       scale: float = PLANT_SCALE) -> PlantedModel:
    """Train the CNN, export it, plant outliers into the `broken` layers. Writes fp32.onnx, planted.onnx, calib.npz
    (512 training images) and val.npz (the held-out images with labels) into `folder`."""
    import torch

    from edgeq.demo import export_onnx, load_digits_split, train_classifier

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    split = load_digits_split(seed)
    torch.manual_seed(seed)
    model = train_classifier(build_resnet(), split, epochs=epochs, seed=seed, lr=3e-3, description="training the planted CNN")
    fp32 = export_onnx(model, folder / "fp32.onnx")
    np.savez(folder / "calib.npz", input=split.train_x[:512])
    np.savez(folder / "val.npz", input=split.val_x, labels=split.val_y)
    proto = onnx.load(str(fp32))
    notes = [plant_outliers(proto, name, scale) for name in broken]
    onnx.save(proto, str(folder / "planted.onnx"))
    return PlantedModel(fp32, folder / "planted.onnx", list(broken), quantizable_names(proto), notes)


def quantizable_names(proto: onnx.ModelProto) -> list[str]:
    return [n.name for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]


def cache_key(epochs: int = TRAIN_EPOCHS, seed: int = 0) -> str:
    """Names the cached model: changes with the architecture (its source and sizes), the training settings and the
    planting."""
    recipe = "\n".join([inspect.getsource(build_resnet), f"{WIDTH} {BLOCKS} {epochs} {seed} {PLANT_SCALE}", repr(DEFAULT_BROKEN)])
    return f"planted-resnet-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


def cached_planted_model(*, epochs: int = TRAIN_EPOCHS, seed: int = 0, cache: Path | None = None) -> PlantedModel:
    """The planted model, trained once per machine (seeded, so the same model every time) and kept in
    `cache` (default $EDGEQ_CACHE or ~/.cache/edgeq); a read-only cache gets a fresh copy in a temporary folder."""
    folder = cached_folder(cache_key(epochs, seed), "planted.onnx", lambda staging: make_planted_model(staging, epochs=epochs, seed=seed), cache)
    layers = quantizable_names(onnx.load(str(folder / "planted.onnx")))
    return PlantedModel(folder / "fp32.onnx", folder / "planted.onnx", list(DEFAULT_BROKEN), layers)


def plant_outliers(proto: onnx.ModelProto, consumer: str, scale: float, channel: int = 0) -> str:
    """Scale `channel` of the layer feeding `consumer` down by `scale` and the consumer's weights for it up by
    `scale` (in place). Returns a note saying what was done."""
    nodes = {n.name: n for n in proto.graph.node}
    producers = {o: n for n in proto.graph.node for o in n.output}
    inits = {t.name: t for t in proto.graph.initializer}
    node = nodes[consumer]
    producer = producers[node.input[0]]
    while producer.op_type in PASS_THROUGH:
        producer = producers[producer.input[0]]
    if producer.op_type not in ("Conv", "Gemm"):
        raise ValueError(f"{consumer}: its input comes from {producer.op_type}, not a Conv/Gemm it alone reads")

    def get(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name]).astype(np.float32).copy()

    def put(name: str, value: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))

    pw, pb = get(producer.input[1]), get(producer.input[2])
    trans = any(a.name == "transB" and a.i == 1 for a in producer.attribute)
    if producer.op_type == "Gemm" and not trans:
        pw[:, channel] /= scale
    else:
        pw[channel] /= scale
    pb[channel] /= scale
    put(producer.input[1], pw)
    put(producer.input[2], pb)
    cw = get(node.input[1])
    before = float(np.abs(cw).max())
    if node.op_type == "Conv":
        cw[:, channel] *= scale
    elif any(a.name == "transB" and a.i == 1 for a in node.attribute):
        cw[:, channel] *= scale
    else:
        cw[channel, :] *= scale
    put(node.input[1], cw)
    return (f"{consumer}: weights on input channel {channel} ×{scale:g} (max|w| {before:.3g} → {float(np.abs(cw).max()):.3g}), "
            f"{producer.name} channel {channel} ÷{scale:g}: the FP32 function is unchanged")

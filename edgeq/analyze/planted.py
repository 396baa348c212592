"""The honest test model for diagnosis and `auto`: a digits CNN with 35 quantizable layers, trained, with outlier
weights planted into chosen layers so that exactly those layers break INT8.

How the outliers are planted, without changing the FP32 function: ReLU commutes with positive scaling, so scaling
one output channel of a producer layer down by `s` and the consumer's weights for that channel up by `s` leaves the
FP32 outputs unchanged (the reverse of cross-layer equalization). The consumer now holds one column of weights `s`
times larger than the rest; its int8 step (per output channel) is set by them, and nearly every real weight rounds
to zero. The consumer is the broken layer.

torch is imported inside the training functions only (the ONNX paths never import it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

BRANCHES = 16   # parallel two-conv branches: 1 stem + 16×2 branch convs + 2 fully connected = 35 quantizable layers
BRANCH_WIDTH = 4
PASS_THROUGH = ("Relu", "MaxPool", "Flatten", "Clip")


def build_deep_cnn():
    """A stem conv at 16×16, 16 parallel conv→conv branches at 8×8 (concatenated), pooling, two Linear layers.

    Shallow enough to train in seconds, with enough separate layers that "≥ 90 % of the layers stay INT8" is a
    meaningful bar when two of them break.
    """
    import torch
    from torch import nn

    def conv(cin: int, cout: int) -> list:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.MaxPool2d(2), *conv(1, 16), nn.MaxPool2d(2))
            self.branches = nn.ModuleList(nn.Sequential(*conv(16, BRANCH_WIDTH), *conv(BRANCH_WIDTH, BRANCH_WIDTH))
                                          for _ in range(BRANCHES))
            self.head = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(BRANCHES * BRANCH_WIDTH * 16, 64), nn.ReLU(), nn.Linear(64, 10))

        def forward(self, x):
            s = self.stem(x)
            return self.head(torch.cat([b(s) for b in self.branches], dim=1))

    return Net()


@dataclass
class PlantedModel:
    fp32: Path                      # the trained model, no outliers
    planted: Path                   # the same FP32 function with outliers in `broken`
    broken: list[str]               # ONNX node names of the layers with planted outliers
    quantizable: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


DEFAULT_BROKEN = ("/branches.5/branches.5.3/Conv", "/head/head.4/Gemm")


def make_planted_model(folder: Path, *, epochs: int = 6, seed: int = 0, broken: tuple[str, ...] = DEFAULT_BROKEN,
                       scale: float = 300.0, batch: int = 32) -> PlantedModel:
    """Train the CNN, export it, plant outliers into the `broken` layers. Writes fp32.onnx, planted.onnx, calib.npz
    (512 training images) and val.npz (the held-out images with labels) into `folder`."""
    import torch
    from torch import nn

    from edgeq.demo import export_onnx, load_digits_split

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    split = load_digits_split(seed)
    torch.manual_seed(seed)
    model = build_deep_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = torch.from_numpy(split.train_x), torch.from_numpy(split.train_y)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    fp32 = export_onnx(model, folder / "fp32.onnx")
    np.savez(folder / "calib.npz", input=split.train_x[:512])
    np.savez(folder / "val.npz", input=split.val_x, labels=split.val_y)
    proto = onnx.load(str(fp32))
    notes = [plant_outliers(proto, name, scale) for name in broken]
    onnx.save(proto, str(folder / "planted.onnx"))
    layers = [n.name for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    return PlantedModel(fp32, folder / "planted.onnx", list(broken), layers, notes)


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

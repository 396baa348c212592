"""A MobileNetV3-style digits classifier for QAT: hard-swish, squeeze-excite, depthwise convolutions, inverted
residuals — the modern mobile building blocks on which static INT8 loses points.

Written as torchvision's quantizable MobileNetV3 is (residual adds and the squeeze-excite product through
`FloatFunctional`, Conv+BN(+ReLU) in fusable Sequentials) so that PyTorch's eager QAT (torch.ao prepare_qat/convert)
runs on the very same module that edgeq's QAT traces. Trained once per machine on the digits upscaled to 32×32
(seeded) and cached by a hash of this source and the training settings.

torch is imported inside the functions only.
"""
from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from pathlib import Path

from edgeq.testing.cache import cached_folder

TRAIN_EPOCHS = 12
TRAIN_LR = 3e-3
# (expanded channels, output channels, kernel, stride, squeeze-excite, hard-swish) after a 16-channel stem at 16×16.
BLOCKS = ((16, 16, 3, 1, True, False), (48, 24, 3, 2, False, False), (72, 24, 3, 1, False, False),
          (72, 40, 5, 2, True, True), (120, 40, 5, 1, True, True), (120, 48, 5, 1, True, True))
LAST_CHANNELS = 96
HIDDEN = 128


def build_mobilenet_v3():
    """Stem Conv-BN-hard-swish (stride 2), six inverted-residual blocks (three with squeeze-excite and hard-swish),
    a 1×1 Conv-BN-hard-swish, global pooling and a two-layer hard-swish classifier: ten classes."""
    from torch import nn
    from torch.ao.nn.quantized import FloatFunctional

    def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: str | None = "relu") -> nn.Sequential:
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act == "relu":
            layers.append(nn.ReLU())
        elif act == "hardswish":
            layers.append(nn.Hardswish())
        return nn.Sequential(*layers)

    class SqueezeExcite(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            squeezed = max(8, channels // 4)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc1 = nn.Conv2d(channels, squeezed, 1)
            self.relu = nn.ReLU()
            self.fc2 = nn.Conv2d(squeezed, channels, 1)
            self.gate = nn.Hardsigmoid()
            self.mul = FloatFunctional()

        def forward(self, x):
            return self.mul.mul(x, self.gate(self.fc2(self.relu(self.fc1(self.pool(x))))))

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, expanded: int, cout: int, k: int, stride: int, se: bool, hardswish: bool) -> None:
            super().__init__()
            act = "hardswish" if hardswish else "relu"
            layers = [] if expanded == cin else [conv_bn(cin, expanded, 1, act=act)]
            layers.append(conv_bn(expanded, expanded, k, stride, groups=expanded, act=act))
            if se:
                layers.append(SqueezeExcite(expanded))
            layers.append(conv_bn(expanded, cout, 1, act=None))
            self.block = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout
            self.add = FloatFunctional()

        def forward(self, x):
            y = self.block(x)
            return self.add.add(x, y) if self.residual else y

    class MobileNetV3(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers, cin = [conv_bn(1, 16, 3, 2, act="hardswish")], 16
            for expanded, cout, k, stride, se, hs in BLOCKS:
                layers.append(InvertedResidual(cin, expanded, cout, k, stride, se, hs))
                cin = cout
            layers.append(conv_bn(cin, LAST_CHANNELS, 1, act="hardswish"))
            self.features = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.flatten = nn.Flatten()
            self.classifier = nn.Sequential(nn.Linear(LAST_CHANNELS, HIDDEN), nn.Hardswish(), nn.Linear(HIDDEN, 10))

        def forward(self, x):
            return self.classifier(self.flatten(self.pool(self.features(x))))

    return MobileNetV3()


def fuse_groups(model) -> list[list[str]]:
    """The Conv-BN(-ReLU) module names torch.ao's fuse_modules_qat takes (hard-swish is not fusable there)."""
    from torch import nn

    groups = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential) and len(module) >= 2 and isinstance(module[0], nn.Conv2d) and isinstance(module[1], nn.BatchNorm2d):
            group = [f"{name}.0", f"{name}.1"] + ([f"{name}.2"] if len(module) > 2 and isinstance(module[2], nn.ReLU) else [])
            groups.append(group)
    return groups


@dataclass
class TrainedMobileNet:
    weights: Path      # state dict (torch.save), loads into build_mobilenet_v3()
    onnx: Path         # the FP32 model, input "input" (N, 1, 32, 32), output "logits"

    def model(self):
        import torch

        net = build_mobilenet_v3()
        net.load_state_dict(torch.load(str(self.weights), map_location="cpu", weights_only=True))
        return net.eval()


def cache_key(epochs: int = TRAIN_EPOCHS, seed: int = 0) -> str:
    """Changes with this module's architecture source and the training settings."""
    recipe = "\n".join([inspect.getsource(build_mobilenet_v3), repr(BLOCKS), f"{LAST_CHANNELS} {HIDDEN} {epochs} {seed} {TRAIN_LR}"])
    return f"mobilenet-v3-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


def train_mobilenet_v3(folder: Path, *, epochs: int = TRAIN_EPOCHS, seed: int = 0) -> TrainedMobileNet:
    """Train (seeded Adam, cosine, on the 32×32 digits training split) and write weights.pt and fp32.onnx."""
    import torch

    from edgeq.demo import export_onnx, load_digits_split, train_classifier

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = train_classifier(build_mobilenet_v3(), load_digits_split(seed), epochs=epochs, seed=seed, lr=TRAIN_LR, cosine=True,
                             description="training the MobileNetV3-style net")
    torch.save(model.state_dict(), str(folder / "weights.pt"))
    export_onnx(model, folder / "fp32.onnx")
    return TrainedMobileNet(folder / "weights.pt", folder / "fp32.onnx")


def cached_mobilenet_v3(*, epochs: int = TRAIN_EPOCHS, seed: int = 0, cache: Path | None = None) -> TrainedMobileNet:
    """The trained net, once per machine in `cache` (default $EDGEQ_CACHE or ~/.cache/edgeq); a cache that cannot be
    written gets a fresh copy in a temporary folder."""
    folder = cached_folder(cache_key(epochs, seed), "fp32.onnx", lambda staging: train_mobilenet_v3(staging, epochs=epochs, seed=seed), cache)
    return TrainedMobileNet(folder / "weights.pt", folder / "fp32.onnx")

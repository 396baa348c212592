"""edgeq QAT vs PyTorch's own eager QAT (torch.ao.quantization prepare_qat/convert), in one run.

Same FP32 model (the demo's digits CNN, or the MobileNetV3-style net of edgeq.testing.mobilenet_v3: hard-swish,
squeeze-excite, depthwise, inverted residuals; trained here, seeded), same quantization setting, same training data,
epochs, optimiser (Adam), learning rate, batch size and early-stop protocol (best epoch on 10% of the training images),
then: held-out top-1 of the deployed models (edgeq: the exported QDQ ONNX on ONNX Runtime; PyTorch: the converted
model on its quantized CPU engine), the share of the PTQ loss recovered, and the deployed latency (p50, batch 64,
1 thread). torch.ao's schedule freezes BatchNorm statistics for the last `--torch-freeze-bn` epochs and its
observers for the last `--torch-freeze-observers` (the MobileNetV3 net's defaults: 2 and 1, torchvision's recipe).
`--seeds N` repeats both QATs with N training seeds (the row figures are the means; the notes list every seed).

    PYTHONPATH=. .venv/bin/python bench/qat.py [--setting w4a8-per-tensor] [--epochs 2]   # markdown for RESULTS.md
    PYTHONPATH=. .venv/bin/python bench/qat.py --net mobilenet-v3 --epochs 5 --seeds 3
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table  # noqa: E402

SETTINGS = {
    "w4a8-per-tensor": dict(per_channel=False, weight_bits=4),
    "int8-per-tensor": dict(per_channel=False, weight_bits=8),
    "w4a8-per-channel": dict(per_channel=True, weight_bits=4),
}
BATCH = 64
# build_cnn's Sequential indices: Conv-BN-ReLU ×2, pool, Conv-BN-ReLU ×2, pool, flatten, Linear-ReLU, Linear.
CNN_FUSE = [["0", "1", "2"], ["3", "4", "5"], ["7", "8", "9"], ["10", "11", "12"], ["15", "16"]]
# (BatchNorm frozen for the last k epochs, observers for the last k) of torch.ao's schedule, per net.
TORCH_FREEZE = {"digits-cnn": (0, 0), "mobilenet-v3": (2, 1)}


def torch_qconfig(per_channel: bool, bits: int):
    """PyTorch's eager QAT with the same recipe: uint8 affine activations, symmetric int8 or 4-bit weights."""
    import torch
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver, QConfig

    lo, hi = (-127, 127) if bits == 8 else (-8, 7)
    act = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8,
                                 qscheme=torch.per_tensor_affine, reduce_range=False)
    if per_channel:
        weight = FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=lo, quant_max=hi, dtype=torch.qint8,
                                        qscheme=torch.per_channel_symmetric, ch_axis=0)
    else:
        weight = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=lo, quant_max=hi, dtype=torch.qint8,
                                        qscheme=torch.per_tensor_symmetric)
    return QConfig(activation=act, weight=weight)


def torch_qat(model, fuse: list[list[str]], setting: dict, train, stop, epochs: int, lr: float, seed: int = 0,
              freeze: tuple[int, int] = (0, 0)):
    """torch.ao eager QAT: fuse Conv-BN(-ReLU), prepare_qat, train with the same loop (BatchNorm statistics and
    observers frozen for the last freeze[0] / freeze[1] epochs), keep the best epoch, convert."""
    import torch
    from torch import nn
    from torch.ao.nn.intrinsic.qat import freeze_bn_stats
    from torch.ao.quantization import DeQuantStub, QuantStub, convert, disable_observer, fuse_modules_qat, prepare_qat

    from edgeq.qat.finetune import score

    torch.backends.quantized.engine = "x86"
    torch.manual_seed(seed)
    net = nn.Sequential(QuantStub(), copy.deepcopy(model), DeQuantStub())
    net.train()
    fuse_modules_qat(net[1], fuse, inplace=True)
    net.qconfig = torch_qconfig(setting["per_channel"], setting["weight_bits"])
    prepare_qat(net, inplace=True)
    x, y = (torch.from_numpy(a) for a in train)
    sx, sy = (torch.from_numpy(a) for a in stop)
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    steps = max(1, epochs * -(-len(x) // BATCH))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    generator = torch.Generator().manual_seed(seed)
    best, best_state, history = -1.0, None, []
    for epoch in range(epochs):
        if freeze[0] and epoch >= epochs - freeze[0]:
            net.apply(freeze_bn_stats)
        if freeze[1] and epoch >= epochs - freeze[1]:
            net.apply(disable_observer)
        net.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), BATCH):
            idx = order[start:start + BATCH]
            optimiser.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            optimiser.step()
            scheduler.step()
        value = score(net, sx, sy, "classification")
        history.append(value)
        if value > best:
            best, best_state = value, copy.deepcopy(net.state_dict())
    net.load_state_dict(best_state)
    net.eval()
    return convert(net.eval(), inplace=False), history


def torch_latency(model, x, runs: int) -> float:
    import torch

    torch.set_num_threads(1)
    batch = torch.from_numpy(x[:BATCH])
    times = []
    with torch.inference_mode():
        for i in range(runs + 5):
            start = time.perf_counter()
            model(batch)
            if i >= 5:
                times.append(time.perf_counter() - start)
    torch.set_num_threads(2)
    return float(np.median(times)) * 1000


def fp32_model(net: str, split, train_epochs: int | None):
    """The trained FP32 torch model and the Conv-BN(-ReLU) groups torch.ao fuses."""
    if net == "mobilenet-v3":
        from edgeq.testing.mobilenet_v3 import TRAIN_EPOCHS, cached_mobilenet_v3, fuse_groups

        model = cached_mobilenet_v3(epochs=train_epochs or TRAIN_EPOCHS).model()
        return model, fuse_groups(model), train_epochs or TRAIN_EPOCHS
    from edgeq.demo import train_cnn

    return train_cnn(split, epochs=train_epochs or 8), CNN_FUSE, train_epochs or 8


def mean(values: list[float]) -> float:
    return float(np.mean(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", choices=list(TORCH_FREEZE), default="digits-cnn")
    parser.add_argument("--setting", choices=list(SETTINGS), default="w4a8-per-tensor")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seeds", type=int, default=1, help="QAT training seeds (both QATs)")
    parser.add_argument("--train-epochs", type=int, default=None, help="FP32 training epochs (digits CNN 8, MobileNetV3 net its cached recipe)")
    parser.add_argument("--torch-freeze-bn", type=int, default=None)
    parser.add_argument("--torch-freeze-observers", type=int, default=None)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()

    import torch

    import edgeq
    from edgeq import qat
    from edgeq.bench import BenchConfig, benchmark
    from edgeq.demo import export_onnx, load_digits_split
    from edgeq.evaluate import validate
    from edgeq.qat.finetune import score

    torch.set_num_threads(2)
    setting = SETTINGS[args.setting]
    freeze = tuple(f if f is not None else d for f, d in zip((args.torch_freeze_bn, args.torch_freeze_observers), TORCH_FREEZE[args.net]))
    split = load_digits_split()
    n_stop = int(len(split.train_x) * 0.1)
    train = (split.train_x[:-n_stop], split.train_y[:-n_stop])
    stop = (split.train_x[-n_stop:], split.train_y[-n_stop:])
    val = edgeq.Dataset.from_arrays({"input": split.val_x}, labels=split.val_y)
    vx, vy = torch.from_numpy(split.val_x), torch.from_numpy(split.val_y)
    model, fuse, train_epochs = fp32_model(args.net, split, args.train_epochs)
    seeds = list(range(args.seeds))
    top1 = {"qat": [], "qat8": [], "torch": []}
    seconds = {"qat": [], "torch": []}
    histories = {"qat": [], "torch": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fp32 = export_onnx(model, work / "fp32.onnx")
        config = edgeq.Int8Static(**setting)
        ptq = edgeq.quantize(edgeq.load(fp32), config, calib=edgeq.Dataset.from_arrays({"input": split.train_x[:512]})).save(work / "ptq.onnx")
        for seed in seeds:
            start = time.perf_counter()
            prepared = qat.prepare(model, config, calib=split.train_x[:512])
            result = qat.finetune(prepared, train, stop, epochs=args.epochs, lr=args.lr, batch_size=BATCH, seed=seed)
            ours = qat.export(prepared, work / "qat.onnx", force=True)
            seconds["qat"].append(time.perf_counter() - start)
            ours8 = qat.export(prepared, work / "qat_int8_storage.onnx", weight_storage="int8", force=True)
            top1["qat"].append(validate(ours, val).value)
            top1["qat8"].append(validate(ours8, val).value)
            histories["qat"].append(f"{[round(h['val_score'], 2) for h in result.history]} kept {result.best_epoch}")
            start = time.perf_counter()
            theirs, theirs_history = torch_qat(model, fuse, setting, train, stop, args.epochs, args.lr, seed, freeze)
            seconds["torch"].append(time.perf_counter() - start)
            top1["torch"].append(score(theirs, vx, vy, "classification"))
            histories["torch"].append(f"{[round(v, 2) for v in theirs_history]}")
            print(f"seed {seed}: edgeq {top1['qat'][-1]:.2f}, torch.ao {top1['torch'][-1]:.2f}", file=sys.stderr, flush=True)
        bench = dict(zip(["fp32", "ptq", "qat", "qat8"], benchmark([fp32, ptq, ours, ours8], BenchConfig(threads=1, runs=args.runs, warmup=5, batch=BATCH))))
        base = {name: validate(path, val).value for name, path in (("fp32", fp32), ("ptq", ptq))}
    lost = base["fp32"] - base["ptq"]

    def recovered(values: list[float]) -> str:
        return f"{(mean(values) - base['ptq']) / lost * 100:.0f}%" if lost > 0 else "—"

    torch_fp32_ms = torch_latency(model.eval(), split.val_x, args.runs)
    torch_q_ms = torch_latency(theirs, split.val_x, args.runs)
    rows = [["FP32 (ONNX Runtime)", f"{base['fp32']:.2f}", "—", "—", f"{bench['fp32'].latency_ms.p50:.2f}", "—"],
            [f"edgeq PTQ {args.setting} (ONNX Runtime)", f"{base['ptq']:.2f}", f"{-lost:+.2f}", "—", f"{bench['ptq'].latency_ms.p50:.2f}", "—"],
            [f"edgeq QAT {args.setting} (ONNX Runtime)", f"{mean(top1['qat']):.2f}", f"{mean(top1['qat']) - base['fp32']:+.2f}",
             recovered(top1["qat"]), f"{bench['qat'].latency_ms.p50:.2f}", f"{mean(seconds['qat']):.0f}"]]
    if setting["weight_bits"] == 4:
        rows.append([f"edgeq QAT {args.setting}, 4-bit values in int8 storage (ONNX Runtime)", f"{mean(top1['qat8']):.2f}",
                     f"{mean(top1['qat8']) - base['fp32']:+.2f}", recovered(top1["qat8"]), f"{bench['qat8'].latency_ms.p50:.2f}", "—"])
    rows.append(["FP32 (PyTorch eager)", f"{base['fp32']:.2f}", "—", "—", f"{torch_fp32_ms:.2f}", "—"])
    rows.append([f"torch.ao eager QAT {args.setting} (PyTorch x86 engine)", f"{mean(top1['torch']):.2f}", f"{mean(top1['torch']) - base['fp32']:+.2f}",
                 recovered(top1["torch"]), f"{torch_q_ms:.2f}", f"{mean(seconds['torch']):.0f}"])
    headers = ["model", "held-out top-1 %", "vs FP32", "PTQ loss recovered", f"p50 ms (batch {BATCH}, 1 thread)", "QAT wall s"]
    print(markdown_table(headers, rows))
    print()
    print(f"- {args.net}: {len(split.val_x)} held-out digits; {len(train[0])} training images, {n_stop} for early stop; {args.epochs} epochs, "
          f"Adam lr {args.lr:g} cosine, batch {BATCH}; FP32 trained {train_epochs} epochs (seed 0); torch.ao BatchNorm frozen for the "
          f"last {freeze[0]} epochs, observers for the last {freeze[1]}.")
    if len(seeds) > 1:
        print(f"- QAT seeds {seeds} (the rows are means): edgeq {[round(v, 2) for v in top1['qat']]}, torch.ao {[round(v, 2) for v in top1['torch']]}.")
    print(f"- early-stop scores per epoch: edgeq {'; '.join(histories['qat'])} (epoch 0 = PTQ init), torch.ao {'; '.join(histories['torch'])}.")


if __name__ == "__main__":
    main()

"""edgeq QAT vs PyTorch's own eager QAT (torch.ao.quantization prepare_qat/convert), in one run.

Same FP32 model (the demo's digits CNN, trained here, seeded), same quantization setting, same training data, epochs,
optimiser (Adam), learning rate, batch size and early-stop protocol (best epoch on 10% of the training images), then:
held-out top-1 of the deployed models (edgeq: the exported QDQ ONNX on ONNX Runtime; PyTorch: the converted model on
its quantized CPU engine), the share of the PTQ loss recovered, and the deployed latency (p50, batch 64, 1 thread).

    PYTHONPATH=. .venv/bin/python bench/qat.py [--setting w4a8-per-tensor] [--epochs 2]   # markdown for RESULTS.md
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
FUSE = [["0", "1", "2"], ["3", "4", "5"], ["7", "8", "9"], ["10", "11", "12"], ["15", "16"]]


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


def torch_qat(model, setting: dict, train, stop, epochs: int, lr: float):
    """torch.ao eager QAT: fuse Conv-BN-ReLU, prepare_qat, train with the same loop, keep the best epoch, convert."""
    import torch
    from torch import nn
    from torch.ao.quantization import DeQuantStub, QuantStub, convert, fuse_modules_qat, prepare_qat

    from edgeq.qat.finetune import score

    torch.backends.quantized.engine = "x86"
    net = nn.Sequential(QuantStub(), copy.deepcopy(model), DeQuantStub())
    net.train()
    fuse_modules_qat(net[1], FUSE, inplace=True)
    net.qconfig = torch_qconfig(setting["per_channel"], setting["weight_bits"])
    prepare_qat(net, inplace=True)
    x, y = (torch.from_numpy(a) for a in train)
    sx, sy = (torch.from_numpy(a) for a in stop)
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    steps = max(1, epochs * -(-len(x) // BATCH))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    generator = torch.Generator().manual_seed(0)
    best, best_state, history = -1.0, None, []
    for _ in range(epochs):
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=list(SETTINGS), default="w4a8-per-tensor")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--train-epochs", type=int, default=8, help="FP32 training epochs of the digits CNN")
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()

    import torch

    import edgeq
    from edgeq import qat
    from edgeq.bench import BenchConfig, benchmark
    from edgeq.demo import export_onnx, load_digits_split, train_cnn
    from edgeq.evaluate import validate
    from edgeq.qat.finetune import score

    torch.set_num_threads(2)
    setting = SETTINGS[args.setting]
    split = load_digits_split()
    n_stop = int(len(split.train_x) * 0.1)
    train = (split.train_x[:-n_stop], split.train_y[:-n_stop])
    stop = (split.train_x[-n_stop:], split.train_y[-n_stop:])
    val = edgeq.Dataset.from_arrays({"input": split.val_x}, labels=split.val_y)
    model = train_cnn(split, epochs=args.train_epochs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fp32 = export_onnx(model, work / "fp32.onnx")
        config = edgeq.Int8Static(**setting)
        ptq = edgeq.quantize(edgeq.load(fp32), config, calib=edgeq.Dataset.from_arrays({"input": split.train_x[:512]})).save(work / "ptq.onnx")
        start = time.perf_counter()
        prepared = qat.prepare(model, config, calib=split.train_x[:512])
        result = qat.finetune(prepared, train, stop, epochs=args.epochs, lr=args.lr, batch_size=BATCH)
        ours = qat.export(prepared, work / "qat.onnx")
        ours_s = time.perf_counter() - start
        ours8 = qat.export(prepared, work / "qat_int8_storage.onnx", weight_storage="int8")
        start = time.perf_counter()
        theirs, theirs_history = torch_qat(model, setting, train, stop, args.epochs, args.lr)
        theirs_s = time.perf_counter() - start
        bench = dict(zip(["fp32", "ptq", "qat", "qat8"], benchmark([fp32, ptq, ours, ours8], BenchConfig(threads=1, runs=args.runs, warmup=5, batch=BATCH))))
        top1 = {name: validate(path, val).value for name, path in (("fp32", fp32), ("ptq", ptq), ("qat", ours), ("qat8", ours8))}
    vx, vy = torch.from_numpy(split.val_x), torch.from_numpy(split.val_y)
    top1["torch"] = score(theirs, vx, vy, "classification")
    lost = top1["fp32"] - top1["ptq"]
    recovered = {k: (top1[k] - top1["ptq"]) / lost if lost > 0 else float("nan") for k in ("qat", "torch")}
    torch_fp32_ms = torch_latency(model.eval(), split.val_x, args.runs)
    torch_q_ms = torch_latency(theirs, split.val_x, args.runs)
    rows.append(["FP32 (ONNX Runtime)", f"{top1['fp32']:.2f}", "—", "—", f"{bench['fp32'].latency_ms.p50:.2f}", "—"])
    rows.append([f"edgeq PTQ {args.setting} (ONNX Runtime)", f"{top1['ptq']:.2f}", f"{-lost:+.2f}", "—", f"{bench['ptq'].latency_ms.p50:.2f}", "—"])
    rows.append([f"edgeq QAT {args.setting} (ONNX Runtime)", f"{top1['qat']:.2f}", f"{top1['qat'] - top1['fp32']:+.2f}",
                 f"{recovered['qat'] * 100:.0f}%", f"{bench['qat'].latency_ms.p50:.2f}", f"{ours_s:.0f}"])
    if setting["weight_bits"] == 4:
        rows.append([f"edgeq QAT {args.setting}, 4-bit values in int8 storage (ONNX Runtime)", f"{top1['qat8']:.2f}",
                     f"{top1['qat8'] - top1['fp32']:+.2f}", f"{(top1['qat8'] - top1['ptq']) / lost * 100:.0f}%" if lost > 0 else "—",
                     f"{bench['qat8'].latency_ms.p50:.2f}", "—"])
    rows.append(["FP32 (PyTorch eager)", f"{top1['fp32']:.2f}", "—", "—", f"{torch_fp32_ms:.2f}", "—"])
    rows.append([f"torch.ao eager QAT {args.setting} (PyTorch x86 engine)", f"{top1['torch']:.2f}", f"{top1['torch'] - top1['fp32']:+.2f}",
                 f"{recovered['torch'] * 100:.0f}%", f"{torch_q_ms:.2f}", f"{theirs_s:.0f}"])
    headers = ["model", "held-out top-1 %", "vs FP32", "PTQ loss recovered", f"p50 ms (batch {BATCH}, 1 thread)", "QAT wall s"]
    print(markdown_table(headers, rows))
    print()
    print(f"- {len(split.val_x)} held-out digits; {len(train[0])} training images, {n_stop} for early stop; {args.epochs} epochs, "
          f"Adam lr {args.lr:g} cosine, batch {BATCH}; FP32 trained {args.train_epochs} epochs (seed 0).")
    print(f"- early-stop scores per epoch: edgeq {[round(h['val_score'], 2) for h in result.history]} (epoch 0 = PTQ init), "
          f"torch.ao {[round(v, 2) for v in theirs_history]}; edgeq kept epoch {result.best_epoch}.")


if __name__ == "__main__":
    main()

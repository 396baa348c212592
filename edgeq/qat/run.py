"""`edgeq qat`: QAT without writing Python — a model factory named by the user, a weights-only state dict, .npz data.

load (import MODULE, call FACTORY, load_state_dict of a `torch.load(weights_only=True)` file) → PTQ of the same
network (measured) → prepare → finetune (early stop on a split of the training data) → export → validate FP32, PTQ
and QAT on the validation data → the verdicts before and after.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.errors import ConfigError, DataError
from edgeq.torch_in import load_module

CALIB_SAMPLES = 512
EARLY_STOP_FRACTION = 0.1


@dataclass
class QatOptions:
    epochs: int = 3
    lr: float = 1e-4
    batch_size: int = 64
    per_channel: bool = True
    weight_bits: int = 8
    learn_scales: bool = False
    task: str | None = None
    weight_storage: str = "int4"
    seed: int = 0


def training_arrays(data, what: str) -> tuple[str, np.ndarray, np.ndarray]:
    """(input name, inputs, labels) of a one-input labelled Dataset, checked."""
    chunks = list(data.chunks())
    if not chunks:
        raise DataError(f"{what} is empty", "give labelled samples")
    keys = list(chunks[0].inputs)
    if len(keys) != 1:
        raise ConfigError(f"QAT supports models with one input; {what} has {len(keys)} arrays ({', '.join(keys)})", "give one input array plus labels")
    if any(c.labels is None for c in chunks):
        raise DataError(f"{what} has no labels", "add a `labels` array (class ids or regression targets)")
    x = np.concatenate([np.asarray(c.inputs[keys[0]]) for c in chunks]).astype(np.float32)
    y = np.concatenate([np.asarray(c.labels) for c in chunks])
    if not np.isfinite(x).all():
        raise DataError(f"{what} holds NaN/Inf", "clean the data")
    return keys[0], x, y


def default_task(labels: np.ndarray) -> str:
    return "classification" if np.issubdtype(labels.dtype, np.integer) else "regression"


def prepare_qat(model, x: np.ndarray, name: str, config, options: QatOptions,
                output_names: list[str] | None = None) -> tuple[Any, tuple[np.ndarray, np.ndarray]]:
    """Fake quantization initialised from PTQ on up to 512 training samples; returns it and the (training,
    early-stop) index split: 10 % of the samples are held back for early stopping (none below 20 samples)."""
    from edgeq import qat

    order = np.random.default_rng(options.seed).permutation(len(x))
    n_stop = max(1, int(len(x) * EARLY_STOP_FRACTION)) if len(x) >= 20 else 0
    split = (order[n_stop:], order[:n_stop])
    prepared = qat.prepare(model, config, calib=x[split[0]][:CALIB_SAMPLES], input_name=name,
                           output_names=output_names, learn_scales=options.learn_scales)
    return prepared, split


def finetune_qat(prepared, x: np.ndarray, y: np.ndarray, split: tuple[np.ndarray, np.ndarray], task: str, options: QatOptions):
    """The built-in loop with early stop on the held-back split; returns its history."""
    from edgeq import qat

    train_idx, stop_idx = split
    early = (x[stop_idx], y[stop_idx]) if len(stop_idx) else None
    return qat.finetune(prepared, (x[train_idx], y[train_idx]), early, task=task, epochs=options.epochs, lr=options.lr,
                        batch_size=options.batch_size, seed=options.seed)


def run_qat(spec: str, weights: Path, train, val, output: Path, options: QatOptions, *, force: bool = False) -> dict:
    """Everything `edgeq qat` does; returns the figures it prints."""
    from edgeq.data import Dataset
    from edgeq.quantize.config import Int8Static
    from edgeq import qat
    from edgeq.decide import DecisionRule
    from edgeq.evaluate import compare, validate
    from edgeq.qat.prepare import export_float

    model = load_module(spec, weights)
    name, x, y = training_arrays(train, "training data")
    _, vx, vy = training_arrays(val, "validation data")
    task = options.task or default_task(y)
    config = Int8Static(per_channel=options.per_channel, weight_bits=options.weight_bits)
    prepared, split = prepare_qat(model, x, name, config, options)
    state = prepared.edgeq_qat
    val_set = Dataset.from_arrays({name: vx}, labels=vy, description="validation data")
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = export_float(state.template, name, state.output_names, x[:1]).save(Path(tmp) / "fp32.onnx")
        base = validate(fp32_path, val_set).to_dict()
        ptq = validate(state.ptq, val_set).to_dict()
    history = finetune_qat(prepared, x, y, split, task, options)
    written = qat.export(prepared, output, force=force, weight_storage=options.weight_storage)
    qat_record = validate(written, val_set).to_dict()
    rule = DecisionRule()
    before, after = compare(base, ptq, rule).to_dict(), compare(base, qat_record, rule).to_dict()
    return {"output": str(written), "task": task, "metric": base["metric"], "fp32": base["value"], "ptq": ptq["value"],
            "qat": qat_record["value"], "ptq_drop": before["drop"], "qat_drop": after["drop"], "verdict_before": before["verdict"],
            "verdict_after": after["verdict"], "reasons_after": after["reasons"], "finetune": history.to_dict(),
            "config": {"per_channel": options.per_channel, "weight_bits": options.weight_bits, "learn_scales": options.learn_scales}}


def print_qat(console: Any, result: dict) -> None:
    from rich.table import Table

    table = Table(title=f"QAT: {result['metric']} on the validation data")
    for col in ("model", result["metric"], "drop vs FP32", "verdict"):
        table.add_column(col, justify="left" if col == "model" else "right")
    table.add_row("fp32", f"{result['fp32']:.2f}", "—", "baseline")
    table.add_row("ptq", f"{result['ptq']:.2f}", f"{result['ptq_drop']:+.2f}", result["verdict_before"])
    table.add_row("qat", f"{result['qat']:.2f}", f"{result['qat_drop']:+.2f}", result["verdict_after"])
    console.print(table)
    console.print(f"verdict before QAT: {result['verdict_before']}; after QAT: [bold]{result['verdict_after']}[/]")
    console.print(f"wrote {result['output']}")

"""QAT inside `auto`: the PyTorch model MODEL was exported from, checked before the search starts, fine-tuned when no
INT8 or mixed model meets the budget and evaluated like every other candidate; without it, the `edgeq qat` command
the verdict recommends."""
from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.auto.candidates import Recipe
from edgeq.auto.search import Search
from edgeq.data import Dataset, open_data
from edgeq.errors import ConfigError
from edgeq.model import Model
from edgeq.quantize.config import Int8Static

SAME_FUNCTION_RTOL = 1e-3   # the PyTorch model given for QAT must reproduce MODEL's outputs this closely


@dataclass(frozen=True)
class QatSource:
    """The PyTorch model MODEL was exported from, for the quantization-aware training `auto` runs when no INT8 or
    mixed model meets the budget (the `edgeq qat` inputs: a factory, a weights-only state dict, labelled data).

    >>> src = QatSource("mynets:build", "weights.pt", "train.npz", epochs=2)
    >>> src.factory, src.lr
    ('mynets:build', 0.0001)
    """

    factory: str                    # MODULE:FACTORY, a function that builds the torch.nn.Module with no arguments
    weights: str | Path             # its state dict, torch.save(model.state_dict(), PATH); loaded weights-only
    train: Dataset | str | Path     # labelled training data, also the source of the QAT calibration
    epochs: int = 3
    lr: float = 1e-4
    batch_size: int = 64
    seed: int = 0


@dataclass
class QatInputs:
    """A checked QatSource: the module, MODEL's input name and the training arrays."""

    source: QatSource
    module: Any
    input_name: str
    x: np.ndarray
    y: np.ndarray


def load_qat(qat: QatSource, source: Model) -> QatInputs:
    """Check everything QAT needs before the search starts: PyTorch, the factory and weights, labelled training data
    for MODEL's one input, and that the module computes what MODEL computes."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ConfigError("QAT needs PyTorch, which is not installed", "pip install 'edgeq[torch]', or leave out the PyTorch model") from None
    from edgeq.qat.run import training_arrays
    from edgeq.torch_in import load_module

    if qat.epochs < 1 or not qat.lr > 0 or qat.batch_size < 1:
        raise ConfigError(f"QAT settings out of range: {qat.epochs} epochs, learning rate {qat.lr:g}, batch size {qat.batch_size}",
                          "give at least 1 epoch (--qat-epochs), a positive learning rate (--qat-lr) and a batch size of at least 1")
    if len(source.inputs) != 1:
        raise ConfigError(f"QAT supports models with one input; {_label(source)} has {len(source.inputs)}", "leave out the PyTorch model")
    module = load_module(qat.factory, Path(qat.weights))
    train = open_data(qat.train) if isinstance(qat.train, (str, Path)) else qat.train
    _, x, y = training_arrays(train, "training data")
    inputs = QatInputs(qat, module, source.inputs[0].name, x, y)
    _check_same_function(inputs, source)
    return inputs


def _check_same_function(inputs: QatInputs, source: Model) -> None:
    """QAT fine-tunes the PyTorch model and is measured against MODEL's FP32: they must compute the same function."""
    import torch

    from edgeq.model import make_session

    batch = source.inputs[0].shape[0] if source.inputs[0].shape and isinstance(source.inputs[0].shape[0], int) else 8
    x = inputs.x[:batch]
    try:
        with torch.no_grad():
            ours = inputs.module(torch.from_numpy(x))
        ours = np.asarray((ours[0] if isinstance(ours, (tuple, list)) else ours).numpy(), dtype=np.float64)
        theirs = np.asarray(make_session(source.proto, threads=1).run(None, {inputs.input_name: x})[0], dtype=np.float64)
        error = float(np.linalg.norm(ours - theirs) / max(float(np.linalg.norm(theirs)), 1e-12))
    except Exception as exc:  # noqa: BLE001 - any failure here means the two do not fit together
        detail = " ".join(str(exc).split())[:160]
        raise ConfigError(f"the training data does not run through both {inputs.source.factory} and {_label(source)} ({type(exc).__name__}: {detail})",
                          f"give the PyTorch model {_label(source)} was exported from and training inputs shaped like its input") from None
    if not error <= SAME_FUNCTION_RTOL:
        raise ConfigError(f"{inputs.source.factory} with {inputs.source.weights} does not compute what {_label(source)} computes "
                          f"(relative output difference {error:.2g} on {len(x)} training samples)",
                          f"give the PyTorch model and weights {_label(source)} was exported from")


def _label(model: Model) -> str:
    return Path(model.path).name if model.path else model.name


def qat_step(search: Search, inputs: QatInputs, config: Int8Static, source: Model, steps: list[dict], say) -> None:
    """Fine-tune the PyTorch model with fake quantization (initialised from PTQ with the chosen calibration) and
    evaluate its exported QDQ model like every other candidate."""
    from edgeq import qat
    from edgeq.qat.run import QatOptions, default_task, finetune_qat, prepare_qat

    src = inputs.source
    options = QatOptions(epochs=src.epochs, lr=src.lr, batch_size=src.batch_size, per_channel=config.per_channel,
                         weight_bits=config.weight_bits, seed=src.seed)
    say(f"no INT8 or mixed model meets the budget: quantization-aware training of {src.factory} ({src.epochs} epochs)")
    started = time.perf_counter()
    prepared, split = prepare_qat(inputs.module, inputs.x, inputs.input_name, config, options, [o.name for o in source.outputs])
    history = finetune_qat(prepared, inputs.x, inputs.y, split, default_task(inputs.y), options)
    proto = qat.to_onnx(prepared, weight_storage=options.weight_storage).proto
    seconds = time.perf_counter() - started
    about = {"factory": src.factory, "epochs": src.epochs, "lr": src.lr, "best_epoch": history.best_epoch,
             "train_samples": len(split[0]), "early_stop_samples": len(split[1]), "seconds": round(seconds, 1)}
    (record,) = search.evaluate([("qat", proto, Recipe("qat", method=config.method, qat=about))])
    steps.append({"step": "qat", **about, "drop": record.drop, "meets": record.meets,
                  "result": f"quantization-aware training of {src.factory} ({src.epochs} epochs on {len(split[0])} training samples, "
                            f"epoch {history.best_epoch} kept by early stop on {len(split[1])}, {seconds:.0f} s): drop "
                            f"{record.drop:+.2f} points, {'meets' if record.meets else 'over'} the budget"})
    say(f"  qat: drop {record.drop:+.2f}")


def qat_command(source: Model, val: Dataset | str | Path, config: Int8Static, output: str | Path) -> str:
    """The recommendation when QAT could not run here: the exact `edgeq qat` command, and how to let auto run it."""
    if isinstance(val, Dataset):
        val = val.description if Path(val.description).exists() else "VAL_DATA"
    flags = ("" if config.per_channel else " --per-tensor") + ("" if config.weight_bits == 8 else f" --weight-bits {config.weight_bits}")
    command = (f"edgeq qat MODULE:FACTORY --weights WEIGHTS.pt --train TRAIN_DATA --val {shlex.quote(str(val))}{flags} "
               f"-o {shlex.quote(str(Path(output) / 'qat.onnx'))}")
    return (f"recommendation: quantization-aware training, which recovers most of the INT8 loss: `{command}` "
            f"(MODULE:FACTORY builds the PyTorch model {_label(source)} was exported from), or rerun `edgeq auto` with "
            "`--torch-model MODULE:FACTORY --weights WEIGHTS.pt --train TRAIN_DATA` to run it and compare it here")

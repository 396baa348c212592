"""finetune: a built-in training loop for the common cases, for users without their own.

Classification (cross-entropy, class-id labels) or regression (MSE, float targets); Adam, a cosine or constant
learning-rate schedule, a progress bar, and early stopping on a validation split: the module ends with the weights
of its best validation epoch — the state before training counts, so fine-tuning never leaves it worse on that split.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgeq.errors import ConfigError, DataError
from edgeq.progress import track
from edgeq.qat.fake_quant import freeze_bn

TASKS = ("classification", "regression")
SCHEDULES = ("cosine", "constant")
# BatchNorm re-estimation during QAT is what recovers a MobileNetV3-style net (bench/qat.py): the statistics follow
# the quantized network, then are frozen for the last epochs so the weights settle on the folded op that is deployed.
FREEZE_BN_EPOCHS = 2


@dataclass
class FinetuneResult:
    """Per-epoch history (epoch 0 = before training), the best epoch and its validation score."""

    task: str
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float | None = None
    stopped_early: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def finetune(model: nn.Module, train: Any, val: Any = None, *, task: str = "classification", epochs: int = 3,
             lr: float = 1e-4, batch_size: int = 64, schedule: str = "cosine", patience: int = 2,
             weight_decay: float = 0.0, seed: int = 0, freeze_bn_epochs: int = FREEZE_BN_EPOCHS) -> FinetuneResult:
    """Train a prepared module on `train` = (inputs, labels) arrays or an edgeq.Dataset with labels; early-stop on
    `val` (same forms; its score is top-1 % for classification, -MSE for regression). BatchNorm statistics (of the
    Conv+BN pairs, trained unfolded) follow the quantized network's batches, then are frozen for the last
    `freeze_bn_epochs` epochs (the first epoch always updates them); an epoch with live statistics that ends below
    the best score so far is undone and the statistics are frozen from then on (its history entry says bn_frozen).

    >>> result = edgeq.qat.finetune(qat, (x_train, y_train), (x_val, y_val), epochs=4, lr=1e-4)   # doctest: +SKIP
    >>> result.best_epoch, result.best_score                                                     # doctest: +SKIP
    (3, 98.6)
    """
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}", f"use one of: {', '.join(TASKS)}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}", f"use one of: {', '.join(SCHEDULES)}")
    if epochs < 0 or not (lr > 0 and math.isfinite(lr)) or batch_size < 1:
        raise ConfigError(f"epochs ({epochs}), lr ({lr}) and batch size ({batch_size}) must be >= 0, > 0 and >= 1", "e.g. --epochs 3 --lr 1e-4")
    x, y = labelled_arrays(train, task, "training data")
    vx, vy = labelled_arrays(val, task, "validation data") if val is not None else (None, None)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    steps = max(1, epochs * -(-len(x) // batch_size))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, (lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))) if schedule == "cosine" else (lambda s: 1.0))
    result = FinetuneResult(task)
    best_state = None
    if vx is not None:
        result.best_score = score(model, vx, vy, task, batch_size)
        best_state = copy.deepcopy(model.state_dict())
        result.history.append({"epoch": 0, "loss": None, "val_score": result.best_score})
    since_best = 0
    first_frozen = max(1, epochs - freeze_bn_epochs) + 1
    for epoch in track(range(1, epochs + 1), "quantization-aware training", total=epochs):
        freeze_bn(model, epoch >= first_frozen)
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total, count = 0.0, 0
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            optimiser.zero_grad()
            loss = _loss(model(x[idx]), y[idx], task)
            loss.backward()
            optimiser.step()
            scheduler.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        entry = {"epoch": epoch, "loss": total / max(count, 1)}
        if vx is not None:
            entry["val_score"] = score(model, vx, vy, task, batch_size)
            if entry["val_score"] > result.best_score:
                result.best_score, result.best_epoch, since_best = entry["val_score"], epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            elif epoch < first_frozen and entry["val_score"] < result.best_score:
                # Live statistics made it worse (a large learning rate can derail them): back to the best state, frozen.
                model.load_state_dict(best_state)
                first_frozen, entry["bn_frozen"] = epoch + 1, True
            else:
                since_best += 1
        result.history.append(entry)
        if vx is not None and since_best >= patience:
            result.stopped_early = epoch < epochs
            break
    freeze_bn(model, False)
    if best_state is not None:
        model.load_state_dict(best_state)
    elif epochs:
        result.best_epoch = result.history[-1]["epoch"]
    model.eval()
    return result


def _loss(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    if task == "classification":
        return F.cross_entropy(out, y)
    return F.mse_loss(out.reshape(y.shape), y)


@torch.no_grad()
def score(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent, or minus the mean squared error (higher is better either way)."""
    model.eval()
    outs = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    if task == "classification":
        return float((outs.argmax(1) == y).float().mean()) * 100
    return -float(F.mse_loss(outs.reshape(y.shape), y))


def labelled_arrays(data: Any, task: str, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) as tensors from a pair of arrays/tensors or an edgeq.Dataset with labels."""
    from edgeq.data import Dataset

    if isinstance(data, Dataset):
        chunks = list(data.chunks())
        if not chunks or any(c.labels is None for c in chunks):
            raise DataError(f"{what} ({data.description}) has no labels", "add a `labels` array (class ids or regression targets)")
        keys = list(chunks[0].inputs)
        if len(keys) != 1:
            raise ConfigError(f"QAT supports models with one input; {what} has {len(keys)} arrays", "give one input array plus labels")
        data = (np.concatenate([c.inputs[keys[0]] for c in chunks]), np.concatenate([c.labels for c in chunks]))
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise DataError(f"{what} must be (inputs, labels) or an edgeq.Dataset with labels", "pass a pair of arrays")
    x, y = (torch.as_tensor(np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v)) for v in data)
    if len(x) != len(y) or len(x) == 0:
        raise DataError(f"{what}: {len(x)} inputs and {len(y)} labels", "give one label per sample (and at least one sample)")
    x = x.float()
    if task == "classification":
        if y.is_floating_point() and not torch.equal(y, y.round()):
            raise DataError(f"{what}: classification needs class-id labels, got fractional values", "use task='regression' for float targets")
        y = y.long()
    else:
        y = y.float()
    return x, y

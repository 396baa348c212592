"""Per-layer sensitivity: the fidelity of the final outputs to FP32 when only one layer is quantized, and when only
one layer is left in float (everything else INT8). Ranked, most harmful layer first.

Fidelity is measured on the model's outputs, not on the layer's: a layer that is noisy but whose error the rest of
the network absorbs is not what breaks accuracy.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx

from edgeq.data import Dataset, batches
from edgeq.model import make_session
from edgeq.executors import Executor, InProcess, Shared
from edgeq.executors.worker import shared_arrays, shared_value
from edgeq.quantize.qdq import Prepared, quantize_qdq
from edgeq.sqnr import sqnr_db

SHARDS_PER_WORKER = 4   # layer groups per worker: a slow group does not leave the others idle at the end


@dataclass
class Fidelity:
    sqnr_db: float
    cosine: float


@dataclass
class LayerSensitivity:
    """One layer's two views; `rank` 1 is the layer whose INT8 form harms the outputs most."""

    node: str
    op_type: str
    only_quantized: Fidelity      # this layer INT8, the rest FP32
    only_float: Fidelity          # this layer FP32, the rest INT8
    rank: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def eval_inputs(prep: Prepared, data: Dataset, samples: int = 128) -> dict[str, np.ndarray]:
    """The first `samples` finite samples of `data` as one feed (fidelity needs only a representative few)."""
    parts: dict[str, list[np.ndarray]] = {}
    n = 0
    for batch in batches(data, prep.model.inputs, 64, refuse_nonfinite=True, max_samples=samples):
        for k, v in batch.inputs.items():
            parts.setdefault(k, []).append(v)
        n += batch.size
    return {k: np.concatenate(v) for k, v in parts.items()}


def outputs_of(proto: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    """The first output on `feed`, run in one go, or in runs of the model's batch when its batch dim is fixed (a
    batch-1 export took the whole 128-sample feed in one run and crashed `auto`)."""
    session = make_session(proto, threads=0)
    fixed = {dim for dim in (i.shape[0] if i.shape else None for i in session.get_inputs()) if isinstance(dim, int)}
    rows = len(next(iter(feed.values())))
    step = min(fixed) if len(fixed) == 1 and min(fixed) > 0 else rows
    parts = [session.run(None, {k: v[start:start + step] for k, v in feed.items()})[0] for start in range(0, rows, step)]
    return np.concatenate([np.asarray(p, dtype=np.float64) for p in parts])


def fidelity(reference: np.ndarray, y: np.ndarray) -> Fidelity:
    """SQNR (dB) over all outputs and the mean per-sample cosine similarity."""
    ref = reference.reshape(len(reference), -1)
    out = y.reshape(len(y), -1)
    noise = float(np.sum((ref - out) ** 2))
    signal = float(np.sum(ref ** 2))
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    cos = np.where(norms > 0, np.sum(ref * out, axis=1) / np.maximum(norms, 1e-30), 1.0)
    return Fidelity(round(sqnr_db(signal, noise), 3), round(float(np.mean(cos)), 6))


@dataclass(frozen=True)
class LayersTask:
    """Both views for some layers of one prepared graph: shared handles and names, for any executor."""

    name: str
    prep: Shared
    feed: Shared
    reference: Shared
    layers: tuple[str, ...]


def layer_views(task: LayersTask) -> list[tuple[str, Fidelity, Fidelity]]:
    """(layer, only it INT8, only it float) for each of the task's layers (runs in a worker)."""
    prep, feed = shared_value(task.prep), shared_arrays(task.feed)
    reference = shared_arrays(task.reference)["outputs"]
    return [(name, fidelity(reference, outputs_of(quantize_qdq(prep, only=[name]), feed)),
             fidelity(reference, outputs_of(quantize_qdq(prep, exclude=[name]), feed))) for name in task.layers]


def sensitivity(prep: Prepared, feed: dict[str, np.ndarray], layers: list[str] | None = None,
                executor: Executor | None = None) -> list[LayerSensitivity]:
    """Both views for every quantizable layer (2 quantizations and 2 runs per layer), ranked; the layers split
    over `executor`'s workers (this process without one), the graph and the samples shared once.

    Rank: by the output SQNR with only this layer quantized (lowest first), ties broken by the SQNR gained when
    only this layer stays float. NNCF and Intel Neural Compressor rank by the second view alone; the first one
    isolates a layer from the errors of the others, which is what tells a broken layer from a merely noisy one.
    """
    executor = executor or InProcess()
    reference = outputs_of(prep.model.proto, feed)
    names = layers or [l["name"] for l in prep.layers]
    ops = {l["name"]: l["op_type"] for l in prep.layers}
    # one task per layer in this process (a progress tick each); a few per worker elsewhere (the graph travels with them)
    count = len(names) if executor.workers == 1 else min(len(names), SHARDS_PER_WORKER * executor.workers)
    shared = executor.share(prep), executor.share_arrays(feed), executor.share_arrays({"outputs": reference})
    groups = [tuple(names[i::count]) for i in range(count)] if names else []
    tasks = [LayersTask(f"layers {', '.join(group)}"[:60], *shared, group) for group in groups]
    views = [view for part in executor.map(layer_views, tasks, "sensitivity: each layer alone INT8, alone float") for view in part]
    result = [LayerSensitivity(name, ops.get(name, "?"), alone, kept) for name, alone, kept in views]
    result.sort(key=lambda s: (s.only_quantized.sqnr_db, -s.only_float.sqnr_db, names.index(s.node)))
    for i, s in enumerate(result, 1):
        s.rank = i
    return result


def full_int8_fidelity(prep: Prepared, feed: dict[str, np.ndarray]) -> Fidelity:
    return fidelity(outputs_of(prep.model.proto, feed), outputs_of(quantize_qdq(prep), feed))

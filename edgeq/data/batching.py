"""Binding data to a model's inputs: re-batching to the batch size, and the checks on names, ranks, dtypes, fixed
dims, labels and NaN that make a mismatch one clear DataError instead of an ONNX Runtime failure."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from edgeq.data.batch import Batch, check_label_dtype
from edgeq.data.sources import Dataset
from edgeq.errors import ConfigError, DataError
from edgeq.model import TensorSpec


def batches(dataset: Dataset, specs: list[TensorSpec], batch_size: int = 32, *, refuse_nonfinite: bool = True,
            max_samples: int | None = None) -> Iterator[Batch]:
    """Stream checked, re-batched model feeds: every batch holds `batch_size` samples except the last, which holds
    the rest (never none); samples of different shapes (dynamic dims) never share a batch. Batch size follows a
    fixed batch dimension of the model.

    Raises DataError on names, ranks, dtypes or fixed dims that do not match the model, on empty data, and (when
    `refuse_nonfinite`) on NaN/Inf.
    """
    if max_samples is not None and max_samples < 1:
        raise DataError(f"max_samples is {max_samples}", "give at least 1, or leave it unset to use all samples")
    fixed_batch = fixed_batch_size(specs)
    batch_size = fixed_batch or batch_size
    if batch_size < 1:
        raise ConfigError(f"batch size {batch_size} is not a positive number of samples", "give a batch size of 1 or more")
    pending: list[Batch] = []
    pending_n = 0
    seen = 0
    for index, raw in enumerate(dataset.chunks()):
        chunk = conform(raw, specs, dataset.description, index)
        if refuse_nonfinite:
            _refuse_nonfinite(chunk, dataset.description)
        if chunk.size == 0:
            continue  # an empty file adds nothing, and an empty chunk left pending would be "taken" forever
        if max_samples is not None and seen + chunk.size > max_samples:
            chunk = _slice(chunk, 0, max_samples - seen)
        seen += chunk.size
        pending.append(chunk)
        pending_n += chunk.size
        while pending_n >= batch_size:
            out, pending, pending_n = _take(pending, batch_size)
            yield out
        if max_samples is not None and seen >= max_samples:
            break
    if seen == 0:
        raise DataError(f"{dataset.description} holds no samples", "give at least one sample")
    if pending_n:
        if fixed_batch is None:
            while pending:
                out, pending, pending_n = _take(pending, pending_n)
                yield out
        else:
            dataset.notes.append(f"dropped the last {pending_n} samples: the model's batch dimension is fixed at {batch_size}")


def fixed_batch_size(specs: list[TensorSpec]) -> int | None:
    """The batch size every input's first axis fixes, if one does (a positive dim shared by them all)."""
    fixed = {s.shape[0] for s in specs if s.rank and isinstance(s.shape[0], int) and s.shape[0] > 0}
    return fixed.pop() if len(fixed) == 1 else None


def conform(chunk: Batch, specs: list[TensorSpec], where: str, index: int = 0) -> Batch:
    """Map keys to input names and check rank, dtype and fixed dims; add the sample axis to single .npy samples."""
    arrays = _map_names(chunk.inputs, specs, where)
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        arr = arrays[spec.name]
        if chunk.unbatched:
            arr = np.asarray(arr)[None] if arr.ndim == spec.rank - 1 else np.asarray(arr)
        out[spec.name] = _conform_array(arr, spec, where)
    sizes = {len(a) for a in out.values()}
    if len(sizes) > 1:
        raise DataError(f"{where}: inputs disagree on the number of samples in chunk {index}", "give every input the same first dimension")
    n = sizes.pop()
    labels = chunk.labels
    if labels is not None:
        check_label_dtype(labels.dtype, where)
        if len(labels) != n:
            raise DataError(f"{where}: {len(labels)} labels for {n} samples", "give exactly one label per sample")
    return Batch(out, labels)


def _map_names(arrays: dict[str, np.ndarray], specs: list[TensorSpec], where: str) -> dict[str, np.ndarray]:
    names = [s.name for s in specs]
    if len(specs) == 1 and len(arrays) == 1:
        return {names[0]: next(iter(arrays.values()))}
    missing = [n for n in names if n not in arrays]
    if missing:
        raise DataError(f"{where}: no data for model input(s) {', '.join(missing)} (data keys: {', '.join(k or '<unnamed>' for k in arrays)})",
                        f"key the arrays by the model's input names: {', '.join(names)}")
    extra = [k for k in arrays if k not in names]
    if extra:
        raise DataError(f"{where}: data keys {', '.join(extra)} match no model input", f"the model's inputs are: {', '.join(names)}")
    return arrays


def _conform_array(arr: np.ndarray, spec: TensorSpec, where: str) -> np.ndarray:
    if arr.ndim != spec.rank:
        raise DataError(f"{where}: input {spec.name!r} has rank {arr.ndim} {tuple(arr.shape)}, the model expects rank {spec.rank} {_dims(spec)}",
                        "reshape the data to the model's input shape, sample axis first")
    for axis, (have, want) in enumerate(zip(arr.shape, spec.shape)):
        if axis > 0 and isinstance(want, int) and have != want:
            raise DataError(f"{where}: input {spec.name!r} has shape {tuple(arr.shape)}, the model expects {_dims(spec)} (axis {axis}: {have} ≠ {want})",
                            "resize or reshape the data to the model's input shape")
    return np.ascontiguousarray(_cast(arr, spec, where))


def _cast(arr: np.ndarray, spec: TensorSpec, where: str) -> np.ndarray:
    if arr.dtype == spec.dtype:
        return arr
    same_kind = (arr.dtype.kind == "f" and spec.dtype.kind == "f") or (arr.dtype.kind in "iu" and spec.dtype.kind in "iu")
    if not same_kind:
        raise DataError(f"{where}: input {spec.name!r} is {arr.dtype}, the model expects {spec.dtype}",
                        f"convert the data, e.g. array.astype(numpy.{spec.dtype})")
    if spec.dtype.kind in "iu":
        info = np.iinfo(spec.dtype)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise DataError(f"{where}: input {spec.name!r} holds values outside {spec.dtype}", "check the data")
    # Widening/narrowing within a kind (float64 -> float32, int32 -> int64) is what numpy users expect to work.
    with np.errstate(over="ignore"):  # numpy would warn on stderr; the check below says it in edgeq's one line
        out = arr.astype(spec.dtype)
    if spec.dtype.kind == "f" and np.isinf(out).sum() > np.isinf(arr).sum():
        raise DataError(f"{where}: input {spec.name!r} holds values beyond the range of {spec.dtype}", "check the data or rescale it")
    return out


def _dims(spec: TensorSpec) -> str:
    return "(" + ", ".join("?" if d is None or isinstance(d, str) else str(d) for d in spec.shape) + ")"


def _refuse_nonfinite(chunk: Batch, where: str) -> None:
    for name, arr in chunk.inputs.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise DataError(f"{where}: input {name!r} holds {bad} NaN/Inf values", "clean the data; calibration needs finite values")


def count_nonfinite(batch: Batch) -> int:
    return sum(int((~np.isfinite(a)).sum()) for a in batch.inputs.values() if a.dtype.kind == "f")


def _slice(chunk: Batch, start: int, stop: int) -> Batch:
    return Batch({k: v[start:stop] for k, v in chunk.inputs.items()}, None if chunk.labels is None else chunk.labels[start:stop])


def _take(pending: list[Batch], n: int) -> tuple[Batch, list[Batch], int]:
    """Concatenate the first n samples of the pending chunks; same-shape samples only (dynamic dims may differ)."""
    taken: list[Batch] = []
    need = n
    rest: list[Batch] = []
    for i, chunk in enumerate(pending):
        if need == 0:
            rest = pending[i:]
            break
        if taken and any(chunk.inputs[k].shape[1:] != taken[0].inputs[k].shape[1:] for k in chunk.inputs):
            # Different spatial sizes cannot share a batch: emit what we have.
            rest = pending[i:]
            break
        if chunk.size <= need:
            taken.append(chunk)
            need -= chunk.size
        else:
            taken.append(_slice(chunk, 0, need))
            rest = [_slice(chunk, need, chunk.size)] + pending[i + 1:]
            need = 0
            break
    inputs = {k: np.concatenate([c.inputs[k] for c in taken]) if len(taken) > 1 else taken[0].inputs[k] for k in taken[0].inputs}
    labels = None if any(c.labels is None for c in taken) else (np.concatenate([c.labels for c in taken]) if len(taken) > 1 else taken[0].labels)
    out = Batch(inputs, labels)
    return out, rest, sum(c.size for c in rest)

"""Channel groups of an output by range: fidelity per group, so small-range channels cannot hide behind large ones.

One cosine (or SQNR) over a whole tensor is dominated by its largest values: a head whose channels span 100× in
range, quantized with one step for the whole tensor, keeps the large channels and destroys the small ones while the
overall cosine stays above 0.99. So each output's channels are grouped by the order of magnitude of their FP32
range, and every group is scored on its own.

The rule: the channel axis is axis 1 (ONNX's N, C, ... layout; the features of an [N, D] vector), or the last axis
of an [N, sequence, features] output whose axis 1 is dynamic and last axis static (transformers). A channel's range
is its largest |value| in the reference's first batch. Channels within 10× of the widest channel form group 0, those
10×–100× below it group 1, and so on (one decade per group, so a group never mixes ranges more than 10× apart and
there are at most `DECADES` groups whatever the channel count). Channels 10^DECADES or more below the widest (silent
in FP32: MiniLM's hidden state has channels at 1e-32) are left out of the groups: no 8- or 16-bit format represents
them next to the widest channel, and their "fidelity" would be noise over nothing.

>>> ref = np.concatenate([np.full((2, 3), 50.0), np.full((2, 2), 0.2)], axis=1)
>>> [g.tolist() for g in range_groups(channel_ranges(ref, 1))]
[[0, 1, 2], [3, 4]]
"""
from __future__ import annotations

import numpy as np

from edgeq.model import TensorSpec

DECADES = 6


def channel_axis(values: np.ndarray, spec: TensorSpec | None) -> int | None:
    """The channel axis of an output with the sample axis first; None when it has no axis besides the samples."""
    if values.ndim < 2:
        return None
    if values.ndim == 3 and spec is not None and spec.rank == 3 and not isinstance(spec.shape[1], int) \
            and isinstance(spec.shape[2], int):
        return 2
    return 1


def channel_ranges(reference: np.ndarray, axis: int | None) -> np.ndarray | None:
    """Each channel's largest |value| (NaN/Inf as 0); None without a channel axis or for non-float values."""
    if axis is None or reference.dtype.kind != "f":
        return None
    moved = np.moveaxis(np.abs(np.nan_to_num(reference.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)), axis, 0)
    return moved.reshape(len(moved), -1).max(axis=1) if moved[0].size else np.zeros(len(moved))


def range_groups(ranges: np.ndarray | None) -> list[np.ndarray]:
    """Channel indices per decade of range below the widest channel (see the module's rule), widest first."""
    if ranges is None:
        return [np.arange(1)]
    widest = ranges.max() if len(ranges) else 0.0
    if widest == 0:
        return [np.arange(len(ranges))]
    with np.errstate(divide="ignore"):
        decade = np.floor(np.log10(widest / ranges))
    groups = [np.flatnonzero(decade == d) for d in range(DECADES)]
    return [g for g in groups if len(g)]


def group_closeness(y: np.ndarray, r: np.ndarray, axis: int | None, groups: list[np.ndarray],
                    failed: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Per group, per sample: cosine, signal energy and noise energy (NaN for failed samples)."""
    n = len(y)
    out = []
    for channels in groups:
        a = (y if axis is None else np.take(y, channels, axis=axis)).reshape(n, -1)
        b = (r if axis is None else np.take(r, channels, axis=axis)).reshape(n, -1)
        a = np.nan_to_num(a.astype(np.float64))
        b = np.nan_to_num(b.astype(np.float64))
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        both_zero = ~a.any(axis=1) & ~b.any(axis=1)
        cosine = np.where(norms > 0, np.einsum("ij,ij->i", a, b) / np.where(norms > 0, norms, 1), np.where(both_zero, 1.0, 0.0))
        out.append({"cosine": np.where(failed, 0.0, np.clip(cosine, -1.0, 1.0)),
                    "signal": np.where(failed, np.nan, (b ** 2).sum(axis=1)),
                    "noise": np.where(failed, np.nan, ((a - b) ** 2).sum(axis=1))})
    return out


def describe_channels(channels: np.ndarray) -> str:
    """Channel indices as compact runs: 0-5,9,12-13.

    >>> describe_channels(np.array([0, 1, 2, 5, 7, 8]))
    '0-2,5,7-8'
    """
    runs: list[str] = []
    start = prev = None
    for c in [int(v) for v in channels] + [None]:
        if start is not None and (c is None or c != prev + 1):
            runs.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if c is not None and start is None:
            start = c
        prev = c
    return ",".join(runs)

"""Sizes checked before allocating: random benchmark inputs must fit in the memory available now."""
from __future__ import annotations

import math
import os

import numpy as np

from edgeq.errors import ConfigError
from edgeq.model import TensorSpec


def check_feed_size(specs: list[TensorSpec], shapes: dict[str, tuple[int, ...]], model_label: str) -> None:
    """Refuse, before allocating, random inputs larger than half the memory available now (the model's own
    buffers need the rest); dims such as 2**62 would otherwise end in MemoryError or numpy's "array is too big"."""
    need = {s.name: _feed_bytes(s, shapes[s.name]) for s in specs}
    limit = available_memory() // 2
    if sum(need.values()) > limit:
        biggest = max(need, key=need.__getitem__)
        raise ConfigError(f"random inputs for {model_label} would need {_gib(sum(need.values()))} GiB ({biggest}: "
                          f"{next(s for s in specs if s.name == biggest).dtype}[{','.join(map(str, shapes[biggest]))}]); "
                          f"edgeq allocates at most half the available memory, {_gib(limit)} GiB",
                          "give smaller dims with --shape or a smaller --batch, or feed real inputs with --data")


def _feed_bytes(spec: TensorSpec, shape: tuple[int, ...]) -> int:
    """Peak bytes of one random input as edgeq.bench draws it: floats are drawn as float32 and integers as int64, then cast."""
    drawn = {"f": np.dtype(np.float32), "i": np.dtype(np.int64), "u": np.dtype(np.int64)}.get(spec.dtype.kind, spec.dtype)
    return math.prod(shape) * (spec.dtype.itemsize + (drawn.itemsize if drawn != spec.dtype else 0))


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable on Linux, physical memory elsewhere)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g}"

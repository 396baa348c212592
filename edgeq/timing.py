"""In-process timing and the random inputs it runs on: the median latency of one feed, several models timed in
interleaved rounds (`Speedup` pairs them by round). `edgeq.bench` measures each model in a worker process of its
own; the quantizers (dynamic Conv's slowdown, measured coverage) time models here, below the benchmark.

>>> Speedup.of([2.0, 4.0, 3.0], [1.0, 2.0, 1.0]).median
2.0
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from edgeq.errors import ConfigError
from edgeq.limits import check_feed_size
from edgeq.model import TensorSpec

# Integer inputs are usually token ids or indices: small non-negative values are valid for almost any vocabulary.
RANDOM_INT_HIGH = 100
RANDOM_SEED = 0


class FeedShape(Protocol):
    """What a random feed is shaped by (`edgeq.bench.BenchConfig` is one): the batch and shapes for dynamic dims."""

    batch: int
    shapes: dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class BatchShape:
    """A `FeedShape` of its own, for callers without a benchmark config."""

    batch: int = 1
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Speedup:
    """Baseline latency / this model's latency, per round; `median` is the figure, `low`–`high` the middle half."""

    median: float
    low: float
    high: float

    @property
    def relative_spread(self) -> float:
        return (self.high - self.low) / self.median

    @classmethod
    def of(cls, base_round_ms: Sequence[float], round_ms: Sequence[float]) -> "Speedup":
        ratios = np.asarray(base_round_ms, dtype=np.float64) / np.asarray(round_ms, dtype=np.float64)
        low, median, high = np.percentile(ratios, [25, 50, 75])
        return cls(float(median), float(low), float(high))


def median_ms(proto, feed: dict[str, np.ndarray], runs: int, threads: int = 1) -> float:
    """In-process median latency of one feed after one warm-up run: a quick ratio between models (the benchmark
    proper, `benchmark`, runs each model in its own worker process)."""
    from edgeq.runtimes import ONNX_RUNTIME

    session = ONNX_RUNTIME.open_graph(proto, threads=threads)
    session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1000


def interleaved_round_ms(protos: Sequence, feed: dict[str, np.ndarray], threads: int, rounds: int, runs_per_round: int) -> list[list[float]]:
    """In-process interleaved timing of several models on one feed: per model, the median of each round's burst
    (order rotating by round, one untimed run before each burst). Pair them with `Speedup.of`."""
    from edgeq.runtimes import ONNX_RUNTIME

    sessions = [ONNX_RUNTIME.open_graph(p, threads=threads, spinning=False) for p in protos]
    for session in sessions:
        session.run(None, feed)
    found: list[list[float]] = [[] for _ in sessions]
    for r in range(rounds):
        for k in range(len(sessions)):
            i = (r + k) % len(sessions)
            sessions[i].run(None, feed)
            times = []
            for _ in range(runs_per_round):
                begin = time.perf_counter_ns()
                sessions[i].run(None, feed)
                times.append(time.perf_counter_ns() - begin)
            found[i].append(float(np.median(times)) / 1e6)
    return found


def random_feed(specs: list[TensorSpec], config: FeedShape, model_label: str = "the model") -> dict[str, np.ndarray]:
    """Random inputs shaped by the specs: N(0, 1) floats, integers in [0, 100) (token ids), False for booleans.

    Dynamic dims: axis 0 is the batch (`config.batch`); others come from `config.shapes`, or it is a ConfigError.

    >>> from edgeq.model import TensorSpec
    >>> from edgeq.bench import BenchConfig
    >>> feed = random_feed([TensorSpec("x", np.dtype("float32"), ("N", 3, 8, 8))], BenchConfig(batch=2))
    >>> feed["x"].shape, feed["x"].dtype
    ((2, 3, 8, 8), dtype('float32'))
    """
    unknown_names = sorted(set(config.shapes) - {s.name for s in specs})
    if unknown_names:
        raise ConfigError(f"--shape names {', '.join(map(repr, unknown_names))}: not an input of {model_label}",
                          f"its inputs are: {', '.join(s.describe() for s in specs)}")
    shapes = _input_shapes(specs, config, model_label)
    check_feed_size(specs, shapes, model_label)
    rng = np.random.default_rng(RANDOM_SEED)
    return {spec.name: _random_array(spec, shapes[spec.name], rng, model_label) for spec in specs}


def _input_shapes(specs: list[TensorSpec], config: FeedShape, model_label: str) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    missing: list[str] = []
    for spec in specs:
        if spec.name in config.shapes:
            shapes[spec.name] = _given_shape(spec, config.shapes[spec.name], model_label)
            continue
        dims = [d if is_fixed_dim(d) else (config.batch if axis == 0 else None) for axis, d in enumerate(spec.shape)]
        if any(d is None for d in dims):
            example = ",".join(str(d) if d is not None else f"<{_dim_label(spec.shape[a], a)}>" for a, d in enumerate(dims))
            missing.append(f"{spec.name}={example}")
        else:
            shapes[spec.name] = tuple(dims)
    if missing:
        names = ", ".join(repr(m.split("=")[0]) for m in missing)
        raise ConfigError(f"input(s) {names} of {model_label} have dynamic dims edgeq cannot guess",
                          "pass the full shape with numbers, e.g. " + " ".join(f"--shape {m}" for m in missing) + ", or feed real inputs with --data")
    return shapes


def is_fixed_dim(dim: int | str | None) -> bool:
    return isinstance(dim, int) and dim >= 0


def _dim_label(dim: int | str | None, axis: int) -> str:
    return dim if isinstance(dim, str) and dim else f"axis{axis}"


def _given_shape(spec: TensorSpec, shape: tuple[int, ...], model_label: str) -> tuple[int, ...]:
    if len(shape) != spec.rank:
        raise ConfigError(f"--shape {spec.name}={','.join(map(str, shape))} has rank {len(shape)}; input {spec.describe()} of {model_label} has rank {spec.rank}",
                          "give one number per dim")
    for axis, (given, want) in enumerate(zip(shape, spec.shape)):
        if is_fixed_dim(want) and given != want:
            raise ConfigError(f"--shape {spec.name}: axis {axis} is {given}, but {model_label} fixes it at {want} ({spec.describe()})",
                              f"use {want} for axis {axis}")
    return shape


def _random_array(spec: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator, model_label: str) -> np.ndarray:
    kind = spec.dtype.kind
    if kind == "f":
        return rng.standard_normal(shape, dtype=np.float32).astype(spec.dtype, copy=False)
    if kind in "iu":
        return rng.integers(0, RANDOM_INT_HIGH, size=shape).astype(spec.dtype)
    if kind == "b":
        return np.zeros(shape, dtype=bool)
    raise ConfigError(f"input {spec.describe()} of {model_label} has a type edgeq cannot fill with random values",
                      "feed real inputs with --data")

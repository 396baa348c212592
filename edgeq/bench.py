"""Benchmark models in their runtime (ONNX Runtime, LiteRT for `.tflite`: `edgeq.runtimes`): file size, latency
percentiles, throughput and peak memory.

Every model is measured in a fresh Python process (a "worker"), so the memory one model leaves behind, and the
memory of the calling process, never count against another model. The workers take turns in rounds
(`edgeq.rounds`), so background load lands on every model alike; a UserError raised inside a worker (a bad model,
data that does not fit) is raised again here with the same text.

>>> import edgeq.bench as bench
>>> records = bench.benchmark(["model.onnx", "model_int8.onnx"], threads=1, runs=50)   # doctest: +SKIP
>>> records[1].latency_ms.p50, records[1].size_bytes                                  # doctest: +SKIP
(0.41, 1203345)
"""
from __future__ import annotations

import dataclasses
import gc
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeq import formats
from edgeq.bench_table import bench_table  # noqa: F401 - the table renders these records; importable from here
from edgeq.errors import ConfigError, DataError, ModelError
from edgeq.memory import peak_rss_kib, reset_peak, rss_kib
from edgeq.model import Model, TensorSpec, save
from edgeq.timing import is_fixed_dim, random_feed



# ----- configuration ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchConfig:
    """How to measure: threads, timed and untimed runs, rounds, batch size, shapes for dynamic dims, and the feed.

    The `runs` are split into `rounds`; in each round every model runs its share in turn (`edgeq.rounds`).

    >>> BenchConfig(threads=2, runs=20).to_dict()["runs"]
    20
    >>> BenchConfig(runs=0)
    Traceback (most recent call last):
    edgeq.errors.ConfigError: runs must be at least 1 (got 0) — pass --runs 1 or more
    """

    threads: int = 1
    runs: int = 50
    warmup: int = 5
    batch: int = 1
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    data: Path | None = None
    preset: str = "raw"
    rounds: int = 10

    def __post_init__(self) -> None:
        _require_int("threads", self.threads, 1, "--threads")
        _require_int("runs", self.runs, 1, "--runs")
        _require_int("rounds", self.rounds, 1, "--rounds")
        _require_int("warmup", self.warmup, 0, "--warmup")
        _require_int("batch", self.batch, 1, "--batch")
        # Copies, so the frozen config cannot change through a dict the caller still holds.
        object.__setattr__(self, "shapes", {str(k): _checked_shape(k, v) for k, v in dict(self.shapes).items()})
        object.__setattr__(self, "data", None if self.data is None else Path(self.data))
        _check_preset(self.preset)

    def to_dict(self) -> dict[str, Any]:
        return {"threads": self.threads, "runs": self.runs, "warmup": self.warmup, "batch": self.batch,
                "shapes": {k: list(v) for k, v in self.shapes.items()},
                "data": None if self.data is None else str(self.data), "preset": self.preset, "rounds": self.rounds}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BenchConfig":
        return cls(threads=d["threads"], runs=d["runs"], warmup=d["warmup"], batch=d["batch"],
                   shapes={k: tuple(v) for k, v in d.get("shapes", {}).items()}, data=d.get("data"), preset=d.get("preset", "raw"),
                   rounds=d.get("rounds", cls.rounds))


def _require_int(name: str, value: Any, minimum: int, flag: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be at least {minimum} (got {value!r})", f"pass {flag} {minimum} or more")


def _checked_shape(name: str, dims: Any) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in dims)
    except (TypeError, ValueError):
        raise ConfigError(f"shape of input {name!r} must be a sequence of integers (got {dims!r})", f"e.g. --shape {name}=1,3,224,224") from None
    if not shape or any(d < 1 for d in shape):
        raise ConfigError(f"shape of input {name!r} needs positive dims (got {dims!r})", f"e.g. --shape {name}=1,3,224,224")
    return shape


def _check_preset(preset: str) -> None:
    from edgeq.data import PRESETS

    if preset not in PRESETS:
        raise ConfigError(f"unknown image preset {preset!r}", f"use one of: {', '.join(sorted(PRESETS))}")


def parse_shapes(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parse `--shape NAME=D0,D1,...` options into {name: dims}; the last '=' splits, so names may hold '='.

    >>> parse_shapes(["x=1,3,736,992", "ids=1, 128"])
    {'x': (1, 3, 736, 992), 'ids': (1, 128)}
    >>> parse_shapes(["x:1,3"])
    Traceback (most recent call last):
    edgeq.errors.ConfigError: --shape 'x:1,3' is not NAME=DIMS — write it as INPUT=D0,D1,..., e.g. --shape x=1,3,736,992
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = str(item).rpartition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"--shape {item!r} is not NAME=DIMS", "write it as INPUT=D0,D1,..., e.g. --shape x=1,3,736,992")
        parts = [p.strip() for p in dims.split(",")]
        if not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ConfigError(f"--shape {item!r}: dims must be positive integers separated by commas", f"e.g. --shape {name}=1,3,736,992")
        if name in shapes:
            raise ConfigError(f"--shape gives input {name!r} twice", "give each input's shape once")
        shapes[name] = tuple(int(p) for p in parts)
    return shapes


# ----- records ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Latency:
    """Latency statistics of the timed runs, in milliseconds."""

    p50: float
    p90: float
    p99: float
    mean: float
    min: float
    max: float

    @classmethod
    def of(cls, times_ms: np.ndarray) -> "Latency":
        # Linear interpolation keeps p50 <= p90 <= p99 even for a handful of runs.
        p50, p90, p99 = np.percentile(times_ms, [50, 90, 99])
        return cls(float(p50), float(p90), float(p99), float(times_ms.mean()), float(times_ms.min()), float(times_ms.max()))


@dataclass
class BenchRecord:
    """What one model measured: size on disk, latency, throughput, memory, and the conditions of the measurement.

    `size_bytes` counts the model file and every external data file it references. `peak_rss_mb` is the worker's
    peak resident memory; `model_rss_mb` is how far it rose above the worker's memory after its imports, i.e. what
    the session, its weights, the inputs and the runs cost.
    """

    path: str
    name: str
    size_bytes: int
    files: list[str]
    threads: int
    batch: int
    runs: int
    warmup: int
    latency_ms: Latency
    throughput: float  # samples per second: batch / mean latency
    peak_rss_mb: float
    model_rss_mb: float
    input_shapes: dict[str, list[int]]
    feed: str  # "random" or the DATA path
    onnxruntime: str
    runtime: str = ""  # the runtime that ran the model and its version: "ONNX Runtime 1.22.0", "LiteRT 2.3.0"
    times_ms: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    round_p50_ms: list[float] = field(default_factory=list)  # median of each round's burst, in round order

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BenchRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        values["latency_ms"] = Latency(**d["latency_ms"])
        return cls(**values)


# ----- the parent side: one worker process per model -------------------------------------------------------

def benchmark(models: Sequence[str | Path | Model] | str | Path | Model, config: BenchConfig | None = None,
              **options: Any) -> list[BenchRecord]:
    """Measure each model in its own fresh process; the first model is the baseline of the table. An in-memory
    `Model` (e.g. from `edgeq.from_torch`) is saved to a temporary folder for its worker and removed afterwards.

    `options` are BenchConfig fields, for calls without a config object.

    >>> records = benchmark(["model.onnx", "model_int8.onnx"], threads=1, runs=20)      # doctest: +SKIP
    >>> [round(r.latency_ms.p50, 2) for r in records]                                   # doctest: +SKIP
    [1.93, 0.71]
    """
    config = _config(config, options)
    models = [models] if isinstance(models, (str, Path, Model)) else list(models)
    if not models:
        raise ConfigError("no models to benchmark", "give one or more .onnx files")
    # Cheap checks first: a typo in the last of several models should not cost the runs of the others.
    for model in models:
        if not isinstance(model, Model):
            _check_model_path(Path(model))
    if config.data is not None and not config.data.exists():
        raise DataError(f"data not found: {config.data}", "check the path")
    from edgeq.rounds import run_interleaved

    with tempfile.TemporaryDirectory(prefix="edgeq-bench-") as tmp:
        paths = [_saved(m, Path(tmp) / str(i)) if isinstance(m, Model) else Path(m) for i, m in enumerate(models)]
        return run_interleaved(paths, config, _WORKER_CODE, _worker_env())


def _saved(model: Model, folder: Path) -> Path:
    """An in-memory model written for its worker (its own proto, whatever path it carries), named as the model."""
    folder.mkdir()
    return save(model.proto, folder / f"{model.name}.onnx")


def _config(config: BenchConfig | None, options: dict[str, Any]) -> BenchConfig:
    if config is None:
        return BenchConfig(**options)
    return dataclasses.replace(config, **options) if options else config


def _check_model_path(path: Path) -> None:
    # Same wording as edgeq.model.load, which the worker runs for everything else.
    if not path.exists():
        raise ModelError(f"model file not found: {path}", "check the path")
    if path.is_dir():
        formats.refuse_foreign(path)
        raise ModelError(f"{path} is a folder, not an ONNX model file", "give the path of the .onnx file")


_WORKER_CODE = "import sys; from edgeq.rounds import worker_main; sys.exit(worker_main(sys.argv[1:]))"


def _worker_env() -> dict[str, str]:
    # The worker must import this same edgeq, also when it runs from a source tree that is not installed.
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# ----- the worker side: load, feed, time, measure memory ---------------------------------------------------

@dataclass
class Running:
    """A loaded, warmed-up model in this process, timed in bursts; `finish` turns it into a record."""

    path: Path
    config: BenchConfig
    specs: list[TensorSpec]
    feed: dict[str, np.ndarray]
    feed_label: str
    notes: list[str]
    session: Any
    base_kib: float
    runtime: str = ""
    times_ms: list[np.ndarray] = field(default_factory=list)

    def time(self, count: int) -> np.ndarray:
        """`count` timed runs, milliseconds each (also kept for the record)."""
        times = _time_runs(self.session, self.feed, count, self.path)
        self.times_ms.append(times)
        return times

    def rewarm(self) -> None:
        _time_runs(self.session, self.feed, 1, self.path)


def start(path: str | Path, config: BenchConfig) -> Running:
    """Load and check the model, build the feed, open the session and run the warm-up."""
    from edgeq.runtimes import runtime_for

    path = Path(path)
    base_kib = rss_kib()
    runtime = runtime_for(path)
    model = runtime.load(path)
    specs, feed, feed_label, notes = _prepare(model, path, config)
    # The peak should show what the runtime needs, not edgeq's own validating load of the model, which is freed
    # (a LiteRT model, small, is kept: it holds the layout the feed follows).
    keep = model if hasattr(model, "follow") else None
    del model
    gc.collect()
    reset_peak()
    session = runtime.open(path, config.threads, spinning=False, model=keep)
    running = Running(path, config, specs, feed, feed_label, notes, session, base_kib, runtime=f"{runtime.label} {runtime.version()}")
    if config.warmup:
        _time_runs(running.session, feed, config.warmup, path)
    return running


def finish(running: Running) -> BenchRecord:
    """The record of every timed run so far, with the peak memory, and the session closed."""
    import onnxruntime as ort

    peak_kib = peak_rss_kib()
    running.session = None
    times_ms = np.concatenate(running.times_ms)
    batch = _batch_of(running.feed, running.specs)
    size, files = model_size(running.path)
    latency = Latency.of(times_ms)
    config = running.config
    return BenchRecord(
        path=str(running.path), name=running.path.stem, size_bytes=size, files=files, threads=config.threads, batch=batch,
        runs=len(times_ms), warmup=config.warmup, latency_ms=latency, throughput=batch / (latency.mean / 1000.0),
        peak_rss_mb=peak_kib / 1024.0, model_rss_mb=max(peak_kib - running.base_kib, 0) / 1024.0,
        input_shapes={k: list(v.shape) for k, v in running.feed.items()}, feed=running.feed_label,
        onnxruntime=ort.__version__, runtime=running.runtime, times_ms=[float(t) for t in times_ms], notes=running.notes)


def measure(path: str | Path, config: BenchConfig) -> BenchRecord:
    """Measure one model in this process, all runs in one go. `benchmark` runs workers in rounds; call this
    directly only for tests or when memory figures do not matter (they include whatever this process holds).

    >>> measure("model.onnx", BenchConfig(runs=10)).latency_ms.p50          # doctest: +SKIP
    0.52
    """
    running = start(path, config)
    running.time(config.runs)
    return finish(running)


def _prepare(model, path: Path, config: BenchConfig) -> tuple[list[TensorSpec], dict[str, np.ndarray], str, list[str]]:
    """The loaded model's input specs and the feed: the first batch of the data, or random inputs."""
    notes: list[str] = []
    fixed = getattr(model, "fixed_batch", None)
    if fixed and fixed != config.batch:  # LiteRT pads or splits other batches: timing them would time another
        notes.append(f"batch {fixed}: the model's batch dim is fixed at {fixed}")
        config = dataclasses.replace(config, batch=fixed)
    if config.data is not None:
        follow = getattr(model, "follow", None)
        if follow is not None:  # a runtime whose layout may differ from the data's (LiteRT's NHWC) takes the data's
            from edgeq.data import open_data

            first = next(open_data(config.data, config.preset).chunks())
            follow({k: (None, *np.shape(v)[1:]) for k, v in first.inputs.items()})
        feed = data_feed(model.inputs, config, notes)
        label = str(config.data)
        if config.shapes:
            notes.append("--shape was not used: the inputs come from the data")
    else:
        feed = random_feed(model.inputs, config, path.name)
        label = "random"
    notes += getattr(model, "notes", [])
    return model.inputs, feed, label, notes


def data_feed(specs: list[TensorSpec], config: BenchConfig, notes: list[str] | None = None) -> dict[str, np.ndarray]:
    """The first batch of `config.data`, checked against the model's inputs (DataError when it does not fit)."""
    from edgeq.data import batches, open_data

    dataset = open_data(config.data, config.preset)
    first = next(batches(dataset, specs, config.batch))
    # Copies: the feed must not keep the whole data set alive through views.
    feed = {k: np.array(v, copy=True) for k, v in first.inputs.items()}
    batch_fixed = any(s.rank and is_fixed_dim(s.shape[0]) for s in specs)
    if notes is not None and not batch_fixed and first.size < config.batch:
        notes.append(f"the data holds {first.size} samples, so batches have {first.size}, not {config.batch}")
    return feed


def _batch_of(feed: dict[str, np.ndarray], specs: list[TensorSpec]) -> int:
    """Samples per run: the leading dim of the first input that has one (a scalar-only model runs one sample)."""
    for spec in specs:
        arr = feed[spec.name]
        if arr.ndim:
            return int(arr.shape[0])
    return 1


def _time_runs(session, feed: dict[str, np.ndarray], count: int, path: Path) -> np.ndarray:
    """`count` timed runs; returns milliseconds per run."""
    try:
        times = np.empty(count, dtype=np.int64)
        for i in range(count):
            begin = time.perf_counter_ns()
            session.run(None, feed)
            times[i] = time.perf_counter_ns() - begin
    except Exception as exc:  # noqa: BLE001 - a run failure is almost always inputs that do not fit the model
        shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feed.items())
        if isinstance(exc, ModelError):
            raise
        raise ModelError(f"ONNX Runtime failed to run {path} on inputs {shapes}: {_first_line(exc)}",
                         "check that --shape/--data match the model's inputs") from None
    return times / 1e6


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def model_size(path: str | Path) -> tuple[int, list[str]]:
    """Bytes on disk of a model file plus the external data files it references, and the files counted.

    >>> model_size("model.onnx")            # doctest: +SKIP
    (1203345, ['model.onnx'])
    """
    from edgeq.runtimes import runtime_for

    files = runtime_for(path).files(Path(path))
    return sum(f.stat().st_size for f in files), [str(f) for f in files]

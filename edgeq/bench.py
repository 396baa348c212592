"""Benchmark ONNX models on ONNX Runtime: file size, latency percentiles, throughput and peak memory.

Every model is measured in a fresh Python process (a "worker"), so the memory one model leaves behind, and the
memory of the calling process, never count against another model. The worker reports back through a small JSON
file; a UserError raised inside it (a bad model, data that does not fit) is raised again here with the same text.

>>> import edgeq.bench as bench
>>> records = bench.benchmark(["model.onnx", "model_int8.onnx"], threads=1, runs=50)   # doctest: +SKIP
>>> records[1].latency_ms.p50, records[1].size_bytes                                  # doctest: +SKIP
(0.41, 1203345)
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeq import errors, formats
from edgeq.errors import ConfigError, DataError, ModelError, UserError
from edgeq.limits import check_feed_size
from edgeq.model import TensorSpec
from edgeq.progress import track

# Integer inputs are usually token ids or indices: small non-negative values are valid for almost any vocabulary.
RANDOM_INT_HIGH = 100
RANDOM_SEED = 0


# ----- configuration ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchConfig:
    """How to measure: threads, timed and untimed runs, batch size, shapes for dynamic dims, and the feed.

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

    def __post_init__(self) -> None:
        _require_int("threads", self.threads, 1, "--threads")
        _require_int("runs", self.runs, 1, "--runs")
        _require_int("warmup", self.warmup, 0, "--warmup")
        _require_int("batch", self.batch, 1, "--batch")
        # Copies, so the frozen config cannot change through a dict the caller still holds.
        object.__setattr__(self, "shapes", {str(k): _checked_shape(k, v) for k, v in dict(self.shapes).items()})
        object.__setattr__(self, "data", None if self.data is None else Path(self.data))
        _check_preset(self.preset)

    def to_dict(self) -> dict[str, Any]:
        return {"threads": self.threads, "runs": self.runs, "warmup": self.warmup, "batch": self.batch,
                "shapes": {k: list(v) for k, v in self.shapes.items()},
                "data": None if self.data is None else str(self.data), "preset": self.preset}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BenchConfig":
        return cls(threads=d["threads"], runs=d["runs"], warmup=d["warmup"], batch=d["batch"],
                   shapes={k: tuple(v) for k, v in d.get("shapes", {}).items()}, data=d.get("data"), preset=d.get("preset", "raw"))


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
    times_ms: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BenchRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        values["latency_ms"] = Latency(**d["latency_ms"])
        return cls(**values)


# ----- the parent side: one worker process per model -------------------------------------------------------

def benchmark(paths: Sequence[str | Path] | str | Path, config: BenchConfig | None = None, **options: Any) -> list[BenchRecord]:
    """Measure each model in its own fresh process; the first model is the baseline of the table.

    `options` are BenchConfig fields, for calls without a config object.

    >>> records = benchmark(["model.onnx", "model_int8.onnx"], threads=1, runs=20)      # doctest: +SKIP
    >>> [round(r.latency_ms.p50, 2) for r in records]                                   # doctest: +SKIP
    [1.93, 0.71]
    """
    config = _config(config, options)
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not paths:
        raise ConfigError("no models to benchmark", "give one or more .onnx files")
    # Cheap checks first: a typo in the last of several models should not cost the runs of the others.
    for path in paths:
        _check_model_path(path)
    if config.data is not None and not config.data.exists():
        raise DataError(f"data not found: {config.data}", "check the path")
    return [_run_worker(path, config) for path in track(paths, "benchmarking", total=len(paths))]


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


_WORKER_CODE = "import sys; from edgeq.bench import _worker_main; sys.exit(_worker_main(sys.argv[1:]))"


def _run_worker(path: Path, config: BenchConfig) -> BenchRecord:
    """Run one measurement in a fresh interpreter and turn its answer back into a record or an error."""
    with tempfile.TemporaryDirectory(prefix="edgeq-bench-") as tmp:
        result_file = Path(tmp) / "result.json"
        request = json.dumps({"path": str(path), "config": config.to_dict(), "result": str(result_file)})
        proc = subprocess.run([sys.executable, "-c", _WORKER_CODE, request], env=_worker_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
        if not result_file.exists():
            _raise_worker_death(path, proc)
        answer = json.loads(result_file.read_text())
    if "error" in answer:
        err = answer["error"]
        cls = getattr(errors, err["type"], UserError)
        cls = cls if isinstance(cls, type) and issubclass(cls, UserError) else UserError
        raise cls(err["what"], err["fix"])
    if "bug" in answer:
        raise RuntimeError(f"benchmark worker failed on {path}: {answer['bug']}")
    return BenchRecord.from_dict(answer["record"])


def _worker_env() -> dict[str, str]:
    # The worker must import this same edgeq, also when it runs from a source tree that is not installed.
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _raise_worker_death(path: Path, proc: subprocess.CompletedProcess) -> None:
    last = next((line.strip() for line in reversed(proc.stderr.splitlines()) if line.strip()), "no message")
    if proc.returncode < 0:
        # Killed by a signal: most often the kernel's out-of-memory killer or a crash inside ONNX Runtime.
        raise ModelError(f"the process measuring {path} was killed by signal {-proc.returncode} ({last[:200]})",
                         "if memory ran out, close other programs or use a smaller --batch; otherwise check the model in ONNX Runtime")
    raise RuntimeError(f"benchmark worker for {path} exited with code {proc.returncode}: {last[:300]}")


# ----- the worker side: load, feed, time, measure memory ---------------------------------------------------

def _worker_main(argv: list[str]) -> int:
    """Entry point of the worker process: measure one model and write the answer as JSON."""
    request = json.loads(argv[0])
    try:
        record = measure(Path(request["path"]), BenchConfig.from_dict(request["config"]))
        answer: dict[str, Any] = {"record": record.to_dict()}
    except UserError as exc:
        answer = {"error": {"type": type(exc).__name__, "what": exc.what, "fix": exc.fix}}
    except Exception as exc:  # noqa: BLE001 - reported to the parent as a bug, with the traceback on stderr
        traceback.print_exc()
        answer = {"bug": f"{type(exc).__name__}: {exc}"}
    Path(request["result"]).write_text(json.dumps(answer))
    return 0


def measure(path: str | Path, config: BenchConfig) -> BenchRecord:
    """Measure one model in this process. `benchmark` calls it in a fresh worker; call it directly only for tests
    or when memory figures do not matter (they include whatever this process already holds).

    >>> measure("model.onnx", BenchConfig(runs=10)).latency_ms.p50          # doctest: +SKIP
    0.52
    """
    import onnxruntime as ort

    from edgeq.model import make_session

    path = Path(path)
    base_kib = _rss_kib()
    specs, feed, feed_label, notes = _prepare(path, config)
    # The peak should show what ONNX Runtime needs, not edgeq's own validating load of the model, which is freed.
    _reset_peak()
    session = _session(make_session, path, config.threads)
    times_ms = _time_runs(session, feed, config, path)
    peak_kib = _peak_rss_kib()
    del session
    batch = _batch_of(feed, specs)
    size, files = model_size(path)
    latency = Latency.of(times_ms)
    return BenchRecord(
        path=str(path), name=path.stem, size_bytes=size, files=files, threads=config.threads, batch=batch,
        runs=config.runs, warmup=config.warmup, latency_ms=latency, throughput=batch / (latency.mean / 1000.0),
        peak_rss_mb=peak_kib / 1024.0, model_rss_mb=max(peak_kib - base_kib, 0) / 1024.0,
        input_shapes={k: list(v.shape) for k, v in feed.items()}, feed=feed_label, onnxruntime=ort.__version__,
        times_ms=[float(t) for t in times_ms], notes=notes)


def _prepare(path: Path, config: BenchConfig) -> tuple[list[TensorSpec], dict[str, np.ndarray], str, list[str]]:
    """Load and check the model (usual ModelErrors), read its input specs, build the feed, free the model."""
    from edgeq.model import load

    model = load(path)
    specs = model.inputs
    del model
    notes: list[str] = []
    if config.data is not None:
        feed = data_feed(specs, config, notes)
        label = str(config.data)
        if config.shapes:
            notes.append("--shape was not used: the inputs come from the data")
    else:
        feed = random_feed(specs, config, path.name)
        label = "random"
    gc.collect()
    return specs, feed, label, notes


def data_feed(specs: list[TensorSpec], config: BenchConfig, notes: list[str] | None = None) -> dict[str, np.ndarray]:
    """The first batch of `config.data`, checked against the model's inputs (DataError when it does not fit)."""
    from edgeq.data import batches, open_data

    dataset = open_data(config.data, config.preset)
    first = next(batches(dataset, specs, config.batch))
    # Copies: the feed must not keep the whole data set alive through views.
    feed = {k: np.array(v, copy=True) for k, v in first.inputs.items()}
    batch_fixed = any(s.rank and _is_fixed(s.shape[0]) for s in specs)
    if notes is not None and not batch_fixed and first.size < config.batch:
        notes.append(f"the data holds {first.size} samples, so batches have {first.size}, not {config.batch}")
    return feed


def median_ms(proto, feed: dict[str, np.ndarray], runs: int, threads: int = 1) -> float:
    """In-process median latency of one feed after one warm-up run: a quick ratio between models (the benchmark
    proper, `benchmark`, runs each model in its own worker process)."""
    from edgeq.model import make_session

    session = make_session(proto, threads=threads)
    session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1000


def random_feed(specs: list[TensorSpec], config: BenchConfig, model_label: str = "the model") -> dict[str, np.ndarray]:
    """Random inputs shaped by the specs: N(0, 1) floats, integers in [0, 100) (token ids), False for booleans.

    Dynamic dims: axis 0 is the batch (`config.batch`); others come from `config.shapes`, or it is a ConfigError.

    >>> from edgeq.limits import check_feed_size
from edgeq.model import TensorSpec
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


def _input_shapes(specs: list[TensorSpec], config: BenchConfig, model_label: str) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    missing: list[str] = []
    for spec in specs:
        if spec.name in config.shapes:
            shapes[spec.name] = _given_shape(spec, config.shapes[spec.name], model_label)
            continue
        dims = [d if _is_fixed(d) else (config.batch if axis == 0 else None) for axis, d in enumerate(spec.shape)]
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


def _is_fixed(dim: int | str | None) -> bool:
    return isinstance(dim, int) and dim >= 0


def _dim_label(dim: int | str | None, axis: int) -> str:
    return dim if isinstance(dim, str) and dim else f"axis{axis}"


def _given_shape(spec: TensorSpec, shape: tuple[int, ...], model_label: str) -> tuple[int, ...]:
    if len(shape) != spec.rank:
        raise ConfigError(f"--shape {spec.name}={','.join(map(str, shape))} has rank {len(shape)}; input {spec.describe()} of {model_label} has rank {spec.rank}",
                          "give one number per dim")
    for axis, (given, want) in enumerate(zip(shape, spec.shape)):
        if _is_fixed(want) and given != want:
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


def _batch_of(feed: dict[str, np.ndarray], specs: list[TensorSpec]) -> int:
    """Samples per run: the leading dim of the first input that has one (a scalar-only model runs one sample)."""
    for spec in specs:
        arr = feed[spec.name]
        if arr.ndim:
            return int(arr.shape[0])
    return 1


def _session(make_session, path: Path, threads: int):
    try:
        return make_session(path, threads=threads)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types; all mean "cannot load"
        raise ModelError(f"ONNX Runtime cannot load {path}: {_first_line(exc)}",
                         "check that the model runs in ONNX Runtime (operators, opset, types)") from None


def _time_runs(session, feed: dict[str, np.ndarray], config: BenchConfig, path: Path) -> np.ndarray:
    """`warmup` untimed runs, then `runs` timed ones; returns milliseconds per run."""
    try:
        for _ in range(config.warmup):
            session.run(None, feed)
        times = np.empty(config.runs, dtype=np.int64)
        for i in range(config.runs):
            start = time.perf_counter_ns()
            session.run(None, feed)
            times[i] = time.perf_counter_ns() - start
    except Exception as exc:  # noqa: BLE001 - a run failure is almost always inputs that do not fit the model
        shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feed.items())
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
    import onnx
    from onnx import external_data_helper

    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for tensor in external_data_helper._get_all_tensors(proto)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    folder = path.resolve().parent
    files = [path] + [folder / loc for loc in sorted(locations)]
    return sum(f.stat().st_size for f in files), [str(f) for f in files]


# ----- memory: Linux /proc first, because ru_maxrss inherits the parent's peak across fork+exec -------------

def _proc_status() -> dict[str, int]:
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])  # kB
    return fields


def _rss_kib() -> float:
    """Resident memory now, in KiB."""
    status = _proc_status()
    if "VmRSS" in status:
        return float(status["VmRSS"])
    import psutil

    return psutil.Process().memory_info().rss / 1024.0


def _peak_rss_kib() -> float:
    """Peak resident memory of this process, in KiB.

    On Linux the kernel copies the parent's peak into a child's ru_maxrss at exec, so a worker started from a big
    process would report the parent's size; /proc/self/status VmHWM belongs to this process alone.
    """
    status = _proc_status()
    if "VmHWM" in status:
        return float(status["VmHWM"])
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform == "darwin" else float(peak)  # bytes on macOS, KiB elsewhere


def _reset_peak() -> bool:
    """Reset the peak to the current RSS (Linux 4.0+); where that is impossible the peak includes earlier steps."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# ----- rendering --------------------------------------------------------------------------------------------

def bench_table(records: Sequence[BenchRecord]):
    """A rich Table of the records; the first model is the baseline for the size ratio and the speed-up.

    >>> from rich.console import Console
    >>> Console().print(bench_table(benchmark(["a.onnx", "a_int8.onnx"])))          # doctest: +SKIP
    """
    from rich import box
    from rich.table import Table

    # A light box keeps nine columns within an 80-column terminal.
    table = Table(title=_title(records), caption="baseline: the first model; speed-up = baseline p50 / p50", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0, 0, 1))
    for header in ("model", "size MB", "size ×", "p50 ms", "p90 ms", "p99 ms", "speed-up", "samples/s", "peak MB"):
        table.add_column(header, justify="left" if header == "model" else "right")
    if not records:
        return table
    base = records[0]
    labels = _labels(records)
    for label, r in zip(labels, records):
        table.add_row(label, _fmt_mb(r.size_bytes / 1e6), f"{r.size_bytes / base.size_bytes:.2f}×",
                      _fmt_ms(r.latency_ms.p50), _fmt_ms(r.latency_ms.p90), _fmt_ms(r.latency_ms.p99),
                      f"{base.latency_ms.p50 / r.latency_ms.p50:.2f}×", _fmt_rate(r.throughput), f"{r.peak_rss_mb:,.0f}")
    return table


def _title(records: Sequence[BenchRecord]) -> str:
    if not records:
        return "benchmark"
    r = records[0]
    return f"ONNX Runtime {r.onnxruntime} CPU, {r.threads} thread{'s' if r.threads != 1 else ''}, batch {r.batch}, {r.runs} runs"


def _labels(records: Sequence[BenchRecord]) -> list[str]:
    # Two files may share a stem (a/model.onnx, b/model.onnx): show their paths then.
    names = [r.name for r in records]
    return [r.path if names.count(r.name) > 1 else r.name for r in records]


def _fmt_mb(mb: float) -> str:
    return f"{mb:,.2f}" if mb >= 1 else f"{mb:.3f}"


def _fmt_rate(per_s: float) -> str:
    return f"{per_s:,.0f}" if per_s >= 100 else f"{per_s:.1f}"


def _fmt_ms(ms: float) -> str:
    return f"{ms:.1f}" if ms >= 100 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"

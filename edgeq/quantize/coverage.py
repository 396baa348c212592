"""Op coverage of static INT8 chosen by measured kernel time: QDQ stays only where the int8 kernel wins here.

Full coverage is not always faster: on small depthwise convolutions, tiny spatial sizes and chains broken by float
ops (hard-swish, SE blocks), ONNX Runtime's int8 kernel plus the QuantizeLinear/DequantizeLinear glue around it costs
more than the float kernel (PP-OCR's text-line classifier ran 1.46× slower in full INT8). So the FP32 model and the
INT8 model are profiled on a calibration sample (batch 1, the target's thread count) with ONNX Runtime's profiler;
each quantized node's cost is its int8 kernel plus the Q/DQ nodes left around it after fusion, its float cost the
fused float kernel; the nodes that lose go back to float, the model is rebuilt and profiled again until no node
loses. The FP32, full-INT8 and measured models are then timed end to end, interleaved in rounds, and the faster
INT8 model is kept; when neither beats FP32 the summary says so with the measured ratio.

Kernel speed depends on the graph's structure and shapes, the machine and ONNX Runtime, not on weight values: the
decision is cached under a key of exactly those ($EDGEQ_CACHE or ~/.cache/edgeq, `coverage/`), so quantizing the
same model again on the same machine gives the same bytes, and QAT's export finds the placement its PTQ had.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from edgeq.model import Model
from edgeq.runtimes import ONNX_RUNTIME
from edgeq.timing import Speedup, interleaved_round_ms

MAX_PASSES = 4
# Measurement budget, scaled by one run's latency so that a large model costs seconds, not minutes.
PROFILE_SECONDS, PROFILE_RUNS = 0.5, (3, 20)
TIMING_SECONDS, TIMING_ROUNDS, TIMING_RUNS_PER_ROUND = 3.0, (5, 15), 4
# Ops ONNX Runtime runs in int8 after fusing DQ → op → Q; a fused node is named after its source node.
INT8_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger", "QLinearAdd", "QLinearMul",
                "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu")
GLUE = ("QuantizeLinear", "DequantizeLinear")
# Float ops ONNX Runtime fuses into the Conv before it (the fused kernel is named after the last output).
FUSED_INTO_CONV = ("Relu", "Clip", "HardSigmoid", "LeakyRelu", "Sigmoid", "Tanh", "Add", "Sum", "HardSwish")
_SUFFIX = re.compile(r"(_token_\d+|_nchwc|/duplicated.*)$")


@dataclass
class CoverageReport:
    """What measured coverage did: the nodes left float for speed with their kernel times, and the end-to-end ratios."""

    left_float: dict[str, dict[str, float]] = field(default_factory=dict)  # node -> {int8_us, fp32_us}
    passes: int = 0
    speedup_full: Speedup | None = None       # FP32 / full-coverage INT8, paired by round
    speedup_measured: Speedup | None = None   # FP32 / measured-coverage INT8
    chosen: str = "all"
    kept_int8: int = 0                          # target nodes still quantized in the chosen model
    threads: int = 1
    input_shapes: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "CoverageReport":
        ratio = (lambda r: None if r is None else Speedup(r["median"], r["low"], r["high"]))
        return cls(left_float=d["left_float_for_speed"], passes=d["passes"], speedup_full=ratio(d["speedup_full_int8"]),
                   speedup_measured=ratio(d["speedup_measured_int8"]), chosen=d["chosen"], kept_int8=d["kept_int8"], threads=d["threads"],
                   input_shapes=d["input_shapes"])

    @property
    def speedup(self) -> Speedup | None:
        return self.speedup_measured if self.chosen == "measured" else self.speedup_full

    def to_dict(self) -> dict:
        ratio = (lambda s: None if s is None else {"median": round(s.median, 3), "low": round(s.low, 3), "high": round(s.high, 3)})
        return {"coverage": "measured", "chosen": self.chosen, "kept_int8": self.kept_int8, "passes": self.passes, "threads": self.threads,
                "input_shapes": self.input_shapes, "left_float_for_speed": self.left_float,
                "speedup_full_int8": ratio(self.speedup_full), "speedup_measured_int8": ratio(self.speedup_measured)}


def node_times_us(proto: onnx.ModelProto, feed: dict[str, np.ndarray], threads: int, runs: int) -> dict[str, tuple[str, float]]:
    """Median kernel time (µs) of each node ONNX Runtime runs, by its (optimized) node name: {name: (op, µs)}."""
    with tempfile.TemporaryDirectory(prefix="edgeq-profile-") as tmp:
        session = ONNX_RUNTIME.open_profiled(proto, threads, os.path.join(tmp, "profile"))
        for _ in range(runs + 2):
            session.run(None, feed)
        with open(session.end_profiling()) as fh:
            events = json.load(fh)
    durations: dict[str, list[float]] = defaultdict(list)
    ops: dict[str, str] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") == "Node" and name.endswith("_kernel_time"):
            node = name[: -len("_kernel_time")]
            durations[node].append(float(event["dur"]))
            ops[node] = event.get("args", {}).get("op_name", "")
    # The first runs allocate and pre-pack; the median of the steady runs is the kernel's cost.
    return {node: (ops[node], float(np.median(times[2:] if len(times) > 2 else times))) for node, times in durations.items()}


def float_costs(proto: onnx.ModelProto, times: dict[str, tuple[str, float]], targets: set[str]) -> dict[str, float]:
    """Float kernel time of each target node: a fused Conv is named after its own name or after the output of the
    activation fused into it, so walk back from that tensor to the target node."""
    producers = {o: n for n in proto.graph.node for o in n.output}
    names = {n.name: n for n in proto.graph.node}
    costs: dict[str, float] = defaultdict(float)
    for profiled, (_, us) in times.items():
        base = _SUFFIX.sub("", profiled)
        node = names.get(base) or producers.get(base)
        while node is not None and node.name not in targets and node.op_type in FUSED_INTO_CONV:
            node = producers.get(node.input[0])
        if node is not None and node.name in targets:
            costs[node.name] += us
    return dict(costs)


def int8_costs(qdq: onnx.ModelProto, times: dict[str, tuple[str, float]], targets: set[str]) -> dict[str, float]:
    """Int8 cost of each quantized target node: its fused int8 kernel, plus the Q/DQ nodes ONNX Runtime left around
    it (a DequantizeLinear of its output for a float consumer, a QuantizeLinear of a float input it reads)."""
    names = {n.name: n for n in qdq.graph.node}
    producers = {o: n for n in qdq.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in qdq.graph.node:
        for i in n.input:
            consumers[i].append(n)
    costs: dict[str, float] = defaultdict(float)
    for profiled, (op, us) in times.items():
        base = _SUFFIX.sub("", profiled)
        if op in INT8_KERNELS and base in targets:
            costs[base] += us
        elif op in GLUE and base in names:
            owners = _glue_owners(names[base], producers, consumers, targets)
            for owner in owners:
                costs[owner] += us / len(owners)
    return dict(costs)


def _glue_owners(node: onnx.NodeProto, producers, consumers, targets: set[str]) -> list[str]:
    if node.op_type == "DequantizeLinear":  # DQ(Q(T)): T came out of a quantized node, whose int8 output is widened
        quant = producers.get(node.input[0])
        source = producers.get(quant.input[0]) if quant is not None and quant.op_type == "QuantizeLinear" else None
        return [source.name] if source is not None and source.name in targets else []
    # Q(T) of a float tensor: the quantized nodes that read its dequantized copy pay for it
    readers = [c for dq in consumers[node.output[0]] if dq.op_type == "DequantizeLinear" for c in consumers[dq.output[0]]]
    return sorted({c.name for c in readers if c.name in targets})


def measured_coverage(prepared: Model, build: Callable[[tuple[str, ...]], Model], feed: dict[str, np.ndarray],
                      targets: set[str], threads: int) -> tuple[Model, CoverageReport]:
    """Rebuild with the target nodes whose int8 cost exceeds their float cost left float, until none does; keep the
    faster of this and full coverage by interleaved end-to-end timing (paired by round against FP32)."""
    report = CoverageReport(threads=threads, input_shapes={k: list(v.shape) for k, v in feed.items()}, kept_int8=len(targets))
    profile_runs, rounds_count = _budget(prepared.proto, feed, threads)
    fp32 = float_costs(prepared.proto, node_times_us(prepared.proto, feed, threads, profile_runs), targets)
    full = build(())
    current, excluded = full, set()
    for report.passes in range(1, MAX_PASSES + 1):
        int8 = int8_costs(current.proto, node_times_us(current.proto, feed, threads, profile_runs), targets)
        losers = {n: {"int8_us": round(c, 1), "fp32_us": round(fp32[n], 1)} for n, c in int8.items() if n in fp32 and c > fp32[n]}
        if not losers:
            break
        report.left_float.update(losers)
        excluded |= set(losers)
        current = build(tuple(sorted(excluded)))
    candidates = [prepared.proto, full.proto] + ([current.proto] if excluded else [])
    rounds = interleaved_round_ms(candidates, feed, threads, rounds_count, TIMING_RUNS_PER_ROUND)
    report.speedup_full = Speedup.of(rounds[0], rounds[1])
    if not excluded:
        return full, report
    report.speedup_measured = Speedup.of(rounds[0], rounds[2])
    if report.speedup_measured.median < report.speedup_full.median:
        report.left_float = {}  # not kept: full coverage measured faster end to end
        return full, report
    report.chosen = "measured"
    report.kept_int8 = len(targets - excluded)
    return current, report


def choose_for(prepared: Model, calib, config, build: Callable[[tuple[str, ...]], Model]) -> tuple[Model, CoverageReport]:
    """Measured coverage of a static recipe: the feed is the first calibration sample (batch 1 where the batch is
    free), the targets every named compute node the recipe quantizes, the threads the recipe's."""
    from edgeq.data import batches
    from edgeq.errors import ConfigError
    from edgeq.quantize.config import COMPUTE_OP_TYPES

    if config.threads < 1:
        raise ConfigError(f"threads must be at least 1 (got {config.threads})", "pass --threads 1 or more (the target's thread count)")
    feed = next(batches(calib, prepared.inputs, 1, max_samples=1)).inputs
    targets = {n.name for n in prepared.proto.graph.node if n.name and n.op_type in config.op_types
               and n.op_type in COMPUTE_OP_TYPES and n.name not in config.exclude_nodes}
    recipe = {"op_types": list(config.op_types), "exclude": list(config.exclude_nodes), "per_channel": config.per_channel,
              "activation_type": config.activation_type, "weight_bits": config.weight_bits}
    from edgeq.progress import step

    with step("--coverage measured: profiling int8 and float kernels"):
        return choose(prepared, build, feed, targets, config.threads, recipe)


def annotate(summary, report: CoverageReport) -> None:
    """Record in the summary what stayed float for speed (with its kernel times) and the measured ratios."""
    notes, warnings = coverage_notes(report)
    summary.notes.extend(notes)
    summary.warnings.extend(warnings)
    for entry in summary.left_float:
        times = report.left_float.get(entry["node"]) if report.chosen == "measured" else None
        if times:
            entry["reason"] = f"faster in float here: int8 kernel + Q/DQ {times['int8_us']:.0f} µs vs float {times['fp32_us']:.0f} µs"
    summary.calibration["coverage"] = report.to_dict()


def _budget(proto: onnx.ModelProto, feed: dict[str, np.ndarray], threads: int) -> tuple[int, int]:
    """Profiled runs per model and timing rounds that fit the budget, from one timed run of the FP32 model."""
    session = ONNX_RUNTIME.open_graph(proto, threads=threads)
    session.run(None, feed)
    begin = time.perf_counter()
    session.run(None, feed)
    seconds = max(time.perf_counter() - begin, 1e-5)
    profile_runs = int(np.clip(PROFILE_SECONDS / seconds, *PROFILE_RUNS))
    rounds = int(np.clip(TIMING_SECONDS / (3 * (TIMING_RUNS_PER_ROUND + 1) * seconds), *TIMING_ROUNDS))
    return profile_runs, rounds


def choose(prepared: Model, build: Callable[[tuple[str, ...]], Model], feed: dict[str, np.ndarray], targets: set[str],
           threads: int, recipe: dict) -> tuple[Model, CoverageReport]:
    """`measured_coverage`, or the cached decision for the same structure, shapes, recipe, machine and runtime."""
    from edgeq import atomic

    path = _cache_folder() / f"{_cache_key(prepared.proto, feed, targets, threads, recipe)}.json"
    try:
        cached = json.loads(path.read_text())
        report = CoverageReport.from_dict(cached)
        excluded = tuple(sorted(report.left_float)) if report.chosen == "measured" else ()
        return build(excluded), report
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no (readable) decision cached: measure
    model, report = measured_coverage(prepared, build, feed, targets, threads)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(path, report.to_dict())
    except OSError:
        pass  # a read-only cache only costs the measurement next time
    return model, report


def _cache_folder() -> Path:
    return Path(os.environ.get("EDGEQ_CACHE", Path.home() / ".cache" / "edgeq")) / "coverage"


def _cache_key(proto: onnx.ModelProto, feed: dict[str, np.ndarray], targets: set[str], threads: int, recipe: dict) -> str:
    """The graph without weight values (shapes and types kept), the feed's shapes, the recipe, this CPU and runtime,
    and this module's source (a changed rule measures again)."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(proto)
    for tensor in skeleton.graph.initializer:
        dims, dtype, name = list(tensor.dims), tensor.data_type, tensor.name
        tensor.Clear()
        tensor.dims.extend(dims)
        tensor.data_type, tensor.name = dtype, name
    digest = hashlib.sha256(skeleton.SerializeToString(deterministic=True))
    machine = {"rule": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(), "ort": ONNX_RUNTIME.version(), "cpu": _cpu_name(), "cores": os.cpu_count(), "threads": threads,
               "shapes": {k: list(v.shape) for k, v in sorted(feed.items())}, "targets": sorted(targets), "recipe": recipe}
    digest.update(json.dumps(machine, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: the platform's own name
    return platform.processor() or platform.machine()


def coverage_notes(report: CoverageReport) -> tuple[list[str], list[str]]:
    """The summary's notes and warnings about coverage: what stayed float for speed, the measured ratio."""
    s = report.speedup
    where = f"batch {', '.join(f'{k}{v}' for k, v in report.input_shapes.items())}, {report.threads} thread{'s' if report.threads != 1 else ''}"
    notes, warnings = [], []
    full = report.speedup_full
    if report.chosen == "measured" and not report.kept_int8:
        warnings.append(f"no node runs faster in INT8 than in float here (full INT8 measured {1 / full.median:.2f}× the FP32 latency, "
                        f"{where}): the model is left in FP32; ship FP32 or FP16 for speed, or pass --coverage all for INT8's size "
                        "at that latency")
        return notes, warnings
    if report.chosen == "measured":
        notes.append(f"--coverage measured: {len(report.left_float)} nodes stay float because their int8 kernel and Q/DQ glue "
                     f"measured slower than the float kernel here; INT8 is {s.median:.2f}× FP32 speed ({s.low:.2f}–{s.high:.2f}) "
                     f"vs {full.median:.2f}× with every node quantized ({where})")
    else:
        notes.append(f"--coverage measured: every quantizable node kept INT8 (measured {s.median:.2f}× FP32 speed, {where})")
    if s.high < 1.0:
        warnings.append(f"this INT8 model is slower than FP32: measured {1 / s.median:.2f}× the FP32 latency ({where}); "
                        "ship FP32 or FP16 for speed, or INT8 only for its size")
    elif s.low < 1.0:
        warnings.append(f"this INT8 model is not measurably faster than FP32 ({s.median:.2f}× FP32 speed, {s.low:.2f}–{s.high:.2f} "
                        f"across rounds, {where}); FP32 or FP16 may serve as well for speed")
    return notes, warnings

"""The static INT8 pass pipeline: each repair or step is a `Pass` that declares the statistics it needs (NNCF's
statistic points: which tensors, which collector, on which model state) and then applies; `run_passes` collects the
statistics of every pass that measures the same state of the float graph in ONE streaming pass over the calibration
data (`edgeq.calibrate.collect`), then applies those passes in order.

A pass that changes the float graph (`changes_float`: equalization, SmoothQuant, weight range setting) ends a state:
the passes after it measure the changed graph, which is a new read. Statistics of a model made later (the QDQ
model bias correction measures layer by layer) are the pass's own runs, over batches it asked the stream to keep.
Reads per recipe (`StaticState.reads` records them):

- default, `--method` any, `--weight-range mse`, `--equalize`, `--rounding adaround`, `--bias-correction`: one read;
- `--smoothquant` (one alpha or auto): two, its per-channel maxima and sampled rows, then the smoothed graph's ranges;
- `--coverage measured` adds its first calibration sample; If branches one read to capture the values they read
  (`subgraph_static.py`).

The shared read gives each collector the values of one session with every collector's tensors as outputs. Where a
pass used to read alone, its values can differ in the last bit: ONNX Runtime fuses a Conv with the residual Add
after it only when the Conv's output is not a model output (AdaRound's layer inputs of the planted residual CNN:
98.33 % → 98.47 % top-1, output SQNR 38.84 → 38.82 dB, the same within noise); every other recipe's bytes are
unchanged (`tools/golden_static.py`).

A new pass is one class in `quantize/passes.py` and one line in `static_passes` there.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from edgeq.calibrate import Calibration, Collected, Observed, collect
from edgeq.calibrate.collectors import StatisticPoint
from edgeq.calibrate.stream import Collector
from edgeq.data import Dataset
from edgeq.model import Model
from edgeq.quantize.config import Int8Static
from edgeq.quantize.coverage import CoverageReport
from edgeq.runtimes import ONNX_RUNTIME, GraphRuntime


@dataclass
class StaticState:
    """What the passes read and write: the float graph they repair in place, the recipe and data, and what each
    pass leaves for the next (ranges, the QDQ model, the summary's repairs)."""

    prepared: Model
    config: Int8Static
    calib: Dataset
    per_channel: bool
    notes: list[str]
    runtime: GraphRuntime = ONNX_RUNTIME
    repairs: dict = field(default_factory=dict)
    collected: Collected | None = None                     # the last read, with what it held back (`--method auto`)
    held_samples: int = 0
    seen: Observed | None = None
    method: str = ""
    scores: dict[str, float] | None = None
    calibration: Calibration | None = None
    calibration_seconds: float = 0.0
    scored: Model | None = None                            # --method auto's QDQ model of the chosen ranges, when it scored them
    result: Model | None = None
    coverage: CoverageReport | None = None                 # with --coverage measured
    reads: list[str] = field(default_factory=list)        # one entry per pass over the calibration data: its passes
    read_seconds: float = 0.0


class Pass(Protocol):
    """One step of static INT8."""

    name: str
    changes_float: bool   # changes the float graph: later passes measure a new state

    def statistics(self, state: StaticState) -> list[StatisticPoint]:
        """What it needs measured on the float graph as the passes before it left it (none: data-free)."""
        ...

    def apply(self, state: StaticState, stats: dict[str, Collector]) -> None:
        """Do its job with its collectors, filled, by point name."""
        ...


def run_passes(passes: list[Pass], state: StaticState) -> StaticState:
    """Apply `passes` in order, each state's statistics collected in one pass over `state.calib`."""
    start = 0
    while start < len(passes):
        end = start
        while end < len(passes) - 1 and not passes[end].changes_float:
            end += 1
        segment = passes[start:end + 1]
        points = {p.name: p.statistics(state) for p in segment}
        collectors = [point.collector for found in points.values() for point in found]
        if collectors:
            measuring = [p.name for p in segment if points[p.name]]
            state.reads.append("+".join(measuring))
            started = time.perf_counter()
            holdout = any(point.holds_back for found in points.values() for point in found)
            state.collected = collect(state.prepared, state.calib, collectors, batch_size=state.config.batch_size, holdout=holdout,
                                      label="calibrating" if "calibrate" in measuring else f"{measuring[0]}: observing activations",
                                      runtime=state.runtime)
            state.read_seconds = time.perf_counter() - started
        for p in segment:
            p.apply(state, {point.name: point.collector for point in points[p.name]})
        start = end + 1
    return state

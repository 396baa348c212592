"""The benchmark table and its timing warnings, for the command line: the first model is the baseline."""
from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.table import Table

from edgeq.rounds import Speedup, speedups, timing_warnings


def bench_table(records: Sequence):
    """A rich Table of the records; the first model is the baseline for the size ratio and the speed-up.

    >>> from rich.console import Console
    >>> Console().print(bench_table(benchmark(["a.onnx", "a_int8.onnx"])))          # doctest: +SKIP
    """
    caption = ("baseline: the first model; speed-up = median over rounds of baseline / model (± half its middle-half range); "
               "check the warnings below before deciding")
    # A light box keeps nine columns within an 80-column terminal.
    table = Table(title=_title(records), caption=caption, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0, 0, 1))
    for header in ("model", "size MB", "size ×", "p50 ms", "p90 ms", "p99 ms", "speed-up", "samples/s", "peak MB"):
        table.add_column(header, justify="left" if header == "model" else "right")
    if not records:
        return table
    base = records[0]
    labels = _labels(records)
    for label, r, speedup in zip(labels, records, speedups(records)):
        table.add_row(label, _fmt_mb(r.size_bytes / 1e6), f"{r.size_bytes / base.size_bytes:.2f}×",
                      _fmt_ms(r.latency_ms.p50), _fmt_ms(r.latency_ms.p90), _fmt_ms(r.latency_ms.p99),
                      _fmt_speedup(speedup), _fmt_rate(r.throughput), f"{r.peak_rss_mb:,.0f}")
    return table


def _fmt_speedup(speedup: Speedup) -> str:
    half = (speedup.high - speedup.low) / 2
    return f"{speedup.median:.2f}×" + (f" ±{half:.2f}" if half >= 0.005 else "")


def _title(records: Sequence) -> str:
    if not records:
        return "benchmark"
    r = records[0]
    return f"{' + '.join(dict.fromkeys(_runtime(x) for x in records))} CPU, {r.threads} thread{'s' if r.threads != 1 else ''}, batch {r.batch}, {r.runs} runs in {max(len(r.round_p50_ms), 1)} rounds"


def _runtime(record) -> str:
    """The runtime and version that ran a record (records written before the runtime seam ran in ONNX Runtime)."""
    return record.runtime or f"ONNX Runtime {record.onnxruntime}"


def _labels(records: Sequence) -> list[str]:
    # Two files may share a stem (a/model.onnx, b/model.onnx): show their paths then; with several runtimes in the
    # table, each row names its own.
    names = [r.name for r in records]
    labels = [r.path if names.count(r.name) > 1 else r.name for r in records]
    runtimes = [_runtime(r).rsplit(" ", 1)[0] for r in records]
    return [f"{label} ({runtime})" for label, runtime in zip(labels, runtimes)] if len(set(runtimes)) > 1 else labels


def _fmt_mb(mb: float) -> str:
    return f"{mb:,.2f}" if mb >= 1 else f"{mb:.3f}"


def _fmt_rate(per_s: float) -> str:
    return f"{per_s:,.0f}" if per_s >= 100 else f"{per_s:.1f}"


def _fmt_ms(ms: float) -> str:
    return f"{ms:.1f}" if ms >= 100 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def print_bench(console: Console, records: Sequence) -> None:
    """The table, then each timing warning on its own line."""
    console.print(bench_table(records))
    for warning in timing_warnings(records):
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)

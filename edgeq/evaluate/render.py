"""Rich tables of a validation and a comparison."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from edgeq.evaluate.metrics import METRICS, MetricInfo

if TYPE_CHECKING:
    from edgeq.evaluate.comparison import Comparison
    from edgeq.evaluate.record import ValidationRecord

VERDICT_STYLE = {"ship": "bold green", "try-qat": "bold yellow", "stay-fp16": "bold red"}


def print_validation(console: Any, record: ValidationRecord) -> None:
    """A rich table of every metric with its 95% interval, then the warnings."""
    from rich.table import Table

    title = f"{record.model} on {record.data} ({record.samples} samples)"
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95% interval", justify="right")
    for name, est in record.metrics.items():
        label = f"[bold]{name}[/]" if name == record.metric else name
        table.add_row(label, format_value(name, est.value), f"{format_value(name, est.ci95[0])} – {format_value(name, est.ci95[1])}")
    console.print(table)
    if record.outputs:
        _print_outputs(console, record)
    if record.reference:
        console.print(f"fidelity measured against {record.reference}", highlight=False)
    for warning in record.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)


def _print_outputs(console: Any, record: ValidationRecord) -> None:
    """Every scored output: its kind, what judges it, each channel group's cosine and SQNR; the worst marked."""
    from rich.table import Table

    table = Table(title="outputs scored (fidelity per channel group; the worst output's worst group decides)", title_justify="left")
    for col in ("output", "kind", "judged by", "value", "group", "channels", "FP32 range", "cosine", "SQNR"):
        table.add_column(col, justify="right" if col in ("value", "FP32 range", "cosine", "SQNR") else "left")
    worst = record.worst or {}
    for out in record.outputs:
        value = format_value(out["judged_by"], out["value"])
        for index, group in enumerate(out["groups"] or [None]):
            mark = out["name"] == worst.get("output") and index == (worst.get("group") or 0)
            span = group["fp32_range"] if group else None
            row = [out["name"] if index == 0 else "", out["kind"] if index == 0 else "", out["judged_by"] if index == 0 else "",
                   value if index == 0 else "", "" if group is None else str(index), "" if group is None else _clip(group["channels"]),
                   "" if not span else f"{span[0]:.3g}–{span[1]:.3g}",
                   "" if group is None else format_value("cosine", group["cosine"]["value"]),
                   "" if group is None else format_value("sqnr_db", group["sqnr_db"]["value"])]
            table.add_row(*[f"[bold]{cell}[/]" if mark and cell else cell for cell in row])
    console.print(table)
    if worst:
        where = f", channel group {worst['group']} (channels {_clip(worst['channels'])})" if worst.get("group") is not None else ""
        console.print(f"decided on output {worst['output']}{where}: {worst['metric']} "
                      f"{format_value(worst['metric'], worst['value'])}", highlight=False)


def _clip(channels: str | None, width: int = 24) -> str:
    text = channels or ""
    return text if len(text) <= width else text[:width - 1] + "…"


def print_comparison(console: Any, comparison: Comparison) -> None:
    """A rich table of base, candidate and drop, then the coloured verdict and its reasons."""
    from rich.table import Table

    c, m = comparison, comparison.metric
    table = Table(title=f"{m}: {c.base_model} → {c.candidate_model} ({c.samples} samples)", title_justify="left")
    for col in ("", "value", "95% interval"):
        table.add_column(col, justify="right" if col else "left")
    table.add_row("base", format_value(m, c.base), f"{format_value(m, c.base_ci95[0])} – {format_value(m, c.base_ci95[1])}")
    table.add_row("candidate", format_value(m, c.candidate), f"{format_value(m, c.candidate_ci95[0])} – {format_value(m, c.candidate_ci95[1])}")
    table.add_row(f"drop ({c.unit}, paired)", f"{c.drop:+.2f}", f"{c.drop_ci95[0]:+.2f} – {c.drop_ci95[1]:+.2f}")
    if c.agreement is not None:
        table.add_row("top-1 agreement", format_value("top1_agreement", c.agreement.value),
                      f"{format_value('top1_agreement', c.agreement.ci95[0])} – {format_value('top1_agreement', c.agreement.ci95[1])}")
    console.print(table)
    style = VERDICT_STYLE.get(c.verdict, "bold")
    console.print(f"verdict: [{style}]{c.verdict}[/]" + ("  (within noise)" if c.within_noise else ""), highlight=False)
    for reason in c.reasons:
        console.print(f"  • {reason}", highlight=False)


def format_value(metric: str, value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    unit = METRICS[metric].unit if metric in METRICS else ""
    if unit == "%":
        return f"{value:.2f}%"
    if unit == "dB":
        return f"{value:.1f} dB"
    if METRICS.get(metric, MetricInfo(None)).points != 1:
        return f"{value:.5f}"
    return f"{value:.4g}"

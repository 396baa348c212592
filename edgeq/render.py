"""Rich rendering of quantization summaries for the command line."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgeq.model import Model


def print_quant_summary(console: Console, source: Model, result, output: Path) -> None:
    summary = result.summary
    before = source.path.stat().st_size if source.path else source.proto.ByteSize()
    after = Path(output).stat().st_size
    table = Table(title=f"{summary.precision.upper()}{' ' + summary.mode if summary.mode else ''} → {output}", show_header=False)
    table.add_row("size", f"{before / 1e6:.2f} MB → {after / 1e6:.2f} MB ({after / before:.2f}×)")
    table.add_row("quantized", ", ".join(f"{op} ×{n}" for op, n in summary.quantized.items()) or "none")
    if summary.calibration:
        cal = summary.calibration
        table.add_row("calibration", f"{cal['method']}" + (f" {cal['percentile']}" if cal.get("percentile") else "") + f", {cal['samples']} samples")
    if summary.left_float:
        table.add_row("left in float", ", ".join(f"{d['node']} ({d['op_type']}: {d['reason']})" for d in summary.left_float[:12])
                      + (f" … and {len(summary.left_float) - 12} more" if len(summary.left_float) > 12 else ""))
    for note in summary.notes:
        table.add_row("note", note)
    console.print(table)
    for warning in summary.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)

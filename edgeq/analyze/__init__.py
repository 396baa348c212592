"""Diagnosis: why a model breaks under INT8.

`analyze(model, calib=..., target=..., val=...)` reports per-layer sensitivity (both views), weight outliers,
operator support for a target profile and the quality of the calibration data.

>>> report = edgeq.analyze("model.onnx", calib=edgeq.Dataset.from_npz("calib.npz"), target="tflite")   # doctest: +SKIP
>>> report.sensitivity[0].node, report.outliers[0].reasons                                           # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgeq.analyze.outliers import LayerOutliers, weight_outliers
from edgeq.analyze.quality import DataQuality, data_quality
from edgeq.analyze.sensitivity import Fidelity, LayerSensitivity, eval_inputs, full_int8_fidelity, sensitivity
from edgeq.analyze.support import SupportReport, file_support, load_profile, operator_support, profiles
from edgeq.data import Dataset, open_data
from edgeq.errors import UserError
from edgeq.executors import Executor, running
from edgeq.model import Model, load
from edgeq.quantize.config import Int8Static
from edgeq.quantize.qdq import Prepared, prepare_and_calibrate, prepare_static, quantizable_layers
from edgeq.runtimes import runtime_for
from edgeq.sqnr import BROKEN_SQNR_DB


@dataclass
class Analysis:
    model: str
    target: str
    layers: int
    int8_fidelity: Fidelity | None = None
    sensitivity: list[LayerSensitivity] = field(default_factory=list)
    outliers: list[LayerOutliers] = field(default_factory=list)
    support: SupportReport | None = None
    data: DataQuality | None = None
    findings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "model": self.model, "target": self.target, "layers": self.layers,
            "int8_fidelity": None if self.int8_fidelity is None else vars(self.int8_fidelity),
            "sensitivity": [s.to_dict() for s in self.sensitivity],
            "outliers": [o.to_dict() for o in self.outliers],
            "support": None if self.support is None else self.support.to_dict(),
            "data": None if self.data is None else self.data.to_dict(),
            "findings": list(self.findings),
        }


def analyze(model: Model | str | Path, calib: Dataset | str | Path | None = None, target: str | Path = "onnxruntime-cpu", *,
            val: Dataset | str | Path | None = None, config: Int8Static | None = None, samples: int = 128,
            prepared: Prepared | None = None, minmax_ranges: dict | None = None, executor: Executor | str | None = None,
            workers: int | None = None) -> Analysis:
    """Run every analysis the inputs allow: outliers and operator support always; sensitivity and data quality
    with `calib`; coverage of the validation activations with `val` too. A `.tflite` file gets the listing of what
    each of its operators computes in (the other analyses need the ONNX model). The per-layer sensitivity runs on
    `executor` ("local", "ray" or an `edgeq.executors` executor; `workers` of them), split by layer; without one,
    in this process."""
    if isinstance(model, (str, Path)) and runtime_for(model).name == "litert":
        return _file_analysis(Path(model), calib is not None or val is not None)
    source = load(model) if isinstance(model, (str, Path)) else model
    calib = open_data(calib) if isinstance(calib, (str, Path)) else calib
    val = open_data(val) if isinstance(val, (str, Path)) else val
    config = config or Int8Static()
    if prepared is None and calib is not None:
        prepared = prepare_and_calibrate(source, calib, config)
    notes = []
    if prepared is not None:
        graph = prepared.model.proto
    else:
        try:
            graph = prepare_static(source, config)[0].proto
        except UserError as exc:   # e.g. a custom op ONNX Runtime cannot load: the static analyses still apply
            graph, notes = source.proto, [f"the graph could not be prepared for quantization ({exc}); analysed as given"]
    result = Analysis(str(source.path or source.name), str(target), len(quantizable_layers(graph)))
    result.outliers = weight_outliers(graph)
    result.support = operator_support(graph, target)
    if prepared is not None and calib is not None:
        feed = eval_inputs(prepared, calib, samples)
        result.int8_fidelity = full_int8_fidelity(prepared, feed)
        with running(executor, workers) as pool:
            noted = len(pool.notes)
            result.sensitivity = sensitivity(prepared, feed, executor=pool)
            notes += pool.notes[noted:]
        minmax = prepared.ranges if prepared.method == "minmax" else minmax_ranges
        if minmax is None and val is not None:
            minmax = prepare_and_calibrate(source, calib, config, method="minmax").ranges
        result.data = data_quality(prepared, calib, val, minmax)
    result.findings = notes + findings(result)
    return result


def _file_analysis(path: Path, data_given: bool) -> Analysis:
    from edgeq.runtimes.litert import load as load_tflite

    model = load_tflite(path)
    weighted = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "BATCH_MATMUL"}
    result = Analysis(str(path), "this file (LiteRT)", sum(op in weighted for op in model.op_types()))
    result.support = file_support(model.ops, model.types)
    counts = result.support.counts
    result.findings = [f"{path.name} is a .tflite file: {counts['int8']} of {len(model.ops)} operators compute in integers"
                       + (f", float: {', '.join(result.support.float_ops)}" if result.support.float_ops else "")]
    if data_given:
        result.findings.append("sensitivity, outliers and data quality need the ONNX model: the data was not used")
    return result


def findings(a: Analysis) -> list[str]:
    """The few sentences a reader needs first."""
    out = []
    if a.int8_fidelity is not None:
        out.append(f"full INT8: output SQNR {a.int8_fidelity.sqnr_db:.1f} dB, cosine {a.int8_fidelity.cosine:.4f} vs FP32")
    bad = [s for s in a.sensitivity if s.only_quantized.sqnr_db < BROKEN_SQNR_DB]
    if a.sensitivity:
        top = a.sensitivity[0]
        out.append(f"most sensitive layer: {top.node} (only it INT8: SQNR {top.only_quantized.sqnr_db:.1f} dB; "
                   f"only it float: {top.only_float.sqnr_db:.1f} dB)")
    if bad:
        out.append(f"{len(bad)} layer(s) alone push the output SQNR under {BROKEN_SQNR_DB:g} dB: {', '.join(s.node for s in bad)}")
    flagged = [o for o in a.outliers if o.flags]
    for o in flagged[:5]:
        out.append(f"{o.node}: {o.reasons[0]}")
    if a.support is not None:
        c = a.support.counts
        line = f"target {a.support.target}: {c['int8']} nodes int8, {c['float']} float, {c['unsupported']} cannot run"
        if a.support.unsupported_ops:
            line += f" ({', '.join(a.support.unsupported_ops)})"
        out.append(line)
    if a.data is not None:
        out.extend(a.data.warnings)
    return out


__all__ = ["Analysis", "analyze", "data_quality", "load_profile", "operator_support", "profiles", "sensitivity", "weight_outliers"]


def print_analysis(console, a: Analysis, top: int = 10) -> None:
    """The findings, the most sensitive layers, the flagged outlier layers and operator support, with rich."""
    from rich.table import Table

    for line in a.findings:
        console.print(f"• {line}", highlight=False)
    if a.sensitivity:
        t = Table(title=f"per-layer sensitivity (top {min(top, len(a.sensitivity))} of {len(a.sensitivity)}; output SQNR/cosine vs FP32)")
        for col in ("rank", "layer", "op", "only it INT8: SQNR dB", "cosine", "only it float: SQNR dB", "cosine"):
            t.add_column(col, justify="left" if col in ("layer", "op") else "right")
        for s in a.sensitivity[:top]:
            t.add_row(str(s.rank), s.node, s.op_type, f"{s.only_quantized.sqnr_db:.1f}", f"{s.only_quantized.cosine:.4f}",
                      f"{s.only_float.sqnr_db:.1f}", f"{s.only_float.cosine:.4f}")
        console.print(t)
    flagged = [o for o in a.outliers if o.flags] or a.outliers[:3]
    if flagged:
        t = Table(title="weight outliers")
        for col in ("layer", "max|w|/σ", "spread", "per-tensor step", "zeroed per channel", "flags"):
            t.add_column(col, justify="left" if col in ("layer", "flags") else "right")
        for o in flagged:
            t.add_row(o.node, f"{o.outlier_ratio:.1f}", f"{o.channel_spread:.1f}", f"{o.per_tensor_step:.3g}", f"{o.zeroed_per_channel:.1%}", ", ".join(o.flags) or "—")
        console.print(t)
    if a.support is not None:
        odd = [n for n in a.support.nodes if n.status != "int8"]
        if odd:
            t = Table(title=f"{a.support.target}: nodes not running in int8")
            for col in ("node", "op", "runs", "why"):
                t.add_column(col)
            for n in odd[:30]:
                t.add_row(n.node, n.op_type, n.status, n.reason)
            console.print(t)

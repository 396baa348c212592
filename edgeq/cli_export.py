"""`edgeq export`: an ONNX model to another runtime's format (TFLite/LiteRT), registered on the app by `edgeq.cli`."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgeq.errors import UserError
from edgeq.export.tflite import IO_TYPES, METHODS, PRECISIONS, RANGES


def _choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A typer choice from the exporter's own vocabulary (no second copy of it here)."""
    return Enum(name, {v: v for v in values}, type=str)


Target = _choices("Target", ("tflite",))
TflitePrecision = _choices("TflitePrecision", PRECISIONS)
Ranges = _choices("Ranges", RANGES)
RangeMethod = _choices("RangeMethod", METHODS)
IoType = _choices("IoType", IO_TYPES)


def export(
    model: Annotated[Path, typer.Argument(help="FP32 ONNX model.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the .tflite file.")],
    to: Annotated[Target, typer.Option("--to", help="Target format.")] = "tflite",
    precision: Annotated[TflitePrecision, typer.Option(help="fp32, fp16 (float16 weights, float32 I/O) or int8 (full integer).")] = "fp32",
    calib: Annotated[Optional[Path], typer.Option(help="Calibration DATA for int8.")] = None,
    ranges: Annotated[Ranges, typer.Option(help="int8 activation ranges: edgeq's observers, or the converter's own (moving-average min/max).")] = "edgeq",
    method: Annotated[RangeMethod, typer.Option(help="edgeq's range method for int8.")] = "mse",
    samples: Annotated[int, typer.Option(help="Calibration samples used for int8.")] = 512,
    io: Annotated[IoType, typer.Option("--io", help="int8: the model's input and output type. float (default, as TensorFlow's converter): "
                                       "a drop-in for the FP32 file, same data in and out; int8 for integer-only accelerators and microcontrollers.")] = "float",
    batch: Annotated[int, typer.Option(help="The batch dim the file fixes (a dynamic batch is fixed).")] = 1,
    preset: Annotated[str, typer.Option("--preset", help="Image folders: raw, imagenet, ppocr or grey.")] = "raw",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
) -> None:
    """Convert an ONNX model to TFLite/LiteRT (FP32, FP16, or INT8 calibrated with edgeq's ranges); checked in LiteRT."""
    import edgeq
    from edgeq.cli import out as console
    from edgeq.export import export_tflite

    if output.suffix != ".tflite":
        raise UserError(f"{output} does not end in .tflite", "name the output MODEL.tflite")
    data = edgeq.open_data(calib, preset) if calib else None
    precision = TflitePrecision(precision).value
    result = export_tflite(model, output, precision, data, ranges=Ranges(ranges).value, method=RangeMethod(method).value,
                           samples=samples, batch=batch, io=IoType(io).value, force=force)
    kind = f"{precision}, {result.io} I/O" if result.io else precision
    line = (f"wrote {result.path} ({kind}, {result.size_bytes / 1e6:.2f} MB, {result.size_ratio:.2f}× the FP32 "
            f"conversion; FP32 matches ONNX Runtime within {result.fp32_max_abs_diff:.2g})")
    if result.ranges:
        line += f"; activation ranges: {result.ranges} on {result.calibration_samples} samples"
    console.print(line, highlight=False)
    for note in result.notes:
        console.print(f"note: {note}", highlight=False)

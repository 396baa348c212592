"""The command line's option vocabularies and the parsers of its composite option values (`--int8-layers`,
`--smoothquant`, `auto`'s QAT flags): what `cli.py` declares its options with and turns into config values.

>>> Precision.int8.value, [m.value for m in Method]
('int8', ['minmax', 'percentile', 'entropy', 'mse', 'auto'])
>>> parse_int8_layers("first-last,auto:2,conv1")
{'int8_layers': ('conv1',), 'int8_first_last': True, 'int8_auto': 2}
>>> smoothquant_alpha("0.5"), smoothquant_alpha("auto")
(0.5, 'auto')
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgeq.errors import UserError
from edgeq.executors import EXECUTORS
from edgeq.quantize import config
from edgeq.quantize.config import RECIPES


def _choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A choice type for typer: one member per value, named as it is spelled on the command line."""
    return Enum(name, [(v, v) for v in values], type=str)  # type: ignore[return-value]


# The vocabularies are the configs' own (edgeq.quantize.config): the command line offers what the recipes accept.
Precision = _choices("Precision", tuple(dict.fromkeys(r.precision for r in RECIPES.values())))
Mode = _choices("Mode", tuple(r.mode for r in RECIPES.values() if r.precision == "int8"))
Method = _choices("Method", config.STATIC_METHODS)
WeightRange = _choices("WeightRange", config.WEIGHT_RANGES)
Rounding = _choices("Rounding", config.ROUNDINGS)
Algorithm = _choices("Algorithm", config.INT4_ALGORITHMS)
Int4Format = _choices("Int4Format", config.INT4_FORMATS)
ActivationType = _choices("ActivationType", config.ACTIVATION_TYPES)
Coverage = _choices("Coverage", config.COVERAGES)

ExecutorChoice = _choices("ExecutorChoice", EXECUTORS)

Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
ExecutorOption = Annotated[ExecutorChoice, typer.Option("--executor", help="Where the work runs: local (a process pool on this machine) "
                                                        "or ray (the cluster RAY_ADDRESS names, else a Ray instance started here; edgeq[ray]).")]
Workers = Annotated[Optional[int], typer.Option("--workers", help="Worker processes (local) or Ray actors (default: every core, or the cluster's CPUs).")]
Preset = Annotated[str, typer.Option("--preset", help="Image folders: raw, imagenet, ppocr or grey, with optional overrides, "
                                                     "e.g. imagenet,size=256x256,layout=NHWC,mean=0.5/0.5/0.5.")]


def parse_int8_layers(spec: str | None) -> dict:
    """--int8-layers: "first-last", "auto:N", names, or a mix, comma-separated."""
    found: dict = {"int8_layers": (), "int8_first_last": False, "int8_auto": 0}
    names = []
    for item in (t.strip() for t in (spec or "").split(",")):
        if not item:
            continue
        if item == "first-last":
            found["int8_first_last"] = True
        elif item.startswith("auto:"):
            count = item.removeprefix("auto:")
            if not count.isdigit():
                raise UserError(f"--int8-layers {item!r}: the count after auto: must be a whole number", "write e.g. auto:2")
            found["int8_auto"] = int(count)
        else:
            names.append(item)
    found["int8_layers"] = tuple(names)
    return found


def smoothquant_alpha(text: str | None) -> float | str | None:
    """--smoothquant: an alpha, or auto (per layer)."""
    if text is None or text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise UserError(f"--smoothquant {text!r} is neither a number nor auto", "give an alpha in (0, 1), e.g. 0.5, or auto") from None


def qat_flags(torch_model: str | None, **given: Path | None) -> bool:
    """`auto`'s QAT inputs come together: --torch-model with --weights and --train, or none of them."""
    for flag, value in given.items():
        if torch_model is None and value is not None:
            raise UserError(f"--{flag} is for QAT and needs --torch-model", f"name the PyTorch model with --torch-model MODULE:FACTORY, or leave out --{flag}")
        if torch_model is not None and value is None:
            raise UserError(f"--torch-model needs --{flag}", f"pass --{flag} " + {"weights": "PATH (its state dict)", "train": "DATA (labelled training data)"}[flag])
    return torch_model is not None


# MODEL as a PyTorch model (edgeq.torch_in): MODULE:FACTORY with its weights and input shapes, or a .pt2 program.
MODEL_HELP = "FP32 ONNX model, or a PyTorch model: MODULE:FACTORY (with --weights and --input-shape) or a torch.export .pt2 program."
Weights = Annotated[Optional[Path], typer.Option(help="MODEL as MODULE:FACTORY: its state dict, torch.save(model.state_dict(), PATH) (loaded weights-only).")]
InputShape = Annotated[Optional[list[str]], typer.Option(help="MODEL as MODULE:FACTORY: an example input's shape, e.g. 1,3,32,32 (repeat for each forward argument); for a .pt2, instead of its saved inputs.")]
InputDtype = Annotated[str, typer.Option(help="MODEL as MODULE:FACTORY or .pt2: the example inputs' torch dtype.")]


def model_argument(model: Path, weights: Path | None, input_shape: list[str] | None, input_dtype: str = "float32"):
    """MODEL as given: the path of an ONNX (or .tflite) file, or a PyTorch model exported to ONNX in memory (a Model
    whose notes say which exporter wrote it)."""
    from edgeq.torch_in import is_torch_model, load_torch, parse_shape

    if is_torch_model(model):
        return load_torch(str(model), weights, [parse_shape(s) for s in input_shape or ()], input_dtype)
    for flag, value in (("--weights", weights), ("--input-shape", input_shape)):
        if value:
            raise UserError(f"{flag} is for a PyTorch MODEL, and {model} is not one",
                            f"give MODEL as MODULE:FACTORY (or a .pt2 program), or leave out {flag}")
    return model


def model_arguments(models: list[Path], weights: Path | None, input_shape: list[str] | None, input_dtype: str = "float32") -> list:
    """`bench`'s MODELS: --weights and --input-shape go to the PyTorch ones, and need one."""
    from edgeq.torch_in import is_torch_model

    if not any(is_torch_model(m) for m in models):
        return [model_argument(m, weights, input_shape, input_dtype) for m in models]
    return [model_argument(m, weights, input_shape, input_dtype) if is_torch_model(m) else m for m in models]


def auto_model(model: Path, torch_model: str | None, weights: Path | None, train: Path | None, input_shape: list[str] | None,
               input_dtype: str):
    """`auto`'s MODEL and the factory QAT fine-tunes (None: no QAT). An ONNX MODEL takes QAT's PyTorch model from
    --torch-model; a MODULE:FACTORY MODEL is that model itself, fine-tuned when --train is given."""
    from edgeq.torch_in import is_torch_model

    if not is_torch_model(model):
        source = model_argument(model, None, input_shape, input_dtype)
        return source, torch_model if qat_flags(torch_model, weights=weights, train=train) else None
    if torch_model is not None:
        raise UserError("--torch-model names the PyTorch model an ONNX MODEL was exported from, and MODEL is a PyTorch model itself",
                        "leave out --torch-model: with --train, QAT fine-tunes MODEL")
    if train is not None and model.suffix == ".pt2":
        raise UserError("QAT fine-tunes a MODULE:FACTORY, and MODEL is a .pt2 program", "give MODEL as MODULE:FACTORY with --weights, or leave out --train")
    return model_argument(model, weights, input_shape, input_dtype), str(model) if train is not None else None

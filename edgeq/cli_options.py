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
from typing import Annotated

import typer

from edgeq.errors import UserError
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

Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
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

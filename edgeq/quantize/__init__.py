"""edgeq.quantize(model, config, calib=...): one call, a config object says what."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeq.data import Dataset
from edgeq.errors import ConfigError
from edgeq.model import Model, load
from edgeq.quantize.config import RECIPES, Fp16, Int4WeightOnly, Int8Dynamic, Int8Static
from edgeq.quantize.summary import QuantSummary

Config = Fp16 | Int8Dynamic | Int8Static | Int4WeightOnly


@dataclass
class QuantizedModel(Model):
    """A quantized model and the summary of what was done to it."""

    summary: QuantSummary = field(default=None)  # type: ignore[assignment]


Handler = Callable[[Model, Any, "Dataset | None"], tuple[Model, QuantSummary]]
HANDLERS: dict[type, Handler] = {}


def handles(kind: type) -> Callable[[Handler], Handler]:
    """Register the function that carries out configs of `kind` (one per config type: no isinstance ladder)."""
    def register(func: Handler) -> Handler:
        HANDLERS[kind] = func
        return func
    return register


@handles(Fp16)
def _fp16(source: Model, config: Fp16, calib: Dataset | None) -> tuple[Model, QuantSummary]:
    from edgeq.quantize.fp16 import convert_fp16

    return convert_fp16(source, config)


@handles(Int8Dynamic)
def _int8_dynamic(source: Model, config: Int8Dynamic, calib: Dataset | None) -> tuple[Model, QuantSummary]:
    from edgeq.quantize.int8 import quantize_dynamic

    return quantize_dynamic(source, config)


@handles(Int8Static)
def _int8_static(source: Model, config: Int8Static, calib: Dataset | None) -> tuple[Model, QuantSummary]:
    from edgeq.quantize.int8 import quantize_static

    result, summary, _ = quantize_static(source, config, calib)
    return result, summary


@handles(Int4WeightOnly)
def _int4(source: Model, config: Int4WeightOnly, calib: Dataset | None) -> tuple[Model, QuantSummary]:
    from edgeq.quantize.int4 import quantize_int4

    return quantize_int4(source, config, calib)


def quantize(model: Model | str | Path, config: Config, calib: Dataset | None = None) -> QuantizedModel:
    """Quantize `model` as `config` says; static recipes need `calib`. The summary records the recipe
    (`summary.recipe`, the config's `to_dict()`).

    >>> q = edgeq.quantize("model.onnx", edgeq.Int8Static(method="percentile"), calib=edgeq.Dataset.from_npz("calib.npz"))  # doctest: +SKIP
    >>> q.summary.quantized                                            # doctest: +SKIP
    {'Conv': 4, 'Gemm': 1}
    >>> q.save("model_int8.onnx")                                      # doctest: +SKIP
    """
    handler = HANDLERS.get(type(config))
    if handler is None:
        raise ConfigError(f"unknown quantization config {type(config).__name__}", f"use one of: {', '.join(RECIPES)}")
    source = load(model) if isinstance(model, (str, Path)) else model
    result, summary = handler(source, config, calib)
    summary.recipe = config.to_dict()
    summary.notes = [*source.notes, *summary.notes]  # how the source came to be (e.g. which exporter wrote it) first
    return QuantizedModel(result.proto, source.path, summary=summary)

"""edgeq.quantize(model, config, calib=...): one call, a config object says what."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgeq.data import Dataset
from edgeq.errors import ConfigError
from edgeq.model import Model, load
from edgeq.quantize.config import Fp16, Int4WeightOnly, Int8Dynamic, Int8Static
from edgeq.quantize.summary import QuantSummary

Config = Fp16 | Int8Dynamic | Int8Static | Int4WeightOnly


@dataclass
class QuantizedModel(Model):
    """A quantized model and the summary of what was done to it."""

    summary: QuantSummary = field(default=None)  # type: ignore[assignment]


def quantize(model: Model | str | Path, config: Config, calib: Dataset | None = None) -> QuantizedModel:
    """Quantize `model` as `config` says; static recipes need `calib`.

    >>> q = edgeq.quantize("model.onnx", edgeq.Int8Static(method="percentile"), calib=edgeq.Dataset.from_npz("calib.npz"))  # doctest: +SKIP
    >>> q.summary.quantized                                            # doctest: +SKIP
    {'Conv': 4, 'Gemm': 1}
    >>> q.save("model_int8.onnx")                                      # doctest: +SKIP
    """
    source = load(model) if isinstance(model, (str, Path)) else model
    if isinstance(config, Fp16):
        from edgeq.quantize.fp16 import convert_fp16

        result, summary = convert_fp16(source, config)
    elif isinstance(config, Int8Dynamic):
        from edgeq.quantize.int8 import quantize_dynamic

        result, summary = quantize_dynamic(source, config)
    elif isinstance(config, Int8Static):
        from edgeq.quantize.int8 import quantize_static

        result, summary, _ = quantize_static(source, config, calib)
    elif isinstance(config, Int4WeightOnly):
        from edgeq.quantize.int4 import quantize_int4

        result, summary = quantize_int4(source, config, calib)
    else:
        raise ConfigError(f"unknown quantization config {type(config).__name__}", "use Fp16, Int8Dynamic, Int8Static or Int4WeightOnly")
    return QuantizedModel(result.proto, source.path, summary=summary)

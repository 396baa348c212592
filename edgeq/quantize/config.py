"""Recipes: a config object says what to produce; `edgeq.quantize` does it.

Each config checks its own values when it is made (one clear ConfigError naming the field and its choices), and
reads and writes itself as a plain dict (`to_dict` / `from_dict`), so summaries and reports record the exact recipe
and a recipe saved as JSON makes the same model again. The vocabularies below are the one copy of each set of
choices: the handlers and the CLI read them from here.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from edgeq.calibrate import METHODS
from edgeq.errors import ConfigError

# ONNX Runtime's CPU provider runs these in int8 after QDQ fusion. Elementwise ops (Add, Mul) and pooling
# also have int8 kernels, but on real models (PP-OCR det, measured) quantizing them adds requantization work
# and loses accuracy for no speed: compute-heavy ops only by default.
COMPUTE_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Relu/Clip after a quantized op vanish into its output range (the quantizer removes them); without them in the
# list a DQ→Relu→Q round trip stays in the graph (digits CNN: 12.2 → 9.0 ms at 1 thread, measured).
# Shape and pooling ops pass int8 data through unchanged; they are quantized only when their input already is,
# which saves a DQ/Q round trip (digits CNN: 12.3 → 10.9 ms, measured).
STATIC_OP_TYPES = COMPUTE_OP_TYPES + ("Relu", "Clip", "MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze")
# Dynamic quantization turns Conv into ConvInteger, 5-8x slower than FP32 on x86 CPUs: matrix ops only.
DYNAMIC_OP_TYPES = ("MatMul", "Gemm", "Attention", "LSTM", "GRU")
# Float16 is unsafe for ops whose intermediate sums or exponentials overflow or lose too much precision.
FP16_BLOCK_OPS = ("Softmax", "LogSoftmax", "LayerNormalization", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2",
                  "Pow", "Sqrt", "Exp", "Log", "Erf", "Range", "CumSum", "TopK", "NonMaxSuppression", "RoiAlign", "Resize",
                  "Upsample", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "EyeLike")

ACTIVATION_TYPES = ("uint8", "int8")
WEIGHT_BITS = (8, 4)
STATIC_METHODS = (*METHODS, "auto")
WEIGHT_RANGES = ("minmax", "mse")
ROUNDINGS = ("nearest", "adaround")
COVERAGES = ("measured", "all")
HEAD_POLICIES = ("auto", "off")
INT4_ALGORITHMS = ("auto", "rtn", "gptq", "awq", "adaround")
INT4_FORMATS = ("nbits", "qdq")
INT4_BLOCK_SIZES = (16, 32, 64, 128)


class Recipe:
    """What every config shares: validation on construction, and a plain-dict form (`kind` names the config)."""

    CHOICES: ClassVar[dict[str, tuple]] = {}

    def __post_init__(self) -> None:
        for name, allowed in self.CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{type(self).__name__}: {value!r} is not a valid {name}",
                                  f"use one of: {', '.join(map(str, allowed))}")
        for f in dataclasses.fields(self):  # sequences of names arrive as lists from JSON and the CLI
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        self.check()

    def check(self) -> None:
        """Checks beyond a choice from a list (ranges, combinations); none by default."""

    def to_dict(self) -> dict[str, Any]:
        """The recipe as JSON types, `kind` first.

        >>> Int8Static(method="minmax").to_dict()["method"], Int8Static().to_dict()["kind"]
        ('minmax', 'Int8Static')
        """
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"kind": type(self).__name__, **{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Recipe":
        """The config a `to_dict` wrote; unknown kinds or fields are a ConfigError.

        >>> Recipe.from_dict(Int8Static(weight_bits=4).to_dict()) == Int8Static(weight_bits=4)
        True
        """
        values = dict(values)
        kind = values.pop("kind", cls.__name__ if cls is not Recipe else None)
        target = RECIPES.get(kind)
        if target is None or (cls is not Recipe and target is not cls):
            raise ConfigError(f"unknown recipe kind {kind!r}", f"use one of: {', '.join(RECIPES)}")
        names = {f.name for f in dataclasses.fields(target)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"{kind} has no field {', '.join(unknown)}", f"its fields are: {', '.join(sorted(names))}")
        return target(**values)


def _positive_int(config: Recipe, name: str, allow_none: bool = False) -> None:
    value = getattr(config, name)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        unset = ", or leave it unset to use all samples" if allow_none else ""
        raise ConfigError(f"{name} is {value!r}", f"give a whole number of at least 1{unset} (--{name.replace('_', '-')} on the command line)")


@dataclass(frozen=True)
class Fp16(Recipe):
    """Weights and activations in float16; inputs/outputs stay float32 unless `keep_io_types` is False.

    >>> edgeq.quantize(model, edgeq.Fp16(block_ops=edgeq.Fp16().block_ops + ("Sigmoid",)))   # doctest: +SKIP
    """

    keep_io_types: bool = True
    block_ops: tuple[str, ...] = FP16_BLOCK_OPS
    block_nodes: tuple[str, ...] = ()

    precision = "fp16"


@dataclass(frozen=True)
class Int8Dynamic(Recipe):
    """Int8 weights (per channel where the op allows), activations quantized at run time.

    `op_types` adds ops; including Conv is allowed but reported with its measured slowdown.
    """

    per_channel: bool = True
    op_types: tuple[str, ...] = DYNAMIC_OP_TYPES
    exclude_nodes: tuple[str, ...] = ()

    precision = "int8"
    mode = "dynamic"


@dataclass(frozen=True)
class Int8Static(Recipe):
    """Static INT8 in QDQ format: int8 symmetric weights (per channel by default), activation ranges calibrated.

    activation_type "uint8" (asymmetric) is the fast path on x86 (VNNI u8×s8); "int8" suits NPUs that want it.
    method: minmax, percentile, entropy, mse, or auto (default: mse unless another observer's outputs are clearly closer to FP32).

    >>> cfg = Int8Static(method="minmax")
    >>> cfg.per_channel, cfg.activation_type
    (True, 'uint8')
    """

    # "auto" is the default: mse (MSE-optimal clipping, the most robust single method: on PP-OCR det min/max ranges
    # give a thresholded-map IoU of 0.69/0.75 over two seeds, percentile 99.99 0.70/0.93, mse 0.91/0.89) unless
    # another observer's quantized outputs are clearly closer to FP32 (quantize/method_choice.py: PP-OCRv4 rec
    # 93.1 % → 97.2 % per-step agreement, PP-PicoDet box F1 0.58 → 0.68).
    method: str = "auto"
    percentile: float = 99.99
    per_channel: bool = True
    activation_type: str = "uint8"
    op_types: tuple[str, ...] = STATIC_OP_TYPES
    exclude_nodes: tuple[str, ...] = ()
    batch_size: int = 16
    max_samples: int | None = None
    # 4 gives W4A8: int4 symmetric weights (ONNX Runtime's range [-8, 7], opset 21), 8-bit activations; for edge
    # targets whose kernels take 4-bit weights. QAT (edgeq.qat) takes the same field.
    weight_bits: int = 8
    # Accuracy repairs (edgeq.quantize.repair; measured in bench/repair.py).
    weight_range: str = "minmax"          # "mse": per-channel weight clipping that minimises the quantization error
    bias_correction: bool = False         # shift Conv/Gemm and MatMul+Add biases by their mean output error on calibration data
    equalize: bool = False                # cross-layer equalization of consecutive Conv/Gemm layers (depthwise too)
    smoothquant: float | str | None = None  # alpha (e.g. 0.5) for MatMul/Gemm activation outliers, or "auto" per layer
    # "adaround": learned rounding of Conv/Gemm/MatMul weights on calibration data (edgeq.quantize.repair.adaround;
    # measured in bench/rounding.py), on the quantizer's grid; "nearest": round to nearest.
    rounding: str = "nearest"
    # "measured": nodes whose int8 kernel plus Q/DQ glue measures slower than the float kernel on this machine, at
    # `threads` intra-op threads, stay float, and the summary gives the measured speed-up (edgeq.quantize.coverage;
    # the default of `edgeq quantize`); "all": every node of `op_types` is quantized, the placement that edgeq.auto,
    # edgeq.qat and edgeq.analyze compose with (they choose float layers and measure latency themselves).
    coverage: str = "all"
    threads: int = 1
    # "auto": a recognised detector head (edgeq.quantize.detection_head) keeps its box decoding and its outputs
    # that mix coordinates with scores float; "off": the head is quantized like the rest of the graph.
    detection_head: str = "auto"

    precision = "int8"
    mode = "static"
    CHOICES: ClassVar[dict[str, tuple]] = {"method": STATIC_METHODS, "activation_type": ACTIVATION_TYPES, "weight_bits": WEIGHT_BITS,
                                           "weight_range": WEIGHT_RANGES, "rounding": ROUNDINGS, "coverage": COVERAGES,
                                           "detection_head": HEAD_POLICIES}

    def check(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile {self.percentile} is out of range", "give a value in (50, 100], e.g. 99.99")
        alpha = self.smoothquant
        if alpha is not None and alpha != "auto" and not (isinstance(alpha, (int, float)) and 0.0 < alpha < 1.0):
            raise ConfigError(f"smoothquant alpha {alpha!r} is out of range", "give a migration strength in (0, 1), e.g. 0.5, or auto")
        for name in ("batch_size", "threads"):
            _positive_int(self, name)
        _positive_int(self, "max_samples", allow_none=True)


@dataclass(frozen=True)
class Int4WeightOnly(Recipe):
    """INT4 weights in blocks of `block_size` along the reduction axis (a scale per block, and a zero point when
    asymmetric); activations stay float. `algorithm` "auto" (default) is "gptq" with calibration data, "rtn" without;
    "rtn" rounds to nearest; "gptq" needs calibration data and
    compensates each column's rounding error with the inputs' Hessian; "awq" needs calibration data and scales
    each input channel by its mean |activation|^alpha (searched) before rounding, and clips block ranges;
    "adaround" needs calibration data and learns each weight's rounding (up or down) on RTN's grid to minimise the
    layer's output error with the same Hessian (tools measured against gptq in bench/int4.py).

    `format` "nbits" writes ONNX Runtime's MatMulNBits (the fast CPU path, measured); "qdq" writes standard blocked
    DequantizeLinear (int4, opset 21) → MatMul. `accuracy_level` 4 lets MatMulNBits multiply with int8 activations
    (VNNI); 0 computes in float32. Layers kept at INT8: `int8_layers` by name, `int8_first_last`, and the
    `int8_auto` most sensitive ones (relative output error of INT4 on the calibration data).

    >>> cfg = Int4WeightOnly(block_size=64, algorithm="gptq")
    >>> cfg.precision, cfg.mode, cfg.symmetric
    ('int4', 'weight-only', True)
    """

    block_size: int = 32
    symmetric: bool = True
    algorithm: str = "auto"
    format: str = "nbits"
    accuracy_level: int = 4
    op_types: tuple[str, ...] = ("MatMul", "Gemm")
    embeddings: bool = False
    exclude_nodes: tuple[str, ...] = ()
    int8_layers: tuple[str, ...] = ()
    int8_first_last: bool = False
    int8_auto: int = 0
    damp: float = 0.01
    batch_size: int = 16
    max_samples: int | None = None
    threads: int = 2

    precision = "int4"
    mode = "weight-only"
    CHOICES: ClassVar[dict[str, tuple]] = {"block_size": INT4_BLOCK_SIZES, "algorithm": INT4_ALGORITHMS, "format": INT4_FORMATS,
                                           "accuracy_level": (0, 1, 2, 3, 4)}

    def check(self) -> None:
        if not (math.isfinite(self.damp) and self.damp >= 0):
            raise ConfigError(f"damp {self.damp!r} must be a finite number >= 0", "give e.g. damp=0.01")
        for name in ("batch_size", "threads"):
            _positive_int(self, name)
        _positive_int(self, "max_samples", allow_none=True)
        if isinstance(self.int8_auto, bool) or not isinstance(self.int8_auto, int) or self.int8_auto < 0:
            raise ConfigError(f"int8_auto must be a whole number >= 0, not {self.int8_auto!r}", "give the number of layers to keep at INT8")


RECIPES: dict[str, type[Recipe]] = {c.__name__: c for c in (Fp16, Int8Dynamic, Int8Static, Int4WeightOnly)}

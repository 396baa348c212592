"""Recipes: a config object says what to produce; `edgeq.quantize` does it."""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Fp16:
    """Weights and activations in float16; inputs/outputs stay float32 unless `keep_io_types` is False.

    >>> edgeq.quantize(model, edgeq.Fp16(block_ops=edgeq.Fp16().block_ops + ("Sigmoid",)))   # doctest: +SKIP
    """

    keep_io_types: bool = True
    block_ops: tuple[str, ...] = FP16_BLOCK_OPS
    block_nodes: tuple[str, ...] = ()

    precision = "fp16"


@dataclass(frozen=True)
class Int8Dynamic:
    """Int8 weights (per channel where the op allows), activations quantized at run time.

    `op_types` adds ops; including Conv is allowed but reported with its measured slowdown.
    """

    per_channel: bool = True
    op_types: tuple[str, ...] = DYNAMIC_OP_TYPES
    exclude_nodes: tuple[str, ...] = ()

    precision = "int8"
    mode = "dynamic"


@dataclass(frozen=True)
class Int8Static:
    """Static INT8 in QDQ format: int8 symmetric weights (per channel by default), activation ranges calibrated.

    activation_type "uint8" (asymmetric) is the fast path on x86 (VNNI u8×s8); "int8" suits NPUs that want it.
    method: minmax, percentile, entropy, mse, or auto (the observer with the best output fidelity on held-back data).

    >>> cfg = Int8Static(method="minmax")
    >>> cfg.per_channel, cfg.activation_type
    (True, 'uint8')
    """

    # MSE-optimal clipping is the default: on PP-OCR det (two seeds of rendered pages) min/max ranges give a
    # thresholded-map IoU of 0.69/0.75, percentile 99.99 0.70/0.93, mse 0.91/0.89 — the most robust.
    method: str = "mse"
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
    # Accuracy repairs (edgeq.quantize.repair; measured in bench/repair.py). method "auto" tries every observer and
    # keeps the one with the best output SQNR vs FP32 on held-back calibration batches.
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


@dataclass(frozen=True)
class Int4WeightOnly:
    """INT4 weights in blocks of `block_size` along the reduction axis (a scale per block, and a zero point when
    asymmetric); activations stay float. `algorithm` "auto" (default) is "gptq" with calibration data, "rtn" without;
    "rtn" rounds to nearest; "gptq" needs calibration data and
    compensates each column's rounding error with the inputs' Hessian; "awq" needs calibration data and scales
    each input channel by its mean |activation|^alpha (searched) before rounding, and clips block ranges.

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

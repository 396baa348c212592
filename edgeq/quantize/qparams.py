"""Affine quantization arithmetic: scale and zero point from a range, quantize, dequantize.

The same rules as the QDQ graphs edgeq writes: the range always contains 0 (so zero is exactly representable, which
padding and ReLU need); symmetric int8 uses [-127, 127] so that +x and -x quantize alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QType:
    name: str
    qmin: int
    qmax: int
    dtype: type

    @staticmethod
    def of(name: str, symmetric: bool = False, bits: int = 8) -> "QType":
        if name.startswith("u"):
            return QType(name, 0, 2**bits - 1, np.uint8)
        low = -(2 ** (bits - 1)) + (1 if symmetric else 0)
        return QType(name, low, 2 ** (bits - 1) - 1, np.int8)


def qparams(low: np.ndarray | float, high: np.ndarray | float, qtype: QType, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point for ranges [low, high], element-wise (per tensor or per channel).

    >>> s, z = qparams(-1.0, 3.0, QType.of("uint8"), symmetric=False)
    >>> float(s), int(z)
    (0.01568627543747425, 64)
    """
    low = np.minimum(np.asarray(low, np.float64), 0.0)
    high = np.maximum(np.asarray(high, np.float64), 0.0)
    if symmetric:
        absmax = np.maximum(np.abs(low), np.abs(high))
        scale = 2 * absmax / (qtype.qmax - qtype.qmin)
        zero = np.full(scale.shape, (qtype.qmax + qtype.qmin + 1) // 2 if qtype.qmin == 0 else 0, np.int64)
    else:
        scale = (high - low) / (qtype.qmax - qtype.qmin)
    # A range too narrow for a normal float32 scale (as ONNX Runtime's own rule) gets scale 1: its values round to
    # the zero point, i.e. to 0 within that range; a denormal or zero scale would divide by zero.
    scale = np.where(scale >= np.finfo(np.float32).tiny, scale, 1.0)
    if not symmetric:
        zero = np.clip(np.round(qtype.qmin - low / scale), qtype.qmin, qtype.qmax).astype(np.int64)
    return scale.astype(np.float32), zero.astype(qtype.dtype)


def quantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, qtype: QType) -> np.ndarray:
    """Round half to even (as ONNX QuantizeLinear does) and saturate."""
    q = np.rint(np.asarray(x, np.float32) / scale) + zero.astype(np.int64)
    return np.clip(q, qtype.qmin, qtype.qmax).astype(qtype.dtype)


def dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    return ((q.astype(np.int64) - zero.astype(np.int64)) * scale).astype(np.float32)

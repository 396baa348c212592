"""AdaRound for block-wise INT4 weight-only layers (MatMulNBits): the learned rounding of `repair/adaround.py` on the
grid that round to nearest chose (each block's scale and zero point stay), so the packed format is unchanged.

A weight-only layer sees FP32 inputs, so its output error ||x W - x W~||² over the calibration rows depends on them
only through H = Σ xᵀx, the statistic GPTQ collects too (one streaming pass, K² per activation): the layer's
`Moments` are H, Σ t xᵀ = Wᵀ H and Σ t² = tr(Wᵀ H W), exact, whatever the number of rows. Each output column's
rounding is chosen floor or ceil by the rectified-sigmoid relaxation with the annealed regulariser.
"""
from __future__ import annotations

import numpy as np

from edgeq.quantize.packing import BlockQuant, quantize_rtn
from edgeq.quantize.repair.adaround import AdaRoundSettings, Moments, learn_rounding


def quantize_adaround(w: np.ndarray, h: np.ndarray, rows: int, block: int, bits: int = 4, symmetric: bool = True,
                      settings: AdaRoundSettings = AdaRoundSettings()) -> BlockQuant:
    """W[K, N] (MatMul's B) with H[K, K] = XᵀX / rows from `rows` calibration rows → BlockQuant on RTN's grid.

    >>> rng = np.random.default_rng(0); x = rng.normal(size=(256, 32)) * rng.uniform(0.1, 3, 32)
    >>> w = rng.normal(size=(32, 8)).astype(np.float32); h = x.T @ x / len(x)
    >>> q = quantize_adaround(w, h, len(x), 16, settings=AdaRoundSettings(iterations=500))
    >>> bool(np.linalg.norm(x @ (q.dequantize() - w)) < np.linalg.norm(x @ (quantize_rtn(w, 16).dequantize() - w)))
    True
    """
    k, n = w.shape
    nearest = quantize_rtn(w, block, bits, symmetric)
    scale, zero = (_per_weight(v, block, k) for v in (nearest.scales, nearest.zero_points))
    weight = np.asarray(w, np.float64).T[None]                                  # (1, N, K): outputs × inputs
    gram = np.asarray(h, np.float64)[None] * rows
    moments = Moments(width=k, rows=rows, gram=gram, cross=np.matmul(weight, gram),
                      target=float(np.sum(np.matmul(weight, gram) * weight)))
    signed, _ = learn_rounding(weight.astype(np.float32), scale, -zero, 2 ** bits - 1 - zero, moments, settings)
    codes = nearest.codes.reshape(n, -1).copy()
    codes[:, :k] = (signed[0] + zero[0]).astype(codes.dtype)
    return BlockQuant(codes.reshape(nearest.codes.shape), nearest.scales, nearest.zero_points, k, block, bits, symmetric)


def _per_weight(per_block: np.ndarray, block: int, k: int) -> np.ndarray:
    """(N, blocks) → (1, N, K): each block's value for each of its weights."""
    return np.repeat(per_block, block, axis=1)[:, :k][None]

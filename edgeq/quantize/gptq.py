"""GPTQ (Frantar et al., 2022): quantize a weight column by column along the reduction axis and spread each column's
rounding error over the columns not yet quantized, weighted by the inverse Hessian H = 2·XᵀX of the layer's inputs.

Block-wise scales are chosen when the first column of a block is reached, from the weights as updated so far (the
reference implementation's `groupsize` behaviour), so the result is exactly representable by MatMulNBits.
"""
from __future__ import annotations

import numpy as np

from edgeq.quantize.packing import BlockQuant, block_params

LAZY_BATCH = 128  # columns updated together before the rest of the matrix (the reference's blocksize)


def hessian(x: np.ndarray) -> np.ndarray:
    """Sum of xᵀx over rows of activations x[..., K] (float64); add batches together, divide by the row count."""
    x2 = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    return x2.T @ x2


def quantize_gptq(w: np.ndarray, h: np.ndarray, block: int, bits: int = 4, symmetric: bool = True,
                  damp: float = 0.01) -> BlockQuant:
    """W[K, N] (MatMul's B) with H[K, K] from calibration inputs → BlockQuant.

    >>> rng = np.random.default_rng(0); x = rng.normal(size=(256, 32)); w = rng.normal(size=(32, 8)).astype(np.float32)
    >>> q = quantize_gptq(w, hessian(x), 16)
    >>> from edgeq.quantize.packing import quantize_rtn
    >>> bool(np.linalg.norm(x @ (q.dequantize() - w)) < np.linalg.norm(x @ (quantize_rtn(w, 16).dequantize() - w)))
    True
    """
    k, n = w.shape
    blocks = -(-k // block)
    kp = blocks * block
    W = np.zeros((n, kp), np.float64)
    W[:, :k] = np.asarray(w, np.float64).T
    H = np.eye(kp, dtype=np.float64)
    H[:k, :k] = h
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H[np.diag_indices(kp)] += damp * float(np.mean(np.diag(H)[:k]))
    hinv = _inverse_cholesky_upper(H)
    codes = np.zeros((n, kp), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zeros = np.zeros((n, blocks), np.float32)
    qmax = 2 ** bits - 1
    for i1 in range(0, kp, LAZY_BATCH):
        i2 = min(i1 + LAZY_BATCH, kp)
        W1 = W[:, i1:i2].copy()
        err1 = np.zeros_like(W1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % block == 0:
                g = col // block
                seg = np.concatenate([W1[:, i:], W[:, i2:]], axis=1)[:, :block] if i + block > i2 - i1 else W1[:, i:i + block]
                s, z = block_params(seg.astype(np.float32), bits, symmetric)
                scales[:, g], zeros[:, g] = s, z
            g = col // block
            s, z = scales[:, g].astype(np.float64), zeros[:, g].astype(np.float64)
            c = np.clip(np.round(W1[:, i] / s) + z, 0, qmax)
            codes[:, col] = c
            err = (W1[:, i] - (c - z) * s) / h1[i, i]
            W1[:, i:] -= np.outer(err, h1[i, i:])
            err1[:, i] = err
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return BlockQuant(codes.reshape(n, blocks, block), scales, zeros, k, block, bits, symmetric)


def _inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor of H⁻¹ (what GPTQ's updates use); more damping if H is not positive definite."""
    damp = 0.0
    for _ in range(8):
        try:
            hd = h + damp * np.eye(len(h))
            return np.linalg.cholesky(np.linalg.inv(hd)).T
        except np.linalg.LinAlgError:
            damp = max(damp * 10, 1e-6 * float(np.mean(np.diag(h))) or 1e-6)
    raise np.linalg.LinAlgError("GPTQ: the calibration Hessian is not positive definite")

"""4-bit packing and block-wise weight quantization along the reduction axis (numpy only).

Two nibbles per byte, the first element in the low nibble (ONNX INT4/UINT4 and ONNX Runtime's MatMulNBits agree
on this order). A weight W[K, N] (MatMul's B) is cut into blocks of `block` rows along K for every output column;
the last block is padded with zeros (which quantize to the zero point, so padding never changes a scale).

>>> codes = np.array([1, 15, 7], dtype=np.uint8)
>>> pack_int4(codes).tolist(), unpack_int4(pack_int4(codes), 3).tolist()
([241, 7], [1, 15, 7])
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np



def pack_int4(codes: np.ndarray) -> np.ndarray:
    """Pack 4-bit codes (uint8 0..15, or int8 -8..7 stored as two's complement nibbles) two per byte, flattened in
    C order; an odd count gets a zero high nibble in the last byte."""
    flat = np.asarray(codes).reshape(-1).astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, count: int, signed: bool = False) -> np.ndarray:
    """Inverse of `pack_int4`: the first `count` codes, uint8 0..15 (or int8 -8..7 when `signed`)."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    out = np.empty(packed.size * 2, np.uint8)
    out[0::2], out[1::2] = packed & 0x0F, packed >> 4
    out = out[:count]
    return ((out.astype(np.int16) ^ 8) - 8).astype(np.int8) if signed else out


@dataclass
class BlockQuant:
    """A weight quantized block-wise: codes[N, blocks, block] in 0..(2^bits - 1), scales[N, blocks] and
    zero_points[N, blocks] (the implicit mid-point 2^(bits-1) when symmetric). W ≈ (codes - zero_point) * scale."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    k: int
    block: int
    bits: int = 4
    symmetric: bool = True

    def dequantize(self) -> np.ndarray:
        """W[K, N] in float32."""
        w = (self.codes.astype(np.float32) - self.zero_points[..., None]) * self.scales[..., None]
        return w.reshape(len(w), -1)[:, :self.k].T.astype(np.float32)


def blocked(w: np.ndarray, block: int) -> np.ndarray:
    """W[K, N] → [N, blocks, block] with zero padding of the last block."""
    k, n = w.shape
    blocks = -(-k // block)
    padded = np.zeros((blocks * block, n), np.float32)
    padded[:k] = w
    return padded.T.reshape(n, blocks, block)


def block_params(wb: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scales and zero points for blocks wb[..., block] (last axis is the block).

    Symmetric follows ONNX Runtime and llama.cpp's Q4_0: the value of largest magnitude maps exactly to -2^(bits-1),
    so the whole code range is used. Asymmetric spans [min(w, 0), max(w, 0)] with an integer zero point.
    """
    qmax = 2 ** bits - 1
    mid = 2 ** (bits - 1)
    if symmetric:
        idx = np.abs(wb).argmax(axis=-1)[..., None]
        extreme = np.take_along_axis(wb, idx, axis=-1)[..., 0]
        scales = extreme / -mid
        zero = np.full(scales.shape, mid, np.float32)
    else:
        lo, hi = np.minimum(wb.min(axis=-1), 0), np.maximum(wb.max(axis=-1), 0)
        scales = (hi - lo) / qmax
        safe = np.where(scales == 0, 1, scales)
        zero = np.clip(np.round(-lo / safe), 0, qmax)
    scales = np.where(scales == 0, 1.0, scales).astype(np.float32)
    return scales, zero.astype(np.float32)


def quantize_codes(wb: np.ndarray, scales: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    return np.clip(np.round(wb / scales[..., None]) + zero[..., None], 0, 2 ** bits - 1).astype(np.uint8)


def quantize_rtn(w: np.ndarray, block: int, bits: int = 4, symmetric: bool = True, clip: np.ndarray | None = None) -> BlockQuant:
    """Round to nearest, block-wise along K, for W[K, N]. `clip[N, blocks]` (AWQ's clipping) first clamps each
    block to ±ratio·max|w|, trading a few clipped outliers for a finer step on the rest; 1 changes nothing.

    >>> q = quantize_rtn(np.linspace(-1, 1, 64, dtype=np.float32).reshape(32, 2), 16)
    >>> float(np.abs(q.dequantize() - np.linspace(-1, 1, 64).reshape(32, 2)).max()) < 0.07
    True
    """
    wb = blocked(np.asarray(w, np.float32), block)
    if clip is not None:
        bound = np.abs(wb).max(axis=-1, keepdims=True) * np.asarray(clip, np.float32)[..., None]
        wb = np.clip(wb, -bound, bound)
    scales, zero = block_params(wb, bits, symmetric)
    return BlockQuant(quantize_codes(wb, scales, zero, bits), scales, zero, w.shape[0], block, bits, symmetric)


def nbits_tensors(q: BlockQuant) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """MatMulNBits' B[N, blocks, block*bits/8] uint8, scales[N*blocks] float32, packed zero points (None when
    symmetric: the op's default zero point is the mid-point)."""
    n, blocks, block = q.codes.shape
    if q.bits == 4:
        b = pack_int4(q.codes).reshape(n, blocks, block // 2)
    else:
        b = q.codes.astype(np.uint8)
    zp = None
    if not q.symmetric:
        z = q.zero_points.astype(np.uint8)
        zp = np.stack([pack_int4(row) for row in z]) if q.bits == 4 else z
    return b, q.scales.reshape(-1).astype(np.float32), zp


def dq_tensors(q: BlockQuant) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Blocked DequantizeLinear (axis 0) operands: codes[K, N] (int8 -8..7 when symmetric, uint8 otherwise), scales
    [blocks, N] and zero points [blocks, N] (None when symmetric)."""
    n = q.codes.shape[0]
    codes = q.codes.reshape(n, -1)[:, :q.k].T
    if q.symmetric:
        return (codes.astype(np.int16) - 2 ** (q.bits - 1)).astype(np.int8), q.scales.T.copy(), None
    return codes.copy(), q.scales.T.copy(), q.zero_points.T.astype(np.uint8)

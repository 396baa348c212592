"""Accuracy repairs for static INT8, each an option of `Int8Static` and each measured in bench/repair.py.

- `equalize` (cross-layer equalization, Nagel et al. 2019): rescale consecutive Conv/Gemm layers so that each
  channel's weight range matches across the pair; FP32 outputs are unchanged (ReLU and pooling commute with
  positive per-channel scales).
- `smooth` (SmoothQuant, Xiao et al. 2023): divide MatMul/Gemm activations per input channel by s and multiply the
  weights by s, migrating activation outliers into the weights; FP32 outputs are unchanged.
- `clip_weights` (weight range setting): per channel, the symmetric int8 range that minimises the weight's squared
  quantization error instead of plain min/max; weights are clipped to it so any quantizer picks it up.
- `correct_bias` (empirical bias correction): after quantization, shift each Conv/Gemm bias by the mean difference
  between its FP32 and its quantized output on calibration data, layer by layer.
"""
from edgeq.quantize.repair.bias_correction import correct_bias
from edgeq.quantize.repair.equalize import equalize
from edgeq.quantize.repair.smoothquant import smooth
from edgeq.quantize.repair.weight_range import clip_weights

__all__ = ["clip_weights", "correct_bias", "equalize", "smooth"]

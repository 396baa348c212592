"""Fake quantization in torch with the deployed arithmetic: the rules of edgeq.quantize.qparams and of ONNX
QuantizeLinear (round half to even, saturate to the integer type), straight-through gradients.

Weights: symmetric, per output channel or per tensor; int8 uses [-127, 127] (as the static recipe), int4 uses
ONNX Runtime's [-8, 7] with scale 2·absmax/15 (its symmetric int4 weights). Activations: the scale and zero point
of the PTQ calibration, saturating to the full integer type as QuantizeLinear does. Biases: int32 with scale
input_scale × weight_scale, zero point 0 (as ONNX Runtime quantizes them). Optional LSQ (Esser et al., 2020):
the scales are parameters, learned with the gradient-scale 1/sqrt(numel·qmax).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from edgeq.quantize.qparams import QType


def weight_qtype(bits: int) -> QType:
    """int8: symmetric [-127, 127]; int4: ONNX Runtime's symmetric int4 keeps the full [-8, 7] range."""
    return QType.of("int8", symmetric=True) if bits == 8 else QType.of("int4", symmetric=False, bits=4)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Forward x, backward the gradient times g (LSQ's step-size gradient scale)."""
    return x * g + (x - x * g).detach()


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | float, qmin: int, qmax: int) -> torch.Tensor:
    """(clamp(round(x / scale) + zero, qmin, qmax) - zero) · scale, with straight-through gradients: 1 for x inside
    the representable range, 0 outside, and the LSQ gradient for `scale` when it requires grad."""
    q = torch.clamp(round_ste(x / scale) + zero, qmin, qmax)
    return (q - zero) * scale


def symmetric_scale(absmax: torch.Tensor, qtype: QType) -> torch.Tensor:
    """qparams' symmetric rule, computed in float64 and stored as float32 like the ONNX initializer: 2·absmax/(qmax-qmin),
    1.0 where absmax is 0."""
    scale = (absmax.detach().double() * 2 / (qtype.qmax - qtype.qmin)).float()
    return torch.where(scale > 0, scale, torch.ones_like(scale))


class ActQuant(nn.Module):
    """An activation QuantizeLinear→DequantizeLinear pair with the PTQ calibration's scale and zero point.

    `onnx_tensor` names the tensor the static recipe puts this pair on; `enabled` False makes it the identity."""

    def __init__(self, scale: float, zero: int, qmin: int, qmax: int, onnx_tensor: str, learn: bool = False) -> None:
        super().__init__()
        value = torch.tensor(float(scale), dtype=torch.float32)
        if learn:
            self.scale = nn.Parameter(value)
        else:
            self.register_buffer("scale", value)
        self.register_buffer("zero", torch.tensor(float(zero), dtype=torch.float32))
        self.qmin, self.qmax, self.learn = qmin, qmax, learn
        self.onnx_tensor = onnx_tensor
        self.enabled = True

    def effective_scale(self, x: torch.Tensor | None = None) -> torch.Tensor:
        if not self.learn:
            return self.scale
        scale = self.scale.abs().clamp_min(1e-12)
        if x is not None:
            scale = grad_scale(scale, 1.0 / math.sqrt(x.numel() / max(x.shape[0], 1) * max(self.qmax, 1)))
        return scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return fake_quant(x, self.effective_scale(x), self.zero, self.qmin, self.qmax)

    def extra_repr(self) -> str:
        return f"{self.onnx_tensor!r}, scale={float(self.scale):.6g}, zero={int(self.zero)}, [{self.qmin}, {self.qmax}]" + (", LSQ" if self.learn else "")


class _QuantWeightMixin:
    """Weight (and bias) fake quantization shared by QConv and QLinear."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def _init_quant(self, bits: int, per_channel: bool, learn: bool) -> None:
        self.bits, self.per_channel, self.learn = bits, per_channel, learn
        self.qtype = weight_qtype(bits)
        self.quantize_bias = True
        self.enabled = True
        self.input_quant: list[ActQuant] = []  # the activation pair feeding this op (a list: not a submodule)
        if learn:
            self.weight_scale = nn.Parameter(self.absmax_scale())
        self.onnx_weight: str | None = None

    def float_weight(self) -> torch.Tensor:
        """The float weight of the deployed op (what is quantized)."""
        return self.weight

    def float_bias(self) -> torch.Tensor | None:
        return self.bias

    def absmax_scale(self) -> torch.Tensor:
        w = self.float_weight().detach()
        absmax = w.abs().amax(dim=tuple(range(1, w.dim()))) if self.per_channel else w.abs().amax().reshape(1)
        return symmetric_scale(absmax, self.qtype)

    def weight_scales(self) -> torch.Tensor:
        """Per-output-channel (or one-element) float32 scales."""
        if self.learn:
            return self.weight_scale.abs().clamp_min(1e-12)
        return self.absmax_scale()

    def _shaped(self, scale: torch.Tensor) -> torch.Tensor:
        return scale.reshape(-1, *([1] * (self.weight.dim() - 1)))

    def quant_weight(self) -> torch.Tensor:
        scale = self.weight_scales()
        if self.learn:
            scale = grad_scale(scale, 1.0 / math.sqrt(self.weight[0].numel() * self.qtype.qmax))
        return fake_quant(self.float_weight(), self._shaped(scale), 0.0, self.qtype.qmin, self.qtype.qmax)

    def bias_scale(self) -> torch.Tensor | None:
        if not (self.quantize_bias and self.input_quant and self.float_bias() is not None):
            return None
        return (self.input_quant[0].effective_scale().detach() * self.weight_scales().detach()).float()

    def quant_bias(self) -> torch.Tensor | None:
        scale = self.bias_scale()
        bias = self.float_bias()
        if scale is None:
            return bias
        return round_ste(bias / scale) * scale

    def params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.enabled:
            return self.float_weight(), self.float_bias()
        return self.quant_weight(), self.quant_bias()

    @classmethod
    def _quantized_copy(cls, module: nn.Module, args: tuple, bits: int, per_channel: bool, learn: bool):
        """A `cls` built with ARGS holding MODULE's weights, its fake quantization initialised."""
        q = cls(*args)
        q.load_state_dict(module.state_dict())
        q._init_quant(bits, per_channel, learn)
        return q


class _QuantConvMixin(_QuantWeightMixin):
    """from_float and forward shared by the 1-D and 2-D convolutions; listed first so its forward wins."""

    @classmethod
    def from_float(cls, conv: nn.Conv1d | nn.Conv2d, bits: int, per_channel: bool, learn: bool):
        return cls._quantized_copy(conv, (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                          conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode), bits, per_channel, learn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.params()
        return self._conv_forward(x, weight, bias)


class QConv(_QuantConvMixin, nn.Conv2d):
    """Conv2d (BatchNorm already folded in) with fake-quantized weights and bias."""


class QConv1d(_QuantConvMixin, nn.Conv1d):
    """Conv1d (BatchNorm already folded in) with fake-quantized weights and bias."""


class _QuantConvBnMixin(_QuantConvMixin):
    """A Conv and the BatchNorm after it, trained unfolded as in Jacob et al. (2018) and torch.ao's ConvBn modules:
    the weights folded with the running statistics are fake-quantized; while the statistics are live (training mode,
    not frozen) the convolution's output is rescaled to the batch statistics and the running ones are updated, so
    BatchNorm keeps re-estimating the statistics of the quantized network. In eval mode, or once frozen
    (`freeze_bn`), it computes exactly the folded, quantized op of the deployed graph."""

    bn_weight: nn.Parameter
    bn_bias: nn.Parameter
    running_mean: torch.Tensor
    running_var: torch.Tensor

    @classmethod
    def from_conv_bn(cls, conv: nn.Conv1d | nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm, bits: int, per_channel: bool, learn: bool):
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, True, conv.padding_mode)
        with torch.no_grad():
            q.weight.copy_(conv.weight)
            q.bias.copy_(conv.bias if conv.bias is not None else torch.zeros(conv.out_channels))
        gamma = bn.weight if bn.affine else torch.ones(conv.out_channels)
        beta = bn.bias if bn.affine else torch.zeros(conv.out_channels)
        q.bn_weight = nn.Parameter(gamma.detach().clone())
        q.bn_bias = nn.Parameter(beta.detach().clone())
        q.register_buffer("running_mean", bn.running_mean.detach().clone())
        q.register_buffer("running_var", bn.running_var.detach().clone())
        q.eps, q.momentum = bn.eps, bn.momentum if bn.momentum is not None else 0.1
        q.bn_live = True
        q._init_quant(bits, per_channel, learn)
        return q

    def _bn_factor(self) -> torch.Tensor:
        return self.bn_weight / torch.sqrt(self.running_var + self.eps)

    def float_weight(self) -> torch.Tensor:
        return self.weight * self._shaped(self._bn_factor())

    def float_bias(self) -> torch.Tensor:
        return self.bn_bias + (self.bias - self.running_mean) * self._bn_factor()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.bn_live):
            return super().forward(x)
        factor = self._bn_factor()
        factor = torch.where(factor == 0, torch.ones_like(factor), factor)   # a dead channel: its weights fold to 0
        weight = self.quant_weight() if self.enabled else self.float_weight()
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = self._conv_forward(x, weight, None) / factor.reshape(shape) + self.bias.reshape(shape)
        return F.batch_norm(y, self.running_mean, self.running_var, self.bn_weight, self.bn_bias, True, self.momentum, self.eps)


class QConvBn(_QuantConvBnMixin, QConv):
    """Conv2d + BatchNorm2d, trained unfolded, deployed folded, with fake-quantized weights and bias."""


class QConvBn1d(_QuantConvBnMixin, QConv1d):
    """Conv1d + BatchNorm1d, trained unfolded, deployed folded, with fake-quantized weights and bias."""


def freeze_bn(model: nn.Module, frozen: bool = True) -> None:
    """Stop (or restart) the BatchNorm statistics of every Conv+BN of a prepared module: frozen, training uses the
    running statistics, i.e. the folded op that is deployed."""
    for m in model.modules():
        if isinstance(m, _QuantConvBnMixin):
            m.bn_live = not frozen


class QLinear(nn.Linear, _QuantWeightMixin):
    """Linear with fake-quantized weights (per output feature) and bias."""

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int, per_channel: bool, learn: bool) -> "QLinear":
        return cls._quantized_copy(linear, (linear.in_features, linear.out_features, linear.bias is not None), bits, per_channel, learn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.params()
        return F.linear(x, weight, bias)


QUANT_MODULES = {nn.Conv2d: QConv, nn.Conv1d: QConv1d, nn.Linear: QLinear}
CONV_BN_MODULES = {nn.Conv2d: QConvBn, nn.Conv1d: QConvBn1d}

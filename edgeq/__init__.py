"""edgeq: turn an FP32 model into the smallest, fastest one that meets your accuracy budget, and prove it.

>>> import edgeq
>>> model = edgeq.load("model.onnx")                                                   # doctest: +SKIP
>>> q = edgeq.quantize(model, edgeq.Int8Static(), calib=edgeq.Dataset.from_npz("calib.npz"))  # doctest: +SKIP
>>> q.save("model_int8.onnx")                                                          # doctest: +SKIP
>>> net = edgeq.from_torch(torch_module, torch.zeros(1, 3, 32, 32))   # a PyTorch module, exported to ONNX  # doctest: +SKIP
"""
from edgeq import interrupts as _interrupts

_interrupts.quiet_startup()  # before numpy, onnx and typer load: Ctrl-C while the command starts is one line

from edgeq.analyze import analyze  # noqa: E402
from edgeq.auto import QatSource, auto
from edgeq.bench import BenchConfig, benchmark
from edgeq.data import Dataset, ImagePreset, open_data
from edgeq.decide import DecisionRule, decide
from edgeq.evaluate import compare, validate
from edgeq.export import export_tflite
from edgeq.errors import UserError
from edgeq.model import Model, TensorSpec, load
from edgeq.quantize import QuantizedModel, quantize
from edgeq.quantize.config import Fp16, Int4WeightOnly, Int8Dynamic, Int8Static
from edgeq.torch_in import from_torch, load_torch

__all__ = ["BenchConfig", "Dataset", "DecisionRule", "Fp16", "ImagePreset", "Int4WeightOnly", "Int8Dynamic", "Int8Static", "Model",
           "QuantizedModel", "TensorSpec", "UserError", "benchmark", "compare", "decide", "load", "open_data", "quantize",
           "validate"]
__all__ += ["QatSource", "analyze", "auto", "export_tflite", "from_torch", "load_torch"]
__version__ = "0.1.0"

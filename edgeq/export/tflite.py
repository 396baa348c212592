"""ONNX → TFLite/LiteRT: FP32 through `litert-torch`, FP16 and full-integer INT8 through `ai-edge-quantizer`.

The route: the ONNX graph becomes a `torch.nn.Module` (`onnx_torch.py`), `litert_torch.convert` lowers what
`torch.export` captures to a `.tflite` flatbuffer (no TensorFlow), and the FP32 file is checked against ONNX Runtime
on the same input. FP16 casts the weights of convolutions and fully connected layers to float16 (float32 I/O and
compute). INT8 is the quantizer's `static_wi8_ai8` recipe: int8 weights per channel, int8 activations, and model I/O
as `io` says: `float` (the default, as TensorFlow's converter does: the file takes and returns what the FP32 one
does, a QUANTIZE after the input and a DEQUANTIZE before the output) or `int8` (integer-only accelerators and
microcontrollers; the LiteRT session quantizes float data with the input's scale); its activation ranges are edgeq's (`ranges="edgeq"`:
edgeq's histogram observers on every tensor of the FP32 `.tflite`, the range by `method`) or the quantizer's own
min/max calibration (`ranges="converter"`: a moving average of per-sample min/max). Everything here but the dataclass imports torch and LiteRT lazily: it is
the optional extra `edgeq[tflite]`.

>>> export_tflite("model.onnx", "model_int8.tflite", "int8", calib=edgeq.open_data("calib.npz"))   # doctest: +SKIP
TfliteExport(path=PosixPath('model_int8.tflite'), precision='int8', ...)
"""
from __future__ import annotations

import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeq import atomic
from edgeq.calibrate.observers import HistogramObserver, range_of
from edgeq.data import Dataset, batches
from edgeq.errors import ConfigError, ModelError, UserError
from edgeq.model import Model, TensorSpec, load, make_session
from edgeq.progress import track
from edgeq.runtimes.litert import INSTALL, interpreter_class, last_error, quiet as _quiet

PRECISIONS = ("fp32", "fp16", "int8")
RANGES = ("edgeq", "converter")
METHODS = ("minmax", "percentile", "entropy", "mse")
IO_TYPES = ("float", "int8")   # INT8 model I/O: float32 tensors at the boundary (the default), or int8
# The FP32 file must reproduce ONNX Runtime's outputs to this share of their largest magnitude.
MAX_RELATIVE_DIFF = 1e-3
_SIGNATURE = "serving_default"
# The weight-bearing ops whose weights FP16 casts (the quantizer's float-casting algorithm covers these).
_FP16_OPS = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D_TRANSPOSE", "EMBEDDING_LOOKUP")


@dataclass
class TfliteExport:
    """What the export wrote: the file, its size against the FP32 conversion, the FP32 check and the ranges used."""

    path: Path
    precision: str
    size_bytes: int
    fp32_size_bytes: int
    fp32_max_abs_diff: float   # FP32 .tflite against ONNX Runtime on the same input
    ranges: str | None = None  # INT8: "edgeq (mse)" or "converter (moving-average min/max)"
    io: str | None = None      # INT8: the model's input and output type, "float" or "int8"
    calibration_samples: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def size_ratio(self) -> float:
        return self.size_bytes / self.fp32_size_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path), "size_ratio": self.size_ratio}


def export_tflite(model: Model | str | Path, output: str | Path, precision: str = "fp32", calib: Dataset | None = None, *,
                  ranges: str = "edgeq", method: str = "mse", samples: int = 512, batch: int = 1, io: str = "float",
                  force: bool = False) -> TfliteExport:
    """Convert an ONNX model to a `.tflite` file at `output` (written atomically, verified in LiteRT first); a dynamic
    batch dim becomes `batch`; `io` is INT8's model input and output type."""
    _check_options(precision, calib, ranges, method, samples)
    if io not in IO_TYPES:
        raise ConfigError(f"io {io!r} is not a model I/O type", f"use one of: {', '.join(IO_TYPES)}")
    if io == "int8" and precision != "int8":
        raise ConfigError(f"int8 model I/O is for the int8 export, not {precision}", "pass --precision int8, or leave out --io")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch must be at least 1 (got {batch!r})", "pass --batch 1 or more")
    model = model if isinstance(model, Model) else load(model)
    output = atomic.check_writable(Path(output), force=force, protect=(model.path,) if model.path else ())
    specs = _fixed_inputs(model, batch)
    staging = atomic.temp_beside(output, folder=True)
    try:
        fp32 = staging / "fp32.tflite"
        _convert(model, specs, fp32)
        diff = _check_against_onnx(model, specs, fp32)
        result = TfliteExport(output, precision, 0, fp32.stat().st_size, diff)
        if any(s.shape != m.shape for s, m in zip(specs, model.inputs)):
            result.notes.append(f"dynamic batch fixed to {batch} (LiteRT runs a shorter batch padded): "
                                + ", ".join(s.describe() for s in specs))
        final = fp32
        if precision == "fp16":
            final = _fp16(fp32, staging / "fp16.tflite")
        elif precision == "int8":
            assert calib is not None
            final = _int8(fp32, staging / "int8.tflite", _feeds(calib, specs, samples), ranges, method, io, result)
        from edgeq.runtimes.litert import load as load_tflite

        load_tflite(final)  # the interpreter opens it, or the export fails before anything is written
        result.size_bytes = final.stat().st_size
        with atomic.disk_full_is_user_error(output):
            atomic.publish(final, output)
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_options(precision: str, calib: Dataset | None, ranges: str, method: str, samples: int) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one the TFLite export writes", f"use one of: {', '.join(PRECISIONS)}")
    if precision == "int8" and calib is None:
        raise ConfigError("INT8 TFLite needs calibration data for its activation ranges", "pass --calib DATA")
    if ranges not in RANGES:
        raise ConfigError(f"ranges {ranges!r} is not a calibration source", f"use one of: {', '.join(RANGES)}")
    if method not in METHODS:
        raise ConfigError(f"method {method!r} is not an observer method", f"use one of: {', '.join(METHODS)}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ConfigError(f"samples must be at least 1 (got {samples!r})", "pass --samples 1 or more")


def _fixed_inputs(model: Model, batch: int) -> list[TensorSpec]:
    """The inputs with a dynamic batch dim fixed to `batch`: litert-torch's programs keep no dynamic dim (a dynamic
    batch traced through its layout pass comes out fixed in places); other dynamic dims refuse."""
    fixed = []
    for spec in model.inputs:
        dims = [batch if axis == 0 and not isinstance(d, int) else d for axis, d in enumerate(spec.shape)]
        if any(not isinstance(d, int) for d in dims):
            raise ModelError(f"input {spec.describe()} has dynamic dims besides the batch", "re-export the ONNX model with fixed input dims")
        fixed.append(TensorSpec(spec.name, spec.dtype, tuple(dims)))
    return fixed


def _convert(model: Model, specs: list[TensorSpec], path: Path) -> None:
    try:
        with _quiet(path.with_suffix(".import.log")):  # their imports print warnings of their own on fd 2
            import litert_torch
            import torch
    except ImportError:
        raise UserError("the TFLite export needs litert-torch, which is not installed", INSTALL) from None
    from edgeq.export.onnx_torch import OnnxModule

    module = OnnxModule(model.proto).eval()
    sample = tuple(torch.zeros(s.shape, dtype=getattr(torch, s.dtype.name)) for s in specs)
    log = path.with_suffix(".log")
    try:
        with _quiet(log), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.export's deprecation notices are for litert-torch's authors
            litert_torch.convert(module, sample).export(str(path))
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch.export and the MLIR lowering raise many types; all mean "cannot convert"
        detail = " ".join(str(exc).split())[:300] or last_error(log)
        raise ModelError(f"litert-torch cannot convert {model.name}: {type(exc).__name__}: {detail}",
                         "simplify the model (static shapes, standard operators) or export it from PyTorch") from None


def _random_feed(specs: list[TensorSpec], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s.name: rng.standard_normal(s.shape).astype(s.dtype) if s.dtype.kind == "f" else np.zeros(s.shape, s.dtype)
            for s in specs}


def _check_against_onnx(model: Model, specs: list[TensorSpec], path: Path) -> float:
    """Run both on one random input: a conversion that changes the outputs is a ModelError, never a written file."""
    from edgeq.runtimes.litert import load as load_tflite

    feed = _random_feed(specs)
    want = make_session(model.proto).run(None, feed)
    got = load_tflite(path).session().run(None, feed)
    diff, scale = 0.0, 0.0
    for w, g in zip(want, got):
        if np.shape(w) != np.shape(g):
            raise ModelError(f"the converted model's output has shape {np.shape(g)}, ONNX Runtime's {np.shape(w)}",
                             "report this model: the TFLite export does not reproduce it")
        diff = max(diff, float(np.max(np.abs(np.asarray(w, np.float64) - g), initial=0.0)))
        scale = max(scale, float(np.max(np.abs(w), initial=0.0)))
    if diff > MAX_RELATIVE_DIFF * max(scale, 1.0):
        raise ModelError(f"the converted FP32 model differs from ONNX Runtime by {diff:.3g} (outputs up to {scale:.3g})",
                         "report this model: the TFLite export does not reproduce it")
    return diff


def _fp16(fp32: Path, path: Path) -> Path:
    from ai_edge_quantizer import qtyping, quantizer

    qt = quantizer.Quantizer(str(fp32))
    config = qtyping.OpQuantizationConfig(
        weight_tensor_config=qtyping.TensorQuantizationConfig(num_bits=16, dtype=qtyping.TensorDataType.FLOAT),
        compute_precision=qtyping.ComputePrecision.FLOAT, explicit_dequantize=True)
    for op in _FP16_OPS:
        qt.update_quantization_recipe(regex=".*", operation_name=getattr(qtyping.TFLOperationName, op), op_config=config,
                                      algorithm_key=quantizer.AlgorithmName.FLOAT_CASTING)
    with _quiet(path.with_suffix(".log")):
        qt.quantize().export_model(str(path), overwrite=True)
    return path


def _feeds(calib: Dataset, specs: list[TensorSpec], samples: int) -> list[list[np.ndarray]]:
    """Feeds of the file's fixed batch, in the ONNX inputs' order, up to `samples` samples (a short last batch is
    left out: the file's batch is fixed)."""
    batch = int(specs[0].shape[0]) if specs and specs[0].rank else 1
    feeds: list[list[np.ndarray]] = []
    for chunk in batches(calib, specs, batch):
        if len(feeds) * batch >= samples:
            break
        if chunk.size == batch:
            feeds.append([chunk.inputs[s.name] for s in specs])
    if not feeds:
        raise UserError(f"{calib.description} holds fewer calibration samples than one batch ({batch})", "give more samples")
    return feeds


def _int8(fp32: Path, path: Path, feeds: list[list[np.ndarray]], ranges: str, method: str, io: str,
          result: TfliteExport) -> Path:
    from ai_edge_quantizer import qtyping, quantizer, recipe

    qt = quantizer.Quantizer(str(fp32))
    qt.load_quantization_recipe(recipe.static_wi8_ai8())
    if io == "float":  # the graph's inputs and outputs stay float32: the quantizer puts QUANTIZE/DEQUANTIZE behind them
        for boundary in (qtyping.TFLOperationName.INPUT, qtyping.TFLOperationName.OUTPUT):
            qt.update_quantization_recipe(regex=".*", operation_name=boundary, algorithm_key=quantizer.AlgorithmName.NO_QUANTIZE)
    names = interpreter_class()(model_path=str(fp32)).get_signature_list()[_SIGNATURE]["inputs"]
    signature = [dict(zip(names, feed)) for feed in feeds]
    log = path.with_suffix(".log")
    # Which tensors need ranges, and their shapes, from the quantizer; with edgeq's ranges, the values from its observers.
    with _quiet(log):
        qsvs = qt.calibrate({_SIGNATURE: signature if ranges == "converter" else signature[:1]})
    if ranges == "edgeq":
        qsvs = _edgeq_qsvs(fp32, qsvs, signature, method)
    with _quiet(log):
        qt.quantize(qsvs).export_model(str(path), overwrite=True)
    result.ranges = f"{ranges} ({'moving-average min/max' if ranges == 'converter' else method})"
    result.io = io
    result.calibration_samples = sum(len(feed[0]) if np.ndim(feed[0]) else 1 for feed in feeds)
    return path


def _edgeq_qsvs(fp32: Path, template: dict[str, dict], signature: list[dict[str, np.ndarray]], method: str) -> dict:
    """Every tensor the quantizer wants a range for, observed by edgeq's histogram observer over the calibration
    feeds run through the FP32 `.tflite` (all intermediate tensors kept), its range chosen by `method`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LiteRT warns that keeping every tensor costs memory: calibration needs them
        interpreter = interpreter_class()(model_path=str(fp32), experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    runner = interpreter.get_signature_runner(_SIGNATURE)
    index = {d["name"]: d["index"] for d in interpreter.get_tensor_details()}
    wanted = [name for name in template if name in index]
    observers = {name: HistogramObserver() for name in wanted}
    for feed in track(signature, "calibrating the TFLite model", total=len(signature)):
        runner(**feed)
        for name in wanted:
            observers[name].update(np.asarray(interpreter.get_tensor(index[name]), np.float32))
    qsvs = {}
    for name, qsv in template.items():
        if name not in observers:
            qsvs[name] = qsv
            continue
        low, high = range_of(observers[name], method)
        shape = np.shape(qsv["min"])
        qsvs[name] = {**qsv, "min": np.full(shape, min(low, 0.0), np.float32), "max": np.full(shape, max(high, 0.0), np.float32)}
    return qsvs


def tensor_types(path: str | Path) -> dict[str, str]:
    """Every tensor of a `.tflite` file with its element type (as the interpreter reads the flatbuffer).

    >>> sorted(set(tensor_types("model_int8.tflite").values()))     # doctest: +SKIP
    ['int32', 'int8']
    """
    interpreter = interpreter_class()(model_path=str(path))
    return {f"{d['index']}:{d['name']}": np.dtype(d["dtype"]).name for d in interpreter.get_tensor_details()}

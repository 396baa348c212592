"""TFLite/LiteRT in and out: the runtime seam picks LiteRT for .tflite files; `edgeq export --to tflite` writes FP32,
FP16 and full-integer INT8 files that reproduce the ONNX model; bench and validate put both runtimes side by side."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import edgeq
from edgeq import runtimes
from edgeq.runtimes import runtime_for
from tests.conftest import make_conv_model
from tests.test_reliability import assert_user_error, cli

HAS_EXTRA = all(importlib.util.find_spec(m) for m in ("ai_edge_litert", "litert_torch", "ai_edge_quantizer"))
needs_tflite = pytest.mark.skipif(not HAS_EXTRA, reason="the edgeq[tflite] extra is not installed")


def test_the_runtime_is_chosen_by_file_format(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(16))
    onnx.save(make_conv_model(), tmp_path / "tiny.onnx")
    assert runtime_for(tmp_path / "model.bin").name == "litert"          # by the flatbuffer identifier, not the suffix
    assert runtime_for(tmp_path / "tiny.onnx").name == "onnxruntime"
    assert runtime_for(tmp_path / "missing.tflite").name == "onnxruntime"  # whose load says the file is not there


def _nhwc_model() -> onnx.ModelProto:
    """The tiny conv net behind a Transpose: its input is NHWC [N, 8, 8, 1], the same function of NCHW data."""
    proto = make_conv_model()
    graph = proto.graph
    graph.input[0].CopyFrom(helper.make_tensor_value_info("x_nhwc", TensorProto.FLOAT, ["N", 8, 8, 1]))
    graph.node.insert(0, helper.make_node("Transpose", ["x_nhwc"], ["x"], perm=[0, 3, 1, 2]))
    onnx.checker.check_model(proto)
    return proto


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from edgeq.export import export_tflite

    folder = tmp_path_factory.mktemp("tflite")
    onnx.save(make_conv_model(), folder / "tiny.onnx")
    onnx.save(_nhwc_model(), folder / "nhwc.onnx")
    rng = np.random.default_rng(3)
    np.savez(folder / "calib.npz", x=rng.normal(0, 1, (128, 1, 8, 8)).astype(np.float32))
    np.savez(folder / "data.npz", x=rng.normal(0, 1, (150, 1, 8, 8)).astype(np.float32))
    calib = edgeq.open_data(folder / "calib.npz")
    results = {
        "fp32": export_tflite(folder / "tiny.onnx", folder / "fp32.tflite"),
        "fp16": export_tflite(folder / "tiny.onnx", folder / "fp16.tflite", "fp16"),
        "int8": export_tflite(folder / "tiny.onnx", folder / "int8.tflite", "int8", calib, io="int8"),
        "int8-float-io": export_tflite(folder / "tiny.onnx", folder / "int8_float_io.tflite", "int8", calib),
        "int8-minmax": export_tflite(folder / "tiny.onnx", folder / "int8_minmax.tflite", "int8", calib, method="minmax", io="int8"),
        "int8-converter": export_tflite(folder / "tiny.onnx", folder / "int8_conv.tflite", "int8", calib, ranges="converter", io="int8"),
        "nhwc": export_tflite(folder / "nhwc.onnx", folder / "nhwc.tflite"),
    }
    return folder, results


@needs_tflite
def test_fp32_tflite_reproduces_the_onnx_model(exported):
    folder, results = exported
    assert results["fp32"].fp32_max_abs_diff < 1e-4
    record = edgeq.validate(folder / "fp32.tflite", edgeq.open_data(folder / "data.npz"), reference=folder / "tiny.onnx")
    assert record.samples == 150
    assert record.metrics["top1_agreement"].value == 100.0


@needs_tflite
def test_int8_tflite_is_full_integer_and_close_to_edgeq_int8_onnx(exported, tmp_path):
    from edgeq.export import tensor_types

    folder, results = exported
    assert set(tensor_types(folder / "int8.tflite").values()) <= {"int8", "int32"}
    assert results["int8"].ranges == "edgeq (mse)" and results["int8"].calibration_samples == 128
    data = edgeq.open_data(folder / "data.npz")
    q = edgeq.quantize(edgeq.load(folder / "tiny.onnx"), edgeq.Int8Static(), calib=edgeq.open_data(folder / "calib.npz"))
    q.save(tmp_path / "int8.onnx")
    ours = edgeq.validate(folder / "int8.tflite", data, reference=folder / "tiny.onnx")
    onnx_int8 = edgeq.validate(tmp_path / "int8.onnx", data, reference=folder / "tiny.onnx")
    assert ours.metrics["top1_agreement"].value >= onnx_int8.metrics["top1_agreement"].value - 3.0
    assert ours.metrics["top1_agreement"].value >= 90.0
    assert any("quantized to the model's int8 input" in w for w in ours.warnings), "the float→int8 input is said"


@needs_tflite
def test_int8_model_io_is_float_by_default_or_int8_as_chosen_with_the_same_outputs(exported, tmp_path):
    """The default keeps float32 at the two boundary tensors (QUANTIZE after the input, DEQUANTIZE before the output),
    every other tensor int8/int32; `io="int8"` makes them int8. Same ranges, so the same outputs: within one output step."""
    from edgeq.export import tensor_types
    from edgeq.runtimes.litert import interpreter_class, load

    folder, results = exported

    def io_types(name: str) -> tuple[list[str], list[str]]:
        interpreter = interpreter_class()(model_path=str(folder / name))
        return ([np.dtype(d["dtype"]).name for d in interpreter.get_input_details()],
                [np.dtype(d["dtype"]).name for d in interpreter.get_output_details()])

    assert io_types("int8_float_io.tflite") == (["float32"], ["float32"]) and results["int8-float-io"].io == "float"
    assert io_types("int8.tflite") == (["int8"], ["int8"]) and results["int8"].io == "int8"
    types = list(tensor_types(folder / "int8_float_io.tflite").values())
    assert types.count("float32") == 2 and set(types) <= {"int8", "int32", "float32"}
    x = np.load(folder / "data.npz")["x"][:1]
    step = load(folder / "int8.tflite").outs[0].scale
    float_io, int8_io = (load(folder / name).session().run(None, {"x": x})[0] for name in ("int8_float_io.tflite", "int8.tflite"))
    assert np.max(np.abs(float_io - int8_io)) <= step * 1.01
    data = edgeq.open_data(folder / "data.npz")
    agreement = [edgeq.validate(folder / name, data, reference=folder / "tiny.onnx").metrics["top1_agreement"].value
                 for name in ("int8_float_io.tflite", "int8.tflite")]
    assert agreement[0] == pytest.approx(agreement[1], abs=1.0)
    proc = cli(folder, "export", "tiny.onnx", "--precision", "fp16", "--io", "int8", "-o", str(tmp_path / "d.tflite"))
    assert_user_error(proc, "int8 model I/O is for the int8 export")


@needs_tflite
def test_edgeq_ranges_are_the_ones_in_the_file(exported):
    """With edgeq's min/max, the input's int8 scale is the calibration data's whole range; the converter's own
    calibration (a moving average of per-sample min/max) and edgeq's mse give other, narrower ones."""
    from edgeq.runtimes.litert import load

    folder, _ = exported
    x = np.load(folder / "calib.npz")["x"]
    scale = {name: load(folder / f"{name}.tflite").ins[0].scale for name in ("int8", "int8_minmax", "int8_conv")}
    assert scale["int8_minmax"] == pytest.approx((x.max() - x.min()) / 255, rel=1e-3)
    assert scale["int8_conv"] < 0.9 * scale["int8_minmax"]
    assert scale["int8"] <= scale["int8_minmax"] and scale["int8"] != pytest.approx(scale["int8_conv"], rel=0.05)


@needs_tflite
def test_fp16_tflite_has_float16_weights_and_float32_io(exported):
    from edgeq.export import tensor_types
    from edgeq.runtimes.litert import load

    folder, results = exported
    assert "float16" in set(tensor_types(folder / "fp16.tflite").values())
    model = load(folder / "fp16.tflite")
    assert [p.native.dtype for p in model.ins + model.outs] == [np.float32, np.float32]
    record = edgeq.validate(folder / "fp16.tflite", edgeq.open_data(folder / "data.npz"), reference=folder / "tiny.onnx")
    assert record.metrics["top1_agreement"].value >= 99.0


@needs_tflite
def test_an_nhwc_tflite_takes_nchw_data_transposed_and_says_so_once(exported):
    folder, _ = exported
    model = runtimes.load(folder / "nhwc.tflite")
    assert model.ins[0].native.shape == (1, 8, 8, 1)
    record = edgeq.validate(folder / "nhwc.tflite", edgeq.open_data(folder / "data.npz"), reference=folder / "tiny.onnx")
    assert record.metrics["top1_agreement"].value == 100.0
    assert sum("transposed for LiteRT" in w for w in record.warnings) == 1


@needs_tflite
def test_bench_puts_onnx_runtime_and_litert_in_one_table(exported):
    folder, _ = exported
    proc = cli(folder, "bench", "tiny.onnx", "int8.tflite", "--runs", "4", "--rounds", "2", "--json", "bench.json")
    assert proc.returncode == 0, proc.stderr
    assert "tiny (ONNX Runtime)" in proc.stdout and "int8 (LiteRT)" in proc.stdout
    records = json.loads((folder / "bench.json").read_text())["models"]
    assert [r["runtime"].split()[0] for r in records] == ["ONNX", "LiteRT"]
    assert records[1]["size_bytes"] == (folder / "int8.tflite").stat().st_size


@needs_tflite
def test_export_cli_writes_one_line_and_refuses_clearly(exported, tmp_path):
    folder, _ = exported
    proc = cli(folder, "export", "tiny.onnx", "--to", "tflite", "--precision", "fp16", "-o", str(tmp_path / "a.tflite"))
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "fp16" in proc.stdout and proc.stderr == ""
    assert_user_error(cli(folder, "export", "tiny.onnx", "--precision", "int8", "-o", str(tmp_path / "b.tflite")), "--calib")
    proto = make_conv_model()
    proto.graph.node[1].op_type = "Softsign"  # relu1 → an operator the export does not convert
    onnx.save(proto, tmp_path / "softsign.onnx")
    assert_user_error(cli(tmp_path, "export", "softsign.onnx", "-o", "c.tflite"), "Softsign")
    assert not (tmp_path / "b.tflite").exists() and not (tmp_path / "c.tflite").exists()


@needs_tflite
def test_analyze_lists_what_each_operator_of_a_tflite_computes_in(exported):
    folder, _ = exported
    int8 = edgeq.analyze(folder / "int8.tflite")
    assert int8.support.counts["int8"] == len(int8.support.nodes) > 0 and int8.layers == 3
    fp32 = edgeq.analyze(folder / "fp32.tflite", calib=folder / "calib.npz")
    assert fp32.support.counts["int8"] == 0 and "CONV_2D" in fp32.support.float_ops
    assert any("the data was not used" in f for f in fp32.findings)
    proc = cli(folder, "analyze", "fp32.tflite")
    assert proc.returncode == 0, proc.stderr
    assert "0 of 5 operators compute in integers" in proc.stdout and "FULLY_CONNECTED" in proc.stdout

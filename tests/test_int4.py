"""INT4 weight-only: packing, block quantization against a numpy reference, ONNX Runtime execution, GPTQ, CLI."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgeq
from edgeq.errors import ConfigError, DataError
from edgeq.model import Model
from edgeq.quantize.gptq import hessian, quantize_gptq
from edgeq.quantize.packing import blocked, dq_tensors, nbits_tensors, pack_int4, quantize_rtn, unpack_int4


@pytest.mark.parametrize("count", [1, 2, 7, 16, 33, 1001])
def test_pack_unpack_round_trips_unsigned_and_signed(count):
    rng = np.random.default_rng(count)
    codes = rng.integers(0, 16, count).astype(np.uint8)
    packed = pack_int4(codes)
    assert packed.dtype == np.uint8 and packed.size == (count + 1) // 2
    np.testing.assert_array_equal(unpack_int4(packed, count), codes)
    signed = rng.integers(-8, 8, count).astype(np.int8)
    np.testing.assert_array_equal(unpack_int4(pack_int4(signed), count, signed=True), signed)
    if count % 2:
        assert packed[-1] >> 4 == 0  # the padding nibble is zero


def test_pack_order_is_low_nibble_first():
    assert pack_int4(np.array([1, 2, 3], np.uint8)).tolist() == [0x21, 0x03]
    assert pack_int4(np.array([-1, -8], np.int8)).tolist() == [0x8F]


def _reference_dequant(w: np.ndarray, block: int, symmetric: bool) -> np.ndarray:
    """Block by block in plain loops: the definition, independent of the vectorised code."""
    k, n = w.shape
    out = np.zeros_like(w)
    for col in range(n):
        for start in range(0, k, block):
            seg = w[start:start + block, col].astype(np.float64)
            if symmetric:
                extreme = seg[np.argmax(np.abs(seg))]
                scale = extreme / -8 or 1.0
                q = np.clip(np.round(seg / scale), -8, 7)
                out[start:start + block, col] = q * scale
            else:
                lo, hi = min(seg.min(), 0), max(seg.max(), 0)
                scale = (hi - lo) / 15 or 1.0
                zero = np.clip(np.round(-lo / scale), 0, 15)
                q = np.clip(np.round(seg / scale) + zero, 0, 15)
                out[start:start + block, col] = (q - zero) * scale
    return out


@pytest.mark.parametrize("shape,block", [((64, 8), 16), ((100, 5), 32), ((37, 3), 16), ((256, 4), 128), ((130, 2), 64)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantized_weights_match_numpy_reference(shape, block, symmetric):
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, shape).astype(np.float32)
    w[3, 0] = 0.9  # an outlier
    q = quantize_rtn(w, block, symmetric=symmetric)
    assert q.codes.shape == (shape[1], -(-shape[0] // block), block)
    np.testing.assert_allclose(q.dequantize(), _reference_dequant(w, block, symmetric), rtol=1e-6, atol=1e-7)
    # padding of the last block holds the zero point: it dequantizes to exactly 0
    pad = blocked(np.zeros(shape, np.float32), block).size - w.size
    if pad:
        tail = q.codes.reshape(shape[1], -1)[:, shape[0]:]
        np.testing.assert_array_equal(tail, np.broadcast_to(q.zero_points[:, -1:], tail.shape))


def test_nbits_and_dq_layouts_unpack_to_the_same_codes():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(70, 6)).astype(np.float32)
    q = quantize_rtn(w, 32, symmetric=False)
    b, scales, zp = nbits_tensors(q)
    assert b.shape == (6, 3, 16) and scales.shape == (18,) and zp.shape == (6, 2)
    codes = unpack_int4(b, b.size * 2).reshape(6, 3, 32)
    np.testing.assert_array_equal(codes, q.codes)
    np.testing.assert_array_equal(unpack_int4(zp[0], 3), q.zero_points[0].astype(np.uint8))
    dq_codes, dq_scales, dq_zp = dq_tensors(q)
    assert dq_codes.shape == (70, 6) and dq_scales.shape == (3, 6) and dq_zp.shape == (3, 6)
    np.testing.assert_array_equal(dq_codes, q.codes.reshape(6, -1)[:, :70].T)


def _matmul_model(k: int, n: int, gemm: bool = False, seed: int = 0) -> Model:
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.1, (k, n)).astype(np.float32)
    if gemm:
        inits = [numpy_helper.from_array(w.T.copy(), "w"), numpy_helper.from_array(rng.normal(size=n).astype(np.float32), "b")]
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)]
        shapes = (["B", k], ["B", n])
    else:
        inits = [numpy_helper.from_array(w, "w")]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
        shapes = (["B", "T", k], ["B", "T", n])
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shapes[0])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shapes[1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return Model(model)


@pytest.mark.parametrize("fmt", ["nbits", "qdq"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("gemm,k", [(False, 100), (True, 64)])
def test_onnx_runtime_runs_the_quantized_weight_exactly(fmt, symmetric, gemm, k):
    """With float compute (accuracy_level 0), ONNX Runtime's result is x @ dequantized W (+ bias) to float error."""
    model = _matmul_model(k, 24, gemm)
    x = np.random.default_rng(2).normal(size=(4, k) if gemm else (2, 3, k)).astype(np.float32)
    q = edgeq.quantize(model, edgeq.Int4WeightOnly(block_size=32, symmetric=symmetric, format=fmt, accuracy_level=0))
    ops = {n.op_type for n in q.proto.graph.node}
    assert ("MatMulNBits" in ops) if fmt == "nbits" else ("DequantizeLinear" in ops and q.opset >= 21)
    w = numpy_helper.to_array(model.proto.graph.initializer[0])
    w = w.T if gemm else w
    expected = x @ quantize_rtn(w, 32, symmetric=symmetric).dequantize()
    if gemm:
        expected = expected + numpy_helper.to_array(model.proto.graph.initializer[1])
    y = q.session().run(None, {"x": x})[0]
    tol = 1e-4 if fmt == "nbits" else 0.05 * np.abs(expected).max()  # ORT may fuse DQ→MatMul into int8-compute MatMulNBits
    np.testing.assert_allclose(y, expected, atol=tol)
    assert q.summary.precision == "int4" and sum(q.summary.quantized.values()) == 1


def test_int8_compute_stays_close_and_int8_layers_are_8_bit():
    model = _matmul_model(128, 32)
    x = np.random.default_rng(3).normal(size=(1, 5, 128)).astype(np.float32)
    ref = model.session().run(None, {"x": x})[0]
    q4 = edgeq.quantize(model, edgeq.Int4WeightOnly(block_size=32))
    q8 = edgeq.quantize(model, edgeq.Int4WeightOnly(block_size=32, int8_layers=("mm",)))
    node8 = next(n for n in q8.proto.graph.node if n.op_type == "MatMulNBits")
    assert helper.get_attribute_value(next(a for a in node8.attribute if a.name == "bits")) == 8
    err4 = np.abs(q4.session().run(None, {"x": x})[0] - ref).max()
    err8 = np.abs(q8.session().run(None, {"x": x})[0] - ref).max()
    assert err8 < err4 / 3 and err4 < 0.2 * np.abs(ref).max()


def test_gptq_beats_rtn_on_the_calibration_output_error():
    rng = np.random.default_rng(4)
    # correlated activations with a few strong channels, as in transformers
    x = rng.normal(size=(2048, 64)) @ rng.normal(size=(64, 64)) * np.where(np.arange(64) < 4, 8.0, 1.0)
    w = rng.normal(0, 0.1, (64, 16)).astype(np.float32)
    for block in (16, 32, 64):
        for symmetric in (True, False):
            rtn = quantize_rtn(w, block, symmetric=symmetric)
            gptq = quantize_gptq(w, hessian(x), block, symmetric=symmetric)
            e_rtn = np.linalg.norm(x @ (rtn.dequantize() - w))
            e_gptq = np.linalg.norm(x @ (gptq.dequantize() - w))
            assert e_gptq < 0.8 * e_rtn, (block, symmetric, e_gptq, e_rtn)
            assert gptq.codes.max() <= 15 and gptq.scales.shape == rtn.scales.shape


def test_bad_settings_are_user_errors():
    model = _matmul_model(64, 8)
    with pytest.raises(ConfigError, match="not a valid block_size"):
        edgeq.quantize(model, edgeq.Int4WeightOnly(block_size=24))
    with pytest.raises(DataError, match="calibration"):
        edgeq.quantize(model, edgeq.Int4WeightOnly(algorithm="gptq"))
    with pytest.raises(ConfigError, match="int8-layers"):
        edgeq.quantize(model, edgeq.Int4WeightOnly(int8_layers=("nope",)))


def test_cli_int4_through_a_subprocess(tmp_path):
    model = _matmul_model(64, 16)
    src = tmp_path / "mm.onnx"
    onnx.save(model.proto, src)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(5).normal(size=(16, 4, 64)).astype(np.float32))
    out = tmp_path / "mm_int4.onnx"
    cmd = [sys.executable, "-m", "edgeq.cli", "quantize", str(src), "-o", str(out), "--precision", "int4", "--block-size", "16",
           "--algorithm", "gptq", "--calib", str(calib), "--asymmetric", "--summary-json", str(tmp_path / "s.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "MatMulNBits" in proc.stdout and out.is_file()
    assert {n.op_type for n in onnx.load(out).graph.node} == {"MatMulNBits"}
    bad = subprocess.run(cmd[:9] + ["--algorithm", "gptq", "--force"], capture_output=True, text=True)
    assert bad.returncode == 2 and "calib" in bad.stderr and "Traceback" not in bad.stderr


def test_calibration_data_makes_the_data_aware_method_the_default():
    model = _matmul_model(64, 16)
    data = edgeq.Dataset.from_arrays({"x": np.random.default_rng(6).normal(size=(8, 4, 64)).astype(np.float32)})
    summary = edgeq.quantize(model, edgeq.Int4WeightOnly(block_size=16), calib=data).summary
    assert summary.mode == "gptq" and summary.calibration["method"] == "gptq"
    assert any("data-aware, because calibration data was given" in n for n in summary.notes)
    summary = edgeq.quantize(model, edgeq.Int4WeightOnly(block_size=16)).summary
    assert summary.mode == "rtn" and any("round to nearest, because no calibration" in n for n in summary.notes)
    summary = edgeq.quantize(model, edgeq.Int4WeightOnly(block_size=16, algorithm="rtn"), calib=data).summary
    assert summary.mode == "rtn" and not any("because" in n for n in summary.notes)

"""Weights inside control-flow subgraphs (If branches): FP16, dynamic and static INT8 quantize them, judged on
Silero VAD's speech decisions over streams of chunks with the state carried from chunk to chunk."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgeq

SILERO = Path(__import__("importlib.util").util.find_spec("silero_vad").origin).parent / "data"
RATE, CHUNK, CONTEXT = 16000, 512, 64


def speech_like(seconds: float, seed: int) -> np.ndarray:
    """Voiced syllables: a harmonic source with a gliding pitch, shaped by three formants, at about four syllables
    a second with short pauses, over faint noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    f0 = 110 + 50 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6)) + rng.normal(0, 2, t.size).cumsum() / 400
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    formants = rng.uniform([500, 1200, 2300], [800, 1800, 2900])
    voice = sum(np.sin(k * phase) / k * sum(np.exp(-((k * f0 - f) / 180) ** 2) for f in formants) for k in range(1, 30))
    envelope = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t), 0, None) ** 0.6
    audio = voice * envelope
    return (0.3 * audio / np.abs(audio).max() + rng.normal(0, 0.002, t.size)).astype(np.float32)


def non_speech(seconds: float, seed: int) -> np.ndarray:
    """Noise and a steady hum: white, brown (integrated) and a 50 Hz tone with harmonics."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    kind = seed % 3
    if kind == 0:
        audio = rng.normal(0, 0.05, n)
    elif kind == 1:
        audio = np.cumsum(rng.normal(0, 1, n))
        audio = 0.2 * (audio - np.convolve(audio, np.ones(400) / 400, "same")) / (np.abs(audio).max() + 1e-9)
    else:
        audio = 0.1 * sum(np.sin(2 * np.pi * 50 * k * t) / k for k in range(1, 6))
    return audio.astype(np.float32)


def vad_probabilities(session, audio: np.ndarray) -> np.ndarray:
    """Speech probability per 512-sample chunk, as silero_vad's OnnxWrapper streams it (64 samples of context,
    the state carried from chunk to chunk)."""
    names = {i.name for i in session.get_inputs()}
    state, context, probs = np.zeros((2, 1, 128), np.float32), np.zeros((1, CONTEXT), np.float32), []
    for chunk in audio[: len(audio) // CHUNK * CHUNK].reshape(-1, CHUNK):
        x = np.concatenate([context, chunk[None]], axis=1)
        feed = {"input": x, "state": state} | ({"sr": np.array(RATE, np.int64)} if "sr" in names else {})
        prob, state = session.run(None, feed)
        context = x[:, -CONTEXT:]
        probs.append(float(prob.reshape(-1)[0]))
    return np.array(probs)


def streams(count: int, seconds: float = 3.0) -> list[np.ndarray]:
    return [speech_like(seconds, seed) if seed % 2 == 0 else non_speech(seconds, seed) for seed in range(count)]


def if_model(seed: int = 0) -> onnx.ModelProto:
    """x (N, 16) → If(mean(x) > 0): MatMul-Relu-MatMul with Constant-node weights in one branch, one MatMul with a
    main-graph weight in the other; both read x from the outer scope."""
    rng = np.random.default_rng(seed)

    def const(name: str, shape: tuple[int, ...]) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(rng.normal(0, 0.4, shape).astype(np.float32)))

    then = helper.make_graph([const("w1", (16, 32)), helper.make_node("MatMul", ["x", "w1"], ["h"], name="then_mm1"),
                              helper.make_node("Relu", ["h"], ["r"], name="then_relu"), const("w2", (32, 8)),
                              helper.make_node("MatMul", ["r", "w2"], ["y_then"], name="then_mm2")], "then", [],
                             [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, ["N", 8])])
    other = helper.make_graph([helper.make_node("MatMul", ["x", "w3"], ["y_else"], name="else_mm")], "else", [],
                              [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, ["N", 8])])
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0, name="mean"),
         helper.make_node("Greater", ["m", "zero"], ["c"], name="positive"),
         helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other, name="branch")],
        "if_model", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(np.float32(0), "zero"), numpy_helper.from_array(rng.normal(0, 0.4, (16, 8)).astype(np.float32), "w3")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def if_inputs(positive: bool, n: int = 32, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(0, 1, (n, 16)).astype(np.float32)
    return np.abs(x) if positive else -np.abs(x)


def _inner_initializers(proto: onnx.ModelProto) -> dict[int, int]:
    from edgeq.graph import all_graphs

    types: dict[int, int] = {}
    for graph in list(all_graphs(proto.graph))[1:]:
        for tensor in graph.initializer:
            types[tensor.data_type] = types.get(tensor.data_type, 0) + int(np.prod(tensor.dims))
    return types


def test_fp16_converts_inside_if_branches_and_weights_only_branches_read():
    """Case 153: FP16 left If branches (and the weights only they read) float32: Silero's file kept its size."""
    proto = if_model()
    q = edgeq.quantize(edgeq.Model(proto, None), edgeq.Fp16())
    assert q.summary.quantized.get("MatMul") == 3
    # the else branch's weight, a main-graph initializer only it reads, moved into the branch
    assert _inner_initializers(q.proto) == {TensorProto.FLOAT16: 16 * 32 + 32 * 8 + 16 * 8}
    assert "w3" not in {t.name for t in q.proto.graph.initializer}
    reference, converted = edgeq.Model(proto, None).session(), q.session()
    for positive in (True, False):
        x = if_inputs(positive)
        expected = reference.run(None, {"x": x})[0]
        np.testing.assert_allclose(converted.run(None, {"x": x})[0], expected, atol=2e-3 * np.abs(expected).max())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["silero_vad", "silero_vad_16k_op15"])
def test_silero_fp16_halves_the_file_and_keeps_its_speech_decisions(name):
    """Case 153 on the model it came from: fp16 wrote a file of the same size (weights in If branches)."""
    path = SILERO / f"{name}.onnx"
    q = edgeq.quantize(path, edgeq.Fp16())
    assert q.summary.quantized.get("LSTM") and q.summary.quantized.get("Conv")
    assert len(q.proto.SerializeToString()) < 0.56 * path.stat().st_size
    reference, converted = edgeq.load(path).session(), q.session()
    for audio in streams(4):
        expected, got = vad_probabilities(reference, audio), vad_probabilities(converted, audio)
        assert np.abs(expected - got).max() < 0.01
        assert np.mean((expected > 0.5) == (got > 0.5)) >= 0.99


def test_dynamic_int8_quantizes_matmuls_inside_if_branches():
    """Case 154: dynamic INT8 left If branches alone (Silero: nothing quantized, no word said)."""
    proto = if_model()
    q = edgeq.quantize(edgeq.Model(proto, None), edgeq.Int8Dynamic())
    assert sum(q.summary.quantized.values()) == 3, q.summary.quantized
    assert not q.summary.warnings
    stored = _inner_initializers(q.proto)  # int8 weights (and zero points), one float32 scale per output channel
    assert stored[TensorProto.INT8] >= 16 * 32 + 32 * 8 + 16 * 8 and stored[TensorProto.FLOAT] == 32 + 8 + 8
    reference, quantized = edgeq.Model(proto, None).session(), q.session()
    for positive in (True, False):
        x = if_inputs(positive)
        expected = reference.run(None, {"x": x})[0]
        np.testing.assert_allclose(quantized.run(None, {"x": x})[0], expected, atol=0.05 * np.abs(expected).max())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["silero_vad", "silero_vad_16k_op15"])
def test_silero_dynamic_int8_quantizes_the_lstm_in_its_branches(name):
    """Case 154 on the model it came from (1.43× larger, nothing quantized); op15 crashed the checker: ONNX Runtime's
    topological sort moved an If before the values its branches read (case 155)."""
    path = SILERO / f"{name}.onnx"
    q = edgeq.quantize(path, edgeq.Int8Dynamic())
    assert q.summary.quantized.get("DynamicQuantizeLSTM", 0) >= 2
    assert len(q.proto.SerializeToString()) < 0.85 * path.stat().st_size
    reference, quantized = edgeq.load(path).session(), q.session()
    for audio in streams(4):
        expected, got = vad_probabilities(reference, audio), vad_probabilities(quantized, audio)
        assert np.abs(expected - got).max() < 0.05
        assert np.mean((expected > 0.5) == (got > 0.5)) >= 0.97


def vad_feeds(path: Path, audio_streams: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The feeds silero_vad's streaming wrapper makes on these streams (state from the FP32 model)."""
    session = edgeq.load(path).session()
    names = {i.name for i in session.get_inputs()}
    feeds = []
    for audio in audio_streams:
        state, context = np.zeros((2, 1, 128), np.float32), np.zeros((1, CONTEXT), np.float32)
        for chunk in audio[: len(audio) // CHUNK * CHUNK].reshape(-1, CHUNK):
            x = np.concatenate([context, chunk[None]], axis=1)
            feed = {"input": x, "state": state} | ({"sr": np.array(RATE, np.int64)} if "sr" in names else {})
            feeds.append(feed)
            state, context = session.run(None, feed)[1], x[:, -CONTEXT:]
    return feeds


def _if_calib(x: np.ndarray) -> "edgeq.data.Dataset":
    from edgeq.data import Dataset

    return Dataset(lambda: ({"x": x[i:i + 8]} for i in range(0, len(x), 8)))


def test_static_int8_calibrates_each_if_branch_on_the_runs_that_take_it():
    """Case 156: static INT8 left If branches float; each branch is now calibrated on the values it reads."""
    proto = if_model()
    x = np.concatenate([if_inputs(True, 32, 1), if_inputs(False, 32, 2)])
    q = edgeq.quantize(edgeq.Model(proto, None), edgeq.Int8Static(method="minmax"), calib=_if_calib(x))
    assert q.summary.quantized == {"MatMul": 3}
    assert not [w for w in q.summary.warnings if w.startswith("subgraph")]
    for branch in ("then_branch", "else_branch"):  # 4 runs of 16 samples, the first 2 positive
        assert f"subgraph branch/{branch}: calibrated on the 2 calibration runs that take this branch" in q.summary.notes
    reference, quantized = edgeq.Model(proto, None).session(), q.session()
    for positive in (True, False):
        x = if_inputs(positive, 16, 5)
        expected = reference.run(None, {"x": x})[0]
        np.testing.assert_allclose(quantized.run(None, {"x": x})[0], expected, atol=0.05 * np.abs(expected).max())


def test_static_int8_says_a_branch_never_taken_stays_float():
    """Case 157: a branch the calibration data never takes cannot be calibrated: left float, and said."""
    q = edgeq.quantize(edgeq.Model(if_model(), None), edgeq.Int8Static(method="minmax"), calib=_if_calib(if_inputs(True, 64)))
    assert q.summary.quantized == {"MatMul": 2}
    assert any("branch/else_branch" in w and "never taken" in w for w in q.summary.warnings)
    x = if_inputs(False, 16, 5)
    expected = edgeq.Model(if_model(), None).session().run(None, {"x": x})[0]
    np.testing.assert_allclose(q.session().run(None, {"x": x})[0], expected, rtol=1e-6)  # the float branch is exact


@pytest.mark.slow
def test_silero_static_int8_quantizes_the_taken_branch_from_whole_feeds():
    """Cases 156–158 on Silero: calibration from whole streaming feeds (edgeq.calibrate.Feeds: state (2, 1, 128),
    scalar sr), the 16 kHz branch's convolutions quantized, the 8 kHz branch named as never taken, a checker-valid
    model (ONNX Runtime's topological sort had moved an If before what its branches read)."""
    from edgeq.calibrate import Feeds

    path = SILERO / "silero_vad.onnx"
    feeds = vad_feeds(path, [speech_like(2, 100), non_speech(2, 101)])
    q = edgeq.quantize(path, edgeq.Int8Static(method="minmax"), calib=Feeds(lambda: iter(feeds)))
    assert q.summary.quantized == {"Conv": 6}
    assert any(w.startswith("subgraph If_0/else_branch") and "never taken" in w for w in q.summary.warnings)
    onnx.checker.check_model(q.proto)
    session = q.session()
    for audio in streams(2, seconds=1.0):
        assert np.isfinite(vad_probabilities(session, audio)).all()

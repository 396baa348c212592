"""Quantize/dequantize arithmetic as properties, and agreement with the QDQ graphs edgeq writes."""
import numpy as np
import onnx
from hypothesis import assume, given, settings, strategies as st
from onnx import numpy_helper

import edgeq
from edgeq.quantize.qparams import QType, dequantize, qparams, quantize

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
QTYPES = [("uint8", False), ("int8", False), ("int8", True)]


@settings(max_examples=200, deadline=None)
@given(a=finite, b=finite, kind=st.sampled_from(QTYPES), xs=st.lists(st.floats(0, 1), min_size=1, max_size=50))
def test_round_trip_within_half_step_inside_range(a, b, kind, xs):
    low, high = min(a, b), max(a, b)
    span = max(high, 0.0) - min(low, 0.0)
    assume(span == 0 or span > 1e-30)  # subnormal ranges have no float32 scale
    qtype = QType.of(kind[0], symmetric=kind[1])
    scale, zero = qparams(low, high, qtype, kind[1])
    x = np.float32(low) + np.asarray(xs, np.float32) * np.float32(high - low)
    err = np.abs(dequantize(quantize(x, scale, zero, qtype), scale, zero) - x)
    # Half a step, plus float32 rounding of x/scale for large magnitudes.
    assert np.all(err <= scale / 2 * (1 + 1e-4) + np.abs(x) * 1e-6)


@settings(max_examples=200, deadline=None)
@given(a=finite, b=finite, kind=st.sampled_from(QTYPES))
def test_zero_is_exact_and_outside_values_saturate(a, b, kind):
    low, high = min(a, b), max(a, b)
    qtype = QType.of(kind[0], symmetric=kind[1])
    scale, zero = qparams(low, high, qtype, kind[1])
    assert dequantize(quantize(np.zeros(1, np.float32), scale, zero, qtype), scale, zero)[0] == 0.0
    assume(max(high, 0) - min(low, 0) > 1e-3)  # a degenerate range gets scale 1 and nothing to saturate against
    # Beyond the representable range (for symmetric types that is [-absmax, absmax]) values saturate.
    edge_low, edge_high = dequantize(np.array([qtype.qmin, qtype.qmax]), scale, zero)
    big = np.asarray([edge_low - abs(edge_low) - 1, edge_high + abs(edge_high) + 1], np.float32)
    q = quantize(big, scale, zero, qtype)
    assert q[0] == qtype.qmin
    assert q[1] == qtype.qmax


def test_per_channel_params_are_elementwise():
    lows, highs = np.array([-1.0, -2.0, 0.0]), np.array([1.0, 0.5, 4.0])
    scale, zero = qparams(lows, highs, QType.of("int8", symmetric=True), True)
    assert scale.shape == (3,) and np.all(zero == 0)
    np.testing.assert_allclose(scale, [1 / 127, 2 / 127, 4 / 127], rtol=1e-6)


def test_written_activation_scales_match_our_arithmetic(conv_model_path, conv_data):
    """The QDQ graph's activation scale/zero point are exactly what qparams gives for the calibrated range."""
    from edgeq.calibrate import calibrate
    from edgeq.quantize.prepare import prepare

    model = edgeq.load(conv_model_path)
    data = edgeq.Dataset.from_npz(conv_data)
    q = edgeq.quantize(model, edgeq.Int8Static(method="minmax"), calib=data)
    prepared, _ = prepare(model, per_channel=True)
    ranges = calibrate(prepared, data).ranges
    inits = {t.name: numpy_helper.to_array(t) for t in q.proto.graph.initializer}
    checked = 0
    for node in q.proto.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in ranges:
            scale, zero = qparams(*ranges[node.input[0]], QType.of("uint8"), False)
            np.testing.assert_allclose(inits[node.input[1]], scale, rtol=1e-6)
            assert int(inits[node.input[2]]) == int(zero)
            checked += 1
    assert checked >= 3


def test_a_range_too_narrow_for_a_float32_scale_gets_scale_one():
    """A denormal range (a dead channel) would give a zero or denormal float32 scale, and quantizing would divide by
    zero; as in ONNX Runtime, the scale becomes 1 and everything in the range maps to the zero point."""
    for kind in QTYPES:
        qtype = QType.of(kind[0], symmetric=kind[1])
        scale, zero = qparams(-1e-40, 3e-40, qtype, kind[1])
        assert np.all(scale == 1.0)
        with np.errstate(all="raise"):
            q = quantize(np.array([-1e-40, 0.0, 3e-40], np.float32), scale, zero, qtype)
        assert np.all(dequantize(q, scale, zero) == 0.0)

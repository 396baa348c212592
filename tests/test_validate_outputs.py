"""Issue 19, points 1 and 4: `validate` scores every output (or those named), per channel group by range, judges
embedding-like outputs by cosine, and the worst group of the worst output decides."""
from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgeq
from edgeq.errors import ConfigError, ModelError
from edgeq.evaluate import compare
from edgeq.evaluate.tasks.groups import channel_axis, channel_ranges, range_groups
from edgeq.model import TensorSpec
from tests.test_reliability import assert_user_error, cli

V1_KEYS = {"kind", "version", "model", "reference", "data", "output", "metric", "value", "ci95", "higher_is_better", "unit",
           "samples", "metrics", "per_sample", "predictions", "data_fingerprint", "nonfinite", "warnings"}


def two_output_model(state_output: bool = False):
    """x (N, 16) → `head` (N, 48) and `logits` (N, 10). Head channels 40-47 read only x[:, 14:], whose range is 1000×
    below the other features: static INT8's one activation scale for x rounds them to zero, while channels 0-39 (and
    so the whole head's cosine) stay exact to 0.9999. With `state_output`, a third output `state` (2, N, 10) whose
    sample axis is not first, as Silero VAD's."""
    rng = np.random.default_rng(0)
    w_head = np.zeros((16, 48), np.float32)
    w_head[:14, :40] = rng.normal(0, 0.5, (14, 40))
    w_head[14:, 40:] = rng.normal(0, 0.5, (2, 8))
    w_logits = np.zeros((16, 10), np.float32)
    w_logits[:14] = rng.normal(0, 0.5, (14, 10))
    nodes = [helper.make_node("MatMul", ["x", "wh"], ["head"]), helper.make_node("MatMul", ["x", "wl"], ["logits"])]
    outputs = [helper.make_tensor_value_info("head", TensorProto.FLOAT, ["N", 48]),
               helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])]
    inits = [numpy_helper.from_array(w_head, "wh"), numpy_helper.from_array(w_logits, "wl")]
    if state_output:
        inits.append(numpy_helper.from_array(np.array([0], np.int64), "axis0"))
        nodes += [helper.make_node("Unsqueeze", ["logits", "axis0"], ["u"]), helper.make_node("Concat", ["u", "u"], ["state"], axis=0)]
        outputs.append(helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", 10]))
    graph = helper.make_graph(nodes, "two_outputs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])], outputs, inits)
    return edgeq.Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), None)


def two_output_inputs(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(0, 1, (n, 16)).astype(np.float32)
    x[:, :14] *= 10
    x[:, 14:] *= 0.01
    return x


@pytest.fixture(scope="module")
def int8_pair():
    fp32 = two_output_model()
    q = edgeq.quantize(fp32, edgeq.Int8Static(method="minmax"), calib=edgeq.Dataset.from_arrays({"x": two_output_inputs(64, 1)}))
    return fp32, q, edgeq.Dataset.from_arrays({"x": two_output_inputs(100, 2)})


def test_range_groups_split_channels_by_decade_and_leave_silent_ones_out():
    ranges = np.array([50.0, 20.0, 4.9, 0.3, 0.05, 1e-30, 6.0])
    reference = np.stack([ranges, -ranges / 2])  # two samples; the range is the largest |value|
    assert channel_ranges(reference, 1).tolist() == ranges.tolist()
    assert [g.tolist() for g in range_groups(channel_ranges(reference, 1))] == [[0, 1, 6], [2], [3], [4]]
    assert [g.tolist() for g in range_groups(channel_ranges(np.zeros((3, 4)), 1))] == [[0, 1, 2, 3]]


def test_the_channel_axis_is_axis_1_or_the_features_of_a_sequence_output():
    hidden = TensorSpec("h", np.dtype("float32"), ("batch", "sequence", 384))
    conv1d = TensorSpec("c", np.dtype("float32"), ("batch", 64, "time"))
    assert channel_axis(np.zeros((2, 7, 384)), hidden) == 2
    assert channel_axis(np.zeros((2, 64, 9)), conv1d) == 1
    assert channel_axis(np.zeros((2, 3, 8, 8)), None) == 1
    assert channel_axis(np.zeros(2), None) is None


def test_a_destroyed_small_range_channel_group_decides_while_the_whole_cosine_passes(int8_pair):
    fp32, q, val = int8_pair
    record = edgeq.validate(q, val, reference=fp32)
    d = record.to_dict()
    assert V1_KEYS <= set(d) and d["version"] == 2
    by_name = {o["name"]: o for o in d["outputs"]}
    assert list(by_name) == ["head", "logits"]
    head, logits = by_name["head"], by_name["logits"]
    assert head["whole_output"]["cosine"]["value"] >= 0.99  # one cosine over the tensor hides the damage
    assert [(g["channels"], g["count"]) for g in head["groups"]] == [("0-39", 40), ("40-47", 8)]
    assert head["groups"][0]["cosine"]["value"] > 0.999 and head["groups"][1]["cosine"]["value"] < 0.5
    assert head["kind"] == "embedding" and head["judged_by"] == "cosine" and head["judgement"] == "stay-like"
    assert logits["kind"] == "classes" and logits["judged_by"] == "top1_agreement" and logits["value"] == 100.0
    assert d["worst"] == {"output": "head", "metric": "cosine", "value": pytest.approx(head["groups"][1]["cosine"]["value"]),
                          "group": 1, "channels": "40-47", "loss_points": pytest.approx(head["loss_points"])}
    assert record.metric == "cosine" and record.output == "head" and record.value < 0.5
    assert d["thresholds"]["cosine"] == {"ship_at_least": 0.99, "try_qat_at_least": 0.97}
    assert d["thresholds"]["sqnr_db"] == {"ship_at_least": 16.9, "try_qat_at_least": 12.0}
    comparison = compare(edgeq.validate(fp32, val, reference=fp32), record)
    assert comparison.verdict == "stay-fp16"
    assert any("output head, channel group 1 (channels 40-47)" in r for r in comparison.reasons)


def test_only_the_named_outputs_are_scored(int8_pair):
    fp32, q, val = int8_pair
    record = edgeq.validate(q, val, reference=fp32, outputs=["logits"])
    assert [o["name"] for o in record.outputs] == ["logits"]
    assert record.output == "logits" and record.metric == "top1_agreement" and record.value == 100.0
    assert compare(edgeq.validate(fp32, val, reference=fp32, outputs=["logits"]), record).verdict == "ship"
    with pytest.raises(ConfigError, match="no output 'scores'.*head, logits"):
        edgeq.validate(q, val, reference=fp32, outputs=["scores"])


def test_an_output_without_the_sample_axis_first_is_left_out_or_refused_when_named():
    model = two_output_model(state_output=True)
    val = edgeq.Dataset.from_arrays({"x": two_output_inputs(30, 3)})
    record = edgeq.validate(model, val, reference=model, batch_size=8)
    assert [o["name"] for o in record.outputs] == ["head", "logits"]
    assert any("state have no sample axis first: not scored" in w for w in record.warnings)
    with pytest.raises(ModelError, match="output 'state' has shape \\(2, 8, 10\\)"):
        edgeq.validate(model, val, reference=model, batch_size=8, outputs=["head", "state"])


def test_whole_feeds_are_one_sample_each_and_nan_in_them_is_counted_not_refused():
    from edgeq.calibrate import Feeds

    model = two_output_model()
    feeds = [{"x": two_output_inputs(4, seed)} for seed in range(5)]
    feeds[2]["x"][0, 0] = np.nan
    record = edgeq.validate(model, Feeds(lambda: iter(feeds)), reference=model)
    assert record.samples == 5 and record.nonfinite["inputs"] == 1
    assert record.nonfinite["samples_with_nonfinite_outputs"] == 1
    assert any("1 input values are NaN or Inf" in w for w in record.warnings)
    with pytest.raises(edgeq.errors.DataError, match="feed 0 has no value for x"):
        edgeq.validate(model, Feeds(lambda: iter([{"y": feeds[0]["x"]}])), reference=model)


def test_cli_prints_every_scored_output_and_refuses_an_unknown_one_in_one_line(int8_pair, tmp_path):
    fp32, q, _ = int8_pair
    fp32.save(tmp_path / "fp32.onnx")
    q.save(tmp_path / "int8.onnx")
    np.savez(tmp_path / "val.npz", x=two_output_inputs(40, 4))
    proc = cli(tmp_path, "validate", "int8.onnx", "--data", "val.npz", "--reference", "fp32.onnx", "-o", "int8.json")
    assert proc.returncode == 0, proc.stderr
    assert "outputs scored" in proc.stdout and "logits" in proc.stdout
    assert "decided on output head, channel group 1 (channels 40-47): cosine" in proc.stdout
    assert json.loads((tmp_path / "int8.json").read_text())["worst"]["channels"] == "40-47"
    proc = cli(tmp_path, "validate", "int8.onnx", "--data", "val.npz", "--reference", "fp32.onnx", "--outputs", "logits",
               "-o", "logits.json")
    assert proc.returncode == 0, proc.stderr
    assert [o["name"] for o in json.loads((tmp_path / "logits.json").read_text())["outputs"]] == ["logits"]
    bad = cli(tmp_path, "validate", "int8.onnx", "--data", "val.npz", "--reference", "fp32.onnx", "--outputs", "logits,boxes",
              "-o", "bad.json")
    assert_user_error(bad, "'boxes'", "head, logits")
    assert not (tmp_path / "bad.json").exists()


# ----- real models from pip packages ------------------------------------------------------------------------------

@pytest.mark.slow
def test_minilm_int8_sentence_embedding_is_judged_by_cosine_not_argmax(tmp_path):
    """Issue 19 point 4: MiniLM's INT8 sentence embedding agrees with FP32 on 79% of argmaxes ("stay-fp16" by the
    old reading) at cosine 0.993: it is an embedding (384 wide, no softmax, no labels) and ships by cosine."""
    from edgeq.testing import zoo

    path = zoo.export_minilm(tmp_path / "minilm.onnx")
    feed = zoo.minilm_inputs(zoo.sample_sentences(48))
    q = edgeq.quantize(path, edgeq.Int8Dynamic())
    argmax_agreement = np.mean(edgeq.load(path).session().run(["sentence_embedding"], feed)[0].argmax(1)
                               == q.session().run(["sentence_embedding"], feed)[0].argmax(1))
    assert argmax_agreement < 0.9
    val = edgeq.Dataset.from_arrays(feed)
    record = edgeq.validate(q, val, reference=path, outputs=["sentence_embedding"])
    assert record.metric == "cosine" and "top1_agreement" not in record.metrics and record.predictions is None
    assert record.outputs[0]["kind"] == "embedding" and record.value >= 0.99
    assert compare(edgeq.validate(path, val, reference=path, outputs=["sentence_embedding"]), record).verdict == "ship"
    every = edgeq.validate(q, val, reference=path)  # both outputs; the hidden states lose more
    assert [(o["name"], o["kind"], o["judged_by"]) for o in every.outputs] == [
        ("sentence_embedding", "embedding", "cosine"), ("last_hidden_state", "tensor", "cosine")]
    hidden = every.outputs[1]
    assert hidden["channel_axis"] == 2 and hidden["silent_channels_left_out"] >= 2  # MiniLM's dead channels (1e-32)
    assert every.output == "last_hidden_state" and every.value == pytest.approx(min(o["value"] for o in every.outputs))


@pytest.mark.slow
def test_ppocr_det_map_keeps_its_map_metrics_and_names_its_one_output():
    from edgeq.testing import zoo

    path = zoo.ppocr_det_path()
    pages = zoo.render_text_images(5, 256, 320, seed=3)
    q = edgeq.quantize(path, edgeq.Int8Static(method="minmax"), calib=edgeq.Dataset.from_arrays({"x": pages[:3]}))
    record = edgeq.validate(q, edgeq.Dataset.from_arrays({"x": pages[3:]}), reference=path, batch_size=1)
    d = record.to_dict()
    assert V1_KEYS <= set(d)
    (only,) = d["outputs"]
    assert only["name"] == record.output == edgeq.load(path).outputs[0].name
    assert only["kind"] == "tensor" and len(only["groups"]) == 1 and only["groups"][0]["count"] == 1
    assert {"cosine", "sqnr_db", "mean_abs_diff", "iou@0.3"} <= set(record.metrics)
    assert record.value == pytest.approx(only["whole_output"]["cosine"]["value"])
    assert d["worst"]["group"] is None


@pytest.mark.slow
def test_magika_probabilities_stay_judged_by_top1_agreement():
    from tests.test_real_models import MAGIKA_MODEL, magika_features, real_files

    tokens = np.stack([magika_features(p) for p in real_files(48)])
    q = edgeq.quantize(MAGIKA_MODEL, edgeq.Int8Dynamic())
    record = edgeq.validate(q, edgeq.Dataset.from_arrays({"bytes": tokens}), reference=MAGIKA_MODEL)
    (only,) = record.outputs
    assert only["name"] == "target_label" and only["kind"] == "classes"  # 214 wide, but rows sum to 1
    assert record.metric == "top1_agreement" and record.value >= 95.0


@pytest.mark.slow
def test_silero_vad_whole_feeds_score_the_speech_output_and_the_state():
    """Silero's state (2, 1, 128) has no sample axis first: whole feeds (edgeq.calibrate.Feeds), one run a sample."""
    from edgeq.calibrate import Feeds
    from tests.test_subgraphs import SILERO, non_speech, speech_like, vad_feeds

    path = SILERO / "silero_vad.onnx"
    feeds = vad_feeds(path, [speech_like(1, 100), non_speech(1, 101)])
    q = edgeq.quantize(path, edgeq.Int8Dynamic())
    record = edgeq.validate(q, Feeds(lambda: iter(feeds)), reference=path)
    assert record.samples == len(feeds)
    assert [(o["name"], o["kind"]) for o in record.outputs] == [("output", "tensor"), ("stateN", "tensor")]
    worst = min(record.outputs, key=lambda o: o["value"])
    assert record.worst["output"] == worst["name"] and record.metric == "cosine" and record.value >= 0.99
    assert any(w.startswith("output output holds one value per sample, whose cosine is only its sign: read its SQNR")
               for w in record.warnings)

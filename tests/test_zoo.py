"""edgeq.testing.zoo: real models and data from installed packages, no download."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import onnx
import pytest

import edgeq
from edgeq.testing import zoo
from edgeq.errors import UserError


@pytest.fixture(scope="session")
def minilm_path(tmp_path_factory):
    return zoo.export_minilm(tmp_path_factory.mktemp("minilm") / "minilm.onnx")


def test_ppocr_det_path_loads_as_an_image_model():
    model = edgeq.load(zoo.ppocr_det_path())
    assert [(s.name, s.dtype, s.shape[1]) for s in model.inputs] == [("x", np.float32, 3)]


def test_ppocr_det_path_says_how_to_install_when_missing(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(UserError, match="pip install rapidocr-onnxruntime"):
        zoo.ppocr_det_path()


def test_rendered_pages_are_preprocessed_deterministic_text():
    pages = zoo.render_text_images(3, height=320, width=416, seed=7)
    assert pages.shape == (3, 3, 320, 416) and pages.dtype == np.float32
    assert pages.min() >= -1.0 and pages.max() == 1.0  # (RGB / 255 - 0.5) / 0.5 on white paper
    ink = (pages < 0).mean(axis=(1, 2, 3))
    assert np.all((ink > 0.005) & (ink < 0.3))  # every page holds text, and is mostly paper
    np.testing.assert_array_equal(pages, zoo.render_text_images(3, height=320, width=416, seed=7))
    assert not np.array_equal(pages, zoo.render_text_images(3, height=320, width=416, seed=8))
    assert not np.array_equal(pages[0], pages[1])


@pytest.mark.parametrize("n, height, width", [(0, 480, 640), (1, 480, 600), (1, 100, 640)])
def test_render_rejects_sizes_ppocr_cannot_take(n, height, width):
    with pytest.raises(UserError, match="multiples of 32"):
        zoo.render_text_images(n, height=height, width=width)


@pytest.mark.slow
def test_ppocr_det_finds_text_on_rendered_pages():
    """The pages are realistic enough for the real model: text regions light up in its probability map."""
    pages = zoo.render_text_images(2)
    probability = edgeq.load(zoo.ppocr_det_path()).session(threads=2).run(None, {"x": pages})[0]
    ink = (pages < 0).any(axis=1, keepdims=True)
    assert probability[ink].mean() > 0.5 > probability[~ink].mean()


def test_sample_sentences_are_varied_english_and_deterministic():
    sentences = zoo.sample_sentences(50, seed=3)
    assert len(sentences) == len(set(sentences)) == 50
    assert all(s[0].isupper() and s.endswith(".") and 6 <= len(s.split()) <= 30 for s in sentences)
    assert sentences == zoo.sample_sentences(50, seed=3) and sentences != zoo.sample_sentences(50, seed=4)
    with pytest.raises(UserError, match="ask for fewer"):
        zoo.sample_sentences(10**7)


def test_minilm_inputs_match_the_transformers_tokenizer():
    from transformers import AutoTokenizer

    sentences = zoo.sample_sentences(8) + ["Short."]
    feeds = zoo.minilm_inputs(sentences)
    reference = AutoTokenizer.from_pretrained(zoo.minilm_dir(), local_files_only=True)(sentences, padding=True, return_tensors="np")
    assert list(feeds) == list(zoo.MINILM_INPUTS)
    for name, values in feeds.items():
        assert values.dtype == np.int64
        np.testing.assert_array_equal(values, reference[name])
    assert feeds["attention_mask"].sum(1).max() == feeds["input_ids"].shape[1]  # padded to the longest
    assert zoo.minilm_inputs(["word " * 300], max_length=32)["input_ids"].shape == (1, 32)


def test_data_helpers_never_import_torch():
    code = ("import sys; from edgeq.testing import zoo; zoo.render_text_images(1, 64, 64); zoo.minilm_inputs(['A b c.']); "
            "zoo.ppocr_det_path(); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_minilm_export_is_valid_with_dynamic_batch_and_sequence(minilm_path):
    proto = onnx.load(minilm_path)
    onnx.checker.check_model(proto, full_check=True)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in list(proto.graph.input) + list(proto.graph.output)}
    assert dims == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"],
                    "token_type_ids": ["batch", "sequence"], "sentence_embedding": ["batch", 384],
                    "last_hidden_state": ["batch", "sequence", 384]}
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.INT64 for v in proto.graph.input)


@pytest.mark.slow
def test_minilm_export_matches_transformers(minilm_path):
    import torch
    from transformers import AutoModel

    session = edgeq.load(minilm_path).session(threads=2)
    encoder = AutoModel.from_pretrained(zoo.minilm_dir(), local_files_only=True).eval()
    for sentences in (zoo.sample_sentences(5, seed=1), ["One sentence alone, longer than the export's examples were."]):
        feeds = zoo.minilm_inputs(sentences)
        embedding, hidden = session.run(None, feeds)
        with torch.no_grad():
            expected_hidden = encoder(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
        mask = feeds["attention_mask"][..., None]
        pooled = (expected_hidden * mask).sum(1) / mask.sum(1)
        expected = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        assert np.abs(embedding - expected).max() < 1e-4
        assert (embedding * expected).sum(1).min() > 0.9999  # both are unit vectors
        real = mask[..., 0].astype(bool)
        assert np.abs(hidden[real] - expected_hidden[real]).max() < 1e-3


def test_minilm_export_refuses_opsets_torch_cannot_write(tmp_path):
    with pytest.raises(UserError, match="opset 18"):
        zoo.export_minilm(tmp_path / "m.onnx", opset=17)


def test_rendered_text_lines_are_preprocessed_deterministic_lines():
    lines, texts = zoo.text_lines(6, width=320, seed=2)
    assert lines.shape == (6, 3, 48, 320) and lines.dtype == np.float32
    assert lines.min() >= -1.0 and lines.max() <= 1.0
    assert all(1 <= len(t.split()) <= 6 for t in texts) and len(set(texts)) == 6
    np.testing.assert_array_equal(lines, zoo.render_text_lines(6, width=320, seed=2))
    assert not np.array_equal(lines, zoo.render_text_lines(6, width=320, seed=3))
    assert ((lines < -0.3).mean(axis=(1, 2, 3)) > 0.01).all()  # ink on every line
    padded = np.all(lines == 0, axis=(1, 2))  # PaddleOCR pads the right of a short line with 0
    assert padded.any(axis=1).any()


@pytest.mark.parametrize("n, width", [(0, 320), (1, 300), (1, 40)])
def test_render_lines_rejects_what_the_recogniser_cannot_take(n, width):
    with pytest.raises(UserError, match="multiple of 8"):
        zoo.render_text_lines(n, width=width)


def test_ctc_decode_merges_repeats_and_drops_blanks(monkeypatch):
    monkeypatch.setattr(zoo, "_rec_characters", lambda: ("", "a", "b", " "))
    assert zoo.ctc_decode(np.array([[0, 1, 1, 0, 1, 2, 2, 3, 0]])) == ["aab "]

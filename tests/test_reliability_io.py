"""Durable writes and hostile files (issue 18 items 2-3, issue 12 items 7, 9, 11): every output is fsynced before and
after its rename, .npz files are read in bounded chunks and refused when they would explode, outputs never land on a
file the input consists of, and names are drawn in plots as written. docs/RELIABILITY.md cases 100-149."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgeq import atomic
from edgeq.data import Dataset, batches
from edgeq.errors import DataError
from edgeq.model import TensorSpec, save
from tests.conftest import make_conv_model
from tests.test_reliability import assert_user_error, cli, tree

SPEC = [TensorSpec("x", np.dtype("float32"), ("N", 1, 8, 8))]


# ----- durable writes ----------------------------------------------------------------------------------------

def test_every_published_file_and_its_folder_are_fsynced(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    monkeypatch.setenv("EDGEQ_EXTERNAL_DATA_THRESHOLD", "100")  # weights to an external data file
    model = save(make_conv_model(), tmp_path / "m.onnx")
    data_files = [p for p in tmp_path.iterdir() if p.suffix == ".data"]
    assert len(data_files) == 1
    assert any(".edgeq-" in s and s.endswith("m.onnx") for s in synced), synced   # the staged model, before its rename
    assert any(".edgeq-" in s and s.endswith(data_files[0].name) for s in synced), synced
    assert synced.count(str(tmp_path)) >= 2, synced                                   # the folder, after each rename
    synced.clear()
    atomic.write_json(tmp_path / "r.json", {"a": 1})
    assert [s for s in synced if s.endswith(".tmp")] and str(tmp_path) in synced, synced
    assert model.stat().st_size > 0 and (tmp_path / "r.json").read_text().strip().endswith("}")


# ----- bounded .npz reads ------------------------------------------------------------------------------------

def _peak_rss_kib(cwd: Path, *args: str) -> int:
    """Peak RSS of `edgeq ARGS` run in a child process (ru_maxrss of the waited-for children)."""
    code = ("import os, resource, subprocess, sys; "
            f"r = subprocess.run([sys.executable, '-m', 'edgeq.cli', *{list(args)!r}], capture_output=True, text=True); "
            "assert r.returncode == 0, r.stderr; print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEQ_")}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@pytest.mark.slow
def test_max_samples_bounds_memory_on_a_large_npz(tmp_path):
    onnx.save(make_conv_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "large.npz", x=np.zeros((2**20, 1, 8, 8), np.float32))   # 256 MiB
    np.savez(tmp_path / "small.npz", x=np.zeros((64, 1, 8, 8), np.float32))
    args = ("quantize", "m.onnx", "--mode", "static", "--method", "minmax", "--max-samples", "64", "--force", "-o")
    small = _peak_rss_kib(tmp_path, *args, "a.onnx", "--calib", "small.npz")
    large = _peak_rss_kib(tmp_path, *args, "b.onnx", "--calib", "large.npz")
    assert large - small < 64 * 1024, f"peak RSS {large} KiB on 256 MiB of data vs {small} KiB on 64 samples"


def _bomb(path: Path, declared: tuple[int, ...], data_bytes: int) -> None:
    """An .npz whose member declares `declared` float32 and holds `data_bytes` of zeros, deflated."""
    header = np.lib.format.header_data_from_array_1_0(np.zeros((0,), np.float32)) | {"shape": declared}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive, archive.open("x.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, header)
        block = bytes(2**24)
        for start in range(0, data_bytes, len(block)):
            member.write(block[: min(len(block), data_bytes - start)])


def test_a_zip_bomb_is_refused_before_it_is_decompressed(tmp_path):
    _bomb(tmp_path / "bomb.npz", (2**26, 1, 8, 8), 2**28)   # 256 MiB of zeros in well under 1 MiB
    assert (tmp_path / "bomb.npz").stat().st_size < 2**20
    with pytest.raises(DataError, match="zip bomb"):
        Dataset.from_npz(tmp_path / "bomb.npz")
    onnx.save(make_conv_model(), tmp_path / "m.onnx")
    before = tree(tmp_path)
    assert_user_error(cli(tmp_path, "quantize", "m.onnx", "-o", "q.onnx", "--calib", "bomb.npz"), "bomb.npz", "zip bomb")
    assert tree(tmp_path) == before


def test_a_header_declaring_more_samples_than_the_file_holds_is_refused(tmp_path):
    _bomb(tmp_path / "liar.npz", (2**34, 1, 8, 8), 4096)
    with pytest.raises(DataError, match=r"declares shape \(17179869184, 1, 8, 8\)"):
        Dataset.from_npz(tmp_path / "liar.npz")


def test_npz_chunks_are_bounded_and_equal_the_whole_array(tmp_path, monkeypatch):
    from edgeq import npz

    monkeypatch.setattr(npz, "CHUNK_BYTES", 1000)  # 3 samples of 256 bytes per chunk
    rng = np.random.default_rng(0)
    x, labels = rng.normal(size=(20, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, 20)
    for writer in (np.savez, np.savez_compressed):
        writer(tmp_path / "d.npz", x=x, labels=labels)
        ds = Dataset.from_npz(tmp_path / "d.npz")
        sizes = [c.size for c in ds.chunks()]
        assert len(ds) == 20 and max(sizes) == 3 and sum(sizes) == 20
        got = list(batches(ds, SPEC, 7))
        np.testing.assert_array_equal(np.concatenate([b.inputs["x"] for b in got]), x)
        np.testing.assert_array_equal(np.concatenate([b.labels for b in got]), labels)
    np.savez(tmp_path / "f.npz", x=np.asfortranarray(x), labels=labels)
    np.testing.assert_array_equal(np.concatenate([c.inputs["x"] for c in Dataset.from_npz(tmp_path / "f.npz").chunks()]), x)


# ----- outputs that would destroy inputs ---------------------------------------------------------------------

def test_output_over_the_inputs_external_data_file_is_refused(tmp_path):
    onnx.save(make_conv_model(), tmp_path / "m.onnx", save_as_external_data=True, location="m.weights", size_threshold=0)
    before = tree(tmp_path)
    assert_user_error(cli(tmp_path, "quantize", "m.onnx", "-o", "m.weights", "--mode", "dynamic", "--force"),
                      "would overwrite the input", "m.weights")
    assert tree(tmp_path) == before


def test_auto_into_a_folder_holding_the_input_model_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    onnx.save(make_conv_model(), tmp_path / "d" / "m.onnx")
    np.savez(tmp_path / "d" / "v.npz", x=np.zeros((20, 1, 8, 8), np.float32), labels=np.zeros(20, np.int64))
    before = tree(tmp_path)
    assert_user_error(cli(tmp_path, "auto", "d/m.onnx", "--calib", "d/v.npz", "--val", "d/v.npz", "-o", "d", "--force"),
                      "holds the input")
    assert tree(tmp_path) == before


# ----- names drawn in plots ----------------------------------------------------------------------------------

def test_names_with_dollar_signs_are_drawn_as_written():
    from edgeq.report import tradeoff_svg
    from edgeq.report.auto import sensitivity_chart

    name = "/blocks.0/$\\frac{x}{$/Conv"   # matplotlib's mathtext raised ValueError on it
    models = [{"name": name, "size_mb": 1.0, "p50_ms": 2.0, "metric_value": 90.0, "metric_ci95": [89.0, 91.0], "metric": "top1 $%"}]
    assert tradeoff_svg(models).startswith("<svg")
    row = {"rank": 1, "node": name, "only_quantized": {"sqnr_db": 12.0}, "only_float": {"sqnr_db": 30.0}}
    assert sensitivity_chart([row]).startswith("<svg")


# ----- external data ---------------------------------------------------------------------------------------

def _sparse_model(folder: Path, location: str, offset: int = 0, length: int | None = None) -> Path:
    """y = x @ W with W a 4x3 sparse initializer whose 3 values lie in an external file."""
    from onnx import TensorProto, helper

    values = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[3])
    values.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": str(offset), "length": str(12 if length is None else length)}
    for key, value in entries.items():
        values.external_data.add(key=key, value=value)
    indices = helper.make_tensor("W_indices", TensorProto.INT64, [3], [0, 4, 11])
    sparse = helper.make_sparse_tensor(values, indices, [4, 3])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "sparse",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    graph.sparse_initializer.append(sparse)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "sparse.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_sparse_external_data_is_read_from_the_models_folder_not_the_current_one(tmp_path):
    import edgeq

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "vals.bin").write_bytes(np.array([1.0, 2.0, 3.0], np.float32).tobytes())
    (tmp_path / "vals.bin").write_bytes(np.array([7.0, 7.0, 7.0], np.float32).tobytes())   # in the current folder
    _sparse_model(tmp_path / "models", "vals.bin")
    model = edgeq.load(tmp_path / "models" / "sparse.onnx")
    np.testing.assert_array_equal(model.proto.graph.sparse_initializer[0].values.raw_data,
                                  np.array([1.0, 2.0, 3.0], np.float32).tobytes())
    proc = cli(tmp_path, "quantize", "models/sparse.onnx", "-o", "q.onnx", "--precision", "fp16")
    assert proc.returncode == 0, proc.stderr
    assert np.array([7.0], np.float32).tobytes() not in (tmp_path / "q.onnx").read_bytes()


@pytest.mark.parametrize("location, offset, length, words", [
    ("../outside.bin", 0, 12, ("outside the model's folder",)),
    ("/etc/hostname", 0, 12, ("outside the model's folder",)),
    ("vals.bin", 2**62, 12, ("offset 4611686018427387904", "holds 12 bytes")),
    ("vals.bin", 0, 40 * 2**30, ("42949672960 bytes", "holds 12 bytes")),
])
def test_external_data_outside_the_folder_or_beyond_the_file_is_refused(tmp_path, location, offset, length, words):
    (tmp_path / "m").mkdir()
    (tmp_path / "outside.bin").write_bytes(bytes(12))
    (tmp_path / "m" / "vals.bin").write_bytes(bytes(12))
    _sparse_model(tmp_path / "m", location, offset, length)
    before = tree(tmp_path)
    assert_user_error(cli(tmp_path, "quantize", "m/sparse.onnx", "-o", "q.onnx", "--precision", "fp16"), "external data", *words)
    assert tree(tmp_path) == before


# ----- inputs too large to allocate ------------------------------------------------------------------------

@pytest.mark.parametrize("dims, words", [
    ("4096,1024,1024,64", ("would need 1.02e+03 GiB", "x: float32[4096,1024,1024,64]")),   # 1 TiB
    (f"{2**31},1024,1024,{2**20}", ("x: float32[2147483648,1024,1024,1048576]",)),         # 2**62 elements
])
def test_bench_refuses_random_inputs_larger_than_memory_before_allocating(tmp_path, dims, words):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1024, 1024, None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1024, 1024, None])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "big.onnx")
    proc = cli(tmp_path, "bench", "big.onnx", "--runs", "1", "--warmup", "0", "--shape", f"x={dims}")
    assert_user_error(proc, "half the available memory", *words)


# ----- model files that are not ONNX -------------------------------------------------------------------------

def _torch_files(folder: Path) -> dict[str, tuple[str, ...]]:
    import torch

    net = torch.nn.Sequential(torch.nn.Linear(4, 2))
    torch.save(net.state_dict(), folder / "weights.pt")
    torch.save(net.state_dict(), folder / "legacy.pth", _use_new_zipfile_serialization=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript; users still have such files
        torch.jit.script(net).save(str(folder / "scripted.pt"))
    return {"weights.pt": ("PyTorch checkpoint", "MODULE:FACTORY --weights"), "legacy.pth": ("PyTorch checkpoint", "MODULE:FACTORY --weights"),
            "scripted.pt": ("TorchScript archive", "MODULE:FACTORY with --weights", "torch.onnx.export")}


def _tensorflow_files(folder: Path) -> dict[str, tuple[str, ...]]:
    # The first bytes the formats define: a flatbuffer's root offset and the "TFL3" identifier; HDF5's signature.
    (folder / "model.tflite").write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(64))
    (folder / "model.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    (folder / "frozen.pb").write_bytes(b"\n\x0c\n\x05input\x12\x03Placeholder")
    (folder / "saved").mkdir()
    (folder / "saved" / "saved_model.pb").write_bytes(b"\x08\x01")
    return {"model.tflite": ("TensorFlow Lite", "tf2onnx", "--tflite", "edgeq bench"), "model.h5": ("Keras HDF5", "from_keras"),
            "frozen.pb": ("frozen graph", "--graphdef"), "saved": ("SavedModel", "--saved-model")}


@pytest.mark.parametrize("make", [_tensorflow_files, pytest.param(_torch_files, marks=pytest.mark.slow)])
def test_other_model_formats_are_named_with_the_way_to_onnx(tmp_path, make):
    for name, words in make(tmp_path).items():
        benches = name != "model.tflite"  # bench runs a .tflite in LiteRT: tested below
        for command in (("quantize", name, "-o", "q.onnx", "--mode", "dynamic"), ("bench", name, "--runs", "1"))[:1 + benches]:
            assert_user_error(cli(tmp_path, *command), name, "not an ONNX model", *words)


def test_a_broken_tflite_file_is_one_line_from_bench(tmp_path):
    """bench runs .tflite files in LiteRT: a truncated one is LiteRT's refusal (or, without the extra, how to get it)."""
    (tmp_path / "model.tflite").write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(64))
    try:
        import ai_edge_litert  # noqa: F401
        words = ("LiteRT cannot load", "model.tflite")
    except ImportError:
        words = ("LiteRT interpreter", "edgeq[tflite]")
    assert_user_error(cli(tmp_path, "bench", "model.tflite", "--runs", "1"), *words)

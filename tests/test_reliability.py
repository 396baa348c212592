"""Reliability (issue 7): every bad input is one clear line and exit 2, bugs exit 1, outputs are atomic, results
are reproducible, and nothing unpickles user files. Each case goes through the real CLI in a subprocess.

docs/RELIABILITY.md lists every case with the message a user sees; keep the two in step.
"""
from __future__ import annotations

import ast
import errno
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import edgeq
import edgeq.cli
from edgeq import atomic
from edgeq.calibrate import METHODS, calibrate
from edgeq.errors import OutputError
from edgeq.model import make_session
from edgeq.quantize.prepare import prepare
from tests.conftest import make_conv_model

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(7)


# ----- helpers ------------------------------------------------------------------------------------------------

def cli(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `edgeq` as users do, from `cwd` so that messages show the short relative paths."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEQ_")}
    full_env.update(PYTHONPATH=str(REPO), COLUMNS="200", **(env or {}))
    return subprocess.run([sys.executable, "-m", "edgeq.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=120)


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` (dot-files included) with its bytes, to prove a failed run changed nothing."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def assert_user_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 2, exactly one stderr line `edgeq: error: what — fix` naming `words`, and no traceback."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("edgeq: error: ") and " — " in line, line
    assert "Traceback" not in proc.stderr + proc.stdout
    for word in words:
        assert word.lower() in line.lower(), f"{word!r} not in {line!r}"


def quantize_fails(folder: Path, model: str, *extra: str, words: tuple[str, ...], env: dict[str, str] | None = None) -> None:
    """A quantization that must fail as a user error and leave the folder exactly as it was."""
    before = tree(folder)
    assert_user_error(cli(folder, "quantize", model, "-o", "out/q.onnx", *extra, env=env), *words)
    assert tree(folder) == before, "a failed run left files behind"


def save_model(proto: onnx.ModelProto, path: Path) -> str:
    onnx.save(proto, path)
    return path.name


def with_node_after_relu2(op: str, domain: str = "") -> onnx.ModelProto:
    """The tiny CNN with one extra unary node between relu2 and the pooling."""
    model = make_conv_model()
    model.graph.node.insert(4, helper.make_node(op, ["r2"], ["extra"], name="extra", domain=domain))
    model.graph.node[5].input[0] = "extra"
    if domain:
        model.opset_import.append(helper.make_opsetid(domain, 1))
    return model


def x_samples(n: int, h: int = 8, w: int = 8) -> np.ndarray:
    return RNG.normal(0, 1, (n, 1, h, w)).astype(np.float32)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A folder with the tiny CNN (tiny.onnx), 200 calibration samples (data.npz) and an empty out/ folder."""
    onnx.save(make_conv_model(), tmp_path / "tiny.onnx")
    np.savez(tmp_path / "data.npz", x=x_samples(200), labels=RNG.integers(0, 10, 200))
    (tmp_path / "out").mkdir()
    return tmp_path


# ----- bad models ---------------------------------------------------------------------------------------------

def _truncated(folder: Path) -> str:
    data = (folder / "tiny.onnx").read_bytes()
    (folder / "truncated.onnx").write_bytes(data[: len(data) // 2])
    return "truncated.onnx"


def _dangling_input(folder: Path) -> str:
    model = make_conv_model()
    model.graph.node[1].input[0] = "ghost"  # relu1 reads a tensor that nothing produces
    return save_model(model, folder / "dangling.onnx")


def _missing_external_data(folder: Path) -> str:
    onnx.save(make_conv_model(), folder / "ext.onnx", save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    (folder / "ext.onnx.data").unlink()
    return "ext.onnx"


def _external_data_outside(folder: Path) -> str:
    """A model whose data file is named `../w.data`: reading it would reach outside the model's folder."""
    onnx.save(make_conv_model(), folder / "w.onnx", save_as_external_data=True, location="w.data", size_threshold=0)
    model = onnx.load(folder / "w.onnx", load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../w.data"
    (folder / "sub").mkdir()
    onnx.save(model, folder / "sub" / "escape.onnx")
    return "sub/escape.onnx"


def _random_bytes(folder: Path) -> str:
    (folder / "random.onnx").write_bytes(np.random.default_rng(0).bytes(4000))
    return "random.onnx"


def _text(folder: Path) -> str:
    (folder / "notes.onnx").write_text("this is a text file\nnot a model\n")
    return "notes.onnx"


def _empty(folder: Path) -> str:
    (folder / "empty.onnx").write_bytes(b"")
    return "empty.onnx"


def _folder(folder: Path) -> str:
    (folder / "model_dir.onnx").mkdir()
    return "model_dir.onnx"


BAD_MODELS = {
    "missing": (lambda folder: "nope.onnx", ("nope.onnx", "not found", "check the path")),
    "random-bytes": (_random_bytes, ("random.onnx", "not a readable ONNX model")),
    "text-file": (_text, ("notes.onnx", "not a readable ONNX model")),
    "empty-file": (_empty, ("empty.onnx", "no graph nodes")),
    "folder": (_folder, ("model_dir.onnx", "is a folder")),
    "truncated": (_truncated, ("truncated.onnx", "re-export")),
    "checker-fails": (_dangling_input, ("dangling.onnx", "fails the ONNX checker", "ghost")),
    "external-data-missing": (_missing_external_data, ("ext.onnx refers to external data that is missing beside it: ext.onnx.data",)),
    "external-data-outside-folder": (_external_data_outside, ("external data of sub/escape.onnx cannot be read",)),
    "opset-too-old": (lambda folder: save_model(make_conv_model(opset=9), folder / "old.onnx"), ("opset 9", "newer opset")),
    "custom-op": (lambda folder: save_model(with_node_after_relu2("MyOp", "com.example"), folder / "custom.onnx"),
                  ("ONNX Runtime cannot run", "com.example:MyOp")),
}


@pytest.mark.parametrize("case", BAD_MODELS)
def test_bad_model(work, case):
    make, words = BAD_MODELS[case]
    quantize_fails(work, make(work), "--calib", "data.npz", words=words)


def test_model_that_overflows_on_calibration_data_is_a_user_error(work):
    """Finite inputs, infinite activations: calibration would write NaN scales (minmax) or crash (percentile)."""
    model = make_conv_model()
    model.graph.initializer.append(numpy_helper.from_array(np.array(1e38, np.float32), "huge"))
    model.graph.node.insert(1, helper.make_node("Mul", ["c1", "huge"], ["c1x"], name="overflow"))
    model.graph.node[2].input[0] = "c1x"
    save_model(model, work / "overflow.onnx")
    np.savez(work / "tens.npz", x=np.full((20, 1, 8, 8), 10.0, np.float32))  # conv1 ≈ ±10: c1x overflows in every batch
    for method in METHODS:
        quantize_fails(work, "overflow.onnx", "--calib", "tens.npz", "--method", method, words=("'c1x' holds NaN/Inf", "overflows float32"))


def test_model_that_fails_at_run_time_on_the_data_is_a_user_error(work):
    """The data fits the declared input (a symbolic dim) but not what the model computes with: a Reshape to 4×4
    of 8 values. ONNX Runtime fails inside a calibration worker; the user gets one line, not a bug report."""
    weight = numpy_helper.from_array(RNG.normal(0, 0.3, (8, 8)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([0, 4, 4], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Reshape", ["h", "shape"], ["y"], name="r")],
        "reshape", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4, 4])], [weight, shape])
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), work / "reshape.onnx")
    np.savez(work / "eights.npz", x=RNG.normal(0, 1, (40, 8)).astype(np.float32))
    quantize_fails(work, "reshape.onnx", "--calib", "eights.npz",
                   words=("ONNX Runtime failed to run the model on the calibration data", "eights.npz", "cannot be reshaped"))


def test_custom_op_in_dynamic_mode_is_a_user_error(work):
    save_model(with_node_after_relu2("MyOp", "com.example"), work / "custom.onnx")
    quantize_fails(work, "custom.onnx", "--mode", "dynamic", words=("com.example:MyOp",))


# ----- bad data -----------------------------------------------------------------------------------------------

def _npz(name: str, **arrays: np.ndarray):
    def make(folder: Path) -> str:
        np.savez(folder / name, **arrays)
        return name
    return make


def _with_nan(value: float):
    x = x_samples(10)
    x[3, 0, 2, 2] = value
    return _npz("bad_values.npz", x=x)


def _empty_dir(folder: Path) -> str:
    (folder / "empty_dir").mkdir()
    return "empty_dir"


def _empty_image_dir(folder: Path) -> str:
    (folder / "images" / "cat").mkdir(parents=True)
    (folder / "images" / "cat" / "readme.txt").write_text("no images here")
    return "images"


def _npy_dir_bad_labels(folder: Path) -> str:
    (folder / "npy").mkdir()
    for i in range(4):
        np.save(folder / "npy" / f"s{i}.npy", x_samples(1)[0])
    np.save(folder / "npy" / "labels.npy", np.arange(3))
    return "npy"


def _bytes(name: str, data: bytes):
    def make(folder: Path) -> str:
        (folder / name).write_bytes(data)
        return name
    return make


def _truncated_npz(folder: Path) -> str:
    data = (folder / "data.npz").read_bytes()
    (folder / "cut.npz").write_bytes(data[: len(data) // 2])
    return "cut.npz"


def _pickled_npy(folder: Path) -> str:
    np.save(folder / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return "objects.npy"


BAD_DATA = {
    "data-missing": (lambda folder: "nope.npz", ("nope.npz", "not found")),
    "keys-mismatch": (_npz("keys.npz", a=x_samples(4), b=x_samples(4)), ("no data for model input(s) x", "data keys: a, b")),
    "wrong-rank": (_npz("rank.npz", x=x_samples(4)[:, 0]), ("rank 3", "expects rank 4")),
    "wrong-dtype": (_npz("ints.npz", x=np.ones((4, 1, 8, 8), np.int64)), ("int64", "float32", "astype")),
    "wrong-spatial-size": (_npz("big.npz", x=x_samples(4, 9, 9)), ("(4, 1, 9, 9)", "axis 2: 9 ≠ 8")),
    "empty-npz": (_npz("nothing.npz"), ("no input arrays",)),
    "zero-samples": (_npz("zero.npz", x=x_samples(0)), ("no samples",)),
    "empty-folder": (_empty_dir, ("empty_dir", "empty")),
    "empty-image-folder": (_empty_image_dir, ("images", "no images")),
    "nan": (_with_nan(np.nan), ("1 NaN/Inf", "finite")),
    "inf": (_with_nan(np.inf), ("1 NaN/Inf", "finite")),
    "labels-wrong-length": (_npz("labels.npz", x=x_samples(10), labels=np.arange(7)), ("x: 10, labels: 7",)),
    "labels-wrong-length-npy-folder": (_npy_dir_bad_labels, ("3 labels for 4 samples",)),
    "labels-scalar": (_npz("scalar_labels.npz", x=x_samples(4), labels=np.array(3)), ("'labels' is a scalar",)),
    "corrupt-npz": (_bytes("corrupt.npz", np.random.default_rng(1).bytes(500)), ("corrupt.npz", "not an .npz file")),
    "truncated-npz": (_truncated_npz, ("cut.npz", "not an .npz file")),
    "pickled-npz": (_npz("objects.npz", x=np.array([{"a": 1}, None], dtype=object)), ("object arrays", "refuses")),
    "pickled-npy": (_pickled_npy, ("object arrays", "refuses")),
    "unsupported-file": (_bytes("data.csv", b"1,2,3\n"), ("data.csv", "unsupported data file")),
    "beyond-float32": (_npz("huge.npz", x=np.full((4, 1, 8, 8), 1e300)), ("beyond the range of float32",)),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data(work, case):
    make, words = BAD_DATA[case]
    quantize_fails(work, "tiny.onnx", "--calib", make(work), words=words)


# ----- bad options ----------------------------------------------------------------------------------------------

BAD_OPTIONS = {
    "static-without-calib": ((), None, ("needs calibration data", "--calib")),
    "percentile-out-of-range": (("--calib", "data.npz", "--method", "percentile", "--percentile", "20"), None, ("percentile 20.0",)),
    "unknown-method": (("--calib", "data.npz", "--method", "magic"), None, ("magic", "--help")),
    "max-samples-zero": (("--calib", "data.npz", "--max-samples", "0"), None, ("max_samples is 0",)),
    "bad-threshold-env": (("--calib", "data.npz"), {"EDGEQ_EXTERNAL_DATA_THRESHOLD": "big"}, ("EDGEQ_EXTERNAL_DATA_THRESHOLD",)),
    "smoothquant-not-a-number": (("--calib", "data.npz", "--smoothquant", "strong"), None, ("--smoothquant 'strong'", "auto")),
    "smoothquant-out-of-range": (("--calib", "data.npz", "--smoothquant", "1.5"), None, ("smoothquant alpha 1.5",)),
}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_bad_options(work, case):
    args, env, words = BAD_OPTIONS[case]
    quantize_fails(work, "tiny.onnx", *args, words=words, env=env)


BAD_COMMAND_LINES = {
    "unknown-command": (("quantise", "tiny.onnx"), ("No such command 'quantise'",)),
    "missing-argument": (("quantize",), ("Missing argument 'model'",)),
    "unknown-option": (("quantize", "tiny.onnx", "-o", "out/q.onnx", "--bogus"), ("No such option: --bogus",)),
    "not-a-number": (("quantize", "tiny.onnx", "-o", "out/q.onnx", "--max-samples", "many"), ("--max-samples",)),
}


@pytest.mark.parametrize("case", BAD_COMMAND_LINES)
def test_bad_command_line(work, case):
    args, words = BAD_COMMAND_LINES[case]
    before = tree(work)
    assert_user_error(cli(work, *args), *words, "edgeq --help")
    assert tree(work) == before


def test_bare_edgeq_shows_help(work):
    proc = cli(work)
    assert proc.returncode == 0 and "quantize" in proc.stdout and not proc.stderr


# ----- bad outputs ----------------------------------------------------------------------------------------------

def _refused(folder: Path, output: str, *words: str, extra: tuple[str, ...] = ()) -> None:
    before = tree(folder)
    assert_user_error(cli(folder, "quantize", "tiny.onnx", "-o", output, "--calib", "data.npz", *extra), *words)
    assert tree(folder) == before


def test_output_equal_to_input_is_refused_even_with_force(work):
    _refused(work, "tiny.onnx", "would overwrite the input", extra=("--force",))
    _refused(work, "./out/../tiny.onnx", "would overwrite the input", extra=("--force",))


def test_output_linked_to_input_is_refused(work):
    (work / "link.onnx").symlink_to(work / "tiny.onnx")
    os.link(work / "tiny.onnx", work / "hard.onnx")
    _refused(work, "link.onnx", "would overwrite the input", extra=("--force",))
    _refused(work, "hard.onnx", "would overwrite the input", extra=("--force",))


def test_output_equal_to_calibration_data_is_refused(work):
    _refused(work, "data.npz", "would overwrite the input data.npz", extra=("--force",))


def test_existing_output_is_refused_without_force_and_replaced_with_it(work):
    (work / "out" / "q.onnx").write_bytes(b"old")
    _refused(work, "out/q.onnx", "already exists", "--force")
    proc = cli(work, "quantize", "tiny.onnx", "-o", "out/q.onnx", "--calib", "data.npz", "--force")
    assert proc.returncode == 0, proc.stderr
    assert edgeq.load(work / "out" / "q.onnx").proto.graph.node
    assert [p.name for p in (work / "out").iterdir()] == ["q.onnx"]


def test_output_that_is_a_folder_is_refused(work):
    _refused(work, "out", "is a folder")


def test_output_under_a_regular_file_is_refused(work):
    """Works as root too: no permission bit is involved."""
    (work / "afile").write_text("x")
    _refused(work, "afile/q.onnx", "afile is a file, not a folder")


def test_output_in_read_only_folder_is_refused(work):
    locked = work / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if _can_write_in(locked):
            pytest.skip("permission bits do not stop this user (root); test_output_under_a_regular_file covers the path")
        _refused(work, "locked/q.onnx", "not writable")
    finally:
        locked.chmod(0o755)


def _can_write_in(folder: Path) -> bool:
    probe = folder / "probe"
    try:
        probe.write_text("")
    except PermissionError:
        return False
    probe.unlink()
    return True


def test_missing_output_folder_is_created_only_when_writing(work):
    _refused(work, "new/sub/q.onnx", "data not found", extra=("--calib", "nope.npz"))  # a failed run creates nothing
    proc = cli(work, "quantize", "tiny.onnx", "-o", "new/sub/q.onnx", "--calib", "data.npz")
    assert proc.returncode == 0, proc.stderr
    assert (work / "new" / "sub" / "q.onnx").is_file()


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_is_a_user_error_and_leaves_nothing(work, monkeypatch):
    target = work / "out" / "r.json"
    with pytest.raises(OutputError, match="No space left on device"):
        with atomic.atomic_path(target):
            _disk_full()
    monkeypatch.setattr("edgeq.model._write_staged", _disk_full)
    with pytest.raises(OutputError, match="free disk space"):
        edgeq.model.save(make_conv_model(), work / "out" / "m.onnx")
    assert not any((work / "out").iterdir())


def test_written_files_follow_the_umask(work):
    """Temporaries are 0600; the published file must be as readable as any other new file."""
    path = atomic.write_json(work / "out" / "r.json", {"a": 1})
    assert path.stat().st_mode & 0o777 == 0o666 & ~atomic._UMASK


# ----- inputs that must work ----------------------------------------------------------------------------------

def _run_model(path: Path, x: np.ndarray) -> np.ndarray:
    return make_session(path).run(None, {"x": x})[0]


def test_large_model_is_saved_with_external_data_and_reloads(work):
    """EDGEQ_EXTERNAL_DATA_THRESHOLD stands in for 2 GB: the weights go to a data file beside the model."""
    assert cli(work, "quantize", "tiny.onnx", "-o", "out/inline.onnx", "--calib", "data.npz").returncode == 0
    proc = cli(work, "quantize", "tiny.onnx", "-o", "out/big.onnx", "--calib", "data.npz", env={"EDGEQ_EXTERNAL_DATA_THRESHOLD": "1000"})
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in (work / "out").iterdir())
    assert len(names) == 3 and re.fullmatch(r"big\.onnx\.[0-9a-f]{12}\.data", names[1]), names
    assert (work / "out" / "big.onnx").stat().st_size < (work / "out" / "inline.onnx").stat().st_size
    x = x_samples(5)
    np.testing.assert_array_equal(_run_model(work / "out" / "big.onnx", x), _run_model(work / "out" / "inline.onnx", x))
    assert edgeq.load(work / "out" / "big.onnx").inputs[0].name == "x"


def test_model_with_external_data_loads_and_quantizes(work):
    onnx.save(make_conv_model(), work / "ext.onnx", save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    proc = cli(work, "quantize", "ext.onnx", "-o", "out/q.onnx", "--calib", "data.npz")
    assert proc.returncode == 0, proc.stderr
    assert _run_model(work / "out" / "q.onnx", x_samples(2)).shape == (2, 10)


def test_force_never_deletes_a_data_file_it_did_not_write(work):
    """Replacing a model that shares the input's data file must leave the input whole."""
    onnx.save(make_conv_model(), work / "ext.onnx", save_as_external_data=True, location="shared.data", size_threshold=0)
    (work / "out" / "copy.onnx").write_bytes((work / "ext.onnx").read_bytes())
    (work / "out" / "shared.data").write_bytes((work / "shared.data").read_bytes())
    (work / "out" / "ext.onnx").symlink_to(work / "ext.onnx")  # the copy's folder also reaches the input
    proc = cli(work, "quantize", "ext.onnx", "-o", "out/copy.onnx", "--calib", "data.npz", "--force",
               env={"EDGEQ_EXTERNAL_DATA_THRESHOLD": "1000"})
    assert proc.returncode == 0, proc.stderr
    assert (work / "out" / "shared.data").exists() and (work / "shared.data").exists()
    assert edgeq.load(work / "ext.onnx")


def test_replacing_own_external_data_removes_the_old_data_file(work):
    env = {"EDGEQ_EXTERNAL_DATA_THRESHOLD": "1000"}
    # --coverage all: both models quantized (measured coverage may leave this tiny net float both times, same bytes)
    assert cli(work, "quantize", "tiny.onnx", "-o", "out/q.onnx", "--calib", "data.npz", "--coverage", "all", env=env).returncode == 0
    first = {p.name for p in (work / "out").iterdir()}
    proc = cli(work, "quantize", "tiny.onnx", "-o", "out/q.onnx", "--calib", "data.npz", "--coverage", "all", "--per-tensor", "--force", env=env)
    assert proc.returncode == 0, proc.stderr
    second = {p.name for p in (work / "out").iterdir()}
    assert len(second) == 2 and first != second
    assert edgeq.load(work / "out" / "q.onnx")


def test_dynamic_batch_with_varying_batch_sizes_works(work):
    """A .npy folder whose files stack 3, 5, 1 and 7 samples, plus one single sample without the sample axis."""
    (work / "npy").mkdir()
    for i, n in enumerate([3, 5, 1, 7]):
        np.save(work / "npy" / f"s{i}.npy", x_samples(n))
    np.save(work / "npy" / "s9.npy", x_samples(1)[0])
    proc = cli(work, "quantize", "tiny.onnx", "-o", "out/q.onnx", "--calib", "npy")
    assert proc.returncode == 0, proc.stderr
    assert "17 samples" in proc.stdout


def test_dynamic_spatial_dims_with_mixed_sizes_work(work):
    model = make_conv_model()
    for i, name in ((2, "H"), (3, "W")):
        model.graph.input[0].type.tensor_type.shape.dim[i].dim_param = name
    onnx.save(model, work / "dyn.onnx")
    (work / "npy").mkdir()
    for i, size in enumerate([8, 12, 8, 16]):
        np.save(work / "npy" / f"s{i}.npy", x_samples(2, size, size))
    proc = cli(work, "quantize", "dyn.onnx", "-o", "out/q.onnx", "--calib", "npy")
    assert proc.returncode == 0, proc.stderr
    assert _run_model(work / "out" / "q.onnx", x_samples(1, 20, 20)).shape == (1, 10)


def test_few_calibration_samples_warn_with_the_number(work):
    np.savez(work / "few.npz", x=x_samples(5))
    proc = cli(work, "quantize", "tiny.onnx", "-o", "out/q.onnx", "--calib", "few.npz")
    assert proc.returncode == 0, proc.stderr
    assert "only 5 calibration samples" in " ".join(proc.stdout.split())


def test_op_outside_the_quantized_set_stays_float(work):
    """Sin has no int8 kernel: it stays float and the model still runs; an excluded node is listed."""
    save_model(with_node_after_relu2("Sin"), work / "sin.onnx")
    proc = cli(work, "quantize", "sin.onnx", "-o", "out/q.onnx", "--calib", "data.npz", "--exclude", "conv2",
               "--summary-json", "out/summary.json")
    assert proc.returncode == 0, proc.stderr
    out = onnx.load(work / "out" / "q.onnx")
    sin = next(n for n in out.graph.node if n.op_type == "Sin")
    producers = {o: n.op_type for n in out.graph.node for o in n.output}
    assert producers.get(sin.input[0]) != "DequantizeLinear"
    summary = (work / "out" / "summary.json").read_text()
    assert '"node": "conv2"' in summary
    assert _run_model(work / "out" / "q.onnx", x_samples(2)).shape == (2, 10)


# ----- validate, compare, bench ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def validated_template(tmp_path_factory) -> Path:
    """Built once: the `work` files plus val.npz (50 labelled samples), q.onnx (INT8) and base.json, cand.json
    (validations of FP32 and INT8 on val.npz)."""
    folder = tmp_path_factory.mktemp("validated")
    onnx.save(make_conv_model(), folder / "tiny.onnx")
    np.savez(folder / "data.npz", x=x_samples(200))
    np.savez(folder / "val.npz", x=x_samples(50), labels=RNG.integers(0, 10, 50))
    (folder / "out").mkdir()
    assert cli(folder, "quantize", "tiny.onnx", "-o", "q.onnx", "--calib", "data.npz").returncode == 0
    for model, name in (("tiny.onnx", "base.json"), ("q.onnx", "cand.json")):
        proc = cli(folder, "validate", model, "--data", "val.npz", "-o", name)
        assert proc.returncode == 0, proc.stderr
    return folder


@pytest.fixture
def validated(validated_template, tmp_path) -> Path:
    """A private copy of the template, so that a test may add files."""
    return Path(shutil.copytree(validated_template, tmp_path / "v"))


def _fails(folder: Path, *args: str, words: tuple[str, ...]) -> None:
    before = tree(folder)
    assert_user_error(cli(folder, *args), *words)
    assert tree(folder) == before


def test_validation_reports_nan_instead_of_refusing(validated):
    x = x_samples(20)
    x[3, 0, 0, 0] = np.nan
    np.savez(validated / "nan_val.npz", x=x, labels=RNG.integers(0, 10, 20))
    proc = cli(validated, "validate", "tiny.onnx", "--data", "nan_val.npz", "-o", "out/v.json")
    assert proc.returncode == 0, proc.stderr
    assert "NaN or Inf for 1 of 20 samples" in " ".join(proc.stdout.split())
    assert '"nonfinite"' in (validated / "out" / "v.json").read_text()


def _write(folder: Path, name: str, text: str) -> str:
    (folder / name).write_text(text)
    return name


BAD_VALIDATE_COMPARE = {
    "validate-output-is-data": (lambda f: ("validate", "tiny.onnx", "--data", "val.npz", "-o", "val.npz", "--force"),
                                ("would overwrite the input val.npz",)),
    "validate-output-is-model": (lambda f: ("validate", "tiny.onnx", "--data", "val.npz", "-o", "tiny.onnx", "--force"),
                                 ("would overwrite the input tiny.onnx",)),
    "validate-no-labels-no-reference": (lambda f: ("validate", "tiny.onnx", "--data", _npz("unlabelled.npz", x=x_samples(5))(f), "-o", "out/v.json"),
                                        ("no labels", "--reference")),
    "validate-missing-model": (lambda f: ("validate", "nope.onnx", "--data", "val.npz", "-o", "out/v.json"), ("nope.onnx", "not found")),
    "compare-missing-file": (lambda f: ("compare", "base.json", "nope.json"), ("not found: nope.json", "edgeq validate")),
    "compare-invalid-json": (lambda f: ("compare", "base.json", _write(f, "broken.json", "{not json")), ("broken.json is not valid JSON",)),
    "compare-not-a-record": (lambda f: ("compare", "base.json", _write(f, "list.json", "[1, 2]")), ("not an edgeq validation record",)),
    "compare-binary-file": (lambda f: ("compare", "base.json", "data.npz"), ("data.npz is not valid JSON",)),
    "compare-different-data": (lambda f: ("compare", "base.json", _other_data_record(f)), ("different data",)),
    "compare-output-is-input": (lambda f: ("compare", "base.json", "cand.json", "--json", "cand.json", "--force"),
                                ("would overwrite the input cand.json",)),
    "compare-contradictory-thresholds": (lambda f: ("compare", "base.json", "cand.json", "--ship-below", "5", "--qat-up-to", "1"),
                                         ("ship_below (5) is above qat_up_to (1)",)),
    "bench-missing-model": (lambda f: ("bench", "nope.onnx"), ("nope.onnx", "not found")),
    "bench-custom-op": (lambda f: ("bench", save_model(with_node_after_relu2("MyOp", "com.example"), f / "custom.onnx"), "--runs", "2"),
                        ("ONNX Runtime cannot load custom.onnx", "com.example:MyOp")),
    "bench-json-is-input": (lambda f: ("bench", "tiny.onnx", "--runs", "2", "--json", "tiny.onnx", "--force"), ("would overwrite the input",)),
    "bench-zero-runs": (lambda f: ("bench", "tiny.onnx", "--runs", "0"), ("runs must be at least 1",)),
    "bench-bad-shape": (lambda f: ("bench", "tiny.onnx", "--shape", "x=big"), ("--shape 'x=big'",)),
}


def _other_data_record(folder: Path) -> str:
    np.savez(folder / "val2.npz", x=x_samples(50), labels=RNG.integers(0, 10, 50))
    assert cli(folder, "validate", "q.onnx", "--data", "val2.npz", "-o", "other.json").returncode == 0
    return "other.json"


@pytest.mark.parametrize("case", BAD_VALIDATE_COMPARE)
def test_bad_validate_compare_bench(validated, case):
    make, words = BAD_VALIDATE_COMPARE[case]
    args = make(validated)
    _fails(validated, *args, words=words)


def test_validate_and_compare_json_are_identical_across_runs(validated):
    for name in ("again.json", "again2.json"):
        assert cli(validated, "validate", "q.onnx", "--data", "val.npz", "-o", f"out/{name}").returncode == 0
    assert (validated / "out" / "again.json").read_bytes() == (validated / "out" / "again2.json").read_bytes()
    for name in ("c1.json", "c2.json"):
        assert cli(validated, "compare", "base.json", "cand.json", "--json", f"out/{name}").returncode == 0
    assert (validated / "out" / "c1.json").read_bytes() == (validated / "out" / "c2.json").read_bytes()


# ----- bugs: exit 1, one line, traceback only with --debug ------------------------------------------------------

def _explode(*args, **kwargs):
    raise RuntimeError("boom\nwith a second line")


@pytest.mark.parametrize("debug", [False, True])
def test_unexpected_exception_is_one_bug_line(work, monkeypatch, capsys, debug):
    monkeypatch.setattr(edgeq, "load", _explode)
    args = ["quantize", str(work / "tiny.onnx"), "-o", str(work / "out" / "q.onnx"), "--calib", str(work / "data.npz")]
    with pytest.raises(SystemExit) as exit_info:
        edgeq.cli.main(args + (["--debug"] if debug else []))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert last.startswith("edgeq: internal error (this is a bug): RuntimeError: boom with a second line")
    assert ("Traceback" in err) is debug
    assert len(err.splitlines()) > 1 if debug else len(err.splitlines()) == 1
    assert not any((work / "out").iterdir())


def test_user_error_in_process_exits_2(work, capsys):
    with pytest.raises(SystemExit) as exit_info:
        edgeq.cli.main(["quantize", str(work / "nope.onnx"), "-o", str(work / "out" / "q.onnx"), "--calib", str(work / "data.npz")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("edgeq: error: model file not found")


# ----- atomic outputs: SIGKILL mid-write ------------------------------------------------------------------------

SLOW_WRITER = """
import sys, time
from pathlib import Path
from edgeq import atomic
with atomic.atomic_path(Path(sys.argv[1])) as tmp, open(tmp, "wb") as fh:
    for _ in range(400):  # 25 MB over about 2 s: a slow disk, so the kill surely lands mid-write
        fh.write(b"N" * 65536)
        fh.flush()
        time.sleep(0.005)
"""

LOOP_WRITER = """
import sys
from pathlib import Path
from edgeq import atomic
versions = [bytes([65 + i]) * (8 << 20) for i in range(2)]
i = 0
while True:
    atomic.write_bytes(Path(sys.argv[1]), versions[i % 2])
    i += 1
"""

MODEL_WRITER = """
import sys
import numpy as np
from onnx import TensorProto, helper, numpy_helper
from edgeq.model import save
w = np.random.default_rng(int(sys.argv[2])).standard_normal((2048, 3072), dtype=np.float32)  # 24 MB
graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "big",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2048])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3072])], [numpy_helper.from_array(w, "w")])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
save(model, sys.argv[1], force=True)
"""


def _start(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.Popen([sys.executable, "-c", code, *args], env=full_env, stderr=subprocess.PIPE)


def _kill_when(proc: subprocess.Popen, ready, delay: float = 0.0, timeout: float = 60.0) -> None:
    """Poll `ready()` while the writer runs; SIGKILL it `delay` seconds after it returns true."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the writer finished before it could be killed: {proc.stderr.read().decode()[-500:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the writer never started writing")
        time.sleep(0.001)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _temps(folder: Path, name: str) -> list[Path]:
    return [p for p in folder.iterdir() if re.fullmatch(rf"\.{re.escape(name)}\.edgeq-\d+-\w+\.tmp", p.name)]


def _partial_temp(folder: Path, name: str) -> bool:
    return any(p.is_file() and p.stat().st_size > 0 for p in _temps(folder, name))


@pytest.mark.parametrize("old", [b"old complete file\n", None], ids=["replacing", "new"])
def test_kill_mid_write_leaves_old_file_or_none(tmp_path, old):
    target = tmp_path / "result.bin"
    if old is not None:
        atomic.write_bytes(target, old)
    proc = _start(SLOW_WRITER, str(target))
    _kill_when(proc, lambda: _partial_temp(tmp_path, "result.bin"))
    assert (target.read_bytes() if target.exists() else None) == old
    assert len(_temps(tmp_path, "result.bin")) == 1, "the killed writer's temporary should be a clearly named dot-file"
    atomic.write_bytes(target, b"new")  # the next write of the same target removes the stale temporary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.bin"]


def test_kill_at_random_moments_never_leaves_a_partial_file(tmp_path):
    """Kills land anywhere in a loop of writes, the rename included: the target is always one whole version."""
    target = tmp_path / "result.bin"
    atomic.write_bytes(target, b"old")
    whole = {b"old", b"A" * (8 << 20), b"B" * (8 << 20)}
    rng = random.Random(3)
    for _ in range(6):
        proc = _start(LOOP_WRITER, str(target))
        _kill_when(proc, lambda: bool(_temps(tmp_path, "result.bin")), delay=rng.uniform(0, 0.05))
        assert target.read_bytes() in whole
    atomic.clean_stale(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.bin"]


@pytest.mark.parametrize("threshold", [None, "1000"], ids=["inline", "external-data"])
def test_kill_mid_model_save_keeps_the_old_model(tmp_path, monkeypatch, threshold):
    env = {"EDGEQ_EXTERNAL_DATA_THRESHOLD": threshold} if threshold else {}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    target = tmp_path / "m.onnx"
    old_model = make_conv_model()
    edgeq.model.save(old_model, target)
    before = tree(tmp_path)
    proc = _start(MODEL_WRITER, str(target), "1", env=env)
    _kill_when(proc, lambda: any(p.is_dir() and any(p.iterdir()) for p in _temps(tmp_path, "m.onnx")))
    after = {k: v for k, v in tree(tmp_path).items() if not k.startswith(".m.onnx.edgeq-")}
    assert after == before, "the old model (and its data file) must be untouched"
    x = x_samples(2)
    np.testing.assert_array_equal(make_session(edgeq.load(target).proto).run(None, {"x": x})[0], make_session(old_model).run(None, {"x": x})[0])
    edgeq.model.save(make_conv_model(seed=1), target, force=True)  # cleans the killed writer's staging folder
    assert not _temps(tmp_path, "m.onnx")


def test_stale_cleanup_spares_live_writers(tmp_path):
    target = tmp_path / "r.json"
    live = tmp_path / f".r.json.edgeq-{os.getpid()}-abc.tmp"
    live.write_text("being written")
    dead_pid = _dead_pid()
    dead = tmp_path / f".r.json.edgeq-{dead_pid}-abc.tmp"
    dead.write_text("left by a killed run")
    unrelated = tmp_path / f".other.json.edgeq-{dead_pid}-abc.tmp"
    unrelated.write_text("another target's")
    assert atomic.clean_stale(target) == [dead]
    assert live.exists() and unrelated.exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----- determinism ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [("--calib", "data.npz", "--method", "minmax"), ("--calib", "data.npz", "--method", "percentile", "--per-tensor"),
                                     ("--calib", "data.npz", "--method", "mse"), ("--mode", "dynamic"), ("--precision", "fp16")],
                         ids=["static-minmax", "static-percentile", "static-mse", "dynamic", "fp16"])
def test_quantization_is_byte_identical_across_runs(work, options):
    for name in ("a.onnx", "b.onnx"):
        proc = cli(work, "quantize", "tiny.onnx", "-o", f"out/{name}", *options)
        assert proc.returncode == 0, proc.stderr
    assert (work / "out" / "a.onnx").read_bytes() == (work / "out" / "b.onnx").read_bytes()


@pytest.mark.parametrize("method", METHODS)
def test_calibration_ranges_do_not_depend_on_batch_size_or_threads(work, monkeypatch, method):
    prepared, _ = prepare(edgeq.load(work / "tiny.onnx"), per_channel=True)
    data = edgeq.Dataset.from_npz(work / "data.npz")
    reference = calibrate(prepared, data, method=method, batch_size=64).ranges
    for threads in (1, 2):
        monkeypatch.setattr("edgeq.runtimes.onnxruntime.make_session", lambda proto, threads_=threads, **_: make_session(proto, threads=threads_))
        for batch_size in (1, 7, 64):
            ranges = calibrate(prepared, data, method=method, batch_size=batch_size).ranges
            assert ranges.keys() == reference.keys()
            for name, (low, high) in ranges.items():
                np.testing.assert_allclose((low, high), reference[name], rtol=1e-5, atol=1e-6, err_msg=name)


# ----- safety ---------------------------------------------------------------------------------------------------

UNSAFE_MODULES = {"pickle", "cPickle", "dill", "joblib", "marshal", "shelve"}


def _package_calls():
    for path in sorted((REPO / "edgeq").rglob("*.py")):
        tree_ = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree_):
            yield path.relative_to(REPO), node


def _keyword(call: ast.Call, name: str):
    return next((k.value.value for k in call.keywords if k.arg == name and isinstance(k.value, ast.Constant)), "absent")


def test_no_unsafe_deserialisation_or_eval_in_the_package():
    problems = []
    for path, node in _package_calls():
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = {a.name.split(".")[0] for a in node.names} | ({node.module.split(".")[0]} if getattr(node, "module", None) else set())
            problems += [f"{path}:{node.lineno} imports {m}" for m in names & UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        if func in ("eval", "exec", "compile", "__import__"):
            problems.append(f"{path}:{node.lineno} calls {func}")
        if func in ("np.load", "numpy.load") and _keyword(node, "allow_pickle") is not False:
            problems.append(f"{path}:{node.lineno} np.load without allow_pickle=False")
        if func == "torch.load" and _keyword(node, "weights_only") is not True:
            problems.append(f"{path}:{node.lineno} torch.load without weights_only=True")
        if _keyword(node, "shell") is True:
            problems.append(f"{path}:{node.lineno} runs a shell")
    assert not problems, problems

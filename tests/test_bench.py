"""edgeq.bench: records, sizes, feeds, errors across the worker boundary, the table and the CLI.

Behaviour only: no assertion compares two timings (machines and load vary), only the shape of the numbers.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from rich.console import Console

from edgeq import bench
from edgeq.bench import BenchConfig, BenchRecord, Latency, bench_table, benchmark, parse_shapes, random_feed
from edgeq.timing import RANDOM_INT_HIGH
from edgeq.errors import ConfigError, DataError, ModelError, UserError
from edgeq.model import TensorSpec
from tests.conftest import make_conv_model

REPO = Path(__file__).resolve().parent.parent
F32 = np.dtype("float32")


def _save_dynamic_hw(path: Path) -> Path:
    model = make_conv_model()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bench")
    plain = folder / "tiny.onnx"
    onnx.save(make_conv_model(), plain)
    external = folder / "tiny_ext.onnx"
    onnx.save_model(make_conv_model(seed=1), external, save_as_external_data=True, location="tiny_ext.weights", size_threshold=0)
    return {"plain": plain, "external": external, "folder": folder}


@pytest.fixture(scope="module")
def records(models) -> list[BenchRecord]:
    """One benchmark of two models (the second with external weights), shared by the record tests."""
    return benchmark([models["plain"], models["external"]], BenchConfig(runs=7, warmup=2))


# ----- records ----------------------------------------------------------------------------------------------

def test_records_have_sane_fields(records, models):
    first = records[0]
    lat = first.latency_ms
    assert lat.min <= lat.p50 <= lat.p90 <= lat.p99 <= lat.max
    assert lat.min <= lat.mean <= lat.max and lat.min > 0
    assert first.runs == 7 and first.warmup == 2 and len(first.times_ms) == 7
    assert first.threads == 1 and first.batch == 1
    assert first.throughput == pytest.approx(first.batch / (lat.mean / 1000))
    assert first.size_bytes == models["plain"].stat().st_size
    assert first.peak_rss_mb > 0 and first.model_rss_mb >= 0 and first.model_rss_mb <= first.peak_rss_mb
    assert first.input_shapes == {"x": [1, 1, 8, 8]}
    assert first.feed == "random" and first.onnxruntime == ort.__version__
    assert first.name == "tiny" and first.path == str(models["plain"])


def test_size_counts_external_data_files(records, models):
    record = records[1]
    data_file = models["folder"] / "tiny_ext.weights"
    assert data_file.exists()
    assert record.size_bytes == models["external"].stat().st_size + data_file.stat().st_size
    assert Path(record.files[-1]).name == "tiny_ext.weights"


def test_record_round_trips_through_json(records):
    for record in records:
        again = BenchRecord.from_dict(json.loads(json.dumps(record.to_dict())))
        assert again == record


def test_worker_memory_is_not_the_parents(models):
    # The parent holds 200 MB more than a worker for this tiny model needs (~80 MB); a worker that inherited the
    # parent's peak (as ru_maxrss does across fork+exec on Linux) would report more than that.
    ballast = np.ones(25_000_000)
    record = benchmark([models["plain"]], runs=2, warmup=0)[0]
    assert record.peak_rss_mb < 0.95 * ballast.nbytes / 2**20
    del ballast


# ----- feeds ------------------------------------------------------------------------------------------------

def test_batch_fills_the_dynamic_batch_dim():
    feed = random_feed([TensorSpec("x", F32, ("N", 1, 8, 8)), TensorSpec("ids", np.dtype("int64"), ("N", 4)),
                        TensorSpec("mask", np.dtype("bool"), (1, 4))], BenchConfig(batch=3))
    assert feed["x"].shape == (3, 1, 8, 8) and feed["x"].dtype == np.float32
    assert feed["ids"].shape == (3, 4) and feed["ids"].dtype == np.int64
    assert feed["ids"].min() >= 0 and feed["ids"].max() < RANDOM_INT_HIGH
    assert feed["mask"].shape == (1, 4) and not feed["mask"].any()


def test_float16_inputs_get_float16_values():
    feed = random_feed([TensorSpec("x", np.dtype("float16"), (2, 3))], BenchConfig())
    assert feed["x"].dtype == np.float16


def test_dynamic_dims_without_shape_name_the_input():
    with pytest.raises(ConfigError, match=r"'x'.*--shape x=1,1,<height>,<width>"):
        random_feed([TensorSpec("x", F32, ("N", 1, "height", "width"))], BenchConfig())


def test_shape_fills_dynamic_dims():
    spec = TensorSpec("x", F32, ("N", 1, "height", "width"))
    feed = random_feed([spec], BenchConfig(shapes={"x": (2, 1, 16, 12)}))
    assert feed["x"].shape == (2, 1, 16, 12)


@pytest.mark.parametrize("shapes, message", [
    ({"x": (1, 1, 8)}, "rank 3"),
    ({"x": (1, 3, 8, 8)}, "axis 1 is 3"),
    ({"y": (1, 1, 8, 8)}, "'y': not an input"),
])
def test_shapes_that_do_not_fit_are_config_errors(shapes, message):
    with pytest.raises(ConfigError, match=message):
        random_feed([TensorSpec("x", F32, ("N", 1, 8, 8))], BenchConfig(shapes=shapes))


def test_dynamic_model_without_shape_fails_across_the_worker(tmp_path):
    path = _save_dynamic_hw(tmp_path / "dyn.onnx")
    with pytest.raises(ConfigError, match=r"--shape x="):
        benchmark([path], runs=1)


def test_data_feeds_the_first_batch(models, tmp_path):
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(0).normal(size=(5, 1, 8, 8)).astype(np.float32), labels=np.arange(5))
    record = benchmark([models["plain"]], runs=3, batch=4, data=data)[0]
    assert record.batch == 4 and record.input_shapes == {"x": [4, 1, 8, 8]}
    assert record.feed == str(data)


def test_small_data_shrinks_the_batch_with_a_note(tmp_path):
    data = tmp_path / "two.npz"
    np.savez(data, x=np.zeros((2, 1, 8, 8), np.float32))
    notes: list[str] = []
    feed = bench.data_feed([TensorSpec("x", F32, ("N", 1, 8, 8))], BenchConfig(batch=8, data=data), notes)
    assert feed["x"].shape == (2, 1, 8, 8)
    assert notes and "2 samples" in notes[0]


def test_data_that_does_not_fit_is_a_data_error(tmp_path):
    data = tmp_path / "wrong.npz"
    np.savez(data, x=np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(DataError):
        bench.data_feed([TensorSpec("x", F32, ("N", 1, 8, 8))], BenchConfig(data=data))


# ----- configuration ----------------------------------------------------------------------------------------

def test_parse_shapes():
    assert parse_shapes([]) == {}
    assert parse_shapes(["x=1,3,736,992", "input_ids = 1, 128"]) == {"x": (1, 3, 736, 992), "input_ids": (1, 128)}
    assert parse_shapes(["a=b=2,3"]) == {"a=b": (2, 3)}  # the last '=' splits


@pytest.mark.parametrize("text", ["x", "=1,2", "x=", "x=1,,2", "x=a,b", "x=0,3", "x=-1,3", "x=1.5"])
def test_parse_shapes_rejects_malformed_text_with_a_fix(text):
    with pytest.raises(ConfigError) as info:
        parse_shapes([text])
    assert info.value.fix and "--shape" in info.value.fix


def test_parse_shapes_rejects_duplicates():
    with pytest.raises(ConfigError, match="twice"):
        parse_shapes(["x=1,2", "x=1,3"])


@pytest.mark.parametrize("options", [{"runs": 0}, {"threads": 0}, {"warmup": -1}, {"batch": 0}, {"runs": 2.5},
                                     {"preset": "nope"}, {"shapes": {"x": (1, 0)}}, {"shapes": {"x": "ab"}}])
def test_config_validates(options):
    with pytest.raises(ConfigError):
        BenchConfig(**options)


def test_config_round_trips_and_is_json(tmp_path):
    config = BenchConfig(threads=2, runs=3, warmup=0, batch=4, shapes={"x": [1, 2]}, data=str(tmp_path), preset="imagenet")
    assert config.shapes == {"x": (1, 2)} and config.data == tmp_path
    assert BenchConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# ----- errors -----------------------------------------------------------------------------------------------

def test_bad_model_is_a_one_line_model_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not protobuf")
    with pytest.raises(ModelError) as info:
        benchmark([bad], runs=1)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message and "bad.onnx" in message


def test_missing_model_and_data_fail_before_any_worker(models, tmp_path):
    with pytest.raises(ModelError, match="not found"):
        benchmark([models["plain"], tmp_path / "missing.onnx"])
    with pytest.raises(DataError, match="not found"):
        benchmark([models["plain"]], data=tmp_path / "missing.npz")
    with pytest.raises(ConfigError):
        benchmark([])


def test_a_killed_worker_is_a_user_error(models, monkeypatch):
    monkeypatch.setattr(bench, "_WORKER_CODE", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    with pytest.raises(UserError, match="killed by signal 9"):
        benchmark([models["plain"]])


def test_a_failing_worker_is_a_bug(models, monkeypatch):
    monkeypatch.setattr(bench, "_WORKER_CODE", "import sys; print('boom', file=sys.stderr); sys.exit(3)")
    with pytest.raises(RuntimeError, match="code 3: boom"):
        benchmark([models["plain"]])


def test_the_onnx_path_never_imports_torch(models):
    code = ("import sys; from edgeq.bench import BenchConfig, measure; "
            f"measure({str(models['plain'])!r}, BenchConfig(runs=1, warmup=0)); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# ----- table ------------------------------------------------------------------------------------------------

def _record(name: str, size: int, p50: float) -> BenchRecord:
    return BenchRecord(path=f"/m/{name}.onnx", name=name, size_bytes=size, files=[f"/m/{name}.onnx"], threads=1, batch=1,
                       runs=3, warmup=1, latency_ms=Latency(p50, p50 * 1.1, p50 * 1.2, p50, p50 * 0.9, p50 * 1.3),
                       throughput=1000 / p50, peak_rss_mb=100.0, model_rss_mb=20.0, input_shapes={"x": [1, 3]},
                       feed="random", onnxruntime="1.0")


def _render(table) -> str:
    console = Console(record=True, width=100)
    console.print(table)
    return console.export_text()


def test_table_compares_against_the_first_model():
    text = _render(bench_table([_record("fp32", 4_000_000, 2.0), _record("int8", 1_000_000, 1.0)]))
    fp32 = next(line for line in text.splitlines() if line.strip().startswith("fp32"))
    int8 = next(line for line in text.splitlines() if line.strip().startswith("int8"))
    assert fp32.count("1.00×") == 2
    assert "0.25×" in int8 and "2.00×" in int8
    assert "4.00" in fp32 and "1.00" in int8  # MB


def test_table_shows_paths_when_names_collide():
    a, b = _record("model", 10, 1.0), _record("model", 10, 1.0)
    b.path = "/other/model.onnx"
    text = _render(bench_table([a, b]))
    assert "/m/model.onnx" in text and "/other/model.onnx" in text


def test_empty_table_renders():
    assert "model" in _render(bench_table([]))


# ----- command line -----------------------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeq.cli", "bench", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_writes_json(models, tmp_path):
    out = tmp_path / "bench.json"
    done = _cli(str(models["plain"]), str(models["external"]), "--runs", "3", "--json", str(out))
    assert done.returncode == 0, done.stderr
    assert "p50" in done.stdout
    result = json.loads(out.read_text())
    assert result["config"]["runs"] == 3
    assert [m["name"] for m in result["models"]] == ["tiny", "tiny_ext"]
    assert all(m["runs"] == 3 and len(m["times_ms"]) == 3 for m in result["models"])


def test_cli_missing_model_is_one_line_exit_2(tmp_path):
    done = _cli(str(tmp_path / "missing.onnx"), "--runs", "3")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("edgeq: error:") and "missing.onnx" in done.stderr

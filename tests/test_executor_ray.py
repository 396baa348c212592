"""The executors on a Ray instance started here (two workers): `validate` and `auto` give the figures and the chosen
model of the local executor; a worker killed mid-task is retried and the result is unchanged; a task that keeps
killing its worker fails the run with one line."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest

import edgeq
from edgeq.errors import ConfigError, DataError
from edgeq.executors import WorkerLost, make_executor
from edgeq.executors.local import LocalPool
from tests.conftest import make_conv_model

ray = pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance (2 CPUs) whose workers import this checkout's edgeq, and one executor on it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}})
    executor = make_executor("ray", workers=2)
    yield executor
    executor.close()
    ray.shutdown()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The tiny conv net, a slightly different reference, 600 labelled samples and the same without labels."""
    folder = tmp_path_factory.mktemp("digits")
    onnx.save(make_conv_model(), folder / "m.onnx")
    rng = np.random.default_rng(1)
    other = make_conv_model()
    for init in other.graph.initializer:   # the same net, weights off by about 5%: a reference it mostly agrees with
        w = onnx.numpy_helper.to_array(init)
        init.CopyFrom(onnx.numpy_helper.from_array((w * (1 + 0.05 * rng.standard_normal(w.shape))).astype(np.float32), init.name))
    onnx.save(other, folder / "other.onnx")
    x = rng.normal(0, 1, (600, 1, 8, 8)).astype(np.float32)
    np.savez(folder / "val.npz", x=x, labels=rng.integers(0, 10, 600))
    np.savez(folder / "unlabelled.npz", x=x)
    return folder


def _figures(record: edgeq.evaluate.ValidationRecord) -> dict:
    d = record.to_dict()
    return {k: d[k] for k in ("metric", "value", "ci95", "metrics", "per_sample", "samples", "data_fingerprint", "outputs", "worst")}


def _die_once(fn, marker: str, task):
    """Kills its worker the first time any task runs (the marker file says it happened), then works."""
    if not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)
    return fn(task)


def _always_die(task):
    os._exit(1)


def _square(x: int) -> int:
    return x * x


class _KillingFirstTask:
    """An executor that runs every task through `_die_once`: the first task's worker dies mid-run."""

    def __init__(self, inner, marker: Path) -> None:
        self.inner, self.marker = inner, str(marker)
        self.workers, self.notes = inner.workers, inner.notes

    def map(self, fn, tasks, description="tasks"):
        return self.inner.map(functools.partial(_die_once, fn, self.marker), tasks, description)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_validate_on_ray_gives_the_local_figures(cluster, digits):
    labelled = edgeq.validate(digits / "m.onnx", digits / "val.npz")
    assert _figures(edgeq.validate(digits / "m.onnx", digits / "val.npz", executor=cluster)) == _figures(labelled)
    fidelity = edgeq.validate(digits / "m.onnx", digits / "unlabelled.npz", reference=digits / "other.onnx")
    # data held in memory goes to the object store once; the fingerprint is the file's
    in_memory = edgeq.Dataset.from_arrays({"x": np.load(digits / "unlabelled.npz")["x"]})
    on_ray = edgeq.validate(digits / "m.onnx", in_memory, reference=digits / "other.onnx", executor=cluster)
    assert _figures(on_ray) == _figures(fidelity)
    assert labelled.samples == 600 and 50 < fidelity.value < 100


def test_validate_with_a_worker_killed_mid_task_is_retried_and_unchanged(cluster, digits, tmp_path):
    expected = _figures(edgeq.validate(digits / "m.onnx", digits / "val.npz"))
    killing = _KillingFirstTask(cluster, tmp_path / "killed")
    record = edgeq.validate(digits / "m.onnx", digits / "val.npz", executor=killing)
    assert (tmp_path / "killed").exists()
    assert _figures(record) == expected
    assert any("a worker died and its task was run again" in w and "m.onnx [" in w for w in record.warnings)


def test_a_task_that_always_kills_its_worker_fails_the_run_with_one_line(cluster):
    with pytest.raises(WorkerLost) as failed:
        cluster.map(_always_die, [1], "dying")
    assert "on all 3 attempts" in str(failed.value) and "\n" not in str(failed.value)
    assert cluster.map(_square, [2, 3], "squares") == [4, 9], "the replaced workers keep working"


def test_a_user_error_in_a_worker_comes_back_as_that_error(cluster, digits, tmp_path):
    np.savez(tmp_path / "wrong.npz", x=np.zeros((600, 1, 9, 9), np.float32), labels=np.zeros(600, np.int64))
    with pytest.raises(DataError, match=r"expects \(\?, 1, 8, 8\)") as failed:
        edgeq.validate(digits / "m.onnx", tmp_path / "wrong.npz", executor=cluster)
    assert "\n" not in str(failed.value), "one line, as the command line prints it (exit 2)"


def test_local_pool_retries_a_killed_worker_and_fails_one_that_always_dies(tmp_path):
    with LocalPool(2) as pool:
        assert pool.map(functools.partial(_die_once, _square, str(tmp_path / "m")), list(range(5)), "squares") == [0, 1, 4, 9, 16]
        assert "run again" in pool.notes[-1]
        with pytest.raises(WorkerLost, match="on all 3 attempts"):
            pool.map(_always_die, [1], "dying")


def _fixed_latency(candidates, n_layers, *args, **kwargs):
    """Latency by structure, not measured: the choice then depends on the search alone (what the executor runs)."""
    for c in candidates:
        c.int8_layers = {"int8": n_layers - len(c.recipe.float_layers), "qat": n_layers}.get(c.recipe.kind, 0)
        c.size_mb, c.p50_ms, c.p90_ms = 1.0, 10.0 - c.int8_layers - (0.5 if c.recipe.kind == "fp16" else 0), 11.0


def test_auto_on_ray_chooses_the_model_and_figures_of_the_local_executor(cluster, digits, tmp_path, monkeypatch):
    import importlib

    monkeypatch.setattr(importlib.import_module("edgeq.auto.run"), "measure", _fixed_latency)
    runs = {}
    for name, executor in (("local", "local"), ("ray", cluster)):
        runs[name] = edgeq.auto(digits / "m.onnx", digits / "unlabelled.npz", digits / "unlabelled.npz", budget=2.0,
                                output=tmp_path / name, executor=executor, workers=2, methods=("minmax", "mse"), refine=False)
    local, remote = runs["local"], runs["ray"]
    assert remote["chosen"] == local["chosen"]
    figures = ("name", "metric_value", "metric_ci95", "drop", "drop_ci95", "meets", "float_layers")
    assert [{k: c[k] for k in figures} for c in remote["candidates"]] == [{k: c[k] for k in figures} for c in local["candidates"]]
    assert remote["analysis"]["sensitivity"] == local["analysis"]["sensitivity"]


def test_cli_validate_on_ray_writes_the_local_record(cluster, digits, tmp_path):
    from edgeq.cli import main

    cluster.close()   # its actors hold the instance's 2 CPUs; the command starts its own (and the fixture again later)
    for executor in ("local", "ray"):
        main(["validate", str(digits / "m.onnx"), "--data", str(digits / "val.npz"), "-o", str(tmp_path / f"{executor}.json"),
              "--executor", executor, "--workers", "2"])
    local, remote = (edgeq.evaluate.read_validation(tmp_path / f"{e}.json") for e in ("local", "ray"))
    assert {k: remote[k] for k in ("value", "ci95", "per_sample", "data_fingerprint")} == \
        {k: local[k] for k in ("value", "ci95", "per_sample", "data_fingerprint")}


def test_ray_executor_without_the_extra_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'edgeq\[ray\]'"):
        make_executor("ray")

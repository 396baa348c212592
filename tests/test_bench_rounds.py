"""edgeq.rounds: models timed in interleaved rounds, the speed-up paired by round, and warnings when it cannot decide.

The one timing test compares two benchmarks of the same pair under the same background load (their agreement),
never a timing against a fixed figure.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.bench import BenchConfig, BenchRecord, Latency, benchmark
from edgeq.bench_table import bench_table
from edgeq.errors import ConfigError
from edgeq.rounds import Speedup, round_sizes, speedups, timing_warnings
from tests.test_bench import _render

# Bursts of BLAS work and idle gaps: load that changes while a benchmark runs, as on a shared machine.
BURSTY_LOAD = ("import time, numpy as np\n"
               "a = np.ones((400, 400))\n"
               "while True:\n"
               "    t = time.time()\n"
               "    while time.time() - t < 0.3:\n"
               "        a @ a\n"
               "    time.sleep(0.3)\n")


def _matmul_chain(path: Path, layers: int) -> Path:
    rng = np.random.default_rng(layers)
    inits, nodes, prev = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array((rng.standard_normal((512, 512)) / 23).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"y{i}"], name=f"mm{i}"))
        prev = f"y{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 512])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [64, 512])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _record(name: str, rounds: list[float], p90_over_p50: float = 1.1) -> BenchRecord:
    p50 = float(np.median(rounds))
    return BenchRecord(path=f"/m/{name}.onnx", name=name, size_bytes=1000, files=[f"/m/{name}.onnx"], threads=1, batch=1,
                       runs=len(rounds), warmup=1, latency_ms=Latency(p50, p50 * p90_over_p50, p50 * p90_over_p50 * 1.1, p50, p50 * 0.9, p50 * 6),
                       throughput=1000 / p50, peak_rss_mb=100.0, model_rss_mb=20.0, input_shapes={"x": [1]},
                       feed="random", onnxruntime="1.0", round_p50_ms=rounds)


def test_runs_are_split_evenly_over_rounds():
    assert round_sizes(50, 10) == [5] * 10
    assert round_sizes(3, 10) == [1, 1, 1]
    assert sum(round_sizes(101, 7)) == 101 and max(round_sizes(101, 7)) - min(round_sizes(101, 7)) <= 1
    with pytest.raises(ConfigError, match="--rounds"):
        BenchConfig(rounds=0)


def test_speedup_is_paired_by_round():
    # Load doubles both models' times in the later rounds: the paired ratio stays 2, the pooled p50s would not.
    base = _record("fp32", [2.0, 2.0, 4.0, 4.0, 4.0, 4.0])
    fast = _record("int8", [1.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    assert speedups([base, fast])[1] == Speedup(2.0, 2.0, 2.0)
    assert timing_warnings([base, fast]) == []


def test_long_tails_and_wandering_speedups_are_warned():
    base = _record("fp32", [2.0] * 8, p90_over_p50=5.0)
    wandering = _record("int8", [1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0])
    text = " ".join(timing_warnings([base, wandering]))
    assert "fp32: p90 is 5.0× p50" in text
    assert "int8: speed-up 1.50× varied 1.00–2.00× across rounds" in text and "too noisy to decide" in text


def test_a_speedup_within_noise_of_one_says_so():
    base = _record("fp32", [2.0] * 8)
    same = _record("int8", [1.9, 2.1, 1.95, 2.05, 1.9, 2.1, 1.95, 2.05])
    (warning,) = timing_warnings([base, same])
    assert "within noise of 1×" in warning and "neither measurably faster nor slower" in warning


def test_table_shows_the_paired_speedup_and_its_spread():
    text = _render(bench_table([_record("fp32", [2.0, 2.0, 4.0, 4.0]), _record("int8", [1.0, 1.25, 2.0, 1.6])]))
    int8 = next(line for line in text.splitlines() if line.strip().startswith("int8"))
    assert "2.00× ±0.11" in int8  # round ratios 2, 1.6, 2, 2.5: middle half 1.90–2.125
    assert "4 runs in 4 rounds" in text


def test_records_keep_every_round(tmp_path):
    paths = [_matmul_chain(tmp_path / "a.onnx", 2), _matmul_chain(tmp_path / "b.onnx", 1)]
    records = benchmark(paths, BenchConfig(runs=9, rounds=4, warmup=1))
    for r in records:
        assert len(r.round_p50_ms) == 4 and r.runs == 9 and len(r.times_ms) == 9
        assert min(r.times_ms) <= min(r.round_p50_ms) and max(r.round_p50_ms) <= max(r.times_ms)


@pytest.mark.slow
def test_speedup_is_repeatable_under_a_busy_background_process(tmp_path):
    paths = [_matmul_chain(tmp_path / "six.onnx", 6), _matmul_chain(tmp_path / "three.onnx", 3)]
    busy = subprocess.Popen([sys.executable, "-c", BURSTY_LOAD])
    try:
        first, second = (speedups(benchmark(paths, BenchConfig(runs=200, rounds=20, warmup=3)))[1] for _ in range(2))
    finally:
        busy.kill()
        busy.wait()
    assert abs(first.median / second.median - 1) < 0.15, (first, second)
    assert first.median > 1 and second.median > 1

"""Validation throughput by executor: edgeq `validate` with the local executor at 1 and 2 worker processes and on Ray
with 2 workers, same model and data, in one run; and the costs docs/SCALING.md estimates `auto`'s wall time from
(one more candidate's build, open and dispatch; `auto`'s fixed cost and its marginal cost per validation sample).

Model: the planted-outlier residual digits CNN in FP32 (edgeq/testing/planted.py, cached per machine like the tests'
copy), one intra-op thread per worker. Data: its 718 held-out images tiled to `--samples`, written once as an .npz
that every worker reads from the path. Each executor validates twice: the first call pays the start-up (processes
spawned, or Ray started and its actors created, each opening the model), the second is steady throughput.

    pip install -e '.[torch,ray]'
    python bench/scale.py [--samples 8192] [--workdir bench-scale-out]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import markdown_table  # noqa: E402
import edgeq  # noqa: E402
from edgeq.executors import make_executor  # noqa: E402
from edgeq.testing.planted import cached_planted_model  # noqa: E402

FIGURES = ("value", "ci95", "per_sample", "data_fingerprint")


def tiled_data(source: Path, samples: int, out: Path) -> Path:
    with np.load(source) as val:
        arrays = {k: val[k] for k in val.files}
    reps = -(-samples // len(arrays["labels"]))
    np.savez(out, **{k: np.concatenate([v] * reps)[:samples] for k, v in arrays.items()})
    return out


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def executor_rows(model: Path, data: Path, samples: int) -> tuple[list[dict], dict]:
    baseline_s, baseline = timed(lambda: edgeq.validate(model, data))
    record = baseline.to_dict()
    compare_s, _ = timed(lambda: edgeq.compare(record, record))   # the driver's paired bootstrap, per candidate
    rows = [{"executor": "in-process (no executor)", "workers": 1, "first_s": baseline_s, "steady_s": baseline_s}]
    figures = {k: baseline.to_dict()[k] for k in FIGURES}
    for kind, workers in (("local", 1), ("local", 2), ("ray", 2)):
        start_s, executor = timed(lambda: make_executor(kind, workers))
        first_s, first = timed(lambda: edgeq.validate(model, data, executor=executor))
        steady_s, steady = timed(lambda: edgeq.validate(model, data, executor=executor))
        executor.close()
        same = all({k: r.to_dict()[k] for k in FIGURES} == figures for r in (first, steady))
        rows.append({"executor": kind, "workers": workers, "first_s": start_s + first_s, "steady_s": steady_s, "same_figures": same})
    for row in rows:
        row["samples_per_s"] = samples / row["steady_s"]
    return rows, {"top1": baseline.value, "samples": baseline.samples, "compare_s": compare_s}


def candidate_costs(planted, data: Path) -> dict:
    """What one more candidate costs besides its validation: building its QDQ graph and saving it (driver), opening
    it in a worker (model load and session), one layer's two sensitivity views, and Ray's put of its bytes and the
    dispatch of one task."""
    import ray

    from edgeq.analyze.sensitivity import eval_inputs, fidelity, outputs_of
    from edgeq.executors.worker import Opened
    from edgeq.model import load, save
    from edgeq.quantize.config import Int8Static
    from edgeq.quantize.qdq import prepare_and_calibrate, quantize_qdq
    from edgeq import runtimes

    source = load(planted.fp32)
    calib = edgeq.Dataset.from_npz(planted.planted.parent / "calib.npz")
    prep = prepare_and_calibrate(source, calib, Int8Static(method="minmax"))
    out = data.parent / "candidate.onnx"
    build_s, proto = timed(lambda: quantize_qdq(prep, exclude=[prep.layers[0]["name"]]))
    save_s, _ = timed(lambda: save(proto, out, force=True))
    open_s, _ = timed(lambda: Opened(runtimes.load(out)).session())
    feed = eval_inputs(prep, calib, 128)
    reference = outputs_of(prep.model.proto, feed)
    name = prep.layers[1]["name"]
    layer_s, _ = timed(lambda: (fidelity(reference, outputs_of(quantize_qdq(prep, only=[name]), feed)),
                                fidelity(reference, outputs_of(quantize_qdq(prep, exclude=[name]), feed))))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    put_s, _ = timed(lambda: ray.get(ray.put(out.read_bytes())))
    executor = make_executor("ray", 2)
    executor.map(abs, [1, 2], "warm-up")
    dispatch_s, _ = timed(lambda: executor.map(abs, list(range(200)), "dispatch"))
    executor.close()
    ray.shutdown()
    return {"build_qdq_s": build_s, "save_s": save_s, "open_in_worker_s": open_s, "sensitivity_layer_s": layer_s,
            "layers": len(prep.layers), "model_mb": out.stat().st_size / 1e6, "ray_put_get_s": put_s,
            "ray_task_overhead_ms": dispatch_s / 200 * 1000}


def auto_costs(planted, workdir: Path, samples: int) -> dict:
    """`auto` in this process on the 718 held-out images and on `samples` of them: the wall-time difference over the
    sample difference is auto's marginal cost per validation sample (every evaluation and comparison of it), the
    rest its fixed cost (calibration, sensitivity, builds, latency)."""
    from edgeq.executors import InProcess

    calib = planted.planted.parent / "calib.npz"
    runs = {}
    for n, data in ((718, planted.planted.parent / "val.npz"), (samples, workdir / "val.npz")):
        seconds, report = timed(lambda: edgeq.auto(planted.planted, calib, data, budget=1.0, output=workdir / f"auto-{n}",
                                                   executor=InProcess(), force=True))
        runs[n] = {"seconds": seconds, "evaluations": report["evaluations"], "chosen": report["chosen"]}
    per_sample = (runs[samples]["seconds"] - runs[718]["seconds"]) / (samples - 718)
    return {"runs": runs, "per_sample_ms": per_sample * 1000, "fixed_s": runs[718]["seconds"] - 718 * per_sample}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--workdir", type=Path, default=Path("bench-scale-out"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    planted = cached_planted_model()
    data = tiled_data(planted.planted.parent / "val.npz", args.samples, args.workdir / "val.npz")
    rows, about = executor_rows(planted.fp32, data, args.samples)
    baseline = rows[0]["samples_per_s"]
    table = [[r["executor"], r["workers"], f"{r['samples_per_s']:.0f}", f"{r['samples_per_s'] / baseline:.2f}×",
              f"{r['first_s']:.1f}", f"{r['steady_s']:.2f}", "—" if "same_figures" not in r else ("yes" if r["same_figures"] else "NO")]
             for r in rows]
    print(f"digits CNN (planted, FP32), {about['samples']} samples, top-1 {about['top1']:.2f}%, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; compare (driver) {about['compare_s']:.3f} s")
    print(markdown_table(["executor", "workers", "samples/s", "vs in-process", "first call s (start-up included)",
                          "steady call s", "figures identical"], table))
    costs = candidate_costs(planted, args.workdir)
    print(markdown_table(["cost", "value"], [[k, f"{v:.4f}" if isinstance(v, float) else str(v)] for k, v in costs.items()]))
    auto = auto_costs(planted, args.workdir, args.samples)
    print(f"auto in-process: {auto['runs']}; marginal {auto['per_sample_ms']:.3f} ms per validation sample, fixed {auto['fixed_s']:.1f} s")
    print(json.dumps({"rows": rows, "costs": costs, "auto": auto, **about}))


if __name__ == "__main__":
    main()

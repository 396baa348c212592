"""Golden hashes of static INT8: the sha256 of the quantized ONNX bytes of every recipe on the small test models, to
check that a refactor of `quantize_static` changes no byte.

    python tools/golden_static.py --record golden.json     # before the change
    python tools/golden_static.py --check golden.json      # after it: exit 1 and the differing cases otherwise

Models: the tiny conv net of tests/conftest.py, the depthwise, MatMul and MatMul+Add nets of tests/test_repair.py,
the If model of tests/test_subgraphs.py and the planted digits CNN (trained once per machine, edgeq.testing). Measured
coverage is timed, so its decision is cached: its case is deterministic once the cache under --cache holds it (the
cache key includes quantize/coverage.py's source: changing that module measures again).

golden_static.main.json was recorded on main before the pass pipeline. Against it the pipeline differs in three
cases, each explained in edgeq/quantize/pipeline.py: planted/adaround (AdaRound's FP32 inputs now come from the shared
calibration session, where ONNX Runtime does not fuse Conv with the residual Add: last-bit differences, top-1 and
output SQNR unchanged), if/smoothquant-auto and if/everything (main raised KeyError 'alphas' on a model with nothing
to smooth; fixed).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECIPES: dict[str, dict] = {
    "default": {},
    "smoothquant-0.5": {"smoothquant": 0.5},
    "smoothquant-auto": {"smoothquant": "auto"},
    "equalize": {"equalize": True},
    "weight-range-mse": {"weight_range": "mse"},
    "bias-correction": {"bias_correction": True},
    "adaround": {"rounding": "adaround"},
    "method-auto": {"method": "auto"},
    "coverage-measured": {"coverage": "measured"},
    "percentile-per-tensor": {"method": "percentile", "per_channel": False},
    "everything": {"equalize": True, "smoothquant": "auto", "weight_range": "mse", "bias_correction": True, "method": "auto"},
}


def models() -> dict[str, tuple]:
    """name → (ONNX proto, calibration Dataset factory)."""
    import edgeq
    from edgeq.testing.planted import cached_planted_model
    from tests.conftest import make_conv_model
    from tests.test_repair import depthwise_model, linear_model, matmul_model
    from tests.test_subgraphs import _if_calib, if_inputs, if_model

    import onnx

    rng = np.random.default_rng(1)
    conv_x = rng.normal(0, 1, (200, 1, 8, 8)).astype(np.float32)
    dw_x = np.random.default_rng(5).normal(size=(256, 3, 8, 8)).astype(np.float32)
    mm_x = np.random.default_rng(3).normal(size=(128, 5, 32)).astype(np.float32)
    lin_x = (np.random.default_rng(6).normal(size=(256, 5, 32)) + 0.5).astype(np.float32)
    if_x = np.concatenate([if_inputs(True, 32, 1), if_inputs(False, 32, 2)])
    planted = cached_planted_model()
    digits = np.load(planted.planted.parent / "calib.npz")["input"][:256]
    arrays = lambda name, x: (lambda: edgeq.Dataset.from_arrays({name: x}))  # noqa: E731
    return {"conv": (make_conv_model(), arrays("x", conv_x)),
            "depthwise": (depthwise_model(imbalance=1.0, outlier=20.0), arrays("x", dw_x)),
            "matmul": (matmul_model(), arrays("x", mm_x)),
            "linear": (linear_model(), arrays("x", lin_x)),
            "if": (if_model(), lambda: _if_calib(if_x)),
            "planted": (onnx.load(str(planted.planted)), arrays("input", digits))}


def hashes(only: set[str] | None = None) -> dict[str, str]:
    import edgeq

    out = {}
    for model_name, (proto, calib) in models().items():
        for recipe, options in RECIPES.items():
            case = f"{model_name}/{recipe}"
            if only and case not in only:
                continue
            if model_name == "planted" and recipe in ("adaround", "everything"):
                options = dict(options, max_samples=128)
            try:
                q = edgeq.quantize(edgeq.Model(proto, None), edgeq.Int8Static(**options), calib=calib())
            except Exception as exc:  # noqa: BLE001 - recorded: a case that fails is a result too
                out[case] = f"error: {type(exc).__name__}: {exc}"
            else:
                out[case] = hashlib.sha256(q.proto.SerializeToString(deterministic=True)).hexdigest()
            print(case, out[case][:16], flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", type=Path)
    parser.add_argument("--check", type=Path)
    parser.add_argument("--cases", nargs="*", help="check only these cases (model/recipe)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/edgeq-golden-cache"), help="EDGEQ_CACHE for the run")
    args = parser.parse_args()
    os.environ["EDGEQ_CACHE"] = str(args.cache)
    if args.record:
        args.record.write_text(json.dumps(hashes(), indent=1, sort_keys=True) + "\n")
        return 0
    expected = json.loads(args.check.read_text())
    if args.cases:
        expected = {case: expected[case] for case in args.cases}
    got = hashes(set(expected) if args.cases else None)
    differ = [case for case in expected if got.get(case) != expected[case]]
    print(f"{len(expected) - len(differ)} of {len(expected)} cases byte-identical" + (f"; differ: {', '.join(differ)}" if differ else ""))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())

"""PP-PicoDet box F1 against FP32 (score > 0.25, NMS) under static INT8 with each accuracy repair: the diagnosis behind
bench/RESULTS.md's detector section. Models cached in the work folder; one line of JSON per variant.

    .venv/bin/python tools/detect_repairs.py [--work DIR] [VARIANT ...]     # all variants by default
"""
import argparse
import json
import time
from pathlib import Path

import edgeq
from edgeq.demo import detection_data as dd
from edgeq.evaluate.detect_validation import validate_detection
VARIANTS = {
    "default": {},
    "bc": {"bias_correction": True},
    "wmse": {"weight_range": "mse"},
    "ada": {"rounding": "adaround"},
    "bc_ada": {"rounding": "adaround", "bias_correction": True},
    "int8act": {"activation_type": "int8"},
}
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("variants", nargs="*", help=f"any of {', '.join(VARIANTS)}")
parser.add_argument("--work", type=Path, default=Path("/tmp/detect-repairs"))
args = parser.parse_args()
if set(args.variants) - set(VARIANTS):
    parser.error(f"unknown variants {sorted(set(args.variants) - set(VARIANTS))}")
work = args.work
work.mkdir(parents=True, exist_ok=True)
fp32 = dd.layout_model_path()
calib, val = dd.write_set(work, "layout", 16, seed=0), dd.write_set(work, "layout", 16, seed=1)
for name in args.variants or VARIANTS:
    out = work / f"{name}.onnx"
    t = time.time()
    if not out.exists():
        q = edgeq.quantize(edgeq.load(fp32), edgeq.Int8Static(batch_size=1, **VARIANTS[name]), calib=edgeq.Dataset.from_npz(calib.images)); q.save(out, force=True)
    qs = time.time() - t
    r = validate_detection(out, val.images, reference=fp32, batch_size=1)
    m = r.metrics
    print(json.dumps({"variant": name, "quant_s": round(qs,1), "box_f1": round(m["box_f1"].value,3), **{k: round(v.value,3) for k, v in m.items() if k != "box_f1" and hasattr(v, "value")}}), flush=True)

"""INT4 weight-only: edgeq (RTN, GPTQ, AWQ, mixed INT4/INT8) vs ONNX Runtime's MatMulNBitsQuantizer (RTN, GPTQ, HQQ), in one run.

Models: the docstring LM that edgeq.testing.lm trains (cached under --cache, keyed by its config) and all-MiniLM-L6-v2
(exported by edgeq.testing.zoo). Per variant: perplexity on every held-out window with its 95% interval and the paired
relative increase over FP32 (LM) or sentence-embedding cosine to FP32 (MiniLM), file size, p50 latency at 1 and
2 threads (all models' ONNX Runtime sessions in one process, timed round-robin so that load drift on a shared machine
hits every model alike; LM: one window of 128 tokens (prefill) and 1 token, MiniLM: 1 × 128 tokens), quantization
wall time and peak memory (each quantization in its own process).

    PYTHONPATH=. .venv/bin/python bench/int4.py              # prints markdown for bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, markdown_table, npz_reader, peak_rss_mb, run_child  # noqa: E402

BLOCK = 32
VARIANTS = ("int8-dynamic", "edgeq-rtn", "edgeq-rtn-qdq", "edgeq-gptq", "edgeq-adaround", "edgeq-awq", "edgeq-gptq-mixed", "edgeq-gptq+emb", "ort-rtn",
            "ort-gptq", "ort-gptq-asym", "ort-hqq")


def child_quantize(variant: str, model: str, calib: str, out: str) -> None:
    """Runs in a fresh process so that wall time and peak memory are the quantizer's alone."""
    import logging
    import time

    logging.disable(logging.WARNING)
    start = time.perf_counter()
    if variant.startswith(("edgeq", "int8")):
        import edgeq

        configs = {
            "int8-dynamic": edgeq.Int8Dynamic(),
            "edgeq-rtn": edgeq.Int4WeightOnly(block_size=BLOCK, algorithm="rtn"),
            "edgeq-rtn-qdq": edgeq.Int4WeightOnly(block_size=BLOCK, algorithm="rtn", format="qdq"),
            "edgeq-gptq": edgeq.Int4WeightOnly(block_size=BLOCK, algorithm="gptq"),
            "edgeq-adaround": edgeq.Int4WeightOnly(block_size=BLOCK, algorithm="adaround"),
            "edgeq-awq": edgeq.Int4WeightOnly(block_size=BLOCK, algorithm="awq"),
            "edgeq-gptq-mixed": edgeq.Int4WeightOnly(block_size=BLOCK, algorithm="gptq", int8_first_last=True, int8_auto=2),
            # the smallest file: the token embedding table in INT4 too (GatherBlockQuantized)
            "edgeq-gptq+emb": edgeq.Int4WeightOnly(block_size=BLOCK, algorithm="gptq", embeddings=True),
        }
        config = configs[variant]
        data = edgeq.Dataset.from_npz(calib) if getattr(config, "algorithm", "rtn") in ("gptq", "awq", "adaround") or getattr(config, "int8_auto", 0) else None
        edgeq.quantize(edgeq.load(model), config, calib=data).save(out, force=True)
    else:
        import onnx
        from onnxruntime.quantization import matmul_nbits_quantizer as mnb

        if variant == "ort-rtn":
            algo = mnb.DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=True, accuracy_level=4)
        elif variant.startswith("ort-gptq"):
            algo = mnb.GPTQWeightOnlyQuantConfig(calibration_data_reader=npz_reader(Path(calib), batch=8), block_size=BLOCK)
        else:
            algo = mnb.HQQWeightOnlyQuantConfig(block_size=BLOCK)
        # The group size of ONNX Runtime's GPTQ is the quantizer's block_size (its config's block_size is GPTQ's column
        # block): without it, ORT GPTQ silently used 128-wide groups while every other variant used BLOCK. Its GPTQ
        # runs symmetric like edgeq's, and asymmetric (its default scheme) as `ort-gptq-asym`.
        quantizer = mnb.MatMulNBitsQuantizer(onnx.load(model), block_size=BLOCK, is_symmetric=variant != "ort-gptq-asym",
                                             accuracy_level=4, algo_config=algo)
        quantizer.process()
        declare_ms_domain(quantizer.model.model)
        quantizer.model.save_model_to_file(out, use_external_data_format=False)
    emit({"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()})


def declare_ms_domain(model) -> None:
    """ONNX Runtime's GPTQ port writes com.microsoft MatMulNBits nodes without importing that domain (the ONNX
    checker then refuses the model); declare it, as its RTN and HQQ paths do."""
    import onnx

    domains = {o.domain for o in model.opset_import}
    if "com.microsoft" not in domains and any(n.domain == "com.microsoft" for n in model.graph.node):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))


def child_latency(threads: str, runs: str, feeds: str, *paths: str) -> None:
    """All models' sessions in one process, timed round-robin: load on a shared machine drifts, and this way every
    model sees the same drift. One p50 per model and feed."""
    import time

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = int(threads), 1
    options.log_severity_level = 3
    # idle sessions' worker threads must not spin while the next session runs (with 2 threads on 2 cores, spinning
    # made every 2-thread figure slower than the 1-thread one)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = [ort.InferenceSession(p, options, providers=["CPUExecutionProvider"]) for p in paths]
    result = {}
    with np.load(feeds) as f:
        names = sorted({k.split("|")[0] for k in f.files})
        for feed_name in names:
            feed = {k.split("|")[1]: f[k] for k in f.files if k.startswith(feed_name + "|")}
            times = [[] for _ in sessions]
            for r in range(int(runs) + 3):
                for i, s in enumerate(sessions):
                    start = time.perf_counter()
                    s.run(None, feed)
                    if r >= 3:
                        times[i].append(time.perf_counter() - start)
            result[feed_name] = [float(np.median(t)) * 1000 for t in times]
    emit(result)


def lm_case(work: Path, cache: Path, steps: int | None) -> dict:
    import edgeq
    from edgeq.testing import lm

    config = lm.LMConfig() if steps is None else lm.LMConfig(steps=steps)
    paths = lm.build_lm(cache, config, log=lambda m: print(f"  lm: {m}", file=sys.stderr))
    with np.load(paths["heldout"]) as f:
        held = f["input_ids"]
    n_params = sum(int(np.prod(t.dims)) for t in edgeq.load(paths["model"]).proto.graph.initializer if t.data_type == 1)
    return {"name": f"docstring LM ({n_params / 1e6:.2f} M params)", "fp32": paths["model"], "calib": paths["calib"],
            "val": edgeq.Dataset.from_arrays({"input_ids": held}), "reference": False,
            "feeds": {"128 tokens": {"input_ids": held[:1]}, "1 token": {"input_ids": held[:1, :1]}}}


def minilm_case(work: Path) -> dict:
    import edgeq
    from edgeq.testing import zoo

    fp32 = zoo.export_minilm(work / "minilm.onnx")
    sentences = zoo.sample_sentences(384, seed=3)
    calib = work / "minilm_calib.npz"
    np.savez(calib, **zoo.minilm_inputs(sentences[:128]))
    val = edgeq.Dataset.from_arrays(zoo.minilm_inputs(sentences[128:]))
    return {"name": "all-MiniLM-L6-v2", "fp32": fp32, "calib": calib, "val": val, "reference": True,
            "feeds": {"128 tokens": {k: np.ones((1, 128), np.int64) * (k != "token_type_ids") * (101 if k == "input_ids" else 1)
                                     for k in zoo.MINILM_INPUTS}}}


def measure_case(case: dict, work: Path, runs: int, variants: tuple[str, ...]) -> list[dict]:
    from edgeq.bench import model_size
    from edgeq.evaluate import compare, validate

    paths = {"fp32": Path(case["fp32"])}
    quant = {}
    for variant in variants:
        out = work / f"{paths['fp32'].stem}_{variant}.onnx"
        try:
            quant[variant] = run_child([__file__, "_child", variant, str(case["fp32"]), str(case["calib"]), str(out)])
            paths[variant] = out
        except RuntimeError as exc:
            print(f"  {case['name']} {variant}: failed: {str(exc).strip().splitlines()[-1][:200]}", file=sys.stderr)
            quant[variant] = {"failed": str(exc).strip().splitlines()[-1][:120]}
    feeds = work / "feeds.npz"
    np.savez(feeds, **{f"{f}|{k}": v for f, feed in case["feeds"].items() for k, v in feed.items()})
    latency = {t: run_child([__file__, "_latency", str(t), str(runs), str(feeds), *map(str, paths.values())]) for t in (1, 2)}
    rows, base = [], None
    for i, (name, path) in enumerate(paths.items()):
        record = validate(path, case["val"], reference=case["fp32"] if case["reference"] else None, batch_size=16)
        base = base or record
        rows.append({"model": case["name"], "variant": name, "quality": _quality(record, base, compare),
                     "size_mb": model_size(path)[0] / 1e6,
                     "latency": {f"{f}, {t}t": latency[t][f][i] for f in case["feeds"] for t in (1, 2)},
                     "quant_s": quant.get(name, {}).get("seconds"), "quant_peak_mb": quant.get(name, {}).get("peak_rss_mb"),
                     "ppl_increase": _ppl_increase(record, base, compare)})
    for name, q in quant.items():
        if "failed" in q:
            rows.append({"model": case["name"], "variant": name, "failed": q["failed"]})
    return rows


def _ppl_increase(record, base, compare):
    if record.metric != "perplexity" or record is base:
        return None
    c = compare(base, record)
    return c.drop, c.drop_ci95


def _quality(record, base, compare) -> str:
    if record.metric == "perplexity":
        lo, hi = record.ci95
        text = f"ppl {record.value:.3f} [{lo:.3f}, {hi:.3f}]"
        if record is not base:
            c = compare(base, record)
            text += f", +{c.drop:.2f}% [{c.drop_ci95[0]:.2f}, {c.drop_ci95[1]:.2f}]"
        return text + f" ({record.samples} windows)"
    cos = record.metrics["cosine"]
    return f"cos {cos.value:.5f} [{cos.ci95[0]:.5f}, {cos.ci95[1]:.5f}]"


def report(rows: list[dict]) -> str:
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == model]
        fp32 = group[0]
        cols = list(fp32["latency"])
        table = []
        for r in group:
            if "failed" in r:
                table.append([r["variant"], f"failed: {r['failed']}", *["—"] * (3 + len(cols))])
                continue
            table.append([r["variant"], r["quality"], f"{r['size_mb']:.2f} ({r['size_mb'] / fp32['size_mb']:.3f}×)",
                          *[f"{r['latency'][c]:.2f} ({fp32['latency'][c] / r['latency'][c]:.2f}×)" for c in cols],
                          "—" if r["quant_s"] is None else f"{r['quant_s']:.1f}", "—" if r["quant_peak_mb"] is None else f"{r['quant_peak_mb']:.0f}"])
        headers = ["variant", "quality vs FP32 (95% interval)", "size MB (vs FP32)", *[f"p50 ms {c} (speed-up)" for c in cols],
                   "quantize s", "quantize peak MB"]
        lines += [f"**{model}**", "", markdown_table(headers, table), ""]
    lines += _goals(rows)
    return "\n".join(lines)


def _goals(rows: list[dict]) -> list[str]:
    lm = {r["variant"]: r for r in rows if r["model"].startswith("docstring LM") and "failed" not in r}
    if not lm:
        return []
    out = []
    fp32 = lm["fp32"]
    inc = {k: v["ppl_increase"][0] for k, v in lm.items() if v.get("ppl_increase")}
    for k in ("edgeq-rtn", "edgeq-gptq", "edgeq-awq", "edgeq-gptq+emb"):
        if k in lm:
            out.append(f"- LM {k}: file {lm[k]['size_mb'] / fp32['size_mb']:.3f}× FP32 (goal ≤ 0.2×)")
    if "edgeq-rtn" in inc and "edgeq-gptq" in inc:
        ort = {k: v for k, v in inc.items() if k.startswith("ort-")}
        best = min(ort.items(), key=lambda kv: kv[1]) if ort else None
        out.append(f"- LM perplexity increase: edgeq GPTQ {inc['edgeq-gptq']:+.2f}% vs RTN {inc['edgeq-rtn']:+.2f}% "
                   f"(goal ≤ half: {'met' if inc['edgeq-gptq'] <= inc['edgeq-rtn'] / 2 else 'not met'})"
                   + (f"; best ONNX Runtime method {best[0]} {best[1]:+.2f}% ({'met' if inc['edgeq-gptq'] <= best[1] else 'not met'})" if best else ""))
    if "edgeq-rtn" in inc and "edgeq-awq" in inc:
        out.append(f"- LM perplexity increase: edgeq AWQ {inc['edgeq-awq']:+.2f}% vs RTN {inc['edgeq-rtn']:+.2f}%")
    if "int8-dynamic" in inc:
        out.append(f"- LM INT8 (edgeq dynamic) perplexity increase {inc['int8-dynamic']:+.2f}% (goal ≤ 2%)")
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child_quantize(*sys.argv[2:6])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_latency":
        child_latency(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "edgeq", help="where the trained LM is cached")
    parser.add_argument("--steps", type=int, default=None, help="LM training steps (default: edgeq.testing.lm.LMConfig's)")
    parser.add_argument("--models", default="lm,minilm")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    variants = tuple(v for v in args.variants.split(",") if v)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = []
        for name in args.models.split(","):
            case = lm_case(work, args.cache, args.steps) if name == "lm" else minilm_case(work)
            rows += measure_case(case, work, args.runs, variants)
            print(report(rows), file=sys.stderr)
    print(report(rows))


if __name__ == "__main__":
    main()

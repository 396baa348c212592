"""The `auto` report: one self-contained HTML page — verdict and reasons first, then the size–latency–accuracy chart
with the Pareto front, per-layer sensitivity bars, outlier layers and the operator-support table."""
from __future__ import annotations

import html
import io

from edgeq.sqnr import BROKEN_SQNR_DB

COLOURS = {"meets": "#1a7f37", "misses": "#cf222e", "fp32": "#57606a", "front": "#0969da"}
STATUS_COLOURS = {"met": "#1a7f37", "fp16": "#9a6700", "fp32": "#9a6700", "not-met": "#cf222e"}


def pareto_front(candidates: list[dict]) -> list[str]:
    """Names of the candidates no other candidate beats on size, latency and accuracy at once (all three no worse,
    one strictly better)."""
    pts = [(c["name"], c["size_mb"], c["p50_ms"], -c["metric_value"]) for c in candidates if c.get("p50_ms") is not None]
    front = []
    for name, *p in pts:
        dominated = any(all(q[i] <= p[i] for i in range(3)) and any(q[i] < p[i] for i in range(3)) for _, *q in pts)
        if not dominated:
            front.append(name)
    return front


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    plt.close(fig)
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]


def tradeoff_chart(candidates: list[dict], budget: float, metric: str) -> str:
    """Latency vs accuracy drop (marker area ∝ size), the budget line and the Pareto front; and size vs drop."""
    from edgeq.report import pyplot

    plt = pyplot()

    front = set(pareto_front(candidates))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    sizes = [c["size_mb"] for c in candidates]
    biggest = max(sizes) or 1.0
    for c in candidates:
        colour = COLOURS["fp32"] if c["kind"] == "fp32" else COLOURS["meets" if c["meets"] else "misses"]
        for ax, x in ((ax1, c["p50_ms"]), (ax2, c["size_mb"])):
            ax.scatter(x, c["drop"], s=40 + 260 * c["size_mb"] / biggest, color=colour, alpha=0.75, zorder=3,
                       edgecolors=COLOURS["front"] if c["name"] in front else "none", linewidths=2)
            ax.annotate(c["name"], (x, c["drop"]), textcoords="offset points", xytext=(6, 4), fontsize=7)
    on_front = sorted((c for c in candidates if c["name"] in front), key=lambda c: c["p50_ms"])
    ax1.plot([c["p50_ms"] for c in on_front], [c["drop"] for c in on_front], color=COLOURS["front"], lw=1.2, ls="--", label="Pareto front", zorder=2)
    for ax, label in ((ax1, "p50 latency (ms)"), (ax2, "model size (MB)")):
        ax.axhline(budget, color="#9a6700", lw=1, ls=":", label=f"budget {budget:g} points")
        ax.set_xlabel(label)
        ax.set_ylabel(f"{metric} drop vs FP32 (points)")
        ax.grid(alpha=0.3)
    ax1.set_title("latency vs accuracy (marker area: size; blue ring: Pareto front)", fontsize=9)
    ax2.set_title("size vs accuracy", fontsize=9)
    ax1.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _svg(fig)


def sensitivity_chart(sensitivity: list[dict], broken_below: float = BROKEN_SQNR_DB, top: int = 40) -> str:
    """Horizontal bars: output SQNR with only this layer INT8 (short bar = sensitive) and with only it float."""
    from edgeq.report import pyplot

    plt = pyplot()

    rows = sensitivity[:top]
    fig, ax = plt.subplots(figsize=(11, 0.28 * len(rows) + 1.2))
    y = list(range(len(rows)))[::-1]
    alone = [r["only_quantized"]["sqnr_db"] for r in rows]
    kept = [r["only_float"]["sqnr_db"] for r in rows]
    ax.barh([v + 0.2 for v in y], alone, height=0.4, color=["#cf222e" if a < broken_below else "#0969da" for a in alone], label="only this layer INT8")
    ax.barh([v - 0.2 for v in y], kept, height=0.4, color="#8c959f", label="only this layer float (rest INT8)")
    ax.set_yticks(y, [f"{r['rank']}. {r['node'][-38:]}" for r in rows], fontsize=7)
    ax.axvline(broken_below, color="#9a6700", lw=1, ls=":")
    ax.set_xlabel("output SQNR vs FP32 (dB, higher is better)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _svg(fig)


def render_auto_html(report: dict) -> str:
    esc = html.escape
    v = report["verdict"]
    a = report["analysis"]
    cands = report["candidates"]
    front = set(pareto_front(cands))
    chart = tradeoff_chart(cands, report["budget"], report["metric"])
    sens_chart = sensitivity_chart(a["sensitivity"]) if a["sensitivity"] else "<p>no calibration data: sensitivity not measured</p>"
    reasons = "".join(f"<li>{esc(r)}</li>" for r in v["reasons"])

    def fmt(x, spec):
        return "—" if x is None else format(x, spec)

    cand_rows = "".join(
        "<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in (
            r["name"] + (" ★" if r["name"] == report["chosen"] else ""), _recipe(r), len(r["float_layers"]),
            fmt(r.get("size_mb"), ".3f"), fmt(r.get("p50_ms"), ".2f"), fmt(r["metric_value"], ".2f"),
            f"{r['drop']:+.2f} [{r['drop_ci95'][0]:+.2f}, {r['drop_ci95'][1]:+.2f}]", "yes" if r["meets"] else "no",
            "yes" if r["name"] in front else "", r["evaluation"])) + "</tr>" for r in cands)
    steps = "".join(f"<li>{esc(_step(s))}</li>" for s in report["search"])
    outl = [o for o in a["outliers"] if o["flags"]] or a["outliers"][:5]
    out_rows = "".join(
        f"<tr><td>{esc(o['node'])}</td><td>{esc(o['op_type'])}</td><td>{o['outlier_ratio']:.1f}</td><td>{o['channel_spread']:.1f}</td>"
        f"<td>{o['per_tensor_step']:.3g}</td><td>{o['per_channel_step_median']:.3g}</td><td>{o['zeroed_per_channel']:.1%}</td>"
        f"<td>{esc(', '.join(o['flags']) or '—')}</td><td class='l'>{esc(' '.join(o['reasons']))}</td></tr>" for o in outl)
    sup = a["support"]
    sup_rows = "".join(
        f"<tr class='{esc(n['status'])}'><td>{esc(n['node'])}</td><td>{esc(n['op_type'])}</td><td>{esc(n['status'])}</td><td class='l'>{esc(n['reason'])}</td></tr>"
        for n in sorted(sup["nodes"], key=lambda n: ({"unsupported": 0, "float": 1, "int8": 2}[n["status"]], n["node"])))
    data = a.get("data") or {}
    data_lines = "".join(f"<li>{esc(w)}</li>" for w in data.get("warnings", [])) or "<li>no problems found</li>"
    if data:
        c = data["calib"]
        data_lines = (f"<li>calibration: {c['samples']} samples, {c['nonfinite']} with NaN/Inf, {c['duplicates']} duplicates</li>"
                      + (f"<li>validation: {data['val']['samples']} samples</li>" if data.get("val") else "") + data_lines)
    env = "".join(f"<li>{esc(k)}: {esc(str(x))}</li>" for k, x in report.get("environment", {}).items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(report['title'])}</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;color:#1f2328;padding:0 1em}}
table{{border-collapse:collapse;width:100%;font-size:.9em}}td,th{{border-bottom:1px solid #d0d7de;padding:4px 8px;text-align:right}}
td:first-child,th:first-child,td.l{{text-align:left}}
.verdict{{font-size:1.3em;padding:.6em 1em;border-radius:6px;color:#fff;background:{STATUS_COLOURS.get(v['status'], '#0969da')}}}
tr.unsupported td{{color:#cf222e}}tr.float td{{color:#9a6700}}figure{{margin:1.2em 0}}svg{{max-width:100%;height:auto}}
</style></head><body>
<h1>{esc(report['title'])}</h1>
<p class="verdict" id="verdict">{esc(v['summary'])}</p>
<ul id="reasons">{reasons}</ul>
{f'<p id="metric-note">{esc(report["metric_note"])}</p>' if report.get("metric_note") else ""}
<p id="evaluations">Evaluations: <b>{report['evaluations']}</b> — {esc(report.get('evaluations_note', ''))}</p>
<h2>Candidates</h2>
<figure id="tradeoff">{chart}</figure>
<table id="candidates"><tr><th>candidate</th><th>recipe</th><th>layers in float</th><th>size MB</th><th>p50 ms</th><th>{esc(report['metric'])}</th><th>drop [paired 95% CI]</th><th>meets budget</th><th>Pareto</th><th>eval #</th></tr>{cand_rows}</table>
<h2>Search</h2><ol id="search">{steps}</ol>
<h2>Per-layer sensitivity</h2>
<figure id="sensitivity">{sens_chart}</figure>
<h2>Weight outliers</h2>
<table id="outliers"><tr><th>layer</th><th>op</th><th>max|w| / robust σ</th><th>channel spread</th><th>per-tensor step</th><th>per-channel step (median)</th><th>zeroed per channel</th><th>flags</th><th>reason</th></tr>{out_rows}</table>
<h2>Operator support: {esc(sup['target'])}</h2>
<p>{esc(sup['description'])}</p>
<p id="support-counts">{sup['counts']['int8']} nodes int8, {sup['counts']['float']} float, {sup['counts']['unsupported']} cannot run</p>
<table id="support"><tr><th>node</th><th>op</th><th>runs</th><th>why</th></tr>{sup_rows}</table>
<h2>Calibration data</h2><ul id="data">{data_lines}</ul>
<h2>Environment</h2><ul>{env}<li>wall time: {report.get('wall_s', 0)} s</li></ul>
<script>
(function () {{
  var fig = document.querySelector("#tradeoff svg");
  var marks = fig ? fig.querySelectorAll("path, use").length : 0;
  var box = fig ? fig.getBoundingClientRect() : {{width: 0, height: 0}};
  document.documentElement.setAttribute("data-chart", fig && box.width > 100 && box.height > 100 && marks > 10 ? "rendered" : "missing");
}})();
</script>
</body></html>
"""


def _step(s: dict) -> str:
    if s["step"] == "calibration":
        return f"calibration: chose {s['best']} — {s['why']}; evaluated on validation: {', '.join(s['evaluated'])}"
    if "result" in s:
        return f"{s['step']}: {s['result']}"
    return (f"fallback: top {s['float_count']} layer(s) in float ({', '.join(s['float_layers'])}): drop {s['drop']:+.2f}, "
            f"{'meets' if s['meets'] else 'over'} the budget")


def _recipe(candidate: dict) -> str:
    """How a candidate was made: its calibration method, the repairs on top, QAT."""
    parts = [candidate.get("method") or "—", *candidate.get("repairs", [])]
    if candidate["kind"] == "qat":
        parts.append(f"QAT {candidate['qat']['epochs']} epochs")
    return " + ".join(parts)

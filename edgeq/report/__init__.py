"""Reports: a JSON record of every figure and a self-contained HTML page (inline SVG plots, no external assets)."""
from __future__ import annotations

import contextlib
import html
import io
import os
import shutil
from pathlib import Path
from typing import Any

from edgeq import atomic, interrupts
from edgeq.errors import OutputError

VERDICT_COLOURS = {"ship": "#1a7f37", "try-qat": "#9a6700", "stay-fp16": "#cf222e", "baseline": "#57606a"}


class ReportFolder:
    """An output folder whose writers refuse names that would escape it (`../x`, absolute paths, separators).

    `staged`: files are written to a temporary folder beside it and moved into place by `commit()` when the run
    completes; `discard()` (a failure, an interrupt) removes them, and the folder stays as it was, or absent.
    `protect`: input files that must not lie inside the folder (a run with --force would replace them).
    """

    def __init__(self, root: Path, *, force: bool = False, staged: bool = False, protect: tuple[Path | None, ...] = ()) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise OutputError(f"output {self.root} exists and is not a folder", "choose a folder path")
        for given in (p for p in protect if p is not None):
            if _inside(Path(given), self.root):
                raise OutputError(f"output folder {self.root} holds the input {given}",
                                  "choose an output folder that does not contain the inputs; edgeq never overwrites them")
        if self.root.exists() and any(self.root.iterdir()) and not force:
            raise OutputError(f"output folder {self.root} is not empty", "pass --force to overwrite its files, or choose a new folder")
        parent = self.root.resolve().parent
        self._created = [p for p in (parent, *parent.parents) if not p.exists()]  # deepest first, removed by discard()
        if staged:
            self.dir = atomic.temp_beside(self.root, folder=True)
        else:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputError(f"cannot create output folder {self.root}: {exc.strerror}", "choose a writable location") from None
            self.dir = self.root
        self.force = force

    def path(self, name: str) -> Path:
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or any(p in ("..", "") for p in parts):
            raise OutputError(f"refusing to write {name!r} outside the report folder", "use a plain relative file name")
        target = (self.dir / name).resolve()
        if self.dir.resolve() not in target.parents:
            raise OutputError(f"refusing to write {name!r} outside the report folder", "use a plain relative file name")
        target.parent.mkdir(parents=True, exist_ok=True)
        return self.dir / name

    def subfolder(self, name: str) -> Path:
        """A folder inside the report folder (created), for files written by code that takes a folder."""
        return self.path(f"{name}/.keep").parent  # path() checks the name and creates the folder

    def final(self, path: Path | str) -> Path:
        """Where a file written under `path(...)` lies once committed."""
        return self.root / Path(path).relative_to(self.dir)

    def commit(self) -> None:
        """Move the staged files into the folder: each top-level entry replaces the one of the same name (a
        sub-folder as a whole); other files already there stay. Signals wait until the moves are done."""
        if self.dir == self.root:
            return
        with interrupts.deferred():
            if not self.root.exists():
                os.rename(self.dir, self.root)
            else:
                for entry in sorted(self.dir.iterdir()):
                    target = self.root / entry.name
                    if target.is_dir() and not target.is_symlink():
                        aside = self.dir / f".{entry.name}.previous"
                        os.rename(target, aside)
                        os.rename(entry, target)
                        shutil.rmtree(aside)
                    else:
                        os.replace(entry, target)
                shutil.rmtree(self.dir)
            atomic.sync_folder(self.root)
            atomic.sync_folder(self.root.resolve().parent)
        self.dir = self.root

    def discard(self) -> None:
        """Remove the staged files and the parent folders created for them."""
        if self.dir != self.root:
            shutil.rmtree(self.dir, ignore_errors=True)
            for folder in self._created:
                with contextlib.suppress(OSError):
                    folder.rmdir()

    def write_json(self, name: str, obj: Any) -> Path:
        return atomic.write_json(self.path(name), obj)

    def write_text(self, name: str, text: str) -> Path:
        return atomic.write_text(self.path(name), text)


def _inside(path: Path, folder: Path) -> bool:
    """`path` (after links) lies in `folder` or below it."""
    path, folder = path.resolve(), folder.resolve()
    return folder == path or folder in path.parents


def pyplot() -> Any:
    """matplotlib's pyplot, headless, with math text off: names are drawn as written, so a node or model name
    holding `$...$` is neither parsed as TeX (which raised on names it could not parse) nor typeset."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt

    return plt


def tradeoff_svg(models: list[dict]) -> str:
    """Size vs p50 latency, one point per model, labelled with its metric; the SVG is inlined in the page."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for m in models:
        colour = VERDICT_COLOURS.get(m.get("verdict", "baseline"), "#0969da")
        ax1.scatter(m["size_mb"], m["p50_ms"], s=90, color=colour, zorder=3)
        ax1.annotate(f"{m['name']}\n{m['metric_value']:.2f}", (m["size_mb"], m["p50_ms"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax1.set_xlabel("model size (MB)")
    ax1.set_ylabel("p50 latency (ms)")
    ax1.set_title("size vs latency (label: metric)")
    ax1.grid(alpha=0.3)
    names = [m["name"] for m in models]
    values = [m["metric_value"] for m in models]
    errors = [[m["metric_value"] - m["metric_ci95"][0] for m in models], [m["metric_ci95"][1] - m["metric_value"] for m in models]]
    ax2.bar(names, values, yerr=errors, capsize=4, color=[VERDICT_COLOURS.get(m.get("verdict", "baseline"), "#0969da") for m in models])
    low = min(m["metric_ci95"][0] for m in models)
    high = max(m["metric_ci95"][1] for m in models)
    pad = max((high - low) * 0.3, 0.5)
    ax2.set_ylim(low - pad, high + pad)
    ax2.set_title(f"{models[0]['metric']} with 95% interval")
    plt.setp(ax2.get_xticklabels(), rotation=25, ha="right", fontsize=8)  # long model names must not overlap
    ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})  # no timestamp: the same figures give the same page
    plt.close(fig)
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]


def render_html(report: dict) -> str:
    """One self-contained page: the verdict and its reasons first, then the table, the plot and the details."""
    esc = html.escape
    models = report["models"]
    head = report["headline"]
    rows = "".join(
        "<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in (
            m["name"], f"{m['size_mb']:.2f}", f"{m['size_ratio']:.2f}×", f"{m['p50_ms']:.2f}", f"{m['speedup']:.2f}×",
            f"{m['metric_value']:.2f} [{m['metric_ci95'][0]:.2f}, {m['metric_ci95'][1]:.2f}]",
            "—" if m.get("drop") is None else f"{m['drop']:+.2f} [{m['drop_ci95'][0]:+.2f}, {m['drop_ci95'][1]:+.2f}]",
        )) + f"<td style='color:{VERDICT_COLOURS.get(m.get('verdict', 'baseline'))};font-weight:600'>{esc(m.get('verdict', 'baseline'))}</td></tr>"
        for m in models)
    reasons = "".join(f"<li>{esc(r)}</li>" for r in head["reasons"])
    details = "".join(
        f"<h3>{esc(m['name'])}</h3><ul>" + "".join(f"<li>{esc(line)}</li>" for line in m.get("details", [])) + "</ul>" for m in models if m.get("details"))
    env = "".join(f"<li>{esc(k)}: {esc(str(v))}</li>" for k, v in report.get("environment", {}).items())
    detection = _detection_html(report.get("detection") or [], esc)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(report['title'])}</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#1f2328;padding:0 1em}}
table{{border-collapse:collapse;width:100%}}td,th{{border-bottom:1px solid #d0d7de;padding:6px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}.verdict{{font-size:1.4em;padding:.6em 1em;border-radius:6px;color:#fff;background:{VERDICT_COLOURS.get(head['verdict'], '#0969da')}}}
figure{{margin:1.5em 0}}
</style></head><body>
<h1>{esc(report['title'])}</h1>
<p class="verdict" id="verdict">Verdict: <b>{esc(head['verdict'])}</b> — {esc(head['model'])}</p>
<ul id="reasons">{reasons}</ul>
<h2>Models</h2>
<table id="models"><tr><th>model</th><th>size MB</th><th>size ratio</th><th>p50 ms</th><th>speed-up</th><th>{esc(models[0]['metric'])} [95% CI]</th><th>drop [paired 95% CI]</th><th>verdict</th></tr>{rows}</table>
<figure id="tradeoff">{report['plot_svg']}</figure>
<h2>Details</h2>{details}
{detection}<h2>Environment</h2><ul>{env}</ul>
</body></html>
"""


def _detection_html(rows: list[dict], esc) -> str:
    """The demo's detectors (edgeq.demo.detection): judged on boxes after NMS, one row each."""
    if not rows:
        return ""
    cells = "".join(
        "<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in (
            r["model"], r["images"], f"{r['size_ratio']:.2f}×", f"{r['p50_ms']['fp32']:.1f} → {r['p50_ms']['int8']:.1f} ({r['speedup']:.2f}×)",
            f"{r['box_f1']:.3f} [{r['box_f1_ci95'][0]:.3f}, {r['box_f1_ci95'][1]:.3f}]",
            f"{r['metric']} {r['fp32_value']:.3f} → {r['int8_value']:.3f}"))
        + f"<td style='color:{VERDICT_COLOURS.get(r['verdict'])};font-weight:600'>{esc(r['verdict'])}</td></tr>" for r in rows)
    reasons = "".join(f"<li>{esc(r['model'])}: {esc(reason)}</li>" for r in rows for reason in r["reasons"])
    return ("<h2>Detectors: default static INT8, judged on boxes after NMS</h2><table id='detection'><tr><th>detector</th>"
            "<th>images</th><th>size ratio</th><th>p50 ms FP32 → INT8</th><th>box F1 vs FP32 [95% CI]</th><th>task metric</th>"
            f"<th>verdict</th></tr>{cells}</table><ul>{reasons}</ul>")

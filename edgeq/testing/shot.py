"""Open a report in headless Chromium: its DOM after scripts ran, console errors, and a PNG screenshot.

`python -m edgeq.testing.shot -o docs/auto-report.png` builds the planted-outlier digits CNN (needs torch), runs
`auto` on it and photographs the report (what `make report-shot` does for the README).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--enable-logging=stderr", "--v=0"]
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium(install: bool = False) -> str | None:
    """The Chromium binary; with `install`, `apt-get install -y chromium` first when it is missing and we are root."""
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    if install and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        proc = subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
            subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, env=env, timeout=900)
        return shutil.which("chromium")
    return None


@dataclass
class PageRun:
    dom: str
    console_errors: list[str]
    log: str


def _run(browser: str, page: Path, extra: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        args = [browser, *FLAGS, f"--user-data-dir={profile}", *extra, Path(page).resolve().as_uri()]
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def open_page(browser: str, page: Path) -> PageRun:
    """The DOM after load (`--dump-dom`) and the console messages Chromium logged at error level or as exceptions."""
    proc = _run(browser, page, ["--dump-dom", "--virtual-time-budget=3000"])
    log = proc.stderr
    errors = [line for line in log.splitlines() if "CONSOLE" in line and re.search(r":ERROR:|Uncaught|Error", line)]
    return PageRun(proc.stdout, errors, log)


def screenshot(browser: str, page: Path, png: Path, width: int = 1200, height: int = 2000) -> Path:
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    proc = _run(browser, page, [f"--screenshot={png}", f"--window-size={width},{height}", "--hide-scrollbars",
                                "--virtual-time-budget=3000"])
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot: {proc.stderr[-500:]}")
    return png


def main(argv: list[str] | None = None) -> int:
    import argparse

    from edgeq.testing.planted import TRAIN_EPOCHS, cached_planted_model

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-o", "--output", default="docs/auto-report.png")
    parser.add_argument("--workdir", default="report-shot-out")
    parser.add_argument("--epochs", type=int, default=TRAIN_EPOCHS, help="training epochs of the planted CNN")
    args = parser.parse_args(argv)
    browser = find_chromium(install=True)
    if browser is None:
        print("report-shot: chromium is not installed and cannot be installed here (apt-get install chromium as root)")
        return 2
    from edgeq.auto import auto

    work = Path(args.workdir)
    planted = cached_planted_model(epochs=args.epochs)   # trained once per machine: the target is idempotent
    folder = planted.planted.parent
    auto(planted.planted, folder / "calib.npz", folder / "val.npz", 1.0, work / "auto", force=True)
    page = work / "auto" / "report.html"
    run = open_page(browser, page)
    if run.console_errors:
        print("report-shot: console errors:\n" + "\n".join(run.console_errors))
        return 1
    print(f"report-shot: {screenshot(browser, page, Path(args.output), height=2600)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

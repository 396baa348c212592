"""Progress bars (issue 19.8): drawn on stderr on a terminal for every long step, nested steps in one display;
nothing under --quiet, when stderr is not a terminal, or in worker processes; stdout byte for byte the same."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from rich.console import Console

import edgeq
from edgeq import progress
from edgeq.data import Dataset
from edgeq.executors import InProcess
from tests.conftest import make_conv_model

REPO = Path(__file__).resolve().parents[1]
TERMINAL = {"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1"}  # rich's switches: stderr is an interactive terminal


@pytest.fixture
def terminal():
    """Bars drawn on a forced terminal that writes into a buffer; the defaults restored afterwards."""
    buffer = io.StringIO()
    progress.configure(console=Console(file=buffer, force_terminal=True, force_interactive=True, width=120))
    yield buffer
    progress.reset()


@pytest.fixture
def conv(tmp_path):
    onnx.save(make_conv_model(), tmp_path / "m.onnx")
    x = np.random.default_rng(0).normal(0, 1, (96, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "val.npz", x=x, labels=np.random.default_rng(1).integers(0, 10, 96))
    return tmp_path


def _cli(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEQ_", "TTY_", "FORCE_COLOR"))}
    full.update(PYTHONPATH=str(REPO), COLUMNS="120", **(env or {}))
    return subprocess.run([sys.executable, "-m", "edgeq.cli", *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=120)


def test_a_step_draws_a_bar_with_its_count(terminal):
    assert list(progress.track(range(3), "calibrating", total=3)) == [0, 1, 2]
    drawn = terminal.getvalue()
    assert "calibrating" in drawn and "0/3" in drawn
    assert progress._display.progress is None, "the display is stopped when the last step ends"


def test_nested_steps_share_one_display(terminal):
    with progress.step("auto") as phase:
        phase.describe("auto: calibrating with each method")
        for _ in progress.track(range(2), "calibrating", total=lambda: 2):
            assert progress._display.steps == 2
    drawn = terminal.getvalue()
    assert "auto: calibrating with each method" in drawn and "calibrating" in drawn
    assert progress._display.steps == 0 and progress._display.progress is None


def test_quiet_and_a_console_that_is_no_terminal_draw_nothing(terminal):
    progress.configure(quiet=True)
    assert list(progress.track(range(2), "calibrating", total=2)) == [0, 1]
    assert terminal.getvalue() == ""
    plain = io.StringIO()
    progress.configure(quiet=False, console=Console(file=plain))
    with progress.step("validating", total=lambda: pytest.fail("counted although nothing is drawn")) as line:
        line.advance()
    assert plain.getvalue() == ""


def test_calibration_validation_and_sensitivity_draw_their_bars(terminal, conv):
    calib = Dataset.from_npz(conv / "val.npz")
    edgeq.quantize(conv / "m.onnx", edgeq.Int8Static(method="minmax", coverage="all"), calib=calib)
    assert "calibrating" in terminal.getvalue()
    edgeq.validate(conv / "m.onnx", calib, batch_size=32)
    assert "validating" in terminal.getvalue() and "0/3" in terminal.getvalue()
    edgeq.analyze(conv / "m.onnx", calib, samples=32)
    assert "sensitivity" in terminal.getvalue()


@pytest.mark.slow
def test_auto_draws_its_phases_and_the_steps_inside_them(terminal, conv):
    from edgeq.auto import auto

    calib = Dataset.from_npz(conv / "val.npz")
    auto(conv / "m.onnx", calib, calib, budget=100.0, output=conv / "out", executor=InProcess(), methods=("minmax",),
         bench_runs=4, bench_batch=1, refine=False)
    drawn = terminal.getvalue()
    for line in ("auto: calibrating with each method", "auto: measuring latency", "validating fp32", "calibrating",
                 "sensitivity", "benchmarking"):
        assert line in drawn, line


def test_cli_draws_on_a_terminal_stderr_only_and_never_under_quiet_or_a_pipe(conv):
    args = ("validate", "m.onnx", "--data", "val.npz", "--batch-size", "32", "-o")
    drawn = _cli(conv, *args, "a.json", env=TERMINAL)
    quiet = _cli(conv, "--quiet", *args, "b.json", env=TERMINAL)
    piped = _cli(conv, *args, "c.json")
    assert drawn.returncode == quiet.returncode == piped.returncode == 0, drawn.stderr + quiet.stderr + piped.stderr
    assert "validating" in drawn.stderr and "3/3" not in drawn.stdout and "validating" not in drawn.stdout
    assert quiet.stderr == "" and piped.stderr == ""
    assert drawn.stdout.replace("a.json", "b.json") == quiet.stdout.replace("a.json", "b.json")
    assert "top1" in piped.stdout


def _draws_here() -> bool:
    return progress._console() is not None


def test_worker_processes_never_draw_even_on_a_terminal(monkeypatch):
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    for name, value in TERMINAL.items():
        monkeypatch.setenv(name, value)
    assert _draws_here(), "this process, on a forced terminal, draws"
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert pool.submit(_draws_here).result(timeout=60) is False


def test_on_a_real_terminal_lines_printed_during_a_step_go_above_the_bar():
    """stdout and stderr on one pty (a user at a terminal): a line printed mid-step must not be drawn over."""
    import pty
    import select

    code = ("from edgeq import progress\nwith progress.step('auto', total=2) as s:\n"
            "    print('best calibration: mse')\n    s.advance()\nprint('done')")
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TTY_", "FORCE_COLOR"))} | {"PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=slave, stderr=slave, env=env)
    os.close(slave)
    seen = b""
    while select.select([master], [], [], 60)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.wait(timeout=60) == 0
    text = seen.decode(errors="replace")
    assert "best calibration: mse\r\nauto" in text, "the line is printed, then the bar is drawn again below it"
    assert text.rstrip().endswith("done")

"""Ctrl-C and SIGTERM (issue 18 item 1, issue 12 item 12): sent to the process group mid-calibration and mid-`auto`,
they give exit 130/143, one line on stderr, no temporary files, and the previous outputs byte for byte.

The tests wait for evidence that the run is really at that point (the calibration file held open by the streaming
reader; a staged candidate model of `auto`), not for a guessed time.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.conftest import make_conv_model

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="watches the run through /proc")


def tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def start(cwd: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEQ_")}
    env.update(PYTHONPATH=str(REPO), COLUMNS="200")
    return subprocess.Popen([sys.executable, "-m", "edgeq.cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_until(proc: subprocess.Popen, ready, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while not ready():
        assert proc.poll() is None, f"the run ended before the point to interrupt: {proc.communicate()}"
        assert time.monotonic() < deadline, "the run never reached the point to interrupt"
        time.sleep(0.01)


def holds_open(pid: int, path: Path) -> bool:
    try:
        return any(os.readlink(fd) == str(path.resolve()) for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:  # a descriptor closed while we looked
        return False


def interrupted(proc: subprocess.Popen, signum: int) -> tuple[int, str]:
    os.killpg(proc.pid, signum)
    _, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr


def assert_one_interrupt_line(code: int, stderr: str, signum: int) -> None:
    assert code == 128 + signum, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeq: interrupted by"), stderr
    assert "Traceback" not in stderr


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    onnx.save(make_conv_model(), tmp_path / "m.onnx")
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(20000, 1, 8, 8)).astype(np.float32))
    np.savez(tmp_path / "val.npz", x=rng.normal(size=(300, 1, 8, 8)).astype(np.float32), labels=rng.integers(0, 10, 300))
    return tmp_path


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_calibration_keeps_the_previous_model(workdir: Path, signum: int):
    (workdir / "q.onnx").write_bytes(b"previous complete output")
    before = tree(workdir)
    proc = start(workdir, "quantize", "m.onnx", "-o", "q.onnx", "--calib", "calib.npz", "--method", "entropy", "--force")
    wait_until(proc, lambda: holds_open(proc.pid, workdir / "calib.npz"))
    code, stderr = interrupted(proc, signum)
    assert_one_interrupt_line(code, stderr, signum)
    assert tree(workdir) == before


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_auto_keeps_the_previous_folder_and_stops_the_workers(workdir: Path, signum: int):
    (workdir / "out").mkdir()
    (workdir / "out" / "report.json").write_text('{"previous": true}\n')
    before = tree(workdir)
    proc = start(workdir, "auto", "m.onnx", "--calib", "calib.npz", "--val", "val.npz", "-o", "out", "--force", "--workers", "2")

    def evaluating() -> bool:
        return any(workdir.glob(".out.edgeq-*.tmp/candidates/*.onnx"))

    wait_until(proc, evaluating)
    code, stderr = interrupted(proc, signum)
    assert_one_interrupt_line(code, stderr, signum)
    assert tree(workdir) == before
    listed = subprocess.run(["ps", "-o", "pid=,stat=,args=", "-g", str(proc.pid)], capture_output=True, text=True).stdout
    running = [line for line in listed.splitlines() if not line.split()[1].startswith("Z")]   # zombies have exited
    assert not running, f"worker processes still run: {running}"


def test_auto_failing_on_bad_validation_data_leaves_no_output_folder(workdir: Path):
    np.savez(workdir / "bad_val.npz", x=np.zeros((30, 1, 9, 9), np.float32), labels=np.zeros(30, np.int64))
    before = tree(workdir)
    proc = start(workdir, "auto", "m.onnx", "--calib", "calib.npz", "--val", "bad_val.npz", "-o", "new/out", "--workers", "1")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "bad_val.npz" in stderr, stderr
    assert tree(workdir) == before


def test_ctrl_c_while_the_command_starts_is_one_line(workdir: Path):
    """Sent once numpy's core is mapped, i.e. while edgeq's imports load (or, on a fast machine, just after)."""
    proc = start(workdir, "quantize", "m.onnx", "-o", "q.onnx", "--mode", "dynamic")

    def importing() -> bool:
        try:
            return "_multiarray_umath" in Path(f"/proc/{proc.pid}/maps").read_text()
        except OSError:
            return False

    wait_until(proc, importing)
    code, stderr = interrupted(proc, signal.SIGINT)
    assert_one_interrupt_line(code, stderr, signal.SIGINT)
    assert not (workdir / "q.onnx").exists()


def test_main_called_from_python_gives_back_the_callers_handlers(capsys):
    import edgeq.cli

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    edgeq.cli.main(["--help"])
    assert {s: signal.getsignal(s) for s in before} == before
    assert "quantize" in capsys.readouterr().out

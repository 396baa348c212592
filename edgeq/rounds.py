"""Interleaved timing: every model runs in its own worker process, and the workers take turns, round after round.

Load on a shared machine drifts (another job starts, the CPU clocks down); timing the models one after the other
lets that drift land on one model and not the other, so a speed-up moved from 1.19× to 1.92× between two runs. In
rounds, each model runs a short burst in turn (the order rotates every round), so every model sees the same load;
the speed-up is the median of the per-round ratios, and their spread says whether the measurement can decide.

The protocol: the parent starts one worker per model; each loads its model, warms up and says it is ready; then for
each round the parent asks each worker in turn for a burst of timed runs and waits for the times; at the end each
worker reports its record (memory, size, every time). Only one worker runs at a time, so they never compete.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from edgeq import errors
from edgeq.errors import ModelError, UserError
from edgeq.timing import Speedup

# A protocol line starts with this, so anything a library prints on stdout cannot be mistaken for an answer.
MARK = "edgeq-bench:"
# Warnings: a speed-up whose middle half of per-round ratios spans more than this share of its median cannot be
# told apart from its neighbours; a p90 this many times the p50 means the runs were disturbed.
SPREAD_WARN = 0.15
TAIL_WARN = 2.0


def round_sizes(runs: int, rounds: int) -> list[int]:
    """Timed runs per round: `runs` split as evenly as possible over at most `rounds` rounds.

    >>> round_sizes(50, 10), round_sizes(7, 10), round_sizes(11, 4)
    ([5, 5, 5, 5, 5, 5, 5, 5, 5, 5], [1, 1, 1, 1, 1, 1, 1], [3, 3, 3, 2])
    """
    count = min(runs, rounds)
    return [len(part) for part in np.array_split(np.arange(runs), count)]


def run_interleaved(paths: Sequence[Path], config, worker_code: str, env: dict[str, str]) -> list:
    """Start a worker per model, time them in rotating rounds, and return their records (first model first)."""
    from edgeq.progress import track

    with tempfile.TemporaryDirectory(prefix="edgeq-bench-") as tmp:
        workers: list[_Worker] = []
        try:
            for i, path in enumerate(track(paths, "benchmark: loading models", total=len(paths))):
                workers.append(_Worker(path, config, worker_code, env, Path(tmp) / f"stderr-{i}.txt"))
                workers[-1].expect("ready")  # one at a time: loading models in parallel would compete for the cores
            sizes = round_sizes(config.runs, config.rounds)
            for r, size in enumerate(track(sizes, "benchmarking", total=len(sizes))):
                for k in range(len(workers)):
                    worker = workers[(r + k) % len(workers)]
                    worker.send({"run": size})
                    worker.round_ms.append(float(np.median(worker.expect("times"))))
            records = []
            for worker in workers:
                worker.send({"run": 0})
                records.append(worker.finish())
            return records
        finally:
            for worker in workers:
                worker.close()


class _Worker:
    """The parent's handle on one worker process: send a command, read the next protocol answer."""

    def __init__(self, path: Path, config, worker_code: str, env: dict[str, str], stderr_file: Path) -> None:
        self.path = path
        self.round_ms: list[float] = []
        self._stderr_file = stderr_file
        self._stderr: IO[str] = stderr_file.open("w")
        request = json.dumps({"path": str(path), "config": config.to_dict()})
        self.proc = subprocess.Popen([sys.executable, "-c", worker_code, request], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True, errors="replace")

    def send(self, command: dict[str, Any]) -> None:
        try:
            self.proc.stdin.write(json.dumps(command) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._raise_death()

    def expect(self, key: str) -> Any:
        for line in self.proc.stdout:
            if not line.startswith(MARK):
                continue
            answer = json.loads(line[len(MARK):])
            if "error" in answer:
                err = answer["error"]
                cls = getattr(errors, err["type"], UserError)
                cls = cls if isinstance(cls, type) and issubclass(cls, UserError) else UserError
                raise cls(err["what"], err["fix"])
            if "bug" in answer:
                raise RuntimeError(f"benchmark worker failed on {self.path}: {answer['bug']}")
            return answer[key]
        self._raise_death()

    def finish(self):
        from edgeq.bench import BenchRecord

        record = BenchRecord.from_dict(self.expect("record"))
        record.round_p50_ms = list(self.round_ms)
        return record

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass  # a dead worker's pipe
        self._stderr.close()

    def _raise_death(self) -> None:
        code = self.proc.wait()
        self._stderr.flush()
        text = self._stderr_file.read_text(errors="replace")
        last = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "no message")
        if code < 0:
            # Killed by a signal: most often the kernel's out-of-memory killer or a crash inside ONNX Runtime.
            raise ModelError(f"the process measuring {self.path} was killed by signal {-code} ({last[:200]})",
                             "if memory ran out, close other programs or use a smaller --batch; otherwise check the model in ONNX Runtime")
        raise RuntimeError(f"benchmark worker for {self.path} exited with code {code}: {last[:300]}")


# ----- the worker side ----------------------------------------------------------------------------------------

def _say(answer: dict[str, Any]) -> None:
    sys.stdout.write(MARK + json.dumps(answer) + "\n")
    sys.stdout.flush()


def worker_main(argv: list[str]) -> int:
    """Entry point of a worker process: load and warm up, answer bursts of timed runs, then report the record."""
    from edgeq.bench import BenchConfig, finish, start

    request = json.loads(argv[0])
    try:
        running = start(Path(request["path"]), BenchConfig.from_dict(request["config"]))
        _say({"ready": True})
        for line in sys.stdin:
            count = int(json.loads(line)["run"])
            if count == 0:
                break
            running.rewarm()  # the other models ran in between: one untimed run brings caches back
            _say({"times": running.time(count).tolist()})
        _say({"record": finish(running).to_dict()})
    except UserError as exc:
        _say({"error": {"type": type(exc).__name__, "what": exc.what, "fix": exc.fix}})
    except Exception as exc:  # noqa: BLE001 - reported to the parent as a bug, with the traceback on stderr
        traceback.print_exc()
        _say({"bug": f"{type(exc).__name__}: {exc}"})
    return 0


# ----- what the rounds say ------------------------------------------------------------------------------------

def speedups(records: Sequence) -> list[Speedup]:
    """Each model's speed-up over the first one, paired by round (the same load); p50 ratio without rounds."""
    if not records:
        return []
    base = records[0]
    found = []
    for r in records:
        if base.round_p50_ms and len(r.round_p50_ms) == len(base.round_p50_ms):
            found.append(Speedup.of(base.round_p50_ms, r.round_p50_ms))
        else:
            ratio = base.latency_ms.p50 / r.latency_ms.p50
            found.append(Speedup(ratio, ratio, ratio))
    return found


def timing_warnings(records: Sequence) -> list[str]:
    """What makes the figures unfit to decide on: disturbed runs (long tails) and speed-ups that wander by round."""
    found = []
    for r in records:
        tail = r.latency_ms.p90 / r.latency_ms.p50
        if tail > TAIL_WARN:
            found.append(f"{r.name}: p90 is {tail:.1f}× p50 — runs were disturbed (background load, CPU throttling); "
                         "rerun on an idle machine before trusting these figures")
    for r in records[1:]:
        if r.batch != records[0].batch:
            found.append(f"{r.name}: runs batch {r.batch}, the baseline batch {records[0].batch} — compare samples/s, "
                         "not latency or speed-up")
    for r, s in list(zip(records, speedups(records)))[1:]:
        if len(r.round_p50_ms) < 4:
            continue  # too few rounds for a spread
        if s.relative_spread > SPREAD_WARN:
            found.append(f"{r.name}: speed-up {s.median:.2f}× varied {s.low:.2f}–{s.high:.2f}× across rounds (middle half) — "
                         "too noisy to decide; rerun on an idle machine or with more --runs")
        elif s.low < 1.0 < s.high:
            found.append(f"{r.name}: speed-up {s.median:.2f}× is within noise of 1× ({s.low:.2f}–{s.high:.2f}× across rounds) — "
                         "it is neither measurably faster nor slower than the baseline")
    return found

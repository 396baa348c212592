"""The auto report opens in headless Chromium without console errors and renders its chart."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import edgeq
from edgeq.auto import auto
from edgeq.executors import InProcess
from edgeq.model import make_session
from edgeq.testing.shot import find_chromium, open_page, screenshot
from tests.conftest import make_conv_model


@pytest.fixture(scope="module")
def browser():
    path = find_chromium(install=True)
    if path is None:
        pytest.skip("chromium is not installed and cannot be installed here (needs root and apt-get: apt-get install chromium)")
    return path


def test_auto_report_renders_in_chromium(browser, tmp_path):
    proto = make_conv_model()
    path = tmp_path / "tiny.onnx"
    onnx.save(proto, path)
    x = np.random.default_rng(5).normal(0, 1, (160, 1, 8, 8)).astype(np.float32)
    labels = make_session(proto).run(None, {"x": x[80:]})[0].argmax(1)
    report = auto(path, edgeq.Dataset.from_arrays({"x": x[:80]}), edgeq.Dataset.from_arrays({"x": x[80:]}, labels=labels),
                  1.0, tmp_path / "out", executor=InProcess(), bench_runs=5, bench_batch=8)
    page = tmp_path / "out" / "report.html"
    run = open_page(browser, page)
    assert run.console_errors == []
    assert 'data-chart="rendered"' in run.dom
    assert 'id="verdict"' in run.dom and f"Evaluations: <b>{report['evaluations']}</b>" in run.dom
    png = screenshot(browser, page, tmp_path / "shot.png", width=1000, height=1400)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_a_broken_page_is_caught(browser, tmp_path):
    page = tmp_path / "bad.html"
    page.write_text("<html><body><script>notDefined();</script></body></html>")
    assert any("notDefined" in line for line in open_page(browser, page).console_errors)

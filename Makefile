# Two commands for a newcomer: `make demo` and `make test`. Each creates/refreshes .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A local wheel folder (where the CPU torch wheel lies on these machines) is used when present.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PIP := $(PY) -m pip install --disable-pip-version-check -q $(FIND_LINKS) -c constraints.txt

.PHONY: demo test venv clean

$(VENV)/.stamp: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e '.[torch,test]'
	touch $@

venv: $(VENV)/.stamp

demo: venv
	$(VENV)/bin/edgeq demo -o demo-out --force

test: venv
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo-out

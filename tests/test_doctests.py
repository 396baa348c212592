"""The examples in docstrings run (`make test` runs this file): every module under edgeq/ but the torch-only QAT
package (whose examples need a trained network and are marked +SKIP). An example that needs files or a model it
cannot build is marked `# doctest: +SKIP` where it stands."""
from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import edgeq

TORCH_ONLY = ("edgeq.qat",)   # imports torch at module level
ROOT = Path(edgeq.__file__).parent


def _modules() -> list[str]:
    names = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if not name.startswith(TORCH_ONLY):
            names.append(name)
    return names


def test_docstring_examples_run():
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    finder = doctest.DocTestFinder(exclude_empty=True)
    for name in _modules():
        module = importlib.import_module(name)
        for test in finder.find(module, name, globs={"edgeq": edgeq, **vars(module)}):
            runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
    assert runner.tries >= 50, f"only {runner.tries} examples ran: the scan lost the modules"


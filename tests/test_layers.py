"""The import rule of docs/ARCHITECTURE.md: no module under edgeq/ imports a layer above its own, at module level or
inside a function; fixtures (edgeq.testing) are imported by no product module."""
from __future__ import annotations

import ast
from pathlib import Path

import edgeq

# Bottom to top. A module belongs to the longest prefix listed; every module must belong to one.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("data and runtimes", ("edgeq.errors", "edgeq.atomic", "edgeq.interrupts", "edgeq.progress", "edgeq.memory",
                           "edgeq.formats", "edgeq.model", "edgeq.runtimes", "edgeq.graph", "edgeq.npz", "edgeq.data", "edgeq.limits",
                           "edgeq.timing", "edgeq.sqnr", "edgeq.torch_in", "edgeq.executors")),
    ("calibration and passes", ("edgeq.calibrate", "edgeq.quantize.repair")),
    ("quantize and export", ("edgeq.quantize", "edgeq.qat", "edgeq.export")),
    ("evaluate and bench", ("edgeq.evaluate", "edgeq.decide", "edgeq.bench", "edgeq.bench_table", "edgeq.rounds",
                            "edgeq.qat.run")),
    ("report", ("edgeq.report",)),
    ("analyze and auto", ("edgeq.analyze", "edgeq.auto")),
    ("cli", ("edgeq", "edgeq.cli", "edgeq.cli_options", "edgeq.cli_export", "edgeq.render", "edgeq.demo")),
]
OUTSIDE = ("edgeq.testing",)   # may import any layer; no layer may import it
ROOT = Path(edgeq.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _owner(module: str, table: dict[str, int]) -> int | None:
    """The layer index of the longest listed prefix of `module` (None when none is listed); "edgeq" itself, the
    package's API, is nobody's prefix."""
    parts = module.split(".")
    for end in range(len(parts), 1, -1):
        if ".".join(parts[:end]) in table:
            return table[".".join(parts[:end])]
    return table.get(module)


def _imports(path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, module) for every edgeq import anywhere in the file: `from edgeq.x import y` names edgeq.x.y when
    that is a module, else edgeq.x (so `from edgeq import Dataset` is an import of the top-level API)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "edgeq"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "edgeq":
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            found += [(node.lineno, f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module)
                      for a in node.names]
    return sorted(set(found))


def _layer_table() -> dict[str, int]:
    table = {prefix: index for index, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes}
    table.update({prefix: len(LAYERS) for prefix in OUTSIDE})
    return table


def test_every_module_has_a_layer():
    table = _layer_table()
    missing = [m for m in _modules() if _owner(m, table) is None]
    assert not missing, f"add these modules to a layer in tests/test_layers.py and docs/ARCHITECTURE.md: {missing}"


def test_no_module_imports_a_layer_above_it():
    table, modules = _layer_table(), _modules()
    names = [name for name, _ in LAYERS] + ["testing (outside)"]
    upward = []
    for module, path in modules.items():
        own = _owner(module, table)
        for line, target in _imports(path, set(modules)):
            theirs = _owner(target, table)
            if own < len(LAYERS) and theirs is not None and theirs > own:
                upward.append(f"{path.relative_to(ROOT.parent)}:{line} ({names[own]}) imports {target} ({names[theirs]})")
    assert not upward, "imports of a layer above:\n" + "\n".join(upward)


def test_the_scan_sees_function_level_imports(tmp_path):
    """A deferred import counts like a module-level one (the rule is about dependencies, not start-up time)."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from edgeq.auto import auto\n    import edgeq.report\n    from edgeq import data, Model\n",
                      encoding="utf-8")
    assert _imports(source, {"edgeq.data"}) == [(2, "edgeq.auto"), (3, "edgeq.report"), (4, "edgeq"), (4, "edgeq.data")]
    table = _layer_table()
    assert _owner("edgeq.quantize.int8", table) < _owner("edgeq.auto", table)
    assert _owner("edgeq.quantize.repair.smoothquant", table) < _owner("edgeq.quantize.qdq", table)
    assert _owner("edgeq.unlisted", table) is None and _owner("edgeq", table) == len(LAYERS) - 1


# The runtime seam: ONNX Runtime sessions are opened in its implementation only (edgeq.model builds them,
# edgeq/runtimes wraps them); everything else asks a Runtime or ONNX_RUNTIME for one.
SESSION_HOMES = {ROOT / "model.py"} | set((ROOT / "runtimes").rglob("*.py"))


def test_sessions_are_opened_only_behind_the_runtime_seam():
    bypasses = [f"{path.relative_to(ROOT.parent)}:{number}"
                for path in sorted(ROOT.rglob("*.py")) if path not in SESSION_HOMES
                for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if "InferenceSession(" in line]
    assert not bypasses, f"ONNX Runtime sessions opened outside the runtime seam: {bypasses}"
    assert any("InferenceSession(" in path.read_text(encoding="utf-8") for path in SESSION_HOMES)  # the scan sees the home

"""Operator support per target: which nodes run in int8, which fall back to float, which the target cannot run.

Targets are JSON profiles in `edgeq/analyze/profiles/` (`onnxruntime-cpu`, `tflite-int8`, `npu-int8`); `--target`
also takes the path of a profile file of the same shape, so a new target is a data file, not code.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from edgeq.errors import ConfigError

PROFILE_DIR = Path(__file__).parent / "profiles"
ALIASES = {"ort": "onnxruntime-cpu", "onnxruntime": "onnxruntime-cpu", "cpu": "onnxruntime-cpu", "tflite": "tflite-int8",
           "litert": "tflite-int8", "npu": "npu-int8"}


def profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(target: str | Path) -> dict:
    """A built-in profile by name (or alias), or a JSON file of the same shape."""
    name = ALIASES.get(str(target), str(target))
    path = PROFILE_DIR / f"{name}.json"
    if not path.is_file():
        path = Path(target)
        if path.suffix != ".json" or not path.is_file():
            raise ConfigError(f"unknown target {target!r}", f"use one of: {', '.join(profiles())}, or the path of a profile .json file")
    try:
        profile = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read target profile {path}: {exc}", "give a JSON file shaped like edgeq/analyze/profiles/onnxruntime-cpu.json") from None
    missing = {"name", "int8", "default"} - set(profile)
    if missing or profile["default"] not in ("float", "unsupported"):
        raise ConfigError(f"target profile {path} lacks {', '.join(sorted(missing)) or 'a valid default'}",
                          "give name, int8 (op → kernel), default (float|unsupported)")
    return profile


@dataclass
class NodeSupport:
    node: str
    op_type: str
    status: str        # int8 | float | unsupported
    reason: str


@dataclass
class SupportReport:
    target: str
    description: str
    counts: dict[str, int]
    nodes: list[NodeSupport] = field(default_factory=list)
    unsupported_ops: list[str] = field(default_factory=list)
    float_ops: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def operator_support(proto: onnx.ModelProto, target: str | Path = "onnxruntime-cpu") -> SupportReport:
    """Classify every node of the (prepared) graph for `target`.

    >>> rep = operator_support(model.proto, "tflite")                 # doctest: +SKIP
    >>> rep.counts                                                    # doctest: +SKIP
    {'int8': 21, 'float': 0, 'unsupported': 1}
    """
    profile = load_profile(target)
    int8_ops, passthrough = profile["int8"], set(profile.get("passthrough", []))
    float_ops, weighted = profile.get("float", {}), set(profile.get("weighted", []))
    domains = set(profile.get("domains", ["", "ai.onnx"]))
    constants = {t.name for t in proto.graph.initializer}
    constants |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    int8_tensors: set[str] = set()
    nodes = []
    for node in proto.graph.node:
        if node.op_type == "Constant":
            continue
        name = node.name or f"{node.op_type}:{node.output[0]}"
        op = node.op_type
        if node.domain not in domains:
            status, reason = "unsupported", profile.get("unsupported_domains_reason", "custom-domain op")
        elif op in int8_ops:
            if op in weighted and not (len(node.input) > 1 and node.input[1] in constants):
                status, reason = "float", "weight computed at run time: no int8 kernel for two activations"
            else:
                status, reason = "int8", str(int8_ops[op])
        elif op in passthrough:
            if any(i in int8_tensors for i in node.input[:1]):
                status, reason = "int8", "passes int8 data through (fused or layout-only)"
            else:
                status, reason = "float", "its input is float here, so it stays float"
        elif op in float_ops:
            status, reason = "float", str(float_ops[op])
        else:
            status, reason = profile["default"], profile.get("default_reason", "not in the profile")
        if status == "int8":
            int8_tensors.update(node.output)
        nodes.append(NodeSupport(name, op, status, reason))
    counts = {s: sum(n.status == s for n in nodes) for s in ("int8", "float", "unsupported")}
    return SupportReport(profile["name"], profile.get("description", ""), counts, nodes,
                         sorted({n.op_type for n in nodes if n.status == "unsupported"}),
                         sorted({n.op_type for n in nodes if n.status == "float"}))


def file_support(ops: list[dict], types: dict[int, str]) -> SupportReport:
    """What a compiled file (a `.tflite`) computes each op in: int8 when its outputs are integer, float otherwise.

    >>> file_support([{"op_name": "CONV_2D", "index": 0, "inputs": [0, 1], "outputs": [2]}],
    ...              {0: "int8", 1: "int8", 2: "int8"}).counts
    {'int8': 1, 'float': 0, 'unsupported': 0}
    """
    nodes = []
    for op in ops:
        outputs = [types.get(int(i), "float32") for i in op["outputs"] if int(i) >= 0]
        integer = bool(outputs) and all(t.startswith(("int", "uint")) for t in outputs)
        kind = "int8" if integer and op["op_name"] not in ("QUANTIZE", "DEQUANTIZE") else "float"
        nodes.append(NodeSupport(f"{op['op_name']}:{op['index']}", str(op["op_name"]), kind, f"outputs {', '.join(outputs) or 'none'}"))
    counts = {s: sum(n.status == s for n in nodes) for s in ("int8", "float", "unsupported")}
    return SupportReport("this file (LiteRT)", "the operators of the .tflite file and the types they compute in", counts, nodes, [],
                         sorted({n.op_type for n in nodes if n.status == "float"}))

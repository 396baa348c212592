"""Static INT8 inside If branches: each branch is calibrated on the values it reads, captured on the calibration
data at the If node (as extra outputs of the enclosing graph) in the runs where that branch is taken, and quantized
as a model of its own with the recipe of the enclosing graph. A branch never taken cannot be calibrated and stays
float; so do Loop and Scan bodies, whose per-iteration inputs are made inside the loop. The summary says which."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import numpy as np
import onnx

from edgeq.calibrate import Feeds, feed_batches, with_outputs
from edgeq.data import Dataset
from edgeq.model import Model, run_session
from edgeq.quantize.config import Int8Static
from edgeq.quantize.subgraphs import Body, bodies, initializer_values, quantize_bodies
from edgeq.quantize.summary import QuantSummary
from edgeq.runtimes import ONNX_RUNTIME


def quantize_static_bodies(prepared: Model, result: Model, config: Int8Static, calib: Dataset,
                           method: str) -> list[tuple[str, QuantSummary | str]]:
    """Quantize the bodies of `prepared`'s main graph into `result` (its QDQ model), with activation ranges by `method`."""
    from edgeq.quantize.int8 import quantize_static

    found = bodies(prepared.proto)
    if not found:
        return []
    captured = _capture(prepared, calib, found, config)
    # repairs that need re-batched samples (bias correction, SmoothQuant) apply to the main graph only
    inner = replace(config, method=method, bias_correction=False, smoothquant=None)

    def quantize(body: Body, standalone: onnx.ModelProto) -> tuple[onnx.ModelProto, QuantSummary] | str:
        if body.node.op_type != "If":
            return (f"a {body.node.op_type} body runs on values made inside the loop, which calibration cannot observe "
                    "from outside: left float")
        feeds = captured.get(_key(body), [])
        if not feeds:
            return "this branch is never taken on the calibration data, so it cannot be calibrated: left float"
        names = [value.name for value in standalone.graph.input]
        data = Feeds(lambda: ({name: feed[name] for name in names} for feed in feeds), description=f"the values {body.label} reads")
        quantized, summary, _ = quantize_static(Model(standalone, None), inner, data)
        # the enclosing graph warns about its own sample count; here each feed is a whole calibration run
        summary.warnings = [w for w in summary.warnings if not w.startswith(f"only {len(feeds)} calibration samples")]
        summary.notes.append(f"calibrated on the {len(feeds)} calibration runs that take this branch")
        return quantized.proto, summary

    return quantize_bodies(prepared.proto, result.proto, quantize)


def _key(body: Body) -> tuple[str, str]:
    return body.node.output[0], body.attribute.name


def _capture(prepared: Model, calib: Dataset, found: list[Body], config: Int8Static) -> dict[tuple[str, str], list[dict]]:
    """For each If branch, the outer-scope values it reads in every calibration run that takes it."""
    branches = [body for body in found if body.node.op_type == "If"]
    wanted = sorted({name for body in branches for name in body.captured} | {body.node.input[0] for body in branches})
    constants = initializer_values(prepared.proto, wanted)
    graph_inputs = {spec.name for spec in prepared.inputs}
    extra = [n for n in wanted if n not in constants and n not in graph_inputs]
    session = ONNX_RUNTIME.open_graph(with_outputs(prepared.proto, extra))
    outputs = list(dict.fromkeys([o.name for o in prepared.proto.graph.output] + extra))
    captured: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for batch in feed_batches(calib, prepared.inputs, config.batch_size, config.max_samples):
        values = dict(zip(outputs, run_session(session, outputs, batch.inputs, "the model",
                                               f"the calibration data ({calib.description})"))) | batch.inputs | constants
        for body in branches:
            taken = bool(np.asarray(values[body.node.input[0]]).reshape(-1)[0])
            if taken == (body.attribute.name == "then_branch"):
                captured[_key(body)].append({name: values[name] for name in body.captured})
    return captured

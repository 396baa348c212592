"""Command line: parses, calls the API, renders with rich. No logic of its own.

Exit codes: 0 done, 2 user error (one line on stderr), 1 a bug (a short line; the traceback with --debug).
"""
from __future__ import annotations

import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from edgeq import interrupts
from edgeq.cli_options import (ActivationType, Algorithm, Coverage, ExecutorChoice, ExecutorOption, Force, Int4Format, Method,
                                Mode, Precision, Preset, MODEL_HELP, InputDtype, InputShape, Rounding, WeightRange, Weights, Workers,
                                auto_model, model_argument, model_arguments, parse_int8_layers, smoothquant_alpha)
from edgeq.errors import UserError
from edgeq.executors import WorkerLost

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Quantize FP32 models for edge targets, benchmark them, validate them, and decide by evidence.")
# Pipes and CI logs get 120 columns, so the tables stay readable outside a terminal.
out = Console(width=None if sys.stdout.isatty() else 120)


@app.callback()
def _global_options(quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars on stderr (drawn only on a terminal anyway).")] = False) -> None:
    from edgeq import progress

    progress.configure(quiet=quiet)


@app.command()
def quantize(
    model: Annotated[Path, typer.Argument(help=MODEL_HELP)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the quantized model.")],
    precision: Annotated[Precision, typer.Option(help="Target precision.")] = Precision.int8,
    mode: Annotated[Mode, typer.Option(help="INT8 mode: static (calibrated, fastest) or dynamic (runtime scales).")] = Mode.static,
    calib: Annotated[Optional[Path], typer.Option(help="Calibration DATA for static INT8.")] = None,
    method: Annotated[Method, typer.Option(help="Calibration method for activation ranges (auto: mse unless another observer's quantized outputs are clearly closer to FP32).")] = Method.auto,
    percentile: Annotated[float, typer.Option(help="Percentile kept by --method percentile.")] = 99.99,
    per_channel: Annotated[bool, typer.Option("--per-channel/--per-tensor", help="Weight scales per output channel or per tensor.")] = True,
    activation_type: Annotated[ActivationType, typer.Option(help="Activation integer type (uint8 is fastest on x86).")] = ActivationType.uint8,
    weight_bits: Annotated[int, typer.Option(help="Static INT8: weight bits, 8 or 4 (W4A8: int4 weights, 8-bit activations, opset 21).")] = 8,
    op_types: Annotated[Optional[str], typer.Option(help="Comma-separated op types to quantize (default: the fast set).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(help="Node names to keep in float (repeatable).")] = None,
    fp16_keep: Annotated[Optional[str], typer.Option(help="FP16: comma-separated op types to keep in FP32 (replaces the default list).")] = None,
    max_samples: Annotated[Optional[int], typer.Option(help="Use at most this many calibration samples.")] = None,
    weight_range: Annotated[WeightRange, typer.Option(help="Static INT8 weight ranges: minmax, or mse (clipping that minimises the error).")] = WeightRange.minmax,
    bias_correction: Annotated[bool, typer.Option("--bias-correction", help="Static INT8: correct each layer's bias for its mean quantization error.")] = False,
    rounding: Annotated[Rounding, typer.Option(help="Weight rounding: nearest, or adaround (learned on the calibration data, per layer; static INT8, and INT4 as --algorithm adaround).")] = Rounding.nearest,
    equalize: Annotated[bool, typer.Option("--equalize", help="Static INT8: cross-layer equalization of consecutive conv/linear layers.")] = False,
    smoothquant: Annotated[Optional[str], typer.Option(help="Static INT8: SmoothQuant for MatMul/Gemm inputs: migration strength alpha (e.g. 0.5), or auto (per layer).")] = None,
    coverage: Annotated[Coverage, typer.Option(help="Static INT8: measured (nodes whose int8 kernel measures slower than float here stay float) or all.")] = Coverage.measured,
    threads: Annotated[int, typer.Option(help="Static INT8: intra-op threads of the target, for --coverage measured.")] = 1,
    block_size: Annotated[int, typer.Option(help="INT4: weights per block along the reduction axis (16, 32, 64, 128).")] = 32,
    algorithm: Annotated[Algorithm, typer.Option(help="INT4: auto (gptq with --calib, rtn without), rtn (round to nearest), gptq, awq or adaround (these need --calib).")] = Algorithm.auto,
    symmetric: Annotated[bool, typer.Option("--symmetric/--asymmetric", help="INT4: symmetric blocks, or a zero point per block.")] = True,
    int8_layers: Annotated[Optional[str], typer.Option(help="INT4: layers kept at INT8: first-last, auto:N (the N most sensitive), or node names, comma-separated.")] = None,
    int4_format: Annotated[Int4Format, typer.Option(help="INT4: nbits (ONNX Runtime MatMulNBits, fastest) or qdq (blocked DequantizeLinear, opset 21).")] = Int4Format.nbits,
    embeddings: Annotated[bool, typer.Option("--embeddings", help="INT4: also quantize Gather embedding tables.")] = False,
    preset: Preset = "raw",
    summary_json: Annotated[Optional[Path], typer.Option(help="Also write what was done as JSON.")] = None,
    weights: Weights = None,
    input_shape: InputShape = None,
    input_dtype: InputDtype = "float32",
    force: Force = False,
) -> None:
    """Quantize MODEL to FP16, INT8 (dynamic or static QDQ) or INT4 (weight-only, block-wise)."""
    import edgeq
    from edgeq import atomic
    from edgeq.model import model_files
    from edgeq.quantize import config as cfg
    from edgeq.render import print_quant_summary

    inputs = (*model_files(model), weights, calib)
    atomic.check_writable(output, force=force, protect=inputs)
    if summary_json:
        atomic.check_writable(summary_json, force=force, protect=(*inputs, output))
    given = model_argument(model, weights, input_shape, input_dtype)
    source = edgeq.load(given) if isinstance(given, Path) else given
    ops = tuple(t.strip() for t in op_types.split(",") if t.strip()) if op_types else None
    if precision is Precision.fp16:
        config = cfg.Fp16(block_ops=tuple(s.strip() for s in fp16_keep.split(",") if s.strip()) if fp16_keep is not None else cfg.FP16_BLOCK_OPS,
                          block_nodes=tuple(exclude or ()))
        data = None
    elif precision is Precision.int4:
        if rounding is Rounding.adaround and algorithm not in (Algorithm.auto, Algorithm.adaround):
            raise UserError(f"--rounding adaround and --algorithm {algorithm.value} name two INT4 algorithms", "give one of them")
        if rounding is Rounding.adaround:
            algorithm = Algorithm.adaround
        config = cfg.Int4WeightOnly(block_size=block_size, symmetric=symmetric, algorithm=algorithm.value, format=int4_format.value,
                                    op_types=ops or ("MatMul", "Gemm"), embeddings=embeddings, exclude_nodes=tuple(exclude or ()),
                                    max_samples=max_samples, **parse_int8_layers(int8_layers))
        if algorithm in (Algorithm.gptq, Algorithm.awq, Algorithm.adaround) and calib is None:
            raise UserError(f"--algorithm {algorithm.value} needs calibration data", "pass --calib DATA (a few hundred sequences), or use --algorithm rtn")
        data = edgeq.open_data(calib, preset) if calib is not None else None
    elif mode is Mode.dynamic:
        config = cfg.Int8Dynamic(per_channel=per_channel, op_types=ops or cfg.DYNAMIC_OP_TYPES, exclude_nodes=tuple(exclude or ()))
        data = None
    else:
        if calib is None:
            raise UserError("static INT8 needs calibration data", "pass --calib DATA, or use --mode dynamic")
        config = cfg.Int8Static(method=method.value, percentile=percentile, per_channel=per_channel,
                                activation_type=activation_type.value, op_types=ops or cfg.STATIC_OP_TYPES,
                                exclude_nodes=tuple(exclude or ()), max_samples=max_samples, weight_range=weight_range.value,
                                bias_correction=bias_correction, equalize=equalize, smoothquant=smoothquant_alpha(smoothquant),
                                coverage=coverage.value, threads=threads, rounding=rounding.value, weight_bits=weight_bits)
        data = edgeq.open_data(calib, preset)
    result = edgeq.quantize(source, config, calib=data)
    result.save(output, force=force)
    print_quant_summary(out, source, result, output)
    if summary_json:
        atomic.write_json(summary_json, result.summary.to_dict())


@app.command()
def bench(
    models: Annotated[list[Path], typer.Argument(help="ONNX or .tflite models to measure (each in its runtime); a PyTorch model as MODULE:FACTORY or .pt2 is exported to ONNX first.")],
    threads: Annotated[int, typer.Option(help="Intra-op threads.")] = 1,
    runs: Annotated[int, typer.Option(help="Timed runs per model.")] = 50,
    warmup: Annotated[int, typer.Option(help="Untimed runs before timing.")] = 5,
    rounds: Annotated[int, typer.Option(help="The runs are split into rounds; the models take turns in each (same load for all).")] = 10,
    data: Annotated[Optional[Path], typer.Option(help="DATA to feed (first batch); random inputs otherwise.")] = None,
    batch: Annotated[int, typer.Option(help="Batch size for dynamic batch dimensions.")] = 1,
    shape: Annotated[Optional[list[str]], typer.Option(help="Input shape for dynamic dims, e.g. x=1,3,736,992 (repeatable).")] = None,
    preset: Preset = "raw",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the records as JSON.")] = None,
    weights: Weights = None,
    input_shape: InputShape = None,
    input_dtype: InputDtype = "float32",
    force: Force = False,
) -> None:
    """Measure size, latency p50/p90/p99, throughput and peak memory (one process per model, timed in rounds)."""
    from edgeq import atomic
    from edgeq.bench import BenchConfig, benchmark, parse_shapes
    from edgeq.bench_table import print_bench

    if json_out:
        atomic.check_writable(json_out, force=force, protect=(*models, data, weights))
    config = BenchConfig(threads=threads, runs=runs, warmup=warmup, rounds=rounds, batch=batch, shapes=parse_shapes(shape or []), data=data, preset=preset)
    given = model_arguments(models, weights, input_shape, input_dtype)
    for model in given:
        _say_notes(model)
    records = benchmark(given, config)
    print_bench(out, records)
    if json_out:
        from edgeq.rounds import speedups, timing_warnings

        atomic.write_json(json_out, {"config": config.to_dict(), "models": [r.to_dict() for r in records],
                                     "speedups": [vars(s) for s in speedups(records)], "warnings": timing_warnings(records)})


@app.command()
def validate(
    model: Annotated[Path, typer.Argument(help="ONNX or .tflite model to evaluate, or a PyTorch model: MODULE:FACTORY (with --weights and --input-shape) or a .pt2 program.")],
    data: Annotated[Path, typer.Option(help="Validation DATA (labels give top-1 or MAE/RMSE).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Results JSON.")],
    reference: Annotated[Optional[Path], typer.Option(help="Reference model for fidelity when the data has no labels.")] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per run.")] = 32,
    outputs: Annotated[Optional[str], typer.Option(help="Comma-separated outputs to score (default: every output).")] = None,
    task: Annotated[str, typer.Option(help="auto (a detector head with --reference: detect), detect, or raw (tensor metrics).")] = "auto",
    decoder: Annotated[Optional[str], typer.Option(help="With --task detect: yolo, yolov5, ssd, picodet or module:function (default: by head shape).")] = None,
    labels: Annotated[Optional[Path], typer.Option(help="With --task detect: ground-truth boxes (.npz boxes/classes/image/images, or COCO .json) for mAP.")] = None,
    score_threshold: Annotated[Optional[float], typer.Option(help="With --task detect: boxes scoring below this are dropped (default: 0.25 for agreement with --reference, 0.001 for mAP with --labels).")] = None,
    iou: Annotated[Optional[float], typer.Option(help="With --task detect: NMS IoU (default 0.45 yolo/yolov5, 0.5 ssd/picodet).")] = None,
    preset: Preset = "raw",
    weights: Weights = None,
    input_shape: InputShape = None,
    input_dtype: InputDtype = "float32",
    executor: ExecutorOption = ExecutorChoice.local,
    workers: Workers = None,
    force: Force = False,
) -> None:
    """Compute the metric of MODEL on DATA, with a 95% confidence interval, and write per-sample results."""
    from edgeq import atomic
    from edgeq.evaluate import print_validation, validate as run_validate

    atomic.check_writable(output, force=force, protect=(model, data, reference, labels, weights))
    import edgeq

    model = model_argument(model, weights, input_shape, input_dtype)
    names = [n.strip() for n in outputs.split(",") if n.strip()] if outputs is not None else None
    if names == []:
        raise UserError("--outputs names no output", "give comma-separated output names, e.g. --outputs logits,boxes")
    from edgeq.evaluate.detect_validation import detector_head, raw_tensor_warning, validate_detection

    if task not in ("auto", "detect", "raw"):
        raise UserError(f"--task {task} is not a task", "use auto, detect or raw")
    head = detector_head(model) if task != "detect" else None
    if task == "detect" or (task == "auto" and head and (reference or labels) is not None and names is None):
        record = validate_detection(model, edgeq.open_data(data, preset), reference, decoder=decoder,
                                    score_threshold=score_threshold, iou=iou, batch_size=batch_size, labels=labels)
    else:
        record = run_validate(model, edgeq.open_data(data, preset), reference=reference, batch_size=batch_size, outputs=names,
                              executor=executor.value, workers=workers)
        if head:
            record.warnings.append(raw_tensor_warning(head))
    atomic.write_json(output, record.to_dict())
    print_validation(out, record)


@app.command()
def compare(
    base: Annotated[Path, typer.Argument(help="Validation JSON of the base model (e.g. FP32).")],
    candidate: Annotated[Path, typer.Argument(help="Validation JSON of the candidate (e.g. INT8).")],
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the comparison as JSON.")] = None,
    ship_below: Annotated[float, typer.Option(help="Ship when the drop (points) is below this.")] = 1.0,
    qat_up_to: Annotated[float, typer.Option(help="Try QAT when the drop is up to this; stay FP16 above.")] = 3.0,
    force: Force = False,
) -> None:
    """Compare two validation results and give the verdict: ship, try-qat or stay-fp16."""
    from edgeq import atomic
    from edgeq.decide import DecisionRule
    from edgeq.evaluate import compare as run_compare, print_comparison, read_validation

    if json_out:
        atomic.check_writable(json_out, force=force, protect=(base, candidate))
    comparison = run_compare(read_validation(base), read_validation(candidate), DecisionRule(ship_below=ship_below, qat_up_to=qat_up_to))
    print_comparison(out, comparison)
    if json_out:
        atomic.write_json(json_out, comparison.to_dict())


@app.command()
def qat(
    model: Annotated[str, typer.Argument(help="The model as MODULE:FACTORY (a function building the torch module).")],
    weights: Annotated[Path, typer.Option(help="State dict saved with torch.save(model.state_dict(), PATH) (loaded weights-only).")],
    train: Annotated[Path, typer.Option(help="Training DATA with labels (also the calibration source).")],
    val: Annotated[Path, typer.Option(help="Validation DATA with labels: FP32, PTQ and QAT are measured on it.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the QDQ ONNX model.")],
    epochs: Annotated[int, typer.Option(help="Fine-tuning epochs (early stop on 10% of the training data).")] = 3,
    lr: Annotated[float, typer.Option(help="Learning rate (Adam, cosine schedule).")] = 1e-4,
    batch_size: Annotated[int, typer.Option(help="Training batch size.")] = 64,
    per_channel: Annotated[bool, typer.Option("--per-channel/--per-tensor", help="Weight scales per output channel or per tensor.")] = True,
    weight_bits: Annotated[int, typer.Option(help="Weight bits: 8 (INT8) or 4 (W4A8).")] = 8,
    lsq: Annotated[bool, typer.Option("--lsq", help="Learn the quantization scales too (LSQ).")] = False,
    weight_storage: Annotated[str, typer.Option(help="4-bit weights stored as int4 (smallest) or int8 (ONNX Runtime CPU's fast int8 kernels).")] = "int4",
    preset: Preset = "raw",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the figures as JSON.")] = None,
    force: Force = False,
) -> None:
    """Quantization-aware training of a PyTorch model, exported as the same QDQ ONNX model PTQ writes."""
    import edgeq
    from edgeq import atomic

    atomic.check_writable(output, force=force, protect=(weights, train, val))
    if json_out:
        atomic.check_writable(json_out, force=force, protect=(weights, train, val, output))
    if weight_bits not in (8, 4):
        raise UserError(f"--weight-bits {weight_bits} is not supported", "use 8 (INT8) or 4 (W4A8)")
    from edgeq.qat.run import QatOptions, print_qat, run_qat

    if weight_storage not in ("int4", "int8"):
        raise UserError(f"--weight-storage {weight_storage} is not supported", "use int4 or int8")
    options = QatOptions(epochs=epochs, lr=lr, batch_size=batch_size, per_channel=per_channel, weight_bits=weight_bits, learn_scales=lsq,
                         weight_storage=weight_storage)
    result = run_qat(model, weights, edgeq.open_data(train, preset), edgeq.open_data(val, preset), output, options, force=force)
    print_qat(out, result)
    if json_out:
        atomic.write_json(json_out, result)


@app.command()
def analyze(
    model: Annotated[Path, typer.Argument(help="FP32 ONNX model.")],
    calib: Annotated[Optional[Path], typer.Option(help="Calibration DATA: enables sensitivity and data-quality checks.")] = None,
    target: Annotated[str, typer.Option(help="Target profile: onnxruntime-cpu, tflite-int8, npu-int8, or a profile .json.")] = "onnxruntime-cpu",
    val: Annotated[Optional[Path], typer.Option(help="Validation DATA: coverage of its activations by the calibrated ranges.")] = None,
    samples: Annotated[int, typer.Option(help="Calibration samples used to measure sensitivity.")] = 128,
    preset: Preset = "raw",
    executor: ExecutorOption = ExecutorChoice.local,
    workers: Workers = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the analysis as JSON.")] = None,
    force: Force = False,
) -> None:
    """Why a model breaks under INT8: per-layer sensitivity, weight outliers, operator support, calibration data."""
    import edgeq
    from edgeq import atomic
    from edgeq.analyze import analyze as run_analyze
    from edgeq.analyze import print_analysis

    if json_out:
        atomic.check_writable(json_out, force=force, protect=(model, calib, val))
    result = run_analyze(model, edgeq.open_data(calib, preset) if calib else None, target,
                         val=edgeq.open_data(val, preset) if val else None, samples=samples, executor=executor.value, workers=workers)
    print_analysis(out, result)
    if json_out:
        atomic.write_json(json_out, result.to_dict())


@app.command()
def auto(
    model: Annotated[Path, typer.Argument(help=MODEL_HELP + " A MODULE:FACTORY with --train is also fine-tuned with QAT when needed.")],
    calib: Annotated[Path, typer.Option(help="Calibration DATA.")],
    val: Annotated[Path, typer.Option(help="Validation DATA: the metric the budget is in (labels give top-1; without labels, fidelity to MODEL).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for the chosen model, candidates and the report.")],
    budget: Annotated[float, typer.Option(help="Accepted drop of the validation metric, in points.")] = 1.0,
    target: Annotated[str, typer.Option(help="Target profile for the operator-support table.")] = "onnxruntime-cpu",
    threads: Annotated[int, typer.Option(help="Intra-op threads for latency measurements.")] = 1,
    max_float_layers: Annotated[Optional[int], typer.Option(help="At most this many layers back to float (0: a fully INT8 model or none).")] = None,
    weight_bits: Annotated[int, typer.Option(help="Weight bits of the candidates: 8, or 4 (W4A8; the refinement then tries learned rounding).")] = 8,
    torch_model: Annotated[Optional[str], typer.Option(help="The PyTorch model MODEL was exported from (MODULE:FACTORY), fine-tuned with QAT when no INT8 or mixed model meets the budget.")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="With --torch-model, or MODEL as MODULE:FACTORY: its state dict, torch.save(model.state_dict(), PATH) (loaded weights-only).")] = None,
    train: Annotated[Optional[Path], typer.Option(help="With --torch-model, or MODEL as MODULE:FACTORY: training DATA with labels for QAT.")] = None,
    qat_epochs: Annotated[int, typer.Option(help="With --torch-model: QAT fine-tuning epochs (early stop on 10% of --train).")] = 3,
    qat_lr: Annotated[float, typer.Option(help="With --torch-model: QAT learning rate (Adam, cosine schedule).")] = 1e-4,
    labels: Annotated[Optional[Path], typer.Option(help="A detector's ground-truth boxes (as validate --labels): the budget is in mAP@0.5 points; without, box F1 vs MODEL.")] = None,
    preset: Preset = "raw",
    input_shape: InputShape = None,
    input_dtype: InputDtype = "float32",
    executor: ExecutorOption = ExecutorChoice.local,
    workers: Workers = None,
    force: Force = False,
) -> None:
    """Meet an accuracy budget by itself: best calibration, then the fewest sensitive layers back to float, then QAT; fastest wins, FP32 and FP16 included."""
    import edgeq
    from edgeq.auto import QatSource, print_auto
    from edgeq.auto import auto as run_auto

    source, qat_factory = auto_model(model, torch_model, weights, train, input_shape, input_dtype)
    qat_source = QatSource(qat_factory, weights, edgeq.open_data(train, preset), epochs=qat_epochs, lr=qat_lr) if qat_factory else None
    _say_notes(source)
    report = run_auto(source, edgeq.open_data(calib, preset), edgeq.open_data(val, preset), budget, output, target=target,
                      executor=executor.value, workers=workers, force=force, threads=threads, max_float_layers=max_float_layers,
                      qat=qat_source, console=out, labels=labels, config=edgeq.Int8Static(weight_bits=weight_bits))
    print_auto(out, report, output)


@app.command()
def demo(
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for models and the report.")] = Path("demo-out"),
    epochs: Annotated[int, typer.Option(help="Training epochs for the digits CNN.")] = 12,
    force: Force = False,
) -> None:
    """Train a small CNN on scikit-learn's digits, quantize it every way, benchmark, validate, decide, report."""
    from edgeq.demo import run_demo

    run_demo(output, epochs=epochs, force=force, console=out)


def _say_notes(model: Path | object) -> None:
    """How a PyTorch MODEL became ONNX (which exporter, a fixed batch): said before the work starts."""
    for note in getattr(model, "notes", []):
        out.print(f"note: {note}", highlight=False)


from edgeq.cli_export import export  # noqa: E402 - registered after the commands above, in help order

app.command(name="export")(export)


def main(argv: list[str] | None = None) -> None:
    """Entry point: one line on stderr and exit 2 for user errors; exit 1 and a bug line otherwise."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    # A bare `edgeq` shows the help: click's own no-args handling differs between versions and would be a "bug" here.
    args = [a for a in args if a != "--debug"] or ["--help"]
    previous_handlers = interrupts.install()
    try:
        _run(args, debug)
    finally:
        interrupts.restore(previous_handlers)  # main() called from Python (tests) leaves the caller's handlers


def _run(args: list[str], debug: bool) -> None:
    try:
        code = app(args=args, prog_name="edgeq", standalone_mode=False)
    except interrupts.Interrupted as exc:
        print(exc.message(), file=sys.stderr)
        sys.exit(exc.exit_code)
    except UserError as exc:
        print(f"edgeq: error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except WorkerLost as exc:   # not the user's data, not a bug of edgeq's: a worker that keeps dying
        print(f"edgeq: error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(1)
    except typer.Abort:
        print("edgeq: aborted", file=sys.stderr)
        sys.exit(130)
    except _usage_errors() as exc:
        print(f"edgeq: error: {_one_line(exc.format_message())} — see `edgeq --help`", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # raised by code that bypasses the handlers, e.g. input() or a C extension
        print(interrupts.Interrupted(signal.SIGINT).message(), file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence turns bugs into one clear line
        if debug:
            traceback.print_exc()
        print(f"edgeq: internal error (this is a bug): {type(exc).__name__}: {_one_line(exc)[:200]}"
              + ("" if debug else " — rerun with --debug for the traceback"), file=sys.stderr)
        sys.exit(1)
    if code:  # typer, outside standalone mode, returns the code of an Exit instead of exiting (130 for Ctrl-C)
        if code == 130:
            print(interrupts.Interrupted(signal.SIGINT).message(), file=sys.stderr)
        sys.exit(code)


def _usage_errors() -> tuple[type[Exception], ...]:
    """Command-line mistakes (unknown option, bad value). Typer 0.2x vendors click and raises its own exception
    types, all derived from TyperException; older Typer raises click's."""
    try:
        from typer import TyperException
    except ImportError:
        from click import ClickException

        return (ClickException,)
    return (TyperException,)


def _one_line(message: object) -> str:
    """Scripts read edgeq's stderr line by line: a message is never allowed to span several."""
    return " ".join(str(message).split())


if __name__ == "__main__":
    main()

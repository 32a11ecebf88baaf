"""The pipeline: load -> instrument -> features -> imprint -> importance ->
allocate -> write -> verify -> report. Each stage is its own module; this one
only moves data between them and times them.
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from . import allocate as allocate_stage
from .data import Preprocess, check_labels, open_samples
from .errors import BadOption, GateFailed
from .features import DEFAULT_LEVELS, DEFAULT_MAX_DIM
from .imprint import imprint_labels, layer_scores
from .importance import importance as layer_importance
from .importance import upstream_layers
from .instrument import run_pass
from .load import load_model
from .verify import flips, fused_integer_kernels, optimized_op_counts, predictions, smoke_check, top1
from .weights import error_table
from .write import check_output_path, publish, quantize_to_qdq, quantize_weights

DEFAULT_BITS = (2, 3, 4, 5, 6, 7, 8)


@dataclass
class Options:
    avg_bits: float | None = None
    bits: tuple = DEFAULT_BITS
    allocator: str = "ilp"
    importance_exponent: float = allocate_stage.IMPORTANCE_EXPONENT
    levels: tuple = DEFAULT_LEVELS
    max_dim: int = DEFAULT_MAX_DIM
    eval_path: str | None = None
    max_drop: float | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    batch_size: int = 1
    seed: int = 0
    quiet: bool = False
    bias_correction: bool = True
    clip_search: bool = True


@dataclass
class Result:
    report: dict
    gate_passed: bool | None


class _Timer:
    def __init__(self):
        self.seconds = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)


def _num_classes(loaded) -> int | None:
    for value in loaded.model.graph.output:
        dims = value.type.tensor_type.shape.dim
        if len(dims) >= 2 and dims[-1].HasField("dim_value"):
            return int(np.prod([d.dim_value for d in dims[1:]]))
    return None


def check_options(options: Options) -> None:
    allocate_stage.check_budget(options.avg_bits, options.bits)
    if options.allocator not in allocate_stage.ALLOCATORS:
        raise BadOption(f"unknown allocator '{options.allocator}'; choose one of "
                        f"{', '.join(allocate_stage.ALLOCATORS)}.")
    if not options.levels or any(level < 1 for level in options.levels):
        raise BadOption("--levels must list positive pyramid sizes such as 1,2,4.")
    if options.batch_size < 1 or options.max_dim < 1:
        raise BadOption("--batch-size and --max-dim must be positive.")
    if options.max_drop is not None and options.eval_path is None:
        raise BadOption("--max-drop needs --eval: the accuracy gate is measured on held-out samples.")
    if options.max_drop is not None and options.max_drop < 0:
        raise BadOption("--max-drop must be zero or positive (top-1 points).")


@dataclass
class Analysis:
    """The MSQ measurements that the allocation and the report draw on."""

    stats: object  # instrument.PassStatistics
    labels: object  # imprint.Labels
    scores: dict  # layer -> imprint.PredictorScores
    input_score: object  # the network input's PredictorScores
    upstream: dict  # layer -> nearest upstream layers
    importance: dict  # layer -> soft-score gain over upstream
    choices: dict  # layer -> {bits: weights.WidthChoice}


def analyse(loaded, calib, options: Options, timer: _Timer) -> Analysis:
    with timer.stage("instrument+features"):
        stats = run_pass(loaded, calib, options.levels, options.max_dim, options.batch_size, options.quiet,
                         options.seed)
    with timer.stage("imprint"):
        labels = imprint_labels(calib.labels, stats.outputs, options.seed)
        scores, input_score = layer_scores(stats.features, stats.input_features, labels)
    with timer.stage("importance"):
        upstream = upstream_layers(loaded.model, loaded.layers)
        gains = layer_importance({name: s.soft for name, s in scores.items()}, input_score.soft, upstream)
    with timer.stage("weight-errors"):
        choices = {layer.name: error_table(layer, loaded.weight(layer), stats.input_sq.get(layer.name),
                                           options.bits, options.clip_search) for layer in loaded.layers}
    return Analysis(stats, labels, scores, input_score, upstream, gains, choices)


def convert(model_path: str, output_path: str, calib_path: str, options: Options | None = None) -> Result:
    options = options or Options()
    timer = _Timer()
    started = time.perf_counter()
    check_options(options)
    check_output_path(model_path, output_path)
    with timer.stage("load"):
        loaded = load_model(model_path)
        calib = open_samples(calib_path, loaded.inputs, options.preprocess, "calibration")
        classes = _num_classes(loaded)
        check_labels(calib, classes, "calibration")
        evaluation = None
        if options.eval_path:
            evaluation = open_samples(options.eval_path, loaded.inputs, options.preprocess, "evaluation")
            check_labels(evaluation, classes, "evaluation")
    analysis = analyse(loaded, calib, options, timer)
    params = {layer.name: layer.params for layer in loaded.layers}
    with timer.stage("allocate"):
        damage = allocate_stage.expected_damage(analysis.importance, analysis.choices, options.importance_exponent)
        bits = allocate_stage.allocate(options.allocator, analysis.importance, damage, params, options.bits,
                                       options.avg_bits)
    with tempfile.TemporaryDirectory(prefix="msq-") as work_dir:
        with timer.stage("write"):
            quantized = quantize_weights(loaded, bits, analysis.choices, analysis.stats.input_mean,
                                         options.bias_correction)
            written = quantize_to_qdq(loaded, quantized, analysis.stats.ranges, work_dir)
        with timer.stage("verify"):
            op_counts = optimized_op_counts(written)
            if evaluation is not None:
                measured = _evaluate(loaded, written, evaluation, options)
            else:
                smoke_check(written, loaded, calib, options.batch_size)
                measured = None
        with timer.stage("write"):
            publish(written, output_path)
    output_size = os.path.getsize(output_path)
    from .report import build_report

    report = build_report(model_path, output_path, loaded, options, bits, params, analysis, measured, op_counts,
                          fused_integer_kernels(op_counts), output_size, timer.seconds,
                          time.perf_counter() - started)
    gate = report.get("gate")
    return Result(report=report, gate_passed=None if gate is None else gate["passed"])


def _evaluate(loaded, written: str, samples, options: Options) -> dict:
    """FP32 vs quantized top-1 on held-out samples."""
    fp32_model = os.path.join(os.path.dirname(written), "fp32.onnx")
    import onnx

    onnx.save_model(loaded.model, fp32_model, save_as_external_data=loaded.model.ByteSize() > 2 * 1024**3)
    fp32 = predictions(fp32_model, loaded, samples, options.batch_size, options.quiet, "FP32 evaluation")
    quant = predictions(written, loaded, samples, options.batch_size, options.quiet, "QDQ evaluation")
    result = {"samples": int(samples.count), "source": samples.source,
              "agreement": float((fp32 == quant).mean() * 100.0), "flips": flips(fp32, quant, samples.labels)}
    if samples.labels is not None:
        result["fp32_top1"] = top1(fp32, samples.labels)
        result["quant_top1"] = top1(quant, samples.labels)
        result["drop"] = result["fp32_top1"] - result["quant_top1"]
    else:
        result["drop"] = 100.0 - result["agreement"]
    return result


def enforce_gate(result: Result) -> None:
    if result.gate_passed is False:
        gate = result.report["gate"]
        raise GateFailed(f"accuracy gate failed: top-1 drop {gate['drop']:.2f} points exceeds --max-drop "
                         f"{gate['max_drop']}; the model and report were written for inspection.")
